"""Policy input (plugins/module_utils/policy/parse.py): what is accepted, how it is normalized, and
every kind of bad input rejected with a message naming the document and the field path."""
from pathlib import Path

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse as P

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO.parent / "shared" / "examples"     # beside the checkout on the development machine; CI has copies only
FIXTURES = REPO / "tests" / "fixtures" / "policy"

NP_HEAD = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: prod\n"
CNP_HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: c\n  namespace: prod\n"


def errors(text, where="t.yaml"):
    with pytest.raises(P.PolicyError) as ei:
        P.load_policies(text, where)
    assert str(ei.value) == "\n".join(ei.value.errors)
    return ei.value.errors


def one_error(text):
    errs = errors(text)
    assert len(errs) == 1, errs
    return errs[0]


def np(spec):
    return NP_HEAD + "spec:\n" + "".join("  %s\n" % line for line in spec.strip("\n").split("\n"))


def cnp(spec):
    return CNP_HEAD + "spec:\n" + "".join("  %s\n" % line for line in spec.strip("\n").split("\n"))


# --------------------------------------------------------------------------------------------
# the example files users write


def _example(name):
    for d in (FIXTURES, FIXTURES / "not-enforced", EXAMPLES):
        if (d / name).exists():
            return (d / name).read_text()
    pytest.skip("%s not available" % name)


def test_example_backend_ingress_is_accepted():
    [pol] = P.load_policies(_example("policy-backend-ingress.yaml"), "policy-backend-ingress.yaml")
    assert pol["kind"] == "NetworkPolicy" and pol["namespace"] == "production" and pol["name"] == "backend-ingress"
    [spec] = pol["specs"]
    assert spec["ingress_isolation"] and not spec["egress_isolation"]
    assert spec["subject"] == (("k8s", "app", "In", ("backend",)),
                               ("k8s", "io.kubernetes.pod.namespace", "In", ("production",)))
    [rule] = spec["rules"]
    assert rule["name"] == "NetworkPolicy production/backend-ingress ingress[0]"
    assert rule["peers"] == [{"selector": (("k8s", "app", "In", ("frontend",)),
                                           ("k8s", "io.kubernetes.pod.namespace", "In", ("production",)))}]
    assert rule["ports"] == [{"protocol": 6, "port": 8080, "end_port": 8080}]


def test_example_default_deny_is_accepted():
    [pol] = P.load_policies(_example("policy-default-deny.yaml"), "policy-default-deny.yaml")
    [spec] = pol["specs"]
    # ingress: [{}] / egress: [{}]: default deny both ways, nothing allowed
    assert spec["ingress_isolation"] and spec["egress_isolation"] and spec["rules"] == []
    assert spec["subject"] == (("k8s", "io.kubernetes.pod.namespace", "In", ("production",)),)


def test_fixtures_are_the_examples():
    """The copies the tests use (CI clones the repository alone) are the examples as written."""
    copies = [c for d in (FIXTURES, FIXTURES / "not-enforced", FIXTURES.parent / "bgp") for c in d.glob("*.yaml")]
    assert len(copies) == 7
    if not EXAMPLES.exists():
        pytest.skip("%s is not beside the checkout" % EXAMPLES)
    for c in copies:
        assert c.read_text() == (EXAMPLES / c.name).read_text(), c


def test_example_l7_http_is_rejected():
    err = one_error(_example("policy-backend-http.yaml"))
    assert err == ("CiliumNetworkPolicy production/backend-http-policy: not enforced by this dataplane yet: "
                   "spec.ingress[0].toPorts[0].rules.http")


def test_example_fqdn_is_rejected():
    err = one_error(_example("policy-egress-dns-allowlist.yaml"))
    assert err == ("CiliumNetworkPolicy production/egress-dns-allowlist: not enforced by this dataplane yet: "
                   "spec.egress[0].toFQDNs")


# --------------------------------------------------------------------------------------------
# documents


def test_not_yaml():
    err = one_error("a: [b\n")
    assert err.startswith("t.yaml: not valid YAML: ")


def test_duplicate_yaml_key_is_an_error():
    err = one_error(NP_HEAD + "spec:\n  podSelector: {}\n  podSelector: {}\n")
    assert "duplicate key 'podSelector'" in err


def test_document_not_a_mapping():
    err = one_error("- a\n- b\n")
    assert err == "t.yaml document 1: a policy document must be a mapping, not a list"


def test_unknown_kind_and_api_version():
    errs = errors("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n---\n"
                  "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: y}\nspec: {}\n")
    assert errs[0].startswith("Pod (t.yaml document 1): kind: 'Pod' is not a policy kind")
    assert errs[1].startswith("NetworkPolicy default/y: apiVersion: 'networking.k8s.io/v1beta1': a NetworkPolicy is "
                              "networking.k8s.io/v1")


def test_metadata_name():
    assert one_error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: a}\nspec: {}\n") \
        == "NetworkPolicy (t.yaml document 1): metadata.name: required"
    assert "metadata.name: 'Bad_Name' must be a DNS subdomain" in \
        one_error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {}\n")
    assert "metadata: required" in one_error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}\n")


def test_namespace_defaults_to_default():
    [pol] = P.load_policies("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n"
                            "spec: {podSelector: {}}\n")
    assert pol["namespace"] == "default" and pol["label"] == "NetworkPolicy default/p"
    assert pol["specs"][0]["subject"] == (("k8s", "io.kubernetes.pod.namespace", "In", ("default",)),)
    assert "metadata.namespace: 'Bad.NS' must be a DNS label" in one_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: Bad.NS}\nspec: {}\n")


def test_clusterwide_has_no_namespace():
    err = one_error("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c, namespace: x}\n"
                    "spec: {endpointSelector: {}}\n")
    assert err.startswith("CiliumClusterwideNetworkPolicy c: metadata.namespace: a CiliumClusterwideNetworkPolicy is "
                          "cluster-wide")


def test_duplicate_policies():
    text = np("podSelector: {}") + "---\n" + np("podSelector: {}")
    err = one_error(text)
    assert err == ("NetworkPolicy prod/p: metadata.name: NetworkPolicy prod/p is defined twice (also in t.yaml "
                   "document 1)")
    # the same name in another namespace, or of another kind, is another policy
    other_ns = text.replace("namespace: prod", "namespace: dev", 1)
    assert len(P.load_policies(other_ns)) == 2
    other_kind = np("podSelector: {}") + "---\n" + cnp("endpointSelector: {}").replace("name: c", "name: p")
    assert len(P.load_policies(other_kind)) == 2


def test_list_documents_are_expanded():
    text = ("apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n"
            "  metadata: {name: a, namespace: x}\n  spec: {podSelector: {}}\n"
            "- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {name: b, namespace: x}\n"
            "  spec: {endpointSelector: {}, ingress: [{}]}\n")
    assert [p["name"] for p in P.load_policies(text)] == ["a", "b"]
    err = one_error(text.replace("- apiVersion: cilium.io/v2", "- 5\n- apiVersion: cilium.io/v2"))
    assert err == "t.yaml document 1 items[1]: a policy document must be a mapping, not a number"


def test_normalize_takes_parsed_dicts():
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "a"},
           "spec": {"podSelector": {}, "ingress": [{}]}}
    [pol] = P.normalize([doc])
    assert pol["doc"] is doc
    assert pol["specs"][0]["rules"][0]["peers"] is None and pol["specs"][0]["rules"][0]["ports"] is None
    with pytest.raises(P.PolicyError, match=r"^policies.json document 2: a policy document must be a mapping"):
        P.normalize([doc, "x"], where="policies.json")


def test_all_errors_of_a_document_set_together():
    text = (np("podSelector: {}\ningress:\n- fromm: []") + "---\n"
            + cnp("endpointSelector: {}\negress:\n- toFQDNs: [{matchName: a.example}]").replace("name: c", "name: d")
            + "---\n- not a mapping\n")
    errs = errors(text)
    assert errs == [
        "NetworkPolicy prod/p: spec.ingress[0].fromm: unknown field (did you mean from? a NetworkPolicy ingress rule "
        "has from, ports)",
        "CiliumNetworkPolicy prod/d: not enforced by this dataplane yet: spec.egress[0].toFQDNs",
        "t.yaml document 3: a policy document must be a mapping, not a list",
    ]


# --------------------------------------------------------------------------------------------
# NetworkPolicy fields


@pytest.mark.parametrize("spec,path,why", [
    ("podSelector: {}\nextra: 1", "spec.extra", "unknown field"),
    ("podSelector: {matchLabels: {'bad key': x}}", "spec.podSelector.matchLabels", "label key 'bad key' is invalid"),
    ("podSelector: {matchLabels: {app: -x}}", "spec.podSelector.matchLabels.app", "label value '-x' is invalid"),
    ("podSelector: {matchExpressions: [{key: app, operator: Foo}]}", "spec.podSelector.matchExpressions[0].operator",
     "'Foo' is not one of"),
    ("podSelector: {matchExpressions: [{key: app, operator: In}]}", "spec.podSelector.matchExpressions[0].values",
     "needs a non-empty list"),
    ("podSelector: {}\npolicyTypes: [Ingress, Bogus]", "spec.policyTypes[1]", "'Bogus' is not Ingress or Egress"),
    ("podSelector: {}\npolicyTypes: [Ingress]\negress:\n- {}", "spec.egress",
     "has 1 rule(s) but spec.policyTypes (Ingress) does not list Egress"),
    ("podSelector: {}\ningress:\n- from:\n  - {}", "spec.ingress[0].from[0]", "must set podSelector, namespaceSelector"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8}\n    podSelector: {}", "spec.ingress[0].from[0]",
     "ipBlock cannot be combined"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: 0", "spec.ingress[0].ports[0].port", "0 is out of range (1-65535)"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: 70000", "spec.ingress[0].ports[0].port", "70000 is out of range"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: 80\n    endPort: 70000", "spec.ingress[0].ports[0].endPort",
     "must be a port number from 1 to 65535"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: http\n    endPort: 90", "spec.ingress[0].ports[0].endPort",
     "cannot be used with the named port 'http'"),
    ("podSelector: {}\ningress:\n- ports:\n  - endPort: 90", "spec.ingress[0].ports[0].endPort", "needs a numeric port"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: Http_1", "spec.ingress[0].ports[0].port",
     "'Http_1' is not a valid port name (IANA service name)"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: a-very-long-port-name", "spec.ingress[0].ports[0].port",
     "at most 15 characters"),
    ("podSelector: {}\ningress:\n- ports:\n  - port: '80'", "spec.ingress[0].ports[0].port",
     "write the number 80 without quotes"),
    ("podSelector: {}\ningress:\n- ports:\n  - {protocol: ICMP, port: 80}", "spec.ingress[0].ports[0].protocol",
     "'ICMP' is not one of TCP, UDP, SCTP"),
    ("podSelector: {}\ningress:\n- ports:\n  - {protocol: tcp}", "spec.ingress[0].ports[0].protocol", "'tcp'"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0/8}", "spec.ingress[0].from[0].ipBlock.cidr",
     "'10.0.0/8' is not a CIDR"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.1/8}", "spec.ingress[0].from[0].ipBlock.cidr",
     "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/24]}",
     "spec.ingress[0].from[0].ipBlock.except[0]", "192.168.0.0/24 is not inside 10.0.0.0/8"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}",
     "spec.ingress[0].from[0].ipBlock.except[0]", "must be a strict subset of 10.0.0.0/8"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 'fd00::/8'}", "spec.ingress[0].from[0].ipBlock.cidr",
     "fd00::/8: IPv6 is not enforced by this dataplane yet"),
    ("podSelector: {}\ningress:\n- from:\n  - ipBlock: {except: [10.0.0.0/8]}", "spec.ingress[0].from[0].ipBlock.cidr",
     "required"),
    ("podSelector: {}\ningress: {from: []}", "spec.ingress", "must be a list of rules, not a mapping"),
])
def test_networkpolicy_errors_name_the_field(spec, path, why):
    err = one_error(np(spec))
    prefix = "NetworkPolicy prod/p: %s: " % path
    assert err.startswith(prefix), err
    assert why in err, err


def test_misspelled_peer_field():
    errs = errors(np("podSelector: {}\ningress:\n- from:\n  - podSelectr: {}"))
    assert errs == ["NetworkPolicy prod/p: spec.ingress[0].from[0].podSelectr: unknown field (did you mean podSelector? "
                    "a NetworkPolicy peer has podSelector, namespaceSelector, ipBlock)",
                    "NetworkPolicy prod/p: spec.ingress[0].from[0]: a peer must set podSelector, namespaceSelector or "
                    "ipBlock"]


def test_endport_below_port_message():
    err = one_error(np("podSelector: {}\ningress:\n- ports:\n  - port: 81\n  - port: 80\n    endPort: 79"))
    assert err == "NetworkPolicy prod/p: spec.ingress[0].ports[1].endPort: 79 is below port 80"


def test_networkpolicy_normal_form():
    [pol] = P.load_policies(np("""
podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [db, cache]}]}
ingress:
- from:
  - namespaceSelector: {matchLabels: {team: a}}
    podSelector: {matchLabels: {app: web}}
  - namespaceSelector: {}
  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
  ports:
  - {port: 80, endPort: 90}
  - {protocol: UDP}
  - {port: dns, protocol: SCTP}
egress:
- {}
"""))
    [spec] = pol["specs"]
    assert spec["ingress_isolation"] and spec["egress_isolation"]     # egress present: Egress too
    assert spec["subject"] == (("k8s", "io.kubernetes.pod.namespace", "In", ("prod",)),
                               ("k8s", "tier", "NotIn", ("cache", "db")))
    ing, eg = spec["rules"]
    assert ing["peers"] == [
        {"selector": (("k8s", "app", "In", ("web",)), ("k8s", "io.cilium.k8s.namespace.labels.team", "In", ("a",)),
                      ("k8s", "io.kubernetes.pod.namespace", "Exists", ()))},
        {"selector": (("k8s", "io.kubernetes.pod.namespace", "Exists", ()),)},
        {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"], "by_address": True},
    ]
    assert ing["ports"] == [{"protocol": 6, "port": 80, "end_port": 90}, {"protocol": 17, "port": 0, "end_port": 0},
                            {"protocol": 132, "name": "dns"}]
    assert eg == {"direction": "egress", "deny": False, "name": "NetworkPolicy prod/p egress[0]", "peers": None,
                  "ports": None}


def test_policy_types_defaults():
    def iso(spec):
        s = P.load_policies(np(spec))[0]["specs"][0]
        return s["ingress_isolation"], s["egress_isolation"]
    assert iso("podSelector: {}") == (True, False)
    assert iso("podSelector: {}\negress: []") == (True, False)         # Kubernetes: len(egress) != 0
    assert iso("podSelector: {}\negress:\n- {}") == (True, True)
    assert iso("podSelector: {}\npolicyTypes: [Egress]") == (False, True)
    assert iso("podSelector: {}\npolicyTypes: []") == (True, False)


# --------------------------------------------------------------------------------------------
# Cilium fields


def test_unenforced_cilium_fields_are_listed_by_path():
    text = cnp("""
endpointSelector: {}
log: {value: x}
ingress:
- fromRequires: [{}]
  fromGroups: [{aws: {}}]
  fromNodes: [{}]
  icmps: [{fields: [{type: 8}]}]
  authentication: {mode: required}
- toPorts:
  - ports: [{port: '80'}]
    rules: {http: [{}], kafka: [{}]}
    listener: {envoyConfig: {name: x}, name: y}
    originatingTLS: {secret: {name: s}}
    terminatingTLS: {secret: {name: s}}
    serverNames: [a.example]
  fromCIDRSet:
  - cidrGroupRef: group
  - cidrGroupSelector: {}
egress:
- toServices: [{k8sService: {serviceName: s, namespace: n}}]
  toRequires: [{}]
  toGroups: [{}]
  toNodes: [{}]
  toFQDNs: [{matchName: x.example}]
- toEndpoints:
  - matchLabels: {io.cilium.k8s.policy.serviceaccount: sa}
- toPorts:
  - ports: [{port: '0', protocol: ICMP}]
""")
    err = one_error(text)
    head = "CiliumNetworkPolicy prod/c: not enforced by this dataplane yet: "
    assert err.startswith(head)
    paths = err[len(head):].split(", ")
    assert paths == [
        "spec.log",
        "spec.ingress[0].fromRequires", "spec.ingress[0].fromGroups", "spec.ingress[0].fromNodes",
        "spec.ingress[0].icmps", "spec.ingress[0].authentication",
        "spec.ingress[1].fromCIDRSet[0].cidrGroupRef", "spec.ingress[1].fromCIDRSet[1].cidrGroupSelector",
        "spec.ingress[1].toPorts[0].rules.http", "spec.ingress[1].toPorts[0].rules.kafka",
        "spec.ingress[1].toPorts[0].listener", "spec.ingress[1].toPorts[0].originatingTLS",
        "spec.ingress[1].toPorts[0].terminatingTLS", "spec.ingress[1].toPorts[0].serverNames",
        "spec.egress[0].toServices", "spec.egress[0].toRequires", "spec.egress[0].toGroups",
        "spec.egress[0].toNodes", "spec.egress[0].toFQDNs",
        "spec.egress[1].toEndpoints[0].matchLabels.io.cilium.k8s.policy.serviceaccount",
        "spec.egress[2].toPorts[0].ports[0].protocol: ICMP",
    ]


def test_host_policies_are_not_enforced():
    text = ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: h}\n"
            "spec:\n  nodeSelector: {}\n  ingress: [{fromEntities: [world]}]\n")
    assert one_error(text) == ("CiliumClusterwideNetworkPolicy h: not enforced by this dataplane yet: "
                               "spec.nodeSelector")


@pytest.mark.parametrize("spec,path,why", [
    ("endpointSelector: {}\ningress:\n- fromEndpoint: [{}]", "spec.ingress[0].fromEndpoint",
     "unknown field (did you mean fromEndpoints?"),
    ("ingress: [{}]", "spec.endpointSelector", "required"),
    ("endpointSelector: {matchLabels: {'container:app': x}}", "spec.endpointSelector.matchLabels.container:app",
     "label source 'container' is not one of k8s, any, reserved"),
    ("endpointSelector: {matchLabels: {'k8s:bad key': x}}", "spec.endpointSelector.matchLabels.k8s:bad key",
     "label key 'bad key' is invalid"),
    ("endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': other}}",
     "spec.endpointSelector.matchLabels.k8s:io.kubernetes.pod.namespace", "'other' is not the policy's namespace 'prod'"),
    ("endpointSelector: {}\ningress:\n- fromEndpoints: [{matchLabels: {'reserved:nothing': ''}}]",
     "spec.ingress[0].fromEndpoints[0].matchLabels.reserved:nothing", "is not a reserved identity"),
    ("endpointSelector: {}\ningress:\n- fromEndpoints: []", "spec.ingress[0].fromEndpoints", "an empty list selects no peer"),
    ("endpointSelector: {}\ningress:\n- fromEntities: [world-ipv6]", "spec.ingress[0].fromEntities[0]",
     "IPv6 is not enforced by this dataplane yet"),
    ("endpointSelector: {}\ningress:\n- fromEntities: [everything]", "spec.ingress[0].fromEntities[0]",
     "'everything' is not an entity"),
    ("endpointSelector: {}\negress:\n- toCIDR: [10.0.0.1/24]", "spec.egress[0].toCIDR[0]", "host bits set"),
    ("endpointSelector: {}\negress:\n- toCIDR: ['2001:db8::/32']", "spec.egress[0].toCIDR[0]",
     "IPv6 is not enforced by this dataplane yet"),
    ("endpointSelector: {}\negress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}]",
     "spec.egress[0].toCIDRSet[0].except[0]", "11.0.0.0/8 is not inside 10.0.0.0/8"),
    ("endpointSelector: {}\negress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: ['fd00::/64']}]",
     "spec.egress[0].toCIDRSet[0].except[0]", "IPv6"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{}]", "spec.ingress[0].toPorts[0].ports", "list at least one port"),
    ("endpointSelector: {}\ningress:\n- toPorts: []", "spec.ingress[0].toPorts", "an empty list is ambiguous"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '70000'}]}]", "spec.ingress[0].toPorts[0].ports[0].port",
     "out of range"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '80', endPort: 79}]}]",
     "spec.ingress[0].toPorts[0].ports[0].endPort", "79 is below port 80"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: http, endPort: 90}]}]",
     "spec.ingress[0].toPorts[0].ports[0].endPort", "cannot be used with the named port"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '0', endPort: 90}]}]",
     "spec.ingress[0].toPorts[0].ports[0].endPort", "needs a port above 0"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '80', protocol: FOO}]}]",
     "spec.ingress[0].toPorts[0].ports[0].protocol", "'FOO' is not one of TCP, UDP, SCTP, ANY"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{protocol: TCP}]}]",
     "spec.ingress[0].toPorts[0].ports[0].port", "required"),
    ("endpointSelector: {}\ningressDeny:\n- toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]",
     "spec.ingressDeny[0].toPorts[0].rules", "unknown field"),
    ("endpointSelector: {}\nenableDefaultDeny: {ingress: 'no'}", "spec.enableDefaultDeny.ingress", "must be true or false"),
    ("endpointSelector: {}\ningress:\n- toPorts: [{ports: [{port: '80'}], rules: {grpc: []}}]",
     "spec.ingress[0].toPorts[0].rules.grpc", "unknown field"),
])
def test_cilium_errors_name_the_field(spec, path, why):
    err = one_error(cnp(spec))
    prefix = "CiliumNetworkPolicy prod/c: %s: " % path
    assert err.startswith(prefix), err
    assert why in err, err


def test_cilium_needs_spec():
    assert one_error(CNP_HEAD) == "CiliumNetworkPolicy prod/c: spec: required (or specs, a list of rules)"


def test_cilium_normal_form():
    [pol] = P.load_policies(cnp("""
endpointSelector: {matchLabels: {app: web}}
description: web may talk to the db, and world on 443
ingress:
- fromEndpoints:
  - {}
  - matchLabels: {k8s:io.kubernetes.pod.namespace: other, any:app: x}
  - matchLabels: {'reserved:host': ''}
  - matchLabels: {k8s:io.cilium.k8s.namespace.labels.team: a}
  fromEntities: [world-ipv4, cluster]
  fromCIDR: [192.0.2.1]
  fromCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
  toPorts:
  - ports:
    - {port: '443'}
    - {port: HTTP, protocol: TCP}
    - {port: '0', protocol: UDP}
    - {port: 8000, endPort: 8080, protocol: SCTP}
ingressDeny:
- toPorts: [{ports: [{port: '22', protocol: TCP}]}]
egress: [{}]
"""))
    [spec] = pol["specs"]
    assert spec["subject"] == (("any", "app", "In", ("web",)), ("k8s", "io.kubernetes.pod.namespace", "In", ("prod",)))
    assert spec["ingress_isolation"] and spec["egress_isolation"]
    ing, deny = spec["rules"]            # egress [{}] gives no rule, only default deny
    assert ing["name"] == "CiliumNetworkPolicy prod/c ingress[0]"
    assert ing["peers"] == [
        {"selector": (("k8s", "io.kubernetes.pod.namespace", "In", ("prod",)),)},
        {"selector": (("any", "app", "In", ("x",)), ("k8s", "io.kubernetes.pod.namespace", "In", ("other",)))},
        {"selector": (("reserved", "host", "In", ("",)),)},
        {"selector": (("k8s", "io.cilium.k8s.namespace.labels.team", "In", ("a",)),)},
        {"cidr": "192.0.2.1/32", "except": [], "by_address": False},
        {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"], "by_address": False},
        {"entity": "world"}, {"entity": "cluster"},
    ]
    assert ing["ports"] == [
        {"protocol": 6, "port": 443, "end_port": 443}, {"protocol": 17, "port": 443, "end_port": 443},
        {"protocol": 132, "port": 443, "end_port": 443}, {"protocol": 6, "name": "http"},
        {"protocol": 17, "port": 0, "end_port": 0}, {"protocol": 132, "port": 8000, "end_port": 8080}]
    assert deny == {"direction": "ingress", "deny": True, "name": "CiliumNetworkPolicy prod/c ingressDeny[0]",
                    "peers": None, "ports": [{"protocol": 6, "port": 22, "end_port": 22}]}


def test_clusterwide_selectors_and_specs():
    [pol] = P.load_policies("""
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
specs:
- endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{}, {matchLabels: {k8s:io.kubernetes.pod.namespace: a}}]
- endpointSelector: {matchLabels: {app: x}}
  egress:
  - toEndpoints: [{matchLabels: {app: y}}]
""")
    assert pol["namespace"] is None and pol["label"] == "CiliumClusterwideNetworkPolicy cw"
    s0, s1 = pol["specs"]
    assert s0["subject"] == () and not s0["ingress_isolation"] and not s0["egress_isolation"]
    assert s0["rules"][0]["name"] == "CiliumClusterwideNetworkPolicy cw specs[0].ingressDeny[0]"
    assert s0["rules"][0]["peers"] == [
        {"selector": (("k8s", "io.kubernetes.pod.namespace", "Exists", ()),)},
        {"selector": (("k8s", "io.kubernetes.pod.namespace", "In", ("a",)),)}]
    assert s1["egress_isolation"] and not s1["ingress_isolation"]
    assert s1["rules"][0]["peers"] == [{"selector": (("any", "app", "In", ("y",)),
                                                     ("k8s", "io.kubernetes.pod.namespace", "Exists", ()))}]


def test_enable_default_deny_overrides():
    def iso(spec):
        s = P.load_policies(cnp(spec))[0]["specs"][0]
        return s["ingress_isolation"], s["egress_isolation"]
    assert iso("endpointSelector: {}\ningressDeny: [{fromEntities: [world]}]") == (True, False)
    assert iso("endpointSelector: {}\ningress: []") == (False, False)
    assert iso("endpointSelector: {}\nenableDefaultDeny: {ingress: false}\ningress: [{}]") == (False, False)
    assert iso("endpointSelector: {}\nenableDefaultDeny: {egress: true}") == (False, True)


def test_iana_names():
    assert P.iana_name_error("http") is None
    assert P.iana_name_error("serve-80-tcp") is None
    for bad in ("", "80", "-http", "http-", "ht--tp", "Http", "a" * 16):
        assert P.iana_name_error(bad)
