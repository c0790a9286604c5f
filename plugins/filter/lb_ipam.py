# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.lb_ipam - LoadBalancer IPs and NodePorts for the cluster's services (docs: lb_ipam.yml
next to this file; rules: plugins/module_utils/lbipam.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import lbipam


def lb_ipam(services, pools=None, pod_cidrs=None, service_cidr=None, previous=None, node_port_range=None):
    try:
        rng = tuple(int(x) for x in str(node_port_range or "30000-32767").split("-"))
        if len(rng) != 2 or not 1 <= rng[0] <= rng[1] <= 65535:
            raise lbipam.IpamError("node_port_range: %r is not LOW-HIGH" % (node_port_range,))
        return lbipam.plan(services or [], pools or [], [c for c in pod_cidrs or [] if c], service_cidr or None,
                           previous or {}, rng)
    except ValueError as e:
        raise AnsibleFilterError(str(e))


class FilterModule(object):
    def filters(self):
        return {"lb_ipam": lb_ipam}
