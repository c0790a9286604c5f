# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""FRR's bgpd programmed from structured data (the ``frr_bgp`` module, ``netstack bgp peers``).

What the module owns in FRR's configuration, and nothing else:

- the BGP instance of the default VRF (``router bgp <asn>``, the whole block);
- prefix-lists and route-maps whose names start with ``KLN-`` (export and import policy);
- the BFD profile ``KLN-BFD`` (inside ``bfd``).

Everything else in the running configuration (interfaces, static routes, other daemons, other VRFs'
BGP instances, other prefix-lists and route-maps, log settings) is kept as it is. The wanted
configuration is the running one with the owned blocks replaced; ``frr-reload.py --test`` says which
lines that adds and removes (FRR's own normalisation, so a configuration that is already there is no
change), and ``frr-reload.py --reload`` applies only those lines: a session is reset only when one of
its own lines changes (its password, its ASN). frr-reload.py then saves the running configuration
(``/etc/frr/frr.conf``, kept mode 0640 owner frr:frr).

Policy: announce exactly the prefixes given (``network`` statements with ``no bgp network
import-check``, so a service address needs no route on the node) through an export route-map that
permits only them; import nothing unless ``accept`` lists prefixes (a deny-all route-map otherwise).

Secrets: neighbour passwords are in FRR's configuration (that is where bgpd reads them) and nowhere
else - never in a result, a diff, an error or a log line: every text leaving this module goes through
``mask()``. frr-reload.py runs with ``--stdout --log-level error`` (no log file with configuration lines)
and a private ``--rundir``; the wanted configuration is written to a private 0600 file.

Validation (every field, before FRR is touched): ASNs 1-4294967295 (not 23456, AS_TRANS), the router
id an IPv4 address, each neighbour address inside one of the underlay's networks unless it is
multihop, passwords of printable characters without white space or quotes, descriptions without
line breaks, timers in FRR's ranges, prefixes valid networks. Then the whole configuration FRR would
read is checked by ``vtysh -C`` before anything is applied. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import json
import os
import re
import shutil
import tempfile
import time

from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

OWN = "KLN-"
BFD_PROFILE = "KLN-BFD"
RM_IN = "KLN-BGP-IN"
RM_OUT = {4: "KLN-BGP-OUT-V4", 6: "KLN-BGP-OUT-V6"}
PL_OUT = {4: "KLN-BGP-OUT-V4", 6: "KLN-BGP-OUT-V6"}
PL_IN = {4: "KLN-BGP-IN-V4", 6: "KLN-BGP-IN-V6"}
AFI = {4: "ipv4", 6: "ipv6"}
RELOAD_PATHS = ("/usr/lib/frr/frr-reload.py", "/usr/libexec/frr/frr-reload.py", "/usr/sbin/frr-reload.py")
DAEMONS = "daemons"
CONFDIR = "/etc/frr"
MASK = "********"
BFD_DEFAULT_INTERVAL = 300
BFD_DEFAULT_MULTIPLIER = 3
_PASSWORD_OK = re.compile(r"^[\x21-\x7e]{1,80}$")
_PASSWORD_BAD = set("'\"`\\")
_NEIGHBOR_KEYS = ("address", "asn", "password", "description", "keepalive", "hold", "connect_retry", "bfd",
                  "graceful_restart", "multihop", "address_families")
_TOP_KEYS = ("asn", "router_id", "neighbors", "announce", "accept", "graceful_restart", "bfd_interval",
             "bfd_multiplier", "underlay_networks", "state")


class FrrError(ValueError):
    """Input that cannot be applied; the message names the field. Raised before FRR is touched."""


class FrrRuntimeError(Exception):
    """FRR (vtysh, frr-reload.py, the service) failed; the message is masked."""


# ---- secrets ----------------------------------------------------------------------------------

_PW_RE = re.compile(r"(\bpassword\s+)(\S+)")


def mask(text, secrets=()):
    """``text`` with every password literal and every ``password <word>`` replaced by ********."""
    if text is None:
        return text
    text = str(text)
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(s, MASK)
    return _PW_RE.sub(lambda m: m.group(1) + MASK, text)


# ---- validation ---------------------------------------------------------------------------------

def _asn(v, where):
    if isinstance(v, bool):
        raise FrrError("%s: %r is not an AS number (1-4294967295)" % (where, v))
    if isinstance(v, str) and re.match(r"^\s*[0-9]+\s*$", v):
        v = int(v)
    if isinstance(v, str) and re.match(r"^\s*[0-9]+\.[0-9]+\s*$", v):         # asdot
        hi, lo = (int(x) for x in v.split("."))
        if hi > 65535 or lo > 65535:
            raise FrrError("%s: %r is not an AS number (asdot halves are 0-65535)" % (where, v))
        v = hi * 65536 + lo
    if not isinstance(v, int) or not 1 <= v <= 4294967295:
        raise FrrError("%s: %r is not an AS number (1-4294967295)" % (where, v))
    if v == 23456:
        raise FrrError("%s: 23456 is AS_TRANS (RFC 6793), not an AS number to configure" % where)
    return v


def _int(v, where, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip().isdigit()):
        raise FrrError("%s: must be an integer %d-%d, got %r" % (where, lo, hi, v))
    v = int(v)
    if not lo <= v <= hi:
        raise FrrError("%s: must be %d-%d, got %d" % (where, lo, hi, v))
    return v


def _bool(v, where, none_ok=False):
    if v is None and none_ok:
        return None
    if not isinstance(v, bool):
        raise FrrError("%s: must be true or false, got %r" % (where, v))
    return v


def _prefixes(items, where):
    """{4: [...], 6: [...]} of canonical networks, sorted, duplicates dropped."""
    if items is None:
        items = []
    if not isinstance(items, list):
        raise FrrError("%s: must be a list of prefixes" % where)
    out = {4: set(), 6: set()}
    for i, p in enumerate(items):
        try:
            n = ipaddress.ip_network(str(p).strip(), strict=True)
        except ValueError as e:
            raise FrrError("%s[%d]: %r is not a network (%s)" % (where, i, p, e))
        out[n.version].add(n)
    return dict((f, [str(n) for n in sorted(out[f])]) for f in (4, 6))


def _underlay(nets, where):
    out = []
    for i, n in enumerate(nets or []):
        try:
            out.append(ipaddress.ip_interface(str(n).strip()).network)
        except ValueError:
            raise FrrError("%s[%d]: %r is not a network" % (where, i, n))
    return out


def normalize(spec):
    """The canonical form of the module's input; FrrError names the first bad field."""
    if not isinstance(spec, dict):
        raise FrrError("bgp: must be a mapping")
    bad = sorted(set(spec) - set(_TOP_KEYS))
    if bad:
        raise FrrError("unknown field(s) %s" % ", ".join(bad))
    state = spec.get("state") or "present"
    if state not in ("present", "absent"):
        raise FrrError("state: must be present or absent, got %r" % (state,))
    if state == "absent":
        return {"state": "absent"}
    out = {"state": "present", "asn": _asn(spec.get("asn"), "asn")}
    rid = spec.get("router_id")
    try:
        out["router_id"] = str(ipaddress.IPv4Address(str(rid).strip()))
    except ValueError:
        raise FrrError("router_id: %r is not an IPv4 address (BGP router ids are 32-bit, written as IPv4)" % (rid,))
    if out["router_id"] == "0.0.0.0":
        raise FrrError("router_id: 0.0.0.0 is not a router id")
    out["graceful_restart"] = _bool(spec.get("graceful_restart", False), "graceful_restart")
    out["bfd_interval"] = _int(spec.get("bfd_interval", BFD_DEFAULT_INTERVAL), "bfd_interval", 10, 60000)
    out["bfd_multiplier"] = _int(spec.get("bfd_multiplier", BFD_DEFAULT_MULTIPLIER), "bfd_multiplier", 2, 255)
    out["announce"] = _prefixes(spec.get("announce"), "announce")
    out["accept"] = _prefixes(spec.get("accept"), "accept")
    underlay = _underlay(spec.get("underlay_networks"), "underlay_networks")
    neigh = spec.get("neighbors") or []
    if not isinstance(neigh, list):
        raise FrrError("neighbors: must be a list")
    out["neighbors"] = []
    seen = {}
    for i, n in enumerate(neigh):
        out["neighbors"].append(_neighbor(n, "neighbors[%d]" % i, underlay, seen))
    out["neighbors"].sort(key=lambda n: (ipaddress.ip_address(n["address"]).version,
                                         ipaddress.ip_address(n["address"])))
    return out


def _neighbor(n, where, underlay, seen):
    if not isinstance(n, dict):
        raise FrrError("%s: must be a mapping" % where)
    bad = sorted(set(n) - set(_NEIGHBOR_KEYS))
    if bad:
        raise FrrError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(_NEIGHBOR_KEYS)))
    try:
        addr = ipaddress.ip_address(str(n.get("address")).strip().split("/", maxsplit=1)[0])
    except ValueError:
        raise FrrError("%s.address: %r is not an IP address" % (where, n.get("address")))
    if "/" in str(n.get("address")) and str(n.get("address")).split("/")[1] not in ("32", "128"):
        raise FrrError("%s.address: %r is a network; a neighbour is one address (/32 or /128)" % (where, n.get("address")))
    if str(addr) in seen:
        raise FrrError("%s.address: %s is already %s" % (where, addr, seen[str(addr)]))
    seen[str(addr)] = where
    where = "%s (%s)" % (where, addr)
    out = {"address": str(addr), "asn": _asn(n.get("asn"), where + ".asn")}
    hop = n.get("multihop") or 0
    out["multihop"] = _int(hop, where + ".multihop", 0, 255)
    if underlay and not out["multihop"] and not any(addr in net for net in underlay if net.version == addr.version):
        raise FrrError("%s.address: %s is outside the underlay (%s); a peer there needs multihop"
                       % (where, addr, ", ".join(str(u) for u in underlay)))
    pw = n.get("password")
    if pw not in (None, ""):
        if not isinstance(pw, str):
            raise FrrError("%s.password: must be a string" % where)
        if "\n" in pw or "\r" in pw:
            raise FrrError("%s.password: must not contain a line break" % where)
        if set(pw) & _PASSWORD_BAD:
            raise FrrError("%s.password: must not contain a quote or a backslash (' \" ` \\)" % where)
        if not _PASSWORD_OK.match(pw):
            raise FrrError("%s.password: 1-80 printable characters without white space" % where)
        out["password"] = pw
    desc = n.get("description")
    if desc not in (None, ""):
        desc = str(desc)
        if "\n" in desc or "\r" in desc or not desc.isprintable() or len(desc) > 80:
            raise FrrError("%s.description: one line of at most 80 printable characters" % where)
        out["description"] = desc.strip()
    ka, hold = n.get("keepalive"), n.get("hold")
    if (ka is None) != (hold is None):
        raise FrrError("%s.hold: keepalive and hold are set together" % where)
    if ka is not None:
        out["keepalive"] = _int(ka, where + ".keepalive", 0, 65535)
        out["hold"] = _int(hold, where + ".hold", 0, 65535)
        if out["hold"] and out["hold"] < 3:
            raise FrrError("%s.hold: 0 or at least 3 seconds, got %d" % (where, out["hold"]))
        if out["hold"] and out["keepalive"] > out["hold"]:
            raise FrrError("%s.keepalive: %d is more than hold %d" % (where, out["keepalive"], out["hold"]))
    if n.get("connect_retry") is not None:
        out["connect_retry"] = _int(n["connect_retry"], where + ".connect_retry", 1, 65535)
    out["bfd"] = _bool(n.get("bfd", False), where + ".bfd")
    out["graceful_restart"] = _bool(n.get("graceful_restart"), where + ".graceful_restart", none_ok=True)
    fams = n.get("address_families")
    if fams in (None, []):
        fams = [AFI[addr.version]]
    if not isinstance(fams, list) or any(f not in ("ipv4", "ipv6") for f in fams):
        raise FrrError("%s.address_families: a list of ipv4 and/or ipv6, got %r" % (where, fams))
    out["address_families"] = sorted(set(fams))
    return out


def secrets(spec):
    return [n["password"] for n in spec.get("neighbors") or [] if n.get("password")]


# ---- rendering ----------------------------------------------------------------------------------

def render(spec):
    """The owned configuration (FRR's canonical rendering, so a configuration already there shows no
    difference), "" for state absent."""
    if spec["state"] == "absent":
        return ""
    lines = []
    if any(n["bfd"] for n in spec["neighbors"]):
        lines += ["bfd", " profile %s" % BFD_PROFILE]
        if spec["bfd_multiplier"] != BFD_DEFAULT_MULTIPLIER:
            lines.append("  detect-multiplier %d" % spec["bfd_multiplier"])
        if spec["bfd_interval"] != BFD_DEFAULT_INTERVAL:
            lines += ["  transmit-interval %d" % spec["bfd_interval"], "  receive-interval %d" % spec["bfd_interval"]]
        lines += [" exit", " !", "exit", "!"]
    lines += ["router bgp %d" % spec["asn"], " bgp router-id %s" % spec["router_id"],
              " no bgp default ipv4-unicast"]
    if spec["graceful_restart"]:
        lines.append(" bgp graceful-restart")
    lines.append(" no bgp network import-check")
    for n in spec["neighbors"]:
        a = n["address"]
        lines.append(" neighbor %s remote-as %d" % (a, n["asn"]))
        if n.get("description"):
            lines.append(" neighbor %s description %s" % (a, n["description"]))
        if n["multihop"]:
            lines.append(" neighbor %s ebgp-multihop %d" % (a, n["multihop"]))
        if n["bfd"]:
            lines += [" neighbor %s bfd" % a, " neighbor %s bfd profile %s" % (a, BFD_PROFILE)]
        if n.get("password"):
            lines.append(" neighbor %s password %s" % (a, n["password"]))
        if n["graceful_restart"] is True:
            lines.append(" neighbor %s graceful-restart" % a)
        elif n["graceful_restart"] is False:
            lines.append(" neighbor %s graceful-restart-disable" % a)
        if "keepalive" in n:
            lines.append(" neighbor %s timers %d %d" % (a, n["keepalive"], n["hold"]))
        if "connect_retry" in n:
            lines.append(" neighbor %s timers connect %d" % (a, n["connect_retry"]))
    for fam in (4, 6):
        members = [n for n in spec["neighbors"] if AFI[fam] in n["address_families"]]
        if not members and not spec["announce"][fam]:
            continue
        lines += [" !", " address-family %s unicast" % AFI[fam]]
        lines += ["  network %s" % p for p in spec["announce"][fam]]
        for n in members:
            lines += ["  neighbor %s activate" % n["address"],
                      "  neighbor %s route-map %s in" % (n["address"], RM_IN if not spec["accept"][fam] else PL_IN[fam]),
                      "  neighbor %s route-map %s out" % (n["address"], RM_OUT[fam])]
        lines.append(" exit-address-family")
    lines += ["exit", "!"]
    for fam in (4, 6):
        ip = "ip" if fam == 4 else "ipv6"
        for i, p in enumerate(spec["announce"][fam], 1):
            lines.append("%s prefix-list %s seq %d permit %s" % (ip, PL_OUT[fam], i * 5, p))
        for i, p in enumerate(spec["accept"][fam], 1):
            lines.append("%s prefix-list %s seq %d permit %s" % (ip, PL_IN[fam], i * 5, p))
    lines.append("!")
    lines += ["route-map %s deny 10" % RM_IN, "exit", "!"]
    for fam in (4, 6):
        ip = "ip" if fam == 4 else "ipv6"
        if spec["announce"][fam]:
            lines += ["route-map %s permit 10" % RM_OUT[fam], " match %s address prefix-list %s" % (ip, PL_OUT[fam]),
                      "exit", "!"]
        else:
            lines += ["route-map %s deny 10" % RM_OUT[fam], "exit", "!"]
        if spec["accept"][fam]:
            lines += ["route-map %s permit 10" % PL_IN[fam], " match %s address prefix-list %s" % (ip, PL_IN[fam]),
                      "exit", "!"]
    return "\n".join(lines) + "\n"


# ---- the running configuration, split into top-level blocks -------------------------------------

_HEADER = ("Building configuration", "Current configuration", "frr version", "end")


def blocks(text):
    """[(first line, [lines])] of a configuration: a top-level line and the indented lines under it
    (up to its ``exit``), comments and the ``show running-config`` header dropped."""
    out = []
    cur = None
    for line in text.splitlines():
        if not line.strip() or line.strip() == "!" or line.startswith(_HEADER):
            continue
        if line[0] != " ":
            if line == "exit" and cur is not None:
                cur[1].append(line)
                cur = None
                continue
            cur = (line, [line])
            out.append(cur)
        elif cur is not None:
            cur[1].append(line)
    return out


def _owned(first, vrf_default=True):
    if re.match(r"^router bgp \d+\s*$", first):
        return vrf_default
    m = re.match(r"^(ip|ipv6) prefix-list (\S+)", first) or re.match(r"^(route-map) (\S+)", first)
    return bool(m and m.group(2).startswith(OWN))


def strip_owned(text):
    """The lines of a configuration that the module does not own, and the BFD block without its
    KLN-BFD profile: (kept text, owned text)."""
    kept, owned = [], []
    for first, lines in blocks(text):
        if first == "bfd":
            keep_lines, own_lines, in_own = [], [], False
            for ln in lines:
                if ln.startswith(" profile "):
                    in_own = ln.split()[1] == BFD_PROFILE
                if in_own:
                    own_lines.append(ln)
                    if ln == " exit":
                        in_own = False
                else:
                    keep_lines.append(ln)
            # an empty "bfd" node stays: bfdd keeps it once made ("no bfd" does not remove it)
            kept += keep_lines if keep_lines[-1:] == ["exit"] else keep_lines + ["exit"]
            if own_lines:
                owned += ["bfd"] + own_lines + ["exit"]
        elif _owned(first):
            owned += lines
        else:
            kept += lines
    return "\n".join(kept) + ("\n" if kept else ""), "\n".join(owned) + ("\n" if owned else "")


def parse_reload_test(out):
    """(removed, added) entries of ``frr-reload.py --test`` output: each one line of context path and
    the configuration line, ``router bgp 65001 > address-family ipv4 unicast > network 10.0.0.1/32``."""
    section = None
    removed, added = [], []
    entry = []

    def flush():
        if entry and section is not None:
            (removed if section == "del" else added).append(" > ".join(x.strip() for x in entry))
        del entry[:]

    for line in out.splitlines():
        if line.startswith("Lines To Delete"):
            flush()
            section = "del"
            continue
        if line.startswith("Lines To Add"):
            flush()
            section = "add"
            continue
        if section is None or set(line.strip()) <= set("=") or not line.strip():
            if not line.strip():
                flush()
            continue
        if line[0] != " ":
            flush()
        entry.append(line)
    flush()
    # frr-reload.py lists the removal of a single-line context (``no ip prefix-list ...``) among its additions
    removed += [x for x in added if x.split(" > ")[-1].startswith("no ")]
    added = [x for x in added if not x.split(" > ")[-1].startswith("no ")]
    return removed, added


# ---- FRR on the node ------------------------------------------------------------------------------

class Frr:
    """One FRR instance: the packaged service (default), or one started with ``-N pathspace`` (tests;
    then the caller runs the daemons and ``manage_service`` is False)."""

    def __init__(self, module=None, pathspace=None, confdir=CONFDIR, manage_service=True, reload_script=None):
        self.module = module
        self.pathspace = pathspace
        self.confdir = confdir
        self.manage_service = manage_service
        ns = ["-N", pathspace] if pathspace else []
        self.vtysh_tool = Tool(module, "vtysh", ns)
        self.systemctl = Tool(module, "systemctl")
        self.python = Tool(module, "python3")
        self.reload_script = reload_script or next((p for p in RELOAD_PATHS if os.path.isfile(p)), None)
        self.ns = ns

    @property
    def conf_dir(self):
        return os.path.join(self.confdir, self.pathspace) if self.pathspace else self.confdir

    @property
    def conf_file(self):
        return os.path.join(self.conf_dir, "frr.conf")

    def vtysh(self, *commands, **kw):
        if not self.vtysh_tool.available:
            raise FrrRuntimeError("vtysh is not installed (package frr)")
        argv = []
        for c in commands:
            argv += ["-c", c]
        rc, out, err = self.vtysh_tool.run(*argv, check=False, **kw)
        if rc != 0:
            raise FrrRuntimeError("vtysh %s: %s" % (" ; ".join(commands), mask(err or out).strip()))
        return out

    def answers(self):
        if not self.vtysh_tool.available:
            return False
        rc, _o, _e = self.vtysh_tool.run("-c", "show version", check=False)
        return rc == 0

    def running(self):
        return self.vtysh("show running-config")

    def check_file(self, path, secret_list):
        """``vtysh -C -f``: FRR's parser on the whole configuration, before anything is applied."""
        rc, out, err = self.vtysh_tool.run("-C", "-f", path, check=False)
        if rc != 0:
            raise FrrError("FRR refuses the configuration: %s" % mask((out + err).strip(), secret_list)[-1500:])

    def _reload(self, path, test, rundir, secret_list):
        if not self.reload_script:
            raise FrrRuntimeError("frr-reload.py is not installed (Debian: package frr-pythontools; EL: part of frr)")
        args = [self.reload_script, "--test" if test else "--reload", "--stdout", "--log-level", "error",
                "--rundir", rundir, "--confdir", self.confdir] + self.ns + [path]
        rc, out, err = self.python.run(*args, check=False)
        if rc != 0:
            raise FrrRuntimeError("frr-reload.py %s failed (rc %s): %s"
                                  % ("--test" if test else "--reload", rc, mask((err + out).strip(), secret_list)[-1500:]))
        return out

    def reload_test(self, path, rundir, secret_list):
        return parse_reload_test(self._reload(path, True, rundir, secret_list))

    def reload(self, path, rundir, secret_list):
        return self._reload(path, False, rundir, secret_list)

    # -- the packaged service -------------------------------------------------------------------
    def daemons_path(self):
        return os.path.join(self.conf_dir, DAEMONS)

    def service_active(self):
        if not self.manage_service:
            return self.answers()
        rc, out, _e = self.systemctl.run("is-active", "frr.service", check=False)
        return rc == 0 and out.strip() == "active"

    def service_enabled(self):
        rc, out, _e = self.systemctl.run("is-enabled", "frr.service", check=False)
        return out.strip() in ("enabled", "enabled-runtime", "static", "alias")

    def restart(self, start_only=False):
        self.systemctl.run("enable", "frr.service", check=False)
        self.systemctl.run("reset-failed", "frr.service", check=False)     # a unit that failed (killed) starts again
        self.systemctl.run("start" if start_only else "restart", "frr.service")
        for _i in range(60):
            if self.answers() and ("bgpd" in self.vtysh("show daemons") if not start_only else True):
                return
            time.sleep(0.5)
        raise FrrRuntimeError("FRR did not answer on vtysh 30 s after it was (re)started")


def daemons_text(text, want):
    """/etc/frr/daemons with ``<daemon>=yes`` for each daemon of ``want``: (new text, [daemons enabled])."""
    lines = text.splitlines()
    done, enabled = set(), []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\w+)=(\S*)\s*$", line)
        if m and m.group(1) in want:
            done.add(m.group(1))
            if m.group(2) != "yes":
                lines[i] = "%s=yes" % m.group(1)
                enabled.append(m.group(1))
    for d in sorted(set(want) - done):
        lines.append("%s=yes" % d)
        enabled.append(d)
    return "\n".join(lines) + "\n", sorted(enabled)


def _secure(path, check):
    """frr.conf holds the passwords: mode 0640, owner frr:frr (group frr when the user is missing)."""
    if not os.path.exists(path):
        return []
    st = os.stat(path)
    changes = []
    import grp
    import pwd
    try:
        uid = pwd.getpwnam("frr").pw_uid
    except KeyError:
        uid = st.st_uid
    try:
        gid = grp.getgrnam("frr").gr_gid
    except KeyError:
        gid = st.st_gid
    if st.st_mode & 0o7777 != 0o640:
        changes.append("chmod 0640 %s (was %04o)" % (path, st.st_mode & 0o7777))
        if not check:
            os.chmod(path, 0o640)
    if (st.st_uid, st.st_gid) != (uid, gid):
        changes.append("chown frr:frr %s" % path)
        if not check:
            os.chown(path, uid, gid)
    return changes


def apply(spec, frr, check=False):
    """Make FRR hold ``spec`` (normalize()d). Returns {changed, removed, added (configuration lines,
    masked), daemons [enabled], service [...], files [...], config (the owned configuration, masked)}.
    FrrError for configuration FRR refuses (nothing applied), FrrRuntimeError for FRR failures."""
    secret_list = secrets(spec)
    res = {"changed": False, "removed": [], "added": [], "daemons": [], "service": [], "files": []}
    owned = render(spec)
    res["config"] = mask(owned, secret_list)
    want_daemons = []
    if spec["state"] == "present":
        want_daemons = ["bgpd"] + (["bfdd"] if any(n["bfd"] for n in spec["neighbors"]) else [])
    tmp = tempfile.mkdtemp(prefix="netstack-frr-")
    os.chmod(tmp, 0o700)
    try:
        # 1. what the daemons file and the service need
        new_daemons = None
        if frr.manage_service and want_daemons:
            dpath = frr.daemons_path()
            try:
                with open(dpath) as f:
                    dtext = f.read()
            except (IOError, OSError) as e:
                raise FrrRuntimeError("cannot read %s: %s (is FRR installed?)" % (dpath, e.strerror))
            new_daemons, res["daemons"] = daemons_text(dtext, want_daemons)
        running = frr.answers()
        current = frr.running() if running else ""
        kept, had = strip_owned(current)
        if spec["state"] == "absent" and not had.strip():
            return res                  # nothing of ours in FRR (or FRR not running): nothing to remove
        full = _merge(kept, owned)
        path = os.path.join(tmp, "frr.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(full)
        if owned:
            frr.check_file(path, secret_list)
        # 2. the daemons and the service (only here can FRR start answering)
        if res["daemons"]:
            res["service"].append("enable %s in %s and restart FRR" % (", ".join(res["daemons"]), frr.daemons_path()))
            if not check:
                _write(frr.daemons_path(), new_daemons)
                frr.restart()
                running = True
        elif frr.manage_service and spec["state"] == "present" and not frr.service_active():
            res["service"].append("start FRR")
            if not check:
                frr.restart(start_only=True)
                running = True
        elif frr.manage_service and spec["state"] == "present" and not frr.service_enabled():
            res["service"].append("enable frr.service")
            if not check:
                frr.systemctl.run("enable", "frr.service")
        # 3. the difference, FRR's way
        if running:
            if not check and res["service"]:
                current = frr.running()
                kept, _had = strip_owned(current)
                with open(path, "w") as f:
                    f.write(_merge(kept, owned))
            rundir = os.path.join(tmp, "run")
            os.mkdir(rundir, 0o700)
            removed, added = frr.reload_test(path, rundir, secret_list)
            res["removed"] = [mask(x, secret_list) for x in removed]
            res["added"] = [mask(x, secret_list) for x in added]
            if (removed or added) and not check:
                frr.reload(path, rundir, secret_list)
                left_removed, left_added = frr.reload_test(path, rundir, secret_list)
                if left_removed or left_added:
                    raise FrrRuntimeError("FRR did not take the configuration; still to remove %s, to add %s"
                                          % ([mask(x, secret_list) for x in left_removed],
                                             [mask(x, secret_list) for x in left_added]))
        else:
            res["added"] = [mask(x, secret_list) for x in owned.splitlines() if x.strip() not in ("!", "exit")]
        if spec["state"] == "present" or os.path.exists(frr.conf_file):
            res["files"] = _secure(frr.conf_file, check)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["changed"] = bool(res["removed"] or res["added"] or res["daemons"] or res["service"] or res["files"])
    return res


def _merge(kept, owned):
    """The configuration: what is kept, then the owned blocks; the kept ``bfd`` node's lines go into the owned
    ``bfd`` block when there is one (one ``bfd`` context, as FRR shows it)."""
    if not owned.startswith("bfd\n"):
        return kept + owned
    out, extra, in_bfd = [], [], False
    for ln in kept.splitlines():
        if ln == "bfd":
            in_bfd = True
            continue
        if in_bfd:
            if ln == "exit":
                in_bfd = False
            else:
                extra.append(ln)
            continue
        out.append(ln)
    head = owned.split("\n", 1)
    return "\n".join(out) + ("\n" if out else "") + "bfd\n" + "".join(x + "\n" for x in extra) + head[1]


def _frr_group(path):
    import grp
    try:
        os.chown(path, -1, grp.getgrnam("frr").gr_gid)
    except (KeyError, OSError):
        pass


def _write(path, text):
    tmp = path + ".kln-tmp"
    st = os.stat(path) if os.path.exists(path) else None
    with open(tmp, "w") as f:
        f.write(text)
    if st is not None:
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
    os.rename(tmp, path)


# ---- status (netstack bgp peers, verify) ------------------------------------------------------------

def peers(frr):
    """Per neighbour and address family: {neighbor, family, remote_as, local_as, state, uptime,
    uptime_seconds, prefixes_received, prefixes_sent, description}, from ``show bgp summary json``."""
    out = []
    fams = (("ipv4Unicast", "ipv4"), ("ipv6Unicast", "ipv6"))
    data = {}
    for key, afi in fams:
        try:
            text = frr.vtysh("show bgp %s unicast summary json" % afi)
            data[key] = json.loads(text or "{}")
        except (FrrRuntimeError, ValueError):
            data[key] = {}
    for key, afi in fams:
        d = data.get(key) or {}
        if key in d:            # some versions wrap the family
            d = d[key]
        for addr, p in sorted((d.get("peers") or {}).items()):
            ms = p.get("peerUptimeMsec") or 0
            out.append({"neighbor": addr, "family": afi, "remote_as": p.get("remoteAs"), "local_as": p.get("localAs", d.get("as")),
                        "state": p.get("state"), "uptime": p.get("peerUptime"), "uptime_seconds": int(ms // 1000),
                        "prefixes_received": p.get("pfxRcd", 0), "prefixes_sent": p.get("pfxSnt", 0),
                        "description": p.get("desc", "")})
    return out


def format_peers(rows):
    """Text like ``cilium bgp peers``."""
    head = ("Local AS", "Peer Address", "Peer AS", "Session State", "Uptime", "Family", "Received / Advertised")
    lines = ["%-10s %-28s %-10s %-12s %-12s %-9s %s" % head]
    for r in rows:
        lines.append("%-10s %-28s %-10s %-12s %-12s %-9s %s / %s" % (
            r["local_as"], r["neighbor"], r["remote_as"], (r["state"] or "?").lower(), r["uptime"] or "-",
            r["family"] + "/unicast", r["prefixes_received"], r["prefixes_sent"]))
    return "\n".join(lines)


def interface_networks(interface, module=None):
    """The networks of the addresses on ``interface`` (IPv4 and global IPv6): what "the underlay" is
    for a neighbour without multihop. FrrError when there is no such interface."""
    rc, out, err = Tool(module, "ip").run("-j", "addr", "show", "dev", interface, check=False)
    if rc != 0:
        raise FrrError("underlay_interface: no network interface %r on this node (%s)" % (interface, err.strip()))
    nets = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info") or []:
            if a.get("scope") == "link":
                continue
            nets.append(str(ipaddress.ip_interface("%s/%s" % (a["local"], a["prefixlen"])).network))
    return nets
