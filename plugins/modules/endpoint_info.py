#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: endpoint_info
short_description: The pod endpoints on a node, as the netstack-cni plugin recorded them
version_added: 0.3.0
description:
  - Returns the endpoint records that the C(netstack-cni) CNI plugin writes for every pod interface
    it is chained for (one JSON file per container and interface in O(endpoints_dir)), sorted by
    namespace and name - the same rows as C(netstack endpoint list --json) on the node.
  - Play code gathers every node's endpoints with it to find the pods a service's selector picks
    (their labels, ports and addresses).
  - A record that cannot be parsed is returned with C(state=invalid), not left out.
  - With O(bundle) and O(lbipam_state) it also returns what else the play gathers from every node before it
    programs the dataplane (which eBPF objects the node's release carries, the LoadBalancer IPs and NodePorts it
    was given last), so that one task, not three, visits every node.
  - Only reads files; never changes anything and always returns C(changed=false).
options:
  endpoints_dir:
    description: The directory of the endpoint records.
    type: path
    default: /var/lib/kldload-netstack/endpoints
  bundle:
    description:
      - The node's release bundle (C(netstack.pyz)); its eBPF object names are returned in RV(bundle_objects).
      - Not read when not given.
    type: path
    version_added: 0.5.0
  lbipam_state:
    description:
      - The file where the dataplane role keeps the LoadBalancer IPs and NodePorts it assigned; its document is
        returned in RV(lbipam_state).
      - Not read when not given. A file that is there but is not a JSON mapping fails the task, naming the file.
    type: path
    version_added: 0.5.0
notes:
  - Supports check mode; it never reports a change.
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Gather the node's pod endpoints
  kldload.netstack.endpoint_info:
  register: eps

- name: The pods labelled app=web on this node
  ansible.builtin.debug:
    msg: "{{ eps.endpoints | selectattr('labels.app', 'defined') | selectattr('labels.app', '==', 'web')
             | map(attribute='ips') | flatten }}"
"""

RETURN = r"""
endpoints:
  description: The endpoint records, sorted by namespace, name, container id and interface name.
  returned: always
  type: list
  elements: dict
  contains:
    container_id:
      description: The container (sandbox) id the runtime gave the plugin (C(CNI_CONTAINERID)).
      type: str
    ifname:
      description: The interface name inside the pod (C(CNI_IFNAME)).
      type: str
    netns:
      description: The pod's network namespace path (C(CNI_NETNS)).
      type: str
    network:
      description: The CNI network name.
      type: str
    namespace:
      description: The pod's namespace (C(K8S_POD_NAMESPACE) of C(CNI_ARGS)); empty when not given.
      type: str
    name:
      description: The pod's name (C(K8S_POD_NAME) of C(CNI_ARGS)); empty when not given.
      type: str
    pod_uid:
      description: The pod's UID (C(K8S_POD_UID)); empty when not given.
      type: str
    labels:
      description: The pod's labels (annotation C(netstack.kldload.io/labels)).
      type: dict
    ports:
      description: The pod's named ports, each C({name, port, protocol}) (annotation C(netstack.kldload.io/ports)).
      type: list
      elements: dict
    ips:
      description: The pod's addresses with prefix length, from the IPAM result.
      type: list
      elements: str
    host_interface:
      description: The host side of the pod's link (the ptp veth).
      type: str
    host_mac:
      description: The MAC address of RV(endpoints[].host_interface).
      type: str
    mac:
      description: The MAC address of the pod's interface.
      type: str
    state:
      description: C(ready), or C(invalid) for a record that cannot be parsed.
      type: str
    created:
      description: When the record was written (seconds since the epoch).
      type: int
  sample:
    - container_id: 7f3c2a91d0e84b5f
      ifname: eth0
      netns: /var/run/netns/cni-7f3c2a91
      network: kldload-netstack
      namespace: shop
      name: web-1
      pod_uid: 0d4c6f0e-1b7a-4c35-9d6e-8f2b4a1c9e77
      labels: {app: web}
      ports: [{name: http, port: 8080, protocol: TCP}]
      ips: [10.244.11.5/24]
      host_interface: veth5e1b2c3d
      host_mac: 9a:b3:79:70:d5:4d
      mac: b2:96:56:89:3f:a7
      state: ready
      created: 1764640000
bundle_objects:
  description: The eBPF objects the release bundle at O(bundle) carries, by name; null when there is no readable bundle.
  returned: when O(bundle) is given
  type: list
  elements: str
  sample: [host, lxc, nodeport, overlay, policy, sock_lb]
lbipam_state:
  description: The document of O(lbipam_state); null when the file is not there.
  returned: when O(lbipam_state) is given
  type: dict
  sample: {assignments: {}, node_ports: {}}
"""

import zipfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import cni, runtime


def _bundle_objects(path):
    try:
        return runtime.bundle_objects(path)
    except (OSError, IOError, zipfile.BadZipfile):
        return None


def _json_file(module, path):
    try:
        doc = cni.read_json(path)
    except (OSError, IOError) as e:
        module.fail_json(msg="lbipam_state %s: cannot be read: %s" % (path, e))
    except ValueError as e:
        module.fail_json(msg="lbipam_state %s: not JSON: %s" % (path, e))
    if doc is not None and not isinstance(doc, dict):
        module.fail_json(msg="lbipam_state %s: not a JSON mapping" % path)
    return doc


def main():
    module = AnsibleModule(
        argument_spec=dict(endpoints_dir=dict(type="path", default=cni.ENDPOINTS_DIR),
                           bundle=dict(type="path"),
                           lbipam_state=dict(type="path")),
        supports_check_mode=True,
    )
    p = module.params
    try:
        endpoints = cni.list_endpoints(p["endpoints_dir"])
    except OSError as e:
        module.fail_json(msg="endpoints_dir %s: cannot be read: %s" % (p["endpoints_dir"], e))
    res = dict(changed=False, endpoints=endpoints)
    if p["bundle"]:
        res["bundle_objects"] = _bundle_objects(p["bundle"])
    if p["lbipam_state"]:
        res["lbipam_state"] = _json_file(module, p["lbipam_state"])
    module.exit_json(**res)


if __name__ == "__main__":
    main()
