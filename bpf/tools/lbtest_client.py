"""Test client for selftest.sh; meant to run inside the test cgroup.

Every socket is bound to device "lo" (SO_BINDTODEVICE), so even if the BPF
translation did not happen nothing leaves the machine. Output: one line,
exit status 0 = check passed.

  tcp HOST PORT [N]        N connections: peer must be HOST:PORT; prints backends seen
  udp HOST PORT [N]        one unconnected socket, N sendto/recvfrom: source must be HOST:PORT
  udpc HOST PORT           connected UDP: send/recv, getpeername must be HOST:PORT
  refuse HOST PORT         connect must fail with EPERM at once
  refuse-udp HOST PORT     sendto must fail with EPERM at once
"""
import errno
import ipaddress
import socket
import sys
import time

TIMEOUT = 3.0


def sock(host, typ):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, typ)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    s.settimeout(TIMEOUT)
    return s


def same(peer, host, port):
    return ipaddress.ip_address(peer[0]) == ipaddress.ip_address(host) and peer[1] == port


def tcp(host, port, n=1):
    seen = []
    for _conn in range(n):
        s = sock(host, socket.SOCK_STREAM)
        s.connect((host, port))
        peer = s.getpeername()
        if not same(peer, host, port):
            return f"getpeername {peer[:2]} != {host}:{port}", 1
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
        if not body.startswith("backend "):
            return f"bad reply {data[:80]!r}", 1
        seen.append(body.split()[1])
    return f"peer={host}:{port} backends={','.join(seen)}", 0


def udp(host, port, n=1):
    s = sock(host, socket.SOCK_DGRAM)
    seen = []
    for i in range(n):
        s.sendto(f"ping{i}".encode(), (host, port))
        data, src = s.recvfrom(2048)
        if not same(src, host, port):
            return f"recvfrom source {src[:2]} != {host}:{port}", 1
        name, _sep, echo = data.decode().partition(":")
        if echo != f"ping{i}":
            return f"bad echo {data!r}", 1
        seen.append(name)
    return f"source={host}:{port} backends={','.join(seen)}", 0


def udpc(host, port):
    s = sock(host, socket.SOCK_DGRAM)
    s.connect((host, port))
    peer = s.getpeername()
    if not same(peer, host, port):
        return f"getpeername {peer[:2]} != {host}:{port}", 1
    s.send(b"hello")
    data, src = s.recvfrom(2048)
    if not same(src, host, port):
        return f"recvfrom source {src[:2]} != {host}:{port}", 1
    return f"peer={host}:{port} reply={data.decode()}", 0


def refuse(host, port, typ):
    s = sock(host, typ)
    t = time.monotonic()
    try:
        if typ == socket.SOCK_STREAM:
            s.connect((host, port))
        else:
            s.sendto(b"x", (host, port))
        return "connected/sent, expected EPERM", 1
    except OSError as e:
        dt = time.monotonic() - t
        if e.errno == errno.EPERM and dt < 0.5:
            return f"EPERM after {dt * 1000:.1f} ms", 0
        return f"{e!r} after {dt:.2f} s, expected EPERM at once", 1


def main(a):
    cmd, host, port = a[0], a[1], int(a[2])
    n = int(a[3]) if len(a) > 3 else 1
    try:
        if cmd == "tcp":
            msg, rc = tcp(host, port, n)
        elif cmd == "udp":
            msg, rc = udp(host, port, n)
        elif cmd == "udpc":
            msg, rc = udpc(host, port)
        elif cmd == "refuse":
            msg, rc = refuse(host, port, socket.SOCK_STREAM)
        elif cmd == "refuse-udp":
            msg, rc = refuse(host, port, socket.SOCK_DGRAM)
        else:
            msg, rc = f"unknown command {cmd}", 2
    except OSError as e:
        msg, rc = repr(e), 1
    print(msg)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
