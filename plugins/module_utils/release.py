# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Releases of the node bundle on a node: the running one, the previous one (for rollback), staged ones.

Layout under the root (``/usr/lib/kldload-netstack``)::

    releases/<id>/netstack.pyz     one release: the node bundle as ``make node`` built it
    releases/<id>/release.json     {id, version, commit, sha256}
    releases/<id>/snapshot/        the files the release ran with (node configuration, service table),
                                   saved when the node switched away from it; put back by a rollback
    releases/current -> <id>       the running release (a symlink, replaced atomically)
    releases/previous -> <id>      the release the node ran before, until the next switch
    netstack.pyz -> releases/current/netstack.pyz   what the node command, the boot units and the CNI
                                   plugin run (so a switch moves all of them at once)

A release id is ``<collection version>-<first 12 hex digits of the bundle's sha256>``: two builds of
the same version differ, the same build is the same release everywhere.

``switch()`` makes a staged release the running one, ``rollback()`` makes the previous one running
again with its snapshot, ``prune()`` removes releases that are neither. Each returns {changed, before,
after}; ReleaseError is raised before anything is written when the request is at fault. No Ansible
imports (unit-tested on a temporary root).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import re
import shutil

ROOT = "/usr/lib/kldload-netstack"
RELEASES = "releases"
BUNDLE = "netstack.pyz"
CURRENT, PREVIOUS = "current", "previous"
SNAPSHOT = "snapshot"
_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


class ReleaseError(Exception):
    pass


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def release_id(version, sha256):
    return "%s-%s" % (version, sha256[:12])


def version_key(version):
    """A comparable form of a collection version (semantic versioning; a pre-release sorts first)."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+.*)?$", str(version or ""))
    if not m:
        raise ReleaseError("%r is not a semantic version (major.minor.patch)" % (version,))
    pre = m.group(4)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre or "")


def _dir(root):
    return os.path.join(root, RELEASES)


def _link(root, name):
    p = os.path.join(_dir(root), name)
    if os.path.islink(p):
        return os.readlink(p)
    return None


def read_release(root, rid):
    if not rid:
        return None
    try:
        with open(os.path.join(_dir(root), rid, "release.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"id": rid, "version": None, "commit": None, "sha256": None}


def state(root=ROOT):
    """{current, previous: release dicts or None, releases: [ids], legacy: a bundle file not yet in
    the layout (an install from before 0.3.0)}."""
    d = _dir(root)
    ids = sorted(n for n in os.listdir(d) if n not in (CURRENT, PREVIOUS) and os.path.isdir(os.path.join(d, n))) \
        if os.path.isdir(d) else []
    bundle = os.path.join(root, BUNDLE)
    legacy = bundle if os.path.isfile(bundle) and not os.path.islink(bundle) else None
    return {"current": read_release(root, _link(root, CURRENT)), "previous": read_release(root, _link(root, PREVIOUS)),
            "releases": ids, "legacy": legacy}


def _view(st):
    return {"current": (st["current"] or {}).get("id"), "previous": (st["previous"] or {}).get("id"),
            "releases": st["releases"]}


def _symlink(target, path):
    """Point ``path`` at ``target`` atomically (a new symlink renamed over the old one)."""
    tmp = path + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, path)


def _snapshot_name(path):
    return path.strip("/").replace("/", "%")


def _save_snapshot(root, rid, paths):
    snap = os.path.join(_dir(root), rid, SNAPSHOT)
    if os.path.isdir(snap):
        shutil.rmtree(snap)
    os.makedirs(snap, mode=0o700)
    present = []
    for p in paths:
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(snap, _snapshot_name(p)))
            present.append(p)
    with open(os.path.join(snap, "files.json"), "w") as f:
        json.dump({"paths": list(paths), "present": present}, f, indent=1)


def _restore_snapshot(root, rid):
    """Put back the files of ``rid``'s snapshot (a file that did not exist then is removed): [paths]."""
    snap = os.path.join(_dir(root), rid, SNAPSHOT)
    try:
        with open(os.path.join(snap, "files.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return []
    done = []
    for p in index["paths"]:
        if p in index["present"]:
            if not os.path.isdir(os.path.dirname(p)):
                os.makedirs(os.path.dirname(p))
            tmp = p + ".rollback"
            shutil.copy2(os.path.join(snap, _snapshot_name(p)), tmp)
            os.rename(tmp, p)
        elif os.path.lexists(p):
            os.unlink(p)
        done.append(p)
    return done


def _adopt_legacy(root, st):
    """A bundle file from before the release layout becomes a release of its own (id from its hash)."""
    sha = file_sha256(st["legacy"])
    rid = release_id(_bundle_version(st["legacy"]) or "0.0.0", sha)
    d = os.path.join(_dir(root), rid)
    if not os.path.isdir(d):
        os.makedirs(d)
    shutil.copy2(st["legacy"], os.path.join(d, BUNDLE))
    _write_json(os.path.join(d, "release.json"), {"id": rid, "version": _bundle_version(st["legacy"]),
                                                  "commit": None, "sha256": sha})
    _symlink(rid, os.path.join(_dir(root), CURRENT))
    _symlink(os.path.join(RELEASES, CURRENT, BUNDLE), os.path.join(root, BUNDLE))
    return rid


def _bundle_version(path):
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("netstack_build.json").decode()).get("collection")
    except (OSError, KeyError, ValueError, zipfile.BadZipfile):
        return None


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.rename(tmp, path)


def switch(root, release, snapshot=(), allow_downgrade=False, check=False):
    """Make ``release`` ({id, version, commit, sha256}; its bundle staged at releases/<id>/netstack.pyz)
    the running release. The running one becomes the previous one, with a snapshot of ``snapshot``."""
    for k in ("id", "version", "sha256"):
        if not release.get(k):
            raise ReleaseError("release.%s: required" % k)
    if not _ID.match(release["id"]):
        raise ReleaseError("release.id: %r is not a release id (version-sha)" % release["id"])
    new_key = version_key(release["version"])
    st = state(root)
    before = _view(st)
    staged = os.path.join(_dir(root), release["id"], BUNDLE)
    if os.path.isfile(staged):
        sha = file_sha256(staged)
        if sha != release["sha256"]:
            raise ReleaseError("release %s: the staged bundle %s has sha256 %s, not %s (a partial copy?)"
                               % (release["id"], staged, sha[:12], release["sha256"][:12]))
    elif not check:
        raise ReleaseError("release %s is not staged: %s does not exist" % (release["id"], staged))
    cur = st["current"]
    link_ok = os.path.islink(os.path.join(root, BUNDLE))
    if cur and cur["id"] == release["id"] and link_ok:
        return {"changed": False, "before": before, "after": before, "snapshot": []}
    if cur and cur.get("version") and not allow_downgrade and version_key(cur["version"]) > new_key:
        raise ReleaseError("release %s (version %s) is older than the running release %s (version %s): a downgrade; "
                           "set allow_downgrade to do it" % (release["id"], release["version"], cur["id"], cur["version"]))
    after = {"current": release["id"], "previous": cur["id"] if cur and cur["id"] != release["id"] else before["previous"],
             "releases": sorted(set(before["releases"]) | set([release["id"]]))}
    if st["legacy"] and not cur:
        legacy_id = release_id(_bundle_version(st["legacy"]) or "0.0.0", file_sha256(st["legacy"]))
        if legacy_id != release["id"]:
            after["previous"] = legacy_id
        after["releases"] = sorted(set(after["releases"]) | set([legacy_id]))
    if check:
        return {"changed": True, "before": before, "after": after, "snapshot": list(snapshot)}
    if st["legacy"] and not cur:
        rid = _adopt_legacy(root, st)
        cur = read_release(root, rid)
    _write_json(os.path.join(_dir(root), release["id"], "release.json"),
                {"id": release["id"], "version": release["version"], "commit": release.get("commit"),
                 "sha256": release["sha256"]})
    if cur and cur["id"] != release["id"]:
        _save_snapshot(root, cur["id"], snapshot)
        _symlink(cur["id"], os.path.join(_dir(root), PREVIOUS))
    _symlink(release["id"], os.path.join(_dir(root), CURRENT))
    if not link_ok:
        bundle = os.path.join(root, BUNDLE)
        if os.path.lexists(bundle) and not os.path.islink(bundle):
            os.unlink(bundle)
        _symlink(os.path.join(RELEASES, CURRENT, BUNDLE), bundle)
    return {"changed": True, "before": before, "after": _view(state(root)), "snapshot": list(snapshot)}


def rollback(root, check=False):
    """Make the previous release the running one again and put back the files it ran with. The
    release rolled back from stays in releases/ (for a look at it) until pruned; there is no previous
    release afterwards."""
    st = state(root)
    before = _view(st)
    prev = st["previous"]
    if not prev:
        raise ReleaseError("no previous release on this node to roll back to (running %s)"
                           % (before["current"] or "no release of the layout"))
    if not os.path.isfile(os.path.join(_dir(root), prev["id"], BUNDLE)):
        raise ReleaseError("the previous release %s has no bundle in %s" % (prev["id"], os.path.join(_dir(root), prev["id"])))
    after = dict(before, current=prev["id"], previous=None)
    if check:
        return {"changed": True, "before": before, "after": after, "restored": []}
    restored = _restore_snapshot(root, prev["id"])
    _symlink(prev["id"], os.path.join(_dir(root), CURRENT))
    os.unlink(os.path.join(_dir(root), PREVIOUS))
    return {"changed": True, "before": before, "after": _view(state(root)), "restored": restored,
            "rolled_back_from": st["current"]}


def prune(root, check=False):
    """Remove the releases that are neither running nor the previous one."""
    st = state(root)
    before = _view(st)
    keep = set(x for x in (before["current"], before["previous"]) if x)
    gone = [r for r in st["releases"] if r not in keep]
    after = dict(before, releases=sorted(keep & set(st["releases"])))
    if gone and not check:
        for r in gone:
            shutil.rmtree(os.path.join(_dir(root), r))
    return {"changed": bool(gone), "before": before, "after": after, "removed": gone}
