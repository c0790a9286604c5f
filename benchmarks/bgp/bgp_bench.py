# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""BGP and north-south load balancing on the lab, one run, figures side by side:

- announce: a new LoadBalancer address given to FRR on every node (frr_bgp, the bgp role's module) until it is in
  router1's RIB with all three next hops; withdraw: removed again until it is gone from the RIB (datacenter timers:
  keepalive 3 s, hold 9 s; withdrawals and updates are sent at once);
- BFD failover: FRR killed (SIGKILL) on one node until router1's kernel FIB no longer has that next hop for the
  service address (BFD 100 ms x 3 on both sides; the hold timer would take 9 s);
- new TCP connections per second from router1's network namespace: through the LoadBalancer IP (edge program on
  the underlay: DNAT + SNAT, replies translated back) against straight to a backend pod (the pod CIDR announced
  with exportPodCIDR), the ratio of the two.

  benchmarks/bgp/run [--quick] [--inventory PATH] [--json]

Needs the lab up (make lab-up); it runs install.yml with the shared example documents (and exportPodCIDR, BFD,
datacenter timers) and at the end install.yml with the lab's own inventory again (no BGP).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
EXAMPLES = os.path.join(REPO, "tests", "fixtures", "bgp")      # ../shared/examples/ as written
ROUTER_NS = "kln-router1"
NEW = "192.168.10.201"
CLIENT = r"""
import json, socket, struct, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, errors, kinds, t0 = 0, 0, {}, time.time()
while time.time() - t0 < seconds:
    s = socket.socket()
    s.settimeout(2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with RST: no TIME_WAIT pile-up
    try:
        s.connect((host, port))
        s.recv(200)
        n += 1
    except OSError as e:
        errors += 1
        kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
    finally:
        s.close()
print(json.dumps({"rate": n / (time.time() - t0), "errors": errors, "kinds": kinds, "n": n}))
"""
POLL = r"""
import json, subprocess, sys, time
prefix, gone, deadline = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
while time.time() < deadline:
    out = subprocess.run(["ip", "-j", "route", "show", prefix], capture_output=True, text=True).stdout
    hops = [h.get("gateway") for r in json.loads(out or "[]") for h in (r.get("nexthops") or [r])]
    if gone not in hops:
        print(json.dumps({"t": time.time(), "hops": hops}))
        sys.exit(0)
    time.sleep(0.005)
print(json.dumps({"t": None}))
"""


def doc(name):
    import yaml
    with open(os.path.join(EXAMPLES, name)) as f:
        return yaml.safe_load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", default="/var/lib/kldload-netstack/lab/inventory.yml")
    ap.add_argument("--quick", action="store_true", help="1 s per rate sample, one round")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from conftest import Lab, run_playbook
    from pathlib import Path
    lab = Lab(Path(a.inventory))
    nodes = lab.hosts()
    pol = doc("bgp-peering-policy.yaml")
    vr = pol["spec"]["virtualRouters"][0]
    vr["exportPodCIDR"] = True
    for n in vr["neighbors"]:
        n.update(keepAliveTimeSeconds=3, holdTimeSeconds=9, connectRetryTimeSeconds=5)
    wl = lab.vars["netstack_workloads"] + [{"namespace": "default", "name": "my-app-%s" % n, "node": n,
                                            "labels": {"app": "my-app"}, "ports": [{"name": "http", "port": 8080}]}
                                           for n in nodes]
    v = {"netstack_bgp_peering_policies": [pol], "netstack_lb_ip_pools": [doc("lb-ip-pool.yaml")],
         "netstack_services": lab.vars["netstack_services"] + [doc("service-loadbalancer.yaml")],
         "netstack_workloads": wl, "netstack_bgp_bfd": True,
         # a LAN client reaching a pod directly (exportPodCIDR) needs the pod's replies not masqueraded
         "netstack_masquerade": False}
    tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(v, tmp)
    tmp.close()
    out = {}
    try:
        run_playbook("playbooks/install.yml", "-e", "@" + tmp.name, inventory=Path(a.inventory))
        ip = json.loads(lab.sh("cp1", "cat /etc/kldload-netstack/lbipam.json").stdout)["assignments"]["default/my-app"][0]

        def routes():
            return json.loads(lab.sh("router1", "vtysh -c 'show ip route bgp json'").stdout or "{}")
        deadline = time.time() + 30
        while len((routes().get("%s/32" % ip) or [{}])[0].get("nexthops", [])) < len(nodes) and time.time() < deadline:
            time.sleep(0.2)
        base = ["%s/32" % ip, "{{ netstack_pod_cidr }}"]

        def frr_all(announce):
            args = {"asn": 65001, "router_id": "{{ netstack_underlay_ip }}", "underlay_interface": "eth0",
                    "announce": announce, "bfd_interval": 100,
                    "neighbors": [{"address": "192.168.1.1", "asn": 65000, "bfd": True, "keepalive": 3, "hold": 9,
                                   "connect_retry": 5}]}
            env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"))
            t0 = time.time()
            p = subprocess.run([os.path.join(REPO, ".venv", "bin", "ansible"), "kube_nodes", "-i", a.inventory,
                                "-m", "kldload.netstack.frr_bgp", "-a", json.dumps(args)], capture_output=True,
                               text=True, env=env, check=False)
            if p.returncode:
                raise SystemExit("frr_bgp failed: %s" % p.stdout[-2000:])
            return t0, time.time()

        def wait_rib(pred, timeout=30):
            end = time.time() + timeout
            while time.time() < end:
                if pred(routes()):
                    return time.time()
                time.sleep(0.05)
            return None
        # announce and withdraw (the node's own args, plus one address)
        t0, t1 = frr_all(base + ["%s/32" % NEW])
        t2 = wait_rib(lambda r: len((r.get("%s/32" % NEW) or [{}])[0].get("nexthops", [])) == len(nodes))
        out["announce_s"] = {"module_run": round(t1 - t0, 2), "applied_to_rib": round(t2 - t1, 2) if t2 else None}
        t0, t1 = frr_all(base)
        t2 = wait_rib(lambda r: "%s/32" % NEW not in r)
        out["withdraw_s"] = {"module_run": round(t1 - t0, 2), "applied_to_rib": round(t2 - t1, 2) if t2 else None}
        # put the role's own configuration back (BFD on both neighbours as the play made it)
        run_playbook("playbooks/install.yml", "-e", "@" + tmp.name, inventory=Path(a.inventory))
        time.sleep(3)
        # BFD failover: kill worker2's FRR, watch router1's FIB for the service address
        gone = lab.hostvars[nodes[-1]]["netstack_underlay_ip"]
        poll = subprocess.Popen(["ip", "netns", "exec", ROUTER_NS, "python3", "-c", POLL, ip, gone, "20"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        t_kill = float(lab.sh(nodes[-1], "date +%s.%N; systemctl kill -s SIGKILL frr.service").stdout.split()[0])
        res = json.loads(poll.communicate(timeout=30)[0])
        out["bfd_failover_s"] = round(res["t"] - t_kill, 3) if res.get("t") else None
        lab.sh(nodes[-1], "for i in 1 2 3 4 5; do systemctl reset-failed frr.service; systemctl start frr.service && exit 0; "
                          "sleep 1; done; exit 1")
        wait_rib(lambda r: len((r.get("%s/32" % ip) or [{}])[0].get("nexthops", [])) == len(nodes), 60)
        # new connections per second
        pod = [l for l in json.loads(lab.sh(nodes[1], "netstack endpoint list --json").stdout)
               if l.get("name") == "my-app-%s" % nodes[1]][0]["ips"][0].split("/")[0]
        secs = 1.0 if a.quick else 2.0
        edge, direct, errs = [], [], {}
        for _i in range(1 if a.quick else 3):
            for target, bucket in (((ip, 80), edge), ((pod, 8080), direct)):
                p = subprocess.run(["ip", "netns", "exec", ROUTER_NS, "python3", "-c", CLIENT, target[0],
                                    str(target[1]), str(secs)], capture_output=True, text=True, check=True)
                r = json.loads(p.stdout)
                errs.setdefault(target[1], []).append((r["errors"], r["n"], r["kinds"]))
                bucket.append(r["rate"])
        if not statistics.median(direct):
            raise SystemExit("no connection straight to the pod %s: %s" % (pod, errs))
        out["conn_per_s"] = {"edge_lb_ip": round(statistics.median(edge)), "direct_to_pod": round(statistics.median(direct)),
                             "ratio": round(statistics.median(edge) / statistics.median(direct), 3),
                             "errors": {"edge": list(errs.get(80, [])), "direct": list(errs.get(8080, []))}}
    finally:
        run_playbook("playbooks/install.yml", inventory=Path(a.inventory), check=False)
        os.unlink(tmp.name)
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print("%-52s %s" % ("announce: frr_bgp on 3 nodes (ansible) / applied -> RIB, 3 next hops",
                        "%s s / %s s" % (out["announce_s"]["module_run"], out["announce_s"]["applied_to_rib"])))
    print("%-52s %s" % ("withdraw: frr_bgp on 3 nodes (ansible) / applied -> gone from RIB",
                        "%s s / %s s" % (out["withdraw_s"]["module_run"], out["withdraw_s"]["applied_to_rib"])))
    print("%-52s %s s" % ("BFD failover (FRR killed -> next hop gone from FIB)", out["bfd_failover_s"]))
    c = out["conn_per_s"]
    print("%-52s %s / %s conn/s, ratio %s" % ("new TCP connections: edge (LB IP) / direct to a pod", c["edge_lb_ip"],
                                              c["direct_to_pod"], c["ratio"]))
    print("%-52s %s" % ("failed connections (errors, of, kinds) per sample", json.dumps(c["errors"])))


if __name__ == "__main__":
    main()
