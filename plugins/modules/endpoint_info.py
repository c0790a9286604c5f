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
  - Only reads files; never changes anything and always returns C(changed=false).
options:
  endpoints_dir:
    description: The directory of the endpoint records.
    type: path
    default: /var/lib/kldload-netstack/endpoints
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
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import cni


def main():
    module = AnsibleModule(
        argument_spec=dict(endpoints_dir=dict(type="path", default=cni.ENDPOINTS_DIR)),
        supports_check_mode=True,
    )
    try:
        endpoints = cni.list_endpoints(module.params["endpoints_dir"])
    except OSError as e:
        module.fail_json(msg="endpoints_dir %s: cannot be read: %s" % (module.params["endpoints_dir"], e))
    module.exit_json(changed=False, endpoints=endpoints)


if __name__ == "__main__":
    main()
