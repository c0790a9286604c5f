"""bpffs on real nodes: mounted, persistent across a node restart, refuses what it must."""
import pytest

CUSTOM = "/run/netstack-test-bpf"
CUSTOM_UNIT = "/etc/systemd/system/run-netstack\\x2dtest\\x2dbpf.mount"


def _fstype(lab, host, path):
    return lab.sh(host, "stat -f -c %%T %s" % path, check=False).stdout.strip()


def _unit_state(lab, host, path):
    if path == "/sys/fs/bpf":  # systemd refuses .mount units for its API mount points: a service
        unit = "netstack-bpffs-sys-fs-bpf.service"
    else:
        unit = '"$(systemd-escape --path --suffix=mount %s)"' % path
    return (lab.sh(host, "systemctl is-enabled %s" % unit, check=False).stdout.strip(),
            lab.sh(host, "systemctl is-active %s" % unit, check=False).stdout.strip())


def test_default_path_four_times(lab):
    host = lab.hosts("kube_control_plane")[0]
    lab.module(host, "kldload.netstack.bpffs", {"state": "absent"})
    assert _fstype(lab, host, "/sys/fs/bpf") != "bpf_fs"
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpffs")
    assert first["changed"] and first["diff"]["before"]["mounted"] is False
    assert first["diff"]["after"]["fstype"] == "bpf" and first["diff"]["after"]["enabled"] is True
    assert "mount" in first["actions"] and first["actions"] == applied["actions"]
    assert _fstype(lab, host, "/sys/fs/bpf") == "bpf_fs"
    assert applied["unit"] == "/etc/systemd/system/netstack-bpffs-sys-fs-bpf.service" and applied["mounted"] is True
    assert lab.sh(host, "test -e /etc/systemd/system/sys-fs-bpf.mount", check=False).returncode != 0
    assert again["actions"] == [] and again["diff"]["before"] == again["diff"]["after"]
    assert _unit_state(lab, host, "/sys/fs/bpf") == ("enabled", "active")
    # no refused sys-fs-bpf.mount left (systemd ignores its API mounts: no unit for it at all)
    assert lab.sh(host, "systemctl show -P LoadState sys-fs-bpf.mount").stdout.strip() == "not-found"
    assert lab.sh(host, "systemctl show -P FragmentPath sys-fs-bpf.mount").stdout.strip() == ""


def test_custom_path_persists_across_a_node_restart(lab):
    host = lab.hosts("kube_workers")[-1]
    lab.module(host, "kldload.netstack.bpffs", {"path": CUSTOM, "state": "absent"})
    assert lab.sh(host, "test -e %s" % CUSTOM, check=False).returncode != 0 or _fstype(lab, host, CUSTOM) != "bpf_fs"
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpffs", {"path": CUSTOM, "mode": "0700"})
    assert first["changed"] and applied["unit"] == CUSTOM_UNIT
    assert _fstype(lab, host, CUSTOM) == "bpf_fs"
    assert lab.sh(host, "stat -c %%a %s" % CUSTOM).stdout.strip() == "1700"  # the kernel adds the sticky bit
    assert "Options=rw,nosuid,nodev,noexec,relatime,mode=0700" in lab.sh(host, "cat '%s'" % CUSTOM_UNIT).stdout
    assert _unit_state(lab, host, CUSTOM) == ("enabled", "active")
    # the default path too: a service, since systemd refuses .mount units for /sys/fs/bpf
    lab.module(host, "kldload.netstack.bpffs", {"mode": "0700"})

    lab.restart(host)
    assert _fstype(lab, host, CUSTOM) == "bpf_fs"
    assert _fstype(lab, host, "/sys/fs/bpf") == "bpf_fs"
    assert lab.sh(host, "stat -c %a /sys/fs/bpf").stdout.strip() == "1700"
    assert _unit_state(lab, host, "/sys/fs/bpf") == ("enabled", "active")
    assert lab.module(host, "kldload.netstack.bpffs", {"mode": "0700"})["changed"] is False
    lab.module(host, "kldload.netstack.bpffs")  # back to the unit the prereqs role writes
    assert lab.sh(host, "stat -c %%a %s" % CUSTOM).stdout.strip() == "1700"
    assert _unit_state(lab, host, CUSTOM) == ("enabled", "active")
    # and the module agrees nothing needs doing
    assert lab.module(host, "kldload.netstack.bpffs", {"path": CUSTOM, "mode": "0700"})["changed"] is False

    # other permissions: chmod of the live root, and the unit follows
    first = lab.four_times(host, "kldload.netstack.bpffs", {"path": CUSTOM, "mode": "0750"})[0]
    assert first["changed"] and "chmod" in first["actions"] and "umount" not in first["actions"]
    assert lab.sh(host, "stat -c %%a %s" % CUSTOM).stdout.strip() == "1750"

    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpffs", {"path": CUSTOM, "state": "absent"})
    assert first["changed"] and first["diff"]["after"]["mounted"] is False
    assert applied["unit"] is None and applied["mounted"] is False
    assert _fstype(lab, host, CUSTOM) != "bpf_fs"
    assert lab.sh(host, "ls /etc/systemd/system/ /etc/systemd/system/local-fs.target.wants/ "
                        "| grep -c x2dtest || true").stdout.strip() == "0"
    assert _unit_state(lab, host, CUSTOM)[1] != "active"


@pytest.mark.parametrize("setup,what,state", [
    ("mkdir -p /run/nsbad && echo keep > /run/nsbad/file", "file", "present"),
    ("mkdir -p /run/nsbad/tmp && mount -t tmpfs none /run/nsbad/tmp", "tmp", "present"),
    ("mkdir -p /run/nsbad/tmp && mount -t tmpfs none /run/nsbad/tmp", "tmp", "absent"),
    ("mkdir -p /run/nsbad/full && echo keep > /run/nsbad/full/x", "full", "present"),
])
def test_refuses_a_file_or_another_filesystem_and_changes_nothing(lab, setup, what, state):
    host = lab.hosts("kube_workers")[0]
    path = "/run/nsbad/%s" % what
    lab.sh(host, "umount /run/nsbad/tmp 2>/dev/null; rm -rf /run/nsbad; " + setup)
    look = "stat -c '%%F %%s %%a' %s; stat -f -c %%T %s; find %s | sort; findmnt -n %s || true" % ((path,) * 4)
    try:
        before = lab.sh(host, look).stdout
        for check in (True, False):
            res = lab.module(host, "kldload.netstack.bpffs", {"path": path, "state": state}, check=check,
                             expect_fail=True)
            assert res["msg"].startswith("path %s " % path), res["msg"]
            assert ("refusing" if state == "present" else "leaving it alone") in res["msg"], res["msg"]
        assert lab.sh(host, look).stdout == before
        assert "nsbad" not in lab.sh(host, "ls /etc/systemd/system /etc/systemd/system/local-fs.target.wants 2>/dev/null; true").stdout
    finally:
        lab.sh(host, "umount /run/nsbad/tmp 2>/dev/null; rm -rf /run/nsbad", check=False)


@pytest.mark.parametrize("args,field", [
    ({"pth": "/x"}, "pth"),
    ({"path": "/run/nsbad-mode", "mode": "rwx"}, "mode"),
    ({"path": "relative/bpf"}, "path"),
    ({"path": "/run/nsbad-state", "state": "mounted"}, "state"),
])
def test_bad_input_is_rejected_naming_the_field(lab, args, field):
    host = lab.hosts()[0]
    res = lab.module(host, "kldload.netstack.bpffs", args, expect_fail=True)
    assert field in res["msg"], res["msg"]
    assert lab.sh(host, "ls -d /run/nsbad-* 2>/dev/null | wc -l").stdout.strip() == "0"
