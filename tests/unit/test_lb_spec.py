"""lb's input: validation of the declared services (field-named errors) and their canonical form."""

import json
import re

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import lb
from ansible_collections.kldload.netstack.plugins.module_utils.lb import spec, store


# ---- normalize -------------------------------------------------------------------------------------

def test_normalize_canonical_form():
    out = lb.normalize([
        {"name": "web", "vip": " 10.96.0.10", "port": "80",
         "backends": [{"ip": "10.0.0.2", "port": 8080, "weight": 3}, {"ip": "10.0.0.1"}]},
        {"name": "dns", "namespace": "kube-system", "vip": "FD00:0::A", "port": 53, "protocol": "UDP",
         "algorithm": "Maglev", "affinity_timeout": 30, "backends": [{"ip": "fd00::2", "port": "5353"}]},
        {"name": "empty", "vip": "10.96.0.11", "port": 1, "backends": None},
    ])
    assert out == [
        {"name": "web", "namespace": "default", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
         "algorithm": "random", "affinity_timeout": 0,
         "backends": [{"ip": "10.0.0.1", "port": 80, "weight": 1}, {"ip": "10.0.0.2", "port": 8080, "weight": 3}]},
        {"name": "dns", "namespace": "kube-system", "vip": "fd00::a", "port": 53, "protocol": "udp",
         "algorithm": "maglev", "affinity_timeout": 30, "backends": [{"ip": "fd00::2", "port": 5353, "weight": 1}]},
        {"name": "empty", "namespace": "default", "vip": "10.96.0.11", "port": 1, "protocol": "tcp",
         "algorithm": "random", "affinity_timeout": 0, "backends": []},
    ]
    assert lb.normalize(out) == out  # canonical form is a fixed point
    assert lb.normalize([]) == []


def _one(**kw):
    svc = {"name": "web", "vip": "10.96.0.10", "port": 80, "backends": [{"ip": "10.0.0.1"}]}
    svc.update(kw)
    return [svc]


def _be(**kw):
    return _one(backends=[dict({"ip": "10.0.0.1"}, **kw)])


BAD = [
    ("dup", _one() + [{"name": "other", "vip": "10.96.0.10", "port": 80, "protocol": "TCP"}],
     [r"services\[1\] \(other\)", r"services\[0\] \(web\)", r"10\.96\.0\.10:80/TCP", "duplicate"]),
    ("dup6", [{"name": "a", "vip": "fd00::1", "port": 80}, {"name": "b", "vip": "FD00:0:0::1", "port": 80}],
     [r"\(a\)", r"\(b\)", r"\[fd00::1\]:80/TCP"]),
    ("vip", _one(vip="10.96.0.300"), [r"services\[0\] \(web\)\.vip", "10.96.0.300"]),
    ("vip_missing", [{"name": "web", "port": 80}], [r"\.vip: required"]),
    ("vip_any", _one(vip="0.0.0.0"), [r"\.vip: 0\.0\.0\.0"]),
    ("backend_ip", _be(ip="10.0.0"), [r"\.backends\[0\]\.ip", "10.0.0"]),
    ("port0", _one(port=0), [r"\.port: must be 1\.\.65535, got 0"]),
    ("port70000", _one(port=70000), [r"\.port: must be 1\.\.65535, got 70000"]),
    ("port_abc", _one(port="abc"), [r"\.port: must be an integer, got 'abc'"]),
    ("port_missing", [{"name": "web", "vip": "10.96.0.10"}], [r"\.port: must be an integer, got None"]),
    ("port_bool", _one(port=True), [r"\.port: must be an integer"]),
    ("backend_port0", _be(port=0), [r"\.backends\[0\]\.port: must be 1\.\.65535"]),
    ("backend_port70000", _be(port=70000), [r"\.backends\[0\]\.port: must be 1\.\.65535"]),
    ("backend_port_abc", _be(port="abc"), [r"\.backends\[0\]\.port: must be an integer"]),
    ("weight0", _be(weight=0), [r"\.backends\[0\]\.weight: must be > 0, got 0"]),
    ("weight-1", _be(weight=-1), [r"\.backends\[0\]\.weight: must be > 0, got -1"]),
    ("weight_str", _be(weight="heavy"), [r"\.backends\[0\]\.weight: must be an integer"]),
    ("family", _one(vip="fd00::10"), [r"\.backends\[0\]\.ip: 10\.0\.0\.1 is IPv4", "fd00::10 is IPv6"]),
    ("unknown_field", _one(selector={"app": "x"}), [r"services\[0\]: unknown field\(s\) selector"]),
    ("unknown_backend_field", _be(node="n1"), [r"\.backends\[0\]: unknown field\(s\) node"]),
    ("backend_missing_ip", _one(backends=[{"port": 80}]), [r"\.backends\[0\]\.ip: required"]),
    ("dup_backend", _one(backends=[{"ip": "10.0.0.1", "port": 80}, {"ip": "10.0.0.1"}]),
     [r"\.backends\[1\]: backend 10\.0\.0\.1:80 listed twice"]),
    ("sctp", _one(protocol="sctp"), [r"\.protocol: must be tcp or udp, got 'sctp'"]),
    ("rr", _one(algorithm="rr"), [r"\.algorithm: must be one of random, maglev, got 'rr'"]),
    ("total_weight", _one(backends=[{"ip": "10.0.0.1", "weight": 65535}, {"ip": "10.0.0.2", "weight": 1}]),
     [r"\.backends: total weight 65536 is more than 65535"]),
    ("maglev_size", _one(algorithm="maglev", backends=[{"ip": "10.0.%d.%d" % (i // 200, i % 200 + 1)} for i in range(1639)]),
     [r"\.backends: 1639 backends need a Maglev table size of at least 16390", "maglev_table_size is 16381"]),
    ("not_list", {"name": "web"}, [r"^services: must be a list, got dict"]),
    ("not_mapping", ["web"], [r"services\[0\]: must be a mapping"]),
    ("no_name", [{"vip": "10.96.0.10", "port": 80}], [r"services\[0\]\.name: required"]),
    ("backends_not_list", _one(backends={"ip": "10.0.0.1"}), [r"\.backends: must be a list"]),
    ("affinity", _one(affinity_timeout=-5), [r"\.affinity_timeout: must be 0\.\."]),
]


@pytest.mark.parametrize("services,patterns", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_normalize_rejects(services, patterns):
    with pytest.raises(lb.LbError) as ei:
        lb.normalize(services)
    for p in patterns:
        assert re.search(p, str(ei.value)), "%r not in %r" % (p, str(ei.value))


def test_normalize_maglev_size_depends_on_table_size():
    svcs = _one(algorithm="maglev", backends=[{"ip": "10.0.0.%d" % i} for i in range(1, 103)])
    assert len(lb.normalize(svcs)[0]["backends"]) == 102
    with pytest.raises(lb.LbError, match="at least 1020 .maglev_table_size is 1019"):
        lb.normalize(svcs, maglev_m=1019)
    # random services have no such limit
    assert lb.normalize(_one(backends=[{"ip": "10.0.%d.%d" % (i // 200, i % 200 + 1)} for i in range(500)]))


@pytest.mark.parametrize("value", ["--5", "\u00b2"])
def test_normalize_odd_integer_strings_give_lb_error(value):
    with pytest.raises(lb.LbError, match=r"\.port: must be"):
        lb.normalize(_one(port=value))


BACKEND_BAD = [
    ("not_a_mapping", ["10.0.0.1"], r"\.backends\[0\]: must be a mapping \{ip, port, weight\}, got '10\.0\.0\.1'"),
    ("bool_port", [{"ip": "10.0.0.1", "port": 8080}, {"ip": "10.0.0.2", "port": True}], r"\.backends\[1\]\.port: must be an integer"),
    ("bool_weight", [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2", "weight": True}], r"\.backends\[1\]\.weight: must be an integer"),
    ("float_weight", [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2", "weight": 1.0}], r"\.backends\[1\]\.weight: must be an integer"),
    ("ip_not_text", [{"ip": ["10.0.0.1"]}], r"\.backends\[0\]\.ip: \['10\.0\.0\.1'\] is not an IPv4"),
    ("short_ipv4", [{"ip": "10.1"}], r"\.backends\[0\]\.ip: '10\.1' is not an IPv4"),
    ("dup_other_weight", [{"ip": "10.0.0.1", "weight": 2}, {"ip": "10.0.0.1", "weight": 3}],
     r"\.backends\[1\]: backend 10\.0\.0\.1:80 listed twice"),
]


@pytest.mark.parametrize("backends,pattern", [b[1:] for b in BACKEND_BAD], ids=[b[0] for b in BACKEND_BAD])
def test_a_backend_validated_once_is_still_checked_in_every_service(backends, pattern):
    """Backends repeat across services and are validated once; the checks that depend on the entry (type,
    extra fields, bool/float look-alikes of a valid int, duplicates) still hold in every service."""
    good = {"name": "first", "vip": "10.96.0.1", "port": 80, "backends": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"},
                                                                          {"ip": "10.0.0.1", "port": 8080}]}
    with pytest.raises(lb.LbError, match=r"services\[1\] \(web\)" + pattern):
        lb.normalize([good, {"name": "web", "vip": "10.96.0.10", "port": 80, "backends": backends}])


def test_shared_backends_are_one_object_and_vips_canonical():
    out, absent = spec.parse([{"name": "a", "vip": "10.96.0.1", "port": 80, "backends": [{"ip": "10.0.0.1"}]},
                              {"name": "b", "vip": "10.96.0.2", "port": 80, "backends": [{"ip": " 10.0.0.1"}]},
                              {"vip": "10.96.0.3", "port": 80, "state": "absent"}], 1021)
    assert out[0].backends[0] == out[1].backends[0] and out[0].backends[0].addr == "10.0.0.1:80"
    assert absent == {("10.96.0.3", 80, "tcp"): ""}
    for vip, text in (("10.96.0.1 ", "10.96.0.1"), ("::FFFF:10.0.0.1", "::ffff:a00:1"), ("FD00:0::A", "fd00::a")):
        assert lb.normalize([{"name": "x", "vip": vip, "port": 1}])[0]["vip"] == text
    for vip in ("224.0.0.1", "239.1.2.3", "0.0.0.0", "ff02::1", "::"):
        with pytest.raises(lb.LbError, match="cannot be a service address"):
            lb.normalize([{"name": "x", "vip": vip, "port": 1}])
    with pytest.raises(lb.LbError, match=r"\.vip: '010\.0\.0\.1' is not an IPv4 or IPv6 address"):
        lb.normalize([{"name": "x", "vip": "010.0.0.1", "port": 1}])


def test_state_lines_equal_json_dumps():
    """The state file's fast encoder writes what json.dumps(sort_keys=True) writes."""
    services = [{"name": "w\u00e9b \"x\"", "namespace": "ns/\u4e2d", "vip": "fd00::a", "port": 53, "protocol": "udp",
                 "algorithm": "maglev", "affinity_timeout": 30,
                 "backends": [{"ip": "fd00::2", "port": 5353, "weight": 7}, {"ip": "fd00::1"}]},
                {"name": "empty", "vip": "10.96.0.11", "port": 1, "backends": []}]
    parsed, _absent = spec.parse(services, 1021)
    canonical = lb.normalize(services)
    assert store.encode(parsed) == [json.dumps(s, sort_keys=True) for s in canonical] == store.encode(canonical)


def test_journal_survives_a_torn_line_and_ignores_an_older_generation(tmp_path):
    state = str(tmp_path / "services.json")
    base = [{"name": "web", "vip": "10.96.0.10", "port": 80, "backends": [{"ip": "10.0.0.1"}]},
            {"name": "api", "vip": "10.96.0.11", "port": 443, "backends": []}]
    store.write_state(state, lb.normalize(base[:1]))
    x = spec.parse([{"name": "x", "vip": "10.96.9.9", "port": 80, "backends": [{"ip": "10.0.0.9"}]}], 1021)[0][0]
    store.journal(state, [x], [])
    store.journal(state, [], [("10.96.0.10", 80, "tcp")])
    assert [s["name"] for s in lb.load_state(state)] == ["x"]
    assert lb.load_state(state)[0] == x.as_dict()
    with open(state + ".journal", "a") as f:
        f.write('{"generation": 1, "upsert": {"vip": "10.9')          # a crash in the middle of a line
    assert [s["name"] for s in lb.load_state(state)] == ["x"]
    # a state file rewritten but the journal not yet removed (a crash in between): its lines are older
    store.write_state(state, lb.normalize(base))
    with open(state + ".journal", "w") as f:
        f.write(json.dumps({"generation": 2, "remove": ["10.96.0.11", 443, "tcp"]}) + "\n")
        f.write(json.dumps({"generation": 1, "remove": ["10.96.0.10", 80, "tcp"]}) + "\n")
    assert [s["name"] for s in lb.load_state(state)] == ["web"]
    assert lb.load_state(str(tmp_path / "none.json")) == []


def test_journal_compacts_into_the_state_file(tmp_path):
    state = str(tmp_path / "services.json")
    store.write_state(state, [])
    many = spec.parse([{"name": "s%d" % i, "vip": "10.96.%d.%d" % (i // 200, i % 200 + 1), "port": 80,
                        "backends": [{"ip": "10.0.0.%d" % (i % 200 + 1)}]} for i in range(800)], 1021)[0]
    store.journal(state, many, [])
    import os
    assert not os.path.exists(state + ".journal")        # larger than the state file and 64 KiB: folded in
    with open(state) as f:
        doc = json.load(f)
    assert doc["generation"] == 2 and len(doc["services"]) == 800
