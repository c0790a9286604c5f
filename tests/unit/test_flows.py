"""Flow events end to end on one machine: the real policy and overlay objects loaded through the loader into a
private bpffs, the maps written by the policy's node apply, packets run through the programs with
BPF_PROG_TEST_RUN, and the events read back from the shared ring buffer by the agent's pure-Python reader, turned
into Hubble's flow JSON, filtered, counted as metrics and served over HTTP. Layouts are held to the header."""
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys
from ansible_collections.kldload.netstack.plugins.module_utils.flows import agent as fagent
from ansible_collections.kldload.netstack.plugins.module_utils.flows import config as fconfig
from ansible_collections.kldload.netstack.plugins.module_utils.flows import events, hubble, metrics
from ansible_collections.kldload.netstack.plugins.module_utils.flows.ringbuf import RingBuffer
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node

import test_policy_dataplane as tp

REPO = tp.REPO
needs_root = tp.needs_root


def test_layouts_match_the_header_and_the_manifests():
    text = open(os.path.join(REPO, "bpf", "lib", "flow_structs.h")).read()
    found = dict((m.group(1), (m.group(2), int(m.group(3))))
                 for m in re.finditer(r"(kln_\w+) (?:record|value)[^\n]*?py: \"(\S+)\" \((\d+) bytes\)", text))
    assert found["kln_flows"] == (events.EVENT.format, events.EVENT.size) == ("=QBBBBBBBB4s4s2s2sIIIII4s2sHQ", 64)
    assert found["kln_flow_config"] == (events.CONFIG.format, events.CONFIG.size)
    assert found["kln_flow_rl"] == (events.RL.format, events.RL.size)
    for obj in ("policy", "overlay", "sock_lb", "nodeport"):
        m = json.load(open(os.path.join(REPO, "bpf", "%s.manifest.json" % obj)))
        for name in events.MAPS:
            spec = m["maps"][name]
            assert spec["shared"] and spec["version"] == events.MAP_VERSIONS[name], (obj, name)
            assert spec["max_entries"] == events.MAX_ENTRIES[name], (obj, name)
            if name in events.SIZES:
                assert (spec["key_size"], spec["value_size"]) == events.SIZES[name], (obj, name)


def test_agent_section_is_validated_naming_the_field():
    ok = fconfig.normalize({"listen": "10.77.0.11:4245"})
    assert ok["aggregation"] == "medium" and ok["buffer"] == 4096 and ok["enabled"] is True
    for bad, msg in (({"listen": "0.0.0.0:4245"}, "every address"), ({"listen": "node1:4245"}, "not an IP address"),
                     ({"listen": "10.0.0.1:70000"}, "out of range"), ({"listen": "10.0.0.1:1", "aggregation": "low"}, "aggregation"),
                     ({"listen": "10.0.0.1:1", "buffer": 2}, "buffer"), ({"listen": "10.0.0.1:1", "colour": 1}, "unknown field"),
                     ({"listen": "10.0.0.1:1", "export": {"path": "rel"}}, "export.path")):
        with pytest.raises(fconfig.AgentConfigError, match=msg):
            fconfig.normalize(bad)
    fconfig.check_listen("127.0.0.1:4245")
    with pytest.raises(fconfig.AgentConfigError, match="not an address of this node"):
        fconfig.check_listen("192.0.2.77:4245")


def test_filters_parse_and_refuse_with_clear_errors():
    f = hubble.parse_filters({"verdict": ["dropped"], "port": "80", "protocol": "TCP", "since": "5m", "last": "3",
                              "drop-reason": "133", "pod": "x/a"}, now=1000.0)
    assert f == {"verdict": ["DROPPED"], "port": [80], "protocol": [6], "since": 700.0, "last": 3,
                 "drop_reason": ["POLICY_DENIED"], "pod": ["x/a"]}
    assert hubble.parse_filters({"since": "2024-05-01T10:00:00Z"})["since"] == 1714557600.0
    for params, msg in (({"colour": "red"}, "unknown filter 'colour'"), ({"verdict": "MAYBE"}, "unknown verdict MAYBE"),
                        ({"since": "yesterday"}, "neither a duration"), ({"port": "70000"}, "not a port"),
                        ({"port": "0"}, "not a port"), ({"protocol": "gre"}, "unknown protocol"),
                        ({"drop_reason": "SOMETHING"}, "unknown drop reason"), ({"ip": "10.0.0.300"}, "not an IP"),
                        ({"pod": "X/Y!"}, "namespace/]pod-name"), ({"last": "-1"}, "positive number")):
        with pytest.raises(hubble.FilterError, match=re.escape(msg)):
            hubble.parse_filters(params)


class FakeEnricher:
    rule_kinds = {"NetworkPolicy demo/server-from-client ingress[0]": "l3-l4"}
    services = {7: {"namespace": "demo", "name": "web", "address": "10.96.0.20:80"}}
    endpoints, errors, by_ip = [], [], {}

    def lookup(self, ip, identity=0):
        pods = {tp.CLIENT: ("demo", "client", 300), tp.SERVER: ("demo", "server", 301), tp.OTHER: ("demo", "other", 302)}
        if ip in pods:
            ns, name, ident = pods[ip]
            return {"kind": "pod", "namespace": ns, "pod_name": name, "identity": identity or ident,
                    "labels": ["k8s:app=%s" % name, "k8s:io.kubernetes.pod.namespace=%s" % ns], "node_name": "n1"}
        return {"kind": "world", "identity": identity or 2, "labels": ["reserved:world"]}

    def rule(self, rid):
        return {1: "NetworkPolicy demo/server-from-client ingress[0]"}.get(rid, "")

    def service(self, sid):
        return self.services.get(sid)

    def cookie(self, c):
        return {"kind": "pod", "namespace": "demo", "pod_name": "client", "identity": 300, "labels": [], "ip": tp.CLIENT} \
            if c == 99 else None

    @staticmethod
    def ifname(i):
        return "lo" if i == 1 else ""

    def refresh(self, force=False):
        return False


def _event(**kw):
    e = {"time_boot_ns": 5, "source": 2, "verdict": 2, "reason": 133, "direction": 1, "protocol": 6, "tcp_flags": 0x02,
         "flags": events.F_POLICY | events.F_ENFORCED, "saddr": tp.OTHER, "daddr": tp.SERVER, "sport": 40000,
         "dport": 8080, "src_identity": 302, "dst_identity": 301, "ifindex": 1, "rule": 0, "len": 54,
         "orig_addr": "0.0.0.0", "orig_port": 0, "service_id": 0, "cookie": 0}
    e.update(kw)
    return e


def test_hubble_json_field_names_compact_lines_and_filters():
    drop_ev = events.decode(events.encode(_event()))
    drop = hubble.make_flow(drop_ev, FakeEnricher(), "n1", 1714557600.5)
    f = drop["flow"]
    assert drop["node_name"] == "n1" and drop["time"] == f["time"] == "2024-05-01T10:00:00.500000000Z"
    assert (f["verdict"], f["drop_reason"], f["drop_reason_desc"]) == ("DROPPED", 133, "POLICY_DENIED")
    assert f["IP"] == {"source": tp.OTHER, "destination": tp.SERVER, "ipVersion": "IPv4"}
    assert f["l4"]["TCP"] == {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True}}
    assert (f["source"]["namespace"], f["source"]["pod_name"], f["source"]["identity"]) == ("demo", "other", 302)
    assert "k8s:app=server" in f["destination"]["labels"]
    assert (f["traffic_direction"], f["Type"], f["event_type"], f["policy_rule"]) == \
        ("INGRESS", "L3_L4", {"type": 1, "sub_type": 133}, "default deny")
    line = hubble.compact(drop)
    assert "demo/other:40000 (ID:302) -> demo/server:8080 (ID:301)" in line and "DROPPED" in line, line
    allow_ev = events.decode(events.encode(_event(verdict=1, reason=0, rule=1, saddr=tp.CLIENT, src_identity=300)))
    allow = hubble.make_flow(allow_ev, FakeEnricher(), "n1", 1.0)
    assert allow["flow"]["ingress_allowed_by"][0]["name"] == "server-from-client"
    assert allow["flow"]["policy_rule"] == "NetworkPolicy demo/server-from-client ingress[0]"
    assert allow["flow"]["event_type"]["type"] == hubble.MSG_POLICY_VERDICT
    sock_ev = events.decode(events.encode(_event(
        source=5, verdict=7, reason=0, direction=2, flags=0, saddr="0.0.0.0", sport=0, daddr=tp.SERVER, dport=8080,
        orig_addr="10.96.0.20", orig_port=80, service_id=7, cookie=99, ifindex=0)))
    sock = hubble.make_flow(sock_ev, FakeEnricher(), "n1", 2.0)
    sf = sock["flow"]
    assert (sf["verdict"], sf["Type"], sf["IP"]["source"], sf["source"]["pod_name"]) == ("TRANSLATED", "SOCK", tp.CLIENT, "client")
    assert sf["destination_service"] == {"name": "web", "namespace": "demo"}
    assert sf["translation"] == {"service": "10.96.0.20:80", "backend": "%s:8080" % tp.SERVER, "service_name": "demo/web"}
    assert "10.96.0.20:80 => %s:8080" % tp.SERVER in hubble.compact(sock)
    flows = [drop, allow, sock]

    def pick(**params):
        flt = hubble.parse_filters(params)
        return [r for r in flows if hubble.matches(r, flt)]
    assert pick(verdict="DROPPED") == [drop]
    assert pick(verdict="TRANSLATED") == [sock]
    assert pick(from_pod="demo/client") == [allow, sock]
    assert pick(to_pod="demo/other") == []
    assert pick(pod="demo/other") == [drop]
    assert pick(namespace="demo") == flows and pick(namespace="other") == []
    assert pick(label="app=other") == [drop]
    assert pick(identity="302") == [drop]
    assert pick(drop_reason="POLICY_DENIED") == [drop]
    assert pick(protocol="udp") == [] and pick(protocol="tcp") == flows
    assert pick(port="40000") == [drop, allow]
    assert pick(ip=tp.OTHER) == [drop] and pick(ip="10.244.1.0/24") == flows
    assert pick(since="1714557600") == [drop]
    m = metrics.Metrics()
    for e in (drop_ev, allow_ev, sock_ev):
        m.observe(e, FakeEnricher())
    text = m.render()
    assert 'hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} 1' in text
    assert 'hubble_flows_processed_total{type="Drop",subtype="",verdict="DROPPED"} 1' in text
    assert 'hubble_policy_verdicts_total{direction="ingress",match="l3-l4",action="forwarded"} 1' in text
    assert 'hubble_tcp_flags_total{flag="SYN",family="IPv4"} 3' in text
    assert 'hubble_port_distribution_total{protocol="TCP",port="8080"} 2' in text
    assert "# TYPE hubble_drop_total counter" in text


@pytest.fixture
def flows_dp(tmp_path):
    with tp.loaded_node(tmp_path, map_sizes={"kln_flows": 65536}) as node:
        yield node


def _read(dp):
    with RingBuffer(events.pin(dp.gdir, events.RINGBUF)) as rb:
        return [events.decode(r) for r in rb.read()]


@needs_root
def test_policy_verdicts_become_events_aggregated_per_connection_and_direction(flows_dp):
    dp = flows_dp
    dp.apply(tp._state([tp.SERVER_FROM_CLIENT]))
    assert dp.run("kln_pol_from_container", tp.tcp(tp.CLIENT, tp.SERVER, 40001, 8080))[0] == tp.TCX_NEXT
    assert _read(dp) == []                                             # events off until the node apply turns them on
    assert events.sync_config(dp.gdir, {"enabled": True, "aggregation": "medium", "drop_rate": 0})
    assert events.sync_config(dp.gdir, {"enabled": True, "aggregation": "medium", "drop_rate": 0}) == []
    assert events.read_config(dp.gdir) == {"enabled": True, "aggregation": "medium", "drop_rate": 0}
    syn = tp.tcp(tp.CLIENT, tp.SERVER, 40002, 8080, 0x02)
    ack = tp.tcp(tp.CLIENT, tp.SERVER, 40002, 8080, 0x10)
    synack = tp.tcp(tp.SERVER, tp.CLIENT, 8080, 40002, 0x12)
    for pkt in (syn, synack, ack, ack, ack, synack):
        assert dp.run("kln_pol_from_container", pkt)[0] == tp.TCX_NEXT
    got = _read(dp)
    # SYN: egress of the client + ingress of the server; SYN-ACK: the first reply of each; the first ACK (a new flag)
    # for each; the repeated ACKs and the SYN-ACK again: nothing new
    assert [(e["direction"], e["tcp_flags"], bool(e["flags"] & events.F_REPLY)) for e in got] == [
        (2, 0x02, False), (1, 0x02, False), (2, 0x12, True), (1, 0x12, True), (2, 0x10, False), (1, 0x10, False)]
    ing = got[1]
    compiled = node.read_compiled(dp.compiled)
    assert compiled["rules"][str(ing["rule"])] == "NetworkPolicy demo/server-from-client ingress[0]"
    assert (ing["verdict"], ing["saddr"], ing["daddr"], ing["sport"], ing["dport"], ing["source"]) == \
        (1, tp.CLIENT, tp.SERVER, 40002, 8080, 1)
    ids = dict((k, v["identity"]) for k, v in compiled["endpoints"].items())
    assert (ing["src_identity"], ing["dst_identity"]) == (ids["demo/client"], ids["demo/server"])
    assert ing["flags"] & events.F_ENFORCED and not got[0]["flags"] & events.F_ENFORCED
    # a denied connection: dropped, always reported, with the reason; every packet at aggregation none
    for _i in range(3):
        assert dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 40003, 8080))[0] == tp.SHOT
    drops = [e for e in _read(dp) if e["verdict"] == 2]
    assert len(drops) == 3 and drops[0]["reason"] == 133 and drops[0]["rule"] == 0 and drops[0]["direction"] == 1
    events.sync_config(dp.gdir, {"enabled": True, "aggregation": "none", "drop_rate": 2})
    for _i in range(3):
        dp.run("kln_pol_from_container", ack)
    for _i in range(5):
        dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 40003, 8080))
    got = _read(dp)
    assert len([e for e in got if e["verdict"] == 1]) == 11     # every packet: 3 x (egress, ingress) + other's 5 egress
    assert len([e for e in got if e["verdict"] == 2]) == 2                      # drop rate 2 per second and reason
    c = events.counters(dp.gdir)
    assert c["rate_limited"] == 3 and c["lost"] == 0 and c["emitted"] >= 17
    # a deny rule names itself
    deny = tp._cnp("deny-other", {"endpointSelector": {"matchLabels": {"app": "server"}},
                                  "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "other"}}]}]})
    dp.apply(tp._state([tp.SERVER_FROM_CLIENT, deny]))
    dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 40004, 8080))
    d = [e for e in _read(dp) if e["verdict"] == 2][-1]
    assert d["reason"] == 181 and node.read_compiled(dp.compiled)["rules"][str(d["rule"])].startswith("CiliumNetworkPolicy demo/deny-other")
    events.sync_config(dp.gdir, None)
    dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 40005, 8080))
    assert _read(dp) == []


@needs_root
def test_a_full_ring_buffer_counts_lost_events_and_the_agent_keeps_memory_flat(flows_dp, tmp_path):
    dp = flows_dp
    dp.apply(tp._state([tp.SERVER_FROM_CLIENT]))
    events.sync_config(dp.gdir, {"enabled": True, "aggregation": "none", "drop_rate": 0})
    pkt = tp.tcp(tp.CLIENT, tp.SERVER, 41000, 8080, 0x10)
    # 64 KiB of ring buffer holds 910 records of 72 bytes: 2 x 1000 events overflow it
    bpfsys.prog_test_run(dp.progs["kln_pol_from_container"], pkt, repeat=1000)
    assert events.counters(dp.gdir)["lost"] > 0
    section = fconfig.normalize({"listen": "127.0.0.1:1", "buffer": 500, "node_name": "n1",
                                 "export": {"path": str(tmp_path / "flows.json"), "max_bytes": 65536, "keep": 2}})
    ag = fagent.Agent(dp.gdir, section, enricher=FakeEnricher())
    while ag.poll_once(timeout=0.1):
        pass
    assert ag.seq > 800 and len(ag.ring) == 500
    text = ag.render_metrics()
    assert re.search(r'hubble_lost_events_total\{source="perf_event_ring_buffer"\} [1-9]', text)
    assert 'netstack_agent_up{node="n1"} 1' in text
    # a flood: 20 rounds of a full ring buffer; the ring stays at 500 flows and the memory flat
    rss = []
    for i in range(20):
        bpfsys.prog_test_run(dp.progs["kln_pol_from_container"], pkt, repeat=450)
        while ag.poll_once(timeout=0.05):
            pass
        rss.append(fagent.rss_bytes())
    assert len(ag.ring) == 500 and ag.seq > 10000
    assert rss[-1] - rss[4] < 2 * 1024 * 1024, rss               # flat after the ring filled (measured: < 2 MiB drift)
    files = sorted(os.listdir(str(tmp_path)))
    assert "flows.json" in files and "flows.json.1" in files and "flows.json.2" in files and "flows.json.3" not in files
    assert os.path.getsize(str(tmp_path / "flows.json")) <= 65536
    json.loads(open(str(tmp_path / "flows.json")).readline())


@needs_root
def test_the_agent_serves_flows_follow_and_metrics_over_http(flows_dp):
    dp = flows_dp
    dp.apply(tp._state([tp.SERVER_FROM_CLIENT]))
    events.sync_config(dp.gdir, {"enabled": True, "aggregation": "medium", "drop_rate": 0})
    section = fconfig.normalize({"listen": "127.0.0.1:4245", "buffer": 100, "node_name": "n1"})
    ag = fagent.Agent(dp.gdir, section, enricher=FakeEnricher())
    srv = fagent.serve(ag, "127.0.0.1:0")
    base = "http://127.0.0.1:%d" % srv.server_address[1]
    t = threading.Thread(target=ag.run)
    t.daemon = True
    t.start()
    try:
        dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 42000, 8080))
        dp.run("kln_pol_from_container", tp.tcp(tp.CLIENT, tp.SERVER, 42001, 8080))
        deadline = time.time() + 5
        while ag.seq < 3 and time.time() < deadline:
            time.sleep(0.05)
        lines = urllib.request.urlopen(base + "/flows?verdict=DROPPED").read().decode().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["flow"]["source"]["pod_name"] == "other"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/flows?verdict=NOPE")
        assert err.value.code == 400 and "unknown verdict NOPE" in err.value.read().decode()
        resp = urllib.request.urlopen(base + "/flows?follow=1&pod=demo/other&verdict=DROPPED", timeout=10)
        assert json.loads(resp.readline())["flow"]["verdict"] == "DROPPED"          # the one kept
        dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 42002, 8080))
        nxt = json.loads(resp.readline())                                           # and the new one, as it comes
        assert nxt["flow"]["l4"]["TCP"]["source_port"] == 42002
        resp.close()
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} 2' in text
    finally:
        ag.stop.set()
        srv.shutdown()


# ---- the relay (netstack observe over several agents) -------------------------------------------------------

def _resp(node, t, pod, verdict="FORWARDED"):
    drop = verdict == "DROPPED"
    ev = _event(verdict=2 if drop else 1, reason=133 if drop else 0, saddr=tp.CLIENT if pod == "client" else tp.OTHER)
    return hubble.make_flow(events.decode(events.encode(ev)), FakeEnricher(), node, t)


@pytest.fixture
def two_agents():
    """Two real agents' HTTP servers (agent.serve) over canned rings: n1 and n2."""
    servers = []
    agents = {}
    for node, times in (("n1", (10.0, 30.0, 50.0)), ("n2", (20.0, 40.0))):
        section = fconfig.normalize({"listen": "127.0.0.1:4245", "buffer": 100, "node_name": node})
        ag = fagent.Agent("/nonexistent", section, enricher=FakeEnricher())
        for i, t in enumerate(times):
            ag.add(_resp(node, 1714557600.0 + t, "client" if i % 2 == 0 else "other", "DROPPED" if i % 2 else "FORWARDED"))
        srv = fagent.serve(ag, "127.0.0.1:0")
        servers.append((ag, srv))
        agents[node] = "127.0.0.1:%d" % srv.server_address[1]
    yield agents, servers
    for ag, srv in servers:
        ag.stop.set()
        srv.shutdown()


def test_the_relay_merges_agents_in_time_order_and_applies_last_to_the_whole(two_agents):
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    agents, _servers = two_agents
    rl = relay.Relay(agents)
    got = rl.flows({})
    assert [(r["node_name"], r["flow"]["time"][17:19]) for r in got] == \
        [("n1", "10"), ("n2", "20"), ("n1", "30"), ("n2", "40"), ("n1", "50")]
    assert [r["node_name"] for r in rl.flows({"last": 2})] == ["n2", "n1"]
    assert len(rl.flows(relay.parse_cli({"protocol": ["tcp"]}))) == 5 and not rl.flows(relay.parse_cli({"protocol": ["udp"]}))
    assert hubble.query(hubble.parse_filters({"protocol": ["udp", "6"]})) == [("protocol", "udp"), ("protocol", "tcp")]
    dropped = rl.flows(relay.parse_cli({"verdict": ["DROPPED"]}))
    assert [(r["node_name"], r["flow"]["source"]["pod_name"]) for r in dropped] == [("n1", "other"), ("n2", "other")]
    assert rl.unknown_pods({"pod": ["demo/nope"]}) == ["demo/nope"]          # the fakes know no pods (/pods)
    assert relay.render(got[0], "json").startswith('{"flow": ')
    assert "-> demo/server:8080" in relay.render(got[0], "compact")
    assert relay.render({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": 3, "node_name": "n1"}},
                        "compact") == "EVENTS LOST: HUBBLE_RING_BUFFER 3 (node n1)"


def test_the_relay_reports_an_unavailable_node_and_refused_filters(two_agents):
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    agents, _servers = two_agents
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    rl = relay.Relay(dict(agents, n3=dead), timeout=3)
    assert len(rl.flows({})) == 5 and list(rl.unavailable) == ["n3"]
    with pytest.raises(relay.RelayError, match="no agent answered"):
        relay.Relay({"n3": dead}, timeout=3).flows({})
    with pytest.raises(relay.RelayError, match="unknown verdict NOPE"):
        relay.Relay(agents)._gather("/flows", [("verdict", "NOPE")])
    with pytest.raises(hubble.FilterError, match="--port: '0' is not a port"):
        relay.parse_cli({"port": ["0"], "verdict": None, "follow": False})


def test_the_relay_follows_every_agent(two_agents):
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    agents, servers = two_agents
    rl = relay.Relay(agents)
    got, stop = [], threading.Event()

    def emit(obj):
        got.append(obj)
        if len(got) == 7:
            stop.set()
    t = threading.Thread(target=rl.follow, args=({"verdict": ["FORWARDED", "DROPPED"]}, emit, stop))
    t.daemon = True
    t.start()
    time.sleep(0.5)
    for ag, _srv in servers:
        ag.add(_resp(ag.node_name, time.time(), "client"))
    t.join(10)
    assert len(got) == 7 and sorted(r["node_name"] for r in got[5:]) == ["n1", "n2"]


def test_agents_come_from_the_inventory():
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    inv = {"_meta": {"hostvars": {"cp1": {"ansible_host": "10.77.0.11"},
                                  "w1": {"ansible_host": "10.77.0.21", "netstack_flows_port": 5000},
                                  "w2": {"ansible_host": "10.77.0.22", "dataplane_flows_listen": "10.77.1.22:4300"},
                                  "r1": {"ansible_host": "10.77.0.31"}}},
           "kube_nodes": {"children": ["cp", "workers"]}, "cp": {"hosts": ["cp1"]}, "workers": {"hosts": ["w1", "w2"]},
           "routers": {"hosts": ["r1"]}}
    got = relay.agents_from_inventory("inv.yml", run=lambda argv: (0, json.dumps(inv), ""))
    assert got == {"cp1": "10.77.0.11:4245", "w1": "10.77.0.21:5000", "w2": "10.77.1.22:4300"}
    with pytest.raises(relay.RelayError, match="no hosts in the group kube_nodes"):
        relay.agents_from_inventory("inv.yml", run=lambda argv: (0, json.dumps({"_meta": {}}), ""))


def test_the_agent_unit_runs_the_bundle_and_changes_with_it():
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import service
    a = service.unit_text("/usr/lib/kldload-netstack/netstack.pyz", "/etc/kldload-netstack/dataplane.json",
                          "/etc/kldload-netstack/dataplane.json", "ab" * 32)
    assert "ExecStart=/usr/bin/python3 /usr/lib/kldload-netstack/netstack.pyz agent\n" in a
    assert "Restart=always" in a and "NETSTACK_CONFIG" not in a and "ab" * 32 in a
    b = service.unit_text("/x.pyz", "/tmp/c.json", "/etc/kldload-netstack/dataplane.json", "cd" * 32)
    assert "Environment=NETSTACK_CONFIG=/tmp/c.json\n" in b and b != a


def test_netstack_observe_on_the_command_line(two_agents):
    agents, _servers = two_agents
    import sys
    cmd = [sys.executable, os.path.join(REPO, "node", "netstack_cli.py"), "observe"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = sum((["--agent", a] for a in sorted(agents.values())), [])
    p = subprocess.run(cmd + args + ["--verdict", "DROPPED", "-o", "json"], capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 0 and [r["flow"]["drop_reason_desc"] for r in rows] == ["POLICY_DENIED"] * 2, p.stderr
    p = subprocess.run(cmd + args + ["--last", "1"], capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 and "[n1]" in p.stdout, p.stderr
    p = subprocess.run(cmd + args + ["--pod", "demo/nope"], capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0 and p.stdout == "" and "no pod demo/nope on the nodes asked" in p.stderr
    for bad, msg in ((["--verdict", "MAYBE"], "unknown verdict MAYBE"), (["--since", "yesterday"], "--since"),
                     (["--port", "99999"], "--port: '99999' is not a port"), (["--colour", "red"], "unrecognized")):
        p = subprocess.run(cmd + args + bad, capture_output=True, text=True, env=env, check=False)
        assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr)


@needs_root
def test_the_netstack_agent_command_serves_the_programs_events(flows_dp, tmp_path):
    """`netstack agent` as the unit runs it (the node configuration's agent section), `netstack observe` against it,
    SIGTERM ends it."""
    import signal
    import sys
    from ansible_collections.kldload.netstack.plugins.module_utils import runtime
    dp = flows_dp
    dp.apply(tp._state([tp.SERVER_FROM_CLIENT]))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = runtime.default_config()
    cfg["pin_path"] = dp.root
    cfg["lb"]["state_file"] = str(tmp_path / "services.json")
    cfg["agent"] = {"listen": "127.0.0.1:%d" % port, "node_name": "n1", "buffer": 64}
    path = tmp_path / "dataplane.json"
    path.write_text(json.dumps(cfg))
    events.sync_config(dp.gdir, fconfig.kernel(fconfig.normalize(cfg["agent"])))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NETSTACK_CONFIG=str(path))
    cli = [sys.executable, os.path.join(REPO, "node", "netstack_cli.py")]
    proc = subprocess.Popen(cli + ["agent"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving flows and metrics on 127.0.0.1:%d" % port in proc.stdout.readline()
        dp.run("kln_pol_from_container", tp.tcp(tp.OTHER, tp.SERVER, 42100, 8080))
        deadline = time.time() + 10
        rows = []
        while not rows and time.time() < deadline:
            p = subprocess.run(cli + ["observe", "-o", "json", "--verdict", "DROPPED", "--port", "42100"], env=env,
                               capture_output=True, text=True, check=False)     # the local agent, from the configuration
            rows = [json.loads(x) for x in p.stdout.splitlines()]
            time.sleep(0.3)
        assert rows and rows[0]["flow"]["drop_reason_desc"] == "POLICY_DENIED" and rows[0]["node_name"] == "n1", p.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = dict(cfg, agent={"listen": "192.0.2.77:%d" % port})
    path.write_text(json.dumps(bad))
    p = subprocess.run(cli + ["agent"], env=env, capture_output=True, text=True, check=False, timeout=30)
    assert p.returncode == 1 and "192.0.2.77 is not an address of this node" in p.stderr and "Traceback" not in p.stderr


def test_the_relay_serves_the_network_map_page_and_its_api(two_agents, tmp_path):
    """netstack relay's HTTP over two agents; the page in headless Chromium (Debian's, through chromedriver) when
    it is installed: the pods drawn, a red edge for the dropped pair, a green one for the forwarded, a click lists
    the edge's flows."""
    import sys
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    agents, servers = two_agents
    pods = {tp.CLIENT: "client", tp.SERVER: "server", tp.OTHER: "other"}
    for ag, _srv in servers:
        ag.enricher.by_ip = dict((ip, {"kind": "pod", "namespace": "demo", "pod_name": n, "node_name": ag.node_name,
                                       "identity": 300, "labels": ["k8s:app=%s" % n]}) for ip, n in pods.items())
    srv = relay.serve(relay.Relay(agents), "127.0.0.1:0", window="20000d")
    base = "http://127.0.0.1:%d" % srv.server_address[1]
    try:
        assert "network map" in urllib.request.urlopen(base + "/").read().decode()
        got = json.loads(urllib.request.urlopen(base + "/api/pods").read().decode())
        assert [p["name"] for p in got] == ["client", "other", "server"]
        lines = urllib.request.urlopen(base + "/api/flows?verdict=DROPPED").read().decode().splitlines()
        assert len(lines) == 2 and all(json.loads(x)["flow"]["verdict"] == "DROPPED" for x in lines)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/api/flows?follow=1")
        assert err.value.code == 400 and "follow" in err.value.read().decode()
        if not os.path.exists("/usr/bin/chromedriver"):
            pytest.skip("Debian's chromium-driver is not installed")
        sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
        import webdriver
        b = webdriver.Browser()
        try:
            b.get(base + "/")
            deadline = time.time() + 15
            edges = {}
            while time.time() < deadline and len(edges) < 2:
                edges = b.js("const o = {}; document.querySelectorAll('.edge').forEach("
                             "e => o[e.getAttribute('data-edge')] = e.getAttribute('class')); return o;")
                time.sleep(0.3)
            status = b.js("return document.getElementById('status').textContent")
            assert edges == {"demo/client->demo/server": "edge forwarded", "demo/other->demo/server": "edge dropped"}, \
                (edges, status)
            assert b.js("return document.querySelectorAll('.pod').length") == 3
            b.click('.edge-handle[data-edge="demo/other->demo/server"]')
            text = b.js("return document.getElementById('flows').textContent")
            assert "DROPPED POLICY_DENIED" in text and "demo/other:40000 -> demo/server:8080" in text, text
            b.screenshot(os.environ.get("NETSTACK_MAP_SHOT") or str(tmp_path / "map.png"))
        finally:
            b.close()
    finally:
        srv.shutdown()


def test_the_restore_makes_the_agent_follow_a_switched_bundle_only(tmp_path, monkeypatch):
    from ansible_collections.kldload.netstack.plugins.module_utils import units
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import service
    monkeypatch.setattr(units, "UNIT_DIR", str(tmp_path))
    monkeypatch.setattr(units, "systemd_running", lambda: False)
    cfgp = "/etc/kldload-netstack/dataplane.json"
    new = service.unit_text("/usr/lib/kldload-netstack/netstack.pyz", cfgp, cfgp, "ab" * 32)
    assert service.follow_bundle(new, check=True) == []                              # no unit: not ours to make
    (tmp_path / service.UNIT).write_text(service.unit_text("/usr/lib/kldload-netstack/netstack.pyz", cfgp, cfgp, "cd" * 32))
    assert any(c.startswith("write ") for c in service.follow_bundle(new, check=True))  # another release: follow it
    (tmp_path / service.UNIT).write_text(new)
    assert service.follow_bundle(new, check=True) == []                              # the same: nothing
    (tmp_path / service.UNIT).write_text(service.unit_text("/x.pyz", "/tmp/other.json", cfgp, "cd" * 32))
    assert service.follow_bundle(new, check=True) == []                              # another instance's unit: left alone
