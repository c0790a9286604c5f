# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Routes the dataplane owns, through netlink (pyroute2): the routes to other nodes' pod CIDRs (the
pod network's, podnet.py: via the underlay in native mode, via the VXLAN device ``onlink`` in tunnel
mode) and the configuration's own ``routes``, made by one sync().

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
RTNH_F_ONLINK = 4


class RouteError(ValueError):
    """A route that cannot be declared or made; the message names the field."""


def normalize(routes, where="routes"):
    """[{dst, via[, dev][, onlink][, src]}] in canonical form (dst a network, via an address of its family,
    dev a device name, onlink true: the gateway is on ``dev`` whatever its addresses, src the source
    address the node picks for it), sorted."""
    if not isinstance(routes, list):
        raise RouteError("%s: must be a list" % where)
    out = {}
    for i, r in enumerate(routes):
        w = "%s[%d]" % (where, i)
        if not isinstance(r, dict) or set(r) - set(["dst", "via", "dev", "onlink", "src"]):
            raise RouteError("%s: must be a mapping {dst, via[, dev][, onlink][, src]}" % w)
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
        dev = r.get("dev") or None
        if dev is not None and (not isinstance(dev, str) or len(dev) > 15):
            raise RouteError("%s.dev: %r is not a device name" % (w, dev))
        onlink = r.get("onlink", False)
        if not isinstance(onlink, bool) or (onlink and dev is None):
            raise RouteError("%s.onlink: true or false (true needs dev), got %r" % (w, onlink))
        route = {"dst": str(dst), "via": str(via)}
        if dev:
            route["dev"] = dev
        if onlink:
            route["onlink"] = True
        if r.get("src"):
            try:
                src = ipaddress.ip_address(str(r["src"]).strip())
            except ValueError:
                raise RouteError("%s.src: %r is not an address" % (w, r.get("src")))
            if src.version != dst.version:
                raise RouteError("%s.src: %s is not of the family of %s" % (w, src, dst))
            route["src"] = str(src)
        if str(dst) in out and out[str(dst)] != route:
            raise RouteError("%s.dst: %s is declared twice with different gateways" % (w, dst))
        out[str(dst)] = route
    nets = sorted(out, key=lambda d: (ipaddress.ip_network(d).version, ipaddress.ip_network(d)))
    return [out[d] for d in nets]


def _family(dst):
    return socket.AF_INET6 if ":" in dst else socket.AF_INET


def read(ipr):
    """{dst: (gateway, protocol, device name, onlink, prefsrc)} of the main table's unicast routes (both families)."""
    out = {}
    names = dict((lk["index"], lk.get_attr("IFLA_IFNAME")) for lk in ipr.get_links())
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=MAIN_TABLE):
            d = r.get_attr("RTA_DST")
            if d is None:
                continue
            key = str(ipaddress.ip_network("%s/%d" % (d, r["dst_len"]), strict=False))
            out[key] = (r.get_attr("RTA_GATEWAY"), r["proto"], names.get(r.get_attr("RTA_OIF")),
                        bool(r["flags"] & RTNH_F_ONLINK), r.get_attr("RTA_PREFSRC"))
    return out


def plan(current, wanted):
    """(add, replace, delete) lists from the main table now and the routes wanted; RouteError when a
    route of another protocol holds a destination the dataplane wants."""
    want = dict((r["dst"], r) for r in wanted)
    add, replace = [], []
    for dst, r in sorted(want.items()):
        via = r["via"]
        have = current.get(dst)
        if have is None:
            add.append(dict(r))
        elif have[1] != RTPROT_NETSTACK and have[0] == via:
            replace.append(dict(r, was="%s (proto %s, adopted)" % (via, have[1])))
        elif have[1] != RTPROT_NETSTACK:
            raise RouteError("routes: %s is already routed (via %s, proto %s) by someone else; not replacing it"
                             % (dst, have[0] or "a device", have[1]))
        elif have[0] != via:
            replace.append(dict(r, was=have[0]))
        elif len(have) > 2 and ((r.get("dev") and have[2] != r["dev"]) or have[3] != bool(r.get("onlink"))
                                or (len(have) > 4 and have[4] != r.get("src"))):
            replace.append(dict(r, was="%s dev %s%s%s" % (have[0], have[2], " onlink" if have[3] else "",
                                                          " src %s" % have[4] if len(have) > 4 and have[4] else "")))
    delete = [{"dst": d, "via": h[0]} for d, h in sorted(current.items()) if h[1] == RTPROT_NETSTACK and d not in want]
    return add, replace, delete


def _label(r):
    return "%s via %s%s%s%s" % (r["dst"], r["via"], " dev %s" % r["dev"] if r.get("dev") else "",
                                " onlink" if r.get("onlink") else "", " src %s" % r["src"] if r.get("src") else "")


def sync(wanted, check=False):
    """Make the routes the dataplane owns exactly ``wanted`` (normalize()d). Returns the list of changes."""
    from pyroute2 import IPRoute    # imported here: only nodes that have routes need pyroute2
    with IPRoute() as ipr:
        add, replace, delete = plan(read(ipr), wanted)
        if not check:
            for r in add + replace:
                net = ipaddress.ip_network(r["dst"])
                extra = {}
                if r.get("dev"):
                    idx = ipr.link_lookup(ifname=r["dev"])
                    if not idx:
                        raise RouteError("routes: %s: there is no device %s" % (r["dst"], r["dev"]))
                    extra["oif"] = idx[0]
                if r.get("onlink"):
                    extra["flags"] = RTNH_F_ONLINK
                if r.get("src"):
                    extra["prefsrc"] = r["src"]
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, gateway=r["via"],
                          proto=RTPROT_NETSTACK, table=MAIN_TABLE, family=_family(r["dst"]), **extra)
            for r in delete:
                net = ipaddress.ip_network(r["dst"])
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen, proto=RTPROT_NETSTACK,
                          table=MAIN_TABLE, family=_family(r["dst"]))
    return (["add %s" % _label(r) for r in add]
            + ["replace %s (was via %s)" % (_label(r), r["was"]) for r in replace]
            + ["delete %s via %s" % (r["dst"], r["via"]) for r in delete])
