"""lb's byte layouts and maps against the C header (bpf/lib/lb_structs.h, lb_maps.h) and the object's
manifest (bpf/sock_lb.manifest.json); opening the pinned maps (root: a private bpffs)."""

import os
import re
import struct

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest
from ansible_collections.kldload.netstack.plugins.module_utils import lb
from ansible_collections.kldload.netstack.plugins.module_utils.flows import events
from ansible_collections.kldload.netstack.plugins.module_utils.lb import layout, pinned

from test_lb_world import MANIFEST, make_world

BPF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bpf", "lib")
S = lb.S


def _read(name):
    with open(os.path.join(BPF_DIR, name)) as f:
        return f.read()


def test_formats_equal_header_py_lines():
    found = re.findall(r"py:\s+(\w+)\s+(\S+)\s+\(size (\d+)\)", _read("lb_structs.h"))
    assert len(found) == 19
    names = [n for n, _f, _s in found]
    assert len(names) == len(set(names)), "a py: line is repeated"
    assert lb.FORMATS == dict((n, f) for n, f, _s in found)
    for name, fmt, size in found:
        assert struct.calcsize(fmt) == int(size), name
        assert lb.S[name].size == int(size), name


def test_maps_equal_the_manifest():
    """lb writes exactly the object's shared maps, with the manifest's types, sizes, flags, default sizes
    and layout versions; the private maps (reverse NAT) are the object's own and lb never opens them. The flow
    events' shared maps are flows/events.py's (test_flows.py holds them to the header)."""
    maps = manifest.load(MANIFEST)["maps"]
    shared = dict((n, m) for n, m in maps.items() if m["shared"] and n not in events.MAPS)
    assert sorted(lb.MAPS) == sorted(shared)
    assert sorted(n for n, m in maps.items() if not m["shared"]) == ["kln_lb4_revnat", "kln_lb6_revnat"]
    for name, (typ, key, val, n, flags) in lb.MAPS.items():
        m = shared[name]
        assert (m["type"], m["key_size"], m["value_size"], m["max_entries"], m["flags"]) == \
            (typ, S[key].size, S[val].size, n, flags), name
        assert m["layout"] == "%s -> %s" % (key, val), name
        assert lb.VERSIONS[name] == m["version"], name
        assert lb.pin(name) == manifest.pin_name(name, m["version"]) == "%s_v%d" % (name, m["version"])
    for name in ("kln_lb4_revnat", "kln_lb6_revnat"):
        key, val = maps[name]["layout"].split(" -> ")
        assert (maps[name]["key_size"], maps[name]["value_size"]) == (S[key].size, S[val].size), name
    assert lb.MAPS["kln_lb_maglev"][3] == 64 * 2 * lb.DEFAULT_MAGLEV_M


def _c_size(ctype):
    if ctype in ("__u32", "__be32"):
        return 4
    m = re.match(r"struct (\w+)$", ctype)
    assert m, ctype
    return struct.calcsize(lb.FORMATS[m.group(1)])


def test_maps_equal_header_maps():
    text = _read("lb_maps.h")
    defaults = dict(re.findall(r"#define\s+(\w+_MAP_SIZE)\s+(.+)", text))
    blocks = re.findall(r"struct \{(.*?)\}\s*(\w+)\s+SEC\(\"\.maps\"\);", text, re.S)
    assert sorted(n for _b, n in blocks) == sorted(list(lb.MAPS) + ["kln_lb4_revnat", "kln_lb6_revnat"])
    for body, name in blocks:
        if name not in lb.MAPS:
            continue
        typ, key, val, n, flags = lb.MAPS[name]
        assert re.search(r"__uint\(type, BPF_MAP_TYPE_(\w+)\)", body).group(1).lower() == typ, name
        assert _c_size(re.search(r"__type\(key, ([\w ]+)\)", body).group(1)) == S[key].size, name
        assert _c_size(re.search(r"__type\(value, ([\w ]+)\)", body).group(1)) == S[val].size, name
        size = re.search(r"__uint\(max_entries, (\w+)\)", body).group(1)
        expr = defaults.get(size, size)
        assert re.match(r"^[\d\s()*]+$", expr), expr
        product = 1
        for factor in re.findall(r"\d+", expr):
            product *= int(factor)
        assert product == n, name
        assert ("BPF_F_NO_PREALLOC" in body) == (flags == 1), name


def test_index_record_round_trip():
    bits = bytearray(8192)
    bits[0], bits[8191] = 1, 0x80
    idx = layout.Index(1, [1, 2, 3, 4, 5, 6], {4: 7, 6: 8}, {4: 9, 6: 10}, {4: 11, 6: 12}, bits)
    raw = idx.pack()
    assert len(raw) == S["lb_index"].size
    assert layout.Index.unpack(raw) == idx and layout.popcount(idx.service_ids) == 2


@pytest.fixture
def globals_dir(tmp_path):
    world = make_world("real")
    try:
        yield world
    finally:
        world.close()


def test_maps_open_by_pin_name_and_check_their_layout(globals_dir):
    d = globals_dir.dir
    globals_dir.real.close()
    globals_dir.real = None
    maps = pinned.Maps(d)
    try:
        assert sorted(maps.info) == sorted(lb.MAPS)
        assert maps.info["kln_lb4_svc"]["max_entries"] == 65536
    finally:
        maps.close()
    # another layout under the same pin name: refused, both layouts named
    os.unlink(os.path.join(d, "kln_lb6_backend_v1"))
    with bpfsys.map_create("hash", 4, 24, 16, bpfsys.F_NO_PREALLOC, "kln_lb6_backend") as fd:
        bpfsys.obj_pin(fd, os.path.join(d, "kln_lb6_backend_v1"))
    with pytest.raises(lb.LbError, match=r"kln_lb6_backend_v1 is hash key 4 value 24, not the layout .* \(hash key 4 "
                                         r"value 20\)"):
        pinned.Maps(d)
    os.unlink(os.path.join(d, "kln_lb6_backend_v1"))
    with pytest.raises(lb.LbError, match=r"map kln_lb6_backend is not pinned in .* \(as kln_lb6_backend_v1\)"):
        lb.sync(d, [])
    with pytest.raises(lb.LbError, match="not pinned"):
        lb.table(d)
