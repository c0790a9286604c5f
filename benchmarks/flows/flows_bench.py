# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flow events benchmark on the lab, one run, figures side by side (docs/observability.md):

- the new-connection rate pod-to-pod across two nodes and pod-to-service (the socket LB) with the flow events
  on (the node configuration's aggregation, medium by default) and off, the modes interleaved over several
  rounds (the lab's nodes share one machine: interleaving spreads its noise over both); the ratio on/off of the
  best and of the median rounds, and every round's figure (target >= 0.95 at the default aggregation);
- pod-to-pod TCP throughput (iperf3) on and off;
- the agent's resident memory and the events lost under a flood at aggregation none (every packet an event).

The events are switched on all nodes at once by writing kln_flow_config (what the node apply writes), the agents
keep running; the end puts back what the node configuration says.

  benchmarks/flows/run [--quick] [--rounds N] [--connections N] [--seconds N] [--inventory PATH] [--json]
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "pod_network"))
import pod_network as pn  # noqa: E402

SWITCH = r"""
import json, sys
sys.path.insert(0, "/usr/lib/kldload-netstack/netstack.pyz")
from ansible_collections.kldload.netstack.plugins.module_utils import runtime
from ansible_collections.kldload.netstack.plugins.module_utils.flows import config, events
cfg = runtime.read_config()
mode = sys.argv[1]
want = config.kernel(cfg["agent"])
if mode == "off":
    want = None
elif mode != "configured":
    want = dict(want or {"enabled": True, "drop_rate": 100}, enabled=True, aggregation=mode)
print(json.dumps({"changes": events.sync_config(runtime.globals_dir(cfg), want), "now": events.read_config(runtime.globals_dir(cfg)),
                  "counters": events.counters(runtime.globals_dir(cfg))}))
"""


def switch(lab, mode):
    out = {}
    for h in lab.nodes:
        out[h] = json.loads(lab.sh(h, "python3 - %s <<'EOF'\n%s\nEOF" % (mode, SWITCH)).strip().splitlines()[-1])
    return out


def agent_metric(lab, host, name):
    addr = lab.hostvars[host]["ansible_host"]
    text = lab.sh(host, "python3 -c \"import urllib.request as u; print(u.urlopen('http://%s:4245/metrics').read()"
                        ".decode())\" 2>/dev/null || true" % addr)        # None: the agent does not answer
    m = re.search(r"^%s\{[^}]*\} (\S+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few connections, short transfers (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--inventory", default="/var/lib/kldload-netstack/lab/inventory.yml")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.connections, args.seconds = 2, 300, 2
    lab = pn.Lab(args.inventory)
    a, b, client, server, cl, sv, sip = lab.pod_pair()
    configured = switch(lab, "configured")[a]["now"]
    out = {"pair": "%s/%s on %s -> %s/%s on %s" % (client["namespace"], client["name"], a, server["namespace"],
                                                   server["name"], b),
           "aggregation": configured and configured["aggregation"], "pod": {"on": [], "off": []},
           "service": {"on": [], "off": []}, "throughput": {}, "flood": {}}
    try:
        for r in range(args.rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                switch(lab, "configured" if mode == "on" else "off")
                out["pod"][mode].append(pn.conn_rate(lab, sv, cl, sip, pn.SERVER_PORT, args.connections)[0])
                out["service"][mode].append(pn.conn_rate(lab, sv, cl, pn.SERVICE_VIP, 80, args.connections,
                                                         start_server=False)[0])
        for mode in ("off", "on"):
            switch(lab, "configured" if mode == "on" else "off")
            out["throughput"][mode] = pn.iperf(lab, sv, cl, sip, args.seconds)
        # a flood at aggregation none: every packet an event; the agent's memory stays flat (its ring is bounded)
        switch(lab, "none")
        rss0 = agent_metric(lab, b, "netstack_agent_resident_memory_bytes")
        before = switch(lab, "none")[b]["counters"]
        flood = pn.conn_rate(lab, sv, cl, sip, pn.SERVER_PORT, args.connections * 2)[0]
        pn.iperf(lab, sv, cl, sip, args.seconds)
        time.sleep(2)
        after = switch(lab, "none")[b]["counters"]
        rss1 = agent_metric(lab, b, "netstack_agent_resident_memory_bytes")
        out["flood"] = {"connections_per_s": flood, "events": after["emitted"] - before["emitted"],
                        "lost": after["lost"] - before["lost"], "agent_rss_before": rss0, "agent_rss_after": rss1,
                        "agent_buffered": agent_metric(lab, b, "netstack_agent_flows_buffered"),
                        "agent_buffer_size": agent_metric(lab, b, "netstack_agent_flows_buffer_size")}
    finally:
        switch(lab, "configured")
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return
    print("flow events benchmark, %s (aggregation %s when on)" % (out["pair"], out["aggregation"]))
    print("%-44s %12s %12s %8s" % ("new connections/s, %d rounds" % args.rounds, "off", "on", "ratio"))
    for what in ("pod", "service"):
        for how, pick in (("best", max), ("median", statistics.median)):
            off, on = pick(out[what]["off"]), pick(out[what]["on"])
            print("%-44s %12.0f %12.0f %8.3f" % ("%s, %s" % ("pod-to-pod" if what == "pod" else "pod-to-service (VIP)", how),
                                                 off, on, on / off if off else 0))
        rounds = [" ".join("%.0f" % x for x in out[what][mode]) for mode in ("off", "on")]
        print("  rounds off: %s; on: %s" % tuple(rounds))
    toff, ton = out["throughput"]["off"][0], out["throughput"]["on"][0]
    print("%-44s %12.2f %12.2f %8.3f" % ("TCP Gbit/s pod-to-pod", toff, ton, ton / toff if toff else 0))
    f = out["flood"]
    print("flood at aggregation none on %s: %d events (%d lost: ring buffer full), agent RSS %.1f -> %.1f MiB, "
          "ring %d of %d flows" % (b, f["events"], f["lost"], (f["agent_rss_before"] or 0) / 2 ** 20,
                                   (f["agent_rss_after"] or 0) / 2 ** 20, f["agent_buffered"] or 0,
                                   f["agent_buffer_size"] or 0))


if __name__ == "__main__":
    main()
