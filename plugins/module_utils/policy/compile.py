# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policies + the cluster's endpoints -> per-endpoint allow/deny entries keyed by security identity.

``compile_node(policies, cluster, node=None, known=None)`` -> the output for one node (default
``cluster["local_node"]``); ``compile_all(policies, cluster, known=None)`` -> ``{node: output}`` for
every node (one selector cache for all); ``diff(old, new)`` -> text lines. ``policies``: what
``parse.normalize`` returned, ``parse.Documents`` (``node.validate_state``'s: parsed once), or policy
documents (normalized here). ``known``: an existing ``{id: labels}`` table (e.g. the last output's
``identities``) whose endpoint identities are kept.

Input ``cluster``::

    {"namespaces": {name: {labels} | {"labels": {labels}}},       # a namespace not listed has no labels
     "endpoints": [{"namespace", "name", "node", "labels": {..}, "ips": ["10.244.1.5/24" | "10.244.1.5"],
                    "ports": [{"name", "port", "protocol"}]}],    # protocol TCP (default), UDP, SCTP
     "nodes": [{"name", "ips": [..]}], "local_node": name,
     "kube_apiserver": [ip, ...]}                                  # optional: the API server's addresses

Output (JSON-serialisable; ids are ints)::

    {"node": name,
     "identities": {id: {"labels": [...], "kind": "reserved" | "endpoint" | "cidr", "cidr": "a.b.c.d/n"}},
     "ipcache": [[prefix, id], ...],     # every endpoint IPv4 address /32 -> its identity, every node
                                         # address /32 -> 1 (host) on this node, 6 (remote-node) else;
                                         # every kube_apiserver address /32 -> 7; sorted by address
     "cidrs": [[prefix, id], ...],       # the prefixes policies name -> CIDR identity (2**24 + i)
     "endpoints": {"<namespace>/<name>": {          # the endpoints on this node
         "ip": first IPv4 address, "identity": id, "node": name,
         "ingress_enforced": bool, "egress_enforced": bool,   # default deny in that direction
         "entries": [{"direction": "ingress" | "egress",
                      "identity": id (0 = any peer), "by_address": bool,
                      "protocol": 0 | 6 | 17 | 132 (0 = any protocol),
                      "port": 0..65535 (0 = any port), "end_port": >= port (0 when port is 0),
                      "deny": bool, "rule": "<kind> <ns>/<name> <ingress|egress|ingressDeny|egressDeny>[i]"}]}}}

Entries (sorted, distinct). The dataplane's lookup for a packet of an endpoint, in the direction
of the entry, with peer address A: the peer identity P (ipcache /32, else the longest ``cidrs``
prefix holding A, else 2 world); the CIDR identity C of A (the longest ``cidrs`` prefix holding A,
else 2). Entries that match are those with protocol 0 or the packet's, port 0 or
port <= packet port <= end_port, and (identity P, not by_address) or (identity C, by_address) or
(identity 0). Any matching deny entry denies (deny wins over allow whatever the port specificity:
an allow on port 80 must not shadow a deny of all ports); else any matching allow entry allows;
else the packet is allowed only when the direction is not enforced. A packet from the node's own
host (identity 1) to a local endpoint is always allowed (Cilium's allow-localhost); a pod's traffic
to itself never reaches the dataplane (loopback).

Selector expansion (the selector cache: one identity set per distinct selector): a label selector
selects the endpoint, reserved and CIDR identities whose labels match (namespace rules are applied by
parse; a CIDR identity carries ``reserved:world`` too, as in Cilium); entity ``all`` = {0}; ``world`` = {2} + every CIDR identity; ``cluster`` = host,
remote-node, unmanaged, init, health, kube-apiserver, ingress and every endpoint identity; the
other entities their reserved identity; ``none`` = {}. A CIDR peer (cidr minus excepts) selects
the CIDR identities whose prefix lies inside the cidr and not inside an except, plus world when the
cidr is 0.0.0.0/0; a NetworkPolicy ipBlock is the same set with by_address (matched against the
peer's address, pods too); a Cilium CIDR rule is not by_address, so it never selects pods or nodes
(their identity comes from the ipcache).

Ports: numbers and ranges as given; protocol ANY is TCP, UDP and SCTP; no ports = protocol 0 port 0.
Named ports: on ingress the endpoint's own port of that name (and protocol); on egress, per peer
identity, the numbers the selected peers' endpoints give that name (an identity's ports are the
union over its endpoints); for an ipBlock peer the endpoints whose address is in the block (their
identities, not by_address). A name that resolves to nothing gives no entry.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import bisect
import ipaddress
import operator

from ansible_collections.kldload.netstack.plugins.module_utils import labels as _labels
from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as _id
from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse as _parse
from ansible_collections.kldload.netstack.plugins.module_utils.policy.parse import PolicyError

_PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
_PROTO_NAMES = {0: "any protocol", 6: "TCP", 17: "UDP", 132: "SCTP"}
_CLUSTER_RESERVED = (_id.HOST, _id.REMOTE_NODE, _id.UNMANAGED, _id.INIT, _id.HEALTH, _id.KUBE_APISERVER, _id.INGRESS)
_ENTITY_RESERVED = {"host": _id.HOST, "remote-node": _id.REMOTE_NODE, "unmanaged": _id.UNMANAGED, "init": _id.INIT,
                    "health": _id.HEALTH, "kube-apiserver": _id.KUBE_APISERVER, "ingress": _id.INGRESS}
_ENTRY_KEYS = ("direction", "identity", "by_address", "protocol", "port", "end_port", "deny", "rule")


# ---------------------------------------------------------------------------------------------
# the cluster


def _ipv4(text):
    """The IPv4Address of "a.b.c.d" or "a.b.c.d/n"; None for IPv6; ValueError when not an address."""
    addr = ipaddress.ip_interface(text).ip
    return addr if addr.version == 4 else None


def prepare_cluster(cluster):
    """The cluster input validated: {"namespaces": {name: labels}, "endpoints": [...], "nodes": {name: [ips]},
    "local_node"}; endpoints as {key, namespace, name, node, labels, ips: [IPv4 text], ports: [(name, port,
    proto number)]} sorted by key. PolicyError naming every problem (``cluster.endpoints[2].ips[0]: ...``)."""
    errs = []
    if not isinstance(cluster, dict):
        raise PolicyError("cluster: must be a mapping with namespaces, endpoints, nodes, local_node")
    nss = {}
    raw_ns = cluster.get("namespaces") or {}
    if not isinstance(raw_ns, dict):
        errs.append("cluster.namespaces: must be a mapping of namespace name to labels")
        raw_ns = {}
    for name, v in raw_ns.items():
        lbl = v.get("labels") if isinstance(v, dict) and isinstance(v.get("labels"), dict) else v
        try:
            nss[name] = _labels.namespace_labels(name, _labels.validate_labels(lbl, "cluster.namespaces.%s" % name))
        except ValueError as e:
            errs.append(str(e))
    seen_ips = {}
    nodes = {}
    raw_nodes = cluster.get("nodes") or []
    if not isinstance(raw_nodes, list):
        errs.append("cluster.nodes: must be a list of {name, ips}")
        raw_nodes = []
    for i, n in enumerate(raw_nodes):
        w = "cluster.nodes[%d]" % i
        if not isinstance(n, dict) or not isinstance(n.get("name"), str) or not n.get("name"):
            errs.append("%s: must be a mapping with name and ips" % w)
            continue
        ips = []
        for j, ip in enumerate(n.get("ips") or []):
            try:
                a = _ipv4(ip)
            except ValueError:
                errs.append("%s.ips[%d]: %r is not an IP address" % (w, j, ip))
                continue
            if a is not None:
                if str(a) in seen_ips:
                    errs.append("%s.ips[%d]: %s is also %s" % (w, j, a, seen_ips[str(a)]))
                seen_ips[str(a)] = "node %s" % n["name"]
                ips.append(str(a))
        nodes.setdefault(n["name"], []).extend(ips)
    eps, keys = [], set()
    raw_eps = cluster.get("endpoints") or []
    if not isinstance(raw_eps, list):
        errs.append("cluster.endpoints: must be a list of endpoints")
        raw_eps = []
    for i, e in enumerate(raw_eps):
        w = "cluster.endpoints[%d]" % i
        if not isinstance(e, dict):
            errs.append("%s: must be a mapping (namespace, name, node, labels, ips, ports)" % w)
            continue
        ns, name = e.get("namespace") or _parse.DEFAULT_NAMESPACE, e.get("name")
        if not isinstance(ns, str) or not isinstance(name, str) or not name:
            errs.append("%s: namespace and name are required strings" % w)
            continue
        key = "%s/%s" % (ns, name)
        w = "%s (%s)" % (w, key)
        if key in keys:
            errs.append("%s: listed twice" % w)
            continue
        keys.add(key)
        try:
            lbl = _labels.validate_labels(e.get("labels"), w + ".labels")
        except ValueError as ex:
            errs.append(str(ex))
            lbl = {}
        ips = []
        for j, ip in enumerate(e.get("ips") or []):
            try:
                a = _ipv4(ip)
            except (ValueError, TypeError):
                errs.append("%s.ips[%d]: %r is not an IP address" % (w, j, ip))
                continue
            if a is None:
                continue            # IPv6: the dataplane is IPv4 only
            if str(a) in seen_ips:
                errs.append("%s.ips[%d]: %s is also %s" % (w, j, a, seen_ips[str(a)]))
            seen_ips[str(a)] = key
            ips.append(str(a))
        ports = []
        for j, p in enumerate(e.get("ports") or []):
            pw = "%s.ports[%d]" % (w, j)
            if not isinstance(p, dict):
                errs.append("%s: must be a mapping {name, port, protocol}" % pw)
                continue
            num, proto, pname = p.get("port"), p.get("protocol") or "TCP", p.get("name") or ""
            if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 65535:
                errs.append("%s.port: %r must be a number from 1 to 65535" % (pw, num))
                continue
            if proto not in _PROTO_NUMBERS:
                errs.append("%s.protocol: %r is not TCP, UDP or SCTP" % (pw, proto))
                continue
            if pname and _parse.iana_name_error(pname):
                errs.append("%s.name: %r is not a port name: %s" % (pw, pname, _parse.iana_name_error(pname)))
                continue
            ports.append((pname, num, _PROTO_NUMBERS[proto]))
        node = e.get("node") or ""
        eps.append({"key": key, "namespace": ns, "name": name, "node": node, "labels": lbl, "ips": ips,
                    "ports": tuple(sorted(set(ports)))})
    apiserver = []
    raw_api = cluster.get("kube_apiserver") or []
    if not isinstance(raw_api, list):
        errs.append("cluster.kube_apiserver: must be a list of the API server's addresses")
        raw_api = []
    for j, ip in enumerate(raw_api):
        try:
            a = _ipv4(ip)
        except (ValueError, TypeError):
            errs.append("cluster.kube_apiserver[%d]: %r is not an IP address" % (j, ip))
            continue
        if a is None:
            continue
        if str(a) in seen_ips:
            errs.append("cluster.kube_apiserver[%d]: %s is %s: an API server on a node or pod address is not "
                        "supported yet (its identity would be the node's)" % (j, a, seen_ips[str(a)]))
            continue
        seen_ips[str(a)] = "the API server"
        apiserver.append(str(a))
    if errs:
        raise PolicyError(errs)
    eps.sort(key=lambda x: x["key"])
    for e in eps:
        if e["node"]:
            nodes.setdefault(e["node"], [])
    return {"namespaces": nss, "endpoints": eps, "nodes": nodes, "kube_apiserver": apiserver,
            "local_node": cluster.get("local_node")}


def _as_policies(policies):
    parsed = getattr(policies, "policies", None)     # parse.Documents: validated already
    if parsed is not None:
        return parsed
    policies = policies or []
    if all(isinstance(p, dict) and "specs" in p and "label" in p for p in policies):
        return policies
    return _parse.normalize(policies)


# ---------------------------------------------------------------------------------------------
# the model shared by every node: identities, CIDR identities, the selector cache


def _split_label(text):
    src, _sep, rest = text.partition(":")
    key, _sep, value = rest.partition("=")
    return src, key, value


def _matches(reqs, lab):
    """``lab``: {"k8s": {key: value}, "reserved": {key: value}}."""
    for src, key, op, values in reqs:
        if src == "any":
            if key in lab["k8s"]:
                present, v = True, lab["k8s"][key]
            else:
                present, v = key in lab["reserved"], lab["reserved"].get(key)
        else:
            d = lab.get(src) or {}
            present, v = key in d, d.get(key)
        if op == "In":
            ok = present and v in values
        elif op == "NotIn":
            ok = not present or v not in values
        elif op == "Exists":
            ok = present
        else:
            ok = not present
        if not ok:
            return False
    return True


def _inside(net, outer):
    return net.prefixlen >= outer.prefixlen and net.network_address in outer


class _Model(object):
    def __init__(self, policies, cluster, known=None):
        self.policies = _as_policies(policies)
        self.cluster = prepare_cluster(cluster)
        nss = self.cluster["namespaces"]
        eps = self.cluster["endpoints"]
        sets = {}
        for e in eps:
            e["label_set"] = _id.endpoint_labels(e["namespace"], e["labels"], nss.get(e["namespace"]))
            sets[_id.canonical(e["label_set"])] = e["label_set"]
        table = _id.allocate(list(sets.values()), known)
        by_text = dict((_id.canonical(v), k) for k, v in table.items())
        self.identities = {}
        self.labels = {}
        for r in sorted(_id.RESERVED):
            self.identities[r] = {"labels": _id.reserved_labels(r), "kind": "reserved"}
            if r != _id.UNKNOWN:
                self.labels[r] = {"k8s": {}, "reserved": {_id.RESERVED[r]: ""}}
        self.endpoint_ids = set()
        self.id_ports = {}
        for e in eps:
            ident = by_text[_id.canonical(e["label_set"])]
            e["identity"] = ident
            self.endpoint_ids.add(ident)
            self.id_ports.setdefault(ident, set()).update(e["ports"])
            if ident not in self.identities:
                self.identities[ident] = {"labels": list(e["label_set"]), "kind": "endpoint"}
                lab = {"k8s": {}, "reserved": {}}
                for text in e["label_set"]:
                    src, key, value = _split_label(text)
                    lab.setdefault(src, {})[key] = value
                self.labels[ident] = lab
        prefixes = set()
        for pol in self.policies:
            for spec in pol["specs"]:
                for rule in spec["rules"]:
                    for peer in rule["peers"] or ():
                        if "cidr" in peer:
                            prefixes.add(peer["cidr"])
                            prefixes.update(peer["except"])
        self.cidrs = _id.cidr_identities(sorted(prefixes))
        self.cidr_nets = [(_id.network(p), i) for p, i in self.cidrs]
        # ordered by network address: the CIDR identities inside a CIDR are one slice (bisect), not a walk of all
        self.cidr_nets.sort(key=lambda ni: (int(ni[0].network_address), ni[0].prefixlen))
        self._cidr_starts = [int(n.network_address) for n, _i in self.cidr_nets]
        for p, i in self.cidrs:
            # as in Cilium, a CIDR identity also carries reserved:world (reserved:world selectors select it)
            self.identities[i] = {"labels": ["cidr:%s" % p, "reserved:world"], "kind": "cidr", "cidr": p}
            self.labels[i] = {"k8s": {}, "reserved": {"world": ""}, "cidr": {p: ""}}
        self._sel_cache = {}
        self._peer_cache = {}
        self._rule_cache = {}
        self._entities = {
            "all": frozenset([_id.ANY]),
            "none": frozenset(),
            "world": frozenset([_id.WORLD] + [i for _p, i in self.cidrs]),
            "cluster": frozenset(list(_CLUSTER_RESERVED) + sorted(self.endpoint_ids)),
        }
        for name, r in _ENTITY_RESERVED.items():
            self._entities[name] = frozenset([r])
        self.specs = []
        for pol in self.policies:
            for spec in pol["specs"]:
                subj = frozenset(i for i in self.select(spec["subject"]) if i in self.endpoint_ids)
                self.specs.append((spec, subj))
        self._specs_by_id = {}

    # selector cache
    def select(self, reqs):
        got = self._sel_cache.get(reqs)
        if got is None:
            got = frozenset(i for i, lab in self.labels.items() if _matches(reqs, lab))
            self._sel_cache[reqs] = got
        return got

    def _cidr_set(self, cidr, excepts):
        net = _id.network(cidr)
        exs = [_id.network(e) for e in excepts]
        lo = bisect.bisect_left(self._cidr_starts, int(net.network_address))
        hi = bisect.bisect_right(self._cidr_starts, int(net.broadcast_address))
        out = set(i for n, i in self.cidr_nets[lo:hi]
                  if n.prefixlen >= net.prefixlen and not any(_inside(n, x) for x in exs))
        if net.prefixlen == 0:
            out.add(_id.WORLD)
        return frozenset(out)

    def peer_ids(self, peer):
        """(identity set, by_address) a peer selects."""
        if "selector" in peer:
            return self.select(peer["selector"]), False
        if "entity" in peer:
            return self._entities[peer["entity"]], False
        key = (peer["cidr"], tuple(peer["except"]))
        got = self._peer_cache.get(key)
        if got is None:
            got = self._peer_cache[key] = self._cidr_set(peer["cidr"], peer["except"])
        return got, bool(peer["by_address"])

    def _named_targets(self, peer):
        """Endpoint identities an egress named port resolves on, for one peer (None = any peer)."""
        if peer is None:
            return self.endpoint_ids
        if "cidr" in peer:
            if not peer["by_address"]:
                return ()
            net = _id.network(peer["cidr"])
            exs = [_id.network(e) for e in peer["except"]]
            out = set()
            for e in self.cluster["endpoints"]:
                for ip in e["ips"]:
                    a = ipaddress.IPv4Address(ip)
                    if a in net and not any(a in x for x in exs):
                        out.add(e["identity"])
            return out
        ids, _ba = self.peer_ids(peer)
        if _id.ANY in ids:
            return self.endpoint_ids
        return [i for i in ids if i in self.endpoint_ids]

    def rule_template(self, rule):
        """(static entry tuples, ingress named ports [(id pairs, port)]) of a rule, cached."""
        key = id(rule)
        got = self._rule_cache.get(key)
        if got is not None:
            return got[1], got[2]
        d, deny, name = rule["direction"], rule["deny"], rule["name"]
        if rule["peers"] is None:
            pairs = set([(_id.ANY, False)])
        else:
            pairs = set()
            for peer in rule["peers"]:
                ids, ba = self.peer_ids(peer)
                pairs.update((i, ba) for i in ids)
        static, named = [], []
        if rule["ports"] is None:
            static = [(d, i, ba, 0, 0, 0, deny, name) for i, ba in pairs]
        else:
            for p in rule["ports"]:
                if "name" not in p:
                    static.extend((d, i, ba, p["protocol"], p["port"], p["end_port"], deny, name) for i, ba in pairs)
                elif d == "ingress":
                    named.append((pairs, p))
                else:
                    for peer in (rule["peers"] if rule["peers"] is not None else [None]):
                        for t in self._named_targets(peer):
                            for pname, num, proto in self.id_ports.get(t, ()):
                                if pname == p["name"] and p["protocol"] in (0, proto):
                                    static.append((d, t, False, proto, num, num, deny, name))
        self._rule_cache[key] = (rule, static, named)
        return static, named

    def specs_for(self, ident):
        got = self._specs_by_id.get(ident)
        if got is None:
            got = self._specs_by_id[ident] = [spec for spec, subj in self.specs if ident in subj]
        return got

    def endpoint_state(self, e):
        ingress = egress = False
        entries = set()
        for spec in self.specs_for(e["identity"]):
            ingress = ingress or spec["ingress_isolation"]
            egress = egress or spec["egress_isolation"]
            for rule in spec["rules"]:
                static, named = self.rule_template(rule)
                entries.update(static)
                for pairs, p in named:
                    for pname, num, proto in e["ports"]:
                        if pname == p["name"] and p["protocol"] in (0, proto):
                            entries.update((rule["direction"], i, ba, proto, num, num, rule["deny"], rule["name"])
                                           for i, ba in pairs)
        return {"ip": e["ips"][0] if e["ips"] else None, "identity": e["identity"], "node": e["node"],
                "ingress_enforced": ingress, "egress_enforced": egress,
                "entries": [dict(zip(_ENTRY_KEYS, t)) for t in sorted(entries)]}

    def output(self, node):
        if node is None:
            raise PolicyError("cluster.local_node: required (the node to compile for)")
        ipcache = []
        for e in self.cluster["endpoints"]:
            for ip in e["ips"]:
                ipcache.append((ipaddress.IPv4Address(ip), e["identity"]))
        for n, ips in self.cluster["nodes"].items():
            for ip in ips:
                ipcache.append((ipaddress.IPv4Address(ip), _id.HOST if n == node else _id.REMOTE_NODE))
        for ip in self.cluster["kube_apiserver"]:
            ipcache.append((ipaddress.IPv4Address(ip), _id.KUBE_APISERVER))
        ipcache.sort()
        return {
            "node": node,
            "identities": dict((k, dict(v)) for k, v in self.identities.items()),
            "ipcache": [["%s/32" % a, i] for a, i in ipcache],
            "cidrs": [[p, i] for p, i in self.cidrs],
            "endpoints": dict((e["key"], self.endpoint_state(e)) for e in self.cluster["endpoints"]
                              if e["node"] == node),
        }


def compile_node(policies, cluster, node=None, known=None):
    """The output (module docstring) for ``node`` (default ``cluster["local_node"]``)."""
    model = _Model(policies, cluster, known)
    return model.output(node if node is not None else model.cluster["local_node"])


def compile_all(policies, cluster, known=None):
    """``{node: output}`` for every node of the cluster (its nodes and the nodes its endpoints name)."""
    model = _Model(policies, cluster, known)
    return dict((n, model.output(n)) for n in sorted(model.cluster["nodes"]))


# ---------------------------------------------------------------------------------------------
# diff


def describe_identity(ident, identities):
    """Short text for an identity: ``any``, ``reserved:world``, ``cidr:10.0.0.0/8`` or its labels
    (pod labels first, then the namespace; at most three, then ``...``)."""
    if ident == _id.ANY:
        return "any"
    info = (identities or {}).get(ident) or (identities or {}).get(str(ident))
    if not info:
        return "unknown identity"
    lbls = list(info.get("labels") or [])
    if info.get("kind") != "endpoint":
        return ",".join(lbls)
    ns_prefix = "k8s:" + _id.NAMESPACE_LABELS_PREFIX
    pod_ns = "k8s:%s=" % _id.POD_NAMESPACE_LABEL
    own = [x for x in lbls if not x.startswith(ns_prefix) and not x.startswith(pod_ns)]
    shown = own + [x for x in lbls if x.startswith(pod_ns)]
    text = ",".join(shown[:3])
    return text + (",..." if len(lbls) > 3 else "")


def _ports_text(e):
    if e["protocol"] == 0:
        return "any protocol"
    proto = _PROTO_NAMES.get(e["protocol"], str(e["protocol"]))
    if e["port"] == 0:
        return "%s/any" % proto
    if e["end_port"] != e["port"]:
        return "%s/%d-%d" % (proto, e["port"], e["end_port"])
    return "%s/%d" % (proto, e["port"])


def describe_entry(e, identities):
    peer = "from" if e["direction"] == "ingress" else "to"
    what = "deny" if e["deny"] else "allow"
    addr = ", by address" if e["by_address"] else ""
    return "%s %s identity %s (%s%s) %s (%s)" % (what, peer, e["identity"], describe_identity(e["identity"], identities),
                                                 addr, _ports_text(e), e["rule"])


_entry_key = operator.itemgetter(*_ENTRY_KEYS)


def diff(old, new):
    """Text lines: which endpoints gain or lose which allowances/denials (``+``/``-``), enforcement
    changes, endpoints added or removed, identity changes. ``old``/``new``: compile outputs (None or
    {} for nothing)."""
    old, new = old or {}, new or {}
    oe, ne = old.get("endpoints") or {}, new.get("endpoints") or {}
    oid, nid = old.get("identities") or {}, new.get("identities") or {}
    lines = []
    for key in sorted(set(oe) | set(ne)):
        o, n = oe.get(key), ne.get(key)
        if n is None:
            lines.append("%s: endpoint removed (identity %s)" % (key, o.get("identity")))
            continue
        if o is None:
            lines.append("%s: new endpoint, identity %s (%s)" % (key, n["identity"], describe_identity(n["identity"], nid)))
            o = {}
        elif o.get("identity") != n.get("identity"):
            lines.append("%s: identity %s -> %s" % (key, o.get("identity"), n["identity"]))
        for d in ("ingress", "egress"):
            was, now = bool(o.get(d + "_enforced")), bool(n.get(d + "_enforced"))
            if now and not was:
                lines.append("%s: %s now isolated (default deny)" % (key, d))
            elif was and not now:
                lines.append("%s: %s no longer isolated (default allow)" % (key, d))
        if (o.get("entries") or []) == (n.get("entries") or []):
            continue
        old_entries = dict((_entry_key(e), e) for e in o.get("entries") or [])
        new_entries = dict((_entry_key(e), e) for e in n.get("entries") or [])
        for k in sorted(set(old_entries) | set(new_entries)):
            if k in old_entries and k not in new_entries:
                e = old_entries[k]
                lines.append("%s: %s - %s" % (key, e["direction"], describe_entry(e, oid)))
            elif k in new_entries and k not in old_entries:
                e = new_entries[k]
                lines.append("%s: %s + %s" % (key, e["direction"], describe_entry(e, nid)))
    return lines
