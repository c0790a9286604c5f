"""The maps lb writes, for the sync tests: in memory (FakeWorld) or real maps on a private bpffs (RealWorld).

FakeWorld replaces only the syscall layer (``lb.pinned.Maps``). It keeps one dict per map, logs every
write, enforces max_entries like the kernel (E2BIG for a new key in a full hash map) and checks, at
every single write, what a BPF program reading the maps at that moment could see: a master whose
slots / backends / Maglev half are incomplete, a deleted backend still referenced, a live slot
deleted, a live Maglev half overwritten.

RealWorld (root only) creates the maps from bpf/sock_lb.manifest.json on a private bpffs, under their
pin names; lb reads the real maps and its writes go to them (the same batched bpf() calls as in
production) while the FakeWorld mirror keeps checking every single write. Tests that change the maps
behind lb's back (``world.store[...]``) change both. At the end the real maps must hold what the
mirror holds.
"""

import errno
import ipaddress
import os
import subprocess
import tempfile

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest
from ansible_collections.kldload.netstack.plugins.module_utils import lb
from ansible_collections.kldload.netstack.plugins.module_utils.lb import pinned

S = lb.S
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bpf", "sock_lb.manifest.json")
M = 1021                                # the tests' Maglev table size (small: the fake checks every write)
REAL_MAPS = pinned.Maps                 # (the tests replace pinned.Maps)
SIZES = {"kln_lb_maglev": 8 * 2 * lb.DEFAULT_MAGLEV_M}      # 127 Maglev ids at M, 7 at the default size


class FakeWorld(object):
    """The contents of the pinned maps, the write log and the invariant checks."""

    dir = "/fake/globals"

    def __init__(self, sizes=None):
        sizes = dict(SIZES, **(sizes or {}))
        self.store = dict((n, {}) for n in lb.MAPS)
        self.info = dict((n, {"type": t, "max_entries": sizes.get(n, cap), "key_size": S[k].size,
                              "value_size": S[v].size, "flags": f, "id": 100 + i})
                         for i, (n, (t, k, v, cap, f)) in enumerate(sorted(lb.MAPS.items())))
        self.ops = []            # ("update" | "delete", map name, key) in call order
        self.violations = []
        self.missing_deletes = []
        self.opened = 0
        self.closed = 0
        self.dumps = []          # names of the maps dumped (read whole)
        self.lookups = 0
        self.locked = 0

    # -- changes behind lb's back ------------------------------------------------------------
    def resize(self, name, n):
        self.info[name]["max_entries"] = n

    def recreate(self, name):
        """The map recreated with its contents (as a loader does for a size change): a new map id."""
        self.info[name] = dict(self.info[name], id=self.info[name]["id"] + 1000)

    def check_contents(self):
        pass

    # -- views -------------------------------------------------------------------------------
    def m(self):
        raw = self.store["kln_lb_config"].get(S["lb_config_key"].pack(0))
        return S["lb_config"].unpack(raw)[0] if raw else 0

    def masters(self, fam):
        """{key fields (vip, port, proto): unpacked master} of one family."""
        out = {}
        for k, v in self.store["kln_lb%d_svc" % fam].items():
            vip, port, slot, proto = S["lb%d_key" % fam].unpack(k)
            if slot == 0:
                out[(vip, port, proto)] = S["lb_service"].unpack(v)
        return out

    def slot(self, fam, vip, port, proto, n):
        raw = self.store["kln_lb%d_svc" % fam].get(S["lb%d_key" % fam].pack(vip, port, n, proto))
        return S["lb_service"].unpack(raw) if raw else None

    def backend(self, fam, bid):
        raw = self.store["kln_lb%d_backend" % fam].get(S["lb_backend_key"].pack(bid))
        if raw is None:
            return None
        addr, port, _p, _f = S["lb%d_backend" % fam].unpack(raw)
        return str(ipaddress.ip_address(addr)), int.from_bytes(port, "big")

    def backend_ids(self, fam=4):
        """{(ip, port): id} of the backend map."""
        return dict((self.backend(fam, S["lb_backend_key"].unpack(k)[0]), S["lb_backend_key"].unpack(k)[0])
                    for k in self.store["kln_lb%d_backend" % fam])

    def maglev_half(self, sid, rev):
        base = (sid * 2 + (rev & 1)) * self.m()
        mg = self.store["kln_lb_maglev"]
        return [S["lb_maglev_val"].unpack(mg[S["lb_maglev_key"].pack(base + i)])[0]
                if S["lb_maglev_key"].pack(base + i) in mg else 0 for i in range(self.m())]

    def live_refs(self, fam):
        """Backend ids a reader can reach now: live slots and live Maglev halves."""
        refs = set()
        for (vip, port, proto), master in self.masters(fam).items():
            count, sid, alg, rev = master[1], master[2], master[3], master[7]
            for n in range(1, count + 1):
                s = self.slot(fam, vip, port, proto, n)
                if s:
                    refs.add(s[0])
            if alg == lb.ALG_MAGLEV and self.m():
                refs |= set(self.maglev_half(sid, rev))
        refs.discard(0)
        return refs

    # -- checks, as a BPF program would see the maps between two writes --------------------------
    def check_master(self, fam, vip, port, proto):
        master = self.masters(fam)[(vip, port, proto)]
        count, sid, alg, rev = master[1], master[2], master[3], master[7]
        where = "%s:%d" % (ipaddress.ip_address(vip), int.from_bytes(port, "big"))
        for n in range(1, count + 1):
            s = self.slot(fam, vip, port, proto, n)
            if s is None:
                self.violations.append("master %s committed with slot %d missing" % (where, n))
            elif self.backend(fam, s[0]) is None:
                self.violations.append("master %s committed, slot %d -> backend %d missing" % (where, n, s[0]))
        if alg == lb.ALG_MAGLEV and count:      # count 0: the program refuses before it reads the table
            if not self.m():
                self.violations.append("Maglev master %s committed before maglev_m" % where)
                return
            ids = set(self.maglev_half(sid, rev))
            if 0 in ids or any(self.backend(fam, b) is None for b in ids):
                self.violations.append("Maglev master %s committed with an incomplete table half" % where)

    def put(self, name, k, v):
        info = self.info[name]
        assert len(k) == info["key_size"] and len(v) == info["value_size"], name
        store = self.store[name]
        if info["type"] == "array":
            if S["lb_maglev_key"].unpack(k)[0] >= info["max_entries"]:
                raise OSError(errno.E2BIG, "array index out of range", name)
        elif k not in store and len(store) >= info["max_entries"]:
            raise OSError(errno.E2BIG, "map full", name)
        if name == "kln_lb_maglev" and self.m():
            idx = S["lb_maglev_key"].unpack(k)[0]
            for fam in (4, 6):
                for _fields, master in self.masters(fam).items():
                    base = (master[2] * 2 + (master[7] & 1)) * self.m()
                    if master[3] == lb.ALG_MAGLEV and base <= idx < base + self.m() and store.get(k) != v:
                        self.violations.append("live Maglev half of service id %d overwritten at %d" % (master[2], idx))
        fam = {"kln_lb4_svc": 4, "kln_lb6_svc": 6}.get(name)
        slot = None
        if fam:
            vip, port, slot, proto = S["lb%d_key" % fam].unpack(k)
            if slot:
                master = self.masters(fam).get((vip, port, proto))
                bid = S["lb_service"].unpack(v)[0]
                if master and slot <= master[1] and self.backend(fam, bid) is None:
                    self.violations.append("live slot %d rewritten to missing backend %d" % (slot, bid))
        store[k] = v
        self.ops.append(("update", name, k))
        if fam and slot == 0:
            self.check_master(fam, vip, port, proto)

    def remove(self, name, k):
        store = self.store[name]
        self.ops.append(("delete", name, k))
        if k not in store:
            self.missing_deletes.append((name, k))
            return
        fam = {"kln_lb4_svc": 4, "kln_lb6_svc": 6}.get(name)
        if fam:
            vip, port, slot, proto = S["lb%d_key" % fam].unpack(k)
            master = self.masters(fam).get((vip, port, proto))
            if slot and master and slot <= master[1]:
                self.violations.append("live slot %d of a committed master deleted" % slot)
        bfam = {"kln_lb4_backend": 4, "kln_lb6_backend": 6}.get(name)
        if bfam:
            bid = S["lb_backend_key"].unpack(k)[0]
            if bid in self.live_refs(bfam):
                self.violations.append("backend %d deleted while a live service refers to it" % bid)
        del store[k]

    def updates(self):
        return [o for o in self.ops if o[0] == "update"]

    def reset_log(self):
        self.ops = []

    def install(self, monkeypatch):
        monkeypatch.setattr(pinned, "Maps", self.maps_class())

    # -- the pinned.Maps replacement ----------------------------------------------------------
    def _split(self, name, buf, size_field):
        n = self.info[name][size_field]
        return [buf[i:i + n] for i in range(0, len(buf), n)]

    def apply_update(self, name, keys, values):
        for k, v in zip(self._split(name, keys, "key_size"), self._split(name, values, "value_size")):
            self.put(name, k, v)

    def apply_delete(self, name, keys):
        for k in self._split(name, keys, "key_size"):
            self.remove(name, k)

    def maps_class(self):
        world = self

        class FakeMaps(object):
            def __init__(self, mapdir, names=None):
                assert mapdir == world.dir
                self.mapdir = mapdir
                self.info = world.info
                world.opened += 1

            def close(self):
                world.closed += 1

            def dump(self, name):
                world.dumps.append(name)
                return b"".join(world.store[name]), b"".join(world.store[name].values())

            def lookup(self, name, key):
                world.lookups += 1
                return world.store[name].get(key)

            def lock(self):
                world.locked += 1

            def update(self, name, keys, values):
                world.apply_update(name, keys, values)
                return 1 if keys else 0

            def delete(self, name, keys):
                world.apply_delete(name, keys)
                return 1 if keys else 0

        return FakeMaps


class MirrorDict(dict):
    """One map's mirror: changed by a test (``world.store[name][k] = v``), it changes the real map too;
    changed by the mirrored writes of lb (``world.mirroring``), only itself."""

    def __init__(self, world, name):
        dict.__init__(self)
        self.world = world
        self.name = name

    def _fd(self):
        return self.world.real.fd[self.name]

    def __setitem__(self, k, v):
        if not self.world.mirroring:
            bpfsys.map_update(self._fd(), k, v)
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        if not self.world.mirroring:
            bpfsys.map_delete(self._fd(), k)
        dict.__delitem__(self, k)

    def clear(self):
        for k in list(self):
            del self[k]


class RealWorld(FakeWorld):
    """Real maps on a private bpffs (``dir``), mirrored by the FakeWorld checks."""

    def __init__(self, sizes=None):
        FakeWorld.__init__(self, sizes)
        self.mirroring = False
        self.dir = None
        self.real = None
        base = tempfile.mkdtemp(prefix="lb_test_", dir="/run" if os.path.isdir("/run") else None)
        proc = subprocess.run(["mount", "-t", "bpf", "bpf", base], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              check=False)
        if proc.returncode != 0:
            os.rmdir(base)
            pytest.skip("cannot mount bpffs: %s" % proc.stderr.decode().strip())
        self.base = base
        self.dir = os.path.join(base, "globals")
        os.mkdir(self.dir)
        self.specs = manifest.load(MANIFEST)["maps"]
        for name in lb.MAPS:
            self._create(name, self.info[name]["max_entries"])
        self._reopen()
        self.store = dict((n, MirrorDict(self, n)) for n in lb.MAPS)

    def _path(self, name):
        return os.path.join(self.dir, manifest.pin_name(name, self.specs[name]["version"]))

    def _create(self, name, max_entries):
        spec = self.specs[name]
        with bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"], max_entries, spec["flags"],
                               name) as fd:
            bpfsys.obj_pin(fd, self._path(name))

    def _reopen(self):
        if self.real is not None:
            self.real.close()
        self.real = REAL_MAPS(self.dir)
        for name, info in self.real.info.items():
            self.info[name] = dict(info)

    def close(self):
        if self.real is not None:
            self.real.close()
            self.real = None
        subprocess.run(["umount", self.base], check=True)
        os.rmdir(self.base)

    def resize(self, name, n):
        self._recreate(name, n)

    def recreate(self, name):
        self._recreate(name, self.info[name]["max_entries"])

    def _recreate(self, name, n):
        """A new map of ``n`` entries in its place, with the old one's contents."""
        old = self.real_contents(name)
        os.unlink(self._path(name))
        self._create(name, n)
        self._reopen()
        if self.info[name]["type"] == "array":
            old = dict((k, v) for k, v in old.items() if S["lb_maglev_key"].unpack(k)[0] < n)
        if old:
            self.real.update(name, b"".join(old), b"".join(old.values()))

    def real_contents(self, name):
        keys, values = self.real.dump(name)
        ks, vs = self.info[name]["key_size"], self.info[name]["value_size"]
        out = dict((keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]) for i in range(len(keys) // ks))
        if self.info[name]["type"] == "array":     # an array holds every index: compare what is not zero
            out = dict((k, v) for k, v in out.items() if v.strip(b"\0"))
        return out

    def check_contents(self):
        for name in lb.MAPS:
            mirror = dict((k, v) for k, v in self.store[name].items()
                          if self.info[name]["type"] != "array" or v.strip(b"\0"))
            assert self.real_contents(name) == mirror, "the real %s differs from the mirror" % name

    def maps_class(self):
        world = self

        class MirrorMaps(object):
            """The real maps for reads; writes checked element by element in the mirror, then made for real
            with lb's own batched calls."""

            def __init__(self, mapdir, names=None):
                assert mapdir == world.dir
                self.real = REAL_MAPS(mapdir)
                self.mapdir = mapdir
                self.info = self.real.info
                world.opened += 1

            def close(self):
                self.real.close()
                world.closed += 1

            def dump(self, name):
                world.dumps.append(name)
                return self.real.dump(name)

            def lookup(self, name, key):
                world.lookups += 1
                return self.real.lookup(name, key)

            def lock(self):
                world.locked += 1
                self.real.lock()

            def _mirrored(self, name, keys, values, apply_mirror, apply_real):
                ks = self.info[name]["key_size"]
                vs = self.info[name]["value_size"]
                done = 0
                world.mirroring = True
                try:
                    for i in range(len(keys) // ks):
                        apply_mirror(name, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs] if values else b"")
                        done = i + 1
                finally:
                    world.mirroring = False
                    if done:    # what the mirror took, the real map takes (also when a check or an injected error stopped it)
                        apply_real(name, keys[:done * ks], values[:done * vs] if values else None)
                return 1 if keys else 0

            def update(self, name, keys, values):
                return self._mirrored(name, keys, values, world.put, self.real.update)

            def delete(self, name, keys):
                return self._mirrored(name, keys, None, lambda n, k, _v: world.remove(n, k),
                                      lambda n, k, _v: self.real.delete(n, k))

        return MirrorMaps


def is_root():
    return os.geteuid() == 0


def make_world(kind, sizes=None):
    if kind == "real":
        if not is_root():
            pytest.skip("real maps need root")
        return RealWorld(sizes)
    return FakeWorld(sizes)
