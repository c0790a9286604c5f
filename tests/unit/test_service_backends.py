"""The service_backends filter: services selecting pods by label (plugins/filter/service_backends.py)."""
import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.kldload.netstack.plugins.filter.service_backends import FilterModule, service_backends
from ansible_collections.kldload.netstack.plugins.module_utils.lb import spec as lb_spec


def ep(ns, name, ip, labels, ports=(), node="node1"):
    return dict(namespace=ns, name=name, node=node, ip=ip, labels=labels, ports=list(ports))


HTTP8080 = {"name": "http", "port": 8080, "protocol": "TCP"}
HTTP9090 = {"name": "http", "port": 9090, "protocol": "TCP"}
DNS = {"name": "dns", "port": 5353, "protocol": "UDP"}
# per-node lists, as `groups.kube_nodes | map('extract', hostvars, 'workloads_endpoints')` gives them
ENDPOINTS = [
    [ep("shop", "web-1", "10.244.11.5", {"app": "web", "tier": "front"}, [HTTP8080, DNS]),
     ep("shop", "db", "10.244.11.6", {"app": "db"})],
    [ep("shop", "web-2", "10.244.12.5", {"app": "web"}, [HTTP9090], node="node2"),
     ep("other", "web-x", "10.244.12.9", {"app": "web"}, [HTTP8080], node="node2"),
     ep("default", "web-d", "10.244.12.10", {"app": "web"}, [HTTP8080], node="node2")],
    None,       # a node without workloads
]


def svc(**kw):
    s = dict(name="web", namespace="shop", vip="10.96.0.10", port=80)
    s.update(kw)
    return s


def test_registered():
    assert FilterModule().filters()["service_backends"] is service_backends


def test_selector_in_the_services_namespace_with_numeric_target_port():
    out = service_backends([svc(selector={"app": "web"}, targetPort=8080)], ENDPOINTS)
    assert out == [dict(name="web", namespace="shop", vip="10.96.0.10", port=80,
                        backends=[{"ip": "10.244.11.5", "port": 8080}, {"ip": "10.244.12.5", "port": 8080}])]
    # the output is what lb_services accepts
    lb_spec.normalize(out, 16381)


def test_default_namespace_and_default_target_port():
    out = service_backends([{"name": "w", "vip": "10.96.0.11", "port": 8080, "selector": {"app": "web"}}], ENDPOINTS)
    assert out[0]["backends"] == [{"ip": "10.244.12.10", "port": 8080}]


def test_named_target_port_resolves_per_pod():
    out = service_backends([svc(selector={"app": "web"}, targetPort="http")], ENDPOINTS)
    assert out[0]["backends"] == [{"ip": "10.244.11.5", "port": 8080}, {"ip": "10.244.12.5", "port": 9090}]
    lb_spec.normalize(out, 16381)


def test_named_target_port_uses_the_service_protocol():
    out = service_backends([svc(port=53, protocol="UDP", selector={"app": "web"}, targetPort="dns")], ENDPOINTS)
    # web-2 has no UDP port named dns: skipped (Kubernetes); web-1 has it
    assert out[0]["backends"] == [{"ip": "10.244.11.5", "port": 5353}]
    assert out[0]["protocol"] == "udp"
    lb_spec.normalize(out, 16381)
    with pytest.raises(AnsibleFilterError, match=r"services\[0\] \(shop/web\)\.targetPort: no selected pod "
                                                 r"\(shop/web-1, shop/web-2\) has a TCP port named 'dns'"):
        service_backends([svc(selector={"app": "web"}, targetPort="dns")], ENDPOINTS)


def test_listed_backends_are_kept_and_merged():
    out = service_backends([svc(selector={"app": "web", "tier": "front"}, targetPort=8080,
                                backends=[{"ip": "192.0.2.9", "port": 80, "weight": 3},
                                          {"ip": "10.244.11.5", "port": 8080, "weight": 5}])], ENDPOINTS)
    # the listed 10.244.11.5:8080 (weight 5) wins over the selected one; sorted by address
    assert out[0]["backends"] == [{"ip": "10.244.11.5", "port": 8080, "weight": 5},
                                  {"ip": "192.0.2.9", "port": 80, "weight": 3}]


def test_services_without_selector_pass_through():
    plain = [svc(backends=[{"ip": "10.1.0.2"}, {"ip": "10.1.0.1", "port": 81}])]
    out = service_backends(plain, ENDPOINTS)
    assert out[0]["backends"] == [{"ip": "10.1.0.1", "port": 81}, {"ip": "10.1.0.2"}]
    assert plain[0]["backends"][0] == {"ip": "10.1.0.2"}      # input not modified
    out = service_backends([svc(targetPort=8443, backends=[{"ip": "10.1.0.2"}])], ENDPOINTS)
    assert out[0]["backends"] == [{"ip": "10.1.0.2", "port": 8443}] and "targetPort" not in out[0]
    with pytest.raises(AnsibleFilterError, match=r"services\[0\] \(shop/web\)\.targetPort: the port name 'http' needs a selector"):
        service_backends([svc(targetPort="http", backends=[{"ip": "10.1.0.2"}])], ENDPOINTS)


def test_no_matching_pod_gives_no_backends_and_empty_selector_selects_nothing():
    assert service_backends([svc(selector={"app": "none"}, targetPort="http")], ENDPOINTS)[0]["backends"] == []
    assert service_backends([svc(selector={})], ENDPOINTS)[0]["backends"] == []


def test_order_independent_and_endpoints_without_ip_skipped():
    a = service_backends([svc(selector={"app": "web"})], ENDPOINTS)
    flat = [e for node in reversed(ENDPOINTS) for e in reversed(node or [])]
    b = service_backends([svc(selector={"app": "web"})], flat)
    assert a == b
    planned = [ep("shop", "web-9", None, {"app": "web"}, [HTTP8080])]     # check mode: not yet created
    assert service_backends([svc(selector={"app": "web"})], planned)[0]["backends"] == []


def test_bad_input_names_the_field():
    with pytest.raises(AnsibleFilterError, match=r"services\[0\] \(shop/web\)\.selector: label key '-a'"):
        service_backends([svc(selector={"-a": "b"})], ENDPOINTS)
    with pytest.raises(AnsibleFilterError, match=r"services\[0\] \(shop/web\)\.targetPort: 70000 must be from 1 to 65535"):
        service_backends([svc(selector={"app": "web"}, targetPort=70000)], ENDPOINTS)
    with pytest.raises(AnsibleFilterError, match=r"services\[1\]: must be a mapping"):
        service_backends([svc(), "x"], ENDPOINTS)
