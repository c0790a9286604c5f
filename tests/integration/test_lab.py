"""The lab itself: real systemd nodes, the address plan, isolation, idempotent up/down."""
import re
import subprocess

from conftest import STATE_DIR, run_playbook


def _recap_changed(proc):
    m = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", proc.stdout)
    assert m, proc.stdout[-3000:]
    return int(m.group(1))


def test_inventory_has_the_kldload_groups(lab):
    assert len(lab.hosts("kube_control_plane")) == 1
    assert len(lab.hosts("kube_workers")) == 2
    assert sorted(lab.hosts("kube_nodes")) == sorted(lab.hosts("kube_control_plane") + lab.hosts("kube_workers"))
    assert len(lab.hosts("routers")) == 1
    cidrs = [lab.hostvars[h]["netstack_pod_cidr"] for h in lab.hosts("kube_nodes")]
    assert len(set(cidrs)) == len(cidrs)
    for h in lab.hosts("all"):
        assert lab.hostvars[h]["ansible_host"].startswith("10.77.0.")
        assert lab.hostvars[h]["netstack_underlay_ip"].startswith("192.168.1.")


def test_nodes_are_running_systemd_machines(lab):
    for h in lab.hosts("all"):
        out = lab.sh(h, "hostname; systemctl is-system-running; systemctl is-active ssh").stdout.split()
        assert out == [h, "running", "active"], (h, out)
    # the router runs FRR
    for h in lab.hosts("routers"):
        assert lab.sh(h, "systemctl is-active frr").stdout.strip() == "active"


def test_underlay_connects_nodes_and_router(lab):
    router_ip = lab.hostvars[lab.hosts("routers")[0]]["netstack_underlay_ip"]
    for h in lab.hosts("kube_nodes"):
        lab.sh(h, "ping -c1 -W2 %s" % router_ip)
        for other in lab.hosts("kube_nodes"):
            if other != h:
                lab.sh(h, "ping -c1 -W2 %s" % lab.hostvars[other]["netstack_underlay_ip"])


def test_lab_traffic_cannot_leave(lab):
    """No default route in any node; the LAN is not on the host; the host does not forward."""
    for h in lab.hosts("all"):
        routes = lab.sh(h, "ip -j route show default; ip -j -6 route show default").stdout
        assert routes.replace("[]", "").strip() == "", (h, routes)
        # a public address is unreachable from the node (nothing is sent: no route at all)
        proc = lab.sh(h, "ip route get 1.1.1.1", check=False)
        assert proc.returncode != 0 and "unreachable" in proc.stderr.lower(), (h, proc.stdout, proc.stderr)
    host_addrs = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    assert "192.168.1." not in host_addrs
    assert "kln-lan" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_a_node_that_does_not_boot_is_named_with_its_boot_log(lab, tmp_path):
    # looks like an OS root to nspawn, but has no init to boot
    bad_root = tmp_path / "noinit"
    (bad_root / "etc" / "ssh").mkdir(parents=True)
    (bad_root / "etc" / "os-release").write_text("ID=debian\nNAME=noinit\n")
    args = {"name": "broken", "rootfs": str(bad_root), "mgmt_address": "10.77.0.99/24",
            "lan_address": "192.168.1.99/24", "authorized_key": "ssh-ed25519 AAAA test", "boot_timeout": 20}
    try:
        res = lab.module("localhost", "kldload.netstack_lab.lab_node", args, expect_fail=True)
        assert "lab node broken did not come up" in res["msg"], res["msg"]
        assert "boot.log" in res["msg"]
    finally:
        lab.module("localhost", "kldload.netstack_lab.lab_node", {"name": "broken", "state": "absent"})
    assert not (STATE_DIR / "nodes" / "broken").exists()
    assert "kln-broken" not in _netns()


def _netns():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_lab_modules_four_times(lab):
    """lab_network and lab_node: check, apply, apply again, check again, for what exists and for a
    new node (check mode makes nothing), then the new node absent the same way."""
    for first in lab.four_times("localhost", "kldload.netstack_lab.lab_network", changes=False):
        assert first["changed"] is False
    for first in lab.four_times("localhost", "kldload.netstack_lab.lab_node", lab.node_args("cp1"), changes=False):
        assert first["changed"] is False
    extra = lab.node_args("cp1", name="extra1", mgmt_address="10.77.0.98/24", lan_address="192.168.1.98/24")
    try:
        check = lab.module("localhost", "kldload.netstack_lab.lab_node", extra, check=True)
        assert check["changed"] and "boot extra1" in check["actions"]
        assert "kln-extra1" not in _netns() and not (STATE_DIR / "nodes" / "extra1").exists()
        first, applied, again, recheck = lab.four_times("localhost", "kldload.netstack_lab.lab_node", extra)
        assert applied["changed"] and applied["pid"] > 1
        proc = subprocess.run(["ssh", "-i", lab.key, "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "root@10.77.0.98", "hostname"],
                              capture_output=True, text=True, check=False, timeout=60)
        assert proc.stdout.strip() == "extra1", proc.stderr
    finally:
        gone = lab.four_times("localhost", "kldload.netstack_lab.lab_node", {"name": "extra1", "state": "absent"})
    assert gone[0]["changed"] and "kln-extra1" not in _netns()


def test_down_twice_then_up_twice(lab):
    """down, down again (fine, nothing to do), up, up again (changes nothing).

    A namespace that only looks like the lab's (kln- prefix, not a node name) is someone else's:
    down leaves it alone and does not fail on it.
    """
    foreign = "kln-not-a-lab-node"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        run_playbook("lab/playbooks/lab.yml", "-e", "lab_state=down", inventory="localhost,")
        again = run_playbook("lab/playbooks/lab.yml", "-e", "lab_state=down", inventory="localhost,")
        assert foreign in _netns()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=False)
    assert _recap_changed(again) == 0
    assert not STATE_DIR.exists()
    assert subprocess.run(["pgrep", "-x", "systemd-nspawn"], capture_output=True, check=False).returncode == 1
    assert not re.search(r"^kln-", _netns(), re.M)
    assert subprocess.run(["ip", "link", "show", "klnmgmt0"], capture_output=True, check=False).returncode != 0

    up = run_playbook("lab/playbooks/lab.yml", "-e", "lab_state=up", inventory="localhost,")
    secs = float(re.search(r"lab up in ([0-9.]+) s", up.stdout).group(1))
    print("lab up (cached rootfs) took %.1f s" % secs)
    again = run_playbook("lab/playbooks/lab.yml", "-e", "lab_state=up", inventory="localhost,")
    assert _recap_changed(again) == 0
    for h in lab.hosts("all"):
        assert lab.sh(h, "systemctl is-system-running").stdout.strip() == "running"
