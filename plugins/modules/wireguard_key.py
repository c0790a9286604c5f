#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: wireguard_key
short_description: The node's WireGuard key pair, made and kept on the node
version_added: 0.3.0
description:
  - Makes the node's WireGuard key pair when there is none - 32 random bytes from the node's kernel,
    the public key computed on the node (X25519) - in O(state_dir)C(/<interface>/), as C(private.key)
    (mode 0600, in a 0700 directory) and C(public.key). Returns the public key, never the private key;
    the private key is not read into the module's result, its arguments or any log, and it never leaves
    the node (M(kldload.netstack.wireguard_device) gives the device the file's path).
  - O(rotate=true) keeps the pair as C(previous.key) / C(previous.pub) and makes a new pair, once -
    while a previous pair is kept another O(rotate=true) is no change (retire first), so a rerun of a
    rotation does not rotate again. O(retire_previous=true) removes the previous pair.
  - A private key file whose mode is not 0600 is an error, and is left as it is.
options:
  interface:
    description: The WireGuard interface the pair is for (its directory under O(state_dir)).
    type: str
    default: kln_wg0
  state_dir:
    description: Where the node keeps its WireGuard keys.
    type: path
    default: /var/lib/kldload-netstack/wireguard
  rotate:
    description: Make a new pair and keep the current one as the previous pair (see above).
    type: bool
    default: false
  retire_previous:
    description: Remove the previous pair (the end of a rotation).
    type: bool
    default: false
  state:
    description: V(absent) removes every key file of O(interface).
    type: str
    choices: [present, absent]
    default: present
notes:
  - Supports check mode (in check mode before the pair exists, RV(public_key) is null) and diff mode (the public
    key before and after).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: The node's key pair
  kldload.netstack.wireguard_key:
  register: wg_key

- name: Start a rotation of the long-term key (the old pair is kept)
  kldload.netstack.wireguard_key:
    rotate: true

- name: End it
  kldload.netstack.wireguard_key:
    retire_previous: true
"""

RETURN = r"""
public_key:
  description: The node's public key (base64); null in check mode when a new pair would be made.
  returned: when state is present
  type: str
  sample: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
previous_public_key:
  description: The public key of the previous pair while a rotation keeps it, else null.
  returned: when state is present
  type: str
key_file:
  description: The path of the private key file on the node (its content is never returned).
  returned: always
  type: str
  sample: /var/lib/kldload-netstack/wireguard/kln_wg0/private.key
changes:
  description: What was done, or would be in check mode.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kldload.netstack.plugins.module_utils import wireguard


def main():
    module = AnsibleModule(argument_spec=dict(
        interface=dict(type="str", default=wireguard.DEFAULT_INTERFACE),
        state_dir=dict(type="path", default=wireguard.STATE_DIR),
        rotate=dict(type="bool", default=False),
        retire_previous=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    ), supports_check_mode=True)
    p = module.params
    try:
        if p["state"] == "absent":
            wireguard.check_name(p["interface"], "interface")
            res = wireguard.remove_key(p["state_dir"], p["interface"], check=module.check_mode)
            module.exit_json(changed=res["changed"], changes=res["changes"],
                             key_file=wireguard.key_paths(p["state_dir"], p["interface"])["private"])
        res = wireguard.ensure_key(p["state_dir"], p["interface"], rotate=p["rotate"], retire=p["retire_previous"],
                                   check=module.check_mode)
    except (wireguard.WgError, OSError, IOError) as e:
        module.fail_json(msg=str(e))
    out = dict((k, res[k]) for k in ("changed", "changes", "public_key", "previous_public_key", "key_file"))
    if module._diff:
        after = res["after"] or "(a new key, made on the node)"
        out["diff"] = {"before": "public_key: %s\n" % res["before"], "after": "public_key: %s\n" % after}
    module.exit_json(**out)


if __name__ == "__main__":
    main()
