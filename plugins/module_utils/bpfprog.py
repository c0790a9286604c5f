# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Load a BPF object, pin its programs and maps, attach its programs through BPF links.

Layout under ``<pin_path>/<name>`` (bpffs; no "." anywhere - bpffs refuses dots in names):

    maps/<map>                 every map of the object, created here with the wanted sizes
    progs_<sha12>/<program>    the programs of one object version (sha256 of the file)
    links/<program>-<type>-<target>   one pinned BPF link per attachment

Programs are loaded with ``bpftool prog loadall OBJ DIR map name M pinned P ...`` (libbpf does the
relocations) against maps created here beforehand, so sizes are the caller's and map contents
survive a program upgrade. Attachments are BPF links: a new object version is swapped in with
BPF_LINK_UPDATE, so a hook is never left without a program, and unpinning a link detaches it.

``inspect()`` reads what is pinned, ``plan()`` (pure) decides, ``apply()`` acts and rolls back
what it did if a later step fails. Nothing here imports Ansible (the node's ``netstack`` command
restores the dataplane at boot with it).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, mounts

DEFAULT_PIN_PATH = "/sys/fs/bpf/kldload-netstack"
LINKS = "links"
MAPS = "maps"
PROGS_PREFIX = "progs_"
STAGING = "staging"
MAPS_NEXT = "maps_next"


class ProgError(Exception):
    """Bad input, a verifier failure or a failed step; ``details`` carries tool output."""

    def __init__(self, msg, details=""):
        super(ProgError, self).__init__(msg)
        self.details = details


def subprocess_runner(argv):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_type(name, where="attach"):
    t = str(name).strip().lower().replace("-", "_")
    t = bpfsys.ATTACH_ALIASES.get(t, t)
    if t not in bpfsys.ATTACH_TYPES:
        raise ProgError("%s.type: unknown attach type %r (known: %s)"
                        % (where, name, ", ".join(sorted(set(bpfsys.ATTACH_TYPES) | set(bpfsys.ATTACH_ALIASES)))))
    return t


def resolve_attachments(attach, root):
    """Validate attach entries; return [{program, type, target, target_desc, pin, ...}]."""
    out = []
    names = set()
    for i, a in enumerate(attach or []):
        where = "attach[%d]" % i
        if not isinstance(a, dict) or not a.get("program"):
            raise ProgError("%s.program: required" % where)
        t = canonical_type(a.get("type", ""), where)
        entry = {"program": a["program"], "type": t, "xdp_mode": a.get("xdp_mode") or "auto"}
        if t.startswith("cgroup_"):
            cg = a.get("cgroup")
            if not cg:
                raise ProgError("%s.cgroup: required for attach type %s" % (where, t))
            if a.get("device"):
                raise ProgError("%s.device: not used by cgroup attach type %s" % (where, t))
            if not os.path.isdir(cg):
                raise ProgError("%s.cgroup: %s is not a directory" % (where, cg))
            if not mounts.is_cgroup2(cg):
                raise ProgError("%s.cgroup: %s is not in a cgroup v2 file system" % (where, cg))
            ino = os.stat(cg).st_ino
            entry.update(cgroup=os.path.realpath(cg), cgroup_id=ino, target_desc="cgroup %s" % os.path.realpath(cg),
                         slug="cg%d" % ino)
        else:
            dev = a.get("device")
            if not dev:
                raise ProgError("%s.device: required for attach type %s" % (where, t))
            if a.get("cgroup"):
                raise ProgError("%s.cgroup: not used by attach type %s" % (where, t))
            try:
                ifindex = socket.if_nametoindex(dev)
            except OSError:
                raise ProgError("%s.device: no network device %r" % (where, dev))
            if t == "xdp" and entry["xdp_mode"] not in bpfsys.XDP_FLAGS:
                raise ProgError("%s.xdp_mode: must be one of %s" % (where, ", ".join(bpfsys.XDP_FLAGS)))
            entry.update(device=dev, ifindex=ifindex, target_desc="device %s" % dev,
                         slug="dev" + dev.replace(".", "_"))
        entry["pin"] = os.path.join(root, LINKS, "%s-%s-%s" % (entry["program"], t, entry["slug"]))
        if entry["pin"] in names:
            raise ProgError("%s: program %s is attached to %s as %s twice" % (where, a["program"], entry["target_desc"], t))
        names.add(entry["pin"])
        out.append(entry)
    return out


def describe(a):
    return "%s %s %s" % (a["program"], a["type"], a["target_desc"])


# ---- reading what is pinned -------------------------------------------------------------------

def inspect(root):
    """{exists, maps {name: info}, progs {dir: {name: info}}, links {pin: info}} under ``root``."""
    st = {"exists": os.path.isdir(root), "maps": {}, "progs": {}, "links": {}, "other": []}
    if not st["exists"]:
        return st
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry == MAPS:
            for m in sorted(os.listdir(path)):
                _kind, info = bpfsys.pinned_info(os.path.join(path, m))
                st["maps"][m] = info
        elif entry.startswith(PROGS_PREFIX) or entry in (STAGING, MAPS_NEXT):
            progs = {}
            for p in sorted(os.listdir(path)):
                _kind, info = bpfsys.pinned_info(os.path.join(path, p))
                progs[p] = info
            st["progs"][entry] = progs
        elif entry == LINKS:
            for ln in sorted(os.listdir(path)):
                _kind, info = bpfsys.pinned_info(os.path.join(path, ln))
                st["links"][os.path.join(path, ln)] = info
        else:
            st["other"].append(entry)
    return st


def probe(obj, run=subprocess_runner, bpftool="bpftool"):
    """Load ``obj`` into a private bpffs and read what it holds; everything is freed after.

    Returns {programs {name: info}, maps {name: info}}; a verifier failure raises ProgError with
    the verifier's log. Needs root (mount).
    """
    tmp = tempfile.mkdtemp(prefix="netstack_probe_", dir="/run" if os.path.isdir("/run") else None)
    mounted = False
    try:
        rc, _o, err = run(["mount", "-t", "bpf", "bpf", tmp])
        if rc != 0:
            raise ProgError("cannot mount a private bpffs at %s: %s" % (tmp, err.strip()))
        mounted = True
        rc, out, err = run([bpftool, "prog", "loadall", obj, os.path.join(tmp, "p"), "pinmaps", os.path.join(tmp, "m")])
        if rc != 0:
            raise ProgError("%s does not load (verifier or libbpf error): %s" % (obj, _verifier_summary(err or out)),
                            details=(err or out)[-20000:])
        res = {"programs": {}, "maps": {}}
        for p in sorted(os.listdir(os.path.join(tmp, "p"))):
            res["programs"][p] = bpfsys.pinned_info(os.path.join(tmp, "p", p))[1]
        mdir = os.path.join(tmp, "m")
        for m in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            res["maps"][m] = bpfsys.pinned_info(os.path.join(mdir, m))[1]
        return res
    finally:
        if mounted:
            run(["umount", tmp])
        try:
            os.rmdir(tmp)
        except OSError:
            pass


def _verifier_summary(text):
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning: bpftool is now running")
             and "see --legacy option" not in ln and not ln.startswith("If it used to work")]
    keep = [ln for ln in lines if ln.startswith("libbpf:") or ln.startswith("Error") or ":" not in ln[:4]]
    tail = (keep or lines)[-12:]
    return " | ".join(tail)


# ---- planning ---------------------------------------------------------------------------------

def _map_ok(have, want):
    return have and all(have[k] == want[k] for k in ("type", "key_size", "value_size", "max_entries", "flags"))


def version(sha, map_sizes):
    """Name of the pinned program set: the object's sha256 prefix, plus a hash of the map size
    overrides when there are any (so adding or dropping an override is never mistaken for "no change")."""
    if not map_sizes:
        return sha[:12]
    return "%s_%s" % (sha[:12], hashlib.sha256(repr(sorted(map_sizes.items())).encode()).hexdigest()[:8])


def plan(current, root, sha, attachments, map_sizes, probed=None, state="present", ver=None):
    """Decide what to do. ``probed`` is probe()'s result (needed when anything must be loaded)."""
    progs_dir = os.path.join(root, PROGS_PREFIX + (ver or sha[:12]))
    acts = {"create_maps": [], "recreate_maps": [], "load": False, "link_create": [], "link_update": [],
            "link_remove": [], "unpin_progs": [], "unpin_maps": [], "remove_root": False, "progs_dir": progs_dir}
    if state == "absent":
        acts["link_remove"] = sorted(current["links"])
        acts["unpin_progs"] = sorted(current["progs"])
        acts["unpin_maps"] = sorted(current["maps"])
        acts["remove_root"] = current["exists"]
        return acts
    cur_progs = current["progs"].get(os.path.basename(progs_dir))
    cur_map_ids = set(i["id"] for i in current["maps"].values() if i)
    if probed is None:
        # no probe: only valid when the pinned version is this object, complete and self-consistent
        if not cur_progs or not all(set(i.get("map_ids", [])) <= cur_map_ids for i in cur_progs.values() if i):
            return None
        return _plan_links(current, acts, attachments, cur_progs, progs_dir, False)
    for name, spec in sorted(probed["maps"].items()):
        want = dict(spec)
        if name in map_sizes:
            want["max_entries"] = map_sizes[name]
        have = current["maps"].get(name)
        if not have:
            acts["create_maps"].append((name, want))
        elif not _map_ok(have, want):
            acts["recreate_maps"].append((name, want, have))
    unknown = sorted(set(map_sizes) - set(probed["maps"]))
    if unknown:
        raise ProgError("maps: %s not in the object (its maps: %s)" % (", ".join(unknown), ", ".join(sorted(probed["maps"]))))
    for a in attachments:
        if a["program"] not in probed["programs"]:
            raise ProgError("attach: program %s is not in the object (its programs: %s)"
                            % (a["program"], ", ".join(sorted(probed["programs"]))))
    complete = cur_progs is not None and set(cur_progs) == set(probed["programs"]) \
        and all(set(i.get("map_ids", [])) <= cur_map_ids for i in cur_progs.values())
    load = not complete or bool(acts["create_maps"] or acts["recreate_maps"])
    acts["load"] = load
    acts["unpin_maps"] = sorted(set(current["maps"]) - set(probed["maps"]))
    return _plan_links(current, acts, attachments, cur_progs if not load else None, progs_dir, load)


def _plan_links(current, acts, attachments, cur_progs, progs_dir, load):
    want_pins = set()
    for a in attachments:
        want_pins.add(a["pin"])
        have = current["links"].get(a["pin"])
        if have is None:
            acts["link_create"].append(a)
            continue
        if not _link_target_ok(have, a):
            acts["link_remove"].append(a["pin"])
            acts["link_create"].append(a)
            continue
        if load or cur_progs is None or a["program"] not in cur_progs \
                or cur_progs[a["program"]]["id"] != have["prog_id"]:
            acts["link_update"].append(a)
    acts["link_remove"] += sorted(p for p in current["links"] if p not in want_pins)
    keep = os.path.basename(progs_dir)
    acts["unpin_progs"] = sorted(d for d in current["progs"] if d != keep or load)
    return acts


def _link_target_ok(info, a):
    if info is None or info.get("attach_type") != a["type"]:
        return False
    if a["type"].startswith("cgroup_"):
        return info.get("cgroup_id") == a["cgroup_id"]
    return info.get("ifindex") == a["ifindex"]


def has_changes(acts):
    return bool(acts["create_maps"] or acts["recreate_maps"] or acts["load"] or acts["link_create"]
                or acts["link_update"] or acts["link_remove"] or acts["unpin_progs"] or acts["unpin_maps"]
                or acts["remove_root"])


# ---- applying ---------------------------------------------------------------------------------

def _create_map(path, name, spec):
    with bpfsys.map_create(spec["type_id"], spec["key_size"], spec["value_size"], spec["max_entries"],
                           spec["flags"], name) as fd:
        bpfsys.obj_pin(fd, path)


def _rmtree_bpffs(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply(root, obj, acts, run=subprocess_runner, bpftool="bpftool"):
    """Carry out ``acts``; on failure undo this run's steps and raise ProgError."""
    undo = []
    try:
        _apply(root, obj, acts, run, bpftool, undo)
    except Exception as e:
        for step in reversed(undo):
            try:
                step()
            except Exception:  # best effort: report the original error
                pass
        if isinstance(e, ProgError):
            raise
        raise ProgError("%s (rolled back)" % e)


def _apply(root, obj, acts, run, bpftool, undo):
    if not os.path.isdir(root):
        os.makedirs(root)
        undo.append(lambda: _rmtree_bpffs(root))
    mapdir = os.path.join(root, MAPS)
    nextdir = os.path.join(root, MAPS_NEXT)
    for d in (mapdir,):
        if not os.path.isdir(d):
            os.mkdir(d)
    for name, spec in acts["create_maps"]:
        p = os.path.join(mapdir, name)
        _create_map(p, name, spec)
        undo.append(lambda p=p: os.unlink(p))
    if acts["recreate_maps"]:
        _rmtree_bpffs(nextdir)
        os.mkdir(nextdir)
        undo.append(lambda: _rmtree_bpffs(nextdir))
        for name, spec, _have in acts["recreate_maps"]:
            _create_map(os.path.join(nextdir, name), name, spec)
    staging = os.path.join(root, STAGING)
    if acts["load"]:
        _rmtree_bpffs(staging)
        recreated = set(n for n, _s, _h in acts["recreate_maps"])
        argv = [bpftool, "prog", "loadall", obj, staging]
        for name in sorted(os.listdir(mapdir)):
            if name in acts["unpin_maps"]:
                continue
            argv += ["map", "name", name, "pinned", os.path.join(nextdir if name in recreated else mapdir, name)]
        undo.append(lambda: _rmtree_bpffs(staging))
        rc, out, err = run(argv)
        if rc != 0:
            raise ProgError("%s does not load (verifier or libbpf error): %s" % (obj, _verifier_summary(err or out)),
                            details=(err or out)[-20000:])
    prog_src = staging if acts["load"] else acts["progs_dir"]
    linkdir = os.path.join(root, LINKS)
    if not os.path.isdir(linkdir):
        os.mkdir(linkdir)
    for a in acts["link_update"]:
        with bpfsys.obj_get(a["pin"]) as lfd, bpfsys.obj_get(os.path.join(prog_src, a["program"])) as pfd:
            old_id = bpfsys.link_info(lfd)["prog_id"]
            with bpfsys.prog_fd_by_id(old_id) as ofd:
                bpfsys.link_update(lfd, pfd, ofd)

            def back(pin=a["pin"], old_id=old_id):
                with bpfsys.obj_get(pin) as l2, bpfsys.prog_fd_by_id(old_id) as o2:
                    bpfsys.link_update(l2, o2)
            undo.append(back)
    for pin in acts["link_remove"]:
        if any(a["pin"] == pin for a in acts["link_create"]):
            os.unlink(pin)  # wrong target: re-created below (a detach of this one hook is unavoidable)
    for a in acts["link_create"]:
        with bpfsys.obj_get(os.path.join(prog_src, a["program"])) as pfd:
            if a["type"].startswith("cgroup_"):
                tfd = os.open(a["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
                try:
                    lfd = bpfsys.link_create(pfd, tfd, a["type"])
                finally:
                    os.close(tfd)
            else:
                flags = bpfsys.XDP_FLAGS[a["xdp_mode"]] if a["type"] == "xdp" else 0
                lfd = bpfsys.link_create(pfd, a["ifindex"], a["type"], flags)
            with lfd:
                bpfsys.obj_pin(lfd, a["pin"])
        undo.append(lambda pin=a["pin"]: os.unlink(pin))
    # point of no return: the hooks run the new programs. Clean up what is no longer used.
    del undo[:]
    for pin in acts["link_remove"]:
        if os.path.lexists(pin):
            os.unlink(pin)
    for d in acts["unpin_progs"]:
        _rmtree_bpffs(os.path.join(root, d))
    if acts["load"]:
        os.rename(staging, acts["progs_dir"])
    for name, _spec, _have in acts["recreate_maps"]:
        os.unlink(os.path.join(mapdir, name))
        os.rename(os.path.join(nextdir, name), os.path.join(mapdir, name))
    if os.path.isdir(nextdir):
        _rmtree_bpffs(nextdir)
    for name in acts["unpin_maps"]:
        p = os.path.join(mapdir, name)
        if os.path.lexists(p):
            os.unlink(p)


def remove(root, current):
    """Unpin everything under ``root``: links first (that detaches them), then programs, maps."""
    for pin in sorted(current["links"]):
        os.unlink(pin)
    for d in sorted(current["progs"]):
        _rmtree_bpffs(os.path.join(root, d))
    _rmtree_bpffs(root)
    parent = os.path.dirname(root)
    if os.path.isdir(parent) and not os.listdir(parent) and not os.path.ismount(parent):
        os.rmdir(parent)


# ---- reporting --------------------------------------------------------------------------------

def report(root):
    """What is pinned and attached now: {programs, maps, attachments}."""
    st = inspect(root)
    progs = {}
    for d, ps in st["progs"].items():
        if d.startswith(PROGS_PREFIX):
            for name, info in ps.items():
                progs[name] = {"id": info["id"], "tag": info["tag"], "type": info["type"],
                               "pinned": os.path.join(root, d, name)}
    by_id = dict((v["id"], k) for k, v in progs.items())
    atts = []
    for pin, info in sorted(st["links"].items()):
        if not info:
            continue
        a = {"pinned": pin, "link_id": info["id"], "prog_id": info["prog_id"],
             "program": by_id.get(info["prog_id"], "?"), "type": info.get("attach_type")}
        if "cgroup_id" in info:
            a["cgroup_id"] = info["cgroup_id"]
        if "ifindex" in info:
            a["ifindex"] = info["ifindex"]
            try:
                a["device"] = socket.if_indextoname(info["ifindex"])
            except OSError:
                a["device"] = None
        atts.append(a)
    maps = dict((k, {"id": v["id"], "type": v["type"], "max_entries": v["max_entries"], "key_size": v["key_size"],
                     "value_size": v["value_size"]}) for k, v in st["maps"].items() if v)
    return {"programs": progs, "maps": maps, "attachments": atts}


def summary(st, root):
    """A small comparable view for diff: object version, map sizes, attachments."""
    vers = sorted(d[len(PROGS_PREFIX):] for d in st["progs"] if d.startswith(PROGS_PREFIX))
    return {"object_sha256_12": vers[0] if len(vers) == 1 else vers,
            "maps": dict((k, v["max_entries"]) for k, v in sorted(st["maps"].items()) if v),
            "attachments": sorted(os.path.basename(p) for p in st["links"])}


def _check_bpffs(root):
    existing = root
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not mounts.is_bpffs(existing):
        raise ProgError("pin_path: %s is not on a BPF file system (%s is not bpffs); mount one first "
                        "(kldload.netstack.bpffs or the prereqs role)" % (os.path.dirname(root), existing))


def ensure(root, obj, attach, map_sizes=None, state="present", check=False, run=subprocess_runner,
           bpftool="bpftool"):
    """The whole module behaviour: returns {changed, actions, before, after, report, sha256}."""
    map_sizes = dict(map_sizes or {})
    for k, v in map_sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProgError("maps.%s.max_entries: must be a positive integer, got %r" % (k, v))
    if "." in root:
        raise ProgError("pin_path: %s contains a '.'; bpffs refuses dots in names" % root)
    current = inspect(root)
    before = summary(current, root)
    if state == "absent":
        acts = plan(current, root, "", [], {}, state="absent")
        changed = has_changes(acts)
        if changed and not check:
            remove(root, current)
        after = {"object_sha256_12": [], "maps": {}, "attachments": []}
        return {"changed": changed, "before": before, "after": after if changed else before,
                "actions": _acts_text(acts), "report": {"programs": {}, "maps": {}, "attachments": []}}
    if not obj or not os.path.isfile(obj):
        raise ProgError("object: %s is not a file" % obj)
    _check_bpffs(root)
    sha = file_sha256(obj)
    attachments = resolve_attachments(attach, root)
    ver = version(sha, map_sizes)
    acts = plan(current, root, sha, attachments, map_sizes, ver=ver)
    if acts is not None and map_sizes:
        if any(current["maps"].get(k) is None or current["maps"][k]["max_entries"] != v for k, v in map_sizes.items()):
            acts = None
    if acts is not None and any(a["program"] not in current["progs"].get(os.path.basename(acts["progs_dir"]), {})
                                for a in attachments):
        acts = None
    if acts is None:
        acts = plan(current, root, sha, attachments, map_sizes, probed=probe(obj, run, bpftool), ver=ver)
    changed = has_changes(acts)
    if changed and not check:
        apply(root, obj, acts, run, bpftool)
    after_state = inspect(root) if changed and not check else current
    after = summary(after_state, root) if not check else _predict(before, acts, ver, map_sizes)
    return {"changed": changed, "before": before, "after": after, "actions": _acts_text(acts), "sha256": sha,
            "report": report(root) if os.path.isdir(root) else {"programs": {}, "maps": {}, "attachments": []}}


def _predict(before, acts, ver, map_sizes):
    maps = dict(before["maps"])
    for name, spec in acts["create_maps"]:
        maps[name] = spec["max_entries"]
    for name, spec, _h in acts["recreate_maps"]:
        maps[name] = spec["max_entries"]
    for name in acts["unpin_maps"]:
        maps.pop(name, None)
    atts = set(before["attachments"])
    atts -= set(os.path.basename(p) for p in acts["link_remove"])
    atts |= set(os.path.basename(a["pin"]) for a in acts["link_create"])
    return {"object_sha256_12": ver, "maps": maps, "attachments": sorted(atts)}


def _acts_text(acts):
    out = []
    out += ["create map %s (%d entries)" % (n, s["max_entries"]) for n, s in acts["create_maps"]]
    out += ["recreate map %s: %d -> %d entries (contents are lost)" % (n, h["max_entries"], s["max_entries"])
            for n, s, h in acts["recreate_maps"]]
    if acts["load"]:
        out.append("load programs into %s" % acts["progs_dir"])
    out += ["attach %s" % describe(a) for a in acts["link_create"]]
    out += ["replace program of %s (link update, no gap)" % describe(a) for a in acts["link_update"]]
    out += ["detach %s" % os.path.basename(p) for p in acts["link_remove"]]
    out += ["unpin programs %s" % d for d in acts["unpin_progs"]]
    out += ["unpin map %s" % m for m in acts["unpin_maps"]]
    if acts["remove_root"]:
        out.append("remove pin directory")
    return out
