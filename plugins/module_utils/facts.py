# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Gather the facts of ebpf_facts: one pass over /proc, /sys and a few read-only commands."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import os
import platform
import re

from ansible_collections.kldload.netstack.plugins.module_utils import kernel, mounts
from ansible_collections.kldload.netstack.plugins.module_utils.iptables import (
    BACKENDS, CMD_PREFIX, FAMILIES, NFT_FAMILY, is_kube_proxy_chain, parse_nft_tables, parse_save)
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

_BUILTIN_CHAINS = frozenset(["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"])


def iptables_facts(module):
    """Per backend and family: is the tool there, is anything configured, are kube-proxy chains there."""
    out = {}
    for backend in BACKENDS:
        for family in FAMILIES:
            tool = Tool(module, "%s-%s-save" % (CMD_PREFIX[family], backend))
            entry = dict(available=tool.available, in_use=False, rules=0, kube_proxy=False, kube_proxy_chains=0)
            if tool.available:
                rc, text, err = tool.run(check=False)
                try:
                    tables = parse_save(text) if rc == 0 else []
                except ValueError:
                    tables = []
                for table in tables:
                    rules = sum(1 for e in table.lines if e[0] == "rule")
                    custom = [c for c in table.chains if c not in _BUILTIN_CHAINS]
                    kube = [c for c in table.chains if is_kube_proxy_chain(c)]
                    entry["rules"] += rules
                    entry["in_use"] = entry["in_use"] or bool(rules or custom)
                    entry["kube_proxy_chains"] += len(kube)
                entry["kube_proxy"] = entry["kube_proxy_chains"] > 0
            out["%s_%s" % (backend, family)] = entry
    nft = Tool(module, "nft")
    tables = []
    if nft.available:
        rc, text, dummy = nft.run("list", "tables", check=False)
        tables = parse_nft_tables(text) if rc == 0 else []
    out["nftables"] = dict(
        available=nft.available,
        tables=["%s %s" % t for t in tables],
        kube_proxy=[f for f in FAMILIES if (NFT_FAMILY[f], "kube-proxy") in tables],
    )
    out["backends_in_use"] = sorted(set(b for b in BACKENDS for f in FAMILIES if out["%s_%s" % (b, f)]["in_use"]))
    out["kube_proxy_rules"] = (any(out["%s_%s" % (b, f)]["kube_proxy"] for b in BACKENDS for f in FAMILIES)
                               or bool(out["nftables"]["kube_proxy"]))
    return out


def bpftool_facts(module):
    tool = Tool(module, "bpftool")
    info = dict(path=tool.path, version=None, libbpf_version=None)
    if tool.available:
        rc, out, dummy = tool.run("version", check=False)
        m = re.search(r"v?(\d+\.\d+\.\d+)", out or "")
        info["version"] = m.group(1) if m else None
        m = re.search(r"libbpf v?(\d+\.\d+)", out or "")
        info["libbpf_version"] = m.group(1) if m else None
    return info


_LIB_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib", "/usr/local/lib64")


def _ld_so_conf_dirs(path="/etc/ld.so.conf", depth=0):
    """Library directories named in ld.so.conf and the files it includes."""
    dirs = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (IOError, OSError):
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include ") and depth < 4:
            pattern = line.split(None, 1)[1]
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for inc in sorted(glob.glob(pattern)):
                dirs += _ld_so_conf_dirs(inc, depth + 1)
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def find_shared_library(name, dirs=None):
    """Path of ``lib<name>.so.N...`` (the most specific version) in the library directories, or None.

    Reads the directories the dynamic linker searches rather than running ldconfig or a compiler."""
    if dirs is None:
        dirs = list(_LIB_DIRS) + _ld_so_conf_dirs()
        multiarch = "%s-linux-gnu" % platform.machine()
        dirs += [os.path.join(d, multiarch) for d in ("/lib", "/usr/lib")]
    best = None
    for d in dirs:
        for path in glob.glob(os.path.join(d, "lib%s.so.*" % name)):
            m = re.match(r"^lib%s\.so\.(\d+(?:\.\d+)*)$" % re.escape(name), os.path.basename(path))
            if m and os.path.exists(path):
                key = tuple(int(x) for x in m.group(1).split("."))
                if best is None or key > best[0]:
                    best = (key, path)
    return best[1] if best else None


def libbpf_facts():
    path = find_shared_library("bpf")
    version = None
    if path:
        m = re.search(r"\.so\.(\d+(?:\.\d+)*)$", os.path.realpath(path))
        version = m.group(1) if m else None
    return dict(present=path is not None, library=path, version=version)


def wireguard_facts(module, probe=True):
    """Kernel support (probed), whether the module is there already, and the userspace tools."""
    # read before probing: the probe itself may autoload the module
    module_loaded = os.path.isdir("/sys/module/wireguard")
    kernel_ok, detail = kernel.probe_wireguard() if probe else (None, "probe disabled (wireguard_probe=false)")
    userspace = Tool(module, "wireguard-go").path
    tools = Tool(module, "wg").path
    return dict(kernel=kernel_ok, detail=detail, module_loaded=module_loaded,
                userspace=userspace is not None, userspace_path=userspace,
                tools=tools is not None, tools_path=tools)


OS_FAMILIES = (("debian", "Debian"), ("ubuntu", "Debian"), ("rhel", "RedHat"), ("centos", "RedHat"),
               ("fedora", "RedHat"), ("rocky", "RedHat"), ("almalinux", "RedHat"))


def parse_os_release(text):
    """{id, version_id, family} from /etc/os-release text; family as Ansible names it (Debian, RedHat)."""
    fields = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            fields[k.strip()] = v.strip().strip('"').strip("'")
    ids = [fields.get("ID", "")] + fields.get("ID_LIKE", "").split()
    family = next((fam for i in ids for name, fam in OS_FAMILIES if i == name), None)
    return dict(id=fields.get("ID"), version_id=fields.get("VERSION_ID"), family=family)


def os_facts(path="/etc/os-release"):
    try:
        with open(path) as f:
            return parse_os_release(f.read())
    except (IOError, OSError):
        return dict(id=None, version_id=None, family=None)


def missing_packages(module, family, names):
    """The packages of ``names`` that are not installed, asked of dpkg or rpm in one call (None when
    neither can be asked)."""
    if not names:
        return []
    if family == "Debian":
        fmt = "${db:Status-Abbrev} ${Package}\n"
        rc, out, _err = Tool(module, "dpkg-query").run("-W", "-f", fmt, *names, check=False)
        if rc == 127:
            return None
        installed = set(ln.split()[-1] for ln in out.splitlines() if ln.startswith("ii"))
    elif family == "RedHat":
        rc, out, _err = Tool(module, "rpm").run("-q", "--qf", "%{NAME}\n", *names, check=False)
        if rc == 127:
            return None
        installed = set(ln.strip() for ln in out.splitlines() if " " not in ln.strip())
    else:
        return None
    return sorted(n for n in names if n.split(":")[0] not in installed)


def gather(module, wireguard_probe=True, iptables=True, packages=None):
    release = platform.release()
    version = kernel.parse_release(release)
    source, config = kernel.read_config(release)
    table = mounts.read_mounts()
    cgroup2 = mounts.cgroup2_path(table)
    bpffs = mounts.bpf_mounts(table)
    btf = os.path.exists(kernel.BTF_VMLINUX)
    wireguard = wireguard_facts(module, wireguard_probe)
    facts = dict(
        kernel=dict(release=release, version=list(version), version_text=kernel.version_text(version)),
        btf=btf,
        bpffs_mounts=bpffs,
        cgroup2_path=cgroup2,
        kernel_config=dict(source=source, flags=kernel.config_flags(config)),
        wireguard=wireguard,
        bpftool=bpftool_facts(module),
        libbpf=libbpf_facts(),
        os=os_facts(),
    )
    if packages is not None:
        names = packages.get(facts["os"]["family"])
        facts["packages_missing"] = missing_packages(module, facts["os"]["family"], list(names)) \
            if isinstance(names, list) else None
    if iptables:
        facts["iptables"] = iptables_facts(module)
    facts["requirements"] = kernel.evaluate_requirements(version, btf, cgroup2, bpffs, config, wireguard["kernel"])
    facts["requirements_unmet"] = [r["name"] for r in facts["requirements"] if not r["ok"]]
    return facts
