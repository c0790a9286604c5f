#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kube_proxy_cleanup
short_description: Remove the iptables and nftables rules kube-proxy leaves on a node
version_added: 0.1.0
description:
  - Removes what C(kube-proxy --cleanup) removes, for every selected iptables backend (legacy and
    nft) and address family (IPv4 and IPv6), plus the C(kube-proxy) tables of kube-proxy's nftables
    mode.
  - "iptables: in the C(nat), C(filter) and C(mangle) tables, the chains C(KUBE-SERVICES),
    C(KUBE-NODEPORTS), C(KUBE-POSTROUTING), C(KUBE-MARK-MASQ), C(KUBE-FORWARD),
    C(KUBE-EXTERNAL-SERVICES), C(KUBE-PROXY-FIREWALL), C(KUBE-PROXY-CANARY) and every chain named
    C(KUBE-SVC-*), C(KUBE-SVL-*), C(KUBE-SEP-*), C(KUBE-FW-*), C(KUBE-EXT-*) or C(KUBE-XLB-*), with
    their rules, and every rule in another chain that jumps (C(-j)) or goes (C(-g)) to one of them."
  - "nftables: the tables C(ip kube-proxy) and C(ip6 kube-proxy) (for the selected O(families))."
  - Everything else is left byte for byte as it was, including other tools' rules and their
    packet counters, and kubelet's chains C(KUBE-FIREWALL), C(KUBE-KUBELET-CANARY),
    C(KUBE-MARK-DROP) and C(KUBE-IPTABLES-HINT) unless O(include_kubelet_chains=true).
  - Each changed iptables table is replaced atomically with C(iptables-restore) (without
    C(--noflush), so only the tables that change are rewritten). If a step fails, the tables
    already changed are put back from memory before the module fails.
  - Before changing anything the module writes a backup of every table it is about to change
    (see O(backup)).
options:
  backends:
    description:
      - iptables backends to clean. C(legacy) uses C(iptables-legacy-save)/C(iptables-legacy-restore)
        (and the C(ip6tables-) ones), C(nft) uses C(iptables-nft-save)/C(iptables-nft-restore).
      - When the backend-specific binaries are missing, plain C(iptables-save)/C(iptables-restore)
        are used if their C(--version) shows they are that backend; otherwise the backend is skipped
        and reported in RV(skipped_backends) (not an error).
      - An empty list cleans no iptables backend (only nftables, see O(nftables)).
    type: list
    elements: str
    choices: [legacy, nft]
    default: [legacy, nft]
  families:
    description: Address families to clean, for iptables and nftables alike.
    type: list
    elements: str
    choices: [ipv4, ipv6]
    default: [ipv4, ipv6]
  nftables:
    description: Delete kube-proxy's nftables-mode tables C(ip kube-proxy) / C(ip6 kube-proxy).
    type: bool
    default: true
  include_kubelet_chains:
    description:
      - Also remove kubelet's chains C(KUBE-FIREWALL), C(KUBE-KUBELET-CANARY), C(KUBE-MARK-DROP) and
        C(KUBE-IPTABLES-HINT) and the rules jumping to them. A running kubelet creates them again.
    type: bool
    default: false
  backup:
    description:
      - Save every table before changing it, to a new file in O(backup_dir) (mode 0600; the
        directory is created with mode 0700). iptables backups are C(iptables-restore -c) input
        (one file per backend and family), nftables backups are C(nft -f) input.
      - No backup is written in check mode or when nothing changes.
    type: bool
    default: true
  backup_dir:
    description: Directory for the backups. Must be an absolute path.
    type: path
    default: /var/backups/kldload-netstack/kube-proxy-cleanup
notes:
  - IPVS mode is out of scope. The IPVS virtual servers, the C(kube-ipvs0) dummy device, the
    ipsets and the IPVS-only chains (C(KUBE-LOAD-BALANCER), C(KUBE-NODE-PORT), ...) of kube-proxy's
    ipvs mode are not removed (the lab kernel has no IPVS).
  - Stop kube-proxy first (for example delete its DaemonSet); a running kube-proxy puts its rules
    back within seconds, and the module warns when it sees them again right after the cleanup.
  - Tables other than C(nat), C(filter) and C(mangle) (C(raw), C(security)) are never touched, nor
    are nftables tables other than C(ip kube-proxy) and C(ip6 kube-proxy) (the C(ip nat),
    C(ip filter), ... tables of iptables-nft are handled through the C(nft) backend).
  - Supports check mode and diff mode; the diff shows the text of every affected table before and
    after (counters left out).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Remove kube-proxy's leftovers after switching to eBPF service load balancing
  kldload.netstack.kube_proxy_cleanup:

- name: Only the nft backend, IPv4, and kubelet's chains as well
  kldload.netstack.kube_proxy_cleanup:
    backends: [nft]
    families: [ipv4]
    include_kubelet_chains: true

- name: Preview what would be removed
  kldload.netstack.kube_proxy_cleanup:
  check_mode: true
  diff: true
  register: preview
"""

RETURN = r"""
removed:
  description:
    - What was removed (or would be, in check mode), one entry per changed table.
    - For iptables the backend (C(legacy) or C(nft)), family and table (C(nat), C(filter), C(mangle)).
      For kube-proxy's nftables tables the backend is C(nftables) and the table C(ip kube-proxy) or
      C(ip6 kube-proxy).
  returned: always
  type: list
  elements: dict
  contains:
    backend:
      description: C(legacy), C(nft) or C(nftables).
      type: str
    family:
      description: C(ipv4) or C(ipv6).
      type: str
    table:
      description: The table.
      type: str
    chains:
      description: The chains removed.
      type: list
      elements: str
    rules:
      description: Number of rules removed (in the removed chains and jumps to them elsewhere).
      type: int
    backup:
      description: Backup file holding the table as it was; null in check mode or with O(backup=false).
      type: str
  sample:
    - backend: nft
      family: ipv4
      table: nat
      chains: [KUBE-MARK-MASQ, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-SEP-3SHOAZZXKXAESXYF]
      rules: 9
      backup: /var/backups/kldload-netstack/kube-proxy-cleanup/20250101T120000-nft-ipv4.rules
skipped_backends:
  description: Backends that were not looked at, with the reason (for example missing binaries).
  returned: always
  type: list
  elements: dict
  sample:
    - backend: legacy
      family: ipv6
      reason: ip6tables-legacy-save not found
backups:
  description: Backup files written by this run.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils.iptables import (
    BACKENDS, DEFAULT_BACKUP_DIR, FAMILIES, CleanupError, run_cleanup)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            backends=dict(type="list", elements="str", choices=list(BACKENDS), default=list(BACKENDS)),
            families=dict(type="list", elements="str", choices=list(FAMILIES), default=list(FAMILIES)),
            nftables=dict(type="bool", default=True),
            include_kubelet_chains=dict(type="bool", default=False),
            backup=dict(type="bool", default=True),
            backup_dir=dict(type="path", default=DEFAULT_BACKUP_DIR),
        ),
        supports_check_mode=True,
    )
    try:
        result = run_cleanup(module, module.params, check_mode=module.check_mode, want_diff=module._diff)
    except CleanupError as e:
        module.fail_json(msg=str(e), **e.result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
