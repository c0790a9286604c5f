# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kube-proxy's rules for N ClusterIP services, as kube-proxy itself writes them, at scale.

Follows kubernetes/kubernetes pkg/proxy/iptables/proxier.go and pkg/proxy/nftables/proxier.go
(v1.29+): the same chain names (sha256 -> base32, 16 characters for KUBE-SVC-/KUBE-SEP-; 8 + the
name for nftables), the same argument order, probabilities as ``%0.10f``, "large cluster mode"
(no per-endpoint comments once there are more than 1000 endpoints), the masquerade rule for
traffic from outside the cluster CIDR (``--cluster-cidr`` set, i.e. the LocalDetector by CIDR),
``--random-fully``, and the partial-sync payload of a one-service change.

A service here is a dict ``{"name", "namespace", "vip", "port", "protocol", "backends": [{"ip",
"port"}]}`` (lb.sync()'s input), with port name ``http``. Only ClusterIP services, all with
endpoints, no NodePorts, no session affinity: the case being measured.
"""

import base64
import hashlib

MASQ_MARK = "0x4000"
PORT_NAME = "http"
LARGE_CLUSTER_ENDPOINTS = 1000   # largeClusterEndpointsThreshold


def b32hash(text):
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def spn(svc):
    """ServicePortName.String(): namespace/name:portname."""
    return "%s/%s:%s" % (svc["namespace"], svc["name"], PORT_NAME)


def endpoint(be):
    return "%s:%d" % (be["ip"], be["port"])


def svc_chain(svc):
    return "KUBE-SVC-" + b32hash(spn(svc) + svc["protocol"])[:16]


def sep_chain(svc, be):
    return "KUBE-SEP-" + b32hash(spn(svc) + svc["protocol"] + endpoint(be))[:16]


# ---- iptables mode --------------------------------------------------------------------------

# kube-proxy's EnsureChain/EnsureRule calls (iptablesJumpChains + kubelet's KUBE-FIREWALL jumps):
# (table, chain to create, built-in chain, rule arguments). Run once, with plain iptables -I.
JUMPS = [
    ("filter", "KUBE-EXTERNAL-SERVICES", "INPUT",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes externally-visible service portals"]),
    ("filter", "KUBE-EXTERNAL-SERVICES", "FORWARD",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes externally-visible service portals"]),
    ("filter", "KUBE-NODEPORTS", "INPUT", ["-m", "comment", "--comment", "kubernetes health check service ports"]),
    ("filter", "KUBE-SERVICES", "FORWARD",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes service portals"]),
    ("filter", "KUBE-SERVICES", "OUTPUT",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes service portals"]),
    ("filter", "KUBE-FORWARD", "FORWARD", ["-m", "comment", "--comment", "kubernetes forwarding rules"]),
    ("filter", "KUBE-PROXY-FIREWALL", "INPUT",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes load balancer firewall"]),
    ("filter", "KUBE-PROXY-FIREWALL", "OUTPUT",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes load balancer firewall"]),
    ("filter", "KUBE-PROXY-FIREWALL", "FORWARD",
     ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes load balancer firewall"]),
    ("nat", "KUBE-SERVICES", "OUTPUT", ["-m", "comment", "--comment", "kubernetes service portals"]),
    ("nat", "KUBE-SERVICES", "PREROUTING", ["-m", "comment", "--comment", "kubernetes service portals"]),
    ("nat", "KUBE-POSTROUTING", "POSTROUTING", ["-m", "comment", "--comment", "kubernetes postrouting rules"]),
    ("filter", "KUBE-FIREWALL", "INPUT", []),
    ("filter", "KUBE-FIREWALL", "OUTPUT", []),
]


def jump_commands(iptables="iptables"):
    """argv lists: ``iptables -t T -N CHAIN`` (errors ignored) and ``-I BUILTIN ... -j CHAIN``."""
    out = []
    for table, chain, builtin, args in JUMPS:
        out.append(([iptables, "-w", "-t", table, "-N", chain], True))
        out.append(([iptables, "-w", "-t", table, "-I", builtin] + args + ["-j", chain], False))
    return out


def _q(text):
    return '"%s"' % text


def _svc_rules(svc, cluster_cidr, large, out_chains, out_rules):
    """The KUBE-SVC-/KUBE-SEP- chains and rules of one service (writeServiceToEndpointRules etc.)."""
    name = spn(svc)
    proto = svc["protocol"]
    chain = svc_chain(svc)
    out_chains.append(":%s - [0:0]" % chain)
    out_rules.append("-A %s -m comment --comment %s -m %s -p %s -d %s --dport %d ! -s %s -j KUBE-MARK-MASQ"
                     % (chain, _q(name + " cluster IP"), proto, proto, svc["vip"], svc["port"], cluster_cidr))
    bes = svc["backends"]
    n = len(bes)
    for i, be in enumerate(bes):
        args = ["-A", chain]
        if not large:
            args += ["-m", "comment", "--comment", _q("%s -> %s" % (name, endpoint(be)))]
        if i < n - 1:
            args += ["-m", "statistic", "--mode", "random", "--probability", "%0.10f" % (1.0 / (n - i))]
        args += ["-j", sep_chain(svc, be)]
        out_rules.append(" ".join(args))
    for be in bes:
        sep = sep_chain(svc, be)
        out_chains.append(":%s - [0:0]" % sep)
        com = "" if large else " -m comment --comment %s" % name
        out_rules.append("-A %s%s -s %s -j KUBE-MARK-MASQ" % (sep, com, be["ip"]))
        out_rules.append("-A %s%s -m %s -p %s -j DNAT --to-destination %s" % (sep, com, proto, proto, endpoint(be)))


def iptables_restore(services, cluster_cidr, changed=None):
    """The input of kube-proxy's ``iptables-restore --noflush --counters`` for ``services``.

    ``changed=None``: a full sync (every chain). ``changed=set of spn``: a partial sync after those
    services changed - kube-proxy then still writes the whole filter table and the top-level nat
    chains (KUBE-SERVICES with one rule per service, KUBE-NODEPORTS, KUBE-POSTROUTING,
    KUBE-MARK-MASQ), but only the changed services' KUBE-SVC/KUBE-SEP chains. In large cluster mode
    stale KUBE-SEP chains are not deleted on every sync, so none are here.
    Returns (text, number of rule lines, number of chain lines).
    """
    total_eps = sum(len(s["backends"]) for s in services)
    large = total_eps > LARGE_CLUSTER_ENDPOINTS
    filt_chains = [":%s - [0:0]" % c for c in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD",
                                               "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL")]
    filt_rules = [
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
        '-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark %s/%s -j ACCEPT'
        % (MASQ_MARK, MASQ_MARK),
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        '--ctstate RELATED,ESTABLISHED -j ACCEPT',
    ]
    nat_chains = [":%s - [0:0]" % c for c in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")]
    nat_rules = [
        "-A KUBE-POSTROUTING -m mark ! --mark %s/%s -j RETURN" % (MASQ_MARK, MASQ_MARK),
        "-A KUBE-POSTROUTING -j MARK --xor-mark %s" % MASQ_MARK,
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        "-A KUBE-MARK-MASQ -j MARK --or-mark %s" % MASQ_MARK,
    ]
    for svc in services:
        proto = svc["protocol"]
        nat_rules.append("-A KUBE-SERVICES -m comment --comment %s -m %s -p %s -d %s --dport %d -j %s"
                         % (_q(spn(svc) + " cluster IP"), proto, proto, svc["vip"], svc["port"], svc_chain(svc)))
        if changed is None or spn(svc) in changed:
            _svc_rules(svc, cluster_cidr, large, nat_chains, nat_rules)
    nat_rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
                     'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    text = "\n".join(["*filter"] + filt_chains + filt_rules + ["COMMIT", "*nat"] + nat_chains + nat_rules + ["COMMIT", ""])
    return text, len(filt_rules) + len(nat_rules), len(filt_chains) + len(nat_chains)


# ---- nftables mode --------------------------------------------------------------------------

def nft_base(name):
    """hashAndTruncate: 8 base32 characters of sha256(name), '-', name."""
    return b32hash(name)[:8] + "-" + name


def nft_svc_chain(svc):
    return "service-" + nft_base("%s/%s/%s/%s" % (svc["namespace"], svc["name"], svc["protocol"], PORT_NAME))


def nft_ep_chain(svc, be):
    return "endpoint-" + nft_base("%s/%s/%s/%s__%s/%d" % (svc["namespace"], svc["name"], svc["protocol"], PORT_NAME,
                                                          be["ip"], be["port"]))


def _nft_setup(t, service_cidr):
    """setupNFTables(): the table, base chains, jump chains, sets and maps (first sync)."""
    out = ['add table %s { comment "rules for kube-proxy" ; }' % t]
    # knftables' "dstnat-10" etc. as numbers (dstnat = -100, srcnat = 100): nft 1.0.6 (Debian 12)
    # accepts the names only on the hooks they were defined for
    base = [("filter-prerouting", "filter", "prerouting", "-110"),
            ("filter-input", "filter", "input", "-110"),
            ("filter-forward", "filter", "forward", "-110"),
            ("filter-output", "filter", "output", "-110"),
            ("filter-output-post-dnat", "filter", "output", "-90"),
            ("nat-prerouting", "nat", "prerouting", "-100"),
            ("nat-output", "nat", "output", "-100"),
            ("nat-postrouting", "nat", "postrouting", "100")]
    for name, _typ, _hook, _prio in base:            # first sync: add + delete once (proxier.flushed)
        out += ["add chain %s %s" % (t, name), "delete chain %s %s" % (t, name)]
    for name, typ, hook, prio in base:
        out.append("add chain %s %s { type %s hook %s priority %s ; }" % (t, name, typ, hook, prio))
        out.append("flush chain %s %s" % (t, name))
    jumps = [("nodeport-endpoints-check", "filter-input", "ct state new"),
             ("service-endpoints-check", "filter-input", "ct state new"),
             ("service-endpoints-check", "filter-forward", "ct state new"),
             ("service-endpoints-check", "filter-output", "ct state new"),
             ("firewall-check", "filter-prerouting", "ct state new"),
             ("firewall-check", "filter-output", "ct state new"),
             ("services", "nat-output", ""),
             ("services", "nat-prerouting", ""),
             ("masquerading", "nat-postrouting", ""),
             ("cluster-ips-check", "filter-forward", "ct state new"),
             ("cluster-ips-check", "filter-output-post-dnat", "ct state new")]
    created = set()
    for dst, src, extra in jumps:
        if dst not in created:
            created.add(dst)
            out += ["add chain %s %s" % (t, dst), "flush chain %s %s" % (t, dst)]
        out.append("add rule %s %s %sjump %s" % (t, src, extra + " " if extra else "", dst))
    for c in ("services", "cluster-ips-check", "masquerading", "mark-for-masquerade"):
        if c not in created:
            created.add(c)
            out += ["add chain %s %s" % (t, c), "flush chain %s %s" % (t, c)]
    out += [
        "add rule %s mark-for-masquerade mark set mark or %s" % (t, MASQ_MARK),
        "add rule %s masquerading mark and %s == 0 return" % (t, MASQ_MARK),
        "add rule %s masquerading mark set mark xor %s" % (t, MASQ_MARK),
        "add rule %s masquerading masquerade fully-random" % t,
        'add set %s cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }' % t,
        'add rule %s cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"' % t,
        'add rule %s cluster-ips-check ip daddr { %s } drop comment "Drop traffic to unallocated ClusterIPs"' % (t, service_cidr),
        'add map %s no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or '
        'reject packets to services with no endpoints" ; }' % t,
        'add map %s no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject '
        'packets to service nodeports with no endpoints" ; }' % t,
        'add chain %s reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }' % t,
        "flush chain %s reject-chain" % t,
        "add rule %s reject-chain reject" % t,
        "add rule %s service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services" % t,
        "add rule %s nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports" % t,
        'add map %s firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are '
        'subject to LoadBalancerSourceRanges" ; }' % t,
        "add chain %s firewall-check" % t,
        "add rule %s firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips" % t,
        'add map %s service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP '
        'and LoadBalancer IP traffic" ; }' % t,
        'add map %s service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }' % t,
        "add rule %s services ip daddr . meta l4proto . th dport vmap @service-ips" % t,
        "add rule %s services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports" % t,
    ]
    for container in ("set %s cluster-ips", "map %s service-ips", "map %s firewall-ips", "map %s no-endpoint-services",
                      "map %s no-endpoint-nodeports", "map %s service-nodeports"):
        out.append("flush " + container % t)
    return out


def _nft_svc(t, svc, cluster_cidr, out):
    chain = nft_svc_chain(svc)
    bes = svc["backends"]
    for be in bes:
        out += ["add chain %s %s" % (t, nft_ep_chain(svc, be)), "flush chain %s %s" % (t, nft_ep_chain(svc, be))]
    out += ["add chain %s %s" % (t, chain), "flush chain %s %s" % (t, chain)]
    out.append("add rule %s %s ip daddr %s %s dport %d ip saddr != %s jump mark-for-masquerade"
               % (t, chain, svc["vip"], svc["protocol"], svc["port"], cluster_cidr))
    vmap = " , ".join("%d : goto %s" % (i, nft_ep_chain(svc, be)) for i, be in enumerate(bes))
    out.append("add rule %s %s numgen random mod %d vmap { %s }" % (t, chain, len(bes), vmap))
    for be in bes:
        ep = nft_ep_chain(svc, be)
        out.append("add rule %s %s ip saddr %s jump mark-for-masquerade" % (t, ep, be["ip"]))
        out.append("add rule %s %s meta l4proto %s dnat to %s" % (t, ep, svc["protocol"], endpoint(be)))


def nft_full(services, cluster_cidr, service_cidr):
    """kube-proxy nftables mode's first (full) sync transaction, as ``nft -f`` input.

    Returns (text, number of lines). (knftables writes the same commands to ``nft -f -``.)"""
    t = "ip kube-proxy"
    out = _nft_setup(t, service_cidr)
    for svc in services:
        _nft_svc(t, svc, cluster_cidr, out)
    for svc in services:
        out.append("add element %s cluster-ips { %s }" % (t, svc["vip"]))
        out.append("add element %s service-ips { %s . %s . %d : goto %s }"
                   % (t, svc["vip"], svc["protocol"], svc["port"], nft_svc_chain(svc)))
    return "\n".join(out) + "\n", len(out)


def nft_change(old, new, cluster_cidr):
    """The partial-sync transaction after one service changed from ``old`` to ``new`` (same VIP).

    kube-proxy re-adds and flushes the service's chains and its current endpoint chains, writes
    their rules, and flushes the endpoint chains that became stale (deleted a second later, in the
    next sync). The map elements are unchanged (same VIP, same service chain).
    """
    t = "ip kube-proxy"
    out = []
    _nft_svc(t, new, cluster_cidr, out)
    keep = set(nft_ep_chain(new, be) for be in new["backends"])
    for be in old["backends"]:
        if nft_ep_chain(old, be) not in keep:
            out.append("flush chain %s %s" % (t, nft_ep_chain(old, be)))
    return "\n".join(out) + "\n", len(out)
