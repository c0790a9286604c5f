# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a node's kernel offers the dataplane: version, config, BTF, WireGuard, requirements.

Everything is read from /proc and /sys (the mount table and statfs(2): mounts.py). The one thing
that is asked of the kernel rather than read is WireGuard support: a WireGuard link is created
over rtnetlink inside a network namespace made for the purpose and thrown away with it, because
only the kernel knows whether it can (a module that is not loaded yet may be autoloaded; a config
file may not match the running kernel).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import errno
import gzip
import os
import re
import signal
import socket
import struct

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
# Config options checked as requirements when the config is readable.
CONFIG_REQUIREMENTS = ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF")


# -- version --------------------------------------------------------------------------------------

def parse_release(release):
    """(major, minor, patch) from a kernel release string such as ``6.18.44-fc-v669``."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    if not m:
        raise ValueError("not a kernel release: %r" % release)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_text(version):
    return ".".join(str(v) for v in version)


def version_at_least(version, minimum):
    """Whether ``version`` >= ``minimum``; both tuples or release strings (missing parts are 0)."""
    def norm(v):
        v = parse_release(v) if isinstance(v, str) else tuple(int(x) for x in v)
        return tuple(v) + (0,) * (3 - len(v))
    return norm(version) >= norm(minimum)


# -- config ---------------------------------------------------------------------------------------

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


def read_config(release, proc_config="/proc/config.gz", boot_dir="/boot", modules_dir="/lib/modules"):
    """(source path, flags) of the running kernel's config; (None, None) if none is readable.

    Tried in order: /proc/config.gz (the running kernel's own), /boot/config-RELEASE,
    /lib/modules/RELEASE/config (Arch and others)."""
    candidates = [proc_config, os.path.join(boot_dir, "config-%s" % release),
                  os.path.join(modules_dir, release, "config")]
    for path in candidates:
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt") as f:
                    text = f.read()
            else:
                with open(path) as f:
                    text = f.read()
        except (IOError, OSError, EOFError):
            continue
        return path, parse_config(text)
    return None, None


def config_flags(config, names=CONFIG_FLAGS):
    """The flags that matter, each 'y', 'm', 'n' or a value; None without a config."""
    if config is None:
        return None
    return dict((k, config.get(k, "n")) for k in names)


# -- WireGuard probe ------------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_RTM_NEWLINK, _RTM_DELLINK, _NLMSG_ERROR = 16, 17, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_INFO_KIND = 3, 18, 1
_NLA_F_NESTED = 0x8000
PROBE_LINK = "nswgprobe"


def _nla(kind, payload):
    attr = struct.pack("=HH", 4 + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def link_request(msg_type, name, kind=None, seq=1):
    """An rtnetlink RTM_NEWLINK/RTM_DELLINK request for link ``name`` (of ``kind`` when creating)."""
    flags = _NLM_F_REQUEST | _NLM_F_ACK
    if msg_type == _RTM_NEWLINK:
        flags |= _NLM_F_CREATE | _NLM_F_EXCL
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)  # struct ifinfomsg
    body += _nla(_IFLA_IFNAME, name.encode() + b"\0")
    if kind:
        body += _nla(_IFLA_LINKINFO | _NLA_F_NESTED, _nla(_IFLA_INFO_KIND, kind.encode() + b"\0"))
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def parse_ack(data):
    """The errno (0 for success) of the NLMSG_ERROR answer in ``data``."""
    while len(data) >= 20:
        length, msg_type = struct.unpack_from("=IH", data)
        if msg_type == _NLMSG_ERROR:
            return -struct.unpack_from("=i", data, 16)[0]
        if length < 16:
            break
        data = data[(length + 3) & ~3:]
    raise ValueError("no netlink acknowledgement")


def _rtnl(request):
    """Send one request over rtnetlink; its errno (0 = success)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    try:
        sock.settimeout(10)
        sock.bind((0, 0))
        sock.send(request)
        return parse_ack(sock.recv(65536))
    finally:
        sock.close()


def _create_link(kind, name):
    """Create and delete link ``name`` of ``kind`` in the current network namespace; errno."""
    err = _rtnl(link_request(_RTM_NEWLINK, name, kind))
    if err == 0:
        _rtnl(link_request(_RTM_DELLINK, name))
    return err


def _create_link_in_new_netns(kind):
    """Create a link of ``kind`` in a new network namespace that dies with a child process.

    Returns the errno (0 = created) or None if no namespace could be made. Nothing can be left
    behind: the link lives only in the namespace, which goes away when the child exits."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 255
        try:
            os.close(rfd)
            signal.alarm(10)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                os.write(wfd, b"unshare %d" % ctypes.get_errno())
            else:
                os.write(wfd, b"link %d" % _rtnl(link_request(_RTM_NEWLINK, PROBE_LINK, kind)))
            code = 0
        except BaseException:  # pylint: disable=broad-except
            pass
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        answer = b""
        while True:
            chunk = os.read(rfd, 64)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    parts = answer.decode().split()
    if len(parts) != 2 or parts[0] != "link":
        return None
    return int(parts[1])


def probe_link_kind(kind, new_netns=_create_link_in_new_netns, current_netns=_create_link):
    """(supported: True/False/None, detail) for link type ``kind``, asked of the kernel.

    First in a throwaway network namespace; where namespaces cannot be made, in the current one
    with a unique name, deleted at once. None when the kernel could not be asked (no privilege)."""
    how = "in a throwaway network namespace"
    try:
        err = new_netns(kind)
    except OSError:
        err = None
    if err is None:
        how = "in the host network namespace"
        try:
            err = current_netns(kind, "%s%d" % (PROBE_LINK, os.getpid() % 1000000))
        except (OSError, ValueError) as e:
            return None, "could not ask the kernel: %s" % e
    if err == 0:
        return True, "created a %s link %s" % (kind, how)
    if err in (errno.EOPNOTSUPP, errno.ENODEV, errno.ENOENT):
        return False, "the kernel cannot create %s links (%s)" % (kind, os.strerror(err))
    if err in (errno.EPERM, errno.EACCES):
        return None, "not permitted to create links (needs CAP_NET_ADMIN): %s" % os.strerror(err)
    return None, "creating a %s link %s failed: %s" % (kind, how, os.strerror(err))


def probe_wireguard():
    """Whether the running kernel can create WireGuard links (True/False/None, detail)."""
    return probe_link_kind("wireguard")


# -- requirements ---------------------------------------------------------------------------------

def _item(name, description, required, actual, ok, message):
    return dict(name=name, description=description, required=required, actual=actual, ok=bool(ok),
                message=message)


def evaluate_requirements(version, btf, cgroup2, bpffs, config=None, wireguard_kernel=None):
    """Compare a node with the masterclass kernel table (chapter 11), item by item.

    Returns a list of {name, description, required, actual, ok, message}: the version minimums,
    then BTF, cgroup2 and bpffs presence, kernel WireGuard (when probed) and the config options
    in CONFIG_REQUIREMENTS (when the config is readable).
    """
    items = []
    actual = version_text(version)
    for name, minimum, desc in VERSION_REQUIREMENTS:
        ok = version_at_least(version, minimum)
        required = ">= %s" % version_text(minimum)
        items.append(_item(name, desc, required, actual, ok,
                           "%s: kernel %s >= %s" % (desc, actual, version_text(minimum)) if ok else
                           "%s needs kernel >= %s, node has %s" % (desc, version_text(minimum), actual)))
    presence = [
        ("btf", "BTF for CO-RE (%s)" % BTF_VMLINUX, bool(btf), BTF_VMLINUX if btf else None),
        ("cgroup2", "cgroup v2 mounted (for socket-level load balancing)", bool(cgroup2), cgroup2),
        ("bpffs", "BPF filesystem mounted", bool(bpffs), ", ".join(bpffs or []) or None),
    ]
    if wireguard_kernel is not None:
        presence.append(("wireguard_kernel", "WireGuard in the kernel (else wireguard-go)", wireguard_kernel,
                         None))
    for name, desc, present, where in presence:
        actual = ("present (%s)" % where if where else "present") if present else "missing"
        items.append(_item(name, desc, "present", actual, present, "%s: %s" % (desc, actual)))
    if config is not None:
        for flag in CONFIG_REQUIREMENTS:
            value = config.get(flag, "n")
            ok = value in ("y", "m")
            items.append(_item(flag.lower(), flag, "y or m", value, ok, "%s=%s" % (flag, value)))
    return items
