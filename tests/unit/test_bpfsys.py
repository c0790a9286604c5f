"""bpfsys: the constants against the kernel's UAPI header, and real bpf(2) calls on a private bpffs."""

import errno
import os
import re
import struct
import subprocess
import tempfile

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys

HEADER = "/usr/include/linux/bpf.h"
CMDS = ["MAP_CREATE", "MAP_LOOKUP_ELEM", "MAP_UPDATE_ELEM", "MAP_DELETE_ELEM", "MAP_GET_NEXT_KEY", "OBJ_PIN",
        "OBJ_GET", "PROG_ATTACH", "PROG_DETACH", "PROG_TEST_RUN", "PROG_GET_FD_BY_ID", "MAP_GET_FD_BY_ID", "OBJ_GET_INFO_BY_FD",
        "PROG_QUERY", "MAP_LOOKUP_BATCH", "MAP_UPDATE_BATCH", "MAP_DELETE_BATCH", "LINK_CREATE", "LINK_UPDATE",
        "LINK_GET_FD_BY_ID", "LINK_DETACH"]


def parse_enum(text, name):
    """{enumerator: value} of ``enum NAME {...}`` in C source (comments, '= value' and '= OTHER' handled)."""
    m = re.search(r"^enum %s \{(.*?)^\};" % re.escape(name), text, re.S | re.M)
    assert m, "enum %s not found" % name
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    body = re.sub(r"//[^\n]*", "", body)
    body = "\n".join(ln for ln in body.splitlines() if not ln.strip().startswith("#"))
    values = {}
    nxt = 0
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            ident, expr = [x.strip() for x in item.split("=", 1)]
            expr = expr.strip("()").strip()
            if re.match(r"^-?(0x[0-9a-fA-F]+|\d+)[uUlL]*$", expr):
                value = int(expr.rstrip("uUlL"), 0)
            else:
                assert expr in values, "cannot evaluate %s = %s" % (ident, expr)
                value = values[expr]
        else:
            ident, value = item, nxt
        assert re.match(r"^\w+$", ident), ident
        values[ident] = value
        nxt = value + 1
    return values


def test_parse_enum_handles_c_syntax():
    text = ("enum x {\n\tA, /* c, d */\n\tB = 5,\n\t// e,\n\tC,\n\tD = B,\n#define Y 1\n\tE,\n\tF = 0x10,\n"
            "\t__MAX_X\n};\n")
    assert parse_enum(text, "x") == {"A": 0, "B": 5, "C": 6, "D": 5, "E": 6, "F": 16, "__MAX_X": 17}


@pytest.fixture(scope="module")
def header():
    if not os.path.exists(HEADER):
        pytest.skip("%s not installed" % HEADER)
    with open(HEADER) as f:
        return f.read()


def test_commands_match_header(header):
    enum = parse_enum(header, "bpf_cmd")
    assert enum["BPF_MAP_CREATE"] == 0 and len(enum) > 30, "the parser found %d commands" % len(enum)
    for name in CMDS:
        assert getattr(bpfsys, name) == enum["BPF_" + name], name
    # the error messages name the command: the reverse table must not be shadowed by other constants
    for name in CMDS:
        assert bpfsys._CMD_NAMES[getattr(bpfsys, name)] == name


def test_attach_types_match_header(header):
    enum = parse_enum(header, "bpf_attach_type")
    checked = 0
    for name, value in bpfsys.ATTACH_TYPES.items():
        hname = "BPF_" + name.upper()
        if hname in enum:  # an older header may lack the newest (tcx)
            assert value == enum[hname], name
            checked += 1
    assert checked >= 20, "only %d attach types found in %s" % (checked, HEADER)
    assert bpfsys.ATTACH_TYPE_NAMES[enum["BPF_CGROUP_INET4_CONNECT"]] == "cgroup_inet4_connect"
    for alias, target in bpfsys.ATTACH_ALIASES.items():
        assert target in bpfsys.ATTACH_TYPES, alias
        assert alias not in bpfsys.ATTACH_TYPES, alias


def test_map_and_prog_types_match_header(header):
    maps = parse_enum(header, "bpf_map_type")
    for name, value in bpfsys.MAP_TYPES.items():
        assert value == maps["BPF_MAP_TYPE_" + name.upper()], name
    assert bpfsys.MAP_TYPE_NAMES[maps["BPF_MAP_TYPE_LRU_HASH"]] == "lru_hash"
    progs = parse_enum(header, "bpf_prog_type")
    for value, name in bpfsys.PROG_TYPE_NAMES.items():
        assert value == progs["BPF_PROG_TYPE_" + name.upper()], name


def test_link_types_and_flags_match_header(header):
    links = parse_enum(header, "bpf_link_type")
    assert bpfsys.LINK_TYPE_CGROUP == links["BPF_LINK_TYPE_CGROUP"]
    assert bpfsys.LINK_TYPE_XDP == links["BPF_LINK_TYPE_XDP"]
    if "BPF_LINK_TYPE_TCX" in links:
        assert bpfsys.LINK_TYPE_TCX == links["BPF_LINK_TYPE_TCX"]
    pattern = r"\b(BPF_F_NO_PREALLOC|BPF_F_REPLACE)\b\s*=?\s*\(1U\s*<<\s*(\d+)\)"
    flags = dict((n, 1 << int(s)) for n, s in re.findall(pattern, header))
    assert flags == {"BPF_F_NO_PREALLOC": bpfsys.F_NO_PREALLOC, "BPF_F_REPLACE": bpfsys.F_REPLACE}


def test_xdp_flags_match_header():
    path = "/usr/include/linux/if_link.h"
    if not os.path.exists(path):
        pytest.skip("%s not installed" % path)
    with open(path) as f:
        pattern = r"#define\s+XDP_FLAGS_(\w+)_MODE\s+\(1U\s*<<\s*(\d+)\)"
        found = dict((n, 1 << int(s)) for n, s in re.findall(pattern, f.read()))
    assert found == {"SKB": bpfsys.XDP_FLAGS["generic"], "DRV": bpfsys.XDP_FLAGS["native"],
                     "HW": bpfsys.XDP_FLAGS["offload"]}
    assert bpfsys.XDP_FLAGS["auto"] == 0


# ---- real system calls --------------------------------------------------------------------------

@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def bpffs(root_only):
    """A private bpffs mounted under /run (no '.' anywhere: bpffs refuses dots in names)."""
    d = tempfile.mkdtemp(prefix="bpfsys_test_", dir="/run" if os.path.isdir("/run") else None)
    assert "." not in d
    p = subprocess.run(["mount", "-t", "bpf", "bpf", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if p.returncode != 0:
        os.rmdir(d)
        pytest.skip("cannot mount bpffs: %s" % p.stderr.decode().strip())
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


def _key(i):
    return struct.pack("=I", i)


def _val(i):
    return struct.pack("=Q", i * 1000003 + 7)


@pytest.fixture
def hmap(root_only):
    try:
        fd = bpfsys.map_create("hash", 4, 8, 1000, bpfsys.F_NO_PREALLOC, "t")
    except bpfsys.BpfError as e:
        pytest.skip("bpf(2) not usable here: %s" % e)
    with fd:
        yield fd


def test_map_info(hmap):
    info = bpfsys.map_info(hmap)
    assert info["id"] > 0
    assert dict((k, v) for k, v in info.items() if k != "id") == {
        "type": "hash", "type_id": 1, "key_size": 4, "value_size": 8, "max_entries": 1000, "flags": 1, "name": "t"}


def test_batch_update_dump_delete(hmap):
    items = [(_key(i), _val(i)) for i in range(1, 501)]
    assert bpfsys.map_update_batch(hmap, items, 4, 8) >= 1
    got = bpfsys.map_dump(hmap, 4, 8, 1000)
    assert sorted(got) == sorted(items)
    # several batches
    assert sorted(bpfsys.map_dump(hmap, 4, 8, 1000, chunk=32)) == sorted(items)
    # the element-by-element fallback reads the same
    assert sorted(bpfsys._map_dump_iter(hmap, 4, 8)) == sorted(items)

    gone = [_key(i) for i in range(1, 201)]
    bpfsys.map_delete_batch(hmap, gone, 4)
    got = bpfsys.map_dump(hmap, 4, 8, 1000)
    assert len(got) == 300
    assert sorted(got) == sorted(items[200:])
    assert bpfsys.map_lookup(hmap, _key(1), 8) is None
    assert bpfsys.map_lookup(hmap, _key(200), 8) is None
    assert bpfsys.map_lookup(hmap, _key(201), 8) == _val(201)

    # a batch with a key that is not there still deletes the others
    bpfsys.map_delete_batch(hmap, [_key(201), _key(5), _key(202)], 4)
    assert bpfsys.map_lookup(hmap, _key(201), 8) is None and bpfsys.map_lookup(hmap, _key(202), 8) is None
    assert len(bpfsys.map_dump(hmap, 4, 8, 1000)) == 298


def test_single_element_ops(hmap):
    assert bpfsys.map_lookup(hmap, _key(9), 8) is None
    bpfsys.map_update(hmap, _key(9), _val(9))
    assert bpfsys.map_lookup(hmap, _key(9), 8) == _val(9)
    bpfsys.map_update(hmap, _key(9), _val(10))
    assert bpfsys.map_lookup(hmap, _key(9), 8) == _val(10)
    assert bpfsys.map_delete(hmap, _key(9)) is True
    assert bpfsys.map_delete(hmap, _key(9)) is False
    assert bpfsys.map_dump(hmap, 4, 8, 1000) == []


def test_full_map_raises_e2big(root_only):
    with bpfsys.map_create("hash", 4, 8, 4, bpfsys.F_NO_PREALLOC, "small") as fd:
        bpfsys.map_update_batch(fd, [(_key(i), _val(i)) for i in range(4)], 4, 8)
        with pytest.raises(bpfsys.BpfError) as ei:
            bpfsys.map_update_batch(fd, [(_key(9), _val(9))], 4, 8)
        assert ei.value.errno == errno.E2BIG and "MAP_UPDATE_BATCH" in str(ei.value)
        # an existing key can still be replaced in a full map
        bpfsys.map_update_batch(fd, [(_key(0), _val(42))], 4, 8)
        assert bpfsys.map_lookup(fd, _key(0), 8) == _val(42)


def test_array_map(root_only):
    with bpfsys.map_create("array", 4, 4, 16, 0, "arr") as fd:
        bpfsys.map_update_batch(fd, [(_key(i), _key(i * 3)) for i in range(16)], 4, 4)
        assert bpfsys.map_lookup(fd, _key(5), 4) == _key(15)
        assert sorted(bpfsys.map_dump(fd, 4, 4, 16)) == sorted((_key(i), _key(i * 3)) for i in range(16))
        assert bpfsys.map_info(fd)["type"] == "array"


def test_pin_and_pinned_info(hmap, bpffs):
    path = os.path.join(bpffs, "m")
    bpfsys.obj_pin(hmap, path)
    kind, info = bpfsys.pinned_info(path)
    assert kind == "map"
    assert info == bpfsys.map_info(hmap)
    bpfsys.map_update(hmap, _key(3), _val(3))
    with bpfsys.obj_get(path) as fd2:
        assert fd2 != hmap
        assert bpfsys.map_lookup(fd2, _key(3), 8) == _val(3)
    with pytest.raises(bpfsys.BpfError) as ei:
        bpfsys.obj_pin(hmap, path)
    assert ei.value.errno == errno.EEXIST and "OBJ_PIN" in str(ei.value) and path in str(ei.value)


def test_bpffs_refuses_dots(hmap, bpffs):
    with pytest.raises(bpfsys.BpfError) as ei:
        bpfsys.obj_pin(hmap, os.path.join(bpffs, "a.b"))
    assert "OBJ_PIN" in str(ei.value)
    assert "a.b" not in os.listdir(bpffs)  # (a fresh bpffs may hold the kernel's maps.debug / progs.debug)


def test_error_names_command(bpffs):
    missing = os.path.join(bpffs, "nothing_here")
    with pytest.raises(bpfsys.BpfError) as ei:
        bpfsys.obj_get(missing)
    assert ei.value.errno == errno.ENOENT
    assert ei.value.cmd == bpfsys.OBJ_GET
    assert "OBJ_GET" in str(ei.value) and missing in str(ei.value)
    assert isinstance(ei.value, OSError)


def test_error_message_without_syscall():
    e = bpfsys.BpfError(bpfsys.MAP_UPDATE_BATCH, errno.E2BIG, "x")
    assert str(e) == "[Errno %d] bpf(MAP_UPDATE_BATCH) x: %s" % (errno.E2BIG, os.strerror(errno.E2BIG))
    assert "bpf(999)" in str(bpfsys.BpfError(999, errno.EINVAL))


def test_fd_closes_on_exit(root_only):
    with bpfsys.map_create("hash", 4, 8, 8, bpfsys.F_NO_PREALLOC, "c") as fd:
        assert os.path.exists("/proc/self/fd/%d" % fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_raw_batch_update_and_dump(hmap):
    keys = b"".join(_key(i) for i in range(1, 701))
    values = b"".join(_val(i) for i in range(1, 701))
    assert bpfsys.map_update_batch_raw(hmap, keys, values, 4, 8, chunk=256) == 3
    k, v, n = bpfsys.map_dump_raw(hmap, 4, 8, 1000)
    assert n == 700 and len(k) == 700 * 4 and len(v) == 700 * 8
    got = dict(zip(struct.iter_unpack("=I", k), struct.iter_unpack("=Q", v)))
    assert got == dict(((i,), (i * 1000003 + 7,)) for i in range(1, 701))
    # in several batches, and the pairs map_dump gives are the same entries
    assert sorted(zip(struct.iter_unpack("=I", bpfsys.map_dump_raw(hmap, 4, 8, 1000, chunk=64)[0]),
                      struct.iter_unpack("=Q", bpfsys.map_dump_raw(hmap, 4, 8, 1000, chunk=64)[1]))) == sorted(got.items())
    assert sorted(bpfsys.map_dump(hmap, 4, 8, 1000)) == sorted((_key(i), _val(i)) for i in range(1, 701))
    with pytest.raises(ValueError, match="not whole entries"):
        bpfsys.map_update_batch_raw(hmap, keys[:-1], values, 4, 8)
    assert bpfsys.map_update_batch_raw(hmap, b"", b"", 4, 8) == 0


def test_raw_dump_of_an_empty_map_and_an_array(root_only):
    with bpfsys.map_create("hash", 4, 8, 16, bpfsys.F_NO_PREALLOC, "e") as fd:
        assert bpfsys.map_dump_raw(fd, 4, 8, 16) == (b"", b"", 0)
    with bpfsys.map_create("array", 4, 4, 8, 0, "a") as fd:
        bpfsys.map_update_batch_raw(fd, b"".join(_key(i) for i in range(8)), b"".join(_key(i * 5) for i in range(8)), 4, 4)
        k, v, n = bpfsys.map_dump_raw(fd, 4, 4, 8)
        assert n == 8 and dict(zip(struct.iter_unpack("=I", k), struct.iter_unpack("=I", v))) == \
            dict(((i,), (i * 5,)) for i in range(8))
