import errno
import gzip
import os
import struct

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import kernel


@pytest.mark.parametrize("release,expected", [
    ("6.18.44-fc-v669", (6, 18, 44)), ("5.14.0-427.el9.x86_64", (5, 14, 0)), ("4.19", (4, 19, 0)),
])
def test_parse_release(release, expected):
    assert kernel.parse_release(release) == expected


def test_parse_release_rejects_garbage():
    with pytest.raises(ValueError):
        kernel.parse_release("linux")


def test_config_from_gzip_then_boot(tmp_path):
    gz = tmp_path / "config.gz"
    with gzip.open(str(gz), "wt") as f:
        f.write("CONFIG_BPF=y\nCONFIG_WIREGUARD=m\n# CONFIG_IP_VS is not set\nCONFIG_NR_CPUS=64\n")
    source, flags = kernel.read_config("6.1.0", str(gz), str(tmp_path))
    assert source == str(gz)
    assert flags["CONFIG_BPF"] == "y" and flags["CONFIG_WIREGUARD"] == "m" and flags["CONFIG_IP_VS"] == "n"
    (tmp_path / "config-6.1.0").write_text("CONFIG_BPF_SYSCALL=y\n")
    source, flags = kernel.read_config("6.1.0", str(tmp_path / "absent.gz"), str(tmp_path))
    assert source.endswith("config-6.1.0") and flags == {"CONFIG_BPF_SYSCALL": "y"}
    assert kernel.read_config("9.9.9", str(tmp_path / "absent.gz"), str(tmp_path)) == (None, None)


def test_old_kernel_fails_each_version_requirement_by_name():
    items = kernel.evaluate_requirements((4, 14, 0), btf=False, cgroup2=None, bpffs=[],
                                         config={"CONFIG_BPF_SYSCALL": "n"}, wireguard_kernel=False)
    unmet = {i["name"]: i for i in items if not i["ok"]}
    assert set(unmet) == {"basic_ebpf", "recommended", "wireguard", "kube_proxy_replacement",
                          "bbr_bandwidth_manager", "btf", "cgroup2", "bpffs", "wireguard_kernel",
                          "config_bpf_syscall", "config_cgroup_bpf"}
    assert unmet["kube_proxy_replacement"]["message"] == "kube-proxy replacement needs kernel >= 5.8, node has 4.14.0"


def test_boundaries_and_a_modern_kernel():
    items = kernel.evaluate_requirements((5, 8, 0), True, "/sys/fs/cgroup", ["/sys/fs/bpf"])
    assert [i["name"] for i in items if not i["ok"]] == ["recommended"]
    items = kernel.evaluate_requirements((6, 18, 44), True, "/sys/fs/cgroup", ["/sys/fs/bpf"],
                                         {"CONFIG_BPF_SYSCALL": "y", "CONFIG_CGROUP_BPF": "y"}, True)
    assert all(i["ok"] for i in items)


def test_version_comparison():
    assert kernel.version_at_least((5, 8, 0), (5, 8))
    assert kernel.version_at_least("6.18.44-fc-v669", "5.10")
    assert not kernel.version_at_least((5, 7, 19), (5, 8))
    assert not kernel.version_at_least("4.14.336", (4, 19))
    assert kernel.version_at_least((5, 10), "5.10.0")


def test_config_from_lib_modules_and_flags(tmp_path):
    (tmp_path / "6.2.0").mkdir()
    (tmp_path / "6.2.0" / "config").write_text("CONFIG_BPF=y\nCONFIG_BPF_LSM=y\n")
    source, flags = kernel.read_config("6.2.0", str(tmp_path / "no.gz"), str(tmp_path), str(tmp_path))
    assert source == str(tmp_path / "6.2.0" / "config")
    shown = kernel.config_flags(flags)
    assert set(shown) == set(kernel.CONFIG_FLAGS)
    assert shown["CONFIG_BPF_LSM"] == "y" and shown["CONFIG_WIREGUARD"] == "n"
    assert kernel.config_flags(None) is None


def test_a_corrupt_gzip_falls_through(tmp_path):
    (tmp_path / "config.gz").write_bytes(b"not gzip")
    (tmp_path / "config-6.1.0").write_text("CONFIG_BPF=y\n")
    source, flags = kernel.read_config("6.1.0", str(tmp_path / "config.gz"), str(tmp_path))
    assert source == str(tmp_path / "config-6.1.0")


def test_requirement_items_have_the_documented_shape():
    for item in kernel.evaluate_requirements((6, 18, 44), True, "/sys/fs/cgroup", ["/sys/fs/bpf"]):
        assert set(item) == {"name", "description", "required", "actual", "ok", "message"}
        assert item["required"].startswith(">= ") or item["required"] == "present"
        assert isinstance(item["ok"], bool)


def test_old_kernel_fails_every_item_a_modern_one_passes_every_item():
    old = kernel.evaluate_requirements((4, 14, 0), False, None, [], {}, False)
    assert not any(i["ok"] for i in old)
    new = kernel.evaluate_requirements((6, 18, 0), True, "/sys/fs/cgroup/unified", ["/sys/fs/bpf"],
                                       {"CONFIG_BPF_SYSCALL": "y", "CONFIG_CGROUP_BPF": "y"}, True)
    assert all(i["ok"] for i in new)
    assert {i["name"] for i in old} == {i["name"] for i in new}


# -- the WireGuard probe: the netlink messages and the decisions on the kernel's answers ----------

def test_link_request_is_a_well_formed_rtnetlink_message():
    msg = kernel.link_request(kernel._RTM_NEWLINK, "nswgprobe", "wireguard", seq=7)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and len(msg) % 4 == 0
    assert mtype == 16 and seq == 7 and pid == 0
    assert flags & 0x400 and flags & 0x200 and flags & 0x4 and flags & 0x1  # CREATE|EXCL|ACK|REQUEST
    assert b"nswgprobe\0" in msg and b"wireguard\0" in msg
    delete = kernel.link_request(kernel._RTM_DELLINK, "nswgprobe")
    assert struct.unpack_from("=H", delete, 4)[0] == 17 and b"wireguard" not in delete


def _ack(err):
    return struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -err) + b"\0" * 16


def test_parse_ack():
    assert kernel.parse_ack(_ack(0)) == 0
    assert kernel.parse_ack(_ack(errno.EOPNOTSUPP)) == errno.EOPNOTSUPP
    with pytest.raises(ValueError):
        kernel.parse_ack(b"")


@pytest.mark.parametrize("err,expected", [
    (0, True), (errno.EOPNOTSUPP, False), (errno.EPERM, None), (errno.EINVAL, None),
])
def test_probe_reports_the_kernels_answer(err, expected):
    supported, detail = kernel.probe_link_kind("wireguard", new_netns=lambda kind: err,
                                               current_netns=lambda kind, name: pytest.fail("not needed"))
    assert supported is expected
    assert "throwaway network namespace" in detail or expected is not True


def test_probe_falls_back_to_the_host_namespace_with_a_unique_name():
    calls = []

    def current(kind, name):
        calls.append((kind, name))
        return 0
    supported, detail = kernel.probe_link_kind("wireguard", new_netns=lambda kind: None, current_netns=current)
    assert supported is True and "host network namespace" in detail
    assert calls[0][0] == "wireguard" and calls[0][1].startswith(kernel.PROBE_LINK) and len(calls[0][1]) <= 15


def test_probe_without_privilege_is_unknown_not_false():
    def current(kind, name):
        raise OSError(errno.EPERM, "Operation not permitted")
    supported, detail = kernel.probe_link_kind("wireguard", new_netns=lambda kind: None, current_netns=current)
    assert supported is None and "could not ask" in detail


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
def test_real_probe_leaves_no_link_behind():
    before = os.listdir("/sys/class/net")
    supported, detail = kernel.probe_wireguard()
    assert supported in (True, False), detail
    # a kind every kernel has: the probe machinery itself works end to end
    assert kernel.probe_link_kind("bridge")[0] in (True, False)
    assert os.listdir("/sys/class/net") == before


# -- facts.gather and the ebpf_facts module ---------------------------------------------------------

def test_gather_runs_without_a_module():
    from ansible_collections.kldload.netstack.plugins.module_utils import facts, mounts

    before = mounts.bpf_mounts(mounts.read_mounts())
    found = facts.gather(None, wireguard_probe=False, iptables=False)
    after = mounts.bpf_mounts(mounts.read_mounts())
    assert found["cgroup2_path"] == mounts.cgroup2_path()
    assert found["bpffs_mounts"] in (before, after)     # other tests on the machine may mount one meanwhile
    assert found["wireguard"]["detail"] == "probe disabled (wireguard_probe=false)"
    assert "iptables" not in found and set(found["requirements_unmet"]) <= set(r["name"] for r in found["requirements"])
    if found["bpftool"]["path"]:
        assert found["bpftool"]["version"]


def test_ebpf_facts_turns_backend_errors_into_fail_json(monkeypatch):
    from ansible_collections.kldload.netstack.plugins.modules import ebpf_facts as mod

    seen = {}

    class Failed(Exception):
        pass

    class FakeAnsibleModule:
        def __init__(self, argument_spec, supports_check_mode=False):
            self.params = dict((k, v.get("default")) for k, v in argument_spec.items())

        def fail_json(self, **kw):
            seen.update(kw)
            raise Failed()

    def broken(module, wireguard_probe, iptables, packages=None):
        raise ValueError("not a kernel release: 'linux'")
    monkeypatch.setattr(mod, "AnsibleModule", FakeAnsibleModule)
    monkeypatch.setattr(mod, "gather", broken)
    with pytest.raises(Failed):
        mod.main()
    assert seen == dict(msg="gathering eBPF facts failed: not a kernel release: 'linux'")


def test_os_release_families():
    from ansible_collections.kldload.netstack.plugins.module_utils import facts
    assert facts.parse_os_release('ID=debian\nVERSION_ID="13"\n') == {"id": "debian", "version_id": "13", "family": "Debian"}
    assert facts.parse_os_release('ID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="9"\n')["family"] == "RedHat"
    assert facts.parse_os_release('ID=rocky\nID_LIKE="rhel centos fedora"\n')["family"] == "RedHat"
    assert facts.parse_os_release('ID=arch\n')["family"] is None


def test_missing_packages_asks_the_package_database():
    from ansible_collections.kldload.netstack.plugins.module_utils import facts
    if not os.path.exists("/usr/bin/dpkg-query"):
        pytest.skip("not a Debian machine")
    assert facts.missing_packages(None, "Debian", ["bash", "no-such-package-netstack"]) == ["no-such-package-netstack"]
    assert facts.missing_packages(None, "Debian", []) == []
    assert facts.missing_packages(None, "Plan9", ["bash"]) is None
