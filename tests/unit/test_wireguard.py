"""WireGuard: keys (X25519 against RFC 7748, files and modes, rotation), and two real wireguard-go
devices in two network namespaces joined by a veth: each change four times (check, apply, apply
again, check again), a ping through the tunnel, a peer updated in place keeps its session, bad input
refused with the device untouched, the private key in no module output (-vvv), the device removed."""
import base64
import binascii
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import wireguard as wg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, ".collections")


def test_x25519_rfc7748_vectors():
    alice = binascii.unhexlify("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pub = binascii.unhexlify("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert binascii.hexlify(wg.x25519(alice, wg._bytes(9))) == \
        b"8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert binascii.hexlify(wg.x25519(alice, bob_pub)) == \
        b"4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.skipif(not shutil.which("wg"), reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey():
    priv = wg._new_private()
    out = subprocess.run(["wg", "pubkey"], input=priv + "\n", capture_output=True, text=True, check=True).stdout
    assert wg.public_key(priv) == out.strip()


def test_keys_made_rotated_retired(tmp_path):
    d = str(tmp_path / "state")
    check = wg.ensure_key(d, "kln_wg0", check=True)
    assert check["changed"] and check["public_key"] is None and not os.path.exists(d)
    first = wg.ensure_key(d, "kln_wg0")
    paths = wg.key_paths(d, "kln_wg0")
    assert first["changed"] and wg.parse_key(first["public_key"], "x") == first["public_key"]
    assert oct(os.stat(paths["private"]).st_mode & 0o777) == "0o600"
    assert oct(os.stat(paths["dir"]).st_mode & 0o777) == "0o700"
    assert first["public_key"] not in json.dumps(dict(first, public_key=None, before=None, after=None))
    with open(paths["private"]) as f:
        secret = f.read().strip()
    assert secret not in json.dumps(first)
    assert not wg.ensure_key(d, "kln_wg0")["changed"]
    rot = wg.ensure_key(d, "kln_wg0", rotate=True)
    assert rot["changed"] and rot["previous_public_key"] == first["public_key"] != rot["public_key"]
    again = wg.ensure_key(d, "kln_wg0", rotate=True)          # a rotation in progress is not started again
    assert not again["changed"] and again["public_key"] == rot["public_key"]
    assert oct(os.stat(paths["previous"]).st_mode & 0o777) == "0o600"
    done = wg.ensure_key(d, "kln_wg0", retire=True)
    assert done["changed"] and done["previous_public_key"] is None and not os.path.exists(paths["previous"])
    assert not wg.ensure_key(d, "kln_wg0", retire=True)["changed"]
    os.chmod(paths["private"], 0o644)
    with pytest.raises(wg.WgError, match="must be 0600"):
        wg.ensure_key(d, "kln_wg0")
    os.chmod(paths["private"], 0o600)
    assert wg.remove_key(d, "kln_wg0")["changed"] and not os.path.exists(paths["dir"])


@pytest.mark.parametrize("peers,message", [
    ([{"public_key": "abc"}], "peers[0].public_key: not a WireGuard key"),
    ([{"public_key": "A" * 43 + "="}, {"public_key": "A" * 43 + "="}], "is also the key of peers[0] (two nodes with the same key)"),
    ([{"public_key": "A" * 43 + "=", "allowed_ips": ["10.1.0.0/16"]},
      {"public_key": "B" * 43 + "=", "allowed_ips": ["10.1.2.0/24"]}], "peers[1].allowed_ips[0]: 10.1.2.0/24 overlaps 10.1.0.0/16"),
    ([{"public_key": "A" * 43 + "=", "endpoint": "node2:51871"}], "peers[0].endpoint: 'node2' is not an IP address"),
    ([{"public_key": "A" * 43 + "=", "allowed_ips": ["10.1.0.300/24"]}], "peers[0].allowed_ips[0]"),
])
def test_bad_peers_name_the_field(peers, message):
    with pytest.raises(wg.WgError) as e:
        wg.normalize({"name": "kln_wg0", "mtu": 1420, "peers": peers})
    assert message in str(e.value)


def test_bad_device_fields():
    with pytest.raises(wg.WgError, match="name: 'kln_wireguard_dev0' is not an interface name"):
        wg.normalize({"name": "kln_wireguard_dev0", "mtu": 1420})
    with pytest.raises(wg.WgError, match="underlay_interface: required for mtu 0"):
        wg.normalize({"name": "kln_wg0"})
    with pytest.raises(wg.WgError, match="listen_port"):
        wg.normalize({"name": "kln_wg0", "mtu": 1420, "listen_port": 70000})


# ---- real devices --------------------------------------------------------------------------------

needs_wg = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go") or not shutil.which("wg"),
                              reason="needs root, wireguard-go and wireguard-tools")


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check)


@pytest.fixture
def pair(tmp_path):
    """Two namespaces joined by a veth (10.250.0.1 and .2, MTU 1500), a key pair each; torn down after."""
    tag = uuid.uuid4().hex[:6]
    ns = ["nsu-wg%s-a" % tag, "nsu-wg%s-b" % tag]
    names = ["kwa%s" % tag, "kwb%s" % tag]          # distinct: the UAPI socket directory is per file system
    for n in ns:
        _ip("netns", "add", n)
    try:
        _ip("link", "add", "nsu%sa" % tag, "netns", ns[0], "type", "veth", "peer", "name", "nsu%sb" % tag, "netns", ns[1])
        for i, n in enumerate(ns):
            dev = "nsu%s%s" % (tag, "ab"[i])
            _ip("-n", n, "addr", "add", "10.250.0.%d/24" % (i + 1), "dev", dev)
            _ip("-n", n, "link", "set", dev, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        state = str(tmp_path / "wg")
        keys = [wg.ensure_key(state, nm) for nm in names]
        yield {"ns": ns, "names": names, "under": ["nsu%sa" % tag, "nsu%sb" % tag], "state": state, "keys": keys}
    finally:
        for i, n in enumerate(ns):
            _ip("-n", n, "link", "del", names[i], check=False)
            _ip("netns", "del", n, check=False)


DRIVER = r"""
import json, sys
sys.path.insert(0, %r)
from ansible_collections.kldload.netstack.plugins.module_utils import wireguard as wg
args = json.loads(sys.argv[1])
try:
    if args["op"] == "apply":
        out = wg.apply(wg.normalize(args["cfg"]), check=args.get("check", False))
    elif args["op"] == "read":
        out = wg.public_view(wg.read(args["name"]))
    elif args["op"] == "routes":
        from ansible_collections.kldload.netstack.plugins.module_utils import routes
        out = {"changes": routes.sync(routes.normalize(args["routes"]), check=args.get("check", False),
                                      rules=routes.normalize_rules(args["rules"]))}
    elif args["op"] == "status":
        out = {"status": wg.status(args["name"]), "text": wg.format_status(wg.status(args["name"]))}
    else:
        out = wg.remove(args["name"])
except wg.WgError as e:
    out = {"error": str(e)}
print(json.dumps(out))
""" % COLLECTIONS


def _in(netns, **args):
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", DRIVER, json.dumps(args)],
                       capture_output=True, text=True, check=False, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def _cfg(pair, i, peer_allowed=None, **extra):
    j = 1 - i
    cfg = {"name": pair["names"][i], "underlay_interface": pair["under"][i],
           "private_key_file": pair["keys"][i]["key_file"],
           "peers": [{"public_key": pair["keys"][j]["public_key"], "endpoint": "10.250.0.%d:51871" % (j + 1),
                      "allowed_ips": peer_allowed or ["10.251.%d.0/24" % (j + 1)], "name": "node%d" % j}]}
    cfg.update(extra)
    return cfg


def _echo(pair, src="10.251.1.1", dst="10.251.2.1", port=7777, payload=b"through-the-tunnel"):
    """A UDP datagram from ``src`` (namespace a; None: the address routing picks) to an echo server on ``dst``
    (b) and back: the echo, or the client's error."""
    srv = subprocess.Popen(["ip", "netns", "exec", pair["ns"][1], sys.executable, "-c",
                            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            "s.bind((%r, %d)); print('up', flush=True)\n"
                            "d, a = s.recvfrom(100); s.sendto(d, a)" % (dst, port)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "up"
        p = subprocess.run(["ip", "netns", "exec", pair["ns"][0], sys.executable, "-c",
                            "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            "%ss.settimeout(5)\n"
                            "s.sendto(%r, (%r, %d)); sys.stdout.write(s.recv(100).decode())"
                            % ("s.bind((%r, 0)); " % src if src else "", payload, dst, port)],
                           capture_output=True, text=True, check=False, timeout=30)
        return p.stdout.encode() if p.returncode == 0 else p.stderr.encode()
    finally:
        srv.kill()
        srv.wait()


@needs_wg
def test_two_userspace_devices_four_times_and_a_udp_echo_through_the_tunnel(pair):
    for i in (0, 1):
        ns, cfg = pair["ns"][i], _cfg(pair, i)
        check = _in(ns, op="apply", cfg=cfg, check=True)
        assert check["changed"] and check["backend"] == "userspace" and check["after"] is None
        assert _in(ns, op="read", name=cfg["name"]) is None             # check mode made nothing
        res = _in(ns, op="apply", cfg=cfg)
        assert res["changed"] and res["warnings"] and "wireguard-go" in res["warnings"][0]
        assert res["mtu"] == 1500 - 60 and res["after"]["listen_port"] == 51871
        assert res["after"]["public_key"] == pair["keys"][i]["public_key"]
        assert list(res["after"]["peers"]) == [pair["keys"][1 - i]["public_key"]]
        again = _in(ns, op="apply", cfg=cfg)
        assert not again["changed"], again["changes"]
        assert not _in(ns, op="apply", cfg=cfg, check=True)["changed"]
        _ip("-n", ns, "addr", "add", "10.251.%d.1/24" % (i + 1), "dev", cfg["name"])
        _ip("-n", ns, "route", "add", "10.251.%d.0/24" % (2 - i), "dev", cfg["name"])
    assert _echo(pair) == b"through-the-tunnel"
    st = _in(pair["ns"][0], op="read", name=pair["names"][0])
    peer = st["peers"][pair["keys"][1]["public_key"]]
    assert peer["latest_handshake"] > 0 and peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    assert pair["keys"][0]["public_key"] == st["public_key"]
    status = _in(pair["ns"][0], op="status", name=pair["names"][0])
    assert status["status"]["peer_count"] == 1 and status["status"]["backend"] == "userspace"
    assert 0 <= status["status"]["peers"][0]["handshake_age"] < 60
    assert "10.250.0.2:51871" in status["text"] and "handshake never" not in status["text"]
    # the peer's allowed IPs changed: updated in place - its session (handshake) is kept, nothing re-added
    wider = _cfg(pair, 0, peer_allowed=["10.251.2.0/24", "10.251.3.0/24"])
    res = _in(pair["ns"][0], op="apply", cfg=wider)
    assert [c.split(" ")[0] + " " + c.split(" ")[1] for c in res["changes"]] == ["update peer"], res["changes"]
    kept = res["after"]["peers"][pair["keys"][1]["public_key"]]
    assert kept["allowed_ips"] == ["10.251.2.0/24", "10.251.3.0/24"]
    assert kept["latest_handshake"] == peer["latest_handshake"]
    assert _echo(pair) == b"through-the-tunnel"
    # a peer no longer listed goes; the device stays
    res = _in(pair["ns"][0], op="apply", cfg=dict(wider, peers=[]))
    assert res["changes"] == ["remove peer %s" % pair["keys"][1]["public_key"]] and res["after"]["peers"] == {}


@needs_wg
def test_bad_input_leaves_the_running_device_untouched(pair):
    ns, cfg = pair["ns"][0], _cfg(pair, 0)
    _in(ns, op="apply", cfg=cfg)
    before = _in(ns, op="read", name=cfg["name"])
    other = base64.b64encode(os.urandom(32)).decode()
    bad = [
        (dict(cfg, peers=[dict(cfg["peers"][0], public_key="not-a-key")]), "peers[0].public_key: not a WireGuard key"),
        (dict(cfg, peers=[cfg["peers"][0], dict(cfg["peers"][0], allowed_ips=["10.251.9.0/24"])]), "same key"),
        (dict(cfg, peers=[cfg["peers"][0], {"public_key": other, "allowed_ips": ["10.251.2.128/25"]}]), "overlaps"),
        (dict(cfg, peers=[{"public_key": pair["keys"][0]["public_key"], "allowed_ips": ["10.9.0.0/16"]}]),
         "this node's own public key"),
        (dict(cfg, name="kln_wireguard_0123"), "is not an interface name"),
        (dict(cfg, name=pair["under"][0]), "exists and is not a WireGuard device (kind veth)"),
    ]
    for c, message in bad:
        res = _in(ns, op="apply", cfg=c)
        assert message in res.get("error", ""), (message, res)
    # a port in use by someone else
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                               "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                               "s.bind(('0.0.0.0', 51999)); print('up', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        res = _in(ns, op="apply", cfg=dict(cfg, listen_port=51999))
        assert "listen_port: UDP 51999 is in use" in res.get("error", ""), res
    finally:
        holder.kill()
        holder.wait()
    assert _in(ns, op="read", name=cfg["name"]) == before


@needs_wg
def test_modules_never_show_the_private_key(pair):
    """wireguard_key and wireguard_device through ansible at -vvv: the private key appears nowhere."""
    ns, cfg = pair["ns"][0], _cfg(pair, 0)
    with open(pair["keys"][0]["key_file"]) as f:
        secret = f.read().strip()
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_LOCALHOST_WARNING="false")
    bindir = os.path.dirname(sys.executable)
    outputs = []
    for mod, args in (("kldload.netstack.wireguard_key", {"interface": cfg["name"], "state_dir": pair["state"]}),
                      ("kldload.netstack.wireguard_device", cfg)):
        for extra in (["--check", "--diff"], ["--diff"], []):
            p = subprocess.run(["ip", "netns", "exec", ns, os.path.join(bindir, "ansible"), "localhost", "-i", "localhost,",
                                "-c", "local", "-vvv", "-e", "ansible_python_interpreter=%s" % sys.executable,
                                "-m", mod, "-a", json.dumps(args)] + extra,
                               env=env, capture_output=True, text=True, check=False, cwd=REPO)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            outputs.append(p.stdout + p.stderr)
    assert all(secret not in o for o in outputs)
    assert '"backend": "userspace"' in outputs[-1], outputs[-1][-2000:]
    assert pair["keys"][0]["public_key"] in outputs[-1], outputs[-1][-2000:]
    # removed: the device and its wireguard-go go
    res = _in(ns, op="remove", name=cfg["name"])
    assert res["changed"]
    for _i in range(150):
        if not os.path.exists(wg.uapi_socket(cfg["name"])):
            break
        time.sleep(0.1)
    assert _in(ns, op="read", name=cfg["name"]) is None
    assert not os.path.exists(wg.uapi_socket(cfg["name"])), "wireguard-go still serves %s" % cfg["name"]


def _udp_to_underlay(pair, marker):
    """A UDP datagram carrying ``marker`` from a's underlay address to an echo server on b's, while tcpdump
    records b's veth; (the echo, the capture's summary lines, its ASCII dump)."""
    pcap = "/tmp/nsu-wg-%s.pcap" % uuid.uuid4().hex[:6]
    dump = subprocess.Popen(["ip", "netns", "exec", pair["ns"][1], "tcpdump", "-i", pair["under"][1], "-nn", "-U",
                             "-w", pcap, "ip"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)                                   # tcpdump listening
        echo = _echo(pair, src=None, dst="10.250.0.2", port=7778, payload=marker.encode()).decode()
        time.sleep(1)
    finally:
        dump.terminate()
        dump.wait()
    lines = subprocess.run(["tcpdump", "-r", pcap, "-nn"], capture_output=True, text=True, check=False).stdout.splitlines()
    text = subprocess.run(["tcpdump", "-r", pcap, "-nn", "-A"], capture_output=True, text=True, check=False).stdout
    os.unlink(pcap)
    return echo, lines, text


@needs_wg
@pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump not installed")
def test_node_to_node_through_the_device_by_a_rule_that_skips_its_own_marked_packets(pair):
    """The other node's address routed into the device in table 220, a rule for every packet without the
    device's mark: the nodes' own datagram crosses encrypted (the capture sees UDP 51871 only, never the
    marker) while the device's packets to that same address leave by the veth; four times each; then the
    routes and rule removed, the datagram is plaintext again (the control)."""
    from ansible_collections.kldload.netstack.plugins.module_utils import routes
    rule = [{"priority": 30000, "table": routes.OWN_TABLE, "fwmark": 0x1e00, "invert": True}]
    for i in (0, 1):
        ns, j = pair["ns"][i], 1 - i
        cfg = _cfg(pair, i, peer_allowed=["10.250.0.%d/32" % (j + 1)], fwmark=0x1e00)
        assert _in(ns, op="apply", cfg=cfg)["changed"]
        assert _in(ns, op="status", name=cfg["name"])["status"]["fwmark"] == 0x1e00
        want = [{"dst": "10.250.0.%d/32" % (j + 1), "via": "10.250.0.%d" % (j + 1), "dev": cfg["name"], "onlink": True,
                 "src": "10.250.0.%d" % (i + 1), "table": routes.OWN_TABLE}]
        check = _in(ns, op="routes", routes=want, rules=rule, check=True)["changes"]
        assert check == ["add 10.250.0.%d/32 via 10.250.0.%d dev %s onlink src 10.250.0.%d table 220"
                         % (j + 1, j + 1, cfg["name"], i + 1), "add rule 30000: not fwmark 0x1e00 lookup 220"]
        assert "lookup 220" not in _ip("-n", ns, "rule").stdout                 # check mode made nothing
        assert _in(ns, op="routes", routes=want, rules=rule)["changes"] == check
        assert _in(ns, op="routes", routes=want, rules=rule)["changes"] == []
        assert _in(ns, op="routes", routes=want, rules=rule, check=True)["changes"] == []
        assert "not from all fwmark 0x1e00 lookup 220 proto 220" in _ip("-n", ns, "rule").stdout
    echo, lines, text = _udp_to_underlay(pair, "NSU-NODE-MARKER")
    assert echo == "NSU-NODE-MARKER"
    assert lines and all(".51871 " in ln and "UDP" in ln for ln in lines), lines
    assert "NSU-NODE-MARKER" not in text
    for i in (0, 1):
        changes = _in(pair["ns"][i], op="routes", routes=[], rules=[])["changes"]
        assert [c.split(" ")[0] for c in changes] == ["delete", "delete"], changes
        assert "lookup 220" not in _ip("-n", pair["ns"][i], "rule").stdout
    echo, lines, text = _udp_to_underlay(pair, "NSU-NODE-MARKER")
    assert echo == "NSU-NODE-MARKER" and "NSU-NODE-MARKER" in text           # the control: plaintext now
