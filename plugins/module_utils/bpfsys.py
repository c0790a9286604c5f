# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The bpf(2) system call through ctypes: pinned objects, maps (batched), programs, links.

Only what the collection needs, with the UAPI layouts of ``union bpf_attr`` and the info structs
written out once below (offsets from include/uapi/linux/bpf.h). No Ansible imports: the node-side
``netstack`` command uses this module too.

Every call raises ``BpfError`` (an OSError with the command name) on failure. File descriptors are
plain ints; ``Fd`` closes one on ``with`` exit.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import ctypes.util
import errno
import os
import platform
import struct

# bpf(2) syscall numbers per machine
_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
               "riscv64": 280, "i686": 357, "i386": 357}

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_TEST_RUN = 10
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34

_CMD_NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int) and not k.startswith("_")}

# enum bpf_map_type (the ones we name)
MAP_TYPES = {"hash": 1, "array": 2, "percpu_hash": 5, "percpu_array": 6, "lru_hash": 9,
             "lru_percpu_hash": 10, "lpm_trie": 11, "ringbuf": 27}
MAP_TYPE_NAMES = {v: k for k, v in MAP_TYPES.items()}

# enum bpf_prog_type (for reporting)
PROG_TYPE_NAMES = {3: "sched_cls", 4: "sched_act", 6: "xdp", 8: "cgroup_skb", 9: "cgroup_sock",
                   18: "cgroup_sock_addr", 13: "sock_ops", 15: "cgroup_device"}

# enum bpf_attach_type: user-facing name -> number. Aliases follow bpftool's cgroup names.
ATTACH_TYPES = {
    "cgroup_inet_ingress": 0, "cgroup_inet_egress": 1, "cgroup_inet_sock_create": 2,
    "cgroup_sock_ops": 3, "cgroup_inet4_bind": 8, "cgroup_inet6_bind": 9,
    "cgroup_inet4_connect": 10, "cgroup_inet6_connect": 11,
    "cgroup_inet4_post_bind": 12, "cgroup_inet6_post_bind": 13,
    "cgroup_udp4_sendmsg": 14, "cgroup_udp6_sendmsg": 15,
    "cgroup_udp4_recvmsg": 19, "cgroup_udp6_recvmsg": 20,
    "cgroup_inet4_getpeername": 29, "cgroup_inet6_getpeername": 30,
    "cgroup_inet4_getsockname": 31, "cgroup_inet6_getsockname": 32,
    "cgroup_inet_sock_release": 34,
    "xdp": 37, "tcx_ingress": 46, "tcx_egress": 47,
}
ATTACH_ALIASES = {
    "ingress": "cgroup_inet_ingress", "egress": "cgroup_inet_egress", "sock_create": "cgroup_inet_sock_create",
    "sock_ops": "cgroup_sock_ops", "bind4": "cgroup_inet4_bind", "bind6": "cgroup_inet6_bind",
    "connect4": "cgroup_inet4_connect", "connect6": "cgroup_inet6_connect",
    "post_bind4": "cgroup_inet4_post_bind", "post_bind6": "cgroup_inet6_post_bind",
    "sendmsg4": "cgroup_udp4_sendmsg", "sendmsg6": "cgroup_udp6_sendmsg",
    "recvmsg4": "cgroup_udp4_recvmsg", "recvmsg6": "cgroup_udp6_recvmsg",
    "getpeername4": "cgroup_inet4_getpeername", "getpeername6": "cgroup_inet6_getpeername",
    "getsockname4": "cgroup_inet4_getsockname", "getsockname6": "cgroup_inet6_getsockname",
    "sock_release": "cgroup_inet_sock_release", "tc_ingress": "tcx_ingress", "tc_egress": "tcx_egress",
}
ATTACH_TYPE_NAMES = {v: k for k, v in ATTACH_TYPES.items()}

# enum bpf_link_type
LINK_TYPE_CGROUP = 3
LINK_TYPE_XDP = 6
LINK_TYPE_TCX = 11

# flags
F_NO_PREALLOC = 1
F_REPLACE = 4           # BPF_F_REPLACE (link update: old_prog_fd must match)
F_BEFORE = 8            # BPF_F_BEFORE (tcx link create: before the program named, or before all of them)
F_ID = 32               # BPF_F_ID (tcx link create: the relative program is named by its id)
XDP_FLAGS = {"auto": 0, "generic": 2, "native": 4, "offload": 8}

_ATTR_SIZE = 144         # >= every layout we use; the kernel zero-checks any tail beyond its own size

_libc = None


class BpfError(OSError):
    """A bpf(2) command failed."""

    def __init__(self, cmd, err, what=""):
        name = _CMD_NAMES.get(cmd, str(cmd))
        msg = "bpf(%s)%s: %s" % (name, " " + what if what else "", os.strerror(err))
        super(BpfError, self).__init__(err, msg)
        self.cmd = cmd


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def sys_bpf(cmd, attr, what=""):
    """Call bpf(cmd, attr). ``attr`` is a ctypes buffer of at least _ATTR_SIZE bytes."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfError(cmd, errno.ENOSYS, "(unsupported machine %s)" % platform.machine())
    libc = _syscall()
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(_ATTR_SIZE))
    if ret < 0:
        raise BpfError(cmd, ctypes.get_errno(), what)
    return ret


def _attr(*fields):
    """Build a zeroed bpf_attr buffer and pack (offset, format, value) fields into it."""
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    for off, fmt, val in fields:
        struct.pack_into("=" + fmt, buf, off, val)
    return buf


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


class Fd(int):
    """A file descriptor that closes itself when used as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self)
        return False


# ---- pinning ----------------------------------------------------------------------------------

def obj_get(path, read_only=False):
    """fd of the object pinned at ``path`` (BPF_OBJ_GET)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    flags = 1 if read_only else 0  # BPF_F_RDONLY
    return Fd(sys_bpf(OBJ_GET, _attr((0, "Q", _addr(p)), (12, "I", flags)), path))


def obj_pin(fd, path):
    p = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(OBJ_PIN, _attr((0, "Q", _addr(p)), (8, "I", fd)), path)


# ---- info -------------------------------------------------------------------------------------

def _info(fd, size=256):
    buf = ctypes.create_string_buffer(size)
    sys_bpf(OBJ_GET_INFO_BY_FD, _attr((0, "I", fd), (4, "I", size), (8, "Q", _addr(buf))))
    return buf.raw


def _cstr(raw):
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def map_info(fd):
    """{type, id, key_size, value_size, max_entries, flags, name} of a map fd."""
    raw = _info(fd, 96)
    typ, mid, ks, vs, n, flags = struct.unpack_from("=6I", raw, 0)
    return {"type": MAP_TYPE_NAMES.get(typ, str(typ)), "type_id": typ, "id": mid, "key_size": ks,
            "value_size": vs, "max_entries": n, "flags": flags, "name": _cstr(raw[24:40])}


def prog_info(fd):
    """{type, id, tag, name} of a program fd."""
    raw = _info(fd, 232)
    typ, pid = struct.unpack_from("=2I", raw, 0)
    nr_maps = struct.unpack_from("=I", raw, 52)[0]
    map_ids = []
    if nr_maps:
        ids = (ctypes.c_uint32 * nr_maps)()
        buf = ctypes.create_string_buffer(232)
        struct.pack_into("=IQ", buf, 52, nr_maps, ctypes.addressof(ids))
        sys_bpf(OBJ_GET_INFO_BY_FD, _attr((0, "I", fd), (4, "I", 232), (8, "Q", _addr(buf))))
        map_ids = list(ids[:nr_maps])
    return {"type": PROG_TYPE_NAMES.get(typ, str(typ)), "type_id": typ, "id": pid,
            "tag": raw[8:16].hex(), "name": _cstr(raw[64:80]), "map_ids": map_ids}


def link_info(fd):
    """{type_id, id, prog_id, target} where target is {cgroup_id, attach_type} or {ifindex[, attach_type]}."""
    raw = _info(fd, 96)
    typ, lid, prog_id = struct.unpack_from("=3I", raw, 0)
    out = {"type_id": typ, "id": lid, "prog_id": prog_id}
    if typ == LINK_TYPE_CGROUP:
        cg_id, at = struct.unpack_from("=QI", raw, 16)
        out.update(cgroup_id=cg_id, attach_type=ATTACH_TYPE_NAMES.get(at, str(at)))
    elif typ == LINK_TYPE_XDP:
        out.update(ifindex=struct.unpack_from("=I", raw, 16)[0], attach_type="xdp")
    elif typ == LINK_TYPE_TCX:
        ifindex, at = struct.unpack_from("=2I", raw, 16)
        out.update(ifindex=ifindex, attach_type=ATTACH_TYPE_NAMES.get(at, str(at)))
    return out


def pinned_info(path):
    """Info of whatever is pinned at ``path``: ("map"|"prog"|"link", info), or (None, None)."""
    with obj_get(path) as fd:
        kind = _fd_kind(fd)
        if kind == "map":
            return kind, map_info(fd)
        if kind == "prog":
            return kind, prog_info(fd)
        if kind == "link":
            return kind, link_info(fd)
    return None, None


def _fd_kind(fd):
    target = os.readlink("/proc/self/fd/%d" % fd)  # anon_inode:bpf-map / bpf-prog / bpf_link
    if "bpf-map" in target:
        return "map"
    if "bpf-prog" in target:
        return "prog"
    if "bpf_link" in target or "bpf-link" in target:
        return "link"
    return None


# ---- maps -------------------------------------------------------------------------------------

def possible_cpus():
    """The number of possible CPUs: a per-CPU map's value holds one slot for each."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except (IOError, OSError):
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _sep, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def percpu_value_size(value_size):
    """The buffer a lookup or dump of a per-CPU map fills: each CPU's value rounded up to 8 bytes."""
    return (value_size + 7) // 8 * 8 * possible_cpus()


def map_create(map_type, key_size, value_size, max_entries, flags=0, name=""):
    typ = MAP_TYPES[map_type] if not isinstance(map_type, int) else map_type
    nm = name.encode("ascii")[:15]
    fd = sys_bpf(MAP_CREATE, _attr((0, "I", typ), (4, "I", key_size), (8, "I", value_size),
                                   (12, "I", max_entries), (16, "I", flags), (28, "16s", nm)),
                 "%s (%s, %d entries)" % (name, map_type, max_entries))
    return Fd(fd)


def map_lookup(fd, key, value_size):
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        sys_bpf(MAP_LOOKUP_ELEM, _attr((0, "I", fd), (8, "Q", _addr(k)), (16, "Q", _addr(v))))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd, key, value, flags=0):
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    sys_bpf(MAP_UPDATE_ELEM, _attr((0, "I", fd), (8, "Q", _addr(k)), (16, "Q", _addr(v)), (24, "Q", flags)))


def map_sync(path, key, value, check=False):
    """One entry of the pinned map at ``path`` made ``value`` when it differs (not in check mode): the value it
    had (None when absent) and whether it differed."""
    with obj_get(path) as fd:
        have = map_lookup(fd, key, len(value))
        if have == value:
            return have, False
        if not check:
            map_update(fd, key, value)
    return have, True


def map_delete(fd, key):
    """Delete one key; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        sys_bpf(MAP_DELETE_ELEM, _attr((0, "I", fd), (8, "Q", _addr(k))))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update_batch(fd, items, key_size, value_size, chunk=65536):
    """Write [(key bytes, value bytes)] with BPF_MAP_UPDATE_BATCH, in order, ``chunk`` at a time.

    Falls back to one update per element where the kernel has no batch op for the map type
    (EINVAL/ENOTSUPP before any element was written). Returns the number of bpf() calls made.
    """
    return map_update_batch_raw(fd, b"".join(k for k, _v in items), b"".join(v for _k, v in items),
                                key_size, value_size, chunk)


def map_update_batch_raw(fd, keys, values, key_size, value_size, chunk=65536):
    """``map_update_batch`` of entries given as two buffers: every key back to back in ``keys``, every
    value in ``values`` (what a caller that packs whole batches at once has). Returns the bpf() calls made."""
    count = len(keys) // key_size
    if len(keys) != count * key_size or len(values) != count * value_size:
        raise ValueError("map_update_batch_raw: %d key bytes and %d value bytes are not whole entries of %d + %d"
                         % (len(keys), len(values), key_size, value_size))
    calls = 0
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        kb = ctypes.create_string_buffer(keys[start * key_size:(start + n) * key_size], key_size * n)
        vb = ctypes.create_string_buffer(values[start * value_size:(start + n) * value_size], value_size * n)
        attr = _attr((16, "Q", _addr(kb)), (24, "Q", _addr(vb)), (32, "I", n), (36, "I", fd))
        try:
            sys_bpf(MAP_UPDATE_BATCH, attr)
            calls += 1
        except BpfError as e:
            done = struct.unpack_from("=I", attr, 32)[0]
            if e.errno in (errno.EINVAL, errno.ENOTSUP, 524) and done == 0:
                for i in range(n):
                    map_update(fd, kb.raw[i * key_size:(i + 1) * key_size], vb.raw[i * value_size:(i + 1) * value_size])
                    calls += 1
            else:
                raise
    return calls


def map_delete_batch(fd, keys, key_size, chunk=65536):
    """Delete keys with BPF_MAP_DELETE_BATCH (all must exist), per-element where unsupported."""
    calls = 0
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        kb = ctypes.create_string_buffer(b"".join(part), key_size * len(part))
        attr = _attr((16, "Q", _addr(kb)), (32, "I", len(part)), (36, "I", fd))
        try:
            sys_bpf(MAP_DELETE_BATCH, attr)
            calls += 1
        except BpfError as e:
            done = struct.unpack_from("=I", attr, 32)[0]
            for k in part[done:]:
                map_delete(fd, k)
                calls += 1
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524, errno.ENOENT):
                raise
    return calls


def map_dump(fd, key_size, value_size, max_entries, chunk=4096):
    """All (key, value) pairs of a hash-like map, read with BPF_MAP_LOOKUP_BATCH."""
    keys, values, count = map_dump_raw(fd, key_size, value_size, max_entries, chunk)
    return [(keys[i * key_size:(i + 1) * key_size], values[i * value_size:(i + 1) * value_size]) for i in range(count)]


def map_dump_raw(fd, key_size, value_size, max_entries, chunk=65536):
    """Every entry of a map as (keys, values, count): the keys back to back in one bytes object, the
    values likewise, read with BPF_MAP_LOOKUP_BATCH ``chunk`` entries at a time (a caller unpacks them
    with ``struct.iter_unpack``, no slice per entry). Element by element where the kernel has no batch
    lookup for the map type."""
    in_batch = ctypes.create_string_buffer(max(key_size, 8))
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    n = max(1, min(chunk, max_entries))
    kbuf = ctypes.create_string_buffer(key_size * n)
    vbuf = ctypes.create_string_buffer(value_size * n)
    kparts, vparts, count = [], [], 0
    first = True
    while True:
        attr = _attr((0, "Q", 0 if first else _addr(in_batch)), (8, "Q", _addr(out_batch)),
                     (16, "Q", _addr(kbuf)), (24, "Q", _addr(vbuf)), (32, "I", n), (36, "I", fd))
        try:
            sys_bpf(MAP_LOOKUP_BATCH, attr)
            end = False
        except BpfError as e:
            if e.errno == errno.ENOENT:
                end = True
            elif e.errno in (errno.EINVAL, errno.ENOTSUP, 524) and first:
                pairs = _map_dump_iter(fd, key_size, value_size)
                return b"".join(k for k, _v in pairs), b"".join(v for _k, v in pairs), len(pairs)
            else:
                raise
        got = struct.unpack_from("=I", attr, 32)[0]
        kparts.append(ctypes.string_at(kbuf, got * key_size))
        vparts.append(ctypes.string_at(vbuf, got * value_size))
        count += got
        if end:
            return b"".join(kparts), b"".join(vparts), count
        ctypes.memmove(in_batch, out_batch, len(out_batch))
        first = False


def _map_dump_iter(fd, key_size, value_size):
    out = []
    key = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        kbuf = ctypes.create_string_buffer(key, key_size) if key is not None else None
        try:
            sys_bpf(MAP_GET_NEXT_KEY, _attr((0, "I", fd), (8, "Q", _addr(kbuf)), (16, "Q", _addr(nxt))))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return out
            raise
        key = nxt.raw
        val = map_lookup(fd, key, value_size)
        if val is not None:
            out.append((key, val))


# ---- programs and links -----------------------------------------------------------------------

SKB_CTX_SIZE = 192          # sizeof(struct __sk_buff)
SKB_CTX_MARK = 8            # offsets of the fields a test run takes from and gives back in ctx
SKB_CTX_IFINDEX = 40


def prog_test_run(prog_fd, data, data_out_size=None, repeat=1, ctx=None):
    """BPF_PROG_TEST_RUN of a packet: (return value, packet afterwards), or with ``ctx`` (a struct __sk_buff
    as bytes: mark, ifindex, ... - what the kernel lets a test set) (return value, packet, ctx afterwards)."""
    din = ctypes.create_string_buffer(data, len(data))
    size = data_out_size or len(data) + 256
    dout = ctypes.create_string_buffer(size)
    fields = [(0, "I", prog_fd), (8, "I", len(data)), (12, "I", size), (16, "Q", _addr(din)),
              (24, "Q", _addr(dout)), (32, "I", repeat)]
    if ctx is not None:
        cin = ctypes.create_string_buffer(ctx, len(ctx))
        cout = ctypes.create_string_buffer(len(ctx))
        fields += [(40, "I", len(ctx)), (44, "I", len(ctx)), (48, "Q", _addr(cin)), (56, "Q", _addr(cout))]
    attr = _attr(*fields)
    sys_bpf(PROG_TEST_RUN, attr, "test run")
    retval, out_size = struct.unpack_from("=II", attr, 4)
    if ctx is not None:
        return retval, dout.raw[:out_size], cout.raw
    return retval, dout.raw[:out_size]


def link_create(prog_fd, target, attach_type, flags=0, relative=0):
    """BPF_LINK_CREATE. ``target``: a cgroup directory fd or an ifindex (XDP, tcx); ``relative``: for tcx with
    F_BEFORE | F_ID, the id of the program to go in front of."""
    at = ATTACH_TYPES[attach_type] if not isinstance(attach_type, int) else attach_type
    return Fd(sys_bpf(LINK_CREATE, _attr((0, "I", prog_fd), (4, "I", target), (8, "I", at), (12, "I", flags),
                                         (16, "I", relative)), str(attach_type)))


def link_update(link_fd, new_prog_fd, old_prog_fd=None):
    """Swap the program of a link atomically; with ``old_prog_fd`` only if it is still that one."""
    fields = [(0, "I", link_fd), (4, "I", new_prog_fd)]
    if old_prog_fd is not None:
        fields += [(8, "I", F_REPLACE), (12, "I", old_prog_fd)]
    sys_bpf(LINK_UPDATE, _attr(*fields))


def link_detach(link_fd):
    sys_bpf(LINK_DETACH, _attr((0, "I", link_fd)))


def prog_query(target_fd, attach_type):
    """Ids of programs attached to a cgroup fd for an attach type (effective=False)."""
    at = ATTACH_TYPES[attach_type] if not isinstance(attach_type, int) else attach_type
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr((0, "I", target_fd), (4, "I", at), (16, "Q", ctypes.addressof(ids)), (24, "I", 64))
    sys_bpf(PROG_QUERY, attr)
    cnt = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:cnt])


def prog_fd_by_id(prog_id):
    return Fd(sys_bpf(PROG_GET_FD_BY_ID, _attr((0, "I", prog_id))))
