"""Network policy conformance cases as data, shared by the unit tests (tests/unit/test_policy_cases.py:
reference evaluator and compiled entries) and the lab tests (the same cases on real pods).

The model follows the Kubernetes e2e network policy tests (test/e2e/network/netpol): namespaces x, y,
z labelled ns=x/y/z; pods a, b, c in each, labelled pod=a/b/c, each serving ports 80 and 81 on TCP
and UDP (container ports named serve-80-tcp, serve-80-udp, serve-81-tcp, serve-81-udp; no SCTP: the
lab kernel has none). Three outside addresses (WORLD) stand for the world. Each case is policy YAML
plus its expected reachability, written like the e2e Reachability truth tables: every connection
allowed, then the case's ``expect`` rules applied in order, then loopback (a pod to itself: always
allowed, as e2e's AllowLoopback). No pytest here.

- ``render(case, ips)``: the policy text with ``IP[x/b]`` replaced by that pod's address.
- ``expected(case, probe)``: {(src, dst): allowed} for one probe ("80/TCP"), over every pod pair and
  every pod <-> WORLD pair.
- ``cluster(ips, nodes, node_ips)``: the compiler's cluster input for the model.
- ``truth_table(matrix)``: the matrix as e2e prints it (rows: from, columns: to; '.' allowed, 'X' not).

Expect rules: ``(from, to, allowed)`` or ``(from, to, allowed, [probes])``; a pattern is ``*`` (every
pod and WORLD address), ``*/*`` (every pod), ``world`` (every WORLD address), ``x/*`` (the pods of
x), ``*/a`` (pod a of every namespace), ``x/a`` or a WORLD name.
"""

import re

NAMESPACES = [{"name": n, "labels": {"ns": n}} for n in ("x", "y", "z")]
POD_NAMES = ("a", "b", "c")
PORTS = [{"name": "serve-80-tcp", "port": 80, "protocol": "TCP"},
         {"name": "serve-80-udp", "port": 80, "protocol": "UDP"},
         {"name": "serve-81-tcp", "port": 81, "protocol": "TCP"},
         {"name": "serve-81-udp", "port": 81, "protocol": "UDP"}]
PODS = [{"namespace": ns["name"], "name": p, "labels": {"pod": p}, "ports": [dict(x) for x in PORTS]}
        for ns in NAMESPACES for p in POD_NAMES]
POD_KEYS = ["%s/%s" % (p["namespace"], p["name"]) for p in PODS]
PROBES = ("80/TCP", "81/TCP", "80/UDP", "81/UDP")
WORLD = {"world-1": "203.0.113.10", "world-2": "198.51.100.20", "world-3": "198.51.100.30"}

# the unit tests' layout (the lab has its own): two nodes, pods alternating, 10.244.<node>.<n>
NODES = {"node-1": "192.168.1.11", "node-2": "192.168.1.12"}
NODE_OF = dict((k, "node-%d" % (i % 2 + 1)) for i, k in enumerate(POD_KEYS))
IPS = dict((k, "10.244.%d.%d" % (i % 2 + 1, 10 + i)) for i, k in enumerate(POD_KEYS))


def _np(name, ns, spec):
    return "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n%s" % (
        name, ns, _indent(spec))


def _cnp(name, ns, spec, kind="CiliumNetworkPolicy"):
    md = "  name: %s\n" % name + ("  namespace: %s\n" % ns if ns else "")
    return "apiVersion: cilium.io/v2\nkind: %s\nmetadata:\n%sspec:\n%s" % (kind, md, _indent(spec))


def _indent(text):
    return "".join("  " + line + "\n" for line in text.strip("\n").split("\n"))


def _docs(*docs):
    return "---\n".join(docs)


DENY_INGRESS_X = _np("deny-ingress", "x", "podSelector: {}\npolicyTypes: [Ingress]")

NETWORK_POLICY_CASES = [
    {"name": "default-deny-ingress",
     "policy": DENY_INGRESS_X,
     "expect": [("*", "x/*", False)]},
    {"name": "default-deny-egress",
     "policy": _np("deny-egress", "x", "podSelector: {}\npolicyTypes: [Egress]"),
     "expect": [("x/*", "*", False)]},
    {"name": "default-deny-all",
     "policy": _np("deny-all", "x", "podSelector: {}\npolicyTypes: [Ingress, Egress]"),
     "expect": [("*", "x/*", False), ("x/*", "*", False)]},
    {"name": "allow-all-ingress-overrides-deny",
     "policy": _docs(DENY_INGRESS_X, _np("allow-all", "x", "podSelector: {}\ningress:\n- {}")),
     "expect": []},
    {"name": "ingress-podselector",
     "policy": _np("allow-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n"
                   "      matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False), ("x/b", "x/a", True)]},
    {"name": "ingress-namespaceselector",
     "policy": _np("allow-ns-y", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: y}"),
     "expect": [("*", "x/a", False), ("y/*", "x/a", True)]},
    {"name": "ingress-namespace-and-pod-in-one-peer",
     "policy": _np("allow-y-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False), ("y/b", "x/a", True)]},
    {"name": "ingress-namespace-or-pod-two-peers",
     "policy": _np("allow-y-or-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: y}\n  - podSelector:\n      matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False), ("y/*", "x/a", True), ("x/b", "x/a", True)]},
    {"name": "ingress-match-expressions-in",
     "policy": _np("allow-y-z", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: In, values: [y, z]}"),
     "expect": [("*", "x/a", False), ("y/*", "x/a", True), ("z/*", "x/a", True)]},
    {"name": "ingress-match-expressions-notin",
     "policy": _np("allow-not-x", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [x]}"),
     "expect": [("*", "x/a", False), ("y/*", "x/a", True), ("z/*", "x/a", True)]},
    {"name": "ingress-match-expressions-exists",
     "policy": _np("allow-c-anywhere", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: Exists}\n"
                   "    podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [c]}"),
     "expect": [("*", "x/a", False), ("*/c", "x/a", True)]},
    {"name": "ingress-match-expressions-doesnotexist",
     "policy": _np("allow-unlabelled", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - podSelector:\n      matchExpressions:\n      - {key: pod, operator: DoesNotExist}"),
     "expect": [("*", "x/a", False)]},
    {"name": "ingress-all-namespaces-pod-a",
     "policy": _np("allow-every-a", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - namespaceSelector: {}\n    podSelector:\n      matchLabels: {pod: a}"),
     "expect": [("*", "x/a", False), ("*/a", "x/a", True)]},
    {"name": "egress-podselector-in",
     "policy": _np("egress-b-c", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n"
                   "  - podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [b, c]}"),
     "expect": [("x/a", "*", False), ("x/a", "x/b", True), ("x/a", "x/c", True)]},
    {"name": "ingress-ipblock-except-pod",
     "policy": _np("allow-all-but-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - ipBlock:\n      cidr: 0.0.0.0/0\n      except: ['IP[x/b]/32']"),
     "expect": [("x/b", "x/a", False)]},
    {"name": "egress-ipblock-one-pod",
     "policy": _np("egress-to-y-b", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n"
                   "- to:\n  - ipBlock:\n      cidr: 'IP[y/b]/32'"),
     "expect": [("x/a", "*", False), ("x/a", "y/b", True)]},
    {"name": "egress-ipblock-except-pods",
     "policy": _np("egress-all-but", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n"
                   "- to:\n  - ipBlock:\n      cidr: 0.0.0.0/0\n      except: ['IP[y/a]/32', 'IP[z/b]/32']"),
     "expect": [("x/a", "y/a", False), ("x/a", "z/b", False)]},
    {"name": "ingress-ipblock-or-podselector",
     "policy": _np("allow-z-c-or-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - ipBlock:\n      cidr: 'IP[z/c]/32'\n  - podSelector:\n      matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False), ("z/c", "x/a", True), ("x/b", "x/a", True)]},
    {"name": "ingress-ipblock-world",
     "policy": _np("allow-world-1", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                   "  - ipBlock:\n      cidr: 203.0.113.0/24"),
     "expect": [("*", "x/a", False), ("world-1", "x/a", True)]},
    {"name": "ingress-named-port",
     "policy": _np("allow-81-by-name", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n"
                   "  - port: serve-81-tcp"),
     "expect": [("*", "x/a", False, ["80/TCP", "80/UDP", "81/UDP"])]},
    {"name": "ingress-named-port-protocol",
     "policy": _np("allow-80-udp-by-name", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n"
                   "  - {protocol: UDP, port: serve-80-udp}\n  - {port: serve-81-udp}"),
     "expect": [("*", "x/a", False, ["80/TCP", "81/TCP", "81/UDP"])]},
    {"name": "egress-named-port",
     "policy": _np("egress-80-by-name", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\n"
                   "egress:\n- ports:\n  - port: serve-80-tcp"),
     "expect": [("x/a", "*", False, ["81/TCP", "80/UDP", "81/UDP"]), ("x/a", "world", False)]},
    {"name": "ingress-endport-range",
     "policy": _np("allow-80-81", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n"
                   "  - {protocol: TCP, port: 80, endPort: 81}"),
     "expect": [("*", "x/a", False, ["80/UDP", "81/UDP"])]},
    {"name": "ingress-endport-range-udp",
     "policy": _np("allow-81-85-udp", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n"
                   "  - {protocol: UDP, port: 81, endPort: 85}"),
     "expect": [("*", "x/a", False, ["80/TCP", "81/TCP", "80/UDP"])]},
    {"name": "ingress-port-80-tcp-only",
     "policy": _np("allow-80", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - port: 80"),
     "expect": [("*", "x/a", False, ["81/TCP", "80/UDP", "81/UDP"])]},
    {"name": "ingress-protocol-udp-any-port",
     "policy": _np("allow-udp", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n"
                   "  - protocol: UDP"),
     "expect": [("*", "x/a", False, ["80/TCP", "81/TCP"])]},
    {"name": "ingress-empty-from-is-any-peer",
     "policy": _np("allow-81-from-any", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from: []\n"
                   "  ports:\n  - port: 81"),
     "expect": [("*", "x/a", False, ["80/TCP", "80/UDP", "81/UDP"])]},
    {"name": "policytypes-egress-only",
     "policy": _np("egress-to-y", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n"
                   "- to:\n  - namespaceSelector:\n      matchLabels: {ns: y}"),
     "expect": [("x/a", "*", False), ("x/a", "y/*", True)]},
    {"name": "policytypes-default-with-egress",
     "policy": _np("egress-to-b", "x", "podSelector:\n  matchLabels: {pod: a}\negress:\n- to:\n"
                   "  - podSelector:\n      matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False), ("x/a", "*", False), ("x/a", "x/b", True)]},
    {"name": "policies-unioned",
     "policy": _docs(
         _np("allow-b-80", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
             "  - podSelector:\n      matchLabels: {pod: b}\n  ports:\n  - port: 80"),
         _np("allow-y-c-81", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
             "  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: c}\n"
             "  ports:\n  - port: 81")),
     "expect": [("*", "x/a", False), ("x/b", "x/a", True, ["80/TCP"]), ("y/c", "x/a", True, ["81/TCP"])]},
    {"name": "egress-namespace-z",
     "policy": _np("egress-to-z", "x", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: z}"),
     "expect": [("x/*", "*", False), ("x/*", "z/*", True)]},
    {"name": "ingress-and-egress-together",
     "policy": _np("a-in-b-out-c", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Ingress, Egress]\n"
                   "ingress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}\n"
                   "egress:\n- to:\n  - podSelector:\n      matchLabels: {pod: c}"),
     "expect": [("*", "x/a", False), ("x/b", "x/a", True), ("x/a", "*", False), ("x/a", "x/c", True)]},
    {"name": "pods-not-selected-not-isolated",
     "policy": _np("isolate-a", "x", "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Ingress, Egress]"),
     "expect": [("*", "x/a", False), ("x/a", "*", False)]},
    {"name": "deny-egress-and-allow-ingress-other-namespace",
     "policy": _docs(
         _np("deny-egress-y", "y", "podSelector: {}\npolicyTypes: [Egress]"),
         _np("allow-from-y", "x", "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n"
             "      matchLabels: {ns: y}")),
     "expect": [("y/*", "*", False), ("*", "x/*", False), ("x/*", "x/*", False)]},
]

CILIUM_CASES = [
    {"name": "cnp-endpointselector-empty-fromendpoints-empty",
     "policy": _cnp("same-namespace", "x", "endpointSelector: {}\ningress:\n- fromEndpoints:\n  - {}"),
     "expect": [("*", "x/*", False), ("x/*", "x/*", True)]},
    {"name": "cnp-fromendpoints-namespace-label",
     "policy": _cnp("from-y-b", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEndpoints:\n"
                    "  - matchLabels:\n      k8s:io.kubernetes.pod.namespace: y\n      pod: b"),
     "expect": [("*", "x/a", False), ("y/b", "x/a", True)]},
    {"name": "cnp-fromendpoints-namespace-labels",
     "policy": _cnp("from-ns-z", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEndpoints:\n"
                    "  - matchLabels:\n      k8s:io.cilium.k8s.namespace.labels.ns: z"),
     "expect": [("*", "x/a", False), ("z/*", "x/a", True)]},
    {"name": "ccnp-fromendpoints-empty-all-pods",
     "policy": _cnp("every-a-from-pods", None, "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- fromEndpoints:\n  - {}", kind="CiliumClusterwideNetworkPolicy"),
     "expect": [("*", "*/a", False), ("*/*", "*/a", True)]},
    {"name": "cnp-from-entity-world",
     "policy": _cnp("from-world", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- fromEntities: [world]"),
     "expect": [("*", "x/a", False), ("world", "x/a", True)]},
    {"name": "cnp-from-entity-cluster",
     "policy": _cnp("from-cluster", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- fromEntities: [cluster]"),
     "expect": [("*", "x/a", False), ("*/*", "x/a", True)]},
    {"name": "cnp-to-entity-world",
     "policy": _cnp("to-world", "x", "endpointSelector:\n  matchLabels: {pod: a}\negress:\n- toEntities: [world]"),
     "expect": [("x/a", "*", False), ("x/a", "world", True)]},
    {"name": "cnp-cidrset-except",
     "policy": _cnp("to-cidrs", "x", "endpointSelector:\n  matchLabels: {pod: a}\negress:\n- toCIDRSet:\n"
                    "  - cidr: 203.0.113.0/24\n  - cidr: 198.51.100.0/24\n    except: [198.51.100.20/32]"),
     "expect": [("x/a", "*", False), ("x/a", "world-1", True), ("x/a", "world-3", True)]},
    {"name": "cnp-cidr-does-not-select-pods",
     "policy": _cnp("to-everything-by-cidr", "x", "endpointSelector:\n  matchLabels: {pod: a}\negress:\n"
                    "- toCIDR: [0.0.0.0/0, 10.0.0.0/8]"),
     "expect": [("x/a", "*", False), ("x/a", "world", True)]},
    {"name": "cnp-deny-wins",
     "policy": _cnp("all-but-b", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEntities: [all]\n"
                    "ingressDeny:\n- fromEndpoints:\n  - matchLabels: {pod: b}"),
     "expect": [("x/b", "x/a", False)]},
    {"name": "cnp-deny-port-wins-over-l3-allow",
     "policy": _cnp("all-but-80", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEntities: [all]\n"
                    "ingressDeny:\n- toPorts:\n  - ports:\n    - {port: '80', protocol: TCP}"),
     "expect": [("*", "x/a", False, ["80/TCP"])]},
    {"name": "cnp-deny-all-wins-over-port-allow",
     "policy": _docs(
         _cnp("b-on-80", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEndpoints:\n"
              "  - matchLabels: {pod: b}\n  toPorts:\n  - ports:\n    - {port: '80', protocol: TCP}"),
         _cnp("deny-x", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningressDeny:\n- fromEndpoints:\n  - {}")),
     "expect": [("*", "x/a", False)]},
    {"name": "cnp-empty-ingress-rule-default-deny",
     "policy": _cnp("default-deny", "x", "endpointSelector: {}\ningress:\n- {}\negress:\n- {}"),
     "expect": [("*", "x/*", False), ("x/*", "*", False)]},
    {"name": "cnp-any-protocol",
     "policy": _cnp("port-80-any", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- fromEntities: [all]\n  toPorts:\n  - ports:\n    - {port: '80', protocol: ANY}"),
     "expect": [("*", "x/a", False, ["81/TCP", "81/UDP"])]},
    {"name": "cnp-endport",
     "policy": _cnp("ports-80-81", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- toPorts:\n  - ports:\n    - {port: '80', endPort: 81, protocol: TCP}"),
     "expect": [("*", "x/a", False, ["80/UDP", "81/UDP"])]},
    {"name": "cnp-named-port",
     "policy": _cnp("named-81", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n"
                    "- fromEntities: [all]\n  toPorts:\n  - ports:\n    - port: serve-81-tcp"),
     "expect": [("*", "x/a", False, ["80/TCP", "80/UDP", "81/UDP"])]},
    {"name": "cnp-enable-default-deny-false",
     "policy": _docs(
         _cnp("deny-b-only", "x", "endpointSelector:\n  matchLabels: {pod: a}\nenableDefaultDeny:\n  ingress: false\n"
              "ingressDeny:\n- fromEndpoints:\n  - matchLabels: {pod: b}"),
         _cnp("allow-c-no-isolation", "x", "endpointSelector:\n  matchLabels: {pod: b}\n"
              "enableDefaultDeny: {ingress: false, egress: false}\ningress:\n- fromEndpoints:\n"
              "  - matchLabels: {pod: c}")),
     "expect": [("x/b", "x/a", False)]},
    {"name": "cnp-deny-only-isolates",
     "policy": _cnp("deny-b", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningressDeny:\n- fromEndpoints:\n"
                    "  - matchLabels: {pod: b}"),
     "expect": [("*", "x/a", False)]},
    {"name": "cnp-egress-deny-cidr",
     "policy": _cnp("all-but-world-1", "x", "endpointSelector:\n  matchLabels: {pod: a}\negress:\n"
                    "- toEntities: [all]\negressDeny:\n- toCIDR: [203.0.113.0/24]"),
     "expect": [("x/a", "world-1", False)]},
    {"name": "cnp-reserved-world-selector-and-cidr",
     "policy": _docs(
         _cnp("world-by-label", "x", "endpointSelector:\n  matchLabels: {pod: a}\ningress:\n- fromEndpoints:\n"
              "  - matchLabels: {'reserved:world': ''}"),
         _cnp("world-1-by-cidr", "x", "endpointSelector:\n  matchLabels: {pod: b}\ningress:\n"
              "- fromCIDR: [203.0.113.0/24]")),
     "expect": [("*", "x/a", False), ("world", "x/a", True), ("*", "x/b", False), ("world-1", "x/b", True)]},
    {"name": "cnp-with-networkpolicy",
     "policy": _docs(
         DENY_INGRESS_X,
         _cnp("from-z-81", "x", "endpointSelector:\n  matchLabels: {pod: c}\ningress:\n- fromEndpoints:\n"
              "  - matchLabels: {k8s:io.kubernetes.pod.namespace: z}\n  toPorts:\n  - ports:\n    - port: '81'")),
     "expect": [("*", "x/*", False), ("z/*", "x/c", True, ["81/TCP", "81/UDP"])]},
]

CASES = NETWORK_POLICY_CASES + CILIUM_CASES


def render(case, ips=None):
    """The case's policy text with every ``IP[ns/pod]`` replaced by that pod's address (``ips``:
    {"x/a": "10.244.1.10", ...}; default the unit tests' layout)."""
    ips = ips or IPS
    return re.sub(r"IP\[([a-z]+/[a-z]+)\]", lambda m: ips[m.group(1)], case["policy"])


def _matches(pattern, peer):
    if pattern == "*":
        return True
    if pattern == "world":
        return peer in WORLD
    if pattern == "*/*":
        return peer not in WORLD
    if peer in WORLD:
        return pattern == peer
    ns, _sep, pod = peer.partition("/")
    pns, _sep, ppod = pattern.partition("/")
    return pns in ("*", ns) and ppod in ("*", pod)


def peers():
    """Every (src, dst) of the matrix: pod -> pod, WORLD -> pod, pod -> WORLD."""
    out = [(s, d) for s in POD_KEYS for d in POD_KEYS]
    out += [(w, d) for w in sorted(WORLD) for d in POD_KEYS]
    out += [(s, w) for s in POD_KEYS for w in sorted(WORLD)]
    return out


def expected(case, probe):
    """{(src, dst): allowed} for ``probe`` ("80/TCP")."""
    out = {}
    for s, d in peers():
        allowed = True
        for rule in case["expect"]:
            frm, to, ok = rule[:3]
            probes = rule[3] if len(rule) > 3 else PROBES
            if probe in probes and _matches(frm, s) and _matches(to, d):
                allowed = ok
        if s == d:
            allowed = True          # loopback
        out[(s, d)] = allowed
    return out


def address(peer, ips=None):
    """The address of a pod key or WORLD name."""
    return WORLD[peer] if peer in WORLD else (ips or IPS)[peer]


def cluster(ips=None, nodes=None, node_ips=None, local_node=None):
    """The compiler's cluster input: ``ips`` {pod: address}, ``nodes`` {pod: node}, ``node_ips``
    {node: address} (defaults: the unit tests' layout)."""
    ips, nodes, node_ips = ips or IPS, nodes or NODE_OF, node_ips or NODES
    return {
        "namespaces": dict((ns["name"], dict(ns["labels"])) for ns in NAMESPACES),
        "endpoints": [{"namespace": p["namespace"], "name": p["name"], "node": nodes[k], "labels": dict(p["labels"]),
                       "ips": [ips[k]], "ports": [dict(x) for x in p["ports"]]} for p, k in zip(PODS, POD_KEYS)],
        "nodes": [{"name": n, "ips": [ip]} for n, ip in sorted(node_ips.items())],
        "local_node": local_node or sorted(node_ips)[0],
    }


def truth_table(matrix):
    """The pod -> pod part of a matrix as text: rows from, columns to; '.' allowed, 'X' denied."""
    width = max(len(k) for k in POD_KEYS)
    lines = [" " * width + " " + " ".join(k.ljust(width) for k in POD_KEYS)]
    for s in POD_KEYS:
        lines.append(s.ljust(width) + " " + " ".join(("." if matrix[(s, d)] else "X").ljust(width) for d in POD_KEYS))
    return "\n".join(lines)
