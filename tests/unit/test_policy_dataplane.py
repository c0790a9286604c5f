"""The policy dataplane on crafted packets: the real policy and overlay objects loaded through the loader into
a private bpffs, the maps written by the one node apply (policy/node.py) from policies, endpoint records and
the pod network, and the programs run with BPF_PROG_TEST_RUN. Each test asserts a verdict a pod would see
(let through, dropped) and the counter it leaves; layouts are held to the header and the manifests."""
import contextlib
import json
import os
import re
import socket
import struct
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, loader
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps, node

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF = os.path.join(REPO, "bpf")
BUILD = os.path.join(BPF, "build")
TCX_NEXT = 0xFFFFFFFF
SHOT = 2
LO = socket.if_nametoindex("lo")
OTHER_IF = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")[0]

PODS = {"cidr": "10.244.1.0/24", "underlay_ip": "192.168.1.11", "vxlan": {"vni": 1},
        "nodes": [{"name": "n2", "underlay_ip": "192.168.1.12", "pod_cidr": "10.244.2.0/24", "tunnel_identity": True},
                  {"name": "n3", "underlay_ip": "192.168.1.13", "pod_cidr": "10.244.3.0/24", "tunnel_identity": False}]}
CLIENT, SERVER, OTHER = "10.244.1.5", "10.244.1.6", "10.244.1.7"
REMOTE = "10.244.2.9"       # a pod of n2 the last play knew
UNKNOWN = "10.244.2.77"     # a pod n2 made since


def _rec(name, ip, labels, host_if="lo", ports=None):
    return {"container_id": "c-" + name, "ifname": "eth0", "namespace": "demo", "name": name, "labels": labels,
            "ips": [ip + "/24"], "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "host_interface": host_if, "state": "ready"}


RECORDS = [_rec("client", CLIENT, {"app": "client"}), _rec("server", SERVER, {"app": "server"}),
           _rec("other", OTHER, {"app": "other"})]


def _state(policies=(), endpoints=()):
    return {"schema": 1, "node": "n1", "policies": list(policies),
            "cluster": {"namespaces": {"demo": {"team": "a"}}, "endpoints": list(endpoints), "kube_apiserver": []}}


REMOTE_EP = {"namespace": "demo", "name": "remote", "node": "n2", "labels": {"app": "client"}, "ips": [REMOTE],
             "ports": []}


def _np(name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "demo"}, "spec": spec}


def _cnp(name, spec):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "demo"}, "spec": spec}


SERVER_FROM_CLIENT = _np("server-from-client", {
    "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                 "ports": [{"protocol": "TCP", "port": "http"}]}]})

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(os.path.join(BUILD, "policy.o")),
                                reason="needs root and the objects of bpf/build (make -C bpf)")


def test_layouts_match_the_header_and_the_manifests():
    text = open(os.path.join(BPF, "lib", "policy_structs.h")).read()
    found = dict((m.group(1), (m.group(2), int(m.group(3))))
                 for m in re.finditer(r"(\w+(?: and \w+)? (?:key|value)):.*?py: \"(\S+)\" \((\d+) bytes\)", text))
    ours = {"kln_policy_ep4 key": maps.EP_KEY, "kln_policy_ep4 value": maps.EP_VALUE, "kln_policy4 key": maps.POL_KEY,
            "kln_policy4 value": maps.POL_VALUE, "kln_ipcache4 and kln_cidr_ident4 key": maps.IPC_KEY,
            "kln_ipcache4 and kln_cidr_ident4 value": maps.IPC_VALUE, "kln_ct4 key": maps.CT_KEY,
            "kln_ct4 value": maps.CT_VALUE, "kln_policy_stat key": maps.STAT_KEY,
            "kln_policy_stat value": maps.STAT_VALUE, "kln_tunnel4 value": maps.TUN_VALUE}
    for what, st in ours.items():
        assert found.get(what) == (st.format, st.size), (what, found.get(what))
    for obj in ("policy", "overlay"):
        m = json.load(open(os.path.join(BPF, "%s.manifest.json" % obj)))
        for name, (ks, vs) in maps.SIZES.items():
            if name == maps.TUNNEL and obj == "policy":
                continue
            spec = m["maps"][name]
            assert spec["shared"] and spec["version"] == maps.VERSIONS[name], (obj, name)
            assert (spec["key_size"], spec["value_size"], spec["max_entries"]) == (ks, vs, maps.MAX_ENTRIES[name])


def test_port_ranges_become_exact_prefixes():
    for lo, hi in ((80, 80), (80, 81), (1, 65535), (1000, 2047), (1023, 1025), (0, 65535), (8000, 8999)):
        covered = set()
        for port, bits in maps.port_prefixes(lo, hi):
            block = set(range(port, port + (1 << (16 - bits))))
            assert not covered & block
            covered |= block
        assert covered == set(range(lo, hi + 1))
    assert maps.port_prefixes(80, 80) == [(80, 16)]
    assert maps.port_prefixes(0, 65535) == [(0, 0)]


def test_an_allow_under_a_deny_of_the_same_peer_is_not_written():
    e = {"direction": "ingress", "identity": 300, "by_address": False, "protocol": 6, "port": 80, "end_port": 80,
         "deny": False, "rule": "a"}
    d = dict(e, port=0, end_port=0, deny=True, rule="d")
    keys = maps.endpoint_keys("10.0.0.1", [e, d], {})
    assert list(keys.values()) == [(True, 2)]               # the deny of all TCP ports answers port 80 too
    narrow_deny = dict(e, deny=True, rule="d")
    broad_allow = dict(e, protocol=0, port=0, end_port=0)
    keys = maps.endpoint_keys("10.0.0.1", [narrow_deny, broad_allow], {})
    assert sorted(keys.values()) == [(False, 2), (True, 1)]  # the narrower deny stays under the allow


# ---- packets -----------------------------------------------------------------------------------

def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip(src, dst, proto, payload):
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    return bytes(ip) + payload


def _eth(l3):
    return b"\xaa" * 6 + b"\xbb" * 6 + b"\x08\x00" + l3


def tcp(src, dst, sport, dport, flags=0x02):
    return _eth(_ip(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 1024, 0, 0)))


def udp(src, dst, sport, dport):
    return _eth(_ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 12, 0) + b"ping"))


def icmp_unreachable(src, dst, about):
    inner = about[14:14 + 28]
    return _eth(_ip(src, dst, 1, struct.pack("!BBHI", 3, 3, 0, 0) + inner))


def _ctx(ifindex=LO, mark=0):
    c = bytearray(bpfsys.SKB_CTX_SIZE)
    struct.pack_into("=I", c, bpfsys.SKB_CTX_MARK, mark)
    struct.pack_into("=I", c, bpfsys.SKB_CTX_IFINDEX, ifindex)
    return bytes(c)


class Node:
    def __init__(self, root, progs, tmp):
        self.root, self.progs, self.tmp = root, progs, tmp
        self.gdir = os.path.join(root, loader.GLOBALS)
        self.compiled = str(tmp / "compiled.json")

    def apply(self, state, records=None, check=False):
        return node.apply(self.gdir, node.validate_state(state), records or RECORDS, PODS, check=check,
                          compiled_path=self.compiled, tunnel=True, lock=False)

    def run(self, prog, pkt, ifindex=LO, mark=0):
        """(verdict, mark afterwards)."""
        rc, _out, ctx = bpfsys.prog_test_run(self.progs[prog], pkt, ctx=_ctx(ifindex, mark))
        return rc, struct.unpack_from("=I", ctx, bpfsys.SKB_CTX_MARK)[0]

    def stat(self, ip, reason, direction):
        return maps.stats(self.gdir).get((ip, reason, direction), (0, 0))[0]


@contextlib.contextmanager
def loaded_node(tmp_path, map_sizes=None):
    """The policy and overlay objects loaded through the loader into a private bpffs: a Node with their programs."""
    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    fds = {}
    try:
        root = str(fs / "kln")
        objs = [loader.object_spec(n, os.path.join(BUILD, n + ".o"), targets={"devices": []}, map_sizes=map_sizes)
                for n in ("policy", "overlay")]
        loader.ensure(root, objs, prune=True)
        for obj, progs in (("policy", ("kln_pol_from_container", "kln_pol_to_container", "kln_pol_from_netdev")),
                           ("overlay", ("kln_to_overlay", "kln_from_overlay"))):
            d = [x for x in os.listdir(os.path.join(root, obj)) if x.startswith(loader.PROGS_PREFIX)][0]
            for p in progs:
                fds[p] = bpfsys.obj_get(os.path.join(root, obj, d, p))
        yield Node(root, fds, tmp_path)
    finally:
        for fd in fds.values():
            os.close(fd)
        subprocess.run(["umount", str(fs)], check=False)


@pytest.fixture
def dp(tmp_path):
    with loaded_node(tmp_path) as node:
        yield node


@needs_root
def test_without_policies_everything_passes_and_local_delivery_is_marked(dp):
    res = dp.apply(_state())
    assert res["changed"] and res["endpoints"] == 3
    written = os.stat(dp.compiled)
    assert dp.apply(_state())["changed"] is False                       # the same again: nothing written
    again = os.stat(dp.compiled)
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 40000, 8080)) == (TCX_NEXT, 0x4c)
    assert dp.run("kln_pol_from_container", tcp(CLIENT, "10.244.2.9", 40000, 8080)) == (TCX_NEXT, 0)
    assert dp.run("kln_pol_to_container", tcp(CLIENT, SERVER, 40000, 8080), mark=0x4c) == (TCX_NEXT, 0)
    assert dp.stat(CLIENT, 0, maps.CT_EGRESS) == 2 and dp.stat(SERVER, 0, maps.CT_INGRESS) == 1


@needs_root
def test_a_source_address_that_is_not_the_pods_is_dropped(dp):
    dp.apply(_state())
    rc, _m = dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 40000, 8080), ifindex=socket.if_nametoindex(OTHER_IF))
    assert rc == SHOT and dp.stat(CLIENT, 132, maps.CT_EGRESS) == 1
    assert dp.run("kln_pol_from_container", tcp("10.244.1.99", SERVER, 40000, 8080))[0] == SHOT


@needs_root
def test_ingress_rules_by_identity_named_port_and_counted_drops(dp):
    res = dp.apply(_state([SERVER_FROM_CLIENT], [REMOTE_EP]))
    assert any("demo/server: ingress now isolated" in line for line in res["diff"]), res["diff"]
    assert dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 40001, 8080))[0] == TCX_NEXT
    assert dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 40001, 9090))[0] == SHOT
    assert dp.run("kln_pol_from_container", tcp(OTHER, SERVER, 40001, 8080))[0] == SHOT
    assert dp.stat(SERVER, 133, maps.CT_INGRESS) == 2
    # from another node through the stack: by the ipcache (a pod the play knew), else world
    assert dp.run("kln_pol_to_container", tcp(REMOTE, SERVER, 40002, 8080))[0] == TCX_NEXT
    assert dp.run("kln_pol_to_container", tcp(UNKNOWN, SERVER, 40002, 8080))[0] == SHOT
    # ... unless the tunnel carried its identity (overlay.c stamps it into the mark): then by that
    ident = res["output"]["endpoints"]["demo/client"]["identity"]
    assert dp.run("kln_pol_to_container", tcp(UNKNOWN, SERVER, 40003, 8080), mark=(ident << 8) | 0x4b) == (TCX_NEXT, 0)
    # the node itself always reaches its pods; a packet from another node's pod arriving on the underlay too
    assert dp.run("kln_pol_to_container", tcp("10.244.1.1", SERVER, 40004, 9090))[0] == TCX_NEXT
    assert dp.run("kln_pol_from_netdev", tcp(REMOTE, SERVER, 40005, 8080)) == (TCX_NEXT, 0x4c)
    assert dp.run("kln_pol_from_netdev", tcp(UNKNOWN, SERVER, 40005, 8080))[0] == SHOT
    assert dp.run("kln_pol_from_netdev", tcp(REMOTE, "192.168.1.11", 40005, 22)) == (TCX_NEXT, 0)


@needs_root
def test_replies_pass_and_a_reply_never_opens_a_connection(dp):
    deny_egress = _np("server-no-egress", {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Egress"]})
    dp.apply(_state([SERVER_FROM_CLIENT, deny_egress]))
    syn = tcp(CLIENT, SERVER, 40010, 8080)
    assert dp.run("kln_pol_from_container", syn)[0] == TCX_NEXT
    assert dp.run("kln_pol_from_container", tcp(SERVER, CLIENT, 8080, 40010, 0x12))[0] == TCX_NEXT   # SYN-ACK
    # the server opening a connection of its own to the client: its egress is closed
    assert dp.run("kln_pol_from_container", tcp(SERVER, CLIENT, 8080, 40011, 0x12))[0] == SHOT
    # and the client's port 40010 does not take packets to a server port nobody asked for
    assert dp.run("kln_pol_from_container", tcp(SERVER, CLIENT, 9999, 40010, 0x12))[0] == SHOT
    # an ICMP error about the allowed connection is related: it passes
    assert dp.run("kln_pol_from_container", icmp_unreachable(SERVER, CLIENT, syn))[0] == TCX_NEXT
    assert dp.run("kln_pol_from_container", icmp_unreachable(SERVER, CLIENT, tcp(CLIENT, SERVER, 1, 2)))[0] == SHOT


@needs_root
def test_deny_wins_and_a_policy_change_swaps_the_rules_at_once(dp):
    allow_all = _cnp("allow-all", {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]})
    dp.apply(_state([allow_all]))
    assert dp.run("kln_pol_from_container", udp(CLIENT, SERVER, 5000, 53))[0] == TCX_NEXT
    deny = _cnp("deny-dns", {"endpointSelector": {"matchLabels": {"app": "server"}},
                             "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                              "toPorts": [{"ports": [{"port": "50", "endPort": 60, "protocol": "ANY"}]}]}]})
    before = maps.endpoints(dp.gdir)[SERVER]["generation"]
    res = dp.apply(_state([allow_all, deny]))
    assert any("deny from identity" in line for line in res["diff"]), res["diff"]
    after = maps.endpoints(dp.gdir)
    assert after[SERVER]["generation"] != before
    gens = set(e[4] for e in maps.policy_entries(dp.gdir, SERVER))
    assert gens == {bool(after[SERVER]["generation"])}                  # the old generation is gone
    # the established flow is judged again: the new deny stops it; other ports and peers are not touched
    assert dp.run("kln_pol_from_container", udp(CLIENT, SERVER, 5000, 53))[0] == SHOT
    assert dp.stat(SERVER, 181, maps.CT_INGRESS) == 1
    assert dp.run("kln_pol_from_container", udp(CLIENT, SERVER, 5000, 61))[0] == TCX_NEXT
    assert dp.run("kln_pol_from_container", udp(OTHER, SERVER, 5000, 53))[0] == TCX_NEXT
    # back to allow-all only: the flow goes on
    dp.apply(_state([allow_all]))
    assert dp.run("kln_pol_from_container", udp(CLIENT, SERVER, 5000, 53))[0] == TCX_NEXT


@needs_root
def test_ipblock_matches_pods_by_address_and_cilium_cidrs_do_not(dp):
    np_block = _np("server-from-block", {"podSelector": {"matchLabels": {"app": "server"}},
                                         "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/29",
                                                                            "except": ["10.244.1.7/32"]}}]}]})
    dp.apply(_state([np_block]))
    assert dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 41000, 80))[0] == TCX_NEXT     # .5: in the block
    assert dp.run("kln_pol_from_container", tcp(OTHER, SERVER, 41000, 80))[0] == SHOT          # .7: the except
    cnp_cidr = _cnp("server-from-cidr", {"endpointSelector": {"matchLabels": {"app": "server"}},
                                         "ingress": [{"fromCIDR": ["10.244.1.0/29", "198.51.100.0/24"]}]})
    dp.apply(_state([cnp_cidr]))
    assert dp.run("kln_pol_from_container", tcp(CLIENT, SERVER, 41001, 80))[0] == SHOT         # a pod: not by CIDR
    assert dp.run("kln_pol_to_container", tcp("198.51.100.7", SERVER, 41001, 80))[0] == TCX_NEXT
    assert dp.run("kln_pol_to_container", tcp("203.0.113.7", SERVER, 41001, 80))[0] == SHOT


@needs_root
def test_the_tunnel_key_names_the_node_and_a_pod_leaving_has_no_tunnel_without_a_node(dp):
    dp.apply(_state())
    assert dp.run("kln_to_overlay", tcp(CLIENT, REMOTE, 42000, 80))[0] == TCX_NEXT
    assert dp.run("kln_to_overlay", tcp(CLIENT, "10.244.3.4", 42000, 80))[0] == TCX_NEXT
    assert dp.run("kln_to_overlay", tcp(CLIENT, "10.244.9.4", 42000, 80))[0] == SHOT
    assert dp.stat("0.0.0.0", 160, maps.CT_EGRESS) == 1
    entries = dict((maps._prefix_text(k), maps.TUN_VALUE.unpack(v)) for k, v in maps.read(dp.gdir, maps.TUNNEL).items())
    assert entries == {"10.244.2.0/24": (socket.inet_aton("192.168.1.12"), 0),
                       "10.244.3.0/24": (socket.inet_aton("192.168.1.13"), 1)}
    # a packet that did not come through the tunnel has no identity to read
    assert dp.run("kln_from_overlay", tcp(REMOTE, SERVER, 42000, 80)) == (TCX_NEXT, 0)


@needs_root
def test_what_the_node_command_shows(dp):
    dp.apply(_state([SERVER_FROM_CLIENT]))
    dp.run("kln_pol_from_container", tcp(OTHER, SERVER, 43000, 8080))
    rows = node.identity_rows(dp.compiled)
    kinds = dict((r["identity"], r["kind"]) for r in rows)
    assert kinds[1] == "reserved" and kinds[2] == "reserved"
    client = [r for r in rows if "k8s:app=client" in r["labels"]][0]
    assert "k8s:io.kubernetes.pod.namespace=demo" in client["labels"]
    assert "k8s:io.cilium.k8s.namespace.labels.team=a" in client["labels"]
    assert str(client["identity"]) in node.format_identities(rows)
    for which in ("demo/server", SERVER, "c-server"):
        p = node.endpoint_policy(dp.gdir, which, RECORDS, dp.compiled)
        assert p["endpoint"] == "demo/server" and p["ingress_enforced"] and not p["egress_enforced"]
    assert p["entries"] == [{"direction": "ingress", "action": "allow", "identity": client["identity"], "by_address": False,
                             "peer": "k8s:app=client,k8s:io.kubernetes.pod.namespace=demo,...", "l4": "TCP 8080",
                             "rule": "NetworkPolicy demo/server-from-client ingress[0]"}]
    assert {"direction": "ingress", "reason": "POLICY_DENIED", "code": 133, "packets": 1, "bytes": 54,
            "description": "policy denied (no rule allows it)"} in p["counters"]
    text = node.format_endpoint_policy(p)
    assert "POLICY_DENIED" in text and "NetworkPolicy demo/server-from-client ingress[0]" in text
    assert node.endpoint_policy(dp.gdir, "demo/nobody", RECORDS, dp.compiled) is None


@needs_root
def test_tcx_programs_take_their_place_by_order_whatever_the_attach_order(tmp_path):
    """On one hook: the edge (10), the policy (20) and host routing (50) end up in that order when attached
    as 50, 10, 20 (the loader's and the CNI plugin's one way to link a program to a device)."""
    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    subprocess.run(["ip", "link", "add", "nsuord0", "type", "veth", "peer", "name", "nsuord1"], check=True)
    links = []
    try:
        subprocess.run(["bpftool", "prog", "loadall", os.path.join(BUILD, "policy.o"), str(fs / "p")], check=True,
                       capture_output=True)
        subprocess.run(["bpftool", "prog", "loadall", os.path.join(BUILD, "tests", "ep_count.o"), str(fs / "e")],
                       check=True, capture_output=True)
        ifindex = socket.if_nametoindex("nsuord0")
        progs = [("e/kln_ep_from_pod", 50), ("p/kln_pol_from_container", 10), ("p/kln_pol_from_netdev", 20)]
        orders = {"kln_ep_from_pod": 50, "kln_pol_from_co": 10, "kln_pol_from_ne": 20}
        ids = []
        for path, order in progs:
            with bpfsys.obj_get(str(fs / path)) as pfd:
                ids.append(bpfsys.prog_info(pfd)["id"])
                links.append(loader._device_link(pfd, ifindex, {"type": "tcx_ingress", "order": order}, orders))
        assert bpfsys.prog_query(ifindex, "tcx_ingress") == [ids[1], ids[2], ids[0]]
    finally:
        for lfd in links:
            os.close(lfd)
        subprocess.run(["ip", "link", "del", "nsuord0"], check=False)
        subprocess.run(["umount", str(fs)], check=False)
