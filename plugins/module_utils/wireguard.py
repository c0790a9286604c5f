# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""WireGuard on a node: the node's key pair and one WireGuard device with its peers.

Keys (``ensure_key``): made on the node - 32 random bytes, clamped, the public key computed here
(X25519, RFC 7748) - and kept in ``<state dir>/<interface>/``: ``private.key`` (0600, in a 0700
directory) and ``public.key``. A rotation moves the pair to ``previous.key`` / ``previous.pub`` and
makes a new one; retiring removes the previous pair. The private key is read only by ``wg`` (the
device takes it from the file); no function here returns it.

Devices (``apply``): two backends, picked automatically - ``kernel`` (the kernel's WireGuard: the
link made through netlink, pyroute2) and ``userspace`` (wireguard-go: a TUN device served by the
``wireguard-go`` process through its UAPI socket ``/var/run/wireguard/<name>.sock``, where the
kernel has no WireGuard). Both are configured and read with ``wg`` (wireguard-tools), which speaks
netlink to the kernel and the UAPI to wireguard-go: one tool, one argv for both. Peers are applied by
difference in one ``wg set``: a new peer is added, a changed one updated in place (its allowed IPs
replaced, the peer and its session kept), one no longer wanted removed, unchanged ones not touched.
Everything is validated before the device is touched. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import binascii
import errno
import ipaddress
import os
import re
import socket
import time

from ansible_collections.kldload.netstack.plugins.module_utils import units
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, find_binary

DEFAULT_INTERFACE = "kln_wg0"
DEFAULT_PORT = 51871
STATE_DIR = "/var/lib/kldload-netstack/wireguard"
UAPI_DIR = "/var/run/wireguard"
CONFIG_DIR = "/etc/kldload-netstack/wireguard"
NODE_COMMAND = "/usr/local/sbin/netstack"
# outer IPv4 (20) + UDP (8) + WireGuard data header (16) + authentication tag (16)
OVERHEAD = 60
BACKENDS = ("auto", "kernel", "userspace")
_IFNAME = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")


class WgError(Exception):
    pass


# ---- X25519 (RFC 7748), for the public key of a private key made here ---------------------------

_P = 2 ** 255 - 19
_A24 = 121665


def _int(b):
    return int(binascii.hexlify(bytes(bytearray(reversed(bytearray(b))))), 16)


def _bytes(n):
    return bytes(bytearray(reversed(bytearray(binascii.unhexlify("%064x" % n)))))


def x25519(scalar, u):
    """X25519(scalar, u) of RFC 7748 section 5 (32-byte strings)."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    kn = _int(k)
    x1 = _int(u) & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in range(254, -1, -1):
        bit = (kn >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % _P, b * b % _P
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + _A24 * e) % _P
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return _bytes(x2 * pow(z2, _P - 2, _P) % _P)


def public_key(private_b64):
    raw = base64.b64decode(private_b64)
    return base64.b64encode(x25519(raw, _bytes(9))).decode("ascii")


def parse_key(value, where):
    """A WireGuard key (base64 of 32 bytes) in canonical form; WgError naming ``where`` otherwise."""
    if not isinstance(value, str) or len(value.strip()) != 44:
        raise WgError("%s: not a WireGuard key (base64 of 32 bytes, 44 characters)" % where)
    try:
        raw = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise WgError("%s: not a WireGuard key (not base64)" % where)
    if len(raw) != 32:
        raise WgError("%s: not a WireGuard key (%d bytes, not 32)" % (where, len(raw)))
    return base64.b64encode(raw).decode("ascii")


# ---- keys on disk --------------------------------------------------------------------------------

def key_paths(state_dir, interface):
    d = os.path.join(state_dir, interface)
    return {"dir": d, "private": os.path.join(d, "private.key"), "public": os.path.join(d, "public.key"),
            "previous": os.path.join(d, "previous.key"), "previous_public": os.path.join(d, "previous.pub")}


def _write_secret(path, text, mode):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _read_key_file(path, where):
    with open(path) as f:
        return parse_key(f.read(), where)


def key_status(state_dir, interface):
    """{public_key, previous_public_key, key_file, mode (of the private key file)}: what is on disk."""
    p = key_paths(state_dir, interface)
    out = {"key_file": p["private"], "public_key": None, "previous_public_key": None, "mode": None}
    if os.path.exists(p["private"]):
        out["public_key"] = public_key(_read_key_file(p["private"], p["private"]))
        out["mode"] = "%04o" % (os.stat(p["private"]).st_mode & 0o7777)
    if os.path.exists(p["previous"]):
        out["previous_public_key"] = public_key(_read_key_file(p["previous"], p["previous"]))
    return out


def _new_private():
    raw = bytearray(os.urandom(32))
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return base64.b64encode(bytes(raw)).decode("ascii")


def ensure_key(state_dir, interface, rotate=False, retire=False, check=False):
    """The node's key pair: made when absent; with ``rotate`` the pair becomes the previous one and a
    new pair is made (once: while a previous pair is kept, another rotate is no change - retire first);
    with ``retire`` the previous pair is removed. Returns {changed, changes, public_key (None in check
    mode before it exists), previous_public_key, key_file}. The private key is never returned."""
    check_name(interface, "interface")
    p = key_paths(state_dir, interface)
    before = key_status(state_dir, interface)
    if before["mode"] not in (None, "0600"):
        raise WgError("%s: mode %s; a private key file must be 0600 (not touching it)" % (p["private"], before["mode"]))
    changes = []
    make = before["public_key"] is None
    turn = rotate and not make and before["previous_public_key"] is None
    drop = retire and before["previous_public_key"] is not None
    if make:
        changes.append("make the key pair in %s" % p["dir"])
    if drop:
        changes.append("retire the previous key %s" % before["previous_public_key"])
    if turn:
        changes.append("rotate: keep %s as the previous key, make a new pair" % before["public_key"])
    if changes and not check:
        if not os.path.isdir(p["dir"]):
            os.makedirs(p["dir"], 0o700)
        os.chmod(p["dir"], 0o700)
        if drop:
            for f in (p["previous"], p["previous_public"]):
                if os.path.exists(f):
                    os.unlink(f)
        if turn:
            os.rename(p["private"], p["previous"])
            _write_secret(p["previous_public"], before["public_key"] + "\n", 0o644)
        if make or turn:
            priv = _new_private()
            _write_secret(p["private"], priv + "\n", 0o600)
            _write_secret(p["public"], public_key(priv) + "\n", 0o644)
    if not check:
        after = key_status(state_dir, interface)
    else:   # what it would be: a new public key is not known before it is made
        after = {"public_key": None if make or turn else before["public_key"],
                 "previous_public_key": before["public_key"] if turn else
                 (None if drop else before["previous_public_key"])}
    return {"changed": bool(changes), "changes": changes, "public_key": after["public_key"],
            "previous_public_key": after["previous_public_key"], "key_file": p["private"],
            "before": before["public_key"], "after": after["public_key"]}


def remove_key(state_dir, interface, check=False):
    p = key_paths(state_dir, interface)
    gone = [f for f in (p["private"], p["public"], p["previous"], p["previous_public"]) if os.path.exists(f)]
    if gone and not check:
        for f in gone:
            os.unlink(f)
        try:
            os.rmdir(p["dir"])
        except OSError:
            pass
    return {"changed": bool(gone), "changes": ["remove %s" % f for f in gone]}


# ---- device configuration ------------------------------------------------------------------------

def check_name(name, where):
    if not isinstance(name, str) or not _IFNAME.match(name):
        raise WgError("%s: %r is not an interface name (1-15 characters of letters, digits, _=+.-)" % (where, name))
    return name


def _endpoint(value, where):
    if not isinstance(value, str) or ":" not in value:
        raise WgError("%s: %r is not ADDRESS:PORT" % (where, value))
    host, _sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(u"%s" % host)
    except ValueError:
        raise WgError("%s: %r is not an IP address (names are not resolved)" % (where, host))
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise WgError("%s: port %r is not 1-65535" % (where, port))
    return ("[%s]:%s" if addr.version == 6 else "%s:%s") % (addr, int(port))


def _port(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise WgError("%s: %r is not a port 1-65535" % (where, value))
    return value


def normalize(cfg):
    """The device configuration in canonical form; WgError names the field. Keys:
    name, listen_port, private_key_file, backend, mtu (0: auto), underlay_interface, extra_overhead,
    peers [{public_key, endpoint, allowed_ips (sorted networks), persistent_keepalive, name}]."""
    known = set(["name", "listen_port", "private_key_file", "backend", "mtu", "underlay_interface",
                 "extra_overhead", "peers", "fwmark"])
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise WgError("config: unknown field(s) %s" % ", ".join(unknown))
    out = {"name": check_name(cfg.get("name") or DEFAULT_INTERFACE, "name"),
           "listen_port": _port(cfg.get("listen_port") or DEFAULT_PORT, "listen_port"),
           "backend": cfg.get("backend") or "auto", "mtu": cfg.get("mtu") or 0,
           "underlay_interface": cfg.get("underlay_interface") or None,
           "extra_overhead": cfg.get("extra_overhead") or 0}
    if out["backend"] not in BACKENDS:
        raise WgError("backend: %r is not one of %s" % (out["backend"], ", ".join(BACKENDS)))
    key_file = cfg.get("private_key_file") or key_paths(STATE_DIR, out["name"])["private"]
    if not os.path.isabs(key_file):
        raise WgError("private_key_file: %r is not an absolute path" % key_file)
    out["private_key_file"] = key_file
    if out["mtu"] and not (isinstance(out["mtu"], int) and 576 <= out["mtu"] <= 65535):
        raise WgError("mtu: %r is not 0 (auto) or 576-65535" % (out["mtu"],))
    if not out["mtu"] and not out["underlay_interface"]:
        raise WgError("underlay_interface: required for mtu 0 (the MTU is the underlay's minus %d)" % OVERHEAD)
    if out["underlay_interface"]:
        check_name(out["underlay_interface"], "underlay_interface")
    fwmark = cfg.get("fwmark") or 0
    if isinstance(fwmark, bool) or not isinstance(fwmark, int) or not 0 <= fwmark <= 0xffffffff:
        raise WgError("fwmark: %r is not 0 (off) or a 32-bit mark" % (fwmark,))
    out["fwmark"] = fwmark
    if not isinstance(out["extra_overhead"], int) or not 0 <= out["extra_overhead"] <= 1000:
        raise WgError("extra_overhead: %r is not 0-1000" % (out["extra_overhead"],))
    peers = cfg.get("peers") or []
    if not isinstance(peers, list):
        raise WgError("peers: must be a list")
    out["peers"] = []
    seen, nets = {}, []
    for i, p in enumerate(peers):
        w = "peers[%d]" % i
        if not isinstance(p, dict):
            raise WgError("%s: must be a dict" % w)
        bad = sorted(set(p) - set(["public_key", "endpoint", "allowed_ips", "persistent_keepalive", "name"]))
        if bad:
            raise WgError("%s: unknown field(s) %s" % (w, ", ".join(bad)))
        pub = parse_key(p.get("public_key"), w + ".public_key")
        if pub in seen:
            raise WgError("%s.public_key: %s is also the key of peers[%d] (two nodes with the same key)" % (w, pub, seen[pub]))
        seen[pub] = i
        ka = p.get("persistent_keepalive") or 0
        if isinstance(ka, bool) or not isinstance(ka, int) or not 0 <= ka <= 65535:
            raise WgError("%s.persistent_keepalive: %r is not 0-65535 seconds" % (w, ka))
        allowed = []
        for j, a in enumerate(p.get("allowed_ips") or []):
            try:
                n = ipaddress.ip_network(u"%s" % a, strict=False)
            except ValueError:
                raise WgError("%s.allowed_ips[%d]: %r is not a network" % (w, j, a))
            for other_i, other in nets:
                if other_i != i and n.version == other.version and n.overlaps(other):
                    raise WgError("%s.allowed_ips[%d]: %s overlaps %s of peers[%d]" % (w, j, n, other, other_i))
            nets.append((i, n))
            allowed.append(n)
        out["peers"].append({"public_key": pub, "name": p.get("name") or "",
                             "endpoint": _endpoint(p["endpoint"], w + ".endpoint") if p.get("endpoint") else None,
                             "allowed_ips": sorted(str(n) for n in set(allowed)), "persistent_keepalive": ka})
    return out


# ---- the device as it is -------------------------------------------------------------------------

def _wg():
    return Tool(None, "wg")


def uapi_socket(name):
    return os.path.join(UAPI_DIR, name + ".sock")


def link_state(name):
    """{index, kind, mtu, up} of the network device ``name``, or None."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return {"index": found[0], "kind": kind, "mtu": link.get_attr("IFLA_MTU"),
                "up": bool(link["flags"] & 1)}


def _backend_of(link, name):
    if link is None:
        return None
    if link["kind"] == "wireguard":
        return "kernel"
    if link["kind"] == "tun" and os.path.exists(uapi_socket(name)):
        return "userspace"
    return "other"


def read(name):
    """The WireGuard state of ``name``: {backend, link, public_key, listen_port, peers {public key:
    {endpoint, allowed_ips, persistent_keepalive, latest_handshake, rx_bytes, tx_bytes}}}; None when
    there is no such device. The device's private key (``wg show dump`` has it) is dropped here."""
    link = link_state(name)
    backend = _backend_of(link, name)
    if backend in (None, "other"):
        return {"backend": backend, "link": link} if backend else None
    rc, out, err = _wg().run("show", name, "dump", check=False)
    if rc != 0:
        raise WgError("wg show %s: %s" % (name, (err or "").strip() or "rc %d" % rc))
    lines = out.splitlines()
    head = lines[0].split("\t") if lines else []
    st = {"backend": backend, "link": link, "public_key": None if len(head) < 2 or head[1] == "(none)" else head[1],
          "listen_port": int(head[2]) if len(head) > 2 and head[2].isdigit() else 0,
          "fwmark": int(head[3], 16) if len(head) > 3 and head[3] not in ("off", "") else 0, "peers": {}}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) < 8:
            continue
        st["peers"][f[0]] = {"endpoint": None if f[2] == "(none)" else f[2],
                             "allowed_ips": sorted(a for a in f[3].split(",") if a and a != "(none)"),
                             "latest_handshake": int(f[4]), "rx_bytes": int(f[5]), "tx_bytes": int(f[6]),
                             "persistent_keepalive": 0 if f[7] == "off" else int(f[7])}
    return st


def kernel_has_wireguard():
    return os.path.isdir("/sys/module/wireguard")


def choose_backend(wanted, module=None):
    """``kernel`` when the kernel has WireGuard (loading the module if it can), else ``userspace``
    (wireguard-go); WgError when the wanted one is not there."""
    if wanted in ("auto", "kernel") and not kernel_has_wireguard():
        Tool(module, "modprobe").run("-q", "wireguard", check=False)
    if wanted == "kernel" or (wanted == "auto" and kernel_has_wireguard()):
        if not kernel_has_wireguard():
            raise WgError("backend: kernel - this kernel has no WireGuard (modprobe wireguard failed)")
        return "kernel"
    if not find_binary("wireguard-go"):
        raise WgError("backend: %s - the kernel has no WireGuard and wireguard-go is not installed" % wanted)
    return "userspace"


def _udp_port_free(port):
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except socket.error as e:
            if e.errno == errno.EADDRINUSE:
                return False
        finally:
            s.close()
    return True


def device_mtu(cfg):
    if cfg["mtu"]:
        return cfg["mtu"]
    under = link_state(cfg["underlay_interface"])
    if under is None:
        raise WgError("underlay_interface: there is no device %s on this node" % cfg["underlay_interface"])
    return under["mtu"] - OVERHEAD - cfg["extra_overhead"]


def _peer_args(p):
    args = ["peer", p["public_key"]]
    if p["endpoint"]:
        args += ["endpoint", p["endpoint"]]
    args += ["persistent-keepalive", str(p["persistent_keepalive"] or "off"),
             "allowed-ips", ",".join(p["allowed_ips"])]
    return args


def _peer_text(p):
    return "%s%s endpoint %s allowed-ips %s keepalive %s" % (
        p["public_key"], " (%s)" % p["name"] if p.get("name") else "", p["endpoint"] or "-",
        ",".join(p["allowed_ips"]) or "-", p["persistent_keepalive"] or "off")


def plan(cfg, have, own_public, mtu):
    """(changes [text], wg set argv tail, link actions) from the wanted ``cfg`` and ``have`` (read())."""
    changes, args, link = [], [], []
    if have is None:
        changes.append("create %s (%s backend)" % (cfg["name"], cfg["_backend"]))
        link.append("create")
    peers = (have or {}).get("peers") or {}
    if (have or {}).get("public_key") != own_public:
        changes.append("set the private key of %s (public key %s)" % (cfg["name"], own_public))
        args += ["private-key", cfg["private_key_file"]]
    if (have or {}).get("listen_port") != cfg["listen_port"]:
        changes.append("listen on UDP %d" % cfg["listen_port"])
        args += ["listen-port", str(cfg["listen_port"])]
    if (have or {}).get("fwmark", 0) != cfg.get("fwmark", 0):
        changes.append("mark its own packets %s" % ("0x%x" % cfg["fwmark"] if cfg.get("fwmark") else "off"))
        args += ["fwmark", "0x%x" % cfg["fwmark"] if cfg.get("fwmark") else "off"]
    want = dict((p["public_key"], p) for p in cfg["peers"])
    for pub in sorted(set(peers) - set(want)):
        changes.append("remove peer %s" % pub)
        args += ["peer", pub, "remove"]
    for pub, p in sorted(want.items()):
        h = peers.get(pub)
        if h is None:
            changes.append("add peer %s" % _peer_text(p))
            args += _peer_args(p)
        elif (h["allowed_ips"] != p["allowed_ips"] or h["persistent_keepalive"] != p["persistent_keepalive"]
              or (p["endpoint"] and h["endpoint"] != p["endpoint"])):
            changes.append("update peer %s" % _peer_text(p))
            args += _peer_args(p)
    link_now = (have or {}).get("link") or {}
    if link_now.get("mtu") != mtu:
        changes.append("set %s mtu %d" % (cfg["name"], mtu))
        link.append("mtu")
    if not link_now.get("up"):
        changes.append("set %s up" % cfg["name"])
        link.append("up")
    return changes, args, link


def unit_name(name):
    return "netstack-wireguard-%s.service" % name


def config_path(name):
    return os.path.join(CONFIG_DIR, name + ".json")


def unit_text(name, backend):
    """The unit that brings the device back at boot, before the dataplane (whose routes need it):
    wireguard-go as its process (userspace), or a one-shot that makes the kernel link; either way
    ``netstack encrypt restore`` applies the saved configuration (config_path) with apply()."""
    head = ("[Unit]\nDescription=kldload.netstack WireGuard device %s (%s backend)\n"
            "After=network-pre.target\nBefore=netstack-dataplane.service\n\n[Service]\n" % (name, backend))
    restore = "%s encrypt restore --interface %s" % (NODE_COMMAND, name)
    if backend == "userspace":
        body = ("Type=simple\nEnvironment=WG_PROCESS_FOREGROUND=1\nExecStart=%s -f %s\nExecStartPost=%s\n"
                "Restart=on-failure\n" % (find_binary("wireguard-go") or "/usr/bin/wireguard-go", name, restore))
    else:
        body = "Type=oneshot\nRemainAfterExit=yes\nExecStart=%s\n" % restore
    return head + body + "\n[Install]\nWantedBy=multi-user.target\n"


def saved(cfg):
    """The configuration file's text (what restore applies; no key material, the key file's path)."""
    import json
    return json.dumps(dict((k, v) for k, v in cfg.items() if not k.startswith("_")), indent=1, sort_keys=True) + "\n"


def restore(name, module=None):
    """Apply the saved configuration of ``name`` again (the unit's job at boot)."""
    import json
    text = units.read(config_path(name))
    if text is None:
        raise WgError("%s: no saved configuration (the wireguard_device module writes it)" % config_path(name))
    cfg = normalize(json.loads(text))
    if cfg["backend"] == "userspace":       # the unit's wireguard-go is starting: wait for its socket
        for _i in range(200):
            if os.path.exists(uapi_socket(name)) and link_state(name) is not None:
                break
            time.sleep(0.05)
        else:
            raise WgError("%s: wireguard-go did not open %s" % (name, uapi_socket(name)))
    return apply(cfg, module=module)


def _create(cfg, backend, module):
    if backend == "kernel":
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            ipr.link("add", ifname=cfg["name"], kind="wireguard")
        return
    if cfg.get("_persist") and units.systemd_running():
        units.systemctl(module, "start", unit_name(cfg["name"]))      # wireguard-go as the unit's process
    else:
        Tool(module, "wireguard-go").run(cfg["name"])                  # daemonizes itself
    for _i in range(200):                       # wireguard-go answers on its socket within a moment
        if os.path.exists(uapi_socket(cfg["name"])):
            return
        time.sleep(0.05)
    raise WgError("wireguard-go %s did not open %s" % (cfg["name"], uapi_socket(cfg["name"])))


def _set_link(name, mtu, up):
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, mtu=mtu)
        if up:
            ipr.link("set", index=idx, state="up")


def public_view(st):
    """What may be shown of a device's state (no private key ever: read() does not keep it)."""
    if not st:
        return None
    out = dict((k, v) for k, v in st.items() if k != "link")
    out["mtu"] = (st.get("link") or {}).get("mtu")
    return out


def apply(cfg, check=False, module=None, persist=False):
    """Make the device ``cfg`` (normalize()d) as wanted; with ``persist`` also its saved configuration and
    the boot unit (unit_text). Returns {changed, changes, backend, warnings, public_key, mtu, before,
    after}. WgError (before any change) when the input or the node is at fault."""
    key_file = cfg["private_key_file"]
    if not os.path.exists(key_file):
        raise WgError("private_key_file: %s does not exist (wireguard_key makes it)" % key_file)
    mode = os.stat(key_file).st_mode & 0o7777
    if mode & 0o077:
        raise WgError("private_key_file: %s has mode %04o; it must be 0600" % (key_file, mode))
    own = public_key(_read_key_file(key_file, "private_key_file"))
    if own in [p["public_key"] for p in cfg["peers"]]:
        raise WgError("peers: %s is this node's own public key (two nodes with the same key)" % own)
    have = read(cfg["name"])
    if have is not None and have["backend"] == "other":
        raise WgError("name: %s exists and is not a WireGuard device (kind %s)" % (cfg["name"], have["link"]["kind"]))
    backend = have["backend"] if have else choose_backend(cfg["backend"], module)
    if cfg["backend"] != "auto" and backend != cfg["backend"]:
        raise WgError("backend: %s runs on the %s backend, not %s (remove it first)" % (cfg["name"], backend, cfg["backend"]))
    if (have or {}).get("listen_port") != cfg["listen_port"] and not _udp_port_free(cfg["listen_port"]):
        raise WgError("listen_port: UDP %d is in use on this node" % cfg["listen_port"])
    mtu = device_mtu(cfg)
    cfg = dict(cfg, _backend=backend, _persist=persist)
    changes, args, link = plan(cfg, have, own, mtu)
    if persist:
        text = saved(dict(cfg, backend=backend))
        if units.read(config_path(cfg["name"])) != text:
            changes.append("write %s" % config_path(cfg["name"]))
            if not check:
                units.write(config_path(cfg["name"]), text, 0o600)
        changes += units.ensure_unit(unit_name(cfg["name"]), unit_text(cfg["name"], backend), "multi-user.target",
                                     check=check, module=module)
    warnings = []
    if backend == "userspace":
        warnings.append("%s uses wireguard-go (userspace): this kernel has no WireGuard; throughput is lower "
                        "than the kernel's" % cfg["name"])
    if changes and not check:
        if "create" in link:
            _create(cfg, backend, module)
        if args:
            _wg().run("set", cfg["name"], *args)
        if "mtu" in link or "up" in link:
            _set_link(cfg["name"], mtu, True)
    after = read(cfg["name"]) if changes and not check else have
    return {"changed": bool(changes), "changes": changes, "backend": backend, "warnings": warnings,
            "public_key": own, "mtu": mtu, "before": public_view(have), "after": public_view(after)}


def remove(name, check=False, module=None):
    """Delete the device (and so its peers), its boot unit and saved configuration; the changes."""
    st = read(name)
    changes = units.remove_unit(unit_name(name), "multi-user.target", check=check, module=module)
    if os.path.exists(config_path(name)):
        changes.append("remove %s" % config_path(name))
        if not check:
            os.unlink(config_path(name))
    if st is not None and st["backend"] == "other":
        raise WgError("name: %s is not a WireGuard device (kind %s); not removing it" % (name, st["link"]["kind"]))
    if st is not None:
        changes.append("delete %s (%s backend)" % (name, st["backend"]))
        if not check and link_state(name) is not None:     # stopping the unit may have taken it already
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                ipr.link("del", index=st["link"]["index"])     # wireguard-go exits when its TUN goes
    return {"changed": bool(changes), "changes": changes}


def status(name, now=None):
    """What ``netstack encrypt status`` shows (like ``cilium-dbg encrypt status``): {interface, backend,
    public_key, listen_port, mtu, peer_count, peers [{public_key, endpoint, allowed_ips, handshake_age
    (seconds, None - no handshake yet), rx_bytes, tx_bytes}]}; None when there is no such device."""
    st = read(name)
    if st is None or st.get("backend") == "other":
        return None
    now = time.time() if now is None else now
    peers = [{"public_key": k, "endpoint": v["endpoint"], "allowed_ips": v["allowed_ips"],
              "handshake_age": int(now - v["latest_handshake"]) if v["latest_handshake"] else None,
              "rx_bytes": v["rx_bytes"], "tx_bytes": v["tx_bytes"]} for k, v in sorted(st["peers"].items())]
    return {"interface": name, "backend": st["backend"], "public_key": st["public_key"],
            "listen_port": st["listen_port"], "fwmark": st.get("fwmark", 0), "mtu": st["link"]["mtu"],
            "peer_count": len(peers), "peers": peers}


def format_status(st):
    if st is None:
        return "encryption: off (no WireGuard device)"
    lines = ["encryption: wireguard", "interface: %s (%s backend, mtu %s)" % (st["interface"], st["backend"], st["mtu"]),
             "public key: %s" % st["public_key"], "listening port: %s" % st["listen_port"],
             "fwmark: %s" % ("0x%x" % st["fwmark"] if st.get("fwmark") else "off"),
             "peers: %d" % st["peer_count"]]
    for p in st["peers"]:
        hs = "never" if p["handshake_age"] is None else "%ds ago" % p["handshake_age"]
        lines.append("  %s endpoint %s allowed %s handshake %s rx %d tx %d"
                     % (p["public_key"], p["endpoint"] or "-", ",".join(p["allowed_ips"]) or "-", hs,
                        p["rx_bytes"], p["tx_bytes"]))
    return "\n".join(lines)
