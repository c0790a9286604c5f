"""install / verify / uninstall playbooks on the lab, as a user runs them."""
import re
import subprocess

import pytest

from conftest import REPO, changed_tasks, run_playbook


def _recap(proc):
    return {h: dict(ok=int(o), changed=int(c), failed=int(f)) for h, o, c, f in
            re.findall(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)", proc.stdout, re.M)}


def test_prereqs_names_every_unmet_requirement_and_changes_nothing(lab):
    host = lab.hosts("kube_workers")[0]
    lab.sh(host, "rm -f /etc/sysctl.d/90-kldload-netstack.conf; umount /sys/fs/bpf; true")
    proc = run_playbook("playbooks/install.yml", "--limit", host, "-e",
                        '{"prereqs_required": ["basic_ebpf", "wireguard_kernel", "bpffs"]}', check=False)
    assert proc.returncode != 0
    # wireguard_kernel is unmet on this kernel (no module): named, with its message
    # wireguard_kernel (no module here) and bpffs (not mounted before install) are both named
    assert "does not meet 2 requirement(s)" in proc.stdout, proc.stdout[-3000:]
    assert "WireGuard in the kernel" in proc.stdout and "BPF filesystem mounted" in proc.stdout
    assert "basic eBPF" not in proc.stdout.split("does not meet")[1].split("\n")[0]
    assert lab.sh(host, "test -e /etc/sysctl.d/90-kldload-netstack.conf", check=False).returncode != 0
    assert "bpf" not in lab.sh(host, "findmnt -n -o FSTYPE /sys/fs/bpf || true").stdout


def test_unknown_requirement_name_is_an_error(lab):
    proc = run_playbook("playbooks/install.yml", "--limit", lab.hosts()[0], "-e",
                        '{"prereqs_required": ["basic_ebpf", "kube_proxy_replacment"]}', check=False)
    assert proc.returncode != 0 and "unknown requirement(s) kube_proxy_replacment" in proc.stdout


@pytest.mark.extended
def test_install_stops_a_host_kube_proxy_and_is_idempotent(lab):
    host = lab.hosts("kube_workers")[-1]
    lab.put(host, "/etc/systemd/system/kube-proxy.service",
            "[Unit]\nDescription=stand-in kube-proxy\n[Service]\nExecStart=/bin/sleep infinity\n"
            "[Install]\nWantedBy=multi-user.target")
    lab.sh(host, "systemctl daemon-reload && systemctl enable --now kube-proxy.service")
    try:
        first = run_playbook("playbooks/install.yml")
        assert _recap(first)[host]["changed"] > 0
        assert lab.sh(host, "systemctl is-active kube-proxy", check=False).stdout.strip() == "inactive"
        assert lab.sh(host, "systemctl is-enabled kube-proxy", check=False).stdout.strip() == "disabled"
        again = run_playbook("playbooks/install.yml")
        assert all(r["changed"] == 0 for r in _recap(again).values()), changed_tasks(again)
        check = run_playbook("playbooks/install.yml", "--check", "--diff")
        assert all(r["changed"] == 0 for r in _recap(check).values()), changed_tasks(check)
        run_playbook("playbooks/verify.yml")
    finally:
        lab.sh(host, "rm -f /etc/systemd/system/kube-proxy.service && systemctl daemon-reload", check=False)


def test_the_oldest_ansible_core_claimed_installs_and_verifies(lab):
    """requires_ansible (>=2.16.0) on the lab: install and verify with ansible-core 2.16 (.venv-oldest) run
    through, the install changes nothing the pinned core installed, verify reports changed=0."""
    run_playbook("playbooks/install.yml")
    oldest = REPO / ".venv-oldest" / "bin"
    assert "core 2.16." in subprocess.run([str(oldest / "ansible"), "--version"], capture_output=True, text=True,
                                          check=True).stdout
    again = run_playbook("playbooks/install.yml", bin_dir=oldest)
    assert all(r["changed"] == 0 for r in _recap(again).values()), changed_tasks(again)
    verify = run_playbook("playbooks/verify.yml", bin_dir=oldest)
    assert all(r["changed"] == 0 for r in _recap(verify).values()) and '"PASS dataplane: ' in verify.stdout


def test_verify_fails_when_something_is_off(lab):
    host = lab.hosts("kube_control_plane")[0]
    run_playbook("playbooks/install.yml", "--limit", host)
    lab.sh(host, "sysctl -w net.ipv4.conf.all.rp_filter=1")
    try:
        proc = run_playbook("playbooks/verify.yml", "--limit", host, check=False)
        assert proc.returncode != 0 and "net.ipv4.conf.all.rp_filter is 1, expected 0" in proc.stdout
        # the summary: every check ran, the failed one with its evidence, the others with their figures
        assert '"FAIL prerequisites: net.ipv4.conf.all.rp_filter is 1, expected 0"' in proc.stdout
        assert re.search(r'"PASS dataplane: \d+ objects loaded and attached, \d+ services listed as declared, live: 4 probes',
                         proc.stdout), proc.stdout[-3000:]
        assert '"PASS kube-proxy gone: 0 rules left' in proc.stdout and '"PASS workloads: ' in proc.stdout
    finally:
        run_playbook("playbooks/install.yml", "--limit", host)
    run_playbook("playbooks/verify.yml", "--limit", host)


# What the collection may leave on a node, each listing filtered to what is the collection's.
LEFTOVERS = {
    "interfaces": "ip -o link | grep -o 'kln_[a-z0-9_]*' | sort -u",
    "tc/xdp programs": "bpftool net | grep kln_",
    "cgroup programs": "bpftool cgroup tree | grep kln_",
    "pinned objects": "ls /sys/fs/bpf | grep kldload",
    "routing rules": "ip rule | grep -v -E 'lookup (local|main|default) *$'",
    "routes": "ip route show table all | grep -E 'proto 220|10\\.244\\.'",
    "nftables": "nft list tables | grep -E 'kldload|netstack'",
    "units": "systemctl list-units --all --no-legend 'netstack*' 'kldload*'; ls /etc/systemd/system | grep -E 'netstack|kldload'",
    "files": "ls -d /etc/kldload-netstack /var/lib/kldload-netstack /usr/lib/kldload-netstack /usr/local/sbin/netstack "
             "/usr/lib/cni/netstack-cni /etc/cni/net.d/05-kldload-netstack.conflist /etc/sysctl.d/90-kldload-netstack.conf",
    "pod namespaces": "ip netns | grep '^wl-'",
    "processes": "pgrep -a wireguard-go",
}


def _leftovers(lab, host):
    return dict((k, lab.sh(host, "(%s) 2>/dev/null || true" % cmd).stdout.strip()) for k, cmd in LEFTOVERS.items())


def test_uninstall_removes_what_install_made_and_check_mode_works_on_fresh_nodes(lab):
    """Installed with every capability that has landed (pods, BPF host routing, WireGuard with node-to-node
    encryption), a node shows the collection in every listing; after uninstall.yml (with the bpffs mount's unit,
    prereqs_uninstall_bpffs), in none."""
    host = lab.hosts("kube_control_plane")[0]
    enc = ("-e", "netstack_encryption=wireguard", "-e", "netstack_encryption_node_to_node=true")
    run_playbook("playbooks/install.yml", *enc)
    before = _leftovers(lab, host)
    empty = sorted(k for k, v in before.items() if not v)
    assert empty == ["processes"] or empty == [], before         # wireguard-go only without the kernel module
    assert "kln_wg0" in before["interfaces"] and "lookup 220" in before["routing rules"], before
    run_playbook("playbooks/uninstall.yml", "--limit", host, *enc, "-e", "prereqs_uninstall_bpffs=true")
    assert _leftovers(lab, host) == dict((k, "") for k in LEFTOVERS), _leftovers(lab, host)
    # "what would change" on a node without the collection: runs through, changes nothing
    check = run_playbook("playbooks/install.yml", "--limit", host, "--check", "--diff", check=False)
    assert check.returncode == 0 and _recap(check)[host]["failed"] == 0, check.stdout[-4000:]
    assert _recap(check)[host]["changed"] > 0
    assert lab.sh(host, "test -e /usr/lib/kldload-netstack", check=False).returncode != 0
    assert lab.sh(host, "test -e /sys/fs/bpf/kldload-netstack", check=False).returncode != 0
    run_playbook("playbooks/install.yml", "--limit", host)
    assert lab.sh(host, "test -e /etc/sysctl.d/90-kldload-netstack.conf", check=False).returncode == 0
    installed = run_playbook("playbooks/install.yml", "--limit", host, "--check", "--diff")
    assert _recap(installed)[host]["changed"] == 0, changed_tasks(installed)
    assert "proto 220" in lab.sh(host, "ip route").stdout
    run_playbook("playbooks/install.yml")               # the other nodes without WireGuard again
