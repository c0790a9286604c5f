"""The socket load balancer on real lab nodes: node_dataplane, bpf_program and lb_services, each run
four times (check, apply, apply again, check again), real clients in a cgroup, bad input, a failing
object, an upgrade without a gap, removal, and a node reboot.

A second instance (``sock_lb_test``) is loaded under its own pin root and attached to a private cgroup
of a node, so the node's own dataplane (installed by install.yml, which owns /sys/fs/bpf/kldload-netstack)
is not disturbed. The test servers and clients are the verify role's test tool (verify_probe.py).
"""
import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_playbook

OBJ = "/run/netstack-test-obj/sock_lb.o"            # the build's object and manifest, copied by _prepare
NAME = "sock_lb_test"
PIN = "/sys/fs/bpf/kldload-netstack-test"
MAPDIR = "%s/globals" % PIN
PROBE_SRC = REPO / "roles" / "dataplane" / "files" / "verify_probe.py"
PROBE = "/usr/bin/python3 /run/netstack-test-probe.py"
CG_NAME = "netstack-test-lb"
STATE = "/run/netstack-test-lb/services.json"
PORT = 18081
VIP = "10.96.254.1"


def _scp(lab, host, src, dst):
    addr = lab.hostvars[host]["ansible_host"]
    subprocess.run(["scp", "-q", "-i", lab.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR", str(src), "root@%s:%s" % (addr, dst)], check=True)


@pytest.fixture(scope="module")
def node(lab):
    """A worker with install.yml applied, a private cgroup and a test server on PORT."""
    run_playbook("playbooks/install.yml")
    host = lab.hosts("kube_workers")[0]
    cg = lab.sh(host, "findmnt -n -o TARGET -t cgroup2 | head -1").stdout.strip() + "/" + CG_NAME
    _prepare(lab, lab.hosts("kube_nodes"), cg)
    yield host, cg
    lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"})
    lab.sh(host, "rmdir %s; rm -rf /run/netstack-test-lb" % cg, check=False)
    for h in lab.hosts("kube_nodes"):
        lab.sh(h, "systemctl stop netstack-test-echo", check=False)


def _prepare(lab, hosts, cg):
    """The private cgroup on the test node, the object there, and a test server on PORT on each of hosts
    (again after a reboot: /run is empty then)."""
    test_host = lab.hosts("kube_workers")[0]
    lab.sh(test_host, "mkdir -p %s /run/netstack-test-obj" % cg)
    for f in ("sock_lb.o", "sock_lb.manifest.json"):
        _scp(lab, test_host, REPO / "bpf" / "build" / f, "/run/netstack-test-obj/" + f)
    for h in hosts:  # the test servers: backends on every node
        _scp(lab, h, PROBE_SRC, "/run/netstack-test-probe.py")
        lab.sh(h, "systemctl stop netstack-test-echo 2>/dev/null; systemd-run --unit netstack-test-echo --collect "
                  "-p RuntimeMaxSec=900 %s echo --tcp %d --udp %d --seconds 850" % (PROBE, PORT, PORT))


def _prog_args(cg, obj=OBJ, **extra):
    """The test instance: its IPv4 hooks on the test cgroup, where the object's manifest says."""
    args = {"name": NAME, "pin_path": PIN, "object": obj, "targets": {"cgroup": cg, "families": [4]},
            "maps": {"kln_lb4_svc": 64, "kln_lb4_backend": 16}}
    args.update(extra)
    return args


def _probe(lab, host, cg, vip, port, proto="tcp", count=10, source_port=0):
    """netstack probe run inside the test cgroup; returns its JSON."""
    cmd = ("sh -c 'echo $$ > %s/cgroup.procs && exec %s probe --vip %s --port %d --proto %s "
           "--count %d --timeout 1 --source-port %d'" % (cg, PROBE, vip, port, proto, count, source_port))
    return json.loads(lab.sh(host, cmd).stdout)


def _services(host_ips, weights=None, port=PORT):
    weights = weights or [1] * len(host_ips)
    return [{"name": "web", "namespace": "test", "vip": VIP, "port": 80,
             "backends": [{"ip": ip, "port": port, "weight": w} for ip, w in zip(host_ips, weights)]},
            {"name": "dns", "namespace": "test", "vip": VIP, "port": 53, "protocol": "udp", "algorithm": "maglev",
             "backends": [{"ip": ip, "port": port} for ip in host_ips]},
            {"name": "empty", "namespace": "test", "vip": "10.96.254.2", "port": 80}]


def _lb_args(services, **extra):
    args = {"services": services, "map_dir": MAPDIR, "state_file": STATE}
    args.update(extra)
    return args


def _ips(lab):
    return [lab.hostvars[h]["netstack_underlay_ip"] for h in lab.hosts("kube_nodes")]


def test_bpf_program_four_times(lab, node):
    host, cg = node
    lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"})
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpf_program", _prog_args(cg))
    assert any(a.startswith("%s: load programs" % NAME) for a in first["actions"])
    assert "create shared map kln_lb4_svc_v1 (64 entries)" in first["actions"]
    hooks = ["kln_connect4", "kln_getpeer4", "kln_recvmsg4", "kln_sendmsg4"]     # the manifest's IPv4 programs
    assert sorted(a["program"] for a in applied["attachments"]) == hooks
    assert applied["shared_maps"]["kln_lb4_svc_v1"]["max_entries"] == 64
    assert sorted(applied["maps"]) == ["kln_lb4_revnat", "kln_lb6_revnat"]        # private to the object
    assert again["actions"] == [] and again["diff"]["before"] == again["diff"]["after"]
    shown = lab.sh(host, "bpftool -j cgroup show %s" % cg).stdout
    assert sorted(p["name"] for p in json.loads(shown)) == hooks


ND = "/run/netstack-test-nd"


def test_node_dataplane_four_times_traffic_bad_input_and_removal(lab, node):
    """The module install.yml uses, on a second pin root and cgroup: objects, services and routes from one
    configuration, four times; real clients; bad input changes nothing; absent leaves nothing."""
    host, cg = node
    ips = _ips(lab)
    cg2 = cg + "-nd"
    lab.sh(host, "mkdir -p %s" % cg2)
    # a route of its own (the pod routes belong to the node's own configuration, its pods section)
    other = [h for h in lab.hosts() if h != host][0]
    routes = [{"dst": "10.99.0.0/24", "via": lab.hostvars[other]["netstack_underlay_ip"]}]
    args = {"pin_path": "/sys/fs/bpf/kldload-netstack-nd", "objects": [{"name": "sock_lb", "cgroup": cg2, "families": [4]}],
            "maps": {"kln_lb4_svc": 64}, "services": _services(ips), "state_file": ND + "/services.json",
            "config_path": ND + "/dataplane.json", "routes": routes, "restore_unit": False}   # the node's own stays
    lab.sh(host, "rm -rf %s %s" % (args["pin_path"], ND))       # what an interrupted earlier run may have left
    try:
        first, applied, again, recheck = lab.four_times(host, "kldload.netstack.node_dataplane", args)
        assert "sock_lb: load programs into /sys/fs/bpf/kldload-netstack-nd/sock_lb/progs_" in " ".join(first["actions"])
        assert [s["service"] for s in first["added"]] == ["%s:53/UDP" % VIP, "%s:80/TCP" % VIP, "10.96.254.2:80/TCP"]
        assert [r for r in first["routes"] if "10.99.0.0/24" in r] and first["unit"] == []
        assert '"kln_lb4_svc": 64' in first["diff"]["after"]
        assert "10.99.0.0/24 via %s" % routes[0]["via"] in lab.sh(host, "ip route show proto 220").stdout
        assert sorted(a["program"] for a in applied["objects"]["sock_lb"]["attachments"]) == [
            "kln_connect4", "kln_getpeer4", "kln_recvmsg4", "kln_sendmsg4"]
        assert json.loads(lab.sh(host, "cat %s/dataplane.json" % ND).stdout) == applied["config"]
        tcp = _probe(lab, host, cg2, VIP, 80, count=20)
        assert tcp["errors"] == {} and len(tcp["backends"]) == len(ips)
        # bad input: an error naming the field, nothing changed
        bad = dict(args, services=[dict(_services(ips)[0], backends=[{"ip": ips[0], "weight": 0}])])
        res = lab.module(host, "kldload.netstack.node_dataplane", bad, expect_fail=True)
        assert "services[0] (web).backends[0].weight: must be > 0" in res["msg"]
        res = lab.module(host, "kldload.netstack.node_dataplane", dict(args, maps={"kln_nope": 8}), expect_fail=True)
        assert "config.maps: kln_nope not a map of any object (sock_lb)" in res["msg"]
        res = lab.module(host, "kldload.netstack.node_dataplane", dict(args, routes=[{"dst": "10.1.0.0/33", "via": ips[0]}]),
                         expect_fail=True)
        assert "config.routes[0].dst" in res["msg"]
        assert lab.module(host, "kldload.netstack.node_dataplane", args, check=True)["changed"] is False
        absent = {"state": "absent", "pin_path": args["pin_path"], "state_file": args["state_file"],
                  "config_path": args["config_path"], "restore_unit": False}
        gone = lab.module(host, "kldload.netstack.node_dataplane", absent)
        assert gone["changed"] and sorted(gone["files_removed"]) == [ND + "/dataplane.json", ND + "/services.json"]
        assert lab.sh(host, "test -e %s" % args["pin_path"], check=False).returncode != 0
        assert lab.sh(host, "ls %s" % ND).stdout.split() == []
        assert "proto 220" not in lab.sh(host, "ip route").stdout           # the owned routes went with it
        assert "/usr/lib/kldload-netstack/netstack.pyz dataplane restore" in lab.sh(
            host, "cat /etc/systemd/system/netstack-dataplane.service").stdout  # the node's restore unit stayed
    finally:
        lab.sh(host, "netstack dataplane restore && rmdir %s" % cg2, check=False)   # the node's own dataplane back
    assert "proto 220" in lab.sh(host, "ip route").stdout


def test_lb_services_four_times_and_traffic(lab, node):
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    lab.module(host, "kldload.netstack.lb_services", _lb_args([]))
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))
    assert [s["service"] for s in first["added"]] == ["%s:53/UDP" % VIP, "%s:80/TCP" % VIP, "10.96.254.2:80/TCP"]
    assert "%s:80/TCP test/web backends" % VIP in first["diff"]["after"]
    assert [r["service"] for r in applied["table"]] == ["%s:53/UDP" % VIP, "%s:80/TCP" % VIP, "10.96.254.2:80/TCP"]
    assert again["stats"]["updates"] == 0 and recheck["added"] == []
    # real clients in the cgroup: every backend reached, the server sees the node's own address
    tcp = _probe(lab, host, cg, VIP, 80, count=30)
    assert tcp["errors"] == {} and len(tcp["backends"]) == len(ips) and tcp["peers"] == ["%s:80" % VIP]
    assert tcp["clients"] == [lab.hostvars[host]["netstack_underlay_ip"]]
    udp = _probe(lab, host, cg, VIP, 53, proto="udp", count=20)
    assert udp["errors"] == {} and udp["peers"] == ["%s:53" % VIP]
    # a service without backends refuses at once
    empty = _probe(lab, host, cg, "10.96.254.2", 80, count=3)
    assert empty["errors"] == {"Operation not permitted": 3} and empty["seconds"] < 1
    # outside the cgroup nothing is translated (no route to the VIP: fails fast, differently)
    out = json.loads(lab.sh(host, "%s probe --vip %s --port 80 --timeout 1" % (PROBE, VIP)).stdout)
    assert out["backends"] == {} and out["errors"]


def test_incremental_change_four_times_and_traffic(lab, node):
    """prune=false: one service changed and one removed by point lookups; the other left alone."""
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))       # full sync: builds the index
    lab.sh(host, "rm -f %s.journal" % STATE)
    web = dict(_services(ips)[0], backends=[{"ip": ips[0], "port": PORT, "weight": 1}])
    change = [web, {"vip": "10.96.254.2", "port": 80, "state": "absent"}]
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.lb_services",
                                                    _lb_args(change, prune=False))
    for res in (first, applied, again, recheck):
        assert res["stats"]["path"] == "incremental", res["stats"]
    assert first["changed"] is True
    assert [c["service"] for c in first["service_changes"]] == ["%s:80/TCP" % VIP]
    assert [r["service"] for r in first["removed"]] == ["10.96.254.2:80/TCP"]
    assert [r["service"] for r in applied["table"]] == ["%s:80/TCP" % VIP]          # only the listed services
    # what a client sees: web on one backend only, dns untouched, the removed VIP no longer answered by the LB
    tcp = _probe(lab, host, cg, VIP, 80, count=20)
    assert tcp["errors"] == {} and list(tcp["backends"]) == ["%s:%d" % (ips[0], PORT)]
    udp = _probe(lab, host, cg, VIP, 53, proto="udp", count=20)
    assert udp["errors"] == {} and len(udp["backends"]) == len(ips)
    gone = _probe(lab, host, cg, "10.96.254.2", 80, count=2)
    assert gone["backends"] == {} and "Operation not permitted" not in gone["errors"]
    # the journal holds the change; a full sync of the same table finds nothing to do
    assert len(lab.sh(host, "cat %s.journal" % STATE).stdout.splitlines()) == 2
    whole = [web, _services(ips)[1]]
    assert lab.module(host, "kldload.netstack.lb_services", _lb_args(whole), check=True)["changed"] is False
    # bad input on this path: an error naming the field, nothing written
    bad = [dict(web, backends=[{"ip": ips[0], "port": PORT, "weight": 0}])]
    res = lab.module(host, "kldload.netstack.lb_services", _lb_args(bad, prune=False), expect_fail=True)
    assert "services[0] (web).backends[0].weight: must be > 0" in res["msg"]
    assert lab.module(host, "kldload.netstack.lb_services", _lb_args(whole), check=True)["changed"] is False


def test_change_one_backend_and_maglev_stability(lab, node):
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))
    one = _probe(lab, host, cg, VIP, 53, proto="udp", count=40, source_port=32000)
    two = _probe(lab, host, cg, VIP, 53, proto="udp", count=40, source_port=32000)
    assert one["errors"] == {} and one["flows"] == two["flows"]
    services = _services(ips)
    services[1]["backends"] = services[1]["backends"][:-1]      # Maglev: drop the last backend
    services[0]["backends"][0]["weight"] = 3                     # web: change one weight
    res = lab.module(host, "kldload.netstack.lb_services", _lb_args(services), diff=True)
    changes = {c["service"]: c for c in res["service_changes"]}
    assert changes["%s:53/UDP" % VIP]["backends_removed"] == ["%s:%d" % (ips[-1], PORT)]
    assert changes["%s:80/TCP" % VIP]["weights_changed"] == ["%s:%d 1->3" % (ips[0], PORT)]
    after = _probe(lab, host, cg, VIP, 53, proto="udp", count=40, source_port=32000)
    removed = "%s:%d" % (ips[-1], PORT)
    moved = [k for k, v in one["flows"].items() if after["flows"].get(k) != v]
    assert moved and all(one["flows"][k] == removed for k in moved), (one["flows"], after["flows"])
    assert removed not in after["flows"].values()


@pytest.mark.parametrize("services, words", [
    ([{"name": "a", "vip": "10.96.254.9", "port": 80}, {"name": "b", "vip": "10.96.254.9", "port": 80}],
     ["services[4] (b): duplicate service 10.96.254.9:80/TCP", "services[3] (a) already declares it"]),
    ([{"name": "a", "vip": "10.96.254.300", "port": 80}], ["services[3] (a).vip", "not an IPv4 or IPv6 address"]),
    ([{"name": "a", "vip": "10.96.254.9", "port": 80, "backends": [{"ip": "10.1.1.1", "weight": 0}]}],
     ["backends[0].weight", "must be > 0"]),
    ([{"name": "a", "vip": "fd00::9", "port": 80, "backends": [{"ip": "10.1.1.1"}]}],
     ["backends[0].ip", "is IPv4 but the service's vip fd00::9 is IPv6"]),
    ([{"name": "s%d" % i, "vip": "10.96.253.%d" % i, "port": 80,
       "backends": [{"ip": "10.1.1.%d" % j} for j in range(1, 8)]} for i in range(1, 10)],
     ["kln_lb4_svc", "holds 64", "raise the map size"]),
    ([{"name": "a", "vip": "10.96.254.9", "port": 70000}], ["services", "port"]),
])
def test_bad_input_leaves_the_maps_untouched(lab, node, services, words):
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    good = _services(ips)
    lab.module(host, "kldload.netstack.lb_services", _lb_args(good))
    res = lab.module(host, "kldload.netstack.lb_services", _lb_args(good + services), expect_fail=True)
    for w in words:
        assert w in res["msg"], res["msg"]
    assert lab.module(host, "kldload.netstack.lb_services", _lb_args(good), check=True)["changed"] is False


def test_object_that_fails_verification(lab, node):
    host, cg = node
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bad.c"
        src.write_text('#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n'
                       'SEC("cgroup/connect4") int kln_connect4(struct bpf_sock_addr *ctx)\n'
                       '{ int *p = (int *)(long)ctx->user_ip4; return *p; }\n'
                       'char LICENSE[] SEC("license") = "GPL";\n')
        obj = Path(tmp) / "bad.o"
        multiarch = subprocess.run(["clang", "-print-multiarch"], capture_output=True, text=True, check=False).stdout.strip()
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/%s" % (multiarch or "x86_64-linux-gnu"),
                        "-c", str(src), "-o", str(obj)], check=True)
        _scp(lab, host, obj, "/run/netstack-test-bad.o")
    before = lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg), check=True)
    bad = dict(_prog_args(cg, obj="/run/netstack-test-bad.o"),                   # no manifest: attach by hand
               attach=[{"program": "kln_connect4", "type": "connect4", "cgroup": cg}])
    del bad["targets"]
    res = lab.module(host, "kldload.netstack.bpf_program", bad, expect_fail=True)
    assert "does not load (verifier or libbpf error)" in res["msg"]
    assert "invalid mem access" in res["verifier_log"] or "R1 invalid" in res["verifier_log"], res["verifier_log"][-2000:]
    after = lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg), check=True)
    assert before["changed"] is False and after["changed"] is False
    assert after["attachments"] == before["attachments"]


def test_upgrade_swaps_programs_without_detaching(lab, node):
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))
    before = lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg), check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["make", "-s", "-C", str(REPO / "bpf"), "BUILD=%s" % tmp, "EXTRA_CFLAGS=-DLB4_REVNAT_MAP_SIZE=262143"],
                       check=True)
        man = json.loads((Path(tmp) / "sock_lb.manifest.json").read_text())
        man["maps"]["kln_lb4_revnat"]["max_entries"] = 262143      # the new build's manifest says what it holds
        (Path(tmp) / "sock_lb.manifest.json").write_text(json.dumps(man))
        _scp(lab, host, Path(tmp) / "sock_lb.o", "/run/netstack-test-v2.o")
        _scp(lab, host, Path(tmp) / "sock_lb.manifest.json", "/run/netstack-test-v2.manifest.json")
    res = lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg, obj="/run/netstack-test-v2.o"), diff=True)
    assert res["changed"] and not any(": detach" in a or ": attach " in a for a in res["actions"]), res["actions"]
    assert "%s: recreate map kln_lb4_revnat: 262144 -> 262143 entries (contents are lost)" % NAME in res["actions"]
    assert sum(": replace program of" in a for a in res["actions"]) == 4
    old = dict((a["program"], a) for a in before["attachments"])
    for a in res["attachments"]:
        assert a["link_id"] == old[a["program"]]["link_id"]          # same links ...
        assert a["prog_id"] != old[a["program"]]["prog_id"]          # ... running new programs
    # the service table survived the upgrade and still answers
    assert lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)), check=True)["changed"] is False
    assert _probe(lab, host, cg, VIP, 80, count=5)["errors"] == {}


def test_absent_leaves_nothing(lab, node):
    host, cg = node
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    res = lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"}, diff=True)
    assert res["changed"] and res["attachments"] == []
    assert lab.sh(host, "test -e %s" % PIN, check=False).returncode != 0          # the last object: globals go too
    assert json.loads(lab.sh(host, "bpftool -j cgroup show %s" % cg).stdout.strip() or "[]") == []
    assert lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN,
                                                             "state": "absent"})["changed"] is False


def test_node_dataplane_survives_a_reboot(lab, node):
    host, cg = node
    listed = lab.sh(host, "netstack lb list").stdout
    assert "10.96.0.10:80/TCP" in listed
    lab.restart(host)
    _prepare(lab, [host], cg)   # the reboot took the test cgroup and the test server with it
    assert lab.sh(host, "systemctl is-active netstack-dataplane.service").stdout.strip() == "active"
    assert lab.sh(host, "netstack lb list").stdout == listed
    # the flow agent came back too (docs/observability.md) and answers on the management address
    addr = lab.hostvars[host]["ansible_host"]
    for _i in range(20):
        health = lab.sh(host, "python3 -c \"import urllib.request as u; print(u.urlopen('http://%s:4245/healthz')"
                              ".read().decode())\"" % addr, check=False)
        if health.returncode == 0:
            break
        time.sleep(0.5)
    assert json.loads(health.stdout)["status"] == "ok", health.stderr
    assert lab.sh(host, "systemctl is-active netstack-agent.service").stdout.strip() == "active"
    status = json.loads(lab.sh(host, "netstack dataplane status --json").stdout)
    assert len(status["objects"]["sock_lb"]["attachments"]) == 8
    cgroot = lab.sh(host, "findmnt -n -o TARGET -t cgroup2 | head -1").stdout.strip()
    names = sorted(p["name"] for p in json.loads(lab.sh(host, "bpftool -j cgroup show %s" % cgroot).stdout))
    assert names == sorted(["kln_connect4", "kln_connect6", "kln_getpeer4", "kln_getpeer6", "kln_recvmsg4",
                            "kln_recvmsg6", "kln_sendmsg4", "kln_sendmsg6"])


UDP_CLIENT = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hi")
print("backend", s.recv(256).decode().split()[1], flush=True)
end = time.time() + 30
while time.time() < end:
    time.sleep(0.2)
    try:
        s.send(b"hi")
        s.recv(256)
    except socket.timeout:
        continue
    except OSError as e:
        print("error", errno.errorcode.get(e.errno, e.errno), flush=True)
        sys.exit(0)
print("still connected", flush=True)
"""


def test_connected_udp_socket_is_destroyed_when_its_backend_goes(lab, node):
    host, cg = node
    ips = _ips(lab)
    lab.module(host, "kldload.netstack.bpf_program", _prog_args(cg))
    lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))
    lab.put(host, "/run/netstack-test-udpc.py", UDP_CLIENT)
    lab.sh(host, "rm -f /run/netstack-test-udpc.out; sh -c 'echo $$ > %s/cgroup.procs && exec python3 "
                 "/run/netstack-test-udpc.py %s 53 > /run/netstack-test-udpc.out 2>&1' &" % (cg, VIP))
    backend = ""
    for _try in range(50):
        out = lab.sh(host, "cat /run/netstack-test-udpc.out", check=False).stdout
        if out.startswith("backend "):
            backend = out.split()[1]
            break
        time.sleep(0.1)
    assert backend, out
    gone_ip = backend.rsplit(":", 1)[0]
    res = lab.module(host, "kldload.netstack.lb_services",
                     _lb_args(_services([ip for ip in ips if ip != gone_ip])))   # leaves every service
    assert res["udp_sockets_destroyed"] >= 1, res
    for _try in range(50):
        out = lab.sh(host, "cat /run/netstack-test-udpc.out", check=False).stdout
        if "error" in out or "still" in out:
            break
        time.sleep(0.2)
    # destroyed (sock_diag): a pending recv() gets ECONNABORTED, a send() EDESTADDRREQ (no longer connected)
    assert "error ECONNABORTED" in out or "error EDESTADDRREQ" in out, out
    lab.module(host, "kldload.netstack.lb_services", _lb_args(_services(ips)))
