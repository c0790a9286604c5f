"""A thin command line over the collection's own loader and map writer, for bpf/selftest.sh and
`make -C bpf verify` on a development machine. It adds no loading or encoding of its own: every
command calls plugins/module_utils (loader.py, manifest.py, lb/) - the code the modules and the
node command run.

  python3 lbctl.py layout                      struct name, Python format, size (the header's py: lines)
  python3 lbctl.py verify DIR [DIR ...]        every object with a manifest in DIR: verifier + manifest check
  python3 lbctl.py load ROOT SPEC.json         loader.ensure(): SPEC {"objects": [{name, object, targets|attach, maps}]}
  python3 lbctl.py unload ROOT                 loader.ensure(state=absent) of everything under ROOT
  python3 lbctl.py sync MAPDIR SERVICES.json [MAGLEV_M]   lb.sync() of a whole service table
  python3 lbctl.py report ROOT                 what is pinned under ROOT (JSON)
"""
import json
import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "..", "lib", "lb_structs.h")
# .collections/ is made by scripts/setup.sh: the repository as ansible_collections.kldload.netstack
sys.path.insert(0, os.path.join(HERE, "..", "..", ".collections"))
from ansible_collections.kldload.netstack.plugins.module_utils import lb, loader, manifest  # noqa: E402


def load_layout(path=HEADER):
    """{name: (struct.Struct, declared size)} from the header's py: lines."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for m in re.finditer(r"py:\s+(\w+)\s+(\S+)\s+\(size (\d+)\)", f.read()):
            st = struct.Struct(m.group(2))
            if st.size != int(m.group(3)):
                raise SystemExit(f"{m.group(1)}: format {m.group(2)} is {st.size} bytes, header says {m.group(3)}")
            out[m.group(1)] = st
    return out


def verify(dirs):
    fails = 0
    for d in dirs:
        for obj, _mpath in manifest.find(d):
            try:
                spec = loader.object_spec(os.path.basename(obj)[:-2], obj)
                probed = loader._probe_checked(spec, None)  # pylint: disable=protected-access
            except (loader.ProgError, manifest.ManifestError) as e:
                print(f"FAIL: {obj}: {e}")
                fails += 1
                continue
            print(f"PASS: {os.path.relpath(obj)}: {len(probed['programs'])} programs pass the verifier, "
                  f"{len(probed['maps'])} maps as its manifest declares")
    return fails


def load(root, spec_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    objects = [loader.object_spec(o["name"], o["object"], attach=o.get("attach"), targets=o.get("targets"),
                                  map_sizes=o.get("maps")) for o in spec["objects"]]
    res = loader.ensure(root, objects, prune=spec.get("prune", False))
    print(json.dumps({"changed": res["changed"], "actions": res["actions"]}, indent=1))


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "layout" and not args:
            for name, st in load_layout().items():
                print(name, st.format, st.size)
        elif cmd == "verify" and args:
            return min(verify(args), 100)
        elif cmd == "load" and len(args) == 2:
            load(*args)
        elif cmd == "unload" and len(args) == 1:
            print(json.dumps(loader.ensure(args[0], [], state="absent", prune=True)["actions"]))
        elif cmd == "sync" and len(args) in (2, 3):
            with open(args[1], encoding="utf-8") as f:
                services = json.load(f)
            m = int(args[2]) if len(args) == 3 else lb.DEFAULT_MAGLEV_M
            res = lb.sync(args[0], services, maglev_m=m)
            print(json.dumps({"changed": res["changed"], "stats": res["stats"]}))
        elif cmd == "report" and len(args) == 1:
            print(json.dumps(loader.report(args[0]), indent=1, sort_keys=True))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (loader.ProgError, lb.LbError, OSError) as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
