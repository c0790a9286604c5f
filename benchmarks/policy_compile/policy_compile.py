# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policy compiler benchmark: how long validating and compiling N policies over M endpoints takes
(it runs in every play and at CNI ADD, on one core).

A synthetic but realistic cluster (``workload()``): namespaces with a team label, endpoints with
app/tier/version labels and named ports spread over three nodes; policies mostly per-app
NetworkPolicies (pod and namespace selectors, numeric and named ports, some ipBlocks), some
CiliumNetworkPolicies (endpoints, entities, CIDR sets, deny rules, ANY protocol) and a few
clusterwide ones. Times: parse.normalize, compile_node (one node), compile_all (every node), the
best of --rounds. Pure Python, no root; the unit tests import workload() for a speed smoke.

    benchmarks/policy_compile/run [--policies 1000] [--endpoints 100] [--rounds 5] [--json]
"""

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, ".collections"))

APPS = ["app-%d" % i for i in range(20)]
TIERS = ["front", "back", "data"]


def _np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _cnp(ns, name, spec):
    md = {"name": name}
    if ns:
        md["namespace"] = ns
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy" if ns else "CiliumClusterwideNetworkPolicy",
            "metadata": md, "spec": spec}


def workload(n_policies=1000, n_endpoints=100, n_namespaces=10, seed=1):
    """(policy documents, cluster input) of the given size, deterministic for a seed."""
    rng = random.Random(seed)
    namespaces = dict(("ns-%d" % i, {"team": "team-%d" % (i % 3)}) for i in range(n_namespaces))
    nss = sorted(namespaces)
    nodes = [{"name": "node-%d" % i, "ips": ["192.168.1.%d" % (11 + i)]} for i in range(3)]
    endpoints = []
    for i in range(n_endpoints):
        endpoints.append({
            "namespace": nss[i % n_namespaces], "name": "pod-%d" % i, "node": "node-%d" % (i % 3),
            "labels": {"app": rng.choice(APPS), "tier": rng.choice(TIERS), "version": "v%d" % rng.randint(1, 2)},
            "ips": ["10.244.%d.%d/24" % (i % 3, 10 + i // 3)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "metrics", "port": 9090, "protocol": "TCP"}]})
    docs = []
    for i in range(n_policies):
        ns = rng.choice(nss)
        r = rng.random()
        if r < 0.7:
            peer = rng.choice([
                {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}},
                {"namespaceSelector": {"matchLabels": {"team": "team-%d" % rng.randint(0, 2)}},
                 "podSelector": {"matchLabels": {"tier": rng.choice(TIERS)}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In",
                                                             "values": ["team-0", "team-1"]}]}},
                {"ipBlock": {"cidr": "10.%d.0.0/16" % rng.randint(0, 255), "except": []}},
            ])
            ports = rng.choice([[{"port": 8080}], [{"port": "http"}], [{"port": 8000, "endPort": 8100}],
                                [{"protocol": "UDP", "port": 53}, {"port": "metrics"}]])
            spec = {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}},
                    "ingress": [{"from": [peer], "ports": ports}]}
            if rng.random() < 0.3:
                spec["egress"] = [{"to": [{"podSelector": {"matchLabels": {"tier": rng.choice(TIERS)}}}]}]
            docs.append(_np(ns, "np-%d" % i, spec))
        elif r < 0.97:
            rule = rng.choice([
                {"fromEndpoints": [{"matchLabels": {"app": rng.choice(APPS)}}],
                 "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]},
                {"fromEntities": ["world", "cluster"], "toPorts": [{"ports": [{"port": "443", "protocol": "ANY"}]}]},
                {"fromCIDRSet": [{"cidr": "172.%d.0.0/16" % rng.randint(16, 31),
                                  "except": ["172.%d.1.0/24" % rng.randint(16, 31)]}]},
            ])
            if "fromCIDRSet" in rule:
                rule["fromCIDRSet"][0]["except"] = [rule["fromCIDRSet"][0]["cidr"].replace("0.0/16", "1.0/24")]
            spec = {"endpointSelector": {"matchLabels": {"app": rng.choice(APPS), "tier": rng.choice(TIERS)}},
                    "ingress": [rule]}
            if rng.random() < 0.2:
                spec["ingressDeny"] = [{"fromEndpoints": [{"matchLabels": {"version": "v1"}}]}]
            docs.append(_cnp(ns, "cnp-%d" % i, spec))
        else:
            docs.append(_cnp(None, "ccnp-%d" % i, {
                "endpointSelector": {"matchLabels": {"app": rng.choice(APPS)}},
                "egress": [{"toEntities": ["kube-apiserver", "host"]},
                           {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-0"}}]}]}))
    cluster = {"namespaces": namespaces, "endpoints": endpoints, "nodes": nodes, "local_node": "node-0"}
    return docs, cluster


def _best(fn, rounds):
    best, out = None, None
    for _i in range(rounds):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None or dt < best else best
    return best, out


def main(argv=None):
    from ansible_collections.kldload.netstack.plugins.module_utils.policy import compile as pcompile
    from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    docs, cluster = workload(args.policies, args.endpoints)
    t_parse, pols = _best(lambda: parse.normalize(docs), args.rounds)
    t_node, out = _best(lambda: pcompile.compile_node(pols, cluster), args.rounds)
    t_all, outs = _best(lambda: pcompile.compile_all(pols, cluster), args.rounds)
    entries = sum(len(e["entries"]) for o in outs.values() for e in o["endpoints"].values())
    res = {"policies": args.policies, "endpoints": args.endpoints, "parse_s": round(t_parse, 4),
           "compile_node_s": round(t_node, 4), "compile_all_s": round(t_all, 4),
           "local_endpoints": len(out["endpoints"]), "entries_all_nodes": entries,
           "identities": len(out["identities"]), "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for k in ("policies", "endpoints", "parse_s", "compile_node_s", "compile_all_s", "local_endpoints",
                  "entries_all_nodes", "identities", "python"):
            print("%-18s %s" % (k, res[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
