# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""workload-server - the process of a lab workload (pod), run in the pod's network namespace by the
kldload.netstack.workloads module. Python 3 standard library only.

  workload-server.py --namespace NS --name NAME [--tcp PORT]... [--udp PORT]...

- TCP: on connect sends one line ``<ns>/<name> tcp <port> <local address> <peer address>\\n``, then
  echoes every byte it receives until the peer closes (long transfers work: it is a plain echo).
- UDP: answers each datagram with one datagram ``<ns>/<name> udp <port> <local address> <peer address>
  <received length>\\n`` followed by the received bytes (an echo with a header naming the pod).
  Both headers put the addresses in fields 4 and 5, as verify_probe.py reads them.
- Listens on IPv4 (0.0.0.0) and, when the namespace has IPv6, on IPv6 (::, IPV6_V6ONLY) too.
- Tells systemd it is ready (sd_notify READY=1 over NOTIFY_SOCKET) once every socket is bound, so a
  ``Type=notify`` unit is started only when the ports answer.
"""
import argparse
import os
import selectors
import socket
import sys


def _notify_ready():
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(path)
        s.sendall(b"READY=1\nSTATUS=listening\n")
    finally:
        s.close()


def _families():
    fams = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.close()
            fams.append((socket.AF_INET6, "::"))
        except OSError:
            pass
    return fams


def _bind(fam, host, kind, port):
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


def _addr(a):
    return "[%s]:%d" % (a[0], a[1]) if ":" in a[0] else "%s:%d" % (a[0], a[1])


def serve(pod, tcp_ports, udp_ports):
    sel = selectors.DefaultSelector()
    for fam, host in _families():
        for kind, ports in ((socket.SOCK_STREAM, tcp_ports), (socket.SOCK_DGRAM, udp_ports)):
            for port in ports:
                try:
                    s = _bind(fam, host, kind, port)
                except OSError as e:
                    if fam == socket.AF_INET6 and e.errno == 99:   # EADDRNOTAVAIL: no IPv6 here
                        continue
                    raise
                sel.register(s, selectors.EVENT_READ, ("listen" if kind == socket.SOCK_STREAM else "udp", port))
    _notify_ready()
    pending = {}     # connection socket -> (bytes still to send, peer closed)
    while True:
        for key, events in sel.select():
            sock, (role, port) = key.fileobj, key.data
            if role == "listen":
                try:
                    conn, peer = sock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                local = conn.getsockname()
                pending[conn] = (("%s tcp %d %s %s\n" % (pod, port, _addr(local), _addr(peer))).encode(), False)
                sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, ("conn", port))
            elif role == "udp":
                try:
                    data, peer = sock.recvfrom(65535)
                except OSError:
                    continue
                local = _addr((_source_for(sock, peer), port))
                head = ("%s udp %d %s %s %d\n" % (pod, port, local, _addr(peer), len(data))).encode()
                try:
                    sock.sendto((head + data)[:65507], peer)
                except OSError:
                    pass
            else:
                _conn_event(sel, sock, events, pending)


def _source_for(sock, peer):
    """The address this namespace answers ``peer`` from (the socket is bound to the wildcard)."""
    probe = socket.socket(sock.family, socket.SOCK_DGRAM)
    try:
        probe.connect(peer[:2])
        return probe.getsockname()[0]
    except OSError:
        return sock.getsockname()[0]
    finally:
        probe.close()


_HIGH_WATER = 1 << 20      # stop reading a connection while this much echo is waiting to be sent


def _conn_event(sel, conn, events, pending):
    """Echo: read into the connection's buffer, send from it; after the peer closed its side (EOF)
    send what is left, then close."""
    data, closing = pending[conn]
    try:
        if events & selectors.EVENT_READ and not closing:
            chunk = conn.recv(65536)
            if chunk:
                data += chunk
            else:
                closing = True
        if data and events & selectors.EVENT_WRITE:
            data = data[conn.send(data):]
    except OSError:
        data, closing = b"", True
    if closing and not data:
        sel.unregister(conn)
        del pending[conn]
        conn.close()
        return
    pending[conn] = (data, closing)
    want = (selectors.EVENT_READ if not closing and len(data) < _HIGH_WATER else 0) | \
        (selectors.EVENT_WRITE if data else 0)
    sel.modify(conn, want, sel.get_key(conn).data)


def main(argv=None):
    p = argparse.ArgumentParser(description="lab workload server (kldload.netstack)")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--tcp", type=int, action="append", default=[])
    p.add_argument("--udp", type=int, action="append", default=[])
    args = p.parse_args(argv)
    serve("%s/%s" % (args.namespace, args.name), args.tcp, args.udp)


if __name__ == "__main__":
    sys.exit(main())
