# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policy input: YAML text -> policy documents -> validated, normalized policies.

- ``load_text(text, where)``: the documents of a YAML text (multi-document; ``kind: List`` and
  ``<Kind>List`` with ``items`` are expanded by ``normalize``). A duplicate key in a mapping is an
  error (YAML would silently keep the last one).
- ``normalize(docs)``: every document validated, then turned into a ``Policy`` (a plain dict, below).
  All problems of the whole document set are collected and raised together as one ``PolicyError``,
  one line per problem, each naming the document (``NetworkPolicy production/backend-ingress``, or
  the file and document number when it has no usable name) and the field by path
  (``spec.ingress[0].ports[1].endPort: 79 is below port 80``). Fields of the Kubernetes/Cilium
  schema that this dataplane does not enforce yet are never ignored: one line per document lists
  each by path (``not enforced by this dataplane yet: spec.egress[0].toFQDNs``).

Accepted kinds: ``networking.k8s.io/v1`` NetworkPolicy, ``cilium.io/v2`` CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy. A namespaced policy without ``metadata.namespace`` is in ``default``
(as ``kubectl apply`` puts it). docs/policy.md has every rule and the reasons.

A normalized ``Policy``::

    {"kind", "namespace" (None for clusterwide), "name", "label": "<kind> <ns>/<name>",
     "doc": <the document as given>,
     "specs": [{"path": "spec" | "specs[i]",
                "subject": <selector>,            # the endpoints the rules apply to
                "ingress_isolation": bool,        # puts the selected endpoints in default deny
                "egress_isolation": bool,
                "rules": [{"direction": "ingress" | "egress", "deny": bool,
                           "name": "<label> <ingress|egress|ingressDeny|egressDeny>[i]",
                           "peers": None (any peer) | [peer, ...],
                           "ports": None (any protocol and port) | [port, ...]}]}]}

    selector: a sorted tuple of requirements (source, key, operator, values) over identity labels:
              source "k8s", "reserved" or "any" (either), operator In/NotIn/Exists/DoesNotExist,
              values a sorted tuple; the empty tuple selects every identity. Namespace rules are
              already applied (NetworkPolicy's namespace, Cilium's implicit namespace).
    peer:     {"selector": selector} | {"entity": name}
              | {"cidr": "a.b.c.d/n", "except": [...], "by_address": bool}
              (by_address: a NetworkPolicy ipBlock, matched on the peer's address even for pods)
    port:     {"protocol": 6 | 17 | 132 | 0 (any: only with port 0), "port": n, "end_port": m}
              (port 0 = every port of the protocol) | {"protocol": 6 | 17 | 132 | 0 (any), "name": "http"}
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import difflib
import ipaddress
import re

from ansible_collections.kldload.netstack.plugins.module_utils import labels as _labels
from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as _id

NP_API = "networking.k8s.io/v1"
CILIUM_API = "cilium.io/v2"
NP = "NetworkPolicy"
CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
KINDS = {NP: NP_API, CNP: CILIUM_API, CCNP: CILIUM_API}
DEFAULT_NAMESPACE = "default"

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
POLICY_LABELS_PREFIX = "io.cilium.k8s.policy."
SOURCES = ("k8s", "any", "reserved")
RESERVED_NAMES = ("unknown", "host", "world", "unmanaged", "health", "init", "remote-node", "kube-apiserver",
                  "ingress")
ENTITIES = ("all", "world", "world-ipv4", "cluster", "host", "remote-node", "kube-apiserver", "ingress", "init",
            "health", "unmanaged", "none")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}
ANY = 0

NOT_ENFORCED = "not enforced by this dataplane yet"
IPV6_NOT_ENFORCED = "IPv6 is not enforced by this dataplane yet (IPv4 only)"

_DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IPV4_CIDR_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")
_IPV4_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")

_TOP = ("apiVersion", "kind", "metadata", "spec", "status")
_TOP_CILIUM = _TOP + ("specs",)
_METADATA = ("name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
             "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
             "finalizers", "managedFields", "generateName", "selfLink")

# NetworkPolicy (networking.k8s.io/v1): every field of the schema is enforced.
_NP_SPEC = ("podSelector", "policyTypes", "ingress", "egress")
_NP_RULE = {"ingress": ("from", "ports"), "egress": ("to", "ports")}
_NP_PEER = ("podSelector", "namespaceSelector", "ipBlock")
_NP_IPBLOCK = ("cidr", "except")
_NP_PORT = ("protocol", "port", "endPort")

# CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2): (enforced, not enforced yet).
_CNP_SPEC = (("endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "enableDefaultDeny",
              "description", "labels"),
             ("nodeSelector", "log"))
_CNP_RULE = {
    "ingress": (("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "toPorts"),
                ("fromRequires", "fromGroups", "fromNodes", "icmps", "authentication")),
    "ingressDeny": (("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "toPorts"),
                    ("fromRequires", "fromGroups", "fromNodes", "icmps")),
    "egress": (("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toPorts"),
               ("toRequires", "toServices", "toFQDNs", "toGroups", "toNodes", "icmps", "authentication")),
    "egressDeny": (("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toPorts"),
                   ("toRequires", "toServices", "toGroups", "toNodes", "icmps")),
}
_CNP_PORT_RULE = (("ports",), ("rules", "listener", "originatingTLS", "terminatingTLS", "serverNames"))
_CNP_PORT_DENY_RULE = (("ports",), ())
_CNP_L7 = ("http", "kafka", "dns", "l7proto", "l7")
_CNP_PORT = ("port", "endPort", "protocol")
_CNP_CIDR_RULE = (("cidr", "except"), ("cidrGroupRef", "cidrGroupSelector"))
_SELECTOR = ("matchLabels", "matchExpressions")
_EXPRESSION = ("key", "operator", "values")
# protocols of the Cilium schema (some versions) this dataplane does not enforce yet
_CILIUM_OTHER_PROTOCOLS = ("ICMP", "ICMPV6", "VRRP", "IGMP", "GRE", "IPIP", "IPV6", "ESP", "AH")


class PolicyError(ValueError):
    """Invalid policy input. ``errors``: one line per problem (the message is those lines)."""

    def __init__(self, errors):
        if isinstance(errors, str):
            errors = [errors]
        self.errors = list(errors)
        ValueError.__init__(self, "\n".join(self.errors))


class _Sourced(dict):
    """A document as load_text() read it: a plain dict that remembers where it came from."""
    where = None


class _NotMapping(object):
    """A document that is not a mapping (reported by normalize() with where it came from)."""

    def __init__(self, value, where):
        self.value = value
        self.where = where


# ---------------------------------------------------------------------------------------------
# YAML


def _yaml_loader():
    import yaml

    class _Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""

    def _mapping(loader, node, deep=False):
        seen = {}
        for key_node, _value in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found duplicate key %r (first at line %d)" % (key, seen[key] + 1), key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    return yaml, _Loader


def load_text(text, where="<text>"):
    """The policy documents of a YAML text (empty documents skipped). ``where`` names the text in
    errors (a file name). PolicyError when the text is not YAML."""
    try:
        yaml, loader = _yaml_loader()
    except ImportError:
        raise PolicyError("%s: reading YAML needs PyYAML on this host (python3-yaml); give the documents as data "
                          "instead (the policy role reads files on the controller)" % where)
    try:
        raw = list(yaml.load_all(text, Loader=loader))  # nosec - a SafeLoader subclass
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise PolicyError("%s: not valid YAML: %s" % (where, msg))
    out = []
    for i, d in enumerate(raw):
        if d is None:
            continue
        w = "%s document %d" % (where, i + 1)
        if isinstance(d, dict):
            s = _Sourced(d)
            s.where = w
            out.append(s)
        else:
            out.append(_NotMapping(d, w))
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def _type(v):
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _join(path, key):
    return "%s.%s" % (path, key) if path else str(key)


def iana_name_error(name):
    """Why ``name`` is not an IANA service name (a Kubernetes port name), or None (labels.py has the rule)."""
    return _labels.iana_svc_name_error(name)


class _Ctx(object):
    """The problems of one document."""

    def __init__(self, label):
        self.label = label
        self.errors = []
        self.unenforced = []

    def err(self, path, msg):
        self.errors.append("%s: %s: %s" % (self.label, path, msg) if path else "%s: %s" % (self.label, msg))

    def not_enforced(self, path):
        self.unenforced.append(path)

    def lines(self):
        out = []
        if self.unenforced:
            out.append("%s: %s: %s" % (self.label, NOT_ENFORCED, ", ".join(self.unenforced)))
        return out + self.errors

    def fields(self, obj, path, allowed, what, unenforced=()):
        """``obj`` when it is a mapping (its unknown and not enforced fields reported), else None."""
        if not isinstance(obj, dict):
            self.err(path, "%s must be a mapping, not %s" % (what, _type(obj)))
            return None
        for k in obj:
            if k in allowed:
                continue
            if k in unenforced:
                self.not_enforced(_join(path, k))
                continue
            known = list(allowed) + list(unenforced)
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = "did you mean %s? " % close[0] if close else ""
            self.err(_join(path, k), "unknown field (%s%s has %s)" % (hint, what, ", ".join(known)))
        return obj

    def list_of(self, obj, path, what):
        """``obj`` when it is a list (None counts as absent: returns None without an error)."""
        if obj is None:
            return None
        if not isinstance(obj, list):
            self.err(path, "must be a list of %s, not %s" % (what, _type(obj)))
            return None
        return obj


def _ipv4_network(ctx, value, path, plain_ip=False, strict_inside=None, inside=None):
    """An IPv4Network from CIDR text (or a plain address with ``plain_ip``: a /32); None after
    reporting the problem. ``inside``: the network it must lie in (an ``except``); with
    ``strict_inside`` it must also be smaller (NetworkPolicy)."""
    if not isinstance(value, str) or not value:
        ctx.err(path, "must be a CIDR like 10.0.0.0/8, not %s" % _type(value))
        return None
    if ":" in value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            ctx.err(path, "%r is not a CIDR" % value)
            return None
        ctx.err(path, "%s: %s" % (value, IPV6_NOT_ENFORCED))
        return None
    if plain_ip and _IPV4_RE.match(value):
        value = value + "/32"
    if not _IPV4_CIDR_RE.match(value) or any(len(p) > 1 and p.startswith("0") for p in re.split(r"[./]", value)):
        ctx.err(path, "%r is not a CIDR (address/prefix length, like 10.0.0.0/8%s)"
                % (value, "; or an address" if plain_ip else ""))
        return None
    try:
        net = _id.network(value)
    except ValueError as e:
        if "host bits set" in str(e):
            try:
                fixed = ipaddress.IPv4Network(value, strict=False)
            except ValueError:
                fixed = None
            ctx.err(path, "%s has host bits set (did you mean %s?)" % (value, fixed))
        else:
            ctx.err(path, "%r is not a CIDR: %s" % (value, e))
        return None
    if inside is not None:
        if not (net.network_address in inside and net.prefixlen >= inside.prefixlen):
            ctx.err(path, "%s is not inside %s" % (net, inside))
            return None
        if strict_inside and net.prefixlen == inside.prefixlen:
            ctx.err(path, "%s must be a strict subset of %s" % (net, inside))
            return None
    return net


def _selector_tuple(reqs):
    return tuple(sorted(set(reqs)))


# ---------------------------------------------------------------------------------------------
# NetworkPolicy


def _k8s_selector(ctx, sel, path, source_prefix=""):
    """A Kubernetes LabelSelector -> requirements on ``k8s:<source_prefix><key>``; None if invalid."""
    if sel is None:
        sel = {}
    try:
        _labels.validate_selector(sel, path)
    except ValueError as e:
        ctx.errors.append("%s: %s" % (ctx.label, e))
        return None
    reqs = []
    for k, v in (sel.get("matchLabels") or {}).items():
        reqs.append(("k8s", source_prefix + k, "In", (v,)))
    for e in sel.get("matchExpressions") or []:
        reqs.append(("k8s", source_prefix + e["key"], e["operator"], tuple(sorted(set(e.get("values") or [])))))
    return reqs


def _np_port(ctx, p, path):
    p = ctx.fields(p, path, _NP_PORT, "a NetworkPolicy port")
    if p is None:
        return None
    proto = p.get("protocol")
    proto = "TCP" if proto is None else proto
    ok = True
    if proto not in PROTOCOLS:
        ctx.err(_join(path, "protocol"), "%r is not one of TCP, UDP, SCTP" % (proto,))
        ok = False
    port, end = p.get("port"), p.get("endPort")
    if end is not None and (not _is_int(end) or not 1 <= end <= 65535):
        ctx.err(_join(path, "endPort"), "%r must be a port number from 1 to 65535" % (end,))
        ok, end = False, None
    out = None
    if port is None:
        if end is not None:
            ctx.err(_join(path, "endPort"), "needs a numeric port (the start of the range)")
            ok = False
        out = {"port": 0, "end_port": 0}
    elif _is_int(port):
        if not 1 <= port <= 65535:
            ctx.err(_join(path, "port"), "%d is out of range (1-65535)" % port)
            ok = False
        elif end is not None and end < port:
            ctx.err(_join(path, "endPort"), "%d is below port %d" % (end, port))
            ok = False
        out = {"port": port, "end_port": port if end is None else end}
    elif isinstance(port, str):
        why = iana_name_error(port)
        if why and port.isdigit():
            ctx.err(_join(path, "port"), "%r is a string, so a port name, and not a valid one (a name %s): write "
                    "the number %s without quotes" % (port, why, port))
            ok = False
        elif why:
            ctx.err(_join(path, "port"), "%r is not a valid port name (IANA service name): %s" % (port, why))
            ok = False
        if end is not None:
            ctx.err(_join(path, "endPort"), "cannot be used with the named port %r (a range needs numbers)" % port)
            ok = False
        out = {"name": port}
    else:
        ctx.err(_join(path, "port"), "must be a number or a port name, not %s" % _type(port))
        ok = False
    if not ok:
        return None
    out["protocol"] = PROTOCOLS[proto]
    return out


def _np_peer(ctx, p, path, namespace):
    p = ctx.fields(p, path, _NP_PEER, "a NetworkPolicy peer")
    if p is None:
        return None
    pod, nss, block = p.get("podSelector"), p.get("namespaceSelector"), p.get("ipBlock")
    if pod is None and nss is None and block is None:
        ctx.err(path, "a peer must set podSelector, namespaceSelector or ipBlock")
        return None
    if block is not None:
        if pod is not None or nss is not None:
            ctx.err(path, "ipBlock cannot be combined with podSelector or namespaceSelector in one peer "
                    "(use two peers)")
            return None
        bp = _join(path, "ipBlock")
        block = ctx.fields(block, bp, _NP_IPBLOCK, "an ipBlock")
        if block is None:
            return None
        if block.get("cidr") is None:
            ctx.err(_join(bp, "cidr"), "required")
            return None
        net = _ipv4_network(ctx, block.get("cidr"), _join(bp, "cidr"))
        excepts = ctx.list_of(block.get("except"), _join(bp, "except"), "CIDRs") or []
        ex = []
        for i, e in enumerate(excepts):
            en = _ipv4_network(ctx, e, "%s.except[%d]" % (bp, i), inside=net, strict_inside=True) \
                if net is not None else None
            if en is not None:
                ex.append(str(en))
        if net is None or len(ex) != len(excepts):
            return None
        return {"cidr": str(net), "except": sorted(set(ex)), "by_address": True}
    reqs = []
    if pod is not None:
        r = _k8s_selector(ctx, pod, _join(path, "podSelector"))
        if r is None:
            return None
        reqs.extend(r)
    if nss is not None:
        r = _k8s_selector(ctx, nss, _join(path, "namespaceSelector"), NAMESPACE_LABELS_PREFIX)
        if r is None:
            return None
        reqs.extend(r)
        reqs.append(("k8s", POD_NAMESPACE_LABEL, "Exists", ()))     # pods only, in any namespace it selects
    else:
        reqs.append(("k8s", POD_NAMESPACE_LABEL, "In", (namespace,)))
    return {"selector": _selector_tuple(reqs)}


def _np_spec(ctx, doc, namespace, label):
    spec = doc.get("spec")
    if spec is None:
        ctx.err("spec", "required")
        return None
    spec = ctx.fields(spec, "spec", _NP_SPEC, "a NetworkPolicy spec")
    if spec is None:
        return None
    subject = _k8s_selector(ctx, spec.get("podSelector"), "spec.podSelector")
    if subject is not None:
        subject = _selector_tuple(subject + [("k8s", POD_NAMESPACE_LABEL, "In", (namespace,))])
    types = spec.get("policyTypes")
    if types is None or types == []:
        egress = spec.get("egress")
        types = ["Ingress"] + (["Egress"] if isinstance(egress, list) and egress else [])
    elif not isinstance(types, list):
        ctx.err("spec.policyTypes", "must be a list of Ingress and/or Egress, not %s" % _type(types))
        types = None
    else:
        for i, t in enumerate(types):
            if t not in ("Ingress", "Egress"):
                ctx.err("spec.policyTypes[%d]" % i, "%r is not Ingress or Egress" % (t,))
            elif types.index(t) != i:
                ctx.err("spec.policyTypes[%d]" % i, "%s is listed twice" % t)
    rules = []
    for direction in ("ingress", "egress"):
        items = ctx.list_of(spec.get(direction), "spec." + direction, "rules")
        if items is None:
            continue
        tname = direction.capitalize()
        if items and types is not None and tname not in types:
            ctx.err("spec." + direction, "has %d rule(s) but spec.policyTypes (%s) does not list %s, so Kubernetes "
                    "ignores them: add %s to policyTypes or remove the rules"
                    % (len(items), ", ".join(str(t) for t in types), tname, tname))
            continue
        peer_field = _NP_RULE[direction][0]
        for i, r in enumerate(items):
            rp = "spec.%s[%d]" % (direction, i)
            r = ctx.fields({} if r is None else r, rp, _NP_RULE[direction], "a NetworkPolicy %s rule" % direction)
            if r is None:
                continue
            peers_in = ctx.list_of(r.get(peer_field), _join(rp, peer_field), "peers")
            peers = None
            if peers_in:
                peers = [_np_peer(ctx, p, "%s.%s[%d]" % (rp, peer_field, j), namespace) for j, p in enumerate(peers_in)]
            ports_in = ctx.list_of(r.get("ports"), _join(rp, "ports"), "ports")
            ports = None
            if ports_in:
                ports = [_np_port(ctx, p, "%s.ports[%d]" % (rp, j)) for j, p in enumerate(ports_in)]
            if (peers and None in peers) or (ports and None in ports):
                continue
            rules.append({"direction": direction, "deny": False, "name": "%s %s[%d]" % (label, direction, i),
                          "peers": peers, "ports": ports})
    if subject is None or types is None:
        return None
    return [{"path": "spec", "subject": subject, "ingress_isolation": "Ingress" in types,
             "egress_isolation": "Egress" in types, "rules": rules}]


# ---------------------------------------------------------------------------------------------
# CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy


def _cilium_key(ctx, key, path):
    """(source, key) of a Cilium selector key (``k8s:app``, ``any:app``, ``app`` = any, ``reserved:host``);
    None after reporting the problem."""
    if not isinstance(key, str):
        ctx.err(path, "a label key must be a string, not %s" % _type(key))
        return None
    src, sep, rest = key.partition(":")
    if not sep:
        src, rest = "any", key
    if src not in SOURCES:
        ctx.err(path, "label source %r is not one of k8s, any, reserved (this dataplane's identities carry k8s "
                "and reserved labels; no prefix means any)" % src)
        return None
    if src == "reserved":
        if rest not in RESERVED_NAMES:
            ctx.err(path, "reserved:%s is not a reserved identity (%s)" % (rest, ", ".join(RESERVED_NAMES)))
            return None
        return src, rest
    why = _labels.key_error(rest)
    if why:
        ctx.err(path, "label key %r is invalid: %s" % (rest, why))
        return None
    if rest.startswith(POLICY_LABELS_PREFIX):
        # Cilium's identities carry io.cilium.k8s.policy.serviceaccount / .cluster; these do not.
        ctx.not_enforced(path)
        return None
    return src, rest


def _cilium_selector(ctx, sel, path):
    """A Cilium EndpointSelector -> a list of requirements; None after reporting the problem."""
    sel = ctx.fields(sel, path, _SELECTOR, "a label selector")
    if sel is None:
        return None
    ok, reqs = True, []
    ml = sel.get("matchLabels")
    if ml is not None:
        if not isinstance(ml, dict):
            ctx.err(_join(path, "matchLabels"), "must be a mapping of key to value, not %s" % _type(ml))
            ok = False
        else:
            for k, v in ml.items():
                kp = "%s.matchLabels.%s" % (path, k)
                sk = _cilium_key(ctx, k, kp)
                why = _labels.value_error(v)
                if why:
                    ctx.err(kp, "label value %r is invalid: %s" % (v, why))
                if sk is None or why:
                    ok = False
                    continue
                reqs.append((sk[0], sk[1], "In", (v,)))
    exprs = ctx.list_of(sel.get("matchExpressions"), _join(path, "matchExpressions"), "expressions")
    for i, e in enumerate(exprs or []):
        ep = "%s.matchExpressions[%d]" % (path, i)
        e = ctx.fields(e, ep, _EXPRESSION, "a selector expression")
        if e is None:
            ok = False
            continue
        sk = _cilium_key(ctx, e.get("key"), _join(ep, "key"))
        op, values = e.get("operator"), e.get("values")
        if op not in _labels.OPERATORS:
            ctx.err(_join(ep, "operator"), "%r is not one of %s" % (op, ", ".join(_labels.OPERATORS)))
            ok = False
        elif op in ("In", "NotIn"):
            if not isinstance(values, list) or not values:
                ctx.err(_join(ep, "values"), "operator %s needs a non-empty list of values" % op)
                ok = False
            else:
                for j, v in enumerate(values):
                    why = _labels.value_error(v)
                    if why:
                        ctx.err("%s.values[%d]" % (ep, j), why)
                        ok = False
        elif values:
            ctx.err(_join(ep, "values"), "must be empty for operator %s" % op)
            ok = False
        if sk is None:
            ok = False
        if ok:
            reqs.append((sk[0], sk[1], op, tuple(sorted(set(values or []))) if op in ("In", "NotIn") else ()))
    return reqs if ok else None


def _names_namespace(reqs):
    return any(src in ("k8s", "any") and key == POD_NAMESPACE_LABEL for src, key, _op, _v in reqs)


def _cilium_peer_selector(reqs, namespace):
    """Cilium's implicit namespace for fromEndpoints/toEndpoints (getEndpointSelector in
    pkg/k8s/apis/cilium.io/utils): reserved: selectors as they are; a selector naming the pod
    namespace label as it is; else a namespaced policy adds its namespace (unless the selector uses
    namespace labels), a clusterwide one requires a namespace label (pods only)."""
    if any(src == "reserved" for src, _k, _o, _v in reqs) or _names_namespace(reqs):
        return _selector_tuple(reqs)
    if namespace is None:
        return _selector_tuple(reqs + [("k8s", POD_NAMESPACE_LABEL, "Exists", ())])
    if any(src in ("k8s", "any") and key.startswith(NAMESPACE_LABELS_PREFIX) for src, key, _o, _v in reqs):
        return _selector_tuple(reqs)
    return _selector_tuple(reqs + [("k8s", POD_NAMESPACE_LABEL, "In", (namespace,))])


def _cnp_port(ctx, p, path):
    """A list of port dicts (ANY expands to TCP, UDP, SCTP) or None after reporting the problem."""
    p = ctx.fields(p, path, _CNP_PORT, "a Cilium port")
    if p is None:
        return None
    ok = True
    proto = p.get("protocol")
    if proto is None or proto == "" or proto == "ANY":
        protos = [6, 17, 132]
    elif proto in PROTOCOLS:
        protos = [PROTOCOLS[proto]]
    elif proto in _CILIUM_OTHER_PROTOCOLS:
        ctx.not_enforced("%s.protocol: %s" % (path, proto))
        return None
    else:
        ctx.err(_join(path, "protocol"), "%r is not one of TCP, UDP, SCTP, ANY" % (proto,))
        return None
    port, end = p.get("port"), p.get("endPort")
    if _is_int(port):
        port = str(port)
    if end is not None and (not _is_int(end) or not 0 <= end <= 65535):
        ctx.err(_join(path, "endPort"), "%r must be a port number from 0 to 65535" % (end,))
        return None
    if end == 0:
        end = None          # Cilium: endPort 0 is no range
    if port is None or port == "":
        ctx.err(_join(path, "port"), "required (a number, 0 for every port, or a port name)")
        return None
    if not isinstance(port, str):
        ctx.err(_join(path, "port"), "must be a port number or name, not %s" % _type(port))
        return None
    if port.isdigit():
        n = int(port)
        if (len(port) > 1 and port.startswith("0")) or n > 65535:
            ctx.err(_join(path, "port"), "%r is out of range (0-65535; 0 is every port)" % port)
            return None
        if end is not None and n == 0:
            ctx.err(_join(path, "endPort"), "needs a port above 0 (port 0 already means every port)")
            ok = False
        elif end is not None and end < n:
            ctx.err(_join(path, "endPort"), "%d is below port %d" % (end, n))
            ok = False
        if not ok:
            return None
        return [{"protocol": pr, "port": n, "end_port": n if end is None else end} for pr in protos]
    name = port.lower()
    why = iana_name_error(name)
    if why:
        ctx.err(_join(path, "port"), "%r is not a port number or a valid port name (IANA service name): %s"
                % (port, why))
        return None
    if end is not None:
        ctx.err(_join(path, "endPort"), "cannot be used with the named port %r (a range needs numbers)" % port)
        return None
    return [{"protocol": ANY if len(protos) > 1 else protos[0], "name": name}]


def _cnp_cidrs(ctx, rule, rp, prefix):
    """Peers of fromCIDR/fromCIDRSet (toCIDR/toCIDRSet); (peers, ok)."""
    peers, ok = [], True
    plain = ctx.list_of(rule.get(prefix + "CIDR"), _join(rp, prefix + "CIDR"), "CIDRs")
    for i, c in enumerate(plain or []):
        net = _ipv4_network(ctx, c, "%s.%sCIDR[%d]" % (rp, prefix, i), plain_ip=True)
        if net is None:
            ok = False
        else:
            peers.append({"cidr": str(net), "except": [], "by_address": False})
    sets = ctx.list_of(rule.get(prefix + "CIDRSet"), _join(rp, prefix + "CIDRSet"), "CIDR rules")
    for i, c in enumerate(sets or []):
        cp = "%s.%sCIDRSet[%d]" % (rp, prefix, i)
        n_unenforced = len(ctx.unenforced)
        c = ctx.fields(c, cp, _CNP_CIDR_RULE[0], "a CIDR rule", _CNP_CIDR_RULE[1])
        if c is None or len(ctx.unenforced) != n_unenforced:
            ok = False
            continue
        if c.get("cidr") is None:
            ctx.err(_join(cp, "cidr"), "required")
            ok = False
            continue
        net = _ipv4_network(ctx, c.get("cidr"), _join(cp, "cidr"))
        excepts = ctx.list_of(c.get("except"), _join(cp, "except"), "CIDRs") or []
        ex = []
        for j, e in enumerate(excepts):
            en = _ipv4_network(ctx, e, "%s.except[%d]" % (cp, j), inside=net) if net is not None else None
            if en is not None:
                ex.append(str(en))
        if net is None or len(ex) != len(excepts):
            ok = False
            continue
        peers.append({"cidr": str(net), "except": sorted(set(ex)), "by_address": False})
    return peers, ok


def _cnp_rule(ctx, r, rp, section, namespace, label, spec_prefix, index):
    direction = "ingress" if section.startswith("ingress") else "egress"
    deny = section.endswith("Deny")
    pre = "from" if direction == "ingress" else "to"
    allowed, unenforced = _CNP_RULE[section]
    n_unenforced = len(ctx.unenforced)
    r = ctx.fields({} if r is None else r, rp, allowed, "a Cilium %s rule" % section, unenforced)
    if r is None:
        return None
    ok = len(ctx.unenforced) == n_unenforced
    l3_fields = [f for f in (pre + "Endpoints", pre + "CIDR", pre + "CIDRSet", pre + "Entities") if r.get(f) is not None]
    for f in l3_fields:
        if r[f] == []:
            ctx.err(_join(rp, f), "an empty list selects no peer: remove the field (any peer) or list peers")
            ok = False
    peers = None
    if l3_fields:
        peers = []
        eps = ctx.list_of(r.get(pre + "Endpoints"), _join(rp, pre + "Endpoints"), "endpoint selectors")
        for j, s in enumerate(eps or []):
            sp = "%s.%sEndpoints[%d]" % (rp, pre, j)
            if s is None:
                ctx.err(sp, "must be a label selector ({} selects every endpoint of the namespace)")
                ok = False
                continue
            reqs = _cilium_selector(ctx, s, sp)
            if reqs is None:
                ok = False
                continue
            peers.append({"selector": _cilium_peer_selector(reqs, namespace)})
        cidr_peers, cok = _cnp_cidrs(ctx, r, rp, pre)
        peers.extend(cidr_peers)
        ok = ok and cok
        ents = ctx.list_of(r.get(pre + "Entities"), _join(rp, pre + "Entities"), "entities")
        for j, e in enumerate(ents or []):
            if e == "world-ipv6":
                ctx.err("%s.%sEntities[%d]" % (rp, pre, j), "world-ipv6: %s" % IPV6_NOT_ENFORCED)
                ok = False
            elif e not in ENTITIES:
                ctx.err("%s.%sEntities[%d]" % (rp, pre, j), "%r is not an entity (%s)" % (e, ", ".join(ENTITIES)))
                ok = False
            else:
                peers.append({"entity": "world" if e == "world-ipv4" else e})
    ports = None
    tp = r.get("toPorts")
    if tp is not None:
        tp = ctx.list_of(tp, _join(rp, "toPorts"), "port rules")
        if tp == []:
            ctx.err(_join(rp, "toPorts"), "an empty list is ambiguous: remove it (every port) or list ports")
            ok = False
        ports = []
        pr_fields = _CNP_PORT_DENY_RULE if deny else _CNP_PORT_RULE
        for j, pr in enumerate(tp or []):
            pp = "%s.toPorts[%d]" % (rp, j)
            pr = ctx.fields(pr, pp, pr_fields[0] + pr_fields[1], "a Cilium port rule")
            if pr is None:
                ok = False
                continue
            for k in pr:
                if k in pr_fields[1]:
                    if k == "rules" and isinstance(pr[k], dict):
                        for l7 in pr[k]:
                            if l7 in _CNP_L7:
                                ctx.not_enforced("%s.rules.%s" % (pp, l7))
                            else:
                                ctx.err("%s.rules.%s" % (pp, l7), "unknown field (L7 rules have %s)"
                                        % ", ".join(_CNP_L7))
                                ok = False
                        if pr[k]:
                            ok = False
                    elif not (k == "rules" and pr[k] is None):
                        ctx.not_enforced(_join(pp, k))
                        ok = False
            plist = ctx.list_of(pr.get("ports"), _join(pp, "ports"), "ports")
            if not plist:
                ctx.err(_join(pp, "ports"), "required: list at least one port (a port rule without ports allows "
                        "nothing)")
                ok = False
                continue
            for k, p in enumerate(plist):
                got = _cnp_port(ctx, p, "%s.ports[%d]" % (pp, k))
                if got is None:
                    ok = False
                else:
                    ports.extend(got)
    if not ok:
        return None
    if peers is None and ports is None:
        return {}      # Cilium's empty rule ({}): default deny for the direction (see _cnp_one), allows nothing
    return {"direction": direction, "deny": deny, "peers": peers, "ports": ports,
            "name": "%s %s%s[%d]" % (label, spec_prefix, section, index)}


def _cnp_one(ctx, spec, path, namespace, label):
    allowed, unenforced = _CNP_SPEC
    n_unenforced = len(ctx.unenforced)
    spec = ctx.fields(spec, path, allowed, "a Cilium rule", unenforced)
    if spec is None:
        return None
    ok = len(ctx.unenforced) == n_unenforced
    es = spec.get("endpointSelector")
    subject = None
    if es is None:
        if "nodeSelector" not in spec:
            ctx.err(_join(path, "endpointSelector"), "required (the endpoints the rule applies to; {} selects "
                    "every endpoint%s)" % (" of the namespace" if namespace else ""))
        ok = False
    else:
        if "nodeSelector" in spec:
            ctx.err(path, "endpointSelector and nodeSelector cannot both be set")
            ok = False
        reqs = _cilium_selector(ctx, es, _join(path, "endpointSelector"))
        if reqs is not None:
            if any(src == "reserved" for src, _k, _o, _v in reqs):
                ctx.not_enforced(_join(path, "endpointSelector") + " (reserved: labels: host and init policies)")
                ok = False
            elif namespace is not None:
                for src, key, op, values in reqs:
                    if key == POD_NAMESPACE_LABEL and src in ("k8s", "any") and op == "In" and \
                            values != (namespace,) and len(values) == 1:
                        ctx.err("%s.endpointSelector.matchLabels.%s" % (path, key if src == "any" else src + ":" + key),
                                "%r is not the policy's namespace %r (a CiliumNetworkPolicy applies to endpoints of "
                                "its own namespace only)" % (values[0], namespace))
                        ok = False
                reqs = reqs + [("k8s", POD_NAMESPACE_LABEL, "In", (namespace,))]
            subject = _selector_tuple(reqs)
        else:
            ok = False
    if spec.get("description") is not None and not isinstance(spec.get("description"), str):
        ctx.err(_join(path, "description"), "must be a string, not %s" % _type(spec.get("description")))
    lbls = ctx.list_of(spec.get("labels"), _join(path, "labels"), "labels")
    for i, lb in enumerate(lbls or []):
        lb = ctx.fields(lb, "%s.labels[%d]" % (path, i), ("key", "value", "source"), "a rule label")
        if lb is not None and not isinstance(lb.get("key"), str):
            ctx.err("%s.labels[%d].key" % (path, i), "required (a string)")
    dd = spec.get("enableDefaultDeny")
    dd_in = dd_eg = None
    if dd is not None:
        dd = ctx.fields(dd, _join(path, "enableDefaultDeny"), ("ingress", "egress"), "enableDefaultDeny")
        if dd is not None:
            for k in ("ingress", "egress"):
                if dd.get(k) is not None and not isinstance(dd.get(k), bool):
                    ctx.err("%s.enableDefaultDeny.%s" % (path, k), "must be true or false, not %s" % _type(dd.get(k)))
            dd_in, dd_eg = dd.get("ingress"), dd.get("egress")
    spec_prefix = "" if path == "spec" else path + "."
    rules = []
    counts = {}
    for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
        items = ctx.list_of(spec.get(section), _join(path, section), "rules")
        counts[section] = len(items or [])
        for i, r in enumerate(items or []):
            rule = _cnp_rule(ctx, r, "%s.%s[%d]" % (path, section, i), section, namespace, label, spec_prefix, i)
            if rule is None:
                ok = False
            elif rule:
                rules.append(rule)
    if not ok:
        return None
    ingress_iso = dd_in if isinstance(dd_in, bool) else bool(counts["ingress"] or counts["ingressDeny"])
    egress_iso = dd_eg if isinstance(dd_eg, bool) else bool(counts["egress"] or counts["egressDeny"])
    return {"path": path, "subject": subject, "ingress_isolation": ingress_iso, "egress_isolation": egress_iso,
            "rules": rules}


def _cnp_specs(ctx, doc, namespace, label):
    spec, specs = doc.get("spec"), doc.get("specs")
    if spec is None and specs is None:
        ctx.err("spec", "required (or specs, a list of rules)")
        return None
    out, ok = [], True
    if spec is not None:
        s = _cnp_one(ctx, spec, "spec", namespace, label)
        ok = s is not None
        out.append(s)
    specs = ctx.list_of(specs, "specs", "rules")
    for i, s in enumerate(specs or []):
        got = _cnp_one(ctx, s, "specs[%d]" % i, namespace, label)
        ok = ok and got is not None
        out.append(got)
    if specs == [] and spec is None:
        ctx.err("specs", "must list at least one rule")
        ok = False
    return out if ok else None


# ---------------------------------------------------------------------------------------------
# documents


def _label_of(doc, where):
    kind = doc.get("kind") if isinstance(doc.get("kind"), str) else None
    md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name, ns = md.get("name"), md.get("namespace")
    if kind in KINDS and isinstance(name, str) and name:
        if kind == CCNP:
            return "%s %s" % (kind, name)
        return "%s %s/%s" % (kind, ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE, name)
    return "%s (%s)" % (kind, where) if kind else where


def _expand(docs, where):
    """[(doc, where)] with List documents expanded; non-mappings kept for reporting."""
    out = []
    for i, d in enumerate(docs):
        w = getattr(d, "where", None) or "%s document %d" % (where, i + 1)
        if isinstance(d, _NotMapping):
            out.append((d.value, w))
            continue
        kind = d.get("kind") if isinstance(d, dict) else None
        if isinstance(kind, str) and (kind == "List" or kind[:-4] in KINDS and kind.endswith("List")) \
                and "items" in d:
            items = d.get("items")
            if not isinstance(items, list):
                out.append((_NotMapping(items, w + " items"), w))
                continue
            for j, it in enumerate(items):
                out.append((it, "%s items[%d]" % (w, j)))
        else:
            out.append((d, w))
    return out


def _document(doc, where, seen):
    """(policy or None, problem lines)."""
    if isinstance(doc, _NotMapping):
        return None, ["%s: items must be a list of policies, not %s" % (where, _type(doc.value))]
    if not isinstance(doc, dict):
        return None, ["%s: a policy document must be a mapping, not %s" % (where, _type(doc))]
    label = _label_of(doc, where)
    ctx = _Ctx(label)
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind not in KINDS:
        ctx.err("kind", "%r is not a policy kind this collection reads (%s)"
                % (kind, ", ".join("%s %s" % (KINDS[k], k) for k in sorted(KINDS, key=len))))
        return None, ctx.lines()
    if api != KINDS[kind]:
        ctx.err("apiVersion", "%r: a %s is %s" % (api, kind, KINDS[kind]))
    ctx.fields(doc, "", _TOP if kind == NP else _TOP_CILIUM, "a %s" % kind)
    md = ctx.fields(doc.get("metadata"), "metadata", _METADATA, "metadata") if "metadata" in doc else None
    if md is None and "metadata" not in doc:
        ctx.err("metadata", "required (with name)")
    name = namespace = None
    if md is not None:
        name = md.get("name")
        if name is None:
            ctx.err("metadata.name", "required")
        elif not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN_RE.match(name):
            ctx.err("metadata.name", "%r must be a DNS subdomain (at most 253 lowercase alphanumerics, '-' and '.', "
                    "beginning and ending with an alphanumeric)" % (name,))
            name = None
        ns = md.get("namespace")
        if kind == CCNP:
            if ns is not None:
                ctx.err("metadata.namespace", "a %s is cluster-wide and has no namespace (use a "
                        "CiliumNetworkPolicy for one namespace)" % kind)
        elif ns is None or ns == "":
            namespace = DEFAULT_NAMESPACE
        elif not isinstance(ns, str) or len(ns) > 63 or not _DNS1123_LABEL_RE.match(ns):
            ctx.err("metadata.namespace", "%r must be a DNS label (at most 63 lowercase alphanumerics or '-', "
                    "beginning and ending with an alphanumeric)" % (ns,))
        else:
            namespace = ns
        try:
            _labels.validate_labels(md.get("labels"), "metadata.labels")
        except ValueError as e:
            ctx.errors.append("%s: %s" % (label, e))
        ann = md.get("annotations")
        if ann is not None and (not isinstance(ann, dict) or
                                not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items())):
            ctx.err("metadata.annotations", "must be a mapping of strings to strings")
    if name is not None and (namespace is not None or kind == CCNP):
        key = (kind, namespace, name)
        if key in seen:
            ctx.err("metadata.name", "%s is defined twice (also in %s)" % (label, seen[key]))
        else:
            seen[key] = where
    pns = namespace if namespace is not None else (None if kind == CCNP else DEFAULT_NAMESPACE)
    if kind == NP:
        specs = _np_spec(ctx, doc, pns, label)
    else:
        specs = _cnp_specs(ctx, doc, pns, label)
    lines = ctx.lines()
    if lines or specs is None:
        return None, lines
    return {"kind": kind, "namespace": pns, "name": name, "label": label, "doc": doc, "specs": specs}, []


def normalize(docs, where="input"):
    """Validated, normalized policies (see the module docstring) from policy documents: dicts as
    parsed from YAML/JSON, or what load_text() returned. ``where`` names the input in errors for
    documents that have no name. PolicyError listing every problem, one per line."""
    if isinstance(docs, (dict, _NotMapping)):
        docs = [docs]
    if not isinstance(docs, list):
        raise PolicyError("%s: must be a list of policy documents, not %s" % (where, _type(docs)))
    out, lines, seen = [], [], {}
    for doc, w in _expand(docs, where):
        pol, problems = _document(doc, w, seen)
        lines.extend(problems)
        if pol is not None:
            out.append(pol)
    if lines:
        raise PolicyError(lines)
    return out


class Documents(list):
    """Policy documents as given (the list itself: what a state keeps and writes), validated, carrying what
    ``normalize`` made of them (``policies``) so that the compiler does not parse them a second time."""

    def __init__(self, docs, policies):
        list.__init__(self, docs)
        self.policies = policies


def validated(docs, where="input"):
    """``Documents`` of ``docs`` (a list), after ``normalize`` (PolicyError as it raises)."""
    return Documents(docs, normalize(docs, where))


def load_policies(text, where="<text>"):
    """``normalize(load_text(text, where))``."""
    return normalize(load_text(text, where), where)
