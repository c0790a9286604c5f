import gzip

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import kernel

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
40 25 0:33 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
41 30 0:34 / /run/my\\040bpf rw,relatime - bpf bpffs rw
"""
UNIFIED = "27 26 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize("release,expected", [
    ("6.18.44-fc-v669", (6, 18, 44)), ("5.14.0-427.el9.x86_64", (5, 14, 0)), ("4.19", (4, 19, 0)),
])
def test_parse_release(release, expected):
    assert kernel.parse_release(release) == expected


def test_parse_release_rejects_garbage():
    with pytest.raises(ValueError):
        kernel.parse_release("linux")


def test_cgroup2_detected_on_hybrid_and_unified_layouts():
    assert kernel.cgroup2_path(kernel.parse_mountinfo(HYBRID)) == "/sys/fs/cgroup/unified"
    assert kernel.cgroup2_path(kernel.parse_mountinfo(UNIFIED)) == "/sys/fs/cgroup"
    assert kernel.cgroup2_path([]) is None


def test_bpf_mounts_with_escaped_names():
    assert kernel.bpf_mounts(kernel.parse_mountinfo(HYBRID)) == ["/sys/fs/bpf", "/run/my bpf"]


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


class _FakeIp:
    available = True

    def __init__(self, rc, err=""):
        self.rc, self.err, self.calls = rc, err, []

    def run(self, *args, **kw):
        self.calls.append(args)
        return (self.rc if args[1] == "add" else 0), "", self.err


def test_wireguard_probe_cleans_up_and_reports_kernel_answer():
    ok = _FakeIp(0)
    assert kernel.probe_wireguard(ok)[0] is True
    assert ok.calls[-1][:2] == ("link", "del")
    no = _FakeIp(2, "Error: Unknown device type.")
    assert kernel.probe_wireguard(no) == (False, "Error: Unknown device type.")
    assert len(no.calls) == 1
