# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Service load balancing benchmark: the socket LB against kube-proxy's iptables and nftables modes.

Run as root on one machine; everything happens in network namespaces, a private bpffs and a
private cgroup that this script creates and removes again (also on Ctrl-C / SIGTERM).

(a) New TCP connections per second (connect, 4-byte request, reply, close) to one ClusterIP
    VIP, with 1 .. 30,000 services x 10 backends, through
      sock          the socket LB (bpf/build/sock_lb.o, maps filled with plugins/module_utils/lb/)
      iptables      kube-proxy's iptables-mode rules, iptables (nf_tables backend, Debian 12 default)
      iptables-leg  the same rules through iptables-legacy (x_tables)
      nftables      kube-proxy's nftables-mode table (nft -f)
      direct        no load balancer: the client connects straight to the backend addresses
    and each as a ratio to direct. The measured VIP is the last service written (the last rule
    of KUBE-SERVICES: the worst case of iptables' linear walk).
(b) Programming time: a full sync of N services x 10 backends (default 10,000) into empty maps /
    an empty table, and one service's change (one backend removed, then added back).

See benchmarks/service_lb/README.md and docs/performance.md.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, ".collections"))

import kubeproxy_rules as kp  # noqa: E402

BACKENDS = 10
BACKEND_PORT = 8080
VIP_PORT = 80
CLUSTER_CIDR = "10.199.0.0/16"      # the client netns addresses: "pods" (no masquerade, the common case)
SERVICE_CIDR = "10.96.0.0/16"
MODES = ["sock", "iptables", "iptables-leg", "nftables", "direct"]
MODE_LABEL = {
    "sock": "(i) socket LB",
    "iptables": "(ii) iptables (nft backend)",
    "iptables-leg": "(ii) iptables-legacy",
    "nftables": "(iii) nftables",
    "direct": "(iv) direct",
}
# kube-proxy: iptables-restore -w 5 -W 100000 --noflush --counters
IPT_LOCK = ["-w", "5", "-W", "100000"]


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def sh(argv, check=True, timeout=None, capture=True, stdin=None):
    proc = subprocess.run(argv, check=False, timeout=timeout, stdin=stdin, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), proc.returncode, (proc.stderr or "").strip()[-2000:]))
    return proc


def timed(argv, input_path=None, timeout=None):
    """Run argv (stdin from input_path); return seconds, or None if it ran into ``timeout``."""
    t0 = time.monotonic()
    try:
        if input_path:
            with open(input_path) as f:
                sh(argv, stdin=f, timeout=timeout)
        else:
            sh(argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


def services(n):
    """n services x 10 backends, in lb.sync()'s input format; VIPs 10.96.0.1 .. (distinct)."""
    bes = [{"ip": "10.200.0.%d" % i, "port": BACKEND_PORT, "weight": 1} for i in range(1, BACKENDS + 1)]
    out = []
    for i in range(n):
        v = i + 1
        out.append({"name": "svc-%05d" % i, "namespace": "bench", "vip": "10.96.%d.%d" % (v // 256, v % 256),
                    "port": VIP_PORT, "protocol": "tcp", "algorithm": "random", "backends": list(bes)})
    return out


def one_changed(svcs, drop):
    """The service list with the last service's last backend removed (drop=True) or all present."""
    last = dict(svcs[-1], backends=svcs[-1]["backends"][:BACKENDS - 1] if drop else svcs[-1]["backends"])
    return svcs[:-1] + [last]


def map_specs(sizes=None):
    """{map name: manifest spec} of bpf/sock_lb.manifest.json, max_entries from ``sizes`` where given."""
    from ansible_collections.kldload.netstack.plugins.module_utils import manifest
    specs = manifest.load(os.path.join(REPO, "bpf", "sock_lb.manifest.json"))["maps"]
    for name, n in (sizes or {}).items():
        specs[name] = dict(specs[name], max_entries=n)
    return specs


def create_maps(root, specs, names=None):
    """Create and pin maps as the loader lays them out under the pin root ``root``: shared maps in
    ``globals/<name>_v<version>``, private ones in ``sock_lb/maps/<name>``. Returns {name: pin path}."""
    from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, manifest
    paths = {}
    for name in names or sorted(specs):
        spec = specs[name]
        path = manifest.map_pin(root, "sock_lb", name, spec)
        if not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path))
        with bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"], spec["max_entries"], spec["flags"],
                               name) as fd:
            bpfsys.obj_pin(fd, path)
        paths[name] = path
    return paths


class Bench:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.tmp = None
        self.cleanups = []
        self.netns = []
        self.server = None
        self.cgroup = None
        self.bpffs = None
        self.mapdir = None
        self.svc_entries = None
        self.attached = []
        self.lb = None
        self.cpu = str(args.cpu)
        self.results = {"machine": {}, "a": [], "loads": {}, "b": {}, "commands": [], "failures": []}

    # ---- setup and teardown ----------------------------------------------------------------

    def cleanup(self):
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log("cleanup: %s" % e)
        self.cleanups = []

    def build(self):
        self.tmp = tempfile.mkdtemp(prefix="slbbench-")    # no "." in the path (bpffs pin paths)
        self.cleanups.append(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        cc = shutil.which("cc") or shutil.which("clang")
        for name in ("lbclient", "lbserver"):
            sh([cc, "-O2", "-Wall", "-o", os.path.join(self.tmp, name), os.path.join(HERE, name + ".c")])
        sh(["make", "-s", "-C", os.path.join(REPO, "bpf")])
        self.obj = os.path.join(REPO, "bpf", "build", "sock_lb.o")

    def ns_name(self, tag):
        return "slbb%d-%s" % (self.pid, tag)

    def add_netns(self, tag):
        name = self.ns_name(tag)
        sh(["ip", "netns", "add", name])
        self.netns.append(name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def del_netns(self, name):
        if name in self.netns:
            self.netns.remove(name)
            sh(["ip", "netns", "del", name], check=False)

    def topology(self):
        """Server netns (backends 10.200.0.1-10 on lo, lbserver on :8080); clients are added per mode."""
        self.srv = self.add_netns("srv")
        self.cleanups.append(lambda: [self.del_netns(n) for n in list(self.netns)])
        for i in range(1, BACKENDS + 1):
            sh(["ip", "-n", self.srv, "addr", "add", "10.200.0.%d/32" % i, "dev", "lo"])
        self.server = subprocess.Popen(["ip", "netns", "exec", self.srv, "taskset", "-c", self.cpu,
                                        os.path.join(self.tmp, "lbserver"), str(BACKEND_PORT)],
                                       stdout=subprocess.PIPE, text=True)
        self.cleanups.append(self.stop_server)
        line = self.server.stdout.readline()
        if "listening" not in line:
            raise RuntimeError("lbserver did not start: %r" % line)
        self.next_link = 1

    def stop_server(self):
        if self.server and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def client_netns(self, tag):
        """A fresh client netns linked to the server by a veth pair, routes to backends and VIPs."""
        k = self.next_link
        self.next_link += 1
        if k > 250:
            raise RuntimeError("too many client namespaces")
        name = self.add_netns(tag)
        sh(["ip", "link", "add", "c0", "netns", name, "type", "veth", "peer", "name", "s%d" % k, "netns", self.srv])
        sh(["ip", "-n", name, "addr", "add", "10.199.%d.1/30" % k, "dev", "c0"])
        sh(["ip", "-n", self.srv, "addr", "add", "10.199.%d.2/30" % k, "dev", "s%d" % k])
        sh(["ip", "-n", name, "link", "set", "c0", "up"])
        sh(["ip", "-n", self.srv, "link", "set", "s%d" % k, "up"])
        for dst in ("10.200.0.0/24", SERVICE_CIDR):
            sh(["ip", "-n", name, "route", "add", dst, "via", "10.199.%d.2" % k])
        return name

    def socket_lb(self, max_services):
        """Private bpffs, maps sized for max_services x 10, programs, private cgroup with 4 hooks."""
        from ansible_collections.kldload.netstack.plugins.module_utils import lb
        self.lb = lb
        self.bpffs = os.path.join(self.tmp, "bpffs")
        os.mkdir(self.bpffs)
        sh(["mount", "-t", "bpf", "bpf", self.bpffs])
        self.cleanups.append(lambda: sh(["umount", self.bpffs], check=False))
        svc_entries = 1
        while svc_entries < (max_services + 1) * (BACKENDS + 1) + 64:
            svc_entries *= 2
        self.svc_entries = svc_entries
        from ansible_collections.kldload.netstack.plugins.module_utils import loader, mounts
        cg2 = mounts.cgroup2_path()
        if not cg2:
            raise RuntimeError("no cgroup2 mount")
        self.cgroup = os.path.join(cg2, "slbbench-%d" % self.pid)
        os.mkdir(self.cgroup)
        self.cleanups.append(self.remove_cgroup)
        # the collection's loader, as the node_dataplane module runs it: maps from the manifest (sizes
        # given here), programs verified and loaded, the manifest's IPv4 programs linked to the cgroup
        self.pin_root = os.path.join(self.bpffs, "kldload-netstack")
        spec = loader.object_spec("sock_lb", self.obj, targets={"cgroup": self.cgroup, "families": [4]},
                                  map_sizes={"kln_lb4_svc": svc_entries})
        res = loader.ensure(self.pin_root, [spec])
        self.attached = sorted(a["program"] for a in res["report"]["objects"]["sock_lb"]["attachments"])
        self.mapdir = os.path.join(self.pin_root, "globals")
        self.results["commands"].append("socket LB: loader.ensure() of %s with its manifest (kln_lb4_svc %d entries), "
                                        "IPv4 programs linked to a private cgroup: %s"
                                        % (os.path.relpath(self.obj, REPO), svc_entries, ", ".join(self.attached)))

    def remove_cgroup(self):
        if self.attached:
            from ansible_collections.kldload.netstack.plugins.module_utils import loader
            loader.ensure(self.pin_root, [], state="absent", prune=True)     # detaches the links
        self.attached = []
        if os.path.isdir(self.cgroup):
            with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
                for p in f.read().split():      # only clients this script put there
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except OSError:
                        pass
            for _attempt in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)

    # ---- loading each mode -------------------------------------------------------------------

    def lb_sync(self, svcs, mapdir=None, prune=True):
        """lb.sync() as the lb_services module calls it, state file (and its journal) included."""
        t0 = time.monotonic()
        r = self.lb.sync(mapdir or self.mapdir, svcs, prune=prune, check=False,
                         state_file=os.path.join(self.tmp, "lb-state", "services.json"))
        return time.monotonic() - t0, r

    def iptables_full_text(self, svcs, path):
        """The whole tables as they are after kube-proxy's EnsureRule jumps + first sync (for loads
        without --noflush; iptables-nft's --noflush restore is quadratic in the number of chains)."""
        body, rules, chains = kp.iptables_restore(svcs, CLUSTER_CIDR)
        jumps = {"filter": [], "nat": []}
        for table, chain, builtin, jargs in kp.JUMPS:
            quoted = " ".join('"%s"' % a if " " in a else a for a in jargs)
            jumps[table].insert(0, "-A %s %s -j %s" % (builtin, quoted, chain) if quoted else "-A %s -j %s" % (builtin, chain))
        # -I prepends: the last EnsureRule ends up first
        out = []
        for block in body.split("COMMIT\n"):
            if not block.strip():
                continue
            lines = block.strip("\n").split("\n")
            table = lines[0][1:]
            builtins = {"filter": ["INPUT", "FORWARD", "OUTPUT"], "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]}[table]
            chain_lines = [ln for ln in lines[1:] if ln.startswith(":")]
            rule_lines = [ln for ln in lines[1:] if not ln.startswith(":")]
            out += [lines[0]] + [":%s ACCEPT [0:0]" % b for b in builtins] + chain_lines + jumps[table] + rule_lines + ["COMMIT"]
        with open(path, "w") as f:
            f.write("\n".join(out) + "\n")
        with open(path + ".noflush", "w") as f:
            f.write(body)
        return rules, chains

    def load_mode(self, mode, svcs, files):
        """A fresh client netns with mode's rules for svcs; returns (netns, load seconds)."""
        n = len(svcs)
        if mode == "direct":
            if not getattr(self, "direct_ns", None):
                self.direct_ns = self.client_netns("direct")
            return self.direct_ns, None
        if mode == "sock":
            if not getattr(self, "sock_ns", None):
                self.sock_ns = self.client_netns("sock")
            self.lb_sync([])            # start from empty maps: a full sync
            secs, r = self.lb_sync(svcs)
            if r["services"] != n:
                raise RuntimeError("lb.sync: %s services in the maps, expected %d" % (r["services"], n))
            return self.sock_ns, secs
        ns = self.client_netns(mode + "-%d" % n)
        if mode in ("iptables", "iptables-leg"):
            cmd = "iptables-restore" if mode == "iptables" else "iptables-legacy-restore"
            secs = timed(["ip", "netns", "exec", ns, cmd] + IPT_LOCK + ["--counters"], files["ipt"])
        else:
            secs = timed(["ip", "netns", "exec", ns, "nft", "-f", files["nft"]])
        return ns, secs

    # ---- measuring ---------------------------------------------------------------------------

    def run_client(self, mode, ns, vip):
        client = os.path.join(self.tmp, "lbclient")
        targets = ["10.200.0.%d:%d" % (i, BACKEND_PORT) for i in range(1, BACKENDS + 1)] if mode == "direct" \
            else ["%s:%d" % (vip, VIP_PORT)]
        argv = ["ip", "netns", "exec", ns, "taskset", "-c", self.cpu, client, str(self.args.seconds)] + targets
        if mode == "sock":
            # join the private cgroup first: "ip netns exec" mounts its own /sys, the cgroup2 mount is not there
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.cgroup, "cgroup.procs")] + argv
        proc = sh(argv, check=False, timeout=self.args.seconds + 60)
        out = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        out["rc"] = proc.returncode
        if proc.returncode != 0:
            out["stderr"] = proc.stderr.strip()[-300:]
        return out

    def measure_size(self, n):
        a = self.args
        svcs = services(n)
        vip = svcs[-1]["vip"]
        files = {"ipt": os.path.join(self.tmp, "ipt-%d.txt" % n), "nft": os.path.join(self.tmp, "nft-%d.txt" % n)}
        modes = [m for m in a.modes if not (m == "nftables" and n > a.nft_max)]
        row = {"services": n, "vip": vip, "rates": {}, "runs": {}, "load": {}, "skipped": {}}
        if "nftables" in a.modes and "nftables" not in modes:
            row["skipped"]["nftables"] = "more than --nft-max %d services" % a.nft_max
        log("size %d: generating rules" % n)
        if "iptables" in modes or "iptables-leg" in modes:
            rules, chains = self.iptables_full_text(svcs, files["ipt"])
            row["iptables_rules"] = rules
            row["iptables_chains"] = chains
        if "nftables" in modes:
            text, lines = kp.nft_full(svcs, CLUSTER_CIDR, SERVICE_CIDR)
            with open(files["nft"], "w") as f:
                f.write(text)
            row["nft_lines"] = lines
        ns = {}
        for m in modes:
            log("size %d: loading %s" % (n, m))
            ns[m], secs = self.load_mode(m, svcs, files)
            if secs is not None:
                row["load"][m] = secs
                log("size %d: %s loaded in %.2f s" % (n, m, secs))
        for r in range(a.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                out = self.run_client(m, ns[m], vip)
                row["runs"].setdefault(m, []).append(out)
                log("size %d round %d %-12s %s" % (n, r + 1, m, " ".join("%s=%s" % kv for kv in out.items())))
        for m in modes:
            runs = row["runs"][m]
            rates = [float(o.get("conn_per_s", 0)) for o in runs]
            row["rates"][m] = statistics.median(rates)
            bad = [o for o in runs if o["rc"] != 0 or int(o.get("ok", 0)) == 0 or int(o.get("backends", 0)) != BACKENDS
                   or int(o.get("err", 1)) != 0]
            if bad:
                self.results["failures"].append("%d services, %s: %s" % (n, m, bad[0]))
        if n == a.sync_services:
            self.change_timings(svcs, ns, modes, files)
        for m in modes:
            if m not in ("sock", "direct"):
                self.del_netns(ns[m])
        for f in files.values():
            for p in (f, f + ".noflush"):
                if os.path.exists(p):
                    os.unlink(p)
        self.results["a"].append(row)

    # ---- part (b) ----------------------------------------------------------------------------

    def change_timings(self, svcs, ns, modes, files):
        """One service changes (its last backend removed, then added back), a few times; medians."""
        a = self.args
        n = len(svcs)
        b = self.results["b"]
        b["services"] = n
        reps = a.change_reps
        log("part b: one-service change timings at %d services (%d x remove + add back)" % (n, reps))
        changes = {}
        inc = []
        for m in modes:
            if m == "direct":
                continue
            times = []
            for i in range(reps * 2):
                drop = i % 2 == 0
                new = one_changed(svcs, drop)
                if m == "sock":
                    secs, r = self.lb_sync(new)
                    if not r["changed"] or len(r["diff"]["changed"]) != 1:
                        raise RuntimeError("lb.sync one-service change: %r" % r["diff"])
                    times.append(secs)
                    # the incremental path: only the changed service, prune=False (point lookups + the index)
                    secs, r = self.lb_sync([new[-1]], prune=False)
                    if r["changed"] or r["stats"]["path"] != "incremental":
                        raise RuntimeError("lb.sync(prune=False) of an unchanged service: %r %r" % (r["diff"], r["stats"]))
                    new = one_changed(svcs, not drop)
                    secs, r = self.lb_sync([new[-1]], prune=False)
                    if not r["changed"] or len(r["diff"]["changed"]) != 1 or r["stats"]["path"] != "incremental":
                        raise RuntimeError("lb.sync(prune=False) one-service change: %r %r" % (r["diff"], r["stats"]))
                    inc.append(secs)
                    secs, r = self.lb_sync(one_changed(svcs, drop))      # back to where the whole-list loop expects
                    continue
                if m in ("iptables", "iptables-leg"):
                    text, _r, _c = kp.iptables_restore(new, CLUSTER_CIDR, changed={kp.spn(new[-1])})
                    cmd = "iptables-restore" if m == "iptables" else "iptables-legacy-restore"
                    argv = ["ip", "netns", "exec", ns[m], cmd] + IPT_LOCK + ["--noflush", "--counters"]
                else:
                    old = one_changed(svcs, not drop)[-1]
                    text, _l = kp.nft_change(old, new[-1], CLUSTER_CIDR)
                    argv = ["ip", "netns", "exec", ns[m], "nft", "-f"]
                path = os.path.join(self.tmp, "change.txt")
                with open(path, "w") as f:
                    f.write(text)
                times.append(timed(argv + ([path] if m == "nftables" else []), None if m == "nftables" else path))
                if i == 0:
                    b.setdefault("change_payload", {})[m] = len(text.splitlines())
            changes[m] = {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}
            log("part b: %s one-service change: median %.4f s (min %.4f, max %.4f)" % (m, changes[m]["median"], min(times), max(times)))
            if m == "sock":
                changes["sock-inc"] = {"median": statistics.median(inc), "min": min(inc), "max": max(inc), "n": len(inc)}
                log("part b: sock incremental one-service change: median %.5f s (min %.5f, max %.5f)"
                    % (statistics.median(inc), min(inc), max(inc)))
        b["change"] = changes
        if "sock" in modes:
            self.lb_breakdown(svcs)

    def lb_breakdown(self, svcs):
        """Where lb.sync's time goes, and the bpf() floor: the same entries written straight to the maps."""
        lb = self.lb
        b = self.results["b"]
        t0 = time.monotonic()
        lb.normalize(svcs)
        normalize = time.monotonic() - t0
        from ansible_collections.kldload.netstack.plugins.module_utils.lb import pinned, state
        maps = pinned.Maps(self.mapdir)
        try:
            t0 = time.monotonic()
            state.FullView(maps)
            read_state = time.monotonic() - t0
        finally:
            maps.close()
        # the floor: fresh kln_lb4_svc/kln_lb4_backend maps, entries pre-encoded, BPF_MAP_UPDATE_BATCH
        floor_root = os.path.join(self.bpffs, "floor")
        os.mkdir(floor_root)
        try:
            create_maps(floor_root, map_specs({"kln_lb4_svc": self.svc_entries}), ["kln_lb4_svc", "kln_lb4_backend"])
            S = lb.S
            bes = [(i + 1, be) for i, be in enumerate(svcs[0]["backends"])]
            backend_items = [(S["lb_backend_key"].pack(bid), S["lb4_backend"].pack(bytes(map(int, be["ip"].split("."))),
                              be["port"].to_bytes(2, "big"), 0, 0)) for bid, be in bes]

            def key(svc, slot):
                return S["lb4_key"].pack(bytes(map(int, svc["vip"].split("."))), svc["port"].to_bytes(2, "big"), slot, 6)

            slots, masters = [], []
            for sid, svc in enumerate(svcs, start=1):
                cum = 0
                for slot, (bid, _be) in enumerate(bes, start=1):
                    cum += 1
                    slots.append((key(svc, slot), S["lb_service"].pack(bid, 0, sid, 0, 0, cum, 0, 0)))
                masters.append((key(svc, 0), S["lb_service"].pack(0, len(bes), sid, 0, 0, cum, 0, 1)))

            def joined(items):
                return b"".join(k for k, _v in items), b"".join(v for _k, v in items)
            batches = [joined(backend_items), joined(slots), joined(masters)]
            last = svcs[-1]
            change = joined(slots[-BACKENDS:-1] + [(key(last, 0), S["lb_service"].pack(0, BACKENDS - 1, len(svcs), 0, 0,
                                                                                       BACKENDS - 1, 0, 2))])
            fm = pinned.Maps(os.path.join(floor_root, "globals"), names=["kln_lb4_svc", "kln_lb4_backend"])
            try:
                t0 = time.monotonic()
                fm.update("kln_lb4_backend", *batches[0])
                fm.update("kln_lb4_svc", *batches[1])
                fm.update("kln_lb4_svc", *batches[2])
                floor_full = time.monotonic() - t0
                t0 = time.monotonic()
                fm.update("kln_lb4_svc", *change)
                fm.delete("kln_lb4_svc", key(last, BACKENDS))
                floor_change = time.monotonic() - t0
            finally:
                fm.close()
        finally:
            shutil.rmtree(floor_root, ignore_errors=True)
        b["lb_breakdown"] = {"normalize": normalize, "read_state": read_state, "floor_full": floor_full,
                             "floor_change": floor_change, "floor_full_entries": len(slots) + len(masters) + len(backend_items)}
        log("part b: lb.normalize %.3f s, reading the maps %.3f s, bpf() floor full %.3f s / change %.5f s"
            % (normalize, read_state, floor_full, floor_change))

    def exact_noflush(self, n, legacy=False):
        """kube-proxy's exact first sync: its jump rules (iptables -N / -I), then iptables-restore --noflush."""
        svcs = services(n)
        path = os.path.join(self.tmp, "noflush-%d.txt" % n)
        body, _r, _c = kp.iptables_restore(svcs, CLUSTER_CIDR)
        with open(path, "w") as f:
            f.write(body)
        ns = self.client_netns("noflush-%d" % n)
        try:
            for argv, ignore in kp.jump_commands("iptables-legacy" if legacy else "iptables"):
                sh(["ip", "netns", "exec", ns] + argv, check=not ignore)
            cap = self.args.noflush_cap or None
            cmd = "iptables-legacy-restore" if legacy else "iptables-restore"
            log("part b: %s --noflush of %d services (kube-proxy's command; cap %s s)" % (cmd, n, cap))
            secs = timed(["ip", "netns", "exec", ns, cmd] + IPT_LOCK + ["--noflush", "--counters"], path, timeout=cap)
            log("part b: --noflush %d services: %s" % (n, "%.2f s" % secs if secs is not None else "stopped at the cap"))
            return secs
        finally:
            self.del_netns(ns)
            os.unlink(path)

    def part_b(self):
        a = self.args
        n = a.sync_services
        b = self.results["b"]
        if n not in a.sizes:
            log("part b: %d services is not one of --sizes: loading it on its own" % n)
            svcs = services(n)
            files = {"ipt": os.path.join(self.tmp, "ipt-b.txt"), "nft": os.path.join(self.tmp, "nft-b.txt")}
            modes = [m for m in a.modes if m != "direct" and not (m == "nftables" and n > a.nft_max)]
            if "iptables" in modes or "iptables-leg" in modes:
                self.iptables_full_text(svcs, files["ipt"])
            if "nftables" in modes:
                with open(files["nft"], "w") as f:
                    f.write(kp.nft_full(svcs, CLUSTER_CIDR, SERVICE_CIDR)[0])
            ns = {}
            loads = {}
            for m in modes:
                ns[m], secs = self.load_mode(m, svcs, files)
                loads[m] = secs
            b["full"] = loads
            self.change_timings(svcs, ns, modes, files)
            for m in modes:
                if m not in ("sock", "direct"):
                    self.del_netns(ns[m])
        else:
            b["full"] = next(r["load"] for r in self.results["a"] if r["services"] == n)
        if "iptables-leg" in a.modes:
            b["noflush_legacy"] = {n: self.exact_noflush(n, legacy=True)}
        if "iptables" in a.modes:
            secs = self.exact_noflush(n)
            b["noflush"] = {n: secs}
            if secs is None and n >= 10 * a.noflush_small:
                b["noflush"][a.noflush_small] = self.exact_noflush(a.noflush_small)

    # ---- report ------------------------------------------------------------------------------

    def machine(self):
        m = self.results["machine"]
        m["kernel"] = platform.release()
        m["nproc"] = os.cpu_count()
        try:
            with open("/proc/cpuinfo") as f:
                m["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        except OSError:
            m["cpu"] = "?"
        m["iptables"] = sh(["iptables", "--version"]).stdout.strip()
        m["iptables_legacy"] = sh(["iptables-legacy", "--version"], check=False).stdout.strip()
        m["nft"] = sh(["nft", "--version"]).stdout.strip()
        m["bpftool"] = sh(["bpftool", "version"]).stdout.split("\n")[0].strip()
        m["pinned_cpu"] = self.cpu
        with open("/proc/loadavg") as f:
            m["loadavg_start"] = f.read().split()[:3]

    def report(self):
        a = self.args
        r = self.results
        m = r["machine"]
        p = print
        p("service_lb benchmark - %s" % time.strftime("%Y-%m-%d %H:%M:%S"))
        p("machine: kernel %s, nproc %s, %s; load average at start %s" % (m["kernel"], m["nproc"], m["cpu"], " ".join(m["loadavg_start"])))
        p("tools: %s; %s; %s; %s" % (m["iptables"], m["iptables_legacy"], m["nft"], m["bpftool"]))
        p("client and server pinned to CPU %s (connections per second of one core: client + server + kernel);"
          " %s s per measurement, %d round(s), median; %d backends per service" % (self.cpu, a.seconds, a.rounds, BACKENDS))
        p("measured VIP: the last service written (last rule of KUBE-SERVICES, iptables' worst case), port %d -> backends "
          "10.200.0.1-%d:%d" % (VIP_PORT, BACKENDS, BACKEND_PORT))
        p("commands (NS = a fresh client netns per mode and size; the socket-LB client also runs in the private cgroup):")
        lock = " ".join(IPT_LOCK)
        for line in [
                "client: ip netns exec NS taskset -c %s lbclient SECONDS VIP:%d   (direct: the 10 backend addresses:%d in turn)"
                % (self.cpu, VIP_PORT, BACKEND_PORT)] + r["commands"] + [
                "socket LB maps: lb.sync(globals dir, services, prune=True) (plugins/module_utils/lb/); emptied with lb.sync(globals dir, []) first",
                "iptables: ip netns exec NS iptables-restore %s --counters < kube-proxy's jump rules + first-sync filter and nat "
                "tables (whole tables; see (b) for --noflush)" % lock,
                "iptables-legacy: the same file with iptables-legacy-restore %s --counters" % lock,
                "nftables: ip netns exec NS nft -f <kube-proxy's first-sync transaction (table ip kube-proxy)>",
                "(b) exact: iptables[-legacy] -t T -N CHAIN / -I BUILTIN ... -j CHAIN (kube-proxy's EnsureChain/EnsureRule), then "
                "iptables[-legacy]-restore %s --noflush --counters < kube-proxy's sync payload" % lock,
                "(b) change: iptables[-legacy]-restore %s --noflush --counters < partial-sync payload (filter table, KUBE-SERVICES "
                "with every service's rule, the changed KUBE-SVC/KUBE-SEP chains); nft -f <partial-sync transaction>; "
                "lb.sync() of the whole list (prune=True); lb.sync() of the changed service only (prune=False, the "
                "incremental path); both with a state file" % lock]:
            p("  " + line)
        p("")
        p("(a) new TCP connections per second (connect, 4-byte request, reply, close); ratio = mode / direct")
        modes = [x for x in MODES if x in a.modes]
        head = "%9s" % "services" + "".join("  %22s" % MODE_LABEL[x] for x in modes)
        p(head)
        for row in r["a"]:
            d = row["rates"].get("direct")
            cells = []
            for x in modes:
                if x not in row["rates"]:
                    cells.append("n/a")
                elif x == "direct" or not d:
                    cells.append("%.0f" % row["rates"][x])
                else:
                    cells.append("%.0f (%.3fx)" % (row["rates"][x], row["rates"][x] / d))
            p("%9d" % row["services"] + "".join("  %22s" % c for c in cells))
        p("")
        p("rules per size (iptables: filter + nat rules / chains of kube-proxy; nftables: nft -f lines) and load time "
          "into an empty client netns / empty maps:")
        for row in r["a"]:
            loads = ", ".join("%s %.2f s" % (x, row["load"][x]) for x in modes if x in row["load"])
            extra = []
            if "iptables_rules" in row:
                extra.append("%d iptables rules in %d chains" % (row["iptables_rules"], row["iptables_chains"]))
            if "nft_lines" in row:
                extra.append("%d nft lines" % row["nft_lines"])
            for x, why in row["skipped"].items():
                extra.append("%s skipped: %s" % (x, why))
            p("  %6d services: %s%s" % (row["services"], loads, ("; " + "; ".join(extra)) if extra else ""))
        b = r["b"]
        if b:
            p("")
            n = b.get("services", a.sync_services)
            p("(b) programming time, %d services x %d backends" % (n, BACKENDS))
            full = b.get("full", {})
            label = {"sock": "socket LB  lb.sync() into empty maps",
                     "iptables": "iptables-nft  iptables-restore (no --noflush) of the whole tables",
                     "iptables-leg": "iptables-legacy-restore (no --noflush) of the whole tables",
                     "nftables": "nft -f of kube-proxy's first sync transaction"}
            p("  full sync:")
            for x in modes:
                if x in full and full[x] is not None:
                    p("    %-72s %9.3f s" % (label[x], full[x]))
            for key, cmd in (("noflush_legacy", "iptables-legacy-restore"), ("noflush", "iptables-nft  iptables-restore")):
                for k, secs in sorted(b.get(key, {}).items(), key=lambda kv: -kv[0]):
                    p("    %-72s %s" % ("%s --noflush (kube-proxy's command), %d services" % (cmd, k),
                                        "%9.3f s" % secs if secs is not None else "> %d s (stopped)" % a.noflush_cap))
            ch = b.get("change", {})
            if ch:
                p("  one-service change (backend removed / added back; median of %d):" % next(iter(ch.values()))["n"])
                clabel = {"sock": "socket LB  lb.sync() of the whole list, one service differs",
                          "iptables": "iptables-nft  iptables-restore --noflush of kube-proxy's partial sync",
                          "iptables-leg": "iptables-legacy-restore --noflush of kube-proxy's partial sync",
                          "nftables": "nft -f of kube-proxy's partial-sync transaction"}
                clabel["sock-inc"] = "socket LB  lb.sync(prune=False) of the changed service (incremental)"
                for x in modes[:1] + ["sock-inc"] + modes[1:] if "sock" in modes else modes:
                    if x in ch:
                        extra = " (%d lines)" % b["change_payload"][x] if x in b.get("change_payload", {}) else ""
                        p("    %-72s %9.5f s%s" % (clabel[x], ch[x]["median"], extra))
            bd = b.get("lb_breakdown")
            if bd:
                p("  lb.sync breakdown: lb.normalize() (validation, canonical form) %.3f s, reading the maps (state.FullView) %.3f s;"
                  % (bd["normalize"], bd["read_state"]))
                p("  bpf() floor (pre-encoded entries, BPF_MAP_UPDATE_BATCH): full %.3f s (%d entries), one-service change %.5f s"
                  % (bd["floor_full"], bd["floor_full_entries"], bd["floor_change"]))
        p("")
        p("targets:")
        sock = [(row["services"], row["rates"]["sock"] / row["rates"]["direct"]) for row in r["a"]
                if "sock" in row["rates"] and row["rates"].get("direct")]
        if sock:
            worst = min(v for _n, v in sock)
            p("  (i) >= 0.9x of (iv) at every size: %s (worst %.3fx)" % ("met" if worst >= 0.9 else "MISSED", worst))
            vals = [v for _n, v in sock]
            spread = (max(vals) - min(vals)) / max(vals)
            p("  (i) flat from smallest to largest size (ratios within 5%% of each other): %s (ratios %s; spread %.1f%%)"
              % ("met" if spread <= 0.05 else "MISSED", ", ".join("%.3f" % v for v in vals), 100 * spread))
        full = b.get("full", {}).get("sock") if b else None
        if full is not None:
            p("  full sync of %d services <= 1 s: %s (%.3f s)" % (b.get("services", a.sync_services), "met" if full <= 1 else "MISSED", full))
        ch = b.get("change", {}).get("sock-inc") if b else None
        if ch:
            whole = b["change"]["sock"]["median"]
            p("  one-service change among %d services <= 10 ms: %s (%.5f s with prune=False, the incremental path; "
              "%.3f s when the whole list is synced)"
              % (b.get("services", a.sync_services), "met" if ch["median"] <= 0.010 else "MISSED", ch["median"], whole))
        with open("/proc/loadavg") as f:
            p("load average at the end: %s (other work on the machine adds noise: see --rounds)" % " ".join(f.read().split()[:3]))
        if r["failures"]:
            p("")
            p("FAILURES:")
            for f in r["failures"]:
                p("  " + f)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run", description=__doc__.split("\n\n", maxsplit=1)[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Root only. Prints the table on stdout, progress on stderr. Exit status 1 if any "
                                        "mode failed to deliver connections (or reached fewer than 10 backends).")
    ap.add_argument("--sizes", default="1,1000,10000,30000", help="numbers of services (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per mode and size, interleaved; the median is "
                    "reported (default %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES), help="subset of %(default)s")
    ap.add_argument("--sync-services", type=int, default=10000, help="services for part (b) (default %(default)s)")
    ap.add_argument("--change-reps", type=int, default=3, help="one-service changes: this many removes + add-backs (default %(default)s)")
    ap.add_argument("--nft-max", type=int, default=10000, help="largest size loaded in nftables mode; nft -f of kube-proxy's "
                    "table grows quadratically here (10,000 services take minutes) (default %(default)s)")
    ap.add_argument("--noflush-cap", type=int, default=60, help="stop kube-proxy's exact iptables-restore --noflush (nft "
                    "backend) after this many seconds; 0 = no limit (default %(default)s)")
    ap.add_argument("--noflush-small", type=int, default=1000, help="if the --noflush restore hits the cap, also time it with this "
                    "many services (default %(default)s)")
    ap.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU the client and server run on (default: the last)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 1,100, 1 s, 1 round, part (b) with 100 services (< 60 s)")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.seconds, a.rounds, a.sync_services, a.change_reps = "1,100", 1.0, 1, 100, 1
    a.sizes = [int(x) for x in str(a.sizes).split(",") if x.strip()]
    a.modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    bad = [x for x in a.modes if x not in MODES]
    if bad or "direct" not in a.modes:
        ap.error("--modes: unknown %s (known: %s; direct is required, it is the reference)" % (bad, ",".join(MODES)))
    if any(n < 1 or n > 60000 for n in a.sizes + [a.sync_services]):
        ap.error("sizes must be 1..60000 (VIPs come from 10.96.0.0/16, service ids up to 65535)")
    return a


def main(argv):
    a = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("run as root\n")
        return 2
    for tool in ("ip", "bpftool", "iptables-restore", "iptables-legacy-restore", "nft", "taskset", "make", "findmnt"):
        if not shutil.which(tool):
            sys.stderr.write("%s is not installed\n" % tool)
            return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bench = Bench(a)
    t0 = time.monotonic()
    try:
        bench.machine()
        bench.build()
        bench.topology()
        if "sock" in a.modes:
            bench.socket_lb(max(a.sizes + [a.sync_services]))
        for n in a.sizes:
            bench.measure_size(n)
        bench.part_b()
        bench.results["seconds"] = time.monotonic() - t0
        bench.report()
        print("\ntotal run time %.0f s" % bench.results["seconds"])
        if a.json:
            with open(a.json, "w") as f:
                json.dump(bench.results, f, indent=1, sort_keys=True, default=str)
    finally:
        bench.cleanup()
    return 1 if bench.results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
