#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: network_policy
short_description: Kubernetes NetworkPolicy and CiliumNetworkPolicy enforced by identity in eBPF on a node
version_added: 0.4.0
description:
  - Takes the cluster's network policies - C(NetworkPolicy) (networking.k8s.io/v1), C(CiliumNetworkPolicy) and
    C(CiliumClusterwideNetworkPolicy) (cilium.io/v2) documents, as data or as YAML text - and the cluster's pods
    (the endpoints every node's CNI plugin recorded), and makes this node enforce them - security identities from
    label sets, the ipcache (every pod and node address to its identity), the CIDR identities the policies name,
    and per pod of this node its ingress and egress entries in the policy maps the C(policy) object's programs
    read at tc (docs/policy.md).
  - Everything is validated first; an invalid document, selector, label, port, protocol, CIDR, an unknown field or
    a field this dataplane does not enforce yet (L7 rules, toFQDNs, toServices, ...) fails naming each by its path,
    and nothing on the node changes.
  - Writes the node's policy state (O(state_path)); the same apply runs again at every dataplane apply, at boot,
    and when the CNI plugin adds or deletes a pod (a pod made outside a play is enforced at once on its node;
    other nodes learn of it at the next play). Policies no longer listed are removed.
  - Each endpoint's entries change atomically (no packet sees half of the old and half of the new rules).
  - Check mode and diff mode list which endpoints gain or lose which allowances.
options:
  policies:
    description: Policy documents (each a mapping with apiVersion, kind, metadata, spec or specs).
    type: list
    elements: dict
    default: []
  policy_texts:
    description: Policy documents as YAML text (several documents, or a List kind, per text), named in errors by O(policy_texts[].name).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Where the text comes from (a file name).
        type: str
        required: true
      text:
        description: The YAML text.
        type: str
        required: true
  namespaces:
    description: The cluster's namespaces and their labels (a namespace not listed has only C(kubernetes.io/metadata.name)).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Namespace name.
        type: str
        required: true
      labels:
        description: Its labels.
        type: dict
        default: {}
  endpoints:
    description:
      - The pods of every node (M(kldload.netstack.endpoint_info) gathered from each node, with C(node) set to the
        node's name). This node's own pods are taken from its endpoint records instead, which are authoritative.
    type: list
    elements: dict
    default: []
  kube_apiserver:
    description: The API server's addresses (identity C(kube-apiserver)).
    type: list
    elements: str
    default: []
  node:
    description: This node's name as the other nodes' pods and the inventory name it.
    type: str
    required: true
  state:
    description: C(absent) removes every policy (nothing enforced) and the policy files.
    type: str
    choices: [present, absent]
    default: present
  state_path:
    description: The node's policy state file.
    type: path
    default: /etc/kldload-netstack/policy.json
  config_path:
    description: The node configuration the dataplane role wrote (its pin path and pod network).
    type: path
    default: /etc/kldload-netstack/dataplane.json
notes:
  - Supports check mode and diff mode.
  - Needs the dataplane with the C(policy) object (the dataplane role loads it on nodes with pods).
seealso:
  - module: kldload.netstack.endpoint_info
  - module: kldload.netstack.node_dataplane
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: The policies of the cluster on every node
  kldload.netstack.network_policy:
    node: "{{ inventory_hostname }}"
    policies:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: backend-ingress, namespace: production}
        spec:
          podSelector: {matchLabels: {app: backend}}
          policyTypes: [Ingress]
          ingress:
            - from: [{podSelector: {matchLabels: {app: frontend}}}]
              ports: [{protocol: TCP, port: 8080}]
    policy_texts:
      - name: policies/default-deny.yaml
        text: "{{ lookup('ansible.builtin.file', 'policies/default-deny.yaml') }}"
    namespaces: [{name: production, labels: {team: shop}}]
    endpoints: "{{ gathered_endpoints }}"
"""

RETURN = r"""
policies:
  description: The policies in force, as C(<kind> <namespace>/<name>).
  returned: always
  type: list
  elements: str
diff_lines:
  description: Which endpoints of this node gain or lose which allowances and denials, and enforcement changes.
  returned: always
  type: list
  elements: str
  sample: ["production/backend-1: ingress now isolated (default deny)",
           "production/backend-1: ingress + allow from identity 48213 (k8s:app=frontend) TCP/8080 (NetworkPolicy production/backend-ingress ingress[0])"]
changes:
  description: The map changes made (or that would be made).
  returned: always
  type: list
  elements: str
identities:
  description: The number of security identities the node knows.
  returned: always
  type: int
endpoints:
  description: The number of this node's pods in the policy maps.
  returned: always
  type: int
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import cni, runtime
from ansible_collections.kldload.netstack.plugins.module_utils.bpfsys import BpfError
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps, node, parse
from ansible_collections.kldload.netstack.plugins.module_utils.policy.parse import PolicyError

_ENDPOINT_KEYS = ("namespace", "name", "node", "labels", "ips", "ports")


def _state(p):
    """The new policy state from the parameters; PolicyError naming every problem."""
    docs = list(p["policies"])
    errors = []
    for t in p["policy_texts"]:
        try:
            docs += parse.load_text(t["text"], t["name"])
        except PolicyError as e:
            errors.append(str(e))
    if errors:
        raise PolicyError("\n".join(errors))
    eps = []
    for e in p["endpoints"]:
        if not isinstance(e, dict) or e.get("state", "ready") != "ready":
            continue
        eps.append(dict((k, e.get(k)) for k in _ENDPOINT_KEYS))
    eps.sort(key=lambda e: (str(e.get("namespace")), str(e.get("name")), str(e.get("node"))))
    namespaces = dict((n["name"], n.get("labels") or {}) for n in p["namespaces"])
    return node.validate_state({"schema": node.SCHEMA, "node": p["node"], "policies": docs,
                                "cluster": {"namespaces": namespaces, "endpoints": eps,
                                            "kube_apiserver": sorted(p["kube_apiserver"])}}, "parameters")


def main():
    module = AnsibleModule(argument_spec=dict(
        policies=dict(type="list", elements="dict", default=[]),
        policy_texts=dict(type="list", elements="dict", default=[], options=dict(
            name=dict(type="str", required=True), text=dict(type="str", required=True))),
        namespaces=dict(type="list", elements="dict", default=[], options=dict(
            name=dict(type="str", required=True), labels=dict(type="dict", default={}))),
        endpoints=dict(type="list", elements="dict", default=[]),
        kube_apiserver=dict(type="list", elements="str", default=[]),
        node=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        state_path=dict(type="path", default=node.STATE_PATH),
        config_path=dict(type="path", default=runtime.CONFIG_PATH),
    ), supports_check_mode=True)
    p = module.params
    check = module.check_mode
    cfg = None
    try:
        want = _state(p) if p["state"] == "present" else node.default_state()
        before = node.read_state(p["state_path"])
        # check mode on a node the dataplane role has not set up yet: nothing to read, everything would change
        if os.path.exists(p["config_path"]) or (p["state"] == "present" and not check):
            cfg = runtime.read_config(p["config_path"])
    except (PolicyError, runtime.ConfigError) as e:
        module.fail_json(msg=str(e))
    before_text = node.state_text(before) if p["state"] == "present" or before != node.default_state() else ""
    after_text = node.state_text(want) if p["state"] == "present" else ""
    file_changed = before_text != after_text or (p["state"] == "absent" and node.remove(state_path=p["state_path"], check=True))
    res = {"changed": False, "changes": [], "diff": [], "identities": 0, "endpoints": 0}
    try:
        if cfg is not None and node.OBJECT in [o["name"] for o in cfg["objects"]]:
            res = node.apply(runtime.globals_dir(cfg), want, cni.list_endpoints(), cfg["pods"], check=check,
                             tunnel=node.TUNNEL_OBJECT in [o["name"] for o in cfg["objects"]])
        elif p["state"] == "present" and cfg is not None:
            module.fail_json(msg="%s: the dataplane of this node has no %s object (the dataplane role loads it on a node "
                                 "with pods)" % (p["config_path"], node.OBJECT))
        if not check:
            if p["state"] == "present" and before_text != after_text:
                node.write_json(p["state_path"], after_text)
            elif p["state"] == "absent":
                node.remove(state_path=p["state_path"])
    except PolicyError as e:
        module.fail_json(msg=str(e))
    except (maps.PolicyMapError, BpfError, OSError) as e:
        module.fail_json(msg="applying the policies failed: %s" % e)
    out = dict(changed=bool(file_changed or res["changed"]), diff_lines=res["diff"], changes=res["changes"],
               identities=res["identities"], endpoints=res["endpoints"],
               policies=sorted("%s %s" % (d.get("kind"), _name(d)) for d in want["policies"]))
    if module._diff:
        out["diff"] = {"before": "", "after": "\n".join(res["diff"] + res["changes"]) + "\n" if res["diff"] or res["changes"] else ""}
    module.exit_json(**out)


def _name(doc):
    meta = doc.get("metadata") or {}
    return "%s/%s" % (meta.get("namespace"), meta.get("name")) if meta.get("namespace") else str(meta.get("name"))


if __name__ == "__main__":
    main()
