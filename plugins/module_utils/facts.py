# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Gather the facts of ebpf_facts: one pass over /proc, /sys and a few read-only commands."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes.util
import os
import platform
import re

from ansible_collections.kldload.netstack.plugins.module_utils import kernel
from ansible_collections.kldload.netstack.plugins.module_utils.iptables import (
    BACKENDS, FAMILIES, is_kube_proxy_chain, parse_nft_tables, parse_save)
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

_BUILTIN_CHAINS = frozenset(["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"])
_SAVE_PREFIX = {"ipv4": "iptables", "ipv6": "ip6tables"}
_NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}


def iptables_facts(module):
    """Per backend and family: is the tool there, is anything configured, are kube-proxy chains there."""
    out = {}
    for backend in BACKENDS:
        for family in FAMILIES:
            tool = Tool(module, "%s-%s-save" % (_SAVE_PREFIX[family], backend))
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
        kube_proxy=[f for f in FAMILIES if (_NFT_FAMILY[f], "kube-proxy") in tables],
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


def libbpf_facts():
    path = ctypes.util.find_library("bpf")
    return dict(present=path is not None, library=path)


def gather(module, wireguard_probe=True, iptables=True):
    release = platform.release()
    version = kernel.parse_release(release)
    source, config = kernel.read_config(release)
    mounts = kernel.read_mounts()
    cgroup2 = kernel.cgroup2_path(mounts)
    bpffs = kernel.bpf_mounts(mounts)
    btf = os.path.exists(kernel.BTF_VMLINUX)
    ip = Tool(module, "ip")
    wg_kernel, wg_detail = kernel.probe_wireguard(ip) if wireguard_probe else (None, "probe disabled")
    facts = dict(
        kernel=dict(release=release, version=list(version), version_text=kernel.version_text(version)),
        btf=btf,
        bpffs_mounts=bpffs,
        cgroup2_path=cgroup2,
        kernel_config=dict(source=source,
                           flags=dict((k, (config or {}).get(k, "n")) for k in kernel.CONFIG_FLAGS) if config else None),
        wireguard=dict(kernel=wg_kernel, detail=wg_detail, module_loaded=os.path.isdir("/sys/module/wireguard"),
                       userspace=Tool(module, "wireguard-go").path, tools=Tool(module, "wg").path),
        bpftool=bpftool_facts(module),
        libbpf=libbpf_facts(),
    )
    if iptables:
        facts["iptables"] = iptables_facts(module)
    facts["requirements"] = kernel.evaluate_requirements(version, btf, cgroup2, bpffs, config, wg_kernel)
    facts["requirements_unmet"] = [r["name"] for r in facts["requirements"] if not r["ok"]]
    return facts
