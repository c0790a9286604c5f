import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpf


@pytest.mark.parametrize("path", ["/sys/fs/bpf", "/run/nstest-bpf", "/run/a b/c.d", "/", "/srv/x_y:z"])
def test_escape_matches_systemd_escape(path):
    try:
        expected = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path], capture_output=True,
                                  text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("systemd-escape not available")
    assert bpf.unit_name(path) == expected


class _Module:
    def get_bin_path(self, *a, **k):
        return None


def _fs(path, state="present", mode=None):
    return bpf.Bpffs(_Module(), str(path), state=state, mode=mode)


def test_regular_file_is_refused_naming_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    fs = _fs(f)
    with pytest.raises(bpf.BpffsError, match="path %s exists and is not a directory" % f):
        fs.validate(dict(fstype=None))


def test_other_filesystem_is_never_mounted_over(tmp_path):
    fs = _fs(tmp_path)
    with pytest.raises(bpf.BpffsError, match="has a tmpfs filesystem mounted; refusing"):
        fs.validate(dict(fstype="tmpfs"))
    with pytest.raises(bpf.BpffsError, match="not bpf; leaving it alone"):
        _fs(tmp_path, state="absent").validate(dict(fstype="tmpfs"))


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(bpf.BpffsError, match="mode must be an octal"):
        _fs(tmp_path, mode="rwx").validate(dict(fstype=None))


def test_desired_state(tmp_path):
    fs = _fs(tmp_path / "bpf", mode="0700")
    before = dict(path=fs.path, fstype=None, unit=None, enabled=False)
    after = fs.desired(before)
    assert after["fstype"] == "bpf" and after["enabled"] is True
    assert "Options=rw,nosuid,nodev,noexec,relatime,mode=0700" in after["unit"]
    assert "Where=%s" % fs.path in after["unit"]
    gone = _fs(tmp_path / "bpf", state="absent").desired(after)
    assert gone == dict(path=fs.path, fstype=None, unit=None, enabled=False)
