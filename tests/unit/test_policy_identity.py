"""Security identities (plugins/module_utils/policy/identity.py)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as I

REPO = Path(__file__).resolve().parents[2]


def test_reserved_numbers_are_ciliums():
    assert I.RESERVED == {0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                          6: "remote-node", 7: "kube-apiserver", 8: "ingress"}
    assert I.reserved_labels(6) == ["reserved:remote-node"]
    assert I.RESERVED_BY_NAME["kube-apiserver"] == 7


def test_endpoint_labels():
    got = I.endpoint_labels("shop", {"app": "web", "tier": "front"}, {"team": "a"})
    assert got == [
        "k8s:app=web",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop",
        "k8s:io.cilium.k8s.namespace.labels.team=a",
        "k8s:io.kubernetes.pod.namespace=shop",
        "k8s:tier=front",
    ]
    # the namespace name label is always there and cannot be overridden
    assert "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop" in I.endpoint_labels(
        "shop", {}, {"kubernetes.io/metadata.name": "other"})


def test_hash_is_the_documented_formula():
    lbls = I.endpoint_labels("shop", {"app": "web"})
    text = "\n".join(sorted(lbls))
    want = 256 + int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2 ** 24 - 256)
    assert I.hashed(lbls) == want
    assert I.allocate([lbls]) == {want: sorted(lbls)}


def test_deterministic_across_order_and_duplicates():
    sets = [I.endpoint_labels(ns, {"app": a}) for ns in ("a", "b", "c") for a in ("x", "y", "z")]
    one = I.allocate(sets)
    assert I.allocate(list(reversed(sets))) == one
    assert I.allocate(sets + sets[:3]) == one
    assert I.allocate([list(reversed(s)) for s in sets]) == one      # label order inside a set does not matter
    assert all(256 <= i < 2 ** 24 for i in one) and len(one) == len(sets)


def test_deterministic_across_processes():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ansible_collections.kldload.netstack.plugins.module_utils.policy import identity as I\n"
            "print(sorted(I.allocate([I.endpoint_labels('ns', {'app': str(i)}) for i in range(50)])))"
            % str(REPO / ".collections"))
    outs = set()
    for seed in ("0", "1", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                check=True).stdout)
    assert len(outs) == 1
    want = sorted(I.allocate([I.endpoint_labels("ns", {"app": str(i)}) for i in range(50)]))
    assert outs.pop().strip() == str(want)


def test_collisions_resolved_in_canonical_order():
    sets = [["k8s:app=%d" % i] for i in range(20)]
    # modulus 1: every set hashes to 256; canonical text order gets 256, 257, ...
    got = I.allocate(sets, _modulus=1)
    order = sorted(I.canonical(s) for s in sets)
    assert [I.canonical(got[i]) for i in sorted(got)] == order
    assert sorted(got) == list(range(256, 276))
    assert I.allocate(list(reversed(sets)), _modulus=1) == got
    # modulus 3: collisions probe upward past the hash range, still unique and deterministic
    got3 = I.allocate(sets, _modulus=3)
    assert len(got3) == 20 and all(256 <= i < 2 ** 24 for i in got3)
    assert I.allocate(sets[::-1], _modulus=3) == got3


def test_probe_wraps_below_the_limit(monkeypatch):
    sets = [["k8s:app=%d" % i] for i in range(3)]
    top = 2 ** 24 - 1
    monkeypatch.setattr(I, "hashed", lambda lbls, _modulus=None: top)     # every set hashes to the last id
    got = I.allocate(sets)
    assert sorted(got) == [256, 257, top]
    assert got[top] == sets[0] and got[256] == sets[1] and got[257] == sets[2]
    # the last id taken already: all wrap
    assert sorted(I.allocate(sets, known={top: ["k8s:other=1"]})) == [256, 257, 258]


def test_known_identities_win_and_are_not_reused():
    a, b = ["k8s:app=a"], ["k8s:app=b"]
    first = I.allocate([a], _modulus=1)                          # a -> 256
    assert first == {256: a}
    # b alone would take 256, but a node that knows a keeps a there and b probes on
    assert I.allocate([b], _modulus=1) == {256: b}
    assert I.allocate([a, b], known=first, _modulus=1) == {256: a, 257: b}
    # an id the known table holds is never given to another set, even when its set is gone
    assert I.allocate([b], known=first, _modulus=1) == {257: b}
    # a known table as a compile output has it (reserved and CIDR entries, string ids)
    table = {"1": {"labels": ["reserved:host"], "kind": "reserved"}, "256": {"labels": a, "kind": "endpoint"},
             str(2 ** 24): {"labels": ["cidr:10.0.0.0/8"], "kind": "cidr", "cidr": "10.0.0.0/8"}}
    assert I.allocate([b, a], known=table, _modulus=1) == {256: a, 257: b}


def test_cidr_identities():
    got = I.cidr_identities(["10.1.0.0/16", "10.0.0.0/8", "192.168.0.0/24", "10.0.0.0/16", "10.0.0.0/8", "0.0.0.0/0"])
    assert got == [("10.0.0.0/8", 2 ** 24), ("10.0.0.0/16", 2 ** 24 + 1), ("10.1.0.0/16", 2 ** 24 + 2),
                   ("192.168.0.0/24", 2 ** 24 + 3)]
    assert I.cidr_identities([]) == []
    assert I.kind(2 ** 24) == "cidr" and I.kind(2) == "reserved" and I.kind(300) == "endpoint"
