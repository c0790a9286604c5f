# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: Hubble's flow metrics with
Hubble's names and labels (``hubble_flows_processed_total{type,subtype,verdict}``, ``hubble_drop_total{reason,
protocol}``, ``hubble_policy_verdicts_total{direction,match,action}``, ``hubble_tcp_flags_total{flag,family}``,
``hubble_port_distribution_total{protocol,port}``, ``hubble_lost_events_total{source}``) and the collection's
own ``netstack_*`` gauges the agent adds at scrape time. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import threading

HELP = {
    "hubble_flows_processed_total": ("counter", "Total number of flows processed"),
    "hubble_drop_total": ("counter", "Number of drops"),
    "hubble_policy_verdicts_total": ("counter", "Number of policy verdict events"),
    "hubble_tcp_flags_total": ("counter", "TCP flag occurrences"),
    "hubble_port_distribution_total": ("counter", "Numbers of packets distributed by destination port"),
    "hubble_lost_events_total": ("counter", "Number of lost events"),
}


def escape(v):
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample(name, labels, value):
    lbl = ",".join('%s="%s"' % (k, escape(v)) for k, v in labels)
    if isinstance(value, float) and value != int(value):
        text = repr(value)
    else:
        text = str(int(value))
    return "%s{%s} %s" % (name, lbl, text) if lbl else "%s %s" % (name, text)


class Metrics:
    """Counters keyed by label tuples; ``observe(resp)`` counts one flow (a hubble.make_flow() response)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict((name, {}) for name in HELP)

    def inc(self, name, labels, n=1):
        with self._lock:
            c = self.counters[name]
            c[labels] = c.get(labels, 0) + n

    def set_counter(self, name, labels, value):
        with self._lock:
            self.counters[name][labels] = value

    def observe(self, resp):
        f = resp["flow"]
        meta = resp.get("_meta") or {}
        verdict = f["verdict"]
        self.inc("hubble_flows_processed_total", (("type", meta.get("type", "")), ("subtype", meta.get("subtype", "")),
                                                  ("verdict", verdict)))
        l4 = f.get("l4") or {}
        proto = list(l4)[0] if l4 else "unknown"
        if verdict == "DROPPED":
            self.inc("hubble_drop_total", (("reason", f.get("drop_reason_desc", "")), ("protocol", proto)))
        if "policy_rule" in f and f.get("traffic_direction") in ("INGRESS", "EGRESS"):
            self.inc("hubble_policy_verdicts_total", (("direction", f["traffic_direction"].lower()),
                                                      ("match", f.get("policy_match_type", "none")),
                                                      ("action", "dropped" if verdict == "DROPPED" else "forwarded")))
        tcp = l4.get("TCP")
        if tcp:
            flags = tcp.get("flags") or {}
            for name in ("SYN", "FIN", "RST"):
                if flags.get(name):
                    label = "SYN-ACK" if name == "SYN" and flags.get("ACK") else name
                    self.inc("hubble_tcp_flags_total", (("flag", label), ("family", "IPv4")))
        if verdict != "DROPPED" and not f.get("is_reply") and l4 and proto in ("TCP", "UDP", "SCTP"):
            port = l4[proto].get("destination_port")
            if port:
                self.inc("hubble_port_distribution_total", (("protocol", proto), ("port", str(port))))

    def render(self, extra=()):
        """The exposition text: the counters, then ``extra`` [(name, type, help, [(labels, value)])]."""
        lines = []
        with self._lock:
            snap = dict((k, dict(v)) for k, v in self.counters.items())
        for name in sorted(snap):
            typ, text = HELP[name]
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, typ)]
            lines += [sample(name, labels, v) for labels, v in sorted(snap[name].items())]
        for name, typ, text, samples in extra:
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, typ)]
            lines += [sample(name, labels, v) for labels, v in samples]
        return "\n".join(lines) + "\n"
