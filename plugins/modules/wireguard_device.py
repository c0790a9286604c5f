#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: wireguard_device
short_description: A WireGuard device and its peers, on the kernel's WireGuard or wireguard-go
version_added: 0.3.0
description:
  - Makes the WireGuard device O(name) listen on O(listen_port) with the node's private key (the file
    M(kldload.netstack.wireguard_key) made; the device reads it there, the module never returns or logs it)
    and hold exactly the peers O(peers).
  - B(Backends), picked automatically (O(backend=auto)) and reported in RV(backend) - V(kernel), the kernel's
    WireGuard (the link made through netlink), and V(userspace), C(wireguard-go) (a TUN device served through
    its UAPI socket C(/var/run/wireguard/<name>.sock)) where the kernel has no WireGuard; the module warns when
    it uses wireguard-go. Both are configured and read with C(wg) (wireguard-tools).
  - B(Peers) are applied by difference in one C(wg set) - a new peer added, a changed one updated in place
    (its allowed IPs replaced, never removed and re-added, so its session stays), one no longer listed
    removed, unchanged ones not touched.
  - The MTU is O(mtu), or (V(0)) the MTU of O(underlay_interface) minus 60 (outer IPv4, UDP and WireGuard's
    header and tag) minus O(extra_overhead) (50 for VXLAN carried over the device).
  - Everything is validated before the device is touched - a malformed key, two peers with the same key or
    this node's own, allowed IPs overlapping between peers, an endpoint that is not ADDRESS:PORT, a listening
    port in use, an interface name too long or already used by another kind of device - and a failure names
    the field.
  - O(state=absent) deletes the device (and with it its peers).
options:
  name:
    description: The interface name (at most 15 characters).
    type: str
    default: kln_wg0
  listen_port:
    description: The UDP port the device listens on.
    type: int
    default: 51871
  private_key_file:
    description:
      - The node's private key file (mode 0600). Default C(/var/lib/kldload-netstack/wireguard/<name>/private.key),
        where M(kldload.netstack.wireguard_key) keeps it.
    type: path
  backend:
    description: V(auto) - the kernel's WireGuard when the kernel has it, else wireguard-go.
    type: str
    choices: [auto, kernel, userspace]
    default: auto
  mtu:
    description: The device MTU; V(0) - from O(underlay_interface).
    type: int
    default: 0
  underlay_interface:
    description: The device the encrypted packets leave by (for the MTU).
    type: str
  extra_overhead:
    description: Bytes to leave for what is carried inside the device besides IP (50 for VXLAN).
    type: int
    default: 0
  fwmark:
    description:
      - The firewall mark of the device's own (encrypted) packets; V(0) - none. With node-to-node encryption the
        rule that sends the other nodes' addresses into the device skips packets with this mark, so the encrypted
        packets to those same addresses leave by the underlay.
    type: int
    default: 0
  peers:
    description: Every peer of the device.
    type: list
    elements: dict
    default: []
    suboptions:
      public_key:
        description: The peer's public key (base64).
        type: str
        required: true
      endpoint:
        description: The peer's ADDRESS:PORT (an IP address; names are not resolved).
        type: str
      allowed_ips:
        description: The networks the peer may send from and that are sent to it.
        type: list
        elements: str
        default: []
      persistent_keepalive:
        description: Seconds between keepalives; V(0) - off.
        type: int
        default: 0
      name:
        description: A label for the peer in the changes (the node's name).
        type: str
  restore_unit:
    description:
      - Save the configuration (C(/etc/kldload-netstack/wireguard/<name>.json), 0600, no key material) and enable
        C(netstack-wireguard-<name>.service), which brings the device back at boot before the dataplane - as the
        unit's own C(wireguard-go) process on the userspace backend (then also how the module starts it), a one-shot
        on the kernel backend - and applies the saved configuration (C(netstack encrypt restore)).
    type: bool
    default: false
  state:
    description: V(absent) deletes the device (and its unit and saved configuration).
    type: str
    choices: [present, absent]
    default: present
notes:
  - Supports check mode and diff mode (the device's public state - public key, port, peers - before and after).
  - On the V(userspace) backend the module starts C(wireguard-go <name>) (through the unit with O(restore_unit) on a
    systemd node), which keeps running until the device is deleted.
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: The node's key
  kldload.netstack.wireguard_key:
  register: wg_key

- name: The device with one peer per other node
  kldload.netstack.wireguard_device:
    underlay_interface: eth0
    peers:
      - name: worker1
        public_key: "{{ hostvars['worker1'].wg_key.public_key }}"
        endpoint: 192.168.1.21:51871
        allowed_ips: [10.244.11.0/24]
"""

RETURN = r"""
backend:
  description: The backend the device runs on.
  returned: when state is present
  type: str
  sample: kernel
public_key:
  description: This node's public key (of O(private_key_file)).
  returned: when state is present
  type: str
mtu:
  description: The device MTU.
  returned: when state is present
  type: int
  sample: 1440
changes:
  description: What was done, or would be in check mode.
  returned: always
  type: list
  elements: str
  sample: ["create kln_wg0 (userspace backend)", "listen on UDP 51871", "add peer ... endpoint 192.168.1.21:51871"]
peers:
  description: The device's peers now - per public key the endpoint, allowed IPs, keepalive, latest handshake
    (Unix seconds, 0 - none yet) and bytes received and sent.
  returned: when state is present
  type: dict
"""

import json

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kldload.netstack.plugins.module_utils import wireguard
from ansible_collections.kldload.netstack.plugins.module_utils.runner import ToolError


def _text(view):
    """The configured state only (no handshake times or byte counters: they move by themselves)."""
    if not view:
        return "(none)\n"
    peers = dict((k, dict((f, v) for f, v in p.items() if f in ("endpoint", "allowed_ips", "persistent_keepalive")))
                 for k, p in (view.get("peers") or {}).items())
    return json.dumps(dict(view, peers=peers), indent=1, sort_keys=True) + "\n"


def main():
    module = AnsibleModule(argument_spec=dict(
        name=dict(type="str", default=wireguard.DEFAULT_INTERFACE),
        listen_port=dict(type="int", default=wireguard.DEFAULT_PORT),
        private_key_file=dict(type="path"),
        backend=dict(type="str", choices=list(wireguard.BACKENDS), default="auto"),
        mtu=dict(type="int", default=0),
        underlay_interface=dict(type="str"),
        extra_overhead=dict(type="int", default=0),
        fwmark=dict(type="int", default=0),
        peers=dict(type="list", elements="dict", default=[], options=dict(
            public_key=dict(type="str", required=True),
            endpoint=dict(type="str"),
            allowed_ips=dict(type="list", elements="str", default=[]),
            persistent_keepalive=dict(type="int", default=0),
            name=dict(type="str"),
        )),
        restore_unit=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    ), supports_check_mode=True)
    p = module.params
    try:
        if p["state"] == "absent":
            wireguard.check_name(p["name"], "name")
            res = wireguard.remove(p["name"], check=module.check_mode, module=module)
            module.exit_json(changed=res["changed"], changes=res["changes"])
        fields = ("name", "listen_port", "private_key_file", "backend", "mtu", "underlay_interface", "extra_overhead",
                  "fwmark", "peers")
        cfg = wireguard.normalize(dict((k, p[k]) for k in fields))
        res = wireguard.apply(cfg, check=module.check_mode, module=module, persist=p["restore_unit"])
    except (wireguard.WgError, ToolError, OSError, IOError) as e:
        module.fail_json(msg=str(e))
    for w in res["warnings"]:
        module.warn(w)
    out = dict(changed=res["changed"], changes=res["changes"], backend=res["backend"], public_key=res["public_key"],
               mtu=res["mtu"], peers=(res["after"] or {}).get("peers") or {})
    if module._diff:
        out["diff"] = {"before": _text(res["before"]), "after": _text(res["after"]) if not module.check_mode
                       else "".join("%s\n" % c for c in res["changes"]) or _text(res["before"])}
    module.exit_json(**out)


if __name__ == "__main__":
    main()
