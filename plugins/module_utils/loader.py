# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one eBPF loader: objects with manifests, shared maps under globals/, programs, BPF links.

Layout under the pin root (bpffs; no "." anywhere - bpffs refuses dots in names):

    globals/<map>_v<version>        shared maps, one per node, reused by every object declaring them
    <object>/maps/<map>             the object's private maps
    <object>/progs_<version>/<prog> the programs of one object version (sha256 of the file, sizes, manifest)
    <object>/links/<prog>-<type>-<target>   one pinned BPF link per attachment
    globals_next/, <object>/maps_next/, <object>/staging/   only while a change is applied

Programs are loaded with ``bpftool prog loadall OBJ DIR map name M pinned P ...`` (libbpf does the
relocations) against maps created here beforehand, so sizes are the caller's and map contents
survive a program upgrade. Attachments are BPF links: a new object version is swapped in with
BPF_LINK_UPDATE, so a hook is never left without a program, and unpinning a link detaches it.

A pinned shared map whose type, key/value size or flags differ from the manifest is an error
naming both. A shared map pinned in another layout version is migrated when the manifest declares
how (manifest.py: copy or extend), else refused. A size change recreates the map (contents lost).

``inspect()`` reads what is pinned, ``plan()`` decides, ``apply()`` acts and rolls back what it
did when a later step fails (``step`` is called after every step; tests inject failures there).
``ensure()`` is the whole behaviour. No Ansible imports: the node command uses it at boot.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest as mf, mounts
from ansible_collections.kldload.netstack.plugins.module_utils.release import file_sha256
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

DEFAULT_PIN_PATH = "/sys/fs/bpf/kldload-netstack"
GLOBALS = mf.GLOBALS
GLOBALS_NEXT = "globals_next"
LINKS = "links"
ENDPOINT_LINKS = "endpoints"    # <object>/endpoints/: the per-pod links netstack-cni pins (cni.py)
TUNNEL_LINKS = "tunnel"         # <object>/tunnel/: the links to the pod network's VXLAN device (runtime.py)
MAPS = "maps"
PROGS_PREFIX = "progs_"
STAGING = "staging"
MAPS_NEXT = "maps_next"
RESERVED = frozenset([GLOBALS, GLOBALS_NEXT])
_SPEC_KEYS = ("type", "key_size", "value_size", "flags")


class ProgError(Exception):
    """Bad input, a verifier failure or a failed step; ``details`` carries tool output."""

    def __init__(self, msg, details=""):
        super(ProgError, self).__init__(msg)
        self.details = details


def canonical_type(name, where="attach"):
    t = str(name).strip().lower().replace("-", "_")
    t = bpfsys.ATTACH_ALIASES.get(t, t)
    if t not in bpfsys.ATTACH_TYPES:
        raise ProgError("%s.type: unknown attach type %r (known: %s)"
                        % (where, name, ", ".join(sorted(set(bpfsys.ATTACH_TYPES) | set(bpfsys.ATTACH_ALIASES)))))
    return t


def load_manifest(obj, required=False):
    """The manifest next to object file ``obj`` (validated), or None when it has none."""
    path = mf.manifest_path(obj)
    if not os.path.exists(path):
        if required:
            raise ProgError("%s has no manifest (%s)" % (obj, path))
        return None
    try:
        return mf.load(path, bpfsys.ATTACH_TYPES)
    except mf.ManifestError as e:
        raise ProgError(str(e))


# ---- attachments -----------------------------------------------------------------------------

def resolve_attachments(attach, objdir):
    """Validate explicit attach entries; return [{program, type, target, target_desc, pin, ...}]."""
    out = []
    names = set()
    for i, a in enumerate(attach or []):
        where = "attach[%d]" % i
        if not isinstance(a, dict) or not a.get("program"):
            raise ProgError("%s.program: required" % where)
        t = canonical_type(a.get("type", ""), where)
        entry = {"program": a["program"], "type": t, "xdp_mode": a.get("xdp_mode") or "auto",
                 "order": a.get("order") or mf.TCX_ORDER_DEFAULT}
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
        entry["pin"] = os.path.join(objdir, LINKS, "%s-%s-%s" % (entry["program"], t, entry["slug"]))
        if entry["pin"] in names:
            raise ProgError("%s: program %s is attached to %s as %s twice" % (where, a["program"], entry["target_desc"], t))
        names.add(entry["pin"])
        out.append(entry)
    return out


def targets_to_attach(manifest, targets, where="targets"):
    """Explicit attach entries for the programs of a manifest, from where the node wants them:
    ``targets`` {cgroup: path (None: the node's cgroup2 mount), families: [4, 6], devices: [names]}.
    Programs whose target is ``endpoint`` are attached per pod by the CNI plugin, ``tunnel`` ones to the VXLAN
    device by the node apply (runtime.py), not here."""
    targets = targets or {}
    families = targets.get("families") or [4, 6]
    cgroup = targets.get("cgroup") or None
    out = []
    for name, p in sorted(manifest["programs"].items()):
        if p["family"] is not None and p["family"] not in families:
            continue
        if p["target"] == "cgroup":
            if cgroup is None:
                cgroup = mounts.cgroup2_path()
                if cgroup is None:
                    raise ProgError("%s.cgroup: no cgroup v2 file system is mounted on this node" % where)
            out.append({"program": name, "type": p["attach"], "cgroup": cgroup})
        elif p["target"] == "device":
            for dev in targets.get("devices") or []:
                out.append({"program": name, "type": p["attach"], "device": dev,
                            "xdp_mode": targets.get("xdp_mode") or "auto", "order": p.get("order")})
    return out


def describe(a):
    return "%s %s %s" % (a["program"], a["type"], a["target_desc"])


# ---- reading what is pinned -------------------------------------------------------------------

def _pinned_dir(path):
    out = {}
    for p in sorted(os.listdir(path)):
        out[p] = bpfsys.pinned_info(os.path.join(path, p))[1]
    return out


def _inspect_object(path):
    st = {"exists": os.path.isdir(path), "maps": {}, "progs": {}, "links": {}, "other": []}
    if not st["exists"]:
        return st
    for entry in sorted(os.listdir(path)):
        sub = os.path.join(path, entry)
        if entry == MAPS:
            st["maps"] = _pinned_dir(sub)
        elif entry.startswith(PROGS_PREFIX) or entry in (STAGING, MAPS_NEXT):
            st["progs"][entry] = _pinned_dir(sub)
        elif entry == LINKS:
            st["links"] = dict((os.path.join(sub, k), v) for k, v in _pinned_dir(sub).items())
        else:
            st["other"].append(entry)
    return st


def inspect(root):
    """{exists, globals {pin file: info}, globals_next, objects {name: {maps, progs, links, other}}}."""
    st = {"exists": os.path.isdir(root), "globals": {}, "globals_next": {}, "objects": {}}
    if not st["exists"]:
        return st
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry == GLOBALS:
            st["globals"] = _pinned_dir(path)
        elif entry == GLOBALS_NEXT:
            st["globals_next"] = _pinned_dir(path)
        elif os.path.isdir(path):
            st["objects"][entry] = _inspect_object(path)
    return st


def probe(obj, module=None):
    """Load ``obj`` into a private bpffs and read what it holds; everything is freed after.

    Returns {programs {name: info}, maps {name: info}}; a verifier failure raises ProgError with
    the verifier's log. Needs root (mount).
    """
    tmp = tempfile.mkdtemp(prefix="netstack_probe_", dir="/run" if os.path.isdir("/run") else None)
    mounted = False
    try:
        rc, _o, err = Tool(module, "mount").run("-t", "bpf", "bpf", tmp, check=False)
        if rc != 0:
            raise ProgError("cannot mount a private bpffs at %s: %s" % (tmp, err.strip()))
        mounted = True
        _bpftool(module, "prog", "loadall", obj, os.path.join(tmp, "p"), "pinmaps", os.path.join(tmp, "m"), what=obj)
        mdir = os.path.join(tmp, "m")
        return {"programs": _pinned_dir(os.path.join(tmp, "p")),
                "maps": _pinned_dir(mdir) if os.path.isdir(mdir) else {}}
    finally:
        if mounted:
            Tool(module, "umount").run(tmp, check=False)
        try:
            os.rmdir(tmp)
        except OSError:
            pass


def _bpftool(module, *args, **kw):
    tool = Tool(module, "bpftool")
    if not tool.available:
        raise ProgError("bpftool is not installed on the node (package bpftool): it loads the objects (libbpf)")
    rc, out, err = tool.run(*args, check=False)
    if rc != 0:
        raise ProgError("%s does not load (verifier or libbpf error): %s" % (kw.get("what"), _verifier_summary(err or out)),
                        details=(err or out)[-20000:])
    return out


def _verifier_summary(text):
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning: bpftool is now running")
             and "see --legacy option" not in ln and not ln.startswith("If it used to work")]
    keep = [ln for ln in lines if ln.startswith("libbpf:") or ln.startswith("Error") or ":" not in ln[:4]]
    tail = (keep or lines)[-12:]
    return " | ".join(tail)


# ---- planning ---------------------------------------------------------------------------------

def version(sha, map_sizes, manifest=None):
    """Name of the pinned program set: the object's sha256 prefix, plus a hash of the map size
    overrides and the manifest when there are any (so changing either is never "no change")."""
    extra = []
    if map_sizes:
        extra.append(repr(sorted(map_sizes.items())))
    if manifest and not manifest.get("implicit"):
        extra.append(json.dumps(manifest, sort_keys=True))
    if not extra:
        return sha[:12]
    return "%s_%s" % (sha[:12], hashlib.sha256("|".join(extra).encode()).hexdigest()[:8])


def _new_plan():
    return {"globals_create": [], "globals_recreate": [], "globals_migrate": [], "globals_unpin": [],
            "objects": {}, "remove_objects": [], "remove_root": False}


def _new_obj_plan(objdir, ver):
    return {"create_maps": [], "recreate_maps": [], "unpin_maps": [], "load": False, "link_create": [],
            "link_update": [], "link_remove": [], "unpin_progs": [], "objdir": objdir,
            "progs_dir": os.path.join(objdir, PROGS_PREFIX + ver), "map_paths": {}}


def _wanted_maps(o):
    """{map name: spec with the size override} of one object (its manifest)."""
    out = {}
    for name, spec in o["manifest"]["maps"].items():
        want = dict(spec)
        if name in o["sizes"]:
            want["max_entries"] = o["sizes"][name]
        out[name] = want
    unknown = sorted(set(o["sizes"]) - set(out))
    if unknown:
        raise ProgError("%s: maps %s not in the object (its maps: %s)"
                        % (o["name"], ", ".join(unknown), ", ".join(sorted(out))))
    return out


def _spec_text(s):
    return "%s key %d value %d flags %d" % (s["type"], s["key_size"], s["value_size"], s["flags"])


def plan_globals(current, root, objects, acts):
    """Decide the shared maps of ``objects``: reuse, create, recreate (size), migrate (version)."""
    wanted = {}
    for o in objects:
        for name, spec in _wanted_maps(o).items():
            if not spec["shared"]:
                continue
            pin = mf.pin_name(name, spec["version"])
            prev = wanted.get(pin)
            if prev and any(prev[1][k] != spec[k] for k in _SPEC_KEYS + ("max_entries",)):
                raise ProgError("objects %s and %s declare the shared map %s differently (%s, %d entries / %s, %d entries)"
                                % (prev[0], o["name"], name, _spec_text(prev[1]), prev[1]["max_entries"],
                                   _spec_text(spec), spec["max_entries"]))
            wanted[pin] = (o["name"], spec, name)
    for pin, (owner, spec, name) in sorted(wanted.items()):
        have = current["globals"].get(pin)
        where = os.path.join(root, GLOBALS, pin)
        if have is not None:
            diff = [k for k in _SPEC_KEYS if have[k] != spec[k]]
            if diff:
                raise ProgError("%s is pinned as %s but object %s declares layout version %d as %s: not the same "
                                "layout; remove the pinned map (uninstall) or fix the manifest"
                                % (where, _spec_text(have), owner, spec["version"], _spec_text(spec)))
            if have["max_entries"] != spec["max_entries"]:
                acts["globals_recreate"].append((pin, name, spec, have))
            continue
        others = sorted(p for p in current["globals"] if mf.parse_pin_name(p)[0] == name)
        if not others:
            acts["globals_create"].append((pin, name, spec))
            continue
        old = others[-1]
        old_ver = mf.parse_pin_name(old)[1]
        kind = spec["migrations"].get(old_ver)
        if kind is None:
            raise ProgError("%s holds layout version %d of %s; object %s needs version %d and its manifest declares no "
                            "migration from version %d" % (os.path.join(root, GLOBALS, old), old_ver, name, owner,
                                                           spec["version"], old_ver))
        old_info = current["globals"][old]
        if kind == "copy" and (old_info["key_size"], old_info["value_size"]) != (spec["key_size"], spec["value_size"]):
            raise ProgError("%s: the migration from version %d is 'copy' but the key/value sizes change (%d/%d -> %d/%d)"
                            % (name, old_ver, old_info["key_size"], old_info["value_size"], spec["key_size"],
                               spec["value_size"]))
        if kind == "extend" and (old_info["key_size"] > spec["key_size"] or old_info["value_size"] > spec["value_size"]):
            raise ProgError("%s: the migration from version %d is 'extend' but the key or value shrinks" % (name, old_ver))
        acts["globals_migrate"].append((pin, name, spec, old, kind))
    return wanted


def _map_ok(have, want):
    return have is not None and all(have[k] == want[k] for k in _SPEC_KEYS + ("max_entries",))


def plan_object(current, root, o, acts):
    """Decide one object: its private maps, whether to load, its links."""
    objdir = os.path.join(root, o["name"])
    cur = current["objects"].get(o["name"]) or _inspect_object(objdir)
    oa = _new_obj_plan(objdir, o["version"])
    acts["objects"][o["name"]] = oa
    wanted = _wanted_maps(o)
    pinned_ids = set(i["id"] for i in cur["maps"].values() if i)
    for name, spec in sorted(wanted.items()):
        if spec["shared"]:
            pin = mf.pin_name(name, spec["version"])
            oa["map_paths"][name] = os.path.join(root, GLOBALS, pin)
            have = current["globals"].get(pin)
            if have:
                pinned_ids.add(have["id"])
            if have is None or any(p == pin for p, _n, _s, _h in acts["globals_recreate"]):
                oa["load"] = True
            continue
        oa["map_paths"][name] = os.path.join(objdir, MAPS, name)
        have = cur["maps"].get(name)
        if have is None:
            oa["create_maps"].append((name, spec))
        elif not _map_ok(have, spec):
            oa["recreate_maps"].append((name, spec, have))
    oa["unpin_maps"] = sorted(set(cur["maps"]) - set(n for n, s in wanted.items() if not s["shared"]))
    want_progs = set(o["manifest"]["programs"])
    for a in o["attach"]:
        if a["program"] not in want_progs:
            raise ProgError("%s: attach: program %s is not in the object (its programs: %s)"
                            % (o["name"], a["program"], ", ".join(sorted(want_progs))))
    cur_progs = cur["progs"].get(os.path.basename(oa["progs_dir"]))
    complete = cur_progs is not None and set(cur_progs) >= want_progs \
        and all(set(i.get("map_ids", [])) <= pinned_ids for i in cur_progs.values() if i)
    if not complete or oa["create_maps"] or oa["recreate_maps"]:
        oa["load"] = True
    _plan_links(cur, oa, o["attach"], None if oa["load"] else cur_progs)
    return oa


def _plan_links(cur, oa, attachments, cur_progs):
    want_pins = set()
    for a in attachments:
        want_pins.add(a["pin"])
        have = cur["links"].get(a["pin"])
        if have is None:
            oa["link_create"].append(a)
        elif not _link_target_ok(have, a):
            oa["link_remove"].append(a["pin"])
            oa["link_create"].append(a)
        elif cur_progs is None or a["program"] not in cur_progs or cur_progs[a["program"]]["id"] != have["prog_id"]:
            oa["link_update"].append(a)
    oa["link_remove"] += sorted(p for p in cur["links"] if p not in want_pins)
    keep = os.path.basename(oa["progs_dir"])
    oa["unpin_progs"] = sorted(d for d in cur["progs"] if d != keep or oa["load"])


def _link_target_ok(info, a):
    if info is None or info.get("attach_type") != a["type"]:
        return False
    if a["type"].startswith("cgroup_"):
        return info.get("cgroup_id") == a["cgroup_id"]
    return info.get("ifindex") == a["ifindex"]


def _users(current, map_id, skip):
    """Objects (not in ``skip``) whose pinned programs use the map with kernel id ``map_id``."""
    out = []
    for name, st in sorted(current["objects"].items()):
        if name in skip:
            continue
        if any(map_id in (i or {}).get("map_ids", []) for progs in st["progs"].values() for i in progs.values()):
            out.append(name)
    return out


def plan(current, root, objects, prune=False, keep_pins=()):
    """All decisions for ``objects`` (their manifests, versions and attachments resolved). ``prune``: these objects are everything the
    pin root holds; other objects and shared maps nobody declares are removed. ``keep_pins``: shared maps
    (``globals/`` names) that stay pinned even when nobody here declares them or they are migrated from:
    the layouts the node's previous release uses, which a rollback to it finds as they were at the switch."""
    acts = _new_plan()
    wanted = plan_globals(current, root, objects, acts)
    names = set(o["name"] for o in objects)
    for o in objects:   # a recreated or migrated shared map is loaded against by every object using it
        plan_object(current, root, o, acts)
    for pin in [p for p, _n, _s, _h in acts["globals_recreate"]] + [m[3] for m in acts["globals_migrate"]]:
        users = _users(current, current["globals"][pin]["id"], names)
        if users:
            raise ProgError("%s changes (recreated or migrated) but object(s) %s, not part of this run, use it: "
                            "load them in the same run" % (os.path.join(root, GLOBALS, pin), ", ".join(users)))
    acts["globals_unpin"] = sorted(set(m[3] for m in acts["globals_migrate"]))
    if prune:
        acts["remove_objects"] = sorted(set(current["objects"]) - names)
        acts["globals_unpin"] = sorted(set(acts["globals_unpin"]) | (set(current["globals"]) - set(wanted)))
        acts["remove_root"] = not objects and current["exists"]
    acts["globals_unpin"] = [p for p in acts["globals_unpin"] if p not in keep_pins]
    return acts


def has_changes(acts):
    if any(acts[k] for k in ("globals_create", "globals_recreate", "globals_migrate", "globals_unpin",
                             "remove_objects", "remove_root")):
        return True
    return any(oa["create_maps"] or oa["recreate_maps"] or oa["load"] or oa["link_create"] or oa["link_update"]
               or oa["link_remove"] or oa["unpin_progs"] or oa["unpin_maps"] for oa in acts["objects"].values())


# ---- applying ---------------------------------------------------------------------------------

def _create_map(path, name, spec):
    with bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"], spec["max_entries"],
                           spec["flags"], name) as fd:
        bpfsys.obj_pin(fd, path)


def _rmtree_bpffs(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _migrate(old_path, new_path, spec):
    """Copy every entry of the old map into the new one, zero-extending keys and values to the new sizes."""
    with bpfsys.obj_get(old_path) as ofd, bpfsys.obj_get(new_path) as nfd:
        info = bpfsys.map_info(ofd)
        items = bpfsys.map_dump(ofd, info["key_size"], info["value_size"], info["max_entries"])
        ks, vs = spec["key_size"], spec["value_size"]
        items = [(k + b"\0" * (ks - len(k)), v + b"\0" * (vs - len(v))) for k, v in items]
        if spec["type"] in ("array", "percpu_array"):
            items = [(k, v) for k, v in items if int.from_bytes(k[:4], "little") < spec["max_entries"]]
        bpfsys.map_update_batch(nfd, items, ks, vs)
        return len(items)


class _Run:
    """One apply: the undo list and the step callback."""

    def __init__(self, step):
        self.undo = []
        self.step = step or (lambda label: None)

    def did(self, label, undo=None):
        if undo is not None:
            self.undo.append(undo)
        self.step(label)


def apply(root, objects, acts, module=None, step=None):
    """Carry out ``acts``; on failure undo this run's steps and raise ProgError."""
    run = _Run(step)
    try:
        _apply(root, dict((o["name"], o) for o in objects), acts, module, run)
    except Exception as e:
        for undo in reversed(run.undo):
            try:
                undo()
            except Exception:  # pylint: disable=broad-except  # best effort: report the original error
                pass
        if isinstance(e, ProgError):
            raise
        raise ProgError("%s (rolled back)" % e)


def _mkdir(path, run):
    if not os.path.isdir(path):
        os.makedirs(path)
        run.did("mkdir %s" % path, lambda: _rmtree_bpffs(path))


def _apply(root, objects, acts, module, run):
    _mkdir(root, run)
    gdir, gnext = os.path.join(root, GLOBALS), os.path.join(root, GLOBALS_NEXT)
    if acts["globals_create"] or acts["globals_migrate"]:
        _mkdir(gdir, run)
    for pin, name, spec in acts["globals_create"]:
        p = os.path.join(gdir, pin)
        _create_map(p, name, spec)
        run.did("create %s" % p, lambda p=p: os.unlink(p))
    for pin, name, spec, old, _kind in acts["globals_migrate"]:
        p = os.path.join(gdir, pin)
        _create_map(p, name, spec)
        run.undo.append(lambda p=p: os.unlink(p))
        _migrate(os.path.join(gdir, old), p, spec)
        run.did("migrate %s -> %s" % (old, pin))
    if acts["globals_recreate"]:
        _rmtree_bpffs(gnext)
        _mkdir(gnext, run)
        for pin, name, spec, _have in acts["globals_recreate"]:
            _create_map(os.path.join(gnext, pin), name, spec)
            run.did("create %s" % os.path.join(gnext, pin))
    recreated_globals = set(p for p, _n, _s, _h in acts["globals_recreate"])
    for name, oa in sorted(acts["objects"].items()):
        _apply_maps_and_load(objects[name], oa, gnext, recreated_globals, module, run)
    orders = tcx_orders(o["manifest"] for o in objects.values() if o.get("manifest"))
    for name, oa in sorted(acts["objects"].items()):
        _apply_links(oa, module, run, orders)
    # point of no return: the hooks run the new programs. Clean up what is no longer used.
    del run.undo[:]
    for name, oa in sorted(acts["objects"].items()):
        _finish_object(oa)
    for pin in sorted(recreated_globals):
        os.unlink(os.path.join(gdir, pin))
        os.rename(os.path.join(gnext, pin), os.path.join(gdir, pin))
    _rmtree_bpffs(gnext)
    for name in acts["remove_objects"]:
        remove_object(os.path.join(root, name))
    for pin in acts["globals_unpin"]:
        p = os.path.join(gdir, pin)
        if os.path.lexists(p):
            os.unlink(p)
    if acts["remove_root"]:
        _remove_root(root)


def _apply_maps_and_load(o, oa, gnext, recreated_globals, module, run):
    objdir = oa["objdir"]
    mapdir, nextdir, staging = (os.path.join(objdir, d) for d in (MAPS, MAPS_NEXT, STAGING))
    _mkdir(objdir, run)
    _mkdir(mapdir, run)
    for name, spec in oa["create_maps"]:
        p = os.path.join(mapdir, name)
        _create_map(p, name, spec)
        run.did("create %s" % p, lambda p=p: os.unlink(p))
    if oa["recreate_maps"]:
        _rmtree_bpffs(nextdir)
        _mkdir(nextdir, run)
        for name, spec, _have in oa["recreate_maps"]:
            _create_map(os.path.join(nextdir, name), name, spec)
            run.did("create %s" % os.path.join(nextdir, name))
    if not oa["load"]:
        return
    _rmtree_bpffs(staging)
    recreated = set(n for n, _s, _h in oa["recreate_maps"])
    argv = ["prog", "loadall", o["path"], staging]
    for name, path in sorted(oa["map_paths"].items()):
        pin = os.path.basename(path)
        if pin in recreated_globals:
            path = os.path.join(gnext, pin)
        elif name in recreated:
            path = os.path.join(nextdir, name)
        argv += ["map", "name", name, "pinned", path]
    run.undo.append(lambda: _rmtree_bpffs(staging))
    _bpftool(module, *argv, what=o["path"])
    run.did("load %s" % o["name"])


def _apply_links(oa, module, run, orders):
    prog_src = os.path.join(oa["objdir"], STAGING) if oa["load"] else oa["progs_dir"]
    linkdir = os.path.join(oa["objdir"], LINKS)
    _mkdir(linkdir, run)
    for a in oa["link_update"]:
        with bpfsys.obj_get(a["pin"]) as lfd, bpfsys.obj_get(os.path.join(prog_src, a["program"])) as pfd:
            old_id = bpfsys.link_info(lfd)["prog_id"]
            with bpfsys.prog_fd_by_id(old_id) as ofd:
                bpfsys.link_update(lfd, pfd, ofd)

            def back(pin=a["pin"], old_id=old_id):
                with bpfsys.obj_get(pin) as l2, bpfsys.prog_fd_by_id(old_id) as o2:
                    bpfsys.link_update(l2, o2)
            run.did("update link %s" % a["pin"], back)
    for pin in oa["link_remove"]:
        if any(a["pin"] == pin for a in oa["link_create"]):
            unpin_link(pin)  # wrong target: re-created below (a detach of this one hook is unavoidable)
    for a in oa["link_create"]:
        with bpfsys.obj_get(os.path.join(prog_src, a["program"])) as pfd:
            if a["type"].startswith("cgroup_"):
                tfd = os.open(a["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
                try:
                    lfd = bpfsys.link_create(pfd, tfd, a["type"])
                finally:
                    os.close(tfd)
            else:
                lfd = _device_link(pfd, a["ifindex"], a, orders)
            with lfd:
                bpfsys.obj_pin(lfd, a["pin"])
        run.did("create link %s" % a["pin"], lambda pin=a["pin"]: unpin_link(pin))


def tcx_orders(manifests):
    """{kernel program name (15 characters): order} of the tcx programs of ``manifests``."""
    return dict((name[:15], p.get("order", mf.TCX_ORDER_DEFAULT)) for m in manifests for name, p in m["programs"].items())


def _device_link(prog_fd, ifindex, a, orders):
    """A link of the program to device ``ifindex`` (attachment ``a``: type, xdp_mode, order): XDP in its mode;
    tcx in front of the first program on the hook whose order (``orders``: program name -> order, others
    the default) is larger than this one's, else after them all."""
    if a["type"] == "xdp":
        return bpfsys.link_create(prog_fd, ifindex, a["type"], bpfsys.XDP_FLAGS[a.get("xdp_mode") or "auto"])
    mine = a.get("order") or mf.TCX_ORDER_DEFAULT
    if a["type"].startswith("tcx_"):
        for pid in bpfsys.prog_query(ifindex, a["type"]):
            try:
                with bpfsys.prog_fd_by_id(pid) as fd:
                    name = bpfsys.prog_info(fd)["name"]
            except OSError:
                continue
            if orders.get(name, mf.TCX_ORDER_DEFAULT) > mine:
                return bpfsys.link_create(prog_fd, ifindex, a["type"], bpfsys.F_BEFORE | bpfsys.F_ID, pid)
    return bpfsys.link_create(prog_fd, ifindex, a["type"])


def _finish_object(oa):
    objdir = oa["objdir"]
    mapdir, nextdir, staging = (os.path.join(objdir, d) for d in (MAPS, MAPS_NEXT, STAGING))
    for pin in oa["link_remove"]:
        if os.path.lexists(pin):
            unpin_link(pin)
    for d in oa["unpin_progs"]:
        _rmtree_bpffs(os.path.join(objdir, d))
    if oa["load"]:
        os.rename(staging, oa["progs_dir"])
    for name, _spec, _have in oa["recreate_maps"]:
        os.unlink(os.path.join(mapdir, name))
        os.rename(os.path.join(nextdir, name), os.path.join(mapdir, name))
    _rmtree_bpffs(nextdir)
    for name in oa["unpin_maps"]:
        p = os.path.join(mapdir, name)
        if os.path.lexists(p):
            os.unlink(p)


def link_current(pin, prog_pin, ifindex):
    """Whether the link pinned at ``pin`` runs the program pinned at ``prog_pin`` on ``ifindex``."""
    if not os.path.exists(pin):
        return False
    kind, info = bpfsys.pinned_info(pin)
    if kind != "link" or info.get("ifindex") != ifindex:
        return False
    kind, prog = bpfsys.pinned_info(prog_pin)
    return kind == "prog" and prog["id"] == info["prog_id"]


def hold_link(pin, prog_pin, ifindex, attach, order=mf.TCX_ORDER_DEFAULT, orders=None, check=False):
    """The link pinned at ``pin`` runs the program pinned at ``prog_pin`` on device ``ifindex`` (tcx): a
    link on that device moves to the program with BPF_LINK_UPDATE (no moment without one), a missing link
    or one on another device (the device was made again) is created, placed on the hook by ``order`` among
    the programs there (``orders``: their names' orders; see _device_link). The links the node apply or the CNI plugin attach outside an object's ``links/``
    (endpoints, the tunnel device) all go through here. Returns whether it changed (would change) anything."""
    if link_current(pin, prog_pin, ifindex):
        return False
    if check:
        return True
    if not os.path.isdir(os.path.dirname(pin)):
        os.mkdir(os.path.dirname(pin), 0o700)
    kind, info = bpfsys.pinned_info(pin) if os.path.exists(pin) else (None, {})
    with bpfsys.obj_get(prog_pin) as pfd:
        if kind == "link" and info.get("ifindex") == ifindex:
            with bpfsys.obj_get(pin) as lfd:
                bpfsys.link_update(lfd, pfd)
        else:
            if os.path.lexists(pin):
                unpin_link(pin)
            with _device_link(pfd, ifindex, {"type": attach, "order": order}, orders or {}) as lfd:
                bpfsys.obj_pin(lfd, pin)
    return True


def unpin_link(pin):
    """Detach a pinned BPF link at once (BPF_LINK_DETACH, 5.9+) and unpin it. Unpinning alone detaches
    only when the kernel frees the link, which it defers."""
    try:
        with bpfsys.obj_get(pin) as fd:
            bpfsys.link_detach(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
            raise
    if os.path.lexists(pin):
        os.unlink(pin)


def remove_object(objdir):
    """Unpin one object: links first (detached), then programs, then its private maps."""
    cur = _inspect_object(objdir)
    extra = []
    for sub in (ENDPOINT_LINKS, TUNNEL_LINKS):
        d = os.path.join(objdir, sub)
        extra += sorted(os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else []))
    for pin in sorted(cur["links"]) + extra:
        unpin_link(pin)     # detached now: an unpinned link lingers until the kernel frees it
    for d in sorted(cur["progs"]):
        _rmtree_bpffs(os.path.join(objdir, d))
    _rmtree_bpffs(objdir)


def _remove_root(root):
    _rmtree_bpffs(root)
    parent = os.path.dirname(root)
    if os.path.isdir(parent) and not os.listdir(parent) and not os.path.ismount(parent):
        os.rmdir(parent)


# ---- reporting --------------------------------------------------------------------------------

def report(root, names=None):
    """What is pinned and attached now: {objects {name: {programs, maps, attachments}}, globals}."""
    st = inspect(root)
    out = {"objects": {}, "globals": {}}
    for name, obj in sorted(st["objects"].items()):
        if names is None or name in names:
            out["objects"][name] = _report_object(root, name, obj)
    for pin, v in sorted(st["globals"].items()):
        if v:
            out["globals"][pin] = _map_report(v)
    return out


def _map_report(v):
    return {"id": v["id"], "type": v["type"], "max_entries": v["max_entries"], "key_size": v["key_size"],
            "value_size": v["value_size"]}


def _report_object(root, name, st):
    progs = {}
    for d, ps in st["progs"].items():
        if d.startswith(PROGS_PREFIX):
            for pname, info in ps.items():
                progs[pname] = {"id": info["id"], "tag": info["tag"], "type": info["type"],
                                "pinned": os.path.join(root, name, d, pname), "map_ids": info.get("map_ids", [])}
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
    vers = sorted(d[len(PROGS_PREFIX):] for d in st["progs"] if d.startswith(PROGS_PREFIX))
    return {"version": vers[0] if len(vers) == 1 else vers, "programs": progs, "attachments": atts,
            "maps": dict((k, _map_report(v)) for k, v in st["maps"].items() if v)}


def summary(st, names=None):
    """A small comparable view for diff: per object its version, map sizes, attachments; shared maps."""
    out = {"objects": {}, "globals": dict((p, v["max_entries"]) for p, v in sorted(st["globals"].items()) if v)}
    for name, obj in sorted(st["objects"].items()):
        if names is not None and name not in names:
            continue
        vers = sorted(d[len(PROGS_PREFIX):] for d in obj["progs"] if d.startswith(PROGS_PREFIX))
        out["objects"][name] = {"version": vers[0] if len(vers) == 1 else vers,
                                "maps": dict((k, v["max_entries"]) for k, v in sorted(obj["maps"].items()) if v),
                                "attachments": sorted(os.path.basename(p) for p in obj["links"])}
    return out


def _predict(before, acts, objects):
    after = json.loads(json.dumps(before))
    g = after["globals"]
    for pin, _name, spec in acts["globals_create"]:
        g[pin] = spec["max_entries"]
    for pin, _name, spec, _have in acts["globals_recreate"]:
        g[pin] = spec["max_entries"]
    for pin, _name, spec, _old, _kind in acts["globals_migrate"]:
        g[pin] = spec["max_entries"]
    for pin in acts["globals_unpin"]:
        g.pop(pin, None)
    for name in acts["remove_objects"]:
        after["objects"].pop(name, None)
    for o in objects:
        oa = acts["objects"][o["name"]]
        cur = after["objects"].setdefault(o["name"], {"version": [], "maps": {}, "attachments": []})
        cur["version"] = o["version"]
        for name, spec in oa["create_maps"]:
            cur["maps"][name] = spec["max_entries"]
        for name, spec, _h in oa["recreate_maps"]:
            cur["maps"][name] = spec["max_entries"]
        for name in oa["unpin_maps"]:
            cur["maps"].pop(name, None)
        atts = set(cur["attachments"]) - set(os.path.basename(p) for p in oa["link_remove"])
        cur["attachments"] = sorted(atts | set(os.path.basename(a["pin"]) for a in oa["link_create"]))
    return after


def actions_text(acts):
    out = []
    out += ["create shared map %s (%d entries)" % (p, s["max_entries"]) for p, _n, s in acts["globals_create"]]
    out += ["recreate shared map %s: %d -> %d entries (contents are lost)" % (p, h["max_entries"], s["max_entries"])
            for p, _n, s, h in acts["globals_recreate"]]
    out += ["migrate shared map %s -> %s (%s)" % (old, p, kind) for p, _n, _s, old, kind in acts["globals_migrate"]]
    for name, oa in sorted(acts["objects"].items()):
        out += ["%s: create map %s (%d entries)" % (name, n, s["max_entries"]) for n, s in oa["create_maps"]]
        out += ["%s: recreate map %s: %d -> %d entries (contents are lost)" % (name, n, h["max_entries"], s["max_entries"])
                for n, s, h in oa["recreate_maps"]]
        if oa["load"]:
            out.append("%s: load programs into %s" % (name, oa["progs_dir"]))
        out += ["%s: attach %s" % (name, describe(a)) for a in oa["link_create"]]
        out += ["%s: replace program of %s (link update, no gap)" % (name, describe(a)) for a in oa["link_update"]]
        out += ["%s: detach %s" % (name, os.path.basename(p)) for p in oa["link_remove"]]
        out += ["%s: unpin programs %s" % (name, d) for d in oa["unpin_progs"]]
        out += ["%s: unpin map %s" % (name, m) for m in oa["unpin_maps"]]
    out += ["remove object %s (detach, unpin)" % n for n in acts["remove_objects"]]
    out += ["unpin shared map %s" % p for p in acts["globals_unpin"]]
    if acts["remove_root"]:
        out.append("remove pin directory")
    return out


# ---- the whole behaviour ------------------------------------------------------------------------

def object_spec(name, path, attach=None, targets=None, map_sizes=None, manifest=None):
    """One object as ``ensure`` takes it: name, file, its manifest (read from beside the file when
    not given; None: the object has none), attachments (explicit, or from ``targets`` through the
    manifest), map size overrides."""
    if not name or "/" in name or "." in name or name in RESERVED:
        raise ProgError("name: %r must be a plain name without '/' or '.', and not %s" % (name, " or ".join(sorted(RESERVED))))
    sizes = dict(map_sizes or {})
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProgError("maps.%s.max_entries: must be a positive integer, got %r" % (k, v))
    if manifest is None and path and os.path.isfile(path):
        manifest = load_manifest(path)
    if attach and targets:
        raise ProgError("%s: give attach or targets, not both" % name)
    if targets is not None:
        if manifest is None:
            raise ProgError("%s: targets needs the object's manifest (%s)" % (name, mf.manifest_path(path or name)))
        attach = targets_to_attach(manifest, targets)
    return {"name": name, "path": path, "manifest": manifest, "sizes": sizes, "attach_args": attach or []}


def ensure(root, objects, state="present", check=False, prune=False, module=None, step=None, keep_pins=()):
    """Make the pin root hold ``objects`` (object_spec() results). Returns {changed, actions, before,
    after, report, sha256 {name: sha}}. ``state=absent`` removes the objects named (and, with prune or
    when no object is left, the shared maps and the pin root). ``prune``: the objects given are all
    the pin root should hold (the node's dataplane). ``keep_pins``: see plan()."""
    if "." in root:
        raise ProgError("pin_path: %s contains a '.'; bpffs refuses dots in names" % root)
    current = inspect(root)
    names = [o["name"] for o in objects]
    before = summary(current, None if prune else names)
    if state == "absent":
        return _absent(root, current, names, before, check, prune)
    _check_bpffs(root)
    shas = {}
    for o in objects:
        if not o["path"] or not os.path.isfile(o["path"]):
            raise ProgError("%s: object %s is not a file" % (o["name"], o["path"]))
        o["attach"] = resolve_attachments(o["attach_args"], os.path.join(root, o["name"]))
        shas[o["name"]] = file_sha256(o["path"])
    probes = {}
    for o in objects:
        if o["manifest"] is None:
            pinned = (current["objects"].get(o["name"]) or {}).get("progs", {}).get(
                PROGS_PREFIX + version(shas[o["name"]], o["sizes"]))
            if pinned is not None:      # this version is pinned: its maps and programs are known without a probe
                o["manifest"] = mf.from_probe(o["name"], {"maps": current["objects"][o["name"]]["maps"],
                                                          "programs": pinned})
            else:
                probes[o["name"]] = _probe_checked(o, module)
                o["manifest"] = mf.from_probe(o["name"], probes[o["name"]])
        o["version"] = version(shas[o["name"]], o["sizes"], o["manifest"])
    acts = plan(current, root, objects, prune, keep_pins)
    todo = [o for o in objects if acts["objects"][o["name"]]["load"] and o["name"] not in probes]
    if todo:                            # what is loaded is verified first (and held against its manifest)
        for o in todo:
            probes[o["name"]] = _probe_checked(o, module)
            if o["manifest"].get("implicit"):
                o["manifest"] = mf.from_probe(o["name"], probes[o["name"]])
        acts = plan(current, root, objects, prune, keep_pins)
    changed = has_changes(acts)
    if changed and not check:
        apply(root, objects, acts, module, step)
    after_state = inspect(root) if changed and not check else current
    after = summary(after_state, None if prune else names) if not check else _predict(before, acts, objects)
    return {"changed": changed, "before": before, "after": after, "actions": actions_text(acts), "sha256": shas,
            "report": report(root, None if prune else names) if os.path.isdir(root) else {"objects": {}, "globals": {}}}


def _probe_checked(o, module):
    """Probe-load an object (the verifier's verdict) and hold its manifest against what it really holds."""
    probed = probe(o["path"], module)
    if o["manifest"] is not None and not o["manifest"].get("implicit"):
        diffs = mf.check_object(o["manifest"], probed, o["name"])
        if diffs:
            raise ProgError("the manifest %s does not describe %s: %s"
                            % (mf.manifest_path(o["path"]), o["path"], "; ".join(diffs)))
    return probed


def _absent(root, current, names, before, check, prune):
    acts = _new_plan()
    acts["remove_objects"] = sorted(n for n in current["objects"] if n in names or prune)
    left = set(current["objects"]) - set(acts["remove_objects"])
    if not left:
        acts["globals_unpin"] = sorted(current["globals"])
        acts["remove_root"] = current["exists"]
    changed = has_changes(acts)
    if changed and not check:
        for name in acts["remove_objects"]:
            remove_object(os.path.join(root, name))
        for pin in acts["globals_unpin"]:
            os.unlink(os.path.join(root, GLOBALS, pin))
        if acts["remove_root"]:
            _remove_root(root)
    after = {"objects": dict((k, v) for k, v in before["objects"].items() if k in left),
             "globals": {} if not left else before["globals"]}
    return {"changed": changed, "before": before, "after": after if changed else before,
            "actions": actions_text(acts), "sha256": {},
            "report": report(root) if os.path.isdir(root) and not check else {"objects": {}, "globals": {}}}


def _check_bpffs(root):
    try:
        ok = mounts.is_bpffs(root)
    except OSError:
        ok = False
    if not ok:
        raise ProgError("pin_path: %s is not on a BPF file system; mount one first "
                        "(kldload.netstack.bpffs or the prereqs role)" % os.path.dirname(root))
