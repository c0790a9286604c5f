"""Test backend for selftest.sh: HTTP (http.server) + UDP echo, dual-stack.

  lbtest_backend.py NAME PORTFILE
Binds [::]:0 with IPV6_V6ONLY=0 (so 127.0.0.1 and ::1 both reach it) for TCP
and UDP, writes "TCP_PORT UDP_PORT" to PORTFILE, serves until killed.
HTTP GET answers "backend NAME"; a UDP datagram D is answered with "NAME:D".
"""
import http.server
import os
import socket
import sys
import threading

NAME, PORTFILE = sys.argv[1], sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"backend {NAME}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_echo(sock):
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(NAME.encode() + b":" + data, peer)


httpd = Server(("::", 0), Handler)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", 0))
threading.Thread(target=udp_echo, args=(udp,), daemon=True).start()
with open(PORTFILE + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{httpd.server_address[1]} {udp.getsockname()[1]}\n")
os.rename(PORTFILE + ".tmp", PORTFILE)
httpd.serve_forever()
