"""ebpf_facts on real nodes: values match what the node itself says."""


def test_facts_match_the_node(lab):
    for host in lab.hosts("kube_nodes"):
        results = lab.four_times(host, "kldload.netstack.ebpf_facts")
        assert not any(r["changed"] for r in results)
        facts = results[1]["ansible_facts"]["netstack_ebpf"]
        assert facts["kernel"]["release"] == lab.sh(host, "uname -r").stdout.strip()
        assert facts["btf"] is (lab.sh(host, "test -e /sys/kernel/btf/vmlinux", check=False).returncode == 0)
        cg = facts["cgroup2_path"]
        assert lab.sh(host, "stat -f -c %%T %s" % cg).stdout.strip() == "cgroup2fs"
        # the WireGuard answer is the kernel's: the same command, asked directly
        probe = lab.sh(host, "ip link add wgcheck type wireguard && ip link del wgcheck", check=False)
        assert facts["wireguard"]["kernel"] is (probe.returncode == 0)
        assert facts["wireguard"]["userspace"] == "/usr/bin/wireguard-go"
        assert "wgprobe" not in lab.sh(host, "ip -br link").stdout
        assert facts["bpftool"]["path"] and facts["libbpf"]["present"]
        assert facts["kernel_config"]["source"] in ("/proc/config.gz",) or facts["kernel_config"]["source"].startswith("/boot/")
        names = {r["name"]: r for r in facts["requirements"]}
        for name in ("basic_ebpf", "wireguard", "kube_proxy_replacement", "bbr_bandwidth_manager", "btf", "cgroup2"):
            assert names[name]["ok"], names[name]
        assert names["wireguard_kernel"]["ok"] is facts["wireguard"]["kernel"]


def test_kube_proxy_rules_are_detected_per_backend(lab):
    host = lab.hosts("kube_workers")[0]
    lab.sh(host, "iptables-legacy -t nat -N KUBE-SERVICES && ip6tables-nft -t nat -N KUBE-SVC-ABCDEF && "
                 "nft add table ip kube-proxy")
    try:
        ipt = lab.module(host, "kldload.netstack.ebpf_facts")["iptables"]
        assert ipt["legacy_ipv4"]["kube_proxy"] and ipt["nft_ipv6"]["kube_proxy"]
        assert not ipt["legacy_ipv6"]["kube_proxy"] and not ipt["nft_ipv4"]["kube_proxy"]
        assert ipt["nftables"]["kube_proxy"] == ["ipv4"]
        assert ipt["kube_proxy_rules"] is True
        assert set(ipt["backends_in_use"]) == {"legacy", "nft"}
    finally:
        lab.sh(host, "iptables-legacy -t nat -X KUBE-SERVICES; ip6tables-nft -t nat -X KUBE-SVC-ABCDEF; "
                     "nft delete table ip kube-proxy", check=False)
    assert lab.module(host, "kldload.netstack.ebpf_facts")["iptables"]["kube_proxy_rules"] is False


def test_unknown_option_is_rejected(lab):
    res = lab.module(lab.hosts()[0], "kldload.netstack.ebpf_facts", {"bogus": 1}, expect_fail=True)
    assert "bogus" in res["msg"]
