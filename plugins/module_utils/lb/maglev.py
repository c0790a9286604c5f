# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Maglev lookup tables (Eisenbud et al., NSDI 2016), with a fill order that disturbs fewer flows.

Each backend has a preference order over the ``m`` table entries, from sha256 of its label (its
address), so every node computes the same table for the same backend set whatever ids it
allocated. Two changes to the paper's builder, each measured (``docs/service-lb-design.md``):

* **Preference orders without arithmetic structure.** The paper's order ``offset + j*skip (mod m)``
  makes the orders of two backends whose skips stand in a small ratio mod ``m`` run side by side;
  removing one of them then moves many of the other's entries (up to 1.9 % of the flows on the
  remaining backends with 10 backends, m = 16381). Here the position ``j`` goes through a fixed
  pseudo-random permutation of ``0..m-1`` first: ``offset + perm[j]*skip``. Still a permutation of
  the entries per backend, and as cheap.
* **One probe per backend per round, up to a quota.** The paper gives every backend one *entry*
  per round, probing as far as it must; a backend that removal lets in earlier then takes entries
  other backends had. Here every backend looks at its next preferred entry once per round (weight
  times), takes it if it is free, and stops at its quota, ``m * weight / total`` (largest remainder;
  at least one entry): the quotas make the shares exact and an entry goes to the backend that
  prefers it most among those still taking. About half the disruption at 100 backends.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib

_LCG_A = 6364136223846793005
_LCG_C = 1442695040888963407
_MASK = (1 << 64) - 1
_PERM = {}


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _positions(m):
    """The shared pseudo-random permutation of 0..m-1 (Fisher-Yates over a 64-bit LCG seeded with m;
    the same on every node and Python version). Cached per size."""
    perm = _PERM.get(m)
    if perm is None:
        perm = list(range(m))
        x = m
        for i in range(m - 1, 0, -1):
            x = (x * _LCG_A + _LCG_C) & _MASK
            j = (x >> 32) % (i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        if len(_PERM) > 8:
            _PERM.clear()
        _PERM[m] = perm
    return perm


def _quotas(weights, m):
    """Entries per backend, adding up to ``m``: shared by weight, largest remainder first (ties: list order),
    at least one each."""
    total = sum(weights)
    quotas = [m * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(m * weights[i] % total), i))
    for i in by_remainder[:m - sum(quotas)]:
        quotas[i] += 1
    for i, q in enumerate(quotas):
        if not q:                       # a share under one entry: one, taken from the largest quota
            quotas[i] = 1
            quotas[quotas.index(max(quotas))] -= 1
    return quotas


def maglev_table(backends, m):
    """Maglev lookup table of prime size ``m``: a list of ``m`` backend ids.

    ``backends``: [(label, id, weight)], in the order every node lists them (normalize() sorts them).
    """
    if not backends:
        return [0] * m
    perm = _positions(m)
    quotas = _quotas([w for _label, _bid, w in backends], m)
    # per backend: [offset, skip, next position, id, weight, entries still to take]
    active = []
    for (label, bid, weight), quota in zip(backends, quotas):
        h = hashlib.sha256(label.encode()).digest()
        active.append([int.from_bytes(h[:8], "little") % m, int.from_bytes(h[8:16], "little") % (m - 1) + 1,
                       0, bid, weight, quota])
    table = [0] * m
    free = m
    while True:
        for st in active:
            off, skip, pos, bid, weight, left = st
            for _probe in range(weight):
                c = (off + perm[pos] * skip) % m
                pos += 1
                if not table[c]:
                    table[c] = bid
                    free -= 1
                    if not free:
                        return table
                    left -= 1
                    if not left:
                        break
            st[2] = pos
            st[5] = left
        active = [st for st in active if st[5]]
