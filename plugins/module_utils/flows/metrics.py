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

from ansible_collections.kldload.netstack.plugins.module_utils.flows import events as ev
from ansible_collections.kldload.netstack.plugins.module_utils.flows import hubble

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
    """Counters keyed by label tuples; ``observe(e, enr, n)`` counts ``n`` flows of one decoded event (events.decode,
    or its events.PEEK_FIELDS) and the enricher's rule table, with the labels its Hubble flow (hubble.make_flow)
    would give - without making that flow: the agent makes flows only when asked for them."""

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

    def observe(self, e, enr, n=1):
        verdict = ev.VERDICTS.get(e["verdict"], "VERDICT_UNKNOWN")
        _etype, typ, subtype = hubble.event_type(e)
        keys = [("hubble_flows_processed_total", (("type", typ), ("subtype", subtype), ("verdict", verdict)))]
        proto = ev.PROTOCOLS.get(e["protocol"], "unknown")
        if verdict == "DROPPED":
            keys.append(("hubble_drop_total", (("reason", ev.reason_name(e["reason"])), ("protocol", proto))))
        direction = ev.DIRECTIONS.get(e["direction"])
        if e["flags"] & ev.F_POLICY and direction in ("INGRESS", "EGRESS"):
            keys.append(("hubble_policy_verdicts_total", (("direction", direction.lower()),
                                                          ("match", hubble.policy_rule(e, enr)[1]),
                                                          ("action", "dropped" if verdict == "DROPPED" else "forwarded"))))
        if e["protocol"] == 6:
            flags = e["tcp_flags"]
            for name, bit in (("SYN", 0x02), ("FIN", 0x01), ("RST", 0x04)):
                if flags & bit:
                    label = "SYN-ACK" if name == "SYN" and flags & 0x10 else name
                    keys.append(("hubble_tcp_flags_total", (("flag", label), ("family", "IPv4"))))
        if verdict != "DROPPED" and not e["flags"] & ev.F_REPLY and proto in ("TCP", "UDP", "SCTP") and e["dport"]:
            keys.append(("hubble_port_distribution_total", (("protocol", proto), ("port", str(e["dport"])))))
        with self._lock:
            for name, labels in keys:
                c = self.counters[name]
                c[labels] = c.get(labels, 0) + n

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
