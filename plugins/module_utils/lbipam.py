# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""LoadBalancer IP address management and NodePort allocation, like Cilium's LB-IPAM.

Input shapes (docs/bgp.md):

- Pools: CiliumLoadBalancerIPPool documents (``apiVersion``/``kind``/``metadata``/``spec``) or their
  ``spec`` with a ``name``: ``cidrs`` / ``blocks`` (each ``{cidr}`` or ``{start, stop}``), IPv4 and IPv6,
  ``serviceSelector`` (a LabelSelector: matchLabels, matchExpressions; absent - every service),
  ``disabled`` (its addresses are not handed out; services keep what they have only while they are
  in another pool).
- Services: the collection's service entries (``netstack_services``), flat, or Kubernetes Service
  documents turned into flat entries by ``from_kubernetes()``: one entry per port of the Service with
  ``type`` (ClusterIP, NodePort, LoadBalancer), ``labels``, ``annotations``, ``vip`` (spec.clusterIP;
  none - no ClusterIP entry), ``port``, ``protocol``, ``targetPort``, ``nodePort``, ``selector``,
  ``externalTrafficPolicy`` (Cluster, Local), ``loadBalancerIP``, ``ipFamilies``.

Assignment (``assign()``), for every LoadBalancer service (all ports of one Service share its IPs):

1. A requested IP (``loadBalancerIP``, or the ``lbipam.cilium.io/ips`` annotation, comma separated) is
   given when it is in an enabled pool that selects the service and no other service has it; else a
   clear error (outside every pool, in a pool that does not select it, requested by two services).
2. Otherwise one IP per family of ``ipFamilies`` (default IPv4) from the first pool (by name) that
   selects the service and has a free address of that family. The address is the service's own: its
   previous assignment (``previous``, read back from the nodes) when still valid, else the address at a
   hash of ``namespace/name`` in the pool, or the next free one after it. So an assignment does not
   depend on the order of services in the inventory and does not move when other services come or go.
3. No pool with a free address: an error naming the service and the pools that select it.

Pools are checked first: a CIDR that is not a network, a range whose start is after its stop, a pool
overlapping another pool, the pod CIDRs or the service CIDR - errors naming the pool.

NodePorts (type NodePort and LoadBalancer): ``nodePort`` as given (inside ``node_port_range``, once per
protocol) or allocated the same way (previous, hash, next free) per ``namespace/name/port/protocol``.
No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import ipaddress

from ansible_collections.kldload.netstack.plugins.module_utils import labels as labels_mod

ANNOTATION_IPS = "lbipam.cilium.io/ips"
TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
POLICIES = ("Cluster", "Local")
DEFAULT_NODE_PORT_RANGE = (30000, 32767)
FLAT_KEYS = ("name", "namespace", "vip", "port", "protocol", "algorithm", "affinity_timeout", "backends", "state",
             "selector", "targetPort", "type", "labels", "annotations", "nodePort", "externalTrafficPolicy",
             "loadBalancerIP", "ipFamilies")


class IpamError(ValueError):
    """Input that cannot be assigned; the message names the pool or the service."""


def _hash(text):
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


# ---- services -------------------------------------------------------------------------------------

def from_kubernetes(services):
    """The flat service entries of ``services``: Kubernetes Service documents (apiVersion v1, kind
    Service) become one entry per port; flat entries pass unchanged."""
    out = []
    for i, s in enumerate(services or []):
        if not isinstance(s, dict) or s.get("kind") != "Service":
            out.append(s)
            continue
        where = "services[%d]" % i
        meta = s.get("metadata") or {}
        spec = s.get("spec") or {}
        name = meta.get("name")
        if not name:
            raise IpamError("%s.metadata.name: required" % where)
        ports = spec.get("ports") or []
        if not isinstance(ports, list) or not ports:
            raise IpamError("%s (%s).spec.ports: at least one port" % (where, name))
        for j, p in enumerate(ports):
            if not isinstance(p, dict) or "port" not in p:
                raise IpamError("%s (%s).spec.ports[%d].port: required" % (where, name, j))
            e = {"name": name if len(ports) == 1 or not p.get("name") else "%s" % name,
                 "namespace": meta.get("namespace") or "default", "port": p["port"],
                 "protocol": str(p.get("protocol") or "TCP").lower(), "type": spec.get("type") or "ClusterIP",
                 "labels": dict(meta.get("labels") or {}), "annotations": dict(meta.get("annotations") or {})}
            for k_in, k_out in (("clusterIP", "vip"), ("selector", "selector"), ("externalTrafficPolicy",
                                "externalTrafficPolicy"), ("loadBalancerIP", "loadBalancerIP"),
                                ("ipFamilies", "ipFamilies")):
                if spec.get(k_in) not in (None, "", "None"):
                    e[k_out] = spec[k_in]
            for k in ("targetPort", "nodePort"):
                if p.get(k) not in (None, ""):
                    e[k] = p[k]
            out.append(e)
    return out


def _svc_id(s):
    return "%s/%s" % (s.get("namespace") or "default", s.get("name"))


def _check_flat(services):
    for i, s in enumerate(services):
        if not isinstance(s, dict):
            raise IpamError("services[%d]: must be a mapping" % i)
        where = "services[%d] (%s)" % (i, _svc_id(s))
        t = s.get("type") or "ClusterIP"
        if t not in TYPES:
            raise IpamError("%s.type: must be one of %s, got %r" % (where, ", ".join(TYPES), t))
        pol = s.get("externalTrafficPolicy") or "Cluster"
        if pol not in POLICIES:
            raise IpamError("%s.externalTrafficPolicy: Cluster or Local, got %r" % (where, pol))
        if t == "ClusterIP" and "vip" not in s:
            raise IpamError("%s.vip: required for a ClusterIP service" % where)
        try:
            labels_mod.validate_labels(s.get("labels") or {}, where + ".labels")
        except ValueError as e:
            raise IpamError(str(e))


# ---- pools ----------------------------------------------------------------------------------------

class Pool:
    def __init__(self, name, ranges, selector, disabled):
        self.name, self.ranges, self.selector, self.disabled = name, ranges, selector, disabled

    def families(self):
        return set(a.version for a, _b in self.ranges)

    def contains(self, ip):
        return any(a.version == ip.version and a <= ip <= b for a, b in self.ranges)

    def size(self, fam):
        return sum(int(b) - int(a) + 1 for a, b in self.ranges if a.version == fam)

    def nth(self, fam, n):
        for a, b in self.ranges:
            if a.version != fam:
                continue
            span = int(b) - int(a) + 1
            if n < span:
                return ipaddress.ip_address(int(a) + n)
            n -= span
        raise IndexError(n)

    def selects(self, svc):
        if self.selector is None:
            return True
        return labels_mod.selector_matches(self.selector, svc.get("labels") or {})


def _usable(net):
    """The first and last address handed out of a CIDR: all of a /32, /31, /128, /127; otherwise
    without the network address (and the IPv4 broadcast), as Cilium's LB-IPAM does."""
    if net.num_addresses <= 2:
        return net[0], net[-1]
    return net[1], net[-2] if net.version == 4 else net[-1]


def pools(items, pod_cidrs=(), service_cidr=None):
    """[Pool] of CiliumLoadBalancerIPPool documents or specs; IpamError names the pool."""
    out = []
    names = set()
    reserved = [("the pod CIDR %s" % c, ipaddress.ip_network(c)) for c in pod_cidrs or []]
    if service_cidr:
        reserved.append(("the service CIDR %s" % service_cidr, ipaddress.ip_network(service_cidr)))
    for i, doc in enumerate(items or []):
        if not isinstance(doc, dict):
            raise IpamError("lb_ip_pools[%d]: must be a mapping" % i)
        if "spec" in doc or doc.get("kind"):
            if doc.get("kind") not in (None, "CiliumLoadBalancerIPPool"):
                raise IpamError("lb_ip_pools[%d].kind: %r is not CiliumLoadBalancerIPPool" % (i, doc.get("kind")))
            name = (doc.get("metadata") or {}).get("name")
            spec = doc.get("spec") or {}
        else:
            name, spec = doc.get("name"), doc
        if not name or not isinstance(name, str):
            raise IpamError("lb_ip_pools[%d].metadata.name: required" % i)
        where = "lb_ip_pools[%d] (%s)" % (i, name)
        if name in names:
            raise IpamError("%s: the pool name %s is used twice" % (where, name))
        names.add(name)
        ranges = []
        for key in ("cidrs", "blocks"):
            for j, b in enumerate(spec.get(key) or []):
                w = "%s.spec.%s[%d]" % (where, key, j)
                if not isinstance(b, dict):
                    raise IpamError("%s: must be a mapping {cidr} or {start, stop}" % w)
                if b.get("cidr"):
                    try:
                        net = ipaddress.ip_network(str(b["cidr"]).strip(), strict=True)
                    except ValueError as e:
                        raise IpamError("%s.cidr: %r is not a network (%s)" % (w, b["cidr"], e))
                    ranges.append(_usable(net) + (w,))
                elif b.get("start"):
                    try:
                        a = ipaddress.ip_address(str(b["start"]).strip())
                        z = ipaddress.ip_address(str(b.get("stop") or b["start"]).strip())
                    except ValueError as e:
                        raise IpamError("%s: %s" % (w, e))
                    if a.version != z.version or a > z:
                        raise IpamError("%s: start %s is after stop %s (or another family)" % (w, a, z))
                    ranges.append((a, z, w))
                else:
                    raise IpamError("%s: needs cidr, or start (and stop)" % w)
        if not ranges:
            raise IpamError("%s.spec.cidrs: the pool has no addresses" % where)
        sel = spec.get("serviceSelector")
        if sel is not None:
            try:
                labels_mod.validate_selector(sel, where + ".spec.serviceSelector")
            except ValueError as e:
                raise IpamError(str(e))
        dis = spec.get("disabled", False)
        if not isinstance(dis, bool):
            raise IpamError("%s.spec.disabled: true or false" % where)
        for a, z, w in ranges:
            for what, net in reserved:
                if net.version == a.version and not (z < net[0] or a > net[-1]):
                    raise IpamError("%s: %s-%s overlaps %s" % (w, a, z, what))
            for other in out:
                for oa, oz in other.ranges:
                    if oa.version == a.version and not (z < oa or a > oz):
                        raise IpamError("%s: %s-%s overlaps pool %s (%s-%s)" % (w, a, z, other.name, oa, oz))
            for oa, oz, ow in ranges:
                if ow != w and oa.version == a.version and not (z < oa or a > oz):
                    raise IpamError("%s: %s-%s overlaps %s of the same pool" % (w, a, z, ow))
        out.append(Pool(name, [(a, z) for a, z, _w in ranges], sel, dis))
    return sorted(out, key=lambda p: p.name)


# ---- assignment -----------------------------------------------------------------------------------

def _requested(s, where):
    req = []
    if s.get("loadBalancerIP"):
        req.append(("loadBalancerIP", s["loadBalancerIP"]))
    ann = (s.get("annotations") or {}).get(ANNOTATION_IPS)
    if ann:
        req += [("annotations[%s]" % ANNOTATION_IPS, x.strip()) for x in str(ann).split(",") if x.strip()]
    out = []
    for field, text in req:
        try:
            ip = ipaddress.ip_address(str(text).strip())
        except ValueError:
            raise IpamError("%s.%s: %r is not an IP address" % (where, field, text))
        if ip not in [x for _f, x in out]:
            out.append((field, ip))
    return out


def _families(s, where):
    fams = s.get("ipFamilies") or ["IPv4"]
    if not isinstance(fams, list) or any(f not in ("IPv4", "IPv6") for f in fams):
        raise IpamError("%s.ipFamilies: a list of IPv4 and/or IPv6, got %r" % (where, fams))
    return [4 if f == "IPv4" else 6 for f in fams]


def assign(services, pool_list, previous=None):
    """{"namespace/name": [ip, ...]} for every LoadBalancer service (one assignment per Service, shared by
    its ports); IpamError names the service."""
    previous = previous or {}
    lbs = {}
    for i, s in enumerate(services):
        if (s.get("type") or "ClusterIP") != "LoadBalancer" or (s.get("state") or "present") != "present":
            continue
        sid = _svc_id(s)
        where = "services[%d] (%s)" % (i, sid)
        if sid in lbs:
            if _requested(s, where) != lbs[sid]["req"] or (s.get("labels") or {}) != (lbs[sid]["svc"].get("labels") or {}):
                raise IpamError("%s: the ports of one service must carry the same labels and requested IPs" % where)
            continue
        lbs[sid] = {"svc": s, "where": where, "req": _requested(s, where), "fams": _families(s, where)}
    taken = {}
    out = {}
    # 1. requested addresses
    for sid in sorted(lbs):
        e = lbs[sid]
        for field, ip in e["req"]:
            w = "%s.%s" % (e["where"], field)
            inside = [p for p in pool_list if p.contains(ip)]
            if not inside:
                raise IpamError("%s: %s is outside every pool (%s)" % (w, ip, ", ".join(p.name for p in pool_list) or "none"))
            ok = [p for p in inside if not p.disabled and p.selects(e["svc"])]
            if not ok:
                raise IpamError("%s: %s is in pool %s, which %s" % (w, ip, inside[0].name,
                                "is disabled" if inside[0].disabled else "does not select this service (serviceSelector)"))
            if ip in taken:
                raise IpamError("%s: %s is requested by %s too; two services cannot have the same IP" % (w, ip, taken[ip]))
            taken[ip] = sid
            out.setdefault(sid, []).append(ip)
    # 2. previous assignments that are still valid, then the hash-preferred address
    want = []
    for sid in sorted(lbs):
        e = lbs[sid]
        if e["req"]:
            continue
        for fam in e["fams"]:
            want.append((sid, fam))
    pending = []
    for sid, fam in want:
        e = lbs[sid]
        prev = [ipaddress.ip_address(x) for x in previous.get(sid) or [] if _is_ip(x)]
        prev = [ip for ip in prev if ip.version == fam and ip not in taken
                and any(p.contains(ip) and not p.disabled and p.selects(e["svc"]) for p in pool_list)]
        if prev:
            taken[prev[0]] = sid
            out.setdefault(sid, []).append(prev[0])
        else:
            pending.append((sid, fam))
    for sid, fam in sorted(pending, key=lambda x: (_hash(x[0]), x[0], x[1])):
        e = lbs[sid]
        cands = [p for p in pool_list if not p.disabled and p.selects(e["svc"]) and fam in p.families()]
        ip = None
        for p in cands:
            ip = _free(p, fam, sid, taken)
            if ip is not None:
                break
        if ip is None:
            raise IpamError("%s: no free IPv%d address in %s" % (
                e["where"], fam, ("the pools that select it (%s)" % ", ".join(p.name for p in cands)) if cands
                else "any pool: no enabled IPv%d pool selects this service (serviceSelector)" % fam))
        taken[ip] = sid
        out.setdefault(sid, []).append(ip)
    return dict((sid, [str(x) for x in sorted(ips, key=lambda a: (a.version, a))]) for sid, ips in out.items())


def _is_ip(x):
    try:
        ipaddress.ip_address(str(x))
        return True
    except ValueError:
        return False


def _free(pool, fam, sid, taken):
    size = pool.size(fam)
    if not size:
        return None
    start = _hash(sid) % size
    for k in range(size):
        ip = pool.nth(fam, (start + k) % size)
        if ip not in taken:
            return ip
    return None


def node_ports(services, port_range=DEFAULT_NODE_PORT_RANGE, previous=None):
    """{"namespace/name/port/protocol": nodePort} for every NodePort and LoadBalancer service port;
    IpamError for a nodePort outside the range or used twice."""
    lo, hi = port_range
    previous = previous or {}
    taken, out, pending = {}, {}, []
    for i, s in enumerate(services):
        if (s.get("type") or "ClusterIP") not in ("NodePort", "LoadBalancer") or (s.get("state") or "present") != "present":
            continue
        proto = str(s.get("protocol") or "tcp").lower()
        key = "%s/%s/%s" % (_svc_id(s), s.get("port"), proto)
        where = "services[%d] (%s).nodePort" % (i, _svc_id(s))
        np = s.get("nodePort")
        if np not in (None, ""):
            if isinstance(np, bool) or not str(np).isdigit() or not lo <= int(np) <= hi:
                raise IpamError("%s: %r is outside the NodePort range %d-%d" % (where, np, lo, hi))
            np = int(np)
            if (np, proto) in taken:
                raise IpamError("%s: %d/%s is used by %s too" % (where, np, proto.upper(), taken[(np, proto)]))
            taken[(np, proto)] = key
            out[key] = np
        else:
            pending.append((key, proto))
    later = []
    for key, proto in pending:
        p = previous.get(key)
        if isinstance(p, int) and lo <= p <= hi and (p, proto) not in taken:
            taken[(p, proto)] = key
            out[key] = p
        else:
            later.append((key, proto))
    size = hi - lo + 1
    for key, proto in sorted(later, key=lambda x: (_hash(x[0]), x[0])):
        start = _hash(key) % size
        for k in range(size):
            p = lo + (start + k) % size
            if (p, proto) not in taken:
                taken[(p, proto)] = key
                out[key] = p
                break
        else:
            raise IpamError("services: no free NodePort for %s in %d-%d" % (key, lo, hi))
    return out


def plan(services, pool_docs, pod_cidrs=(), service_cidr=None, previous=None, node_port_range=DEFAULT_NODE_PORT_RANGE):
    """The whole LB-IPAM for a cluster: {services (flat, with ``loadBalancerIPs`` and ``nodePort`` filled in),
    assignments {"namespace/name": [ips]}, node_ports {"ns/name/port/proto": port}}."""
    flat = from_kubernetes(services)
    _check_flat(flat)
    pl = pools(pool_docs, pod_cidrs, service_cidr)
    previous = previous or {}
    ips = assign(flat, pl, previous.get("assignments"))
    nps = node_ports(flat, node_port_range, previous.get("node_ports"))
    out = []
    for s in flat:
        s = dict(s)
        t = s.get("type") or "ClusterIP"
        if t == "LoadBalancer":
            s["loadBalancerIPs"] = ips.get(_svc_id(s), [])
        if t in ("NodePort", "LoadBalancer") and (s.get("state") or "present") == "present":
            s["nodePort"] = nps["%s/%s/%s" % (_svc_id(s), s.get("port"), str(s.get("protocol") or "tcp").lower())]
        out.append(s)
    return {"services": out, "assignments": ips, "node_ports": nps,
            "pools": [{"name": p.name, "disabled": p.disabled,
                       "ranges": ["%s-%s" % (a, b) for a, b in p.ranges]} for p in pl]}


# ---- the node's service table -------------------------------------------------------------------

LB_KEYS = ("name", "namespace", "vip", "port", "protocol", "algorithm", "affinity_timeout", "backends", "state")


def node_table(services, node_ip, node_pod_cidr=None):
    """The service table one node programs (lb_services entries) from resolved services (backends
    filled in): the ClusterIP entry (when the service has a ``vip``), one entry per LoadBalancer IP
    (``external: true``) and the NodePort on ``node_ip``. With ``externalTrafficPolicy: Local`` the
    external entries keep only the backends of this node (its pod CIDR, or the node's address itself):
    a node without one answers with ICMP unreachable and does not announce the service."""
    local_net = ipaddress.ip_network(node_pod_cidr) if node_pod_cidr else None
    out = []
    for s in services:
        base = dict((k, v) for k, v in s.items() if k in LB_KEYS)
        t = s.get("type") or "ClusterIP"
        if "vip" in s:
            out.append(dict(base))
        if t not in ("NodePort", "LoadBalancer") or (s.get("state") or "present") != "present":
            continue
        local = (s.get("externalTrafficPolicy") or "Cluster") == "Local"
        bes = list(s.get("backends") or [])
        if local:
            bes = [b for b in bes if is_local(b.get("ip"), node_ip, local_net)]
        ext = dict(base, backends=bes, external="local" if local else "cluster")
        for ip in s.get("loadBalancerIPs") or []:
            out.append(dict(ext, vip=ip))
        if node_ip and s.get("nodePort"):
            out.append(dict(ext, vip=node_ip, port=s["nodePort"]))
    return out


def is_local(ip, node_ip, local_net):
    try:
        a = ipaddress.ip_address(str(ip))
    except ValueError:
        return False
    return (node_ip and str(a) == str(node_ip)) or (local_net is not None and a in local_net)


def has_local_backend(service, node_ip, node_pod_cidr):
    local_net = ipaddress.ip_network(node_pod_cidr) if node_pod_cidr else None
    return any(is_local(b.get("ip"), node_ip, local_net) for b in service.get("backends") or [])
