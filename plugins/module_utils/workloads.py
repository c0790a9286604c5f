# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Lab workloads (pods): the inventory's ``netstack_namespaces`` / ``netstack_workloads`` checked,
and one node's workloads made to match their list, created exactly as a container runtime creates a
pod sandbox. No Ansible imports.

Validation (``validate()``, used by the role's ``workloads_validate`` filter once for the whole
cluster and by the module for one node): every error is a ``ValueError`` naming the field
(``netstack_workloads[3] (shop/web).ports[1].name``). The namespace ``default`` always exists (as in
Kubernetes); any other namespace a workload uses must be declared in ``netstack_namespaces``.

Per workload (``sync()``): a network namespace ``/run/netns/<netns_name()>``; the loopback network
for ``lo``; the CNI conflist ADD for ``eth0`` with the CNI_ARGS and the
``io.kubernetes.cri.pod-annotations`` capability a runtime passes (and ``ips`` when the IP is pinned);
then the server process in the namespace, started by a *starter* (``SystemdStarter``: a transient
unit in ``netstack-workloads.slice``); then a record ``<state_dir>/<netns>.json``. A failure at any
step undoes the steps before it (no namespace, unit, IPAM lease or record is left behind).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import ipaddress
import json
import os
import re
import time
import uuid

from ansible_collections.kldload.netstack.plugins.module_utils import labels as labels_mod

DEFAULT_NAMESPACE = "default"
PROTOCOLS = ("TCP", "UDP")
NETNS_DIR = "/run/netns"
NETNS_PREFIX = "wl-"
UNIT_PREFIX = "netstack-wl-"
SLICE = "netstack-workloads.slice"
PYTHON = "/usr/bin/python3"
IFNAME = "eth0"
LABELS_ANNOTATION = "netstack.kldload.io/labels"
PORTS_ANNOTATION = "netstack.kldload.io/ports"
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
# the UUID namespace of pod UIDs: uuid5(this, "<namespace>/<name>")
POD_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "workloads.netstack.kldload.io")

WORKLOAD_KEYS = ("namespace", "name", "node", "labels", "ports", "ip")
PORT_KEYS = ("name", "port", "protocol")
NAMESPACE_KEYS = ("name", "labels")

_DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class WorkloadError(Exception):
    """A step on the node failed (after validation); the workload was left as it was before."""


# ---------------------------------------------------------------------------------------------
# validation


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _namespace_names(namespaces, where="netstack_namespaces"):
    if namespaces is None:
        namespaces = []
    if not isinstance(namespaces, list):
        raise ValueError("%s: must be a list of {name, labels}" % where)
    out = {}
    for i, ns in enumerate(namespaces):
        w = "%s[%d]" % (where, i)
        if not isinstance(ns, dict):
            raise ValueError("%s: must be a mapping with name and labels" % w)
        unknown = sorted(set(ns) - set(NAMESPACE_KEYS))
        if unknown:
            raise ValueError("%s: unknown key(s) %s (a namespace has %s)" % (w, ", ".join(unknown), ", ".join(NAMESPACE_KEYS)))
        name = ns.get("name")
        if not isinstance(name, str) or len(name) > 63 or not _DNS1123_LABEL_RE.match(name):
            raise ValueError("%s.name: %r must be a DNS label (at most 63 lowercase alphanumerics or '-', "
                             "beginning and ending with an alphanumeric)" % (w, name))
        w = "%s (%s)" % (w, name)
        if name in out:
            raise ValueError("%s.name: namespace %s is declared twice" % (w, name))
        out[name] = labels_mod.namespace_labels(name, labels_mod.validate_labels(ns.get("labels"), w + ".labels"))
    out.setdefault(DEFAULT_NAMESPACE, labels_mod.namespace_labels(DEFAULT_NAMESPACE))
    return out


def validate_namespaces(namespaces, where="netstack_namespaces"):
    """The namespaces as ``[{name, labels}]`` (``kubernetes.io/metadata.name`` added, ``default``
    always present), sorted by name; ValueError naming the field."""
    ns = _namespace_names(namespaces, where)
    return [dict(name=n, labels=ns[n]) for n in sorted(ns)]


def _port(p, w, seen_names, seen_ports):
    if not isinstance(p, dict):
        raise ValueError("%s: must be a mapping with name, port and protocol" % w)
    unknown = sorted(set(p) - set(PORT_KEYS))
    if unknown:
        raise ValueError("%s: unknown key(s) %s (a port has %s)" % (w, ", ".join(unknown), ", ".join(PORT_KEYS)))
    port = p.get("port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ValueError("%s.port: %r must be a number from 1 to 65535" % (w, p.get("port")))
    proto = p.get("protocol")
    proto = "TCP" if proto is None else proto
    if not isinstance(proto, str) or proto.upper() not in PROTOCOLS:
        if isinstance(proto, str) and proto.upper() == "SCTP":
            raise ValueError("%s.protocol: SCTP is not supported (the lab kernel has no SCTP); use TCP or UDP" % w)
        raise ValueError("%s.protocol: %r must be TCP or UDP" % (w, proto))
    proto = proto.upper()
    out = dict(port=port, protocol=proto)
    name = p.get("name")
    if name is not None and name != "":
        err = labels_mod.iana_svc_name_error(name)
        if err:
            raise ValueError("%s.name: %r is not a valid port name (IANA_SVC_NAME): %s" % (w, name, err))
        if name in seen_names:
            raise ValueError("%s.name: port name %r is used twice in this workload" % (w, name))
        seen_names.add(name)
        out["name"] = name
    if (port, proto) in seen_ports:
        raise ValueError("%s: port %d/%s is listed twice in this workload" % (w, port, proto))
    seen_ports.add((port, proto))
    return out


def _pod_cidrs(nodes):
    """{node: ip_network or None} from a list of node names or a {node: pod cidr} mapping."""
    if isinstance(nodes, dict):
        out = {}
        for n, cidr in nodes.items():
            try:
                out[n] = ipaddress.ip_network(cidr, strict=False) if cidr else None
            except ValueError:
                out[n] = None
        return out
    return dict((n, None) for n in nodes)


def validate(workloads, namespaces=None, nodes=None, where="netstack_workloads"):
    """Check the workloads (and the namespaces they use); return them in canonical form, sorted by
    (namespace, name): ``{namespace, name, node, labels, ports: [{name?, port, protocol}], ip?}``.

    ``nodes``: None (do not check ``node``), a list of node names, or a mapping node -> pod CIDR (a
    pinned ``ip`` must then be inside its node's pod CIDR). Raises ValueError naming the field."""
    ns_labels = _namespace_names(namespaces)
    cidrs = None if nodes is None else _pod_cidrs(nodes)
    if workloads is None:
        workloads = []
    if not isinstance(workloads, list):
        raise ValueError("%s: must be a list of workloads" % where)
    out, names, ips = [], {}, {}
    for i, wl in enumerate(workloads):
        w = "%s[%d]" % (where, i)
        if not isinstance(wl, dict):
            raise ValueError("%s: must be a mapping (%s)" % (w, ", ".join(WORKLOAD_KEYS)))
        unknown = sorted(set(wl) - set(WORKLOAD_KEYS))
        if unknown:
            raise ValueError("%s: unknown key(s) %s (a workload has %s)" % (w, ", ".join(unknown), ", ".join(WORKLOAD_KEYS)))
        name = wl.get("name")
        if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN_RE.match(name):
            raise ValueError("%s.name: %r must be a DNS subdomain (lowercase alphanumerics, '-' and '.', at most "
                             "253 characters)" % (w, name))
        ns = wl.get("namespace") or DEFAULT_NAMESPACE
        w = "%s (%s/%s)" % (w, ns, name)
        if ns not in ns_labels:
            raise ValueError("%s.namespace: namespace %r is not declared in netstack_namespaces (declared: %s)"
                             % (w, ns, ", ".join(sorted(ns_labels))))
        if (ns, name) in names:
            raise ValueError("%s.name: %s/%s is already %s" % (w, ns, name, names[(ns, name)]))
        names[(ns, name)] = w.split(" ")[0]
        node = wl.get("node")
        if not isinstance(node, str) or not node:
            raise ValueError("%s.node: the node the workload runs on is required" % w)
        if cidrs is not None and node not in cidrs:
            raise ValueError("%s.node: %r is not a node of the inventory (kube_nodes: %s)"
                             % (w, node, ", ".join(sorted(cidrs)) or "none"))
        lbl = labels_mod.validate_labels(wl.get("labels"), w + ".labels")
        ports_in = wl.get("ports") or []
        if not isinstance(ports_in, list):
            raise ValueError("%s.ports: must be a list of {name, port, protocol}" % w)
        seen_names, seen_ports = set(), set()
        ports = [_port(p, "%s.ports[%d]" % (w, j), seen_names, seen_ports) for j, p in enumerate(ports_in)]
        item = dict(namespace=ns, name=name, node=node, labels=lbl, ports=ports)
        ip = wl.get("ip")
        if ip is not None and ip != "":
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError("%s.ip: %r is not an IP address (give the address alone, no prefix)" % (w, ip))
            if str(addr) in ips:
                raise ValueError("%s.ip: %s is already pinned by %s" % (w, addr, ips[str(addr)]))
            ips[str(addr)] = "%s/%s" % (ns, name)
            cidr = cidrs.get(node) if cidrs else None
            if cidr is not None and (addr.version != cidr.version or addr not in cidr):
                raise ValueError("%s.ip: %s is outside the pod CIDR %s of node %s" % (w, addr, cidr, node))
            if cidr is not None and addr in (cidr.network_address, cidr.broadcast_address) and cidr.num_addresses > 2:
                raise ValueError("%s.ip: %s is the network or broadcast address of %s" % (w, addr, cidr))
            item["ip"] = str(addr)
        out.append(item)
    out.sort(key=lambda x: (x["namespace"], x["name"]))
    return out


# ---------------------------------------------------------------------------------------------
# names and identities


def _short(text, n):
    s = re.sub(r"[^a-z0-9-]", "-", text.lower())[:n].strip("-")
    return s or "x"


def netns_name(namespace, name, prefix=NETNS_PREFIX):
    """Short unique netns name: ``wl-<ns, 10>-<name, 16>-<8 hex of sha256(ns/name)>`` (<= 40)."""
    digest = hashlib.sha256(("%s/%s" % (namespace, name)).encode()).hexdigest()[:8]
    return "%s%s-%s-%s" % (prefix, _short(namespace, 10), _short(name, 16), digest)


def unit_name(netns):
    return "%s%s.service" % (UNIT_PREFIX, netns[len(NETNS_PREFIX):] if netns.startswith(NETNS_PREFIX) else netns)


def pod_uid(namespace, name):
    return str(uuid.uuid5(POD_UID_NAMESPACE, "%s/%s" % (namespace, name)))


def spec_hash(spec):
    """sha256 of the workload's canonical spec (the fields that make its sandbox and process)."""
    keep = dict((k, spec.get(k)) for k in ("namespace", "name", "labels", "ports", "ip"))
    return hashlib.sha256(json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def network_hash(conflist):
    """sha256 of the CNI network configuration a workload was made with (a pod keeps the MTU and
    range it got at ADD: when the network changes, e.g. the routing mode and so the MTU, the
    workload is made again)."""
    if not conflist:
        return None
    return hashlib.sha256(json.dumps(conflist, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def container_id(spec):
    """64 hex characters like a runtime's sandbox id; a changed spec gets a new one."""
    return hashlib.sha256(("netstack-sandbox:" + spec_hash(spec)).encode()).hexdigest()


def server_argv(spec, server):
    argv = [PYTHON, server, "--namespace", spec["namespace"], "--name", spec["name"]]
    for p in spec["ports"]:
        argv += ["--%s" % p["protocol"].lower(), str(p["port"])]
    return argv


def cni_args(spec, cid):
    return [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", spec["namespace"]), ("K8S_POD_NAME", spec["name"]),
            ("K8S_POD_UID", pod_uid(spec["namespace"], spec["name"])), ("K8S_POD_INFRA_CONTAINER_ID", cid)]


def capability_args(spec):
    ann = {LABELS_ANNOTATION: json.dumps(spec["labels"], sort_keys=True),
           PORTS_ANNOTATION: json.dumps(spec["ports"], sort_keys=True)}
    caps = {ANNOTATIONS_CAPABILITY: ann}
    if spec.get("ip"):
        caps["ips"] = [spec["ip"]]
    return caps


# ---------------------------------------------------------------------------------------------
# the process starter


class SystemdStarter:
    """Workload processes as transient systemd units (``systemd-run``) in ``netstack-workloads.slice``,
    each in the pod's network namespace (``NetworkNamespacePath``). Transient units vanish at reboot,
    like the namespaces in /run/netns; the next run of the module finds both gone and recreates the
    workload (CNI DEL of the old sandbox first, so its IPAM lease is released)."""

    def __init__(self, runner):
        """``runner(argv, check=True) -> (rc, out, err)``."""
        self.run = runner

    def start(self, unit, netns, argv, description=""):
        self.run(["systemctl", "reset-failed", unit], check=False)
        self.run(["systemd-run", "--unit", unit, "--slice", SLICE, "--description", description or unit,
                  "-p", "Type=notify", "-p", "NetworkNamespacePath=%s/%s" % (NETNS_DIR, netns),
                  "-p", "Restart=on-failure", "-p", "RestartSec=1"] + list(argv))

    def alive(self, unit):
        rc, _out, _err = self.run(["systemctl", "is-active", "--quiet", unit], check=False)
        return rc == 0

    def stop(self, unit):
        self.run(["systemctl", "stop", unit], check=False)
        self.run(["systemctl", "reset-failed", unit], check=False)


# ---------------------------------------------------------------------------------------------
# the node's workloads


def _netns_alive(netns):
    path = os.path.join(NETNS_DIR, netns)
    return os.path.exists(path) and os.path.ismount(path)


def read_records(state_dir):
    """{(namespace, name): record} of the workloads this node runs (per the state directory)."""
    out = {}
    if not os.path.isdir(state_dir):
        return out
    for fn in sorted(os.listdir(state_dir)):
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(state_dir, fn)) as f:
                rec = json.load(f)
            out[(rec["namespace"], rec["name"])] = rec
        except (IOError, OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _write_record(state_dir, rec):
    if not os.path.isdir(state_dir):
        os.makedirs(state_dir, 0o755)
    path = os.path.join(state_dir, rec["netns"] + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    os.rename(tmp, path)


def _remove_record(state_dir, rec):
    path = os.path.join(state_dir, rec["netns"] + ".json")
    if os.path.exists(path):
        os.unlink(path)


def endpoint(rec_or_spec, ip=None):
    e = dict((k, rec_or_spec.get(k)) for k in ("namespace", "name", "node", "labels", "ports"))
    e["ip"] = ip if ip is not None else rec_or_spec.get("ip")
    return e


def describe(e):
    """One line per workload for diffs."""
    lbl = ",".join("%s=%s" % kv for kv in sorted((e.get("labels") or {}).items())) or "-"
    ports = ",".join("%s%d/%s" % ((p["name"] + ":") if p.get("name") else "", p["port"], p["protocol"])
                     for p in e.get("ports") or []) or "-"
    return "%s/%s node=%s ip=%s labels=%s ports=%s" % (e["namespace"], e["name"], e.get("node") or "-",
                                                       e.get("ip") or "(assigned)", lbl, ports)


def plan(specs, records, starter, prune=True, netns_prefix=NETNS_PREFIX, network=None):
    """[{namespace, name, action: create|recreate|delete|keep, reason}] in execution order
    (deletions first, so a pinned IP or a name can move)."""
    want = dict(((s["namespace"], s["name"]), s) for s in specs)
    deletes, changes = [], []
    for key in sorted(records):
        if key not in want:
            deletes.append(dict(namespace=key[0], name=key[1], action="delete" if prune else "keep",
                                reason="not in the list" + ("" if prune else " (prune=false)")))
    for key in sorted(want):
        s, rec = want[key], records.get(key)
        if rec is None:
            changes.append(dict(namespace=key[0], name=key[1], action="create", reason="new"))
            continue
        reason = None
        if rec.get("spec_hash") != spec_hash(s):
            reason = "spec changed"
        elif network and rec.get("network") and rec["network"] != network:
            reason = "the CNI network configuration changed"
        elif rec.get("netns") != netns_name(s["namespace"], s["name"], netns_prefix):
            reason = "netns name changed"
        elif not _netns_alive(rec["netns"]):
            reason = "netns %s is gone" % rec["netns"]
        elif not starter.alive(rec["unit"]):
            reason = "process %s is not running" % rec["unit"]
        changes.append(dict(namespace=key[0], name=key[1], action="recreate" if reason else "keep",
                            reason=reason or "unchanged"))
    return deletes + changes


class Node:
    """The workloads of one node: ``cni`` is the cni module_utils (load_conflist, invoke,
    invoke_loopback, CNIError), ``ip(argv)`` runs iproute2 (raises on failure)."""

    def __init__(self, cni, conflist, ip_runner, starter, state_dir, server, cni_path=None,
                 netns_prefix=NETNS_PREFIX, cache_dir=None):
        self.cni = cni
        self.conflist = conflist
        self.ip = ip_runner
        self.starter = starter
        self.state_dir = state_dir
        self.server = server
        self.cni_path = cni_path
        self.netns_prefix = netns_prefix
        self.cache_kw = {} if cache_dir is None else dict(cache_dir=cache_dir)

    def _invoke(self, command, rec_or_spec, cid, netns):
        return self.cni.invoke(self.conflist, command, cid, os.path.join(NETNS_DIR, netns), IFNAME,
                               args=cni_args(rec_or_spec, cid), capability_args=capability_args(rec_or_spec),
                               cni_path=self.cni_path, **self.cache_kw)

    def create(self, spec):
        """Sandbox + process + record for ``spec``; on failure everything done is undone and
        WorkloadError raised. Returns the record."""
        ns, name = spec["namespace"], spec["name"]
        netns = netns_name(ns, name, self.netns_prefix)
        cid = container_id(spec)
        unit = unit_name(netns)
        undo = []
        try:
            if os.path.exists(os.path.join(NETNS_DIR, netns)):      # a leftover without record
                self.ip(["ip", "netns", "delete", netns])
            self.ip(["ip", "netns", "add", netns])
            undo.append(lambda: self.ip(["ip", "netns", "delete", netns]))
            self.cni.invoke_loopback(cid, os.path.join(NETNS_DIR, netns), command="ADD", cni_path=self.cni_path,
                                     **self.cache_kw)
            undo.append(lambda: self.cni.invoke_loopback(cid, os.path.join(NETNS_DIR, netns), command="DEL",
                                                         cni_path=self.cni_path, **self.cache_kw))
            result = self._invoke("ADD", spec, cid, netns) or {}
            # ADD cleans up after itself when it fails; once it succeeded, undo is a DEL
            undo.append(lambda: self._invoke("DEL", spec, cid, netns))
            ips = [i.get("address") for i in result.get("ips") or [] if i.get("address")]
            if not ips:
                raise WorkloadError("the CNI result has no IP address: %s" % json.dumps(result))
            ip = ips[0].split("/")[0]
            if spec.get("ip") and ip != spec["ip"]:
                raise WorkloadError("CNI assigned %s, not the pinned %s" % (ip, spec["ip"]))
            undo.append(lambda: self.starter.stop(unit))
            self.starter.start(unit, netns, server_argv(spec, self.server),
                               description="kldload.netstack workload %s/%s" % (ns, name))
            rec = dict(spec, ip=ip, ips=ips, netns=netns, unit=unit, container_id=cid, spec_hash=spec_hash(spec),
                       pod_uid=pod_uid(ns, name), network=network_hash(self.conflist), created=int(time.time()))
            _write_record(self.state_dir, rec)
            return rec
        except Exception as e:
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # pylint: disable=broad-except  # best effort; the first error is reported
                    pass
            raise WorkloadError("creating workload %s/%s failed: %s" % (ns, name, _msg(e)))

    def delete(self, rec):
        """Process stopped, CNI DEL (loopback and the network), netns removed, record removed.
        A failing DEL keeps the record (the next run tries again) and raises WorkloadError."""
        ns, name = rec["namespace"], rec["name"]
        try:
            self.starter.stop(rec["unit"])
            self._invoke("DEL", rec, rec["container_id"], rec["netns"])
            try:
                self.cni.invoke_loopback(rec["container_id"], os.path.join(NETNS_DIR, rec["netns"]),
                                         command="DEL", cni_path=self.cni_path, **self.cache_kw)
            except Exception:  # pylint: disable=broad-except  # loopback DEL has nothing to release
                pass
            if os.path.exists(os.path.join(NETNS_DIR, rec["netns"])):
                self.ip(["ip", "netns", "delete", rec["netns"]])
        except Exception as e:
            raise WorkloadError("deleting workload %s/%s failed: %s" % (ns, name, _msg(e)))
        _remove_record(self.state_dir, rec)


def _msg(e):
    text = str(e)
    details = getattr(e, "details", None)
    return text if not details or details in text else "%s (%s)" % (text, details)


def sync(node, specs, prune=True, check=False, records=None, steps=None):
    """Make the node's workloads match ``specs`` (validated, this node's). Returns
    ``{changed, plan, endpoints, before, after}``; in check mode nothing is touched and the planned
    endpoints of created/recreated workloads have ``ip`` None (unless pinned). ``records`` and
    ``steps``: as ``read_records`` and ``plan`` gave them, when the caller has them already."""
    if records is None or steps is None:
        records = read_records(node.state_dir)
        steps = plan(specs, records, node.starter, prune=prune, netns_prefix=node.netns_prefix)
    want = dict(((s["namespace"], s["name"]), s) for s in specs)
    before = [endpoint(records[k]) for k in sorted(records)]
    changed = any(s["action"] != "keep" for s in steps)
    result = {}
    if not check:
        for s in steps:
            key = (s["namespace"], s["name"])
            if s["action"] in ("delete", "recreate"):
                node.delete(records[key])
            if s["action"] in ("create", "recreate"):
                result[key] = node.create(want[key])
    endpoints = []
    for s in steps:
        key = (s["namespace"], s["name"])
        if s["action"] == "delete":
            continue
        if key in result:
            endpoints.append(endpoint(result[key]))
        elif s["action"] == "keep":
            endpoints.append(endpoint(records[key]))
        else:   # check mode: planned
            endpoints.append(endpoint(want[key], ip=want[key].get("ip")))
    endpoints.sort(key=lambda e: (e["namespace"], e["name"]))
    return dict(changed=changed, plan=steps, endpoints=endpoints, before=before, after=endpoints)
