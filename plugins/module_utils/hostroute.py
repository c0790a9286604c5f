# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""BPF host routing: the two maps the ``host`` and ``lxc`` objects read (bpf/lib/fwd.h).

With those objects loaded (the dataplane role loads them for a node with pods unless
``dataplane_host_routing: legacy``), pod packets are forwarded by tc programs instead of the host's
IP stack: into a pod of this node with bpf_redirect_peer(), to a pod of another node through the
FIB's next hop with bpf_redirect(). The programs only read two shared maps, which this module
writes:

- ``kln_endpoints4``: pod IPv4 -> {host-side ifindex, pod MAC, host-side MAC}, from the endpoint
  records of the CNI plugin (cni.py): the plugin adds a pod's entries on ADD and removes them on DEL
  (``add_endpoint`` / ``remove_endpoint``), and every dataplane apply makes the map match the records
  (``sync``), so a lost or stale entry lasts at most until the next apply.
- ``kln_pod_cidr4``: LPM, the cluster's pod CIDRs (this node's flagged local), from ``pods``.

Layouts: bpf/lib/fwd_structs.h (the ``py:`` formats are the ones below). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import os
import socket
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest

OBJECTS = ("host", "lxc")
ENDPOINTS = "kln_endpoints4"
CIDRS = "kln_pod_cidr4"
VERSIONS = {ENDPOINTS: 1, CIDRS: 1}
EP_KEY = struct.Struct("4s")
EP_VALUE = struct.Struct("=I6s6s")
CIDR_KEY = struct.Struct("=I4s")
CIDR_VALUE = struct.Struct("=I")
CIDR_F_LOCAL = 1
CIDR_F_ENCRYPT = 2      # reached through the WireGuard device: the stack routes it (no fast path)
MAX_ENTRIES = {ENDPOINTS: 65536, CIDRS: 1024}


class HostRouteError(Exception):
    pass


def pin(globals_dir, name):
    return os.path.join(globals_dir, manifest.pin_name(name, VERSIONS[name]))


def enabled(objects):
    """Whether a node configuration's objects (runtime's ``objects``) turn BPF host routing on."""
    return any(o.get("name") in OBJECTS for o in objects or [])


def _mac(text):
    try:
        raw = bytes(bytearray(int(b, 16) for b in (text or "").split(":")))
    except ValueError:
        raw = b""
    return raw if len(raw) == 6 else None


def endpoint_entries(rec):
    """{key: value} of one endpoint record (its IPv4 addresses); {} when its host interface is gone
    or a MAC is missing (the stack then forwards the pod's packets as it does without this)."""
    if not isinstance(rec, dict) or rec.get("state", "ready") != "ready":
        return {}
    mac, host_mac = _mac(rec.get("mac")), _mac(rec.get("host_mac"))
    try:
        ifindex = socket.if_nametoindex(rec.get("host_interface") or "")
    except (OSError, ValueError):
        return {}
    if mac is None or host_mac is None:
        return {}
    return dict((k, EP_VALUE.pack(ifindex, mac, host_mac)) for k in _ep_keys(rec))


def _ep_keys(rec):
    """The kln_endpoints4 keys of a record's IPv4 addresses."""
    out = []
    for a in rec.get("ips") or []:
        try:
            ip = ipaddress.ip_interface(u"%s" % a).ip
        except ValueError:
            continue
        if ip.version == 4:
            out.append(EP_KEY.pack(ip.packed))
    return out


def cidr_entries(pods):
    """{key: value} of the cluster's pod CIDRs (normalize()d ``pods``)."""
    out = {}
    if not pods:
        return out
    remote = CIDR_F_ENCRYPT if pods.get("encryption") else 0
    for cidr, flags in [(pods["cidr"], CIDR_F_LOCAL)] + [(n["pod_cidr"], remote) for n in pods["nodes"]]:
        net = ipaddress.ip_network(u"%s" % cidr)
        out[CIDR_KEY.pack(net.prefixlen, net.network_address.packed)] = CIDR_VALUE.pack(flags)
    return out


def _mac_text(raw):
    return ":".join("%02x" % b for b in bytearray(raw))


def _ep_text(key, value):
    ifindex, mac, host_mac = EP_VALUE.unpack(value)
    ip = socket.inet_ntoa(EP_KEY.unpack(key)[0])
    return "%s -> ifindex %d mac %s host %s" % (ip, ifindex, _mac_text(mac), _mac_text(host_mac))


def _cidr_text(key, value):
    plen, addr = CIDR_KEY.unpack(key)
    flags = CIDR_VALUE.unpack(value)[0]
    return "%s/%d%s%s" % (socket.inet_ntoa(addr), plen, " (local)" if flags & CIDR_F_LOCAL else "",
                          " (encrypted: through the stack)" if flags & CIDR_F_ENCRYPT else "")


_TEXT = {ENDPOINTS: _ep_text, CIDRS: _cidr_text}
_SIZES = {ENDPOINTS: (EP_KEY.size, EP_VALUE.size), CIDRS: (CIDR_KEY.size, CIDR_VALUE.size)}


def read(globals_dir, name):
    """{key: value} of one of the maps, or None when it is not pinned."""
    path = pin(globals_dir, name)
    if not os.path.exists(path):
        return None
    ks, vs = _SIZES[name]
    with bpfsys.obj_get(path) as fd:
        return dict(bpfsys.map_dump(fd, ks, vs, MAX_ENTRIES[name]))


def _sync_map(globals_dir, name, want, check, prune=True):
    """Make one map hold ``want`` (only those keys when ``prune``); the changes as text."""
    have = read(globals_dir, name)
    if have is None:
        have = {}
        if not check:
            raise HostRouteError("%s is not pinned: the host and lxc objects are not loaded" % pin(globals_dir, name))
    text = _TEXT[name]
    gone = sorted(k for k in have if k not in want) if prune else []
    put = sorted(k for k, v in want.items() if have.get(k) != v)
    changes = ["%s: delete %s" % (name, text(k, have[k])) for k in gone]
    changes += ["%s: %s %s" % (name, "replace" if k in have else "add", text(k, want[k])) for k in put]
    if changes and not check:
        with bpfsys.obj_get(pin(globals_dir, name)) as fd:
            for k in put:               # add first, then delete: a pod's entry is never missing in between
                bpfsys.map_update(fd, k, want[k])
            for k in gone:
                bpfsys.map_delete(fd, k)
    return changes


def sync(globals_dir, pods, records, check=False):
    """Make both maps match the pod network (``pods``) and the endpoint records. In check mode on a
    node where the objects are not loaded yet, every entry is reported as to be added. Changes as text."""
    want = {}
    for rec in records or []:
        want.update(endpoint_entries(rec))
    return _sync_map(globals_dir, CIDRS, cidr_entries(pods), check) + _sync_map(globals_dir, ENDPOINTS, want, check)


def add_endpoint(globals_dir, rec):
    """The CNI plugin's ADD: the pod's entries, when the map is pinned (BPF host routing on)."""
    if os.path.exists(pin(globals_dir, ENDPOINTS)):
        _sync_map(globals_dir, ENDPOINTS, endpoint_entries(rec), False, prune=False)


def remove_endpoint(globals_dir, rec):
    """The CNI plugin's DEL and GC: the entries of the record's addresses (whatever interface they name)."""
    path = pin(globals_dir, ENDPOINTS)
    if not os.path.exists(path) or not isinstance(rec, dict):
        return
    with bpfsys.obj_get(path) as fd:
        for k in _ep_keys(rec):
            bpfsys.map_delete(fd, k)
