"""ebpf_facts on real nodes: values match what the node itself says."""
import pytest


def _ok(lab, host, cmd):
    return lab.sh(host, cmd, check=False).returncode == 0


def test_facts_match_the_node(lab):
    for host in lab.hosts("kube_nodes"):
        links_before = lab.sh(host, "ls /sys/class/net").stdout
        results = lab.four_times(host, "kldload.netstack.ebpf_facts", changes=False)
        assert not any(r["changed"] for r in results)
        facts = results[1]["ansible_facts"]["netstack_ebpf"]
        assert facts["requirements"] == results[1]["requirements"]  # the same dict at the top level

        release = lab.sh(host, "uname -r").stdout.strip()
        assert facts["kernel"]["release"] == release
        assert facts["kernel"]["version_text"] == ".".join(str(v) for v in facts["kernel"]["version"])
        assert release.startswith("%d.%d" % tuple(facts["kernel"]["version"][:2]))
        assert facts["btf"] is _ok(lab, host, "test -e /sys/kernel/btf/vmlinux")
        assert facts["btf"] is True

        cg = facts["cgroup2_path"]
        assert cg and lab.sh(host, "stat -f -c %%T %s" % cg).stdout.strip() == "cgroup2fs"
        assert cg == lab.sh(host, "findmnt -n -t cgroup2 -o TARGET | head -1").stdout.strip()
        bpf = lab.sh(host, "findmnt -n -t bpf -o TARGET || true").stdout.split()
        assert sorted(facts["bpffs_mounts"]) == sorted(set(bpf))

        # the WireGuard answer is the kernel's: the same question, asked directly
        probe = _ok(lab, host, "ip link add wgprobe type wireguard && ip link del wgprobe")
        assert facts["wireguard"]["kernel"] is probe, facts["wireguard"]
        assert facts["wireguard"]["kernel"] is False  # this lab's kernel has no WireGuard
        assert facts["wireguard"]["userspace"] is _ok(lab, host, "command -v wireguard-go")
        assert facts["wireguard"]["tools"] is _ok(lab, host, "command -v wg")
        assert facts["wireguard"]["module_loaded"] is _ok(lab, host, "test -d /sys/module/wireguard")
        assert lab.sh(host, "ls /sys/class/net").stdout == links_before  # nothing left behind

        assert facts["bpftool"]["path"] and facts["bpftool"]["version"]
        assert facts["libbpf"]["present"] and lab.sh(host, "test -e %s" % facts["libbpf"]["library"])
        source = facts["kernel_config"]["source"]
        if source is None:
            assert facts["kernel_config"]["flags"] is None
        else:
            assert source == "/proc/config.gz" or source.endswith(release) or source.endswith(release + "/config")
            assert facts["kernel_config"]["flags"]["CONFIG_BPF_SYSCALL"] in ("y", "m")

        names = {r["name"]: r for r in facts["requirements"]}
        for name in ("basic_ebpf", "recommended", "wireguard", "kube_proxy_replacement", "bbr_bandwidth_manager",
                     "btf", "cgroup2"):
            assert names[name]["ok"], names[name]
        assert names["bpffs"]["ok"] is bool(facts["bpffs_mounts"])
        assert names["wireguard_kernel"]["ok"] is facts["wireguard"]["kernel"]
        assert facts["requirements_unmet"] == [r["name"] for r in facts["requirements"] if not r["ok"]]


def test_check_mode_and_options(lab):
    host = lab.hosts()[0]
    res = lab.module(host, "kldload.netstack.ebpf_facts", {"wireguard_probe": False, "iptables": False},
                     check=True)
    assert res["changed"] is False and "iptables" not in res
    assert res["wireguard"]["kernel"] is None and "wireguard_kernel" not in res["requirements_unmet"]


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


@pytest.mark.parametrize("args,field", [({"bogus": 1}, "bogus"), ({"wireguard_probe": "maybe"}, "wireguard_probe")])
def test_bad_input_is_rejected_naming_the_field(lab, args, field):
    res = lab.module(lab.hosts()[0], "kldload.netstack.ebpf_facts", args, expect_fail=True)
    assert field in res["msg"], res["msg"]
