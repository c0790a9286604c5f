# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The edge load balancer's node settings (object ``nodeport``, bpf/lib/nodeport.h): the ``nodeport``
section of the node configuration (runtime.py) written into the object's private map
``<pin root>/nodeport/maps/kln_ns_config``: the node's address (NodePorts are answered on it and
Cluster-policy flows are SNATed to it), this node's pod CIDR (backends inside it are local), the SNAT
source port range and whether BPF host routing delivers to local pods. The services themselves are in
the socket LB's table (lb/, ``external`` entries). No Ansible imports."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import os
import socket
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys

OBJECT = "nodeport"
CONFIG_MAP = "kln_ns_config"
CT_MAP = "kln_ns_ct4"
CONFIG_FMT = struct.Struct("=4s4sIHHII")      # bpf/lib/nodeport_structs.h: ns_config
CT_KEY_FMT = struct.Struct("=4s4s2s2sB3x")
CT_FMT = struct.Struct("=4s4s2s2sIQB7x")
F_ENABLED = 1
F_HOST_ROUTING = 2
SNAT_PORTS = (61000, 65535)          # above Linux's default ephemeral range (32768-60999)
KEYS = ("node_ip", "snat_port_min", "snat_port_max")


class NodePortError(ValueError):
    """A nodeport section that cannot be applied; the message names the field."""


def normalize(section, where="config.nodeport"):
    """{node_ip, snat_port_min, snat_port_max}, or None (no edge load balancer)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise NodePortError("%s: must be a mapping" % where)
    bad = sorted(set(section) - set(KEYS))
    if bad:
        raise NodePortError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(KEYS)))
    try:
        ip = ipaddress.IPv4Address(str(section.get("node_ip")).strip())
    except ValueError:
        raise NodePortError("%s.node_ip: %r is not an IPv4 address (the edge load balancer is IPv4)"
                            % (where, section.get("node_ip")))
    lo = section.get("snat_port_min", SNAT_PORTS[0])
    hi = section.get("snat_port_max", SNAT_PORTS[1])
    for f, v in (("snat_port_min", lo), ("snat_port_max", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1024 <= v <= 65535:
            raise NodePortError("%s.%s: 1024-65535, got %r" % (where, f, v))
    if lo > hi:
        raise NodePortError("%s.snat_port_min: %d is above snat_port_max %d" % (where, lo, hi))
    return {"node_ip": str(ip), "snat_port_min": lo, "snat_port_max": hi}


def value(section, pods, host_routing):
    """The kln_ns_config entry (bytes) for the section, the pod network and BPF host routing."""
    net = ipaddress.ip_network(pods["cidr"]) if pods else None
    flags = F_ENABLED | (F_HOST_ROUTING if host_routing else 0)
    return CONFIG_FMT.pack(socket.inet_aton(section["node_ip"]),
                           net.network_address.packed if net else b"\0\0\0\0",
                           int(net.netmask) if net else 0, section["snat_port_min"], section["snat_port_max"], flags, 0)


def describe(raw):
    node, pod, mask, lo, hi, flags, _pad = CONFIG_FMT.unpack(raw)
    pl = bin(mask).count("1")
    return "node %s, pod CIDR %s, SNAT ports %d-%d%s" % (
        socket.inet_ntoa(node), ("%s/%d" % (socket.inet_ntoa(pod), pl)) if mask else "none", lo, hi,
        ", BPF host routing" if flags & F_HOST_ROUTING else "")


def map_path(pin_path, name=CONFIG_MAP):
    return os.path.join(pin_path, OBJECT, "maps", name)


def sync(pin_path, section, pods, host_routing, check=False):
    """Write kln_ns_config when it differs: the changes as text."""
    want = value(section, pods, host_routing)
    path = map_path(pin_path)
    if not os.path.exists(path):
        return ["nodeport: %s" % describe(want)] if check else _raise(path)
    have, differs = bpfsys.map_sync(path, struct.pack("=I", 0), want, check=check)
    if not differs:
        return []
    return ["nodeport: %s (was %s)" % (describe(want), describe(have) if have and have.strip(b"\0") else "unset")]


def _raise(path):
    raise NodePortError("config.objects: the nodeport object is not loaded (%s is missing)" % path)


def _ap(a, p):
    return "%s:%d" % (socket.inet_ntoa(a), int.from_bytes(p, "big"))


def flows(pin_path):
    """The edge's translated flows now: [{direction, from, to, translated}], from kln_ns_ct4."""
    path = map_path(pin_path, CT_MAP)
    out = []
    if not os.path.exists(path):
        return out
    with bpfsys.obj_get(path) as fd:
        info = bpfsys.map_info(fd)
        items = bpfsys.map_dump(fd, info["key_size"], info["value_size"], info["max_entries"])
    for k, v in items:
        sa, da, sp, dp, proto = CT_KEY_FMT.unpack(k)
        a1, a2, p1, p2, bid, seen, flags = CT_FMT.unpack(v)
        out.append({"direction": "forward" if flags == 1 else "reply", "proto": {6: "tcp", 17: "udp"}.get(proto, proto),
                    "packet": "%s -> %s" % (_ap(sa, sp), _ap(da, dp)),
                    "translated": ("%s -> %s" % (_ap(a2, p2) if a2 != b"\0\0\0\0" else _ap(sa, sp), _ap(a1, p1))) if flags == 1
                    else "%s -> %s" % (_ap(a1, p1), _ap(a2, p2)), "backend_id": bid, "last_seen_ns": seen})
    return out
