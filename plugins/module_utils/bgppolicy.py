# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""CiliumBGPPeeringPolicy documents turned into one node's ``frr_bgp`` arguments (the bgp role).

A policy (``apiVersion``/``kind``/``metadata``/``spec``, or its ``spec`` with a ``name``) selects nodes
by their labels (``nodeSelector``, a LabelSelector; absent - every node). Its ``virtualRouters`` give the
node's BGP speaker: ``localASN``, ``neighbors`` (``peerAddress`` as /32 or /128, ``peerASN``,
``keepAliveTimeSeconds``, ``holdTimeSeconds``, ``connectRetryTimeSeconds``, ``eBGPMultihopTTL``,
``gracefulRestart.enabled``, ``authSecretRef`` - the name of a password in the role's secrets - and, as
kldload extensions, ``bfd``), ``exportPodCIDR`` (announce the node's pod CIDR) and ``serviceSelector``
(the LoadBalancer services whose IPs are announced; absent - none, as in Cilium). A service with
``externalTrafficPolicy: Local`` is announced only by nodes that have one of its backends.

One node runs one BGP instance (FRR's default VRF): two policies selecting a node, or virtual routers of
different local ASNs on one node, are errors naming both. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible_collections.kldload.netstack.plugins.module_utils import frr
from ansible_collections.kldload.netstack.plugins.module_utils import labels as labels_mod
from ansible_collections.kldload.netstack.plugins.module_utils import lbipam

KIND = "CiliumBGPPeeringPolicy"
# Cilium's defaults for a neighbour's timers (CiliumBGPPeeringPolicy v2alpha1)
DEFAULT_KEEPALIVE = 30
DEFAULT_HOLD = 90


class PolicyError(ValueError):
    """A policy that cannot be applied; the message names the policy and field."""


def node_labels(name, labels=None, control_plane=False):
    """A node's labels as the kubelet sets them, plus the inventory's ``labels``."""
    out = {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name}
    if control_plane:
        out["node-role.kubernetes.io/control-plane"] = ""
    out.update(labels or {})
    return out


def _policies(items):
    out = []
    for i, doc in enumerate(items or []):
        if not isinstance(doc, dict):
            raise PolicyError("bgp_peering_policies[%d]: must be a mapping" % i)
        if "spec" in doc or doc.get("kind"):
            if doc.get("kind") not in (None, KIND):
                raise PolicyError("bgp_peering_policies[%d].kind: %r is not %s" % (i, doc.get("kind"), KIND))
            name, spec = (doc.get("metadata") or {}).get("name"), doc.get("spec") or {}
        else:
            name, spec = doc.get("name"), doc
        if not name:
            raise PolicyError("bgp_peering_policies[%d].metadata.name: required" % i)
        where = "bgp_peering_policies[%d] (%s)" % (i, name)
        if spec.get("nodeSelector") is not None:
            try:
                labels_mod.validate_selector(spec["nodeSelector"], where + ".spec.nodeSelector")
            except ValueError as e:
                raise PolicyError(str(e))
        vrs = spec.get("virtualRouters")
        if not isinstance(vrs, list) or not vrs:
            raise PolicyError("%s.spec.virtualRouters: at least one virtual router" % where)
        out.append((name, where, spec))
    return out


def _neighbor(n, where, secrets, bfd_default):
    if not isinstance(n, dict):
        raise PolicyError("%s: must be a mapping" % where)
    addr = str(n.get("peerAddress") or "").strip()
    try:
        net = ipaddress.ip_network(addr, strict=True)
    except ValueError:
        raise PolicyError("%s.peerAddress: %r is not an address with /32 or /128" % (where, n.get("peerAddress")))
    if net.num_addresses != 1:
        raise PolicyError("%s.peerAddress: %s is a network; a neighbour is one address (/32 or /128)" % (where, addr))
    out = {"address": str(net.network_address), "asn": n.get("peerASN")}
    if out["asn"] in (None, ""):
        raise PolicyError("%s.peerASN: required" % where)
    ka, hold = n.get("keepAliveTimeSeconds"), n.get("holdTimeSeconds")
    if ka is not None or hold is not None:
        out["keepalive"] = ka if ka is not None else min(DEFAULT_KEEPALIVE, max(1, int(hold) // 3))
        out["hold"] = hold if hold is not None else max(DEFAULT_HOLD, int(ka) * 3)
    if n.get("connectRetryTimeSeconds") is not None:
        out["connect_retry"] = n["connectRetryTimeSeconds"]
    ttl = n.get("eBGPMultihopTTL")
    if ttl not in (None, "", 1):
        out["multihop"] = ttl
    gr = n.get("gracefulRestart") or {}
    if gr.get("enabled") is not None:
        out["graceful_restart"] = bool(gr["enabled"])
    ref = n.get("authSecretRef")
    if ref:
        if ref not in (secrets or {}):
            raise PolicyError("%s.authSecretRef: no secret %r in bgp_secrets (netstack_bgp_secrets)" % (where, ref))
        out["password"] = secrets[ref]
    bfd = n.get("bfd", bfd_default)
    out["bfd"] = bool(bfd)
    if n.get("description"):
        out["description"] = n["description"]
    return out


def _selector_matches(sel, labels):
    return labels_mod.selector_matches(sel, labels or {})


def node_config(policies, node, labels, underlay_ip, pod_cidr=None, services=None, secrets=None, bfd=False,
                bfd_interval=300, bfd_multiplier=3):
    """The ``frr_bgp`` arguments of ``node`` (``{"state": "absent"}`` when no policy selects it) and what it
    announces: {args, announce {prefix: reason}, policy}."""
    pols = _policies(policies)
    chosen = [(n, w, s) for n, w, s in pols if s.get("nodeSelector") is None or _selector_matches(s["nodeSelector"], labels)]
    if not chosen:
        return {"args": {"state": "absent"}, "announce": {}, "policy": None}
    if len(chosen) > 1:
        raise PolicyError("%s and %s both select node %s; a node takes one peering policy"
                          % (chosen[0][1], chosen[1][1], node))
    name, where, spec = chosen[0]
    vrs = spec["virtualRouters"]
    asns = set(str(v.get("localASN")) for v in vrs if isinstance(v, dict))
    if len(asns) > 1:
        raise PolicyError("%s.spec.virtualRouters: local ASNs %s on node %s; FRR's default VRF holds one BGP instance"
                          % (where, ", ".join(sorted(asns)), node))
    neighbors, announce, seen = [], {}, {}
    for i, vr in enumerate(vrs):
        vw = "%s.spec.virtualRouters[%d]" % (where, i)
        if not isinstance(vr, dict) or vr.get("localASN") in (None, ""):
            raise PolicyError("%s.localASN: required" % vw)
        for j, n in enumerate(vr.get("neighbors") or []):
            nb = _neighbor(n, "%s.neighbors[%d]" % (vw, j), secrets, bfd)
            if nb["address"] in seen:
                raise PolicyError("%s.neighbors[%d].peerAddress: %s is already %s" % (vw, j, nb["address"], seen[nb["address"]]))
            seen[nb["address"]] = "%s.neighbors[%d]" % (vw, j)
            neighbors.append(nb)
        export = vr.get("exportPodCIDR", False)
        if not isinstance(export, bool):
            raise PolicyError("%s.exportPodCIDR: true or false" % vw)
        if export and pod_cidr:
            announce[str(ipaddress.ip_network(pod_cidr))] = "pod CIDR"
        sel = vr.get("serviceSelector")
        if sel is None:
            continue
        try:
            labels_mod.validate_selector(sel, vw + ".serviceSelector")
        except ValueError as e:
            raise PolicyError(str(e))
        for s in services or []:
            if (s.get("type") or "ClusterIP") != "LoadBalancer" or not s.get("loadBalancerIPs"):
                continue
            if not _selector_matches(sel, s.get("labels")):
                continue
            if (s.get("externalTrafficPolicy") or "Cluster") == "Local" and \
                    not lbipam.has_local_backend(s, underlay_ip, pod_cidr):
                continue
            for ip in s["loadBalancerIPs"]:
                a = ipaddress.ip_address(ip)
                announce["%s/%d" % (a, 32 if a.version == 4 else 128)] = "%s/%s" % (s.get("namespace") or "default", s.get("name"))
    args = {"state": "present", "asn": vrs[0]["localASN"], "router_id": underlay_ip, "neighbors": neighbors,
            "announce": sorted(announce, key=lambda p: (ipaddress.ip_network(p).version, ipaddress.ip_network(p))),
            "bfd_interval": bfd_interval, "bfd_multiplier": bfd_multiplier}
    try:        # what frr_bgp will check on the node (but the underlay), here: before any node is touched
        frr.normalize(dict(args))
    except frr.FrrError as e:
        raise PolicyError("%s on node %s: %s" % (where, node, frr.mask(str(e), [n.get("password") for n in neighbors])))
    return {"args": args, "announce": announce, "policy": name}
