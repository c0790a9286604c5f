"""Lab workloads: validation of the inventory, and a node's workloads made by the module's logic
(plugins/module_utils/workloads.py) for real - network namespaces, the CNI chain of Debian's
reference plugins (ptp + host-local, loopback) plus our netstack-cni, the workload server answering
TCP and UDP - all inside a private "node" network namespace ``nsu-wlnode-<pid>``.

The host does not run systemd (no /run/systemd/system), so the real test replaces the systemd starter
(transient units) by ``ProcStarter`` below (the same server argv under ``ip netns exec``, readiness
through NOTIFY_SOCKET as systemd's Type=notify gets it); the systemd part is covered by the lead's
integration test on the lab nodes.
"""
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import workloads as W

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "roles" / "workloads" / "files" / "workload_server.py"
REF_PLUGINS = "/usr/lib/cni"


# ---------------------------------------------------------------------------------------------
# validation

NS = [{"name": "shop", "labels": {"team": "shop"}}]


def wl(**kw):
    w = dict(namespace="shop", name="web-1", node="node1", labels={"app": "web"},
             ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])
    w.update(kw)
    return w


def test_validate_canonical_form():
    out = W.validate([wl(name="b", ports=[{"port": "53", "protocol": "udp"}]), wl(name="a", ip="10.244.11.9"),
                      {"name": "x", "node": "node2"}], NS, {"node1": "10.244.11.0/24", "node2": "10.244.12.0/24"})
    assert out == [
        dict(namespace="default", name="x", node="node2", labels={}, ports=[]),
        dict(namespace="shop", name="a", node="node1", labels={"app": "web"},
             ports=[{"name": "http", "port": 8080, "protocol": "TCP"}], ip="10.244.11.9"),
        dict(namespace="shop", name="b", node="node1", labels={"app": "web"}, ports=[{"port": 53, "protocol": "UDP"}]),
    ]
    assert W.validate(None) == []


def test_validate_namespaces():
    assert W.validate_namespaces(NS) == [
        {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}},
        {"name": "shop", "labels": {"team": "shop", "kubernetes.io/metadata.name": "shop"}}]
    with pytest.raises(ValueError, match=r"netstack_namespaces\[1\] \(shop\)\.name: namespace shop is declared twice"):
        W.validate_namespaces(NS + NS)
    with pytest.raises(ValueError, match=r"netstack_namespaces\[0\]\.name: 'Shop' must be a DNS label"):
        W.validate_namespaces([{"name": "Shop"}])
    with pytest.raises(ValueError, match=r"netstack_namespaces\[0\] \(shop\)\.labels: label key"):
        W.validate_namespaces([{"name": "shop", "labels": {"a b": "c"}}])


@pytest.mark.parametrize("workloads,nodes,error", [
    ([wl(), wl()], None, r"netstack_workloads\[1\] \(shop/web-1\)\.name: shop/web-1 is already netstack_workloads\[0\]"),
    ([wl(ip="10.244.11.7"), wl(name="web-2", ip="10.244.11.7")], None,
     r"netstack_workloads\[1\] \(shop/web-2\)\.ip: 10.244.11.7 is already pinned by shop/web-1"),
    ([wl(node="node9")], ["node1", "node2"],
     r"netstack_workloads\[0\] \(shop/web-1\)\.node: 'node9' is not a node of the inventory \(kube_nodes: node1, node2\)"),
    ([wl(node=None)], None, r"\.node: the node the workload runs on is required"),
    ([wl(namespace="nope")], None, r"netstack_workloads\[0\] \(nope/web-1\)\.namespace: namespace 'nope' is not declared"),
    ([wl(labels={"app": "-x"})], None, r"netstack_workloads\[0\] \(shop/web-1\)\.labels\.app: label value '-x'"),
    ([wl(ports=[{"name": "HTTP", "port": 80}])], None,
     r"\.ports\[0\]\.name: 'HTTP' is not a valid port name \(IANA_SVC_NAME\): must contain only lowercase"),
    ([wl(ports=[{"name": "a-very-long-port-name", "port": 80}])], None, r"\.ports\[0\]\.name: .*at most 15"),
    ([wl(ports=[{"name": "8080", "port": 80}])], None, r"\.ports\[0\]\.name: .*at least one letter"),
    ([wl(ports=[{"name": "a--b", "port": 80}])], None, r"\.ports\[0\]\.name: .*'--'"),
    ([wl(ports=[{"port": 0}])], None, r"\.ports\[0\]\.port: 0 must be a number from 1 to 65535"),
    ([wl(ports=[{"port": 65536}])], None, r"\.ports\[0\]\.port: 65536 must be"),
    ([wl(ports=[{"port": True}])], None, r"\.ports\[0\]\.port: True must be"),
    ([wl(ports=[{"port": 80, "protocol": "SCTP"}])], None, r"\.ports\[0\]\.protocol: SCTP is not supported \(the lab kernel has no SCTP\)"),
    ([wl(ports=[{"port": 80, "protocol": "ICMP"}])], None, r"\.ports\[0\]\.protocol: 'ICMP' must be TCP or UDP"),
    ([wl(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}])], None,
     r"\.ports\[1\]\.name: port name 'a' is used twice in this workload"),
    ([wl(ports=[{"port": 80}, {"port": 80, "protocol": "TCP"}])], None, r"\.ports\[1\]: port 80/TCP is listed twice"),
    ([wl(ports=[{"port": 80, "nmae": "x"}])], None, r"\.ports\[0\]: unknown key\(s\) nmae"),
    ([wl(ip="10.244.12.3")], {"node1": "10.244.11.0/24"}, r"\.ip: 10.244.12.3 is outside the pod CIDR 10.244.11.0/24 of node node1"),
    ([wl(ip="10.244.11.0")], {"node1": "10.244.11.0/24"}, r"\.ip: 10.244.11.0 is the network or broadcast address"),
    ([wl(ip="10.244.11.3/24")], None, r"\.ip: '10.244.11.3/24' is not an IP address"),
    ([wl(name="Web")], None, r"netstack_workloads\[0\]\.name: 'Web' must be a DNS subdomain"),
    ([wl(image="x")], None, r"netstack_workloads\[0\]: unknown key\(s\) image"),
])
def test_validate_errors_name_the_field(workloads, nodes, error):
    with pytest.raises(ValueError, match=error):
        W.validate(workloads, NS, nodes)


def test_filter_plugin():
    from ansible.errors import AnsibleFilterError
    from ansible_collections.kldload.netstack.plugins.filter.workloads_validate import FilterModule
    f = FilterModule().filters()["workloads_validate"]
    assert f([wl()], NS, ["node1"])[0]["name"] == "web-1"
    with pytest.raises(AnsibleFilterError, match="is not a node of the inventory"):
        f([wl()], NS, ["node2"])


def test_names_and_identities():
    spec = W.validate([wl(name="a-rather-long-workload-name.with.dots" + "x" * 200)], NS)[0]
    n = W.netns_name(spec["namespace"], spec["name"])
    assert len(n) <= 40 and n.startswith("wl-shop-") and not n.startswith("kln-")
    assert W.netns_name("shop", "web-1") != W.netns_name("shop", "web-2")
    assert W.netns_name("shop-x", "web") != W.netns_name("shop", "x-web")     # same text, other split
    assert W.unit_name(W.netns_name("shop", "web-1")).startswith("netstack-wl-shop-web-1-")
    assert W.pod_uid("shop", "web-1") == W.pod_uid("shop", "web-1") != W.pod_uid("shop", "web-2")
    a = W.validate([wl()], NS)[0]
    b = W.validate([wl(labels={"app": "web", "v": "2"})], NS)[0]
    assert len(W.container_id(a)) == 64 and W.container_id(a) == W.container_id(dict(a, node="other"))
    assert W.container_id(a) != W.container_id(b)
    assert W.server_argv(dict(a, ports=[{"port": 1, "protocol": "TCP"}, {"port": 2, "protocol": "UDP"}]), "/s.py") == \
        ["/usr/bin/python3", "/s.py", "--namespace", "shop", "--name", "web-1", "--tcp", "1", "--udp", "2"]
    caps = W.capability_args(dict(a, ip="10.244.11.9"))
    assert caps["ips"] == ["10.244.11.9"]
    ann = caps["io.kubernetes.cri.pod-annotations"]
    assert json.loads(ann["netstack.kldload.io/labels"]) == {"app": "web"}
    assert json.loads(ann["netstack.kldload.io/ports"]) == [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_describe_for_diffs():
    a = W.validate([wl(ip="10.244.11.9"), wl(name="b", labels={}, ports=[])], NS)
    assert [W.describe(W.endpoint(x)) for x in a] == [
        "shop/b node=node1 ip=(assigned) labels=- ports=-",
        "shop/web-1 node=node1 ip=10.244.11.9 labels=app=web ports=http:8080/TCP"]


def test_systemd_starter_command_line():
    """The systemd-run command line (the host has no systemd: the unit itself runs in the lab test)."""
    calls = []

    def run(argv, check=True):
        calls.append(argv)
        return (3 if argv[:2] == ["systemctl", "is-active"] else 0), "", ""
    s = W.SystemdStarter(run)
    s.start("netstack-wl-x.service", "wl-x", ["/usr/bin/python3", "/srv.py", "--tcp", "80"], "d")
    assert calls[-1] == ["systemd-run", "--unit", "netstack-wl-x.service", "--slice", "netstack-workloads.slice",
                         "--description", "d", "-p", "Type=notify", "-p", "NetworkNamespacePath=/run/netns/wl-x",
                         "-p", "Restart=on-failure", "-p", "RestartSec=1", "/usr/bin/python3", "/srv.py", "--tcp", "80"]
    assert s.alive("netstack-wl-x.service") is False


# ---------------------------------------------------------------------------------------------
# the real thing, in a private node namespace

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check)


class ProcStarter:
    """The workload process under ``ip netns exec`` (instead of a transient systemd unit), ready when
    it sends READY=1 on NOTIFY_SOCKET as it does for systemd."""

    def __init__(self, d):
        self.d = d
        self.procs = {}

    def start(self, unit, netns, argv, description=""):
        path = os.path.join(self.d, "notify-%s" % unit)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        s.settimeout(0.1)
        p = subprocess.Popen(["ip", "netns", "exec", netns] + list(argv), env=dict(os.environ, NOTIFY_SOCKET=path),
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        msg = b""
        try:
            for _attempt in range(100):
                try:
                    msg = s.recv(4096)
                    break
                except socket.timeout:
                    if p.poll() is not None:
                        break
        finally:
            s.close()
            os.unlink(path)
        if b"READY=1" not in msg:
            p.kill()
            raise RuntimeError("server %s did not start: %s" % (unit, p.communicate()[1].decode().strip()[-200:]))
        self.procs[unit] = p

    def alive(self, unit):
        p = self.procs.get(unit)
        return p is not None and p.poll() is None

    def stop(self, unit):
        p = self.procs.pop(unit, None)
        if p is not None:
            p.kill()
            p.wait(10)


NETNS_PREFIX = "nsu-wl%d-" % os.getpid()


@pytest.fixture
def node(monkeypatch):
    """A node: a private netns the test thread enters, CNI plugins (reference + a netstack-cni shim),
    a conflist, state/IPAM/cache/endpoint dirs; everything removed afterwards."""
    if os.geteuid() != 0 or not os.path.exists(os.path.join(REF_PLUGINS, "ptp")):
        pytest.skip("needs root and the CNI reference plugins in /usr/lib/cni")
    from ansible_collections.kldload.netstack.plugins.module_utils import cni
    tmp = tempfile.mkdtemp(prefix="nsu-wl-")
    node_ns = "nsu-wlnode-%d" % os.getpid()
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    starter = ProcStarter(tmp)
    _ip("netns", "add", node_ns)
    try:
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        for p in ("ptp", "host-local", "loopback"):
            os.symlink(os.path.join(REF_PLUGINS, p), os.path.join(bindir, p))
        shim = os.path.join(bindir, "netstack-cni")
        with open(shim, "w") as f:
            f.write("#!%s\nimport os, sys\nsys.path.insert(0, %r)\n"
                    "from ansible_collections.kldload.netstack.plugins.module_utils import cni\n"
                    "sys.exit(cni.plugin_main(os.environ, sys.stdin, sys.stdout))\n"
                    % (sys.executable, str(REPO / ".collections")))
        os.chmod(shim, 0o755)
        conflist = {"cniVersion": "1.0.0", "name": "kldload-netstack", "plugins": [
            {"type": "ptp", "mtu": 1450, "capabilities": {"ips": True},
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.7.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": os.path.join(tmp, "ipam")}},
            {"type": "netstack-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": True}}]}
        path = os.path.join(tmp, "05-kldload-netstack.conflist")
        with open(path, "w") as f:
            json.dump(conflist, f)
        monkeypatch.setenv("NETSTACK_ENDPOINTS_DIR", os.path.join(tmp, "endpoints"))
        fd = os.open("/run/netns/" + node_ns, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        _ip("link", "set", "lo", "up")
        n = W.Node(cni, cni.load_conflist(path), lambda argv: subprocess.run(argv, check=True, capture_output=True),
                   starter, os.path.join(tmp, "state"), str(SERVER), cni_path=[bindir], netns_prefix=NETNS_PREFIX,
                   cache_dir=os.path.join(tmp, "cache"))
        n.tmp = tmp
        yield n
    finally:
        for unit in list(starter.procs):
            starter.stop(unit)
        _setns(orig)
        os.close(orig)
        for name in os.listdir("/run/netns"):
            if name.startswith(NETNS_PREFIX):
                _ip("netns", "delete", name, check=False)
        _ip("netns", "delete", node_ns, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _tcp(ip, port, payload=b""):
    with socket.create_connection((ip, port), timeout=5) as s:
        if payload:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                return buf
            buf += d


def _udp(ip, port, payload):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(payload, (ip, port))
        return s.recvfrom(65535)[0]


def _netns_addr(netns):
    out = _ip("-n", netns, "-j", "addr", "show", "dev", "eth0").stdout
    return [a["local"] for a in json.loads(out)[0]["addr_info"] if a["family"] == "inet"]


def _leases(n):
    d = os.path.join(n.tmp, "ipam", "kldload-netstack")
    return sorted(f for f in os.listdir(d) if f[0].isdigit()) if os.path.isdir(d) else []


def _endpoint_records(n):
    d = os.path.join(n.tmp, "endpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _our_netns():
    return sorted(x for x in os.listdir("/run/netns") if x.startswith(NETNS_PREFIX))


SPECS = [
    dict(namespace="shop", name="web-1", node="node1", labels={"app": "web"},
         ports=[{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
    dict(namespace="shop", name="web-2", node="node1", labels={"app": "web"},
         ports=[{"name": "http", "port": 8080, "protocol": "TCP"}], ip="10.250.7.50"),
]


def test_workloads_lifecycle(node):
    specs = W.validate(SPECS, NS)
    # check mode on an empty node: a plan, nothing made
    res = W.sync(node, specs, check=True)
    assert [(s["name"], s["action"]) for s in res["plan"]] == [("web-1", "create"), ("web-2", "create")]
    assert [e["ip"] for e in res["endpoints"]] == [None, "10.250.7.50"] and res["changed"]
    assert _our_netns() == [] and _leases(node) == [] and not os.path.isdir(node.state_dir)

    res = W.sync(node, specs)
    assert res["changed"]
    eps = dict((e["name"], e) for e in res["endpoints"])
    assert eps["web-2"]["ip"] == "10.250.7.50"
    ip1 = eps["web-1"]["ip"]
    assert ip1.startswith("10.250.7.") and eps["web-1"]["labels"] == {"app": "web"} and eps["web-1"]["node"] == "node1"
    assert _leases(node) == sorted([ip1, "10.250.7.50"])
    recs = W.read_records(node.state_dir)
    r1 = recs[("shop", "web-1")]
    assert _netns_addr(r1["netns"]) == [ip1] and r1["ips"] == [ip1 + "/24"]
    assert r1["container_id"] == W.container_id(specs[0]) and r1["unit"] == W.unit_name(r1["netns"])
    # packets: TCP banner + echo of a long transfer, UDP answer, from the node to the pods
    payload = os.urandom(3 << 20)
    out = _tcp(ip1, 8080, payload)
    head, _sep, rest = out.partition(b"\n")
    assert head.startswith(b"shop/web-1 tcp 8080 %s:8080 " % ip1.encode()) and rest == payload
    head = _udp(ip1, 5353, b"ping").split(b"\n")[0].split()
    assert head[:4] == [b"shop/web-1", b"udp", b"5353", ("%s:5353" % ip1).encode()] and head[5] == b"4", head
    assert _tcp("10.250.7.50", 8080).startswith(b"shop/web-2 tcp 8080")
    # the chained netstack-cni recorded both endpoints with the labels and ports the runtime passed
    recfile = os.path.join(node.tmp, "endpoints", "%s-eth0.json" % r1["container_id"])
    with open(recfile) as f:
        er = json.load(f)
    assert (er["namespace"], er["name"], er["labels"]) == ("shop", "web-1", {"app": "web"})
    assert [(p["name"], p["port"], p["protocol"]) for p in er["ports"]] == [("http", 8080, "TCP"), ("dns", 5353, "UDP")]
    assert len(_endpoint_records(node)) == 2

    # unchanged: nothing touched, same processes
    procs = dict(node.starter.procs)
    res = W.sync(node, specs)
    assert not res["changed"] and [s["action"] for s in res["plan"]] == ["keep", "keep"]
    assert node.starter.procs == procs and [e["ip"] for e in res["endpoints"]] == [ip1, "10.250.7.50"]

    # a changed spec is a new sandbox; the other workload is not touched
    specs2 = W.validate([dict(SPECS[0], labels={"app": "web", "v": "2"}), SPECS[1]], NS)
    res = W.sync(node, specs2, check=True)
    assert [(s["name"], s["action"]) for s in res["plan"]] == [("web-1", "recreate"), ("web-2", "keep")]
    assert W.read_records(node.state_dir)[("shop", "web-1")]["container_id"] == r1["container_id"]
    res = W.sync(node, specs2)
    r1b = W.read_records(node.state_dir)[("shop", "web-1")]
    assert r1b["container_id"] != r1["container_id"] and not os.path.exists(recfile)
    assert node.starter.procs[recs[("shop", "web-2")]["unit"]] is procs[recs[("shop", "web-2")]["unit"]]
    assert _leases(node) == sorted([r1b["ip"], "10.250.7.50"]) and len(_endpoint_records(node)) == 2
    assert _tcp(r1b["ip"], 8080).startswith(b"shop/web-1 tcp 8080")

    # a dead process is found and the workload recreated
    node.starter.procs[r1b["unit"]].kill()
    node.starter.procs[r1b["unit"]].wait()
    res = W.sync(node, specs2)
    assert [(s["action"], s["reason"]) for s in res["plan"]][0] == ("recreate", "process %s is not running" % r1b["unit"])
    r1c = W.read_records(node.state_dir)[("shop", "web-1")]
    assert _tcp(r1c["ip"], 8080).startswith(b"shop/web-1 tcp 8080")

    # a failing ADD (pinned IP outside the range) leaves nothing behind; the other workloads stay
    bad = W.validate([dict(SPECS[0], name="web-3", ip="10.250.8.9")], NS)[0]
    before = (_our_netns(), _leases(node), _endpoint_records(node), sorted(os.listdir(node.state_dir)))
    with pytest.raises(W.WorkloadError, match=r"creating workload shop/web-3 failed: .*host-local|ptp"):
        W.sync(node, specs2 + [bad])
    assert (_our_netns(), _leases(node), _endpoint_records(node), sorted(os.listdir(node.state_dir))) == before
    assert not any(W.container_id(bad) in f for f in os.listdir(os.path.join(node.tmp, "cache")))

    # prune=false keeps an unlisted workload; prune (default) deletes it
    res = W.sync(node, specs2[:1], prune=False)
    assert not res["changed"] and [e["name"] for e in res["endpoints"]] == ["web-1", "web-2"]
    res = W.sync(node, specs2[:1], check=True)
    assert [(s["name"], s["action"]) for s in res["plan"]] == [("web-2", "delete"), ("web-1", "keep")]
    assert len(_our_netns()) == 2

    # the empty list removes everything: processes, sandboxes, leases, endpoint records, records
    res = W.sync(node, [])
    assert res["changed"] and res["endpoints"] == [] and len(res["before"]) == 2
    assert _our_netns() == [] and _leases(node) == [] and _endpoint_records(node) == []
    assert os.listdir(node.state_dir) == [] and node.starter.procs == {}
    assert os.listdir(os.path.join(node.tmp, "cache")) == []
    assert not W.sync(node, [])["changed"]


def test_failing_process_start_leaves_nothing(node):
    """The server does not start (its script is missing): the CNI ADD is undone (DEL) - no lease, no
    endpoint record, no cached result, no netns, no record."""
    node.server = os.path.join(node.tmp, "no-such-server.py")
    with pytest.raises(W.WorkloadError, match=r"creating workload shop/web-1 failed: server netstack-wl-.* did not start"):
        W.sync(node, W.validate(SPECS[:1], NS))
    assert _our_netns() == [] and _leases(node) == [] and _endpoint_records(node) == []
    assert W.read_records(node.state_dir) == {} and node.starter.procs == {}
    assert os.listdir(os.path.join(node.tmp, "cache")) == []
