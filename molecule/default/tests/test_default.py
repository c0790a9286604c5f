"""Molecule verify (testinfra): what install.yml promises, read off each node."""
import json

import pytest

testinfra_hosts = ["all"]


@pytest.fixture
def groups(host):
    return host.ansible.get_variables().get("group_names", [])


def test_bpffs_is_mounted_and_persistent(host, groups):
    if "kube_nodes" not in groups:
        pytest.skip("not a kube node")
    assert host.mount_point("/sys/fs/bpf").filesystem == "bpf"
    # systemd refuses .mount units for its own API paths such as /sys/fs/bpf: a oneshot service
    # mounts it at boot instead (see the bpffs module notes)
    unit = host.file("/etc/systemd/system/netstack-bpffs-sys-fs-bpf.service")
    assert unit.exists and unit.mode == 0o644
    assert host.run("systemctl is-enabled netstack-bpffs-sys-fs-bpf.service").stdout.strip() == "enabled"


def test_dataplane_sysctls(host, groups):
    if "kube_nodes" not in groups:
        pytest.skip("not a kube node")
    assert host.sysctl("net.ipv4.ip_forward") == 1
    assert host.sysctl("net.ipv4.conf.all.rp_filter") == 0
    conf = host.file("/etc/sysctl.d/90-kldload-netstack.conf")
    assert conf.exists and conf.mode == 0o644
    assert "net.ipv4.ip_forward = 1" in conf.content_string


def test_no_kube_proxy_rules_in_any_backend(host, groups):
    if "kube_nodes" not in groups:
        pytest.skip("not a kube node")
    for save in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        out = host.check_output(save)
        assert "KUBE-SERVICES" not in out and "KUBE-SVC-" not in out, save
    assert "kube-proxy" not in host.check_output("nft list tables")


def test_socket_lb_attached_and_services_programmed(host, groups):
    if "kube_nodes" not in groups:
        pytest.skip("not a kube node")
    assert host.service("netstack-dataplane").is_enabled
    listed = host.check_output("netstack lb list")
    for svc in host.ansible.get_variables().get("netstack_services", []):
        assert "%s:%s/%s" % (svc["vip"], svc["port"], svc.get("protocol", "tcp").upper()) in listed
    cg = host.check_output("findmnt -n -o TARGET -t cgroup2 | head -1")
    attached = host.check_output("bpftool cgroup show %s" % cg)
    for prog in ("kln_connect4", "kln_sendmsg4", "kln_recvmsg4", "kln_getpeer4", "kln_connect6"):
        assert prog in attached
    bundle = host.file("/usr/lib/kldload-netstack/netstack.pyz")
    assert bundle.exists and bundle.mode == 0o755
    assert "sock_lb" in host.check_output("netstack version")


def test_pod_network_and_a_ready_pod_on_every_node(host, groups):
    if "kube_nodes" not in groups:
        pytest.skip("not a kube node")
    # external (collect_metadata): the overlay program puts the source identity in each packet's VNI
    info = json.loads(host.check_output("ip -j -d link show kln_vxlan"))[0]["linkinfo"]
    assert info["info_kind"] == "vxlan" and info["info_data"]["external"] is True, info
    assert host.file("/etc/cni/net.d/05-kldload-netstack.conflist").exists
    assert host.file("/usr/lib/cni/netstack-cni").is_symlink
    eps = json.loads(host.check_output("netstack endpoint list --json"))
    assert [e["state"] for e in eps if e["namespace"] == "demo"] == ["ready"], eps


def test_router_runs_frr(host, groups):
    if "routers" not in groups:
        pytest.skip("not a router")
    assert host.service("frr").is_running


def test_nodes_have_no_default_route(host):
    assert host.check_output("ip route show default") == ""
