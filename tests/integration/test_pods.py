"""Pods on the lab: the CNI chain, workloads made as a runtime makes them, services that select them,
and pod traffic across nodes in both routing modes."""
import json
import re
import shlex
import subprocess

import pytest

from conftest import REPO, changed_tasks, run_playbook

PROBE = (REPO / "roles" / "dataplane" / "files" / "verify_probe.py").read_text()
PROBE_PATH = "/run/netstack-test/verify_probe.py"


def _recap(proc):
    return {h: int(c) for h, c in re.findall(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)", proc.stdout, re.M)}


def _endpoints(lab, host):
    return json.loads(lab.sh(host, "netstack endpoint list --json").stdout)


def _all_endpoints(lab):
    return {h: _endpoints(lab, h) for h in lab.hosts()}


def _pods(lab):
    """{name: {host, ip, netns}} of the declared workloads, from the endpoint records on their nodes."""
    out = {}
    for host, eps in _all_endpoints(lab).items():
        for ep in eps:
            out[ep["name"]] = {"host": host, "ip": ep["ips"][0].split("/")[0], "netns": ep["netns"], "ep": ep}
    return out


def _in_pod(lab, pod, cmd, check=True, timeout=120):
    return lab.sh(pod["host"], "nsenter --net=%s %s" % (shlex.quote(pod["netns"]), cmd), check=check, timeout=timeout)


def _probe(lab, host, target, port, proto="tcp", count=3, pod=None):
    lab.put(host, PROBE_PATH, PROBE, mode="0755")
    cmd = "python3 %s probe --vip %s --port %d --proto %s --count %d" % (PROBE_PATH, target, port, proto, count)
    proc = _in_pod(lab, pod, cmd) if pod else lab.sh(host, cmd)
    return json.loads(proc.stdout)


FRAG_TABLE = "netstack_test_frags"


def _underlay_fragments(lab, host, action="count"):
    """IP fragments arriving on the node's underlay, counted by an nftables rule before conntrack
    reassembles them (priority -450): add, count, delete."""
    dev = lab.hostvars[host]["netstack_underlay_interface"]
    if action == "add":
        lab.sh(host, "nft -f - <<'EOF'\ntable ip %s {\n chain pre {\n  type filter hook prerouting priority -450;\n"
                     "  iifname \"%s\" ip frag-off & 0x3fff != 0 counter\n }\n}\nEOF" % (FRAG_TABLE, dev))
        return 0
    if action == "delete":
        lab.sh(host, "nft delete table ip %s" % FRAG_TABLE, check=False)
        return 0
    out = json.loads(lab.sh(host, "nft -j list table ip %s" % FRAG_TABLE).stdout)
    return sum(e["counter"]["packets"] for r in out["nftables"] if "rule" in r
               for e in r["rule"]["expr"] if "counter" in e)


FWD_TABLE = "netstack_test_fwd"


def _forwarded(lab, host, action="count"):
    """Packets the node's IP stack forwards from a pod's interface and to one (ptp's host interfaces are
    veth*), counted at the FORWARD hook: add, count ({"from_pod": n, "to_pod": n}), delete."""
    if action == "add":
        lab.sh(host, "nft -f - <<'EOF'\ntable ip %s {\n chain c {\n  type filter hook forward priority -300;\n"
                     "  iifname \"veth*\" counter comment \"from_pod\"\n  oifname \"veth*\" counter comment \"to_pod\"\n"
                     " }\n}\nEOF" % FWD_TABLE)
        return None
    if action == "delete":
        lab.sh(host, "nft delete table ip %s" % FWD_TABLE, check=False)
        return None
    out = json.loads(lab.sh(host, "nft -j list table ip %s" % FWD_TABLE).stdout)
    return {r["rule"]["comment"]: [e["counter"]["packets"] for e in r["rule"]["expr"] if "counter" in e][0]
            for r in out["nftables"] if "rule" in r}


def _transfer(lab, a, b, size="8M"):
    """An iperf3 transfer from pod a to pod b; the bytes b received."""
    _in_pod(lab, b, "iperf3 -s -1 -D -p 5201")
    out = _in_pod(lab, a, "iperf3 -c %s -p 5201 -n %s -J" % (b["ip"], size), timeout=120)
    return json.loads(out.stdout)["end"]["sum_received"]["bytes"]


@pytest.fixture(scope="module")
def installed(lab):
    run_playbook("playbooks/install.yml")
    return lab


def test_every_workload_has_an_endpoint_on_its_node(installed):
    lab = installed
    inv = lab.vars
    declared = {(w["namespace"], w["name"]): w for w in inv["netstack_workloads"]}
    pods = _pods(lab)
    assert sorted(("demo", n) for n in pods) == sorted(declared)
    for name, pod in pods.items():
        w = declared[("demo", name)]
        assert pod["host"] == w["node"]
        cidr = lab.hostvars[pod["host"]]["netstack_pod_cidr"]
        assert pod["ip"].rsplit(".", 1)[0] == cidr.split("/")[0].rsplit(".", 1)[0]
        assert pod["ep"]["labels"]["app"] == "web" and pod["ep"]["state"] == "ready"
        assert {p["name"] for p in pod["ep"]["ports"]} == {"http", "dns"}
        # the host side of the pod's interface exists, and the table form names the pod
        assert lab.sh(pod["host"], "ip link show %s" % pod["ep"]["host_interface"], check=False).returncode == 0
        assert "demo/%s" % name in lab.sh(pod["host"], "netstack endpoint list").stdout


def _cross_node_checks(lab):
    pods = _pods(lab)
    names = sorted(pods)
    for src_name in names:
        src = pods[src_name]
        for dst_name in names:
            if dst_name == src_name:
                continue
            dst = pods[dst_name]
            # pod to pod, TCP and UDP, across nodes
            for port, proto in ((8080, "tcp"), (5353, "udp")):
                r = _probe(lab, src["host"], dst["ip"], port, proto, pod=src)
                assert not r["errors"] and r["clients"] == [src["ip"]], (src_name, dst_name, proto, r)
            # node to pod (from the source pod's node), pod to node (the destination's underlay address, sshd)
            r = _probe(lab, src["host"], dst["ip"], 8080)
            assert not r["errors"], (src_name, "node ->", dst_name, r)
            under = lab.hostvars[dst["host"]]["netstack_underlay_ip"]
            out = _in_pod(lab, src, "python3 -c 'import socket; s=socket.create_connection((\"%s\", 22), 3); "
                                    "print(s.recv(64).decode().strip())'" % under)
            assert out.stdout.startswith("SSH-"), out.stdout
        # pod to service through the socket LB: every selected pod answers
        r = _probe(lab, src["host"], "10.96.0.20", 80, "tcp", count=30, pod=src)
        assert not r["errors"] and sorted(b.split(":")[0] for b in r["backends"]) == sorted(
            p["ip"] for p in pods.values()), r
        r = _probe(lab, src["host"], "10.96.0.20", 53, "udp", count=30, pod=src)
        assert not r["errors"] and {b.split(":")[1] for b in r["backends"]} == {"5353"}, r


def _bulk_and_big_datagrams(lab, mode):
    """A full-size TCP transfer and an 8000-byte UDP datagram between pods on different nodes. No
    fragment crosses the underlay for the transfer (the pods' MTU leaves room for the tunnel), nor,
    in tunnel mode, for the datagram (each fragment the pod made is encapsulated whole)."""
    pods = _pods(lab)
    a, b = [pods[n] for n in sorted(pods)[:2]]
    for h in lab.hosts():
        _underlay_fragments(lab, h, "add")
        _forwarded(lab, h, "add")
    try:
        assert _transfer(lab, a, b) >= 8 * 1024 * 1024
        frags = {h: _underlay_fragments(lab, h) for h in lab.hosts()}
        assert not any(frags.values()), "fragments on the underlay during a TCP transfer: %s" % frags
        # BPF host routing (the default): the pods' packets never pass the nodes' IP forwarding -
        # except, in tunnel mode, after decapsulation on the receiving node
        fwd = {h: _forwarded(lab, h) for h in (a["host"], b["host"])}
        assert fwd[a["host"]]["from_pod"] == 0 and fwd[b["host"]]["from_pod"] == 0, fwd
        if mode == "native":
            assert fwd[a["host"]]["to_pod"] == 0 and fwd[b["host"]]["to_pod"] == 0, fwd
        else:
            assert fwd[b["host"]]["to_pod"] > 0, fwd
        big = _in_pod(lab, a, "python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                              "s.settimeout(3); s.sendto(b\"x\" * 8000, (\"%s\", 5353)); "
                              "print(s.recvfrom(65535)[0].decode())'" % b["ip"])
        head = big.stdout.split("\n")[0].split()
        assert head[0] == "demo/%s" % b["ep"]["name"] and head[-1] == "8000", big.stdout[:200]
        frags = {h: _underlay_fragments(lab, h) for h in lab.hosts()}
        if mode == "tunnel":
            assert not any(frags.values()), "fragments on the underlay for a large datagram: %s" % frags
    finally:
        for h in lab.hosts():
            _underlay_fragments(lab, h, "delete")
            _forwarded(lab, h, "delete")


@pytest.mark.parametrize("mode", ["tunnel", pytest.param("native", marks=pytest.mark.extended)])
def test_pods_reach_pods_nodes_and_services_across_nodes(installed, mode):
    lab = installed
    proc = run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=%s" % mode)
    try:
        vx = lab.sh(lab.hosts()[0], "ip -d link show kln_vxlan", check=False)
        assert (vx.returncode == 0) == (mode == "tunnel"), vx.stdout
        _cross_node_checks(lab)
        _bulk_and_big_datagrams(lab, mode)
        again = run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=%s" % mode)
        assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
    finally:
        if mode != "tunnel":
            run_playbook("playbooks/install.yml")
    assert proc.returncode == 0


@pytest.mark.extended
def test_legacy_host_routing_forwards_through_the_stack(installed):
    """netstack_host_routing=legacy, four times (check, apply, apply, check): the host and lxc objects and
    the pods' links go, pods still reach pods across nodes, now through the nodes' IP forwarding; back
    to bpf, existing pods get the lxc program again and the stack forwards nothing of theirs."""
    lab = installed
    legacy = ("-e", "netstack_routing_mode=native", "-e", "netstack_host_routing=legacy")
    host = lab.hosts()[0]
    under = lab.hostvars[host]["netstack_underlay_interface"]
    try:
        run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=native")
        pods = _pods(lab)           # made again for native mode's MTU; host routing does not remake them
        a, b = [pods[n] for n in sorted(pods)[:2]]
        check = run_playbook("playbooks/install.yml", *legacy, "--check")
        assert any(c > 0 for c in _recap(check).values())
        assert "kln_from_netdev" in lab.sh(host, "bpftool net show dev %s" % under).stdout   # check changed nothing
        run_playbook("playbooks/install.yml", *legacy)
        assert "kln_from_netdev" not in lab.sh(host, "bpftool net show dev %s" % under).stdout
        assert "kln_from_container" not in lab.sh(a["host"], "bpftool net show dev %s" % a["ep"]["host_interface"]).stdout
        # the edge LB and the pods' policy stay: only BPF host routing (host, lxc) goes
        assert lab.sh(host, "ls /sys/fs/bpf/kldload-netstack").stdout.split() == ["globals", "nodeport", "policy", "sock_lb"]
        again = run_playbook("playbooks/install.yml", *legacy)
        assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
        check = run_playbook("playbooks/install.yml", *legacy, "--check")
        assert all(c == 0 for c in _recap(check).values()), changed_tasks(check)
        for h in (a["host"], b["host"]):
            _forwarded(lab, h, "add")
        try:
            assert _transfer(lab, a, b, "2M") >= 2 * 1024 * 1024
            fwd = {h: _forwarded(lab, h) for h in (a["host"], b["host"])}
            assert fwd[a["host"]]["from_pod"] > 0 and fwd[b["host"]]["to_pod"] > 0, fwd
        finally:
            for h in (a["host"], b["host"]):
                _forwarded(lab, h, "delete")
        run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=native")
        assert "kln_from_container" in lab.sh(a["host"], "bpftool net show dev %s" % a["ep"]["host_interface"]).stdout
        for h in (a["host"], b["host"]):
            _forwarded(lab, h, "add")
        try:
            assert _transfer(lab, a, b, "2M") >= 2 * 1024 * 1024
            fwd = {h: _forwarded(lab, h) for h in (a["host"], b["host"])}
            assert not any(v for f in fwd.values() for v in f.values()), fwd
        finally:
            for h in (a["host"], b["host"]):
                _forwarded(lab, h, "delete")
    finally:
        run_playbook("playbooks/install.yml")


def test_workloads_added_changed_removed(installed):
    lab = installed
    inv = lab.vars
    host = lab.hosts("kube_workers")[0]
    extra = {"namespace": "demo", "name": "extra", "node": host, "labels": {"app": "extra"},
             "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    base = inv["netstack_workloads"]
    before = {p: v["ep"]["container_id"] for p, v in _pods(lab).items()}

    run_playbook("playbooks/install.yml", "-e", json.dumps({"netstack_workloads": base + [extra]}))
    pods = _pods(lab)
    assert pods["extra"]["host"] == host
    assert lab.sh(host, "test -e /var/lib/cni/networks/kldload-netstack/%s" % pods["extra"]["ip"]).returncode == 0
    assert {p: pods[p]["ep"]["container_id"] for p in before} == before    # the others were not touched
    assert not _probe(lab, lab.hosts()[0], pods["extra"]["ip"], 8080)["errors"]

    changed = dict(extra, labels={"app": "extra", "version": "2"})
    run_playbook("playbooks/install.yml", "-e", json.dumps({"netstack_workloads": base + [changed]}))
    again = _pods(lab)
    assert again["extra"]["ep"]["container_id"] != pods["extra"]["ep"]["container_id"]
    assert again["extra"]["ep"]["labels"]["version"] == "2"

    run_playbook("playbooks/install.yml")
    gone = _pods(lab)
    assert "extra" not in gone
    ip = again["extra"]["ip"]
    # no lease, no netns, no host interface left for it
    assert lab.sh(host, "test -e /var/lib/cni/networks/kldload-netstack/%s" % ip, check=False).returncode != 0
    assert lab.sh(host, "test -e %s" % shlex.quote(again["extra"]["netns"]), check=False).returncode != 0
    assert lab.sh(host, "ip link show %s" % again["extra"]["ep"]["host_interface"], check=False).returncode != 0


BAD = [
    ({"netstack_workloads": "DUP"}, "is already netstack_workloads"),
    ({"netstack_workloads": "SAMEIP"}, "10.244.11.77"),
    ({"netstack_workloads": "NONODE"}, "nosuchnode"),
    ({"netstack_workloads": "BADLABEL"}, "labels"),
    ({"netstack_routing_mode": "bridged"}, "routing"),
    ({"netstack_pod_cidr": "10.244.1.0/24"}, "overlap"),
    ({"netstack_services": "NONAMEDPORT"}, "targetPort"),
]


def _bad_vars(lab, spec):
    inv = lab.vars
    base = inv["netstack_workloads"]
    w0 = dict(base[0])
    worker = lab.hosts("kube_workers")[0]
    out = dict(spec)
    if spec.get("netstack_workloads") == "DUP":
        out["netstack_workloads"] = base + [dict(w0, node=worker)]
    elif spec.get("netstack_workloads") == "SAMEIP":
        out["netstack_workloads"] = base + [
            {"namespace": "demo", "name": "a", "node": worker, "ip": "10.244.11.77", "labels": {}, "ports": []},
            {"namespace": "demo", "name": "b", "node": worker, "ip": "10.244.11.77", "labels": {}, "ports": []}]
    elif spec.get("netstack_workloads") == "NONODE":
        out["netstack_workloads"] = base + [dict(w0, name="lost", node="nosuchnode")]
    elif spec.get("netstack_workloads") == "BADLABEL":
        out["netstack_workloads"] = base + [dict(w0, name="badlabel", labels={"app": "-not valid-"})]
    elif spec.get("netstack_services") == "NONAMEDPORT":
        out["netstack_services"] = inv["netstack_services"] + [
            {"name": "nope", "namespace": "demo", "vip": "10.96.0.30", "port": 80, "protocol": "TCP",
             "selector": {"app": "web"}, "targetPort": "grpc"}]
    return out


@pytest.mark.parametrize("spec,message", BAD, ids=[m for _s, m in BAD])
def test_bad_input_is_an_error_and_changes_nothing(installed, spec, message):
    lab = installed
    before = {h: (lab.sh(h, "netstack endpoint list --json").stdout,
                  lab.sh(h, "sha256sum /etc/kldload-netstack/dataplane.json").stdout,
                  lab.sh(h, "ip route show proto 220; ip -d link show kln_vxlan 2>/dev/null | head -1").stdout)
              for h in lab.hosts()}
    proc = run_playbook("playbooks/install.yml", "-e", json.dumps(_bad_vars(lab, spec)), check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert message in proc.stdout, proc.stdout[-4000:]
    after = {h: (lab.sh(h, "netstack endpoint list --json").stdout,
                 lab.sh(h, "sha256sum /etc/kldload-netstack/dataplane.json").stdout,
                 lab.sh(h, "ip route show proto 220; ip -d link show kln_vxlan 2>/dev/null | head -1").stdout)
             for h in lab.hosts()}
    assert after == before


def test_verify_checks_workloads_and_is_quiet(installed):
    proc = run_playbook("playbooks/verify.yml")
    assert all(c == 0 for c in _recap(proc).values()), changed_tasks(proc)
    assert "web-" in proc.stdout


@pytest.mark.extended
def test_pod_network_benchmark_smoke(installed):
    """The benchmark's quick run: every case carries traffic in both modes and with WireGuard (BPF host routing
    only: legacy has its own test above; figures: docs/performance.md)."""
    proc = subprocess.run([str(REPO / "benchmarks" / "pod_network" / "run"), "--quick", "--host-routing", "bpf"],
                          capture_output=True,
                          text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in ("node-to-node (underlay)", "pod-to-pod tunnel", "pod-to-pod native", "pod-to-service tunnel",
                 "pod-to-pod wireguard", "first handshake"):
        assert case in proc.stdout, proc.stdout
    print(proc.stdout)
