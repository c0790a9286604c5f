# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The writer: a Plan into the maps, in the order that never shows a reader a half-written service,
then the index.

1. the index marked invalid (a writer that dies half way leaves an index nobody trusts);
2. the Maglev table size (``kln_lb_config``), new backends, every rewritten service's slots, its
   Maglev table into the half its next rev selects (the half no reader uses);
3. the masters - each one the commit of its service;
4. then the deletions: masters of removed services (they disappear at once), stale slots and the
   slots of removed services, backends no service uses any more, affinity entries of changed and
   removed services;
5. the index: ``kln_lb_bidx`` entries that differ, and the record of ``kln_lb_index`` (valid again).

The full and the incremental path write through the same function; only the plan differs.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from array import array

from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (
    ALG_MAGLEV, BACKEND_MAP, IDX_F_VALID, IDX_KEY, SLOT, SVC_KEY, SVC_MAP, U32, S, backend_value)
from ansible_collections.kldload.netstack.plugins.module_utils.lb.maglev import maglev_table
from ansible_collections.kldload.netstack.plugins.module_utils.lb.state import read_index

_U32_NATIVE = array("I").itemsize == 4


class _Batches:
    """Entries to write, per map, as byte strings (an entry or a run of entries each); counts calls and entries."""

    def __init__(self, maps, stats):
        self.maps = maps
        self.stats = stats
        self.keys = {}
        self.values = {}

    def add(self, name, key, value):
        self.keys.setdefault(name, []).append(key)
        self.values.setdefault(name, []).append(value)

    def update(self, name):
        keys = b"".join(self.keys.pop(name, []))
        if keys:
            self.stats["calls"] += self.maps.update(name, keys, b"".join(self.values.pop(name)))
            self.stats["updates"] += len(keys) // self.maps.info[name]["key_size"]

    def delete(self, name, keys):
        if keys:
            self.stats["calls"] += self.maps.delete(name, b"".join(keys))
            self.stats["deletes"] += len(keys)


def _u32s(values):
    if _U32_NATIVE:
        return array("I", values).tobytes()
    return b"".join(U32.pack(v) for v in values)


def _queue_service(out, r, maglev_m):
    """One rewritten service's slots and Maglev half; returns its master (map, key, value)."""
    s, sid = r.svc, r.sid
    fam, smap = s.fam, SVC_MAP[s.fam]
    kpack, port = SVC_KEY[fam].pack, s.key[1].to_bytes(2, "big")
    vpacked, proto = s.vpacked, s.proto
    vpack = SLOT.pack
    out.keys.setdefault(smap, []).extend([kpack(vpacked, port, n, proto) for n in range(1, len(r.bids) + 1)])
    out.values.setdefault(smap, []).extend([vpack(bid, sid, cum) for bid, cum in zip(r.bids, s.cums)])
    if s.alg == ALG_MAGLEV:
        table = maglev_table([(b.addr, bid, b.weight) for b, bid in zip(s.backends, r.bids)], maglev_m)
        base = (sid * 2 + (r.rev & 1)) * maglev_m
        out.add("kln_lb_maglev", _u32s(range(base, base + maglev_m)), _u32s(table))
    return smap, kpack(vpacked, port, 0, proto), S["lb_service"].pack(
        0, len(r.bids), sid, s.alg, s.flags, s.total_weight, s.affinity_timeout, r.rev)


def write(maps, plan, stats):
    """Write ``plan`` (a plan.Plan) in commit order, then the index. ``stats``: calls, updates, deletes."""
    invalidate_index(maps, stats)
    out = _Batches(maps, stats)
    if plan.set_m:
        out.add("kln_lb_config", S["lb_config_key"].pack(0), S["lb_config"].pack(plan.maglev_m, 0))
    for fam in (4, 6):
        fresh = [(b, bid) for b, bid in plan.fresh if b.fam == fam]
        if fresh:
            out.keys[BACKEND_MAP[fam]] = [U32.pack(bid) for _b, bid in fresh]
            out.values[BACKEND_MAP[fam]] = [backend_value(fam, b.packed, b.port) for b, _bid in fresh]
    masters = _Batches(maps, stats)
    for r in plan.rewrite:
        masters.add(*_queue_service(out, r, plan.maglev_m))
    for name in ("kln_lb_config", "kln_lb4_backend", "kln_lb6_backend", "kln_lb4_svc", "kln_lb6_svc", "kln_lb_maglev"):
        out.update(name)
    for fam in (4, 6):
        masters.update(SVC_MAP[fam])
    for fam in (4, 6):
        out.delete(SVC_MAP[fam], [c.slot_key(0) for c in plan.removed if c.fam == fam])
    for fam in (4, 6):
        out.delete(SVC_MAP[fam], plan.stale[fam])
    for fam in (4, 6):
        out.delete(BACKEND_MAP[fam], [U32.pack(bid) for f, bid, _ip, _port in plan.gone if f == fam])
    if plan.affinity_ids:
        keys, _values = maps.dump("kln_lb_affinity")
        ks = S["lb_affinity_key"].size
        out.delete("kln_lb_affinity", [keys[i * ks:(i + 1) * ks] for i, k in enumerate(S["lb_affinity_key"].iter_unpack(keys))
                                       if k[1] in plan.affinity_ids])
    write_index(maps, plan, stats)


def invalidate_index(maps, stats):
    """Clear the valid flag before the first write of a change."""
    raw = maps.lookup("kln_lb_index", IDX_KEY)
    if raw is None or not U32.unpack(raw[:4])[0] & IDX_F_VALID:
        return
    stats["calls"] += maps.update("kln_lb_index", IDX_KEY, U32.pack(0) + raw[4:])


def write_index(maps, plan, stats):
    """Make the index describe the maps after ``plan``: kln_lb_bidx's changed entries, then the record."""
    if plan.bidx_del:
        stats["calls"] += maps.delete("kln_lb_bidx", b"".join(plan.bidx_del))
    if plan.bidx_upd:
        stats["calls"] += maps.update("kln_lb_bidx", b"".join(k for k, _v in plan.bidx_upd),
                                      b"".join(v for _k, v in plan.bidx_upd))
    stats["index_updates"] = len(plan.bidx_upd) + len(plan.bidx_del)
    rec = plan.index.pack()
    if maps.lookup("kln_lb_index", IDX_KEY) != rec:
        stats["calls"] += maps.update("kln_lb_index", IDX_KEY, rec)


def repair_index(maps, plan, stats):
    """A change that writes nothing still rebuilds an index that cannot be trusted (full path)."""
    if read_index(maps) is None:
        write_index(maps, plan, stats)
