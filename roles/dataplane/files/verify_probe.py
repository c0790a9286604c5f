# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""verify_probe - the test server and client of the dataplane role's live checks (verify.yml) and of
the lab tests. Not part of the product's node command: verify copies it to /run/netstack-verify/
for the duration of the checks and removes it after.

  verify_probe.py echo --tcp PORT --udp PORT [--seconds N]
        test server: answers "<hostname> <backend address> <client address>"
  verify_probe.py probe --vip IP --port N [--proto tcp|udp] [--count N] [--pod NAME --cgroup-root DIR]
                        [--source-port BASE] [--timeout S]
        test client; prints JSON {backends: {addr: n}, clients: [...], peers: [...], errors: {...}, flows, seconds}
  verify_probe.py pod add|delete NAME --cgroup-root DIR [--address A/32]
        a pod-like netns + cgroup on this node, for probes
  verify_probe.py stream-server --port N [--seconds N]
        echoes every TCP byte on long-lived connections and every UDP datagram, on one port
  verify_probe.py stream --target IP --port N [--rate N] [--stop-file F] [--max-seconds S]
        continuous traffic until F exists: one long-lived TCP connection (a message and its echo every
        1/rate s), new TCP connections (rate/10 per second), UDP datagrams with sequence numbers (rate per
        second); prints JSON {udp_sent, udp_lost, tcp_messages, tcp_errors, connections, connection_failures}
  verify_probe.py matrix SPEC|-
        every source network namespace tries every target at once: JSON {source: {target: ok|refused|timeout}}
"""
import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


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
        _enter_pod(args.cgroup_root, args.pod)
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
                if args.rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(args.timeout)
                if sport:
                    s.bind(("0.0.0.0", sport))
                s.sendto(b"hi\n", (args.vip, args.port))
                data, src = s.recvfrom(256)
                res["peers"].add(_fmt(src))
            s.close()
            # verify_probe echo: "<host> <backend> <client>"; a workload's server: "<pod> <proto> <port> <backend> <client> ..."
            fields = data.decode(errors="replace").split("\n")[0].split()
            backend, client = (fields[3], fields[4]) if len(fields) >= 5 else (fields[1], fields[2])
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


def _pod_cgroup(root, name):
    return os.path.join(root, "netstack-pod-%s" % name)


def _enter_pod(root, name):
    cg = _pod_cgroup(root, name)
    if not os.path.isdir(cg) or not os.path.exists("/run/netns/netstack-pod-%s" % name):
        sys.exit("verify_probe: pod %s does not exist (verify_probe pod add %s)" % (name, name))
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open("/run/netns/netstack-pod-%s" % name) as f:
        os.setns(f.fileno(), os.CLONE_NEWNET)


def _ip(*argv):
    subprocess.run(["ip"] + list(argv), check=True)


def cmd_pod(args):
    ns = "netstack-pod-%s" % args.name
    host_if = ("np" + args.name)[:15]
    cg = _pod_cgroup(args.cgroup_root, args.name)
    if args.action == "add":
        if not args.address:
            sys.exit("verify_probe: pod add needs --address A/32")
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
                    sys.exit("verify_probe: net.ipv4.ip_forward is 0 on this node; pods cannot reach other nodes")
        os.makedirs(cg, exist_ok=True)
    else:
        if os.path.exists("/run/netns/" + ns):
            subprocess.run(["ip", "link", "del", host_if], check=False)
            _ip("netns", "del", ns)
        if os.path.isdir(cg):
            os.rmdir(cg)


def cmd_stream_server(args):
    import threading

    def serve(c):
        c.settimeout(args.seconds)
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        c.close()

    t = socket.socket(socket.AF_INET)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", args.port))
    t.listen(512)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", args.port))

    def udp():
        while True:
            d, a = u.recvfrom(2048)
            u.sendto(d, a)
    threading.Thread(target=udp, daemon=True).start()
    t.settimeout(1)
    end = time.time() + args.seconds
    print("up", flush=True)
    while time.time() < end:
        try:
            c, _a = t.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def cmd_stream(args):
    import threading
    res = {"udp_sent": 0, "udp_lost": 0, "tcp_messages": 0, "tcp_errors": [], "connections": 0,
           "connection_failures": []}
    stop = threading.Event()
    gap = 1.0 / args.rate
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((args.target, args.port))
    echoed = set()

    def udp_rx():
        u.settimeout(0.5)
        while not (stop.is_set() and len(echoed) >= res["udp_sent"]):
            try:
                echoed.add(struct.unpack("!I", u.recv(64)[:4])[0])
            except socket.timeout:
                if stop.is_set():
                    break
            except OSError:
                time.sleep(0.01)

    def tcp_long():
        try:
            c = socket.create_connection((args.target, args.port), timeout=5)
            n = 0
            while not stop.is_set():
                msg = struct.pack("!I", n) * 4
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    d = c.recv(len(msg) - len(got))
                    if not d:
                        raise OSError("connection closed by the server")
                    got += d
                if got != msg:
                    raise OSError("echo %r is not %r" % (got, msg))
                n += 1
                res["tcp_messages"] = n
                time.sleep(gap)
            c.close()
        except OSError as e:
            res["tcp_errors"].append("%s after %d messages" % (e, res["tcp_messages"]))

    def tcp_new():
        while not stop.is_set():
            try:
                c = socket.create_connection((args.target, args.port), timeout=5)
                c.sendall(b"new\n")
                if c.recv(16) != b"new\n":
                    raise OSError("no echo")
                c.close()
                res["connections"] += 1
            except OSError as e:
                res["connection_failures"].append(str(e))
            time.sleep(gap * 10)

    threads = [threading.Thread(target=f) for f in (udp_rx, tcp_long, tcp_new)]
    for t in threads:
        t.start()
    end = time.time() + args.max_seconds
    nxt = time.time()
    while time.time() < end and not (args.stop_file and os.path.exists(args.stop_file)):
        try:
            u.send(struct.pack("!I", res["udp_sent"]) + b"x" * 60)
        except OSError:
            pass                # counted as lost: no echo comes
        res["udp_sent"] += 1
        nxt += gap
        time.sleep(max(0.0, nxt - time.time()))
    time.sleep(2)               # the last echoes
    stop.set()
    for t in threads:
        t.join(10)
    res["udp_lost"] = res["udp_sent"] - len(echoed & set(range(res["udp_sent"])))
    print(json.dumps(res, sort_keys=True))


def _try(target, timeout):
    """One connection attempt: "ok" (answered), "refused" (a reset or an ICMP error: the path is open, nothing
    listens) or "timeout" (no answer: dropped on the way)."""
    fam = socket.AF_INET6 if ":" in target["ip"] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if target["proto"] == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if target["proto"] == "tcp":
            s.connect((target["ip"], target["port"]))
            s.recv(256)
        else:
            s.connect((target["ip"], target["port"]))
            s.send(b"matrix\n")
            s.recv(4096)
        return "ok"
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "error: %s" % (e.strerror or e)
    finally:
        s.close()


def _probe_all(targets, timeout):
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, max(1, len(targets)))) as ex:
        found = list(ex.map(lambda t: _try(t, timeout), targets))
    return dict((t["key"], r) for t, r in zip(targets, found))


def cmd_matrix(args):
    """Every source (a network namespace) tries every target at once, one child process per source (setns);
    prints JSON {source key: {target key: ok|refused|timeout|error: ...}}."""
    spec = json.loads(sys.stdin.read() if args.spec == "-" else args.spec)
    children = []
    for src in spec["sources"]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                fd = os.open(src["netns"], os.O_RDONLY)
                os.setns(fd, os.CLONE_NEWNET)
                out = _probe_all([t for t in spec["targets"] if t.get("dst", t["key"]) != src["key"]],
                                 spec.get("timeout", 1.0))
            except Exception as e:  # pylint: disable=broad-except  # reported, not raised: the parent prints it
                out = {"error": str(e)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        children.append((src["key"], r, pid))
    results = {}
    for key, r, pid in children:
        data = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        results[key] = json.loads(data.decode() or "{}")
    print(json.dumps(results, sort_keys=True))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="verify_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
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
    p.add_argument("--cgroup-root")
    p.add_argument("--source-port", type=int, default=0)
    p.add_argument("--rst", action="store_true",
                   help="close TCP with a reset: no TIME_WAIT left, so that thousands of connections to one server "
                        "do not use up the ephemeral ports (connection-rate benchmarks)")
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("pod")
    p.add_argument("action", choices=["add", "delete"])
    p.add_argument("name")
    p.add_argument("--address")
    p.add_argument("--cgroup-root", required=True)
    p.set_defaults(fn=cmd_pod)
    p = sub.add_parser("stream-server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=int, default=600)
    p.set_defaults(fn=cmd_stream_server)
    p = sub.add_parser("stream")
    p.add_argument("--target", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--stop-file")
    p.add_argument("--max-seconds", type=int, default=600)
    p.set_defaults(fn=cmd_stream)
    p = sub.add_parser("matrix")
    p.add_argument("spec", help='JSON {"sources": [{key, netns}], "targets": [{key, dst, ip, port, proto}], "timeout": S} '
                                'or -; a source skips the targets whose dst is its key')
    p.set_defaults(fn=cmd_matrix)
    args = ap.parse_args(argv)
    if getattr(args, "pod", None) and not args.cgroup_root:
        ap.error("--pod needs --cgroup-root")
    args.fn(args)


if __name__ == "__main__":
    main()
