"""The policy compiler's output (plugins/module_utils/policy/compile.py): identities, ipcache, CIDR
identities, per-endpoint entries (selector expansion, ports, named ports, deny), cluster validation,
diff, and a speed smoke (untimed: the timing is benchmarks/policy_compile)."""
import json
import sys
from pathlib import Path

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils.policy import compile as C
from ansible_collections.kldload.netstack.plugins.module_utils.policy import evaluate as E
from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as I
from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse as P

REPO = Path(__file__).resolve().parents[2]

CLUSTER = {
    "namespaces": {"shop": {"team": "a"}, "ops": {"labels": {"team": "b"}}},
    "endpoints": [
        {"namespace": "shop", "name": "web-1", "node": "n1", "labels": {"app": "web"}, "ips": ["10.244.1.5/24"],
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]},
        {"namespace": "shop", "name": "web-2", "node": "n2", "labels": {"app": "web"}, "ips": ["10.244.2.5"],
         "ports": [{"name": "http", "port": 8080}]},
        {"namespace": "shop", "name": "db-1", "node": "n1", "labels": {"app": "db"}, "ips": ["10.244.1.6", "fd00::6"],
         "ports": [{"name": "pg", "port": 5432}]},
        {"namespace": "ops", "name": "mon-1", "node": "n2", "labels": {"app": "mon"}, "ips": ["10.244.2.7"], "ports": []},
    ],
    "nodes": [{"name": "n1", "ips": ["192.168.1.11"]}, {"name": "n2", "ips": ["192.168.1.12/24"]}],
    "local_node": "n1",
}


def pols(text):
    return P.load_policies(text, "t.yaml")


def ids(out):
    return dict((k, v["identity"]) for o in ([out] if "node" in out else out.values())
                for k, v in o["endpoints"].items())


def entries(out, key, direction=None):
    return [(e["identity"], e["by_address"], e["protocol"], e["port"], e["end_port"], e["deny"])
            for e in out["endpoints"][key]["entries"] if direction in (None, e["direction"])]


def test_output_format():
    out = C.compile_node(pols("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 8080}]
"""), CLUSTER)
    json.dumps(out)                                       # JSON-serialisable
    assert set(out) == {"node", "identities", "ipcache", "cidrs", "endpoints"}
    assert out["node"] == "n1"
    assert sorted(out["endpoints"]) == ["shop/db-1", "shop/web-1"]           # the local node's only
    i = ids(C.compile_all([], CLUSTER))
    assert i["shop/web-1"] == i["shop/web-2"] != i["shop/db-1"]            # same labels and namespace
    assert out["ipcache"] == [["10.244.1.5/32", i["shop/web-1"]], ["10.244.1.6/32", i["shop/db-1"]],
                              ["10.244.2.5/32", i["shop/web-2"]], ["10.244.2.7/32", i["ops/mon-1"]],
                              ["192.168.1.11/32", 1], ["192.168.1.12/32", 6]]
    web = out["endpoints"]["shop/web-1"]
    assert web == {"ip": "10.244.1.5", "identity": i["shop/web-1"], "node": "n1", "ingress_enforced": True,
                   "egress_enforced": False, "entries": [
                       {"direction": "ingress", "identity": i["shop/db-1"], "by_address": False, "protocol": 6,
                        "port": 8080, "end_port": 8080, "deny": False,
                        "rule": "NetworkPolicy shop/web ingress[0]"}]}
    assert out["endpoints"]["shop/db-1"]["entries"] == [] and not out["endpoints"]["shop/db-1"]["ingress_enforced"]
    idt = out["identities"]
    assert idt[1] == {"labels": ["reserved:host"], "kind": "reserved"} and idt[0]["kind"] == "reserved"
    assert idt[i["ops/mon-1"]] == {"kind": "endpoint", "labels": [
        "k8s:app=mon", "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=ops",
        "k8s:io.cilium.k8s.namespace.labels.team=b", "k8s:io.kubernetes.pod.namespace=ops"]}
    assert all(256 <= i[k] < 2 ** 24 for k in i)
    # the other node sees its own address as host, n1's as remote-node
    out2 = C.compile_node([], CLUSTER, node="n2")
    assert ["192.168.1.11/32", 6] in out2["ipcache"] and ["192.168.1.12/32", 1] in out2["ipcache"]
    assert sorted(out2["endpoints"]) == ["ops/mon-1", "shop/web-2"]


def test_compile_takes_documents_too():
    docs = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "a", "namespace": "shop"},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}]
    out = C.compile_node(docs, CLUSTER)
    assert out["endpoints"]["shop/web-1"]["egress_enforced"]
    with pytest.raises(P.PolicyError):
        C.compile_node([{"kind": "Nope"}], CLUSTER)
    # validated once (what node.validate_state keeps): the same list of documents, compiled without parsing again
    validated = P.validated(docs)
    assert validated == docs and json.loads(json.dumps(validated)) == docs
    assert C.compile_node(validated, CLUSTER) == out
    with pytest.raises(P.PolicyError, match="Nope"):
        P.validated([{"kind": "Nope"}])


def test_selector_expansion_entities_and_cidrs():
    out = C.compile_node(pols("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEntities: [world]
  - fromEntities: [cluster]
  - fromEntities: [all, none]
  - fromEntities: [host, remote-node, kube-apiserver]
  - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
  - fromCIDR: [10.0.0.0/8]
  - fromEndpoints: [{}]
  - fromEndpoints: [{matchLabels: {'reserved:world': ''}}]
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: ops}}]
"""), CLUSTER)
    i = ids(C.compile_all([], CLUSTER))
    c10 = 2 ** 24                       # the only CIDR identity: 10.0.0.0/8 (0.0.0.0/0 is world)
    assert out["cidrs"] == [["10.0.0.0/8", c10]]
    assert out["identities"][c10] == {"labels": ["cidr:10.0.0.0/8", "reserved:world"], "kind": "cidr",
                                      "cidr": "10.0.0.0/8"}
    rules = {}
    for e in out["endpoints"]["shop/db-1"]["entries"]:
        rules.setdefault(e["rule"].split()[-1], set()).add(e["identity"])
        assert not e["by_address"] and e["protocol"] == 0 and e["port"] == 0 and e["end_port"] == 0
    eps = set(i.values())
    assert rules == {
        "ingress[0]": {2, c10},
        "ingress[1]": {1, 3, 4, 5, 6, 7, 8} | eps,
        "ingress[2]": {0},
        "ingress[3]": {1, 6, 7},
        "ingress[4]": {2},
        "ingress[5]": {c10},
        "ingress[6]": {i["shop/web-1"], i["shop/db-1"]},
        "ingress[7]": {2, c10},
        "ingress[8]": {i["ops/mon-1"]},
    }


def test_networkpolicy_ipblock_is_by_address_and_ports():
    out = C.compile_node(pols("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: n, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}
    - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}
    ports: [{port: 5432}, {protocol: UDP, port: 1000, endPort: 2000}, {protocol: SCTP}]
  - {}
"""), CLUSTER)
    c10, c244, c2442 = 2 ** 24, 2 ** 24 + 1, 2 ** 24 + 2
    assert out["cidrs"] == [["10.0.0.0/8", c10], ["10.244.0.0/16", c244], ["10.244.2.0/24", c2442]]
    got = entries(out, "shop/db-1")
    want = set()
    for ident in (c244, 2):             # 10.244/16 minus 10.244.2/24; 0/0 minus 10/8: world only
        want |= {(ident, True, 6, 5432, 5432, False), (ident, True, 17, 1000, 2000, False),
                 (ident, True, 132, 0, 0, False)}
    want.add((0, False, 0, 0, 0, False))                  # ingress: [{}] allows everything
    assert set(got) == want and len(got) == len(want)


def test_named_ports():
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: n, namespace: shop}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: http}, {port: dns, protocol: UDP}, {port: dns}, {port: nothing}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: http}, {port: pg}]
  - to: [{ipBlock: {cidr: 10.244.1.0/24}}]
    ports: [{port: pg}]
  - ports: [{port: dns, protocol: UDP}]
"""
    out = C.compile_node(pols(text), CLUSTER)
    i = ids(C.compile_all([], CLUSTER))
    web, db = i["shop/web-1"], i["shop/db-1"]
    # ingress: the endpoint's own ports (dns is UDP: {port: dns} is TCP and resolves to nothing)
    assert entries(out, "shop/web-1", "ingress") == [(0, False, 6, 8080, 8080, False), (0, False, 17, 53, 53, False)]
    assert entries(out, "shop/db-1", "ingress") == []
    # egress: per destination identity; the ipBlock peer resolves on the endpoints in the block
    assert set(entries(out, "shop/db-1", "egress")) == {
        (web, False, 6, 8080, 8080, False), (db, False, 6, 5432, 5432, False),      # podSelector {}
        (web, False, 17, 53, 53, False),                                             # any peer: web-1's dns
    }
    assert out["endpoints"]["shop/db-1"]["egress_enforced"]


def test_cilium_any_protocol_deny_and_named():
    out = C.compile_node(pols("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts: [{ports: [{port: '80'}, {port: HTTP, protocol: ANY}, {port: '0', protocol: UDP}]}]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: '22', endPort: 23, protocol: TCP}]}]
  egressDeny:
  - toEntities: [all]
"""), CLUSTER)
    web = out["endpoints"]["shop/web-1"]
    assert web["ingress_enforced"] and web["egress_enforced"]
    assert entries(out, "shop/web-1") == [
        (0, False, 0, 0, 0, True),                        # egressDeny all
        (0, False, 6, 80, 80, False), (0, False, 6, 8080, 8080, False), (0, False, 17, 0, 0, False),
        (0, False, 17, 80, 80, False), (0, False, 132, 80, 80, False),
        (2, False, 6, 22, 23, True),
    ]
    assert [e["direction"] for e in web["entries"]] == ["egress"] + ["ingress"] * 6


def test_known_identities_are_kept():
    out = C.compile_node([], CLUSTER)
    web = out["endpoints"]["shop/web-1"]["identity"]
    moved = {"1234": out["identities"][web]["labels"]}
    again = C.compile_node([], CLUSTER, known=moved)
    assert again["endpoints"]["shop/web-1"]["identity"] == 1234
    assert C.compile_node([], CLUSTER, known=out["identities"]) == out


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c["endpoints"][0].update(ips=["10.244.1.300"]),
     r"cluster.endpoints\[0\] \(shop/web-1\).ips\[0\]: '10.244.1.300' is not an IP address"),
    (lambda c: c["endpoints"][1].update(ips=["10.244.1.5"]), r"endpoints\[1\] \(shop/web-2\).ips\[0\]: 10.244.1.5 is "
                                                             r"also shop/web-1"),
    (lambda c: c["endpoints"].append(dict(c["endpoints"][0])), r"endpoints\[4\] \(shop/web-1\): listed twice"),
    (lambda c: c["endpoints"][0].update(labels={"bad key": "x"}), r"endpoints\[0\] \(shop/web-1\).labels: label key"),
    (lambda c: c["endpoints"][0].update(ports=[{"port": 0}]), r"ports\[0\].port: 0 must be a number"),
    (lambda c: c["endpoints"][0].update(ports=[{"port": 1, "name": "Bad"}]), r"ports\[0\].name: 'Bad' is not a port"),
    (lambda c: c["nodes"][0].update(ips=["10.244.2.7"]), r"endpoints\[3\] \(ops/mon-1\).ips\[0\]: 10.244.2.7 is also "
                                                         r"node n1"),
])
def test_cluster_validation(mutate, msg):
    c = json.loads(json.dumps(CLUSTER))
    mutate(c)
    with pytest.raises(P.PolicyError, match=msg):
        C.compile_node([], c)


def test_kube_apiserver_addresses():
    cl = dict(CLUSTER, kube_apiserver=["10.0.0.1"])
    out = C.compile_node(pols("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toEntities: [kube-apiserver]}]
"""), cl)
    assert ["10.0.0.1/32", 7] in out["ipcache"]
    assert entries(out, "shop/web-1") == [(7, False, 0, 0, 0, False)]
    assert E.lookup(out, "shop/web-1", "egress", "10.0.0.1", "TCP", 443)[0]
    assert not E.lookup(out, "shop/web-1", "egress", "10.0.0.2", "TCP", 443)[0]
    with pytest.raises(P.PolicyError, match=r"cluster.kube_apiserver\[0\]: 192.168.1.11 is node n1: an API server on "
                                            r"a node or pod address is not supported yet"):
        C.compile_node([], dict(CLUSTER, kube_apiserver=["192.168.1.11"]))


def test_diff():
    base = pols("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 8080}]
""")
    before = C.compile_node([], CLUSTER)
    after = C.compile_node(base, CLUSTER)
    db = after["endpoints"]["shop/db-1"]["identity"]
    assert C.diff(before, before) == [] and C.diff(after, after) == []
    assert C.diff(before, after) == [
        "shop/web-1: ingress now isolated (default deny)",
        "shop/web-1: ingress + allow from identity %d (k8s:app=db,k8s:io.kubernetes.pod.namespace=shop,...) TCP/8080 "
        "(NetworkPolicy shop/web ingress[0])" % db,
    ]
    assert C.diff(after, before) == [
        "shop/web-1: ingress no longer isolated (default allow)",
        "shop/web-1: ingress - allow from identity %d (k8s:app=db,k8s:io.kubernetes.pod.namespace=shop,...) TCP/8080 "
        "(NetworkPolicy shop/web ingress[0])" % db,
    ]
    lines = C.diff(None, after)
    assert lines[0].startswith("shop/db-1: new endpoint, identity %d (k8s:app=db," % db)
    cl = json.loads(json.dumps(CLUSTER))
    cl["endpoints"] = [e for e in cl["endpoints"] if e["name"] != "db-1"]
    assert "shop/db-1: endpoint removed (identity %d)" % db in C.diff(after, C.compile_node(base, cl))
    deny = C.compile_node(pols("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: d, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egressDeny: [{toCIDRSet: [{cidr: 10.0.0.0/8}], toPorts: [{ports: [{port: '1', endPort: 1024, protocol: UDP}]}]}]
"""), CLUSTER)
    assert C.diff(before, deny) == [
        "shop/db-1: egress now isolated (default deny)",
        "shop/db-1: egress + deny to identity 16777216 (cidr:10.0.0.0/8,reserved:world) UDP/1-1024 "
        "(CiliumNetworkPolicy shop/d egressDeny[0])",
    ]


def test_lookup_single_node():
    out = C.compile_node(pols("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.244.1.0/24}}]
"""), CLUSTER)
    assert E.lookup(out, "shop/web-1", "ingress", "10.244.1.6", "TCP", 1)[0]          # db-1 by address
    assert not E.lookup(out, "shop/web-1", "ingress", "10.244.2.7", "TCP", 1)[0]      # mon-1
    assert E.lookup(out, "shop/web-1", "ingress", "192.168.1.11", "UDP", 9)[0]        # its own host
    assert not E.lookup(out, "shop/web-1", "ingress", "192.168.1.12", "UDP", 9)[0]    # a remote node
    assert E.lookup(out, "shop/web-1", "egress", "8.8.8.8", "SCTP", 9) == (True, "not enforced")


def test_speed_smoke():
    """1,000 policies over 100 endpoints compile (the time is measured by the benchmark, not here)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "policy_compile"))
    try:
        import policy_compile as bench
    finally:
        sys.path.pop(0)
    docs, cluster = bench.workload(1000, 100)
    out = C.compile_all(P.normalize(docs), cluster)
    assert len(out) == 3 and sum(len(o["endpoints"]) for o in out.values()) == 100
    assert bench.main(["--policies", "50", "--endpoints", "20", "--rounds", "1", "--json"]) == 0


def test_identity_ids_below_vni_limit_and_reserved_labels():
    out = C.compile_node([], CLUSTER)
    for ident, info in out["identities"].items():
        assert info["kind"] == I.kind(ident)
        if info["kind"] == "endpoint":
            assert 256 <= ident < 2 ** 24
