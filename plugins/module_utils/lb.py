# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The socket load balancer's service table: validate, read the maps, plan, write in commit order.

The byte layouts are those of ``bpf/lib/lb_structs.h`` (its ``py:`` lines; a unit test keeps
``FORMATS`` equal to them). The model, for one service ``VIP:port/proto``:

* backends live in ``kln_lb{4,6}_backend`` by id (one id per address:port, shared by services);
* the service is a master slot 0 ``{count, service id, algorithm, flags, total weight, affinity
  timeout, rev}`` plus slots 1..count, each holding a backend id and the cumulative weight;
* Maglev services also have a table half ``(id*2 + rev&1)*M ..`` in ``kln_lb_maglev``.

``sync()`` reads everything, computes the wanted entries, and writes only the difference in the
order that never shows a reader a half-written service: new backends, slots, the spare Maglev
half, masters (the commit), then deletions (stale slots, removed services, unused backends,
their affinity entries). All validation happens before the first write. No Ansible imports: the
node-side ``netstack`` command uses this module too.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import fcntl
import gc
import hashlib
import ipaddress
import json
import os
import re
import socket
import struct
import sys
import time

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys

# Copy of the "py:" lines of bpf/lib/lb_structs.h (tests/unit/test_lb.py compares them).
FORMATS = {
    "lb4_key": "=4s2sHB3x", "lb6_key": "=16s2sHB3x", "lb_service": "=IHHBBHII",
    "lb_backend_key": "=I", "lb4_backend": "=4s2sBB", "lb6_backend": "=16s2sBB",
    "lb4_revnat_key": "=Q4s2sH", "lb4_revnat": "=4s2sH", "lb6_revnat_key": "=Q16s2sHI",
    "lb6_revnat": "=16s2sH", "lb_maglev_key": "=I", "lb_maglev_val": "=I",
    "lb_affinity_key": "=QHHI", "lb_affinity": "=IIQ", "lb_config_key": "=I", "lb_config": "=II",
    "lb_bidx_key": "=Bx2s16s", "lb_bidx": "=II", "lb_index": "=I6I2I2I2I8192s",
}
S = dict((k, struct.Struct(v)) for k, v in FORMATS.items())

# name: (map type, key struct, value struct, default max_entries, map_flags) - as in lb_maps.h
MAPS = {
    "kln_lb4_svc": ("hash", "lb4_key", "lb_service", 65536, 1),
    "kln_lb6_svc": ("hash", "lb6_key", "lb_service", 65536, 1),
    "kln_lb4_backend": ("hash", "lb_backend_key", "lb4_backend", 65536, 1),
    "kln_lb6_backend": ("hash", "lb_backend_key", "lb6_backend", 65536, 1),
    "kln_lb4_revnat": ("lru_hash", "lb4_revnat_key", "lb4_revnat", 262144, 0),
    "kln_lb6_revnat": ("lru_hash", "lb6_revnat_key", "lb6_revnat", 262144, 0),
    "kln_lb_maglev": ("array", "lb_maglev_key", "lb_maglev_val", 256 * 2 * 1021, 0),
    "kln_lb_affinity": ("lru_hash", "lb_affinity_key", "lb_affinity", 65536, 0),
    "kln_lb_config": ("array", "lb_config_key", "lb_config", 1, 0),
    "kln_lb_bidx": ("hash", "lb_bidx_key", "lb_bidx", 131072, 1),        # userspace index (lb_structs.h)
    "kln_lb_index": ("array", "lb_config_key", "lb_index", 1, 0),
}

ALG_RANDOM, ALG_MAGLEV, ALG_WEIGHTED = 0, 1, 2
SVC_F_AFFINITY = 0x01
PROTOCOLS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {6: "tcp", 17: "udp"}
ALGORITHMS = ("random", "maglev")
DEFAULT_MAGLEV_M = 1021
MAX_SERVICE_ID = 65535
MAX_WEIGHT_TOTAL = 65535
SERVICE_KEYS = ("name", "namespace", "vip", "port", "protocol", "algorithm", "affinity_timeout", "backends", "state")
BACKEND_KEYS = ("ip", "port", "weight")
_BACKEND_KEYS = frozenset(BACKEND_KEYS)


class LbError(ValueError):
    """Invalid input or a map that cannot hold it; raised before anything is written."""


# ---- input -------------------------------------------------------------------------------------

def _int(value, where, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, str)) \
            or (isinstance(value, str) and not re.match(r"^\s*-?[0-9]+\s*$", value)):
        raise LbError("%s: must be an integer, got %r" % (where, value))
    n = int(value)
    if not lo <= n <= hi:
        raise LbError("%s: must be %d..%d, got %d" % (where, lo, hi, n))
    return n


def _ip(value, where):
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise LbError("%s: %r is not an IPv4 or IPv6 address" % (where, value))


def _backend_ip(value, where, cache):
    """(canonical text, version, packed) of a backend address, parsed with inet_pton: backends come
    by the hundred thousand, where ipaddress objects cost most of a full sync. ``cache`` maps the
    input text to the result (a backend is usually listed by many services)."""
    text = str(value).strip()
    hit = cache.get(text)
    if hit is not None:
        return hit
    for fam, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            packed = socket.inet_pton(fam, text)
        except (OSError, ValueError):
            continue
        if version == 4 and text.count(".") != 3:
            break
        hit = cache[text] = (socket.inet_ntop(fam, packed), version, packed)
        return hit
    raise LbError("%s: %r is not an IPv4 or IPv6 address" % (where(), value))


def _packed(ip):
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def _unpack_ip(b):
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def normalize(services, maglev_m=DEFAULT_MAGLEV_M):
    """Check the declared services; return them in canonical form (backends sorted).

    Raises LbError naming the field (``services[2].backends[0].weight``) on the first problem.
    Entries with ``state: absent`` are checked too but not returned (see ``_normalize``).
    """
    return _normalize(services, maglev_m)[0]


def _normalize(services, maglev_m=DEFAULT_MAGLEV_M):
    """(present services in canonical form, {key: "namespace/name"} of the ``state: absent`` ones)."""
    if not isinstance(services, list):
        raise LbError("services: must be a list, got %s" % type(services).__name__)
    out = []
    absent = {}
    seen = {}
    ipcache = {}
    for i, svc in enumerate(services):
        where = "services[%d]" % i
        if not isinstance(svc, dict):
            raise LbError("%s: must be a mapping, got %r" % (where, svc))
        unknown = sorted(set(svc) - set(SERVICE_KEYS))
        if unknown:
            raise LbError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(unknown), ", ".join(SERVICE_KEYS)))
        state = svc.get("state") or "present"
        if state not in ("present", "absent"):
            raise LbError("%s.state: must be present or absent, got %r" % (where, state))
        name = svc.get("name")
        if state == "absent" and name in (None, ""):
            name = ""
        elif not name or not isinstance(name, str):
            raise LbError("%s.name: required, a non-empty string" % where)
        where = "services[%d] (%s)" % (i, name) if name else where
        ns = svc.get("namespace") or "default"
        if "vip" not in svc:
            raise LbError("%s.vip: required" % where)
        vip = _ip(svc["vip"], where + ".vip")
        if vip.is_unspecified or vip.is_multicast:
            raise LbError("%s.vip: %s cannot be a service address" % (where, vip))
        port = _int(svc.get("port"), where + ".port", 1, 65535)
        proto = str(svc.get("protocol") or "tcp").lower()
        if proto not in PROTOCOLS:
            raise LbError("%s.protocol: must be tcp or udp, got %r" % (where, svc.get("protocol")))
        alg = str(svc.get("algorithm") or "random").lower()
        if alg not in ALGORITHMS:
            raise LbError("%s.algorithm: must be one of %s, got %r" % (where, ", ".join(ALGORITHMS), svc.get("algorithm")))
        aff = _int(svc.get("affinity_timeout") or 0, where + ".affinity_timeout", 0, 86400 * 365)
        key = (str(vip), port, proto)
        if key in seen:
            raise LbError("%s: duplicate service %s - %s already declares it" % (where, svc_label(key), seen[key]))
        seen[key] = where
        if state == "absent":
            if svc.get("backends"):
                raise LbError("%s.backends: a service with state absent is removed; it takes no backends" % where)
            absent[key] = "%s/%s" % (ns, name) if name else ""
            continue
        backends = svc.get("backends")
        if backends is None:
            backends = []
        if not isinstance(backends, list):
            raise LbError("%s.backends: must be a list" % where)
        bes = []
        bseen = set()
        total = 0
        for j, be in enumerate(backends):
            def bw(j=j):
                return "%s.backends[%d]" % (where, j)
            if not isinstance(be, dict):
                raise LbError("%s: must be a mapping {ip, port, weight}, got %r" % (bw(), be))
            if not be.keys() <= _BACKEND_KEYS:
                raise LbError("%s: unknown field(s) %s (known: ip, port, weight)" % (bw(), ", ".join(sorted(set(be) - _BACKEND_KEYS))))
            if "ip" not in be:
                raise LbError("%s.ip: required" % bw())
            bip, bver, bpacked = _backend_ip(be["ip"], lambda: bw() + ".ip", ipcache)
            if bver != vip.version:
                raise LbError("%s.ip: %s is IPv%d but the service's vip %s is IPv%d; a service's backends must be of "
                              "its address family" % (bw(), bip, bver, vip, vip.version))
            bport = be.get("port", port)
            if type(bport) is not int or not 1 <= bport <= 65535:   # pylint: disable=unidiomatic-typecheck
                bport = _int(bport, bw() + ".port", 1, 65535)
            weight = be.get("weight", 1)
            if type(weight) is not int or not 0 < weight < 2 ** 31:  # pylint: disable=unidiomatic-typecheck
                weight = _int(weight, bw() + ".weight", -(2 ** 31), 2 ** 31)
                if weight <= 0:
                    raise LbError("%s.weight: must be > 0, got %d (remove the backend to stop sending it traffic)"
                                  % (bw(), weight))
            if (bip, bport) in bseen:
                raise LbError("%s: backend %s listed twice" % (bw(), addr_port(bip, bport)))
            bseen.add((bip, bport))
            total += weight
            bes.append((bpacked, bport, {"ip": bip, "port": bport, "weight": weight}))
        if total > MAX_WEIGHT_TOTAL:
            raise LbError("%s.backends: total weight %d is more than %d" % (where, total, MAX_WEIGHT_TOTAL))
        if alg == "maglev" and len(bes) * 10 > maglev_m:
            raise LbError("%s.backends: %d backends need a Maglev table size of at least %d (maglev_table_size is %d)"
                          % (where, len(bes), len(bes) * 10, maglev_m))
        bes.sort(key=lambda b: b[:2])
        bes = [b[2] for b in bes]
        out.append({"name": name, "namespace": ns, "vip": str(vip), "port": port, "protocol": proto,
                    "algorithm": alg, "affinity_timeout": aff, "backends": bes})
    return out, absent


def svc_key(svc):
    return (svc["vip"], svc["port"], svc["protocol"])


def addr_port(ip, port):
    ip = str(ip)
    if ":" in ip:
        return "[%s]:%d" % (ip, port)
    return "%s:%d" % (ip, port)


def svc_label(key):
    return "%s/%s" % (addr_port(key[0], key[1]), key[2].upper())


def _fam(ip):
    return 6 if ":" in ip else 4


# ---- Maglev ------------------------------------------------------------------------------------

def maglev_table(backends, m):
    """Maglev lookup table (Eisenbud et al., NSDI 2016) of prime size ``m``.

    ``backends``: [(label, id, weight)]. The permutation of each backend comes from sha256 of its
    label (its address), so every node computes the same table for the same backend set whatever
    ids it allocated; a backend takes ``weight`` turns per round. Returns a list of ``m`` ids.
    """
    if not backends:
        return [0] * m
    perm = []
    for label, _bid, _w in backends:
        h = hashlib.sha256(label.encode()).digest()
        perm.append((int.from_bytes(h[:8], "little") % m, int.from_bytes(h[8:16], "little") % (m - 1) + 1))
    nxt = [0] * len(backends)
    table = [0] * m
    filled = 0
    while True:
        for i, (_label, bid, weight) in enumerate(backends):
            off, skip = perm[i]
            for _turn in range(weight):
                c = (off + nxt[i] * skip) % m
                while table[c]:
                    nxt[i] += 1
                    c = (off + nxt[i] * skip) % m
                table[c] = bid
                nxt[i] += 1
                filled += 1
                if filled == m:
                    return table


# ---- the maps ----------------------------------------------------------------------------------

class Maps:
    """The pinned LB maps of one directory, opened once (fds closed by close())."""

    def __init__(self, mapdir, names=None):
        self.mapdir = mapdir
        self.fd = {}
        self.info = {}
        try:
            for name in names or MAPS:
                path = os.path.join(mapdir, name)
                if not os.path.exists(path):
                    raise LbError("map %s is not pinned in %s: load the socket LB programs first "
                                  "(kldload.netstack.bpf_program / the dataplane role)" % (name, mapdir))
                fd = bpfsys.obj_get(path)
                self.fd[name] = fd
                info = bpfsys.map_info(fd)
                typ, k, v, _n, _f = MAPS[name]
                if (info["type"], info["key_size"], info["value_size"]) != (typ, S[k].size, S[v].size):
                    raise LbError("map %s is %s key %d value %d, not the layout of this collection's socket LB "
                                  "(%s key %d value %d): the loaded object and this module do not match"
                                  % (path, info["type"], info["key_size"], info["value_size"], typ, S[k].size, S[v].size))
                self.info[name] = info
        except Exception:
            self.close()
            raise

    def close(self):
        for fd in self.fd.values():
            os.close(fd)
        self.fd = {}
        if getattr(self, "lock_fd", None) is not None:
            os.close(self.lock_fd)      # releases the flock
            self.lock_fd = None

    def dump(self, name):
        _t, k, v, _n, _f = MAPS[name]
        return bpfsys.map_dump(self.fd[name], S[k].size, S[v].size, self.info[name]["max_entries"])

    def update(self, name, items):
        if not items:
            return 0
        _t, k, v, _n, _f = MAPS[name]
        return bpfsys.map_update_batch(self.fd[name], items, S[k].size, S[v].size)

    def delete(self, name, keys):
        if not keys:
            return 0
        _t, k, _v, _n, _f = MAPS[name]
        return bpfsys.map_delete_batch(self.fd[name], keys, S[k].size)

    def lookup(self, name, key):
        """The value of one key, or None."""
        return bpfsys.map_lookup(self.fd[name], key, S[MAPS[name][2]].size)

    def lock(self):
        """Serialize the writers of this map directory: an exclusive flock() on it until close()."""
        self.lock_fd = os.open(self.mapdir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def maglev_m(self):
        raw = bpfsys.map_lookup(self.fd["kln_lb_config"], S["lb_config_key"].pack(0), S["lb_config"].size)
        return S["lb_config"].unpack(raw)[0] if raw else 0


def _pkey(fam, vip_packed, port, slot, proto):
    return S["lb%d_key" % fam].pack(vip_packed, port.to_bytes(2, "big"), slot, proto)


def read_state(maps):
    """The table in the maps: {key: service record with ids}, backends {(fam, ip, port): id}."""
    backends = {}
    by_id = {}
    ntop = _unpack_ip
    for fam in (4, 6):
        unpack = S["lb%d_backend" % fam].unpack
        for k, v in maps.dump("kln_lb%d_backend" % fam):
            bid = int.from_bytes(k, sys.byteorder)
            addr, port, _proto, _flags = unpack(v)
            ip = ntop(addr)
            port = int.from_bytes(port, "big")
            backends[(fam, ip, port)] = bid
            by_id[(fam, bid)] = (ip, port)
    services = {}
    slots = {}
    keys = {}
    vunpack = S["lb_service"].unpack
    for fam in (4, 6):
        kunpack = S["lb%d_key" % fam].unpack
        for k, v in maps.dump("kln_lb%d_svc" % fam):
            addr, port, slot, proto = kunpack(k)
            key = keys.get((addr, port, proto))
            if key is None:
                key = keys[(addr, port, proto)] = (ntop(addr), int.from_bytes(port, "big"),
                                                   PROTO_NAMES.get(proto, str(proto)))
            rec = vunpack(v)
            if slot == 0:
                bid, count, sid, alg, flags, weight, aff, rev = rec
                services[key] = {"vip": key[0], "port": key[1], "protocol": key[2], "id": sid, "count": count,
                                 "alg": alg, "flags": flags, "weight": weight, "affinity_timeout": aff, "rev": rev,
                                 "family": fam}
            else:
                slots.setdefault(key, {})[slot] = (rec[0], rec[5])
    for key, svc in services.items():
        _finish_service(svc, slots.get(key, {}), by_id)
    return services, backends


def _finish_service(svc, slots, by_id, nothing=(None, None)):
    """Add backends (from ``slots`` {slot: (backend id, cumulative weight)} and ``by_id`` {(family, id):
    (ip, port)}), stale slots and the algorithm name to a master's record."""
    fam = svc["family"]
    bes = []
    prev = 0
    for slot in range(1, svc["count"] + 1):
        bid, cum = slots.get(slot, (0, 0))
        ip, port = by_id.get((fam, bid), nothing)
        w = cum - prev if cum > prev else 1
        prev = max(cum, prev)
        bes.append({"ip": ip, "port": port, "weight": w, "id": bid, "slot": slot})
    svc["backends"] = bes
    svc["stale_slots"] = sorted(n for n in slots if n > svc["count"])
    svc["algorithm"] = "maglev" if svc["alg"] == ALG_MAGLEV else "random"
    if not svc["flags"] & SVC_F_AFFINITY:
        svc["affinity_timeout"] = 0


def _shape(svc):
    """What decides whether a service must be rewritten."""
    return (svc["algorithm"], svc["affinity_timeout"],
            tuple((b["ip"], b["port"], b["weight"]) for b in svc["backends"]))


def _svc_diff(old, new):
    ob = dict(((b["ip"], b["port"]), b["weight"]) for b in old["backends"] if b["ip"] is not None)
    nb = dict(((b["ip"], b["port"]), b["weight"]) for b in new["backends"])
    out = {}
    added = [addr_port(ip, p) for (ip, p) in nb if (ip, p) not in ob]
    removed = [addr_port(ip, p) for (ip, p) in ob if (ip, p) not in nb]
    weights = ["%s %d->%d" % (addr_port(ip, p), ob[(ip, p)], w) for (ip, p), w in nb.items()
               if (ip, p) in ob and ob[(ip, p)] != w]
    if added:
        out["backends_added"] = added
    if removed:
        out["backends_removed"] = removed
    if weights:
        out["weights_changed"] = weights
    dangling = [b["id"] for b in old["backends"] if b["ip"] is None]
    if dangling:
        out["missing_backend_ids"] = dangling
    for f in ("algorithm", "affinity_timeout"):
        if old[f] != new[f]:
            out[f] = [old[f], new[f]]
    return out


def sync(mapdir, services, prune=True, check=False, maglev_m=DEFAULT_MAGLEV_M, state_file=None,
         on_backends_gone=None):
    """Make the maps hold ``services``; return {changed, diff, table, stats, services}.

    ``prune=True``: ``services`` is the whole table; services in the maps that it does not declare
    are removed. Every call reads all the maps (a full sync: it also repairs what it finds wrong).

    ``prune=False``: ``services`` lists only the services to add or change, and those to remove
    (``state: absent``); every other service stays as it is. This is the incremental path: it reads
    and writes only the listed services, with point lookups, through the userspace index
    (``kln_lb_bidx``, ``kln_lb_index``) the full sync keeps. When the index cannot be trusted
    (never built, a map recreated, a writer that did not finish) it falls back to the full path,
    which rebuilds it; ``stats.path`` says which ran. The returned ``table`` then holds only the
    listed services.

    ``check``: compute only. ``state_file``: JSON file with the declared services (names, for
    listing; restore at boot), written after a successful sync; the incremental path appends to
    its journal (``<state_file>.journal``) instead of rewriting it. ``on_backends_gone(list of (ip,
    port))``: called after the writes with backends that left every service (the module destroys
    connected UDP sockets). Writers of one map directory are serialized with flock().
    """
    t0 = time.time()
    if not is_prime(maglev_m) or maglev_m < 7:
        raise LbError("maglev_table_size: must be a prime >= 7, got %r" % maglev_m)
    with _no_gc():
        desired, absent = _normalize(services, maglev_m)
        maps = Maps(mapdir)
        try:
            if not check:
                maps.lock()
            if not prune:
                res = _update(maps, desired, absent, check, maglev_m, state_file, on_backends_gone, t0)
                if res is not None:
                    return res
            res = _sync(maps, desired, prune, check, maglev_m, state_file, on_backends_gone, t0, absent)
            if not prune:
                listed = set(svc_label(svc_key(s)) for s in desired)
                res["table"] = [r for r in res["table"] if r["service"] in listed]
            return res
        finally:
            maps.close()


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while a table is built: its hundreds of thousands of small
    acyclic dicts and tuples make every full collection walk them all (half of a 10,000-service
    sync's time here); reference counting frees them as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _names(state):
    return dict((svc_label(k), "%s/%s" % (s.get("namespace", "default"), s.get("name", "?"))) for k, s in state.items())


def _sync(maps, desired, prune, check, maglev_m, state_file, on_backends_gone, t0, absent=None):
    current, cur_backends = read_state(maps)
    want = dict((svc_key(s), s) for s in desired)
    absent = absent or {}
    keep = {} if prune else dict((k, v) for k, v in current.items() if k not in want and k not in absent)
    gone_keys = sorted(k for k in current if k not in want and k not in keep)
    # the last declared services: names of services kept or removed (parsing the file costs 0.1 s at 10,000)
    prev_state = _load_state(state_file) if state_file and (keep or gone_keys) else {}
    names = _names(prev_state)
    cur_m = maps.maglev_m()
    maglev_cap = maps.info["kln_lb_maglev"]["max_entries"] // (2 * maglev_m)
    if cur_m and cur_m != maglev_m and any(s["alg"] == ALG_MAGLEV for s in current.values()):
        raise LbError("maglev_table_size: the maps hold Maglev tables of size %d; changing it to %d needs the Maglev "
                      "services removed first (or the maps recreated)" % (cur_m, maglev_m))

    # ---- ids ----
    bids = dict(cur_backends)
    used_bids = {4: set(), 6: set()}
    for (fam, _ip, _p), bid in cur_backends.items():
        used_bids[fam].add(bid)
    needed = set()
    for s in list(want.values()) + list(keep.values()):
        fam = _fam(s["vip"])
        for b in s["backends"]:
            if b["ip"] is not None:
                needed.add((fam, b["ip"], b["port"]))
    next_bid = {4: 1, 6: 1}
    new_backends = []
    for bk in sorted((bk for bk in needed if bk not in bids), key=lambda t: (t[0], _packed(t[1]), t[2])):
        fam = bk[0]
        while next_bid[fam] in used_bids[fam]:
            next_bid[fam] += 1
        bids[bk] = next_bid[fam]
        used_bids[fam].add(next_bid[fam])
        new_backends.append(bk)
    counts = {4: 0, 6: 0}
    for bk in needed:
        counts[bk[0]] += 1
    for bk in cur_backends:
        if bk not in needed:
            counts[bk[0]] += 1      # deleted only after the writes
    _check_backend_capacity(maps, counts)

    used_sids = set(s["id"] for s in keep.values())
    plan_sid = {}
    for key, s in want.items():
        cur = current.get(key)
        if cur and cur["id"] and (s["algorithm"] != "maglev" or cur["id"] < maglev_cap) and cur["id"] not in used_sids:
            plan_sid[key] = cur["id"]
            used_sids.add(cur["id"])
    # ids that current masters still carry until this sync's deletes: not for a new service in this sync
    retiring = set(s["id"] for s in current.values()) - used_sids
    lo, hi = 1, MAX_SERVICE_ID
    for key in sorted(k for k in want if k not in plan_sid):
        if want[key]["algorithm"] == "maglev":   # Maglev ids from the bottom (table space), others from the top
            while lo in used_sids or lo in retiring:
                lo += 1
            if lo >= maglev_cap:
                raise _maglev_full(maglev_cap, maglev_m)
            sid = lo
        else:
            while hi in used_sids or hi in retiring:
                hi -= 1
            sid = hi
        if sid < 1 or sid > MAX_SERVICE_ID:
            raise LbError("services: more than %d services" % MAX_SERVICE_ID)
        plan_sid[key] = sid
        used_sids.add(sid)
    if len(used_sids) > MAX_SERVICE_ID:
        raise LbError("services: %d services, at most %d fit" % (len(used_sids), MAX_SERVICE_ID))
    for fam in (4, 6):
        cap = maps.info["kln_lb%d_svc" % fam]["max_entries"]
        n = sum(1 + len(s["backends"]) for k, s in list(want.items()) + list(keep.items()) if _fam(k[0]) == fam)
        n += sum(len(current[k]["backends"]) - len(want[k]["backends"]) for k in want
                 if k in current and _fam(k[0]) == fam and len(current[k]["backends"]) > len(want[k]["backends"]))
        n += sum(1 + len(current[k]["backends"]) + len(current[k]["stale_slots"]) for k in gone_keys
                 if _fam(k[0]) == fam)      # removed only after the writes
        if n > cap:
            raise _svc_full(fam, n, cap)

    # ---- what changes ----
    added, removed, changed = [], [], []
    rewrite = []
    for key, s in sorted(want.items()):
        cur = current.get(key)
        label = svc_label(key)
        nm = "%s/%s" % (s["namespace"], s["name"])
        if cur is None:
            added.append(_added(label, nm, s))
            rewrite.append(key)
        elif _shape(cur) != _shape(s) or cur["id"] != plan_sid[key] or cur["stale_slots"] \
                or any(b["id"] != bids.get((_fam(b["ip"]), b["ip"], b["port"])) for b in cur["backends"] if b["ip"]) \
                or (s["algorithm"] == "maglev" and cur_m != maglev_m):
            d = _svc_diff(cur, s)
            if cur["id"] != plan_sid[key]:
                d["id"] = [cur["id"], plan_sid[key]]
            changed.append(dict(service=label, name=nm, **d))
            rewrite.append(key)
    for key in gone_keys:
        label = svc_label(key)
        removed.append(_removed(label, absent.get(key) or names.get(label, ""), current[key]))
    gone_backends = sorted((bk for bk in cur_backends if bk not in needed), key=lambda t: (t[0], t[1], t[2]))
    set_m = cur_m != maglev_m and any(want[k]["algorithm"] == "maglev" for k in want)
    changed_flag = bool(added or removed or changed or set_m or gone_backends)
    diff = {"added": added, "removed": removed, "changed": changed}
    stats = {"updates": 0, "deletes": 0, "calls": 0, "path": "full"}
    if check or not changed_flag:
        if not check:
            if state_file:
                _write_state(state_file, list(want.values()) + [prev_state[k] for k in keep if k in prev_state],
                             only_if_changed=True)
            _write_index(maps, current, stats, only_if_invalid=True)
        stats["seconds"] = round(time.time() - t0, 4)
        names.update(_names(want))
        return {"changed": changed_flag, "diff": diff, "table": _table(current, names), "stats": stats,
                "services": len(want) + len(keep)}

    # ---- writes, in commit order ----
    _invalidate_index(maps, stats)
    upd = {}
    if set_m:
        upd.setdefault("kln_lb_config", []).append((S["lb_config_key"].pack(0), S["lb_config"].pack(maglev_m, 0)))
    for bk in new_backends:
        _queue_backend(upd, bk, bids[bk])
    masters = {}
    stale = {}
    rewritten = set(rewrite)
    after = dict((k, current[k]) for k in list(want) + list(keep) if k not in rewritten)
    for key in rewrite:
        after[key] = _queue_service(key, want[key], current.get(key), plan_sid[key], bids, maglev_m, upd, masters, stale)
    rm_masters = {}
    for key in gone_keys:
        _queue_removal(key, current[key], rm_masters, stale)
    gone = dict((bk, cur_backends[bk]) for bk in gone_backends)
    touched = set(current[k]["id"] for k in gone_keys) | set(current[k]["id"] for k in rewrite if k in current)
    _write(maps, upd, masters, rm_masters, stale, gone, touched, stats)
    _write_index(maps, after, stats)
    if state_file:
        _write_state(state_file, list(want.values()) + [prev_state[k] for k in keep if k in prev_state])
    if on_backends_gone and gone_backends:
        on_backends_gone([(ip, port) for _f, ip, port in gone_backends])
    names.update(_names(want))
    stats["seconds"] = round(time.time() - t0, 4)
    return {"changed": True, "diff": diff, "table": _table(after, names), "stats": stats,
            "services": len(after)}


def _check_backend_capacity(maps, counts):
    """``counts``: {family: backends in the maps at the fullest moment of the change}."""
    for fam in (4, 6):
        cap = maps.info["kln_lb%d_backend" % fam]["max_entries"]
        if counts[fam] > cap:
            raise LbError("services: %d distinct IPv%d backends but kln_lb%d_backend holds %d (raise the map size)"
                          % (counts[fam], fam, fam, cap))
    if counts[4] + counts[6] > maps.info["kln_lb_bidx"]["max_entries"]:
        raise LbError("services: %d distinct backends but kln_lb_bidx holds %d (raise the map size)"
                      % (counts[4] + counts[6], maps.info["kln_lb_bidx"]["max_entries"]))


def _maglev_full(maglev_cap, maglev_m):
    return LbError("services: more Maglev services than kln_lb_maglev holds (%d with table size %d; raise "
                   "the map size to (services+1)*2*%d)" % (maglev_cap - 1, maglev_m, maglev_m))


def _svc_full(fam, n, cap):
    return LbError("services: the IPv%d services need %d entries in kln_lb%d_svc (a master + one per backend, "
                   "plus old slots during the change) but it holds %d (raise the map size)" % (fam, n, fam, cap))


def _added(label, name, s):
    return {"service": label, "name": name, "backends": [addr_port(b["ip"], b["port"]) for b in s["backends"]]}


def _removed(label, name, cur):
    return {"service": label, "name": name,
            "backends": [addr_port(b["ip"], b["port"]) for b in cur["backends"] if b["ip"]]}


# ---- writing -------------------------------------------------------------------------------------

def _queue_backend(upd, bk, bid):
    fam, ip, port = bk
    upd.setdefault("kln_lb%d_backend" % fam, []).append(
        (S["lb_backend_key"].pack(bid), S["lb%d_backend" % fam].pack(_packed(ip), port.to_bytes(2, "big"), 0, 0)))


def _queue_service(key, s, cur, sid, bids, maglev_m, upd, masters, stale):
    """Queue one service's slots, Maglev half and master (and its stale slots for deletion); return its
    record as read_state() will read it after the writes."""
    fam = _fam(key[0])
    smap = "kln_lb%d_svc" % fam
    vp = _packed(key[0])
    proto = PROTOCOLS[key[2]]
    rev = ((cur["rev"] if cur else 0) + 1) & 0xFFFFFFFF
    cum = 0
    weights = [b["weight"] for b in s["backends"]]
    rows = []
    slots = upd.setdefault(smap, [])
    for slot, b in enumerate(s["backends"], start=1):
        cum += b["weight"]
        bid = bids[(fam, b["ip"], b["port"])]
        slots.append((_pkey(fam, vp, key[1], slot, proto), S["lb_service"].pack(bid, 0, sid, 0, 0, cum, 0, 0)))
        rows.append({"ip": b["ip"], "port": b["port"], "weight": b["weight"], "id": bid, "slot": slot})
    if s["algorithm"] == "maglev":
        alg = ALG_MAGLEV
        table = maglev_table([(addr_port(b["ip"], b["port"]), bids[(fam, b["ip"], b["port"])], b["weight"])
                              for b in s["backends"]], maglev_m)
        base = (sid * 2 + (rev & 1)) * maglev_m
        upd.setdefault("kln_lb_maglev", []).extend(
            (S["lb_maglev_key"].pack(base + i), S["lb_maglev_val"].pack(bid)) for i, bid in enumerate(table))
    elif len(set(weights)) > 1:
        alg = ALG_WEIGHTED
    else:
        alg = ALG_RANDOM
    flags = SVC_F_AFFINITY if s["affinity_timeout"] else 0
    masters.setdefault(smap, []).append((_pkey(fam, vp, key[1], 0, proto), S["lb_service"].pack(
        0, len(s["backends"]), sid, alg, flags, cum, s["affinity_timeout"], rev)))
    if cur:
        old_n = max([cur["count"]] + cur["stale_slots"])
        stale.setdefault(smap, []).extend(_pkey(fam, vp, key[1], n, proto)
                                          for n in range(len(s["backends"]) + 1, old_n + 1)
                                          if n <= cur["count"] or n in cur["stale_slots"])
    return {"vip": key[0], "port": key[1], "protocol": key[2], "id": sid, "count": len(rows), "alg": alg,
            "flags": flags, "weight": cum, "affinity_timeout": s["affinity_timeout"], "rev": rev, "family": fam,
            "backends": rows, "stale_slots": [], "algorithm": s["algorithm"]}


def _queue_removal(key, cur, rm_masters, stale):
    """Queue a removed service: its master (deleted first) and its slots (deleted with the stale ones)."""
    fam = _fam(key[0])
    vp = _packed(key[0])
    proto = PROTOCOLS.get(key[2], 0)
    smap = "kln_lb%d_svc" % fam
    rm_masters.setdefault(smap, []).append(_pkey(fam, vp, key[1], 0, proto))
    stale.setdefault(smap, []).extend(
        _pkey(fam, vp, key[1], n, proto) for n in sorted(set(range(1, cur["count"] + 1)) | set(cur["stale_slots"])))


def _write(maps, upd, masters, rm_masters, stale, gone, touched, stats):
    """The writes in commit order: config, backends, slots, Maglev halves, masters (the commit of every
    rewritten service); then removed masters (the service disappears at once), stale slots and the slots
    of removed services, backends no service uses any more, and the affinity entries of changed services."""
    def do(op, name, items):
        if items:
            stats["calls"] += (maps.update if op == "update" else maps.delete)(name, items)
            stats["updates" if op == "update" else "deletes"] += len(items)
    for name in ("kln_lb_config", "kln_lb4_backend", "kln_lb6_backend", "kln_lb4_svc", "kln_lb6_svc", "kln_lb_maglev"):
        do("update", name, upd.get(name, []))
    for name in ("kln_lb4_svc", "kln_lb6_svc"):
        do("update", name, masters.get(name, []))
    for name in ("kln_lb4_svc", "kln_lb6_svc"):
        do("delete", name, rm_masters.get(name, []))
    for name in ("kln_lb4_svc", "kln_lb6_svc"):
        do("delete", name, stale.get(name, []))
    for fam in (4, 6):
        do("delete", "kln_lb%d_backend" % fam,
           [S["lb_backend_key"].pack(bid) for bk, bid in sorted(gone.items()) if bk[0] == fam])
    if touched:
        do("delete", "kln_lb_affinity",
           [k for k, _v in maps.dump("kln_lb_affinity") if S["lb_affinity_key"].unpack(k)[1] in touched])


# ---- the userspace index (kln_lb_bidx, kln_lb_index) -------------------------------------------------

IDX_F_VALID = 0x01
_IDX_MAPS = ("kln_lb4_svc", "kln_lb6_svc", "kln_lb4_backend", "kln_lb6_backend", "kln_lb_maglev", "kln_lb_bidx")
_IDX_KEY = struct.pack("=I", 0)
_NOT_FF = re.compile(b"[^\xff]")


def _bidx_key(bk):
    fam, ip, port = bk
    return S["lb_bidx_key"].pack(fam, port.to_bytes(2, "big"), _packed(ip))


def _read_index(maps):
    """The index record as a dict, or None when it cannot be trusted: never written, a writer did not
    finish (flags), or one of the maps it describes is not the map it was written for (map ids)."""
    raw = maps.lookup("kln_lb_index", _IDX_KEY)
    if raw is None:
        return None
    v = S["lb_index"].unpack(raw)
    idx = {"flags": v[0], "map_ids": list(v[1:7]), "svc_entries": {4: v[7], 6: v[8]}, "backends": {4: v[9], 6: v[10]},
           "next_backend": {4: v[11], 6: v[12]}, "service_ids": bytearray(v[13])}
    if not idx["flags"] & IDX_F_VALID or idx["map_ids"] != [maps.info[n]["id"] for n in _IDX_MAPS]:
        return None
    return idx


def _pack_index(maps, flags, svc_entries, backends, next_backend, service_ids):
    return S["lb_index"].pack(flags, *([maps.info[n]["id"] for n in _IDX_MAPS]
                                       + [svc_entries[4], svc_entries[6], backends[4], backends[6],
                                          next_backend[4], next_backend[6], bytes(service_ids)]))


def _invalidate_index(maps, stats):
    """Clear the valid flag before the first write of a change: a writer that dies half way leaves an
    index nobody trusts (the next change then takes the full path, which rebuilds it)."""
    raw = maps.lookup("kln_lb_index", _IDX_KEY)
    if raw is None or not S["lb_index"].unpack(raw)[0] & IDX_F_VALID:
        return
    maps.update("kln_lb_index", [(_IDX_KEY, struct.pack("=I", 0) + raw[4:])])
    stats["calls"] += 1


def _write_index(maps, table, stats, only_if_invalid=False):
    """Make the index describe ``table`` (read_state()'s records of every service in the maps)."""
    if only_if_invalid and _read_index(maps) is not None:
        return
    refs = {}
    svc_entries = {4: 0, 6: 0}
    bitmap = bytearray(8192)
    bitmap[0] = 1                       # service id 0 is never used
    for s in table.values():
        fam = s["family"]
        svc_entries[fam] += 1 + s["count"] + len(s["stale_slots"])
        sid = s["id"]
        bitmap[sid >> 3] |= 1 << (sid & 7)
        for b in s["backends"]:
            if b["ip"] is not None:
                bk = (fam, b["ip"], b["port"], b["id"])
                refs[bk] = refs.get(bk, 0) + 1
    want = {}
    backends = {4: 0, 6: 0}
    next_backend = {4: 1, 6: 1}
    pack = S["lb_bidx"].pack
    for (fam, ip, port, bid), n in refs.items():
        want[_bidx_key((fam, ip, port))] = pack(bid, n)
        backends[fam] += 1
        if bid >= next_backend[fam]:
            next_backend[fam] = bid + 1
    have = dict(maps.dump("kln_lb_bidx"))
    upd = [(k, v) for k, v in want.items() if have.get(k) != v]
    dels = [k for k in have if k not in want]
    if dels:
        stats["calls"] += maps.delete("kln_lb_bidx", dels)
    if upd:
        stats["calls"] += maps.update("kln_lb_bidx", upd)
    stats["index_updates"] = len(upd) + len(dels)
    rec = _pack_index(maps, IDX_F_VALID, svc_entries, backends, next_backend, bitmap)
    if maps.lookup("kln_lb_index", _IDX_KEY) != rec:
        stats["calls"] += maps.update("kln_lb_index", [(_IDX_KEY, rec)])


def _free_sid(bitmap, lo, hi, top):
    """A service id in lo..hi-1 whose bit is clear: the lowest one, or the highest with ``top``."""
    if top:
        end = hi >> 3
        while end > (lo >> 3):
            i = len(bitmap[:end].rstrip(b"\xff")) - 1
            if i < 0:
                return None
            for bit in range(7, -1, -1):
                sid = i * 8 + bit
                if lo <= sid < hi and not bitmap[i] & (1 << bit):
                    return sid
            end = i
        return None
    pos = lo >> 3
    while True:
        m = _NOT_FF.search(bitmap, pos)
        if m is None:
            return None
        i = m.start()
        for bit in range(8):
            sid = i * 8 + bit
            if lo <= sid < hi and not bitmap[i] & (1 << bit):
                return sid
        if i * 8 >= hi:
            return None
        pos = i + 1


def _read_service(maps, key, backend_at):
    """One service's record (as read_state() gives it) by point lookups, or None."""
    fam = _fam(key[0])
    smap = "kln_lb%d_svc" % fam
    vp = _packed(key[0])
    proto = PROTOCOLS[key[2]]
    raw = maps.lookup(smap, _pkey(fam, vp, key[1], 0, proto))
    if raw is None:
        return None
    _bid, count, sid, alg, flags, weight, aff, rev = S["lb_service"].unpack(raw)
    svc = {"vip": key[0], "port": key[1], "protocol": key[2], "id": sid, "count": count, "alg": alg, "flags": flags,
           "weight": weight, "affinity_timeout": aff, "rev": rev, "family": fam}
    slots = {}
    for n in range(1, count + 1):
        raw = maps.lookup(smap, _pkey(fam, vp, key[1], n, proto))
        if raw is not None:
            rec = S["lb_service"].unpack(raw)
            slots[n] = (rec[0], rec[5])
            backend_at(fam, rec[0])
    _finish_service(svc, slots, backend_at.cache)
    return svc


class _BackendLookup:
    """Backend id -> (ip, port) by point lookups, cached: backend_at(fam, id)."""

    def __init__(self, maps):
        self.maps = maps
        self.cache = {}

    def __call__(self, fam, bid):
        hit = self.cache.get((fam, bid))
        if hit is None:
            raw = self.maps.lookup("kln_lb%d_backend" % fam, S["lb_backend_key"].pack(bid))
            if raw is None:
                hit = (None, None)
            else:
                addr, port, _p, _f = S["lb%d_backend" % fam].unpack(raw)
                hit = (_unpack_ip(addr), int.from_bytes(port, "big"))
            self.cache[(fam, bid)] = hit
        return hit


def _update(maps, desired, absent, check, maglev_m, state_file, on_backends_gone, t0):
    """The incremental path of sync(prune=False). None when the index cannot be trusted."""
    idx = _read_index(maps)
    if idx is None:
        return None
    cur_m = maps.maglev_m()
    if cur_m and cur_m != maglev_m:
        return None                     # the full path decides (refused while Maglev services exist)
    maglev_cap = maps.info["kln_lb_maglev"]["max_entries"] // (2 * maglev_m)
    want = dict((svc_key(s), s) for s in desired)
    backend_at = _BackendLookup(maps)
    current = {}
    for key in list(want) + list(absent):
        cur = _read_service(maps, key, backend_at)
        if cur is not None:
            if cur["stale_slots"] or any(b["ip"] is None for b in cur["backends"]):
                return None             # slots or backends missing: the full path repairs them
            current[key] = cur

    # ---- what changes ----
    added, removed, changed, rewrite = [], [], [], []
    for key in sorted(want):
        s = want[key]
        cur = current.get(key)
        nm = "%s/%s" % (s["namespace"], s["name"])
        if cur is None:
            added.append(_added(svc_label(key), nm, s))
            rewrite.append(key)
        elif _shape(cur) != _shape(s) or (s["algorithm"] == "maglev" and cur["id"] >= maglev_cap):
            changed.append(dict(service=svc_label(key), name=nm, **_svc_diff(cur, s)))
            rewrite.append(key)
    gone_keys = sorted(k for k in absent if k in current)
    for key in gone_keys:
        removed.append(_removed(svc_label(key), absent[key], current[key]))

    # ---- backends: reference counts and ids from the index ----
    delta = {}
    old_uses = {}
    for key in rewrite + gone_keys:
        cur = current.get(key)
        if cur:
            for b in cur["backends"]:
                bk = (cur["family"], b["ip"], b["port"])
                delta[bk] = delta.get(bk, 0) - 1
                old_uses[bk] = (old_uses.get(bk, (0, b["id"]))[0] + 1, b["id"])
        if key in want:
            fam = _fam(key[0])
            for b in want[key]["backends"]:
                bk = (fam, b["ip"], b["port"])
                delta[bk] = delta.get(bk, 0) + 1
    bids, refs, fresh, gone = {}, {}, [], {}
    for bk in sorted(delta):
        raw = maps.lookup("kln_lb_bidx", _bidx_key(bk))
        uses, used_id = old_uses.get(bk, (0, None))
        if raw is None:
            if uses:
                return None             # the index does not know a backend a service uses
            fresh.append(bk)
            refs[bk] = delta[bk]
            continue
        bid, n = S["lb_bidx"].unpack(raw)
        if n < uses or (used_id is not None and used_id != bid) or backend_at(bk[0], bid) != (bk[1], bk[2]):
            return None                 # the index disagrees with the maps
        bids[bk] = bid
        refs[bk] = n + delta[bk]
        if refs[bk] == 0:
            gone[bk] = bid
    fresh = [bk for bk in fresh if refs[bk] > 0]
    nxt = dict(idx["next_backend"])
    for bk in sorted(fresh, key=lambda t: (t[0], _packed(t[1]), t[2])):
        fam = bk[0]
        bid = nxt[fam] or 1
        while backend_at(fam, bid) != (None, None):
            bid = bid + 1 if bid < 0xFFFFFFFF else 1
        backend_at.cache[(fam, bid)] = bk[1:]
        bids[bk] = bid
        nxt[fam] = bid + 1 if bid < 0xFFFFFFFF else 1
    counts = dict(idx["backends"])          # the backends that go are deleted only after the writes
    for bk in fresh:
        counts[bk[0]] += 1
    _check_backend_capacity(maps, counts)

    # ---- service ids: kept, or taken from the bitmap (ids of removed services are freed after the writes) ----
    bitmap = idx["service_ids"]
    plan_sid = {}
    retiring = set(current[k]["id"] for k in gone_keys)
    for key in rewrite:
        cur = current.get(key)
        if cur and (want[key]["algorithm"] != "maglev" or cur["id"] < maglev_cap):
            plan_sid[key] = cur["id"]
    for key in sorted(k for k in rewrite if k not in plan_sid):
        maglev = want[key]["algorithm"] == "maglev"
        sid = _free_sid(bitmap, 1, maglev_cap if maglev else MAX_SERVICE_ID + 1, top=not maglev)
        if sid is None:
            if maglev:
                raise _maglev_full(maglev_cap, maglev_m)
            raise LbError("services: more than %d services" % MAX_SERVICE_ID)
        bitmap[sid >> 3] |= 1 << (sid & 7)
        plan_sid[key] = sid
        if key in current:
            retiring.add(current[key]["id"])
            changed[[c["service"] for c in changed].index(svc_label(key))]["id"] = [current[key]["id"], sid]

    # ---- capacity of the service maps, old slots counted until they are deleted ----
    svc_entries = dict(idx["svc_entries"])
    for fam in (4, 6):
        peak = svc_entries[fam]
        for key in rewrite:
            if _fam(key[0]) != fam:
                continue
            n_new = len(want[key]["backends"])
            cur = current.get(key)
            peak += 1 + n_new if cur is None else max(0, n_new - cur["count"])
            svc_entries[fam] += 1 + n_new - (1 + cur["count"] if cur else 0)
        for key in gone_keys:
            if _fam(key[0]) == fam:
                svc_entries[fam] -= 1 + current[key]["count"]
        cap = maps.info["kln_lb%d_svc" % fam]["max_entries"]
        if peak > cap:
            raise _svc_full(fam, peak, cap)
    set_m = cur_m != maglev_m and any(want[k]["algorithm"] == "maglev" for k in rewrite)
    changed_flag = bool(rewrite or gone_keys)
    diff = {"added": added, "removed": removed, "changed": changed}
    stats = {"updates": 0, "deletes": 0, "calls": 0, "path": "incremental"}
    names = _names(want)
    if check or not changed_flag:
        stats["seconds"] = round(time.time() - t0, 4)
        return {"changed": changed_flag, "diff": diff, "stats": stats, "services": _popcount(idx["service_ids"]) - 1,
                "table": _table(dict((k, current[k]) for k in want if k in current), names)}

    # ---- writes, in commit order; the index last ----
    _invalidate_index(maps, stats)
    upd, masters, rm_masters, stale = {}, {}, {}, {}
    if set_m:
        upd["kln_lb_config"] = [(S["lb_config_key"].pack(0), S["lb_config"].pack(maglev_m, 0))]
    for bk in sorted(fresh):
        _queue_backend(upd, bk, bids[bk])
    rewritten = set(rewrite)
    after = dict((k, current[k]) for k in want if k not in rewritten)
    for key in rewrite:
        after[key] = _queue_service(key, want[key], current.get(key), plan_sid[key], bids, maglev_m, upd, masters, stale)
    for key in gone_keys:
        _queue_removal(key, current[key], rm_masters, stale)
    touched = set(current[k]["id"] for k in current if (k in gone_keys or k in rewrite)
                  and current[k]["flags"] & SVC_F_AFFINITY)
    _write(maps, upd, masters, rm_masters, stale, gone, touched, stats)
    bidx_upd = [(_bidx_key(bk), S["lb_bidx"].pack(bids[bk], n)) for bk, n in sorted(refs.items()) if n > 0]
    bidx_del = [_bidx_key(bk) for bk in sorted(gone)]
    stats["calls"] += maps.update("kln_lb_bidx", bidx_upd) + maps.delete("kln_lb_bidx", bidx_del)
    stats["index_updates"] = len(bidx_upd) + len(bidx_del)
    for sid in retiring:
        bitmap[sid >> 3] &= ~(1 << (sid & 7)) & 0xFF
    backends = dict(idx["backends"])
    for bk in fresh:
        backends[bk[0]] += 1
    for bk in gone:
        backends[bk[0]] -= 1
    maps.update("kln_lb_index", [(_IDX_KEY, _pack_index(maps, IDX_F_VALID, svc_entries, backends, nxt, bitmap))])
    stats["calls"] += 1
    if state_file:
        _journal(state_file, [want[k] for k in rewrite], gone_keys)
    if on_backends_gone and gone:
        on_backends_gone([(ip, port) for _f, ip, port in sorted(gone)])
    stats["seconds"] = round(time.time() - t0, 4)
    return {"changed": True, "diff": diff, "table": _table(after, names), "stats": stats,
            "services": _popcount(bitmap) - 1}


def _popcount(bitmap):
    return bin(int.from_bytes(bytes(bitmap), "little")).count("1")


# ---- the state file: {"generation": N, "services": [...]} and a journal of later changes ---------------

_GEN = re.compile(r'^\{"generation": (\d+),')


def _generation(path):
    try:
        with open(path) as f:
            m = _GEN.match(f.readline())
    except (OSError, ValueError):
        return 0
    return int(m.group(1)) if m else 0


def load_state(state_file):
    """The declared services of the state file, with its journal applied: [service]."""
    return list(_load_state(state_file).values())


def _load_state(state_file):
    try:
        with open(state_file) as f:
            doc = json.load(f)
        out = dict((svc_key(s), s) for s in doc.get("services", []))
        gen = doc.get("generation", 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    try:
        with open(state_file + ".journal") as f:
            for line in f:
                try:
                    op = json.loads(line)
                except ValueError:
                    break               # a line cut short by a crash: the end of the journal
                if op.get("generation") != gen:
                    continue            # written before the state file was last rewritten
                if "upsert" in op:
                    out[svc_key(op["upsert"])] = op["upsert"]
                elif "remove" in op:
                    out.pop(tuple(op["remove"]), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return out


def _journal(path, upserts, removes):
    """Append the incremental changes to ``<path>.journal`` (one JSON line each, tagged with the state
    file's generation); rewrite the state file (compaction) once the journal is larger than it."""
    if not os.path.exists(path):
        _write_state(path, load_state(path) + list(upserts))
        return
    gen = _generation(path)
    lines = [json.dumps({"generation": gen, "upsert": s}, sort_keys=True) for s in upserts]
    lines += [json.dumps({"generation": gen, "remove": list(k)}) for k in removes]
    jpath = path + ".journal"
    fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > max(os.path.getsize(path), 65536):
        _write_state(path, load_state(path))


def _write_state(path, services, only_if_changed=False):
    """The declared services as JSON, one service per line (json's C encoder: no indent), with a
    generation number one above the last; the journal, now folded in, is removed after."""
    body = ",\n".join(json.dumps(svc, sort_keys=True) for svc in services)
    jpath = path + ".journal"
    gen = 0
    try:
        with open(path) as f:
            first = f.readline()
            rest = f.read()
        m = _GEN.match(first)
        gen = int(m.group(1)) if m else 0
        if only_if_changed and m and rest == "%s\n]}\n" % body and not os.path.exists(jpath):
            return
    except (OSError, ValueError):
        pass
    text = '{"generation": %d, "services": [\n%s\n]}\n' % (gen + 1, body)
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, 0o755)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
    if os.path.exists(jpath):
        os.unlink(jpath)


def destroy_udp_sockets(backends, run):
    """Destroy connected UDP sockets whose peer is one of ``backends`` [(ip, port)], in every netns.

    A connected UDP socket keeps the backend connect() chose; when that backend leaves every
    service the socket would send to it for ever, so it is destroyed (sock_diag SOCK_DESTROY via
    ``ss -K``; the socket is disconnected - recv() fails with ECONNABORTED, send() with EDESTADDRREQ -
    and the application connects again through the VIP). One ``ss`` per
    network namespace that has a process (found through /proc/*/ns/net). Returns the number of
    sockets destroyed. ``run(argv) -> (rc, out, err)``.
    """
    if not backends:
        return 0
    seen = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ino = os.stat("/proc/%s/ns/net" % pid).st_ino
        except OSError:
            continue
        seen.setdefault(ino, pid)
    expr = []
    for ip, port in backends:
        if expr:
            expr.append("or")
        expr += ["dst", addr_port(ip, port)]
    killed = 0
    for pid in sorted(seen.values(), key=int):
        rc, out, _err = run(["nsenter", "--net=/proc/%s/ns/net" % pid, "ss", "-K", "-u", "-n", "-H", "state",
                             "established"] + expr)
        if rc == 0:
            killed += len([ln for ln in out.splitlines() if ln.strip()])
    return killed


# ---- listing -------------------------------------------------------------------------------------

def _table(current, names):
    rows = []
    for key in sorted(current, key=lambda k: (_fam(k[0]), _packed(k[0]), k[1], k[2])):
        s = current[key]
        label = svc_label(key)
        rows.append({"service": label, "name": names.get(label, ""), "id": s["id"], "algorithm": s["algorithm"],
                     "weighted": s["alg"] == ALG_WEIGHTED, "affinity_timeout": s["affinity_timeout"], "rev": s["rev"],
                     "backends": [{"address": addr_port(b["ip"], b["port"]) if b["ip"] else "?", "id": b["id"],
                                   "slot": b["slot"], "weight": b["weight"]} for b in s["backends"]]})
    return rows


def table(mapdir, state_file=None):
    """The service table in the maps (the rows ``sync`` returns)."""
    with _no_gc():
        maps = Maps(mapdir)
        try:
            current, _b = read_state(maps)
        finally:
            maps.close()
        return _table(current, _names(_load_state(state_file)) if state_file else {})


def format_table(rows):
    """Text like ``cilium bpf lb list``: one line per service master and per backend slot."""
    lines = ["%-28s %-32s %s" % ("SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)", "DETAILS")]
    for r in rows:
        detail = r["algorithm"] + (" weighted" if r["weighted"] else "")
        if r["affinity_timeout"]:
            detail += " affinity=%ds" % r["affinity_timeout"]
        if r["name"]:
            detail += " " + r["name"]
        if not r["backends"]:
            detail += " (no backends: connect refused)"
        lines.append("%-28s %-32s %s" % (r["service"], "0.0.0.0:0 (%d) (0)" % r["id"], detail))
        for b in r["backends"]:
            lines.append("%-28s %-32s %s" % ("", "%s (%d) (%d)" % (b["address"], r["id"], b["slot"]),
                                             "weight=%d" % b["weight"]))
    return "\n".join(lines)
