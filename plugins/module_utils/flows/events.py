# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The flow event layout (bpf/lib/flow_structs.h), its names, and the kernel side's configuration and counters.

``decode(raw)`` turns one ring buffer record into a plain dict (addresses as text, numbers as numbers); the
``hubble`` module makes Hubble's flow JSON of it. ``sync_config()`` writes ``kln_flow_config`` (what the node
apply runs), ``counters()`` reads ``kln_flow_stat``. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import socket
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest

VERSION = 1
EVENT = struct.Struct("=QBBBBBBBB4s4s2s2sIIIII4s2sHQ")
CONFIG = struct.Struct("=IBBHI")
RL = struct.Struct("=II")
STAT = struct.Struct("=Q")

RINGBUF = "kln_flows"
CONFIG_MAP = "kln_flow_config"
RL_MAP = "kln_flow_rl"
STAT_MAP = "kln_flow_stat"
MAPS = (RINGBUF, CONFIG_MAP, RL_MAP, STAT_MAP)
MAP_VERSIONS = {RINGBUF: 1, CONFIG_MAP: 1, RL_MAP: 1, STAT_MAP: 1}
SIZES = {CONFIG_MAP: (4, CONFIG.size), RL_MAP: (4, RL.size), STAT_MAP: (4, STAT.size)}
MAX_ENTRIES = {RINGBUF: 2097152, CONFIG_MAP: 1, RL_MAP: 256, STAT_MAP: 4}

CFG_ENABLED = 1
AGGREGATION = {"none": 0, "medium": 2, "maximum": 3}
STAT_EMITTED, STAT_LOST, STAT_RATE_LIMITED = 0, 1, 2

# Hubble's Verdict, TrafficDirection, and the observation points (our programs; Hubble's names where they exist)
VERDICTS = {0: "VERDICT_UNKNOWN", 1: "FORWARDED", 2: "DROPPED", 3: "ERROR", 4: "AUDIT", 5: "REDIRECTED", 6: "TRACED",
            7: "TRANSLATED"}
VERDICT_NAMES = dict((v, k) for k, v in VERDICTS.items())
DIRECTIONS = {0: "TRAFFIC_DIRECTION_UNKNOWN", 1: "INGRESS", 2: "EGRESS"}
SOURCES = {1: "from-endpoint", 2: "to-endpoint", 3: "from-network", 4: "to-overlay", 5: "sock-lb"}
# Hubble's TraceObservationPoint names for the packet programs (Cilium's obs points)
OBS_POINTS = {1: "FROM_ENDPOINT", 2: "TO_ENDPOINT", 3: "FROM_NETWORK", 4: "TO_OVERLAY", 5: "SOCK_LB"}
SRC_SOCK = 5
F_REPLY, F_ENFORCED, F_POLICY = 1, 2, 4

# Drop reasons: Cilium's codes, Hubble's DropReason names and descriptions (flow.proto, pkg/monitor/api)
REASONS = {132: "INVALID_SOURCE_IP", 133: "POLICY_DENIED", 134: "INVALID_PACKET_DROPPED",
           158: "SERVICE_BACKEND_NOT_FOUND", 160: "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
           167: "NO_MAPPING_FOR_NAT_MASQUERADE", 181: "POLICY_DENY"}
REASON_CODES = dict((v, k) for k, v in REASONS.items())
REASON_TEXT = {132: "Invalid source ip", 133: "Policy denied", 134: "Invalid packet",
               158: "Service backend not found", 160: "No tunnel/encapsulation endpoint",
               167: "No mapping for NAT masquerade", 181: "Policy denied by denylist"}

TCP_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10), ("URG", 0x20), ("ECE", 0x40),
             ("CWR", 0x80))
PROTOCOLS = {1: "ICMPv4", 6: "TCP", 17: "UDP", 132: "SCTP"}


class FlowError(ValueError):
    """Flow configuration or events that cannot be handled; the message names the field."""


def reason_name(code):
    return REASONS.get(code, "DROP_REASON_%d" % code if code else "DROP_REASON_UNKNOWN")


def tcp_flag_names(flags):
    return [n for n, bit in TCP_FLAGS if flags & bit]


# what peek() gives of a record (the fields the metrics count: metrics.Metrics.observe)
PEEK_FIELDS = ("verdict", "source", "flags", "protocol", "tcp_flags", "reason", "direction", "rule", "dport")


def _unpack(raw):
    if len(raw) < EVENT.size:
        raise FlowError("flow event of %d bytes, expected %d" % (len(raw), EVENT.size))
    fields = EVENT.unpack_from(raw)
    if fields[1] != VERSION:
        raise FlowError("flow event layout version %d, this agent reads %d" % (fields[1], VERSION))
    return fields


def peek(raw):
    """(time_boot_ns, the PEEK_FIELDS of a record as a tuple, dport as its 2 bytes) without decoding the rest;
    FlowError as decode()."""
    f = _unpack(raw)
    return f[0], (f[3], f[2], f[8], f[6], f[7], f[4], f[5], f[16], f[12])


def peeked(key):
    """The PEEK_FIELDS of a peek() tuple as a dict (a decode() subset)."""
    out = dict(zip(PEEK_FIELDS, key))
    out["dport"] = struct.unpack("!H", out["dport"])[0]
    return out


def decode(raw):
    """One ring buffer record as a dict; FlowError for a record of another layout version or size."""
    (t, _version, source, verdict, reason, direction, proto, tcp, flags, saddr, daddr, sport, dport, sid, did, ifindex,
     rule, length, oaddr, oport, svc, cookie) = _unpack(raw)
    return {"time_boot_ns": t, "source": source, "verdict": verdict, "reason": reason, "direction": direction,
            "protocol": proto, "tcp_flags": tcp, "flags": flags, "saddr": socket.inet_ntoa(saddr),
            "daddr": socket.inet_ntoa(daddr), "sport": struct.unpack("!H", sport)[0],
            "dport": struct.unpack("!H", dport)[0], "src_identity": sid, "dst_identity": did, "ifindex": ifindex,
            "rule": rule, "len": length, "orig_addr": socket.inet_ntoa(oaddr), "orig_port": struct.unpack("!H", oport)[0],
            "service_id": svc, "cookie": cookie}


def encode(ev):
    """The record of a decoded event (tests; the inverse of decode())."""
    return EVENT.pack(ev.get("time_boot_ns", 0), VERSION, ev.get("source", 0), ev.get("verdict", 0), ev.get("reason", 0),
                      ev.get("direction", 0), ev.get("protocol", 0), ev.get("tcp_flags", 0), ev.get("flags", 0),
                      socket.inet_aton(ev.get("saddr", "0.0.0.0")), socket.inet_aton(ev.get("daddr", "0.0.0.0")),
                      struct.pack("!H", ev.get("sport", 0)), struct.pack("!H", ev.get("dport", 0)),
                      ev.get("src_identity", 0), ev.get("dst_identity", 0), ev.get("ifindex", 0), ev.get("rule", 0),
                      ev.get("len", 0), socket.inet_aton(ev.get("orig_addr", "0.0.0.0")),
                      struct.pack("!H", ev.get("orig_port", 0)), ev.get("service_id", 0), ev.get("cookie", 0))


# ---- the kernel side: configuration and counters ----------------------------------------------------

def pin(globals_dir, name):
    return os.path.join(globals_dir, manifest.pin_name(name, MAP_VERSIONS[name]))


def config_value(flows):
    """kln_flow_config's value for the ``agent`` section's kernel part (config.normalize()d), or events off."""
    if not flows or not flows.get("enabled"):
        return CONFIG.pack(0, 0, 0, 0, 0)
    return CONFIG.pack(CFG_ENABLED, AGGREGATION[flows["aggregation"]], 0, 0, flows["drop_rate"])


def read_config(globals_dir):
    """{enabled, aggregation, drop_rate} as the programs read it, or None when the map is not pinned."""
    path = pin(globals_dir, CONFIG_MAP)
    if not os.path.exists(path):
        return None
    with bpfsys.obj_get(path) as fd:
        raw = bpfsys.map_lookup(fd, struct.pack("=I", 0), CONFIG.size)
    flags, agg, _p, _p2, rate = CONFIG.unpack(raw)
    names = dict((v, k) for k, v in AGGREGATION.items())
    return {"enabled": bool(flags & CFG_ENABLED), "aggregation": names.get(agg, str(agg)), "drop_rate": rate}


def sync_config(globals_dir, flows, check=False):
    """Write kln_flow_config when it differs from ``flows``: the changes as text ([] when the map is not pinned:
    no object that emits events is loaded)."""
    path = pin(globals_dir, CONFIG_MAP)
    if not os.path.exists(path):
        return []
    if not bpfsys.map_sync(path, struct.pack("=I", 0), config_value(flows), check=check)[1]:
        return []
    if not flows or not flows.get("enabled"):
        return ["flow events off (kln_flow_config)"]
    return ["flow events on: aggregation %s, drop events at most %s/s per reason and CPU (kln_flow_config)"
            % (flows["aggregation"], flows["drop_rate"] or "unlimited")]


def counters(globals_dir):
    """{emitted, lost, rate_limited} summed over the CPUs (zeros when the map is not pinned)."""
    out = {"emitted": 0, "lost": 0, "rate_limited": 0}
    path = pin(globals_dir, STAT_MAP)
    if not os.path.exists(path):
        return out
    with bpfsys.obj_get(path) as fd:
        for name, idx in (("emitted", STAT_EMITTED), ("lost", STAT_LOST), ("rate_limited", STAT_RATE_LIMITED)):
            raw = bpfsys.map_lookup(fd, struct.pack("=I", idx), bpfsys.percpu_value_size(8))
            out[name] = sum(v for (v,) in STAT.iter_unpack(raw)) if raw else 0
    return out
