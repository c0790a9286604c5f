"""LB-IPAM (lbipam.py) and peering policies (bgppolicy.py) with the shared example documents as written."""
import copy
from pathlib import Path

import pytest
import yaml

from ansible_collections.kldload.netstack.plugins.module_utils import bgppolicy, lbipam

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
POOL = {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumLoadBalancerIPPool", "metadata": {"name": "lan-pool"},
        "spec": {"cidrs": [{"cidr": "192.168.10.0/24"}], "serviceSelector": {"matchLabels": {"announce": "bgp"}}}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "my-app", "labels": {"announce": "bgp"}},
           "spec": {"type": "LoadBalancer", "selector": {"app": "my-app"}, "ports": [{"port": 80, "targetPort": 8080}]}}
POLICY = {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy", "metadata": {"name": "bgp-peering-policy"},
          "spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/os": "linux"}},
                   "virtualRouters": [{"localASN": 65001, "exportPodCIDR": False,
                                       "neighbors": [{"peerAddress": "192.168.1.1/32", "peerASN": 65000}],
                                       "serviceSelector": {"matchExpressions": [
                                           {"key": "somekey", "operator": "NotIn", "values": ["never-select"]}]}}]}}
PODS = ["10.244.1.0/24", "10.244.11.0/24"]


def _svc(name, **kw):
    s = {"name": name, "namespace": "shop", "type": "LoadBalancer", "port": 80, "labels": {"announce": "bgp"}}
    s.update(kw)
    return s


def test_the_shared_examples_as_written():
    docs = {}
    for name, fallback in (("lb-ip-pool.yaml", POOL), ("service-loadbalancer.yaml", SERVICE),
                           ("bgp-peering-policy.yaml", POLICY)):
        path = EXAMPLES / name
        docs[name] = yaml.safe_load(path.read_text()) if path.exists() else fallback
    plan = lbipam.plan([docs["service-loadbalancer.yaml"]], [docs["lb-ip-pool.yaml"]], PODS, "10.96.0.0/12")
    ip = plan["assignments"]["default/my-app"][0]
    assert ip.startswith("192.168.10.") and ip not in ("192.168.10.0", "192.168.10.255")
    svc = plan["services"][0]
    assert svc["type"] == "LoadBalancer" and svc["selector"] == {"app": "my-app"} and svc["targetPort"] == 8080
    assert 30000 <= svc["nodePort"] <= 32767
    svc["backends"] = [{"ip": "10.244.1.5", "port": 8080}, {"ip": "10.244.11.5", "port": 8080}]
    cfg = bgppolicy.node_config([docs["bgp-peering-policy.yaml"]], "cp1", bgppolicy.node_labels("cp1"), "192.168.1.11",
                                "10.244.1.0/24", plan["services"])
    assert cfg["policy"] == "bgp-peering-policy"
    assert cfg["args"]["asn"] == 65001 and cfg["args"]["router_id"] == "192.168.1.11"
    assert cfg["args"]["neighbors"] == [{"address": "192.168.1.1", "asn": 65000, "bfd": False}]
    assert cfg["args"]["announce"] == ["%s/32" % ip]
    table = lbipam.node_table(plan["services"], "192.168.1.11", "10.244.1.0/24")
    assert sorted((e["vip"], e["port"], e["external"]) for e in table) == sorted(
        [(ip, 80, "cluster"), ("192.168.1.11", svc["nodePort"], "cluster")])


def test_assignment_is_stable_and_independent_of_order():
    pools = lbipam.pools([POOL], PODS, "10.96.0.0/12")
    svcs = [_svc("s%d" % i) for i in range(20)]
    a = lbipam.assign(svcs, pools)
    b = lbipam.assign(list(reversed(svcs)), pools)
    assert a == b and len(set(x[0] for x in a.values())) == 20
    # a new service does not move the others when they keep their previous assignment
    c = lbipam.assign(svcs + [_svc("new")], pools, previous=a)
    assert all(c[k] == v for k, v in a.items())


def test_requested_ips_and_conflicts():
    pools = lbipam.pools([POOL])
    out = lbipam.assign([_svc("a", loadBalancerIP="192.168.10.7"),
                         _svc("b", annotations={"lbipam.cilium.io/ips": "192.168.10.8"})], pools)
    assert out == {"shop/a": ["192.168.10.7"], "shop/b": ["192.168.10.8"]}
    with pytest.raises(lbipam.IpamError, match=r"services\[1\] \(shop/b\)\.loadBalancerIP: 192.168.10.7 is requested by shop/a"):
        lbipam.assign([_svc("a", loadBalancerIP="192.168.10.7"), _svc("b", loadBalancerIP="192.168.10.7")], pools)
    with pytest.raises(lbipam.IpamError, match=r"outside every pool"):
        lbipam.assign([_svc("a", loadBalancerIP="10.1.1.1")], pools)
    with pytest.raises(lbipam.IpamError, match=r"does not select this service"):
        lbipam.assign([_svc("a", loadBalancerIP="192.168.10.7", labels={})], pools)


def test_exhaustion_and_families():
    small = {"name": "tiny", "blocks": [{"start": "192.168.20.1", "stop": "192.168.20.2"}]}
    pools = lbipam.pools([small, {"name": "v6", "cidrs": [{"cidr": "fd00:10::/120"}]}])
    out = lbipam.assign([_svc("a"), _svc("b"), _svc("c", ipFamilies=["IPv6"])], pools)
    assert sorted(out["shop/a"] + out["shop/b"]) == ["192.168.20.1", "192.168.20.2"] and out["shop/c"][0].startswith("fd00:10::")
    with pytest.raises(lbipam.IpamError, match=r"services\[\d\] \(shop/.\): no free IPv4 address in the pools that select it \(tiny\)"):
        lbipam.assign([_svc("a"), _svc("b"), _svc("c")], pools)


@pytest.mark.parametrize("pools, match", [
    ([{"name": "p", "cidrs": [{"cidr": "10.244.1.0/28"}]}], r"lb_ip_pools\[0\] \(p\)\.spec\.cidrs\[0\]: .* overlaps the pod CIDR"),
    ([{"name": "p", "cidrs": [{"cidr": "10.96.5.0/24"}]}], r"overlaps the service CIDR"),
    ([{"name": "p", "cidrs": [{"cidr": "192.168.10.0/24"}]}, {"name": "q", "cidrs": [{"cidr": "192.168.10.128/25"}]}],
     r"lb_ip_pools\[1\] \(q\)\.spec\.cidrs\[0\]: .* overlaps pool p"),
    ([{"name": "p", "cidrs": [{"cidr": "192.168.10.1/24"}]}], r"is not a network"),
    ([{"name": "p", "blocks": [{"start": "192.168.10.9", "stop": "192.168.10.1"}]}], r"start 192.168.10.9 is after stop"),
])
def test_bad_pools(pools, match):
    with pytest.raises(lbipam.IpamError, match=match):
        lbipam.pools(pools, PODS, "10.96.0.0/12")


def test_node_ports():
    svcs = [_svc("a", nodePort=30080), _svc("b", type="NodePort"), _svc("c", protocol="udp", nodePort=30080)]
    out = lbipam.node_ports(svcs)
    assert out["shop/a/80/tcp"] == 30080 and out["shop/c/80/udp"] == 30080 and 30000 <= out["shop/b/80/tcp"] <= 32767
    with pytest.raises(lbipam.IpamError, match=r"services\[0\] \(shop/a\)\.nodePort: 29999 is outside the NodePort range"):
        lbipam.node_ports([_svc("a", nodePort=29999)])
    with pytest.raises(lbipam.IpamError, match=r"services\[1\] \(shop/b\)\.nodePort: 30080/TCP is used by shop/a/80/tcp too"):
        lbipam.node_ports([_svc("a", nodePort=30080), _svc("b", nodePort=30080)])


def test_local_policy_tables_and_announcements():
    svc = dict(_svc("loc", externalTrafficPolicy="Local", loadBalancerIPs=["192.168.10.9"], nodePort=30100),
               backends=[{"ip": "10.244.11.4", "port": 8080}, {"ip": "10.244.1.4", "port": 8080}])
    t = lbipam.node_table([svc], "192.168.1.21", "10.244.11.0/24")
    assert all(e["external"] == "local" and e["backends"] == [{"ip": "10.244.11.4", "port": 8080}] for e in t)
    pol = copy.deepcopy(POLICY)
    pol["spec"]["virtualRouters"][0]["exportPodCIDR"] = True
    on = bgppolicy.node_config([pol], "w1", bgppolicy.node_labels("w1"), "192.168.1.21", "10.244.11.0/24", [svc])
    assert on["args"]["announce"] == ["10.244.11.0/24", "192.168.10.9/32"]
    svc_no_local = dict(svc, backends=[{"ip": "10.244.1.4", "port": 8080}])
    off = bgppolicy.node_config([pol], "w1", bgppolicy.node_labels("w1"), "192.168.1.21", "10.244.11.0/24", [svc_no_local])
    assert off["args"]["announce"] == ["10.244.11.0/24"]


@pytest.mark.parametrize("change, match", [
    (lambda p: p["spec"]["virtualRouters"][0].update(localASN=0), r"asn: 0 is not an AS number"),
    (lambda p: p["spec"]["virtualRouters"][0]["neighbors"][0].update(peerAddress="192.168.1.0/24"), r"peerAddress: .* is a network"),
    (lambda p: p["spec"]["virtualRouters"][0]["neighbors"][0].update(authSecretRef="nope"), r"authSecretRef: no secret 'nope'"),
    (lambda p: p["spec"]["virtualRouters"][0]["neighbors"][0].update(authSecretRef="bad"), r"password: must not contain a quote"),
])
def test_bad_policies(change, match):
    pol = copy.deepcopy(POLICY)
    change(pol)
    with pytest.raises(bgppolicy.PolicyError, match=match) as e:
        bgppolicy.node_config([pol], "cp1", bgppolicy.node_labels("cp1"), "192.168.1.11", None, [], {"bad": 'x"y'})
    assert 'x"y' not in str(e.value)


def test_policies_pick_nodes_by_label():
    pol = copy.deepcopy(POLICY)
    pol["spec"]["nodeSelector"] = {"matchLabels": {"rack": "a"}}
    assert bgppolicy.node_config([pol], "cp1", bgppolicy.node_labels("cp1"), "192.168.1.11")["args"] == {"state": "absent"}
    two = [POLICY, dict(POLICY, metadata={"name": "other"})]
    with pytest.raises(bgppolicy.PolicyError, match=r"both select node cp1"):
        bgppolicy.node_config(two, "cp1", bgppolicy.node_labels("cp1"), "192.168.1.11")
