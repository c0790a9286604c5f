"""Releases of the node bundle on a node (release.py, the node_release module's logic) on a temporary
root: which bundle the node command path runs, what a rollback puts back, what is refused."""
import json
import os
import zipfile

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import release as rel


def _bundle(tmp_path, version, text):
    """A stand-in bundle (a zip with netstack_build.json, like make node's) and its release."""
    src = tmp_path / ("b-%s-%s.pyz" % (version, text))
    with zipfile.ZipFile(str(src), "w") as z:
        z.writestr("netstack_build.json", json.dumps({"collection": version}))
        z.writestr("payload", text)
    sha = rel.file_sha256(str(src))
    return str(src), {"id": rel.release_id(version, sha), "version": version, "sha256": sha, "commit": None}


def _stage(root, src, r):
    d = os.path.join(root, "releases", r["id"])
    os.makedirs(d, exist_ok=True)
    with open(src, "rb") as f, open(os.path.join(d, "netstack.pyz"), "wb") as g:
        g.write(f.read())


def _running(root):
    with zipfile.ZipFile(os.path.join(root, "netstack.pyz")) as z:
        return z.read("payload").decode()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return str(r)


def test_switch_then_rollback_puts_back_bundle_and_files(root, tmp_path):
    conf = tmp_path / "dataplane.json"
    new_file = tmp_path / "only-in-new.json"
    a, ra = _bundle(tmp_path, "0.3.0", "A")
    b, rb = _bundle(tmp_path, "0.3.1", "B")
    _stage(root, a, ra)
    assert rel.switch(root, ra, [str(conf), str(new_file)])["changed"]
    assert _running(root) == "A"
    conf.write_text("A's configuration")
    _stage(root, b, rb)
    assert rel.switch(root, rb, [str(conf), str(new_file)], check=True)["after"]["current"] == rb["id"]
    assert _running(root) == "A"                                   # check mode changed nothing
    res = rel.switch(root, rb, [str(conf), str(new_file)])
    assert res["after"] == {"current": rb["id"], "previous": ra["id"], "releases": sorted([ra["id"], rb["id"]])}
    assert _running(root) == "B"
    assert not rel.switch(root, rb, [str(conf)])["changed"]          # the same release again: no change
    conf.write_text("B's configuration")
    new_file.write_text("B only")
    res = rel.rollback(root)
    assert _running(root) == "A" and conf.read_text() == "A's configuration" and not new_file.exists()
    assert res["after"]["current"] == ra["id"] and res["after"]["previous"] is None
    with pytest.raises(rel.ReleaseError) as e:                      # nothing to roll back to any more
        rel.rollback(root)
    assert "no previous release on this node" in str(e.value) and _running(root) == "A"
    assert rel.prune(root)["removed"] == [rb["id"]]
    assert rel.state(root)["releases"] == [ra["id"]]


def test_a_downgrade_is_refused_unless_allowed(root, tmp_path):
    a, ra = _bundle(tmp_path, "0.3.1", "new")
    b, rb = _bundle(tmp_path, "0.3.0", "old")
    _stage(root, a, ra)
    rel.switch(root, ra)
    _stage(root, b, rb)
    with pytest.raises(rel.ReleaseError) as e:
        rel.switch(root, rb)
    assert "older than the running release %s" % ra["id"] in str(e.value) and "allow_downgrade" in str(e.value)
    assert _running(root) == "new" and rel.state(root)["previous"] is None
    rel.switch(root, rb, allow_downgrade=True)
    assert _running(root) == "old"


def test_a_partial_copy_or_an_unstaged_release_is_refused(root, tmp_path):
    a, ra = _bundle(tmp_path, "0.3.0", "A")
    with pytest.raises(rel.ReleaseError) as e:
        rel.switch(root, ra)
    assert "is not staged" in str(e.value)
    _stage(root, a, ra)
    with open(os.path.join(root, "releases", ra["id"], "netstack.pyz"), "ab") as f:
        f.write(b"x")
    with pytest.raises(rel.ReleaseError) as e:
        rel.switch(root, ra)
    assert "a partial copy" in str(e.value) and not os.path.lexists(os.path.join(root, "netstack.pyz"))
    with pytest.raises(rel.ReleaseError) as e:
        rel.switch(root, dict(ra, version="three"))
    assert "not a semantic version" in str(e.value)


def test_a_bundle_from_before_the_layout_is_adopted_as_the_previous_release(root, tmp_path):
    old, rold = _bundle(tmp_path, "0.2.0", "legacy")
    with open(old, "rb") as f, open(os.path.join(root, "netstack.pyz"), "wb") as g:
        g.write(f.read())
    new, rnew = _bundle(tmp_path, "0.3.0", "new")
    _stage(root, new, rnew)
    res = rel.switch(root, rnew)
    assert res["after"]["previous"] == rold["id"] and _running(root) == "new"
    assert os.path.islink(os.path.join(root, "netstack.pyz"))
    rel.rollback(root)
    assert _running(root) == "legacy"


def test_versions_compare_as_semantic_versions():
    assert rel.version_key("0.10.0") > rel.version_key("0.9.1") > rel.version_key("0.9.1-rc1")


def test_the_runtime_keeps_the_layouts_the_previous_release_declares(root):
    from ansible_collections.kldload.netstack.plugins.module_utils import runtime
    cfg = {"bundle": os.path.join(root, "netstack.pyz")}
    assert runtime.previous_release_pins(cfg) == set()            # no previous release: nothing kept
    prev = os.path.join(root, "releases", "0.3.0-aaaaaaaaaaaa")
    os.makedirs(prev)
    with zipfile.ZipFile(os.path.join(prev, "netstack.pyz"), "w") as z:
        z.writestr("netstack_objects/sock_lb.manifest.json", json.dumps({"maps": {
            "kln_lb_config": {"shared": True, "version": 3}, "kln_lb4_svc": {"shared": True},
            "kln_lb4_revnat": {"type": "lru_hash"}}}))
    os.symlink("0.3.0-aaaaaaaaaaaa", os.path.join(root, "releases", "previous"))
    assert runtime.previous_release_pins(cfg) == {"kln_lb_config_v3", "kln_lb4_svc_v1"}
