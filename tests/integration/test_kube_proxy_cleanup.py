"""Integration tests of kldload.netstack.kube_proxy_cleanup on the lab's kube nodes.

Each test loads a realistic node rule set (tests/fixtures/kube_proxy_rules.py: kube-proxy's
iptables mode, kubelet's chains, another tool's rules) into BOTH iptables backends (legacy and
nft) for IPv4 and IPv6, plus kube-proxy's nftables-mode tables and another tool's nftables
tables, runs the module through ansible over SSH, and checks the node's real state with the save
tools. Every test puts the node back as it found it.
"""
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import kube_proxy_rules as rules  # noqa: E402

MODULE = "kldload.netstack.kube_proxy_cleanup"
DEFAULT_BACKUP_DIR = "/var/backups/kldload-netstack/kube-proxy-cleanup"
# the defaults, spelled out (``ansible -a '{}'`` is taken as raw params by ansible-core 2.19)
DEFAULTS = {"nftables": True}
WORK = "/var/tmp/kpc-it"
TABLES = ("mangle", "filter", "nat")
SAVE = {
    ("legacy", "ipv4"): "iptables-legacy-save",
    ("nft", "ipv4"): "iptables-nft-save",
    ("legacy", "ipv6"): "ip6tables-legacy-save",
    ("nft", "ipv6"): "ip6tables-nft-save",
}
RESTORE = dict((k, v.replace("-save", "-restore")) for k, v in SAVE.items())
NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}
OTHER_NFT = [("inet", "kldtest-fw"), ("ip", "kldtest-nat")]
PROXY_FIXED = {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-FORWARD",
               "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY"}
PROXY_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-", "KUBE-XLB-")
KUBELET = {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP", "KUBE-IPTABLES-HINT"}
_BUILTINS = {"nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"], "filter": ["INPUT", "FORWARD", "OUTPUT"],
             "mangle": ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]}


# -- reading a node's state (independently of the module's own parser) ------------------------

def _proxy(name, kubelet=False):
    return name in PROXY_FIXED or name.startswith(PROXY_PREFIXES) or (kubelet and name in KUBELET)


def _tables(text):
    """{table: [lines]} of save output; comments dropped, chain counters zeroed."""
    out, cur = {}, None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = line[1:]
            out[cur] = []
        elif line == "COMMIT":
            cur = None
        elif cur is not None:
            out[cur].append(re.sub(r" \[\d+:\d+\]$", " [0:0]", line) if line.startswith(":") else line)
    return out


def _chain_and_target(line):
    toks = shlex.split(line)
    target = None
    for i, tok in enumerate(toks[:-1]):
        if i >= 2 and tok in ("-j", "-g", "--jump", "--goto"):
            target = toks[i + 1]
    return toks[1], target


def _without_proxy(lines, kubelet=False):
    keep = []
    for line in lines:
        if line.startswith(":"):
            if _proxy(line[1:].split()[0], kubelet):
                continue
        elif line.startswith("-A "):
            chain, target = _chain_and_target(line)
            if _proxy(chain, kubelet) or (target and _proxy(target, kubelet)):
                continue
        keep.append(line)
    return keep


def _chains(lines):
    return set(l[1:].split()[0] for l in lines if l.startswith(":"))


def snapshot(lab, host):
    """{(backend, family): {table: lines}, 'nft': {(fam, name): listing}}."""
    script = ["for b in %s; do echo \"=== $b\"; $b; done" % " ".join(SAVE[k] for k in sorted(SAVE)),
              "echo '=== nft-tables'; nft list tables"]
    out = lab.sh(host, "; ".join(script)).stdout
    parts = dict((p.split("\n", 1)[0].strip(), p.split("\n", 1)[1] if "\n" in p else "")
                 for p in out.split("=== ")[1:])
    state = dict((k, _tables(parts[SAVE[k]])) for k in SAVE)
    nft_tables = [tuple(l.split()[1:3]) for l in parts["nft-tables"].splitlines() if l.startswith("table ")]
    listing = {}
    for fam, name in nft_tables:
        if name in ("kube-proxy",) or name.startswith("kldtest-"):
            listing[(fam, name)] = lab.sh(host, "nft list table %s %s" % (fam, name)).stdout
        else:
            listing[(fam, name)] = None
    state["nft"] = listing
    return state


# -- loading and putting back -------------------------------------------------------------------

def _reset_script(original):
    """Shell that puts the iptables tables and nft tables back to ``original`` (a snapshot)."""
    cmds = []
    for key in sorted(SAVE):
        backend, family = key
        orig = original[key]
        for table in TABLES:
            if table in orig:
                text = "*%s\n%s\nCOMMIT\n" % (table, "\n".join(orig[table]))
            elif backend == "nft":
                cmds.append("nft delete table %s %s 2>/dev/null || true" % (NFT_FAMILY[family], table))
                continue
            else:
                text = "*%s\n%s\nCOMMIT\n" % (table, "\n".join(":%s ACCEPT [0:0]" % b for b in _BUILTINS[table]))
            cmds.append("%s <<'__KPC__'\n%s__KPC__" % (RESTORE[key], text))
    for fam, name in [("ip", "kube-proxy"), ("ip6", "kube-proxy")] + OTHER_NFT:
        if (fam, name) not in original["nft"]:
            cmds.append("nft delete table %s %s 2>/dev/null || true" % (fam, name))
    return "\n".join(cmds)


def _polluted(state):
    """Leftovers of an aborted earlier run of this test (its markers), not a real node's rules."""
    if any(key[1].startswith("kldtest-") for key in state["nft"]):
        return True
    return any("f2b-sshd" in _chains(lines) for key in SAVE for lines in state[key].values())


@pytest.fixture
def node(lab):
    """Load the fixture rule sets on a host; put the host back afterwards. Call node(host, ...)."""
    loaded = []

    def load(host, kube=True, kubelet=True, other=True, nft=True):
        backups = _backup_files(lab, host)
        parent = os.path.dirname(DEFAULT_BACKUP_DIR)
        had_parent = lab.sh(host, "test -d %s" % parent, check=False).returncode == 0
        state = snapshot(lab, host)
        if _polluted(state):
            empty = dict((k, {}) for k in SAVE)
            empty["nft"] = {}
            lab.sh(host, _reset_script(empty))
            state = snapshot(lab, host)
        loaded.append((host, state, backups, had_parent))
        for family in ("ipv4", "ipv6"):
            lab.put(host, "%s/%s.rules" % (WORK, family), rules.node_iptables_text(
                family, legacy_leftovers=True, kube=kube, kubelet=kubelet, other=other))
            if nft and kube:
                lab.put(host, "%s/%s.nft" % (WORK, family), rules.nft_text(family))
        lab.put(host, "%s/other.nft" % WORK, rules.other_tool_nft())
        cmds = ["%s --noflush < %s/%s.rules" % (RESTORE[k], WORK, k[1]) for k in sorted(SAVE)]
        if nft:
            if kube:
                cmds += ["nft -f %s/ipv4.nft" % WORK, "nft -f %s/ipv6.nft" % WORK]
            if other:
                cmds.append("nft -f %s/other.nft" % WORK)
        lab.sh(host, " && ".join(cmds))
        return snapshot(lab, host)

    yield load
    for host, original, backups, had_parent in reversed(loaded):
        lab.sh(host, _reset_script(original))
        new = sorted(_backup_files(lab, host) - backups)
        dirs = [DEFAULT_BACKUP_DIR] + ([] if had_parent else [os.path.dirname(DEFAULT_BACKUP_DIR)])
        lab.sh(host, "rm -rf %s %s; rmdir %s 2>/dev/null || true" % (
            WORK, " ".join(shlex.quote(p) for p in new), " ".join(dirs)))


def _backup_files(lab, host):
    out = lab.sh(host, "ls -1A %s 2>/dev/null || true" % DEFAULT_BACKUP_DIR).stdout
    return set("%s/%s" % (DEFAULT_BACKUP_DIR, n) for n in out.split())


def _assert_cleaned(before, after, kubelet=False):
    """No kube-proxy chain or jump left anywhere; every other line exactly as before."""
    for key in SAVE:
        for table in TABLES:
            b = before[key].get(table, [])
            a = after[key].get(table, [])
            assert a == _without_proxy(b, kubelet), (key, table)
            for line in a:
                if line.startswith(":"):
                    assert not _proxy(line[1:].split()[0], kubelet), (key, line)
                elif line.startswith("-A "):
                    chain, target = _chain_and_target(line)
                    assert not _proxy(chain, kubelet) and not (target and _proxy(target, kubelet)), (key, line)
    for fam in ("ip", "ip6"):
        assert (fam, "kube-proxy") not in after["nft"]
    for t in OTHER_NFT:
        assert after["nft"][t] == before["nft"][t], t


# -- tests --------------------------------------------------------------------------------------

def _hosts(lab):
    cps, workers = lab.hosts("kube_control_plane"), lab.hosts("kube_workers")
    if not cps or not workers:
        pytest.skip("the lab has no control plane or no worker")
    return cps[0], workers[0]


def test_cleanup_control_plane_and_worker(lab, node):
    """check, apply, apply, check on one control plane and one worker: everything of kube-proxy goes."""
    for host in _hosts(lab):
        before = node(host)
        # the fixture really landed everywhere
        for key in SAVE:
            assert "KUBE-SERVICES" in _chains(before[key]["nat"]), key
            assert "f2b-sshd" in _chains(before[key]["filter"]), key
            assert any("--probability 0.33333333349" in l for l in before[key]["nat"]), key
        assert ("ip", "kube-proxy") in before["nft"] and ("ip6", "kube-proxy") in before["nft"]

        first, applied, again, recheck = lab.four_times(host, MODULE, DEFAULTS)
        assert first["changed"] is True and applied["changed"] is True
        # check mode computed exactly what the real run then removed, and wrote no backup
        assert first["backups"] == []
        assert [dict(r, backup=None) for r in first["removed"]] == \
            [dict(r, backup=None) for r in applied["removed"]]
        removed = set((r["backend"], r["family"], r["table"]) for r in applied["removed"])
        for backend, family in SAVE:
            for table in TABLES:
                assert (backend, family, table) in removed
        assert ("nftables", "ipv4", "ip kube-proxy") in removed
        assert ("nftables", "ipv6", "ip6 kube-proxy") in removed
        assert again["removed"] == [] and recheck["removed"] == [] and again["backups"] == []
        assert applied.get("skipped_backends") == []
        # the reported counts match what was on the node
        for r in applied["removed"]:
            if r["backend"] == "nftables":
                assert r["chains"] and r["rules"] > 10
                continue
            lines = before[(r["backend"], r["family"])][r["table"]]
            gone = [l for l in lines if l.startswith("-A ")]
            kept = [l for l in _without_proxy(lines) if l.startswith("-A ")]
            assert r["rules"] == len(gone) - len(kept), r
            assert set(r["chains"]) == set(c for c in _chains(lines) if _proxy(c)), r
        # diff mode: before/after text of each affected table
        diffs = dict((d["after_header"], d) for d in first["diff"])
        nat = diffs["legacy/ipv4 nat"]
        assert "-j KUBE-SERVICES" in nat["before"] and "KUBE-SERVICES" not in nat["after"]
        assert "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in nat["after"]
        assert any(d["before_header"] == "nftables table ip kube-proxy" and d["after"] == ""
                   for d in first["diff"])

        after = snapshot(lab, host)
        _assert_cleaned(before, after)
        # kubelet's chains are still there, other tools' rules byte for byte
        for (backend, family) in SAVE:
            t = after[(backend, family)]
            assert "KUBE-KUBELET-CANARY" in _chains(t["nat"]) and "KUBE-IPTABLES-HINT" in _chains(t["mangle"])
            assert "KUBE-FIREWALL" in _chains(t["filter"]) and "KUBE-MARK-DROP" in _chains(t["nat"])
            assert "-A INPUT -j KUBE-FIREWALL" in t["filter"]
            assert "KUBE-ROUTER-INPUT" in _chains(t["filter"])
            assert any("see -j KUBE-SERVICES docs" in l for l in t["filter"])

        # backups: one per backend/family and per nft table, 0600 in a 0700 directory
        paths = applied["backups"]
        assert len(paths) == 6
        assert all(p.startswith(DEFAULT_BACKUP_DIR + "/") for p in paths)
        modes = lab.sh(host, "stat -c '%%a %%n' %s %s" % (DEFAULT_BACKUP_DIR, " ".join(paths))).stdout
        mode_of = dict(reversed(l.split(" ", 1)) for l in modes.splitlines())
        assert mode_of[DEFAULT_BACKUP_DIR] == "700"
        assert all(mode_of[p] == "600" for p in paths), mode_of
        for r in applied["removed"]:
            text = lab.sh(host, "cat %s" % shlex.quote(r["backup"])).stdout
            if r["backend"] == "nftables":
                assert "table %s {" % r["table"] in text and "numgen random mod" in text
            else:
                assert "*%s\n" % r["table"] in text
                if r["table"] == "nat":
                    assert "MASQUERADE --random-fully" in text and "-j KUBE-SEP-" in text


def test_include_kubelet_chains(lab, node):
    host = _hosts(lab)[0]
    before = node(host)
    applied = lab.module(host, MODULE, {"include_kubelet_chains": True, "backup": False}, diff=True)
    recheck = lab.module(host, MODULE, {"include_kubelet_chains": True}, check=True)
    assert applied["changed"] is True and applied["backups"] == []
    assert recheck["changed"] is False
    after = snapshot(lab, host)
    _assert_cleaned(before, after, kubelet=True)
    for key in SAVE:
        for table in TABLES:
            assert not [c for c in _chains(after[key].get(table, [])) if c in KUBELET], (key, table)
        assert "-A INPUT -j KUBE-FIREWALL" not in after[key]["filter"]


def test_node_without_kube_proxy_rules(lab, node):
    """Only another tool's rules and kubelet's chains: nothing to do, nothing touched."""
    workers = lab.hosts("kube_workers")
    host = workers[-1] if workers else _hosts(lab)[0]
    before = node(host, kube=False)
    backups = _backup_files(lab, host)
    result = lab.module(host, MODULE, DEFAULTS, diff=True)
    assert result["changed"] is False and result["removed"] == [] and result["backups"] == []
    assert snapshot(lab, host) == before
    assert _backup_files(lab, host) == backups


def test_bad_input_fails_and_changes_nothing(lab, node):
    host = _hosts(lab)[0]
    before = node(host)
    backups = _backup_files(lab, host)
    bad = lab.module(host, MODULE, {"backends": ["ipvs"]}, expect_fail=True)
    assert "backends" in bad["msg"] and "ipvs" in bad["msg"], bad["msg"]
    bad = lab.module(host, MODULE, {"backup_dir": "relative/path", "families": ["ipv4"]}, expect_fail=True)
    assert "backup_dir" in bad["msg"], bad["msg"]
    assert snapshot(lab, host) == before
    assert _backup_files(lab, host) == backups
