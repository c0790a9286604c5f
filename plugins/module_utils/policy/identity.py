# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Security identities.

- Reserved identities, with Cilium's numbers (``RESERVED``): 0 unknown (in policy entries: any
  identity), 1 host, 2 world, 3 unmanaged, 4 health, 5 init, 6 remote-node, 7 kube-apiserver,
  8 ingress. Their label set is ``["reserved:<name>"]``.
- The identity label set of a pod (``endpoint_labels``): ``k8s:<key>=<value>`` per pod label,
  ``k8s:io.kubernetes.pod.namespace=<ns>`` and ``k8s:io.cilium.k8s.namespace.labels.<key>=<value>``
  per label of its namespace (which always has ``kubernetes.io/metadata.name=<ns>``). Canonical
  form: the sorted list of those strings; canonical text: the list joined by newlines.
- Numeric identities from label sets (``allocate``), the same on every node without coordination:
  ``256 + int(first 8 bytes of sha256(canonical text), big endian) % (2**24 - 256)``. Colliding
  label sets allocated together are resolved in canonical text order, each probing upward from its
  hash (wrapping from 2**24 - 1 to 256) to the first free number; numbers that ``known`` (an existing
  ``{id: labels}`` table) holds are never given to another set, and a set ``known`` has keeps its
  number. Identities stay below 2**24 (they travel in the 24-bit VXLAN VNI).
- CIDR identities (``cidr_identities``): one per distinct prefix that policies name (``except``
  prefixes included), ``2**24 + index`` in (network address, prefix length) order; node-local (they
  never travel). ``0.0.0.0/0`` has none: it is world (2), as in Cilium. Their labels (compile.py):
  ``cidr:<prefix>`` and ``reserved:world``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import binascii
import functools
import hashlib
import ipaddress

UNKNOWN = ANY = 0
HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS = 8
RESERVED = {UNKNOWN: "unknown", HOST: "host", WORLD: "world", UNMANAGED: "unmanaged", HEALTH: "health",
            INIT: "init", REMOTE_NODE: "remote-node", KUBE_APISERVER: "kube-apiserver", INGRESS: "ingress"}
RESERVED_BY_NAME = dict((v, k) for k, v in RESERVED.items())

MIN_ENDPOINT = 256
LIMIT = 1 << 24                 # endpoint identities are < LIMIT (24-bit VNI)
CIDR_BASE = 1 << 24             # CIDR identities are CIDR_BASE + index (node-local)
_MODULUS = LIMIT - MIN_ENDPOINT

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def reserved_labels(ident):
    """The label set of reserved identity ``ident``."""
    return ["reserved:%s" % RESERVED[ident]]


def endpoint_labels(namespace, pod_labels, namespace_labels=None):
    """The canonical identity label set (sorted list) of a pod in ``namespace`` with ``pod_labels``;
    ``namespace_labels``: its namespace's labels (``kubernetes.io/metadata.name`` is added)."""
    nsl = dict(namespace_labels or {})
    nsl[NAMESPACE_NAME_LABEL] = namespace
    out = set("k8s:%s=%s" % (k, v) for k, v in (pod_labels or {}).items())
    out.add("k8s:%s=%s" % (POD_NAMESPACE_LABEL, namespace))
    out.update("k8s:%s%s=%s" % (NAMESPACE_LABELS_PREFIX, k, v) for k, v in nsl.items())
    return sorted(out)


def canonical(label_set):
    """The canonical text of a label set: its distinct labels sorted, joined by newlines."""
    return "\n".join(sorted(set(label_set)))


def hashed(label_set, _modulus=_MODULUS):
    """The identity ``label_set`` starts probing from (before collision resolution)."""
    digest = hashlib.sha256(canonical(label_set).encode("utf-8")).digest()[:8]
    return MIN_ENDPOINT + int(binascii.hexlify(digest), 16) % _modulus


def allocate(label_sets, known=None, _modulus=_MODULUS):
    """``{id: sorted labels}`` for every label set in ``label_sets`` (lists of "source:key=value").

    ``known``: an existing ``{id: labels}`` table (ids as int or str; a compile output's
    ``identities`` table works too: its reserved and CIDR entries are skipped). A set it holds keeps its id;
    its ids are never given to another set (a stale id must not be reused while others may still
    map it). Deterministic: the same input gives the same table on every node and in every process.
    ``_modulus`` (tests only) shrinks the hash range to force collisions."""
    known_ids = {}
    taken = set()
    for ident, lbls in (known or {}).items():
        ident = int(ident)
        if isinstance(lbls, dict):          # a compile output's identities table
            if lbls.get("kind", "endpoint") != "endpoint":
                continue
            lbls = lbls.get("labels") or []
        if ident in RESERVED or ident >= CIDR_BASE:
            continue
        if not MIN_ENDPOINT <= ident < LIMIT:
            raise ValueError("known identity %d is outside %d..%d" % (ident, MIN_ENDPOINT, LIMIT - 1))
        taken.add(ident)
        known_ids[canonical(lbls)] = ident
    wanted = {}
    for lbls in label_sets:
        wanted[canonical(lbls)] = sorted(set(lbls))
    out = {}
    pending = []
    for text in sorted(wanted):
        if text in known_ids:
            out[known_ids[text]] = wanted[text]
        else:
            pending.append(text)
    if len(pending) + len(taken) > LIMIT - MIN_ENDPOINT:
        raise ValueError("too many identities (at most %d)" % (LIMIT - MIN_ENDPOINT))
    for text in pending:
        ident = hashed(wanted[text], _modulus)
        while ident in taken:
            ident += 1
            if ident >= LIMIT:
                ident = MIN_ENDPOINT
        taken.add(ident)
        out[ident] = wanted[text]
    return out


@functools.lru_cache(maxsize=65536)
def network(text):
    """The IPv4Network of CIDR text (ValueError as ipaddress raises), cached: parsing a policy and compiling
    it meet every CIDR it names several times, and an apply of 1,000 ipBlock policies would parse each again."""
    return ipaddress.IPv4Network(text)


def _prefix_key(net):
    return (int(net.network_address), net.prefixlen)


def cidr_identities(prefixes):
    """``[(prefix text, id)]`` for the distinct IPv4 prefixes in ``prefixes`` (text or networks),
    sorted by network address then prefix length, ids ``CIDR_BASE + index``. ``0.0.0.0/0`` is left
    out (it is world)."""
    nets = set()
    for p in prefixes:
        net = network(p) if not isinstance(p, ipaddress.IPv4Network) else p
        if net.prefixlen:
            nets.add(net)
    return [(str(n), CIDR_BASE + i) for i, n in enumerate(sorted(nets, key=_prefix_key))]


def is_cidr(ident):
    return ident >= CIDR_BASE


def kind(ident):
    """"reserved", "endpoint" or "cidr"."""
    if ident in RESERVED:
        return "reserved"
    return "cidr" if ident >= CIDR_BASE else "endpoint"
