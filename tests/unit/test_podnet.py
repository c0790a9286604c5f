"""The pod network (podnet.py through runtime.apply_network) on the real kernel: two "nodes" as two
private network namespaces joined by a veth "underlay", a pod behind each made by the real ptp plugin
(with the ptp entry of the conflist the node wrote), the runtime's pods section applied inside each node.
Pods reach each other in tunnel (VXLAN) and native mode, full-size TCP and large UDP work, no
encapsulated packet is fragmented, traffic leaving the cluster is masqueraded, switching mode removes
the other mode's state, a second apply changes nothing, errors touch nothing, remove takes it all."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import podnet, runtime

COLLECTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".collections")
NODES = {"a": {"ns": "nsu-pn-a", "pod": "nsu-pn-pa", "dev": "nsupa0", "ip": "192.168.77.1", "cidr": "10.244.1.0/24"},
         "b": {"ns": "nsu-pn-b", "pod": "nsu-pn-pb", "dev": "nsupb0", "ip": "192.168.77.2", "cidr": "10.244.2.0/24"}}
CNI_BIN = "/usr/lib/cni"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(CNI_BIN + "/ptp") or not shutil.which("nft"),
                                reason="needs root, the CNI reference plugins and nft")


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=kw.pop("check", True), capture_output=True, text=True, **kw)


def nsexec(ns, *argv, **kw):
    return sh("ip", "netns", "exec", ns, *argv, **kw)


_RUN = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, %r)
    from ansible_collections.kldload.netstack.plugins.module_utils import podnet, routes, runtime
    req = json.load(sys.stdin)
    try:
        cfg = runtime.validate(req["cfg"])
        if req["op"] == "apply":
            out = runtime.apply_network(cfg, check=req["check"])
        elif req["op"] == "remove":
            out = podnet.remove(cfg["pods"], [], check=req["check"])
        else:
            out = podnet.status(cfg["pods"])
    except (runtime.ConfigError, routes.RouteError) as e:
        out = {"error": str(e)}
    print(json.dumps(out))
""") % COLLECTIONS


def run_in(node, op, cfg, check=False):
    """runtime/podnet ``op`` inside node's netns (a subprocess: netlink and /proc/sys are the node's)."""
    p = subprocess.run(["ip", "netns", "exec", NODES[node]["ns"], sys.executable, "-c", _RUN], text=True,
                       input=json.dumps({"op": op, "cfg": cfg, "check": check}), capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


OUTSIDE = "192.168.77.99"     # on node b's underlay, not a node address: outside the cluster


@pytest.fixture
def cluster():
    tmp = tempfile.mkdtemp(prefix="nsu-pn-")
    made = []
    try:
        for n in NODES.values():
            sh("ip", "netns", "add", n["ns"])
            made.append(n["ns"])
            sh("ip", "netns", "add", n["pod"])
            made.append(n["pod"])
            nsexec(n["ns"], "ip", "link", "set", "lo", "up")
            nsexec(n["pod"], "ip", "link", "set", "lo", "up")
        a, b = NODES["a"], NODES["b"]
        sh("ip", "link", "add", a["dev"], "netns", a["ns"], "type", "veth", "peer", "name", b["dev"], "netns", b["ns"])
        for n in NODES.values():
            nsexec(n["ns"], "ip", "addr", "add", n["ip"] + "/24", "dev", n["dev"])
            nsexec(n["ns"], "ip", "link", "set", n["dev"], "up")
        bundle = os.path.join(tmp, "netstack.pyz")
        open(bundle, "w").close()
        yield {"tmp": tmp, "bundle": bundle}
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def config(cl, node, mode="tunnel", **pods):
    me = NODES[node]
    other = [k for k in NODES if k != node][0]
    p = {"cidr": me["cidr"], "routing_mode": mode, "underlay_interface": me["dev"], "underlay_ip": me["ip"],
         "nodes": [{"name": other, "underlay_ip": NODES[other]["ip"], "pod_cidr": NODES[other]["cidr"]}],
         "masquerade": True,
         "cni": {"conflist": os.path.join(cl["tmp"], node, "net.d", "05-kldload-netstack.conflist"),
                 "bin_dir": os.path.join(cl["tmp"], node, "bin")}}
    p.update(pods)
    return {"bundle": cl["bundle"], "pods": p}


def add_pod(cl, node):
    """The pod of ``node``: ptp ADD (in the node's netns) with the ptp entry of the conflist the node wrote."""
    me = NODES[node]
    conf = json.load(open(os.path.join(cl["tmp"], node, "net.d", "05-kldload-netstack.conflist")))
    net = dict(conf["plugins"][0], cniVersion=conf["cniVersion"], name=conf["name"])
    net["ipam"] = dict(net["ipam"], dataDir=os.path.join(cl["tmp"], node, "ipam"))
    env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID="nsu" + uuid.uuid4().hex[:12],
               CNI_NETNS="/run/netns/" + me["pod"], CNI_IFNAME="eth0", CNI_PATH=CNI_BIN)
    p = subprocess.run(["ip", "netns", "exec", me["ns"], CNI_BIN + "/ptp"], input=json.dumps(net), env=env,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)["ips"][0]["address"].split("/")[0]


_SERVER = textwrap.dedent("""
    import socket, sys
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); s.settimeout(10)
        print("ready", flush=True)
        data, peer = s.recvfrom(65535); print(len(data), peer[0], flush=True)
    else:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port))
        s.listen(1); s.settimeout(10); print("ready", flush=True)
        c, peer = s.accept(); c.settimeout(10); n = 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            n += len(b)
        print(n, peer[0], flush=True)
""")

_CLIENT = textwrap.dedent("""
    import socket, sys
    kind, ip, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"u" * size, (ip, port))
    else:
        s = socket.create_connection((ip, port), timeout=10); s.sendall(b"t" * size); s.close()
""")


def transfer(server_ns, client_ns, ip, kind, size, port=18500):
    """``size`` bytes from client_ns to ip:port over kind; (bytes received, the peer address the server saw)."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", _SERVER, kind, str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        nsexec(client_ns, sys.executable, "-c", _CLIENT, kind, ip, str(port), str(size))
        out, err = srv.communicate(timeout=15)
        assert srv.returncode == 0, err
        n, peer = out.split()
        return int(n), peer
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


_PING = textwrap.dedent("""
    import socket, struct, sys, time
    def csum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
        return ~s & 0xffff
    ip, count = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2)
    for seq in range(count):
        body = b"nsu-pn" * 8
        hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4e53, seq)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + body), 0x4e53, seq) + body, (ip, 0))
        while True:
            data, peer = s.recvfrom(2048)
            t, _c, _s, ident, rseq = struct.unpack("!BBHHH", data[20:28])
            if t == 0 and ident == 0x4e53 and rseq == seq and peer[0] == ip:
                break
    print("ok")
""")


def ping(ns, ip, count=2):
    """ICMP echo from ns to ip (python raw socket: the host has no ping); CalledProcessError when no reply."""
    assert nsexec(ns, sys.executable, "-c", _PING, ip, str(count)).stdout.strip() == "ok"


_COUNT = """table ip nsu_count {
  chain in {
    type filter hook prerouting priority -450; policy accept;
    iifname "%s" udp dport 8472 counter comment "vxlan"
    iifname "%s" ip frag-off & 0x3fff != 0 counter comment "fragments"
  }
}
"""


def counters(node):
    """What node's underlay device received, counted before conntrack reassembles anything (priority
    -450): {vxlan: bytes of VXLAN packets, fragments: IP fragments}; the counters are made on the first call."""
    ns, dev = NODES[node]["ns"], NODES[node]["dev"]
    if nsexec(ns, "nft", "list", "table", "ip", "nsu_count", check=False).returncode != 0:
        nsexec(ns, "nft", "-f", "-", input=_COUNT % (dev, dev))
    out = {}
    for item in json.loads(nsexec(ns, "nft", "-j", "list", "table", "ip", "nsu_count").stdout)["nftables"]:
        if "rule" in item:
            c = [e["counter"] for e in item["rule"]["expr"] if "counter" in e][0]
            out[item["rule"]["comment"]] = c["bytes"] if item["rule"]["comment"] == "vxlan" else c["packets"]
    return out


def frag_creates(ns):
    lines = [ln.split() for ln in nsexec(ns, "cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Ip:")]
    return int(lines[1][lines[0].index("FragCreates")])


def check_pods_talk(cl, ips, tunnel):
    a, b = NODES["a"], NODES["b"]
    ping(a["pod"], ips["b"])
    c0 = counters("b")
    frags = frag_creates(a["ns"]) + frag_creates(b["ns"])
    # a full-size TCP transfer: 1 MB, the source address is the pod's (no masquerade inside the cluster)
    assert transfer(b["pod"], a["pod"], ips["b"], "tcp", 1 << 20) == (1 << 20, ips["a"])
    assert frag_creates(a["ns"]) + frag_creates(b["ns"]) == frags        # the nodes fragmented nothing
    c1 = counters("b")
    assert c1["fragments"] == c0["fragments"]                            # and the underlay carried no fragment
    if tunnel:
        assert c1["vxlan"] - c0["vxlan"] > 1 << 20                       # it went through the tunnel
    else:
        assert c1["vxlan"] == c0["vxlan"]
    # a large UDP datagram: the pod fragments it to its MTU; in tunnel mode each fragment is encapsulated
    # whole (the underlay carries no fragment), in native mode the pod's own fragments cross the underlay
    assert transfer(b["pod"], a["pod"], ips["b"], "udp", 8000, port=18501) == (8000, ips["a"])
    c2 = counters("b")
    if tunnel:
        assert c2["fragments"] == c1["fragments"] and c2["vxlan"] - c1["vxlan"] > 8000
    else:
        assert c2["fragments"] - c1["fragments"] == 6                    # 8008 bytes in 1428-byte pieces
    # to another node: the pod's own address (nodes are in the cluster, not masqueraded)
    assert transfer(b["ns"], a["pod"], b["ip"], "tcp", 1000, port=18502) == (1000, ips["a"])
    # leaving the cluster (an address on the underlay that is no node's): masqueraded to the node's address
    nsexec(b["ns"], "ip", "addr", "replace", OUTSIDE + "/24", "dev", b["dev"])
    assert transfer(b["ns"], a["pod"], OUTSIDE, "tcp", 1000, port=18503) == (1000, a["ip"])


def test_pods_across_nodes_in_tunnel_then_native_mode(cluster):
    cl = cluster
    # check mode on a fresh node: everything reported, nothing made
    res = run_in("a", "apply", config(cl, "a"), check=True)
    assert res["changed"] and any(c.startswith("create vxlan device kln_vxlan") for c in res["changes"])
    assert nsexec(NODES["a"]["ns"], "ip", "link", "show", "kln_vxlan", check=False).returncode != 0
    assert not os.path.exists(os.path.join(cl["tmp"], "a", "net.d"))
    assert res["mtu"] == 1450

    for k in NODES:
        res = run_in(k, "apply", config(cl, k))
        assert res["changed"], res
        other = NODES[[o for o in NODES if o != k][0]]["cidr"]
        assert res["routes"] == ["add %s via %s dev kln_vxlan onlink" % (other, podnet.gateway(other))]
    # the kernel has what was asked for
    a = NODES["a"]
    link = json.loads(nsexec(a["ns"], "ip", "-j", "-d", "link", "show", "kln_vxlan").stdout)[0]
    assert link["mtu"] == 1450 and link["address"] == podnet.vxlan_mac(a["ip"]) == "02:4b:c0:a8:4d:01"
    vx = link["linkinfo"]["info_data"]
    assert (vx["id"], vx["local"], vx["port"], vx["learning"]) == (1, a["ip"], 8472, False)
    fdb = nsexec(a["ns"], "bridge", "fdb", "show", "dev", "kln_vxlan").stdout
    assert "02:4b:c0:a8:4d:02 dst 192.168.77.2 self permanent" in fdb
    assert "10.244.2.0 lladdr 02:4b:c0:a8:4d:02 PERMANENT" in nsexec(a["ns"], "ip", "neigh", "show", "dev", "kln_vxlan").stdout
    assert nsexec(a["ns"], "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    conf = json.load(open(os.path.join(cl["tmp"], "a", "net.d", "05-kldload-netstack.conflist")))
    assert conf["name"] == "kldload-netstack" and conf["plugins"][0]["mtu"] == 1450
    assert conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]
    assert [p["type"] for p in conf["plugins"]] == ["ptp", "netstack-cni"]
    assert os.readlink(os.path.join(cl["tmp"], "a", "bin", "netstack-cni")) == cl["bundle"]
    assert "masquerade" in nsexec(a["ns"], "nft", "list", "table", "ip", "kldload_netstack").stdout

    # apply twice = no change (and check mode on the applied node agrees)
    for k in NODES:
        for check in (True, False):
            res = run_in(k, "apply", config(cl, k), check=check)
            assert not res["changed"] and res["changes"] == [] and res["routes"] == [], res

    ips = dict((k, add_pod(cl, k)) for k in NODES)
    assert nsexec(NODES["a"]["pod"], "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    check_pods_talk(cl, ips, tunnel=True)
    st = run_in("a", "status", config(cl, "a"))
    assert st["mode"] == "tunnel" and st["mtu"] == 1450 and st["device"]["mtu"] == 1450
    assert st["routes"] == [{"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "kln_vxlan", "present": True}]

    # native mode: one variable, one run; the tunnel's device (and its neighbours, fdb) go
    for k in NODES:
        res = run_in(k, "apply", config(cl, k, mode="native"))
        assert "delete vxlan device kln_vxlan" in res["changes"], res
        other = NODES[[o for o in NODES if o != k][0]]
        assert res["routes"] == ["replace %s via %s dev %s (was via %s)" % (other["cidr"], other["ip"], NODES[k]["dev"],
                                                                            podnet.gateway(other["cidr"]))]
        assert any(c.startswith("write %s" % config(cl, k)["pods"]["cni"]["conflist"]) and "ptp mtu 1500" in c
                   for c in res["changes"])
    assert nsexec(a["ns"], "ip", "link", "show", "kln_vxlan", check=False).returncode != 0
    assert "10.244.2.0/24 via 192.168.77.2 dev nsupa0 proto 220" in nsexec(a["ns"], "ip", "route").stdout
    for k in NODES:
        assert not run_in(k, "apply", config(cl, k, mode="native"))["changed"]
    check_pods_talk(cl, ips, tunnel=False)       # the pods made in tunnel mode keep MTU 1450: fine in native mode

    # back to tunnel: the device comes back, the native routes are replaced
    res = run_in("a", "apply", config(cl, "a"))
    assert any(c.startswith("create vxlan device") for c in res["changes"])
    run_in("b", "apply", config(cl, "b"))
    ping(NODES["a"]["pod"], ips["b"], 1)

    # remove: everything goes
    for k in NODES:
        res = run_in(k, "remove", config(cl, k))
        assert res["changed"]
        assert not run_in(k, "remove", config(cl, k))["changed"]
    assert nsexec(a["ns"], "ip", "link", "show", "kln_vxlan", check=False).returncode != 0
    assert "proto 220" not in nsexec(a["ns"], "ip", "route").stdout
    assert nsexec(a["ns"], "nft", "list", "table", "ip", "kldload_netstack", check=False).returncode != 0
    assert not os.path.exists(os.path.join(cl["tmp"], "a", "net.d", "05-kldload-netstack.conflist"))
    assert not os.path.lexists(os.path.join(cl["tmp"], "a", "bin", "netstack-cni"))


def test_masquerade_off_removes_the_table_and_mtu_can_be_set(cluster):
    cl = cluster
    assert run_in("a", "apply", config(cl, "a", mtu=1400))["mtu"] == 1400
    assert "masquerade" in nsexec(NODES["a"]["ns"], "nft", "list", "ruleset").stdout
    res = run_in("a", "apply", config(cl, "a", mtu=1400, masquerade=False))
    assert res["changes"] == ["delete nftables table ip kldload_netstack"], res
    assert "kldload_netstack" not in nsexec(NODES["a"]["ns"], "nft", "list", "ruleset").stdout
    res = run_in("a", "apply", config(cl, "a", masquerade=False))           # mtu 0 = auto again
    assert "set kln_vxlan mtu 1450 (was 1400)" in res["changes"]
    # a table someone changed by hand is made again
    nsexec(NODES["a"]["ns"], "nft", "add", "table", "ip", "kldload_netstack")
    nsexec(NODES["a"]["ns"], "nft", "add", "chain", "ip", "kldload_netstack", "postrouting",
           "{ type nat hook postrouting priority srcnat; policy accept; }")
    res = run_in("a", "apply", config(cl, "a"))
    assert any(c.startswith("write nftables table") for c in res["changes"])
    assert not run_in("a", "apply", config(cl, "a"))["changed"]


@pytest.mark.parametrize("pods, message", [
    ({"underlay_interface": "nsu-nope"}, "config.pods.underlay_interface: there is no device nsu-nope"),
    ({"underlay_ip": "192.168.77.9"}, "config.pods.underlay_ip: 192.168.77.9 is not an address of this node"),
    ({"routing_mode": "bgp"}, "config.pods.routing_mode: 'bgp' is not a routing mode"),
    ({"nodes": [{"name": "b", "underlay_ip": "192.168.77.2", "pod_cidr": "10.244.1.128/25"}]},
     "config.pods.nodes[0].pod_cidr: 10.244.1.128/25 overlaps this node's pod CIDR"),
    ("foreign route", "routes: 10.244.2.0/24 is already routed (via 192.168.77.99, proto 4) by someone else"),
])
def test_errors_touch_nothing(cluster, pods, message):
    forward = nsexec(NODES["a"]["ns"], "cat", "/proc/sys/net/ipv4/ip_forward").stdout     # a new netns's: 0 or the host's
    if pods == "foreign route":
        nsexec(NODES["a"]["ns"], "ip", "route", "add", "10.244.2.0/24", "via", "192.168.77.99", "proto", "static")
        pods = {}
    res = run_in("a", "apply", config(cluster, "a", **pods))
    assert message in res["error"]
    ns = NODES["a"]["ns"]
    assert nsexec(ns, "ip", "link", "show", "kln_vxlan", check=False).returncode != 0
    assert "proto 220" not in nsexec(ns, "ip", "route").stdout and "proto 220" not in nsexec(ns, "ip", "neigh").stdout
    assert nsexec(ns, "nft", "list", "ruleset").stdout.strip() == ""
    assert nsexec(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout == forward
    assert not os.path.exists(os.path.join(cluster["tmp"], "a"))


def test_vxlan_mac_and_mtu_are_derived():
    assert podnet.vxlan_mac("192.168.1.21") == "02:4b:c0:a8:01:15"
    p = runtime.validate({"pods": {"cidr": "10.244.1.0/24", "underlay_interface": "eth0", "underlay_ip": "192.168.1.1"}})["pods"]
    assert podnet.pod_mtu(p, 1500) == 1450 and podnet.pod_mtu(dict(p, routing_mode="native"), 9000) == 9000
    assert podnet.pod_mtu(dict(p, mtu=1400), 1500) == 1400
    assert podnet.cluster_cidrs(dict(p, nodes=[{"name": "b", "underlay_ip": "192.168.1.2", "pod_cidr": "10.244.0.0/24"}])) \
        == ["10.96.0.0/12", "10.244.0.0/23", "192.168.1.1/32", "192.168.1.2/32"]
