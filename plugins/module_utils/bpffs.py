# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The BPF filesystem: mounted at a path, persistent through a systemd mount unit.

Persistence is a systemd mount unit, except where systemd refuses one: for the mount points it
treats as its own API file systems - /sys/fs/bpf among them, which it mounts itself at boot except
in containers - it will not load a .mount unit ("Cannot create mount unit for API file system ...
Refusing."), so there a oneshot service mounts bpffs at boot when nothing is mounted yet.

``inspect()`` reads what is at the path now (mount table, statfs magic, the unit file and its
enablement), ``plan()`` - a pure function - checks the request against it and returns the wanted
state and the actions that get there (or raises BpffsError, before anything is touched), and
``apply()`` performs the actions.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import stat

from ansible_collections.kldload.netstack.plugins.module_utils.mounts import (
    BPF_FS_MAGIC, read_mounts, statfs_magic)
from ansible_collections.kldload.netstack.plugins.module_utils import units
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, ToolError

UNIT_DIR = "/etc/systemd/system"
WANTED_BY = "local-fs.target"
MOUNT_OPTIONS = "rw,nosuid,nodev,noexec,relatime"
# bpffs root: mode= (default 0777) plus the sticky bit, which the kernel always adds
DEFAULT_ROOT_MODE = 0o1777
UNIT_MARKER = "# Managed by kldload.netstack.bpffs"


class BpffsError(Exception):
    """The request cannot be carried out; the message names the offending option.

    ``fields`` are the extra fail_json fields the module reports with it (path, actions)."""

    def __init__(self, msg, **fields):
        super(BpffsError, self).__init__(msg)
        self.fields = fields


# -- names ----------------------------------------------------------------------------------------

def escape_path(path):
    """``systemd-escape --path``: strip slashes, '/' -> '-', other unsafe bytes (and a leading
    '.') -> \\xNN, the root directory -> '-'."""
    path = os.path.normpath(path).strip("/")
    if not path:
        return "-"
    out = []
    for i, byte in enumerate(bytearray(path.encode("utf-8"))):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (ch.isalnum() and byte < 128) or ch in "_:" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append("\\x%02x" % byte)
    return "".join(out)


# Mount points systemd treats as API file systems (mount_point_is_api, mount_point_ignore in
# systemd's mount-setup.c) and refuses .mount units for.
SYSTEMD_API_PATHS = frozenset([
    "/proc", "/sys", "/dev", "/sys/kernel/security", "/sys/fs/smackfs", "/dev/shm", "/dev/pts", "/run",
    "/sys/fs/cgroup", "/sys/fs/pstore", "/sys/firmware/efi/efivars", "/sys/fs/bpf",
    "/sys/fs/selinux", "/dev/console", "/proc/kmsg", "/proc/sys", "/proc/sys/kernel/random/boot_id",
])


def systemd_api_path(path):
    """Whether systemd refuses a .mount unit for ``path`` (one of its API file system mount points)."""
    return (path in SYSTEMD_API_PATHS or path.startswith("/sys/fs/cgroup/") or path == "/run/host"
            or path.startswith("/run/host/"))


def mount_unit_name(path):
    """``systemd-escape --path --suffix=mount PATH``."""
    return escape_path(path) + ".mount"


def unit_name(path):
    """The unit the module manages for ``path``: its .mount unit, or for a systemd API mount point
    (where a .mount unit is refused) the service ``netstack-bpffs-<escaped path>.service``."""
    if systemd_api_path(path):
        return "netstack-bpffs-%s.service" % escape_path(path)
    return mount_unit_name(path)


def parse_mode(value):
    """Permission bits from an octal string ('0700', '700') or an int (YAML 0700); BpffsError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BpffsError("mode must be octal permission bits such as '0700', got %r" % (value,))
    if isinstance(value, int):
        mode = value
    else:
        text = str(value).strip()
        if not re.match(r"^0?[0-7]{3,4}$", text):
            raise BpffsError("mode must be octal permission bits such as '0700', got %r" % (value,))
        mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise BpffsError("mode must be octal permission bits such as '0700', got %r" % (value,))
    return mode


def mount_options(mode=None):
    return MOUNT_OPTIONS + (",mode=%04o" % mode if mode is not None else "")


def unit_text(path, mode=None):
    """The unit file for ``path``: a .mount unit, or a oneshot .service for API mount points."""
    if systemd_api_path(path):
        return _service_text(path, mode)
    where = path.replace("%", "%%")  # unit files expand %-specifiers
    return (
        UNIT_MARKER + "\n"
        "[Unit]\n"
        "Description=BPF filesystem at %s (kldload.netstack)\n"
        "Documentation=man:bpf(2)\n"
        "DefaultDependencies=no\n"
        "Before=%s umount.target\n"
        "Conflicts=umount.target\n"
        "\n"
        "[Mount]\n"
        "What=bpffs\n"
        "Where=%s\n"
        "Type=bpf\n"
        "Options=%s\n"
        "\n"
        "[Install]\n"
        "WantedBy=%s\n"
    ) % (where, WANTED_BY, where, mount_options(mode), WANTED_BY)


def _service_text(path, mode=None):
    # Only for the fixed, plain API paths above: no quoting or specifier escaping needed. Mount
    # unless something is mounted there; then fail unless it is a bpffs (never chmod another fs).
    script = "mountpoint -q %s || mount -t bpf -o %s bpffs %s; findmnt -n -t bpf --mountpoint %s >/dev/null" % (
        path, mount_options(mode), path, path)
    if mode is not None:
        script += " && chmod %04o %s" % (mode | stat.S_ISVTX, path)
    lines = [
        UNIT_MARKER,
        "# systemd refuses .mount units for its API file systems (%s is one), so a service mounts it" % path,
        "# at boot unless something is mounted there already.",
        "[Unit]",
        "Description=BPF filesystem at %s (kldload.netstack)" % path,
        "Documentation=man:bpf(2)",
        "DefaultDependencies=no",
        "Before=%s" % WANTED_BY,
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=/bin/sh -c '%s'" % script,
        "",
        "[Install]",
        "WantedBy=%s" % WANTED_BY,
    ]
    return "\n".join(lines) + "\n"


def canonical_path(path):
    """Absolute, normalised, parent directories' symlinks resolved (as the mount table shows it)."""
    if not path or not os.path.isabs(path):
        raise BpffsError("path must be an absolute path, got %r" % (path,))
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise BpffsError("path must not contain control characters, got %r" % (path,))
    path = os.path.normpath(path)
    if path == "/":
        return path
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    parent, base = os.path.split(path)
    return os.path.join(os.path.realpath(parent), base)


# -- reading --------------------------------------------------------------------------------------

def _kind(path):
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "special file"


def inspect(path, unit_dir=UNIT_DIR, mounts=None, magic=statfs_magic):
    """What is at ``path`` now.

    ``state`` (compared and shown as the diff): mounted (anything mounted at path), fstype (of what
    is visible there: 'bpf' when statfs says BPF_FS_MAGIC, else the mount table's name), mode (root
    permissions of a mounted bpffs, octal string), unit (content or None), enabled.
    stale_unit: content of a .mount unit this module once wrote where systemd refuses it.
    ``facts`` (only for checks): kind of the path, whether a directory is empty, unit paths.
    """
    if mounts is None:
        mounts = read_mounts()
    here = [m for m in mounts if m[0] == path]
    name = unit_name(path)
    unit = os.path.join(unit_dir, name)
    wants = os.path.join(unit_dir, WANTED_BY + ".wants", name)
    # a .mount unit this module wrote for an API mount point (before it knew systemd refuses them)
    stale, stale_unit, stale_wants = None, None, None
    if systemd_api_path(path):
        stale_unit = os.path.join(unit_dir, mount_unit_name(path))
        stale_wants = os.path.join(unit_dir, WANTED_BY + ".wants", mount_unit_name(path))
        text = units.read(stale_unit)
        if text is not None and text.startswith(UNIT_MARKER):
            stale = text
    kind = _kind(path)
    fstype, mode = None, None
    if here:
        try:
            fs_magic = magic(path)
        except OSError:
            fs_magic = None  # hidden by a mount above it
        if fs_magic == BPF_FS_MAGIC:
            fstype = "bpf"
            try:
                mode = "%04o" % (os.stat(path).st_mode & 0o7777)
            except OSError:
                mode = None
        else:
            # the top of the stack: the last mount at this point whose type is not bpf
            others = [m[1] for m in here if m[1] != "bpf"]
            fstype = others[-1] if others else ("unknown (f_type 0x%x)" % fs_magic if fs_magic else "unknown")
    empty = None
    if kind == "directory" and not here:
        try:
            empty = not os.listdir(path)
        except OSError:
            empty = None
    return dict(
        state=dict(path=path, mounted=bool(here), fstype=fstype, mode=mode, unit=units.read(unit),
                   enabled=os.path.islink(wants), stale_unit=stale),
        facts=dict(kind=kind, empty=empty, unit_path=unit, wants_path=wants, stacked=len(here),
                   service=systemd_api_path(path), stale_unit_path=stale_unit, stale_wants_path=stale_wants),
    )


# -- deciding -------------------------------------------------------------------------------------

def plan(before, facts, state="present", persistent=True, mode=None):
    """(after, actions) for the request, or BpffsError naming the option; touches nothing.

    ``mode`` is already parsed (int or None). Actions, in this order - present: mkdir, mount,
    chmod, write_unit, enable, remove_stale_unit, daemon_reload, start; absent: stop, umount,
    disable, remove_unit, remove_stale_unit, daemon_reload. start/stop (of the service unit of an
    API mount point) and daemon_reload only take effect where systemd is running."""
    path = before["path"]
    kind = facts["kind"]
    if kind == "symlink":
        raise BpffsError("path %s is a symbolic link; give the directory it points to" % path)
    if kind in ("file", "special file"):
        raise BpffsError("path %s exists and is a %s, not a directory; refusing to mount bpffs there"
                         % (path, "regular file" if kind == "file" else kind))
    if before["mounted"] and before["fstype"] != "bpf":
        if state == "present":
            raise BpffsError("path %s has a %s filesystem mounted; refusing to mount bpffs over it"
                             % (path, before["fstype"]))
        raise BpffsError("path %s has a %s filesystem mounted, not bpf; leaving it alone"
                         % (path, before["fstype"]))
    service = facts.get("service", False)
    actions = []
    if state == "absent":
        after = dict(path=path, mounted=False, fstype=None, mode=None, unit=None, enabled=False, stale_unit=None)
        if service and before["unit"] is not None:
            actions.append("stop")
        if before["mounted"]:
            actions.append("umount")
        if before["enabled"]:
            actions.append("disable")
        if before["unit"] is not None:
            actions.append("remove_unit")
    else:
        if not before["mounted"] and kind == "directory" and facts.get("empty") is False:
            raise BpffsError("path %s is a directory that is not empty; refusing to hide its contents "
                             "under a bpffs mount" % path)
        wanted_mode = "%04o" % ((mode | stat.S_ISVTX) if mode is not None else DEFAULT_ROOT_MODE)
        if before["mounted"] and mode is None:
            wanted_mode = before["mode"]
        after = dict(path=path, mounted=True, fstype="bpf", mode=wanted_mode,
                     unit=unit_text(path, mode) if persistent else before["unit"],
                     enabled=True if persistent else before["enabled"], stale_unit=None)
        if kind == "missing":
            actions.append("mkdir")
        if not before["mounted"]:
            actions.append("mount")
        elif before["mode"] != after["mode"]:
            actions.append("chmod")
        if after["unit"] != before["unit"]:
            actions.append("write_unit")
        if after["enabled"] and not before["enabled"]:
            actions.append("enable")
    if before.get("stale_unit") is not None:
        actions.append("remove_stale_unit")
    if (before["unit"] != after["unit"] or before["enabled"] != after["enabled"]
            or before.get("stale_unit") is not None):
        actions.append("daemon_reload")
    if state == "present" and service and persistent and (
            before["unit"] != after["unit"] or before["enabled"] != after["enabled"]):
        actions.append("start")
    return after, actions


# -- applying -------------------------------------------------------------------------------------

def apply(module, path, facts, actions, mode=None):
    """Carry out ``actions`` (from plan) for ``path``; ToolError or OSError on failure."""
    unit, wants = facts["unit_path"], facts["wants_path"]
    systemctl = Tool(module, "systemctl")
    systemd = units.systemd_running() and systemctl.available
    for action in actions:
        if action == "mkdir":
            os.makedirs(path, 0o755)
        elif action == "mount":
            Tool(module, "mount").run("-t", "bpf", "-o", mount_options(mode), "bpffs", path)
        elif action == "chmod":
            os.chmod(path, mode | stat.S_ISVTX)
        elif action == "write_unit":
            units.write(unit, unit_text(path, mode))
        elif action == "enable":
            units.enable(unit, wants)
        elif action == "stop" and systemd:
            systemctl.run("stop", os.path.basename(unit))
        elif action == "umount":
            umount = Tool(module, "umount")
            for dummy in range(max(facts.get("stacked", 1), 1)):
                umount.run(path)
                if not [m for m in read_mounts() if m[0] == path]:
                    break
        elif action == "disable":
            os.unlink(wants)
        elif action == "remove_unit":
            os.unlink(unit)
        elif action == "remove_stale_unit":
            if os.path.islink(facts["stale_wants_path"]):
                os.unlink(facts["stale_wants_path"])
            os.unlink(facts["stale_unit_path"])
        elif action == "daemon_reload" and systemd:
            systemctl.run("daemon-reload")
        elif action == "start" and systemd:
            systemctl.run("start", os.path.basename(unit))


def run_bpffs(module, params, check_mode=False, want_diff=False):
    """The bpffs module: validate, read, plan, apply (unless check mode); the result dict.

    ``module`` (an AnsibleModule, or None) only runs the tools. Raises BpffsError - before anything
    is touched for a refused request (``fields``: path as given), or when a step of apply fails
    (``fields``: the normalised path and the planned actions). Reading the node may raise OSError.
    """
    try:
        mode = parse_mode(params.get("mode"))
        path = canonical_path(params["path"])
        found = inspect(path)
        after, actions = plan(found["state"], found["facts"], params["state"], params["persistent"], mode)
    except BpffsError as e:
        e.fields.setdefault("path", params.get("path"))
        raise
    before = found["state"]
    changed = before != after
    if changed and not check_mode:
        try:
            apply(module, path, found["facts"], actions, mode)
        except (ToolError, OSError) as e:
            raise BpffsError("bpffs at %s: %s" % (path, e), path=path, actions=actions)
        after = inspect(path)["state"]
    result = dict(changed=changed, path=path, mounted=after["fstype"] == "bpf",
                  unit=found["facts"]["unit_path"] if after["unit"] is not None else None,
                  actions=actions if changed else [])
    if want_diff:
        result["diff"] = dict(before=before, after=after)
    return result
