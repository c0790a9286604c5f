# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one-machine lab: network namespaces, veth links and systemd-nspawn nodes.

Everything here runs on the controller (the machine that hosts the lab), never on a node.
Each function reads the current state first and only acts where it differs from the wanted one,
returning a list of human-readable actions taken (empty: nothing changed). ``check=True`` computes
the same list without acting.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import re
import shutil
import signal
import socket
import time
import uuid

from ansible.module_utils.basic import missing_required_lib
from ansible_collections.kldload.netstack.plugins.module_utils.mounts import cgroup2_path, read_mounts
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

try:
    from pyroute2 import IPRoute, NetNS
    from pyroute2 import netns as pr_netns
except ImportError:  # pragma: no cover - reported by Lab()
    import traceback
    PYROUTE2_IMPORT_ERROR = traceback.format_exc()
else:
    PYROUTE2_IMPORT_ERROR = None

NETNS_DIR = "/run/netns"
IFF_UP = 0x1


class LabError(Exception):
    pass


def _vanished(exc):
    """A netlink error saying the link is gone (pyroute2's NetlinkError carries the errno in .code)."""
    return errno.ENODEV in (getattr(exc, "code", None), getattr(exc, "errno", None))


def netns_name(node):
    return "kln-%s" % node


def _ifname(prefix, node):
    name = "%s-%s" % (prefix, node)
    if len(name) > 15:
        raise LabError("node name %r is too long: interface %r exceeds 15 characters" % (node, name))
    return name


class Lab:
    """Host-side operations. ``module`` is an AnsibleModule (for run_command / get_bin_path).

    Links, addresses and namespaces go through netlink (pyroute2); only the tools that have no
    library equivalent (systemd-nspawn, ssh-keygen, mount) are run as commands."""

    def __init__(self, module, check=False):
        if PYROUTE2_IMPORT_ERROR is not None:
            module.fail_json(msg=missing_required_lib("pyroute2"), exception=PYROUTE2_IMPORT_ERROR)
        self.check = check
        self.nspawn = Tool(module, "systemd-nspawn")
        self.keygen = Tool(module, "ssh-keygen")
        self.mount = Tool(module, "mount")
        self.umount = Tool(module, "umount")
        self.actions = []

    # -- primitives -------------------------------------------------------------------------
    def _do(self, what, fn, *args, **kwargs):
        self.actions.append(what)
        if not self.check:
            fn(*args, **kwargs)

    @staticmethod
    def _rt(netns=None):
        """A netlink socket in the host's namespace or in ``netns``."""
        return NetNS(netns) if netns else IPRoute()

    @staticmethod
    def netns_exists(name):
        return os.path.exists(os.path.join(NETNS_DIR, name))

    def _link(self, name, netns=None):
        if netns and not self.netns_exists(netns):
            return None
        with self._rt(netns) as rt:
            idx = rt.link_lookup(ifname=name)
            try:
                return rt.get_links(idx[0])[0] if idx else None
            except Exception as e:
                if _vanished(e):  # a veth end going away with its peer's namespace
                    return None
                raise

    def link_exists(self, name, netns=None):
        return self._link(name, netns) is not None

    def _addrs(self, dev, netns=None):
        with self._rt(netns) as rt:
            idx = rt.link_lookup(ifname=dev)
            if not idx:
                return set()
            try:
                return set("%s/%s" % (a.get("IFA_ADDRESS"), a["prefixlen"]) for a in rt.get_addr(index=idx[0]))
            except Exception as e:
                if _vanished(e):
                    return set()
                raise

    def _link_up(self, dev, netns=None):
        link = self._link(dev, netns)
        return link is not None and bool(link["flags"] & IFF_UP)

    def _set(self, netns, dev, **attrs):
        with self._rt(netns) as rt:
            rt.link("set", index=rt.link_lookup(ifname=dev)[0], **attrs)

    def _add_addr(self, netns, dev, address):
        addr, prefix = address.split("/")
        extra = {"family": socket.AF_INET6, "flags": 0x02} if ":" in addr else {}     # IFA_F_NODAD: usable at once
        with self._rt(netns) as rt:
            rt.addr("replace", index=rt.link_lookup(ifname=dev)[0], address=addr, prefixlen=int(prefix), **extra)

    def _add_link(self, netns, **attrs):
        with self._rt(netns) as rt:
            rt.link("add", **attrs)

    def _del_link(self, netns, dev):
        # A veth end also goes away on its own once the namespace holding its peer is torn down
        # (asynchronously, after delete_netns): a link that vanished in between is not an error.
        with self._rt(netns) as rt:
            idx = rt.link_lookup(ifname=dev)
            if idx:
                try:
                    rt.link("del", index=idx[0])
                except Exception as e:
                    if not _vanished(e):
                        raise

    def _attach(self, netns, dev, bridge):
        with self._rt(netns) as rt:
            rt.link("set", index=rt.link_lookup(ifname=dev)[0], master=rt.link_lookup(ifname=bridge)[0])

    # -- desired state ----------------------------------------------------------------------
    def ensure_netns(self, name):
        if not self.netns_exists(name):
            self._do("create netns %s" % name, pr_netns.create, name)
        if self.check and not self.netns_exists(name):
            return
        if not self._link_up("lo", name):
            self._do("set lo up in %s" % name, self._set, name, "lo", state="up")

    def ensure_bridge(self, name, address=None, netns=None):
        if not self.link_exists(name, netns):
            self._do("create bridge %s" % name, self._add_link, netns, ifname=name, kind="bridge")
        if self.check and not self.link_exists(name, netns):
            return
        self._ensure_addr_up(name, address, netns)

    def _ensure_addr_up(self, dev, address, netns=None):
        if address and address not in self._addrs(dev, netns):
            self._do("address %s on %s" % (address, dev), self._add_addr, netns, dev, address)
        if not self._link_up(dev, netns):
            self._do("set %s up" % dev, self._set, netns, dev, state="up")

    def ensure_veth(self, outer, outer_netns, bridge, inner, inner_netns, address):
        """A veth pair: ``outer`` enslaved to ``bridge`` (in outer_netns), ``inner`` in inner_netns."""
        if not self.link_exists(inner, inner_netns):
            if self.link_exists(outer, outer_netns):
                self._do("delete stale %s" % outer, self._del_link, outer_netns, outer)
            self._do("create veth %s <-> %s/%s" % (outer, inner_netns, inner), self._add_link, outer_netns,
                     ifname=outer, kind="veth", peer={"ifname": inner, "net_ns_fd": inner_netns})
            self._do("attach %s to %s" % (outer, bridge), self._attach, outer_netns, outer, bridge)
            self._do("set %s up" % outer, self._set, outer_netns, outer, state="up")
        if self.check and not self.link_exists(inner, inner_netns):
            return
        self._ensure_addr_up(inner, address, inner_netns)
        if not self._link_up(outer, outer_netns):
            self._do("set %s up" % outer, self._set, outer_netns, outer, state="up")

    def delete_link(self, name, netns=None):
        if self.link_exists(name, netns):
            self._do("delete link %s" % name, self._del_link, netns, name)

    def delete_netns(self, name):
        if self.netns_exists(name):
            self._do("delete netns %s" % name, pr_netns.remove, name)


# -- mounts and processes -------------------------------------------------------------------
def is_mountpoint(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == path:
                return True
    return False


def nspawn_pid(pidfile, machine):
    """The recorded nspawn pid if that process is still our nspawn for ``machine``, else None."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except (IOError, OSError, ValueError):
        return None
    if any(a.endswith(b"systemd-nspawn") for a in argv[:1]) and ("--machine=%s" % machine).encode() in argv:
        return pid
    return None


def tcp_open(address, port, timeout=1.0):
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH")
    except (OSError, socket.timeout):
        return False


class Node:
    """One lab node: its netns, links, overlay root and systemd-nspawn process."""

    def __init__(self, lab, params):
        self.lab = lab
        self.p = params
        self.name = params["name"]
        self.netns = netns_name(self.name)
        self.dir = os.path.join(params["state_dir"], "nodes", self.name)
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.root = os.path.join(self.dir, "root")
        self.pidfile = os.path.join(self.dir, "nspawn.pid")
        self.bootlog = os.path.join(self.dir, "boot.log")
        # Each node in its own cgroup v2 directory: nspawn makes it the root of the node's cgroup
        # namespace, so programs a node attaches at its cgroup root act on that node only (nodes
        # started from one cgroup would share nspawn's "payload" cgroup).
        cg2 = cgroup2_path(read_mounts())
        self.cgroup = os.path.join(cg2, "kldload-netstack-lab-%s" % self.name) if cg2 else None
        self.mgmt_outer = _ifname("km", self.name)
        self.lan_outer = _ifname("kl", self.name)

    # -- state ------------------------------------------------------------------------------
    def pid(self):
        return nspawn_pid(self.pidfile, self.name)

    def status(self):
        return {
            "netns": Lab.netns_exists(self.netns),
            "mounted": is_mountpoint(self.root),
            "running": self.pid() is not None,
            "pid": self.pid(),
        }

    # -- started ----------------------------------------------------------------------------
    def start(self):
        p = self.p
        if not os.path.isdir(os.path.join(p["rootfs"], "etc")):
            raise LabError("rootfs %s is not a built root filesystem" % p["rootfs"])
        lab = self.lab
        lab.ensure_netns(self.netns)
        lab.ensure_veth(self.mgmt_outer, None, p["mgmt_bridge"], "mgmt0", self.netns, p["mgmt_address"])
        lab.ensure_veth(self.lan_outer, p["lan_netns"], p["lan_bridge"], "eth0", self.netns, p["lan_address"])
        if p.get("lan_address6"):
            lab._ensure_addr_up("eth0", p["lan_address6"], self.netns)
        if not is_mountpoint(self.root):
            lab._do("mount overlay root %s" % self.root, self._mount_root)
        if not os.path.exists(os.path.join(self.upper, ".netstack-node")):
            lab._do("personalise root of %s" % self.name, self._personalise)
        if self.pid() is None:
            lab._do("boot %s" % self.name, self._boot)
        if p["wait"] and not lab.check:
            self._wait_ssh()

    def _mount_root(self):
        # The upper layer's top directory becomes the node's "/": it must be 0755, or every
        # unprivileged daemon in the node (frr, sshd's privsep user) fails with EACCES.
        for d in (self.upper, self.work, self.root):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        self.lab.mount.run("-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s"
                           % (self.p["rootfs"], self.upper, self.work), self.root)

    def _personalise(self):
        root = self.root
        with open(os.path.join(root, "etc/hostname"), "w") as f:
            f.write(self.name + "\n")
        with open(os.path.join(root, "etc/hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n" % self.name)
        with open(os.path.join(root, "etc/machine-id"), "w") as f:
            f.write(uuid.uuid4().hex + "\n")
        os.makedirs(os.path.join(root, "var/log/journal"), exist_ok=True)
        # /proc/sys is writable in nodes (see _boot) and kernel-global keys are shared with the
        # host: mask the distribution's sysctl defaults (core_pattern, pid_max) so booting a node
        # never changes the host. Per-namespace net.* keys written later stay the node's own.
        vendor = os.path.join(root, "usr/lib/sysctl.d")
        for fn in (os.listdir(vendor) if os.path.isdir(vendor) else []):
            mask = os.path.join(root, "etc/sysctl.d", fn)
            if not os.path.lexists(mask):
                os.symlink("/dev/null", mask)
        ssh_dir = os.path.join(root, "root/.ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        keys = os.path.join(ssh_dir, "authorized_keys")
        with open(keys, "w") as f:
            f.write(self.p["authorized_key"].strip() + "\n")
        os.chmod(keys, 0o600)
        # Every node gets its own SSH host keys (the cached rootfs must not share them).
        for fn in os.listdir(os.path.join(root, "etc/ssh")):
            if fn.startswith("ssh_host_"):
                os.unlink(os.path.join(root, "etc/ssh", fn))
        self.lab.keygen.run("-A", "-f", root)
        with open(os.path.join(self.upper, ".netstack-node"), "w") as f:
            f.write(self.name + "\n")

    def _boot(self):
        argv = [self.lab.nspawn.path, "--register=no", "--keep-unit", "--boot", "--capability=all",
                "--network-namespace-path=%s" % os.path.join(NETNS_DIR, self.netns),
                "--system-call-filter=bpf perf_event_open", "--console=read-only",
                "--setenv=SYSTEMD_COLORS=0", "--machine=%s" % self.name, "--hostname=%s" % self.name,
                "-D", self.root]
        log = os.open(self.bootlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        if self.cgroup and not os.path.isdir(self.cgroup):
            os.mkdir(self.cgroup)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                if self.cgroup:
                    with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                        f.write("0")
                os.setsid()
                os.dup2(devnull, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.closerange(3, 1024)
                # /sys and /proc/sys writable inside the node as on a real machine: bpffs mounts
                # under /sys/fs/bpf, net.* sysctls (per network namespace). The collection only
                # writes per-namespace keys; vendor defaults for global keys are masked.
                env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="yes")
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        os.close(log)
        os.close(devnull)
        # The module exits soon after and nspawn is re-parented to init. Record the pid, then
        # wait until the child has become systemd-nspawn (or has died).
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % pid)
        deadline = time.time() + 10
        while self.pid() is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.time() > deadline:
                raise LabError("lab node %s did not come up: systemd-nspawn exited (status %s). "
                               "Boot log (%s), last lines:\n%s"
                               % (self.name, status, self.bootlog, self.boot_log_tail()))
            time.sleep(0.05)

    def _wait_ssh(self):
        addr = self.p["mgmt_address"].split("/")[0]
        deadline = time.time() + self.p["boot_timeout"]
        while time.time() < deadline:
            if self.pid() is None:
                break
            if tcp_open(addr, 22):
                return
            time.sleep(0.5)
        state = "exited" if self.pid() is None else "did not open SSH on %s within %ss" % (addr, self.p["boot_timeout"])
        raise LabError("lab node %s did not come up: %s. Boot log (%s), last lines:\n%s"
                       % (self.name, state, self.bootlog, self.boot_log_tail()))

    def boot_log_tail(self, lines=40):
        """The end of the node's console log, without terminal escapes and progress spinners."""
        try:
            with open(self.bootlog, errors="replace") as f:
                text = f.read()
        except (IOError, OSError):
            return "(no boot log)"
        text = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])", "", text)
        kept = [ln.rstrip() for ln in text.splitlines()
                if ln.strip() and not re.match(r"^\[[ *]+\] (A start|A stop)? ?[Jj]ob ", ln.strip())]
        return "\n".join(kept[-lines:])

    # -- stopped / absent -------------------------------------------------------------------
    def stop(self, timeout=30):
        pid = self.pid()
        if pid is None:
            return
        self.lab._do("stop %s (pid %d)" % (self.name, pid), self._stop_pid, pid, timeout)

    def _stop_pid(self, pid, timeout):
        # SIGTERM to nspawn makes it ask the container's systemd for a clean poweroff.
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self._alive(pid):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.1)
        try:
            os.unlink(self.pidfile)
        except OSError:
            pass
        self._remove_cgroup()

    def _remove_cgroup(self):
        # nspawn leaves its "payload" (and the node's own) cgroups; remove the empty tree, leaves first
        if not self.cgroup or not os.path.isdir(self.cgroup):
            return
        for _try in range(50):
            for top, dirs, _files in os.walk(self.cgroup, topdown=False):
                for d in dirs:
                    try:
                        os.rmdir(os.path.join(top, d))
                    except OSError:
                        pass
            try:
                os.rmdir(self.cgroup)
                return
            except OSError:
                time.sleep(0.1)

    @staticmethod
    def _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except (IOError, OSError):
            return False

    def remove(self):
        self.stop()
        self._remove_cgroup()
        if is_mountpoint(self.root):
            self.lab._do("unmount %s" % self.root, self.lab.umount.run, self.root)
        self.lab.delete_netns(self.netns)
        self.lab.delete_link(self.mgmt_outer)
        self.lab.delete_link(self.lan_outer, self.p["lan_netns"])
        if os.path.exists(self.dir):
            self.lab._do("remove %s" % self.dir, shutil.rmtree, self.dir)
