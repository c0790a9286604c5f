"""mounts: the mount table (/proc/self/mountinfo), statfs(2) magic numbers, bpffs and cgroup2 detection."""
import os
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import mounts

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
40 25 0:33 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
41 30 0:34 / /run/my\\040bpf rw,relatime - bpf bpffs rw
"""
ELSEWHERE = "27 26 0:25 / /run/cg2 rw - cgroup2 none rw\n"
UNIFIED = "27 26 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"


def test_cgroup2_detected_on_hybrid_and_unified_layouts():
    assert mounts.cgroup2_path(mounts.parse_mountinfo(HYBRID)) == "/sys/fs/cgroup/unified"
    assert mounts.cgroup2_path(mounts.parse_mountinfo(UNIFIED)) == "/sys/fs/cgroup"
    assert mounts.cgroup2_path(mounts.parse_mountinfo(ELSEWHERE)) == "/run/cg2"
    assert mounts.cgroup2_path(mounts.parse_mountinfo(HYBRID.replace("cgroup2 cgroup2", "cgroup cgroup"))) is None
    assert mounts.cgroup2_path([]) is None


def test_mountinfo_fields():
    table = mounts.parse_mountinfo(HYBRID)
    assert table[2] == ("/sys/fs/cgroup/unified", "cgroup2", "cgroup2", "rw,nosuid,nodev,noexec,relatime")
    assert mounts.parse_mountinfo("garbage\n\n") == []


def test_the_real_mount_table_parses():
    table = mounts.read_mounts()
    assert any(m[0] == "/" for m in table)


def test_bpf_mounts_with_escaped_names():
    assert mounts.bpf_mounts(mounts.parse_mountinfo(HYBRID)) == ["/sys/fs/bpf", "/run/my bpf"]


def test_parse_mountinfo_unescapes_and_skips_short_lines():
    text = "41 30 0:34 / /run/a\\011tab\\134x rw - bpf none rw\n1 2 3 - x\n"
    assert mounts.parse_mountinfo(text) == [("/run/a\ttab\\x", "bpf", "none", "rw")]


def test_bpf_mounts_once_each_in_table_order():
    table = [("/b", "bpf", "bpf", "rw"), ("/a", "bpf", "bpf", "rw"), ("/b", "bpf", "bpf", "rw"), ("/c", "tmpfs", "x", "rw")]
    assert mounts.bpf_mounts(table) == ["/b", "/a"]


def test_cgroup2_elsewhere_prefers_the_shortest_path():
    table = [("/run/cg2/deeper", "cgroup2", "none", "rw"), ("/run/cg2", "cgroup2", "none", "rw")]
    assert mounts.cgroup2_path(table) == "/run/cg2"


def test_statfs_of_a_missing_path_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        mounts.statfs_magic(str(tmp_path / "missing"))


def test_real_statfs_root_is_neither_bpffs_nor_cgroup2():
    magic = mounts.statfs_magic("/")
    assert isinstance(magic, int) and 0 < magic <= 0xFFFFFFFF
    assert not mounts.is_bpffs("/") and not mounts.is_cgroup2("/")


def test_is_bpffs_asks_the_nearest_existing_directory(tmp_path, monkeypatch):
    asked = []

    def fake(path):
        asked.append(path)
        return mounts.BPF_FS_MAGIC
    monkeypatch.setattr(mounts, "statfs_magic", fake)
    assert mounts.is_bpffs(str(tmp_path / "not" / "there" / "yet"))
    assert asked == [str(tmp_path)]
    assert mounts.is_cgroup2(str(tmp_path)) is False


def test_cgroup2_detection_agrees_with_statfs():
    path = mounts.cgroup2_path()
    if path is None:
        pytest.skip("no cgroup2 mounted here")
    assert mounts.is_cgroup2(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_is_bpffs_on_a_private_bpffs(tmp_path):
    d = tmp_path / "bpf"
    d.mkdir()
    if subprocess.run(["mount", "-t", "bpf", "bpffs", str(d)], check=False).returncode != 0:
        pytest.skip("cannot mount bpffs here")
    try:
        assert mounts.is_bpffs(str(d)) and mounts.is_bpffs(str(d / "pins" / "below"))
        assert str(d) in mounts.bpf_mounts(mounts.read_mounts())
    finally:
        subprocess.run(["umount", str(d)], check=True)
    assert not mounts.is_bpffs(str(d))
