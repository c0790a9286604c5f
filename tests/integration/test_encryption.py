"""WireGuard on the lab (netstack_encryption: wireguard): install four times (check, apply, apply,
check), pods reach pods across nodes in both routing modes, a capture on the underlay shows only
WireGuard's UDP and never the request's marker (and, with encryption off again, shows it), strict
mode drops and counts what would leave unencrypted when a node's device is down, verify is quiet,
the private key is 0600 and in no output."""
import json
import shlex
import time

import pytest

from conftest import Streams, changed_tasks, run_playbook
from test_pods import _pods, _recap

ON = ("-e", "netstack_encryption=wireguard")
QUICK = ("-e", "dataplane_verify_live=false")       # verify's WireGuard checks without the dataplane's live ones
MARKER = "NETSTACK-MARKER-7f3a9c"
PCAP = "/run/netstack-test-enc.pcap"


def _request(lab, src, dst, check=True):
    """A TCP request carrying MARKER from pod src to pod dst's workload server; its echo."""
    code = ("import socket; s = socket.create_connection(('%s', 8080), 4); s.recv(200); "
            "s.sendall(b'%s'); print(s.recv(200).decode())" % (dst["ip"], MARKER))
    return lab.sh(src["host"], "nsenter --net=%s python3 -c %s" % (shlex.quote(src["netns"]), shlex.quote(code)),
                  check=check, timeout=30)


def _captured(lab, host, fn):
    """Run fn() while tcpdump records IPv4 between the nodes on the node's underlay (not the LAN router's BFD and
    BGP: its own business); (summary lines, ASCII dump)."""
    dev = lab.hostvars[host]["netstack_underlay_interface"]
    nodes = " or ".join(lab.hostvars[h]["netstack_underlay_ip"] for h in lab.hosts())
    filt = shlex.quote("ip and src host (%s) and dst host (%s)" % (nodes, nodes))
    lab.sh(host, "rm -f %s; (timeout 20 tcpdump -i %s -nn -U -w %s %s >/dev/null 2>&1 &); sleep 1" % (PCAP, dev, PCAP, filt))
    try:
        fn()
    finally:
        lab.sh(host, "sleep 1; pkill -INT -x tcpdump || true; sleep 1")
    lines = lab.sh(host, "tcpdump -r %s -nn 2>/dev/null" % PCAP).stdout.splitlines()
    dump = lab.sh(host, "tcpdump -r %s -nn -A 2>/dev/null" % PCAP).stdout
    return lines, dump


@pytest.fixture(scope="module")
def encrypted(lab):
    try:
        yield lab
    finally:
        run_playbook("playbooks/install.yml")       # encryption off again, tunnel mode: as the inventory says


def test_install_four_times_and_status(encrypted):
    lab = encrypted
    run_playbook("playbooks/install.yml")
    check = run_playbook("playbooks/install.yml", *ON, "--check")
    assert any(c > 0 for c in _recap(check).values())
    assert lab.sh(lab.hosts()[0], "ip link show kln_wg0", check=False).returncode != 0     # check made nothing
    first = run_playbook("playbooks/install.yml", *ON, "-v")
    again = run_playbook("playbooks/install.yml", *ON)
    assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
    check = run_playbook("playbooks/install.yml", *ON, "--check")
    assert all(c == 0 for c in _recap(check).values()), changed_tasks(check)
    nodes = lab.hosts()
    for h in nodes:
        st = json.loads(lab.sh(h, "netstack encrypt status --json").stdout)
        assert st["backend"] == "userspace" and st["listen_port"] == 51871 and st["peer_count"] == len(nodes) - 1
        assert st["mtu"] == 1500 - 60
        # the private key: 0600, and in no output of the play
        key = "/var/lib/kldload-netstack/wireguard/kln_wg0/private.key"
        assert lab.sh(h, "stat -c %a " + key).stdout.strip() == "600"
        secret = lab.sh(h, "cat " + key).stdout.strip()
        assert secret and secret not in first.stdout + first.stderr and secret not in again.stdout
        assert "wireguard-go" in first.stdout           # the module's warning: the userspace backend
        assert lab.sh(h, "systemctl is-enabled netstack-wireguard-kln_wg0.service").stdout.strip() == "enabled"
    verify = run_playbook("playbooks/verify.yml", *ON, *QUICK)
    assert all(c == 0 for c in _recap(verify).values()), changed_tasks(verify)
    assert "userspace backend, %d peers" % (len(nodes) - 1) in verify.stdout


@pytest.mark.parametrize("mode", [pytest.param("native", marks=pytest.mark.extended), "tunnel"])
def test_pod_traffic_across_nodes_is_encrypted(encrypted, mode):
    lab = encrypted
    run_playbook("playbooks/install.yml", *ON, "-e", "netstack_routing_mode=%s" % mode)
    pods = _pods(lab)
    a, b = [pods[n] for n in sorted(pods)[:2]]
    assert lab.sh(a["host"], "ip -d link show kln_vxlan", check=False).returncode != 0   # WireGuard is the tunnel
    out = {}
    lines, dump = _captured(lab, b["host"], lambda: out.update(r=_request(lab, a, b).stdout))
    assert out["r"].strip() == MARKER                   # the pod got the request and answered
    assert lines, "nothing captured"
    assert all(".51871 " in ln and "UDP" in ln for ln in lines), [ln for ln in lines if ".51871 " not in ln][:5]
    assert MARKER not in dump


@pytest.mark.extended
def test_verify_names_the_node_and_the_peer_without_a_handshake(encrypted):
    """A peer whose key is wrong (a stranger's, the endpoint and allowed IPs of a real node) never makes a
    handshake: verify fails naming this node and that peer; the next install puts the right key back."""
    lab = encrypted
    run_playbook("playbooks/install.yml", *ON)
    cp, w = lab.hosts()[0], lab.hosts()[1]
    cp_ip = lab.hostvars[cp]["netstack_underlay_ip"]
    peer = [p for p in json.loads(lab.sh(w, "netstack encrypt status --json").stdout)["peers"]
            if p["endpoint"].startswith(cp_ip + ":")][0]
    lab.sh(w, "wg set kln_wg0 peer %s remove peer $(wg genkey | wg pubkey) endpoint %s allowed-ips %s"
           % (peer["public_key"], peer["endpoint"], ",".join(peer["allowed_ips"])))
    proc = run_playbook("playbooks/verify.yml", *ON, *QUICK, check=False)
    assert proc.returncode != 0
    assert "%s: peers 2 (want 2), no handshake with %s (%s, never)" % (w, cp, peer["endpoint"]) in proc.stdout, \
        proc.stdout[-3000:]
    healed = run_playbook("playbooks/install.yml", *ON)
    assert _recap(healed)[w] > 0 and all(p["handshake_age"] is not None for p in
                                         json.loads(lab.sh(w, "netstack encrypt status --json").stdout)["peers"])


@pytest.mark.extended
def test_strict_mode_drops_instead_of_leaking(encrypted):
    lab = encrypted
    strict = ON + ("-e", "netstack_encryption_strict=true", "-e", "netstack_routing_mode=native")
    run_playbook("playbooks/install.yml", *strict)
    pods = _pods(lab)
    a, b = [pods[n] for n in sorted(pods)[:2]]
    assert _request(lab, a, b).stdout.strip() == MARKER
    drops = json.loads(lab.sh(a["host"], "netstack dataplane status --json").stdout)["pods"]["strict_drops"]
    try:
        lab.sh(a["host"], "ip link set kln_wg0 down")
        out = {}
        lines, dump = _captured(lab, b["host"], lambda: out.update(r=_request(lab, a, b, check=False)))
        assert out["r"].returncode != 0                 # refused: no way out but the tunnel
        after = json.loads(lab.sh(a["host"], "netstack dataplane status --json").stdout)["pods"]["strict_drops"]
        assert after > drops
        assert MARKER not in dump and not any(b["ip"] in ln for ln in lines)
    finally:
        again = run_playbook("playbooks/install.yml", *strict)   # the device up again, its routes back
    assert any(c > 0 for c in _recap(again).values())
    assert _request(lab, a, b).stdout.strip() == MARKER


@pytest.mark.extended
def test_encryption_off_again_shows_the_control(encrypted):
    """Encryption off: the device and its unit go, and the same capture now sees the marker (so the
    capture above could have seen it)."""
    lab = encrypted
    run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=native")
    for h in lab.hosts():
        assert lab.sh(h, "ip link show kln_wg0", check=False).returncode != 0
        assert lab.sh(h, "systemctl is-enabled netstack-wireguard-kln_wg0.service", check=False).stdout.strip() != "enabled"
    pods = _pods(lab)
    a, b = [pods[n] for n in sorted(pods)[:2]]
    out = {}
    _lines, dump = _captured(lab, b["host"], lambda: out.update(r=_request(lab, a, b).stdout))
    assert MARKER in dump
    again = run_playbook("playbooks/install.yml", "-e", "netstack_routing_mode=native")
    assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)


def _status_view(lab):
    out = {}
    for h in lab.hosts():
        st = json.loads(lab.sh(h, "netstack encrypt status --json").stdout)
        if st is None:
            return {}                   # no tunnel on this node
        out[h] = (st["listen_port"], [(p["public_key"], p["endpoint"], p["allowed_ips"]) for p in st["peers"]])
    return out


KEYS = "/var/lib/kldload-netstack/wireguard/kln_wg0"


@pytest.mark.parametrize("extra,message", [
    pytest.param(("-e", "encryption_port=51999"), "listen_port: UDP 51999 is in use", marks=pytest.mark.extended),
    pytest.param(("-e", "netstack_encryption_interface=kln_wireguard_0123"), "is not an interface name",
                 marks=pytest.mark.extended),
    (("-e", "netstack_underlay_ip="), "encryption needs netstack_underlay_ip"),
    pytest.param((), "the same key", marks=pytest.mark.extended),
], ids=["port-in-use", "name-too-long", "no-underlay-address", "two-nodes-same-key"])
def test_bad_input_changes_nothing(encrypted, extra, message):
    """Refused naming the field; the running tunnel untouched."""
    lab = encrypted
    if not _status_view(lab):       # the tunnel as the tests before left it; made when it is not there
        run_playbook("playbooks/install.yml", *ON)
    before = _status_view(lab)
    pids = {}
    a, b = lab.hosts()[1:3]
    if "port" in message:
        for h in lab.hosts():       # something else holds the port on every node
            pids[h] = lab.sh(h, "nohup python3 -c 'import socket, time; s = socket.socket(socket.AF_INET, "
                                "socket.SOCK_DGRAM); s.bind((\"0.0.0.0\", 51999)); time.sleep(300)' "
                                ">/dev/null 2>&1 & echo $!").stdout.strip()
    if "same key" in message:       # node a holds a copy of node b's key pair (its own kept aside)
        lab.sh(a, "cp -a %s /run/netstack-test-keys" % KEYS)
        for f in ("private.key", "public.key"):
            lab.put(a, "%s/%s" % (KEYS, f), lab.sh(b, "cat %s/%s" % (KEYS, f)).stdout.strip(), mode="0600")
    try:
        proc = run_playbook("playbooks/install.yml", *(ON + extra), check=False)
    finally:
        for h, pid in pids.items():
            lab.sh(h, "kill %s" % pid, check=False)
        if "same key" in message:
            lab.sh(a, "rm -rf %s && mv /run/netstack-test-keys %s" % (KEYS, KEYS))
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert _status_view(lab) == before


# ---- node-to-node encryption ----------------------------------------------------------------------

N2N = ON + ("-e", "netstack_encryption_node_to_node=true", "-e", "netstack_routing_mode=native")


@pytest.mark.extended
def test_node_to_node_traffic_is_encrypted_too(encrypted):
    """With node-to-node on, a node's own request to another node's address crosses the underlay as
    WireGuard only (the rule skips the device's own marked packets, which still reach the peer); four
    times; off again, the rule and table 220 go and the same capture shows the marker."""
    lab = encrypted
    check = run_playbook("playbooks/install.yml", *N2N, "--check")
    assert any(c > 0 for c in _recap(check).values())
    run_playbook("playbooks/install.yml", *N2N)
    again = run_playbook("playbooks/install.yml", *N2N)
    assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
    check = run_playbook("playbooks/install.yml", *N2N, "--check")
    assert all(c == 0 for c in _recap(check).values()), changed_tasks(check)
    a, b = lab.hosts()[:2]
    b_ip = lab.hostvars[b]["netstack_underlay_ip"]
    assert "not from all fwmark 0x1e00 lookup 220 proto 220" in lab.sh(a, "ip rule").stdout
    assert "%s via %s dev kln_wg0" % (b_ip, b_ip) in lab.sh(a, "ip route show table 220").stdout
    st = json.loads(lab.sh(a, "netstack dataplane status --json").stdout)["pods"]
    assert st["rules"] == [{"priority": 30000, "table": 220, "fwmark": 7680, "invert": True, "present": True}]
    assert all(r["present"] for r in st["routes"])
    server = ("nohup python3 -c 'import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              "s.bind((\"%s\", 18777)); s.listen(8)\nwhile True:\n c, _ = s.accept(); c.sendall(c.recv(200)); c.close()' "
              ">/dev/null 2>&1 & echo $!" % b_ip)
    code = ("import socket; s = socket.create_connection(('%s', 18777), 4); s.sendall(b'%s'); print(s.recv(200).decode())"
            % (b_ip, MARKER))
    pid = lab.sh(b, server).stdout.strip()
    try:
        out = {}
        lines, dump = _captured(lab, b, lambda: out.update(r=lab.sh(a, "python3 -c %s" % shlex.quote(code)).stdout))
        assert out["r"].strip() == MARKER
        assert lines and all(".51871 " in ln and "UDP" in ln for ln in lines), [ln for ln in lines if ".51871 " not in ln][:5]
        assert MARKER not in dump
        run_playbook("playbooks/install.yml", *ON, "-e", "netstack_routing_mode=native")      # node-to-node off
        assert "lookup 220" not in lab.sh(a, "ip rule").stdout and not lab.sh(a, "ip route show table 220").stdout.strip()
        lines, dump = _captured(lab, b, lambda: out.update(r=lab.sh(a, "python3 -c %s" % shlex.quote(code)).stdout))
        assert out["r"].strip() == MARKER and MARKER in dump      # the control: the nodes' traffic in plaintext
    finally:
        lab.sh(b, "kill %s" % pid, check=False)


# ---- long-term key rotation -----------------------------------------------------------------------

def _keys(lab):
    return {h: lab.sh(h, "cat /var/lib/kldload-netstack/wireguard/kln_wg0/public.key").stdout.strip() for h in lab.hosts()}


@pytest.mark.extended
def test_rotate_keys_loses_nothing(encrypted):
    """rotate_keys.yml during continuous pod traffic between two nodes: 0 UDP datagrams lost, 0 TCP
    errors or resets, every node's key new, the previous keys off the disk, the standby device gone,
    install and verify changed=0 after; check mode changes no key; --limit is refused. The control: one
    node's key rotated on its own (the naive way) breaks the same streams."""
    lab = encrypted
    run_playbook("playbooks/install.yml", *N2N)
    before = _keys(lab)
    check = run_playbook("playbooks/rotate_keys.yml", *N2N, "--check")
    assert _keys(lab) == before and any(c > 0 for c in _recap(check).values())
    limited = run_playbook("playbooks/rotate_keys.yml", *N2N, "--limit", lab.hosts()[0], check=False)
    assert limited.returncode != 0 and "runs on every node of kube_nodes at once" in limited.stdout
    pods = _pods(lab)
    a, b = [pods[n] for n in sorted(pods)[:2]]
    streams = Streams(lab, a, b)
    try:
        streams.start()
        rot = run_playbook("playbooks/rotate_keys.yml", *N2N, "-vvv")
        res = streams.stop()
        assert res["udp_sent"] > 1000 and res["tcp_messages"] > 1000 and res["connections"] > 100, res
        assert res["udp_lost"] == 0 and res["tcp_errors"] == [] and res["connection_failures"] == [], res
        after = _keys(lab)
        assert all(after[h] != before[h] for h in before)
        for h in lab.hosts():
            assert lab.sh(h, "ls /var/lib/kldload-netstack/wireguard/kln_wg0/").stdout.split() == ["private.key", "public.key"]
            assert lab.sh(h, "ip link show kln_wg0_r", check=False).returncode != 0
            secret = lab.sh(h, "cat /var/lib/kldload-netstack/wireguard/kln_wg0/private.key").stdout.strip()
            assert secret not in rot.stdout + rot.stderr
        again = run_playbook("playbooks/install.yml", *N2N)
        assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
        verify = run_playbook("playbooks/verify.yml", *N2N, *QUICK)
        assert all(c == 0 for c in _recap(verify).values()), changed_tasks(verify)
        # the control: the naive way - one node's key rotated and applied there alone - loses traffic
        streams.start()
        lab.module(a["host"], "kldload.netstack.wireguard_key", {"rotate": True})
        run_playbook("playbooks/install.yml", *N2N, "--limit", a["host"])
        time.sleep(3)
        res = streams.stop()
        assert res["udp_lost"] > 0, res
    finally:
        streams.close()
        run_playbook("playbooks/install.yml", *N2N)          # every node learns the new key again
        lab.module(a["host"], "kldload.netstack.wireguard_key", {"retire_previous": True})
