#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: workloads
short_description: Lab workloads (pods) on one node, created as a container runtime creates a pod sandbox
version_added: 0.3.0
description:
  - Makes the node's lab workloads match O(workloads). Each workload is a pod - a network namespace
    C(/run/netns/wl-<namespace>-<name>-<hash>) set up exactly as a container runtime sets up a pod sandbox,
    plus one server process - and answers on its declared ports.
  - "Sandbox: the loopback network for C(lo), then the CNI network O(conflist) ADD for C(eth0) with the CNI_ARGS a
    runtime passes (C(K8S_POD_NAMESPACE), C(K8S_POD_NAME), C(K8S_POD_UID) - a stable UUID from namespace/name -,
    C(K8S_POD_INFRA_CONTAINER_ID) - derived from the spec, so a changed spec is a new sandbox) and the capability
    arguments C(io.kubernetes.cri.pod-annotations) (annotations C(netstack.kldload.io/labels) and
    C(netstack.kldload.io/ports), JSON) and, for a pinned O(workloads[].ip), C(ips)."
  - "Process: the workload server (O(server)) as a transient systemd unit C(netstack-wl-<...>.service) in
    C(netstack-workloads.slice) with C(NetworkNamespacePath) set to the pod's namespace, C(Type=notify) (started
    once its ports are bound) and C(Restart=on-failure). Transient units and C(/run/netns) vanish at reboot; the
    next run finds the workloads gone and recreates them (CNI DEL of the old sandbox first, so its IP lease is
    released)."
  - A record per workload in O(state_dir) (spec hash, container id, netns, IP, unit). A workload whose spec hash is
    unchanged and whose namespace and unit are alive is not touched; a changed one is deleted (unit stopped,
    CNI DEL, namespace removed) and created again; with O(prune=true) a recorded workload not in the list is
    deleted. Deletions run first, so a pinned IP can move from one workload to another in one run.
  - Every workload is validated before anything is touched (errors name the field). A failing step (CNI ADD,
    the unit) undoes what was done for that workload - no namespace, IP lease, unit or record is left behind -
    and fails the task; workloads handled before it stay as they are now.
options:
  workloads:
    description:
      - This node's workloads (the C(kldload.netstack.workloads) role passes the inventory's C(netstack_workloads)
        whose C(node) is this host).
    type: list
    elements: dict
    default: []
    suboptions:
      namespace:
        description: The workload's namespace; C(default) always exists, any other must be in O(namespaces).
        type: str
        default: default
      name:
        description: The workload's name (a DNS subdomain), unique in its namespace.
        type: str
        required: true
      node:
        description: The node it runs on (informational here; returned in RV(endpoints)).
        type: str
        required: true
      labels:
        description: Kubernetes labels (keys C([prefix/]name), values at most 63 characters).
        type: dict
        default: {}
      ports:
        description: The ports the server answers on.
        type: list
        elements: dict
        default: []
        suboptions:
          name:
            description: Port name (IANA_SVC_NAME - at most 15 lowercase letters, digits and C(-), with a letter), unique in the workload.
            type: str
          port:
            description: Port number, 1-65535.
            type: int
            required: true
          protocol:
            description: C(TCP) or C(UDP) (SCTP is rejected - the lab kernel has none).
            type: str
            default: TCP
      ip:
        description: A pinned pod IP (must be free in the node's pod CIDR); assigned by IPAM when omitted.
        type: str
  namespaces:
    description: The declared namespaces C([{name, labels}]) (the inventory's C(netstack_namespaces)).
    type: list
    elements: dict
    default: []
  conflist:
    description: The CNI network configuration list the workloads attach to.
    type: path
    default: /etc/cni/net.d/05-kldload-netstack.conflist
  cni_path:
    description: Directories searched for CNI plugins (default C(/usr/lib/cni), C(/opt/cni/bin)).
    type: list
    elements: path
  state_dir:
    description: Where the workload records are kept.
    type: path
    default: /var/lib/kldload-netstack/workloads
  server:
    description: The workload server script on the node (run with C(/usr/bin/python3)).
    type: path
    default: /usr/lib/kldload-netstack/workload-server.py
  prune:
    description: Delete recorded workloads that are not in O(workloads).
    type: bool
    default: true
requirements:
  - systemd on the node (transient units), iproute2, the CNI plugins of O(conflist); root.
notes:
  - Supports check mode (RV(plan) is reported, nothing is changed; RV(endpoints) then lists the planned workloads,
    with C(ip) null unless pinned) and diff mode (the workloads before and after, one line each).
seealso:
  - module: kldload.netstack.lb_services
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Two web pods and a DNS pod on this node
  kldload.netstack.workloads:
    namespaces:
      - name: shop
        labels: {team: shop}
    workloads:
      - {namespace: shop, name: web-1, node: node1, labels: {app: web}, ports: [{name: http, port: 8080}]}
      - {namespace: shop, name: web-2, node: node1, labels: {app: web}, ports: [{name: http, port: 8080}], ip: 10.244.11.20}
      - name: dns
        node: node1
        labels: {app: dns}
        ports:
          - {name: dns, port: 53, protocol: UDP}
  register: wl

- name: Remove every workload of this node
  kldload.netstack.workloads:
    workloads: []
"""

RETURN = r"""
endpoints:
  description:
    - This node's workloads after the run (in check mode the planned ones, C(ip) null unless pinned).
    - C(ingress_isolated) - a network policy enforces its ingress (M(kldload.netstack.network_policy)), so other nodes
      may not reach it.
  returned: always
  type: list
  elements: dict
  sample:
    - {namespace: shop, name: web-1, node: node1, labels: {app: web}, ports: [{name: http, port: 8080, protocol: TCP}], ip: 10.244.11.5,
       ingress_isolated: false}
plan:
  description: What was (in check mode - would be) done per workload, deletions first.
  returned: always
  type: list
  elements: dict
  sample:
    - {namespace: shop, name: web-1, action: create, reason: new}
    - {namespace: shop, name: web-2, action: keep, reason: unchanged}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import cni, runtime, units, workloads
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps as policy_maps
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, ToolError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            workloads=dict(type="list", elements="dict", default=[], options=dict(
                namespace=dict(type="str", default="default"),
                name=dict(type="str", required=True),
                node=dict(type="str", required=True),
                labels=dict(type="dict", default={}),
                ports=dict(type="list", elements="dict", default=[], options=dict(
                    name=dict(type="str"),
                    port=dict(type="int", required=True),
                    protocol=dict(type="str", default="TCP"),
                )),
                ip=dict(type="str"),
            )),
            namespaces=dict(type="list", elements="dict", default=[]),
            conflist=dict(type="path", default=cni.CONFLIST_PATH),
            cni_path=dict(type="list", elements="path"),
            state_dir=dict(type="path", default="/var/lib/kldload-netstack/workloads"),
            server=dict(type="path", default="/usr/lib/kldload-netstack/workload-server.py"),
            prune=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        specs = workloads.validate([dict((k, v) for k, v in w.items() if v is not None) for w in p["workloads"]],
                                   p["namespaces"], nodes=None, where="workloads")
    except ValueError as e:
        module.fail_json(msg=str(e))

    ip_tool = Tool(module, "ip")

    def run_ip(argv):
        ip_tool.run(*argv[1:])

    def run(argv, check=True):
        rc, out, err = module.run_command(argv, check_rc=False, environ_update=dict(LC_ALL="C", LANG="C"))
        if check and rc != 0:
            raise ToolError(argv, rc, out, err)
        return rc, out, err

    records = workloads.read_records(p["state_dir"])
    if (specs or records) and not units.systemd_running():
        module.fail_json(msg="the workloads module needs systemd on the node (no /run/systemd/system): "
                             "workload processes run as transient systemd units")
    starter = workloads.SystemdStarter(run)
    conflist, conflist_error = None, None
    if os.path.exists(p["conflist"]):
        try:
            conflist = cni.load_conflist(p["conflist"])
        except (cni.CNIError, OSError, ValueError) as e:
            conflist_error = e
    steps = workloads.plan(specs, records, starter, prune=p["prune"], network=workloads.network_hash(conflist))
    if not module.check_mode and any(s["action"] in ("create", "recreate", "delete") for s in steps):
        if conflist is None:
            module.fail_json(msg="conflist %s: %s" % (p["conflist"], conflist_error or "does not exist (the dataplane "
                                                      "role writes it: run it first)"), plan=steps)
        if any(s["action"] in ("create", "recreate") for s in steps) and not module.sha1(p["server"]):
            module.fail_json(msg="server: %s does not exist on the node (the role copies it)" % p["server"], plan=steps)
    node = workloads.Node(cni, conflist, run_ip, starter, p["state_dir"], p["server"], cni_path=p["cni_path"])
    try:
        res = workloads.sync(node, specs, prune=p["prune"], check=module.check_mode, records=records, steps=steps)
    except workloads.WorkloadError as e:
        module.fail_json(msg=str(e), plan=steps)
    isolated = _isolated()
    for e in res["endpoints"]:
        e["ingress_isolated"] = str(e.get("ip") or "").split("/", 1)[0] in isolated
    out = dict(changed=res["changed"], endpoints=res["endpoints"], plan=res["plan"])
    if module._diff:
        out["diff"] = dict(before="".join(workloads.describe(e) + "\n" for e in res["before"]),
                           after="".join(workloads.describe(e) + "\n" for e in res["after"]))
    module.exit_json(**out)


def _isolated():
    """The addresses of this node's pods whose ingress a network policy enforces (policy maps; none without them)."""
    try:
        cfg = runtime.read_config()
        return set(ip for ip, e in policy_maps.endpoints(runtime.globals_dir(cfg)).items() if e["ingress_enforced"])
    except (runtime.ConfigError, OSError):
        return set()


if __name__ == "__main__":
    main()
