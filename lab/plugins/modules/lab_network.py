#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: lab_network
short_description: The shared links of the one-machine lab (management bridge and LAN segment)
version_added: 0.1.0
description:
  - Creates or removes the two shared segments of the lab on the machine that hosts it.
  - The management bridge lives in the controller's network namespace and carries SSH to the nodes.
  - The LAN (underlay) bridge lives in a network namespace of its own, so the nodes' LAN is not
    reachable from, routed to, or forwarded into the host's network.
  - Runs on the lab host with a local connection, as root. Not meant for real nodes.
options:
  state:
    description: Whether the segments exist.
    type: str
    choices: [present, absent]
    default: present
  mgmt_bridge:
    description: Name of the management bridge in the host's namespace.
    type: str
    default: klnmgmt0
  mgmt_address:
    description: Address (CIDR) of the controller on the management bridge.
    type: str
    default: 10.77.0.1/24
  lan_netns:
    description: Network namespace that holds the LAN bridge.
    type: str
    default: kln-lan
  lan_bridge:
    description: Name of the LAN bridge inside O(lan_netns).
    type: str
    default: lan0
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Lab segments
  kldload.netstack_lab.lab_network:
    state: present
"""

RETURN = r"""
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack_lab.plugins.module_utils.lab import Lab, LabError
from ansible_collections.kldload.netstack.plugins.module_utils.runner import ToolError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            mgmt_bridge=dict(type="str", default="klnmgmt0"),
            mgmt_address=dict(type="str", default="10.77.0.1/24"),
            lan_netns=dict(type="str", default="kln-lan"),
            lan_bridge=dict(type="str", default="lan0"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    lab = Lab(module, check=module.check_mode)
    try:
        if p["state"] == "present":
            lab.ensure_bridge(p["mgmt_bridge"], p["mgmt_address"])
            lab.ensure_netns(p["lan_netns"])
            if not module.check_mode or lab.netns_exists(p["lan_netns"]):
                lab.ensure_bridge(p["lan_bridge"], None, p["lan_netns"])
            else:
                lab.actions.append("create bridge %s" % p["lan_bridge"])
        else:
            lab.delete_link(p["mgmt_bridge"])
            lab.delete_netns(p["lan_netns"])
    except (LabError, ToolError) as e:
        module.fail_json(msg=str(e), actions=lab.actions)
    result = dict(changed=bool(lab.actions), actions=lab.actions)
    if module._diff:
        result["diff"] = dict(before="", after="".join(a + "\n" for a in lab.actions))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
