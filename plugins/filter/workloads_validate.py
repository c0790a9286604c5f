# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.workloads_validate - the inventory's workloads checked for the whole cluster
(docs: workloads_validate.yml next to this file; rules: plugins/module_utils/workloads.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import workloads as workloads_mod


def workloads_validate(workloads, namespaces=None, nodes=None):
    try:
        return workloads_mod.validate(workloads, namespaces, nodes)
    except ValueError as e:
        raise AnsibleFilterError(str(e))


class FilterModule(object):
    def filters(self):
        return {"workloads_validate": workloads_validate}
