# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.bgp_node_config - CiliumBGPPeeringPolicy documents turned into one node's frr_bgp
arguments (docs: bgp_node_config.yml next to this file; rules: plugins/module_utils/bgppolicy.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import bgppolicy


def bgp_node_config(policies, node, labels=None, underlay_ip=None, pod_cidr=None, services=None, secrets=None,
                    bfd=False, bfd_interval=300, bfd_multiplier=3):
    try:
        return bgppolicy.node_config(policies or [], node, labels or {}, underlay_ip, pod_cidr or None, services or [],
                                     secrets or {}, bool(bfd), int(bfd_interval), int(bfd_multiplier))
    except ValueError as e:
        raise AnsibleFilterError(str(e))


class FilterModule(object):
    def filters(self):
        return {"bgp_node_config": bgp_node_config}
