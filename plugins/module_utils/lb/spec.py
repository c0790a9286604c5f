# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The declared services: validation (errors name the field, ``services[2] (web).backends[0].weight``)
and their canonical form.

``parse()`` gives ``Service`` objects (what the planner, the writer and the state file use);
``normalize()`` gives the same services as plain dicts. A backend listed by many services (the usual
case: every service of a deployment lists its pods) is validated once: ``Backend`` objects are
shared between the services that list the same ``ip``, ``port`` and ``weight``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import ipaddress
import re
import socket

from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (
    ALG_MAGLEV, ALG_RANDOM, ALG_WEIGHTED, MAX_WEIGHT_TOTAL, PROTOCOLS, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL)

SERVICE_KEYS = ("name", "namespace", "vip", "port", "protocol", "algorithm", "affinity_timeout", "backends", "state",
                "external")
# external: absent - the socket LB only (ClusterIP); "cluster" / "local" - also answered at the node's edge
# (bpf/nodeport.c: LoadBalancer IPs, NodePorts) with externalTrafficPolicy Cluster (SNAT) / Local (client address kept)
EXTERNAL = {None: 0, "cluster": SVC_F_EXTERNAL, "local": SVC_F_EXTERNAL | SVC_F_LOCAL}
BACKEND_KEYS = ("ip", "port", "weight")
ALGORITHMS = ("random", "maglev")
_SERVICE_KEYS = frozenset(SERVICE_KEYS)
_BACKEND_KEYS = frozenset(BACKEND_KEYS)


class LbError(ValueError):
    """Invalid input or a map that cannot hold it; raised before anything is written."""


# ``ident`` (family, ip, port) names the backend in the maps; ``order`` (packed address + port) sorts
# the backends of a service; ``addr`` is the "ip:port" text of diffs and tables.
Backend = collections.namedtuple("Backend", "ip port weight fam packed ident order addr")
_tuple_new = tuple.__new__      # a Backend from its fields without namedtuple's Python-level __new__


# the service fields of one entry, checked; ``where`` names it in errors
Head = collections.namedtuple("Head", "where state name namespace key fam vpacked algorithm affinity_timeout external")


class Service:
    """One declared service in canonical form."""

    __slots__ = ("key", "fam", "vpacked", "proto", "name", "namespace", "algorithm", "affinity_timeout",
                 "backends", "cums", "alg", "flags", "external")

    def __init__(self, head, backends):
        self.key = head.key               # (vip, port, protocol)
        self.fam = head.fam
        self.vpacked = head.vpacked
        self.proto = PROTOCOLS[head.key[2]]
        self.name = head.name
        self.namespace = head.namespace
        self.algorithm = algorithm = head.algorithm
        self.affinity_timeout = affinity_timeout = head.affinity_timeout
        self.backends = backends          # tuple of Backend, sorted
        cum, cums = 0, []
        for b in backends:
            cum += b.weight
            cums.append(cum)
        self.cums = tuple(cums)           # cumulative weights, as the slots carry them
        if algorithm == "maglev":
            self.alg = ALG_MAGLEV
        elif len(set(b.weight for b in backends)) > 1:
            self.alg = ALG_WEIGHTED
        else:
            self.alg = ALG_RANDOM
        self.flags = (SVC_F_AFFINITY if affinity_timeout else 0) | EXTERNAL[head.external]
        self.external = head.external

    @property
    def vip(self):
        return self.key[0]

    @property
    def port(self):
        return self.key[1]

    @property
    def total_weight(self):
        return self.cums[-1] if self.cums else 0

    @property
    def display_name(self):
        return "%s/%s" % (self.namespace, self.name)

    def as_dict(self):
        out = {"name": self.name, "namespace": self.namespace, "vip": self.key[0], "port": self.key[1],
               "protocol": self.key[2], "algorithm": self.algorithm, "affinity_timeout": self.affinity_timeout,
               "backends": [{"ip": b.ip, "port": b.port, "weight": b.weight} for b in self.backends]}
        if self.external:
            out["external"] = self.external
        return out


def svc_key(svc):
    """(vip, port, protocol) of a service dict in canonical form."""
    return (svc["vip"], svc["port"], svc["protocol"])


def addr_port(ip, port):
    ip = str(ip)
    if ":" in ip:
        return "[%s]:%d" % (ip, port)
    return "%s:%d" % (ip, port)


def svc_label(key):
    return "%s/%s" % (addr_port(key[0], key[1]), key[2].upper())


def fam_of(ip):
    return 6 if ":" in ip else 4


def normalize(services, maglev_m):
    """Check the declared services; return them in canonical form (backends sorted).

    Raises LbError naming the field on the first problem. Entries with ``state: absent`` are checked
    too but not returned.
    """
    return [s.as_dict() for s in parse(services, maglev_m)[0]]


def _int(value, where, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, str)) \
            or (isinstance(value, str) and not re.match(r"^\s*-?[0-9]+\s*$", value)):
        raise LbError("%s: must be an integer, got %r" % (where, value))
    n = int(value)
    if not lo <= n <= hi:
        raise LbError("%s: must be %d..%d, got %d" % (where, lo, hi, n))
    return n


def _parse_ip(value, cache):
    """(canonical text, version, packed) of a backend address, or None, parsed with inet_pton: backends
    come by the hundred thousand. ``cache``: the text given -> the result."""
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
            return None
        hit = cache[text] = (socket.inet_ntop(fam, packed), version, packed)
        return hit
    return None


def _vip(value, where):
    """(canonical text, version, packed) of a service address: ipaddress's canonical text (an IPv4
    address the common way, through inet_pton, which gives the same text)."""
    text = str(value).strip()
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
        if text.count(".") == 3 and packed != b"\0\0\0\0" and not 224 <= packed[0] <= 239:
            return socket.inet_ntop(socket.AF_INET, packed), 4, packed
    except (OSError, ValueError):
        pass
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise LbError("%s: %r is not an IPv4 or IPv6 address" % (where, value))
    if ip.is_unspecified or ip.is_multicast:
        raise LbError("%s: %s cannot be a service address" % (where, ip))
    return str(ip), ip.version, ip.packed


def _backend(be, at, port, cache):
    """Validate one backend mapping (every check, field-named errors); return its Backend. ``at``:
    (where, index) of the entry, for the errors."""
    if not isinstance(be, dict):
        raise LbError("%s.backends[%d]: must be a mapping {ip, port, weight}, got %r" % (at + (be,)))
    if not be.keys() <= _BACKEND_KEYS:
        raise LbError("%s.backends[%d]: unknown field(s) %s (known: ip, port, weight)"
                      % (at + (", ".join(sorted(set(be) - _BACKEND_KEYS)),)))
    if "ip" not in be:
        raise LbError("%s.backends[%d].ip: required" % at)
    return _new_backend(be["ip"], be.get("port", port), be.get("weight", 1), at, cache)


def _new_backend(ip, port, weight, at, cache):
    """The Backend of a mapping's fields, checked; ``at`` as for _backend()."""
    parsed = cache.get(ip) if type(ip) is str else None     # pylint: disable=unidiomatic-typecheck
    if parsed is None:
        parsed = _parse_ip(ip, cache)
        if parsed is None:
            raise LbError("%s.backends[%d].ip: %r is not an IPv4 or IPv6 address" % (at + (ip,)))
    bip, bver, bpacked = parsed
    if type(port) is not int or not 1 <= port <= 65535:     # pylint: disable=unidiomatic-typecheck
        port = _int(port, "%s.backends[%d].port" % at, 1, 65535)
    if type(weight) is not int or not 0 < weight < 2 ** 31:  # pylint: disable=unidiomatic-typecheck
        weight = _int(weight, "%s.backends[%d].weight" % at, -(2 ** 31), 2 ** 31)
        if weight <= 0:
            raise LbError("%s.backends[%d].weight: must be > 0, got %d (remove the backend to stop sending it traffic)"
                          % (at + (weight,)))
    port_bytes = port.to_bytes(2, "big")
    return _tuple_new(Backend, (bip, port, weight, bver, bpacked, (bver, bip, port), bpacked + port_bytes,
                                ("[%s]:%d" if bver == 6 else "%s:%d") % (bip, port)))


def _order(b):
    return b.order


def _service_head(svc, i, seen):
    """The Head of ``services[i]``; ``seen`` {key: where} finds duplicates."""
    where = "services[%d]" % i
    if not isinstance(svc, dict):
        raise LbError("%s: must be a mapping, got %r" % (where, svc))
    if not svc.keys() <= _SERVICE_KEYS:
        unknown = sorted(set(svc) - _SERVICE_KEYS)
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
    vip, version, vpacked = _vip(svc["vip"], where + ".vip")
    port = svc.get("port")
    if type(port) is not int or not 1 <= port <= 65535:      # pylint: disable=unidiomatic-typecheck
        port = _int(port, where + ".port", 1, 65535)
    proto = str(svc.get("protocol") or "tcp").lower()
    if proto not in PROTOCOLS:
        raise LbError("%s.protocol: must be tcp or udp, got %r" % (where, svc.get("protocol")))
    alg = str(svc.get("algorithm") or "random").lower()
    if alg not in ALGORITHMS:
        raise LbError("%s.algorithm: must be one of %s, got %r" % (where, ", ".join(ALGORITHMS), svc.get("algorithm")))
    aff = svc.get("affinity_timeout") or 0
    if type(aff) is not int or not 0 <= aff <= 86400 * 365:  # pylint: disable=unidiomatic-typecheck
        aff = _int(aff, where + ".affinity_timeout", 0, 86400 * 365)
    ext = svc.get("external") or None
    if ext not in EXTERNAL:
        raise LbError("%s.external: cluster or local (or absent), got %r" % (where, svc.get("external")))
    key = (vip, port, proto)
    if key in seen:
        raise LbError("%s: duplicate service %s - %s already declares it" % (where, svc_label(key), seen[key]))
    seen[key] = where
    return Head(where, state, name, ns, key, version, vpacked, alg, aff, ext)


def parse(services, maglev_m):
    """([Service] of the present services, {key: "namespace/name"} of the ``state: absent`` ones)."""
    if not isinstance(services, list):
        raise LbError("services: must be a list, got %s" % type(services).__name__)
    out = []
    absent = {}
    seen = {}
    ipcache = {}
    known = {}          # (ip, port, weight) as given -> Backend: a backend listed again is not validated again
    for i, svc in enumerate(services):
        h = _service_head(svc, i, seen)
        where, key, version = h.where, h.key, h.fam
        if h.state == "absent":
            if svc.get("backends"):
                raise LbError("%s.backends: a service with state absent is removed; it takes no backends" % where)
            absent[key] = "%s/%s" % (h.namespace, h.name) if h.name else ""
            continue
        backends = svc.get("backends")
        if backends is None:
            backends = []
        if not isinstance(backends, list):
            raise LbError("%s.backends: must be a list" % where)
        port = key[1]
        bes = []
        idents = set()
        total = 0
        for j, be in enumerate(backends):
            b = None
            if type(be) is dict and be.keys() <= _BACKEND_KEYS:   # pylint: disable=unidiomatic-typecheck
                ip, bport, weight = be.get("ip"), be.get("port", port), be.get("weight", 1)
                if type(ip) is str and type(bport) is int and type(weight) is int:  # pylint: disable=unidiomatic-typecheck
                    b = known.get((ip, bport, weight))
                    if b is None:
                        b = known[(ip, bport, weight)] = _new_backend(ip, bport, weight, (where, j), ipcache)
            if b is None:
                b = _backend(be, (where, j), port, ipcache)
            if b.fam != version:
                raise LbError("%s.backends[%d].ip: %s is IPv%d but the service's vip %s is IPv%d; a service's backends "
                              "must be of its address family" % (where, j, b.ip, b.fam, key[0], version))
            if b.ident in idents:
                raise LbError("%s.backends[%d]: backend %s listed twice" % (where, j, b.addr))
            idents.add(b.ident)
            total += b.weight
            bes.append(b)
        if total > MAX_WEIGHT_TOTAL:
            raise LbError("%s.backends: total weight %d is more than %d" % (where, total, MAX_WEIGHT_TOTAL))
        if h.algorithm == "maglev" and len(bes) * 10 > maglev_m:
            raise LbError("%s.backends: %d backends need a Maglev table size of at least %d (maglev_table_size is %d)"
                          % (where, len(bes), len(bes) * 10, maglev_m))
        bes.sort(key=_order)
        out.append(Service(h, tuple(bes)))
    return out, absent
