"""Network policy on the lab: real pods in namespaces x, y, z (pods a, b, c, ports 80 and 81 on TCP and UDP,
spread over the three nodes) and production (the masterclass's frontend and backend), the policies applied by
the policy role, and every case checked as a full from-pod x to-pod matrix of real connections (tests/policy_cases.py
holds the expected reachability, modelled on the Kubernetes e2e network policy tests). Denied connections must
time out (dropped, not refused) and show up as counted drops with their reason."""
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import EXTENDED, PROBE, PROBE_PATH, REPO, Streams, changed_tasks, run_playbook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import policy_cases as pc  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "policy"
# matrix pods over the nodes: each namespace has a pod on every node, so pairs are same-node and cross-node
PLACEMENT = {"x/a": "cp1", "x/b": "worker1", "x/c": "worker2", "y/a": "worker1", "y/b": "worker2", "y/c": "cp1",
             "z/a": "worker2", "z/b": "cp1", "z/c": "worker1"}
PRODUCTION = [("frontend", "cp1", {"app": "frontend"}), ("backend", "worker1", {"app": "backend"}),
              ("other", "worker2", {"app": "other"})]
# the cases run on every CI run (the extended tier, NETSTACK_TESTS=all, runs every case of tests/policy_cases.py)
TUNNEL_CASES = ["default-deny-ingress", "default-deny-egress", "ingress-namespace-and-pod-in-one-peer",
                "ingress-namespace-or-pod-two-peers", "ingress-match-expressions-notin", "ingress-ipblock-except-pod",
                "ingress-named-port", "ingress-endport-range-udp", "egress-namespace-z", "policies-unioned",
                "cnp-fromendpoints-namespace-label", "cnp-deny-wins", "cnp-empty-ingress-rule-default-deny",
                "cnp-any-protocol"]
NATIVE_CASES = ["ingress-podselector", "egress-podselector-in", "cnp-deny-port-wins-over-l3-allow"]
APPLY = "tests/integration/policy_apply.yml"


def _all_cases():
    return dict((c["name"], c) for c in pc.NETWORK_POLICY_CASES + pc.CILIUM_CASES)


def _case_names(default):
    return sorted(_all_cases()) if EXTENDED else default


def _vars(lab, routing_mode="tunnel"):
    """The lab's namespaces and workloads plus the matrix's and production's."""
    namespaces = list(lab.vars.get("netstack_namespaces") or []) + pc.NAMESPACES + [
        {"name": "production", "labels": {"env": "production"}}]
    workloads = list(lab.vars.get("netstack_workloads") or [])
    for key, host in sorted(PLACEMENT.items()):
        ns, name = key.split("/")
        workloads.append({"namespace": ns, "name": name, "node": host, "labels": {"pod": name},
                          "ports": [dict(p) for p in pc.PORTS]})
    for name, host, labels in PRODUCTION:
        workloads.append({"namespace": "production", "name": name, "node": host, "labels": labels,
                          "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    return {"netstack_namespaces": namespaces, "netstack_workloads": workloads, "netstack_routing_mode": routing_mode}


def _write(tmp, name, doc):
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=True))
    return str(path)


class Cluster:
    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        self.vars_file = None

    def install(self, routing_mode="tunnel"):
        self.vars_file = _write(self.tmp, "vars-%s.yml" % routing_mode, _vars(self.lab, routing_mode))
        run_playbook("playbooks/install.yml", "-e", "@" + self.vars_file)
        for h in self.lab.hosts():
            self.lab.put(h, PROBE_PATH, PROBE, mode="0755")
        self.refresh()

    def refresh(self):
        self.pods = {}
        for h in self.lab.hosts():
            for ep in json.loads(self.lab.sh(h, "netstack endpoint list --json").stdout):
                self.pods["%s/%s" % (ep["namespace"], ep["name"])] = {
                    "host": h, "ip": ep["ips"][0].split("/")[0], "netns": ep["netns"]}

    def apply(self, text=None, files=(), check=True):
        """The policy role with these policies (YAML text and/or files); the playbook run."""
        docs = [d for d in yaml.safe_load_all(text or "") if d]
        extra = _write(self.tmp, "policies.yml", {"netstack_network_policies": docs,
                                                  "netstack_network_policy_files": list(files)})
        return run_playbook(APPLY, "-e", "@" + self.vars_file, "-e", "@" + extra, check=check)

    def matrix(self, keys, probes=pc.PROBES, timeout=1.0):
        """{(src, dst, probe): ok|refused|timeout} of every pair of ``keys``, all sources at once."""
        targets = []
        for dst in keys:
            for probe in probes:
                port, proto = probe.split("/")
                targets.append({"key": "%s %s" % (dst, probe), "dst": dst, "ip": self.pods[dst]["ip"], "port": int(port),
                                "proto": proto.lower()})
        out, threads = {}, []

        def run(host):
            srcs = [{"key": k, "netns": self.pods[k]["netns"]} for k in keys if self.pods[k]["host"] == host]
            spec = json.dumps({"sources": srcs, "targets": targets, "timeout": timeout})
            res = json.loads(self.lab.sh(host, "python3 %s matrix %s" % (PROBE_PATH, shlex.quote(spec))).stdout)
            for src, found in res.items():
                assert "error" not in found, (host, src, found)
                for tkey, verdict in found.items():
                    dst, probe = tkey.split(" ")
                    out[(src, dst, probe)] = verdict
        for h in self.lab.hosts():
            t = threading.Thread(target=run, args=(h,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(120)
        return out

    def check_case(self, case):
        ips = dict((k, self.pods[k]["ip"]) for k in pc.POD_KEYS)
        self.apply(pc.render(case, ips))
        seen = self.matrix(pc.POD_KEYS)
        wrong = []
        for probe in pc.PROBES:
            want = pc.expected(case, probe)
            for src in pc.POD_KEYS:
                for dst in pc.POD_KEYS:
                    if src == dst:
                        continue
                    got = seen[(src, dst, probe)]
                    if (got == "ok") != want[(src, dst)] or got not in ("ok", "timeout"):
                        wrong.append("%s -> %s %s: %s, expected %s" % (src, dst, probe, got,
                                                                       "allowed" if want[(src, dst)] else "dropped"))
        return wrong

    def policy_get(self, key):
        p = self.pods[key]
        return json.loads(self.lab.sh(p["host"], "netstack policy get %s --json" % key).stdout)

    def drops(self, key, reason="POLICY_DENIED", direction="ingress"):
        return sum(c["packets"] for c in self.policy_get(key)["counters"]
                   if c["reason"] == reason and c["direction"] == direction)


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    c = Cluster(lab, tmp_path_factory.mktemp("policy"))
    c.install()
    yield c
    # the lab as the other tests expect it: no policy, its own workloads only
    run_playbook(APPLY, "-e", "@" + c.vars_file)
    run_playbook("playbooks/install.yml")


def test_the_examples_as_written_and_verify_quiet(lab, cluster):
    files = [str(FIXTURES / "policy-backend-ingress.yaml")]
    cluster.apply(files=files)
    seen = cluster.matrix(["production/frontend", "production/backend", "production/other"], probes=("8080/TCP",))
    assert seen[("production/frontend", "production/backend", "8080/TCP")] == "ok"
    assert seen[("production/other", "production/backend", "8080/TCP")] == "timeout"
    assert seen[("production/backend", "production/other", "8080/TCP")] == "ok"        # egress not isolated
    assert cluster.drops("production/backend") >= 1
    got = cluster.policy_get("production/backend")
    assert got["ingress_enforced"] and not got["egress_enforced"]
    assert [e["rule"] for e in got["entries"]] == ["NetworkPolicy production/backend-ingress ingress[0]"]
    # the default deny of the masterclass on top: nothing in or out of production any more
    cluster.apply(files=files + [str(FIXTURES / "policy-default-deny.yaml")])
    seen = cluster.matrix(["production/frontend", "production/backend", "production/other"], probes=("8080/TCP",))
    assert set(seen.values()) == {"timeout"}, seen
    # applied again: nothing changes; verify reports the policy check and no change
    again = cluster.apply(files=files + [str(FIXTURES / "policy-default-deny.yaml")])
    assert "changed=0" in again.stdout.split("PLAY RECAP")[1].split("\n")[1], changed_tasks(again)
    extra = _write(cluster.tmp, "examples.yml", {"netstack_network_policy_files": files + [
        str(FIXTURES / "policy-default-deny.yaml")]})
    verify = run_playbook("playbooks/verify.yml", "-e", "@" + cluster.vars_file, "-e", "@" + extra)
    recap = verify.stdout.split("PLAY RECAP")[1]
    assert recap.count("changed=0") == len(lab.hosts()), changed_tasks(verify)
    assert "PASS policy: 2 policies" in verify.stdout


@pytest.mark.parametrize("name", _case_names(TUNNEL_CASES))
def test_conformance_matrix_tunnel(cluster, name):
    wrong = cluster.check_case(_all_cases()[name])
    assert not wrong, "%s: %d of the matrix wrong:\n%s" % (name, len(wrong), "\n".join(wrong[:30]))


def test_denied_connections_are_counted_with_the_reason(cluster):
    cluster.apply(pc.render(_all_cases()["default-deny-ingress"]))
    before = cluster.drops("x/a")
    seen = cluster.matrix(["y/a", "x/a"], probes=("80/TCP",))
    assert seen[("y/a", "x/a", "80/TCP")] == "timeout"
    assert cluster.drops("x/a") > before
    # the identity list names the pod's labels and namespace
    ident = cluster.policy_get("x/a")["identity"]
    rows = json.loads(cluster.lab.sh(cluster.pods["y/a"]["host"], "netstack identity list --json").stdout)
    labels = [r["labels"] for r in rows if r["identity"] == ident][0]
    assert "k8s:pod=a" in labels and "k8s:io.kubernetes.pod.namespace=x" in labels


def test_an_established_connection_follows_the_policy(cluster):
    a, b = cluster.pods["x/a"], cluster.pods["y/b"]
    allow = pc._np("allow-a-stream", "y", "podSelector:\n  matchLabels: {pod: b}\ningress:\n- from:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: x}\n    podSelector:\n      matchLabels: {pod: a}")
    allow_too = allow + "---\n" + pc._np("allow-c", "y", "podSelector:\n  matchLabels: {pod: b}\ningress:\n- from:\n"
                                         "  - podSelector:\n      matchLabels: {pod: c}")
    cluster.apply(allow)
    streams = Streams(cluster.lab, a, b, name="policy-stream")
    try:
        streams.start()
        cluster.apply(allow_too)                 # still allowed: the connection goes on
        time.sleep(2)
        kept = streams.stop()
        assert not kept["tcp_errors"] and not kept["connection_failures"] and kept["udp_lost"] == 0, kept
        assert kept["tcp_messages"] > 0 and kept["connections"] > 0, kept
        streams.start()
        time.sleep(2)
        cluster.apply(pc._np("only-c", "y", "podSelector:\n  matchLabels: {pod: b}\ningress:\n- from:\n"
                             "  - podSelector:\n      matchLabels: {pod: c}"))
        time.sleep(3)
        cut = streams.stop()
        assert cut["tcp_errors"] and cut["connection_failures"] and cut["udp_lost"] > 0, cut
    finally:
        streams.close()


def test_a_pod_made_again_keeps_its_identity_and_is_enforced_at_once(lab, cluster):
    """x/a takes only pod=b of x. x/b is made again with a new address by the workloads role alone - no policy
    play, so the other nodes' ipcaches still have its old address: the CNI plugin gave it the same identity
    (same labels), and the tunnel carries that identity, so x/a's node lets it in and still keeps x/c out."""
    cluster.apply(pc.render(_all_cases()["ingress-podselector"]))
    ident = cluster.policy_get("x/b")["identity"]
    old_ip = cluster.pods["x/b"]["ip"]
    new_ip = old_ip.rsplit(".", 1)[0] + ".200"
    vars_ = yaml.safe_load(open(cluster.vars_file))
    for w in vars_["netstack_workloads"]:
        if (w["namespace"], w["name"]) == ("x", "b"):
            w["ip"] = new_ip
    moved = _write(cluster.tmp, "vars-moved.yml", vars_)
    try:
        run_playbook("tests/integration/workloads_apply.yml", "-e", "@" + moved)
        cluster.refresh()
        assert cluster.pods["x/b"]["ip"] == new_ip
        assert cluster.policy_get("x/b")["identity"] == ident
        seen = cluster.matrix(["x/a", "x/b", "x/c"], probes=("80/TCP", "81/UDP"))
        assert seen[("x/b", "x/a", "80/TCP")] == "ok" and seen[("x/b", "x/a", "81/UDP")] == "ok", seen
        assert seen[("x/c", "x/a", "80/TCP")] == "timeout"
    finally:
        run_playbook("tests/integration/workloads_apply.yml", "-e", "@" + cluster.vars_file)
        cluster.refresh()


def _policy_on(cluster, host):
    """The policy state file and one pod's entries on ``host``: what a refused input must leave alone."""
    key = sorted(k for k, p in cluster.pods.items() if p["host"] == host)[0]
    return cluster.lab.sh(host, "cat /etc/kldload-netstack/policy.json").stdout, cluster.policy_get(key)["entries"]


@pytest.mark.parametrize("bad, message", [
    ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: x}\n"
     "spec: {podSelector: {matchLabels: {'bad key!': a}}}", "label key 'bad key!' is invalid"),
    ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: x}\n"
     "spec: {podSelector: {}, ingres: []}", "spec.ingres"),
    ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: x}\n"
     "spec: {podSelector: {}, ingress: [{ports: [{port: 81, endPort: 80}]}]}", "endPort"),
    ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: x}\n"
     "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]}", "except"),
])
def test_bad_input_is_refused_and_changes_nothing(cluster, bad, message):
    cluster.apply(pc.render(_all_cases()["default-deny-ingress"]))
    before = dict((h, _policy_on(cluster, h)) for h in cluster.lab.hosts())
    proc = cluster.apply(bad, check=False)
    assert proc.returncode != 0 and message in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    for h in cluster.lab.hosts():
        assert _policy_on(cluster, h) == before[h], h


def test_fields_not_enforced_yet_are_refused_by_path(cluster):
    for name, path in (("policy-backend-http.yaml", "rules.http"), ("policy-egress-dns-allowlist.yaml", "toFQDNs")):
        proc = cluster.apply(files=[str(FIXTURES / "not-enforced" / name)], check=False)
        out = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode != 0 and "not enforced by this dataplane yet" in out and path in out, out[-2000:]
        assert name in out                                  # the file is named


def test_native_mode(lab, cluster):
    cluster.install("native")
    try:
        for name in _case_names(NATIVE_CASES):
            wrong = cluster.check_case(_all_cases()[name])
            assert not wrong, "%s (native): %d wrong:\n%s" % (name, len(wrong), "\n".join(wrong[:30]))
    finally:
        cluster.install("tunnel")
