#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: lab_node
short_description: One node of the one-machine lab, a systemd-nspawn container booting systemd
version_added: 0.1.0
description:
  - Gives a node its own network namespace, a management link into the management bridge and a
    LAN link into the LAN bridge, an overlay root on top of the cached root filesystem, and boots
    systemd in it with systemd-nspawn. Waits until the node's SSH server answers.
  - The nspawn process id is recorded; stopping signals that process only.
  - If a node does not come up, the module fails naming the node and shows the end of its boot log.
  - Runs on the lab host with a local connection, as root. Not meant for real nodes.
options:
  name:
    description: Node (machine and host) name. At most 12 characters.
    type: str
    required: true
  state:
    description:
      - V(started) creates and boots the node, V(absent) stops it and removes everything it made.
      - V(restarted) stops a running node (clean poweroff) and boots it again with the same root,
        as a reboot of a real machine would.
    type: str
    choices: [started, restarted, absent]
    default: started
  rootfs:
    description: The cached root filesystem, used read-only as the overlay's lower layer.
    type: path
  state_dir:
    description: Where the lab keeps per-node state (overlay layers, pid file, boot log).
    type: path
    default: /var/lib/kldload-netstack/lab
  mgmt_bridge:
    description: Management bridge in the host's namespace.
    type: str
    default: klnmgmt0
  mgmt_address:
    description: Node address (CIDR) on the management link, interface C(mgmt0) in the node.
    type: str
  lan_netns:
    description: Network namespace holding the LAN bridge.
    type: str
    default: kln-lan
  lan_bridge:
    description: LAN bridge inside O(lan_netns).
    type: str
    default: lan0
  lan_address:
    description: Node address (CIDR) on the LAN, interface C(eth0) in the node.
    type: str
  lan_address6:
    description: The node's IPv6 address (CIDR) on the LAN, on C(eth0) too (BGP over IPv6).
    type: str
  authorized_key:
    description: SSH public key allowed to log in as root.
    type: str
  boot_timeout:
    description: Seconds to wait for the node's SSH server.
    type: int
    default: 90
  wait:
    description:
      - Wait until the node's SSH server answers. Set to V(false) to boot several nodes at once,
        then run again with V(true) to wait for them.
    type: bool
    default: true
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Boot a worker
  kldload.netstack_lab.lab_node:
    name: worker1
    rootfs: /var/cache/kldload-netstack/rootfs-trixie-0123abcd
    mgmt_address: 10.77.0.12/24
    lan_address: 192.168.1.12/24
    authorized_key: "{{ lookup('ansible.builtin.file', '/var/lib/kldload-netstack/lab/id_ed25519.pub') }}"
"""

RETURN = r"""
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
pid:
  description: Process id of the node's systemd-nspawn.
  returned: when the node runs
  type: int
netns:
  description: The node's network namespace.
  returned: always
  type: str
"""

import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack_lab.plugins.module_utils.lab import Lab, LabError, Node
from ansible_collections.kldload.netstack.plugins.module_utils.runner import ToolError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["started", "restarted", "absent"], default="started"),
            rootfs=dict(type="path"),
            state_dir=dict(type="path", default="/var/lib/kldload-netstack/lab"),
            mgmt_bridge=dict(type="str", default="klnmgmt0"),
            mgmt_address=dict(type="str"),
            lan_netns=dict(type="str", default="kln-lan"),
            lan_bridge=dict(type="str", default="lan0"),
            lan_address=dict(type="str"),
            lan_address6=dict(type="str"),
            authorized_key=dict(type="str", no_log=False),
            boot_timeout=dict(type="int", default=90),
            wait=dict(type="bool", default=True),
        ),
        required_if=[("state", "started", ("rootfs", "mgmt_address", "lan_address", "authorized_key")),
                     ("state", "restarted", ("rootfs", "mgmt_address", "lan_address", "authorized_key"))],
        supports_check_mode=True,
    )
    p = module.params
    if not re.match(r"^[a-z][a-z0-9]{0,11}$", p["name"]):
        module.fail_json(msg="name: %r must be 1-12 lowercase letters/digits starting with a letter" % p["name"])
    lab = Lab(module, check=module.check_mode)
    try:
        node = Node(lab, p)
        before = node.status()
        if p["state"] == "absent":
            node.remove()
        else:
            if p["state"] == "restarted":
                node.stop()
            node.start()
    except (LabError, ToolError, OSError) as e:
        module.fail_json(msg=str(e), actions=lab.actions)
    after = before if module.check_mode else node.status()
    result = dict(changed=bool(lab.actions), actions=lab.actions, netns=node.netns)
    if after.get("pid"):
        result["pid"] = after["pid"]
    if module._diff:
        result["diff"] = dict(before=before, after=after)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
