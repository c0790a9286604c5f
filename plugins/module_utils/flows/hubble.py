# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flows as Hubble shows them: ``make_flow()`` turns a decoded event (events.decode) and what the node knows
(enrich.Enricher) into the JSON of ``hubble observe -o json`` (a GetFlowsResponse: ``{"flow": {...},
"node_name", "time"}`` with Hubble's field names: ``verdict``, ``drop_reason_desc``, ``IP.source``,
``l4.TCP.destination_port``, ``source.namespace``, ``source.pod_name``, ``source.labels``, ``source.identity``,
``traffic_direction``, ``Type``, ``event_type``, ``trace_observation_point``, ``is_reply``, ``Summary``,
``*_allowed_by`` / ``*_denied_by``, ``destination_service``), plus two fields of ours: ``policy_rule`` (the rule
that allowed or denied it, or ``default deny``) and ``translation`` (service and backend of a translation).
``compact()`` is the one-line form of ``hubble observe``; ``parse_filters()`` / ``matches()`` the filters of
``netstack observe`` (the same code on the node agent, the relay and the command line). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import calendar
import ipaddress
import re
import time

from ansible_collections.kldload.netstack.plugins.module_utils.flows import events as ev

# Cilium's monitor message types (Hubble's event_type.type) and hubble_flows_processed_total's type label
MSG_DROP, MSG_TRACE, MSG_POLICY_VERDICT, MSG_TRACE_SOCK = 1, 4, 5, 7
TYPE_LABELS = {MSG_DROP: "Drop", MSG_TRACE: "Trace", MSG_POLICY_VERDICT: "PolicyVerdict", MSG_TRACE_SOCK: "SOCK"}
DEFAULT_DENY = "default deny"


def iso_time(t):
    """RFC 3339 with nanoseconds, UTC (Hubble's time format)."""
    sec = int(t)
    ns = int(round((t - sec) * 1e9))
    if ns >= 1000000000:
        sec, ns = sec + 1, ns - 1000000000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + ".%09dZ" % ns


def parse_time(text):
    """Unix time of an RFC 3339 time (what iso_time() writes, or with a zone offset / fewer digits)."""
    m = re.match(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?$", text.strip())
    if not m:
        raise ValueError(text)
    y, mo, d, h, mi, s, frac, zone = m.groups()
    t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, 0))
    if frac:
        t += int(frac.ljust(9, "0")) / 1e9
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        zone = zone[1:].replace(":", "")
        t -= sign * (int(zone[:2]) * 3600 + int(zone[2:]) * 60)
    elif not zone:
        t += time.altzone if time.localtime(t).tm_isdst else time.timezone
    return t


def _rule_ref(text):
    """A rule text ("<kind> <ns>/<name> <section>[i]") as a Hubble Policy reference."""
    parts = (text or "").split(" ")
    if len(parts) < 2:
        return {"name": text}
    ns, _sep, name = parts[1].rpartition("/")
    return {"kind": parts[0], "namespace": ns, "name": name or parts[1],
            "labels": ["k8s:io.cilium.k8s.policy.name=%s" % (name or parts[1])]
            + (["k8s:io.cilium.k8s.policy.namespace=%s" % ns] if ns else []), "rule": " ".join(parts[2:])}


def _endpoint(rec):
    out = {"identity": rec.get("identity") or 0, "labels": list(rec.get("labels") or [])}
    if rec.get("namespace"):
        out["namespace"] = rec["namespace"]
    if rec.get("pod_name"):
        out["pod_name"] = rec["pod_name"]
    if rec.get("node_name") and rec.get("kind") != "world":
        out["node_name"] = rec["node_name"]
    return out


def event_type(e):
    """(Hubble's ``event_type``, ``hubble_flows_processed_total``'s type and subtype labels) of a decoded event."""
    if e["verdict"] == 2:
        return {"type": MSG_DROP, "sub_type": e["reason"]}, "Drop", ""
    if e["source"] == ev.SRC_SOCK:
        return {"type": MSG_TRACE_SOCK, "sub_type": 0}, "SOCK", ""
    if e["flags"] & ev.F_POLICY:
        return {"type": MSG_POLICY_VERDICT, "sub_type": 0}, "PolicyVerdict", ""
    return {"type": MSG_TRACE, "sub_type": e["source"]}, "Trace", ev.SOURCES.get(e["source"], "")


def policy_rule(e, enr):
    """(the rule text that decided, Hubble's policy match type) of a policy verdict event."""
    text = enr.rule(e["rule"]) if e["rule"] else ""
    return text, (enr.rule_kinds.get(text, "all") if text else "none")


def make_flow(e, enr, node_name, wall_time, seq=0):
    """The GetFlowsResponse of one decoded event; ``enr`` an enrich.Enricher (or anything with its lookups)."""
    sock = e["source"] == ev.SRC_SOCK
    verdict = ev.VERDICTS.get(e["verdict"], "VERDICT_UNKNOWN")
    src_rec = None
    if sock:
        src_rec = enr.cookie(e["cookie"]) if e["cookie"] else None
        saddr = (src_rec or {}).get("ip") or e["saddr"]
        src_rec = src_rec or {"kind": "world", "identity": 0, "labels": ["reserved:unknown"]}
    else:
        saddr = e["saddr"]
        src_rec = enr.lookup(saddr, e["src_identity"])
    dst_rec = enr.lookup(e["daddr"], e["dst_identity"])
    etype, type_label, subtype = event_type(e)
    proto = ev.PROTOCOLS.get(e["protocol"], str(e["protocol"]))
    flags = ev.tcp_flag_names(e["tcp_flags"])
    if e["protocol"] == 6:
        l4 = {"TCP": {"source_port": e["sport"], "destination_port": e["dport"], "flags": dict((f, True) for f in flags)}}
    elif e["protocol"] == 17:
        l4 = {"UDP": {"source_port": e["sport"], "destination_port": e["dport"]}}
    elif e["protocol"] == 132:
        l4 = {"SCTP": {"source_port": e["sport"], "destination_port": e["dport"]}}
    elif e["protocol"] == 1:
        l4 = {"ICMPv4": {}}
    else:
        l4 = {}
    flow = {"time": iso_time(wall_time), "uuid": "%s-%d" % (node_name, seq), "verdict": verdict,
            "IP": {"source": saddr if saddr != "0.0.0.0" else "", "destination": e["daddr"], "ipVersion": "IPv4"},
            "l4": l4, "source": _endpoint(src_rec), "destination": _endpoint(dst_rec),
            "Type": "SOCK" if sock else "L3_L4", "node_name": node_name, "event_type": etype,
            "traffic_direction": ev.DIRECTIONS.get(e["direction"], "TRAFFIC_DIRECTION_UNKNOWN"),
            "trace_observation_point": ev.OBS_POINTS.get(e["source"], "UNKNOWN_POINT"),
            "is_reply": bool(e["flags"] & ev.F_REPLY)}
    if e["verdict"] == 2:
        flow["drop_reason"] = e["reason"]
        flow["drop_reason_desc"] = ev.reason_name(e["reason"])
    if e["ifindex"]:
        flow["interface"] = {"index": e["ifindex"], "name": enr.ifname(e["ifindex"])}
    summary = []
    if flags:
        summary.append("TCP Flags: %s" % ", ".join(flags))
    if e["flags"] & ev.F_POLICY:
        text, match = policy_rule(e, enr)
        if e["verdict"] == 2 and e["reason"] in (133,):
            flow["policy_rule"] = DEFAULT_DENY
        elif text:
            flow["policy_rule"] = text
        elif e["verdict"] == 2:
            flow["policy_rule"] = DEFAULT_DENY
        else:
            flow["policy_rule"] = "" if e["flags"] & ev.F_ENFORCED else "not enforced"
        d = "ingress" if e["direction"] == 1 else "egress"
        if text:
            flow["%s_%s_by" % (d, "denied" if e["verdict"] == 2 else "allowed")] = [_rule_ref(text)]
        flow["policy_match_type"] = match
        summary.append("policy: %s" % flow["policy_rule"])
    if e["service_id"] or e["orig_addr"] != "0.0.0.0":
        svc = enr.service(e["service_id"]) or {}
        if svc.get("name"):
            flow["destination_service"] = {"name": svc["name"], "namespace": svc.get("namespace", "")}
        flow["translation"] = {"service": "%s:%d" % (e["orig_addr"], e["orig_port"]),
                               "backend": "%s:%d" % (e["daddr"], e["dport"]) if e["daddr"] != "0.0.0.0" else "",
                               "service_name": ("%s/%s" % (svc.get("namespace"), svc["name"])) if svc.get("name") else ""}
        if sock:
            flow["sock_xlate_point"] = "SOCK_XLATE_POINT_PRE_DIRECTION_FWD"
    flow["Summary"] = "; ".join(summary) or proto
    return {"flow": flow, "node_name": node_name, "time": flow["time"],
            "_meta": {"t": wall_time, "type": type_label, "subtype": subtype}}


def public(resp):
    """The response without the agent's private bookkeeping."""
    return dict((k, v) for k, v in resp.items() if not k.startswith("_"))


# ---- compact -------------------------------------------------------------------------------------------

def _who(ep, ip, port):
    name = ("%s/%s" % (ep.get("namespace"), ep["pod_name"])) if ep.get("pod_name") else \
        ("%s (%s)" % (ip, ep["labels"][0].split(":", 1)[-1])) if ep.get("labels") and ep["labels"][0].startswith("reserved:") \
        else ip
    return "%s%s (ID:%s)" % (name, ":%d" % port if port else "", ep.get("identity", 0))


def compact(resp):
    """One line like ``hubble observe``'s compact output."""
    f = resp["flow"]
    t = time.strftime("%b %d %H:%M:%S", time.localtime(parse_time(f["time"]))) + "." + f["time"][20:23]
    l4 = list(f.get("l4", {}).values())
    ports = l4[0] if l4 else {}
    src = _who(f["source"], f["IP"]["source"] or "?", ports.get("source_port"))
    dst = _who(f["destination"], f["IP"]["destination"], ports.get("destination_port"))
    if f["verdict"] == "DROPPED":
        what = ev.REASON_TEXT.get(f.get("drop_reason"), f.get("drop_reason_desc", ""))
    elif f["Type"] == "SOCK" or f.get("translation"):
        what = "%s %s" % ("sock-lb" if f["Type"] == "SOCK" else "edge-lb",
                          f.get("translation", {}).get("service_name") or f.get("translation", {}).get("service", ""))
    elif f["event_type"]["type"] == MSG_POLICY_VERDICT:
        what = "policy-verdict:%s" % f.get("policy_match_type", "none")
    else:
        what = ev.SOURCES.get(f["event_type"].get("sub_type"), "")
    direction = f.get("traffic_direction", "")
    line = "%s [%s]: %s %s %s %s %s%s %s" % (
        t, resp.get("node_name", ""), src, "<-" if f.get("is_reply") else "->", dst, what,
        direction + " " if direction in ("INGRESS", "EGRESS") else "", f["verdict"],
        "(%s)" % f["Summary"] if f.get("Summary") else "")
    if f.get("translation"):
        line += " %s => %s" % (f["translation"]["service"], f["translation"]["backend"] or "no backend")
    return line


# ---- filters -------------------------------------------------------------------------------------------

FILTERS = ("namespace", "pod", "from_pod", "to_pod", "label", "identity", "verdict", "drop_reason", "protocol", "port",
           "ip", "from_ip", "to_ip", "since", "last", "follow", "node")
_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv4": 1, "sctp": 132}
_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 132: "sctp"}


class FilterError(ValueError):
    """A filter that cannot be used; the message names it."""


def _duration(text):
    m = re.match(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$", text.strip())
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_filters(params, now=None):
    """Validated filters from ``params`` ({name: [values]} or {name: value}; names with - or _): {name: [values]},
    with ``since`` as unix time, ``last`` as int and ``follow`` as bool. FilterError names what is wrong."""
    out = {}
    for raw_name, values in (params or {}).items():
        name = raw_name.replace("-", "_")
        if name not in FILTERS:
            raise FilterError("unknown filter %r (filters: %s)" % (raw_name, ", ".join(f.replace("_", "-") for f in FILTERS)))
        if not isinstance(values, (list, tuple)):
            values = [values]
        values = [str(v).strip() for v in values if v is not None and str(v).strip() != ""]
        if not values:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "verdict":
            bad = [v for v in values if v.upper() not in ev.VERDICT_NAMES or v.upper() == "VERDICT_UNKNOWN"]
            if bad:
                raise FilterError("%s: unknown verdict %s (verdicts: %s)" % (
                    flag, ", ".join(bad), ", ".join(v for v in ev.VERDICTS.values() if v != "VERDICT_UNKNOWN")))
            values = [v.upper() for v in values]
        elif name == "drop_reason":
            conv = []
            for v in values:
                if v.isdigit() and 0 < int(v) < 256:
                    conv.append(ev.reason_name(int(v)))
                elif v.upper() in ev.REASON_CODES:
                    conv.append(v.upper())
                else:
                    raise FilterError("%s: unknown drop reason %r (reasons: %s, or a code 1-255)"
                                      % (flag, v, ", ".join(sorted(ev.REASON_CODES))))
            values = conv
        elif name == "protocol":
            values = [_PROTOCOL_NAMES.get(int(v), v) if v.isdigit() else v for v in values]
            bad = [v for v in values if v.lower() not in _PROTOCOLS]
            if bad:
                raise FilterError("%s: unknown protocol %s (protocols: tcp, udp, icmp, sctp)" % (flag, ", ".join(bad)))
            values = [_PROTOCOLS[v.lower()] for v in values]
        elif name == "port":
            conv = []
            for v in values:
                if not v.isdigit() or not 0 < int(v) <= 65535:
                    raise FilterError("%s: %r is not a port (1-65535)" % (flag, v))
                conv.append(int(v))
            values = conv
        elif name in ("identity",):
            if any(not v.isdigit() for v in values):
                raise FilterError("%s: a security identity is a number, got %s" % (flag, ", ".join(values)))
            values = [int(v) for v in values]
        elif name in ("ip", "from_ip", "to_ip"):
            for v in values:
                try:
                    ipaddress.ip_network(u"%s" % v, strict=False)
                except ValueError:
                    raise FilterError("%s: %r is not an IP address or CIDR" % (flag, v))
        elif name in ("pod", "from_pod", "to_pod"):
            for v in values:
                if not re.match(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", v):
                    raise FilterError("%s: %r is not [namespace/]pod-name" % (flag, v))
        elif name == "label":
            for v in values:
                for part in v.split(","):
                    if not re.match(r"^([a-z0-9-]+:)?[A-Za-z0-9_./-]+(=[A-Za-z0-9_.-]*)?$", part.strip()):
                        raise FilterError("%s: %r is not key=value[,key=value]" % (flag, v))
        elif name == "since":
            if len(values) > 1:
                raise FilterError("%s: given more than once" % flag)
            v = values[0]
            try:
                values = float(v) if re.match(r"^\d+(\.\d+)?$", v) else None
                if values is None:
                    d = _duration(v)
                    values = ((now or time.time()) - d) if d is not None else parse_time(v)
            except ValueError:
                raise FilterError("%s: %r is neither a duration (30s, 5m, 2h, 1d) nor a time (2024-05-01T10:00:00Z)"
                                  % (flag, v))
        elif name == "last":
            if len(values) > 1 or not values[0].isdigit() or int(values[0]) < 1:
                raise FilterError("%s: a positive number of flows, got %s" % (flag, ", ".join(values)))
            values = int(values[0])
        elif name == "follow":
            values = values[-1].lower() in ("1", "true", "yes", "on")
        out[name] = values
    return out


def query(filters):
    """[(name, value)] for a URL query string of validated filters (since as unix time)."""
    out = []
    for k, v in sorted(filters.items()):
        if k in ("since",):
            out.append((k, "%.6f" % v))
        elif k == "last":
            out.append((k, str(v)))
        elif k == "follow":
            if v:
                out.append((k, "1"))
        elif k == "protocol":
            out += [(k, _PROTOCOL_NAMES.get(x, str(x))) for x in v]
        else:
            out += [(k, str(x)) for x in v]
    return out


def _pod_match(ep, spec):
    ns, _sep, name = spec.rpartition("/")
    if ns and ep.get("namespace") != ns:
        return False
    return bool(ep.get("pod_name")) and ep["pod_name"].startswith(name)


def _labels_match(ep, spec):
    have = set(ep.get("labels") or [])
    plain = set(x.split(":", 1)[1] for x in have if ":" in x) | have
    for part in spec.split(","):
        part = part.strip()
        if "=" not in part:
            if not any(x.split("=", 1)[0] in (part, part.split(":", 1)[-1]) for x in plain):
                return False
        elif part not in have and part not in plain:
            return False
    return True


def _ip_in(ip, specs):
    if not ip:
        return False
    a = ipaddress.ip_address(u"%s" % ip)
    return any(a in ipaddress.ip_network(u"%s" % s, strict=False) for s in specs)


def matches(resp, flt):
    """Whether a flow passes the filters (``since``/``last``/``follow`` are applied by the caller): each filter
    given must hold (AND); the values of one filter are alternatives (OR); filters about a pod, label, identity,
    port or address hold when either end matches, ``from_*`` / ``to_*`` only for that end."""
    f = resp["flow"]
    s, d = f["source"], f["destination"]
    if "namespace" in flt and s.get("namespace") not in flt["namespace"] and d.get("namespace") not in flt["namespace"]:
        return False
    if "pod" in flt and not any(_pod_match(s, p) or _pod_match(d, p) for p in flt["pod"]):
        return False
    if "from_pod" in flt and not any(_pod_match(s, p) for p in flt["from_pod"]):
        return False
    if "to_pod" in flt and not any(_pod_match(d, p) for p in flt["to_pod"]):
        return False
    if "label" in flt and not any(_labels_match(s, x) or _labels_match(d, x) for x in flt["label"]):
        return False
    if "identity" in flt and s.get("identity") not in flt["identity"] and d.get("identity") not in flt["identity"]:
        return False
    if "verdict" in flt and f["verdict"] not in flt["verdict"]:
        return False
    if "drop_reason" in flt and f.get("drop_reason_desc") not in flt["drop_reason"]:
        return False
    if "protocol" in flt:
        want = set(ev.PROTOCOLS.get(p, str(p)) for p in flt["protocol"])
        if not set(f.get("l4") or {}) & want:
            return False
    if "port" in flt:
        l4 = list((f.get("l4") or {}).values())
        ports = set([l4[0].get("source_port"), l4[0].get("destination_port")]) if l4 else set()
        if not ports & set(flt["port"]):
            return False
    if "ip" in flt and not (_ip_in(f["IP"]["source"], flt["ip"]) or _ip_in(f["IP"]["destination"], flt["ip"])):
        return False
    if "from_ip" in flt and not _ip_in(f["IP"]["source"], flt["from_ip"]):
        return False
    if "to_ip" in flt and not _ip_in(f["IP"]["destination"], flt["to_ip"]):
        return False
    if "node" in flt and resp.get("node_name") not in flt["node"]:
        return False
    if "since" in flt and resp.get("_meta", {}).get("t", parse_time(f["time"])) < flt["since"]:
        return False
    return True


def pod_filters(flt):
    """The pods the filters name ([namespace/]name, as given)."""
    return [p for k in ("pod", "from_pod", "to_pod") for p in flt.get(k) or []]
