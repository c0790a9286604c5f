# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""eBPF object manifests: what an object holds, where its maps are pinned, how layouts migrate.

Every object ``bpf/<name>.c`` has a manifest ``bpf/<name>.manifest.json`` next to it, installed
beside the compiled object (``<name>.o`` + ``<name>.manifest.json``). It declares:

* ``programs``: name -> {attach (attach type), target, family}. ``target`` says where the runtime
  attaches the program: ``cgroup`` (the node's cgroup2 root, or the cgroup given), ``device`` (the
  devices the configuration names), ``endpoint`` (each pod's host-side interface; attached by the
  CNI plugin, not by the node apply), ``tunnel`` (the pod network's VXLAN device in tunnel mode;
  attached by the node apply after it made the device). ``family`` (4 or 6) lets a node without IPv6
  skip a program. ``order`` (tcx only, 1-99, default 50) places the program on its hook among the
  programs already there - before the first one with a larger order (BPF_F_BEFORE), whatever order they
  were attached in: on the underlay the edge load balancer (10) before the policy (20) before BPF host
  routing (50), on a pod's host interface the policy (10) before the edge's reply translation (20) before
  host routing (50).
* ``maps``: name -> {type, key_size, value_size, max_entries (the default), flags, shared,
  version, migrations}. A *shared* map is pinned once per node under ``<pin root>/globals/`` as
  ``<name>_v<version>`` and reused by every object that declares it (like Cilium's
  ``/sys/fs/bpf/tc/globals``); a private map stays with its object under ``<pin root>/<object>/maps/``.
  ``migrations`` maps an older layout version to the kind of copy that turns its entries into
  this version's (``copy``: same sizes; ``extend``: keys/values zero-extended to the new sizes).

The manifest is the one place the loader, the node command, the selftest and the benchmark learn
an object's programs and maps from; ``check_object()`` compares it with what the compiled object
really holds (the build runs it for every object). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re

GLOBALS = "globals"
SUFFIX = ".manifest.json"
TARGETS = ("cgroup", "device", "endpoint", "tunnel")
MAP_TYPES = ("hash", "array", "percpu_hash", "percpu_array", "lru_hash", "lru_percpu_hash", "lpm_trie", "ringbuf")
MIGRATIONS = ("copy", "extend")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,14}$")
_MAP_KEYS = frozenset(["type", "key_size", "value_size", "max_entries", "flags", "shared", "version", "migrations",
                       "layout", "description"])
_PROG_KEYS = frozenset(["attach", "target", "family", "order", "description"])
TCX_ORDER_DEFAULT = 50


class ManifestError(ValueError):
    """A manifest that does not parse, or does not describe its object; the message names the field."""


def pin_name(name, version):
    """File name of a shared map under ``globals/``: the map name and its layout version."""
    return "%s_v%d" % (name, version)


def parse_pin_name(pin):
    """(map name, version) of a ``globals/`` file name, or (None, None)."""
    m = re.match(r"^(.+)_v([0-9]+)$", pin)
    return (m.group(1), int(m.group(2))) if m else (None, None)


def manifest_path(obj):
    """The manifest that belongs to the object file ``obj`` (``x.o`` -> ``x.manifest.json``)."""
    base = obj[:-2] if obj.endswith(".o") else obj
    return base + SUFFIX


def load(path, attach_types=None):
    """Read and validate a manifest file; ManifestError names the file and field."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, IOError) as e:
        raise ManifestError("%s: cannot read the manifest: %s" % (path, e))
    except ValueError as e:
        raise ManifestError("%s: not JSON: %s" % (path, e))
    return validate(doc, path, attach_types)


def validate(doc, where="manifest", attach_types=None):
    """The manifest in canonical form: every map with all its fields, every program with its target."""
    if not isinstance(doc, dict):
        raise ManifestError("%s: must be a JSON object" % where)
    unknown = sorted(set(doc) - set(["object", "description", "programs", "maps"]))
    if unknown:
        raise ManifestError("%s: unknown field(s) %s" % (where, ", ".join(unknown)))
    name = doc.get("object")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]+$", name or ""):
        raise ManifestError("%s.object: required, a plain name (letters, digits, _ and -)" % where)
    out = {"object": name, "description": doc.get("description", ""), "programs": {}, "maps": {}}
    progs = doc.get("programs") or {}
    if not isinstance(progs, dict):
        raise ManifestError("%s.programs: must be a mapping of program name to its attachment" % where)
    for pname, p in sorted(progs.items()):
        pw = "%s.programs.%s" % (where, pname)
        if not isinstance(p, dict):
            raise ManifestError("%s: must be a mapping" % pw)
        bad = sorted(set(p) - _PROG_KEYS)
        if bad:
            raise ManifestError("%s: unknown field(s) %s" % (pw, ", ".join(bad)))
        attach = p.get("attach")
        if not isinstance(attach, str) or (attach_types is not None and attach not in attach_types):
            raise ManifestError("%s.attach: unknown attach type %r" % (pw, attach))
        target = p.get("target", "cgroup" if str(attach).startswith("cgroup_") else "device")
        if target not in TARGETS:
            raise ManifestError("%s.target: must be one of %s, got %r" % (pw, ", ".join(TARGETS), target))
        if target == "cgroup" and not attach.startswith("cgroup_"):
            raise ManifestError("%s.target: %s is not a cgroup attach type" % (pw, attach))
        family = p.get("family")
        if family not in (None, 4, 6):
            raise ManifestError("%s.family: must be 4 or 6, got %r" % (pw, family))
        order = p.get("order", TCX_ORDER_DEFAULT)
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 99 \
                or ("order" in p and not attach.startswith("tcx_")):
            raise ManifestError("%s.order: an integer 1-99, for tcx attach types only, got %r" % (pw, order))
        out["programs"][pname] = {"attach": attach, "target": target, "family": family, "order": order}
    maps = doc.get("maps") or {}
    if not isinstance(maps, dict):
        raise ManifestError("%s.maps: must be a mapping of map name to its spec" % where)
    for mname, m in sorted(maps.items()):
        out["maps"][mname] = _map(m, "%s.maps.%s" % (where, mname), mname)
    return out


def _int(v, where, lo=0, hi=2 ** 32 - 1):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ManifestError("%s: must be an integer %d..%d, got %r" % (where, lo, hi, v))
    return v


def _map(m, mw, mname):
    if not _NAME.match(mname):
        raise ManifestError("%s: map names are 1-15 letters, digits and _ (the kernel's map name limit)" % mw)
    if not isinstance(m, dict):
        raise ManifestError("%s: must be a mapping" % mw)
    bad = sorted(set(m) - _MAP_KEYS)
    if bad:
        raise ManifestError("%s: unknown field(s) %s" % (mw, ", ".join(bad)))
    if m.get("type") not in MAP_TYPES:
        raise ManifestError("%s.type: must be one of %s, got %r" % (mw, ", ".join(MAP_TYPES), m.get("type")))
    spec = {"type": m["type"], "key_size": _int(m.get("key_size"), mw + ".key_size"),
            "value_size": _int(m.get("value_size"), mw + ".value_size"),
            "max_entries": _int(m.get("max_entries"), mw + ".max_entries", 1),
            "flags": _int(m.get("flags", 0), mw + ".flags"), "shared": m.get("shared", False),
            "version": _int(m.get("version", 1), mw + ".version", 1, 65535), "migrations": {},
            "layout": m.get("layout", "")}
    if not isinstance(spec["shared"], bool):
        raise ManifestError("%s.shared: must be true or false" % mw)
    migr = m.get("migrations") or {}
    if not isinstance(migr, dict):
        raise ManifestError("%s.migrations: must map an older version to copy or extend" % mw)
    for ver, kind in migr.items():
        try:
            v = int(ver)
        except ValueError:
            raise ManifestError("%s.migrations: %r is not a layout version" % (mw, ver))
        if not 1 <= v < spec["version"]:
            raise ManifestError("%s.migrations.%s: only older versions (1..%d) migrate to version %d"
                                % (mw, ver, spec["version"] - 1, spec["version"]))
        if kind not in MIGRATIONS:
            raise ManifestError("%s.migrations.%s: must be one of %s, got %r" % (mw, ver, ", ".join(MIGRATIONS), kind))
        spec["migrations"][v] = kind
    if spec["migrations"] and not spec["shared"]:
        raise ManifestError("%s.migrations: only shared maps carry layout versions" % mw)
    return spec


def from_probe(name, probed):
    """A manifest for an object that has none (``probed``: {programs, maps} as loaded): every map
    private, the programs with no default target (they are attached only where the caller says)."""
    maps = dict((n, {"type": i["type"], "key_size": i["key_size"], "value_size": i["value_size"],
                     "max_entries": i["max_entries"], "flags": i["flags"], "shared": False, "version": 1,
                     "migrations": {}, "layout": ""}) for n, i in probed["maps"].items() if i)
    progs = dict((n, {"attach": None, "target": None, "family": None}) for n in probed["programs"])
    return {"object": name, "description": "", "programs": progs, "maps": maps, "implicit": True}


def map_pin(root, obj_name, map_name, spec):
    """Where a map of object ``obj_name`` is pinned under the pin root."""
    if spec["shared"]:
        return os.path.join(root, GLOBALS, pin_name(map_name, spec["version"]))
    return os.path.join(root, obj_name, "maps", map_name)


def check_object(manifest, probed, where=None):
    """Differences between a manifest and the object's real programs and maps (probe()'s result):
    a list of messages, empty when they agree. Programs' attach types cannot be read back from a
    loaded program, so only their presence is compared."""
    where = where or manifest["object"]
    out = []
    for name in sorted(set(probed["programs"]) - set(manifest["programs"])):
        out.append("%s: program %s is in the object but not in the manifest" % (where, name))
    for name in sorted(set(manifest["programs"]) - set(probed["programs"])):
        out.append("%s: program %s is in the manifest but not in the object" % (where, name))
    for name in sorted(set(probed["maps"]) - set(manifest["maps"])):
        out.append("%s: map %s is in the object but not in the manifest" % (where, name))
    for name, spec in sorted(manifest["maps"].items()):
        have = probed["maps"].get(name)
        if have is None:
            out.append("%s: map %s is in the manifest but not in the object" % (where, name))
            continue
        for k in ("type", "key_size", "value_size", "max_entries", "flags"):
            if have[k] != spec[k]:
                out.append("%s: map %s %s is %r in the object, %r in the manifest" % (where, name, k, have[k], spec[k]))
    return out


def find(directory):
    """The objects of a directory that have a manifest: [(object path, manifest path)], sorted."""
    out = []
    for f in sorted(os.listdir(directory)):
        if f.endswith(SUFFIX):
            obj = os.path.join(directory, f[:-len(SUFFIX)] + ".o")
            out.append((obj, os.path.join(directory, f)))
    return out
