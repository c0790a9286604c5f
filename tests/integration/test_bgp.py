"""BGP through FRR and north-south load balancing on the lab: the shared example documents as written (plus an
IPv6 neighbour), LoadBalancer IPs in router1's RIB with ECMP next hops, clients in router1's network namespace
reaching the services through the LB IP and NodePorts (nodeport object), Local policy, a service without backends,
FRR stopped on a node, exportPodCIDR, withdrawal, frr_bgp four times and its bad input. One install for most."""
import copy
import json
import subprocess
import time

import pytest
import yaml

from conftest import REPO, run_playbook, changed_tasks

EXAMPLES = REPO / "tests" / "fixtures" / "bgp"     # ../shared/examples/ as written (copied: CI clones the repository alone)
ROUTER_NS = "kln-router1"
CLIENT = r"""
import collections, json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names, peers, errors = collections.Counter(), collections.Counter(), collections.Counter()
t0 = time.time()
for i in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        words = s.recv(300).decode(errors="replace").split()
        names[words[0]] += 1
        peers[words[4].rsplit(":", 1)[0]] += 1
    except Exception as e:
        errors[type(e).__name__] += 1
    finally:
        s.close()
print(json.dumps({"backends": names, "seen_as": peers, "errors": errors, "seconds": time.time() - t0}))
"""


def _doc(name):
    return yaml.safe_load((EXAMPLES / name).read_text())


def _client(host, port, n=30):
    p = subprocess.run(["ip", "netns", "exec", ROUTER_NS, "python3", "-c", CLIENT, host, str(port), str(n)],
                       capture_output=True, text=True, timeout=120, check=True)
    return json.loads(p.stdout)


def _router(lab, cmd):
    return json.loads(lab.sh("router1", "vtysh -c %s" % json.dumps(cmd)).stdout or "{}")


def _bgp_routes(lab):
    """{prefix: sorted next hops} of router1's BGP routes (IPv4)."""
    return dict((p, sorted(nh["ip"] for nh in r[0]["nexthops"] if nh.get("active")))
                for p, r in _router(lab, "show ip route bgp json").items())


def _routes_if(lab, cond):
    r = _bgp_routes(lab)
    return r if cond(r) else None


def _wait(what, fn, timeout=20):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v or time.time() > deadline:
            return v
        time.sleep(0.2)


def _vars(lab, export_pod_cidr=False, services=None):
    pol = copy.deepcopy(_doc("bgp-peering-policy.yaml"))
    pol["spec"]["virtualRouters"][0]["neighbors"].append({"peerAddress": "fd00:192:168:1::1/128", "peerASN": 65000})
    pol["spec"]["virtualRouters"][0]["exportPodCIDR"] = export_pod_cidr
    pool = _doc("lb-ip-pool.yaml")
    app = _doc("service-loadbalancer.yaml")
    solo = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "solo", "labels": {"announce": "bgp"}},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "loadBalancerIP": "192.168.10.50",
                     "selector": {"app": "solo"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    empty = {"name": "empty", "type": "LoadBalancer", "labels": {"announce": "bgp"}, "port": 80,
             "selector": {"app": "nobody"}}
    nodes = lab.hosts()
    wl = lab.vars["netstack_workloads"] + [
        {"namespace": "default", "name": "my-app-%s" % n, "node": n, "labels": {"app": "my-app"},
         "ports": [{"name": "http", "port": 8080}]} for n in nodes] + [
        {"namespace": "default", "name": "solo", "node": "worker1", "labels": {"app": "solo"},
         "ports": [{"name": "http", "port": 8080}]}]
    svcs = services if services is not None else [app, solo, empty]
    return {"netstack_bgp_peering_policies": [pol], "netstack_lb_ip_pools": [pool], "netstack_bgp_bfd": True,
            "netstack_services": lab.vars["netstack_services"] + svcs, "netstack_workloads": wl}


def _write(tmp, data):
    path = tmp / ("vars-%d.json" % int(time.time() * 1000))
    path.write_text(json.dumps(data))
    return "@%s" % path


@pytest.fixture(scope="module")
def bgp(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bgp")
    run_playbook("playbooks/install.yml", "-e", _write(tmp, _vars(lab)))
    ipam = json.loads(lab.sh("cp1", "cat /etc/kldload-netstack/lbipam.json").stdout)
    return {"lab": lab, "tmp": tmp, "ips": dict((k, v[0]) for k, v in ipam["assignments"].items()),
            "node_ports": ipam["node_ports"]}


def test_sessions_established_on_both_sides_ipv4_and_ipv6(bgp):
    lab = bgp["lab"]
    summary = _router(lab, "show bgp summary json")
    want = [lab.hostvars[h]["netstack_underlay_ip"] for h in lab.hosts()]
    want6 = [lab.hostvars[h]["netstack_underlay_ip6"] for h in lab.hosts()]
    v4, v6 = summary["ipv4Unicast"]["peers"], summary["ipv6Unicast"]["peers"]
    assert all(v4[a]["state"] == "Established" for a in want), v4
    assert all(v6[a]["state"] == "Established" for a in want6), v6
    for h in lab.hosts():
        rows = json.loads(lab.sh(h, "netstack bgp peers --json").stdout)
        assert sorted((r["neighbor"], r["family"], r["state"]) for r in rows) == [
            ("192.168.1.1", "ipv4", "Established"), ("fd00:192:168:1::1", "ipv6", "Established")], rows


def test_lb_ips_in_the_router_rib_with_ecmp_and_local_policy(bgp):
    lab, ips = bgp["lab"], bgp["ips"]
    assert ips["default/solo"] == "192.168.10.50"                      # the requested one
    nodes = sorted(lab.hostvars[h]["netstack_underlay_ip"] for h in lab.hosts())
    routes = _wait("routes", lambda: _routes_if(lab, lambda r: len(r.get("%s/32" % ips["default/my-app"], [])) == 3))
    assert routes["%s/32" % ips["default/my-app"]] == nodes
    assert routes["%s/32" % ips["default/empty"]] == nodes
    assert routes["192.168.10.50/32"] == [lab.hostvars["worker1"]["netstack_underlay_ip"]]    # Local: its node only
    listed = lab.sh("worker2", "netstack lb list").stdout
    assert ips["default/my-app"] in listed and "external(cluster) default/my-app" in listed


def test_clients_reach_the_service_through_the_lb_ip_and_every_nodeport(bgp):
    lab, ips = bgp["lab"], bgp["ips"]
    r = _client(ips["default/my-app"], 80, 60)
    assert not r["errors"] and len(r["backends"]) == 3, r               # spread over the three pods
    assert set(r["seen_as"]) <= set(lab.hostvars[h]["netstack_underlay_ip"] for h in lab.hosts()), r   # Cluster: SNAT
    port = bgp["node_ports"]["default/my-app/80/tcp"]
    for h in lab.hosts():
        r = _client(lab.hostvars[h]["netstack_underlay_ip"], port, 20)
        assert not r["errors"] and len(r["backends"]) >= 2, (h, r)
    r = _client("192.168.10.50", 80, 10)
    assert r["backends"] == {"default/solo": 10} and r["seen_as"] == {"192.168.1.1": 10}, r   # Local: client's own address
    flows = lab.sh("worker1", "netstack lb flows").stdout
    assert "192.168.10.50:80" in flows


def test_a_service_without_backends_is_refused_at_once(bgp):
    ip = bgp["ips"]["default/empty"]
    r = _client(ip, 80, 5)
    assert r["errors"] == {"ConnectionRefusedError": 5} and r["seconds"] < 2, r    # ICMP port unreachable


def test_stopping_frr_on_a_node_moves_the_traffic(bgp):
    lab, ip = bgp["lab"], bgp["ips"]["default/my-app"]
    gone = lab.hostvars["worker2"]["netstack_underlay_ip"]
    lab.sh("worker2", "systemctl stop frr.service")
    try:
        t0 = time.time()
        moved = _wait("withdrawn", lambda: gone not in _bgp_routes(lab).get("%s/32" % ip, [gone]), timeout=15)
        took = time.time() - t0
        assert moved, _bgp_routes(lab)
        assert took < 3, took                                           # BFD (100 ms x 3), not the hold timer
        r = _client(ip, 80, 30)
        others = set(lab.hostvars[h]["netstack_underlay_ip"] for h in ("cp1", "worker1"))
        assert not r["errors"] and set(r["seen_as"]) <= others, r
    finally:
        lab.sh("worker2", "systemctl start frr.service")
    assert _wait("back", lambda: gone in _bgp_routes(lab).get("%s/32" % ip, []), timeout=30)


def _args(lab, host, ips, extra=()):
    return {"asn": 65001, "router_id": lab.hostvars[host]["netstack_underlay_ip"], "underlay_interface": "eth0",
            "neighbors": [{"address": "192.168.1.1", "asn": 65000, "bfd": True},
                          {"address": "fd00:192:168:1::1", "asn": 65000, "bfd": True}],
            "announce": sorted(["%s/32" % ips["default/my-app"], "%s/32" % ips["default/empty"]] + list(extra)),
            "bfd_interval": 100}


def test_frr_bgp_four_times_and_bad_input_leaves_frr_untouched(bgp):
    lab, ips = bgp["lab"], bgp["ips"]
    host = "worker2"
    args = _args(lab, host, ips, extra=["192.168.10.200/32"])
    first, applied, _again, _recheck = lab.four_times(host, "kldload.netstack.frr_bgp", args)
    assert any("network 192.168.10.200/32" in x for x in first["added"]), first
    assert _wait("announced", lambda: "192.168.10.200/32" in _bgp_routes(lab))
    before = lab.sh(host, "vtysh -c 'show running-config'").stdout
    bad = [
        (dict(args, asn=0), "asn: 0 is not an AS number"),
        (dict(args, router_id="fd00::5"), "router_id"),
        (dict(args, neighbors=[{"address": "10.99.0.1", "asn": 65000}]), "is outside the underlay"),
        (dict(args, neighbors=[{"address": "192.168.1.1", "asn": 65000, "password": "new\nline"}]), "password"),
        (dict(args, neighbors=[{"address": "192.168.1.1", "asn": 65000, "password": "qu'ote"}]), "password"),
    ]
    for a, msg in bad:
        res = lab.module(host, "kldload.netstack.frr_bgp", a, expect_fail=True)
        assert msg in res["msg"], res
        assert "qu'ote" not in json.dumps(res) and "new\nline" not in json.dumps(res)
    assert lab.sh(host, "vtysh -c 'show running-config'").stdout == before
    assert lab.sh(host, "stat -c %a:%U /etc/frr/frr.conf").stdout.strip() == "640:frr"


def test_export_pod_cidr_and_a_deleted_service_is_withdrawn(bgp):
    lab, ips = bgp["lab"], bgp["ips"]
    v = _vars(lab, export_pod_cidr=True)
    v["netstack_services"] = [s for s in v["netstack_services"] if (s.get("metadata") or {}).get("name") != "my-app"]
    proc = run_playbook("playbooks/install.yml", "-e", _write(bgp["tmp"], v))
    t_end = time.time()
    gone = _wait("withdrawn", lambda: "%s/32" % ips["default/my-app"] not in _bgp_routes(lab), timeout=10)
    assert gone, "%s still in the router's RIB 10 s after the play" % ips["default/my-app"]
    assert time.time() - t_end < 10
    cidrs = [lab.hostvars[h]["netstack_pod_cidr"] for h in lab.hosts()]
    routes = _wait("pod CIDRs", lambda: _routes_if(lab, lambda r: all(c in r for c in cidrs)), 10)
    for h in lab.hosts():
        assert routes[lab.hostvars[h]["netstack_pod_cidr"]] == [lab.hostvars[h]["netstack_underlay_ip"]], routes
    # nothing changed the second time, and verify is quiet
    again = run_playbook("playbooks/install.yml", "-e", _write(bgp["tmp"], v))
    assert _quiet(again), changed_tasks(again)
    ver = run_playbook("playbooks/verify.yml", "-e", _write(bgp["tmp"], v), "-e", "dataplane_verify_live=false")
    assert "PASS BGP: 2 sessions Established" in ver.stdout
    assert _quiet(ver), changed_tasks(ver)
    assert proc.returncode == 0


def _quiet(proc):
    lines = [ln for ln in proc.stdout.split("PLAY RECAP")[-1].splitlines() if "ok=" in ln]
    return lines and all("changed=0 " in ln for ln in lines)


@pytest.mark.parametrize("case, message", [
    ("same-ip", "is requested by default/solo too"),
    ("pool-overlap", "overlaps the pod CIDR"),
    ("node-port", "is outside the NodePort range"),
])
def test_bad_lb_input_is_refused_before_any_node_is_touched(bgp, case, message):
    lab = bgp["lab"]
    v = _vars(lab)
    if case == "same-ip":
        v["netstack_services"].append({"name": "twin", "type": "LoadBalancer", "labels": {"announce": "bgp"}, "port": 81,
                                       "loadBalancerIP": "192.168.10.50", "selector": {"app": "solo"}})
    elif case == "pool-overlap":
        v["netstack_lb_ip_pools"].append({"name": "pods", "cidrs": [{"cidr": "10.244.11.128/25"}]})
    else:
        v["netstack_services"].append({"name": "np", "type": "NodePort", "port": 82, "nodePort": 29000,
                                       "selector": {"app": "solo"}})
    before = dict((h, lab.sh(h, "vtysh -c 'show running-config'; netstack lb list").stdout) for h in lab.hosts())
    proc = run_playbook("playbooks/install.yml", "-e", _write(bgp["tmp"], v), check=False)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-3000:]
    assert "changed=0" in proc.stdout.split("PLAY RECAP")[-1]
    assert all(lab.sh(h, "vtysh -c 'show running-config'; netstack lb list").stdout == before[h] for h in lab.hosts())
