# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Network policy benchmark on the lab, one run, figures side by side:

- the new-connection rate from a pod on one node to a pod on another with 0, 100 and 1,000 rules in force
  on the pair (ingress rules on the server's pod, egress rules on the client's: ipBlock /32 peers on their
  own ports, one rule that allows the benchmark's traffic), as a ratio of the 0-rule rate (target >= 0.95
  at 1,000);
- pod-to-pod TCP throughput (iperf3) with the policy programs attached (no rule) against the node without
  policy (netstack_policy_enforcement=false: no overlay programs either, the fixed-VNI VXLAN device), and against
  the same tunnel path with only the policy programs' tc links detached (target >= 0.95);
- the time to apply 1,000 policies to the endpoints of a node and one policy change among them, through the
  node's own apply (the library the module and the CNI plugin call; target <= 1 s and <= 50 ms).

  benchmarks/policy/run [--quick] [--rounds N] [--tp-rounds N] [--seconds N] [--connections N] [--inventory PATH]
                        [--json]

The rule counts are measured interleaved (0, 1000, 100 rules, then again, --rounds times) and each count's
rate is the median of its rounds; the throughput with the programs is the mean of a run before and one after
the run without them; the same-path comparison alternates with and without the programs in ABBA order over
--tp-rounds rounds (one stream's throughput on this machine drifts by 5-10 % over tens of seconds: many short
alternations, and neither side always measured first after a play), medians; one policy change is timed five
times (median and max).

Needs the lab up with install.yml applied; leaves it as the inventory says (policies of the inventory, policy on).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "pod_network"))
import pod_network as pn  # noqa: E402

PORT = pn.SERVER_PORT
APPLY = os.path.join(REPO, "tests", "integration", "policy_apply.yml")
COUNTS = (0, 1000, 100)

TIMING = r"""
import json, sys, time
sys.path.insert(0, "/usr/lib/kldload-netstack/netstack.pyz")
from ansible_collections.kldload.netstack.plugins.module_utils import cni, runtime
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node
cfg = runtime.read_config()
gdir = runtime.globals_dir(cfg)
saved = node.read_state()
n = int(sys.argv[1])
eps = [r for r in cni.list_endpoints() if r.get("state") == "ready"]
ns = eps[0]["namespace"]
def policies(changed=-1):
    out = []
    for i in range(n):
        port = 30000 + (i if i != changed else n + 1)
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "bench-%d" % i, "namespace": ns},
                    "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.%d.%d/32" % (i // 250, i % 250)}}],
                                                             "ports": [{"port": port, "protocol": "TCP"}]}]}})
    return out
validate = []
def run(pols):
    t0 = time.perf_counter()
    st = node.validate_state(dict(saved, policies=pols))
    t1 = time.perf_counter()
    res = node.apply(gdir, st, cni.list_endpoints(), cfg["pods"], tunnel="overlay" in [o["name"] for o in cfg["objects"]])
    validate.append(t1 - t0)
    return time.perf_counter() - t1, res
try:
    node.apply(gdir, saved, cni.list_endpoints(), cfg["pods"], tunnel="overlay" in [o["name"] for o in cfg["objects"]])
    full, res = run(policies())
    entries = sum(len(e["entries"]) for e in res["output"]["endpoints"].values())
    changes = []
    for k in range(5):      # five different single changes, each from the full set
        change, res2 = run(policies(changed=n // 2 + k))
        assert len(res2["diff"]) == 2 and res2["changed"], res2["diff"]
        changes.append(change)
        run(policies())
    same, res3 = run(policies())
    changes.sort()
    print(json.dumps({"policies": n, "endpoints": res["endpoints"], "entries": entries, "apply_s": full,
                      "change_s": changes[len(changes) // 2], "change_max_s": changes[-1], "change_lines": len(res2["diff"]),
                      "again_s": same, "again_changed": res3["changed"], "validate_s": sorted(validate)[len(validate) // 2]}))
finally:
    node.apply(gdir, saved, cni.list_endpoints(), cfg["pods"], tunnel="overlay" in [o["name"] for o in cfg["objects"]])
"""


def rules_yaml(n, client_ns, server, client):
    """n ingress rules on the server's pod and n egress rules on the client's, plus what lets the benchmark through."""
    docs = []
    for side, sel, direction, key in (("server", server, "ingress", "from"), ("client", client, "egress", "to")):
        rules = [{key: [{"ipBlock": {"cidr": "198.18.%d.%d/32" % (i // 250, i % 250)}}],
                  "ports": [{"port": 20000 + i, "protocol": "TCP"}]} for i in range(n)]
        peer = client if side == "server" else server
        rules.append({key: [{"podSelector": {"matchLabels": peer["labels"]}}]})
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "bench-%s" % side, "namespace": client_ns},
                     "spec": {"podSelector": {"matchLabels": sel["labels"]},
                              "policyTypes": ["Ingress" if direction == "ingress" else "Egress"], direction: rules}})
    return docs


def apply_policies(lab, docs):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"netstack_network_policies": docs}, f)
    try:
        env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
        proc = subprocess.run([os.path.join(REPO, ".venv", "bin", "ansible-playbook"), "-i", lab.inventory, APPLY,
                               "-e", "@" + f.name], capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise SystemExit("the policy play failed:\n%s" % proc.stdout[-3000:])
    finally:
        os.unlink(f.name)


DETACH = ("kln_pol_from_container", "kln_pol_to_container", "kln_pol_from_netdev")


def detach_policy_programs(lab, host):
    """Detach the tc links of the policy programs, the overlay programs kept: the same path without them. The lab's
    nodes share one kernel, so this is every node's; the next install.yml attaches them again."""
    links = json.loads(lab.sh(host, "bpftool -j link show"))
    names = dict((p["id"], p.get("name")) for p in json.loads(lab.sh(host, "bpftool -j prog show")))
    ids = [link["id"] for link in links if link.get("type") == "tcx" and names.get(link["prog_id"]) in DETACH]
    for i in ids:
        lab.sh(host, "bpftool link detach id %d" % i)
    return len(ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few connections, short transfers (a smoke run)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--inventory", default="/var/lib/kldload-netstack/lab/inventory.yml")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved rule counts (default 3)")
    ap.add_argument("--tp-rounds", type=int, default=6,
                    help="rounds of the same-path throughput comparison, ABBA order (default 6)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.connections, args.rounds, args.tp_rounds = 2, 300, 1, 2
    lab = pn.Lab(args.inventory)
    a, b, client, server, cl, sv, sip = lab.pod_pair()
    out = {"pair": "%s/%s on %s -> %s/%s on %s" % (client["namespace"], client["name"], a, server["namespace"],
                                                   server["name"], b), "rates": {}, "apply": None}
    samples = dict((n, []) for n in COUNTS)
    try:
        # the rule counts interleaved, round after round (the machine's drift hits each count alike);
        # each count's rate is the median over the rounds of the best of two runs
        for _r in range(args.rounds):
            for n in COUNTS:
                apply_policies(lab, rules_yaml(n, client["namespace"], server, client) if n else [])
                samples[n].append(max(pn.conn_rate(lab, sv, cl, sip, PORT, args.connections)[0],
                                      pn.conn_rate(lab, sv, cl, sip, PORT, args.connections)[0]))
        out["rates"] = dict((n, statistics.median(v)) for n, v in samples.items())
        out["rate_samples"] = samples
        apply_policies(lab, [])
        # throughput on, off, on again: the programs' figure is the mean of the two around the one without
        on = [pn.iperf(lab, sv, cl, sip, args.seconds)]
        timing = lab.sh(b, "python3 - %d <<'EOF'\n%s\nEOF" % (100 if args.quick else 1000, TIMING))
        out["apply"] = json.loads(timing.strip().splitlines()[-1])
        lab.playbook("-e", "netstack_policy_enforcement=false")
        out["throughput_plain"] = pn.iperf(lab, sv, cl, sip, args.seconds)
        lab.playbook()
        on.append(pn.iperf(lab, sv, cl, sip, args.seconds))
        out["throughput_policy"] = (sum(t[0] for t in on) / len(on), sum(t[1] for t in on) / len(on))
        out["throughput_policy_runs"] = [t[0] for t in on]
        # the same tunnel path (overlay programs, identities in the VNI) with and without the policy programs,
        # alternated in ABBA order (with, without | without, with | ...); medians
        same = {"with": [], "without": []}
        attached = True
        for r in range(args.tp_rounds):
            for which in (("with", "without") if r % 2 == 0 else ("without", "with")):
                if which == "with" and not attached:
                    lab.playbook()
                    attached = True
                elif which == "without" and attached:
                    if not detach_policy_programs(lab, b):
                        raise SystemExit("no policy program attached to detach")
                    attached = False
                same[which].append(pn.iperf(lab, sv, cl, sip, args.seconds)[0])
        out["throughput_same_path"] = same
    finally:
        lab.playbook()
        apply_policies(lab, [])
    base = out["rates"][0]
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return
    print("policy benchmark, %s" % out["pair"])
    print("%-44s %12s %8s" % ("new connections/s (median of %d rounds)" % args.rounds, "rate", "ratio"))
    for n, r in sorted(out["rates"].items()):
        rounds = " ".join("%.0f" % x for x in out["rate_samples"][n])
        print("%-44s %12.0f %8.3f   rounds: %s" % ("%d rules on the pair" % n, r, r / base if base else 0, rounds))
    tp, tn = out["throughput_policy"][0], out["throughput_plain"][0]
    print("%-44s %12.2f %8s" % ("TCP Gbit/s without the policy programs", tn, "1.000"))
    print("%-44s %12.2f %8.3f" % ("TCP Gbit/s with them (no rule; before, after)", tp, tp / tn if tn else 0))
    print("%-44s %s" % ("  runs with them", " ".join("%.2f" % x for x in out["throughput_policy_runs"])))
    same = out["throughput_same_path"]
    sw, so = statistics.median(same["without"]), statistics.median(same["with"])
    print("%-44s %12.2f %8s" % ("TCP Gbit/s, policy programs detached", sw, "1.000"))
    print("%-44s %12.2f %8.3f" % ("TCP Gbit/s, the same path with them", so, so / sw if sw else 0))
    print("%-44s %s / %s" % ("  runs with / without (ABBA order)", " ".join("%.2f" % x for x in same["with"]),
                             " ".join("%.2f" % x for x in same["without"])))
    mw, mo = statistics.mean(same["with"]), statistics.mean(same["without"])
    print("%-44s %12s %8.3f" % ("  ratio of the means", "", mw / mo if mo else 0))
    t = out["apply"]
    print("apply %d policies (%d entries on %d endpoints): %.3f s; one policy changed: %.3f s (median of 5, max %.3f; "
          "%d diff lines); the same again: %.3f s (changed %s); validating the %d documents before each: %.3f s"
          % (t["policies"], t["entries"], t["endpoints"], t["apply_s"], t["change_s"], t["change_max_s"], t["change_lines"],
             t["again_s"], t["again_changed"], t["policies"], t["validate_s"]))


if __name__ == "__main__":
    main()
