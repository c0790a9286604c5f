# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reference evaluation of policies, for tests: is a connection allowed?

``decide(policies, cluster, src, dst, protocol, port)`` -> ``(allowed, reason)`` is written straight
from the Kubernetes and Cilium semantics on the policy documents themselves (selectors, namespaces,
ipBlock, CIDR rules, entities, named ports, deny rules, default deny), independent of
``compile.py`` (``parse.normalize`` only validates the input). ``Evaluator(policies, cluster)`` does
the same for many connections. ``src``/``dst``: an endpoint ``"<namespace>/<name>"`` or an IPv4
address (an endpoint's, a node's, one of ``cluster["kube_apiserver"]``, or anything else: world). ``protocol``: TCP, UDP, SCTP (or 6,
17, 132).

A connection is allowed when the source endpoint's egress allows it (a source that is not an
endpoint has no egress policy) and the destination endpoint's ingress allows it. In one direction:
any matching deny rule denies; else any matching allow rule allows; else it is allowed only when no
policy isolates the endpoint in that direction. Two dataplane facts hold in both evaluators: a
pod's traffic to itself never leaves it (loopback, always allowed), and traffic from a node's own
host to a pod on it is always allowed (Cilium's allow-localhost).

``CompiledNetwork(compile.compile_all(...))`` applies compiled entries the way the dataplane will
(see compile.py: the peer's identity from the ipcache, else the CIDR map; the CIDR identity of the
peer address for by_address entries; identity 0; deny wins; enforcement), and ``lookup(output,
endpoint, direction, peer_ip, protocol, port)`` does it for one endpoint of one node's output.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible_collections.kldload.netstack.plugins.module_utils import labels as _labels
from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse as _parse

_PROTOCOLS = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP", 6: "TCP", 17: "UDP", 132: "SCTP"}
_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
POD_NS = "io.kubernetes.pod.namespace"
NS_PREFIX = "io.cilium.k8s.namespace.labels."
HOST_TO_LOCAL_POD = "from its own node's host: always allowed (allow-localhost)"
LOOPBACK = "loopback: a pod's traffic to itself never leaves it"


def _protocol(protocol):
    try:
        return _PROTOCOLS[protocol.upper() if isinstance(protocol, str) else protocol]
    except KeyError:
        raise ValueError("protocol %r: TCP, UDP or SCTP" % (protocol,))


def _addr(text):
    return ipaddress.ip_interface(text).ip


def _net(text):
    if "/" not in text:
        text += "/32"
    return ipaddress.ip_network(text, strict=False)


class _Peer(object):
    """A packet's other end: kind "endpoint" (ep), "node" (node name), "kube-apiserver" or "world"; ip."""

    def __init__(self, kind, ip, ep=None, node=None):
        self.kind, self.ip, self.ep, self.node = kind, ip, ep, node


class Evaluator(object):
    """The reference semantics over policy documents (see the module docstring)."""

    def __init__(self, policies, cluster):
        if all(isinstance(p, dict) and "doc" in p and "specs" in p for p in policies or []):
            self.docs = [p["doc"] for p in policies]
        else:
            self.docs = [p["doc"] for p in _parse.normalize(policies or [])]
        raw_ns = cluster.get("namespaces") or {}
        self.ns_labels = {}
        for n, v in raw_ns.items():
            lbl = v.get("labels") if isinstance(v, dict) and isinstance(v.get("labels"), dict) else v
            self.ns_labels[n] = _labels.namespace_labels(n, lbl)
        self.endpoints = {}
        self.by_ip = {}
        for e in cluster.get("endpoints") or []:
            ns = e.get("namespace") or "default"
            key = "%s/%s" % (ns, e["name"])
            ips = [str(_addr(i)) for i in e.get("ips") or [] if _addr(i).version == 4]
            ep = {"key": key, "namespace": ns, "labels": dict(e.get("labels") or {}), "node": e.get("node"),
                  "ips": ips, "ports": [(p.get("name") or "", p["port"], p.get("protocol") or "TCP")
                                        for p in e.get("ports") or []]}
            self.endpoints[key] = ep
            for ip in ips:
                self.by_ip[ip] = ep
        self.apiserver = set(str(_addr(ip)) for ip in cluster.get("kube_apiserver") or [])
        self.node_of_ip = {}
        for n in cluster.get("nodes") or []:
            for ip in n.get("ips") or []:
                a = _addr(ip)
                if a.version == 4:
                    self.node_of_ip[str(a)] = n["name"]

    # peers and labels
    def peer(self, what):
        if what in self.endpoints:
            ep = self.endpoints[what]
            return _Peer("endpoint", ep["ips"][0] if ep["ips"] else None, ep=ep)
        ip = str(_addr(what))
        if ip in self.by_ip:
            return _Peer("endpoint", ip, ep=self.by_ip[ip])
        if ip in self.node_of_ip:
            return _Peer("node", ip, node=self.node_of_ip[ip])
        if ip in self.apiserver:
            return _Peer("kube-apiserver", ip)
        return _Peer("world", ip)

    def _namespace_labels(self, ns):
        return self.ns_labels.get(ns) or _labels.namespace_labels(ns)

    def _cilium_labels(self, peer, ep):
        """{source: {key: value}} of a peer as Cilium sees it from endpoint ``ep``."""
        if peer.kind == "endpoint":
            k8s = dict(peer.ep["labels"])
            k8s[POD_NS] = peer.ep["namespace"]
            for k, v in self._namespace_labels(peer.ep["namespace"]).items():
                k8s[NS_PREFIX + k] = v
            return {"k8s": k8s, "reserved": {}}
        if peer.kind == "node":
            return {"k8s": {}, "reserved": {("host" if peer.node == ep["node"] else "remote-node"): ""}}
        if peer.kind == "kube-apiserver":
            return {"k8s": {}, "reserved": {"kube-apiserver": ""}}
        return {"k8s": {}, "reserved": {"world": ""}}

    # Cilium selectors
    @staticmethod
    def _cilium_reqs(sel):
        reqs = []
        for k, v in ((sel or {}).get("matchLabels") or {}).items():
            reqs.append(_split_key(k) + ("In", [v]))
        for e in (sel or {}).get("matchExpressions") or []:
            reqs.append(_split_key(e["key"]) + (e["operator"], list(e.get("values") or [])))
        return reqs

    @staticmethod
    def _req_ok(req, lab):
        src, key, op, values = req
        if src == "any":
            present = key in lab["k8s"] or key in lab["reserved"]
            v = lab["k8s"].get(key, lab["reserved"].get(key))
        else:
            present, v = key in lab.get(src, {}), lab.get(src, {}).get(key)
        return {"In": present and v in values, "NotIn": not present or v not in values,
                "Exists": present, "DoesNotExist": not present}[op]

    def _cilium_peer_selects(self, sel, ns, peer, ep):
        """fromEndpoints/toEndpoints: Cilium adds the policy's namespace unless the selector names the
        pod namespace label, uses reserved: labels, or (namespaced) namespace labels; clusterwide
        policies require a namespace label (pods only)."""
        reqs = self._cilium_reqs(sel)
        keys = [(s, k) for s, k, _o, _v in reqs]
        if not any(s == "reserved" for s, _k in keys) and not any(k == POD_NS and s != "reserved" for s, k in keys):
            if ns is None:
                reqs.append(("k8s", POD_NS, "Exists", []))
            elif not any(k.startswith(NS_PREFIX) and s != "reserved" for s, k in keys):
                reqs.append(("k8s", POD_NS, "In", [ns]))
        lab = self._cilium_labels(peer, ep)
        return all(self._req_ok(r, lab) for r in reqs)

    # one direction of one endpoint
    def allows(self, ep, direction, peer, protocol, port):
        """(allowed, reason) for ``direction`` ("ingress"/"egress") of endpoint ``ep`` (a key or an
        endpoint) with ``peer`` (a _Peer, key or IP)."""
        ep = self.endpoints[ep] if isinstance(ep, str) else ep
        peer = peer if isinstance(peer, _Peer) else self.peer(peer)
        protocol = _protocol(protocol)
        isolated, allowed, denied = [], [], []
        for doc in self.docs:
            if doc["kind"] == _parse.NP:
                self._np(doc, ep, direction, peer, protocol, port, isolated, allowed)
            else:
                self._cilium(doc, ep, direction, peer, protocol, port, isolated, allowed, denied)
        if denied:
            return False, "denied by %s" % denied[0]
        if allowed:
            return True, "allowed by %s" % allowed[0]
        if isolated:
            return False, "isolated by %s and no rule allows it" % isolated[0]
        return True, "not isolated"

    # NetworkPolicy
    def _np(self, doc, ep, direction, peer, protocol, port, isolated, allowed):
        md = doc["metadata"]
        ns = md.get("namespace") or "default"
        spec = doc["spec"]
        if ep["namespace"] != ns or not _labels.selector_matches(spec.get("podSelector") or {}, ep["labels"]):
            return
        types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))
        if direction.capitalize() not in types:
            return
        label = "NetworkPolicy %s/%s" % (ns, md["name"])
        isolated.append(label)
        target = ep if direction == "ingress" else peer.ep
        for i, rule in enumerate(spec.get(direction) or []):
            rule = rule or {}
            peers = rule.get("from" if direction == "ingress" else "to")
            if peers and not any(self._np_peer(p, ns, peer) for p in peers):
                continue
            ports = rule.get("ports")
            if ports and not any(self._np_port(p, target, protocol, port) for p in ports):
                continue
            allowed.append("%s %s[%d]" % (label, direction, i))

    def _np_peer(self, p, ns, peer):
        block = p.get("ipBlock")
        if block is not None:
            a = ipaddress.ip_address(peer.ip)
            return a in _net(block["cidr"]) and not any(a in _net(x) for x in block.get("except") or [])
        if peer.kind != "endpoint":
            return False
        pep = peer.ep
        if p.get("namespaceSelector") is not None:
            if not _labels.selector_matches(p["namespaceSelector"], self._namespace_labels(pep["namespace"])):
                return False
        elif pep["namespace"] != ns:
            return False
        return p.get("podSelector") is None or _labels.selector_matches(p["podSelector"], pep["labels"])

    @staticmethod
    def _np_port(p, target, protocol, port):
        if (p.get("protocol") or "TCP") != protocol:
            return False
        num = p.get("port")
        if num is None:
            return True
        if isinstance(num, int):
            return num <= port <= (p.get("endPort") or num)
        return target is not None and any(n == num and pr == protocol and pn == port for n, pn, pr in target["ports"])

    # CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
    def _cilium(self, doc, ep, direction, peer, protocol, port, isolated, allowed, denied):
        md = doc["metadata"]
        clusterwide = doc["kind"] == _parse.CCNP
        ns = None if clusterwide else (md.get("namespace") or "default")
        label = "%s %s" % (doc["kind"], md["name"] if clusterwide else "%s/%s" % (ns, md["name"]))
        specs = ([("", doc["spec"])] if doc.get("spec") is not None else []) + \
            [("specs[%d]." % i, s) for i, s in enumerate(doc.get("specs") or [])]
        subject = self._cilium_labels(_Peer("endpoint", None, ep=ep), ep)
        for prefix, spec in specs:
            if ns is not None and ep["namespace"] != ns:
                continue
            if not all(self._req_ok(r, subject) for r in self._cilium_reqs(spec.get("endpointSelector"))):
                continue
            dd = (spec.get("enableDefaultDeny") or {}).get(direction)
            if dd if dd is not None else bool(spec.get(direction) or spec.get(direction + "Deny")):
                isolated.append(label)
            for section, out in ((direction, allowed), (direction + "Deny", denied)):
                for i, rule in enumerate(spec.get(section) or []):
                    if self._cilium_rule(rule or {}, direction, ns, ep, peer, protocol, port):
                        out.append("%s %s%s[%d]" % (label, prefix, section, i))

    def _cilium_rule(self, rule, direction, ns, ep, peer, protocol, port):
        pre = "from" if direction == "ingress" else "to"
        l3 = [f for f in ("Endpoints", "CIDR", "CIDRSet", "Entities") if rule.get(pre + f) is not None]
        if not l3 and rule.get("toPorts") is None:
            return False                    # an empty rule: default deny, allows nothing
        if l3 and not self._cilium_l3(rule, pre, ns, ep, peer):
            return False
        if rule.get("toPorts") is None:
            return True
        target = ep if direction == "ingress" else peer.ep
        return any(self._cilium_port(p, target, protocol, port) for pr in rule["toPorts"] for p in pr.get("ports") or [])

    def _cilium_l3(self, rule, pre, ns, ep, peer):
        for sel in rule.get(pre + "Endpoints") or []:
            if self._cilium_peer_selects(sel, ns, peer, ep):
                return True
        if peer.kind == "world":             # CIDR rules never select pods or nodes
            a = ipaddress.ip_address(peer.ip)
            for c in rule.get(pre + "CIDR") or []:
                if a in _net(c):
                    return True
            for cs in rule.get(pre + "CIDRSet") or []:
                if a in _net(cs["cidr"]) and not any(a in _net(x) for x in cs.get("except") or []):
                    return True
        for ent in rule.get(pre + "Entities") or []:
            if ent == "all" or (ent in ("world", "world-ipv4") and peer.kind == "world") \
                    or (ent == "cluster" and peer.kind in ("endpoint", "node", "kube-apiserver")) \
                    or (ent == "kube-apiserver" and peer.kind == "kube-apiserver") \
                    or (ent == "host" and peer.kind == "node" and peer.node == ep["node"]) \
                    or (ent == "remote-node" and peer.kind == "node" and peer.node != ep["node"]):
                return True
        return False

    @staticmethod
    def _cilium_port(p, target, protocol, port):
        proto = p.get("protocol") or "ANY"
        if proto != "ANY" and proto != protocol:
            return False
        num = str(p["port"])
        if num.isdigit():
            n = int(num)
            return n == 0 or n <= port <= (p.get("endPort") or n)
        name = num.lower()
        return target is not None and any(pn == name and pr == protocol and pp == port for pn, pp, pr in target["ports"])

    # a connection
    def decide(self, src, dst, protocol, port):
        """(allowed, reason) for a connection from ``src`` to ``dst``."""
        protocol = _protocol(protocol)
        s, d = self.peer(src), self.peer(dst)
        if s.kind == "endpoint" and d.kind == "endpoint" and s.ep["key"] == d.ep["key"]:
            return True, LOOPBACK
        reasons = []
        if s.kind == "endpoint":
            ok, why = self.allows(s.ep, "egress", d, protocol, port)
            if not ok:
                return False, "egress of %s: %s" % (s.ep["key"], why)
            reasons.append("egress of %s: %s" % (s.ep["key"], why))
        if d.kind == "endpoint":
            if s.kind == "node" and s.node == d.ep["node"]:
                reasons.append("ingress of %s: %s" % (d.ep["key"], HOST_TO_LOCAL_POD))
            else:
                ok, why = self.allows(d.ep, "ingress", s, protocol, port)
                if not ok:
                    return False, "ingress of %s: %s" % (d.ep["key"], why)
                reasons.append("ingress of %s: %s" % (d.ep["key"], why))
        return True, "; ".join(reasons) or "no endpoint involved"


def _split_key(key):
    src, sep, rest = key.partition(":")
    return (src, rest) if sep else ("any", key)


def decide(policies, cluster, src, dst, protocol, port):
    """(allowed, reason) for one connection; see the module docstring."""
    return Evaluator(policies, cluster).decide(src, dst, protocol, port)


# ---------------------------------------------------------------------------------------------
# compiled entries, applied the way the dataplane will


class _NodeView(object):
    def __init__(self, output):
        self.output = output
        self.ipcache = {}
        for prefix, ident in output.get("ipcache") or []:
            self.ipcache[str(ipaddress.ip_network(prefix).network_address)] = int(ident)
        self.cidrs = sorted(((ipaddress.ip_network(p), int(i)) for p, i in output.get("cidrs") or []),
                            key=lambda x: -x[0].prefixlen)
        self.entries = {}
        for key, ep in (output.get("endpoints") or {}).items():
            for e in ep["entries"]:
                self.entries.setdefault((key, e["direction"]), []).append(e)

    def cidr_identity(self, ip):
        a = ipaddress.ip_address(ip)
        for net, ident in self.cidrs:       # longest prefix first
            if a in net:
                return ident
        return 2

    def identity(self, ip):
        return self.ipcache.get(str(ipaddress.ip_address(ip)), None) or self.cidr_identity(ip)

    def lookup(self, key, direction, peer_ip, protocol, port):
        ep = self.output["endpoints"][key]
        proto = _NUMBERS[_protocol(protocol)]
        peer_id = self.identity(peer_ip)
        if direction == "ingress" and peer_id == 1:
            return True, HOST_TO_LOCAL_POD
        cidr_id = self.cidr_identity(peer_ip)
        allow = deny = None
        for e in self.entries.get((key, direction), ()):
            if e["protocol"] not in (0, proto) or not (e["port"] == 0 or e["port"] <= port <= e["end_port"]):
                continue
            ident, by_addr = e["identity"], e["by_address"]
            if (ident == 0 and not by_addr) or (ident == peer_id and not by_addr) or (ident == cidr_id and by_addr):
                if e["deny"]:
                    deny = deny or e
                else:
                    allow = allow or e
        if deny:
            return False, "denied by %s" % deny["rule"]
        if allow:
            return True, "allowed by %s" % allow["rule"]
        if ep[direction + "_enforced"]:
            return False, "enforced (default deny) and no entry allows identity %d" % peer_id
        return True, "not enforced"


def lookup(output, endpoint, direction, peer_ip, protocol, port):
    """(allowed, reason): what the dataplane does with a packet of ``endpoint`` (a key of
    ``output["endpoints"]``) in ``direction`` with the peer address ``peer_ip``."""
    return _NodeView(output).lookup(endpoint, direction, peer_ip, protocol, port)


class CompiledNetwork(object):
    """Every node's compile output (``compile.compile_all``), applied the way the dataplane will."""

    def __init__(self, outputs):
        self.views = dict((n, _NodeView(o)) for n, o in outputs.items())
        self.node_of = {}
        self.ip_of = {}
        self.key_of_ip = {}
        for n, out in outputs.items():
            for key, ep in out["endpoints"].items():
                self.node_of[key] = n
                self.ip_of[key] = ep["ip"]
                if ep["ip"]:
                    self.key_of_ip[ep["ip"]] = key

    def decide(self, src, dst, protocol, port):
        s_key = src if src in self.node_of else self.key_of_ip.get(str(_addr(src)))
        d_key = dst if dst in self.node_of else self.key_of_ip.get(str(_addr(dst)))
        if s_key is not None and s_key == d_key:
            return True, LOOPBACK
        s_ip = self.ip_of[s_key] if s_key else str(_addr(src))
        d_ip = self.ip_of[d_key] if d_key else str(_addr(dst))
        reasons = []
        if s_key:
            ok, why = self.views[self.node_of[s_key]].lookup(s_key, "egress", d_ip, protocol, port)
            if not ok:
                return False, "egress of %s: %s" % (s_key, why)
            reasons.append("egress of %s: %s" % (s_key, why))
        if d_key:
            ok, why = self.views[self.node_of[d_key]].lookup(d_key, "ingress", s_ip, protocol, port)
            if not ok:
                return False, "ingress of %s: %s" % (d_key, why)
            reasons.append("ingress of %s: %s" % (d_key, why))
        return True, "; ".join(reasons) or "no endpoint involved"
