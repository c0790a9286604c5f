# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.lb_node_services - one node's service table (ClusterIP, LoadBalancer IP and NodePort
entries) from the resolved services (docs: lb_node_services.yml next to this file)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import lbipam


def lb_node_services(services, node_ip=None, pod_cidr=None):
    try:
        return lbipam.node_table(services or [], node_ip or None, pod_cidr or None)
    except ValueError as e:
        raise AnsibleFilterError(str(e))


class FilterModule(object):
    def filters(self):
        return {"lb_node_services": lb_node_services}
