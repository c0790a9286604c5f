"""The node configuration, manifests, owned routes and the node bundle: validation and planning
without a kernel (the loader and the apply path on real bpffs are in test_loader.py and on the lab)."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import hostroute, manifest as mf, podnet, routes, runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCK_LB_MANIFEST = os.path.join(REPO, "bpf", "sock_lb.manifest.json")


# ---- node configuration -------------------------------------------------------------------------

def test_default_configuration_is_valid_and_canonical():
    cfg = runtime.validate({})
    assert cfg == runtime.default_config()
    assert cfg["objects"] == [{"name": "sock_lb", "targets": {"cgroup": None, "families": [4, 6], "devices": []}}]
    assert runtime.validate(json.loads(runtime.config_text(cfg))) == cfg       # the file reads back the same


@pytest.mark.parametrize("cfg, message", [
    ({"objects": [{"name": "sock_lb"}, {"name": "sock_lb"}]}, "config.objects[1].name: object sock_lb is listed twice"),
    ({"objects": [{"name": "globals"}]}, "config.objects[0].name: a plain object name, got 'globals'"),
    ({"objects": [{"name": "a.b"}]}, "config.objects[0].name: a plain object name"),
    ({"objects": [{"name": "x", "targets": {"families": [5]}}]}, "config.objects[0].targets.families: a list of 4 and/or 6"),
    ({"objects": [{"name": "x", "targets": {"cgroup": "relative"}}]}, "config.objects[0].targets.cgroup: an absolute path"),
    ({"objects": [{"name": "x", "colour": "red"}]}, "config.objects[0]: unknown field(s) colour"),
    ({"maps": {"kln_lb4_svc": 0}}, "config.maps: must map map names to positive sizes"),
    ({"lb": {"maglev_table_size": 1000}}, "config.lb.maglev_table_size: must be a prime >= 7, got 1000"),
    ({"lb": {"state_file": "x.json"}}, "config.lb.state_file: must be an absolute path"),
    ({"pin_path": "/sys/fs/bpf/a.b"}, "config.pin_path: /sys/fs/bpf/a.b contains a '.'"),
    ({"routes": [{"dst": "10.244.1.0/24", "via": "fd00::1"}]}, "config.routes[0].via: fd00::1 is not of the family"),
    ({"schema": 2}, "config.schema: 2 is not a schema this release reads"),
    ({"agent": {"listen": "0.0.0.0:4245"}}, "config.agent.listen: 0.0.0.0 would listen on every address of the node"),
    ({"agent": {"listen": "10.77.0.11:4245", "ring": 5}}, "config.agent: unknown field(s) ring"),
])
def test_configuration_errors_name_the_field(cfg, message):
    with pytest.raises(runtime.ConfigError) as e:
        runtime.validate(cfg)
    assert message in str(e.value)


def _bundle(tmp_path):
    path = str(tmp_path / "netstack.pyz")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(runtime.BUNDLE_OBJECTS + "sock_lb.o", b"not really an object")
        z.writestr(runtime.BUNDLE_OBJECTS + "sock_lb.manifest.json", open(SOCK_LB_MANIFEST).read())
    return path


def test_map_sizes_must_belong_to_an_object(tmp_path):
    cfg = runtime.validate({"bundle": _bundle(tmp_path), "maps": {"kln_lb4_svc": 1024, "kln_lb_nope": 5}})
    with runtime.unpacked(cfg) as paths:
        with pytest.raises(runtime.ConfigError, match=r"config.maps: kln_lb_nope not a map of any object \(sock_lb\)"):
            runtime._objects(cfg, paths)   # pylint: disable=protected-access
    cfg = runtime.validate({"bundle": cfg["bundle"], "maps": {"kln_lb4_svc": 1024, "kln_lb4_revnat": 8}})
    with runtime.unpacked(cfg) as paths:
        spec = runtime._objects(cfg, paths)[0]   # pylint: disable=protected-access
        assert spec["sizes"] == {"kln_lb4_svc": 1024, "kln_lb4_revnat": 8}
        assert open(paths["sock_lb"], "rb").read() == b"not really an object"
    assert not os.path.exists(paths["sock_lb"])              # unpacked for the run only


def test_an_object_the_bundle_does_not_have(tmp_path):
    cfg = runtime.validate({"bundle": _bundle(tmp_path), "objects": [{"name": "sock_lb"}, {"name": "flows"}]})
    with pytest.raises(runtime.ConfigError, match=r"config.objects\[1\].name: flows is not in the bundle .* \(it has sock_lb\)"):
        with runtime.unpacked(cfg):
            pass


def test_restore_unit_runs_the_bundle_with_the_configuration():
    cfg = runtime.default_config()
    text = runtime.restore_unit_text(cfg, runtime.CONFIG_PATH)
    assert "ExecStart=/usr/bin/python3 /usr/lib/kldload-netstack/netstack.pyz dataplane restore" in text
    assert "NETSTACK_CONFIG" not in text and "WantedBy=multi-user.target" in text
    assert "Environment=NETSTACK_CONFIG=/run/x.json\n" in runtime.restore_unit_text(cfg, "/run/x.json")


def test_read_config_errors(tmp_path):
    with pytest.raises(runtime.ConfigError, match="is the dataplane role applied"):
        runtime.read_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(runtime.ConfigError, match="not JSON"):
        runtime.read_config(str(tmp_path / "bad.json"))
    (tmp_path / "odd.json").write_text('{"objects": 3}')
    with pytest.raises(runtime.ConfigError, match=r"odd.json: config.objects: must be a list"):
        runtime.read_config(str(tmp_path / "odd.json"))


# ---- manifests ----------------------------------------------------------------------------------

def test_the_socket_lb_manifest():
    m = mf.load(SOCK_LB_MANIFEST)
    assert m["object"] == "sock_lb"
    assert sorted(p for p, v in m["programs"].items() if v["family"] == 4) == [
        "kln_connect4", "kln_getpeer4", "kln_recvmsg4", "kln_sendmsg4"]
    assert all(v["target"] == "cgroup" for v in m["programs"].values())
    assert sorted(n for n, v in m["maps"].items() if not v["shared"]) == ["kln_lb4_revnat", "kln_lb6_revnat"]
    assert mf.map_pin("/p", "sock_lb", "kln_lb4_svc", m["maps"]["kln_lb4_svc"]) == "/p/globals/kln_lb4_svc_v1"
    assert mf.map_pin("/p", "sock_lb", "kln_lb4_revnat", m["maps"]["kln_lb4_revnat"]) == "/p/sock_lb/maps/kln_lb4_revnat"
    assert m["maps"]["kln_lb_maglev"]["max_entries"] == 64 * 2 * 16381


def _m(**maps):
    return {"object": "x", "programs": {"p": {"attach": "cgroup_inet4_connect"}}, "maps": maps}


@pytest.mark.parametrize("doc, message", [
    ({"object": "x", "maps": {}, "extra": 1}, "manifest: unknown field(s) extra"),
    ({"maps": {}}, "manifest.object: required"),
    ({"object": "x", "programs": {"p": {"attach": "cgroup_inet4_connect", "target": "moon"}}},
     "manifest.programs.p.target: must be one of cgroup, device, endpoint"),
    ({"object": "x", "programs": {"p": {"attach": "xdp", "target": "cgroup"}}}, "manifest.programs.p.target: xdp is not a cgroup"),
    ({"object": "x", "programs": {"p": {"attach": "cgroup_inet4_connect", "family": 5}}}, "manifest.programs.p.family: must be 4 or 6"),
    (_m(m={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 0}), "manifest.maps.m.max_entries: must be an integer 1.."),
    (_m(m={"type": "tree", "key_size": 4, "value_size": 4, "max_entries": 1}), "manifest.maps.m.type: must be one of"),
    (_m(a_name_that_is_too_long={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 1}),
     "map names are 1-15 letters"),
    (_m(m={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 1, "shared": True, "version": 2,
           "migrations": {"2": "copy"}}), "manifest.maps.m.migrations.2: only older versions (1..1) migrate to version 2"),
    (_m(m={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 1, "shared": True, "version": 2,
           "migrations": {"1": "rewrite"}}), "manifest.maps.m.migrations.1: must be one of copy, extend"),
    (_m(m={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 1, "version": 2, "migrations": {"1": "copy"}}),
     "only shared maps carry layout versions"),
])
def test_manifest_errors_name_the_field(doc, message):
    with pytest.raises(mf.ManifestError) as e:
        mf.validate(doc, attach_types={"cgroup_inet4_connect": 10, "xdp": 37})
    assert message in str(e.value)


def test_check_object_lists_every_difference():
    m = mf.validate(_m(m={"type": "hash", "key_size": 4, "value_size": 4, "max_entries": 8}))
    probed = {"programs": {"p": {}, "q": {}},
              "maps": {"m": {"type": "hash", "key_size": 4, "value_size": 8, "max_entries": 8, "flags": 0},
                       "extra": {"type": "array", "key_size": 4, "value_size": 4, "max_entries": 1, "flags": 0}}}
    assert mf.check_object(m, probed) == [
        "x: program q is in the object but not in the manifest",
        "x: map extra is in the object but not in the manifest",
        "x: map m value_size is 8 in the object, 4 in the manifest"]


def test_pin_names():
    assert mf.pin_name("kln_lb4_svc", 3) == "kln_lb4_svc_v3"
    assert mf.parse_pin_name("kln_lb4_svc_v3") == ("kln_lb4_svc", 3)
    assert mf.parse_pin_name("kln_lb4_svc") == (None, None)


# ---- owned routes -------------------------------------------------------------------------------

def test_route_plan_adds_replaces_deletes_only_owned_routes():
    cur = {"10.244.11.0/24": ("192.168.1.21", routes.RTPROT_NETSTACK),       # ours, right
           "10.244.12.0/24": ("192.168.1.99", routes.RTPROT_NETSTACK),       # ours, wrong gateway
           "10.244.13.0/24": ("192.168.1.23", routes.RTPROT_NETSTACK),       # ours, no longer wanted
           "10.0.0.0/8": ("192.168.1.1", 4),                                  # someone else's
           "10.244.15.0/24": ("192.168.1.25", 3)}                             # ours, made by 0.1.0 (proto boot)
    want = routes.normalize([{"dst": "10.244.11.0/24", "via": "192.168.1.21"}, {"dst": "10.244.12.0/24", "via": "192.168.1.22"},
                             {"dst": "10.244.14.0/24", "via": "192.168.1.24"}, {"dst": "10.244.15.0/24", "via": "192.168.1.25"}])
    add, replace, delete = routes.plan(cur, want)
    assert add == [{"dst": "10.244.14.0/24", "via": "192.168.1.24"}]
    assert replace == [{"dst": "10.244.12.0/24", "via": "192.168.1.22", "was": "192.168.1.99"},
                       {"dst": "10.244.15.0/24", "via": "192.168.1.25", "was": "192.168.1.25 (proto 3, adopted)"}]
    assert delete == [{"dst": "10.244.13.0/24", "via": "192.168.1.23"}]
    with pytest.raises(routes.RouteError, match=r"10.0.0.0/8 is already routed \(via 192.168.1.1, proto 4\) by someone else"):
        routes.plan(cur, routes.normalize([{"dst": "10.0.0.0/8", "via": "192.168.1.2"}]))


@pytest.mark.parametrize("rs, message", [
    ([{"dst": "10.244.1.1/24", "via": "192.168.1.1"}], "routes[0].dst: '10.244.1.1/24' is not a network"),
    ([{"dst": "10.244.1.0/24", "via": "nowhere"}], "routes[0].via: 'nowhere' is not an address"),
    ([{"dst": "10.244.1.0/24"}], "routes[0].via"),
    ([{"dst": "10.244.1.0/24", "via": "192.168.1.1"}, {"dst": "10.244.1.0/24", "via": "192.168.1.2"}],
     "routes[1].dst: 10.244.1.0/24 is declared twice"),
    ("10.244.1.0/24", "routes: must be a list"),
])
def test_route_errors(rs, message):
    with pytest.raises(routes.RouteError) as e:
        routes.normalize(rs)
    assert message in str(e.value)


# ---- the node bundle ------------------------------------------------------------------------------

def test_node_bundle_is_one_zipapp_with_the_whole_library(tmp_path):
    pyz = os.path.join(REPO, "build", "node", "netstack.pyz")
    if not os.path.exists(pyz):
        pytest.skip("make node has not run")
    names = set(zipfile.ZipFile(pyz).namelist())
    assert {"netstack_objects/sock_lb.o", "netstack_objects/sock_lb.manifest.json"} <= names
    lib = os.path.join(REPO, "plugins", "module_utils")
    for d, _dirs, files in os.walk(lib):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), lib)
                assert "ansible_collections/kldload/netstack/plugins/module_utils/" + rel in names, rel
    out = subprocess.run([sys.executable, pyz, "version", "--json"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, NETSTACK_CONFIG=str(tmp_path / "none.json")))
    info = json.loads(out.stdout)
    with open(os.path.join(REPO, "galaxy.yml")) as f:
        assert "version: %s" % info["collection"] in f.read()
    assert set(info["built_objects"]) == {"sock_lb", "host", "lxc", "policy", "overlay", "nodeport"}
    assert all(len(sha) == 64 for sha in info["built_objects"].values())
    helped = subprocess.run([sys.executable, pyz, "--help"], capture_output=True, text=True, check=True).stdout
    assert "lb list" in helped and "dataplane restore" in helped
    assert "echo" not in helped.split("usage:")[1].split("\n")[0] and " probe" not in helped   # no test helpers


# ---- the pod network (pods) ----------------------------------------------------------------------

_PODS = {"cidr": "10.244.1.0/24", "underlay_interface": "eth0", "underlay_ip": "192.168.1.11",
         "nodes": [{"name": "node2", "underlay_ip": "192.168.1.12", "pod_cidr": "10.244.2.0/24"},
                   {"name": "node3", "underlay_ip": "192.168.1.13", "pod_cidr": "10.244.3.0/24"}]}


def _pods(**kw):
    p = json.loads(json.dumps(_PODS))
    p.update(kw)
    return {"pods": p}


def test_pods_section_is_off_when_absent_and_canonical_when_given():
    assert runtime.validate({})["pods"] is None
    p = runtime.validate(_pods())["pods"]
    assert p == {"cidr": "10.244.1.0/24", "routing_mode": "tunnel", "underlay_interface": "eth0",
                 "underlay_ip": "192.168.1.11", "mtu": 0,
                 "vxlan": {"device": "kln_vxlan", "vni": 1, "port": 8472, "external": False},
                 "nodes": [dict(n, tunnel_identity=True) for n in _PODS["nodes"]], "service_cidr": "10.96.0.0/12", "masquerade": True, "encryption": None,
                 "cni": {"conflist": "/etc/cni/net.d/05-kldload-netstack.conflist", "bin_dir": "/usr/lib/cni"}}
    cfg = runtime.validate(_pods())
    assert runtime.validate(json.loads(runtime.config_text(cfg))) == cfg       # the file reads back the same


def test_encryption_routes_into_the_wireguard_device_in_both_modes():
    for mode in ("tunnel", "native"):
        p = runtime.validate(_pods(routing_mode=mode, encryption={"device": "kln_wg0", "strict": True}))["pods"]
        assert podnet.wanted_routes(p) == [
            {"dst": "10.244.2.0/24", "via": "192.168.1.12", "dev": "kln_wg0", "onlink": True, "src": "192.168.1.11"},
            {"dst": "10.244.3.0/24", "via": "192.168.1.13", "dev": "kln_wg0", "onlink": True, "src": "192.168.1.11"}]
        assert not podnet.tunnelled(p) and podnet.pod_mtu(p, 1500) == 1440
        text = podnet.nft_text(p)
        assert 'ip saddr 10.244.1.0/24 ip daddr { 10.244.2.0/23 } fib daddr oifname != { "kln_wg0" } counter drop' in text
        assert "masquerade" in text and podnet.nft_wanted(p)["chains"] == [
            ["postrouting", "nat", "postrouting", "accept"], ["prerouting", "filter", "prerouting", "accept"]]
    p = runtime.validate(_pods(masquerade=False, encryption={"device": "kln_wg0"}))["pods"]
    assert podnet.nft_wanted(p) is None          # not strict, no masquerade: no table
    assert sorted(hostroute._cidr_text(k, v) for k, v in hostroute.cidr_entries(p).items()) == [
        "10.244.1.0/24 (local)", "10.244.2.0/24 (encrypted: through the stack)",
        "10.244.3.0/24 (encrypted: through the stack)"]


def test_node_to_node_encryption_routes_node_addresses_in_table_220_by_a_rule_and_standby_is_allowed():
    enc = {"device": "kln_wg0", "strict": True, "standby": "kln_wg0_r", "node_to_node": True, "fwmark": 0x1e00}
    p = runtime.validate(_pods(routing_mode="native", encryption=enc))["pods"]
    assert podnet.wanted_routes(p)[2:] == [
        {"dst": "192.168.1.12/32", "via": "192.168.1.12", "dev": "kln_wg0", "onlink": True, "src": "192.168.1.11", "table": 220},
        {"dst": "192.168.1.13/32", "via": "192.168.1.13", "dev": "kln_wg0", "onlink": True, "src": "192.168.1.11", "table": 220}]
    assert podnet.wanted_rules(p) == [{"priority": 30000, "table": 220, "fwmark": 0x1e00, "invert": True}]
    # the rotation's standby device passes strict mode too, and swapping the two leaves the table's text alone
    text = podnet.nft_text(p)
    assert 'fib daddr oifname != { "kln_wg0", "kln_wg0_r" } counter drop' in text
    swapped = runtime.validate(_pods(routing_mode="native", encryption=dict(enc, device="kln_wg0_r", standby="kln_wg0")))
    assert podnet.nft_text(swapped["pods"]) == text
    assert podnet.wanted_rules(dict(p, encryption=dict(p["encryption"], node_to_node=False))) == []
    # a route in table 220 is its own place: the same destination in the main table is another route
    cur = {"192.168.1.12/32 table 220": ("192.168.1.12", routes.RTPROT_NETSTACK, "kln_wg0", True, "192.168.1.11"),
           "192.168.1.99/32 table 220": ("192.168.1.99", 3, "kln_wg0", True, None)}
    add, replace, delete = routes.plan(cur, routes.normalize(podnet.wanted_routes(p)))
    assert [routes.key(r) for r in add] == ["10.244.2.0/24", "10.244.3.0/24", "192.168.1.13/32 table 220"]
    assert replace == [] and delete == [{"dst": "192.168.1.99/32", "via": "192.168.1.99", "table": 220}]   # the table is ours


@pytest.mark.parametrize("enc, message", [
    ({"device": "kln_wg0", "standby": "kln_wg0"}, "config.pods.encryption.standby: kln_wg0 is the device itself"),
    ({"device": "kln_wg0", "node_to_node": True}, "config.pods.encryption.fwmark: node_to_node needs the mark"),
    ({"device": "kln_wg0", "node_to_node": "yes"}, "config.pods.encryption.node_to_node: must be true or false"),
    ({"device": "kln_wg0", "fwmark": -1}, "config.pods.encryption.fwmark: -1 is not a 32-bit mark"),
    ({"device": "kln_wg0", "standby": "eth0"}, "config.pods.encryption.standby: eth0 is the underlay"),
])
def test_encryption_errors_name_the_field(enc, message):
    with pytest.raises(runtime.ConfigError) as e:
        runtime.validate(_pods(encryption=enc))
    assert message in str(e.value)


@pytest.mark.parametrize("rules, message", [
    ([{"priority": 0, "table": 220, "fwmark": 1}], "rules[0].priority: 0 is not 1-32765"),
    ([{"priority": 30000, "table": 220}], "rules[0].fwmark: None is not"),
    ([{"priority": 30000, "table": 220, "fwmark": 1, "to": "x"}], "rules[0]: must be a mapping"),
])
def test_rule_errors(rules, message):
    with pytest.raises(routes.RouteError) as e:
        routes.normalize_rules(rules)
    assert message in str(e.value)


def test_bpf_host_routing_is_the_host_and_lxc_objects():
    cfg = runtime.validate(dict(_pods(), objects=[{"name": "sock_lb"}, {"name": "host", "targets": {"devices": ["eth0"]}},
                                                  {"name": "lxc"}]))
    assert [o["name"] for o in cfg["objects"]] == ["sock_lb", "host", "lxc"]
    assert runtime.validate(json.loads(runtime.config_text(cfg))) == cfg


def test_pod_routes_and_conflist():
    from ansible_collections.kldload.netstack.plugins.module_utils import podnet
    p = runtime.validate(_pods())["pods"]
    assert podnet.wanted_routes(p)[0] == {"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "kln_vxlan", "onlink": True}
    native = podnet.wanted_routes(dict(p, routing_mode="native"))
    assert native[0] == {"dst": "10.244.2.0/24", "via": "192.168.1.12", "dev": "eth0"}
    conf = podnet.conflist(p, 1450)
    assert conf["name"] == "kldload-netstack" and conf["cniVersion"] == "1.1.0"
    assert conf["plugins"][0] == {"type": "ptp", "mtu": 1450, "capabilities": {"ips": True},
                                  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                                           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/var/lib/cni/networks"}}
    assert conf["plugins"][1] == {"type": "netstack-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
    text = podnet.nft_text(p)
    assert ('ip saddr 10.244.1.0/24 ip daddr != { 10.96.0.0/12, 10.244.1.0/24, 10.244.2.0/23, 192.168.1.11/32, '
            '192.168.1.12/31 } oifname "eth0" masquerade' in text)


_N2 = {"name": "node2", "underlay_ip": "192.168.1.12", "pod_cidr": "10.244.2.0/24"}


@pytest.mark.parametrize("cfg, message", [
    (_pods(routing_mode="bgp"), "config.pods.routing_mode: 'bgp' is not a routing mode (tunnel or native)"),
    (_pods(cidr="10.244.1.1/24"), "config.pods.cidr: '10.244.1.1/24' is not a network"),
    (_pods(cidr="fd00::/64"), "config.pods.cidr: fd00::/64 is not an IPv4 network"),
    (_pods(cidr=None), "config.pods.cidr: required (a network)"),
    (_pods(underlay_ip=""), "config.pods.underlay_ip: required (an address)"),
    (_pods(underlay_ip="192.168.1.300"), "config.pods.underlay_ip: '192.168.1.300' is not an address"),
    (_pods(underlay_interface=""), "config.pods.underlay_interface: a device name"),
    (_pods(mtu=100), "config.pods.mtu: an integer 576-65535, got 100"),
    (_pods(vxlan={"vni": 0}), "config.pods.vxlan.vni: an integer 1-16777215, got 0"),
    (_pods(vxlan={"device": "eth0"}), "config.pods.vxlan.device: eth0 is the underlay interface"),
    (_pods(vxlan={"colour": 1}), "config.pods.vxlan: unknown field(s) colour"),
    (_pods(service_cidr="10.244.0.0/16"), "config.pods.cidr: 10.244.1.0/24 overlaps the service CIDR 10.244.0.0/16"),
    (_pods(nodes=[dict(_N2, pod_cidr="10.244.1.0/25")]),
     "config.pods.nodes[0].pod_cidr: 10.244.1.0/25 overlaps this node's pod CIDR 10.244.1.0/24"),
    (_pods(nodes=[dict(_N2, pod_cidr="10.100.0.0/24")]),
     "config.pods.nodes[0].pod_cidr: 10.100.0.0/24 overlaps the service CIDR 10.96.0.0/12"),
    (_pods(nodes=[_N2, dict(_N2, name="node3", underlay_ip="192.168.1.13", pod_cidr="10.244.2.128/25")]),
     "config.pods.nodes[1].pod_cidr: 10.244.2.128/25 overlaps the pod CIDR 10.244.2.0/24 of config.pods.nodes[0]"),
    (_pods(nodes=[_N2, dict(_N2, underlay_ip="192.168.1.13", pod_cidr="10.244.3.0/24")]),
     "config.pods.nodes[1].name: node node2 is listed twice"),
    (_pods(nodes=[_N2, dict(_N2, name="node3", pod_cidr="10.244.3.0/24")]),
     "config.pods.nodes[1].underlay_ip: 192.168.1.12 is also the underlay_ip of config.pods.nodes[0]"),
    (_pods(nodes=[dict(_N2, underlay_ip="192.168.1.11")]),
     "config.pods.nodes[0].underlay_ip: 192.168.1.11 is this node's own underlay_ip"),
    (_pods(nodes=[dict(_N2, pod_cidr="x")]), "config.pods.nodes[0].pod_cidr: 'x' is not a network"),
    (_pods(masquerade="yes"), "config.pods.masquerade: must be true or false"),
    (_pods(cni={"conflist": "rel.conflist"}), "config.pods.cni.conflist: must be an absolute path"),
    (_pods(colour="red"), "config.pods: unknown field(s) colour"),
    (dict(_pods(), routes=[{"dst": "10.244.2.0/24", "via": "192.168.1.12"}]),
     "config.routes: 10.244.2.0/24 is the pod CIDR of node node2 in config.pods.nodes"),
    (_pods(encryption={"device": "eth0"}), "config.pods.encryption.device: eth0 is the underlay or the VXLAN device"),
    (_pods(encryption={"device": "kln_wg0", "strict": "yes"}), "config.pods.encryption.strict: must be true or false"),
    (_pods(encryption={"dev": "kln_wg0"}), "config.pods.encryption: unknown field(s) dev"),
    (dict(_pods(), objects=[{"name": "sock_lb"}, {"name": "lxc"}]),
     "config.objects[1].name: BPF host routing needs both objects host and lxc (host is missing)"),
    ({"objects": [{"name": "host", "targets": {"devices": ["eth0"]}}, {"name": "lxc"}]},
     "config.objects[0].name: host is BPF host routing, which needs config.pods (a pod network)"),
    (dict(_pods(), objects=[{"name": "host", "targets": {"devices": ["eth1"]}}, {"name": "lxc"}]),
     "config.objects[0].targets.devices: the host object must attach to the underlay device eth0"),
])
def test_pods_errors_name_the_field(cfg, message):
    with pytest.raises(runtime.ConfigError) as e:
        runtime.validate(cfg)
    assert message in str(e.value)


def test_route_plan_with_devices():
    cur = {"10.244.2.0/24": ("10.244.2.0", routes.RTPROT_NETSTACK, "kln_vxlan", True),
           "10.244.3.0/24": ("192.168.1.13", routes.RTPROT_NETSTACK, "eth0", False)}
    want = routes.normalize([{"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "kln_vxlan", "onlink": True},
                             {"dst": "10.244.3.0/24", "via": "10.244.3.0", "dev": "kln_vxlan", "onlink": True}])
    add, replace, delete = routes.plan(cur, want)
    assert (add, delete) == ([], [])
    assert replace == [dict(want[1], was="192.168.1.13")]
    with pytest.raises(routes.RouteError, match=r"routes\[0\].onlink: true or false \(true needs dev\)"):
        routes.normalize([{"dst": "10.244.2.0/24", "via": "10.244.2.0", "onlink": True}])
