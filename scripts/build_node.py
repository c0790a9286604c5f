"""Build the node-side unit: build/node/netstack.pyz, one executable zipapp holding the node
command, every module_utils file (the whole plugins/module_utils tree: nothing is listed by hand)
and every compiled eBPF object with its manifest (netstack_objects/). Run by `make node`; the
dataplane role copies this one file to the node, and the node_dataplane module and
`netstack dataplane restore` load the objects from it.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "build", "node")
PKG = "ansible_collections/kldload/netstack/plugins/module_utils"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def collection_version():
    with open(os.path.join(REPO, "galaxy.yml")) as f:
        return re.search(r"^version:\s*(\S+)", f.read(), re.M).group(1)


def commit():
    p = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    return p.stdout.strip() or None


def _zipapp(src, path):
    """An executable zip (shebang + archive) whose bytes depend only on its contents: sorted entries,
    fixed timestamps; so an unchanged build installs as "no change"."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"#!/usr/bin/python3\n")
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for d, dirs, files in os.walk(src):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(d, name)
                    zi = zipfile.ZipInfo(os.path.relpath(full, src), date_time=(1980, 1, 1, 0, 0, 0))
                    zi.external_attr = 0o644 << 16
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    with open(full, "rb") as fh:
                        z.writestr(zi, fh.read())
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)


def _bump_layout(manifest_path, name):
    """Test builds (--layout-bump): the shared map ``name`` one layout version up, migrated by copy."""
    with open(manifest_path) as f:
        m = json.load(f)
    spec = m.get("maps", {}).get(name)
    if not spec:
        return False
    old = int(spec.get("version", 1))
    spec["version"] = old + 1
    spec.setdefault("migrations", {})[str(old)] = "copy"
    with open(manifest_path, "w") as f:
        json.dump(m, f, indent=1, sort_keys=True)
    return True


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--out", default=OUT, help="output directory (default build/node)")
    ap.add_argument("--layout-bump", metavar="MAP", action="append", default=[],
                    help="test builds: a shared map's layout version one up with a copy migration")
    args = ap.parse_args()
    out_dir = os.path.abspath(args.out)
    bpf_build = os.path.join(REPO, "bpf", "build")
    objects = sorted(f[:-len(".manifest.json")] for f in os.listdir(bpf_build) if f.endswith(".manifest.json"))
    if not objects:
        sys.exit("build_node: no objects in bpf/build (run make -C bpf)")
    tmp = tempfile.mkdtemp(prefix="netstack-node-")
    try:
        src = os.path.join(tmp, "src")
        dst = os.path.join(src, PKG)
        shutil.copytree(os.path.join(REPO, "plugins", "module_utils"), dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        d = src
        for part in PKG.split("/"):       # plain packages: zipimport does not find namespace packages
            d = os.path.join(d, part)
            init = os.path.join(d, "__init__.py")
            if not os.path.exists(init):
                open(init, "w").close()
        shutil.copy(os.path.join(REPO, "node", "netstack_cli.py"), src)
        info = {"collection": collection_version(), "commit": commit(),
                "objects": dict((n, sha256(os.path.join(bpf_build, n + ".o"))) for n in objects)}
        with open(os.path.join(src, "netstack_build.json"), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        with open(os.path.join(src, "__main__.py"), "w") as f:
            f.write("from netstack_cli import main\nmain()\n")
        os.makedirs(os.path.join(src, "netstack_objects"))
        for n in objects:
            for suffix in (".o", ".manifest.json"):
                shutil.copy(os.path.join(bpf_build, n + suffix), os.path.join(src, "netstack_objects", n + suffix))
        for name in args.layout_bump:
            hits = [n for n in objects if _bump_layout(os.path.join(src, "netstack_objects", n + ".manifest.json"), name)]
            if not hits:
                sys.exit("build_node: --layout-bump %s: no object declares that map" % name)
        if args.layout_bump:
            info["layout_bump"] = sorted(args.layout_bump)
            with open(os.path.join(src, "netstack_build.json"), "w") as f:
                json.dump(info, f, indent=1, sort_keys=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        _zipapp(src, os.path.join(out_dir, "netstack.pyz"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("build_node: %s (collection %s, objects %s%s)" % (os.path.relpath(out_dir, REPO), info["collection"],
                                                            ", ".join(objects), "; layout bump %s" % ", ".join(
                                                                args.layout_bump) if args.layout_bump else ""))


if __name__ == "__main__":
    main()
