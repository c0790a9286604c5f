# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policy on one node: the policy state, the cluster view, and the one apply that writes the maps.

The policy state (``/etc/kldload-netstack/policy.json``, written by the ``network_policy`` module) is what
the last play said about the cluster::

    {"schema": 1, "node": "<this node's inventory name>",
     "policies": [policy documents as given: NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy],
     "cluster": {"namespaces": {name: labels}, "endpoints": [the pods of every node, as the play gathered them],
                 "kube_apiserver": [addresses]}}

``apply()`` is the one path that makes the maps match it - called by the module, by every dataplane apply
(runtime.py: so boot-time restore brings the maps back), and by the CNI plugin on ADD and DEL. The cluster
view it compiles (``cluster_view``) is the state's cluster with two things taken from this node itself, which
is authoritative about them: its own pods (the CNI plugin's endpoint records, so a pod made outside a play is
enforced here at once) and the nodes' addresses (the pod network of the dataplane configuration: each node's
underlay address, the network address its VXLAN device carries and the gateway its pods' host interfaces
carry). Other nodes' pods are known as of the last play. ``ClusterSource`` is the seam where a watch of the
Kubernetes API or a key-value store plugs in later: anything with ``cluster()`` giving the same shape.

The compiled output of the last apply (``/var/lib/kldload-netstack/policy/compiled.json``) keeps identities
stable on the node (``known``), names the rules the map values count (rule ids) and gives the next apply its
diff: which endpoints gain or lose which allowances. Applies are serialised by a lock file. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import socket

from ansible_collections.kldload.netstack.plugins.module_utils import units
from ansible_collections.kldload.netstack.plugins.module_utils.policy import compile as _compile
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps, parse
from ansible_collections.kldload.netstack.plugins.module_utils.policy.parse import PolicyError

STATE_PATH = os.environ.get("NETSTACK_POLICY_STATE") or "/etc/kldload-netstack/policy.json"
COMPILED_PATH = os.environ.get("NETSTACK_POLICY_COMPILED") or "/var/lib/kldload-netstack/policy/compiled.json"
LOCK_PATH = "/run/kldload-netstack-policy.lock"
SCHEMA = 1
OBJECT = "policy"
TUNNEL_OBJECT = "overlay"
_STATE_KEYS = ("schema", "node", "policies", "cluster")
_CLUSTER_KEYS = ("namespaces", "endpoints", "kube_apiserver")


def default_state():
    return {"schema": SCHEMA, "node": None, "policies": [],
            "cluster": {"namespaces": {}, "endpoints": [], "kube_apiserver": []}}


def validate_state(state, where="policy state"):
    """The state in canonical form; PolicyError naming the field (policies through parse.normalize)."""
    if not isinstance(state, dict):
        raise PolicyError("%s: must be a mapping" % where)
    bad = sorted(set(state) - set(_STATE_KEYS))
    if bad:
        raise PolicyError("%s: unknown field(s) %s" % (where, ", ".join(bad)))
    if state.get("schema", SCHEMA) != SCHEMA:
        raise PolicyError("%s.schema: %r is not a schema this release reads (%d)" % (where, state.get("schema"), SCHEMA))
    out = default_state()
    node = state.get("node")
    if node is not None and (not isinstance(node, str) or not node):
        raise PolicyError("%s.node: the node's name, got %r" % (where, node))
    out["node"] = node
    pols = state.get("policies") or []
    if not isinstance(pols, list):
        raise PolicyError("%s.policies: must be a list of policy documents" % where)
    # every error, before anything is touched; the compiler takes the parsed policies from the Documents
    out["policies"] = parse.validated(pols, where + ".policies")
    cl = state.get("cluster") or {}
    if not isinstance(cl, dict):
        raise PolicyError("%s.cluster: must be a mapping" % where)
    bad = sorted(set(cl) - set(_CLUSTER_KEYS))
    if bad:
        raise PolicyError("%s.cluster: unknown field(s) %s" % (where, ", ".join(bad)))
    for k in _CLUSTER_KEYS:
        if k in cl and cl[k] is not None:
            if not isinstance(cl[k], dict if k == "namespaces" else list):
                raise PolicyError("%s.cluster.%s: must be a %s" % (where, k, "mapping" if k == "namespaces" else "list"))
            out["cluster"][k] = cl[k]
    return out


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def read_state(path=STATE_PATH):
    """The node's policy state (validated), or the default (no policies) when there is none."""
    try:
        doc = _read_json(path)
    except ValueError as e:
        raise PolicyError("%s: not JSON: %s" % (path, e))
    return validate_state(doc, path) if doc is not None else default_state()


def state_text(state):
    return json.dumps(state, indent=1, sort_keys=True) + "\n"


def write_json(path, doc, mode=0o644):
    units.write(path, doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True), mode)


class ClusterSource:
    """Where a node learns the rest of the cluster: here, the state the last play wrote. A watch of the
    Kubernetes API or of a key-value store would implement ``cluster()`` the same way."""

    def __init__(self, state):
        self.state = state

    def cluster(self):
        return self.state["cluster"]


def node_addresses(pods, local_name):
    """[{name, ips}] of every node from the dataplane configuration's pod network: its underlay address,
    the network address of its pod CIDR (what its VXLAN device carries) and the first address (the gateway
    its pods' host interfaces carry, ptp's)."""
    if not pods:
        return []

    def ips(underlay, cidr):
        net = ipaddress.ip_network(u"%s" % cidr)
        return [underlay, str(net.network_address), str(net.network_address + 1)]
    out = [{"name": local_name, "ips": ips(pods["underlay_ip"], pods["cidr"])}]
    out += [{"name": n["name"], "ips": ips(n["underlay_ip"], n["pod_cidr"])} for n in pods.get("nodes") or []]
    return out


def record_endpoint(rec, node):
    """A CNI endpoint record as a cluster endpoint (namespace/name; the container id when it has no name)."""
    return {"namespace": rec.get("namespace") or "default", "name": rec.get("name") or (rec.get("container_id") or "")[:12],
            "node": node, "labels": rec.get("labels") or {}, "ips": rec.get("ips") or [],
            "ports": rec.get("ports") or []}


def local_name(state):
    return state.get("node") or socket.gethostname()


def cluster_view(state, records, pods, source=None):
    """The cluster to compile (see the module docstring): the source's, with this node's pods from its records
    and every node's addresses from the pod network."""
    me = local_name(state)
    cl = (source or ClusterSource(state)).cluster()
    mine = [record_endpoint(r, me) for r in records if r.get("state", "ready") == "ready"]
    keys = set("%s/%s" % (e["namespace"], e["name"]) for e in mine)
    addrs = set(ip.split("/", 1)[0] for e in mine for ip in e["ips"])
    others = [e for e in cl.get("endpoints") or [] if isinstance(e, dict) and e.get("node") != me
              and "%s/%s" % (e.get("namespace") or "default", e.get("name")) not in keys
              and not addrs & set(str(ip).split("/", 1)[0] for ip in e.get("ips") or [])]
    nodes = node_addresses(pods, me)
    node_ips = set(ip for n in nodes for ip in n["ips"])
    others = [e for e in others if not node_ips & set(str(ip).split("/", 1)[0] for ip in e.get("ips") or [])]
    return {"namespaces": cl.get("namespaces") or {}, "endpoints": others + mine, "nodes": nodes,
            "local_node": me, "kube_apiserver": cl.get("kube_apiserver") or []}


def read_compiled(path=COMPILED_PATH):
    return _read_compiled(path)[0]


def _read_compiled(path):
    """(the compiled output of the last apply or None, its file's text or None)."""
    try:
        with open(path) as f:
            text = f.read()
        doc = json.loads(text)
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT:
            return None, None
        raise
    except ValueError:
        return None, None
    return (doc, text) if isinstance(doc, dict) else (None, None)


def rule_ids(out):
    """{rule text: id} of every rule the node's entries name (1.., in sorted order)."""
    texts = sorted(set(e["rule"] for ep in out["endpoints"].values() for e in ep["entries"]))
    return dict((t, i + 1) for i, t in enumerate(texts))


def wanted_endpoints(out, records, rules):
    """{pod ip: maps.sync_endpoints() entry} of this node's endpoints whose host interface exists."""
    by_key = {}
    for r in records:
        if r.get("state", "ready") == "ready":
            e = record_endpoint(r, None)
            by_key["%s/%s" % (e["namespace"], e["name"])] = r
    want = {}
    for key, ep in sorted(out["endpoints"].items()):
        rec = by_key.get(key)
        if rec is None or not ep.get("ip"):
            continue
        try:
            ifindex = socket.if_nametoindex(rec.get("host_interface") or "")
        except (OSError, ValueError):
            continue
        flags = (maps.EP_INGRESS if ep["ingress_enforced"] else 0) | (maps.EP_EGRESS if ep["egress_enforced"] else 0)
        want[ep["ip"]] = {"ifindex": ifindex, "identity": ep["identity"], "flags": flags,
                          "keys": maps.endpoint_keys(ep["ip"], ep["entries"], rules)}
    return want


@contextlib.contextmanager
def _locked(path=LOCK_PATH):
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, 0o755)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def tunnel_nodes(pods):
    """The other nodes' pod CIDRs for kln_tunnel4: [{pod_cidr, underlay_ip, vni}] (vni 0: the node reads
    identities from the VNI; else the fixed VNI its release expects)."""
    out = []
    for n in (pods or {}).get("nodes") or []:
        out.append({"pod_cidr": n["pod_cidr"], "underlay_ip": n["underlay_ip"],
                    "vni": 0 if n.get("tunnel_identity", True) else pods["vxlan"]["vni"]})
    return out


def apply(globals_dir, state, records, pods, check=False, compiled_path=COMPILED_PATH, tunnel=False, lock=True):
    """Make the node's identity and policy maps match ``state`` (validate_state()d) and the endpoint
    ``records`` (cni.list_endpoints()); ``pods``: the dataplane configuration's pod network; ``tunnel``:
    also kln_tunnel4 (the overlay object is loaded). Returns {changed, changes [map changes as text],
    diff [which endpoints gain or lose what], identities (count), endpoints (count), output (the compiled
    output)}. PolicyError before anything is touched when the input is at fault."""
    with (_locked() if lock and not check else _nolock()):
        cluster = cluster_view(state, records, pods)
        previous, previous_text = _read_compiled(compiled_path)
        known = (previous or {}).get("identities") or {}
        out = _compile.compile_node(state["policies"], cluster, known=known)
        rules = rule_ids(out)
        want = wanted_endpoints(out, records, rules)
        changes = maps.sync_prefixes(globals_dir, maps.IPCACHE, maps.prefix_entries(out["ipcache"]), check)
        changes += maps.sync_prefixes(globals_dir, maps.CIDRS, maps.prefix_entries(out["cidrs"]), check)
        if tunnel:
            changes += maps.sync_prefixes(globals_dir, maps.TUNNEL, maps.tunnel_entries(tunnel_nodes(pods)), check)
        changes += maps.sync_endpoints(globals_dir, want, check)
        diff = _compile.diff(_comparable(previous), out)
        # as JSON has it (string keys), so that an unchanged output is the file's text again
        text = json.dumps(dict(out, rules=dict((str(i), t) for t, i in rules.items()),
                               identities=dict((str(k), v) for k, v in out["identities"].items())), sort_keys=True)
        if not check and (changes or text != previous_text):
            write_json(compiled_path, text)
    return {"changed": bool(changes), "changes": changes, "diff": diff, "identities": len(out["identities"]),
            "endpoints": len(want), "output": out}


@contextlib.contextmanager
def _nolock():
    yield


def _comparable(previous):
    """The previous compiled output with its identity keys back as ints (JSON made them strings)."""
    if not previous:
        return None
    out = dict(previous)
    out["identities"] = dict((int(k), v) for k, v in (previous.get("identities") or {}).items())
    return out


def remove(compiled_path=COMPILED_PATH, state_path=STATE_PATH, check=False):
    """The policy files off the node (the maps go with the objects); the paths removed."""
    gone = [p for p in (state_path, compiled_path) if p and os.path.exists(p)]
    if not check:
        for p in gone:
            os.unlink(p)
    return gone


# ---- what the node command shows ------------------------------------------------------------------

def identity_rows(compiled_path=COMPILED_PATH):
    """[{identity, kind, labels}] of the node's identities (the last apply's), sorted by number: what
    ``netstack identity list`` prints (like ``cilium identity list``)."""
    out = read_compiled(compiled_path) or {}
    rows = [{"identity": int(k), "kind": v.get("kind"), "labels": v.get("labels") or []}
            for k, v in (out.get("identities") or {}).items()]
    return sorted(rows, key=lambda r: r["identity"])


def format_identities(rows):
    lines = ["%-10s %-9s %s" % ("ID", "KIND", "LABELS")]
    for r in rows:
        labels = r["labels"] or ["-"]
        lines.append("%-10d %-9s %s" % (r["identity"], r["kind"], labels[0]))
        lines += ["%-10s %-9s %s" % ("", "", lbl) for lbl in labels[1:]]
    return "\n".join(lines)


def endpoint_policy(globals_dir, which, records, compiled_path=COMPILED_PATH):
    """What the maps hold for one pod of this node - ``which`` is namespace/name, a container id (prefix) or
    an address: {endpoint, ip, identity, ingress_enforced, egress_enforced, entries [...], counters [...]}
    (``netstack policy get``, like ``cilium bpf policy get``); None when no pod of this node matches."""
    rec = None
    for r in records:
        e = record_endpoint(r, None)
        ips = [str(ip).split("/", 1)[0] for ip in e["ips"]]
        if which in ("%s/%s" % (e["namespace"], e["name"]), e["name"]) or which in ips \
                or (len(which) >= 6 and (r.get("container_id") or "").startswith(which)):
            rec = r
            break
    if rec is None:
        return None
    e = record_endpoint(rec, None)
    ip = [str(a).split("/", 1)[0] for a in e["ips"] if ":" not in str(a)][0]
    st = maps.endpoints(globals_dir).get(ip)
    compiled = read_compiled(compiled_path) or {}
    rules = compiled.get("rules") or {}
    idents = dict((int(k), v) for k, v in (compiled.get("identities") or {}).items())
    out = {"endpoint": "%s/%s" % (e["namespace"], e["name"]), "ip": ip, "container_id": rec.get("container_id"),
           "in_maps": st is not None, "identity": st["identity"] if st else None,
           "ingress_enforced": bool(st and st["ingress_enforced"]), "egress_enforced": bool(st and st["egress_enforced"]),
           "entries": [], "counters": []}
    if st:
        for _ip, ident, egress, var, _gen, deny, rule in maps.policy_entries(globals_dir, ip, bool(st["generation"])):
            peer = ident & ~maps.BY_ADDRESS
            out["entries"].append({
                "direction": "egress" if egress else "ingress", "action": "deny" if deny else "allow",
                "identity": peer, "by_address": bool(ident & maps.BY_ADDRESS),
                "peer": _compile.describe_identity(peer, idents), "l4": maps.l4_text(var),
                "rule": rules.get(str(rule), "") if rule else ""})
    for (sip, reason, direction), (packets, nbytes) in sorted(maps.stats(globals_dir).items()):
        if sip == ip:
            out["counters"].append({"direction": maps.DIRECTIONS.get(direction, str(direction)),
                                    "reason": maps.REASONS.get(reason, str(reason)), "code": reason,
                                    "description": maps.REASON_TEXT.get(reason, ""), "packets": packets, "bytes": nbytes})
    return out


def format_endpoint_policy(p):
    lines = ["endpoint %s  %s  identity %s  ingress %s  egress %s" % (
        p["endpoint"], p["ip"], p["identity"], "enforced" if p["ingress_enforced"] else "not enforced",
        "enforced" if p["egress_enforced"] else "not enforced")]
    if not p["in_maps"]:
        lines.append("  not in the policy maps (is the policy object loaded?)")
    lines.append("%-8s %-6s %-10s %-14s %-40s %s" % ("DIR", "ACTION", "IDENTITY", "PORT/PROTO", "PEER", "RULE"))
    for e in p["entries"]:
        lines.append("%-8s %-6s %-10s %-14s %-40s %s" % (
            e["direction"], e["action"], ("%d*" if e["by_address"] else "%d") % e["identity"], e["l4"],
            (e["peer"] + (" (by address)" if e["by_address"] else ""))[:40], e["rule"]))
    if not p["entries"]:
        lines.append("  (no entries: %s)" % ("what is not enforced passes" if not (p["ingress_enforced"] or p["egress_enforced"])
                                             else "default deny where enforced"))
    lines.append("%-8s %-18s %12s %14s" % ("DIR", "VERDICT", "PACKETS", "BYTES"))
    for c in p["counters"]:
        lines.append("%-8s %-18s %12d %14d" % (c["direction"], c["reason"], c["packets"], c["bytes"]))
    return "\n".join(lines)
