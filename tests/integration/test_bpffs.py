"""bpffs on real nodes: mounted, persistent across a node restart, refuses what it must."""
import pytest

CUSTOM = "/run/netstack-test-bpf"


def _fstype(lab, host, path):
    return lab.sh(host, "stat -f -c %%T %s" % path, check=False).stdout.strip()


def test_default_path_four_times(lab):
    host = lab.hosts("kube_control_plane")[0]
    lab.module(host, "kldload.netstack.bpffs", {"state": "absent"})
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpffs")
    assert first["changed"] and first["diff"]["after"]["fstype"] == "bpf"
    assert _fstype(lab, host, "/sys/fs/bpf") == "bpf_fs"
    assert applied["unit"] == "/etc/systemd/system/sys-fs-bpf.mount"
    assert lab.sh(host, "systemctl is-enabled sys-fs-bpf.mount").stdout.strip() == "enabled"


def test_custom_path_persists_across_a_node_restart(lab):
    host = lab.hosts("kube_workers")[-1]
    lab.four_times(host, "kldload.netstack.bpffs", {"path": CUSTOM, "mode": "0700"})
    assert _fstype(lab, host, CUSTOM) == "bpf_fs"
    assert lab.sh(host, "stat -c %%a %s" % CUSTOM).stdout.strip().endswith("700")  # bpffs keeps the sticky bit
    lab.restart(host)
    assert _fstype(lab, host, CUSTOM) == "bpf_fs"
    # and the module agrees nothing needs doing
    assert lab.module(host, "kldload.netstack.bpffs", {"path": CUSTOM, "mode": "0700"})["changed"] is False
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpffs", {"path": CUSTOM, "state": "absent"})
    assert first["changed"]
    assert _fstype(lab, host, CUSTOM) != "bpf_fs"
    assert lab.sh(host, "ls /etc/systemd/system/ | grep -c netstack-test || true").stdout.strip() == "0"


@pytest.mark.parametrize("setup,what", [
    ("mkdir -p /run/nsbad && touch /run/nsbad/file", "file"),
    ("mkdir -p /run/nsbad/tmp && mount -t tmpfs none /run/nsbad/tmp", "tmp"),
])
def test_refuses_a_file_or_another_filesystem_and_changes_nothing(lab, setup, what):
    host = lab.hosts("kube_workers")[0]
    path = "/run/nsbad/%s" % what
    lab.sh(host, setup)
    try:
        before = lab.sh(host, "stat -c '%%F %%s' %s; findmnt -n %s || true" % (path, path)).stdout
        for check in (True, False):
            res = lab.module(host, "kldload.netstack.bpffs", {"path": path}, check=check, expect_fail=True)
            assert path in res["msg"] and "refusing" in res["msg"], res["msg"]
        assert lab.sh(host, "stat -c '%%F %%s' %s; findmnt -n %s || true" % (path, path)).stdout == before
        assert "nsbad" not in lab.sh(host, "ls /etc/systemd/system").stdout
    finally:
        lab.sh(host, "umount /run/nsbad/tmp 2>/dev/null; rm -rf /run/nsbad", check=False)


def test_unknown_option_is_rejected(lab):
    res = lab.module(lab.hosts()[0], "kldload.netstack.bpffs", {"pth": "/x"}, expect_fail=True)
    assert "pth" in res["msg"]
