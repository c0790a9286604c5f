"""frr.py: validation, rendering, masking, and the apply path on two real FRR instances (``-N`` pathspaces)
in private network namespaces nsu-bgp-* joined by a veth; everything they start is stopped by pid."""
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import frr

DAEMONS = "/usr/lib/frr"


def test_mask_hides_passwords_everywhere():
    text = "neighbor 10.0.0.1 password s3cr3t\nsomething s3cr3t else"
    out = frr.mask(text, ["s3cr3t"])
    assert "s3cr3t" not in out and out.count(frr.MASK) == 2


@pytest.mark.parametrize("spec, field", [
    ({"asn": 0}, "asn"),
    ({"asn": 4294967296}, "asn"),
    ({"asn": 23456}, "asn"),
    ({"asn": "bogus"}, "asn"),
    ({"router_id": "fd00::1"}, "router_id"),
    ({"router_id": "not-an-ip"}, "router_id"),
    ({"neighbors": [{"address": "10.9.9.9", "asn": 65000}]}, "neighbors[0] (10.9.9.9).address"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 65000, "password": "a\nb"}]}, "neighbors[0] (10.255.0.2).password"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 65000, "password": 'a"b'}]}, "neighbors[0] (10.255.0.2).password"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 65000, "password": "a'b"}]}, "neighbors[0] (10.255.0.2).password"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 70000000000}]}, "neighbors[0] (10.255.0.2).asn"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 1, "keepalive": 10, "hold": 2}]}, "neighbors[0] (10.255.0.2).hold"),
    ({"neighbors": [{"address": "10.255.0.2", "asn": 1}, {"address": "10.255.0.2", "asn": 2}]}, "neighbors[1].address"),
    ({"announce": ["10.0.0.1/24"]}, "announce[0]"),
])
def test_bad_input_names_the_field(spec, field):
    base = {"asn": 65001, "router_id": "10.255.0.1", "underlay_networks": ["10.255.0.0/24"]}
    base.update(spec)
    with pytest.raises(frr.FrrError) as e:
        frr.normalize(base)
    assert str(e.value).startswith(field), str(e.value)
    assert "a\nb" not in str(e.value)


def test_multihop_peer_may_be_outside_the_underlay_and_asdot():
    s = frr.normalize({"asn": "1.10", "router_id": "10.0.0.1", "underlay_networks": ["10.255.0.0/24"],
                       "neighbors": [{"address": "10.9.9.9/32", "asn": 65000, "multihop": 4}]})
    assert s["asn"] == 65546 and s["neighbors"][0]["address"] == "10.9.9.9"
    text = frr.render(s)
    assert " neighbor 10.9.9.9 ebgp-multihop 4" in text
    assert "route-map KLN-BGP-OUT-V4 deny 10" in text        # nothing to announce: nothing leaves


def test_strip_owned_keeps_what_is_not_ours():
    running = "\n".join([
        "Building configuration...", "", "Current configuration:", "!", "frr version 10.2", "hostname n1",
        "ip route 10.1.0.0/16 blackhole", "!", "router bgp 65001", " bgp router-id 1.1.1.1", "exit", "!",
        "router bgp 65002 vrf blue", " bgp router-id 1.1.1.2", "exit", "!",
        "ip prefix-list KLN-BGP-OUT-V4 seq 5 permit 10.0.0.1/32", "ip prefix-list OPERATOR seq 5 permit 0.0.0.0/0 le 32",
        "route-map KLN-BGP-IN deny 10", "exit", "route-map OPERATOR permit 10", "exit",
        "bfd", " profile KLN-BFD", "  receive-interval 100", " exit", " profile OPS", " exit", "exit", "end"])
    kept, owned = frr.strip_owned(running)
    assert "router bgp 65002 vrf blue" in kept and "OPERATOR" in kept and "ip route 10.1.0.0/16 blackhole" in kept
    assert " profile OPS" in kept and "KLN" not in kept and "router bgp 65001" not in kept
    assert "router bgp 65001" in owned and "KLN-BFD" in owned


def test_parse_reload_test_output():
    out = ("Lines To Delete\n===============\nrouter bgp 65001\n no neighbor 1.1.1.1 password x\n"
           "no ip prefix-list KLN-A seq 5 permit 1.1.1.1/32\n\nLines To Add\n============\nrouter bgp 65001\n"
           " address-family ipv4 unicast\n  network 10.0.0.1/32\n")
    removed, added = frr.parse_reload_test(out)
    assert removed == ["router bgp 65001 > no neighbor 1.1.1.1 password x", "no ip prefix-list KLN-A seq 5 permit 1.1.1.1/32"]
    assert added == ["router bgp 65001 > address-family ipv4 unicast > network 10.0.0.1/32"]


def test_daemons_text():
    text, enabled = frr.daemons_text("zebra=yes\nbgpd=no\nospfd=no\n", ["bgpd", "bfdd"])
    assert "bgpd=yes" in text and "bfdd=yes" in text and "ospfd=no" in text and enabled == ["bfdd", "bgpd"]
    assert frr.daemons_text(text, ["bgpd"])[1] == []


# ---- real FRR -------------------------------------------------------------------------------------

def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check)


need_frr = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(os.path.join(DAEMONS, "bgpd"))
                              or not frr.Frr(pathspace="x", manage_service=False).reload_script,
                              reason="needs root, FRR and frr-reload.py (scripts/setup.sh installs them)")


@pytest.fixture(scope="module")
def pair():
    """Two FRR instances (zebra, bgpd, bfdd) in nsu-bgp-<tag>-a/-b, 10.255.0.1 and .2; stopped by pid after."""
    tag = uuid.uuid4().hex[:6]
    ns = ["nsu-bgp-%s-a" % tag, "nsu-bgp-%s-b" % tag]
    devs = ["nsb%sa" % tag, "nsb%sb" % tag]
    pids = []
    for n in ns:
        _ip("netns", "add", n)
    try:
        _ip("link", "add", devs[0], "netns", ns[0], "type", "veth", "peer", "name", devs[1], "netns", ns[1])
        for i, n in enumerate(ns):
            _ip("-n", n, "addr", "add", "10.255.0.%d/24" % (i + 1), "dev", devs[i])
            _ip("-n", n, "link", "set", devs[i], "up")
            _ip("-n", n, "link", "set", "lo", "up")
            for d in ("/etc/frr/" + n, "/var/run/frr/" + n):
                os.makedirs(d, exist_ok=True)
                shutil.chown(d, "frr", "frr")
            with open("/etc/frr/%s/vtysh.conf" % n, "w") as f:
                f.write("service integrated-vtysh-config\n")
            with open("/etc/frr/%s/frr.conf" % n, "w") as f:
                f.write("hostname %s\nip route 10.77.77.0/24 blackhole\n" % n)     # configuration not ours
            shutil.chown("/etc/frr/%s/frr.conf" % n, "frr", "frr")
            os.chmod("/etc/frr/%s/frr.conf" % n, 0o644)                        # the module fixes it
            for d in ("zebra", "staticd", "bgpd", "bfdd"):
                subprocess.run(["ip", "netns", "exec", n, os.path.join(DAEMONS, d), "-d", "-N", n, "-A", "127.0.0.1",
                                "-u", "frr", "-g", "frr", "-f", "/etc/frr/%s/frr.conf" % n],
                               capture_output=True, check=True)
                with open("/var/run/frr/%s/%s.pid" % (n, d)) as f:
                    pids.append(int(f.read()))
        instances = [frr.Frr(pathspace=n, manage_service=False) for n in ns]
        for inst in instances:
            for _i in range(50):
                if inst.answers():
                    break
                time.sleep(0.1)
        # the other side: a plain peer of AS 65000 with BFD
        instances[1].vtysh("configure terminal", "router bgp 65000", "bgp router-id 10.255.0.2",
                           "no bgp ebgp-requires-policy", "neighbor 10.255.0.1 remote-as 65001",
                           "neighbor 10.255.0.1 password s3cr3t", "neighbor 10.255.0.1 timers 1 3",
                           "neighbor 10.255.0.1 timers connect 1")
        yield {"ns": ns, "frr": instances}
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        time.sleep(0.3)
        for n in ns:
            _ip("netns", "del", n, check=False)
            shutil.rmtree("/etc/frr/" + n, ignore_errors=True)
            shutil.rmtree("/var/run/frr/" + n, ignore_errors=True)


SPEC = {"asn": 65001, "router_id": "10.255.0.1", "underlay_networks": ["10.255.0.0/24"], "graceful_restart": True,
        "announce": ["192.168.10.1/32", "192.168.10.2/32", "fd00:10::1/128"], "bfd_interval": 100,
        "neighbors": [{"address": "10.255.0.2", "asn": 65000, "password": "s3cr3t", "keepalive": 1, "hold": 3,
                       "connect_retry": 1, "description": "router one"}]}


def _peer_state(inst):
    rows = frr.peers(inst)
    return dict((r["neighbor"], r) for r in rows)


@need_frr
def test_apply_is_idempotent_keeps_the_rest_and_never_shows_the_password(pair):
    a, b = pair["frr"]
    spec = frr.normalize(SPEC)
    check = frr.apply(spec, a, check=True)
    assert check["changed"] and any("network 192.168.10.1/32" in x for x in check["added"])
    assert "router bgp" not in a.running()                          # check mode changed nothing
    first = frr.apply(spec, a)
    assert first["changed"]
    assert "s3cr3t" not in json.dumps(first)
    assert any("password %s" % frr.MASK in x for x in first["added"])
    assert oct(os.stat(a.conf_file).st_mode & 0o777) == "0o640"
    os.chmod(a.conf_file, 0o644)                # the file with the password: never world-readable
    fixed = frr.apply(spec, a)
    assert fixed["files"] == ["chmod 0640 %s (was 0644)" % a.conf_file] and not fixed["added"] + fixed["removed"]
    again = frr.apply(spec, a)
    assert not again["changed"], again
    assert not frr.apply(spec, a, check=True)["changed"]
    run = a.running()
    assert "ip route 10.77.77.0/24 blackhole" in run and "hostname " in run      # not ours: kept
    deadline = time.time() + 10
    while time.time() < deadline and _peer_state(b).get("10.255.0.1", {}).get("state") != "Established":
        time.sleep(0.2)
    st = _peer_state(b)["10.255.0.1"]
    assert st["state"] == "Established", st
    while time.time() < deadline and _peer_state(b)["10.255.0.1"]["prefixes_received"] < 2:
        time.sleep(0.2)
    assert _peer_state(b)["10.255.0.1"]["prefixes_received"] == 2            # the two IPv4 service addresses
    assert _peer_state(a)["10.255.0.2"]["prefixes_sent"] == 2
    up = _peer_state(a)["10.255.0.2"]["uptime_seconds"]
    # one prefix less: only that line goes, the session stays up
    smaller = frr.normalize(dict(SPEC, announce=["192.168.10.1/32", "fd00:10::1/128"]))
    res = frr.apply(smaller, a)
    assert any("192.168.10.2/32" in x for x in res["removed"]) and not res["added"], res
    time.sleep(1.2)
    assert _peer_state(a)["10.255.0.2"]["uptime_seconds"] >= up + 1
    assert "Local AS" in frr.format_peers(frr.peers(a))


@need_frr
def test_bad_input_leaves_running_config_untouched(pair):
    a = pair["frr"][0]
    frr.apply(frr.normalize(SPEC), a)
    before = a.running()
    for bad in ({"password": 'x"y'}, {"address": "10.9.9.9"}):
        spec = dict(SPEC, neighbors=[dict(SPEC["neighbors"][0], **bad)])
        with pytest.raises(frr.FrrError):
            frr.apply(frr.normalize(spec), a)
    # FRR's own parser refuses it (vtysh -C) before anything is applied: a description FRR cannot take
    spec = frr.normalize(SPEC)
    spec["router_id"] = "300.1.1.1"                 # past the validation, as if it had missed it
    with pytest.raises(frr.FrrError) as e:
        frr.apply(spec, a)
    assert "s3cr3t" not in str(e.value)
    assert a.running() == before


@need_frr
def test_absent_removes_only_what_is_ours(pair):
    a = pair["frr"][0]
    with_bfd = dict(SPEC, neighbors=[dict(SPEC["neighbors"][0], bfd=True)])
    assert not frr.apply(frr.normalize(with_bfd), a, check=False)["removed"]
    assert not frr.apply(frr.normalize(with_bfd), a)["changed"]
    res = frr.apply(frr.normalize({"state": "absent"}), a)
    assert res["changed"] and any(x.startswith("no router bgp") for x in res["removed"]), res
    run = a.running()
    assert "router bgp" not in run and "KLN-" not in run and "ip route 10.77.77.0/24 blackhole" in run
    assert not frr.apply(frr.normalize({"state": "absent"}), a)["changed"]
