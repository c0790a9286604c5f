import os
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpffs, mounts

PATHS = ["/sys/fs/bpf", "/run/nstest-bpf", "/run/a b/c.d", "/", "/srv/x_y:z", "/run/.hidden/a-b",
         "/run/caf\u00e9", "/run/100%"]


@pytest.mark.parametrize("path,expected", [
    ("/sys/fs/bpf", "sys-fs-bpf.mount"),
    ("/run/netstack-test-bpf", "run-netstack\\x2dtest\\x2dbpf.mount"),
    ("/", "-.mount"),
    ("/run//x/", "run-x.mount"),
    ("/run/.hidden/a.b", "run-.hidden-a.b.mount"),
    ("/.x", "\\x2ex.mount"),
    ("/run/a b", "run-a\\x20b.mount"),
    ("/run/caf\u00e9", "run-caf\\xc3\\xa9.mount"),
])
def test_mount_unit_names(path, expected):
    assert bpffs.mount_unit_name(path) == expected


@pytest.mark.parametrize("path", PATHS)
def test_escape_matches_systemd_escape(path):
    try:
        expected = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path], capture_output=True,
                                  text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("systemd-escape not available")
    assert bpffs.mount_unit_name(path) == expected


def test_systemd_api_mount_points_get_a_service():
    # systemd refuses .mount units for its API file systems; /sys/fs/bpf is one
    assert bpffs.systemd_api_path("/sys/fs/bpf") and bpffs.systemd_api_path("/sys/fs/cgroup/x")
    assert not bpffs.systemd_api_path("/run/netstack/bpf") and not bpffs.systemd_api_path("/sys/fs/bpf/sub")
    assert bpffs.unit_name("/sys/fs/bpf") == "netstack-bpffs-sys-fs-bpf.service"
    assert bpffs.unit_name("/run/netstack/bpf") == "run-netstack-bpf.mount"
    text = bpffs.unit_text("/sys/fs/bpf", 0o700)
    assert "[Service]\nType=oneshot\nRemainAfterExit=yes\n" in text and "[Mount]" not in text
    assert ("ExecStart=/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf -o "
            "rw,nosuid,nodev,noexec,relatime,mode=0700 bpffs /sys/fs/bpf; "
            "findmnt -n -t bpf --mountpoint /sys/fs/bpf >/dev/null && chmod 1700 /sys/fs/bpf'\n") in text
    assert "chmod" not in bpffs.unit_text("/sys/fs/bpf")
    assert text.count("ExecStart=") == 1
    assert "WantedBy=local-fs.target\n" in text


def test_unit_text():
    text = bpffs.unit_text("/run/100%", 0o700)
    assert "Where=/run/100%%\n" in text  # unit files expand %-specifiers
    assert "Type=bpf\n" in text and "WantedBy=local-fs.target\n" in text
    assert "Options=rw,nosuid,nodev,noexec,relatime,mode=0700\n" in text
    assert "mode=" not in bpffs.unit_text("/sys/fs/bpf")


@pytest.mark.parametrize("value,expected", [
    ("0700", 0o700), ("700", 0o700), ("1777", 0o1777), (0o750, 0o750), (None, None),
])
def test_parse_mode(value, expected):
    assert bpffs.parse_mode(value) == expected


@pytest.mark.parametrize("value", ["rwx", "u=rwx", "0800", "77", "07777777", True, -1, 0o10000, ""])
def test_bad_mode_names_mode(value):
    with pytest.raises(bpffs.BpffsError, match="^mode must be"):
        bpffs.parse_mode(value)


@pytest.mark.parametrize("value", ["relative/x", "", "/run/a\nb"])
def test_bad_path_names_path(value):
    with pytest.raises(bpffs.BpffsError, match="^path must"):
        bpffs.canonical_path(value)


def test_canonical_path_resolves_parent_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert bpffs.canonical_path(str(tmp_path / "link" / "bpf") + "/") == str(tmp_path.resolve() / "real" / "bpf")
    assert bpffs.canonical_path("//sys/fs/../fs/bpf") == "/sys/fs/bpf"
    assert bpffs.canonical_path("/") == "/"


# -- reading: a fake mount table and a fake statfs ------------------------------------------------

def _mount(path, fstype):
    return (str(path), fstype, fstype, "rw")


def _inspect(path, mounts=(), magic=None, unit_dir=None):
    def fake_statfs(p):
        if magic is None:
            raise OSError(2, "gone")
        return magic
    return bpffs.inspect(str(path), unit_dir=str(unit_dir or path), mounts=list(mounts), magic=fake_statfs)


def test_inspect_nothing_there(tmp_path):
    found = _inspect(tmp_path / "bpf", unit_dir=tmp_path)
    assert found["state"] == dict(path=str(tmp_path / "bpf"), mounted=False, fstype=None, mode=None, unit=None,
                                  enabled=False, stale_unit=None)
    assert found["facts"]["kind"] == "missing"
    assert found["facts"]["unit_path"] == os.path.join(str(tmp_path), bpffs.unit_name(str(tmp_path / "bpf")))


def test_inspect_trusts_statfs_for_bpf(tmp_path):
    d = tmp_path / "bpf"
    d.mkdir()
    os.chmod(str(d), 0o1700)
    found = _inspect(d, [_mount(d, "bpf")], mounts.BPF_FS_MAGIC, tmp_path)
    assert found["state"]["fstype"] == "bpf" and found["state"]["mode"] == "1700"
    # the mount table says bpf, but what is visible there (statfs) is a tmpfs stacked on top
    found = _inspect(d, [_mount(d, "bpf"), _mount(d, "tmpfs")], 0x01021994, tmp_path)
    assert found["state"]["mounted"] and found["state"]["fstype"] == "tmpfs"


def test_inspect_reads_unit_and_enablement(tmp_path):
    d = tmp_path / "bpf"
    d.mkdir()
    name = bpffs.unit_name(str(d))
    (tmp_path / name).write_text("x")
    (tmp_path / "local-fs.target.wants").mkdir()
    (tmp_path / "local-fs.target.wants" / name).symlink_to(tmp_path / name)
    found = _inspect(d, unit_dir=tmp_path)
    assert found["state"]["unit"] == "x" and found["state"]["enabled"] is True
    assert found["facts"]["kind"] == "directory" and found["facts"]["empty"] is True


# -- deciding -------------------------------------------------------------------------------------

def _state(**kw):
    s = dict(path="/run/x", mounted=False, fstype=None, mode=None, unit=None, enabled=False, stale_unit=None)
    s.update(kw)
    return s


def _facts(kind="directory", empty=True, service=False):
    return dict(kind=kind, empty=empty, service=service)


def test_nothing_there_is_mounted_made_persistent_and_the_directory_created():
    after, actions = bpffs.plan(_state(), _facts("missing", None))
    assert actions == ["mkdir", "mount", "write_unit", "enable", "daemon_reload"]
    assert after == _state(mounted=True, fstype="bpf", mode="1777", unit=bpffs.unit_text("/run/x"), enabled=True)
    after, actions = bpffs.plan(_state(), _facts(), mode=0o700)
    assert actions == ["mount", "write_unit", "enable", "daemon_reload"] and after["mode"] == "1700"
    assert "mode=0700" in after["unit"]


def test_not_persistent_leaves_the_unit_alone():
    after, actions = bpffs.plan(_state(unit="theirs"), _facts(), persistent=False)
    assert actions == ["mount"] and after["unit"] == "theirs" and after["enabled"] is False


def test_regular_file_is_refused_naming_path():
    with pytest.raises(bpffs.BpffsError, match="^path /run/x exists and is a regular file, not a directory; refusing"):
        bpffs.plan(_state(), _facts("file"))
    with pytest.raises(bpffs.BpffsError, match="^path /run/x is a symbolic link"):
        bpffs.plan(_state(), _facts("symlink"))
    for state in ("present", "absent"):
        with pytest.raises(bpffs.BpffsError, match="^path /run/x exists and is a special file"):
            bpffs.plan(_state(), _facts("special file"), state=state)


def test_another_filesystem_is_never_mounted_over_nor_unmounted():
    tmpfs = _state(mounted=True, fstype="tmpfs")
    with pytest.raises(bpffs.BpffsError, match="^path /run/x has a tmpfs filesystem mounted; refusing to mount bpffs"):
        bpffs.plan(tmpfs, _facts())
    with pytest.raises(bpffs.BpffsError, match="^path /run/x has a tmpfs filesystem mounted, not bpf; leaving it"):
        bpffs.plan(tmpfs, _facts(), state="absent")


def test_a_non_empty_directory_is_not_hidden():
    with pytest.raises(bpffs.BpffsError, match="^path /run/x is a directory that is not empty"):
        bpffs.plan(_state(), _facts(empty=False))


def test_present_and_correct_is_no_change():
    unit = bpffs.unit_text("/run/x", 0o700)
    before = _state(mounted=True, fstype="bpf", mode="1700", unit=unit, enabled=True)
    assert bpffs.plan(before, _facts(empty=None), mode=0o700) == (before, [])
    # without mode, the live permissions are left as they are
    unit = bpffs.unit_text("/run/x")
    before = _state(mounted=True, fstype="bpf", mode="1700", unit=unit, enabled=True)
    assert bpffs.plan(before, _facts(empty=None)) == (before, [])


def test_changed_mode_is_chmod_and_a_new_unit():
    before = _state(mounted=True, fstype="bpf", mode="1777", unit=bpffs.unit_text("/run/x"), enabled=True)
    after, actions = bpffs.plan(before, _facts(empty=None), mode=0o700)
    assert actions == ["chmod", "write_unit", "daemon_reload"] and after["mode"] == "1700"


def test_mounted_but_not_persistent_yet():
    before = _state(mounted=True, fstype="bpf", mode="1777")
    after, actions = bpffs.plan(before, _facts(empty=None))
    assert actions == ["write_unit", "enable", "daemon_reload"]


def test_absent():
    before = _state(mounted=True, fstype="bpf", mode="1777", unit="u", enabled=True)
    after, actions = bpffs.plan(before, _facts(empty=None), state="absent")
    assert actions == ["umount", "disable", "remove_unit", "daemon_reload"]
    assert after == _state()
    # nothing there: no change
    assert bpffs.plan(_state(), _facts("missing", None), state="absent") == (_state(), [])
    assert bpffs.plan(_state(), _facts(), state="absent") == (_state(), [])
    # only the unit left
    assert bpffs.plan(_state(unit="u"), _facts(), state="absent")[1] == ["remove_unit", "daemon_reload"]


def test_api_mount_point_service_is_started_and_stopped():
    before = _state(path="/sys/fs/bpf", mounted=True, fstype="bpf", mode="1700")
    after, actions = bpffs.plan(before, _facts(empty=None, service=True))
    assert actions == ["write_unit", "enable", "daemon_reload", "start"]
    assert after["unit"] == bpffs.unit_text("/sys/fs/bpf")
    assert bpffs.plan(after, _facts(empty=None, service=True)) == (after, [])
    gone, actions = bpffs.plan(after, _facts(empty=None, service=True), state="absent")
    assert actions == ["stop", "umount", "disable", "remove_unit", "daemon_reload"]


def test_a_stale_mount_unit_for_an_api_mount_point_is_removed(tmp_path):
    sysfs = tmp_path / "sys" / "fs" / "bpf"
    sysfs.mkdir(parents=True)
    units = tmp_path / "units"
    (units / "local-fs.target.wants").mkdir(parents=True)
    (units / "sys-fs-bpf.mount").write_text(bpffs.UNIT_MARKER + "\n[Mount]\n")
    (units / "local-fs.target.wants" / "sys-fs-bpf.mount").symlink_to(units / "sys-fs-bpf.mount")
    found = bpffs.inspect("/sys/fs/bpf", unit_dir=str(units), mounts=[("/sys/fs/bpf", "bpf", "bpffs", "rw")],
                          magic=lambda p: mounts.BPF_FS_MAGIC)
    assert found["state"]["stale_unit"].startswith(bpffs.UNIT_MARKER)
    assert found["facts"]["unit_path"] == str(units / "netstack-bpffs-sys-fs-bpf.service")
    after, actions = bpffs.plan(found["state"], found["facts"])
    assert actions[-3:] == ["remove_stale_unit", "daemon_reload", "start"] and after["stale_unit"] is None
    # someone else's sys-fs-bpf.mount (Cilium's, say) is not ours to remove
    (units / "sys-fs-bpf.mount").write_text("[Mount]\nWhat=bpffs\n")
    found = bpffs.inspect("/sys/fs/bpf", unit_dir=str(units), mounts=[], magic=lambda p: 0)
    assert found["state"]["stale_unit"] is None
    assert "remove_stale_unit" not in bpffs.plan(found["state"], found["facts"], state="absent")[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_real_statfs_and_inspect_on_a_private_bpffs(tmp_path):
    d = tmp_path / "bpf"
    d.mkdir()
    if subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpffs", str(d)], check=False).returncode != 0:
        pytest.skip("cannot mount bpffs here")
    try:
        assert mounts.statfs_magic(str(d)) == mounts.BPF_FS_MAGIC
        found = bpffs.inspect(str(d), unit_dir=str(tmp_path))
        assert found["state"]["mounted"] and found["state"]["fstype"] == "bpf" and found["state"]["mode"] == "1700"
    finally:
        subprocess.run(["umount", str(d)], check=True)
    assert mounts.statfs_magic(str(d)) != mounts.BPF_FS_MAGIC
    assert bpffs.inspect(str(d), unit_dir=str(tmp_path))["state"]["mounted"] is False


# -- run_bpffs raises, the module turns the errors into fail_json ---------------------------------

def _params(path="/run/x", **kw):
    p = dict(path=path, state="present", persistent=True, mode=None)
    p.update(kw)
    return p


def test_a_refused_request_raises_with_the_path_as_given():
    with pytest.raises(bpffs.BpffsError, match="^mode must be") as e:
        bpffs.run_bpffs(None, _params("/run//x", mode="rwx"))
    assert e.value.fields == dict(path="/run//x")


def test_a_failed_step_raises_with_path_and_actions(monkeypatch, tmp_path):
    target = str(tmp_path / "bpf")
    monkeypatch.setattr(bpffs, "inspect", lambda path: dict(
        state=_state(path=path), facts=dict(_facts("missing", None), unit_path="/u", wants_path="/w")))

    def failing_apply(module, path, facts, actions, mode=None):
        raise bpffs.ToolError(["mount", "-t", "bpf"], 32, "", "mount: permission denied\n")
    monkeypatch.setattr(bpffs, "apply", failing_apply)
    with pytest.raises(bpffs.BpffsError) as e:
        bpffs.run_bpffs(None, _params(target))
    assert str(e.value) == "bpffs at %s: mount -t bpf exited 32: mount: permission denied" % target
    assert e.value.fields == dict(path=target, actions=["mkdir", "mount", "write_unit", "enable", "daemon_reload"])
    # check mode plans the same and applies nothing
    result = bpffs.run_bpffs(None, _params(target), check_mode=True, want_diff=True)
    assert result["changed"] and result["actions"][:2] == ["mkdir", "mount"] and "diff" in result


class _Failed(Exception):
    pass


def _run_module(monkeypatch, run):
    from ansible_collections.kldload.netstack.plugins.modules import bpffs as mod

    seen = {}

    class FakeAnsibleModule:
        def __init__(self, argument_spec, supports_check_mode=False):
            self.params = dict((k, v.get("default")) for k, v in argument_spec.items())
            self.check_mode, self._diff = False, False

        def fail_json(self, **kw):
            seen.update(kw)
            raise _Failed()

        def exit_json(self, **kw):
            seen.update(kw)
            raise SystemExit(0)

    monkeypatch.setattr(mod, "AnsibleModule", FakeAnsibleModule)
    monkeypatch.setattr(mod, "run_bpffs", run)
    with pytest.raises((_Failed, SystemExit)):
        mod.main()
    return seen


def test_module_fails_with_the_errors_message_and_fields(monkeypatch):
    def refused(module, params, check_mode, want_diff):
        raise bpffs.BpffsError("path /sys/fs/bpf has a tmpfs filesystem mounted; refusing", path=params["path"])
    assert _run_module(monkeypatch, refused) == dict(
        msg="path /sys/fs/bpf has a tmpfs filesystem mounted; refusing", path="/sys/fs/bpf")

    def step_failed(module, params, check_mode, want_diff):
        raise bpffs.BpffsError("bpffs at /sys/fs/bpf: boom", path="/sys/fs/bpf", actions=["mount"])
    assert _run_module(monkeypatch, step_failed) == dict(
        msg="bpffs at /sys/fs/bpf: boom", path="/sys/fs/bpf", actions=["mount"])

    def unreadable(module, params, check_mode, want_diff):
        raise OSError(13, "Permission denied", "/proc/self/mountinfo")
    seen = _run_module(monkeypatch, unreadable)
    assert seen["path"] == "/sys/fs/bpf" and "Permission denied" in seen["msg"]

    def fine(module, params, check_mode, want_diff):
        return dict(changed=False, path=params["path"], mounted=True, unit=None, actions=[])
    assert _run_module(monkeypatch, fine)["mounted"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_run_bpffs_without_a_module_mounts_and_unmounts(tmp_path):
    d = str(tmp_path / "bpf")
    try:
        result = bpffs.run_bpffs(None, _params(d, persistent=False, mode="0700"))
    except bpffs.BpffsError as e:
        pytest.skip("cannot mount bpffs here: %s" % e)
    try:
        assert result == dict(changed=True, path=d, mounted=True, unit=None, actions=["mkdir", "mount"])
        assert mounts.is_bpffs(d) and oct(os.stat(d).st_mode & 0o7777) == "0o1700"
        assert bpffs.run_bpffs(None, _params(d, persistent=False, mode="0700"))["changed"] is False
    finally:
        result = bpffs.run_bpffs(None, _params(d, state="absent", persistent=False))
    assert result["actions"] == ["umount"] and not mounts.is_bpffs(d)
