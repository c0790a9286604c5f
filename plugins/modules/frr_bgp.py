#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: frr_bgp
short_description: FRR's BGP daemon on a node, from structured data, applied by difference
version_added: 0.3.0
description:
  - Programs the node's FRR (bgpd) with one BGP instance in the default VRF - local AS O(asn), router id
    O(router_id), the neighbours O(neighbors) (AS, password, timers, BFD, graceful restart, multihop,
    description, address families) - announcing exactly O(announce) (IPv4 and IPv6 unicast) and accepting
    only O(accept) (default nothing).
  - B(What it owns) - the C(router bgp) block of the default VRF, prefix-lists and route-maps named C(KLN-*),
    the BFD profile C(KLN-BFD). Everything else in FRR's configuration (interfaces, static routes, other daemons
    and VRFs, other route-maps) is kept as it is.
  - B(By difference) - the wanted configuration is the running one with the owned blocks replaced;
    C(frr-reload.py --test) says which lines that adds and removes (nothing when the configuration is already there,
    so sessions are never reset by a run that changes nothing) and C(frr-reload.py --reload) applies only those
    lines; FRR then saves C(/etc/frr/frr.conf), which the module keeps mode 0640, owner frr:frr.
  - Makes sure C(bgpd) (and C(bfdd) when a neighbour uses BFD) is enabled in C(/etc/frr/daemons) - restarting FRR
    when that changes - and that C(frr.service) is enabled and running.
  - B(Policy) - an export route-map permits only the announced prefixes (C(network) statements with
    C(no bgp network import-check), so a service address needs no route on the node); the import route-map denies
    everything unless O(accept) lists prefixes.
  - Everything is validated before FRR is touched, and the whole configuration is run through C(vtysh -C)
    (FRR's own parser) before anything is applied; errors name the field (C(neighbors[0] (192.168.1.1).password)).
  - Passwords are never returned, logged or shown in a diff (masked as C(********)); O(neighbors[].password) is
    C(no_log).
options:
  asn:
    description: The node's AS number (1-4294967295, asplain or asdot; 23456 is refused).
    type: raw
  router_id:
    description: The BGP router id, an IPv4 address (usually the node's underlay address).
    type: str
  neighbors:
    description: The BGP neighbours (peers).
    type: list
    elements: dict
    default: []
    suboptions:
      address:
        description: The neighbour's address (IPv4 or IPv6; C(/32) or C(/128) allowed).
        type: str
        required: true
      asn:
        description: The neighbour's AS number.
        type: raw
        required: true
      password:
        description: TCP MD5 password (1-80 printable characters, no white space, quotes or backslash).
        type: str
      description:
        description: A one-line description.
        type: str
      keepalive:
        description: Keepalive seconds (with O(neighbors[].hold)); default FRR's.
        type: int
      hold:
        description: Hold time seconds (0 or at least 3).
        type: int
      connect_retry:
        description: Seconds between connection attempts.
        type: int
      bfd:
        description: BFD for the session (profile C(KLN-BFD), O(bfd_interval) and O(bfd_multiplier)).
        type: bool
        default: false
      graceful_restart:
        description: Per-neighbour graceful restart (true - on, false - off); default the global O(graceful_restart).
        type: bool
      multihop:
        description: eBGP multihop TTL; V(0) - the neighbour must be on the underlay (directly connected).
        type: int
        default: 0
      address_families:
        description: The unicast address families activated for the neighbour; default the family of its address.
        type: list
        elements: str
        choices: [ipv4, ipv6]
  announce:
    description: The prefixes announced (IPv4 and IPv6), e.g. the node's LoadBalancer IPs as /32 and /128.
    type: list
    elements: str
    default: []
  accept:
    description: The prefixes accepted from neighbours; empty - nothing (the default).
    type: list
    elements: str
    default: []
  graceful_restart:
    description: C(bgp graceful-restart) for the instance.
    type: bool
    default: false
  bfd_interval:
    description: BFD transmit and receive interval in milliseconds (detection time = interval x multiplier).
    type: int
    default: 300
  bfd_multiplier:
    description: BFD detect multiplier.
    type: int
    default: 3
  underlay_interface:
    description:
      - The node's underlay device; a neighbour without O(neighbors[].multihop) must be inside one of its networks.
    type: str
  underlay_networks:
    description: The underlay's networks, given instead of (or besides) O(underlay_interface).
    type: list
    elements: str
    default: []
  state:
    description: V(absent) removes the BGP instance and the owned prefix-lists, route-maps and BFD profile (FRR keeps running).
    type: str
    choices: [present, absent]
    default: present
notes:
  - Supports check mode and diff mode (the configuration lines removed and added, passwords masked).
  - Needs FRR with C(vtysh) and C(frr-reload.py) (Debian - packages C(frr) and C(frr-pythontools)).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Peer with the LAN router and announce two service addresses
  kldload.netstack.frr_bgp:
    asn: 65001
    router_id: 192.168.1.21
    underlay_interface: eth0
    neighbors:
      - address: 192.168.1.1
        asn: 65000
        password: "{{ vault_bgp_password }}"
        keepalive: 3
        hold: 9
        bfd: true
    announce: [192.168.10.1/32, 192.168.10.2/32]
    bfd_interval: 100
"""

RETURN = r"""
removed:
  description: Configuration lines removed (or that would be), each with its context (C(router bgp 65001 > ...)); passwords masked.
  returned: always
  type: list
  elements: str
added:
  description: Configuration lines added (or that would be); passwords masked.
  returned: always
  type: list
  elements: str
daemons:
  description: FRR daemons enabled in C(/etc/frr/daemons) by this run.
  returned: always
  type: list
  elements: str
service:
  description: What was done to C(frr.service) (enable, start, restart).
  returned: always
  type: list
  elements: str
files:
  description: Permission fixes of C(/etc/frr/frr.conf).
  returned: always
  type: list
  elements: str
config:
  description: The configuration the module owns, as wanted (passwords masked).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kldload.netstack.plugins.module_utils import frr
from ansible_collections.kldload.netstack.plugins.module_utils.runner import ToolError


def main():
    module = AnsibleModule(argument_spec=dict(
        asn=dict(type="raw"),
        router_id=dict(type="str"),
        neighbors=dict(type="list", elements="dict", default=[], options=dict(
            address=dict(type="str", required=True),
            asn=dict(type="raw", required=True),
            password=dict(type="str", no_log=True),
            description=dict(type="str"),
            keepalive=dict(type="int"),
            hold=dict(type="int"),
            connect_retry=dict(type="int"),
            bfd=dict(type="bool", default=False),
            graceful_restart=dict(type="bool"),
            multihop=dict(type="int", default=0),
            address_families=dict(type="list", elements="str", choices=["ipv4", "ipv6"]),
        )),
        announce=dict(type="list", elements="str", default=[]),
        accept=dict(type="list", elements="str", default=[]),
        graceful_restart=dict(type="bool", default=False),
        bfd_interval=dict(type="int", default=frr.BFD_DEFAULT_INTERVAL),
        bfd_multiplier=dict(type="int", default=frr.BFD_DEFAULT_MULTIPLIER),
        underlay_interface=dict(type="str"),
        underlay_networks=dict(type="list", elements="str", default=[]),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    ), required_if=[("state", "present", ("asn", "router_id"))], supports_check_mode=True)
    p = module.params
    secrets = [n.get("password") for n in p["neighbors"] if n.get("password")]
    try:
        underlay = list(p["underlay_networks"])
        if p["state"] == "present" and p["underlay_interface"]:
            underlay += frr.interface_networks(p["underlay_interface"], module)
        fields = ("asn", "router_id", "announce", "accept", "graceful_restart", "bfd_interval", "bfd_multiplier", "state")
        spec = dict((k, p[k]) for k in fields)
        spec["underlay_networks"] = underlay
        spec["neighbors"] = [dict((k, v) for k, v in n.items() if v is not None) for n in p["neighbors"]]
        spec = frr.normalize(spec)
        res = frr.apply(spec, frr.Frr(module), check=module.check_mode)
    except frr.FrrError as e:
        module.fail_json(msg=frr.mask(str(e), secrets), changed=False)
    except (frr.FrrRuntimeError, ToolError, OSError, IOError) as e:
        module.fail_json(msg=frr.mask(str(e), secrets))
    out = dict(changed=res["changed"], removed=res["removed"], added=res["added"], daemons=res["daemons"],
               service=res["service"], files=res["files"], config=res["config"])
    if module._diff:
        out["diff"] = {"before_header": "FRR configuration lines removed", "after_header": "FRR configuration lines added",
                       "before": "".join("%s\n" % x for x in res["removed"]),
                       "after": "".join("%s\n" % x for x in res["added"] + res["service"] + res["files"])}
    module.exit_json(**out)


if __name__ == "__main__":
    main()
