# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node's pod network: the ``pods`` section of the node configuration (runtime.py).

A node owns one IPv4 pod CIDR; pods get addresses from it through the CNI conflist written here
(ptp + host-local, then our chained plugin ``netstack-cni``). Traffic to the other nodes' pod CIDRs
goes one of two ways (``routing_mode``):

- ``tunnel`` (default): a VXLAN device (flannel style: no learning, the node's underlay address as
  local, the underlay device as link). Its MAC is derived from the node's underlay address
  (``vxlan_mac``), so no node has to learn another's: per remote node there is a route
  ``<pod cidr> via <pod cidr network address> dev kln_vxlan onlink``, a permanent neighbour entry for
  that gateway with the remote's derived MAC, and an fdb entry ``<remote MAC> dst <remote underlay ip>``.
  The device carries ``<own pod cidr network address>/32`` (what the other nodes route to).
  With ``vxlan.external`` (the overlay object, bpf/overlay.c) the device is a collect_md one: no fdb, a
  program on its egress sets each packet's tunnel key (the node and, as the VNI, the source's security
  identity) and one on its ingress reads it; ``nodes[].tunnel_identity`` false keeps the fixed VNI for a
  node whose release does not read identities.
- ``native``: ``<pod cidr> via <remote underlay ip>`` (the underlay routes pods directly).

Routes are made by routes.sync() (protocol 220) together with the configuration's ``routes``: one
route mechanism. The pod MTU (0 = auto) is the underlay's MTU minus the VXLAN overhead (50) in tunnel
mode and the underlay's MTU in native mode; it goes on the VXLAN device and into ptp's ``mtu``, so
the underlay never carries fragments of encapsulated packets. With ``masquerade``, one nftables
table ``ip kldload_netstack`` masquerades pod traffic leaving through the underlay for anything
outside the cluster (all pod CIDRs and the service CIDR). ``net.ipv4.ip_forward`` is set live when
it is 0 (the prereqs role persists it with the rp_filter settings; nothing else is needed: every
path here passes strict reverse-path filtering, and no address is both local and a gateway).

Everything is checked before anything is touched (normalize() for the configuration, _probe() for
the node); apply() reports each change, changes nothing in check mode, and a VXLAN device it made in
a run that fails is removed again. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import ipaddress
import json
import os
import subprocess
import socket

from ansible_collections.kldload.netstack.plugins.module_utils import routes, units
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

DEVICE = "kln_vxlan"
VNI = 1
PORT = 8472
VXLAN_OVERHEAD = 50          # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
CONFLIST = "/etc/cni/net.d/05-kldload-netstack.conflist"
BIN_DIR = "/usr/lib/cni"
PLUGIN = "netstack-cni"
NETWORK = "kldload-netstack"
CNI_VERSION = "1.1.0"
IPAM_DATA_DIR = "/var/lib/cni/networks"
NFT_TABLE = "kldload_netstack"
SERVICE_CIDR = "10.96.0.0/12"
MODES = ("tunnel", "native")
FORWARD_SYSCTL = "net.ipv4.ip_forward"
_KEYS = ("cidr", "routing_mode", "underlay_interface", "underlay_ip", "mtu", "vxlan", "nodes", "service_cidr",
         "masquerade", "cni", "encryption")
WG_OVERHEAD = 60             # outer IPv4 20 + UDP 8 + WireGuard header 16 + tag 16 (wireguard.OVERHEAD)
_NUD_PERMANENT = 0x80
_NUD_NOARP = 0x40
_NTF_SELF = 0x02
_IFF_UP = 0x1


class PodError(ValueError):
    """A pod network that cannot be declared or made; the message names the field."""


# ---- configuration ------------------------------------------------------------------------------

def _keys(d, known, where):
    if not isinstance(d, dict):
        raise PodError("%s: must be a mapping" % where)
    bad = sorted(set(d) - set(known))
    if bad:
        raise PodError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(known)))


def _net(value, where):
    if value is None or value == "":
        raise PodError("%s: required (a network)" % where)
    try:
        net = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as e:
        raise PodError("%s: %r is not a network (%s)" % (where, value, e))
    if net.version != 4:
        raise PodError("%s: %s is not an IPv4 network (the pod network is IPv4)" % (where, net))
    return net


def _addr(value, where):
    if value is None or value == "":
        raise PodError("%s: required (an address)" % where)
    try:
        a = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise PodError("%s: %r is not an address" % (where, value))
    if a.version != 4:
        raise PodError("%s: %s is not an IPv4 address (the underlay is IPv4)" % (where, a))
    return a


def _ifname(value, where):
    if not isinstance(value, str) or not value or len(value) > 15 or "/" in value or " " in value:
        raise PodError("%s: a device name (1-15 characters), got %r" % (where, value))
    return value


def _int(value, lo, hi, where):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PodError("%s: an integer %d-%d, got %r" % (where, lo, hi, value))
    return value


def _path(value, where):
    if not isinstance(value, str) or not os.path.isabs(value):
        raise PodError("%s: must be an absolute path, got %r" % (where, value))
    return os.path.normpath(value)


def normalize(pods, where="config.pods"):
    """The pods section in canonical form (every field present, nodes sorted by name), or None when
    ``pods`` is None (no pod network). PodError names the field."""
    if pods is None:
        return None
    _keys(pods, _KEYS, where)
    cidr = _net(pods.get("cidr"), where + ".cidr")
    mode = pods.get("routing_mode") or "tunnel"
    if mode not in MODES:
        raise PodError("%s.routing_mode: %r is not a routing mode (tunnel or native)" % (where, mode))
    underlay_if = _ifname(pods.get("underlay_interface"), where + ".underlay_interface")
    underlay_ip = _addr(pods.get("underlay_ip"), where + ".underlay_ip")
    mtu = pods.get("mtu") or 0
    if mtu:
        _int(mtu, 576, 65535, where + ".mtu")
    vx = pods.get("vxlan") or {}
    _keys(vx, ("device", "vni", "port", "external"), where + ".vxlan")
    vxlan = {"device": _ifname(vx.get("device", DEVICE), where + ".vxlan.device"),
             "vni": _int(vx.get("vni", VNI), 1, 16777215, where + ".vxlan.vni"),
             "port": _int(vx.get("port", PORT), 1, 65535, where + ".vxlan.port"),
             "external": vx.get("external", False)}
    if not isinstance(vxlan["external"], bool):
        raise PodError("%s.vxlan.external: must be true or false" % where)
    if vxlan["device"] == underlay_if:
        raise PodError("%s.vxlan.device: %s is the underlay interface" % (where, vxlan["device"]))
    svc = _net(pods.get("service_cidr") or SERVICE_CIDR, where + ".service_cidr")
    if svc.overlaps(cidr):
        raise PodError("%s.cidr: %s overlaps the service CIDR %s (%s.service_cidr)" % (where, cidr, svc, where))
    nodes = pods.get("nodes") or []
    if not isinstance(nodes, list):
        raise PodError("%s.nodes: must be a list" % where)
    out_nodes, names, ips, nets = [], {}, {}, []
    for i, n in enumerate(nodes):
        w = "%s.nodes[%d]" % (where, i)
        _keys(n, ("name", "underlay_ip", "pod_cidr", "tunnel_identity"), w)
        name = n.get("name")
        if not isinstance(name, str) or not name:
            raise PodError("%s.name: a node name, got %r" % (w, name))
        if name in names:
            raise PodError("%s.name: node %s is listed twice (also %s)" % (w, name, names[name]))
        names[name] = w
        ip = _addr(n.get("underlay_ip"), w + ".underlay_ip")
        if ip == underlay_ip:
            raise PodError("%s.underlay_ip: %s is this node's own underlay_ip (list only the other nodes)" % (w, ip))
        if ip in ips:
            raise PodError("%s.underlay_ip: %s is also the underlay_ip of %s" % (w, ip, ips[ip]))
        ips[ip] = w
        net = _net(n.get("pod_cidr"), w + ".pod_cidr")
        if net.overlaps(cidr):
            raise PodError("%s.pod_cidr: %s overlaps this node's pod CIDR %s (%s.cidr)" % (w, net, cidr, where))
        if net.overlaps(svc):
            raise PodError("%s.pod_cidr: %s overlaps the service CIDR %s" % (w, net, svc))
        for other, ow in nets:
            if net.overlaps(other):
                raise PodError("%s.pod_cidr: %s overlaps the pod CIDR %s of %s" % (w, net, other, ow))
        nets.append((net, w))
        ident = n.get("tunnel_identity", True)
        if not isinstance(ident, bool):
            raise PodError("%s.tunnel_identity: must be true or false" % w)
        out_nodes.append({"name": name, "underlay_ip": str(ip), "pod_cidr": str(net), "tunnel_identity": ident})
    masq = pods.get("masquerade", True)
    if not isinstance(masq, bool):
        raise PodError("%s.masquerade: must be true or false, got %r" % (where, masq))
    cni = pods.get("cni") or {}
    _keys(cni, ("conflist", "bin_dir"), where + ".cni")
    enc = pods.get("encryption")
    if enc is not None:
        enc = _encryption(enc, where + ".encryption", (underlay_if, vxlan["device"]))
    return {"cidr": str(cidr), "routing_mode": mode, "underlay_interface": underlay_if, "encryption": enc,
            "underlay_ip": str(underlay_ip), "mtu": mtu, "vxlan": vxlan,
            "nodes": sorted(out_nodes, key=lambda n: n["name"]), "service_cidr": str(svc), "masquerade": masq,
            "cni": {"conflist": _path(cni.get("conflist", CONFLIST), where + ".cni.conflist"),
                    "bin_dir": _path(cni.get("bin_dir", BIN_DIR), where + ".cni.bin_dir")}}


def _encryption(enc, where, taken):
    """config.pods.encryption in canonical form: {device, standby, strict, node_to_node, fwmark}."""
    _keys(enc, ("device", "standby", "strict", "node_to_node", "fwmark"), where)
    for f in ("strict", "node_to_node"):
        if not isinstance(enc.get(f, False), bool):
            raise PodError("%s.%s: must be true or false" % (where, f))
    out = {"device": _ifname(enc.get("device"), where + ".device"), "strict": enc.get("strict", False),
           "standby": _ifname(enc["standby"], where + ".standby") if enc.get("standby") else None,
           "node_to_node": enc.get("node_to_node", False), "fwmark": enc.get("fwmark") or 0}
    for f in ("device", "standby"):
        if out[f] in taken:
            raise PodError("%s.%s: %s is the underlay or the VXLAN device" % (where, f, out[f]))
    if out["standby"] == out["device"]:
        raise PodError("%s.standby: %s is the device itself" % (where, out["standby"]))
    fw = out["fwmark"]
    if isinstance(fw, bool) or not isinstance(fw, int) or not 0 <= fw <= 0xffffffff:
        raise PodError("%s.fwmark: %r is not a 32-bit mark" % (where, fw))
    if out["node_to_node"] and not fw:
        raise PodError("%s.fwmark: node_to_node needs the mark of the device's own packets (the rule skips them)" % where)
    return out


def vxlan_mac(underlay_ip):
    """The VXLAN MAC of the node with ``underlay_ip``: 02:4b (locally administered) + the 4 address
    bytes, so every node knows every other node's MAC without an exchange."""
    return "02:4b:" + ":".join("%02x" % b for b in ipaddress.ip_address(underlay_ip).packed)


def gateway(pod_cidr):
    """The address the other nodes route a node's pod CIDR through (its network address)."""
    return str(ipaddress.ip_network(pod_cidr).network_address)


def pod_mtu(pods, underlay_mtu):
    """The pod MTU: the configured one, or (0) the underlay's minus the VXLAN overhead in tunnel mode,
    the underlay's in native mode."""
    if pods["mtu"]:
        return pods["mtu"]
    if pods.get("encryption"):
        return underlay_mtu - WG_OVERHEAD
    return underlay_mtu - VXLAN_OVERHEAD if pods["routing_mode"] == "tunnel" else underlay_mtu


def tunnelled(pods):
    """Whether the node needs its VXLAN device: tunnel mode without encryption (WireGuard is the
    tunnel when encryption is on, in either mode)."""
    return pods is not None and pods["routing_mode"] == "tunnel" and not pods.get("encryption")


def wanted_routes(pods):
    """The routes to the other nodes' pod CIDRs (routes.normalize() form)."""
    if pods is None:
        return []
    if pods.get("encryption"):
        # into the WireGuard device; it picks the peer by the destination (allowed IPs), the gateway only
        # names the node (onlink: the device has no address of that network); the node's own packets leave
        # from its underlay address, which is what the peer allows besides this node's pods
        enc = pods["encryption"]
        out = [{"dst": n["pod_cidr"], "via": n["underlay_ip"], "dev": enc["device"], "onlink": True,
                "src": pods["underlay_ip"]} for n in pods["nodes"]]
        if enc["node_to_node"]:
            # the nodes' own traffic to each other, in the dataplane's table (wanted_rules() leads there every
            # packet but the device's own, which carry its mark and so still leave by the underlay)
            out += [{"dst": n["underlay_ip"] + "/32", "via": n["underlay_ip"], "dev": enc["device"], "onlink": True,
                     "src": pods["underlay_ip"], "table": routes.OWN_TABLE} for n in pods["nodes"]]
        return out
    if pods["routing_mode"] == "tunnel":
        return [{"dst": n["pod_cidr"], "via": gateway(n["pod_cidr"]), "dev": pods["vxlan"]["device"], "onlink": True}
                for n in pods["nodes"]]
    return [{"dst": n["pod_cidr"], "via": n["underlay_ip"], "dev": pods["underlay_interface"]} for n in pods["nodes"]]


NODE_RULE_PRIORITY = 30000     # before the main table (32766)


def wanted_rules(pods):
    """The rules the dataplane owns (routes.normalize_rules() form): with node-to-node encryption, every
    packet without the WireGuard device's mark looks up the dataplane's table first."""
    enc = (pods or {}).get("encryption")
    if not enc or not enc["node_to_node"]:
        return []
    return routes.normalize_rules([{"priority": NODE_RULE_PRIORITY, "table": routes.OWN_TABLE, "fwmark": enc["fwmark"],
                                    "invert": True}])


def cluster_cidrs(pods):
    """Every pod CIDR, the service CIDR and every node's underlay address: what is not masqueraded
    (a pod's traffic to another node keeps the pod's address: the node answers through the pod routes,
    and the policy there sees the pod, not a node)."""
    nets = [ipaddress.ip_network(pods["cidr"]), ipaddress.ip_network(pods["service_cidr"]),
            ipaddress.ip_network(pods["underlay_ip"])]
    nets += [ipaddress.ip_network(n["pod_cidr"]) for n in pods["nodes"]]
    nets += [ipaddress.ip_network(n["underlay_ip"]) for n in pods["nodes"]]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def cni_version(pods):
    """The conflist's cniVersion: 1.1.0 when the node's ptp supports it, else the newest of 1.0.0 and
    0.4.0 it does (Debian 12's containernetworking-plugins 1.1.1 stop at 1.0.0 and refuse a 1.1.0
    config: "incompatible CNI versions"); 1.0.0 when ptp gives no answer, 1.1.0 when it is not installed (yet)."""
    for d in (pods["cni"]["bin_dir"], BIN_DIR, "/opt/cni/bin"):
        path = os.path.join(d, "ptp")
        if not os.path.isfile(path):
            continue
        # subprocess, not module.run_command: ptp answers VERSION without reading its stdin, and writing
        # the config to a process that has already exited raised EPIPE there (rc 32) now and then
        try:
            out = subprocess.run([path], input=b'{"cniVersion": "1.0.0"}', stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, CNI_COMMAND="VERSION", LC_ALL="C"),
                                 check=False, timeout=30).stdout.decode()
            supported = json.loads(out).get("supportedVersions") or []
        except (OSError, ValueError, AttributeError, subprocess.SubprocessError):
            supported = ["1.0.0"]       # no answer: the version every plugin release since 1.0 reads
        for v in (CNI_VERSION, "1.0.0", "0.4.0"):
            if v in supported:
                return v
        return CNI_VERSION
    return CNI_VERSION


def conflist(pods, mtu, version=CNI_VERSION):
    """The CNI network configuration list of the node (the shape the shared brief fixes)."""
    return {"cniVersion": version, "name": NETWORK, "plugins": [
        {"type": "ptp", "mtu": mtu,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": pods["cidr"]}]], "routes": [{"dst": "0.0.0.0/0"}],
                  "dataDir": IPAM_DATA_DIR},
         "capabilities": {"ips": True}},
        {"type": PLUGIN, "capabilities": {"io.kubernetes.cri.pod-annotations": True}}]}


def conflist_text(pods, mtu, version=CNI_VERSION):
    return json.dumps(conflist(pods, mtu, version), indent=2, sort_keys=True) + "\n"


# ---- masquerade (nftables) ----------------------------------------------------------------------

def _nft_chains(pods):
    """[(chain, type, hook, priority, rule)] of the wanted table: masquerade out of the cluster, and
    with strict encryption a filter that drops this node's pod traffic to another node's pods unless the
    route for it is the WireGuard device (no route, the device down, a route by the underlay: dropped and
    counted - ``netstack dataplane status``)."""
    if pods is None:
        return []
    out = []
    if pods["masquerade"]:
        out.append(("postrouting", "nat", "postrouting", "srcnat",
                    "ip saddr %s ip daddr != { %s } oifname \"%s\" masquerade"
                    % (pods["cidr"], ", ".join(cluster_cidrs(pods)), pods["underlay_interface"])))
    enc = pods.get("encryption")
    if enc and enc["strict"] and pods["nodes"]:
        remote = [str(n) for n in ipaddress.collapse_addresses(ipaddress.ip_network(x["pod_cidr"]) for x in pods["nodes"])]
        # before routing, on what routing would do (fib): no route, or a route by another device, is a drop
        out.append(("prerouting", "filter", "prerouting", "filter",
                    "ip saddr %s ip daddr { %s } fib daddr oifname != { %s } counter drop"
                    % (pods["cidr"], ", ".join(remote), ", ".join('"%s"' % d for d in sorted(
                        [enc["device"]] + ([enc["standby"]] if enc.get("standby") else []))))))
    return out


def nft_text(pods):
    """The nftables table (``nft -f`` input). Every rule's comment carries a fingerprint of the whole
    wanted table, which is what read-back compares."""
    chains = _nft_chains(pods)
    fp = _fingerprint("\n".join(c[4] for c in chains))
    body = "".join("  chain %s {\n    type %s hook %s priority %s; policy accept;\n    %s comment \"netstack:%s\"\n  }\n"
                   % (name, typ, hook, prio, rule, fp) for name, typ, hook, prio, rule in chains)
    return "table ip %s {\n%s}\n" % (NFT_TABLE, body)


def nft_wanted(pods):
    """What nft_read() reads when the table is as wanted; None when no table is wanted."""
    chains = _nft_chains(pods)
    if not chains:
        return None
    fp = _fingerprint("\n".join(c[4] for c in chains))
    return {"chains": [[c[0], c[1], c[2], "accept"] for c in chains], "marks": [fp] * len(chains)}


def _fingerprint(body):
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def _nft(module):
    return Tool(module, "nft")


def nft_read(module=None):
    """{chains [[name, type, hook, policy]], marks [the fingerprint in each rule's comment, "?" for a rule
    that is not ours]} of table ``ip kldload_netstack``, or None when it is absent."""
    tool = _nft(module)
    if not tool.available:
        return None
    rc, out, err = tool.run("-j", "list", "table", "ip", NFT_TABLE, check=False)
    if rc != 0:
        if "No such file" in err or "does not exist" in err:
            return None
        raise PodError("nft list table ip %s: %s" % (NFT_TABLE, err.strip()))
    marks, chains = [], []
    for item in json.loads(out).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains.append([c.get("name"), c.get("type"), c.get("hook"), c.get("policy")])
        if "rule" in item:
            comment = item["rule"].get("comment") or ""
            marks.append(comment[len("netstack:"):] if comment.startswith("netstack:") else "?")
    return {"chains": chains, "marks": marks}


def strict_drops(module=None):
    """Packets the strict-encryption rule dropped (None when there is no such rule)."""
    tool = _nft(module)
    if not tool.available:
        return None
    rc, out, _err = tool.run("-j", "list", "chain", "ip", NFT_TABLE, "prerouting", check=False)
    if rc != 0:
        return None
    return sum(e["counter"]["packets"] for i in json.loads(out).get("nftables", []) if "rule" in i
               for e in i["rule"]["expr"] if "counter" in e)


def _nft_apply(pods, module):
    data = "table ip %s\ndelete table ip %s\n" % (NFT_TABLE, NFT_TABLE)
    if pods is not None:
        data += nft_text(pods)
    _nft(module).run("-f", "-", data=data)


# ---- the node now -------------------------------------------------------------------------------

def _sysctl_path(name):
    return "/proc/sys/" + name.replace(".", "/")


def _read_sysctl(name):
    return (units.read(_sysctl_path(name)) or "").strip()


def _link(ipr, name):
    idx = ipr.link_lookup(ifname=name)
    return ipr.get_links(idx[0])[0] if idx else None


def _device_state(ipr, name):
    """The VXLAN device ``name`` as {kind, vni, local, link, port, learning, mac, mtu, up, addresses},
    or None when there is no such device."""
    link = _link(ipr, name)
    if link is None:
        return None
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    lower = data.get_attr("IFLA_VXLAN_LINK") if data is not None else None
    names = dict((lk["index"], lk.get_attr("IFLA_IFNAME")) for lk in ipr.get_links())
    return {"index": link["index"], "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
            "vni": data.get_attr("IFLA_VXLAN_ID") if data is not None else None,
            "local": data.get_attr("IFLA_VXLAN_LOCAL") if data is not None else None,
            "link": names.get(lower), "port": data.get_attr("IFLA_VXLAN_PORT") if data is not None else None,
            "learning": data.get_attr("IFLA_VXLAN_LEARNING") if data is not None else None,
            "external": bool(data.get_attr("IFLA_VXLAN_COLLECT_METADATA")) if data is not None else False,
            "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
            "up": bool(link["flags"] & _IFF_UP),
            "addresses": sorted("%s/%d" % (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                                for a in ipr.get_addr(family=socket.AF_INET, index=link["index"]))}


def _neighbours(ipr, index):
    return dict((n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
                for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
                if n["state"] & _NUD_PERMANENT and n["ifindex"] == index)


def _fdb(ipr, index):
    return dict((n.get_attr("NDA_LLADDR"), n.get_attr("NDA_DST"))
                for n in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=index)
                if n.get_attr("NDA_DST") and n["ifindex"] == index)


def _probe(ipr, pods):
    """The underlay as this node has it: {index, mtu}; PodError names the field that does not hold."""
    link = _link(ipr, pods["underlay_interface"])
    if link is None:
        raise PodError("config.pods.underlay_interface: there is no device %s on this node" % pods["underlay_interface"])
    mine = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)]
    if pods["underlay_ip"] not in mine:
        raise PodError("config.pods.underlay_ip: %s is not an address of this node (it has %s)"
                       % (pods["underlay_ip"], ", ".join(mine) or "none"))
    mtu = pod_mtu(pods, link.get_attr("IFLA_MTU"))
    if mtu < 576:
        raise PodError("config.pods.mtu: the pod MTU would be %d (underlay %s has MTU %d)"
                       % (mtu, pods["underlay_interface"], link.get_attr("IFLA_MTU")))
    return {"index": link["index"], "mtu": mtu}


def check_routes(pods, static_routes):
    """PodError when the configuration's own routes name a pod CIDR of config.pods.nodes."""
    owned = set(r["dst"] for r in static_routes or [])
    for r in wanted_routes(pods):
        if r["dst"] in owned:
            raise PodError("config.routes: %s is the pod CIDR of node %s in config.pods.nodes (the pod routes are "
                           "made from config.pods; drop it from routes)"
                           % (r["dst"], [n["name"] for n in pods["nodes"] if n["pod_cidr"] == r["dst"]][0]))


def _preflight(ipr, pods, module):
    """What must hold on the node before anything is touched: the underlay (its MTU), nft when masquerading,
    the plugin path free for our symlink. None when ``pods`` is None."""
    if pods is None:
        return None
    probe = _probe(ipr, pods)
    probe["cni_version"] = cni_version(pods)
    if pods["masquerade"] and not _nft(module).available:
        raise PodError("config.pods.masquerade: nft (nftables) is not installed on this node")
    plugin = _plugin_path(pods)
    if os.path.lexists(plugin) and not os.path.islink(plugin):
        raise PodError("config.pods.cni.bin_dir: %s exists and is not the plugin symlink; not replacing it" % plugin)
    return probe


def preflight(pods, module=None, check=False):
    """_preflight() with its own netlink socket: runtime.apply() calls it before it touches anything.
    Outside check mode, the WireGuard device encryption names must exist (the encryption role makes it)."""
    if pods is None:
        return None
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        probe = _preflight(ipr, pods, module)
        enc = pods.get("encryption")
        if enc and not check and _link(ipr, enc["device"]) is None:
            raise PodError("config.pods.encryption.device: there is no device %s on this node (the encryption role, "
                           "wireguard_device, makes it first)" % enc["device"])
        return probe


def _wanted_device(pods, mtu):
    # an external device has VNI 0: the kernel finds a collect_md device of a port under VNI 0 whatever the
    # packet's VNI is (one created with another id is never found, and drops everything it is sent)
    return {"kind": "vxlan", "vni": 0 if pods["vxlan"]["external"] else pods["vxlan"]["vni"], "local": pods["underlay_ip"],
            "link": pods["underlay_interface"], "port": pods["vxlan"]["port"], "learning": 0,
            "external": pods["vxlan"]["external"],
            "mac": vxlan_mac(pods["underlay_ip"]), "mtu": mtu, "up": True, "addresses": [gateway(pods["cidr"]) + "/32"]}


_RECREATE = ("kind", "vni", "local", "link", "port", "learning", "external")


def _plugin_path(pods):
    return os.path.join(pods["cni"]["bin_dir"] if pods else BIN_DIR, PLUGIN)


def read(pods):
    """What the node has of the pod network now (the names ``pods`` says, defaults when None)."""
    from pyroute2 import IPRoute    # imported here: only nodes with a pod network or routes need pyroute2
    dev = pods["vxlan"]["device"] if pods else DEVICE
    with IPRoute() as ipr:
        d = _device_state(ipr, dev)
        state = {"device": d, "neighbours": _neighbours(ipr, d["index"]) if d else {},
                 "fdb": _fdb(ipr, d["index"]) if d else {}}
    conf = pods["cni"]["conflist"] if pods else CONFLIST
    plugin = _plugin_path(pods)
    state.update(conflist=units.read(conf), plugin_link=os.readlink(plugin) if os.path.islink(plugin) else None,
                 nft=nft_read(), ip_forward=_read_sysctl(FORWARD_SYSCTL))
    return state


# ---- apply --------------------------------------------------------------------------------------

def apply(pods, static_routes=None, bundle=None, check=False, module=None):
    """Make the node's pod network match ``pods`` (normalize()d; None: no pod network - whatever of
    it is there is removed) and the owned routes match ``static_routes`` + the pod routes, in one
    routes.sync(). ``bundle``: what the plugin symlink points to.

    Returns {changed, changes [str], routes [route changes], mtu, before, after (state dicts for diff)}.
    Raises PodError (before anything is touched when the input or the node is at fault; a refusal of
    the kernel, pyroute2's NetlinkError, too), routes.RouteError, runner.ToolError, OSError."""
    try:
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return _apply(pods, static_routes, bundle, check, module)
    try:
        return _apply(pods, static_routes, bundle, check, module)
    except NetlinkError as e:
        raise PodError("config.pods: the kernel refused a change of the pod network: %s" % (e,))


def _apply(pods, static_routes=None, bundle=None, check=False, module=None):
    from pyroute2 import IPRoute
    static_routes = static_routes or []
    wanted = routes.normalize(static_routes + wanted_routes(pods), "config.routes")
    changes = []
    created = []
    with IPRoute() as ipr:
        probe = _preflight(ipr, pods, module)
        mtu = probe["mtu"] if probe else None
        routes.plan(routes.read(ipr), wanted)      # a route of someone else to a pod CIDR: refused before any change
        before = read(pods)
        if pods is None:
            other = None
        else:
            other = _device_state(ipr, DEVICE) if pods["vxlan"]["device"] != DEVICE else None
        try:
            # 1. forwarding
            if pods and before["ip_forward"] != "1":
                changes.append("sysctl %s = 1 (was %s)" % (FORWARD_SYSCTL, before["ip_forward"] or "unset"))
                if not check:
                    with open(_sysctl_path(FORWARD_SYSCTL), "w") as f:
                        f.write("1\n")
            # 2. tunnel: the device, its neighbours and fdb
            tunnel = tunnelled(pods)
            if tunnel:
                _device(ipr, pods, before["device"], probe, mtu, check, changes, created)
            # 3. routes (both modes, and the configuration's own)
            route_changes = _routes_sync(wanted, check, wanted_rules(pods))
            # 4. no tunnel: the device goes (its routes, neighbours and fdb with it)
            dev_gone = [d for d in ([before["device"]] if not tunnel else []) + [other] if d]
            for d in dev_gone:
                name = pods["vxlan"]["device"] if pods and d is before["device"] else DEVICE
                changes.append("delete vxlan device %s" % name)
                if not check:
                    ipr.link("del", index=d["index"])
            # 5. masquerade
            want_nft = nft_wanted(pods)
            if before["nft"] != want_nft:
                changes.append(("write nftables table ip %s (%s)" % (NFT_TABLE, "; ".join(
                    c[4] for c in _nft_chains(pods)))) if want_nft else "delete nftables table ip %s" % NFT_TABLE)
                if not check:
                    _nft_apply(pods if want_nft else None, module)
            # 6. the CNI conflist and the plugin symlink
            _cni(pods, mtu, probe, bundle, before, check, changes)
        except Exception:
            if not check:
                for index in created:                   # a device made by this run does not outlive it
                    try:
                        ipr.link("del", index=index)
                    except Exception:  # pylint: disable=broad-except
                        pass
            raise
    if check:
        after = _would_be(pods, mtu, probe, before, bundle)
    else:
        after = read(pods) if changes or route_changes else before
    return {"changed": bool(changes or route_changes), "changes": changes, "routes": route_changes, "mtu": mtu,
            "before": _public(before), "after": _public(after)}


def _routes_sync(wanted, check, rules=None):
    return routes.sync(wanted, check=check, rules=rules)


def _device(ipr, pods, have, probe, mtu, check, changes, created):
    dev = pods["vxlan"]["device"]
    want = _wanted_device(pods, mtu)
    if have is not None and any(have[k] != want[k] for k in _RECREATE):
        diff = ", ".join("%s %s (was %s)" % (k, want[k], have[k]) for k in _RECREATE if have[k] != want[k])
        changes.append("recreate %s: %s" % (dev, diff))
        if not check:
            ipr.link("del", index=have["index"])
        have = None
    if have is None:
        changes.append("create vxlan device %s (%s, dstport %d, local %s dev %s, mac %s, mtu %d, nolearning)"
                       % (dev, "external: the VNI per packet" if want["external"] else "vni %d" % want["vni"],
                          want["port"], want["local"], want["link"], want["mac"], mtu))
        if check:
            have = {"index": None, "mac": want["mac"], "mtu": mtu, "up": False, "addresses": []}
        else:
            ipr.link("add", ifname=dev, kind="vxlan", vxlan_local=want["local"], vxlan_link=probe["index"],
                     vxlan_port=want["port"], vxlan_learning=0, address=want["mac"], mtu=mtu,
                     **({"vxlan_collect_metadata": 1} if want["external"] else {"vxlan_id": want["vni"]}))
            index = ipr.link_lookup(ifname=dev)[0]
            created.append(index)
            have = {"index": index, "mac": want["mac"], "mtu": mtu, "up": False, "addresses": []}
    index = have["index"]
    for k in ("mac", "mtu"):
        if have[k] != want[k]:
            changes.append("set %s %s %s (was %s)" % (dev, k, want[k], have[k]))
            if not check:
                ipr.link("set", index=index, **({"address": want["mac"]} if k == "mac" else {"mtu": mtu}))
    for a in sorted(set(have["addresses"]) - set(want["addresses"])):
        changes.append("delete address %s from %s" % (a, dev))
        if not check:
            ipr.addr("del", index=index, address=a.split("/")[0], prefixlen=int(a.split("/")[1]))
    for a in sorted(set(want["addresses"]) - set(have["addresses"])):
        changes.append("add address %s to %s" % (a, dev))
        if not check:
            ipr.addr("add", index=index, address=a.split("/")[0], prefixlen=int(a.split("/")[1]))
    if not have["up"]:
        changes.append("set %s up" % dev)
        if not check:
            ipr.link("set", index=index, state="up")
    neigh = _neighbours(ipr, index) if index else {}
    fdb = _fdb(ipr, index) if index else {}
    want_neigh = dict((gateway(n["pod_cidr"]), vxlan_mac(n["underlay_ip"])) for n in pods["nodes"])
    want_fdb = _wanted_fdb(pods)
    for ip, mac in sorted(neigh.items()):
        if ip not in want_neigh:
            changes.append("delete neighbour %s lladdr %s dev %s" % (ip, mac, dev))
            if not check:
                ipr.neigh("del", family=socket.AF_INET, ifindex=index, dst=ip, lladdr=mac)
    for ip, mac in sorted(want_neigh.items()):
        if neigh.get(ip) != mac:
            changes.append("%s neighbour %s lladdr %s dev %s" % ("replace" if ip in neigh else "add", ip, mac, dev))
            if not check:
                ipr.neigh("replace", family=socket.AF_INET, ifindex=index, dst=ip, lladdr=mac, state=_NUD_PERMANENT)
    for mac, dst in sorted(fdb.items()):
        if want_fdb.get(mac) != dst:
            changes.append("delete fdb %s dst %s dev %s" % (mac, dst, dev))
            if not check:
                ipr.neigh("del", family=socket.AF_BRIDGE, ifindex=index, lladdr=mac, dst=dst, flags=_NTF_SELF)
    for mac, dst in sorted(want_fdb.items()):
        if fdb.get(mac) != dst:
            changes.append("add fdb %s dst %s dev %s" % (mac, dst, dev))
            if not check:
                ipr.neigh("replace", family=socket.AF_BRIDGE, ifindex=index, lladdr=mac, dst=dst, flags=_NTF_SELF,
                          state=_NUD_PERMANENT | _NUD_NOARP)


def _wanted_fdb(pods):
    """The fdb entries of the device: where each node's MAC is - none in external mode, where the tunnel key a
    program sets per packet says where it goes (overlay.c)."""
    if pods["vxlan"]["external"]:
        return {}
    return dict((vxlan_mac(n["underlay_ip"]), n["underlay_ip"]) for n in pods["nodes"])


def _cni(pods, mtu, probe, bundle, before, check, changes):
    conf = pods["cni"]["conflist"] if pods else CONFLIST
    plugin = _plugin_path(pods)
    if pods:
        text = conflist_text(pods, mtu, probe["cni_version"])
        if before["conflist"] != text:
            changes.append("write %s (cniVersion %s, ptp mtu %d, host-local %s)"
                           % (conf, probe["cni_version"], mtu, pods["cidr"]))
            if not check:
                units.write(conf, text)
        if bundle and before["plugin_link"] != bundle:
            changes.append("link %s -> %s" % (plugin, bundle))
            if not check:
                if not os.path.isdir(os.path.dirname(plugin)):
                    os.makedirs(os.path.dirname(plugin), 0o755)
                tmp = plugin + ".netstack-tmp"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(bundle, tmp)
                os.rename(tmp, plugin)
        return
    if before["conflist"] is not None:
        changes.append("delete %s" % conf)
        if not check:
            os.unlink(conf)
    if before["plugin_link"] is not None:
        changes.append("delete %s" % plugin)
        if not check:
            os.unlink(plugin)


def _would_be(pods, mtu, probe, before, bundle):
    if pods is None:
        return {"device": None, "neighbours": {}, "fdb": {}, "conflist": None, "plugin_link": None, "nft": None,
                "ip_forward": before["ip_forward"]}
    tunnel = tunnelled(pods)
    return {"device": _wanted_device(pods, mtu) if tunnel else None,
            "neighbours": dict((gateway(n["pod_cidr"]), vxlan_mac(n["underlay_ip"])) for n in pods["nodes"]) if tunnel else {},
            "fdb": _wanted_fdb(pods) if tunnel else {},
            "conflist": conflist_text(pods, mtu, probe["cni_version"]), "plugin_link": bundle or before["plugin_link"],
            "nft": nft_wanted(pods), "ip_forward": "1"}


def _public(state):
    out = dict(state)
    if out.get("device"):
        out["device"] = dict((k, v) for k, v in out["device"].items() if k != "index")
    return out


def remove(pods, static_routes=None, check=False, module=None):
    """Take the pod network off the node (device, its neighbours and fdb, pod routes, nft table,
    conflist, plugin symlink); the owned routes left are ``static_routes``. Returns like apply()."""
    if pods is None:
        return apply(None, static_routes, check=check, module=module)
    return _remove_named(pods, static_routes, check, module)


def _remove_named(pods, static_routes, check, module):
    res = apply(None, static_routes, check=check, module=module)
    # names other than the defaults (a configured device, conflist, bin_dir)
    from pyroute2 import IPRoute
    extra = []
    with IPRoute() as ipr:
        d = _device_state(ipr, pods["vxlan"]["device"])
        if d and pods["vxlan"]["device"] != DEVICE:
            extra.append("delete vxlan device %s" % pods["vxlan"]["device"])
            if not check:
                ipr.link("del", index=d["index"])
    for p in (pods["cni"]["conflist"], _plugin_path(pods)):
        if p not in (CONFLIST, _plugin_path(None)) and os.path.lexists(p):
            extra.append("delete %s" % p)
            if not check:
                os.unlink(p)
    res["changes"] += extra
    res["changed"] = res["changed"] or bool(extra)
    return res


def status(pods):
    """The pod network now: {enabled, mode, cidr, mtu, device (state or None), routes (the pod routes
    the node has), rules (the rules wanted, each with present), neighbours, fdb, masquerade (table present),
    conflist (path or None)}."""
    st = read(pods)
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        have = routes.read(ipr)
        under = _link(ipr, pods["underlay_interface"]) if pods else None
        have_rules = routes.read_rules(ipr)
    pod_routes = []
    for r in wanted_routes(pods):
        h = have.get(routes.key(r))
        pod_routes.append(dict({"dst": r["dst"], "via": h[0] if h else None, "dev": h[2] if h else None,
                                "present": bool(h and h[0] == r["via"] and h[1] == routes.RTPROT_NETSTACK)},
                               **({"table": r["table"]} if r.get("table") else {})))
    rules = [dict(r, present=r in have_rules) for r in wanted_rules(pods)]
    dev = _public(st)["device"]
    return {"enabled": pods is not None, "mode": pods["routing_mode"] if pods else None,
            "cidr": pods["cidr"] if pods else None,
            "mtu": pod_mtu(pods, under.get_attr("IFLA_MTU")) if under is not None else None, "device": dev,
            "routes": pod_routes, "rules": rules, "neighbours": st["neighbours"], "fdb": st["fdb"],
            "masquerade": bool(st["nft"]) and ["postrouting", "nat", "postrouting", "accept"] in st["nft"]["chains"],
            "encryption": pods.get("encryption") if pods else None,
            "strict_drops": strict_drops() if pods and (pods.get("encryption") or {}).get("strict") else None,
            "conflist": (pods["cni"]["conflist"] if pods else CONFLIST) if st["conflist"] is not None else None}
