# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The identity and policy maps (bpf/lib/policy.h, layouts in bpf/lib/policy_structs.h): the compiler's
output (compile.py) packed into keys and values, and written by difference.

- ``kln_ipcache4`` (LPM): every pod and node address of the cluster -> identity.
- ``kln_cidr_ident4`` (LPM): the prefixes the policies name -> CIDR identity.
- ``kln_policy_ep4``: each pod of this node -> {host-side ifindex, identity, enforcement, generation}.
- ``kln_policy4`` (LPM): the pods' entries {endpoint, peer identity, direction + generation, protocol,
  port prefix} -> {deny, rule}. A port range becomes the prefixes that cover it exactly. The LPM
  answers the most specific entry of one peer identity, so an allow that a deny of the same identity
  covers is not written: the deny answers for it (deny wins whatever the port specificity).
- ``kln_tunnel4`` (LPM, overlay.c): the other nodes' pod CIDRs -> {underlay address, fixed VNI or 0}.
- ``kln_policy_stat`` (per-CPU): what the programs let through and drop, per endpoint, reason, direction.

An endpoint's entries change atomically: the new set is written under the other generation, the
endpoint's value flips to it in one update, then the old generation is deleted. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import os
import socket
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest
from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as _id

EP = "kln_policy_ep4"
POLICY = "kln_policy4"
IPCACHE = "kln_ipcache4"
CIDRS = "kln_cidr_ident4"
CT = "kln_ct4"
STAT = "kln_policy_stat"
TUNNEL = "kln_tunnel4"
VERSIONS = {EP: 1, POLICY: 1, IPCACHE: 1, CIDRS: 1, CT: 1, STAT: 1, TUNNEL: 1}

EP_KEY = struct.Struct("4s")
EP_VALUE = struct.Struct("=III")
POL_KEY = struct.Struct("=I4sIBB2s")
POL_VALUE = struct.Struct("=II")
IPC_KEY = struct.Struct("=I4s")
IPC_VALUE = struct.Struct("=II")
CT_KEY = struct.Struct("=4s4s2s2sBBH")
CT_VALUE = struct.Struct("=IBBBBII")
STAT_KEY = struct.Struct("=4sBBH")
STAT_VALUE = struct.Struct("=QQ")
TUN_VALUE = struct.Struct("=4sI")
SIZES = {EP: (EP_KEY.size, EP_VALUE.size), POLICY: (POL_KEY.size, POL_VALUE.size),
         IPCACHE: (IPC_KEY.size, IPC_VALUE.size), CIDRS: (IPC_KEY.size, IPC_VALUE.size),
         CT: (CT_KEY.size, CT_VALUE.size), STAT: (STAT_KEY.size, STAT_VALUE.size),
         TUNNEL: (IPC_KEY.size, TUN_VALUE.size)}
MAX_ENTRIES = {EP: 65536, POLICY: 262144, IPCACHE: 65536, CIDRS: 16384, CT: 131072, STAT: 65536, TUNNEL: 1024}

EP_INGRESS = 1
EP_EGRESS = 2
EP_GEN = 4
BY_ADDRESS = 0x80000000
DENY = 1
PREFIX_ANY_PROTO = 72
PREFIX_PROTO = 80
CT_EGRESS = 1
CT_INGRESS = 0

# Drop reasons (bpf/lib/policy_structs.h; Cilium's numbers and Hubble's names)
REASONS = {0: "FORWARDED", 132: "INVALID_SOURCE_IP", 133: "POLICY_DENIED", 134: "INVALID_PACKET",
           160: "NO_TUNNEL_ENDPOINT", 181: "POLICY_DENY"}
REASON_TEXT = {0: "let through", 132: "invalid source ip (not the pod's address)", 133: "policy denied (no rule allows it)",
               134: "invalid packet", 160: "no tunnel endpoint", 181: "policy denied by a deny rule"}
DIRECTIONS = {CT_INGRESS: "ingress", CT_EGRESS: "egress"}


class PolicyMapError(Exception):
    pass


def pin(globals_dir, name):
    return os.path.join(globals_dir, manifest.pin_name(name, VERSIONS[name]))


def pinned(globals_dir, name=EP):
    return os.path.exists(pin(globals_dir, name))


def _packed(ip):
    return socket.inet_pton(socket.AF_INET, "%s" % ip)


def _ip(raw):
    return socket.inet_ntoa(raw)


# ---- packing ------------------------------------------------------------------------------------

def port_prefixes(lo, hi):
    """The (port, prefix bits) blocks that cover the ports lo..hi exactly (as few as possible)."""
    out = []
    while lo <= hi:
        bits = 16
        while bits > 0:
            size = 1 << (16 - bits + 1)
            if lo % size or lo + size - 1 > hi:
                break
            bits -= 1
        out.append((lo, bits))
        lo += 1 << (16 - bits)
    return out


def _variable(protocol, port, bits):
    """(prefix length beyond the fixed part, the 24 bits protocol + port) of an entry."""
    if not protocol:
        return 0, 0
    if not port and not bits:
        return 8, protocol << 16
    return 8 + bits, (protocol << 16) | port


def _covers(d, a):
    """Whether the variable part ``d`` (length, bits) covers ``a`` (every packet ``a`` matches, ``d`` does)."""
    if d[0] > a[0]:
        return False
    shift = 24 - d[0]
    return (a[1] >> shift) == (d[1] >> shift)


def endpoint_keys(ep_ip, entries, rules):
    """{(identity key, egress, (length, bits)): (deny, rule id)} of one endpoint's entries, deny precedence
    applied: an allow that a deny of the same peer identity key covers is left out. ``rules`` maps the
    entries' rule text to its id (filled as needed)."""
    groups = {}
    for e in entries:
        ident = e["identity"] | (BY_ADDRESS if e["by_address"] else 0)
        egress = e["direction"] == "egress"
        rid = rules.setdefault(e["rule"], len(rules) + 1)
        proto = e["protocol"]
        if not proto or not e["port"]:
            blocks = [(0, 0)]
        else:
            blocks = port_prefixes(e["port"], e["end_port"] or e["port"])
        g = groups.setdefault((ident, egress), {})
        for port, bits in blocks:
            var = _variable(proto, port, bits)
            have = g.get(var)
            if have is None or (e["deny"] and not have[0]):
                g[var] = (bool(e["deny"]), rid)
    out = {}
    for (ident, egress), g in groups.items():
        denies = [v for v, (deny, _r) in g.items() if deny]
        for var, (deny, rid) in g.items():
            if not deny and any(_covers(d, var) for d in denies):
                continue
            out[(ident, egress, var)] = (deny, rid)
    return out


def pack_keys(ep_ip, keys, gen):
    """The kln_policy4 keys of one endpoint's (identity key, egress, (length, bits)) in one generation."""
    ep = _packed(ep_ip)
    g = 2 if gen else 0
    port = struct.Struct("!H").pack
    return [POL_KEY.pack(PREFIX_ANY_PROTO + length, ep, ident, (1 if egress else 0) | g, bits >> 16, port(bits & 0xffff))
            for ident, egress, (length, bits) in keys]


def unpack_key(raw):
    """(endpoint ip, identity key, egress, (length, bits), generation) of a kln_policy4 key."""
    plen, ep, ident, dirgen, proto, port = POL_KEY.unpack(raw)
    length = plen - PREFIX_ANY_PROTO
    bits = ((proto << 16) | struct.unpack("!H", port)[0]) if length else 0
    if length and length < 24:
        bits &= ~((1 << (24 - length)) - 1) & 0xffffff
    return _ip(ep), ident, bool(dirgen & 1), (length, bits), bool(dirgen & 2)


def prefix_entries(pairs):
    """{LPM key: value} of [[prefix, identity], ...] (the compiler's ipcache and cidrs)."""
    out = {}
    for prefix, ident in pairs:
        if ":" in prefix:
            continue
        net = _id.network(prefix)
        out[IPC_KEY.pack(net.prefixlen, net.network_address.packed)] = IPC_VALUE.pack(ident, 0)
    return out


def tunnel_entries(nodes):
    """{LPM key: value} of the other nodes' pod CIDRs ([{pod_cidr, underlay_ip, vni}]; vni 0: identities)."""
    out = {}
    for n in nodes:
        net = ipaddress.ip_network(u"%s" % n["pod_cidr"])
        value = TUN_VALUE.pack(_packed(n["underlay_ip"]), n.get("vni") or 0)
        out[IPC_KEY.pack(net.prefixlen, net.network_address.packed)] = value
    return out


def _prefix_text(key):
    plen, addr = IPC_KEY.unpack(key)
    return "%s/%d" % (_ip(addr), plen)


# ---- reading ------------------------------------------------------------------------------------

def read(globals_dir, name):
    """{key: value} of one map, or None when it is not pinned."""
    path = pin(globals_dir, name)
    if not os.path.exists(path):
        return None
    ks, vs = SIZES[name]
    if name == STAT:
        vs = bpfsys.percpu_value_size(vs)
    with bpfsys.obj_get(path) as fd:
        return dict(bpfsys.map_dump(fd, ks, vs, MAX_ENTRIES[name]))


def endpoints(globals_dir):
    """{pod ip: {ifindex, identity, ingress_enforced, egress_enforced, generation}} of kln_policy_ep4."""
    out = {}
    for k, v in (read(globals_dir, EP) or {}).items():
        ifindex, ident, flags = EP_VALUE.unpack(v)
        out[_ip(EP_KEY.unpack(k)[0])] = {"ifindex": ifindex, "identity": ident,
                                         "ingress_enforced": bool(flags & EP_INGRESS),
                                         "egress_enforced": bool(flags & EP_EGRESS), "generation": int(bool(flags & EP_GEN))}
    return out


def stats(globals_dir):
    """{(pod ip, reason, direction): (packets, bytes)} summed over the CPUs."""
    out = {}
    raw = read(globals_dir, STAT) or {}
    for k, v in raw.items():
        ip, reason, direction, _pad = STAT_KEY.unpack(k)
        packets = sum(p for p, _b in STAT_VALUE.iter_unpack(v))
        nbytes = sum(b for _p, b in STAT_VALUE.iter_unpack(v))
        out[(_ip(ip), reason, direction)] = (packets, nbytes)
    return out


def policy_entries(globals_dir, ep_ip=None, generation=None):
    """[(endpoint ip, identity key, egress, (length, bits), generation, deny, rule id)] of kln_policy4, for
    one endpoint (and generation) when given."""
    out = []
    for k, v in (read(globals_dir, POLICY) or {}).items():
        ip, ident, egress, var, gen = unpack_key(k)
        if (ep_ip is not None and ip != ep_ip) or (generation is not None and gen != generation):
            continue
        flags, rule = POL_VALUE.unpack(v)
        out.append((ip, ident, egress, var, gen, bool(flags & DENY), rule))
    return sorted(out)


# ---- writing ------------------------------------------------------------------------------------

def _sync_prefix_map(fd, have, want, name, changes, check, text):
    gone = sorted(k for k in have if k not in want)
    put = sorted(k for k, v in want.items() if have.get(k) != v)
    changes += ["%s: delete %s" % (name, text(k, have[k])) for k in gone]
    changes += ["%s: %s %s" % (name, "replace" if k in have else "add", text(k, want[k])) for k in put]
    if not check:
        for k in put:           # add before delete: an address never lacks an answer in between
            bpfsys.map_update(fd, k, want[k])
        for k in gone:
            bpfsys.map_delete(fd, k)


def _ipc_text(key, value):
    return "%s -> identity %d" % (_prefix_text(key), IPC_VALUE.unpack(value)[0])


def _tun_text(key, value):
    remote, vni = TUN_VALUE.unpack(value)
    return "%s -> node %s (%s)" % (_prefix_text(key), _ip(remote), "vni %d" % vni if vni else "identity in the vni")


def sync_prefixes(globals_dir, name, want, check=False):
    """Make an LPM map of ipc_key keys (ipcache, CIDR identities, tunnel) hold exactly ``want``; changes as text."""
    path = pin(globals_dir, name)
    changes = []
    if not os.path.exists(path):
        if check:
            text = _tun_text if name == TUNNEL else _ipc_text
            return ["%s: add %s" % (name, text(k, v)) for k, v in sorted(want.items())]
        raise PolicyMapError("%s is not pinned: the object that declares it is not loaded" % path)
    with bpfsys.obj_get(path) as fd:
        have = dict(bpfsys.map_dump(fd, SIZES[name][0], SIZES[name][1], MAX_ENTRIES[name]))
        _sync_prefix_map(fd, have, want, name, changes, check, _tun_text if name == TUNNEL else _ipc_text)
    return changes


def sync_endpoints(globals_dir, want, check=False, prune=True):
    """Make kln_policy_ep4 and kln_policy4 hold ``want``: {pod ip: {"ifindex", "identity", "flags"
    (EP_INGRESS | EP_EGRESS), "keys": endpoint_keys()}} - each endpoint's entries swapped atomically
    (generation flip), endpoints not in ``want`` removed when ``prune``. Changes as text (one line per
    endpoint that changes)."""
    ep_path, pol_path = pin(globals_dir, EP), pin(globals_dir, POLICY)
    if not os.path.exists(ep_path) or not os.path.exists(pol_path):
        if check:
            return ["%s: add endpoint %s (identity %d, %d entries)" % (EP, ip, w["identity"], len(w["keys"]))
                    for ip, w in sorted(want.items())]
        raise PolicyMapError("%s is not pinned: the policy object is not loaded" % ep_path)
    changes = []
    with bpfsys.obj_get(ep_path) as efd, bpfsys.obj_get(pol_path) as pfd:
        have_eps = dict((_ip(EP_KEY.unpack(k)[0]), EP_VALUE.unpack(v))
                        for k, v in bpfsys.map_dump(efd, EP_KEY.size, EP_VALUE.size, MAX_ENTRIES[EP]))
        have_keys = {}
        for k, v in bpfsys.map_dump(pfd, POL_KEY.size, POL_VALUE.size, MAX_ENTRIES[POLICY]):
            ip, ident, egress, var, gen = unpack_key(k)
            flags, rule = POL_VALUE.unpack(v)
            have_keys.setdefault(ip, {}).setdefault(gen, {})[(ident, egress, var)] = (bool(flags & DENY), rule)
        for ip in sorted(want):
            w = want[ip]
            old = have_eps.get(ip)
            gen = bool(old[2] & EP_GEN) if old else False
            cur = have_keys.get(ip, {})
            same = (old is not None and old[0] == w["ifindex"] and old[1] == w["identity"]
                    and (old[2] & (EP_INGRESS | EP_EGRESS)) == w["flags"] and cur.get(gen, {}) == w["keys"]
                    and not cur.get(not gen))
            if same:
                continue
            if old is None:
                changes.append("%s: add endpoint %s (identity %d, %d entries)" % (EP, ip, w["identity"], len(w["keys"])))
            else:
                changes.append("%s: endpoint %s: identity %d, %s, %d entries (were %d)"
                               % (EP, ip, w["identity"], _enforced_text(w["flags"]), len(w["keys"]), len(cur.get(gen, {}))))
            if check:
                continue
            new_gen = not gen if old is not None else False
            if cur.get(new_gen):                     # leftovers of an interrupted swap
                bpfsys.map_delete_batch(pfd, pack_keys(ip, cur[new_gen], new_gen), POL_KEY.size)
            items = sorted(w["keys"].items())
            bpfsys.map_update_batch(pfd, list(zip(pack_keys(ip, [k for k, _v in items], new_gen),
                                                  [POL_VALUE.pack(DENY if deny else 0, rid) for _k, (deny, rid) in items])),
                                    POL_KEY.size, POL_VALUE.size)
            bpfsys.map_update(efd, EP_KEY.pack(_packed(ip)),
                              EP_VALUE.pack(w["ifindex"], w["identity"], w["flags"] | (EP_GEN if new_gen else 0)))
            if old is not None and new_gen != gen and cur.get(gen):
                bpfsys.map_delete_batch(pfd, pack_keys(ip, cur[gen], gen), POL_KEY.size)
        if prune:
            for ip in sorted(set(have_eps) | set(have_keys)):
                if ip in want:
                    continue
                changes.append("%s: remove endpoint %s" % (EP, ip))
                if check:
                    continue
                bpfsys.map_delete(efd, EP_KEY.pack(_packed(ip)))
                for gen, keys in have_keys.get(ip, {}).items():
                    bpfsys.map_delete_batch(pfd, pack_keys(ip, keys, gen), POL_KEY.size)
    return changes


def remove_endpoint(globals_dir, ep_ip):
    """A pod's endpoint entry and its policy entries (the CNI plugin's DEL); nothing when not pinned."""
    if not pinned(globals_dir, EP) or not pinned(globals_dir, POLICY):
        return
    with bpfsys.obj_get(pin(globals_dir, EP)) as efd:
        bpfsys.map_delete(efd, EP_KEY.pack(_packed(ep_ip)))
    with bpfsys.obj_get(pin(globals_dir, POLICY)) as pfd:
        for k, _v in bpfsys.map_dump(pfd, POL_KEY.size, POL_VALUE.size, MAX_ENTRIES[POLICY]):
            if unpack_key(k)[0] == ep_ip:
                bpfsys.map_delete(pfd, k)


def _enforced_text(flags):
    parts = [d for d, f in (("ingress", EP_INGRESS), ("egress", EP_EGRESS)) if flags & f]
    return "enforced on %s" % " and ".join(parts) if parts else "not enforced"


def l4_text(var):
    """'any protocol', 'TCP any port', 'UDP 53', 'TCP 8000-8999' of an entry's variable part."""
    length, bits = var
    if length == 0:
        return "any protocol"
    proto = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}.get(bits >> 16, str(bits >> 16))
    if length == 8:
        return "%s any port" % proto
    lo = bits & 0xffff
    hi = lo + (1 << (24 - length)) - 1
    return "%s %d" % (proto, lo) if lo == hi else "%s %d-%d" % (proto, lo, hi)
