"""Flow observability on the lab: the install (flows on by default) with three more pods and two policies, real
connections from the pods' network namespaces, and what `netstack observe` shows for them - on the node (the local
agent) and from the controller (every node's agent merged, `netstack observe --inventory`): a denied connection
with both pod names, the reason and the policy (or `default deny`), a connection through a service VIP with its
translation to the backend that answered, each filter narrowing the answer, and the agent killed with SIGKILL
coming back and serving.

Every connection has its own source port, so each flow is found by it; the agents' rings are per node and in
memory, so the tests look for their own flows only (a `--since` at the module's start)."""
import json
import os
import select
import shlex
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import INVENTORY, PROBE, PROBE_PATH, REPO, _env, run_playbook

PYZ = REPO / "build" / "node" / "netstack.pyz"
# pods of this test besides the lab's web-<node>: a client allowed to web, an intruder denied, a db that denies it
PODS = [("client", "worker1", {"app": "client"}), ("intruder", "worker2", {"app": "intruder"}),
        ("db", "cp1", {"app": "db"})]
POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    ports:
    - {port: 8080, protocol: TCP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-deny-intruder, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: intruder}
"""


def _vars(lab, policies):
    workloads = list(lab.vars.get("netstack_workloads") or [])
    for name, host, labels in PODS:
        workloads.append({"namespace": "demo", "name": name, "node": host, "labels": labels,
                          "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    return {"netstack_workloads": workloads,
            "netstack_network_policies": [d for d in yaml.safe_load_all(policies) if d]}


class Flows:
    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        self.port = 41000
        self.started = None

    def install(self):
        self.vars_file = str(self.tmp / "flows-vars.yml")
        (self.tmp / "flows-vars.yml").write_text(yaml.safe_dump(_vars(self.lab, POLICIES)))
        t0 = time.time()
        run_playbook("playbooks/install.yml", "-e", "@" + self.vars_file)
        self.install_seconds = time.time() - t0
        self.pods = {}
        for h in self.lab.hosts():
            self.lab.put(h, PROBE_PATH, PROBE, mode="0755")
            for ep in json.loads(self.lab.sh(h, "netstack endpoint list --json").stdout):
                self.pods["%s/%s" % (ep["namespace"], ep["name"])] = {
                    "host": h, "ip": ep["ips"][0].split("/")[0], "netns": ep["netns"]}
        self.started = time.time() - 1

    def connect(self, src, ip, port, proto="tcp", timeout=1.0):
        """One connection from pod ``src`` with a source port of its own: (source port, probe result)."""
        self.port += 1
        p = self.pods[src]
        out = self.lab.sh(p["host"], "nsenter --net=%s python3 %s probe --vip %s --port %d --proto %s --timeout %s "
                          "--source-port %d" % (shlex.quote(p["netns"]), PROBE_PATH, ip, port, proto, timeout,
                                                self.port)).stdout
        return self.port, json.loads(out)

    def observe_node(self, host, *args):
        proc = self.lab.sh(host, "netstack observe -o json %s" % " ".join(shlex.quote(a) for a in args), check=False)
        return proc

    def observe_relay(self, *args, check=True):
        """netstack observe on the controller: every kube_nodes agent of the lab's inventory, merged."""
        argv = ["python3", str(PYZ), "observe", "--inventory", str(INVENTORY), "-o", "json"] + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60, check=False)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def since(self):
        return ["--since", "%.3f" % self.started]

    def wait_flows(self, fn, what, timeout=15):
        """fn() -> flows; until it gives some (the agents read the ring buffer about every second)."""
        deadline = time.time() + timeout
        while True:
            got = fn()
            if got or time.time() > deadline:
                assert got, "no flow: %s" % what
                return got
            time.sleep(0.5)


def _rows(proc):
    return [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]


def _sport(row):
    l4 = list((row["flow"].get("l4") or {}).values())
    return l4[0].get("source_port") if l4 else None


@pytest.fixture(scope="module")
def flows(lab, tmp_path_factory):
    if not PYZ.exists():
        pytest.skip("make node has not run")
    f = Flows(lab, tmp_path_factory.mktemp("flows"))
    f.install()
    yield f
    # the lab as the other tests expect it: its own workloads only, then no policy (the policy play gathers the pods
    # left); the services' backends are the web pods, which stay
    run_playbook("tests/integration/workloads_apply.yml")
    run_playbook("tests/integration/policy_apply.yml")


def test_a_denied_connection_on_the_node_and_through_the_relay(flows):
    web = flows.pods["demo/web-cp1"]
    sport, res = flows.connect("demo/intruder", web["ip"], 8080)
    assert res["errors"] and not res["backends"], res                           # dropped: a timeout
    # on the node that dropped it (ingress at the destination pod): the local agent
    rows = flows.wait_flows(lambda: [r for r in _rows(flows.observe_node(
        "cp1", "--verdict", "DROPPED", "--from-pod", "demo/intruder", *flows.since())) if _sport(r) == sport],
        "the drop on cp1")
    f = rows[0]["flow"]
    assert (f["source"]["namespace"], f["source"]["pod_name"]) == ("demo", "intruder"), f
    assert (f["destination"]["namespace"], f["destination"]["pod_name"]) == ("demo", "web-cp1"), f
    assert (f["verdict"], f["drop_reason_desc"], f["policy_rule"]) == ("DROPPED", "POLICY_DENIED", "default deny"), f
    assert f["traffic_direction"] == "INGRESS" and f["IP"]["destination"] == web["ip"], f
    assert f["l4"]["TCP"]["destination_port"] == 8080 and rows[0]["node_name"] == "cp1"
    assert "k8s:app=intruder" in f["source"]["labels"] and f["source"]["identity"] > 0
    # from the controller: the same flow, merged from every node
    rows = flows.wait_flows(lambda: [r for r in _rows(flows.observe_relay(
        "--verdict", "DROPPED", "--from-pod", "demo/intruder", *flows.since())) if _sport(r) == sport],
        "the drop through the relay")
    assert rows[0]["flow"]["uuid"] == f["uuid"] and rows[0]["node_name"] == "cp1"
    compact = subprocess.run(["python3", str(PYZ), "observe", "--inventory", str(INVENTORY), "--verdict", "DROPPED",
                              "--from-pod", "demo/intruder", "--port", str(sport)],
                             capture_output=True, text=True, env=_env(), timeout=60, check=True).stdout
    assert "demo/intruder:%d" % sport in compact and "demo/web-cp1:8080" in compact and "DROPPED" in compact
    assert "Policy denied" in compact and "default deny" in compact
    # a deny rule: the drop names the policy that denied it
    db = flows.pods["demo/db"]
    sport, res = flows.connect("demo/intruder", db["ip"], 8080)
    assert res["errors"], res
    rows = flows.wait_flows(lambda: [r for r in _rows(flows.observe_relay(
        "--to-pod", "demo/db", "--verdict", "DROPPED", *flows.since())) if _sport(r) == sport], "the deny rule's drop")
    f = rows[0]["flow"]
    assert f["drop_reason_desc"] in ("POLICY_DENY", "POLICY_DENIED") and "demo/db-deny-intruder" in f["policy_rule"], f
    assert f["ingress_denied_by"][0]["name"] == "db-deny-intruder", f


def test_a_service_connection_shows_the_translation_to_the_backend(flows):
    sport, res = flows.connect("demo/client", "10.96.0.20", 80)
    assert len(res["backends"]) == 1 and not res["errors"], res
    backend = list(res["backends"])[0]                                          # the pod address:8080 that answered
    rows = flows.wait_flows(lambda: [r for r in _rows(flows.observe_node(
        "worker1", "--verdict", "TRANSLATED", "--from-pod", "demo/client", *flows.since()))
        if r["flow"].get("translation", {}).get("backend") == backend], "the translation on worker1")
    f = rows[-1]["flow"]
    assert f["translation"]["service"] == "10.96.0.20:80" and f["translation"]["service_name"] == "demo/web", f
    assert f["destination_service"] == {"name": "web", "namespace": "demo"}, f
    assert f["destination"]["pod_name"].startswith("web-") and f["source"]["pod_name"] == "client", f
    assert f["Type"] == "SOCK" and f["IP"]["destination"] == backend.split(":")[0], f
    # and the connection itself, allowed by the policy at the backend, names the rule
    rows = flows.wait_flows(lambda: [r for r in _rows(flows.observe_relay(
        "--verdict", "FORWARDED", "--from-pod", "demo/client", "--port", str(sport), *flows.since()))
        if r["flow"].get("policy_rule", "").startswith("NetworkPolicy")], "the allowed connection")
    assert rows[0]["flow"]["policy_rule"] == "NetworkPolicy demo/web-from-client ingress[0]", rows[0]["flow"]


def test_each_filter_narrows_the_answer(flows):
    web1, web2, db = flows.pods["demo/web-worker1"], flows.pods["demo/web-worker2"], flows.pods["demo/db"]
    mark = time.time()
    known = [flows.connect("demo/client", web2["ip"], 8080),               # forwarded (the policy allows it)
             flows.connect("demo/intruder", web1["ip"], 8080),             # dropped: default deny
             flows.connect("demo/client", web1["ip"], 5353, "udp"),        # dropped: the policy allows TCP 8080 only
             flows.connect("demo/intruder", db["ip"], 8080)]               # dropped: the deny rule
    ports = set(p for p, _r in known)
    base = ["--since", "%.3f" % (mark - 0.5)]

    def ours(*args):
        return [r for r in _rows(flows.observe_relay(*(base + list(args)))) if _sport(r) in ports]

    def all_known():
        rs = ours()
        return rs if {_sport(r) for r in rs} == ports else []
    everything = flows.wait_flows(all_known, "the known flows")
    assert {_sport(r) for r in everything} == ports, everything
    intruder_id = [r for r in everything if r["flow"]["source"].get("pod_name") == "intruder"][0]["flow"]["source"]["identity"]
    assert len(ours("--namespace", "demo")) == len(everything) and not ours("--namespace", "production")
    cases = [
        (["--pod", "demo/intruder"], lambda f, r: "intruder" in (f["source"].get("pod_name"), f["destination"].get("pod_name"))),
        (["--from-pod", "demo/client"], lambda f, r: f["source"].get("pod_name") == "client"),
        (["--to-pod", "demo/db"], lambda f, r: f["destination"].get("pod_name") == "db"),
        (["--label", "app=intruder"], lambda f, r: "k8s:app=intruder" in f["source"]["labels"] + f["destination"]["labels"]),
        (["--identity", str(intruder_id)], lambda f, r: intruder_id in (f["source"]["identity"], f["destination"]["identity"])),
        (["--verdict", "DROPPED"], lambda f, r: f["verdict"] == "DROPPED"),
        (["--verdict", "FORWARDED"], lambda f, r: f["verdict"] == "FORWARDED"),
        (["--drop-reason", "POLICY_DENIED"], lambda f, r: f.get("drop_reason_desc") == "POLICY_DENIED"),
        (["--protocol", "udp"], lambda f, r: "UDP" in f["l4"]),
        (["--port", "5353"], lambda f, r: 5353 in (f["l4"]["UDP"]["source_port"], f["l4"]["UDP"]["destination_port"])),
        (["--ip", db["ip"]], lambda f, r: db["ip"] in (f["IP"]["source"], f["IP"]["destination"])),
        (["--node", "worker1"], lambda f, r: r["node_name"] == "worker1"),
    ]
    for args, holds in cases:
        got = ours(*args)
        assert got, (args, "nothing")
        assert all(holds(r["flow"], r) for r in got), (args, got)
        assert len(got) < len(everything), (args, "did not narrow")
    last = _rows(flows.observe_relay(*(base + ["--last", "2"])))
    assert len(last) == 2 and [r["flow"]["time"] for r in last] == sorted(r["flow"]["time"] for r in last)
    later = time.time()
    port, _res = flows.connect("demo/intruder", web2["ip"], 8080)
    got = flows.wait_flows(lambda: _rows(flows.observe_relay("--since", "%.3f" % later, "--from-pod", "demo/intruder")),
                           "since")
    assert {_sport(r) for r in got} == {port}, got
    # --follow: the stream prints what comes after it started
    proc = subprocess.Popen(["python3", str(PYZ), "observe", "--inventory", str(INVENTORY), "-o", "json", "--follow",
                             "--from-pod", "demo/intruder", "--verdict", "DROPPED", "--since", "%.3f" % time.time()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        time.sleep(2)
        port, _res = flows.connect("demo/intruder", web1["ip"], 8080)
        ready, _w, _x = select.select([proc.stdout], [], [], 15)
        assert ready, "--follow printed nothing in 15 s"
        line = json.loads(proc.stdout.readline())
        assert _sport(line) == port and line["flow"]["verdict"] == "DROPPED", line
    finally:
        proc.terminate()
        proc.wait(10)
    # bad input: clear errors, and a pod that does not exist is an empty answer that says so
    for args, msg in ((["--verdict", "MAYBE"], "unknown verdict MAYBE"), (["--since", "last tuesday"], "--since"),
                      (["--port", "70000"], "is not a port"), (["--colour", "red"], "unrecognized arguments")):
        proc = flows.observe_relay(*args, check=False)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = flows.observe_relay("--pod", "demo/nobody")
    assert proc.stdout == "" and "no pod demo/nobody on the nodes asked" in proc.stderr, proc.stderr


def test_the_agent_killed_with_sigkill_comes_back_and_serves(flows):
    host = "worker2"
    pid = flows.lab.sh(host, "systemctl show -p MainPID --value netstack-agent.service").stdout.strip()
    assert pid.isdigit() and int(pid) > 0
    flows.lab.sh(host, "kill -KILL %s" % pid)
    deadline = time.time() + 30
    while True:
        now = flows.lab.sh(host, "systemctl show -p MainPID --value netstack-agent.service; "
                                 "systemctl is-active netstack-agent.service", check=False).stdout.split()
        if len(now) == 2 and now[0] not in ("0", pid) and now[1] == "active":
            break
        assert time.time() < deadline, now
        time.sleep(0.5)
    addr = flows.lab.hostvars[host]["ansible_host"]
    health = flows.wait_flows(lambda: [flows.lab.sh(host, "python3 -c \"import urllib.request as u; print(u.urlopen("
                                                          "'http://%s:4245/healthz').read().decode())\"" % addr,
                                                    check=False).stdout.strip()], "healthz")
    assert json.loads(health[0])["status"] == "ok"
    # it keeps serving: a new drop on this node is seen, and the metrics count it
    port, _res = flows.connect("demo/client", flows.pods["demo/intruder"]["ip"], 8080)
    flows.wait_flows(lambda: [r for r in _rows(flows.observe_node(host, "--to-pod", "demo/intruder"))
                              if _sport(r) == port], "a flow after the restart")
    metrics = flows.lab.sh(host, "python3 -c \"import urllib.request as u; print(u.urlopen("
                                 "'http://%s:4245/metrics').read().decode())\"" % addr).stdout
    assert 'netstack_agent_up{node="%s"} 1' % host in metrics
    assert "hubble_flows_processed_total{" in metrics


PROMETHEUS = "/usr/bin/prometheus"


def _prom(base, query):
    url = "%s/api/v1/query?%s" % (base, urllib.parse.urlencode({"query": query}))
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read().decode())["data"]["result"]


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus is not installed (scripts/setup.sh)")
def test_prometheus_scrapes_every_agent_and_counts_a_denied_connection(flows, tmp_path):
    """A real Prometheus (Debian's) on the controller scraping every node's agent: a denied connection raises
    hubble_drop_total{reason="POLICY_DENIED"} as read back through Prometheus' HTTP query API."""
    targets = ["%s:4245" % flows.lab.hostvars[h]["ansible_host"] for h in flows.lab.hosts()]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "netstack", "static_configs": [{"targets": targets}]}]}))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    base = "http://127.0.0.1:%d" % port
    log = open(str(tmp_path / "prometheus.log"), "w")
    proc = subprocess.Popen([PROMETHEUS, "--config.file=%s" % (tmp_path / "prometheus.yml"),
                             "--storage.tsdb.path=%s" % (tmp_path / "data"), "--web.listen-address=127.0.0.1:%d" % port],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        up = flows.wait_flows(lambda: _up(base, len(targets)), "every agent scraped (up == 1)", timeout=30)
        assert sorted(r["metric"]["instance"] for r in up) == sorted(targets)

        def denied():
            got = _prom(base, 'sum(hubble_drop_total{reason="POLICY_DENIED"})')
            return float(got[0]["value"][1]) if got else 0.0
        before = denied()
        flows.connect("demo/intruder", flows.pods["demo/web-worker1"]["ip"], 8080)
        after = flows.wait_flows(lambda: [v for v in [denied()] if v > before], "the drop counted", timeout=20)
        assert after[0] > before
        nodes = _prom(base, "netstack_agent_up")
        assert sorted(r["metric"]["node"] for r in nodes) == sorted(flows.lab.hosts())
    finally:
        proc.terminate()                     # the one process this test started, by its pid
        proc.wait(20)
        log.close()


def _up(base, n):
    try:
        got = [r for r in _prom(base, 'up{job="netstack"}') if r["value"][1] == "1"]
    except OSError:
        return []
    return got if len(got) == n else []


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromedriver"), reason="Debian's chromium-driver is not installed")
def test_the_network_map_page_in_a_real_browser(flows):
    """netstack relay on the controller (every node's agent), its network map page in headless Chromium driven by
    chromedriver: the lab's pods shown, a denied connection appears as a red edge within seconds, a click lists its
    flows; the screenshot is kept in tests/output/flows-map.png."""
    import webdriver
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    relay = subprocess.Popen(["python3", str(PYZ), "relay", "--inventory", str(INVENTORY), "--listen",
                              "127.0.0.1:%d" % port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env())
    browser = None
    try:
        assert "the network map on http://127.0.0.1:%d/" % port in relay.stdout.readline()
        browser = webdriver.Browser()
        browser.get("http://127.0.0.1:%d/" % port)
        want = {"demo/web-cp1", "demo/web-worker1", "demo/web-worker2", "demo/client", "demo/intruder", "demo/db"}
        flows.wait_flows(lambda: want <= set(browser.js(
            "return Array.from(document.querySelectorAll('.pod')).map(e => e.getAttribute('data-pod'))")), "the pods")
        edge = "demo/db->demo/web-worker2"
        css = '.edge[data-edge="%s"]' % edge
        assert browser.js("return document.querySelector(arguments[0]) === null", css)
        t0 = time.time()
        flows.connect("demo/db", flows.pods["demo/web-worker2"]["ip"], 8080)    # denied: web takes client only
        flows.wait_flows(lambda: browser.js("const e = document.querySelector(arguments[0]); "
                                            "return e ? e.getAttribute('class') : null", css) == "edge dropped",
                         "a red edge %s" % edge, timeout=10)
        seconds = time.time() - t0
        browser.click('.edge-handle[data-edge="%s"]' % edge)
        text = browser.js("return document.getElementById('flows').textContent")
        assert "demo/db:" in text and "demo/web-worker2:8080 DROPPED POLICY_DENIED" in text, text
        out = REPO / "tests" / "output"
        out.mkdir(parents=True, exist_ok=True)
        browser.screenshot(out / "flows-map.png")
        assert seconds < 10
    finally:
        if browser:
            browser.close()
        relay.terminate()                          # the relay this test started, by its pid
        relay.wait(10)
