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
}

ALG_RANDOM, ALG_MAGLEV, ALG_WEIGHTED = 0, 1, 2
SVC_F_AFFINITY = 0x01
PROTOCOLS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {6: "tcp", 17: "udp"}
ALGORITHMS = ("random", "maglev")
DEFAULT_MAGLEV_M = 1021
MAX_SERVICE_ID = 65535
MAX_WEIGHT_TOTAL = 65535
SERVICE_KEYS = ("name", "namespace", "vip", "port", "protocol", "algorithm", "affinity_timeout", "backends")
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
    """
    if not isinstance(services, list):
        raise LbError("services: must be a list, got %s" % type(services).__name__)
    out = []
    seen = {}
    ipcache = {}
    for i, svc in enumerate(services):
        where = "services[%d]" % i
        if not isinstance(svc, dict):
            raise LbError("%s: must be a mapping, got %r" % (where, svc))
        unknown = sorted(set(svc) - set(SERVICE_KEYS))
        if unknown:
            raise LbError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(unknown), ", ".join(SERVICE_KEYS)))
        name = svc.get("name")
        if not name or not isinstance(name, str):
            raise LbError("%s.name: required, a non-empty string" % where)
        where = "services[%d] (%s)" % (i, name)
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
        seen[key] = "services[%d] (%s)" % (i, name)
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
    return out


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
    nothing = (None, None)
    for key, svc in services.items():
        fam = svc["family"]
        bes = []
        prev = 0
        s = slots.get(key, {})
        for slot in range(1, svc["count"] + 1):
            bid, cum = s.get(slot, (0, 0))
            ip, port = by_id.get((fam, bid), nothing)
            w = cum - prev if cum > prev else 1
            prev = max(cum, prev)
            bes.append({"ip": ip, "port": port, "weight": w, "id": bid, "slot": slot})
        svc["backends"] = bes
        svc["stale_slots"] = sorted(n for n in s if n > svc["count"])
        svc["algorithm"] = "maglev" if svc["alg"] == ALG_MAGLEV else "random"
        if not svc["flags"] & SVC_F_AFFINITY:
            svc["affinity_timeout"] = 0
    return services, backends


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
    """Make the maps hold ``services``; return {changed, diff, table, stats}.

    ``prune``: remove services in the maps that are not declared. ``check``: compute only.
    ``state_file``: JSON file with the declared services (names, for listing; restore at boot),
    written after a successful sync. ``on_backends_gone(list of (ip, port))``: called after the
    writes with backends that left every service (the module destroys connected UDP sockets).
    """
    t0 = time.time()
    if not is_prime(maglev_m) or maglev_m < 7:
        raise LbError("maglev_table_size: must be a prime >= 7, got %r" % maglev_m)
    with _no_gc():
        desired = normalize(services, maglev_m)
        maps = Maps(mapdir)
        try:
            return _sync(maps, desired, prune, check, maglev_m, state_file, on_backends_gone, t0)
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


def _load_state(state_file):
    try:
        with open(state_file) as f:
            return dict((svc_key(s), s) for s in json.load(f).get("services", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _names(state):
    return dict((svc_label(k), "%s/%s" % (s.get("namespace", "default"), s.get("name", "?"))) for k, s in state.items())


def _sync(maps, desired, prune, check, maglev_m, state_file, on_backends_gone, t0):
    current, cur_backends = read_state(maps)
    prev_state = _load_state(state_file) if state_file else {}
    names = _names(prev_state)
    want = dict((svc_key(s), s) for s in desired)
    keep = {} if prune else dict((k, v) for k, v in current.items() if k not in want)
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
    for fam in (4, 6):
        cap = maps.info["kln_lb%d_backend" % fam]["max_entries"]
        n = counts[fam]
        if n > cap:
            raise LbError("services: %d distinct IPv%d backends but kln_lb%d_backend holds %d (raise the map size)"
                          % (n, fam, fam, cap))

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
                raise LbError("services: more Maglev services than kln_lb_maglev holds (%d with table size %d; raise "
                              "the map size to (services+1)*2*%d)" % (maglev_cap - 1, maglev_m, maglev_m))
            sid = lo
        else:
            while hi in used_sids or hi in retiring:
                hi -= 1
            sid = hi
        if sid < 1 or sid > MAX_SERVICE_ID or (want[key]["algorithm"] != "maglev" and sid <= 0):
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
        n += sum(1 + len(s["backends"]) + len(s["stale_slots"]) for k, s in current.items()
                 if k not in want and k not in keep and _fam(k[0]) == fam)      # removed only after the writes
        if n > cap:
            raise LbError("services: the IPv%d services need %d entries in kln_lb%d_svc (a master + one per backend, "
                          "plus old slots during the change) but it holds %d (raise the map size)" % (fam, n, fam, cap))

    # ---- what changes ----
    added, removed, changed = [], [], []
    rewrite = []
    for key, s in sorted(want.items()):
        cur = current.get(key)
        label = svc_label(key)
        nm = "%s/%s" % (s["namespace"], s["name"])
        if cur is None:
            added.append({"service": label, "name": nm, "backends": [addr_port(b["ip"], b["port"]) for b in s["backends"]]})
            rewrite.append(key)
        elif _shape(cur) != _shape(s) or cur["id"] != plan_sid[key] or cur["stale_slots"] \
                or any(b["id"] != bids.get((_fam(b["ip"]), b["ip"], b["port"])) for b in cur["backends"] if b["ip"]) \
                or (s["algorithm"] == "maglev" and cur_m != maglev_m):
            d = _svc_diff(cur, s)
            if cur["id"] != plan_sid[key]:
                d["id"] = [cur["id"], plan_sid[key]]
            changed.append(dict(service=label, name=nm, **d))
            rewrite.append(key)
    if prune:
        for key in sorted(k for k in current if k not in want):
            removed.append({"service": svc_label(key), "name": names.get(svc_label(key), ""),
                            "backends": [addr_port(b["ip"], b["port"]) for b in current[key]["backends"] if b["ip"]]})
    gone_backends = sorted((bk for bk in cur_backends if bk not in needed), key=lambda t: (t[0], t[1], t[2]))
    set_m = cur_m != maglev_m and any(want[k]["algorithm"] == "maglev" for k in want)
    changed_flag = bool(added or removed or changed or set_m or gone_backends)
    diff = {"added": added, "removed": removed, "changed": changed}
    stats = {"updates": 0, "deletes": 0, "calls": 0}
    if state_file and not check and not changed_flag:
        _write_state(state_file, list(want.values()) + [prev_state[k] for k in keep if k in prev_state], only_if_changed=True)
    if check or not changed_flag:
        stats["seconds"] = round(time.time() - t0, 4)
        names.update(_names(want))
        table = _table(current, names) if not changed_flag else None
        return {"changed": changed_flag, "diff": diff, "table": table, "stats": stats,
                "services": len(want) + len(keep)}

    # ---- writes, in commit order ----
    upd = {}
    if set_m:
        upd.setdefault("kln_lb_config", []).append((S["lb_config_key"].pack(0), S["lb_config"].pack(maglev_m, 0)))
    for bk in new_backends:
        fam, ip, port = bk
        upd.setdefault("kln_lb%d_backend" % fam, []).append(
            (S["lb_backend_key"].pack(bids[bk]), S["lb%d_backend" % fam].pack(
                _packed(ip), port.to_bytes(2, "big"), 0, 0)))
    masters = {}
    stale = {}
    rewritten = set(rewrite)
    after = dict((k, current[k]) for k in list(want) + list(keep) if k not in rewritten)
    for key in rewrite:
        s = want[key]
        cur = current.get(key)
        fam = _fam(key[0])
        smap = "kln_lb%d_svc" % fam
        vp = _packed(key[0])
        proto = PROTOCOLS[key[2]]
        sid = plan_sid[key]
        rev = ((cur["rev"] if cur else 0) + 1) & 0xFFFFFFFF
        cum = 0
        weights = [b["weight"] for b in s["backends"]]
        rows = []
        for slot, b in enumerate(s["backends"], start=1):
            cum += b["weight"]
            bid = bids[(fam, b["ip"], b["port"])]
            upd.setdefault(smap, []).append((_pkey(fam, vp, key[1], slot, proto),
                                             S["lb_service"].pack(bid, 0, sid, 0, 0, cum, 0, 0)))
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
        after[key] = {"vip": key[0], "port": key[1], "protocol": key[2], "id": sid, "count": len(rows), "alg": alg,
                      "flags": flags, "weight": cum, "affinity_timeout": s["affinity_timeout"], "rev": rev, "family": fam,
                      "backends": rows, "stale_slots": [], "algorithm": s["algorithm"]}
        if cur:
            old_n = max([cur["count"]] + cur["stale_slots"])
            stale.setdefault(smap, []).extend(_pkey(fam, vp, key[1], n, proto)
                                              for n in range(len(s["backends"]) + 1, old_n + 1)
                                              if n <= cur["count"] or n in cur["stale_slots"])
    order = ["kln_lb_config", "kln_lb4_backend", "kln_lb6_backend", "kln_lb4_svc", "kln_lb6_svc", "kln_lb_maglev"]
    for name in order:
        items = upd.get(name, [])
        stats["calls"] += maps.update(name, items)
        stats["updates"] += len(items)
    for name in ("kln_lb4_svc", "kln_lb6_svc"):       # the commit point of every rewritten service
        items = masters.get(name, [])
        stats["calls"] += maps.update(name, items)
        stats["updates"] += len(items)
    dels = {}
    for name, keys in stale.items():
        dels.setdefault(name, []).extend(keys)
    rm_masters = {}
    for key in (k for k in current if k not in want and prune):
        cur = current[key]
        fam = _fam(key[0])
        vp = _packed(key[0])
        proto = PROTOCOLS.get(key[2], 0)
        rm_masters.setdefault("kln_lb%d_svc" % fam, []).append(_pkey(fam, vp, key[1], 0, proto))
        dels.setdefault("kln_lb%d_svc" % fam, []).extend(
            _pkey(fam, vp, key[1], n, proto) for n in sorted(set(range(1, cur["count"] + 1)) | set(cur["stale_slots"])))
    for name, keys in rm_masters.items():              # the service disappears at once ...
        stats["calls"] += maps.delete(name, keys)
        stats["deletes"] += len(keys)
    for name, keys in dels.items():                    # ... then what it referred to
        stats["calls"] += maps.delete(name, keys)
        stats["deletes"] += len(keys)
    for fam in (4, 6):
        keys = [S["lb_backend_key"].pack(cur_backends[bk]) for bk in gone_backends if bk[0] == fam]
        stats["calls"] += maps.delete("kln_lb%d_backend" % fam, keys)
        stats["deletes"] += len(keys)
    touched = set(current[k]["id"] for k in current if (k not in want and prune) or k in rewritten)
    if touched:
        aff = [k for k, _v in maps.dump("kln_lb_affinity") if S["lb_affinity_key"].unpack(k)[1] in touched]
        stats["calls"] += maps.delete("kln_lb_affinity", aff)
        stats["deletes"] += len(aff)
    if state_file:
        _write_state(state_file, list(want.values()) + [prev_state[k] for k in keep if k in prev_state])
    if on_backends_gone and gone_backends:
        on_backends_gone([(ip, port) for _f, ip, port in gone_backends])
    names.update(_names(want))
    stats["seconds"] = round(time.time() - t0, 4)
    return {"changed": True, "diff": diff, "table": _table(after, names), "stats": stats,
            "services": len(after)}


def _write_state(path, services, only_if_changed=False):
    """The declared services as JSON, one service per line (json's C encoder: no indent)."""
    text = '{"services": [\n%s\n]}\n' % ",\n".join(json.dumps(svc, sort_keys=True) for svc in services)
    if only_if_changed:
        try:
            with open(path) as f:
                if f.read() == text:
                    return
        except (OSError, ValueError):
            pass
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, 0o755)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


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
