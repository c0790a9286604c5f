"""The conformance cases of tests/policy_cases.py (modelled on the Kubernetes e2e network policy tests,
plus Cilium cases): every case's expected reachability matrix must come out of both the reference
evaluator (evaluate.Evaluator, written from the API semantics) and the compiled entries applied the
way the dataplane will (evaluate.CompiledNetwork over compile.compile_all), for every probe."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import policy_cases as PC  # noqa: E402
from ansible_collections.kldload.netstack.plugins.module_utils.policy import compile as pcompile  # noqa: E402
from ansible_collections.kldload.netstack.plugins.module_utils.policy import evaluate, parse  # noqa: E402

# the unit layout (pods alternate between two nodes) and every pod on one node
LAYOUTS = {
    "two-nodes": {},
    "one-node": {"nodes": dict((k, "node-1") for k in PC.POD_KEYS)},
}


def _check(case, layout):
    cl = PC.cluster(**LAYOUTS[layout])
    pols = parse.load_policies(PC.render(case), case["name"])
    ref = evaluate.Evaluator(pols, cl)
    net = evaluate.CompiledNetwork(pcompile.compile_all(pols, cl))
    problems = []
    for probe in PC.PROBES:
        port, proto = probe.split("/")
        want = PC.expected(case, probe)
        got = {"reference": {}, "compiled": {}}
        for (s, d), allowed in sorted(want.items()):
            src, dst = PC.address(s) if s in PC.WORLD else s, PC.address(d) if d in PC.WORLD else d
            for name, ev in (("reference", ref), ("compiled", net)):
                ok, why = ev.decide(src, dst, proto, int(port))
                got[name][(s, d)] = ok
                if ok != allowed:
                    problems.append("%s %s %s -> %s: expected %s, got %s (%s)" % (name, probe, s, d, allowed, ok, why))
        for name in got:
            if got[name] != want:
                problems.append("%s %s:\nexpected\n%s\ngot\n%s" % (name, probe, PC.truth_table(want),
                                                                   PC.truth_table(got[name])))
    return problems


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", PC.CASES, ids=[c["name"] for c in PC.CASES])
def test_case_matrix(case, layout):
    problems = _check(case, layout)
    assert not problems, "\n".join(problems[:20])


def test_decide_function_and_reasons():
    case = next(c for c in PC.CASES if c["name"] == "ingress-podselector")
    docs = parse.load_text(PC.render(case), "case.yaml")
    cl = PC.cluster()
    assert evaluate.decide(docs, cl, "x/b", "x/a", "TCP", 80) == (
        True, "egress of x/b: not isolated; ingress of x/a: allowed by NetworkPolicy x/allow-b ingress[0]")
    assert evaluate.decide(docs, cl, "x/c", "x/a", 6, 80) == (
        False, "ingress of x/a: isolated by NetworkPolicy x/allow-b and no rule allows it")
    assert evaluate.decide(docs, cl, "x/a", "x/a", "UDP", 81) == (True, evaluate.LOOPBACK)
    host = PC.NODES[PC.NODE_OF["x/a"]]
    assert evaluate.decide(docs, cl, host, "x/a", "TCP", 80) == (True, "ingress of x/a: " + evaluate.HOST_TO_LOCAL_POD)
    other = [ip for n, ip in PC.NODES.items() if n != PC.NODE_OF["x/a"]][0]
    assert not evaluate.decide(docs, cl, other, "x/a", "TCP", 80)[0]          # a remote node is a peer like any
    net = evaluate.CompiledNetwork(pcompile.compile_all(parse.normalize(docs), cl))
    assert net.decide(host, "x/a", "TCP", 80) == (True, "ingress of x/a: " + evaluate.HOST_TO_LOCAL_POD)
    assert not net.decide(other, "x/a", "TCP", 80)[0]


def test_case_data_is_sound():
    names = [c["name"] for c in PC.CASES]
    assert len(names) == len(set(names))
    assert len(PC.NETWORK_POLICY_CASES) >= 20
    for case in PC.CASES:
        assert "IP[" not in PC.render(case)
        for rule in case["expect"]:
            assert len(rule) in (3, 4)
            for probe in (rule[3] if len(rule) == 4 else ()):
                assert probe in PC.PROBES
    # every case changes something (else it tests nothing)
    for case in PC.CASES:
        if case["expect"]:
            assert any(not v for p in PC.PROBES for v in PC.expected(case, p).values()), case["name"]
