#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: ebpf_facts
short_description: What a node's kernel offers an eBPF dataplane, and whether it meets the requirements
version_added: 0.1.0
description:
  - Gathers, as C(ansible_facts.netstack_ebpf) (and the same keys at the top level of the result)
    the kernel version, whether BTF is present, the bpffs mounts, the cgroup v2 mount point
    (detected, never assumed), the kernel config flags that matter (from C(/proc/config.gz) or
    C(/boot/config-<release>) or C(/lib/modules/<release>/config)), WireGuard kernel support
    (probed, not guessed), which iptables backends (legacy, nft) are in use and whether kube-proxy
    rules exist in each (and in nftables), and whether bpftool and libbpf are present.
  - WireGuard support is asked of the kernel - a WireGuard link is created over rtnetlink in a
    network namespace made for the probe, which is thrown away with everything in it (where no
    namespace can be made, in the host namespace under a unique name, deleted at once). This may
    autoload the C(wireguard) module, as using WireGuard would; C(module_loaded) is read before.
  - C(requirements) compares the node item by item against the kernel table of the Cilium
    masterclass (chapter 11) - 4.19 basic eBPF, 5.10 recommended, 5.6 WireGuard, 5.8 kube-proxy
    replacement, 5.8 BBR bandwidth manager - plus BTF, cgroup v2 and bpffs presence, kernel WireGuard
    (probed) and C(CONFIG_BPF_SYSCALL)/C(CONFIG_CGROUP_BPF) when the config is readable.
  - Never changes anything and always returns C(changed=false); only reads C(/proc), C(/sys)
    and runs read-only commands (C(iptables-save) per backend, C(nft list tables),
    C(bpftool version)).
options:
  wireguard_probe:
    description:
      - Probe kernel WireGuard support by creating a WireGuard link in a throwaway network namespace
        (may autoload the module). With V(false), RV(wireguard.kernel) is null and the
        C(wireguard_kernel) requirement is left out.
    type: bool
    default: true
  iptables:
    description: Read the iptables backends and nftables tables (kube-proxy detection); V(false) omits RV(iptables).
    type: bool
    default: true
  packages:
    description:
      - Package names per OS family (a mapping of family name, C(Debian) or C(RedHat), to a list). The list
        of the node's family (the C(family) of RV(os)) is looked up in one C(dpkg-query) or C(rpm -q) call, and the
        packages that are not installed are returned in RV(packages_missing). Not given - RV(packages_missing)
        is left out.
    type: dict
notes:
  - Supports check mode; it never reports a change.
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Gather eBPF facts
  kldload.netstack.ebpf_facts:

- name: Show what is missing
  ansible.builtin.debug:
    msg: "{{ netstack_ebpf.requirements | rejectattr('ok') | map(attribute='message') | list }}"
"""

RETURN = r"""
kernel:
  description: Kernel release and parsed version.
  returned: always
  type: dict
  sample: {"release": "6.18.44-fc-v669", "version": [6, 18, 44], "version_text": "6.18.44"}
btf:
  description: Whether C(/sys/kernel/btf/vmlinux) exists.
  returned: always
  type: bool
bpffs_mounts:
  description: Mount points of bpf filesystems.
  returned: always
  type: list
  elements: str
cgroup2_path:
  description: Mount point of the cgroup v2 hierarchy, null if not mounted.
  returned: always
  type: str
  sample: /sys/fs/cgroup
kernel_config:
  description: C(source) path of the config read and C(flags) (null if no config is readable).
  returned: always
  type: dict
wireguard:
  description: WireGuard support - in the kernel (probed) and in userspace.
  returned: always
  type: dict
  contains:
    kernel:
      description: The kernel can create WireGuard links (probed); null if it could not be asked or O(wireguard_probe=false).
      type: bool
      sample: false
    detail:
      description: How the probe went.
      type: str
      sample: the kernel cannot create wireguard links (Operation not supported)
    module_loaded:
      description: C(/sys/module/wireguard) existed before the probe (module loaded, or built in).
      type: bool
      sample: false
    userspace:
      description: wireguard-go is on PATH.
      type: bool
      sample: true
    userspace_path:
      description: Path of wireguard-go, null if absent.
      type: str
      sample: /usr/bin/wireguard-go
    tools:
      description: wg (wireguard-tools) is on PATH.
      type: bool
      sample: true
    tools_path:
      description: Path of wg, null if absent.
      type: str
      sample: /usr/bin/wg
bpftool:
  description: bpftool C(path), C(version) and the C(libbpf_version) it reports.
  returned: always
  type: dict
libbpf:
  description: Whether the libbpf shared library is present - C(present), C(library) (path), C(version).
  returned: always
  type: dict
os:
  description: The node's OS from C(/etc/os-release) - C(id), C(version_id), C(family) (C(Debian), C(RedHat), or null).
  returned: always
  type: dict
  sample: {id: debian, version_id: "13", family: Debian}
packages_missing:
  description:
    - The packages of the node's family in O(packages) that are not installed (null when the family is not in
      O(packages), or neither dpkg nor rpm could be asked).
  returned: when O(packages) is given
  type: list
  elements: str
iptables:
  description:
    - Per C(<backend>_<family>) (legacy_ipv4, nft_ipv6, ...) - C(available), C(in_use), C(rules),
      C(kube_proxy), C(kube_proxy_chains); C(nftables) - C(tables), C(kube_proxy) (families with a
      kube-proxy table); C(backends_in_use); C(kube_proxy_rules) (any anywhere).
  returned: when O(iptables=true)
  type: dict
requirements:
  description:
    - One item per requirement - C(name), C(description), C(required) (such as C(>= 5.8) or
      C(present)), C(actual), C(ok), C(message).
    - Names - C(basic_ebpf) (>= 4.19), C(recommended) (>= 5.10), C(wireguard) (>= 5.6),
      C(kube_proxy_replacement) (>= 5.8), C(bbr_bandwidth_manager) (>= 5.8), C(btf), C(cgroup2),
      C(bpffs), C(wireguard_kernel) (when probed), C(config_bpf_syscall) and C(config_cgroup_bpf)
      (when the kernel config is readable).
  returned: always
  type: list
  elements: dict
requirements_unmet:
  description: Names of the requirements that are not met.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils.facts import gather


def main():
    module = AnsibleModule(
        argument_spec=dict(
            wireguard_probe=dict(type="bool", default=True),
            iptables=dict(type="bool", default=True),
            packages=dict(type="dict"),
        ),
        supports_check_mode=True,
    )
    try:
        facts = gather(module, module.params["wireguard_probe"], module.params["iptables"], module.params["packages"])
    except (OSError, ValueError) as e:
        # /proc or /sys unreadable, a kernel release that is not one: no partial facts
        module.fail_json(msg="gathering eBPF facts failed: %s" % e)
    result = dict(changed=False, ansible_facts=dict(netstack_ebpf=facts))
    result.update(facts)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
