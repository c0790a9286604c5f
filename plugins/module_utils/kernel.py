# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a node's kernel offers the dataplane: version, config, BTF, mounts, WireGuard, requirements.

Everything is read from /proc and /sys; the only command run is the WireGuard probe (``ip link
add ... type wireguard``, deleted at once), because only asking the kernel tells the truth there.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import gzip
import os
import re

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"

# Kernel config options that matter to the dataplane.
CONFIG_FLAGS = (
    "CONFIG_BPF", "CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_BPF_JIT_ALWAYS_ON", "CONFIG_BPF_LSM",
    "CONFIG_CGROUP_BPF", "CONFIG_BPF_STREAM_PARSER", "CONFIG_DEBUG_INFO_BTF", "CONFIG_NET_CLS_BPF",
    "CONFIG_NET_ACT_BPF", "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_CLS_ACT", "CONFIG_XDP_SOCKETS",
    "CONFIG_WIREGUARD", "CONFIG_VXLAN", "CONFIG_TCP_CONG_BBR", "CONFIG_NET_SCH_FQ",
    "CONFIG_NETFILTER_XT_MATCH_STATISTIC", "CONFIG_NETFILTER_XT_MATCH_COMMENT", "CONFIG_NF_TABLES",
    "CONFIG_IP_VS", "CONFIG_CRYPTO_USER_API_HASH",
)

# Chapter 11 of the masterclass ("Kernel requirements"): minimum versions per feature.
VERSION_REQUIREMENTS = (
    ("basic_ebpf", (4, 19), "basic eBPF"),
    ("recommended", (5, 10), "full feature set (recommended)"),
    ("wireguard", (5, 6), "WireGuard encryption"),
    ("kube_proxy_replacement", (5, 8), "kube-proxy replacement"),
    ("bbr_bandwidth_manager", (5, 8), "BBR bandwidth manager"),
)


def parse_release(release):
    """(major, minor, patch) from a kernel release string such as ``6.18.44-fc-v669``."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    if not m:
        raise ValueError("not a kernel release: %r" % release)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_text(version):
    return ".".join(str(v) for v in version)


def parse_config(text):
    """{CONFIG_X: 'y'|'m'|value} from kernel config text; ``# CONFIG_X is not set`` gives 'n'."""
    flags = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if m:
            flags[m.group(1)] = m.group(2).strip('"')
            continue
        m = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if m:
            flags[m.group(1)] = "n"
    return flags


def read_config(release, proc_config="/proc/config.gz", boot_dir="/boot"):
    """(source path, flags) from /proc/config.gz or /boot/config-RELEASE; (None, None) if neither."""
    candidates = [(proc_config, True), (os.path.join(boot_dir, "config-%s" % release), False)]
    for path, gz in candidates:
        try:
            if gz:
                with gzip.open(path, "rt") as f:
                    return path, parse_config(f.read())
            with open(path) as f:
                return path, parse_config(f.read())
        except (IOError, OSError, EOFError):
            continue
    return None, None


def _unescape(path):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text):
    """[(mount point, fstype, source, options)] from /proc/self/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        mounts.append((_unescape(lf[4]), rf[0], rf[1], lf[5]))
    return mounts


def read_mounts(path="/proc/self/mountinfo"):
    with open(path) as f:
        return parse_mountinfo(f.read())


def bpf_mounts(mounts):
    return [m[0] for m in mounts if m[1] == "bpf"]


def cgroup2_path(mounts):
    """The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, often /sys/fs/cgroup/unified on
    hybrid ones. Detected from the mount table, never assumed. None if cgroup2 is not mounted."""
    paths = [m[0] for m in mounts if m[1] == "cgroup2"]
    if not paths:
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in paths:
            return preferred
    return sorted(paths, key=len)[0]


def probe_wireguard(ip_tool):
    """Whether the running kernel can create a WireGuard link. Asks the kernel (a link is created
    and deleted at once); /sys/module/wireguard alone would miss an autoloadable module."""
    if not ip_tool.available:
        return None, "ip (iproute2) not found"
    name = "nswgprobe%d" % (os.getpid() % 100000)
    rc, dummy, err = ip_tool.run("link", "add", name, "type", "wireguard", check=False)
    if rc == 0:
        ip_tool.run("link", "del", name, check=False)
        return True, "ip link add type wireguard succeeded"
    return False, (err or "").strip() or "ip link add type wireguard failed"


def evaluate_requirements(version, btf, cgroup2, bpffs, config=None, wireguard_kernel=None):
    """Compare a node with the masterclass kernel table, item by item.

    Returns a list of {name, description, required, actual, ok, message}.
    """
    items = []
    actual = version_text(version)
    for name, minimum, desc in VERSION_REQUIREMENTS:
        ok = tuple(version) >= minimum
        items.append(dict(
            name=name, description=desc, required=">= %s" % version_text(minimum), actual=actual, ok=ok,
            message="%s needs kernel >= %s, node has %s" % (desc, version_text(minimum), actual) if not ok
            else "%s: kernel %s >= %s" % (desc, actual, version_text(minimum))))
    presence = [
        ("btf", "BTF for CO-RE (%s)" % BTF_VMLINUX, btf),
        ("cgroup2", "cgroup v2 mounted (for socket-level load balancing)", bool(cgroup2)),
        ("bpffs", "BPF filesystem mounted", bool(bpffs)),
    ]
    if wireguard_kernel is not None:
        presence.append(("wireguard_kernel", "WireGuard in the kernel (else wireguard-go)", wireguard_kernel))
    for name, desc, present in presence:
        items.append(dict(name=name, description=desc, required="present",
                          actual="present" if present else "missing", ok=bool(present),
                          message="%s: %s" % (desc, "present" if present else "missing")))
    if config:
        for flag in ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF"):
            value = config.get(flag, "n")
            ok = value in ("y", "m")
            items.append(dict(name=flag.lower(), description=flag, required="y", actual=value, ok=ok,
                              message="%s=%s" % (flag, value)))
    return items
