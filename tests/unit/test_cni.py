"""CNI: the runtime-side invoker with Debian's reference plugins (ptp, host-local, loopback) and our
chained netstack-cni plugin, on real network namespaces (nsu-cni-*), veths and IPAM leases.

The plugin runs through the node command's real argv[0] dispatch: a tiny executable named
netstack-cni that imports node/netstack_cli.py and calls main(), placed in the test's CNI path next
to links to the reference plugins.
"""
import io
import json
import os
import random
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import cni

REPO = Path(__file__).resolve().parents[2]
DEBIAN_CNI = "/usr/lib/cni"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(os.path.join(DEBIAN_CNI, "ptp")),
                                reason="needs root and the CNI reference plugins in /usr/lib/cni")


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check)


def _links():
    return set(os.listdir("/sys/class/net"))


@pytest.fixture
def cni_bin(tmp_path):
    """A CNI path: the reference plugins (links) and netstack-cni (the node command under that name)."""
    d = tmp_path / "bin"
    d.mkdir()
    for p in ("ptp", "host-local", "loopback"):
        (d / p).symlink_to(os.path.join(DEBIAN_CNI, p))
    shim = d / cni.PLUGIN_NAME
    shim.write_text("#!%s\nimport sys\nsys.path[:0] = [%r, %r]\nimport netstack_cli\nnetstack_cli.main()\n"
                    % (sys.executable, str(REPO / ".collections"), str(REPO / "node")))
    shim.chmod(0o755)
    return str(d)


@pytest.fixture
def env_dirs(tmp_path, monkeypatch):
    """Endpoint records, IPAM leases and the result cache in the test's own directories."""
    eps = tmp_path / "endpoints"
    monkeypatch.setenv(cni.ENDPOINTS_DIR_ENV, str(eps))
    monkeypatch.setenv("NETSTACK_CONFIG", str(tmp_path / "no-dataplane.json"))
    return {"endpoints": str(eps), "ipam": str(tmp_path / "ipam"), "cache": str(tmp_path / "cache")}


@pytest.fixture
def netns_factory():
    made = []

    def make():
        name = "nsu-cni-%s" % uuid.uuid4().hex[:8]
        _ip("netns", "add", name)
        made.append(name)
        return name, "/var/run/netns/%s" % name
    try:
        yield make
    finally:
        for name in made:
            _ip("netns", "del", name, check=False)


@pytest.fixture
def host_links():
    """Host links present before the test; any veth the test left behind is deleted afterwards."""
    before = _links()
    yield before
    for link in _links() - before:
        if link.startswith("veth"):
            _ip("link", "del", link, check=False)


def _subnet(prefix=24):
    while True:
        net = "10.%d.%d.0/%d" % (random.randint(200, 250), random.randint(0, 255), prefix)
        routes = _ip("route", "show", "match", net.split("/")[0]).stdout.splitlines()
        if not [r for r in routes if r.strip() and not r.startswith("default")]:
            return net


def _conflist(subnet, ipam_dir, ours=True, version="1.0.0"):
    plugins = [{"type": "ptp", "mtu": 1450,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": ipam_dir},
                "capabilities": {"ips": True}}]
    if ours:
        plugins.append({"type": cni.PLUGIN_NAME, "capabilities": {cni.POD_ANNOTATIONS: True}})
    return {"cniVersion": version, "name": cni.NETWORK, "plugins": plugins}


def _pod_args(name):
    return {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": name, "K8S_POD_UID": str(uuid.uuid4()),
            "K8S_POD_INFRA_CONTAINER_ID": "x"}


def _caps(labels=None, ports=None, raw_labels=None):
    ann = {"unrelated/annotation": "1"}
    if labels is not None or raw_labels is not None:
        ann[cni.LABELS_ANNOTATION] = raw_labels if raw_labels is not None else json.dumps(labels)
    if ports is not None:
        ann[cni.PORTS_ANNOTATION] = json.dumps(ports)
    return {cni.POD_ANNOTATIONS: ann}


def _leases(ipam_dir):
    d = os.path.join(ipam_dir, cni.NETWORK)
    if not os.path.isdir(d):
        return []
    return sorted(f for f in os.listdir(d) if not f.startswith("last_reserved_ip") and f != "lock")


# ------------------------------------------------------------------------------------------------
# The whole chain on real namespaces
# ------------------------------------------------------------------------------------------------

@needs_root
def test_add_check_del_real_pod(cni_bin, env_dirs, netns_factory, host_links):
    ns, netns = netns_factory()
    subnet = _subnet()
    conf = _conflist(subnet, env_dirs["ipam"])
    cid = uuid.uuid4().hex
    labels = {"app": "web", "tier": "front"}
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    try:
        lo = cni.invoke_loopback(cid, netns, cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        assert lo["interfaces"][0]["name"] == "lo"
        res = cni.invoke(conf, "ADD", cid, netns, "eth0", args=_pod_args("web-1"),
                         capability_args=_caps(labels, ports), cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        addr = res["ips"][0]["address"]
        ip = addr.split("/")[0]
        base = subnet.rsplit(".", 1)[0] + "."
        assert ip.startswith(base) and addr.endswith("/24")
        assert "%s" % addr in _ip("-n", ns, "-4", "addr", "show", "dev", "eth0").stdout
        assert _ip("-n", ns, "route", "show", "default").stdout.startswith("default via %s1" % base)
        assert "127.0.0.1" in _ip("-n", ns, "addr", "show", "dev", "lo").stdout

        # A packet arrives: a TCP connection from the host to a listener in the pod, which sees the
        # host's side of the ptp link (the gateway address) as the peer.
        srv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                "s.bind(('0.0.0.0', 8080)); s.listen(1); print('up', flush=True)\n"
                                "c, a = s.accept(); c.sendall(b'pod:' + a[0].encode()); c.close()"],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout.readline().strip() == "up"
            with socket.create_connection((ip, 8080), timeout=3) as c:
                assert c.recv(100).decode() == "pod:%s1" % base
        finally:
            srv.kill()
            srv.wait()

        # The endpoint record.
        rec_path = cni.record_path(env_dirs["endpoints"], cid, "eth0")
        assert oct(os.stat(rec_path).st_mode & 0o777) == "0o644"
        rec = json.load(open(rec_path))
        host_if = [i for i in res["interfaces"] if not i.get("sandbox")][0]["name"]
        assert rec["host_interface"] == host_if and os.path.exists("/sys/class/net/" + host_if)
        assert (rec["namespace"], rec["name"], rec["labels"], rec["ports"], rec["ips"], rec["netns"], rec["state"]) == \
            ("shop", "web-1", labels, ports, [addr], netns, "ready")
        assert rec["mac"] == [i for i in res["interfaces"] if i.get("sandbox")][0]["mac"]
        rows = cni.list_endpoints(env_dirs["endpoints"])
        assert [r["container_id"] for r in rows] == [cid]
        table = cni.format_endpoints(rows)
        assert table.splitlines()[0].split() == ["ENDPOINT", "NAMESPACE/NAME", "LABELS", "IPv4", "INTERFACE", "STATE"]
        assert table.splitlines()[1].split() == [cid[:12], "shop/web-1", "app=web,tier=front", ip, host_if, "ready"]
        cache = cni.cache_path(env_dirs["cache"], cni.NETWORK, cid, "eth0")
        assert json.load(open(cache))["result"]["ips"][0]["address"] == addr
        assert _leases(env_dirs["ipam"]) == [ip]

        cni.invoke(conf, "CHECK", cid, netns, "eth0", args=_pod_args("web-1"), capability_args=_caps(labels, ports),
                   cni_path=[cni_bin], cache_dir=env_dirs["cache"])

        # CHECK notices a lost record.
        saved = open(rec_path).read()
        os.unlink(rec_path)
        with pytest.raises(cni.CNIError) as ei:
            cni.invoke(conf, "CHECK", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        assert ei.value.code == cni.E_ENDPOINT_MISMATCH and "no endpoint record" in str(ei.value)
        open(rec_path, "w").write(saved)

        cni.invoke(conf, "DEL", cid, netns, "eth0", args=_pod_args("web-1"), cni_path=[cni_bin],
                   cache_dir=env_dirs["cache"])
        assert not os.path.exists("/sys/class/net/" + host_if)
        assert _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0
        assert _leases(env_dirs["ipam"]) == []
        assert not os.path.exists(cache) and not os.path.exists(rec_path)
        assert cni.list_endpoints(env_dirs["endpoints"]) == []
        # DEL again: the container is unknown now, which is not an error; also without a netns.
        cni.invoke(conf, "DEL", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        cni.invoke(conf, "DEL", cid, "", "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        cni.invoke_loopback(cid, netns, "DEL", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        assert os.listdir(env_dirs["cache"]) == []
    finally:
        try:
            cni.invoke(conf, "DEL", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        except cni.CNIError:
            pass


@needs_root
def test_failed_add_of_second_plugin_rolls_back(cni_bin, env_dirs, netns_factory, host_links):
    ns, netns = netns_factory()
    conf = _conflist(_subnet(), env_dirs["ipam"])
    cid = uuid.uuid4().hex
    with pytest.raises(cni.CNIError) as ei:
        cni.invoke(conf, "ADD", cid, netns, "eth0", args=_pod_args("bad"),
                   capability_args=_caps(raw_labels="{not json"), cni_path=[cni_bin], cache_dir=env_dirs["cache"])
    e = ei.value
    assert e.code == cni.E_INVALID_CONFIG and cni.LABELS_ANNOTATION in e.msg and "netstack-cni" in e.msg
    assert "CNI error 7" in str(e)
    assert _leases(env_dirs["ipam"]) == []
    assert _links() == host_links
    assert _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0
    assert not os.path.exists(cni.cache_path(env_dirs["cache"], cni.NETWORK, cid, "eth0"))
    assert cni.list_endpoints(env_dirs["endpoints"]) == []

    # An invalid label key (Kubernetes rules) is refused the same way, naming the key.
    with pytest.raises(cni.CNIError) as ei:
        cni.invoke(conf, "ADD", cid, netns, "eth0", capability_args=_caps({"-bad": "x"}), cni_path=[cni_bin],
                   cache_dir=env_dirs["cache"])
    assert ei.value.code == cni.E_INVALID_CONFIG and "-bad" in ei.value.msg
    with pytest.raises(cni.CNIError) as ei:
        cni.invoke(conf, "ADD", cid, netns, "eth0", capability_args=_caps({}, [{"port": 70000}]), cni_path=[cni_bin],
                   cache_dir=env_dirs["cache"])
    assert ei.value.code == cni.E_INVALID_CONFIG and "port" in ei.value.msg
    assert _leases(env_dirs["ipam"]) == [] and _links() == host_links


@needs_root
def test_exhausted_range_leaves_nothing(cni_bin, env_dirs, netns_factory, host_links):
    """A /30 has one address for pods (the other is the gateway): the second pod fails in IPAM."""
    (ns1, netns1), (ns2, netns2) = netns_factory(), netns_factory()
    conf = _conflist(_subnet(30), env_dirs["ipam"])
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        cni.invoke(conf, "ADD", a, netns1, "eth0", args=_pod_args("a"), cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        links_a = _links()
        with pytest.raises(cni.CNIError) as ei:
            cni.invoke(conf, "ADD", b, netns2, "eth0", args=_pod_args("b"), cni_path=[cni_bin],
                       cache_dir=env_dirs["cache"])
        assert "ptp" in ei.value.msg and "no IP addresses available" in (ei.value.msg + ei.value.details)
        assert len(_leases(env_dirs["ipam"])) == 1
        assert _links() == links_a
        assert not os.path.exists(cni.cache_path(env_dirs["cache"], cni.NETWORK, b, "eth0"))
        assert [r["name"] for r in cni.list_endpoints(env_dirs["endpoints"])] == ["a"]
    finally:
        cni.invoke(conf, "DEL", a, netns1, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
    assert _leases(env_dirs["ipam"]) == [] and _links() == host_links


@needs_root
def test_unknown_plugin_and_check_without_add(cni_bin, env_dirs, netns_factory):
    _ns, netns = netns_factory()
    conf = {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "nope"}]}
    with pytest.raises(cni.CNIError) as ei:
        cni.invoke(conf, "ADD", "c1", netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
    assert "failed to find plugin 'nope'" in str(ei.value)
    with pytest.raises(cni.CNIError) as ei:
        cni.invoke(_conflist("10.251.0.0/24", env_dirs["ipam"]), "CHECK", "c1", netns, "eth0", cni_path=[cni_bin],
                   cache_dir=env_dirs["cache"])
    assert ei.value.code == cni.E_UNKNOWN_CONTAINER


# ------------------------------------------------------------------------------------------------
# The conflist
# ------------------------------------------------------------------------------------------------

def test_load_conflist(tmp_path):
    p = tmp_path / "05-kldload-netstack.conflist"
    p.write_text(json.dumps(_conflist("10.244.11.0/24", "/var/lib/cni/networks")))
    assert cni.load_conflist(str(p))["plugins"][1]["type"] == cni.PLUGIN_NAME
    for doc, field in (({"cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]}, ".name"),
                       ({"name": "n", "plugins": [{"type": "ptp"}]}, ".cniVersion"),
                       ({"name": "n", "cniVersion": "1.0.0", "plugins": []}, ".plugins"),
                       ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../x"}]}, ".plugins[0].type"),
                       ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "a", "capabilities": 1}]},
                        ".plugins[0].capabilities")):
        p.write_text(json.dumps(doc))
        with pytest.raises(cni.CNIError) as ei:
            cni.load_conflist(str(p))
        assert ei.value.code == cni.E_INVALID_CONFIG and (str(p) + field) in ei.value.msg
    p.write_text("{")
    with pytest.raises(cni.CNIError) as ei:
        cni.load_conflist(str(p))
    assert ei.value.code == cni.E_DECODE
    with pytest.raises(cni.CNIError) as ei:
        cni.load_conflist(str(tmp_path / "missing"))
    assert ei.value.code == cni.E_IO


def test_runtime_config_from_capabilities():
    conf = _conflist("10.244.11.0/24", "/d")
    caps = dict(_caps({"a": "b"}), ips=["10.244.11.9/24"], portMappings=[])
    ptp = cni._plugin_config(conf, conf["plugins"][0], caps, {"cniVersion": "1.0.0"})
    ours = cni._plugin_config(conf, conf["plugins"][1], caps)
    assert ptp["runtimeConfig"] == {"ips": ["10.244.11.9/24"]} and ptp["prevResult"] == {"cniVersion": "1.0.0"}
    assert list(ours["runtimeConfig"]) == [cni.POD_ANNOTATIONS] and "prevResult" not in ours
    assert ours["name"] == cni.NETWORK and ours["cniVersion"] == "1.0.0"
    assert cni._cni_args({"A": "1", "B": "2"}) == "IgnoreUnknown=1;A=1;B=2"


# ------------------------------------------------------------------------------------------------
# netstack-cni on its own (the plugin protocol)
# ------------------------------------------------------------------------------------------------

PREV = {"cniVersion": "1.1.0",
        "interfaces": [{"name": "veth1234", "mac": "aa:aa:aa:aa:aa:01"},
                       {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/var/run/netns/p"}],
        "ips": [{"address": "10.244.11.5/24", "gateway": "10.244.11.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


def _run(tmp_path, command, conf, cid="c1", ifname="eth0", netns="/var/run/netns/p", extra_env=None):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": netns,
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
           cni.ENDPOINTS_DIR_ENV: str(tmp_path / "eps"), "NETSTACK_CONFIG": str(tmp_path / "dp.json")}
    env.update(extra_env or {})
    env = dict((k, v) for k, v in env.items() if v is not None)
    out = io.StringIO()
    rc = cni.plugin_main(env, io.StringIO(conf if isinstance(conf, str) else json.dumps(conf)), out)
    return rc, json.loads(out.getvalue()) if out.getvalue().strip() else None


def _conf(version="1.1.0", **kw):
    c = {"cniVersion": version, "name": cni.NETWORK, "type": cni.PLUGIN_NAME}
    c.update(kw)
    return c


def test_plugin_add_del_and_errors(tmp_path):
    rc, out = _run(tmp_path, "ADD", _conf(prevResult=PREV, runtimeConfig=_caps({"app": "db"}, [{"port": 5432}])))
    assert rc == 0 and out == PREV
    rec = cni.list_endpoints(str(tmp_path / "eps"))[0]
    assert (rec["ips"], rec["host_interface"], rec["mac"], rec["host_mac"], rec["labels"], rec["ports"]) == \
        (["10.244.11.5/24"], "veth1234", "aa:aa:aa:aa:aa:02", "aa:aa:aa:aa:aa:01", {"app": "db"},
         [{"name": "", "port": 5432, "protocol": "TCP"}])
    # The result carries the configuration's cniVersion.
    rc, out = _run(tmp_path, "ADD", _conf("1.0.0", prevResult=dict(PREV, cniVersion="1.0.0")))
    assert rc == 0 and out["cniVersion"] == "1.0.0"
    # CHECK: the host interface veth1234 does not exist here.
    rc, out = _run(tmp_path, "CHECK", _conf(prevResult=PREV))
    assert rc == 1 and out["code"] == cni.E_ENDPOINT_MISMATCH and "veth1234" in out["msg"]
    assert _run(tmp_path, "DEL", _conf(), netns=None) == (0, None)
    assert _run(tmp_path, "DEL", _conf(), netns=None) == (0, None)
    assert cni.list_endpoints(str(tmp_path / "eps")) == []

    cases = [
        ("ADD", _conf(), {}, cni.E_INVALID_CONFIG, "prevResult is required"),
        ("ADD", "{oops", {}, cni.E_DECODE, "not JSON"),
        ("ADD", _conf("0.3.1", prevResult=PREV), {}, cni.E_INCOMPATIBLE_VERSION, "incompatible"),
        ("ADD", _conf(prevResult=PREV), {"CNI_CONTAINERID": None}, cni.E_INVALID_ENV, "CNI_CONTAINERID"),
        ("ADD", _conf(prevResult=PREV), {"CNI_CONTAINERID": "../x"}, cni.E_INVALID_ENV, "CNI_CONTAINERID"),
        ("ADD", _conf(prevResult=PREV), {"CNI_ARGS": "novalue"}, cni.E_INVALID_ENV, "CNI_ARGS"),
        ("ADD", _conf(prevResult=dict(PREV, ips=[])), {}, cni.E_INVALID_CONFIG, "no IP address"),
        ("ADD", _conf(prevResult=PREV, runtimeConfig=_caps(ports=[{"port": 80, "protocol": "SCTP"}])), {},
         cni.E_INVALID_CONFIG, "protocol"),
        ("ADD", _conf(prevResult=PREV, runtimeConfig=_caps(ports=[{"name": "HTTP", "port": 80}])), {},
         cni.E_INVALID_CONFIG, "name"),
        ("ADD", _conf(prevResult=PREV, runtimeConfig=_caps(ports={"port": 80})), {}, cni.E_INVALID_CONFIG, "list"),
        ("ADD", _conf(prevResult=PREV, runtimeConfig=_caps(raw_labels='["a"]')), {}, cni.E_INVALID_CONFIG, "mapping"),
        ("FROB", _conf(), {}, cni.E_INVALID_ENV, "FROB"),
        ("ADD", _conf(), {"CNI_COMMAND": None}, cni.E_INVALID_ENV, "CNI_COMMAND"),
    ]
    for command, conf, env, code, text in cases:
        rc, out = _run(tmp_path, command, conf, extra_env=env)
        assert rc == 1 and out["code"] == code and text in out["msg"] + out.get("details", ""), (command, conf, env, out)
        assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert cni.list_endpoints(str(tmp_path / "eps")) == []


def test_plugin_gc_status_version(tmp_path):
    for cid in ("keep", "gone"):
        assert _run(tmp_path, "ADD", _conf(prevResult=PREV), cid=cid)[0] == 0
    (tmp_path / "eps" / "other-eth0.json").write_text(json.dumps(
        {"container_id": "other", "ifname": "eth0", "network": "another-network"}))
    rc, out = _run(tmp_path, "GC", _conf(**{cni.VALID_ATTACHMENTS: [{"containerID": "keep", "ifname": "eth0"}]}),
                   cid=None, ifname=None, netns=None)
    assert rc == 0 and out is None
    assert sorted(r["container_id"] for r in cni.list_endpoints(str(tmp_path / "eps"))) == ["keep", "other"]
    assert _run(tmp_path, "STATUS", _conf(), cid=None, ifname=None, netns=None) == (0, None)
    (tmp_path / "dp.json").write_text("{broken")
    rc, out = _run(tmp_path, "STATUS", _conf(), cid=None, ifname=None, netns=None)
    assert rc == 1 and out["code"] == cni.E_NOT_AVAILABLE
    rc, out = _run(tmp_path, "VERSION", {"cniVersion": "1.0.0"}, cid=None, ifname=None, netns=None)
    assert rc == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    # A broken record is listed as invalid, not hidden.
    (tmp_path / "eps" / "zz-eth1.json").write_text("{")
    assert [(r["container_id"], r.get("state")) for r in cni.list_endpoints(str(tmp_path / "eps"))
            if r.get("state") == "invalid"] == [("zz", "invalid")]


def test_version_through_the_node_command_dispatch(cni_bin, tmp_path):
    """The shim named netstack-cni runs node/netstack_cli.main(): argv[0] picks the plugin."""
    p = subprocess.run([os.path.join(cni_bin, cni.PLUGIN_NAME)], input='{"cniVersion":"1.1.0"}', env=dict(
        os.environ, CNI_COMMAND="VERSION"), capture_output=True, text=True, check=False)
    assert p.returncode == 0 and json.loads(p.stdout)["supportedVersions"] == cni.SUPPORTED_VERSIONS


def test_built_bundle_answers_as_netstack_cni(tmp_path):
    """The path nodes use: /usr/lib/cni/netstack-cni -> netstack.pyz (make node)."""
    pyz = REPO / "build" / "node" / "netstack.pyz"
    if not pyz.exists():
        pytest.skip("build/node/netstack.pyz not built (make node)")
    link = tmp_path / cni.PLUGIN_NAME
    link.symlink_to(pyz)
    p = subprocess.run([str(link)], input='{"cniVersion":"1.1.0"}', env=dict(os.environ, CNI_COMMAND="VERSION"),
                       capture_output=True, text=True, check=False)
    if p.returncode != 0 and "netstack-cni" not in p.stdout + p.stderr and "usage" in p.stderr:
        pytest.skip("build/node/netstack.pyz predates the netstack-cni dispatch (run make node)")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout) == {"cniVersion": "1.1.0", "supportedVersions": cni.SUPPORTED_VERSIONS}


def test_endpoint_list_command(tmp_path):
    _run(tmp_path, "ADD", _conf(prevResult=PREV, runtimeConfig=_caps({"app": "db"})))
    env = dict(os.environ, NETSTACK_ENDPOINTS_DIR=str(tmp_path / "eps"),
               PYTHONPATH=str(REPO / ".collections"))
    row = ["c1", "ns/p", "app=db", "10.244.11.5", "veth1234", "ready"]
    for args, check in ((["--json"], lambda out: json.loads(out)[0]["labels"] == {"app": "db"}),
                        ([], lambda out: out.splitlines()[1].split() == row)):
        p = subprocess.run([sys.executable, str(REPO / "node" / "netstack_cli.py"), "endpoint", "list"] + args,
                           env=env, capture_output=True, text=True, check=False)
        assert p.returncode == 0 and check(p.stdout), p.stdout + p.stderr


def _endpoint_info(args):
    """The endpoint_info module run by ``ansible`` in check mode: (rc, result)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_NOCOLOR="1")
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible"), "localhost", "-i", "localhost,",
                        "-c", "local", "--check", "-e", "ansible_python_interpreter=%s" % sys.executable,
                        "-m", "kldload.netstack.endpoint_info", "-a", args],
                       env=env, capture_output=True, text=True, check=False, cwd=str(REPO))
    assert "=>" in p.stdout, p.stdout + p.stderr
    return p.returncode, json.loads(p.stdout.split("=>", 1)[1])


def test_endpoint_info_module(tmp_path):
    """The module returns the records the plugin wrote; a missing directory is no endpoints; check mode."""
    _run(tmp_path, "ADD", _conf(prevResult=PREV, runtimeConfig=_caps({"app": "db"}, [{"name": "pg", "port": 5432}])))
    out = {}
    for d in ("eps", "missing"):
        rc, res = _endpoint_info("endpoints_dir=%s" % (tmp_path / d))
        assert rc == 0 and res["changed"] is False, res
        out[d] = res["endpoints"]
    assert out["missing"] == []
    [ep] = out["eps"]
    assert (ep["namespace"], ep["name"], ep["labels"], ep["ports"], ep["ips"]) == \
        ("ns", "p", {"app": "db"}, [{"name": "pg", "port": 5432, "protocol": "TCP"}], ["10.244.11.5/24"])


def test_endpoint_info_bundle_and_lbipam_state(tmp_path):
    """What else the dataplane gathers from every node in the same visit: the objects of the node's release (none
    without a readable bundle), the last LB-IPAM assignment (none without the file); a file that is not a JSON
    mapping fails naming it."""
    import zipfile
    bundle = tmp_path / "netstack.pyz"
    with zipfile.ZipFile(str(bundle), "w") as z:
        for n in ("__main__.py", "netstack_objects/policy.o", "netstack_objects/policy.manifest.json",
                  "netstack_objects/sock_lb.o"):
            z.writestr(n, "x")
    (tmp_path / "junk.pyz").write_text("not a zip")
    state = {"assignments": {"default/web": ["192.0.2.10"]}, "node_ports": {}}
    (tmp_path / "lbipam.json").write_text(json.dumps(state))
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "list.json").write_text("[1, 2]")
    eps = "endpoints_dir=%s" % (tmp_path / "eps")
    rc, res = _endpoint_info("%s bundle=%s lbipam_state=%s" % (eps, bundle, tmp_path / "lbipam.json"))
    assert rc == 0 and (res["bundle_objects"], res["lbipam_state"]) == (["policy", "sock_lb"], state), res
    rc, res = _endpoint_info("%s bundle=%s lbipam_state=%s" % (eps, tmp_path / "junk.pyz", tmp_path / "none.json"))
    assert rc == 0 and (res["bundle_objects"], res["lbipam_state"]) == (None, None), res
    rc, res = _endpoint_info("%s bundle=%s" % (eps, tmp_path / "none.pyz"))
    assert rc == 0 and res["bundle_objects"] is None and "lbipam_state" not in res, res
    for name, why in (("bad.json", "not JSON"), ("list.json", "not a JSON mapping")):
        rc, res = _endpoint_info("%s lbipam_state=%s" % (eps, tmp_path / name))
        assert rc != 0 and res["msg"].startswith("lbipam_state %s: %s" % (tmp_path / name, why)), res


EP_COUNT = REPO / "bpf" / "build" / "tests" / "ep_count.o"


@needs_root
@pytest.mark.skipif(not EP_COUNT.exists(), reason="bpf/build/tests/ep_count.o not built (make -C bpf)")
def test_endpoint_programs_attached_on_add_detached_on_del(cni_bin, env_dirs, netns_factory, host_links, tmp_path):
    """An object whose manifest has endpoint programs (the selftest's ep_count): ADD attaches them to
    the pod's host veth (tcx), they see the pod's packets, DEL detaches them; a failed ADD leaves none."""
    import struct
    import zipfile
    from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, loader

    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    try:
        root = str(fs / "kldload-netstack")
        res = loader.ensure(root, [loader.object_spec("ep_count", str(EP_COUNT), targets={})])
        assert res["changed"] and not os.listdir(os.path.join(root, "ep_count", "links") if os.path.isdir(
            os.path.join(root, "ep_count", "links")) else str(tmp_path))    # nothing attached node-wide
        bundle = tmp_path / "netstack.pyz"
        with zipfile.ZipFile(str(bundle), "w") as z:
            z.write(str(EP_COUNT).replace(".o", ".manifest.json"), "netstack_objects/ep_count.manifest.json")
        cfg = tmp_path / "dataplane.json"
        cfg.write_text(json.dumps({"pin_path": root, "bundle": str(bundle), "objects": [{"name": "ep_count"}]}))
        os.environ["NETSTACK_CONFIG"] = str(cfg)     # monkeypatched by env_dirs: restored afterwards

        def counts():
            with bpfsys.obj_get(os.path.join(root, "ep_count", "maps", "kln_ep_count")) as fd:
                return [struct.unpack("<Q", bpfsys.map_lookup(fd, struct.pack("<I", i), 8))[0] for i in (0, 1)]

        ns, netns = netns_factory()
        conf = _conflist(_subnet(), env_dirs["ipam"])
        cid = uuid.uuid4().hex
        try:
            out = cni.invoke(conf, "ADD", cid, netns, "eth0", args=_pod_args("counted"), cni_path=[cni_bin],
                             cache_dir=env_dirs["cache"])
            ip = out["ips"][0]["address"].split("/")[0]
            host_if = [i for i in out["interfaces"] if not i.get("sandbox")][0]["name"]
            rec = cni.list_endpoints(env_dirs["endpoints"])[0]
            assert sorted((p["program"], p["attach"]) for p in rec["programs"]) == [
                ("kln_ep_from_pod", "tcx_ingress"), ("kln_ep_to_pod", "tcx_egress")]
            ifindex = socket.if_nametoindex(host_if)
            for at, prog in (("tcx_ingress", "kln_ep_from_pod"), ("tcx_egress", "kln_ep_to_pod")):
                [pid] = bpfsys.prog_query(ifindex, at)
                with bpfsys.prog_fd_by_id(pid) as pfd:
                    assert bpfsys.prog_info(pfd)["name"] == prog[:15]
            before = counts()
            srv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                    "import socket\ns=socket.socket(); s.bind(('0.0.0.0', 8081)); s.listen(1)\n"
                                    "print('up', flush=True); c, a = s.accept(); c.sendall(b'x' * 1000); c.close()"],
                                   stdout=subprocess.PIPE, text=True)
            try:
                assert srv.stdout.readline().strip() == "up"
                with socket.create_connection((ip, 8081), timeout=3) as c:
                    assert c.recv(1000)
            finally:
                srv.kill()
                srv.wait()
            after = counts()
            assert after[0] > before[0] and after[1] > before[1], (before, after)

            cni.invoke(conf, "DEL", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
            assert os.listdir(os.path.join(root, "ep_count", cni.ENDPOINT_LINKS)) == []
            # A failed ADD (bad annotation after the attach would have run) leaves no link either.
            with pytest.raises(cni.CNIError):
                cni.invoke(conf, "ADD", cid, netns, "eth0", capability_args=_caps(raw_labels="{"), cni_path=[cni_bin],
                           cache_dir=env_dirs["cache"])
            assert os.listdir(os.path.join(root, "ep_count", cni.ENDPOINT_LINKS)) == []
            # The loader keeps endpoint links when it applies the node's objects again.
            cni.invoke(conf, "ADD", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
            loader.ensure(root, [loader.object_spec("ep_count", str(EP_COUNT), targets={})])
            assert len(os.listdir(os.path.join(root, "ep_count", cni.ENDPOINT_LINKS))) == 2
        finally:
            try:
                cni.invoke(conf, "DEL", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
            except cni.CNIError:
                pass
    finally:
        subprocess.run(["umount", str(fs)], check=False)


@needs_root
@pytest.mark.skipif(not EP_COUNT.exists(), reason="bpf/build/tests/ep_count.o not built (make -C bpf)")
def test_apply_attaches_endpoint_programs_to_pods_made_before(cni_bin, env_dirs, netns_factory, host_links, tmp_path):
    """A pod made while no object had endpoint programs gets them from reconcile_endpoints (what a
    dataplane apply runs): check mode says so and attaches nothing, the apply attaches them and the
    record says so, again is no change; a lost link comes back; a reloaded object's links are moved to
    its new program; an object taken away takes its links."""
    import zipfile
    from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, loader

    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    root = str(fs / "kldload-netstack")
    bundle = tmp_path / "netstack.pyz"
    with zipfile.ZipFile(str(bundle), "w") as z:
        z.write(str(EP_COUNT).replace(".o", ".manifest.json"), "netstack_objects/ep_count.manifest.json")
    cfg_path = tmp_path / "dataplane.json"
    none = {"pin_path": root, "bundle": str(bundle), "objects": []}
    cfg = dict(none, objects=[{"name": "ep_count"}])
    cfg_path.write_text(json.dumps(none))
    os.environ["NETSTACK_CONFIG"] = str(cfg_path)     # monkeypatched by env_dirs: restored afterwards
    ns, netns = netns_factory()
    conf = _conflist(_subnet(), env_dirs["ipam"])
    cid = uuid.uuid4().hex
    try:
        out = cni.invoke(conf, "ADD", cid, netns, "eth0", args=_pod_args("early"), cni_path=[cni_bin],
                         cache_dir=env_dirs["cache"])
        ifindex = socket.if_nametoindex([i for i in out["interfaces"] if not i.get("sandbox")][0]["name"])

        def attached():
            out = {}
            for at in ("tcx_ingress", "tcx_egress"):
                for pid in bpfsys.prog_query(ifindex, at):
                    with bpfsys.prog_fd_by_id(pid) as pfd:
                        out[at] = pid
            return out

        assert cni.list_endpoints(env_dirs["endpoints"])[0]["programs"] == [] and attached() == {}
        loader.ensure(root, [loader.object_spec("ep_count", str(EP_COUNT), targets={})])
        ep = "early"
        want = ["endpoint shop/%s: attach ep_count/kln_ep_from_pod (tcx_ingress)" % ep,
                "endpoint shop/%s: attach ep_count/kln_ep_to_pod (tcx_egress)" % ep]
        assert cni.reconcile_endpoints(cfg, env_dirs["endpoints"], check=True) == want
        assert attached() == {}
        assert cni.reconcile_endpoints(cfg, env_dirs["endpoints"]) == want
        first = attached()
        assert sorted(first) == ["tcx_egress", "tcx_ingress"]
        rec = cni.list_endpoints(env_dirs["endpoints"])[0]
        assert sorted(p["program"] for p in rec["programs"]) == ["kln_ep_from_pod", "kln_ep_to_pod"]
        assert cni.reconcile_endpoints(cfg, env_dirs["endpoints"]) == []
        # a lost link is made again
        loader.unpin_link([p["pin"] for p in rec["programs"] if p["program"] == "kln_ep_to_pod"][0])
        assert cni.reconcile_endpoints(cfg, env_dirs["endpoints"]) == [want[1]]
        # the object reloaded (another map size: a new version): the links move to its programs
        loader.ensure(root, [loader.object_spec("ep_count", str(EP_COUNT), targets={}, map_sizes={"kln_ep_count": 4})])
        assert cni.reconcile_endpoints(cfg, env_dirs["endpoints"]) == want
        moved = attached()
        assert sorted(moved) == sorted(first) and all(moved[k] != first[k] for k in moved)
        # the object goes: so do its links (with its pin directory), and the record says none
        loader.ensure(root, [], prune=True)
        assert attached() == {}
        assert cni.reconcile_endpoints(none, env_dirs["endpoints"]) == []
        assert cni.list_endpoints(env_dirs["endpoints"])[0]["programs"] == []
    finally:
        try:
            cni.invoke(conf, "DEL", cid, netns, "eth0", cni_path=[cni_bin], cache_dir=env_dirs["cache"])
        except cni.CNIError:
            pass
        subprocess.run(["umount", str(fs)], check=False)
