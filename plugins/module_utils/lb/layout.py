# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The socket LB's byte layouts and the maps lb writes: what ``bpf/lib/lb_structs.h`` (its ``py:``
lines) and ``bpf/sock_lb.manifest.json`` say, in Python. Unit tests keep ``FORMATS`` equal to the
header and ``MAPS``/``VERSIONS`` equal to the manifest.

Every map lb writes is a *shared* map, pinned once per node in ``<pin root>/globals/`` under
``<name>_v<version>`` (``pin()``). The reverse-NAT maps are private to the object and never opened
here (their layouts are listed for completeness).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import socket
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import manifest

# Copy of the "py:" lines of bpf/lib/lb_structs.h.
FORMATS = {
    "lb4_key": "=4s2sHB3x", "lb6_key": "=16s2sHB3x", "lb_service": "=IHHBBHII",
    "lb_backend_key": "=I", "lb4_backend": "=4s2sBB", "lb6_backend": "=16s2sBB",
    "lb4_revnat_key": "=Q4s2sH", "lb4_revnat": "=4s2sH", "lb6_revnat_key": "=Q16s2sHI",
    "lb6_revnat": "=16s2sH", "lb_maglev_key": "=I", "lb_maglev_val": "=I",
    "lb_affinity_key": "=QHHI", "lb_affinity": "=IIQ", "lb_config_key": "=I", "lb_config": "=II",
    "lb_bidx_key": "=Bx2s16s", "lb_bidx": "=II", "lb_index": "=I6I2I2I2I8192s",
}
S = dict((k, struct.Struct(v)) for k, v in FORMATS.items())

# The maps lb opens: name -> (map type, key struct, value struct, default max_entries, map_flags).
MAPS = {
    "kln_lb4_svc": ("hash", "lb4_key", "lb_service", 65536, 1),
    "kln_lb6_svc": ("hash", "lb6_key", "lb_service", 65536, 1),
    "kln_lb4_backend": ("hash", "lb_backend_key", "lb4_backend", 65536, 1),
    "kln_lb6_backend": ("hash", "lb_backend_key", "lb6_backend", 65536, 1),
    "kln_lb_maglev": ("array", "lb_maglev_key", "lb_maglev_val", 64 * 2 * 16381, 0),
    "kln_lb_affinity": ("lru_hash", "lb_affinity_key", "lb_affinity", 65536, 0),
    "kln_lb_config": ("array", "lb_config_key", "lb_config", 1, 0),
    "kln_lb_bidx": ("hash", "lb_bidx_key", "lb_bidx", 131072, 1),        # userspace index, no program reads it
    "kln_lb_index": ("array", "lb_config_key", "lb_index", 1, 0),
}
# The layout version lb writes of each map: the pin file is <name>_v<version>.
VERSIONS = dict((name, 1) for name in MAPS)


def pin(name):
    """File name of one of lb's maps in the globals directory."""
    return manifest.pin_name(name, VERSIONS[name])


ALG_RANDOM, ALG_MAGLEV, ALG_WEIGHTED = 0, 1, 2
SVC_F_AFFINITY = 0x01
SVC_F_EXTERNAL = 0x02     # answered at the node's edge too (LoadBalancer IP, NodePort): bpf/nodeport.c
SVC_F_LOCAL = 0x04        # externalTrafficPolicy Local: the edge keeps the client's address (no SNAT)
PROTOCOLS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {6: "tcp", 17: "udp"}
MAX_SERVICE_ID = 65535
MAX_WEIGHT_TOTAL = 65535

SVC_MAP = {4: "kln_lb4_svc", 6: "kln_lb6_svc"}
BACKEND_MAP = {4: "kln_lb4_backend", 6: "kln_lb6_backend"}
SVC_KEY = {4: S["lb4_key"], 6: S["lb6_key"]}
BACKEND_VAL = {4: S["lb4_backend"], 6: S["lb6_backend"]}
# a slot value: backend id, service id, cumulative weight (the master's other fields zero)
SLOT = struct.Struct("=I2xH2xH8x")
U32 = struct.Struct("=I")


def svc_key(fam, vip_packed, port, slot, proto):
    return SVC_KEY[fam].pack(vip_packed, port.to_bytes(2, "big"), slot, proto)


def backend_value(fam, packed, port):
    return BACKEND_VAL[fam].pack(packed, port.to_bytes(2, "big"), 0, 0)


def bidx_key(fam, packed, port):
    return S["lb_bidx_key"].pack(fam, port.to_bytes(2, "big"), packed)


def packed_ip(ip):
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def ip_text(packed):
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


# ---- the index record (kln_lb_index) -----------------------------------------------------------

IDX_F_VALID = 0x01
IDX_KEY = U32.pack(0)
# the maps whose kernel ids the index records: a recreated map has a new id, and the index is not trusted
IDX_MAPS = ("kln_lb4_svc", "kln_lb6_svc", "kln_lb4_backend", "kln_lb6_backend", "kln_lb_maglev", "kln_lb_bidx")


class Index:
    """The index record: valid flag, map ids, entries of the service maps and the backend maps, the next
    backend id to try per family, and the bitmap of service ids in use (bit 0 always set)."""

    __slots__ = ("flags", "map_ids", "svc_entries", "backends", "next_backend", "service_ids")

    def __init__(self, flags, map_ids, svc_entries, backends, next_backend, service_ids):
        self.flags = flags
        self.map_ids = list(map_ids)
        self.svc_entries = dict(svc_entries)
        self.backends = dict(backends)
        self.next_backend = dict(next_backend)
        self.service_ids = bytearray(service_ids)

    @classmethod
    def unpack(cls, raw):
        v = S["lb_index"].unpack(raw)
        return cls(v[0], v[1:7], {4: v[7], 6: v[8]}, {4: v[9], 6: v[10]}, {4: v[11], 6: v[12]}, v[13])

    def pack(self):
        return S["lb_index"].pack(self.flags, *(self.map_ids + [
            self.svc_entries[4], self.svc_entries[6], self.backends[4], self.backends[6],
            self.next_backend[4], self.next_backend[6], bytes(self.service_ids)]))

    def __eq__(self, other):
        return isinstance(other, Index) and self.pack() == other.pack()

    def __ne__(self, other):
        return not self == other

    __hash__ = None


def popcount(bitmap):
    return bin(int.from_bytes(bytes(bitmap), "little")).count("1")
