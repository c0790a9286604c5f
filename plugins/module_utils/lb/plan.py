# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The planner: from the declared services and a ``state.View`` of the maps, everything a change does,
decided before the first write (ids, capacity, what is rewritten, removed and deleted, the diff, the
index after the change, the table after it). The same for the full and the incremental path; a
``FullView`` also lets it repair what it finds wrong.

* A declared service is **rewritten** when it is new, or when anything of it differs in the maps:
  master fields, slots (backend ids and cumulative weights), stale slots, a service id it cannot keep,
  a Maglev table of another size.
* **Backend ids** are kept; a new address gets the lowest free id from ``View.alloc_from``. Reference
  counts (slots using a backend) follow every rewritten and removed service; a backend whose count
  reaches 0 - or that nothing used (full view) - is deleted after the writes.
* **Service ids** are kept unless the id is 0, already taken by another service, or (Maglev) outside
  the table space; new ids come from the bitmap of ids in use: Maglev ids from 1 up, others from
  65535 down. Ids of removed services are freed only after the change, so no new service reuses a
  Maglev half a reader may still use.
* **Capacity** is checked at the fullest moment of the change: everything new is written before
  anything old is deleted.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections

from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (
    ALG_MAGLEV, IDX_F_VALID, MAX_SERVICE_ID, SVC_F_AFFINITY, Index, S, bidx_key, packed_ip, popcount)
from ansible_collections.kldload.netstack.plugins.module_utils.lb import store
from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import LbError, svc_label

# What a sync asks for: the declared services (spec.Service), {key: name} of the ``state: absent`` ones,
# whether unlisted services go, check mode, the Maglev table size, the state file (read for the names and
# declarations of services a full view keeps or removes) and the callback for backends that go.
Request = collections.namedtuple("Request", "desired absent prune check maglev_m state_file on_backends_gone")

# A service to write: its declaration, what the maps hold now (or None), its id and rev after, its backend ids.
Rewrite = collections.namedtuple("Rewrite", "svc cur sid rev bids")

# A row of the table: key, service id, algorithm code, flags, affinity timeout, rev, [(address, backend id, weight)].
Record = collections.namedtuple("Record", "key id alg flags aff rev entries")


class IdAllocator:
    """Free service ids from a bitmap of the ids in use (set as they are handed out)."""

    def __init__(self, bitmap):
        self.bits = bytearray(bitmap)
        self.lo = 1
        self.hi = MAX_SERVICE_ID

    def _used(self, sid):
        return self.bits[sid >> 3] & (1 << (sid & 7))

    def _take(self, sid):
        self.bits[sid >> 3] |= 1 << (sid & 7)
        return sid

    def low(self, below):
        """The lowest free id under ``below``, or None."""
        while self.lo < below:
            if self.bits[self.lo >> 3] == 0xFF:
                self.lo = (self.lo | 7) + 1
            elif self._used(self.lo):
                self.lo += 1
            else:
                return self._take(self.lo)
        return None

    def high(self):
        """The highest free id, or None."""
        while self.hi >= 1:
            if self.bits[self.hi >> 3] == 0xFF:
                self.hi = (self.hi & ~7) - 1
            elif self._used(self.hi):
                self.hi -= 1
            else:
                return self._take(self.hi)
        return None


class Plan:
    """The change. Read by the writer (what to write and delete, in commit order), by sync() (diff,
    table, callbacks, state file) and by the tests."""

    def __init__(self, view, req):
        self.view = view
        self.req = req
        self.maglev_m = req.maglev_m
        self.want = dict((s.key, s) for s in req.desired)
        self.rewrite = []           # [Rewrite], sorted by key
        self.unchanged = []         # [(Service, Current)]
        self.removed = []           # [Current], sorted by key
        self.kept = []              # [Current] in the maps, not declared, staying (full view, prune=False)
        self.declared = {}          # {key: service dict} of the state file, when it was read
        self.fresh = []             # [(Backend, id)] new backend entries
        self.gone = []              # [(family, id, ip, port)] backends deleted after the writes
        self.stale = {4: [], 6: []}     # slot keys deleted after the writes (stale, removed, stray)
        self.set_m = False
        self.affinity_ids = set()
        self.diff = {"added": [], "removed": [], "changed": []}
        self.index = None           # layout.Index after the change
        self.refs = {}              # {(family, id): slots using the backend after the change}
        self.svc_entries = {}       # {family: service map entries after the change}
        self.service_ids = None     # bitmap of the service ids after the change
        self.bidx_upd = []          # [(key, value)]
        self.bidx_del = []          # [key]

    @property
    def changed(self):
        return bool(self.rewrite or self.removed or self.gone or self.stale[4] or self.stale[6])

    @property
    def services(self):
        """Services in the maps after the change."""
        if self.view.complete:
            return len(self.rewrite) + len(self.unchanged) + len(self.kept)
        return popcount(self.index.service_ids) - 1

    def names(self):
        """{key: "namespace/name"} for the table."""
        out = store.names(self.declared)
        out.update((s.key, s.display_name) for s in self.req.desired)
        return out

    def after(self):
        """Records of the services after the change (full view: all; index view: the declared ones)."""
        out = []
        for r in self.rewrite:
            s = r.svc
            out.append(Record(s.key, r.sid, s.alg, s.flags, s.affinity_timeout, r.rev,
                              [(b.addr, bid, b.weight) for b, bid in zip(s.backends, r.bids)]))
        for s, c in self.unchanged:
            out.append(Record(s.key, c.id, c.alg, c.flags, c.aff, c.rev,
                              [(b.addr, bid, b.weight) for b, bid in zip(s.backends, c.ids)]))
        return out + [current_record(self.view, c) for c in self.kept]

    def current(self):
        """Records of the services in scope as the maps hold them now (check mode's table)."""
        return [current_record(self.view, c) for c in self.view.services.values()]


def current_record(view, cur):
    entries = []
    prev = 0
    for bid, cum in zip(cur.ids, cur.cums):
        entries.append((view.label(cur.fam, bid), bid, cum - prev if cum > prev else 1))
        prev = max(cum, prev)
    return Record(cur.key, cur.id, cur.alg, cur.flags, cur.aff, cur.rev, entries)


def make(view, req, info):
    """The Plan of ``req`` against ``view``; ``info``: {map name: map info} (max_entries). Raises LbError
    (nothing written yet) and, from an IndexView, state.Untrusted."""
    p = Plan(view, req)
    want, cur = p.want, view.services
    if view.complete and req.prune:
        removed = sorted(k for k in cur if k not in want)
    else:
        removed = sorted(k for k in req.absent if k in cur)
    gone_keys = set(removed)
    p.removed = [cur[k] for k in removed]
    p.kept = [c for k, c in cur.items() if k not in want and k not in gone_keys]
    maglev_cap = info["kln_lb_maglev"]["max_entries"] // (2 * req.maglev_m)
    if view.maglev_m and view.maglev_m != req.maglev_m and any(c.alg == ALG_MAGLEV for c in cur.values()):
        raise LbError("maglev_table_size: the maps hold Maglev tables of size %d; changing it to %d needs the Maglev "
                      "services removed first (or the maps recreated)" % (view.maglev_m, req.maglev_m))
    if view.complete and (p.kept or p.removed) and req.state_file:
        p.declared = store.load(req.state_file)
    bids = {}
    for s in req.desired:
        for b in s.backends:
            if b.ident not in bids:
                bids[b.ident] = view.backend_id(b)
    sids = _keep_service_ids(p, maglev_cap)
    _choose_rewrites(p, bids, sids)
    _backends(p, bids, info)
    _service_entries(p, info)
    _service_ids(p, sids, maglev_cap)
    _diff(p)
    _index(p)
    return p


def _keep_service_ids(p, maglev_cap):
    """{key: id kept} for the declared services that are in the maps."""
    claimed = set(c.id for c in p.kept)
    sids = {}
    for key in sorted(p.want):
        c = p.view.services.get(key)
        if c and c.id and (p.want[key].alg != ALG_MAGLEV or c.id < maglev_cap) and c.id not in claimed:
            sids[key] = c.id
            claimed.add(c.id)
    return sids


def _choose_rewrites(p, bids, sids):
    m_change = p.view.maglev_m != p.maglev_m
    for key in sorted(p.want):
        s = p.want[key]
        c = p.view.services.get(key)
        ids = tuple([bids[b.ident] for b in s.backends])
        if c is None or key not in sids or c.stale or (s.alg == ALG_MAGLEV and m_change) \
                or (c.alg, c.flags, c.aff, c.count, c.weight) != (s.alg, s.flags, s.affinity_timeout, len(ids),
                                                                  s.total_weight) \
                or c.ids != ids or c.cums != s.cums:
            p.rewrite.append(Rewrite(s, c, sids.get(key), ((c.rev if c else 0) + 1) & 0xFFFFFFFF, ids))
        else:
            p.unchanged.append((s, c))
    p.set_m = m_change and any(r.svc.alg == ALG_MAGLEV for r in p.rewrite)
    p.affinity_ids = set(c.id for c in [r.cur for r in p.rewrite if r.cur] + p.removed if c.flags & SVC_F_AFFINITY)


def _backends(p, bids, info):
    """New backend ids (capacity checked first), reference counts after the change, backends to delete."""
    view = p.view
    fresh = {}
    for r in p.rewrite:
        for b, bid in zip(r.svc.backends, r.bids):
            if bid is None:
                fresh[b.ident] = b
    fresh = sorted(fresh.values(), key=lambda b: (b.fam, b.order))
    counts = dict(view.backend_entries)         # the backends that go are deleted only after the writes
    for b in fresh:
        counts[b.fam] += 1
    for fam in (4, 6):
        cap = info["kln_lb%d_backend" % fam]["max_entries"]
        if counts[fam] > cap:
            raise LbError("services: %d distinct IPv%d backends but kln_lb%d_backend holds %d (raise the map size)"
                          % (counts[fam], fam, fam, cap))
    if counts[4] + counts[6] > info["kln_lb_bidx"]["max_entries"]:
        raise LbError("services: %d distinct backends but kln_lb_bidx holds %d (raise the map size)"
                      % (counts[4] + counts[6], info["kln_lb_bidx"]["max_entries"]))
    free = dict((fam, view.free_ids(fam, view.alloc_from[fam])) for fam in (4, 6))
    for b in fresh:
        bid = next(free[b.fam])
        bids[b.ident] = bid
        p.fresh.append((b, bid))
    p.rewrite = [r._replace(bids=tuple([bids[b.ident] for b in r.svc.backends])) if None in r.bids else r
                 for r in p.rewrite]
    delta = {4: collections.Counter(), 6: collections.Counter()}
    for c in [r.cur for r in p.rewrite if r.cur] + p.removed:     # (a slot of a missing backend counts for nothing)
        delta[c.fam].subtract(bid for bid in c.ids if (c.fam, bid) in view.refs)
    for r in p.rewrite:
        delta[r.svc.fam].update(r.bids)
    refs = dict(view.refs)
    for fam in (4, 6):
        for bid, d in delta[fam].items():
            refs[(fam, bid)] = refs.get((fam, bid), 0) + d
    p.refs = refs
    p.gone = sorted((fam, bid) + view.address(fam, bid) for (fam, bid), n in refs.items()
                    if n <= 0 and not view.id_free(fam, bid))


def _service_entries(p, info):
    """Slots to delete, and the service maps' capacity at the fullest moment (old slots count until they go)."""
    new_keys, deleted = {4: 0, 6: 0}, {4: 0, 6: 0}
    written = {}
    for r in p.rewrite:
        s, c, n = r.svc, r.cur, len(r.bids)
        written[s.key] = n
        if c is None:
            new_keys[s.fam] += 1 + n
            continue
        new_keys[s.fam] += sum(1 for i in range(1, n + 1) if not c.has_slot(i))
        old = [i for i in range(n + 1, c.count + 1) if c.has_slot(i)] + [i for i in c.stale if i > n]
        p.stale[s.fam].extend(c.slot_key(i) for i in old)
        deleted[s.fam] += len(old)
    for c in p.removed:
        slots = [i for i in range(1, c.count + 1) if c.has_slot(i)] + c.stale
        p.stale[c.fam].extend(c.slot_key(i) for i in slots)
        deleted[c.fam] += 1 + len(slots)
    for fam, raw, key, n in p.view.strays:          # slots without a master: no reader reaches them
        if n > written.get(key, 0):
            p.stale[fam].append(raw)
            deleted[fam] += 1
    p.svc_entries = {}
    for fam in (4, 6):
        peak = p.view.svc_entries[fam] + new_keys[fam]
        cap = info["kln_lb%d_svc" % fam]["max_entries"]
        if peak > cap:
            raise LbError("services: the IPv%d services need %d entries in kln_lb%d_svc (a master + one per backend, "
                          "plus old slots during the change) but it holds %d (raise the map size)" % (fam, peak, fam, cap))
        p.svc_entries[fam] = peak - deleted[fam]


def _service_ids(p, sids, maglev_cap):
    alloc = IdAllocator(p.view.service_ids)
    fresh_ids = set()
    for i, r in enumerate(p.rewrite):
        if r.sid is not None:
            continue
        if r.svc.alg == ALG_MAGLEV:     # Maglev ids from the bottom (table space), others from the top
            sid = alloc.low(maglev_cap)
            if sid is None:
                raise LbError("services: more Maglev services than kln_lb_maglev holds (%d with table size %d; raise "
                              "the map size to (services+1)*2*%d)" % (maglev_cap - 1, p.maglev_m, p.maglev_m))
        else:
            sid = alloc.high()
            if sid is None:
                raise LbError("services: more than %d services" % MAX_SERVICE_ID)
        fresh_ids.add(sid)
        p.rewrite[i] = r._replace(sid=sid)
    kept = set(sids.values()) | set(c.id for c in p.kept) | fresh_ids
    retiring = set(c.id for c in p.removed) | set(r.cur.id for r in p.rewrite if r.cur)
    for sid in retiring - kept - {0}:
        alloc.bits[sid >> 3] &= ~(1 << (sid & 7)) & 0xFF
    p.service_ids = alloc.bits


def _diff(p):
    view = p.view
    for r in p.rewrite:
        s, c = r.svc, r.cur
        label = svc_label(s.key)
        if c is None:
            p.diff["added"].append({"service": label, "name": s.display_name, "backends": [b.addr for b in s.backends]})
            continue
        d = _svc_diff(current_record(view, c), c, s)
        if c.id != r.sid:
            d["id"] = [c.id, r.sid]
        p.diff["changed"].append(dict(service=label, name=s.display_name, **d))
    declared = store.names(p.declared)
    for c in p.removed:
        label = svc_label(c.key)
        name = p.req.absent.get(c.key) or declared.get(c.key, "")
        p.diff["removed"].append({"service": label, "name": name,
                                  "backends": [a for a, _bid, _w in current_record(view, c).entries if a != "?"]})


def _svc_diff(rec, cur, new):
    old = collections.OrderedDict((a, w) for a, _bid, w in rec.entries if a != "?")
    nb = collections.OrderedDict((b.addr, b.weight) for b in new.backends)
    out = {}
    added = [a for a in nb if a not in old]
    removed = [a for a in old if a not in nb]
    weights = ["%s %d->%d" % (a, old[a], w) for a, w in nb.items() if a in old and old[a] != w]
    if added:
        out["backends_added"] = added
    if removed:
        out["backends_removed"] = removed
    if weights:
        out["weights_changed"] = weights
    dangling = [bid for a, bid, _w in rec.entries if a == "?"]
    if dangling:
        out["missing_backend_ids"] = dangling
    for field in ("algorithm", "affinity_timeout"):
        if getattr(cur, field) != getattr(new, field):
            out[field] = [getattr(cur, field), getattr(new, field)]
    if cur.flags & ~SVC_F_AFFINITY != new.flags & ~SVC_F_AFFINITY:
        out["external"] = [cur.flags & ~SVC_F_AFFINITY, new.flags & ~SVC_F_AFFINITY]
    return out


def _index(p):
    """The index after the change: the record, and kln_lb_bidx's changes (only what differs from now)."""
    view = p.view
    backends = dict(view.backend_entries)
    nxt = dict(view.next_backend)
    for b, bid in p.fresh:
        backends[b.fam] += 1
        nxt[b.fam] = max(nxt[b.fam], bid + 1)
    for fam, _bid, _ip, _port in p.gone:
        backends[fam] -= 1
    p.index = Index(IDX_F_VALID, view.map_ids, p.svc_entries, backends, nxt, p.service_ids)
    fresh = dict(((b.fam, bid), b) for b, bid in p.fresh)
    want = {}
    pack = S["lb_bidx"].pack
    for (fam, bid), n in p.refs.items():
        if n <= 0:
            continue
        b = fresh.get((fam, bid))
        if b is not None:
            want[bidx_key(fam, b.packed, b.port)] = pack(bid, n)
            continue
        ip, port = view.address(fam, bid)
        if ip is not None:
            want[bidx_key(fam, packed_ip(ip), port)] = pack(bid, n)
    p.bidx_upd = [(k, v) for k, v in want.items() if view.bidx.get(k) != v]
    p.bidx_del = [k for k in view.bidx if k not in want]
