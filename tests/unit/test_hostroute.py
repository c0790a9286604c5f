"""BPF host routing: the writer's layouts against bpf/lib/fwd_structs.h and the manifests, and the real
host and lxc programs run on crafted packets (BPF_PROG_TEST_RUN) with maps the writer filled: a
packet for a pod of this node is redirected with the pod's MACs and TTL - 1 (checksum still valid);
anything else goes on to the stack untouched."""
import json
import os
import re
import socket
import struct
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, hostroute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF = os.path.join(REPO, "bpf")
BUILD = os.path.join(BPF, "build")
TC_ACT_REDIRECT = 7
TCX_NEXT = 0xFFFFFFFF

POD_MAC, HOST_MAC = "0a:58:0a:f4:0b:05", "6e:11:22:33:44:55"
LO = socket.if_nametoindex("lo")
PODS = {"cidr": "10.244.11.0/24", "nodes": [{"name": "n2", "underlay_ip": "192.168.1.12", "pod_cidr": "10.244.12.0/24"}]}


def _rec(ip="10.244.11.5/24", host_if="lo", mac=POD_MAC, state="ready"):
    return {"container_id": "c1", "ifname": "eth0", "ips": [ip], "host_interface": host_if, "mac": mac,
            "host_mac": HOST_MAC, "state": state}


def test_layouts_match_the_header_and_the_manifests():
    text = open(os.path.join(BPF, "lib", "fwd_structs.h")).read()
    found = dict((m.group(1), (m.group(2), int(m.group(3))))
                 for m in re.finditer(r"(\w+(?: \w+)?):.*?py: \"(\S+)\" \((\d+) bytes\)", text))
    ours = {"kln_endpoints4 key": hostroute.EP_KEY, "kln_endpoints4 value": hostroute.EP_VALUE,
            "kln_pod_cidr4 key": hostroute.CIDR_KEY, "kln_pod_cidr4 value": hostroute.CIDR_VALUE}
    for what, st in ours.items():
        assert found[what] == (st.format, st.size), what
    for obj in hostroute.OBJECTS:
        m = json.load(open(os.path.join(BPF, "%s.manifest.json" % obj)))
        for name in (hostroute.ENDPOINTS, hostroute.CIDRS):
            spec = m["maps"][name]
            assert spec["shared"] and spec["version"] == hostroute.VERSIONS[name]
            assert spec["max_entries"] == hostroute.MAX_ENTRIES[name]
            k, v = ours["%s key" % name], ours["%s value" % name]
            assert (spec["key_size"], spec["value_size"]) == (k.size, v.size), (obj, name)


def test_entries_of_records_and_pods():
    e = hostroute.endpoint_entries(_rec())
    assert list(e) == [socket.inet_aton("10.244.11.5")]
    assert hostroute.EP_VALUE.unpack(e[socket.inet_aton("10.244.11.5")]) == (
        LO, bytes.fromhex(POD_MAC.replace(":", "")), bytes.fromhex(HOST_MAC.replace(":", "")))
    # gone interface, no MAC, not ready, IPv6 only: nothing (the stack forwards)
    assert hostroute.endpoint_entries(_rec(host_if="nosuchif0")) == {}
    assert hostroute.endpoint_entries(_rec(mac=None)) == {}
    assert hostroute.endpoint_entries(_rec(state="invalid")) == {}
    assert hostroute.endpoint_entries(_rec(ip="fd00::5/64")) == {}
    c = hostroute.cidr_entries(PODS)
    assert sorted(hostroute._cidr_text(k, v) for k, v in c.items()) == ["10.244.11.0/24 (local)", "10.244.12.0/24"]
    assert hostroute.cidr_entries(None) == {}


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(os.path.join(BUILD, "host.o")),
                                reason="needs root and the objects of bpf/build (make -C bpf)")


@pytest.fixture
def loaded(tmp_path):
    """The host and lxc objects loaded into a private bpffs with the shared maps where the writer keeps
    them: (globals dir, {program: prog fd})."""
    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    fds = {}
    try:
        gdir = str(fs / "globals")
        os.mkdir(gdir)
        for name, st in ((hostroute.ENDPOINTS, (4, 16, 1, "hash")), (hostroute.CIDRS, (8, 4, 1, "lpm_trie"))):
            with bpfsys.map_create(st[3], st[0], st[1], 64, st[2], name) as fd:
                bpfsys.obj_pin(fd, hostroute.pin(gdir, name))
        for obj, prog in (("host", "kln_from_netdev"), ("lxc", "kln_from_container")):
            d = str(fs / obj)
            subprocess.run(["bpftool", "prog", "loadall", os.path.join(BUILD, obj + ".o"), d, "type", "tc",
                            "map", "name", hostroute.ENDPOINTS, "pinned", hostroute.pin(gdir, hostroute.ENDPOINTS),
                            "map", "name", hostroute.CIDRS, "pinned", hostroute.pin(gdir, hostroute.CIDRS)],
                           check=True, capture_output=True)
            fds[prog] = bpfsys.obj_get(os.path.join(d, prog))
        yield gdir, fds
    finally:
        for fd in fds.values():
            os.close(fd)
        subprocess.run(["umount", str(fs)], check=False)


def _csum(hdr):
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _packet(dst, ttl=64, ethertype=0x0800):
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 4, 1, 0, ttl, 17, 0,
                               socket.inet_aton("10.244.12.9"), socket.inet_aton(dst)))
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    udp = struct.pack("!HHHH", 40000, 8080, 12, 0) + b"ping"
    return b"\xaa" * 6 + b"\xbb" * 6 + struct.pack("!H", ethertype) + bytes(ip) + udp


@needs_root
@pytest.mark.parametrize("prog", ["kln_from_netdev", "kln_from_container"])
def test_a_packet_for_a_pod_of_this_node_goes_into_the_pod(loaded, prog):
    gdir, fds = loaded
    changes = hostroute.sync(gdir, PODS, [_rec(), _rec(ip="10.244.11.6/24", host_if="nosuchif0")])
    assert sorted(changes) == sorted(["kln_pod_cidr4: add 10.244.11.0/24 (local)", "kln_pod_cidr4: add 10.244.12.0/24",
                                      "kln_endpoints4: add 10.244.11.5 -> ifindex %d mac %s host %s"
                                      % (LO, POD_MAC, HOST_MAC)])
    assert hostroute.sync(gdir, PODS, [_rec()]) == []            # the same again: nothing to do
    rc, out = bpfsys.prog_test_run(fds[prog], _packet("10.244.11.5"))
    assert rc == TC_ACT_REDIRECT
    assert out[:6] == bytes.fromhex(POD_MAC.replace(":", "")) and out[6:12] == bytes.fromhex(HOST_MAC.replace(":", ""))
    assert out[14 + 8] == 63 and _csum(out[14:34]) == 0         # TTL - 1, the header checksum still right
    assert out[34:] == _packet("10.244.11.5")[34:]
    # not a pod of this node, about to expire, not IPv4: on to the stack, unchanged
    for pkt in (_packet("10.244.11.6"), _packet("10.244.11.5", ttl=1), _packet("10.244.11.5", ethertype=0x0806),
                _packet("192.168.1.11")):
        rc, out = bpfsys.prog_test_run(fds[prog], pkt)
        assert (rc, out) == (TCX_NEXT, pkt)
    # the CNI plugin's DEL takes the pod out at once; an apply puts back only what the records say
    hostroute.remove_endpoint(gdir, _rec())
    assert bpfsys.prog_test_run(fds[prog], _packet("10.244.11.5"))[0] == TCX_NEXT
    hostroute.add_endpoint(gdir, _rec())
    assert bpfsys.prog_test_run(fds[prog], _packet("10.244.11.5"))[0] == TC_ACT_REDIRECT
    assert hostroute.sync(gdir, PODS, [], check=True) == [
        "kln_endpoints4: delete 10.244.11.5 -> ifindex %d mac %s host %s" % (LO, POD_MAC, HOST_MAC)]
    assert bpfsys.prog_test_run(fds[prog], _packet("10.244.11.5"))[0] == TC_ACT_REDIRECT   # check mode wrote nothing
    hostroute.sync(gdir, PODS, [])
    assert bpfsys.prog_test_run(fds[prog], _packet("10.244.11.5"))[0] == TCX_NEXT


def test_writer_refuses_when_the_maps_are_not_pinned(tmp_path):
    with pytest.raises(hostroute.HostRouteError, match="not loaded"):
        hostroute.sync(str(tmp_path), PODS, [])
    assert len(hostroute.sync(str(tmp_path), PODS, [_rec()], check=True)) == 3
    hostroute.add_endpoint(str(tmp_path), _rec())       # BPF host routing off: the plugin has nothing to do
    hostroute.remove_endpoint(str(tmp_path), _rec())
