# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Routes the dataplane owns, through netlink (pyroute2): direct routes to other nodes' pod CIDRs.

Every route made here carries the routing protocol number ``RTPROT_NETSTACK`` (``ip route`` shows
``proto 220``; iproute2 and FRR name 0-18, 42, 84, 99 and 186-198), so the routes the dataplane owns
are found again without any state file: a route that is no longer wanted is deleted, one that
differs is replaced, and routes of anyone else are never changed - a route of another protocol to
the same destination through another gateway is an error. One through the same gateway (as release
0.1.0 made them, with the default protocol) is adopted: it gets the protocol number. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import socket

RTPROT_NETSTACK = 220
MAIN_TABLE = 254


class RouteError(ValueError):
    """A route that cannot be declared or made; the message names the field."""


def normalize(routes, where="routes"):
    """[{dst, via}] in canonical form (dst a network, via an address of its family), sorted."""
    if not isinstance(routes, list):
        raise RouteError("%s: must be a list" % where)
    out = {}
    for i, r in enumerate(routes):
        w = "%s[%d]" % (where, i)
        if not isinstance(r, dict) or set(r) - set(["dst", "via"]):
            raise RouteError("%s: must be a mapping {dst, via}" % w)
        try:
            dst = ipaddress.ip_network(str(r.get("dst")).strip(), strict=True)
        except ValueError as e:
            raise RouteError("%s.dst: %r is not a network (%s)" % (w, r.get("dst"), e))
        try:
            via = ipaddress.ip_address(str(r.get("via")).strip())
        except ValueError:
            raise RouteError("%s.via: %r is not an address" % (w, r.get("via")))
        if via.version != dst.version:
            raise RouteError("%s.via: %s is not of the family of %s" % (w, via, dst))
        if str(dst) in out and out[str(dst)] != str(via):
            raise RouteError("%s.dst: %s is declared twice with different gateways" % (w, dst))
        out[str(dst)] = str(via)
    nets = sorted(out, key=lambda d: (ipaddress.ip_network(d).version, ipaddress.ip_network(d)))
    return [{"dst": d, "via": out[d]} for d in nets]


def _family(dst):
    return socket.AF_INET6 if ":" in dst else socket.AF_INET


def read(ipr):
    """{dst: (gateway, protocol)} of the main table's unicast routes (both families)."""
    out = {}
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=MAIN_TABLE):
            d = r.get_attr("RTA_DST")
            if d is None:
                continue
            key = str(ipaddress.ip_network("%s/%d" % (d, r["dst_len"]), strict=False))
            out[key] = (r.get_attr("RTA_GATEWAY"), r["proto"])
    return out


def plan(current, wanted):
    """(add, replace, delete) lists from the main table now and the routes wanted; RouteError when a
    route of another protocol holds a destination the dataplane wants."""
    want = dict((r["dst"], r["via"]) for r in wanted)
    add, replace = [], []
    for dst, via in sorted(want.items()):
        have = current.get(dst)
        if have is None:
            add.append({"dst": dst, "via": via})
        elif have[1] != RTPROT_NETSTACK and have[0] == via:
            replace.append({"dst": dst, "via": via, "was": "%s (proto %s, adopted)" % (via, have[1])})
        elif have[1] != RTPROT_NETSTACK:
            raise RouteError("routes: %s is already routed (via %s, proto %s) by someone else; not replacing it"
                             % (dst, have[0] or "a device", have[1]))
        elif have[0] != via:
            replace.append({"dst": dst, "via": via, "was": have[0]})
    delete = [{"dst": d, "via": g} for d, (g, p) in sorted(current.items()) if p == RTPROT_NETSTACK and d not in want]
    return add, replace, delete


def sync(wanted, check=False):
    """Make the routes the dataplane owns exactly ``wanted`` (normalize()d). Returns the list of changes."""
    from pyroute2 import IPRoute    # imported here: only nodes that have routes need pyroute2
    with IPRoute() as ipr:
        add, replace, delete = plan(read(ipr), wanted)
        if not check:
            for r in add + replace:
                net = ipaddress.ip_network(r["dst"])
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, gateway=r["via"],
                          proto=RTPROT_NETSTACK, table=MAIN_TABLE, family=_family(r["dst"]))
            for r in delete:
                net = ipaddress.ip_network(r["dst"])
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen, proto=RTPROT_NETSTACK,
                          table=MAIN_TABLE, family=_family(r["dst"]))
    return (["add %s via %s" % (r["dst"], r["via"]) for r in add]
            + ["replace %s via %s (was via %s)" % (r["dst"], r["via"], r["was"]) for r in replace]
            + ["delete %s via %s" % (r["dst"], r["via"]) for r in delete])
