"""The loader against the real kernel: a private bpffs, a private cgroup, the real objects of bpf/build
(the socket LB and the selftest's second object, which shares kln_lb_config with it).

Root-only (mount, bpf(), cgroup attach); skipped otherwise. Each test asserts what is pinned and
attached afterwards, not which functions ran."""
import json
import os
import shutil
import subprocess

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, loader, manifest as mf, mounts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "bpf", "build")
SOCK_LB = os.path.join(BUILD, "sock_lb.o")
PEEK = os.path.join(BUILD, "tests", "peek.o")
SMALL = {"kln_lb_maglev": 4 * 2 * 251, "kln_lb4_revnat": 1024, "kln_lb6_revnat": 1024}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(PEEK),
                                reason="needs root and the objects of bpf/build (make -C bpf)")


@pytest.fixture
def node(tmp_path):
    """(pin root on a private bpffs, a private cgroup); both gone afterwards."""
    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    cg = os.path.join(mounts.cgroup2_path(), "netstack-test-loader-%d" % os.getpid())
    os.mkdir(cg)
    try:
        yield str(fs / "kldload-netstack"), cg
    finally:
        subprocess.run(["umount", str(fs)], check=False)
        os.rmdir(cg)


def objects(cg, sock_lb=SOCK_LB, peek=PEEK, sizes=None, families=(4, 6)):
    out = [loader.object_spec("sock_lb", sock_lb, targets={"cgroup": cg, "families": list(families)},
                              map_sizes=dict(SMALL, **(sizes or {})))]
    if peek:
        out.append(loader.object_spec("peek", peek, targets={"cgroup": cg}))
    return out


def attached(cg):
    """{program name: program id} of what the kernel runs at the cgroup (every attach type)."""
    out = {}
    for at in ("cgroup_inet4_connect", "cgroup_udp4_sendmsg", "cgroup_udp4_recvmsg", "cgroup_inet4_getpeername",
               "cgroup_inet6_connect", "cgroup_udp6_sendmsg", "cgroup_udp6_recvmsg", "cgroup_inet6_getpeername",
               "cgroup_inet_egress"):
        fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for pid in bpfsys.prog_query(fd, at):
                with bpfsys.prog_fd_by_id(pid) as pfd:
                    out[bpfsys.prog_info(pfd)["name"]] = pid
        finally:
            os.close(fd)
    return out


def test_four_times_two_objects_sharing_a_map(node):
    root, cg = node
    first = loader.ensure(root, objects(cg), check=True)
    applied = loader.ensure(root, objects(cg))
    again = loader.ensure(root, objects(cg))
    recheck = loader.ensure(root, objects(cg), check=True)
    assert first["changed"] and applied["changed"] and not again["changed"] and not recheck["changed"]
    assert first["after"] == applied["after"]                       # check mode predicted what apply did
    assert again["actions"] == [] and again["before"] == again["after"]
    assert sorted(attached(cg)) == ["kln_connect4", "kln_connect6", "kln_getpeer4", "kln_getpeer6", "kln_peek_egress",
                                    "kln_recvmsg4", "kln_recvmsg6", "kln_sendmsg4", "kln_sendmsg6"]
    rep = loader.report(root)
    shared = rep["globals"]["kln_lb_config_v1"]["id"]
    assert shared in rep["objects"]["sock_lb"]["programs"]["kln_connect4"]["map_ids"]
    assert shared in rep["objects"]["peek"]["programs"]["kln_peek_egress"]["map_ids"]
    assert rep["globals"]["kln_lb_maglev_v1"]["max_entries"] == 4 * 2 * 251
    assert sorted(rep["objects"]["sock_lb"]["maps"]) == ["kln_lb4_revnat", "kln_lb6_revnat"]    # private
    assert sorted(rep["objects"]["peek"]["maps"]) == ["kln_peek_seen"]


def test_families_choose_the_programs(node):
    root, cg = node
    loader.ensure(root, objects(cg, peek=None, families=[4]))
    assert sorted(attached(cg)) == ["kln_connect4", "kln_getpeer4", "kln_recvmsg4", "kln_sendmsg4"]
    res = loader.ensure(root, objects(cg, peek=None))
    assert sum(a.startswith("sock_lb: attach ") for a in res["actions"]) == 4
    assert len(attached(cg)) == 8


def _write_config(root, value):
    with bpfsys.obj_get(os.path.join(root, "globals", "kln_lb_config_v1")) as fd:
        bpfsys.map_update(fd, b"\0" * 4, value)


def _read(root, pin):
    with bpfsys.obj_get(os.path.join(root, pin)) as fd:
        info = bpfsys.map_info(fd)
        return sorted(bpfsys.map_dump(fd, info["key_size"], info["value_size"], info["max_entries"]))


def _copy(tmp_path, obj, edit):
    """The object under another path with an edited manifest (a test-only manifest change)."""
    d = tmp_path / ("v%d" % len(list(tmp_path.glob("v*"))))
    d.mkdir()
    dst = str(d / os.path.basename(obj))
    shutil.copy(obj, dst)
    with open(mf.manifest_path(obj)) as f:
        m = json.load(f)
    edit(m)
    with open(mf.manifest_path(dst), "w") as f:
        json.dump(m, f)
    return dst


def test_a_size_change_keeps_links_and_recreates_only_that_map(node):
    root, cg = node
    loader.ensure(root, objects(cg))
    links = dict((a["program"], a["link_id"]) for o in loader.report(root)["objects"].values() for a in o["attachments"])
    progs = attached(cg)
    _write_config(root, b"\x07\0\0\0\0\0\0\0")
    res = loader.ensure(root, objects(cg, sizes={"kln_lb4_svc": 2048}))
    assert "recreate shared map kln_lb4_svc_v1: 65536 -> 2048 entries (contents are lost)" in res["actions"]
    assert not any("detach" in a or ": attach " in a for a in res["actions"])
    rep = loader.report(root)
    assert dict((a["program"], a["link_id"]) for o in rep["objects"].values() for a in o["attachments"]) == links
    now = attached(cg)
    assert all(now[p] != progs[p] for p in progs if p.startswith("kln_connect"))     # new programs, same links
    assert rep["globals"]["kln_lb4_svc_v1"]["max_entries"] == 2048
    assert _read(root, "globals/kln_lb_config_v1")[0][1][:4] == b"\x07\0\0\0"       # other shared maps kept


def test_shared_map_of_another_layout_is_refused_naming_both(node, tmp_path):
    root, cg = node
    loader.ensure(root, objects(cg))
    bad = _copy(tmp_path, PEEK, lambda m: m["maps"]["kln_lb_config"].update(value_size=16))
    before = loader.report(root)
    with pytest.raises(loader.ProgError) as e:
        loader.ensure(root, [objects(cg, peek=bad)[1]])
    assert "globals/kln_lb_config_v1 is pinned as array key 4 value 8 flags 0" in str(e.value)
    assert "object peek declares layout version 1 as array key 4 value 16 flags 0" in str(e.value)
    assert loader.report(root) == before


def _loaded_then_bumped(node, tmp_path):
    """The objects loaded with a value in kln_lb_config; copies of both declaring it in layout version 2."""
    root, cg = node
    loader.ensure(root, objects(cg))
    _write_config(root, b"\xfb\0\0\0\0\0\0\0")

    def bump(m):
        m["maps"]["kln_lb_config"].update(version=2, migrations={"1": "copy"})
    return root, cg, _copy(tmp_path, SOCK_LB, bump), _copy(tmp_path, PEEK, bump)


def test_version_change_migrates_with_the_declared_migration(node, tmp_path):
    root, cg, lb2, peek2 = _loaded_then_bumped(node, tmp_path)
    with pytest.raises(loader.ProgError) as e:               # sock_lb still uses version 1
        loader.ensure(root, [objects(cg, peek=peek2)[1]])
    assert "not part of this run, use it" in str(e.value) and "sock_lb" in str(e.value)
    res = loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2))
    assert "migrate shared map kln_lb_config_v1 -> kln_lb_config_v2 (copy)" in res["actions"]
    rep = loader.report(root)
    assert "kln_lb_config_v1" not in rep["globals"]
    assert _read(root, "globals/kln_lb_config_v2")[0][1][:4] == b"\xfb\0\0\0"
    assert rep["globals"]["kln_lb_config_v2"]["id"] in rep["objects"]["peek"]["programs"]["kln_peek_egress"]["map_ids"]
    assert not loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2))["changed"]


def test_a_rollback_finds_the_layout_the_previous_release_kept(node, tmp_path):
    """The upgrade's case: the new objects migrate kln_lb_config to version 2 while the previous release's
    layout is kept (keep_pins); the old objects then run again against version 1 as it was at the switch,
    and version 2 goes. Without keep_pins the old objects are refused (no migration back)."""
    root, cg, lb2, peek2 = _loaded_then_bumped(node, tmp_path)
    res = loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2), prune=True, keep_pins={"kln_lb_config_v1"})
    assert "migrate shared map kln_lb_config_v1 -> kln_lb_config_v2 (copy)" in res["actions"]
    assert set(["kln_lb_config_v1", "kln_lb_config_v2"]) <= set(loader.report(root)["globals"])
    assert not loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2), prune=True, check=True,
                             keep_pins={"kln_lb_config_v1"})["changed"]
    res = loader.ensure(root, objects(cg), prune=True)       # the rollback: the old objects, nothing kept
    rep = loader.report(root)
    assert "kln_lb_config_v2" not in rep["globals"]
    assert _read(root, "globals/kln_lb_config_v1")[0][1][:4] == b"\xfb\0\0\0"
    assert rep["globals"]["kln_lb_config_v1"]["id"] in rep["objects"]["peek"]["programs"]["kln_peek_egress"]["map_ids"]
    loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2), prune=True)   # forward again, nothing kept
    with pytest.raises(loader.ProgError) as e:
        loader.ensure(root, objects(cg), prune=True)
    assert "holds layout version 2 of kln_lb_config" in str(e.value)


def test_version_change_without_a_migration_is_refused(node, tmp_path):
    root, cg = node
    loader.ensure(root, objects(cg))
    lb2 = _copy(tmp_path, SOCK_LB, lambda m: m["maps"]["kln_lb_config"].update(version=2))
    peek2 = _copy(tmp_path, PEEK, lambda m: m["maps"]["kln_lb_config"].update(version=2))
    with pytest.raises(loader.ProgError) as e:
        loader.ensure(root, objects(cg, sock_lb=lb2, peek=peek2))
    assert "holds layout version 1 of kln_lb_config" in str(e.value) and "declares no migration from version 1" in str(e.value)


def test_a_manifest_that_does_not_describe_its_object_is_refused(node, tmp_path):
    root, cg = node
    bad = _copy(tmp_path, PEEK, lambda m: m["maps"]["kln_peek_seen"].update(max_entries=3))
    with pytest.raises(loader.ProgError) as e:
        loader.ensure(root, objects(cg, peek=bad))
    assert "map kln_peek_seen max_entries is 2 in the object, 3 in the manifest" in str(e.value)
    assert not os.path.exists(os.path.join(root, "peek"))


def test_two_objects_that_declare_a_shared_map_differently(node, tmp_path):
    root, cg = node
    bad = _copy(tmp_path, PEEK, lambda m: m["maps"]["kln_lb_config"].update(max_entries=2))
    with pytest.raises(loader.ProgError) as e:
        loader.ensure(root, objects(cg, peek=bad))
    assert "objects sock_lb and peek declare the shared map kln_lb_config differently" in str(e.value)
    assert not os.path.exists(root)


def _step_labels(root, objs):
    labels = []
    loader.ensure(root, objs, step=labels.append)
    return labels


class Boom(Exception):
    pass


def _fail_at(k):
    seen = []

    def step(label):
        seen.append(label)
        if len(seen) == k:
            raise Boom("injected after step %d (%s)" % (k, label))
    return step


def _state(root, cg):
    """Everything a failed run must leave as it was: what is pinned (ids), what runs at the cgroup, map contents."""
    st = loader.inspect(root)
    contents = {}
    for pin in st["globals"]:
        contents[pin] = _read(root, "globals/" + pin) if pin == "kln_lb_config_v1" else None
    return json.dumps([loader.report(root), attached(cg), repr(contents)], sort_keys=True, default=str)


def test_rollback_of_a_fresh_install_after_every_step(node):
    root, cg = node
    labels = _step_labels(root, objects(cg))
    assert len(labels) > 20, labels
    loader.ensure(root, [], state="absent", prune=True)
    before = _state(root, cg)
    for k in range(1, len(labels) + 1):
        with pytest.raises(loader.ProgError) as e:
            loader.ensure(root, objects(cg), step=_fail_at(k))
        assert "injected after step %d" % k in str(e.value)
        assert _state(root, cg) == before, "after a failure at step %d (%s)" % (k, labels[k - 1])
        assert not os.path.exists(root)


def test_rollback_of_an_upgrade_after_every_step(node, tmp_path):
    """An upgrade that loads new programs, recreates a shared and a private map, migrates a shared map,
    and adds attachments: a failure after any step leaves the node exactly as it was, links running the
    old programs, the map contents kept."""
    root, cg = node

    def bump(m):
        m["maps"]["kln_lb_config"].update(version=2, migrations={"1": "copy"})
    lb2, peek2 = _copy(tmp_path, SOCK_LB, bump), _copy(tmp_path, PEEK, bump)
    new = dict(sock_lb=lb2, peek=peek2, sizes={"kln_lb4_svc": 2048, "kln_lb4_revnat": 2048})
    loader.ensure(root, objects(cg, families=[4]))
    _write_config(root, b"\x0b\0\0\0\0\0\0\0")
    before = _state(root, cg)
    labels = _step_labels(root, objects(cg, **new))
    assert any(lab.startswith("migrate") for lab in labels) and any(lab.startswith("update link") for lab in labels)
    assert any(lab.startswith("create link") for lab in labels)
    loader.ensure(root, [], state="absent", prune=True)
    for k in range(1, len(labels) + 1):
        loader.ensure(root, objects(cg, families=[4]))
        _write_config(root, b"\x0b\0\0\0\0\0\0\0")
        start = _state(root, cg)
        with pytest.raises(loader.ProgError):
            loader.ensure(root, objects(cg, **new), step=_fail_at(k))
        after = _state(root, cg)
        assert json.loads(after)[1] == json.loads(start)[1], "programs at the cgroup after a failure at step %d (%s)" % (
            k, labels[k - 1])
        assert after == start, "after a failure at step %d (%s)" % (k, labels[k - 1])
        loader.ensure(root, [], state="absent", prune=True)
    assert json.loads(before)[1] != {}


def test_prune_removes_objects_and_shared_maps_nobody_declares(node):
    root, cg = node
    loader.ensure(root, objects(cg))
    res = loader.ensure(root, objects(cg, peek=None), prune=True)
    assert "remove object peek (detach, unpin)" in res["actions"]
    assert "kln_peek_egress" not in attached(cg) and not os.path.exists(os.path.join(root, "peek"))
    assert "kln_lb_config_v1" in loader.report(root)["globals"]          # still declared by sock_lb


def test_absent_of_one_object_keeps_the_shared_maps_of_the_other(node):
    root, cg = node
    loader.ensure(root, objects(cg))
    loader.ensure(root, [objects(cg)[1]], state="absent")
    rep = loader.report(root)
    assert list(rep["objects"]) == ["sock_lb"] and "kln_lb_config_v1" in rep["globals"]
    res = loader.ensure(root, [objects(cg)[0]], state="absent")
    assert res["changed"] and not os.path.exists(root) and attached(cg) == {}
    assert not loader.ensure(root, [objects(cg)[0]], state="absent")["changed"]


def test_object_without_a_manifest_keeps_its_maps_private(node, tmp_path):
    root, cg = node
    bare = str(tmp_path / "bare.o")
    shutil.copy(PEEK, bare)
    spec = loader.object_spec("bare", bare, attach=[{"program": "kln_peek_egress", "type": "egress", "cgroup": cg}])
    assert spec["manifest"] is None
    loader.ensure(root, [spec])
    rep = loader.report(root)
    assert rep["globals"] == {} and sorted(rep["objects"]["bare"]["maps"]) == ["kln_lb_config", "kln_peek_seen"]
    spec = loader.object_spec("bare", bare, attach=[{"program": "kln_peek_egress", "type": "egress", "cgroup": cg}])
    assert not loader.ensure(root, [spec])["changed"]


def test_bad_input_names_the_field(node, tmp_path):
    root, cg = node
    with pytest.raises(loader.ProgError, match=r"sock_lb: maps kln_nope not in the object"):
        loader.ensure(root, objects(cg, sizes={"kln_nope": 4}))
    with pytest.raises(loader.ProgError, match=r"maps.kln_lb4_svc.max_entries: must be a positive integer"):
        loader.object_spec("sock_lb", SOCK_LB, map_sizes={"kln_lb4_svc": 0})
    with pytest.raises(loader.ProgError, match=r"name: 'globals' must be a plain name"):
        loader.object_spec("globals", SOCK_LB)
    with pytest.raises(loader.ProgError, match=r"attach\[0\].cgroup: /nonexistent is not a directory"):
        nowhere = [{"program": "kln_peek_egress", "type": "egress", "cgroup": "/nonexistent"}]
        loader.ensure(root, [loader.object_spec("x", PEEK, attach=nowhere)])
    with pytest.raises(loader.ProgError, match=r"is not on a BPF file system"):
        loader.ensure(str(tmp_path / "notbpffs"), objects(cg))
    assert not os.path.exists(root)
