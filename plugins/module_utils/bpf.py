# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The BPF filesystem: mounted at a path, persistent through a systemd mount unit."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import stat

from ansible_collections.kldload.netstack.plugins.module_utils.kernel import read_mounts
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, ToolError

UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = os.path.join(UNIT_DIR, "local-fs.target.wants")
BPF_FS_MAGIC = 0xCAFE4A11


class BpffsError(Exception):
    pass


def escape_path(path):
    """systemd-escape --path: strip slashes, '/' -> '-', other unsafe bytes -> \\xNN."""
    path = os.path.normpath(path).strip("/")
    if not path:
        return "-"
    out = []
    for i, ch in enumerate(path):
        if ch == "/":
            out.append("-")
        elif ch.isalnum() and ord(ch) < 128 or ch in "_:" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend("\\x%02x" % b for b in ch.encode("utf-8"))
    return "".join(out)


def unit_name(path):
    return escape_path(path) + ".mount"


def unit_text(path, mode=None):
    options = "rw,nosuid,nodev,noexec,relatime" + (",mode=%s" % mode if mode else "")
    return (
        "# Managed by kldload.netstack.bpffs\n"
        "[Unit]\n"
        "Description=BPF filesystem at %s (kldload.netstack)\n"
        "Documentation=man:bpf(2)\n"
        "DefaultDependencies=no\n"
        "Before=local-fs.target umount.target\n"
        "Conflicts=umount.target\n"
        "\n"
        "[Mount]\n"
        "What=bpffs\n"
        "Where=%s\n"
        "Type=bpf\n"
        "Options=%s\n"
        "\n"
        "[Install]\n"
        "WantedBy=local-fs.target\n"
    ) % (path, path, options)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return None


class Bpffs:
    """Read the current state at a path, compute the wanted one, apply the difference."""

    def __init__(self, module, path, state="present", persistent=True, mode=None):
        self.module = module
        self.path = os.path.normpath(path)
        self.state = state
        self.persistent = persistent
        self.mode = mode
        self.unit = os.path.join(UNIT_DIR, unit_name(self.path))
        self.wants = os.path.join(WANTS_DIR, unit_name(self.path))
        self.mount_tool = Tool(module, "mount")
        self.umount_tool = Tool(module, "umount")
        self.systemctl = Tool(module, "systemctl")

    # -- state -------------------------------------------------------------------------------
    def fstype(self):
        """Filesystem type mounted exactly at path (the top of the stack), or None."""
        found = None
        for point, fstype, dummy, dummy2 in read_mounts():
            if point == self.path:
                found = fstype
        return found

    def current(self):
        return dict(path=self.path, fstype=self.fstype(), unit=_read(self.unit),
                    enabled=os.path.islink(self.wants))

    def desired(self, before):
        if self.state == "absent":
            return dict(path=self.path, fstype=None, unit=None, enabled=False)
        return dict(path=self.path, fstype="bpf",
                    unit=unit_text(self.path, self.mode) if self.persistent else before["unit"],
                    enabled=True if self.persistent else before["enabled"])

    def validate(self, before):
        """Refuse what must never be done; raises BpffsError naming `path`."""
        if not os.path.isabs(self.path):
            raise BpffsError("path must be absolute, got %r" % self.path)
        if os.path.lexists(self.path):
            st = os.lstat(self.path)
            if stat.S_ISLNK(st.st_mode):
                raise BpffsError("path %s is a symbolic link; give the real directory" % self.path)
            if not stat.S_ISDIR(st.st_mode):
                raise BpffsError("path %s exists and is not a directory; refusing to mount bpffs there"
                                 % self.path)
        if self.state == "present" and before["fstype"] not in (None, "bpf"):
            raise BpffsError("path %s has a %s filesystem mounted; refusing to mount bpffs over it"
                             % (self.path, before["fstype"]))
        if self.state == "absent" and before["fstype"] not in (None, "bpf"):
            raise BpffsError("path %s has a %s filesystem mounted, not bpf; leaving it alone"
                             % (self.path, before["fstype"]))
        if self.mode is not None:
            try:
                if int(self.mode, 8) > 0o7777:
                    raise ValueError()
            except ValueError:
                raise BpffsError("mode must be an octal permission string such as 0700, got %r" % self.mode)

    # -- apply -------------------------------------------------------------------------------
    def _systemd_running(self):
        return os.path.isdir("/run/systemd/system") and self.systemctl.available

    def apply(self, before, after):
        if self.state == "present":
            if before["unit"] != after["unit"] and after["unit"] is not None:
                self._write_unit(after["unit"])
            if after["enabled"] and not before["enabled"]:
                os.makedirs(WANTS_DIR, exist_ok=True)
                os.symlink(self.unit, self.wants)
            if before["fstype"] != "bpf":
                if not os.path.isdir(self.path):
                    os.makedirs(self.path, 0o755)
                opts = "rw,nosuid,nodev,noexec,relatime" + (",mode=%s" % self.mode if self.mode else "")
                self.mount_tool.run("-t", "bpf", "-o", opts, "bpffs", self.path)
        else:
            if before["fstype"] == "bpf":
                self.umount_tool.run(self.path)
            if before["enabled"]:
                os.unlink(self.wants)
            if before["unit"] is not None:
                os.unlink(self.unit)
        if before["unit"] != after["unit"] and self._systemd_running():
            self.systemctl.run("daemon-reload", check=False)

    def _write_unit(self, text):
        os.makedirs(UNIT_DIR, exist_ok=True)
        tmp = self.unit + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.unit)


def run_bpffs(module, params, check_mode=False, want_diff=False):
    fs = Bpffs(module, params["path"], params["state"], params["persistent"], params.get("mode"))
    before = fs.current()
    try:
        fs.validate(before)
    except BpffsError as e:
        module.fail_json(msg=str(e), path=fs.path)
    after = fs.desired(before)
    changed = before != after
    if changed and not check_mode:
        try:
            fs.apply(before, after)
        except (ToolError, OSError) as e:
            module.fail_json(msg="bpffs at %s: %s" % (fs.path, e), path=fs.path)
        after = fs.current()
    result = dict(changed=changed, path=fs.path, mounted=after["fstype"] == "bpf",
                  unit=fs.unit if after["unit"] is not None else None)
    if want_diff:
        result["diff"] = dict(before=before, after=after)
    return result
