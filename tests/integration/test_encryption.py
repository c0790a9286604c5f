"""WireGuard on the lab (netstack_encryption: wireguard): install four times (check, apply, apply,
check), pods reach pods across nodes in both routing modes, a capture on the underlay shows only
WireGuard's UDP and never the request's marker (and, with encryption off again, shows it), strict
mode drops and counts what would leave unencrypted when a node's device is down, verify is quiet,
the private key is 0600 and in no output."""
import json
import shlex

import pytest

from conftest import changed_tasks, run_playbook
from test_pods import _pods, _recap

ON = ("-e", "netstack_encryption=wireguard")
MARKER = "NETSTACK-MARKER-7f3a9c"
PCAP = "/run/netstack-test-enc.pcap"


def _request(lab, src, dst, check=True):
    """A TCP request carrying MARKER from pod src to pod dst's workload server; its echo."""
    code = ("import socket; s = socket.create_connection(('%s', 8080), 4); s.recv(200); "
            "s.sendall(b'%s'); print(s.recv(200).decode())" % (dst["ip"], MARKER))
    return lab.sh(src["host"], "nsenter --net=%s python3 -c %s" % (shlex.quote(src["netns"]), shlex.quote(code)),
                  check=check, timeout=30)


def _captured(lab, host, fn):
    """Run fn() while tcpdump records IPv4 on the node's underlay; (summary lines, ASCII dump)."""
    dev = lab.hostvars[host]["netstack_underlay_interface"]
    lab.sh(host, "rm -f %s; (timeout 20 tcpdump -i %s -nn -U -w %s ip >/dev/null 2>&1 &); sleep 1" % (PCAP, dev, PCAP))
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
    verify = run_playbook("playbooks/verify.yml", *ON)
    assert all(c == 0 for c in _recap(verify).values()), changed_tasks(verify)
    assert "userspace backend, %d peers" % (len(nodes) - 1) in verify.stdout


@pytest.mark.parametrize("mode", ["native", "tunnel"])
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
        out[h] = (st["listen_port"], [(p["public_key"], p["endpoint"], p["allowed_ips"]) for p in st["peers"]])
    return out


@pytest.mark.parametrize("extra,message", [
    (("-e", "encryption_port=51999"), "listen_port: UDP 51999 is in use"),
    (("-e", "netstack_encryption_interface=kln_wireguard_0123"), "is not an interface name"),
], ids=["port-in-use", "name-too-long"])
def test_bad_input_changes_nothing(encrypted, extra, message):
    """Refused naming the field; the running tunnel untouched."""
    lab = encrypted
    run_playbook("playbooks/install.yml", *ON)
    before = _status_view(lab)
    pids = {}
    if "port" in message:
        for h in lab.hosts():       # something else holds the port on every node
            pids[h] = lab.sh(h, "nohup python3 -c 'import socket, time; s = socket.socket(socket.AF_INET, "
                                "socket.SOCK_DGRAM); s.bind((\"0.0.0.0\", 51999)); time.sleep(300)' "
                                ">/dev/null 2>&1 & echo $!").stdout.strip()
    try:
        proc = run_playbook("playbooks/install.yml", *(ON + extra), check=False)
    finally:
        for h, pid in pids.items():
            lab.sh(h, "kill %s" % pid, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert _status_view(lab) == before
