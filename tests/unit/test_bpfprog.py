"""bpfprog: the pure planner, attach type names, attachment validation and the verifier summary."""

import os
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfprog

ROOT = "/sys/fs/bpf/kldload-netstack/sock_lb"
SHA_OLD = "a" * 64
SHA_NEW = "b" * 64


def map_info(mid, name, max_entries=1024, typ="hash", key_size=12, value_size=20, flags=1):
    return {"type": typ, "type_id": {"hash": 1, "array": 2, "lru_hash": 9}[typ], "id": mid, "key_size": key_size,
            "value_size": value_size, "max_entries": max_entries, "flags": flags, "name": name}


def prog_info(pid, name, map_ids):
    return {"type": "cgroup_sock_addr", "type_id": 18, "id": pid, "tag": "%016x" % pid, "name": name,
            "map_ids": list(map_ids)}


def cg_link(lid, prog_id, cgroup_id=1, attach_type="cgroup_inet4_connect"):
    return {"type_id": 3, "id": lid, "prog_id": prog_id, "cgroup_id": cgroup_id, "attach_type": attach_type}


def attachment(program, typ="cgroup_inet4_connect", cgroup_id=1):
    return {"program": program, "type": typ, "xdp_mode": "auto", "cgroup": "/sys/fs/cgroup", "cgroup_id": cgroup_id,
            "target_desc": "cgroup /sys/fs/cgroup", "slug": "cg%d" % cgroup_id,
            "pin": os.path.join(ROOT, "links", "%s-%s-cg%d" % (program, typ, cgroup_id))}


ATT = [attachment("kln_connect4"), attachment("kln_sendmsg4", "cgroup_udp4_sendmsg")]


def probed(svc_size=1024, programs=("kln_connect4", "kln_sendmsg4")):
    """What probe() returns: the object's programs and maps as loaded in a private bpffs (other ids)."""
    return {"programs": dict((p, prog_info(900 + i, p, [901, 902])) for i, p in enumerate(programs)),
            "maps": {"kln_lb4_svc": map_info(901, "kln_lb4_svc", svc_size),
                     "kln_lb_config": map_info(902, "kln_lb_config", 1, "array", 4, 8, 0)}}


def empty():
    return {"exists": False, "maps": {}, "progs": {}, "links": {}, "other": []}


def installed(sha=SHA_NEW, svc_size=1024, links=True):
    """What inspect() returns after a complete install of ``sha``: maps 11, 12; programs 21, 22; links 31, 32."""
    cur = {"exists": True, "other": [],
           "maps": {"kln_lb4_svc": map_info(11, "kln_lb4_svc", svc_size),
                    "kln_lb_config": map_info(12, "kln_lb_config", 1, "array", 4, 8, 0)},
           "progs": {"progs_" + sha[:12]: {"kln_connect4": prog_info(21, "kln_connect4", [11, 12]),
                                           "kln_sendmsg4": prog_info(22, "kln_sendmsg4", [11, 12])}},
           "links": {}}
    if links:
        cur["links"] = {ATT[0]["pin"]: cg_link(31, 21), ATT[1]["pin"]: cg_link(32, 22, attach_type="cgroup_udp4_sendmsg")}
    return cur


def test_fresh_install():
    acts = bpfprog.plan(empty(), ROOT, SHA_NEW, ATT, {"kln_lb4_svc": 4096}, probed())
    assert bpfprog.has_changes(acts)
    created = dict(acts["create_maps"])
    assert sorted(created) == ["kln_lb4_svc", "kln_lb_config"]
    assert created["kln_lb4_svc"]["max_entries"] == 4096                      # the override
    assert created["kln_lb_config"] == probed()["maps"]["kln_lb_config"]       # the object's own size
    assert created["kln_lb4_svc"]["key_size"] == 12 and created["kln_lb4_svc"]["flags"] == 1
    assert acts["load"] is True
    assert acts["progs_dir"] == os.path.join(ROOT, "progs_" + SHA_NEW[:12])
    assert [a["program"] for a in acts["link_create"]] == ["kln_connect4", "kln_sendmsg4"]
    assert acts["link_update"] == [] and acts["link_remove"] == []
    assert acts["recreate_maps"] == [] and acts["unpin_progs"] == [] and acts["unpin_maps"] == []
    assert acts["remove_root"] is False
    text = bpfprog._acts_text(acts)
    assert "create map kln_lb4_svc (4096 entries)" in text and "load programs into %s" % acts["progs_dir"] in text


def test_same_object_in_place_is_no_change():
    cur = installed()
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert not bpfprog.has_changes(acts), acts
    assert bpfprog._acts_text(acts) == []
    # also without a probe (the module's fast path)
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {})
    assert acts is not None and not bpfprog.has_changes(acts), acts
    # with the size override that is already in place
    assert not bpfprog.has_changes(bpfprog.plan(installed(svc_size=4096), ROOT, SHA_NEW, ATT, {"kln_lb4_svc": 4096},
                                                probed()))


def test_no_probe_needed_only_for_a_complete_pinned_version():
    assert bpfprog.plan(empty(), ROOT, SHA_NEW, ATT, {}) is None
    assert bpfprog.plan(installed(SHA_OLD), ROOT, SHA_NEW, ATT, {}) is None
    cur = installed()
    cur["maps"]["kln_lb4_svc"]["id"] = 99                 # the programs use a map that is not pinned any more
    assert bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}) is None


def test_new_object_updates_links_without_a_gap():
    cur = installed(SHA_OLD)
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert acts["load"] is True
    assert acts["create_maps"] == [] and acts["recreate_maps"] == []             # map contents survive
    assert [a["pin"] for a in acts["link_update"]] == [a["pin"] for a in ATT]
    assert acts["link_create"] == [] and acts["link_remove"] == []
    assert acts["unpin_progs"] == ["progs_" + SHA_OLD[:12]]
    assert acts["unpin_maps"] == []
    assert acts["progs_dir"].endswith("progs_" + SHA_NEW[:12])


def test_link_to_another_program_is_updated():
    cur = installed()
    cur["links"][ATT[0]["pin"]]["prog_id"] = 77          # somebody swapped the program
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert acts["load"] is False
    assert [a["program"] for a in acts["link_update"]] == ["kln_connect4"]
    assert acts["link_create"] == [] and acts["link_remove"] == []
    assert acts["unpin_progs"] == []


def test_size_override_recreates_the_map():
    cur = installed(svc_size=1024)
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {"kln_lb4_svc": 8192}, probed())
    assert [(n, w["max_entries"], h["max_entries"]) for n, w, h in acts["recreate_maps"]] == [("kln_lb4_svc", 8192, 1024)]
    assert acts["create_maps"] == []
    assert acts["load"] is True                           # programs are loaded against the new map
    assert [a["program"] for a in acts["link_update"]] == ["kln_connect4", "kln_sendmsg4"]
    assert acts["link_create"] == [] and acts["link_remove"] == []
    assert acts["unpin_progs"] == ["progs_" + SHA_NEW[:12]]  # the current dir is replaced by the new load
    assert "recreate map kln_lb4_svc: 1024 -> 8192 entries (contents are lost)" in bpfprog._acts_text(acts)
    # back to the object's size when the override goes away
    acts = bpfprog.plan(installed(svc_size=8192), ROOT, SHA_NEW, ATT, {}, probed())
    assert [(n, w["max_entries"]) for n, w, _h in acts["recreate_maps"]] == [("kln_lb4_svc", 1024)]


def test_layout_change_recreates_the_map():
    p = probed()
    p["maps"]["kln_lb4_svc"]["value_size"] = 24
    acts = bpfprog.plan(installed(), ROOT, SHA_NEW, ATT, {}, p)
    assert [n for n, _w, _h in acts["recreate_maps"]] == ["kln_lb4_svc"]


def test_map_gone_from_object_is_unpinned():
    cur = installed(SHA_OLD)
    cur["maps"]["kln_old"] = map_info(13, "kln_old")
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert acts["unpin_maps"] == ["kln_old"]


def test_attachment_not_wanted_any_more():
    acts = bpfprog.plan(installed(), ROOT, SHA_NEW, ATT[:1], {}, probed())
    assert acts["link_remove"] == [ATT[1]["pin"]]
    assert acts["link_create"] == [] and acts["link_update"] == [] and acts["load"] is False
    assert bpfprog.has_changes(acts)
    assert "detach %s" % os.path.basename(ATT[1]["pin"]) in bpfprog._acts_text(acts)
    # the fast path decides the same
    assert bpfprog.plan(installed(), ROOT, SHA_NEW, ATT[:1], {})["link_remove"] == [ATT[1]["pin"]]


def test_new_attachment_is_created():
    cur = installed()
    del cur["links"][ATT[1]["pin"]]
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert [a["pin"] for a in acts["link_create"]] == [ATT[1]["pin"]]
    assert acts["link_remove"] == [] and acts["link_update"] == [] and acts["load"] is False


def test_link_on_another_target_is_replaced():
    cur = installed()
    cur["links"][ATT[0]["pin"]]["cgroup_id"] = 5          # same pin name, other cgroup (a recreated cgroup)
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert acts["link_remove"] == [ATT[0]["pin"]]
    assert [a["pin"] for a in acts["link_create"]] == [ATT[0]["pin"]]
    assert acts["link_update"] == []


def test_unknown_program_in_attach():
    pattern = r"attach: program kln_nope is not in the object \(its programs: kln_connect4, kln_sendmsg4\)"
    with pytest.raises(bpfprog.ProgError, match=pattern):
        bpfprog.plan(empty(), ROOT, SHA_NEW, ATT + [attachment("kln_nope")], {}, probed())


def test_unknown_map_in_map_sizes():
    with pytest.raises(bpfprog.ProgError, match=r"maps: kln_nope not in the object \(its maps: kln_lb4_svc, kln_lb_config\)"):
        bpfprog.plan(installed(), ROOT, SHA_NEW, ATT, {"kln_nope": 10, "kln_lb4_svc": 1024}, probed())


def test_state_absent():
    cur = installed(SHA_OLD)
    cur["progs"]["staging"] = {}
    acts = bpfprog.plan(cur, ROOT, "", [], {}, state="absent")
    assert acts["link_remove"] == sorted(a["pin"] for a in ATT)
    assert acts["unpin_progs"] == ["progs_" + SHA_OLD[:12], "staging"]
    assert acts["unpin_maps"] == ["kln_lb4_svc", "kln_lb_config"]
    assert acts["remove_root"] is True
    assert acts["load"] is False and acts["link_create"] == [] and acts["create_maps"] == []
    assert not bpfprog.has_changes(bpfprog.plan(empty(), ROOT, "", [], {}, state="absent"))


def test_leftover_staging_is_cleaned():
    cur = installed()
    cur["progs"]["staging"] = {"kln_connect4": prog_info(40, "kln_connect4", [11, 12])}
    acts = bpfprog.plan(cur, ROOT, SHA_NEW, ATT, {}, probed())
    assert acts["unpin_progs"] == ["staging"] and acts["load"] is False


# ---- ensure() with the kernel side faked: when is the object probed -----------------------------------

@pytest.fixture
def fake_node(monkeypatch, tmp_path):
    obj = tmp_path / "sock_lb_o"
    obj.write_bytes(b"\x7fELF fake")
    node = {"current": installed(), "probes": 0, "applied": []}

    def probe(path, run, bpftool):
        node["probes"] += 1
        return probed()

    monkeypatch.setattr(bpfprog, "inspect", lambda root: node["current"])
    monkeypatch.setattr(bpfprog, "_check_bpffs", lambda root: None)   # NOROOT is not on a bpffs
    monkeypatch.setattr(bpfprog, "file_sha256", lambda path: SHA_NEW)
    monkeypatch.setattr(bpfprog, "probe", probe)
    monkeypatch.setattr(bpfprog, "apply", lambda root, o, acts, run, bpftool: node["applied"].append(acts))
    node["obj"] = str(obj)
    return node


NOROOT = "/run/bpfprog_unit_test_nonexistent/sock_lb"


def test_ensure_in_place_does_not_probe(fake_node):
    res = bpfprog.ensure(NOROOT, fake_node["obj"], [], {})
    # no attach wanted: both links go, and that is all
    assert res["changed"] and fake_node["probes"] == 0
    assert res["actions"] == ["detach " + os.path.basename(a["pin"]) for a in ATT]


def test_ensure_probes_when_a_size_differs(fake_node):
    res = bpfprog.ensure(NOROOT, fake_node["obj"], [], {"kln_lb4_svc": 2048})
    assert fake_node["probes"] == 1
    assert "recreate map kln_lb4_svc: 1024 -> 2048 entries (contents are lost)" in res["actions"]


def test_ensure_rejects_bad_input(fake_node):
    with pytest.raises(bpfprog.ProgError, match=r"maps\.kln_lb4_svc\.max_entries: must be a positive integer"):
        bpfprog.ensure(NOROOT, fake_node["obj"], [], {"kln_lb4_svc": 0})
    with pytest.raises(bpfprog.ProgError, match=r"pin_path: /run/a\.b/x contains a '\.'"):
        bpfprog.ensure("/run/a.b/x", fake_node["obj"], [], {})
    with pytest.raises(bpfprog.ProgError, match="object: /nonexistent_obj is not a file"):
        bpfprog.ensure(NOROOT, "/nonexistent_obj", [], {})


def test_ensure_dropping_an_override_restores_the_objects_size(fake_node):
    cur = installed(svc_size=8192)                        # pinned with maps: {kln_lb4_svc: 8192} earlier
    progs = cur["progs"].pop("progs_" + SHA_NEW[:12])
    cur["progs"]["progs_" + bpfprog.version(SHA_NEW, {"kln_lb4_svc": 8192})] = progs
    fake_node["current"] = cur
    res = bpfprog.ensure(NOROOT, fake_node["obj"], [], {})
    assert "recreate map kln_lb4_svc: 8192 -> 1024 entries (contents are lost)" in res["actions"]


# ---- attach types and attachments -------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("connect4", "cgroup_inet4_connect"), ("tc_ingress", "tcx_ingress"), ("tc-egress", "tcx_egress"),
    ("CGROUP_INET6_CONNECT", "cgroup_inet6_connect"), (" sendmsg6 ", "cgroup_udp6_sendmsg"), ("xdp", "xdp"),
    ("getpeername4", "cgroup_inet4_getpeername"), ("sock_release", "cgroup_inet_sock_release"),
])
def test_canonical_type(name, expected):
    assert bpfprog.canonical_type(name) == expected


def test_canonical_type_unknown():
    with pytest.raises(bpfprog.ProgError, match=r"^attach\[3\]\.type: unknown attach type 'connect5' \(known: .*connect4"):
        bpfprog.canonical_type("connect5", "attach[3]")
    with pytest.raises(bpfprog.ProgError, match=r"unknown attach type ''"):
        bpfprog.canonical_type("")


@pytest.fixture(scope="module")
def cgroup2():
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "TARGET", "-t", "cgroup2"], stdout=subprocess.PIPE, check=False,
                             stderr=subprocess.PIPE).stdout.decode().split("\n")
    except OSError:
        out = []
    mounts = [m.strip() for m in out if m.strip()]
    if not mounts:
        pytest.skip("no cgroup2 mount")
    return mounts[0]


def test_resolve_cgroup_attachment(cgroup2):
    root = "/run/x/sock_lb"
    out = bpfprog.resolve_attachments([{"program": "kln_connect4", "type": "connect4", "cgroup": cgroup2},
                                       {"program": "kln_sendmsg4", "type": "cgroup_udp4_sendmsg", "cgroup": cgroup2}],
                                      root)
    ino = os.stat(cgroup2).st_ino
    assert out[0]["type"] == "cgroup_inet4_connect" and out[0]["cgroup_id"] == ino
    assert out[0]["cgroup"] == os.path.realpath(cgroup2)
    assert out[0]["pin"] == "/run/x/sock_lb/links/kln_connect4-cgroup_inet4_connect-cg%d" % ino
    assert out[1]["pin"] == "/run/x/sock_lb/links/kln_sendmsg4-cgroup_udp4_sendmsg-cg%d" % ino
    assert bpfprog.describe(out[0]) == "kln_connect4 cgroup_inet4_connect cgroup %s" % os.path.realpath(cgroup2)
    assert "." not in os.path.basename(out[0]["pin"])


def test_resolve_device_attachment():
    out = bpfprog.resolve_attachments([{"program": "p", "type": "xdp", "device": "lo", "xdp_mode": "generic"},
                                       {"program": "p", "type": "tc_ingress", "device": "lo"}], "/r")
    assert (out[0]["ifindex"], out[0]["xdp_mode"], out[0]["pin"]) == (1, "generic", "/r/links/p-xdp-devlo")
    assert (out[1]["type"], out[1]["pin"]) == ("tcx_ingress", "/r/links/p-tcx_ingress-devlo")
    assert bpfprog.resolve_attachments(None, "/r") == []


@pytest.mark.parametrize("entry,pattern", [
    ({"program": "p", "type": "connect4"}, r"^attach\[0\]\.cgroup: required for attach type cgroup_inet4_connect"),
    ({"program": "p", "type": "connect4", "cgroup": "CG", "device": "lo"},
     r"^attach\[0\]\.device: not used by cgroup attach type cgroup_inet4_connect"),
    ({"program": "p", "type": "connect4", "cgroup": "/tmp"}, r"^attach\[0\]\.cgroup: /tmp is not in a cgroup v2 file system"),
    ({"program": "p", "type": "connect4", "cgroup": "/nonexistent_cg"}, r"^attach\[0\]\.cgroup: /nonexistent_cg is not a directory"),
    ({"program": "p", "type": "tcx_ingress", "device": "nosuchdev0"}, r"^attach\[0\]\.device: no network device 'nosuchdev0'"),
    ({"program": "p", "type": "xdp"}, r"^attach\[0\]\.device: required for attach type xdp"),
    ({"program": "p", "type": "xdp", "device": "lo", "cgroup": "CG"}, r"^attach\[0\]\.cgroup: not used by attach type xdp"),
    ({"program": "p", "type": "xdp", "device": "lo", "xdp_mode": "turbo"}, r"^attach\[0\]\.xdp_mode: must be one of"),
    ({"type": "xdp", "device": "lo"}, r"^attach\[0\]\.program: required"),
    ({"program": "p", "type": "connect9", "cgroup": "CG"}, r"^attach\[0\]\.type: unknown attach type 'connect9'"),
])
def test_resolve_errors(entry, pattern, cgroup2):
    entry = dict((k, cgroup2 if v == "CG" else v) for k, v in entry.items())
    with pytest.raises(bpfprog.ProgError, match=pattern):
        bpfprog.resolve_attachments([entry], "/r")


def test_resolve_duplicate(cgroup2):
    a = {"program": "p", "type": "connect4", "cgroup": cgroup2}
    with pytest.raises(bpfprog.ProgError, match=r"^attach\[1\]: program p is attached to cgroup .* as cgroup_inet4_connect twice"):
        bpfprog.resolve_attachments([a, dict(a, type="cgroup_inet4_connect")], "/r")


# ---- verifier output ----------------------------------------------------------------------------------------

def test_verifier_summary_drops_strict_mode_warning():
    text = "\n".join([
        "Warning: bpftool is now running in libbpf strict mode and has more stringent requirements about BPF programs.",
        "If it used to work for this object file but now doesn't, see --legacy option for more details.",
        "",
        "libbpf: prog 'kln_connect4': BPF program load failed: Permission denied",
        "libbpf: prog 'kln_connect4': -- BEGIN PROG LOAD LOG --",
        "0: R1=ctx() R10=fp0",
        "; int kln_connect4(struct bpf_sock_addr *ctx)",
        "12: (61) r2 = *(u32 *)(r1 +4)",
        "invalid bpf_context access off=4 size=4",
        "processed 12 insns (limit 1000000)",
        "libbpf: prog 'kln_connect4': -- END PROG LOAD LOG --",
        "Error: failed to load object file",
    ])
    s = bpfprog._verifier_summary(text)
    assert "strict mode" not in s and "--legacy" not in s
    parts = s.split(" | ")
    assert parts[0] == "libbpf: prog 'kln_connect4': BPF program load failed: Permission denied"
    assert parts[-1] == "Error: failed to load object file"
    assert "invalid bpf_context access off=4 size=4" in parts
    assert "0: R1=ctx() R10=fp0" not in parts and "12: (61) r2 = *(u32 *)(r1 +4)" not in parts


def test_verifier_summary_tail_and_fallback():
    many = "\n".join("libbpf: line %d" % i for i in range(30))
    parts = bpfprog._verifier_summary(many).split(" | ")
    assert len(parts) == 12 and parts[-1] == "libbpf: line 29" and parts[0] == "libbpf: line 18"
    # only register lines: keep the last of them rather than nothing
    assert bpfprog._verifier_summary("1: R1=ctx()\n2: R2=1") == "1: R1=ctx() | 2: R2=1"
    assert bpfprog._verifier_summary("") == ""


def test_ensure_refuses_a_pin_path_that_is_not_bpffs(tmp_path):
    obj = tmp_path / "o"
    obj.write_bytes(b"x")
    with pytest.raises(bpfprog.ProgError, match=r"pin_path: .* is not on a BPF file system .*mount one first"):
        bpfprog.ensure(str(tmp_path / "pins" / "x"), str(obj), [], {})
