"""Randomized agreement: random policies (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)
over a random cluster, seeded; the reference evaluator (evaluate.Evaluator, from the API semantics) and
the compiled entries applied the way the dataplane will (evaluate.CompiledNetwork) must decide every
connection alike: every pod, node and outside address pair, several probes.

Two known limits of identity-keyed entries are kept out of the generator (docs/policy.md): pods with
the same identity (same labels, same namespace) get the same named ports here, and an egress
NetworkPolicy rule with an ipBlock peer has no named ports (the name resolves per identity, not per
address)."""
import random

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils.policy import compile as C
from ansible_collections.kldload.netstack.plugins.module_utils.policy import evaluate as E
from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse as P

NAMESPACES = ("red", "blue", "green")
APPS = ("web", "db", "api")
TIERS = ("front", "back")
WORLD = ("203.0.113.10", "198.51.100.20", "198.51.100.200", "10.9.0.1")
NODES = {"n1": "192.168.1.11", "n2": "192.168.1.12"}
APISERVER = "192.168.1.10"
PROBES = (("TCP", 80), ("TCP", 443), ("UDP", 53), ("TCP", 5432), ("TCP", 9090), ("UDP", 80), ("SCTP", 80))
NAMED = ("http", "pg", "dns", "metrics", "nothing")
CIDRS = ("10.244.0.0/16", "10.244.1.0/24", "10.244.2.0/24", "203.0.113.0/24", "198.51.100.0/24", "0.0.0.0/0",
         "10.0.0.0/8", "192.168.1.0/24")


def _ports_for(labels):
    """Named ports as a function of the labels (so one identity has one set of ports)."""
    out = [{"name": "metrics", "port": 9090, "protocol": "TCP"}]
    app = labels.get("app")
    if app == "web":
        out.append({"name": "http", "port": 80, "protocol": "TCP"})
        out.append({"name": "dns", "port": 53, "protocol": "UDP"})
    elif app == "db":
        out.append({"name": "pg", "port": 5432, "protocol": "TCP"})
    elif app == "api":
        out.append({"name": "http", "port": 443, "protocol": "TCP"})
    return out


def _cluster(rng):
    nss = dict((n, {"env": rng.choice(("prod", "dev"))}) for n in NAMESPACES)
    eps = []
    for i in range(rng.randint(6, 10)):
        labels = {}
        if rng.random() < 0.9:
            labels["app"] = rng.choice(APPS)
        if rng.random() < 0.5:
            labels["tier"] = rng.choice(TIERS)
        node = rng.choice(sorted(NODES))
        eps.append({"namespace": rng.choice(NAMESPACES), "name": "p%d" % i, "node": node, "labels": labels,
                    "ips": ["10.244.%d.%d" % (1 if node == "n1" else 2, 10 + i)], "ports": _ports_for(labels)})
    return {"namespaces": nss, "endpoints": eps, "kube_apiserver": [APISERVER],
            "nodes": [{"name": n, "ips": [ip]} for n, ip in sorted(NODES.items())], "local_node": "n1"}


def _selector(rng, keys=("app", "tier")):
    sel = {}
    r = rng.random()
    if r < 0.2:
        return sel
    key = rng.choice(keys)
    values = {"app": APPS, "tier": TIERS, "env": ("prod", "dev"), "kubernetes.io/metadata.name": NAMESPACES}[key]
    if r < 0.6:
        sel["matchLabels"] = {key: rng.choice(values)}
    else:
        op = rng.choice(("In", "NotIn", "Exists", "DoesNotExist"))
        e = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = rng.sample(list(values), rng.randint(1, 2))
        sel["matchExpressions"] = [e]
    return sel


def _cidr(rng, strict):
    cidr = rng.choice(CIDRS)
    block = {"cidr": cidr}
    if rng.random() < 0.4:
        inner = [c for c in CIDRS if c != cidr and _inside(c, cidr)]
        if inner:
            block["except"] = [rng.choice(inner)]
    return block


def _inside(inner, outer):
    import ipaddress
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    return a.prefixlen > b.prefixlen and a.network_address in b


def _np_ports(rng, named_ok):
    ports = []
    for _i in range(rng.randint(1, 2)):
        p = {}
        if rng.random() < 0.6:
            p["protocol"] = rng.choice(("TCP", "UDP", "SCTP"))
        r = rng.random()
        if r < 0.35:
            p["port"] = rng.choice((80, 443, 53, 5432, 9090))
        elif r < 0.55:
            p["port"] = rng.choice((50, 80, 400))
            p["endPort"] = p["port"] + rng.choice((0, 10, 500))
        elif r < 0.8 and named_ok:
            p["port"] = rng.choice(NAMED)
        ports.append(p)
    return ports


def _np_peer(rng, allow_block):
    r = rng.random()
    if r < 0.25 and allow_block:
        return {"ipBlock": _cidr(rng, True)}
    peer = {}
    if r < 0.6:
        peer["podSelector"] = _selector(rng)
    if r >= 0.45:
        peer["namespaceSelector"] = _selector(rng, ("env", "kubernetes.io/metadata.name"))
    return peer


def _np(rng, i):
    spec = {"podSelector": _selector(rng)}
    types = rng.choice((None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]))
    if types is not None:
        spec["policyTypes"] = types
    for direction, field in (("ingress", "from"), ("egress", "to")):
        if types is not None and direction.capitalize() not in types:
            continue
        if types is None and direction == "egress" and rng.random() < 0.5:
            continue
        rules = []
        for _i in range(rng.randint(0, 2)):
            rule = {}
            has_block = False
            if rng.random() < 0.7:
                rule[field] = [_np_peer(rng, True) for _i in range(rng.randint(1, 2))]
                has_block = any("ipBlock" in p for p in rule[field])
            if rng.random() < 0.6:
                rule["ports"] = _np_ports(rng, named_ok=direction == "ingress" or not has_block)
            rules.append(rule)
        if rules or rng.random() < 0.3:
            spec[direction] = rules
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "np%d" % i, "namespace": rng.choice(NAMESPACES)}, "spec": spec}


def _cilium_selector(rng, namespaced):
    sel = _selector(rng)
    r = rng.random()
    if r < 0.15:
        sel.setdefault("matchLabels", {})["k8s:io.kubernetes.pod.namespace"] = rng.choice(NAMESPACES)
    elif r < 0.25:
        sel = {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.env": rng.choice(("prod", "dev"))}}
    elif r < 0.35:
        sel = {"matchLabels": {"reserved:%s" % rng.choice(("host", "remote-node", "world", "kube-apiserver")): ""}}
    elif r < 0.45 and "matchLabels" in sel:
        sel["matchLabels"] = dict(("any:" + k if rng.random() < 0.5 else "k8s:" + k, v)
                                  for k, v in sel["matchLabels"].items())
    return sel


def _cilium_rule(rng, pre, deny):
    rule = {}
    r = rng.random()
    if r < 0.3:
        rule[pre + "Endpoints"] = [_cilium_selector(rng, True) for _i in range(rng.randint(1, 2))]
    elif r < 0.45:
        entities = ["world", "cluster", "host", "remote-node", "all", "none", "kube-apiserver"]
        rule[pre + "Entities"] = rng.sample(entities, rng.randint(1, 2))
    elif r < 0.55:
        rule[pre + "CIDR"] = [rng.choice(CIDRS)]
    elif r < 0.7:
        rule[pre + "CIDRSet"] = [_cidr(rng, False)]
    if rng.random() < 0.5 or (not rule and rng.random() < 0.7):
        ports = []
        for _i in range(rng.randint(1, 2)):
            p = {"port": rng.choice(("80", "443", "53", "0", "5432", "http", "dns", "pg", "metrics"))}
            if rng.random() < 0.7:
                p["protocol"] = rng.choice(("TCP", "UDP", "ANY", "SCTP"))
            if p["port"] in ("80", "443") and rng.random() < 0.3:
                p["endPort"] = int(p["port"]) + 10
            ports.append(p)
        rule["toPorts"] = [{"ports": ports}]
    return rule


def _cnp(rng, i):
    clusterwide = rng.random() < 0.25
    spec = {"endpointSelector": _selector(rng)}
    for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
        if rng.random() < (0.5 if "Deny" not in section else 0.25):
            pre = "from" if section.startswith("ingress") else "to"
            spec[section] = [_cilium_rule(rng, pre, "Deny" in section) for _i in range(rng.randint(1, 2))]
    if rng.random() < 0.2:
        spec["enableDefaultDeny"] = dict((d, rng.random() < 0.5) for d in ("ingress", "egress") if rng.random() < 0.7)
    md = {"name": "c%d" % i}
    if not clusterwide:
        md["namespace"] = rng.choice(NAMESPACES)
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy" if clusterwide else "CiliumNetworkPolicy",
            "metadata": md, "spec": spec}


def _policies(rng):
    out = []
    for i in range(rng.randint(2, 7)):
        out.append(_np(rng, i) if rng.random() < 0.55 else _cnp(rng, i))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_reference_and_compiled_agree(seed):
    rng = random.Random(seed)
    cluster = _cluster(rng)
    docs = _policies(rng)
    pols = P.normalize(docs)
    ref = E.Evaluator(pols, cluster)
    net = E.CompiledNetwork(C.compile_all(pols, cluster))
    keys = ["%s/%s" % (e["namespace"], e["name"]) for e in cluster["endpoints"]]
    others = list(WORLD) + sorted(NODES.values()) + [APISERVER]
    pairs = [(s, d) for s in keys for d in keys] + [(o, k) for o in others for k in keys] + \
        [(k, o) for k in keys for o in others]
    bad = []
    decided = {True: 0, False: 0}
    for s, d in pairs:
        for proto, port in PROBES:
            r_ok, r_why = ref.decide(s, d, proto, port)
            c_ok, c_why = net.decide(s, d, proto, port)
            decided[r_ok] += 1
            if r_ok != c_ok:
                bad.append("%s -> %s %s/%d: reference %s (%s), compiled %s (%s)"
                           % (s, d, proto, port, r_ok, r_why, c_ok, c_why))
    assert not bad, "seed %d, %d disagreements:\n%s\npolicies: %s" % (seed, len(bad), "\n".join(bad[:10]), docs)


def test_random_cases_are_not_trivial():
    """Over all seeds, both verdicts occur often (the generator makes policies that matter)."""
    counts = {True: 0, False: 0}
    for seed in range(10):
        rng = random.Random(seed)
        cluster = _cluster(rng)
        ref = E.Evaluator(P.normalize(_policies(rng)), cluster)
        keys = ["%s/%s" % (e["namespace"], e["name"]) for e in cluster["endpoints"]]
        for s in keys:
            for d in keys + list(WORLD):
                counts[ref.decide(s, d, "TCP", 80)[0]] += 1
    assert min(counts.values()) > 0.1 * sum(counts.values())
