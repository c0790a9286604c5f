"""Encode kldload.netstack socket-LB map entries as a `bpftool batch` file.

Reference/test tool for bpf/ (used by selftest.sh); the Ansible module side will
reuse the same encoding. The struct layouts are NOT repeated here: they are read
from the "py:" lines of bpf/lib/lb_structs.h (the single source of truth).

  python3 lbctl.py layout                     struct name, Python format, size
  python3 lbctl.py maps [--size NAME=N ...]   map specs: name type key value entries flags
  python3 lbctl.py batch MAPDIR SPEC.json     bpftool batch lines, in commit order

SPEC.json:
  {"config": {"maglev_m": 251},
   "backends4": {"1": "127.0.0.1:8080"}, "backends6": {"1": "[::1]:8080"},
   "services": [{"id": 1, "vip": "10.96.0.10", "port": 80, "proto": "tcp",
                 "backends": [1, 2], "alg": "random|maglev|weighted",
                 "weights": [1, 3], "affinity": 0, "rev": 1, "prev_count": 0}]}

Write order per service (see bpf/README.md): backends (all first), slots
1..count, Maglev half (rev & 1), master slot 0 LAST, then deletion of slots
count+1..prev_count.
"""
import ipaddress
import json
import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "..", "lib", "lb_structs.h")

ALG = {"random": 0, "maglev": 1, "weighted": 2}
SVC_F_AFFINITY = 0x01
PROTO = {"tcp": 6, "udp": 17}

# The map specs and the Maglev table come from the collection's own library (the module side), so
# the selftest exercises the code the modules run. .collections/ is made by scripts/setup.sh.
sys.path.insert(0, os.path.join(HERE, "..", "..", ".collections"))
from ansible_collections.kldload.netstack.plugins.module_utils.lb import MAPS, maglev_table as _maglev  # noqa: E402


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


L = load_layout()


def hexb(b):
    return " ".join(f"{x:02x}" for x in b)


def port_b(p):
    return int(p).to_bytes(2, "big")


def addr_port(s):
    """'1.2.3.4:80' or '[::1]:80' -> (ip_address, port)."""
    m = re.fullmatch(r"\[(.+)\]:(\d+)|([^:]+):(\d+)", s)
    if not m:
        raise SystemExit(f"bad address {s!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return ipaddress.ip_address(host), int(port)


def maglev_table(ids, weights, m):
    return _maglev([(str(b), b, w) for b, w in zip(ids, weights)], m)


def svc_key(fam, vip, port, slot, proto):
    if fam == 4:
        return L["lb4_key"].pack(vip.packed, port_b(port), slot, proto)
    return L["lb6_key"].pack(vip.packed, port_b(port), slot, proto)


def batch(mapdir, spec):
    lines = []

    def upd(name, key, val):
        lines.append(f"map update pinned {mapdir}/{name} key hex {hexb(key)} value hex {hexb(val)}")

    cfg = spec.get("config")
    if cfg:
        upd("kln_lb_config", L["lb_config_key"].pack(0), L["lb_config"].pack(cfg.get("maglev_m", 0), 0))
    maglev_m = (cfg or {}).get("maglev_m", 0)
    for fam in (4, 6):
        for bid, ap in spec.get(f"backends{fam}", {}).items():
            ip, port = addr_port(ap)
            if ip.version != fam:
                raise SystemExit(f"backend {bid} {ap}: not IPv{fam}")
            val = L[f"lb{fam}_backend"].pack(ip.packed, port_b(port), 0, 0)
            upd(f"kln_lb{fam}_backend", L["lb_backend_key"].pack(int(bid)), val)
    for s in spec.get("services", []):
        vip = ipaddress.ip_address(s["vip"])
        fam = vip.version
        smap = f"kln_lb{fam}_svc"
        proto = PROTO[s["proto"]]
        ids = [int(b) for b in s.get("backends", [])]
        weights = [int(w) for w in s.get("weights", [1] * len(ids))]
        alg = ALG[s.get("alg", "random")]
        rev = int(s.get("rev", 1))
        sid = int(s["id"])
        cum = 0
        for slot, (bid, w) in enumerate(zip(ids, weights), start=1):
            cum += w
            val = L["lb_service"].pack(bid, 0, sid, 0, 0, cum if alg == ALG["weighted"] else 0, 0, 0)
            upd(smap, svc_key(fam, vip, s["port"], slot, proto), val)
        if alg == ALG["maglev"]:
            if not maglev_m:
                raise SystemExit("maglev service needs config.maglev_m")
            base = (sid * 2 + (rev & 1)) * maglev_m
            for i, bid in enumerate(maglev_table(ids, weights, maglev_m)):
                upd("kln_lb_maglev", L["lb_maglev_key"].pack(base + i), L["lb_maglev_val"].pack(bid))
        flags = SVC_F_AFFINITY if s.get("affinity") else 0
        master = L["lb_service"].pack(0, len(ids), sid, alg, flags,
                                      cum if alg == ALG["weighted"] else 0,
                                      int(s.get("affinity", 0)), rev)
        upd(smap, svc_key(fam, vip, s["port"], 0, proto), master)  # commit point
        for slot in range(len(ids) + 1, int(s.get("prev_count", 0)) + 1):
            lines.append(f"map delete pinned {mapdir}/{smap} key hex {hexb(svc_key(fam, vip, s['port'], slot, proto))}")
    return lines


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "layout":
        for name, st in L.items():
            print(name, st.format, st.size)
        return 0
    if argv[0] == "maps":
        sizes = {}
        args = argv[1:]
        while args:
            if args[0] != "--size" or len(args) < 2:
                raise SystemExit("usage: lbctl.py maps [--size NAME=N ...]")
            k, v = args[1].split("=", 1)
            if k not in MAPS:
                raise SystemExit(f"unknown map {k}")
            sizes[k] = int(v)
            args = args[2:]
        for name, (typ, k, v, n, flags) in MAPS.items():
            print(name, typ, L[k].size, L[v].size, sizes.get(name, n), flags)
        return 0
    if argv[0] == "batch" and len(argv) == 3:
        with open(argv[2], encoding="utf-8") as f:
            spec = json.load(f)
        print("\n".join(batch(argv[1], spec)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
