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
# The routing table the dataplane owns wholly (node-to-node encryption: the other nodes' addresses into the
# WireGuard device), reached through the rules it owns (protocol RTPROT_NETSTACK too).
OWN_TABLE = 220
RTNH_F_ONLINK = 4
FIB_RULE_INVERT = 2


class RouteError(ValueError):
    """A route that cannot be declared or made; the message names the field."""


def key(route):
    """A route's place: its destination in the main table, "<dst> table <n>" in another."""
    t = route.get("table", MAIN_TABLE)
    return route["dst"] if t == MAIN_TABLE else "%s table %d" % (route["dst"], t)


def _table_of(k):
    return int(k.split(" table ")[1]) if " table " in k else MAIN_TABLE


def normalize(routes, where="routes"):
    """[{dst, via[, dev][, onlink][, src][, table]}] in canonical form (dst a network, via an address of its
    family, dev a device name, onlink true: the gateway is on ``dev`` whatever its addresses, src the source
    address the node picks for it, table OWN_TABLE - absent: the main table), sorted."""
    if not isinstance(routes, list):
        raise RouteError("%s: must be a list" % where)
    out = {}
    for i, r in enumerate(routes):
        w = "%s[%d]" % (where, i)
        if not isinstance(r, dict) or set(r) - set(["dst", "via", "dev", "onlink", "src", "table"]):
            raise RouteError("%s: must be a mapping {dst, via[, dev][, onlink][, src][, table]}" % w)
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
        table = r.get("table", MAIN_TABLE)
        if table not in (MAIN_TABLE, OWN_TABLE):
            raise RouteError("%s.table: %r is not the main table (%d) or the dataplane's (%d)" % (w, table, MAIN_TABLE, OWN_TABLE))
        if table != MAIN_TABLE:
            route["table"] = table
        k = key(route)
        if k in out and out[k] != route:
            raise RouteError("%s.dst: %s is declared twice with different gateways" % (w, dst))
        out[k] = route
    nets = sorted(out, key=lambda k: (_table_of(k), ipaddress.ip_network(out[k]["dst"]).version,
                                      ipaddress.ip_network(out[k]["dst"])))
    return [out[k] for k in nets]


def _family(dst):
    return socket.AF_INET6 if ":" in dst else socket.AF_INET


def read(ipr):
    """{key(): (gateway, protocol, device name, onlink, prefsrc)} of the unicast routes of the main table and
    the dataplane's own (both families)."""
    out = {}
    names = dict((lk["index"], lk.get_attr("IFLA_IFNAME")) for lk in ipr.get_links())
    for table in (MAIN_TABLE, OWN_TABLE):
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, table=table):
                d = r.get_attr("RTA_DST")
                if d is None or r.get_attr("RTA_TABLE", r["table"]) != table:
                    continue
                k = key({"dst": str(ipaddress.ip_network("%s/%d" % (d, r["dst_len"]), strict=False)), "table": table})
                out[k] = (r.get_attr("RTA_GATEWAY"), r["proto"], names.get(r.get_attr("RTA_OIF")),
                          bool(r["flags"] & RTNH_F_ONLINK), r.get_attr("RTA_PREFSRC"))
    return out


def plan(current, wanted):
    """(add, replace, delete) lists from the routes now (read()) and the routes wanted; RouteError when a
    route of another protocol holds a destination the dataplane wants."""
    want = dict((key(r), r) for r in wanted)
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
    delete = []
    for k, h in sorted(current.items()):
        if (h[1] == RTPROT_NETSTACK or _table_of(k) == OWN_TABLE) and k not in want:
            d = {"dst": k.split(" table ")[0], "via": h[0]}
            if _table_of(k) != MAIN_TABLE:
                d["table"] = _table_of(k)
            delete.append(d)
    return add, replace, delete


def _label(r):
    return "%s via %s%s%s%s%s" % (r["dst"], r["via"], " dev %s" % r["dev"] if r.get("dev") else "",
                                  " onlink" if r.get("onlink") else "", " src %s" % r["src"] if r.get("src") else "",
                                  " table %d" % r["table"] if r.get("table") else "")


# ---- rules --------------------------------------------------------------------------------------

def normalize_rules(rules, where="rules"):
    """[{priority, table, fwmark, invert}] in canonical form: packets (IPv4) whose mark is (invert: is
    not) ``fwmark`` look up ``table`` at ``priority`` - the rules the dataplane owns."""
    out = []
    for i, r in enumerate(rules or []):
        w = "%s[%d]" % (where, i)
        if not isinstance(r, dict) or set(r) - set(["priority", "table", "fwmark", "invert"]):
            raise RouteError("%s: must be a mapping {priority, table, fwmark, invert}" % w)
        for f, hi in (("priority", 32765), ("table", OWN_TABLE), ("fwmark", 0xffffffff)):
            v = r.get(f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise RouteError("%s.%s: %r is not 1-%d" % (w, f, v, hi))
        out.append({"priority": r["priority"], "table": r["table"], "fwmark": r["fwmark"],
                    "invert": bool(r.get("invert"))})
    return sorted(out, key=lambda r: (r["priority"], r["table"], r["fwmark"]))


def read_rules(ipr):
    """The IPv4 rules of protocol RTPROT_NETSTACK, normalize_rules() form."""
    out = []
    for r in ipr.get_rules(family=socket.AF_INET):
        if r.get_attr("FRA_PROTOCOL") != RTPROT_NETSTACK:
            continue
        out.append({"priority": r.get_attr("FRA_PRIORITY") or 0, "table": r.get_attr("FRA_TABLE") or r["table"],
                    "fwmark": r.get_attr("FRA_FWMARK") or 0, "invert": bool(r["flags"] & FIB_RULE_INVERT)})
    return sorted(out, key=lambda r: (r["priority"], r["table"], r["fwmark"]))


def _rule_label(r):
    return "rule %d: %sfwmark 0x%x lookup %d" % (r["priority"], "not " if r["invert"] else "", r["fwmark"], r["table"])


def _rule_args(r):
    return dict(family=socket.AF_INET, priority=r["priority"], table=r["table"], fwmark=r["fwmark"],
                fwmask=0xffffffff, flags=FIB_RULE_INVERT if r["invert"] else 0, protocol=RTPROT_NETSTACK)


def sync(wanted, check=False, rules=None):
    """Make the routes the dataplane owns exactly ``wanted`` (normalize()d) and its rules exactly ``rules``
    (normalize_rules()d): routes are added before a rule leads to them, rules removed before their routes.
    Returns the list of changes."""
    from pyroute2 import IPRoute    # imported here: only nodes that have routes need pyroute2
    rules = rules or []
    with IPRoute() as ipr:
        add, replace, delete = plan(read(ipr), wanted)
        have_rules = read_rules(ipr)
        add_rules = [r for r in rules if r not in have_rules]
        del_rules = [r for r in have_rules if r not in rules]
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
                          proto=RTPROT_NETSTACK, table=r.get("table", MAIN_TABLE), family=_family(r["dst"]), **extra)
            for r in add_rules:
                ipr.rule("add", **_rule_args(r))
            for r in del_rules:
                ipr.rule("del", **_rule_args(r))
            for r in delete:
                net = ipaddress.ip_network(r["dst"])
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                          table=r.get("table", MAIN_TABLE), family=_family(r["dst"]))
    return (["add %s" % _label(r) for r in add]
            + ["replace %s (was via %s)" % (_label(r), r["was"]) for r in replace]
            + ["add %s" % _rule_label(r) for r in add_rules] + ["delete %s" % _rule_label(r) for r in del_rules]
            + ["delete %s via %s%s" % (r["dst"], r["via"], " table %d" % r["table"] if r.get("table") else "")
               for r in delete])
