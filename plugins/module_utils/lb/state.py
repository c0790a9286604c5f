# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the maps hold now, behind one interface (``View``) for the planner, read one of two ways:

* ``FullView``: every map dumped (``BPF_MAP_LOOKUP_BATCH``, unpacked with ``struct.iter_unpack``): all
  services, every backend entry and its references. The full sync uses it, and it can see what is
  wrong (stale slots, slots without a master, slots pointing at missing backends, two ids for one
  address, backends no service uses).
* ``IndexView``: the listed services only, by point lookups, with backend ids and reference counts
  from the userspace index (``kln_lb_bidx``) and the counters and service-id bitmap of
  ``kln_lb_index``. Raises ``Untrusted`` - the caller then takes the full path - when the index is
  not valid, describes other maps, or disagrees with what the lookups find.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import struct

from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (
    ALG_MAGLEV, BACKEND_MAP, BACKEND_VAL, IDX_F_VALID, IDX_KEY, IDX_MAPS, PROTO_NAMES, PROTOCOLS, S, SVC_F_AFFINITY,
    SVC_KEY, SVC_MAP, U32, Index, bidx_key, ip_text, packed_ip, svc_key)
from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import addr_port

_NO_SLOT = (0, 0, 0, 0, 0, 0, 0, 0)      # a missing slot, read as backend id 0


# a service map key as (vip and port bytes, slot, protocol): the service's entries group by fields 0 and 2
_SVC_GROUP = {4: struct.Struct("=6sHB3x"), 6: struct.Struct("=18sHB3x")}


def _service_key(vp, proto):
    """(vip, port, protocol) of a service map key's vip and port bytes and protocol number."""
    return ip_text(vp[:-2]), int.from_bytes(vp[-2:], "big"), PROTO_NAMES.get(proto, str(proto))


class Untrusted(Exception):
    """The index cannot be trusted for this change: take the full path."""


class Current:
    """One service as the maps hold it: its master's fields; ``ids`` and ``cums``, the backend ids and
    cumulative weights of slots 1..count (0 and 0 where a slot is missing, listed in ``missing``);
    ``stale``, the slot numbers above count that exist."""

    __slots__ = ("key", "fam", "vpacked", "proto", "id", "count", "alg", "flags", "weight", "aff", "rev", "ids",
                 "cums", "missing", "stale")

    def __init__(self, key, where, master, slots):
        """``where``: (family, packed vip, protocol number); ``slots``: [slot value tuple or None] of 1..count."""
        self.key = key
        self.fam, self.vpacked, self.proto = where
        _bid, self.count, self.id, self.alg, self.flags, self.weight, self.aff, self.rev = master
        self.missing = ()
        if None in slots:
            self.missing = tuple(n for n, v in enumerate(slots, 1) if v is None)
            slots = [v or _NO_SLOT for v in slots]
        self.ids = tuple([v[0] for v in slots])
        self.cums = tuple([v[5] for v in slots])
        self.stale = []

    @property
    def algorithm(self):
        return "maglev" if self.alg == ALG_MAGLEV else "random"

    @property
    def affinity_timeout(self):
        return self.aff if self.flags & SVC_F_AFFINITY else 0

    def has_slot(self, n):
        return (n <= self.count and n not in self.missing) or n in self.stale

    def slot_key(self, n):
        return svc_key(self.fam, self.vpacked, self.key[1], n, self.proto)


def read_maglev_m(maps):
    """The Maglev table size the maps hold (0: never set)."""
    raw = maps.lookup("kln_lb_config", S["lb_config_key"].pack(0))
    return S["lb_config"].unpack(raw)[0] if raw else 0


def read_index(maps):
    """The index record, or None when it cannot be trusted: never written, a writer did not finish
    (flags), or one of the maps it describes is not the map it was written for (map ids)."""
    raw = maps.lookup("kln_lb_index", IDX_KEY)
    if raw is None:
        return None
    idx = Index.unpack(raw)
    if not idx.flags & IDX_F_VALID or idx.map_ids != [maps.info[n]["id"] for n in IDX_MAPS]:
        return None
    return idx


class View:
    """The interface the planner reads (the attributes are filled by the subclasses):

    ``complete`` (every service in the maps is in ``services``), ``services`` {key: Current},
    ``maglev_m``, ``svc_entries`` and ``backend_entries`` {family: entries in the map},
    ``service_ids`` (bitmap of the ids in use), ``alloc_from`` {family: first backend id to try},
    ``next_backend`` {family: at least one above every backend id}, ``refs`` {(family, id): slots
    using it}, ``bidx`` {index key: value} (what the index holds for the backends in ``refs``),
    ``strays`` [(family, raw key, service key, slot)] (slots without a master), ``map_ids``.
    """

    complete = False

    def __init__(self, maps):
        self.map_ids = [maps.info[n]["id"] for n in IDX_MAPS]
        self.services = {}
        self.refs = {}
        self.bidx = {}
        self.strays = []
        self.labels = {}

    def backend_id(self, b):
        """The id the maps give backend ``b`` (a spec.Backend), or None."""
        raise NotImplementedError

    def address(self, fam, bid):
        """(ip, port) of a backend id, or (None, None)."""
        raise NotImplementedError

    def id_free(self, fam, bid):
        return self.address(fam, bid)[0] is None

    def free_ids(self, fam, start):
        """Backend ids the backend map does not hold, from ``start`` on (wrapping from 2^32-1 to 1)."""
        bid = start
        while True:
            if self.id_free(fam, bid):
                yield bid
            bid = bid + 1 if bid < 0xFFFFFFFF else 1

    def label(self, fam, bid):
        """"ip:port" of a backend id ("?" when the backend map does not hold it), cached."""
        hit = self.labels.get((fam, bid))
        if hit is None:
            ip, port = self.address(fam, bid)
            hit = self.labels[(fam, bid)] = addr_port(ip, port) if ip is not None else "?"
        return hit


class FullView(View):
    """Every map read whole."""

    complete = True

    def __init__(self, maps):
        View.__init__(self, maps)
        self.maglev_m = read_maglev_m(maps)
        self.addr = {}          # (family, id) -> (ip, port)
        self.ids = {}           # (family, ip, port) -> id (the lowest, if an address has two)
        self.backend_entries, self.next_backend, self.alloc_from = {}, {}, {4: 1, 6: 1}
        for fam in (4, 6):
            keys, values = maps.dump(BACKEND_MAP[fam])
            bids = [k[0] for k in U32.iter_unpack(keys)]
            ntop = {}
            for bid, (addr, port, _proto, _flags) in zip(bids, BACKEND_VAL[fam].iter_unpack(values)):
                ip = ntop.get(addr) or ntop.setdefault(addr, ip_text(addr))
                port = int.from_bytes(port, "big")
                self.addr[(fam, bid)] = (ip, port)
                ident = (fam, ip, port)
                if self.ids.get(ident, bid) >= bid:
                    self.ids[ident] = bid
                self.refs[(fam, bid)] = 0
            self.backend_entries[fam] = len(bids)
            self.next_backend[fam] = max(bids) + 1 if bids else 1
        self.service_ids = bytearray(8192)
        self.service_ids[0] = 1
        self.svc_entries = {}
        for fam in (4, 6):
            self._read_services(maps, fam)
        keys, values = maps.dump("kln_lb_bidx")
        ks, vs = S["lb_bidx_key"].size, S["lb_bidx"].size
        self.bidx = dict((keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]) for i in range(len(keys) // ks))

    def _read_services(self, maps, fam):
        keys, values = maps.dump(SVC_MAP[fam])
        n_entries = len(keys) // SVC_KEY[fam].size
        self.svc_entries[fam] = n_entries
        # {(vip and port bytes, slot, protocol): value}, built in C
        entries = dict(zip(_SVC_GROUP[fam].iter_unpack(keys), S["lb_service"].iter_unpack(values)))
        get = entries.get
        bits = self.service_ids
        refs = collections.Counter()
        slots_read = 0
        for (vp, _slot, proto), master in [kv for kv in entries.items() if not kv[0][1]]:
            slots = [get((vp, n, proto)) for n in range(1, master[1] + 1)]
            key = _service_key(vp, proto)
            cur = self.services[key] = Current(key, (fam, vp[:-2], proto), master, slots)
            bits[cur.id >> 3] |= 1 << (cur.id & 7)
            refs.update(cur.ids)
            slots_read += 1 + cur.count - len(cur.missing)
        if slots_read != n_entries:
            self._stale_and_strays(fam, entries)
        for bid, n in refs.items():
            if (fam, bid) in self.refs:
                self.refs[(fam, bid)] = n

    def _stale_and_strays(self, fam, entries):
        """Slots above their master's count (stale) and slots without a master (strays)."""
        masters = dict(((vp, proto), self.services[_service_key(vp, proto)]) for vp, slot, proto in entries if not slot)
        for vp, slot, proto in sorted(entries):
            cur = masters.get((vp, proto))
            if cur is None:
                self.strays.append((fam, SVC_KEY[fam].pack(vp[:-2], vp[-2:], slot, proto), _service_key(vp, proto), slot))
            elif slot > cur.count:
                cur.stale.append(slot)

    def backend_id(self, b):
        return self.ids.get(b.ident)

    def free_ids(self, fam, start):
        used = set(bid for f, bid in self.addr if f == fam)
        bid = start
        while True:
            if bid not in used:
                yield bid
            bid = bid + 1 if bid < 0xFFFFFFFF else 1

    def address(self, fam, bid):
        return self.addr.get((fam, bid), (None, None))


class IndexView(View):
    """The services ``keys`` by point lookups, everything else from the index."""

    def __init__(self, maps, keys, maglev_m):
        View.__init__(self, maps)
        idx = read_index(maps)
        if idx is None:
            raise Untrusted("no valid index")
        self.maglev_m = read_maglev_m(maps)
        if self.maglev_m and self.maglev_m != maglev_m:
            raise Untrusted("Maglev table size change")     # the full path decides (refused while Maglev services exist)
        self.maps = maps
        self.svc_entries, self.backend_entries = idx.svc_entries, idx.backends
        self.next_backend = idx.next_backend
        self.alloc_from = dict((fam, n or 1) for fam, n in idx.next_backend.items())
        self.service_ids = idx.service_ids
        self.cache = {}         # (family, id) -> (ip, port) or (None, None)
        self.ids = {}           # (family, ip, port) -> id or None, as the index says
        uses = collections.Counter()
        for key in keys:
            cur = self._read_service(key)
            if cur is not None:
                self.services[key] = cur
                uses.update((cur.fam, bid) for bid in cur.ids)
        for (fam, bid), n in uses.items():
            ip, port = self.address(fam, bid)
            if self._lookup_bidx(fam, ip, port) != bid or self.refs[(fam, bid)] < n:
                raise Untrusted("the index disagrees with the slots")

    def _read_service(self, key):
        """One service by point lookups (master, slots 1..count, their backends), or None."""
        vip, port, proto_name = key
        fam = 6 if ":" in vip else 4
        vpacked, proto = packed_ip(vip), PROTOCOLS[proto_name]
        smap = SVC_MAP[fam]
        raw = self.maps.lookup(smap, svc_key(fam, vpacked, port, 0, proto))
        if raw is None:
            return None
        master = S["lb_service"].unpack(raw)
        slots = []
        for n in range(1, master[1] + 1):
            raw = self.maps.lookup(smap, svc_key(fam, vpacked, port, n, proto))
            if raw is None:
                raise Untrusted("a slot is missing")            # the full path repairs it
            slots.append(S["lb_service"].unpack(raw))
            if self.address(fam, slots[-1][0])[0] is None:
                raise Untrusted("a slot points at a missing backend")
        return Current(key, (fam, vpacked, proto), master, slots)

    def _lookup_bidx(self, fam, ip, port):
        """The index's id of an address (None: not indexed); its refs into ``refs``, its entry into ``bidx``."""
        ident = (fam, ip, port)
        if ident not in self.ids:
            k = bidx_key(fam, packed_ip(ip), port)
            raw = self.maps.lookup("kln_lb_bidx", k)
            bid = None
            if raw is not None:
                bid, n = S["lb_bidx"].unpack(raw)
                self.bidx[k] = raw
                self.refs[(fam, bid)] = n
            self.ids[ident] = bid
        return self.ids[ident]

    def backend_id(self, b):
        bid = self._lookup_bidx(b.fam, b.ip, b.port)
        if bid is not None and self.address(b.fam, bid) != (b.ip, b.port):
            raise Untrusted("the index names a backend id the backend map does not hold")
        return bid

    def address(self, fam, bid):
        hit = self.cache.get((fam, bid))
        if hit is None:
            raw = self.maps.lookup(BACKEND_MAP[fam], U32.pack(bid))
            if raw is None:
                hit = (None, None)
            else:
                addr, port, _p, _f = BACKEND_VAL[fam].unpack(raw)
                hit = (ip_text(addr), int.from_bytes(port, "big"))
            self.cache[(fam, bid)] = hit
        return hit
