# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connected UDP sockets to backends that left every service."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import addr_port


def destroy_udp_sockets(backends, run):
    """Destroy connected UDP sockets whose peer is one of ``backends`` [(ip, port)], in every netns.

    A connected UDP socket keeps the backend connect() chose; when that backend leaves every
    service the socket would send to it for ever, so it is destroyed (sock_diag SOCK_DESTROY via
    ``ss -K``; the socket is disconnected - recv() fails with ECONNABORTED, send() with EDESTADDRREQ -
    and the application connects again through the VIP). One ``ss`` per
    network namespace that has a process (found through /proc/*/ns/net). Returns the number of
    sockets destroyed. ``run(argv) -> (rc, out, err)``.
    """
    if not backends:
        return 0
    seen = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ino = os.stat("/proc/%s/ns/net" % pid).st_ino
        except OSError:
            continue
        seen.setdefault(ino, pid)
    expr = []
    for ip, port in backends:
        if expr:
            expr.append("or")
        expr += ["dst", addr_port(ip, port)]
    killed = 0
    for pid in sorted(seen.values(), key=int):
        rc, out, _err = run(["nsenter", "--net=/proc/%s/ns/net" % pid, "ss", "-K", "-u", "-n", "-H", "state",
                             "established"] + expr)
        if rc == 0:
            killed += len([ln for ln in out.splitlines() if ln.strip()])
    return killed
