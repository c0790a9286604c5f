#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_dataplane
short_description: Apply a node's whole dataplane - eBPF objects, attachments, shared maps, service table, routes, pod network - from one configuration
version_added: 0.2.0
description:
  - Writes the node configuration (O(config_path)) and makes the node match it in one step, through the same
    function C(netstack dataplane restore) runs at boot, so what a play applies and what a reboot brings back
    cannot differ.
  - B(Objects.) Each object in O(objects) is a compiled eBPF object with its manifest inside the node bundle
    O(bundle) (C(netstack_objects/<name>.o) and C(<name>.manifest.json); C(make node) builds the bundle and
    the dataplane role installs it). The manifest
    says which programs the object has and where each attaches (the node's cgroup2 root, devices, or pod
    interfaces), and which of its maps are shared with other objects. Objects are loaded and attached as
    M(kldload.netstack.bpf_program) does - verified first, programs swapped through BPF links without a gap,
    a failed step rolled back - and maps declared shared are pinned once under C(<pin_path>/globals/) and used
    by every object that declares them. Objects under O(pin_path) that are not listed are removed; this
    module owns O(pin_path) (load objects of your own under another pin path).
  - B(Services.) O(services) is the whole service table of the socket load balancer, written as
    M(kldload.netstack.lb_services) with O(kldload.netstack.lb_services#module:prune=true) writes it
    (validated first, the difference written in commit order).
  - B(Routes.) The routes to the other nodes' pod CIDRs come from O(pods) (its routing mode); O(routes) are
    any other routes the dataplane owns. The routes this module makes carry routing protocol 220 (C(ip route)
    shows C(proto 220)); one no longer wanted is deleted, a route of anyone else to the same destination is an
    error, never replaced.
  - B(Pod network.) O(pods) is the node's pod network (version_added 0.3.0) - its pod CIDR, the routes to the
    other nodes' pod CIDRs in O(pods.routing_mode=tunnel) (a VXLAN device with MACs derived from the underlay
    addresses, per node a route C(onlink), a permanent neighbour and an fdb entry, no learning) or
    O(pods.routing_mode=native) (routes via the nodes' underlay addresses), the pod MTU, masquerade of traffic
    leaving the cluster (one nftables table C(ip kldload_netstack)), the CNI conflist and the C(netstack-cni)
    plugin symlink to O(bundle). Changing the mode is one run - the other mode's device, neighbours, fdb and
    routes go. Without O(pods), whatever of a pod network is there (default names) is removed.
  - B(BPF host routing.) With the objects C(host) (targets.devices the underlay device) and C(lxc) in O(objects)
    (version_added 0.3.0; both or neither, and only with O(pods)), pod packets are forwarded by tc programs
    instead of the host's IP stack - into a pod of this node with C(bpf_redirect_peer), to a pod of another
    node through the FIB's next hop - and the module keeps their two maps (the cluster's pod CIDRs, the pods of
    this node from the CNI plugin's endpoint records) as the configuration and the records say. Without them
    the stack forwards pod traffic (Cilium's legacy host routing).
  - Everything is validated before anything on the node is touched; bad input fails naming the field.
  - B(Boot.) With O(restore_unit), the unit C(netstack-dataplane.service) (enabled) runs C(netstack dataplane
    restore) at boot, which applies the same configuration again with the last applied service table.
  - O(state=absent) removes the dataplane - the restore unit, every object, shared map, owned route, the pod
    network (VXLAN device, nftables table, conflist, plugin symlink), the LB state file and its journal, and the
    configuration file.
extends_documentation_fragment:
  - kldload.netstack.dataplane
  - kldload.netstack.dataplane.services
options:
  objects:
    description: The eBPF objects the node runs.
    type: list
    elements: dict
    default: [{name: sock_lb}]
    suboptions:
      name:
        description: Object name; in the bundle, C(netstack_objects/<name>.o) and C(<name>.manifest.json).
        type: str
        required: true
      cgroup:
        description:
          - The cgroup v2 directory the object's cgroup programs attach to. Empty - the node's cgroup2 mount,
            detected from the mount table (every process of the node).
        type: path
      families:
        description: Address families whose programs are attached (programs of a family in the manifest).
        type: list
        elements: int
        choices: [4, 6]
        default: [4, 6]
      devices:
        description: Network devices the object's device programs attach to.
        type: list
        elements: str
        default: []
  maps:
    description:
      - Map sizes (C(max_entries)) by map name, for the maps of any listed object (a shared map is one map,
        whichever objects declare it). A name no object declares is an error. Changing a size recreates
        that map (its contents are lost; the service table is written again in the same run).
    type: dict
    default: {}
  bundle:
    description:
      - The node bundle (C(netstack.pyz), built by C(make node)) - the node command and its library as one zipapp,
        with every object and its manifest inside. The objects are unpacked from it into a private directory for
        each run.
    type: path
    default: /usr/lib/kldload-netstack/netstack.pyz
  restore_unit:
    description:
      - Keep C(/etc/systemd/system/netstack-dataplane.service) (enabled) applying O(config_path) again at boot.
        V(false) for a second, test instance of the dataplane that must not own the node's boot.
    type: bool
    default: true
  routes:
    description:
      - Other routes the dataplane owns (the routes to the other nodes' pod CIDRs come from O(pods); a pod CIDR
        of O(pods.nodes) here is an error).
    type: list
    elements: dict
    default: []
    suboptions:
      dst:
        description: Destination network.
        type: str
        required: true
      via:
        description: Gateway.
        type: str
        required: true
  pods:
    description:
      - The node's pod network (IPv4). Omitted - no pod network (one made before is removed).
    type: dict
    version_added: 0.3.0
    suboptions:
      cidr:
        description: This node's pod CIDR (pods get addresses from it through host-local IPAM).
        type: str
        required: true
      routing_mode:
        description:
          - V(tunnel) - VXLAN between the nodes' underlay addresses; V(native) - routes via the nodes' underlay
            addresses (the underlay must route between them directly).
        type: str
        choices: [tunnel, native]
        default: tunnel
      underlay_interface:
        description: The device the node reaches the other nodes through.
        type: str
        required: true
      underlay_ip:
        description: This node's address on O(pods.underlay_interface) (the VXLAN source; the MAC is derived from it).
        type: str
        required: true
      mtu:
        description:
          - The pod MTU (on the VXLAN device and in ptp's C(mtu)). V(0) - the underlay's MTU minus 50 (the VXLAN
            overhead) in tunnel mode, the underlay's MTU in native mode.
        type: int
        default: 0
      vxlan:
        description: The VXLAN device of tunnel mode.
        type: dict
        suboptions:
          device:
            description: Device name.
            type: str
            default: kln_vxlan
          vni:
            description:
              - VXLAN network identifier (the same on every node). With O(pods.vxlan.external), the VNI sent to a
                node whose O(pods.nodes[].tunnel_identity) is false.
            type: int
            default: 1
          port:
            description: UDP destination port (the same on every node).
            type: int
            default: 8472
          external:
            description:
              - An external (collect_md) device whose tunnel key the C(overlay) object's programs set per packet -
                the source's security identity travels as the VNI (docs/policy.md). Needs the C(overlay) object
                in O(objects).
            type: bool
            default: false
      nodes:
        description: The other nodes (not this one).
        type: list
        elements: dict
        default: []
        suboptions:
          name:
            description: Node name (reported).
            type: str
            required: true
          underlay_ip:
            description: The node's underlay address.
            type: str
            required: true
          pod_cidr:
            description: The node's pod CIDR (may not overlap another's, this node's or the service CIDR).
            type: str
            required: true
          tunnel_identity:
            description:
              - Whether the node reads security identities from the VNI (a release with the C(overlay) object).
                V(false) - it gets O(pods.vxlan.vni), and this node looks its pods up by address.
            type: bool
            default: true
      service_cidr:
        description: The service CIDR (not masqueraded; may not overlap a pod CIDR).
        type: str
        default: 10.96.0.0/12
      masquerade:
        description:
          - Masquerade traffic from the pod CIDR to anything outside the cluster (all pod CIDRs and the service
            CIDR) leaving through O(pods.underlay_interface). V(false) - the nftables table is removed.
        type: bool
        default: true
      encryption:
        description:
          - WireGuard between the nodes (the C(encryption) role sets it; version_added 0.3.0). The routes to the other
            nodes' pod CIDRs go into O(pods.encryption.device) (C(via <node's underlay ip> onlink)) in either routing
            mode - WireGuard is the tunnel, no VXLAN device is made - and the pod MTU (0) is the underlay's minus 60.
            BPF host routing leaves this traffic to the stack. The device must exist (M(kldload.netstack.wireguard_device)).
          - With O(pods.encryption.strict), the nftables table also drops (and counts) this node's pod traffic to another
            node's pods that would leave by any other device - before the peers exist, with a peer missing or the
            device down - instead of sending it in plaintext.
        type: dict
        suboptions:
          device:
            description: The WireGuard device.
            type: str
            required: true
          strict:
            description: Drop cross-node pod traffic that would leave unencrypted.
            type: bool
            default: false
          standby:
            description:
              - A second WireGuard device that strict mode lets traffic into too (the key rotation moves the routes
                into it for a while, C(playbooks/rotate_keys.yml)); it need not exist.
            type: str
          node_to_node:
            description:
              - Also the nodes' own traffic to the other nodes' underlay addresses goes into the device - routes in
                table 220, reached by a rule (priority 30000) for every packet without O(pods.encryption.fwmark), the
                mark of the device's own packets, which so still leave by the underlay.
            type: bool
            default: false
          fwmark:
            description: The mark the WireGuard device gives its own packets (the C(fwmark) of M(kldload.netstack.wireguard_device)).
            type: int
            default: 0
      cni:
        description: Where the CNI network configuration goes.
        type: dict
        suboptions:
          conflist:
            description: The conflist (network C(kldload-netstack)), written atomically.
            type: path
            default: /etc/cni/net.d/05-kldload-netstack.conflist
          bin_dir:
            description: The CNI plugin directory; C(<bin_dir>/netstack-cni) is made a symlink to O(bundle).
            type: path
            default: /usr/lib/cni
  nodeport:
    description:
      - The edge load balancer (version_added 0.3.0) - with the object C(nodeport) listed in O(objects) (on the
        underlay device), LoadBalancer IPs and NodePorts of the services marked O(services[].external) are answered
        on this node for clients on the LAN (docs/bgp.md).
    type: dict
    suboptions:
      node_ip:
        description: The node's underlay IPv4 address (NodePorts are answered on it; Cluster-policy flows are SNATed to it).
        type: str
        required: true
      snat_port_min:
        description: Lowest SNAT source port (keep the range above the node's C(net.ipv4.ip_local_port_range)).
        type: int
        default: 61000
      snat_port_max:
        description: Highest SNAT source port.
        type: int
        default: 65535
  agent:
    description:
      - The flow agent (version_added 0.5.0, docs/observability.md) - flow events from the eBPF programs (the map
        C(kln_flow_config) set on or off on every apply) and the unit C(netstack-agent.service) running
        C(netstack agent), which reads them, keeps the recent flows in memory and serves them and Prometheus metrics
        on O(agent.listen). Omitted or O(agent.enabled=false) - events off and the unit removed.
      - The unit is started when it does not run and restarted when this section or the installed bundle changed.
    type: dict
    suboptions:
      enabled:
        description: Events on and the agent running.
        type: bool
        default: true
      listen:
        description:
          - C(ADDRESS:PORT) the agent serves on (C([v6]:PORT) for IPv6) - one address of this node, its management
            address (checked before anything is touched); V(0.0.0.0) and V(::) are refused. Required when enabled.
        type: str
      node_name:
        description: The node name flows carry (default the host name).
        type: str
      buffer:
        description: Flows kept in the agent's memory (a ring, the oldest go first), 16-1000000.
        type: int
        default: 4096
      aggregation:
        description:
          - What the programs report, like Cilium's C(monitorAggregation) - V(none) every packet, V(medium) a
            connection's first packet per direction and TCP flag changes, V(maximum) fewer (only SYN, FIN, RST
            changes). Drops are always reported, at most O(agent.drop_rate) per second per reason and CPU.
        type: str
        choices: [none, medium, maximum]
        default: medium
      drop_rate:
        description: Drop events per second per drop reason and CPU (V(0) - no limit).
        type: int
        default: 100
      export:
        description: Every flow also written as a JSON line (Hubble's flow JSON) to a file rotated by size.
        type: dict
        suboptions:
          path:
            description: The file (absolute).
            type: path
            required: true
          max_bytes:
            description: Rotate when the file would pass this size.
            type: int
            default: 10485760
          keep:
            description: Rotated files kept (C(path.1) ... C(path.<keep>)).
            type: int
            default: 3
  config_path:
    description: Where the node configuration is written (read back by C(netstack) on the node).
    type: path
    default: /etc/kldload-netstack/dataplane.json
  state:
    description: V(present) applies the configuration; V(absent) removes the dataplane from the node.
    type: str
    choices: [present, absent]
    default: present
requirements:
  - root, bpftool (libbpf), a kernel with BPF links; python3-pyroute2 (routes, pod network); nftables (nft) with
    O(pods.masquerade).
notes:
  - Supports check mode and diff mode. The diff shows the configuration file, the loaded objects (versions,
    map sizes, attachments), the shared maps, the services added, removed and changed, the routes and the pod
    network's changes.
  - The conflist's C(cniVersion) is C(1.1.0) when the node's C(ptp) plugin supports it, else C(1.0.0)
    (Debian's containernetworking-plugins 1.1.1 stop at 1.0.0 and refuse a 1.1.0 configuration).
  - In check mode on a node where the objects are not installed yet, the objects are reported as to be
    installed and loaded and every service as to be added.
seealso:
  - module: kldload.netstack.bpf_program
  - module: kldload.netstack.lb_services
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: The socket load balancer on every process of the node, two services, direct routes
  kldload.netstack.node_dataplane:
    objects:
      - name: sock_lb
    maps: {kln_lb4_svc: 131072}
    services:
      - name: web
        namespace: production
        vip: 10.96.0.10
        port: 80
        backends:
          - {ip: 10.244.1.5, port: 8080, weight: 90}
          - {ip: 10.244.2.7, port: 8080, weight: 10}
    pods:
      cidr: 10.244.11.0/24
      routing_mode: tunnel
      underlay_interface: eth0
      underlay_ip: 192.168.1.11
      nodes:
        - {name: node2, underlay_ip: 192.168.1.12, pod_cidr: 10.244.12.0/24}
        - {name: node3, underlay_ip: 192.168.1.13, pod_cidr: 10.244.13.0/24}

- name: Take the dataplane off the node
  kldload.netstack.node_dataplane:
    state: absent
"""

RETURN = r"""
actions:
  description: What was done (or would be, in check mode) to the objects and shared maps, in order.
  returned: always
  type: list
  elements: str
objects:
  description: The loaded objects by name - version, programs, attachments, private maps.
  returned: always
  type: dict
shared_maps:
  description: The shared maps under C(<pin_path>/globals/) by pin name.
  returned: always
  type: dict
services:
  description: Number of services in the table.
  returned: when state is present
  type: int
added:
  description: Services added.
  returned: when state is present
  type: list
  elements: dict
removed:
  description: Services removed.
  returned: when state is present
  type: list
  elements: dict
service_changes:
  description: Services changed, with C(backends_added), C(backends_removed), C(weights_changed) and changed fields.
  returned: when state is present
  type: list
  elements: dict
routes:
  description: Route changes made (or that would be made).
  returned: always
  type: list
  elements: str
nodeport:
  description: What changed in the edge load balancer's node settings (node address, pod CIDR, SNAT ports).
  returned: success
  type: list
  elements: str
pods:
  description:
    - The pod network - C(changes) (what was done or would be, besides routes), C(mtu) (the pod MTU), C(mode)
      (routing mode, or null without a pod network), C(host_routing) (the changes to the BPF host routing maps),
      C(endpoints) (endpoint programs attached to, moved on or detached from this node's pods), C(tunnel)
      (the overlay object's programs attached to or detached from the VXLAN device).
  returned: always
  type: dict
  sample:
    changes: ["create vxlan device kln_vxlan (vni 1, dstport 8472, local 192.168.1.11 dev eth0, mac 02:4b:c0:a8:01:0b, mtu 1450)"]
    mtu: 1450
    mode: tunnel
    host_routing: ["kln_pod_cidr4: add 10.244.11.0/24 (local)"]
    tunnel: ["attach overlay/kln_to_overlay to kln_vxlan (tcx_egress)"]
policy:
  description:
    - With the C(policy) object, the identity and policy maps made to match the node's policy state
      (M(kldload.netstack.network_policy)) and its pods - C(changes) (map changes) and C(diff) (which
      endpoints gain or lose which allowances).
  returned: always
  type: dict
  sample:
    changes: ["kln_ipcache4: add 10.244.11.2/32 -> identity 4711"]
    diff: ["demo/web-1: new endpoint, identity 4711 (k8s:app=web,k8s:io.kubernetes.pod.namespace=demo)"]
agent:
  description: Changes to the flow events' configuration and the agent's unit (written, enabled, started, restarted, removed).
  returned: success
  type: list
  elements: str
  version_added: 0.5.0
unit:
  description: Changes to the restore unit (written, enabled, removed).
  returned: always
  type: list
  elements: str
udp_sockets_destroyed:
  description: Connected UDP sockets destroyed because their backend left every service.
  returned: when state is present
  type: int
config:
  description: The node configuration as written.
  returned: when state is present
  type: dict
verifier_log:
  description: The tail of bpftool's output when an object failed to load.
  returned: on load failure
  type: str
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import argspec, lb, loader, podnet, routes, runtime
from ansible_collections.kldload.netstack.plugins.module_utils.runner import ToolError
from ansible_collections.kldload.netstack.plugins.module_utils.bpfsys import BpfError


def _config(p):
    return {"schema": runtime.SCHEMA, "pin_path": p["pin_path"], "bundle": p["bundle"],
            "objects": [{"name": o["name"],
                         "targets": {"cgroup": o["cgroup"] or None, "families": o["families"], "devices": o["devices"]}}
                        for o in p["objects"]],
            "maps": p["maps"],
            "lb": {"maglev_table_size": p["maglev_table_size"], "state_file": p["state_file"],
                   "destroy_udp_sockets": p["destroy_udp_sockets"]},
            "routes": p["routes"], "pods": p["pods"], "nodeport": p["nodeport"], "agent": p["agent"]}


def main():
    spec = dict(
        pin_path=argspec.PIN_PATH,
        objects=dict(type="list", elements="dict", default=[{"name": "sock_lb"}], options=dict(
            name=dict(type="str", required=True),
            cgroup=dict(type="path"),
            families=dict(type="list", elements="int", choices=[4, 6], default=[4, 6]),
            devices=dict(type="list", elements="str", default=[]),
        )),
        maps=dict(type="dict", default={}),
        bundle=dict(type="path", default=runtime.BUNDLE),
        restore_unit=dict(type="bool", default=True),
        routes=dict(type="list", elements="dict", default=[], options=dict(
            dst=dict(type="str", required=True),
            via=dict(type="str", required=True),
        )),
        pods=dict(type="dict", options=dict(
            cidr=dict(type="str", required=True),
            routing_mode=dict(type="str", choices=["tunnel", "native"], default="tunnel"),
            underlay_interface=dict(type="str", required=True),
            underlay_ip=dict(type="str", required=True),
            mtu=dict(type="int", default=0),
            vxlan=dict(type="dict", options=dict(
                device=dict(type="str", default="kln_vxlan"),
                vni=dict(type="int", default=1),
                port=dict(type="int", default=8472),
                external=dict(type="bool", default=False),
            )),
            nodes=dict(type="list", elements="dict", default=[], options=dict(
                name=dict(type="str", required=True),
                underlay_ip=dict(type="str", required=True),
                pod_cidr=dict(type="str", required=True),
                tunnel_identity=dict(type="bool", default=True),
            )),
            service_cidr=dict(type="str", default="10.96.0.0/12"),
            masquerade=dict(type="bool", default=True),
            encryption=dict(type="dict", options=dict(
                device=dict(type="str", required=True),
                strict=dict(type="bool", default=False),
                standby=dict(type="str"),
                node_to_node=dict(type="bool", default=False),
                fwmark=dict(type="int", default=0),
            )),
            cni=dict(type="dict", options=dict(
                conflist=dict(type="path", default="/etc/cni/net.d/05-kldload-netstack.conflist"),
                bin_dir=dict(type="path", default="/usr/lib/cni"),
            )),
        )),
        nodeport=dict(type="dict", options=dict(
            node_ip=dict(type="str", required=True),
            snat_port_min=dict(type="int", default=61000),
            snat_port_max=dict(type="int", default=65535),
        )),
        agent=dict(type="dict", options=dict(
            enabled=dict(type="bool", default=True),
            listen=dict(type="str"),
            node_name=dict(type="str"),
            buffer=dict(type="int", default=4096),
            aggregation=dict(type="str", choices=["none", "medium", "maximum"], default="medium"),
            drop_rate=dict(type="int", default=100),
            export=dict(type="dict", options=dict(
                path=dict(type="path", required=True),
                max_bytes=dict(type="int", default=10485760),
                keep=dict(type="int", default=3),
            )),
        )),
        config_path=dict(type="path", default=runtime.CONFIG_PATH),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    spec.update(argspec.SERVICES)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    cfg = _config(p)
    try:
        if p["state"] == "absent":
            res = runtime.remove(cfg, check=module.check_mode, config_path=p["config_path"], module=module,
                                 restore_unit=p["restore_unit"])
        else:
            res = runtime.apply(cfg, argspec.services_from_params(p), check=module.check_mode,
                                config_path=p["config_path"], module=module, restore_unit=p["restore_unit"])
    except loader.ProgError as e:
        module.fail_json(msg=str(e), verifier_log=e.details)
    except (runtime.ConfigError, lb.LbError, routes.RouteError, podnet.PodError) as e:
        module.fail_json(msg=str(e))
    except ToolError as e:
        module.fail_json(msg="applying the dataplane failed: %s" % e)
    except (BpfError, OSError) as e:
        module.fail_json(msg="applying the dataplane failed: %s" % e)
    dp = res["dataplane"]
    out = dict(changed=res["changed"], actions=dp["actions"], objects=dp["report"]["objects"],
               shared_maps=dp["report"]["globals"], routes=res["routes"], unit=res["unit"],
               pods={"changes": res["pods"]["changes"], "mtu": res["pods"]["mtu"],
                     "mode": cfg["pods"]["routing_mode"] if cfg["pods"] else None,
                     "host_routing": res.get("host_routing", []), "endpoints": res.get("endpoints", []),
                     "tunnel": res.get("tunnel", [])},
               policy={"changes": res.get("policy", {}).get("changes", []), "diff": res.get("policy", {}).get("diff", [])},
               nodeport=res.get("nodeport", []), agent=res.get("agent", []))
    if p["state"] == "present":
        d = res["lb"]["diff"]
        out.update(services=res["lb"]["services"], added=d["added"], removed=d["removed"], service_changes=d["changed"],
                   udp_sockets_destroyed=res["udp_sockets_destroyed"], config=json.loads(res["config"]["after"]))
    else:
        out["files_removed"] = res["files"]
    if module._diff:
        out["diff"] = _diff(res, p["state"])
    module.exit_json(**out)


def _diff(res, state):
    """before/after: the configuration file, then the dataplane, services and routes as text lines."""
    dp = res["dataplane"]
    before, after = [], []
    if state == "present":
        before.append(res["config"]["before"])
        after.append(res["config"]["after"])
    before.append("dataplane: %s" % json.dumps(dp["before"], sort_keys=True))
    after.append("dataplane: %s" % json.dumps(dp["after"], sort_keys=True))
    if state == "present":
        d = res["lb"]["diff"]
        before += ["service %s %s backends %s" % (s["service"], s["name"], ", ".join(s["backends"]) or "-")
                   for s in d["removed"]]
        after += ["service %s %s backends %s" % (s["service"], s["name"], ", ".join(s["backends"]) or "-")
                  for s in d["added"]]
        after += ["service %s %s changed: %s" % (c["service"], c["name"], json.dumps(
            dict((k, v) for k, v in c.items() if k not in ("service", "name")), sort_keys=True)) for c in d["changed"]]
    after += ["route %s" % r for r in res["routes"]]
    after += ["pods: %s" % c for c in res["pods"]["changes"]]
    after += ["endpoints: %s" % c for c in res.get("endpoints", [])]
    after += ["host routing: %s" % c for c in res.get("host_routing", [])]
    after += ["tunnel: %s" % c for c in res.get("tunnel", [])]
    after += ["policy: %s" % c for c in res.get("policy", {}).get("diff", []) + res.get("policy", {}).get("changes", [])]
    after += ["%s" % c for c in res.get("nodeport", [])]
    after += ["agent: %s" % c for c in res.get("agent", [])]
    after += ["unit: %s" % u for u in res["unit"]]
    return {"before": "\n".join(before) + "\n", "after": "\n".join(after) + "\n"}


if __name__ == "__main__":
    main()
