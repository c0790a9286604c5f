# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pod network benchmark on the lab: across two nodes, TCP throughput (iperf3) and the new-connection
rate, pod-to-pod in tunnel (VXLAN) and native routing mode, each with BPF host routing (the default:
tc programs forward pod packets) and with legacy host routing (the host's IP stack forwards them),
against node-to-node on the same underlay (the limit), and pod-to-service through the socket LB
against pod-to-pod; with WireGuard encryption (netstack_encryption=wireguard, the backend the nodes
have) pod-to-pod again, with the CPU per Gbit/s beside the unencrypted figures, and the time from a
peer applied to its first handshake. One run, figures side by side.

  benchmarks/pod_network/run [--quick] [--seconds N] [--connections N] [--inventory PATH] [--json]
                             [--host-routing bpf,legacy] [--encryption none,wireguard]

Needs the lab up with install.yml applied (make lab-up install). It switches the routing mode and
host routing with install.yml (-e netstack_routing_mode=... -e netstack_host_routing=...) and leaves
the lab as the inventory says (tunnel, bpf).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROBE = os.path.join(REPO, "roles", "dataplane", "files", "verify_probe.py")
REMOTE_PROBE = "/run/netstack-bench/verify_probe.py"
SERVER_PORT = 18090
SERVICE_VIP = "10.96.0.20"      # the lab's selector service (demo/web) on port 80 -> the pods' 8080


class Lab:
    def __init__(self, inventory):
        env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
        out = subprocess.run([os.path.join(REPO, ".venv", "bin", "ansible-inventory"), "-i", inventory, "--list"],
                             capture_output=True, text=True, check=True, env=env).stdout
        inv = json.loads(out)
        self.inventory = inventory
        self.hostvars = inv["_meta"]["hostvars"]
        self.nodes = [h for g in ("kube_control_plane", "kube_workers") for h in inv.get(g, {}).get("hosts", [])]
        self.key = self.hostvars[self.nodes[0]]["ansible_ssh_private_key_file"]

    def sh(self, host, cmd, check=True, timeout=300):
        argv = ["ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "root@%s" % self.hostvars[host]["ansible_host"], cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise SystemExit("%s: %s failed: %s %s" % (host, cmd, proc.stdout[-500:], proc.stderr[-500:]))
        return proc.stdout

    def playbook(self, *args):
        env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
        argv = [os.path.join(REPO, ".venv", "bin", "ansible-playbook"), "-i", self.inventory,
                os.path.join(REPO, "playbooks", "install.yml")] + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise SystemExit("install.yml %s failed:\n%s" % (" ".join(args), proc.stdout[-3000:]))

    def pods(self, host):
        return json.loads(self.sh(host, "netstack endpoint list --json"))

    def pod_pair(self):
        """A ready pod on the first kube node (the client) and one on the second (the server): (client node, server
        node, client record, server record, (client node, client netns), (server node, server netns), server IP)."""
        a, b = self.nodes[0], self.nodes[1]
        client = [p for p in self.pods(a) if p.get("state") == "ready"][0]
        server = [p for p in self.pods(b) if p.get("state") == "ready"][0]
        return a, b, client, server, (a, client["netns"]), (b, server["netns"]), server["ips"][0].split("/")[0]


def _wrap(netns, cmd):
    return "nsenter --net=%s %s" % (shlex.quote(netns), cmd) if netns else cmd


def _cpu_pct():
    """(busy, total) jiffies of the whole machine: the lab nodes share its kernel and CPUs."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def iperf(lab, server, client, target, seconds):
    """TCP throughput (Gbit/s) and the machine's CPU use (%) while it ran."""
    lab.sh(server[0], _wrap(server[1], "iperf3 -s -1 -D -p 5201"))
    time.sleep(0.3)
    b0, t0 = _cpu_pct()
    out = lab.sh(client[0], _wrap(client[1], "iperf3 -c %s -p 5201 -t %d -J" % (target, seconds)), timeout=seconds + 60)
    b1, t1 = _cpu_pct()
    res = json.loads(out)
    return res["end"]["sum_received"]["bits_per_second"] / 1e9, 100.0 * (b1 - b0) / max(1, t1 - t0)


def conn_rate(lab, server, client, target, port, count, start_server=True):
    """New TCP connections per second (connect, one request/reply, close with a reset), one client. The reset
    leaves no TIME_WAIT: thousands of connections a second to one server address would otherwise use up the
    client's ephemeral ports within a minute, and connect() then crawls (a few hundred a second) searching for a
    free one - a stall of the client's kernel, not of the path measured."""
    for host in sorted({server[0], client[0]}):
        lab.sh(host, "install -D -m 0755 /dev/stdin %s <<'EOF'\n%s\nEOF" % (REMOTE_PROBE, open(PROBE).read()))
    pid = None
    if start_server:
        pid = lab.sh(server[0], _wrap(server[1], "sh -c 'python3 %s echo --tcp %d --seconds 300 >/dev/null 2>&1 & echo $!'"
                                      % (REMOTE_PROBE, port))).strip()
        time.sleep(0.5)
    try:
        out = lab.sh(client[0], _wrap(client[1], "python3 %s probe --vip %s --port %d --count %d --timeout 3 --rst"
                                      % (REMOTE_PROBE, target, port, count)))
        res = json.loads(out)
        ok = count - sum(res["errors"].values())
        return ok / res["seconds"], res["errors"]
    finally:
        if pid:
            lab.sh(server[0], "kill %s" % pid, check=False)


HANDSHAKE = r"""
import subprocess, sys, time
dev, pub = sys.argv[1], sys.argv[2]
line = [l.split("\t") for l in subprocess.run(["wg", "show", dev, "dump"], capture_output=True, text=True,
                                                check=True).stdout.splitlines()[1:] if l.startswith(pub)][0]
subprocess.run(["wg", "set", dev, "peer", pub, "remove"], check=True)
t0 = time.monotonic()
subprocess.run(["wg", "set", dev, "peer", pub, "endpoint", line[2], "allowed-ips", line[3],
                "persistent-keepalive", line[7]], check=True)
while time.monotonic() - t0 < 10:
    hs = subprocess.run(["wg", "show", dev, "latest-handshakes"], capture_output=True, text=True).stdout
    if any(f[0] == pub and f[1] != "0" for f in (l.split("\t") for l in hs.splitlines())):
        break
    time.sleep(0.005)
print("%.4f" % (time.monotonic() - t0))
"""


def first_handshake(lab, a, b, reps):
    """Seconds from node a's peer b applied (removed and added again with wg) to its first handshake."""
    pub_b = lab.sh(b, "cat /var/lib/kldload-netstack/wireguard/kln_wg0/public.key").strip()
    out = []
    for _rep in range(reps):
        out.append(float(lab.sh(a, "python3 -c %s kln_wg0 %s" % (shlex.quote(HANDSHAKE), shlex.quote(pub_b)))))
        time.sleep(1)
    return out


def measure(lab, mode, args, rows, host_routing="bpf"):
    a, b = lab.nodes[0], lab.nodes[1]
    pa = [p for p in lab.pods(a) if p["namespace"] == "demo"][0]
    pb = [p for p in lab.pods(b) if p["namespace"] == "demo"][0]
    ip_b = pb["ips"][0].split("/")[0]
    under_b = lab.hostvars[b]["netstack_underlay_ip"]
    reps = 1 if args.quick else 3
    # (name, server (host, netns), client, target, port, start a test server, iperf3 too)
    # Connection rates: a test server (verify_probe echo) on the node; the pod's own workload server
    # (the same single-threaded kind) for pod-to-pod and, through the selector service demo/web, for
    # pod-to-service - whose backends are the web pods of every node, the client's own node included.
    tag = "%s %s" % (mode, host_routing)
    cases = [("node-to-node (underlay)", (b, None), (a, None), under_b, SERVER_PORT, True, True),
             ("pod-to-pod %s" % tag, (b, pb["netns"]), (a, pa["netns"]), ip_b, 8080, False, True),
             ("pod-to-service %s" % tag, (b, pb["netns"]), (a, pa["netns"]), SERVICE_VIP, 80, False, False)]
    if mode == "wireguard":     # WireGuard is the tunnel in either routing mode: pod-to-pod once
        cases = cases[:2]
        cases[1] = ("pod-to-pod wireguard (%s backend)" % host_routing,) + cases[1][1:]
    for name, server, client, target, port, start, with_iperf in cases:
        # node-to-node is measured in both passes (it does not depend on the mode): the limit is the
        # median of all its runs, so a quieter or busier moment of the machine weighs on both sides
        prev = rows.get(name, {})
        gbit, cpu = list(prev.get("gbit_runs", [])), list(prev.get("cpu_runs", []))
        if with_iperf:
            for _rep in range(reps):
                g, c = iperf(lab, server, client, target, args.seconds)
                gbit.append(g)
                cpu.append(c)
        rates = list(prev.get("conn_runs", []))
        for _rep in range(reps):
            r, errors = conn_rate(lab, server, client, target, port, args.connections, start_server=start)
            if errors:
                print("  %s: connection errors %s" % (name, errors), file=sys.stderr)
            rates.append(r)
        rows[name] = {"gbit": statistics.median(gbit) if gbit else None, "cpu": statistics.median(cpu) if cpu else None,
                      "conn_per_s": statistics.median(rates), "gbit_runs": gbit, "cpu_runs": cpu, "conn_runs": rates}
        tput = "%6.2f Gbit/s (machine CPU %4.1f %%)" % (rows[name]["gbit"], rows[name]["cpu"]) if gbit else " " * 33
        print("[%s] %-30s %s  %8.0f conn/s" % (time.strftime("%T"), name, tput, rows[name]["conn_per_s"]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short repetition (a smoke run)")
    ap.add_argument("--seconds", type=int, default=0, help="iperf3 duration (default 10, quick 2)")
    ap.add_argument("--connections", type=int, default=0, help="connections per rate run (default 3000, quick 200)")
    ap.add_argument("--inventory", default="/var/lib/kldload-netstack/lab/inventory.yml")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--host-routing", default="bpf,legacy", help="which host routing to measure (bpf, legacy)")
    ap.add_argument("--encryption", default="none,wireguard", help="unencrypted (none) and/or with WireGuard")
    args = ap.parse_args(argv)
    encs = [e for e in args.encryption.split(",") if e]
    if not encs or any(e not in ("none", "wireguard") for e in encs):
        raise SystemExit("--encryption: a list of none and wireguard, got %r" % args.encryption)
    kinds = [k for k in args.host_routing.split(",") if k]
    if not kinds or any(k not in ("bpf", "legacy") for k in kinds):
        raise SystemExit("--host-routing: a list of bpf and legacy, got %r" % args.host_routing)
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.connections = args.connections or (200 if args.quick else 3000)
    lab = Lab(args.inventory)
    if len(lab.nodes) < 2:
        raise SystemExit("needs two kube nodes")
    rows = {}
    handshakes = []
    try:
        for mode in ("native", "tunnel") if "none" in encs else ():
            for kind in kinds:
                lab.playbook("-e", "netstack_routing_mode=%s" % mode, "-e", "netstack_host_routing=%s" % kind)
                measure(lab, mode, args, rows, kind)
        if "wireguard" in encs:
            lab.playbook("-e", "netstack_encryption=wireguard", "-e", "netstack_routing_mode=native")
            backend = json.loads(lab.sh(lab.nodes[0], "netstack encrypt status --json"))["backend"]
            measure(lab, "wireguard", args, rows, backend)
            handshakes = first_handshake(lab, lab.nodes[0], lab.nodes[1], 1 if args.quick else 5)
    finally:
        lab.playbook()      # back to the inventory's mode, encryption off
    base = rows["node-to-node (underlay)"]
    print("\n%-40s %12s %8s %8s %10s %12s %8s" % ("", "Gbit/s", "ratio", "CPU %", "CPU%/Gbit", "conn/s", "ratio"))
    for name, r in rows.items():
        g = ("%12.2f %7.3fx %8.1f %10.1f" % (r["gbit"], r["gbit"] / base["gbit"], r["cpu"], r["cpu"] / r["gbit"])
             if r["gbit"] else " " * 41)
        ref = rows[name.replace("service", "pod")] if "service" in name else base
        note = "  (against pod-to-pod)" if "service" in name else ""
        print("%-40s %s %12.0f %7.3fx%s" % (name, g, r["conn_per_s"], r["conn_per_s"] / ref["conn_per_s"], note))
    if handshakes:
        print("\npeer applied -> first handshake: median %.3f s, max %.3f s (%d runs; target <= 1 s)"
              % (statistics.median(handshakes), max(handshakes), len(handshakes)))
    if args.json:
        print(json.dumps(dict(rows, first_handshake_s=handshakes), indent=1, sort_keys=True))
    bad = [n for n, r in rows.items() if not r["conn_per_s"] or (r["gbit"] is not None and r["gbit"] <= 0)]
    if bad:
        raise SystemExit("no traffic in: %s" % ", ".join(bad))


if __name__ == "__main__":
    main()
