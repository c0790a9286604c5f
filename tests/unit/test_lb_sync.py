"""lb.sync() against maps that check every write (test_lb_world.py): the in-memory fake, and (root) real
maps on a private bpffs mirrored by the fake. Both paths: the full sync (prune=True) and the
incremental path (prune=False) through the userspace index."""

import collections
import errno
import ipaddress
import json
import os
import random
import re
import struct

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import lb
from ansible_collections.kldload.netstack.plugins.module_utils.lb import layout, state

from test_lb_world import M, FakeWorld, make_world

S = lb.S
INDEX_MAPS = ("kln_lb_bidx", "kln_lb_index")


@pytest.fixture(params=["fake", "real"])
def world(request, monkeypatch):
    w = make_world(request.param)
    w.install(monkeypatch)
    try:
        yield w
        assert w.opened == w.closed, "Maps opened %d times, closed %d" % (w.opened, w.closed)
        w.check_contents()
    finally:
        if request.param == "real":
            w.close()


def sync(world, services, **kw):
    kw.setdefault("maglev_m", M)
    res = lb.sync(world.dir, services, **kw)
    assert world.violations == [], world.violations
    assert world.missing_deletes == []
    return res


def raw_sync(world, services, **kw):
    """lb.sync() expected to fail: no checks of the result."""
    kw.setdefault("maglev_m", M)
    return lb.sync(world.dir, services, **kw)


def S4(name, vip, port, ips, **kw):
    bes = []
    for ip in ips:
        if isinstance(ip, tuple):
            bes.append({"ip": ip[0], "port": ip[1], "weight": ip[2]} if len(ip) == 3 else {"ip": ip[0], "port": ip[1]})
        else:
            bes.append({"ip": ip})
    return dict({"name": name, "vip": vip, "port": port, "backends": bes}, **kw)


def slot_key(vip, port, n, proto="tcp"):
    ip = ipaddress.ip_address(vip)
    return layout.svc_key(ip.version, ip.packed, port, n, lb.PROTOCOLS[proto])


def master_key(vip, port, proto="tcp"):
    return slot_key(vip, port, 0, proto)


def svc_map(vip):
    return "kln_lb%d_svc" % ipaddress.ip_address(vip).version


def master_of(world, vip, port, proto="tcp"):
    raw = world.store[svc_map(vip)].get(master_key(vip, port, proto))
    if raw is None:
        return None
    _bid, count, sid, alg, flags, weight, aff, rev = S["lb_service"].unpack(raw)
    return {"count": count, "id": sid, "alg": alg, "flags": flags, "weight": weight, "affinity_timeout": aff, "rev": rev}


def slot_backends(world, vip, port, proto="tcp"):
    """[(ip, port, cumulative weight)] of the live slots of a service."""
    fam = ipaddress.ip_address(vip).version
    out = []
    for n in range(1, master_of(world, vip, port, proto)["count"] + 1):
        s = S["lb_service"].unpack(world.store[svc_map(vip)][slot_key(vip, port, n, proto)])
        out.append(world.backend(fam, s[0]) + (s[5],))
    return out


BASE = [
    S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    S4("api", "10.96.0.11", 443, [("10.0.0.2", 8443, 3), ("10.0.0.4", 8443, 1)], affinity_timeout=60),
    S4("mag", "10.96.0.12", 80, ["10.0.0.5", "10.0.0.6"], algorithm="maglev"),
    S4("dns6", "fd00::53", 53, ["fd00::1", ("fd00::2", 5353)], protocol="udp"),
]


def invalidate_index(world):
    raw = world.store["kln_lb_index"][layout.IDX_KEY]
    world.store["kln_lb_index"][layout.IDX_KEY] = struct.pack("=I", 0) + raw[4:]


def _write_order_checks(world, services, res):
    """The commit order of the last sync's writes: index invalid first and valid last, every update before
    any delete, every rewritten service's slots, backends and Maglev half before its master."""
    idx = [i for i, o in enumerate(world.ops) if o[1] == "kln_lb_index"]
    data = [i for i, o in enumerate(world.ops) if o[1] not in INDEX_MAPS]
    assert len(idx) in (1, 2) and idx[-1] > max(data), "the index is not written after the last map write"
    if len(idx) == 2:
        assert idx[0] < min(data), "the index is not invalidated before the first map write"
    ops = [o for o in world.ops if o[1] not in INDEX_MAPS]
    upd = [i for i, o in enumerate(ops) if o[0] == "update"]
    dels = [i for i, o in enumerate(ops) if o[0] == "delete"]
    if upd and dels:
        assert max(upd) < min(dels), "a delete came before an update"
    backend_writes = [i for i, o in enumerate(ops) if o[0] == "update" and "backend" in o[1]]
    maglev_writes = [i for i, o in enumerate(ops) if o[0] == "update" and o[1] == "kln_lb_maglev"]
    by_label = dict((lb.svc_label(lb.svc_key(s)), s) for s in lb.normalize(services, M))
    rewritten = [a["service"] for a in res["diff"]["added"] + res["diff"]["changed"]]
    assert rewritten
    for label in rewritten:
        s = by_label[label]
        name = svc_map(s["vip"])
        mk = master_key(s["vip"], s["port"], s["protocol"])
        at = [i for i, o in enumerate(ops) if o == ("update", name, mk)]
        assert len(at) == 1, label
        for n in range(1, len(s["backends"]) + 1):
            sk = slot_key(s["vip"], s["port"], n, s["protocol"])
            assert all(i < at[0] for i, o in enumerate(ops) if o == ("update", name, sk)), (label, n)
            assert ("update", name, sk) in ops or res["diff"]["changed"], (label, n)
        assert all(i < at[0] for i in backend_writes), label
        if s["algorithm"] == "maglev":
            assert maglev_writes and all(i < at[0] for i in maglev_writes), label
    return rewritten


# ---- the full path -----------------------------------------------------------------------------------

def test_first_sync_writes_everything_then_nothing(world):
    res = sync(world, BASE)
    assert res["changed"] is True and res["stats"]["path"] == "full"
    assert sorted(a["name"] for a in res["diff"]["added"]) == ["default/api", "default/dns6", "default/mag", "default/web"]
    assert res["diff"]["removed"] == [] and res["diff"]["changed"] == []
    assert res["services"] == 4
    assert len(world.store["kln_lb4_backend"]) == 7 and len(world.store["kln_lb6_backend"]) == 2
    assert slot_backends(world, "10.96.0.10", 80) == [("10.0.0.1", 80, 1), ("10.0.0.2", 80, 2), ("10.0.0.3", 80, 3)]
    assert slot_backends(world, "10.96.0.11", 443) == [("10.0.0.2", 8443, 3), ("10.0.0.4", 8443, 4)]
    assert slot_backends(world, "fd00::53", 53, "udp") == [("fd00::1", 53, 1), ("fd00::2", 5353, 2)]
    api = master_of(world, "10.96.0.11", 443)
    assert (api["alg"], api["flags"], api["weight"], api["affinity_timeout"], api["rev"]) == \
        (lb.ALG_WEIGHTED, lb.SVC_F_AFFINITY, 4, 60, 1)
    web = master_of(world, "10.96.0.10", 80)
    assert (web["alg"], web["flags"], web["count"], web["rev"]) == (lb.ALG_RANDOM, 0, 3, 1)
    assert world.m() == M
    rows = dict((r["service"], r) for r in res["table"])
    assert [b["address"] for b in rows["[fd00::53]:53/UDP"]["backends"]] == ["[fd00::1]:53", "[fd00::2]:5353"]
    assert rows["10.96.0.11:443/TCP"]["weighted"] and rows["10.96.0.11:443/TCP"]["name"] == "default/api"
    assert [b["weight"] for b in rows["10.96.0.11:443/TCP"]["backends"]] == [3, 1]

    world.reset_log()
    res = sync(world, BASE)
    assert res["changed"] is False
    assert res["diff"] == {"added": [], "removed": [], "changed": []}
    assert world.ops == []
    # permuted input, string ports and upper-case protocol are the same declaration
    perm = [dict(s, backends=list(reversed(s["backends"]))) for s in reversed(BASE)]
    perm[0] = dict(perm[0], protocol="UDP", port="53")
    assert sync(world, perm)["changed"] is False
    assert world.ops == []


def test_default_maglev_table_size(world):
    sync(world, [BASE[2]], maglev_m=lb.DEFAULT_MAGLEV_M)
    assert lb.DEFAULT_MAGLEV_M == 16381 and world.m() == 16381
    mag = master_of(world, "10.96.0.12", 80)
    half = world.maglev_half(mag["id"], mag["rev"])
    assert len(half) == 16381 and 0 not in half
    assert len(world.store["kln_lb_maglev"]) == 16381


def test_check_mode_writes_nothing(world):
    res = sync(world, BASE, check=True)
    assert res["changed"] is True and len(res["diff"]["added"]) == 4
    assert world.ops == [] and all(not v for v in world.store.values())
    sync(world, BASE)
    world.reset_log()
    new = [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.3", "10.0.0.9"])] + BASE[1:3]
    before = dict((n, dict(v)) for n, v in world.store.items())
    res = sync(world, new, check=True)
    assert res["changed"] is True
    assert world.ops == [] and world.store == before
    assert res["diff"]["changed"] == [{"service": "10.96.0.10:80/TCP", "name": "default/web",
                                       "backends_added": ["10.0.0.9:80"], "backends_removed": ["10.0.0.2:80"]}]
    assert [r["service"] for r in res["diff"]["removed"]] == ["[fd00::53]:53/UDP"]


def test_removing_a_backend(world):
    gone = []
    sync(world, BASE, on_backends_gone=gone.append)
    world.reset_log()
    new = [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.3"])] + BASE[1:]
    bid3 = world.backend_ids()[("10.0.0.3", 80)]
    res = sync(world, new, on_backends_gone=gone.append)
    assert res["changed"] is True
    assert res["diff"]["changed"] == [{"service": "10.96.0.10:80/TCP", "name": "default/web",
                                       "backends_removed": ["10.0.0.2:80"]}]
    assert slot_backends(world, "10.96.0.10", 80) == [("10.0.0.1", 80, 1), ("10.0.0.3", 80, 2)]
    assert slot_key("10.96.0.10", 80, 3) not in world.store["kln_lb4_svc"]
    assert ("delete", "kln_lb4_svc", slot_key("10.96.0.10", 80, 3)) in world.ops
    # 10.0.0.2:80 left every service; 10.0.0.2:8443 (api) is another backend and stays
    backends = set(world.backend_ids())
    assert ("10.0.0.2", 80) not in backends and ("10.0.0.2", 8443) in backends
    assert gone == [[("10.0.0.2", 80)]]
    assert world.backend_ids()[("10.0.0.3", 80)] == bid3          # ids of the backends that stay do not change
    assert master_of(world, "10.96.0.10", 80)["rev"] == 2
    assert master_of(world, "10.96.0.11", 443)["rev"] == 1         # untouched
    assert sync(world, new)["changed"] is False


def test_prune_false_keeps_unlisted_services(world):
    sync(world, BASE)
    world.reset_log()
    res = sync(world, BASE[:1], prune=False)
    assert res["changed"] is False and world.ops == []
    assert res["services"] == 4
    assert master_of(world, "10.96.0.11", 443) is not None
    res = sync(world, BASE[:1] + [S4("new", "10.96.0.20", 80, ["10.0.0.20"])], prune=False)
    assert res["changed"] is True and [a["service"] for a in res["diff"]["added"]] == ["10.96.0.20:80/TCP"]
    assert res["diff"]["removed"] == []
    assert all(master_of(world, s["vip"], s["port"], s.get("protocol", "tcp")) for s in BASE)
    world.reset_log()
    res = sync(world, BASE[:1])
    assert sorted(r["service"] for r in res["diff"]["removed"]) == [
        "10.96.0.11:443/TCP", "10.96.0.12:80/TCP", "10.96.0.20:80/TCP", "[fd00::53]:53/UDP"]
    assert len(world.store["kln_lb4_svc"]) == 4
    assert world.store["kln_lb6_svc"] == {} and world.store["kln_lb6_backend"] == {}
    assert len(world.store["kln_lb4_backend"]) == 3


def test_write_order(world):
    res = sync(world, BASE)
    assert len(_write_order_checks(world, BASE, res)) == 4
    world.reset_log()
    new = [
        S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.7"]),                       # one replaced, one gone
        BASE[1],
        S4("mag", "10.96.0.12", 80, ["10.0.0.5", "10.0.0.6", "10.0.0.8"], algorithm="maglev"),
        S4("new6", "fd00::80", 80, ["fd00::8"]),
    ]
    res = sync(world, new)
    assert sorted(_write_order_checks(world, new, res)) == ["10.96.0.10:80/TCP", "10.96.0.12:80/TCP", "[fd00::80]:80/TCP"]
    # the removed service: its master goes first, then its slots, then its backends
    ops = world.ops
    gone_master = ops.index(("delete", "kln_lb6_svc", master_key("fd00::53", 53, "udp")))
    gone_slots = [ops.index(("delete", "kln_lb6_svc", slot_key("fd00::53", 53, n, "udp"))) for n in (1, 2)]
    assert gone_master < min(gone_slots)
    backend_dels = [i for i, o in enumerate(ops) if o[0] == "delete" and "backend" in o[1]]
    svc_dels = [i for i, o in enumerate(ops) if o[0] == "delete" and o[1].endswith("_svc")]
    assert len(backend_dels) == 4 and max(svc_dels) < min(backend_dels)  # 10.0.0.2:80 10.0.0.3 fd00::1 fd00::2
    assert sync(world, new)["changed"] is False


def test_maglev_tables_double_buffered(world):
    svc = [S4("mag", "10.96.0.12", 80, ["10.0.0.5", "10.0.0.6", "10.0.0.7"], algorithm="maglev")]
    sync(world, svc)
    m1 = master_of(world, "10.96.0.12", 80)
    assert (m1["id"], m1["rev"], m1["alg"], m1["count"]) == (1, 1, lb.ALG_MAGLEV, 3)
    ids = world.backend_ids()
    want = lb.maglev_table([("10.0.0.%d:80" % i, ids[("10.0.0.%d" % i, 80)], 1) for i in (5, 6, 7)], M)
    assert world.maglev_half(1, 1) == want
    assert len(world.store["kln_lb_maglev"]) == M  # only the half in use
    first = world.maglev_half(1, 1)
    svc = [S4("mag", "10.96.0.12", 80, ["10.0.0.5", "10.0.0.7"], algorithm="maglev")]
    sync(world, svc)
    m2 = master_of(world, "10.96.0.12", 80)
    assert (m2["id"], m2["rev"]) == (1, 2)
    second = world.maglev_half(1, 2)
    assert second == lb.maglev_table([("10.0.0.%d:80" % i, ids[("10.0.0.%d" % i, 80)], 1) for i in (5, 7)], M)
    assert world.maglev_half(1, 1) == first  # the other half was left for readers of rev 1
    moved = sum(1 for a, b in zip(first, second) if a != ids[("10.0.0.6", 80)] and a != b)
    assert moved < 0.06 * M, moved


def test_service_ids(world):
    svcs = [S4("m%d" % i, "10.96.1.%d" % i, 80, ["10.0.0.1"], algorithm="maglev") for i in range(1, 4)] + \
        [S4("r%d" % i, "10.96.2.%d" % i, 80, ["10.0.0.1"]) for i in range(1, 4)] + \
        [S4("r6", "fd00::1", 80, ["fd00::2"]), S4("m6", "fd00::2", 80, ["fd00::3"], algorithm="maglev")]
    sync(world, svcs)
    ids = dict((s["name"], master_of(world, s["vip"], s["port"])["id"]) for s in svcs)
    assert sorted(ids[n] for n in ("m1", "m2", "m3", "m6")) == [1, 2, 3, 4]
    assert sorted(ids[n] for n in ("r1", "r2", "r3", "r6")) == [65532, 65533, 65534, 65535]
    # ids are kept across syncs; a new service does not take a used one
    sync(world, svcs + [S4("m9", "10.96.1.9", 80, ["10.0.0.1"], algorithm="maglev"), S4("r9", "10.96.2.9", 80, ["10.0.0.1"])])
    assert dict((s["name"], master_of(world, s["vip"], s["port"])["id"]) for s in svcs) == ids
    assert master_of(world, "10.96.1.9", 80)["id"] == 5 and master_of(world, "10.96.2.9", 80)["id"] == 65531


def test_affinity_entries_of_rewritten_services_are_dropped(world):
    sync(world, BASE)
    api = master_of(world, "10.96.0.11", 443)["id"]
    web = master_of(world, "10.96.0.10", 80)["id"]
    aff = world.store["kln_lb_affinity"]
    for cookie, sid in ((1, api), (2, api), (3, web)):
        aff[S["lb_affinity_key"].pack(cookie, sid, 0, 0)] = S["lb_affinity"].pack(1, 0, 123)
    new = [BASE[0], S4("api", "10.96.0.11", 443, [("10.0.0.2", 8443, 3)], affinity_timeout=60)] + BASE[2:]
    sync(world, new)
    assert sorted(S["lb_affinity_key"].unpack(k)[:2] for k in aff) == [(3, web)]


def test_capacity_errors_before_any_write(world):
    world.resize("kln_lb4_svc", 3)
    with pytest.raises(lb.LbError, match=r"kln_lb4_svc .* holds 3"):
        raw_sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])])
    assert world.ops == []
    world.resize("kln_lb4_svc", 4)
    sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])])

    world.resize("kln_lb4_backend", 3)
    world.reset_log()
    with pytest.raises(lb.LbError, match=r"4 distinct IPv4 backends but kln_lb4_backend holds 3"):
        raw_sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])])
    assert world.ops == []


def test_maglev_capacity_error_before_any_write(world):
    world.resize("kln_lb_maglev", 3 * 2 * M)     # ids 1 and 2 fit
    svcs = [S4("m%d" % i, "10.96.1.%d" % i, 80, ["10.0.0.1"], algorithm="maglev") for i in range(1, 4)]
    with pytest.raises(lb.LbError, match="more Maglev services than kln_lb_maglev holds"):
        raw_sync(world, svcs)
    assert world.ops == []
    sync(world, svcs[:2])


def test_maglev_table_size_change_refused(world):
    sync(world, BASE)
    world.reset_log()
    with pytest.raises(lb.LbError, match="maglev_table_size: the maps hold Maglev tables of size 1021"):
        raw_sync(world, BASE, maglev_m=2039)
    assert world.ops == []
    for bad in (1000, 5, 1):
        with pytest.raises(lb.LbError, match="maglev_table_size: must be a prime"):
            raw_sync(world, BASE, maglev_m=bad)
    assert world.ops == []
    # without Maglev services the size may change
    no_maglev = [s for s in BASE if s.get("algorithm") != "maglev"]
    sync(world, no_maglev)
    res = sync(world, BASE, maglev_m=2039)
    assert res["changed"] and world.m() == 2039
    mag = master_of(world, "10.96.0.12", 80)
    assert world.maglev_half(mag["id"], mag["rev"]).count(0) == 0


def test_on_backends_gone(world):
    calls = []
    a = S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])
    b = S4("b", "10.96.0.2", 80, ["10.0.0.2", "10.0.0.3"])
    sync(world, [a, b], on_backends_gone=calls.append)
    assert calls == []
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.1"]), b], on_backends_gone=calls.append)
    assert calls == []                                # 10.0.0.2 is still used by b
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.9"]), b], on_backends_gone=calls.append)
    assert calls == [[("10.0.0.1", 80)]]
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.9"]), b], check=True, on_backends_gone=calls.append)
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.9"])], check=True, on_backends_gone=calls.append)
    assert len(calls) == 1                            # check mode calls nothing
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.9"])], on_backends_gone=calls.append)
    assert calls[1] == [("10.0.0.2", 80), ("10.0.0.3", 80)]


def test_state_file_and_table(world, tmp_path):
    state_file = str(tmp_path / "lb" / "services.json")
    svcs = [S4("web", "10.96.0.10", 80, ["10.0.0.2", "10.0.0.1"], namespace="shop")] + BASE[2:]
    sync(world, svcs, state_file=state_file)
    with open(state_file) as f:
        assert json.load(f) == {"generation": 1, "services": lb.normalize(svcs)}
    assert oct(os.stat(state_file).st_mode & 0o777) == "0o644"
    rows = lb.table(world.dir, state_file)
    assert [(r["service"], r["name"]) for r in rows] == [
        ("10.96.0.10:80/TCP", "shop/web"), ("10.96.0.12:80/TCP", "default/mag"), ("[fd00::53]:53/UDP", "default/dns6")]
    assert [r["name"] for r in lb.table(world.dir)] == ["", "", ""]
    text = lb.format_table(rows)
    assert "shop/web" in text and "default/dns6" in text
    # services removed: the state file follows
    sync(world, svcs[:1], state_file=state_file)
    with open(state_file) as f:
        assert [s["name"] for s in json.load(f)["services"]] == ["web"]


def test_state_file_keeps_unlisted_services_with_prune_false(world, tmp_path):
    state_file = str(tmp_path / "services.json")
    sync(world, BASE, state_file=state_file)
    with open(state_file) as f:
        full = f.read()
    sync(world, [S4("x", "10.96.9.9", 80, ["10.0.0.9"])], prune=False, state_file=state_file)
    assert sorted(s["name"] for s in lb.load_state(state_file)) == ["api", "dns6", "mag", "web", "x"]
    with open(state_file) as f:
        assert f.read() == full, "the incremental path appends to the journal; the state file stays"
    sync(world, [{"vip": "10.96.0.10", "port": 80, "state": "absent"}], prune=False, state_file=state_file)
    assert sorted(s["name"] for s in lb.load_state(state_file)) == ["api", "dns6", "mag", "x"]
    with open(state_file + ".journal") as f:
        assert len(f.read().splitlines()) == 2
    # a full sync folds the journal into the state file (generation 2) and removes it
    sync(world, BASE[:2], state_file=state_file)
    assert not os.path.exists(state_file + ".journal")
    with open(state_file) as f:
        assert json.load(f) == {"generation": 2, "services": lb.normalize(BASE[:2])}


def test_state_file_keeps_the_declarations_of_kept_services_on_the_full_path(world, tmp_path):
    """prune=False falling back to the full path keeps the unlisted services' declarations and names."""
    state_file = str(tmp_path / "services.json")
    sync(world, BASE, state_file=state_file)
    invalidate_index(world)                             # no index: the full path
    res = sync(world, [S4("x", "10.96.9.9", 80, ["10.0.0.9"]), {"vip": "10.96.0.10", "port": 80, "state": "absent"}],
               prune=False, state_file=state_file)
    assert res["stats"]["path"] == "full"
    assert res["diff"]["removed"][0]["name"] == "default/web"          # the name from the state file
    assert sorted(s["name"] for s in lb.load_state(state_file)) == ["api", "dns6", "mag", "x"]
    assert [r["service"] for r in res["table"]] == ["10.96.9.9:80/TCP"]


def test_state_file_written_when_maps_already_match(world, tmp_path):
    state_file = str(tmp_path / "services.json")
    sync(world, BASE, state_file=state_file)
    os.unlink(state_file)
    renamed = [dict(BASE[0], name="frontend")] + BASE[1:]
    assert sync(world, renamed, state_file=state_file)["changed"] is False
    with open(state_file) as f:
        assert json.load(f) == {"generation": 1, "services": lb.normalize(renamed)}


def test_returned_table_is_what_the_maps_hold(world, tmp_path):
    """sync() builds its table from what it wrote; it must equal the maps read back."""
    state_file = str(tmp_path / "services.json")
    steps = [BASE,
             [S4("web", "10.96.0.10", 80, ["10.0.0.1", ("10.0.0.9", 80, 4)])] + BASE[1:3],
             [S4("mag", "10.96.0.12", 80, ["10.0.0.5"], algorithm="maglev")],
             [S4("new", "10.96.0.20", 80, ["10.0.0.20"], affinity_timeout=30)]]
    for i, services in enumerate(steps):
        res = sync(world, services, prune=i != 3, state_file=state_file)
        assert res["changed"] is True
        whole = lb.table(world.dir, state_file)
        if i == 3:      # prune=False: the listed services only
            assert res["stats"]["path"] == "incremental"
            assert res["table"] == [r for r in whole if r["service"] == "10.96.0.20:80/TCP"]
            assert res["services"] == len(whole)
        else:
            assert res["table"] == whole, "step %d" % i
            assert res["services"] == len(res["table"])


def test_format_table_two_backends(world):
    sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1", ("10.0.0.2", 8080)])])
    rows = lb.table(world.dir)
    lines = lb.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("SERVICE ADDRESS")
    assert re.match(r"^10\.96\.0\.10:80/TCP\s+0\.0\.0\.0:0 \(65535\) \(0\)\s+random$", lines[1]), lines[1]
    assert re.match(r"^\s+10\.0\.0\.1:80 \(65535\) \(1\)\s+weight=1$", lines[2]), lines[2]
    assert re.match(r"^\s+10\.0\.0\.2:8080 \(65535\) \(2\)\s+weight=1$", lines[3]), lines[3]


def test_format_table_details():
    rows = [{"service": "10.96.0.1:53/UDP", "name": "kube-system/dns", "id": 7, "algorithm": "maglev",
             "weighted": False, "affinity_timeout": 30, "rev": 3, "backends": []},
            {"service": "10.96.0.2:80/TCP", "name": "", "id": 8, "algorithm": "random", "weighted": True,
             "affinity_timeout": 0, "rev": 1,
             "backends": [{"address": "10.0.0.1:80", "id": 1, "slot": 1, "weight": 5}]}]
    lines = lb.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[1].endswith("maglev affinity=30s kube-system/dns (no backends: connect refused)")
    assert lines[2].endswith("random weighted")
    assert lines[3].endswith("weight=5") and "10.0.0.1:80 (8) (1)" in lines[3]


def test_absent_entries_with_prune_true_are_removed(world):
    sync(world, BASE)
    res = sync(world, BASE[:3] + [{"vip": "fd00::53", "port": 53, "protocol": "udp", "state": "absent", "name": "dns6",
                                   "namespace": "kube-system"}])
    assert res["stats"]["path"] == "full"
    assert res["diff"]["removed"][0]["name"] == "kube-system/dns6"
    assert res["services"] == 3


def test_bad_input_writes_nothing(world):
    sync(world, BASE)
    world.reset_log()
    before = dict((n, dict(v)) for n, v in world.store.items())
    for bad in ([S4("web", "10.96.0.10", 80, ["10.0.0.1"]), S4("x", "10.96.0.13", 80, [("10.0.0.1", 80, 0)])],
                BASE[:1] + [S4("x", "10.96.0.13", 80, ["fd00::1"])] + BASE[1:]):
        for prune in (True, False):
            with pytest.raises(lb.LbError, match=r"services\[1\] \(x\)\.backends\[0\]"):
                raw_sync(world, bad, prune=prune)
    assert world.ops == [] and world.store == before and world.opened == world.closed


# ---- repairs of the full sync ---------------------------------------------------------------------

def test_new_maglev_service_does_not_overwrite_a_removed_services_live_half(world):
    sync(world, [S4("old", "10.96.0.1", 80, ["10.0.0.1"], algorithm="maglev")])
    world.reset_log()
    sync(world, [S4("new", "10.96.0.2", 80, ["10.0.0.2"], algorithm="maglev")])
    assert master_of(world, "10.96.0.2", 80)["id"] == 2


def test_capacity_counts_entries_removed_only_after_the_writes(world):
    world.resize("kln_lb4_svc", 5)
    sync(world, [S4("old", "10.96.0.1", 80, ["10.0.0.1"])])           # 2 entries
    world.reset_log()
    with pytest.raises(lb.LbError, match=r"need 6 entries in kln_lb4_svc"):   # 4 more (6 > 5 at the peak)
        raw_sync(world, [S4("new", "10.96.0.2", 80, ["10.0.0.2", "10.0.0.3", "10.0.0.4"])])
    assert world.ops == []


def test_backend_capacity_counts_backends_deleted_after_the_writes(world):
    world.resize("kln_lb4_backend", 2)
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])])
    world.reset_log()
    with pytest.raises(lb.LbError, match="4 distinct IPv4 backends"):
        raw_sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.3", "10.0.0.4"])])
    assert world.ops == []


def test_sync_repairs_slots_pointing_at_missing_backends(world):
    sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])])
    world.store["kln_lb4_backend"].clear()        # the map was recreated (new size): contents lost
    res = sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])])
    assert res["changed"] is True
    assert res["diff"]["changed"][0]["missing_backend_ids"] == [1, 2]
    assert slot_backends(world, "10.96.0.1", 80) == [("10.0.0.1", 80, 1), ("10.0.0.2", 80, 2)]
    assert sync(world, [S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])])["changed"] is False


def test_sync_repairs_stale_and_stray_slots_duplicate_ids_and_orphan_backends(world):
    a = S4("a", "10.96.0.1", 80, ["10.0.0.1", "10.0.0.2"])
    sync(world, [a])
    ids = world.backend_ids()
    svc, be = world.store["kln_lb4_svc"], world.store["kln_lb4_backend"]
    # a slot above the master's count, slots of a service without a master, a second id for 10.0.0.1 that
    # slot 1 now points at (the first, lower id stays the address's id), and a backend nothing uses
    svc[slot_key("10.96.0.1", 80, 3)] = S["lb_service"].pack(ids[("10.0.0.1", 80)], 0, 65535, 0, 0, 3, 0, 0)
    svc[slot_key("10.96.0.9", 80, 1)] = S["lb_service"].pack(ids[("10.0.0.1", 80)], 0, 7, 0, 0, 1, 0, 0)
    svc[slot_key("10.96.0.9", 80, 2)] = S["lb_service"].pack(ids[("10.0.0.2", 80)], 0, 7, 0, 0, 2, 0, 0)
    be[S["lb_backend_key"].pack(50)] = S["lb4_backend"].pack(bytes([10, 0, 0, 1]), (80).to_bytes(2, "big"), 0, 0)
    svc[slot_key("10.96.0.1", 80, 1)] = S["lb_service"].pack(50, 0, 65535, 0, 0, 1, 0, 0)
    be[S["lb_backend_key"].pack(60)] = S["lb4_backend"].pack(bytes([10, 0, 0, 60]), (80).to_bytes(2, "big"), 0, 0)
    world.reset_log()
    res = sync(world, [a])
    assert res["changed"] is True and [c["service"] for c in res["diff"]["changed"]] == ["10.96.0.1:80/TCP"]
    assert sorted(svc) == sorted([master_key("10.96.0.1", 80), slot_key("10.96.0.1", 80, 1), slot_key("10.96.0.1", 80, 2)])
    assert world.backend_ids() == ids
    assert slot_backends(world, "10.96.0.1", 80) == [("10.0.0.1", 80, 1), ("10.0.0.2", 80, 2)]
    assert S["lb_service"].unpack(svc[slot_key("10.96.0.1", 80, 1)])[0] == ids[("10.0.0.1", 80)]
    assert _index_is_exact(world)
    assert sync(world, [a])["changed"] is False


# ---- the incremental path (prune=False) and its index -------------------------------------------------

def _view(world):
    """What a reader of the maps gets, without ids: {(fam, vip, port, proto): (master fields, [(ip, port, cum)],
    stale slots, Maglev table as addresses)}."""
    out = {}
    for fam in (4, 6):
        for (vip, port, proto), m in world.masters(fam).items():
            count, sid, alg, flags, weight, aff, rev = m[1:]
            slots = [world.slot(fam, vip, port, proto, n) for n in range(1, count + 1)]
            stale = sorted(S["lb%d_key" % fam].unpack(k)[2] for k in world.store["kln_lb%d_svc" % fam]
                           if S["lb%d_key" % fam].unpack(k)[::3] == (vip, proto) and S["lb%d_key" % fam].unpack(k)[1] == port
                           and S["lb%d_key" % fam].unpack(k)[2] > count)
            table = tuple(world.backend(fam, b) for b in world.maglev_half(sid, rev)) if alg == lb.ALG_MAGLEV else None
            out[(fam, vip, port, proto)] = ((count, alg, flags, weight, aff), stale,
                                            [world.backend(fam, s[0]) + (s[5],) for s in slots], table)
    return out


def _index_is_exact(world):
    """The index equals a rebuild from the maps' contents (next_backend may be ahead: ids are not reused at once)."""
    maps = world.maps_class()(world.dir)
    try:
        idx = state.read_index(maps)
    finally:
        maps.close()
    assert idx is not None, "the index is not valid"
    refs = collections.Counter()
    bits = bytearray(8192)
    bits[0] = 1
    for fam in (4, 6):
        assert idx.svc_entries[fam] == len(world.store["kln_lb%d_svc" % fam]), "svc_entries %d" % fam
        assert idx.backends[fam] == len(world.store["kln_lb%d_backend" % fam]), "backends %d" % fam
        for (vip, port, proto), m in world.masters(fam).items():
            bits[m[2] >> 3] |= 1 << (m[2] & 7)
            for n in range(1, m[1] + 1):
                bid = world.slot(fam, vip, port, proto, n)[0]
                ip, bport = world.backend(fam, bid)
                refs[layout.bidx_key(fam, layout.packed_ip(ip), bport)] += 1
                assert idx.next_backend[fam] > bid
        for k in world.store["kln_lb%d_backend" % fam]:
            assert idx.next_backend[fam] > S["lb_backend_key"].unpack(k)[0]
    assert bytes(idx.service_ids) == bytes(bits), "service_ids"
    bidx = dict((k, S["lb_bidx"].unpack(v)[1]) for k, v in world.store["kln_lb_bidx"].items())
    assert bidx == dict(refs), "kln_lb_bidx differs from a rebuild"
    for k, v in world.store["kln_lb_bidx"].items():
        fam, port, packed = S["lb_bidx_key"].unpack(k)
        ip = layout.ip_text(packed[:4] if fam == 4 else packed)
        assert world.backend(fam, S["lb_bidx"].unpack(v)[0]) == (ip, int.from_bytes(port, "big")), "kln_lb_bidx ids"
    return True


def _random_service(rng, key):
    vip, port, proto = key
    pool = ["10.0.0.%d" % i for i in range(1, 16)] if ":" not in vip else ["fd00::a%d" % i for i in range(1, 6)]
    bes = [{"ip": ip, "port": rng.choice([80, 8080]), "weight": rng.choice([1, 1, 1, 2, 3])}
           for ip in rng.sample(pool, rng.randint(0, 5))]
    return {"name": "s-%s-%d" % (vip, port), "vip": vip, "port": port, "protocol": proto, "backends": bes,
            "algorithm": rng.choice(["random", "random", "maglev"]), "affinity_timeout": rng.choice([0, 0, 30])}


def sync_into(world, monkeypatch, services, **kw):
    world.install(monkeypatch)
    world.reset_log()
    res = sync(world, services, **kw)
    if res["changed"] and not kw.get("check"):
        rewritten = [s for s in services if s.get("state") != "absent"]
        if res["diff"]["added"] or res["diff"]["changed"]:
            _write_order_checks(world, rewritten if not kw.get("prune", True) else services, res)
    return res


def test_incremental_changes_give_the_maps_a_full_sync_gives(world, monkeypatch):
    """200 random upserts/removals through prune=False, next to full syncs of the same table: readers see
    the same services; the incremental path never dumps the service or backend maps; the index stays exact."""
    rng = random.Random(7)
    keys = [("10.96.0.%d" % i, p, pr) for i in range(1, 13) for p, pr in ((80, "tcp"), (53, "udp"))]
    keys += [("fd00::%d" % i, 80, "tcp") for i in range(1, 4)]
    inc, full = world, FakeWorld()
    model = {}
    m = 53                                               # small Maglev tables: the fake checks every write
    sync_into(inc, monkeypatch, [], prune=True, maglev_m=m)          # builds the index
    paths = collections.Counter()
    for step in range(200):
        ops = []
        for key in rng.sample(keys, rng.randint(1, 3)):
            if key in model and rng.random() < 0.3:
                ops.append({"vip": key[0], "port": key[1], "protocol": key[2], "state": "absent"})
                del model[key]
            else:
                model[key] = _random_service(rng, key)
                ops.append(model[key])
        inc.dumps = []
        res = sync_into(inc, monkeypatch, ops, prune=False, maglev_m=m)
        paths[res["stats"]["path"]] += 1
        assert not [d for d in inc.dumps if d != "kln_lb_affinity"], (step, inc.dumps)
        sync_into(full, monkeypatch, list(model.values()), prune=True, maglev_m=m)
        assert _view(inc) == _view(full), "step %d: %r" % (step, ops)
        assert _index_is_exact(inc)
        assert res["services"] == len(model)
    assert paths == {"incremental": 200}
    inc.install(monkeypatch)


def test_incremental_one_change_reads_and_writes_only_that_service(world):
    svcs = [S4("s%d" % i, "10.96.%d.%d" % (i // 200, i % 200 + 1), 80, ["10.0.%d.1" % (i % 7), "10.0.%d.2" % (i % 5)])
            for i in range(1000)]
    sync(world, svcs)
    world.reset_log()
    world.dumps, world.lookups = [], 0
    res = sync(world, [S4("s5", "10.96.0.6", 80, ["10.0.5.1", "10.0.9.9"])], prune=False)
    assert res["stats"]["path"] == "incremental"
    assert res["diff"]["changed"] == [{"service": "10.96.0.6:80/TCP", "name": "default/s5",
                                       "backends_added": ["10.0.9.9:80"], "backends_removed": ["10.0.0.2:80"]}]
    assert world.dumps == []
    assert world.lookups < 30, world.lookups
    data = [o for o in world.ops if o[1] not in INDEX_MAPS]
    # a new backend, two slots, the master; nothing to delete (10.0.0.2 is used by other services)
    assert [o[0] for o in data] == ["update"] * 4
    assert [r["service"] for r in res["table"]] == ["10.96.0.6:80/TCP"]
    assert res["services"] == 1000
    assert _index_is_exact(world)
    # the same again: nothing written
    world.reset_log()
    res = sync(world, [S4("s5", "10.96.0.6", 80, ["10.0.9.9", "10.0.5.1"])], prune=False)
    assert res["changed"] is False and world.ops == [] and res["stats"]["path"] == "incremental"


def test_incremental_removal_frees_backends_and_ids(world):
    calls = []
    sync(world, BASE)
    res = sync(world, [{"vip": "10.96.0.12", "port": 80, "state": "absent"},
                       {"vip": "10.96.0.99", "port": 80, "state": "absent", "name": "never-there"}],
               prune=False, on_backends_gone=calls.append)
    assert res["stats"]["path"] == "incremental"
    assert res["diff"]["removed"] == [{"service": "10.96.0.12:80/TCP", "name": "",
                                       "backends": ["10.0.0.5:80", "10.0.0.6:80"]}]
    assert master_of(world, "10.96.0.12", 80) is None
    assert calls == [[("10.0.0.5", 80), ("10.0.0.6", 80)]]
    assert sorted(world.backend(4, S["lb_backend_key"].unpack(k)[0])[0] for k in world.store["kln_lb4_backend"]) \
        == ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.4"]      # 10.0.0.2:80 and :8443
    assert _index_is_exact(world)
    # the Maglev id is free again: a new Maglev service gets it
    res = sync(world, [S4("mag2", "10.96.0.13", 80, ["10.0.0.7"], algorithm="maglev")], prune=False)
    assert res["table"][0]["id"] == 1
    # removing what is not there changes nothing
    assert sync(world, [{"vip": "10.96.0.12", "port": 80, "state": "absent"}], prune=False)["changed"] is False


def test_incremental_check_mode_writes_nothing(world):
    sync(world, BASE)
    world.reset_log()
    before = dict((n, dict(v)) for n, v in world.store.items())
    gone = {"vip": "fd00::53", "port": 53, "protocol": "udp", "state": "absent"}
    res = sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1"]), gone], prune=False, check=True)
    assert res["changed"] is True and res["stats"]["path"] == "incremental"
    assert res["diff"]["changed"][0]["backends_removed"] == ["10.0.0.2:80", "10.0.0.3:80"]
    assert res["diff"]["removed"][0]["service"] == "[fd00::53]:53/UDP"
    assert [r["service"] for r in res["table"]] == ["10.96.0.10:80/TCP"]
    assert [b["address"] for b in res["table"][0]["backends"]] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert world.ops == [] and world.store == before and world.locked == 1


def test_incremental_falls_back_to_the_full_path_when_the_index_is_not_trusted(world):
    sync(world, BASE[:2])
    one = [S4("x", "10.96.9.9", 80, ["10.0.0.9"])]
    assert sync(world, one, prune=False)["stats"]["path"] == "incremental"
    invalidate_index(world)                             # a writer died half way: flags cleared
    res = sync(world, [S4("y", "10.96.9.10", 80, ["10.0.0.9"])], prune=False)
    assert res["stats"]["path"] == "full" and res["changed"] is True
    assert [r["service"] for r in res["table"]] == ["10.96.9.10:80/TCP"]       # still only what was listed
    assert _index_is_exact(world)
    # a map recreated (new map id): the index describes another map
    world.recreate("kln_lb4_svc")
    assert sync(world, one, prune=False)["stats"]["path"] == "full"
    assert sync(world, one, prune=False)["stats"]["path"] == "incremental"
    # the maps emptied behind the index's back (same ids): point lookups see it and take the full path
    del world.store["kln_lb4_backend"][S["lb_backend_key"].pack(1)]
    res = sync(world, [S4("web", "10.96.0.10", 80, ["10.0.0.1", "10.0.0.4"])], prune=False)
    assert res["stats"]["path"] == "full"
    assert slot_backends(world, "10.96.0.10", 80) == [("10.0.0.1", 80, 1), ("10.0.0.4", 80, 2)]
    assert _index_is_exact(world)
    # the index names an id whose backend entry holds another address
    key = layout.bidx_key(4, bytes([10, 0, 0, 9]), 80)
    bid, n = S["lb_bidx"].unpack(world.store["kln_lb_bidx"][key])
    world.store["kln_lb_bidx"][key] = S["lb_bidx"].pack(bid + 100, n)
    assert sync(world, [S4("z", "10.96.9.11", 80, ["10.0.0.9"])], prune=False)["stats"]["path"] == "full"
    assert _index_is_exact(world)
    # a Maglev table size other than the maps': the full path decides (refused: a Maglev service exists)
    sync(world, [S4("mg", "10.96.9.12", 80, ["10.0.0.9"], algorithm="maglev")], prune=False)
    with pytest.raises(lb.LbError, match="the maps hold Maglev tables of size 1021"):
        raw_sync(world, one, prune=False, maglev_m=2039)


def test_incremental_failure_half_way_leaves_the_index_invalid(world, monkeypatch):
    sync(world, BASE)
    put = world.put

    def failing(name, k, v):
        if name == "kln_lb4_svc":
            raise OSError(errno.ENOMEM, "injected", name)
        put(name, k, v)
    monkeypatch.setattr(world, "put", failing)
    with pytest.raises(OSError):
        raw_sync(world, [S4("x", "10.96.9.9", 80, ["10.0.0.9"])], prune=False)
    monkeypatch.setattr(world, "put", put)
    maps = world.maps_class()(world.dir)
    assert state.read_index(maps) is None
    maps.close()
    res = sync(world, [S4("x", "10.96.9.9", 80, ["10.0.0.9"])], prune=False)
    assert res["stats"]["path"] == "full" and _index_is_exact(world)


INC_BAD = [
    ("absent_with_backends", [{"vip": "10.96.0.10", "port": 80, "state": "absent", "backends": [{"ip": "10.0.0.1"}]}],
     r"services\[0\]\.backends: a service with state absent is removed; it takes no backends"),
    ("state", [dict(S4("web", "10.96.0.10", 80, []), state="gone")], r"services\[0\]\.state: must be present or absent"),
    ("dup_absent", [S4("web", "10.96.0.10", 80, []), {"vip": "10.96.0.10", "port": 80, "state": "absent"}],
     r"services\[1\]: duplicate service 10\.96\.0\.10:80/TCP - services\[0\] \(web\) already declares it"),
    ("svc_full", [S4("s%d" % i, "10.96.7.%d" % i, 80, ["10.0.0.1", "10.0.0.2"]) for i in range(1, 12)],
     r"IPv4 services need \d+ entries in kln_lb4_svc .* holds 40"),
    ("backends_full", [S4("big", "10.96.7.7", 80, ["10.0.1.%d" % i for i in range(1, 12)])],
     r"distinct IPv4 backends but kln_lb4_backend holds 16"),
    ("maglev_full", [S4("m%d" % i, "10.96.8.%d" % i, 80, ["10.0.0.1"], algorithm="maglev") for i in range(1, 4)],
     r"more Maglev services than kln_lb_maglev holds \(2 with table size 1021"),
]


@pytest.mark.parametrize("services,pattern", [b[1:] for b in INC_BAD], ids=[b[0] for b in INC_BAD])
def test_incremental_bad_input_writes_nothing(world, services, pattern):
    world.resize("kln_lb4_svc", 40)
    world.resize("kln_lb4_backend", 16)
    world.resize("kln_lb_maglev", 3 * 2 * M)
    sync(world, BASE)
    world.reset_log()
    before = dict((n, dict(v)) for n, v in world.store.items())
    with pytest.raises(lb.LbError, match=pattern):
        raw_sync(world, services, prune=False)
    assert world.ops == [] and world.store == before
