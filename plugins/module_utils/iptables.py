# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Removing what kube-proxy leaves on a node: iptables (legacy and nft backends) and nftables.

The iptables side works on ``iptables-save`` output: parse it per table (``*nat`` ... ``COMMIT``),
drop kube-proxy's chains, their rules and every rule elsewhere that jumps (``-j``/``-g``) into
one of them, and give the filtered text of each table that changed to the matching
``iptables-restore`` (without ``--noflush``: only the tables in the input are replaced, each
atomically). Every other line is passed through untouched, so other tools' rules stay byte for
byte. The nftables side deletes the ``ip``/``ip6`` ``kube-proxy`` tables of kube-proxy's nftables
mode.

Read state, compute the wanted state, write only where they differ: ``plan()`` computes every
change (and the diff) without touching anything; ``apply()`` backs up what it is about to change,
applies it, and puts everything back if a step fails part-way.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import json
import os
import re
import shlex
import time

from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, ToolError

# Fixed-name chains kube-proxy's iptables mode creates (nat, filter; the canary also in mangle).
KUBE_PROXY_CHAINS = frozenset([
    "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-FORWARD",
    "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY",
])
# Per-service and per-endpoint chains (KUBE-XLB- is the pre-1.24 name of KUBE-SVL-/KUBE-EXT-).
KUBE_PROXY_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-", "KUBE-XLB-")
# Chains kubelet creates (and kube-proxy --cleanup leaves alone).
KUBELET_CHAINS = frozenset(["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP", "KUBE-IPTABLES-HINT"])
# Tables kube-proxy and kubelet write to; raw and security are never touched.
TABLES = ("nat", "filter", "mangle")

BACKENDS = ("legacy", "nft")
FAMILIES = ("ipv4", "ipv6")
NFT_TABLE = "kube-proxy"
NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}
CMD_PREFIX = {"ipv4": "iptables", "ipv6": "ip6tables"}
_TARGET_OPTS = ("-j", "--jump", "-g", "--goto")
_COUNTERS = re.compile(r"^\[\d+:\d+\]\s+")
_CHAIN_COUNTERS = re.compile(r"\s+\[\d+:\d+\]$")
_XTABLES_WAIT = "5"

DEFAULT_BACKUP_DIR = "/var/backups/kldload-netstack/kube-proxy-cleanup"


class CleanupError(Exception):
    """Cleanup failed; ``result`` holds what is known (removed, backups, skipped)."""

    def __init__(self, msg, result=None):
        super(CleanupError, self).__init__(msg)
        self.result = result or {}


# -- names --------------------------------------------------------------------------------------

def is_kube_proxy_chain(name):
    return name in KUBE_PROXY_CHAINS or name.startswith(KUBE_PROXY_PREFIXES)


def is_removable(name, include_kubelet_chains=False):
    return is_kube_proxy_chain(name) or (include_kubelet_chains and name in KUBELET_CHAINS)


# -- iptables-save parsing ----------------------------------------------------------------------

class Table:
    """One ``*table`` ... ``COMMIT`` block of iptables-save output, line for line.

    ``lines`` holds (kind, chain, target, text): kind is ``chain`` (a ``:NAME POLICY [p:b]``
    declaration), ``rule`` (``[p:b] -A CHAIN ...``) or ``other`` (anything else, kept as is).
    """

    def __init__(self, name):
        self.name = name
        self.lines = []

    @property
    def chains(self):
        return [entry[1] for entry in self.lines if entry[0] == "chain"]

    def text(self, counters=True):
        out = ["*%s" % self.name]
        for entry in self.lines:
            line = entry[3]
            if not counters:
                line = strip_counters(line)
            out.append(line)
        out.append("COMMIT")
        return "".join(line + "\n" for line in out)


def strip_counters(line):
    """Drop packet/byte counters from one save line (``[p:b] -A ...`` or ``:CHAIN POLICY [p:b]``)."""
    if line.startswith(":"):
        return _CHAIN_COUNTERS.sub(" [0:0]", line)
    return _COUNTERS.sub("", line)


def _tokens(rule):
    try:
        return shlex.split(rule)
    except ValueError:
        return rule.split()


def parse_rule(line):
    """(chain, target) of a save rule line; target is None for a rule without -j/-g."""
    toks = _tokens(_COUNTERS.sub("", line))
    if len(toks) < 2 or toks[0] not in ("-A", "--append"):
        raise ValueError("not an appended rule: %r" % line)
    target = None
    for i in range(2, len(toks) - 1):
        if toks[i] in _TARGET_OPTS:
            target = toks[i + 1]
            break
    return toks[1], target


def parse_save(text):
    """Parse iptables-save output into an ordered list of Table. Comment lines are ignored."""
    tables = []
    cur = None
    for num, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.startswith("*"):
            if cur is not None:
                raise ValueError("line %d: table %s starts before %s is committed" % (num, line[1:], cur.name))
            cur = Table(line[1:].strip())
            continue
        if cur is None:
            raise ValueError("line %d: %r outside of a table" % (num, line))
        if line == "COMMIT":
            tables.append(cur)
            cur = None
        elif line.startswith(":"):
            cur.lines.append(("chain", line[1:].split()[0], None, line))
        elif _COUNTERS.sub("", line).startswith(("-A ", "--append ")):
            chain, target = parse_rule(line)
            cur.lines.append(("rule", chain, target, line))
        else:
            cur.lines.append(("other", None, None, line))
    if cur is not None:
        raise ValueError("table %s is not committed" % cur.name)
    return tables


class TableChange:
    """What filtering one table removes; ``before``/``after`` are full table texts (with counters)."""

    def __init__(self, backend, family, table, before, after, chains, rules):
        self.backend = backend
        self.family = family
        self.table = table
        self.before = before
        self.after = after
        self.chains = chains
        self.rules = rules
        self.backup = None

    def report(self):
        return dict(backend=self.backend, family=self.family, table=self.table, chains=list(self.chains),
                    rules=self.rules, backup=self.backup)


def filter_table(table, include_kubelet_chains=False):
    """Return (filtered Table, removed chain names, number of removed rules).

    Removes the removable chains (declaration and rules) and every rule in a kept chain whose
    target is a removed chain. Built-in chains are never removed (they have a policy, not ``-``).
    """
    removed = set()
    for kind, chain, dummy, line in table.lines:
        if kind == "chain" and is_removable(chain, include_kubelet_chains) and line.split()[1] == "-":
            removed.add(chain)
    out = Table(table.name)
    rules = 0
    for entry in table.lines:
        kind, chain, target = entry[0], entry[1], entry[2]
        if kind == "chain" and chain in removed:
            continue
        if kind == "rule" and (chain in removed or target in removed):
            rules += 1
            continue
        out.lines.append(entry)
    return out, sorted(removed), rules


def plan_tables(save_text, backend, family, include_kubelet_chains=False):
    """TableChange for every table of ``save_text`` that filtering changes."""
    changes = []
    for table in parse_save(save_text):
        if table.name not in TABLES:
            continue
        filtered, chains, rules = filter_table(table, include_kubelet_chains)
        if chains or rules:
            changes.append(TableChange(backend, family, table.name, table.text(), filtered.text(), chains, rules))
    return changes


# -- nftables listing ---------------------------------------------------------------------------

def parse_nft_tables(text):
    """[(family, name)] from ``nft list tables`` output."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            found.append((parts[1], parts[2]))
    return found


def nft_table_summary(json_text):
    """(chain names, rule count) of one table from ``nft -j list table`` output."""
    data = json.loads(json_text)
    chains, rules = [], 0
    for obj in data.get("nftables", []):
        if "chain" in obj:
            chains.append(obj["chain"]["name"])
        elif "rule" in obj:
            rules += 1
    return sorted(chains), rules


def nft_table_summary_text(text):
    """Fallback for nft without JSON support: (chain names, rule count) from ``nft list table``."""
    chains, rules, in_chain = [], 0, False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            chains.append(line.split()[1].strip('"'))
            in_chain = True
        elif line == "}":
            in_chain = False
        elif in_chain and line and not line.startswith(("type ", "policy ", "comment ", "devices ")):
            rules += 1
    return sorted(chains), rules


# -- the cleanup --------------------------------------------------------------------------------

class _Backend:
    """The save/restore pair of one iptables backend and family."""

    def __init__(self, module, backend, family):
        self.backend = backend
        self.family = family
        base = "%s-%s" % (CMD_PREFIX[family], backend)
        self.save = Tool(module, base + "-save", ["-c"])
        self.restore = Tool(module, base + "-restore", ["-c", "-w", _XTABLES_WAIT])
        self.note = None
        if not self.save.available or not self.restore.available:
            self._fallback(module)

    def _fallback(self, module):
        """Use plain iptables-save/-restore when they are this backend (iptables < 1.8, or alternatives)."""
        plain_save = Tool(module, CMD_PREFIX[self.family] + "-save", ["-c"])
        plain_restore = Tool(module, CMD_PREFIX[self.family] + "-restore", ["-c", "-w", _XTABLES_WAIT])
        missing = [t.binary for t in (self.save, self.restore) if not t.available]
        self.note = "%s not found" % " and ".join(missing)
        if not (plain_save.available and plain_restore.available):
            return
        rc, out, err = plain_save.run("--version", check=False)
        version = (out or err or "").strip()
        variant = "nft" if "nf_tables" in version else "legacy"
        if rc == 0 and variant == self.backend:
            self.save, self.restore, self.note = plain_save, plain_restore, None

    @property
    def available(self):
        return self.note is None

    @property
    def name(self):
        return "%s/%s" % (self.backend, self.family)


class KubeProxyCleanup:
    """Plan and apply the cleanup for one node.

    ``module`` is an AnsibleModule (its tools are run through it and warnings go to it), or None
    (tools run with subprocess). Warnings are also kept in ``warnings``. Failures raise CleanupError.
    """

    def __init__(self, module, backends=BACKENDS, families=FAMILIES, nftables=True,
                 include_kubelet_chains=False, backup=True, backup_dir=DEFAULT_BACKUP_DIR):
        self.module = module
        self.backends = [b for b in BACKENDS if b in backends]
        self.families = [f for f in FAMILIES if f in families]
        self.nftables = nftables
        self.include_kubelet_chains = include_kubelet_chains
        self.backup = backup
        self.backup_dir = backup_dir
        self.skipped = []
        self.changes = []        # TableChange, iptables tables
        self.nft_changes = []    # TableChange, backend "nftables", before = nft list table text
        self._tools = {}
        self._nft = None
        self.warnings = []

    # -- validation ---------------------------------------------------------------------------
    @staticmethod
    def validate(params):
        """Raise CleanupError for option combinations argument_spec cannot express."""
        if not params.get("families"):
            raise CleanupError("families must name at least one of: %s" % ", ".join(FAMILIES))
        if not params.get("backends") and not params.get("nftables"):
            raise CleanupError("backends is empty and nftables is false: nothing to clean up")
        if params.get("backup"):
            bdir = params.get("backup_dir") or ""
            if not os.path.isabs(bdir):
                raise CleanupError("backup_dir must be an absolute path, got %r" % bdir)
            if os.path.exists(bdir) and not os.path.isdir(bdir):
                raise CleanupError("backup_dir %s exists and is not a directory" % bdir)

    def warn(self, msg):
        """Warn once per message: to the module, and in ``warnings``."""
        if msg in self.warnings:
            return
        self.warnings.append(msg)
        if self.module is not None:
            self.module.warn(msg)

    # -- reading ------------------------------------------------------------------------------
    def _backend(self, backend, family):
        key = (backend, family)
        if key not in self._tools:
            self._tools[key] = _Backend(self.module, backend, family)
        return self._tools[key]

    def _nft_tool(self):
        if self._nft is None:
            self._nft = Tool(self.module, "nft")
        return self._nft

    def _read_iptables(self, be):
        try:
            out = be.save.run()[1]
        except ToolError as e:
            raise CleanupError("reading %s rules failed: %s" % (be.name, e))
        for line in out.splitlines():
            # iptables-nft-save cannot show a table holding rules it does not understand
            if line.startswith("#") and "incompatible" in line:
                self.warn("%s: %s (that table is not cleaned)" % (be.save.binary, line.lstrip("# ")))
        try:
            return plan_tables(out, be.backend, be.family, self.include_kubelet_chains)
        except ValueError as e:
            raise CleanupError("cannot parse %s output: %s" % (be.save.binary, e))

    def _read_nft(self, skipped):
        nft = self._nft_tool()
        if not nft.available:
            skipped.append(dict(backend="nftables", family=None, reason="nft not found"))
            return []
        try:
            out = nft.run("list", "tables")[1]
        except ToolError as e:
            raise CleanupError("listing nftables tables failed: %s" % e)
        present = set(parse_nft_tables(out))
        changes = []
        for family in self.families:
            fam = NFT_FAMILY[family]
            if (fam, NFT_TABLE) not in present:
                continue
            try:
                text = nft.run("list", "table", fam, NFT_TABLE)[1]
                rc, js = nft.run("-j", "list", "table", fam, NFT_TABLE, check=False)[:2]
                chains, rules = nft_table_summary(js) if rc == 0 and js.strip() else nft_table_summary_text(text)
            except ToolError as e:
                raise CleanupError("reading nftables table %s %s failed: %s" % (fam, NFT_TABLE, e))
            except ValueError:
                chains, rules = nft_table_summary_text(text)
            changes.append(TableChange("nftables", family, "%s %s" % (fam, NFT_TABLE), text, "", chains, rules))
        return changes

    def _read_all(self):
        skipped, changes, nft_changes = [], [], []
        for backend in self.backends:
            for family in self.families:
                be = self._backend(backend, family)
                if not be.available:
                    skipped.append(dict(backend=backend, family=family, reason=be.note))
                    continue
                changes += self._read_iptables(be)
        if self.nftables:
            nft_changes = self._read_nft(skipped)
        return skipped, changes, nft_changes

    def plan(self):
        """Read every selected backend and compute what to remove. Touches nothing."""
        self.skipped, self.changes, self.nft_changes = self._read_all()
        return self.changes + self.nft_changes

    def leftovers(self):
        """What a fresh read would still remove (after apply: should be nothing)."""
        changes, nft_changes = self._read_all()[1:]
        return changes + nft_changes

    # -- writing ------------------------------------------------------------------------------
    def _ensure_backup_dir(self):
        if os.path.isdir(self.backup_dir):
            return
        try:
            os.makedirs(self.backup_dir, 0o700)
            os.chmod(self.backup_dir, 0o700)
        except OSError as e:
            raise CleanupError("cannot create backup_dir %s: %s" % (self.backup_dir, e))

    def _write_backup(self, stem, ext, text):
        """Write ``text`` to a new 0600 file ``stem[-N].ext`` in backup_dir (never overwrites)."""
        for n in range(1000):
            path = os.path.join(self.backup_dir, "%s%s.%s" % (stem, "" if n == 0 else "-%d" % n, ext))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    continue
                raise CleanupError("cannot write backup %s: %s" % (path, e))
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)
                    f.write(text.encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise CleanupError("cannot write backup %s: %s" % (path, e))
            return path
        raise CleanupError("cannot find a free backup file name for %s in %s" % (stem, self.backup_dir))

    def _backups(self):
        """Back up every table about to change: one file per backend/family, one per nft table."""
        self._ensure_backup_dir()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        paths = []
        groups = []
        for c in self.changes:
            if not groups or (groups[-1][0].backend, groups[-1][0].family) != (c.backend, c.family):
                groups.append([])
            groups[-1].append(c)
        for group in groups:
            be = self._backend(group[0].backend, group[0].family)
            head = ("# kldload.netstack.kube_proxy_cleanup: %s tables %s as they were at %s\n"
                    "# restore with: %s -c < this-file  (replaces only the tables below)\n"
                    % (be.name, ", ".join(c.table for c in group), stamp, be.restore.binary))
            path = self._write_backup("%s-%s-%s" % (stamp, group[0].backend, group[0].family), "rules",
                                      head + "".join(c.before for c in group))
            for c in group:
                c.backup = path
            paths.append(path)
        for c in self.nft_changes:
            head = ("# kldload.netstack.kube_proxy_cleanup: nftables table %s as it was at %s\n"
                    "# restore with: nft -f this-file\n" % (c.table, stamp))
            c.backup = self._write_backup("%s-nftables-%s" % (stamp, c.table.replace(" ", "-")), "nft",
                                          head + c.before)
            paths.append(c.backup)
        return paths

    def _apply_one(self, change, text):
        if change.backend == "nftables":
            fam = change.table.split()[0]
            if text:
                self._nft_tool().run("-f", "-", data=text)
            else:
                self._nft_tool().run("delete", "table", fam, NFT_TABLE)
        else:
            self._backend(change.backend, change.family).restore.run(data=text)

    def apply(self):
        """Back up, then apply the planned changes; on failure put back what was already changed."""
        backups = self._backups() if self.backup else []
        done = []
        for change in self.changes + self.nft_changes:
            try:
                self._apply_one(change, change.after)
            except ToolError as e:
                failed = []
                for prev in reversed(done):
                    try:
                        self._apply_one(prev, prev.before)
                    except ToolError as re_err:
                        failed.append("%s %s: %s" % (prev.backend, prev.table, re_err))
                where = "%s/%s table %s" % (change.backend, change.family, change.table)
                if failed:
                    msg = ("removing kube-proxy rules from %s failed (%s) and restoring the tables already "
                           "changed failed too: %s; backups: %s"
                           % (where, e, "; ".join(failed), ", ".join(backups) or "none"))
                else:
                    msg = ("removing kube-proxy rules from %s failed: %s; the %d table(s) already changed were "
                           "restored, nothing was left half-applied" % (where, e, len(done)))
                raise CleanupError(msg, dict(backups=backups, skipped_backends=self.skipped))
            done.append(change)
        return backups

    # -- reporting ----------------------------------------------------------------------------
    def removed(self):
        return [c.report() for c in self.changes + self.nft_changes]

    def diff(self):
        """One before/after pair per changed table (counters stripped)."""
        out = []
        for c in self.changes:
            out.append(dict(
                before_header="%s/%s %s (%s)" % (c.backend, c.family, c.table,
                                                 self._backend(c.backend, c.family).save.binary),
                after_header="%s/%s %s" % (c.backend, c.family, c.table),
                before="".join(strip_counters(line) + "\n" for line in c.before.splitlines()),
                after="".join(strip_counters(line) + "\n" for line in c.after.splitlines())))
        for c in self.nft_changes:
            out.append(dict(before_header="nftables table %s" % c.table,
                            after_header="nftables table %s (deleted)" % c.table,
                            before=c.before, after=""))
        return out


def run_cleanup(module, params, check_mode=False, want_diff=False):
    """The whole module: validate, plan, (apply), report. Returns the result dict; CleanupError
    (with the result known so far) on failure. ``module`` may be None (see KubeProxyCleanup)."""
    KubeProxyCleanup.validate(params)
    job = KubeProxyCleanup(module, backends=params["backends"], families=params["families"],
                           nftables=params["nftables"], include_kubelet_chains=params["include_kubelet_chains"],
                           backup=params["backup"], backup_dir=params["backup_dir"])
    changes = job.plan()
    result = dict(changed=bool(changes), removed=[], skipped_backends=job.skipped, backups=[])
    if changes and not check_mode:
        result["backups"] = job.apply()
        if job.leftovers():
            # kube-proxy still running puts its rules straight back
            job.warn("kube-proxy rules are present again right after the cleanup; is kube-proxy still "
                     "running on this node?")
    result["removed"] = job.removed()
    if want_diff:
        result["diff"] = job.diff()
    return result
