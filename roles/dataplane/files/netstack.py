# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""netstack - the node-side command of kldload.netstack (installed by the dataplane role).

  netstack lb list [--json]            the socket load balancer's service table (like cilium bpf lb list)
  netstack dataplane restore           load + attach the programs, program the last applied services,
                                       install the direct routes (run at boot by netstack-dataplane.service)
  netstack dataplane status [--json]   what is pinned and attached
  netstack routes sync [--check]       direct routes to the other nodes' pod CIDRs (from the config)
  netstack routes delete               remove them
  netstack echo --tcp PORT --udp PORT [--seconds N]
                                       test server: answers "<hostname> <client address>" (verify)
  netstack probe --vip IP --port N [--proto tcp|udp] [--count N] [--pod NAME] [--source-port BASE]
                                       test client; prints JSON {backends: {name: n}, clients: [...], ...}
  netstack pod add|delete NAME [--address A/32]
                                       a pod-like netns + cgroup on this node, for probes (verify)

Configuration: /etc/kldload-netstack/dataplane.json (written by the role). Libraries:
/usr/lib/kldload-netstack/python (the collection's module_utils, copied by the role).
"""
import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

LIB = "/usr/lib/kldload-netstack/python"
CONFIG = "/etc/kldload-netstack/dataplane.json"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
sys.path.insert(0, os.environ.get("NETSTACK_LIB", LIB))

from ansible_collections.kldload.netstack.plugins.module_utils import bpfprog, lb  # noqa: E402


def _config():
    try:
        with open(os.environ.get("NETSTACK_CONFIG", CONFIG)) as f:
            return json.load(f)
    except OSError as e:
        sys.exit("netstack: cannot read %s: %s (is the dataplane role applied?)" % (CONFIG, e.strerror))


def cmd_lb_list(args):
    cfg = _config()
    rows = lb.table(cfg["map_dir"], cfg.get("state_file"))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(lb.format_table(rows))


def cmd_restore(_args):
    cfg = _config()
    t0 = time.time()
    routes = sync_routes(cfg.get("routes", []), check=False)
    res = bpfprog.ensure(os.path.join(cfg["pin_path"], cfg["name"]), cfg["object"], cfg["attach"], cfg.get("maps", {}))
    svc = lb.sync(cfg["map_dir"], lb.load_state(cfg["state_file"]), prune=True, maglev_m=cfg.get("maglev_table_size", lb.DEFAULT_MAGLEV_M),
                  state_file=cfg["state_file"])
    print("netstack: dataplane restored in %.2fs: programs %s, %d services %s, routes %s"
          % (time.time() - t0, "reloaded" if res["changed"] else "already in place", svc["services"],
             "written" if svc["changed"] else "already in place", "changed" if routes else "in place"))


def cmd_status(args):
    cfg = _config()
    rep = bpfprog.report(os.path.join(cfg["pin_path"], cfg["name"]))
    if args.json:
        print(json.dumps(rep, indent=1))
        return
    print("programs:")
    for n, p in sorted(rep["programs"].items()):
        print("  %-16s id %-6d tag %s" % (n, p["id"], p["tag"]))
    print("attachments:")
    for a in rep["attachments"]:
        print("  %-16s %-26s link %d%s" % (a["program"], a["type"], a["link_id"],
                                           " ifindex %s" % a["ifindex"] if "ifindex" in a else ""))
    print("maps:")
    for n, m in sorted(rep["maps"].items()):
        print("  %-16s %-9s %d entries" % (n, m["type"], m["max_entries"]))


def sync_routes(routes, check):
    """Make 'dst via gateway' routes exist (main table); returns the list of changes."""
    if not routes:
        return []
    from pyroute2 import IPRoute
    changes = []
    with IPRoute() as ipr:
        for r in routes:
            dst, plen = r["dst"].split("/")
            have = [x for x in ipr.get_routes(table=254, family=socket.AF_INET6 if ":" in dst else socket.AF_INET)
                    if x.get_attr("RTA_DST") == dst and x["dst_len"] == int(plen)]
            gws = [x.get_attr("RTA_GATEWAY") for x in have]
            if gws == [r["via"]]:
                continue
            changes.append("%s via %s" % (r["dst"], r["via"]))
            if not check:
                ipr.route("replace", dst=dst, dst_len=int(plen), gateway=r["via"])
    return changes


def delete_routes(routes):
    from pyroute2 import IPRoute
    changes = []
    with IPRoute() as ipr:
        for r in routes:
            dst, plen = r["dst"].split("/")
            try:
                ipr.route("del", dst=dst, dst_len=int(plen), gateway=r["via"])
                changes.append("%s via %s" % (r["dst"], r["via"]))
            except Exception:  # not there
                pass
    return changes


def cmd_routes(args):
    routes = _config().get("routes", [])
    changes = delete_routes(routes) if args.sub == "delete" else sync_routes(routes, args.check)
    print(json.dumps({"changed": bool(changes), "routes": changes}))


# ---- test server and client (verify) -------------------------------------------------------------

def cmd_echo(args):
    import selectors
    sel = selectors.DefaultSelector()
    name = socket.gethostname()
    socks = []
    for port in args.tcp or []:
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        s.listen(512)
        sel.register(s, selectors.EVENT_READ, "tcp")
        socks.append(s)
    for port in args.udp or []:
        # one socket per family, each told the destination address of every datagram (pktinfo), so the
        # reply leaves from the address the client sent to: the backend address
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s4.bind(("0.0.0.0", port))
        sel.register(s4, selectors.EVENT_READ, "udp4")
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s6.bind(("::", port))
        sel.register(s6, selectors.EVENT_READ, "udp6")
        socks += [s4, s6]
    end = time.time() + args.seconds
    while time.time() < end:
        for key, _ev in sel.select(timeout=1):
            s = key.fileobj
            if key.data == "tcp":
                c, addr = s.accept()
                c.settimeout(2)
                try:
                    c.recv(256)
                    c.sendall(("%s %s %s\n" % (name, _fmt(c.getsockname()), _fmt(addr))).encode())
                except OSError:
                    pass
                c.close()
            else:
                _data, anc, _flags, addr = s.recvmsg(256, 1024)
                if key.data == "udp4":
                    info = [d for lvl, typ, d in anc if lvl == socket.IPPROTO_IP and typ == IP_PKTINFO]
                    local = socket.inet_ntop(socket.AF_INET, info[0][8:12]) if info else "0.0.0.0"
                    cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, info[0][8:12], bytes(4)))] if info else []
                else:
                    info = [d for lvl, typ, d in anc if lvl == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO]
                    local = socket.inet_ntop(socket.AF_INET6, info[0][:16]) if info else "::"
                    cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info[0])] if info else []
                reply = ("%s %s %s\n" % (name, _fmt((local, s.getsockname()[1])), _fmt(addr))).encode()
                s.sendmsg([reply], cmsg, 0, addr)


def _fmt(addr):
    ip = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return "%s:%d" % (ip, addr[1])


def cmd_probe(args):
    if args.pod:
        _enter_pod(args.pod)
    res = {"backends": {}, "clients": set(), "errors": {}, "peers": set(), "flows": {}, "count": args.count}
    t0 = time.time()
    for i in range(args.count):
        sport = args.source_port + i if args.source_port else 0
        try:
            if args.proto == "tcp":
                s = socket.socket(socket.AF_INET)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(args.timeout)
                if sport:
                    s.bind(("0.0.0.0", sport))
                s.connect((args.vip, args.port))
                res["peers"].add(_fmt(s.getpeername()))
                s.sendall(b"hi\n")
                data = s.recv(256)
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(args.timeout)
                if sport:
                    s.bind(("0.0.0.0", sport))
                s.sendto(b"hi\n", (args.vip, args.port))
                data, src = s.recvfrom(256)
                res["peers"].add(_fmt(src))
            s.close()
            _name, backend, client = data.decode().split()
            res["backends"][backend] = res["backends"].get(backend, 0) + 1
            res["clients"].add(client.rsplit(":", 1)[0])
            if sport:
                res["flows"][str(sport)] = backend
        except OSError as e:
            key = e.strerror or str(e)
            res["errors"][key] = res["errors"].get(key, 0) + 1
            try:
                s.close()
            except (OSError, UnboundLocalError):
                pass
    res["seconds"] = round(time.time() - t0, 3)
    res["clients"] = sorted(res["clients"])
    res["peers"] = sorted(res["peers"])
    print(json.dumps(res, sort_keys=True))


def _cgroup2():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fs = parts[parts.index("-") + 1]
            if fs == "cgroup2":
                return parts[4]
    sys.exit("netstack: no cgroup2 mount")


def _pod_cgroup(name):
    return os.path.join(_cgroup2(), "netstack-pod-%s" % name)


def _enter_pod(name):
    cg = _pod_cgroup(name)
    if not os.path.isdir(cg) or not os.path.exists("/run/netns/netstack-pod-%s" % name):
        sys.exit("netstack: pod %s does not exist (netstack pod add %s)" % (name, name))
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open("/run/netns/netstack-pod-%s" % name) as f:
        os.setns(f.fileno(), os.CLONE_NEWNET)


def _ip(*argv):
    subprocess.run(["ip"] + list(argv), check=True)


def cmd_pod(args):
    ns = "netstack-pod-%s" % args.name
    host_if = ("np" + args.name)[:15]
    cg = _pod_cgroup(args.name)
    if args.action == "add":
        if not args.address:
            sys.exit("netstack: pod add needs --address A/32")
        addr = args.address.split("/")[0]
        if not os.path.exists("/run/netns/" + ns):
            _ip("netns", "add", ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", ns, "addr", "add", args.address, "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            # the pod's gateway is a link-local address on the node side of its veth
            _ip("addr", "add", "169.254.1.1/32", "dev", host_if, "scope", "link")
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            _ip("-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
            _ip("route", "replace", addr + "/32", "dev", host_if)
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                if f.read().strip() != "1":
                    sys.exit("netstack: net.ipv4.ip_forward is 0 on this node; pods cannot reach other nodes")
        os.makedirs(cg, exist_ok=True)
    else:
        if os.path.exists("/run/netns/" + ns):
            subprocess.run(["ip", "link", "del", host_if], check=False)
            _ip("netns", "del", ns)
        if os.path.isdir(cg):
            os.rmdir(cg)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="netstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_lb = sub.add_parser("lb").add_subparsers(dest="sub", required=True)
    p = p_lb.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lb_list)
    p_dp = sub.add_parser("dataplane").add_subparsers(dest="sub", required=True)
    p_dp.add_parser("restore").set_defaults(fn=cmd_restore)
    p = p_dp.add_parser("status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p_rt = sub.add_parser("routes").add_subparsers(dest="sub", required=True)
    p = p_rt.add_parser("sync")
    p.add_argument("--check", action="store_true")
    p.set_defaults(fn=cmd_routes)
    p_rt.add_parser("delete").set_defaults(fn=cmd_routes, check=False)
    p = sub.add_parser("echo")
    p.add_argument("--tcp", type=int, action="append")
    p.add_argument("--udp", type=int, action="append")
    p.add_argument("--seconds", type=int, default=300)
    p.set_defaults(fn=cmd_echo)
    p = sub.add_parser("probe")
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--pod")
    p.add_argument("--source-port", type=int, default=0)
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("pod")
    p.add_argument("action", choices=["add", "delete"])
    p.add_argument("name")
    p.add_argument("--address")
    p.set_defaults(fn=cmd_pod)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (lb.LbError, bpfprog.ProgError, OSError) as e:
        sys.exit("netstack: %s" % e)


if __name__ == "__main__":
    main()
