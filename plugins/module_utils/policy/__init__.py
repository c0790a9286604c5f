# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The network policy compiler: Kubernetes NetworkPolicy and Cilium (clusterwide) network policies
plus the cluster's endpoints in, per-endpoint allow/deny entries keyed by security identity out.
No Ansible imports; standard library only (PyYAML lazily, for ``parse.load_text``).

- ``parse``: YAML text -> policy documents -> validated, normalized policies (``PolicyError`` lists
  every problem of a document set, each naming the document and the field path).
- ``identity``: reserved identities, the identity label set of a pod, numeric identities from label
  sets (no coordination between nodes), CIDR identities.
- ``compile``: the selector cache and per-endpoint entries for one node (or all), and ``diff``.
- ``evaluate``: a reference evaluator written from the Kubernetes/Cilium semantics, independent of
  ``compile``, and the dataplane-style lookup of compiled entries (for tests).

See docs/policy.md.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type
