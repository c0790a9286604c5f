"""Rolling upgrade and rollback on the lab between real builds: the parent commit's node bundle (the
running release) and the working tree's, built the same way, the latter with a test-only layout bump of a
shared map (kln_lb_config v1 -> v2, migrated by copy). Continuous traffic from a pod on one node - pod to
pod across nodes, and through a service VIP - runs through the upgrades (verify_probe.py stream)."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import yaml

from conftest import REPO, Streams, changed_tasks, run_playbook
from test_pods import _pods, _recap

BUILDS = "/tmp/netstack-test-upgrade"
RELEASES = "/usr/lib/kldload-netstack/releases"
STREAM_VIP = "10.96.0.30"


def _build(tree, *args):
    """make node in ``tree`` (its own build/node/netstack.pyz; the working tree's with ``args`` elsewhere)."""
    subprocess.run(["make", "-s", "-C", os.path.join(str(tree), "bpf")], check=True, capture_output=True)
    out = os.path.join(str(tree), "build", "node") if not args else os.path.join(BUILDS, "new")
    subprocess.run(["python3", os.path.join(str(tree), "scripts", "build_node.py")] + (["--out", out] + list(args)
                                                                                       if args else []),
                   check=True, capture_output=True)
    return os.path.join(out, "netstack.pyz")


def _rezip(src, name, change):
    """A copy of bundle ``src`` with ``change(member name, bytes) -> bytes`` applied to its members."""
    out = os.path.join(BUILDS, name, "netstack.pyz")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with zipfile.ZipFile(src) as z, open(out, "wb") as f:
        f.write(b"#!/usr/bin/python3\n")
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as w:
            for i in z.infolist():
                w.writestr(i, change(i.filename, z.read(i.filename)))
    os.chmod(out, 0o755)
    return out


def _break_verifier(data):
    """The object with the first exit instruction of its connect4 program replaced by an invalid opcode:
    libbpf loads it, the kernel's verifier rejects it."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sec = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sec[shstrndx][4]

    def name(s):
        return data[strtab + s[0]:data.index(b"\0", strtab + s[0])].decode()
    text = [s for s in sec if name(s) == "cgroup/connect4"][0]
    off, size = text[4], text[5]
    at = [i for i in range(off, off + size, 8) if data[i] == 0x95][0]       # BPF_JMP | BPF_EXIT
    return data[:at] + b"\xff" + data[at + 1:]


def _current(lab):
    return {h: lab.sh(h, "readlink %s/current" % RELEASES).stdout.strip() for h in lab.hosts()}


def _previous(lab):
    return {h: lab.sh(h, "readlink %s/previous || true" % RELEASES).stdout.strip() for h in lab.hosts()}


def _release(path):
    """The release id of a bundle, as the collection's filter computes it."""
    sys.path.insert(0, str(REPO / ".collections"))
    from ansible_collections.kldload.netstack.plugins.filter.bundle_release import bundle_release
    return bundle_release(path)["id"]


def _globals(lab, host):
    return set(lab.sh(host, "ls /sys/fs/bpf/kldload-netstack/globals").stdout.split())


def _progs(lab, host):
    return json.loads(lab.sh(host, "netstack version --json").stdout)["pinned_versions"]


@pytest.fixture(scope="module")
def builds(lab):
    shutil.rmtree(BUILDS, ignore_errors=True)
    prev = os.path.join(BUILDS, "src-prev")
    os.makedirs(prev)
    subprocess.run("git -C %s archive HEAD~1 | tar -x -C %s" % (REPO, prev), shell=True, check=True)
    b = {"old": _build(prev), "new": _build(REPO, "--layout-bump", "kln_lb_config")}
    b["bad"] = _rezip(b["new"], "bad", lambda n, d: _break_verifier(d) if n == "netstack_objects/sock_lb.o" else d)
    b["down"] = _rezip(b["new"], "down", lambda n, d: d.replace(b'"collection": "', b'"collection": "0.0.1-') if
                       n == "netstack_build.json" else d)
    b["ids"] = dict((k, _release(b[k])) for k in ("old", "new", "bad"))
    # the lab's services plus a TCP and UDP service whose backend is the stream server in a pod
    pods = _pods(lab)
    server = pods["web-worker2"]
    services = yaml.safe_load(lab.inventory.read_text())["all"]["vars"]["netstack_services"]
    services += [{"name": "stream", "namespace": "lab", "vip": STREAM_VIP, "port": 18900, "protocol": proto,
                  "backends": [{"ip": server["ip"], "port": 18900}]} for proto in ("TCP", "UDP")]
    extra = os.path.join(BUILDS, "vars.json")
    with open(extra, "w") as f:
        json.dump({"netstack_services": services}, f)
    b["vars"] = ("-e", "@" + extra)
    run_playbook("playbooks/install.yml", *b["vars"], "-e", "netstack_bundle_src=" + b["old"])
    assert set(_current(lab).values()) == {b["ids"]["old"]}
    b["pods"] = pods
    yield b
    run_playbook("playbooks/install.yml")               # the lab as the other tests expect it


def _streams(lab, b):
    pods = b["pods"]
    client, server = pods["web-worker1"], pods["web-worker2"]
    return [Streams(lab, client, server, name="pod"), Streams(lab, client, server, target=STREAM_VIP, port=18900,
                                                              name="vip")]


def _undisturbed(results):
    for res in results:
        assert res["udp_sent"] > 1000 and res["tcp_messages"] > 1000 and res["connections"] > 100, res
        assert res["udp_lost"] == 0 and res["tcp_errors"] == [] and res["connection_failures"] == [], res


def _upgrade(b, release, *extra, check=True):
    return run_playbook("playbooks/upgrade.yml", *b["vars"], "-e", "netstack_bundle_src=" + b[release], *extra,
                        check=check)


def test_a_node_whose_post_check_fails_is_rolled_back_and_traffic_goes_on(lab, builds):
    """The new release on worker1 fails its post-check (an operator's check that fails there): worker1 goes
    back to the old release with the old layout, the play stops before worker2, cp1 (first) keeps the new one;
    the streams from a pod on worker1 lose nothing."""
    streams = _streams(lab, builds)
    try:
        for s in streams:
            s.start()
        proc = _upgrade(builds, "new", "-e", "netstack_upgrade_post_check={{ 'false' if inventory_hostname == "
                        "'worker1' else '' }}", check=False)
        results = [s.stop() for s in streams]
    finally:
        for s in streams:
            s.close()
    assert proc.returncode != 0
    assert re.search(r"worker1: the upgrade to %s failed at the post-check: .*rolled back to\s+%s"
                     % (builds["ids"]["new"], builds["ids"]["old"]), proc.stdout), proc.stdout[-4000:]
    assert _current(lab) == {"cp1": builds["ids"]["new"], "worker1": builds["ids"]["old"],
                             "worker2": builds["ids"]["old"]}
    assert "kln_lb_config_v2" not in _globals(lab, "worker1") and "kln_lb_config_v1" in _globals(lab, "worker1")
    assert "worker2" not in re.findall(r"^changed: \[(\w+)\]", proc.stdout, re.M)
    _undisturbed(results)


def test_a_rolling_upgrade_loses_nothing_and_is_idempotent(lab, builds):
    """Every node to the new release (layout v2 migrated, v1 kept for the previous release) while the streams
    run: 0 lost datagrams, 0 TCP errors, 0 failed connections; a second run (one batch of all three) and verify
    change nothing."""
    streams = _streams(lab, builds)
    try:
        for s in streams:
            s.start()
        _upgrade(builds, "new")
        results = [s.stop() for s in streams]
    finally:
        for s in streams:
            s.close()
    _undisturbed(results)
    assert set(_current(lab).values()) == {builds["ids"]["new"]}
    assert set(_previous(lab).values()) == {builds["ids"]["old"]}
    for h in lab.hosts():
        assert {"kln_lb_config_v1", "kln_lb_config_v2"} <= _globals(lab, h)
    again = _upgrade(builds, "new", "-e", "upgrade_live_checks=false", "-e", "netstack_upgrade_batch=3")
    assert all(c == 0 for c in _recap(again).values()), changed_tasks(again)
    verify = run_playbook("playbooks/verify.yml", *builds["vars"], "-e", "dataplane_verify_live=false")
    assert all(c == 0 for c in _recap(verify).values()), changed_tasks(verify)


def test_rollback_playbook_restores_the_previous_release_then_refuses(lab, builds):
    rb = run_playbook("playbooks/rollback.yml", *builds["vars"])
    assert set(_current(lab).values()) == {builds["ids"]["old"]}, rb.stdout[-3000:]
    for h in lab.hosts():
        assert "kln_lb_config_v2" not in _globals(lab, h) and "kln_lb_config_v1" in _globals(lab, h)
        assert lab.sh(h, "netstack lb list --json | grep -c '\"lab/stream\"'").stdout.strip() == "2"
    again = run_playbook("playbooks/rollback.yml", *builds["vars"], check=False)
    assert again.returncode != 0 and "no previous release on this node to roll back to" in again.stdout
    assert set(_current(lab).values()) == {builds["ids"]["old"]}


@pytest.mark.parametrize("extra,message", [
    (("-e", "netstack_upgrade_batch=0"), "netstack_upgrade_batch must be 1-3"),
    (("-e", "netstack_upgrade_batch=4"), "netstack_upgrade_batch must be 1-3"),
    (("-e", "netstack_upgrade_control_plane=middle"), "must be first or last, got middle"),
])
def test_bad_batches_change_nothing(lab, builds, extra, message):
    before = _current(lab)
    proc = _upgrade(builds, "new", *extra, check=False)
    assert proc.returncode != 0 and message in proc.stdout and "Nothing was changed" in proc.stdout
    assert _current(lab) == before and not re.search(r"^changed:", proc.stdout, re.M)


def test_a_downgrade_is_refused_before_any_node_is_touched(lab, builds):
    before = _current(lab)
    proc = _upgrade(builds, "down", check=False)
    assert proc.returncode != 0 and "a downgrade; set allow_downgrade to do it" in proc.stdout
    assert _current(lab) == before and not re.search(r"^changed:", proc.stdout, re.M)


def test_a_release_the_verifier_rejects_switches_nothing(lab, builds):
    """The first node's switch fails in the verifier: its programs stay the running release's, its release
    is the old one again, no other node is touched."""
    before, progs = _current(lab), _progs(lab, "cp1")
    proc = _upgrade(builds, "bad", check=False)
    assert proc.returncode != 0
    assert re.search(r"cp1: the upgrade to %s failed at the switch: .*rolled back to\s+%s"
                     % (builds["ids"]["bad"], builds["ids"]["old"]), proc.stdout, re.S), proc.stdout[-4000:]
    assert "verifier" in proc.stdout.lower() or "invalid" in proc.stdout.lower()
    assert _current(lab) == before and _progs(lab, "cp1") == progs
    assert not re.search(r"^changed: \[worker", proc.stdout, re.M)
