# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Mounted file systems: the mount table, statfs(2) magic numbers, the bpffs and cgroup2 mounts.

The one place that reads /proc/self/mountinfo and calls statfs(2); every module, the node command
and the lab ask here. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import os
import platform
import re
import struct

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270


def _unescape(path):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text):
    """[(mount point, fstype, source, options)] from /proc/self/mountinfo text, in table order."""
    mounts = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        mounts.append((_unescape(lf[4]), rf[0], _unescape(rf[1]), lf[5]))
    return mounts


def read_mounts(path="/proc/self/mountinfo"):
    with open(path) as f:
        return parse_mountinfo(f.read())


def bpf_mounts(mounts):
    """Mount points of bpf filesystems, each once, in table order."""
    seen = []
    for m in mounts:
        if m[1] == "bpf" and m[0] not in seen:
            seen.append(m[0])
    return seen


def cgroup2_path(mounts=None):
    """The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, often /sys/fs/cgroup/unified on
    hybrid ones. Detected from the mount table, never assumed. None if cgroup2 is not mounted."""
    if mounts is None:
        mounts = read_mounts()
    paths = [m[0] for m in mounts if m[1] == "cgroup2"]
    if not paths:
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in paths:
            return preferred
    return sorted(paths, key=len)[0]


def statfs_magic(path):
    """f_type of statfs(2) on ``path`` (the filesystem that is visible there); OSError on failure."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(512)  # larger than struct statfs on any architecture
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    # f_type is the first member: a long, except on s390x where it is an unsigned int
    fmt = "@I" if platform.machine() == "s390x" else "@l"
    return struct.unpack_from(fmt, buf.raw)[0] & 0xFFFFFFFF


def is_bpffs(path):
    """Whether ``path`` (or the nearest existing directory above it) is on a BPF file system."""
    existing = path
    while existing and not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    return statfs_magic(existing or "/") == BPF_FS_MAGIC


def is_cgroup2(path):
    return statfs_magic(path) == CGROUP2_SUPER_MAGIC
