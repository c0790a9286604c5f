#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: bpf_program
short_description: Load an eBPF object, pin its programs and maps, attach the programs through BPF links
version_added: 0.1.0
description:
  - Loads every program of a compiled eBPF object (C(clang -target bpf)) with C(bpftool prog loadall)
    (libbpf does the relocations; the node needs no compiler and no kernel headers), against maps this
    module creates first with the sizes you ask for, and pins everything under
    C(<pin_path>/<name>) - C(maps/<map>), C(progs_<sha256 prefix>/<program>) and C(links/<link>).
  - Attaches programs with BPF links (C(BPF_LINK_CREATE)) to a cgroup v2 directory (the socket and
    cgroup hooks), to the tcx ingress/egress of a network device (kernel 6.6+), or to a device's XDP
    hook. The pinned link keeps the attachment after the module exits and across program upgrades.
  - A new version of the object (a different file content) is loaded next to the running one and
    swapped in with C(BPF_LINK_UPDATE) (atomic per hook, with the old program as the expected one), so
    no hook is ever left without a program. The map contents are kept. Only then are the old
    programs unpinned.
  - A map whose size (or layout) differs from the wanted one is created anew (its contents are lost;
    re-fill it afterwards, for example with M(kldload.netstack.lb_services)); the programs are loaded
    against the new map before the links are switched.
  - Before anything is changed, the object is loaded once into a private, temporary bpffs; a verifier
    failure fails the task with the verifier's message and changes nothing. This also runs in check
    mode (it is discarded at once), but is skipped when the pinned version is already this object.
  - If a step fails, the steps already made by this run are undone (links switched back, created
    links and maps unpinned).
  - O(state=absent) unpins the links (which detaches them), the programs and the maps, and removes
    the directory.
options:
  name:
    description:
      - Name of this loaded object; the pin directory is C(<pin_path>/<name>).
    type: str
    required: true
  pin_path:
    description:
      - Directory on a bpffs (see M(kldload.netstack.bpffs)) under which O(name) is pinned. No C(.) is
        allowed anywhere in it (bpffs refuses dots in names).
    type: path
    default: /sys/fs/bpf/kldload-netstack
  object:
    description:
      - Path of the compiled object on the node. Required with O(state=present).
    type: path
  maps:
    description:
      - Map sizes, C(max_entries) by map name. Maps not listed get the object's size.
      - Changing a size recreates that map (see above).
    type: dict
    default: {}
  attach:
    description:
      - The attachments wanted. Any pinned link of O(name) not listed is detached.
    type: list
    elements: dict
    default: []
    suboptions:
      program:
        description: Program name (the C function name) in the object.
        type: str
        required: true
      type:
        description:
          - Attach type. C(cgroup_inet4_connect), C(cgroup_udp4_sendmsg), ... (the kernel's names, lower case
            without C(BPF_)), or bpftool's short cgroup names (C(connect4), C(sendmsg6), C(getpeername4),
            ...), C(tcx_ingress)/C(tc_ingress), C(tcx_egress)/C(tc_egress), C(xdp).
        type: str
        required: true
      cgroup:
        description: The cgroup v2 directory, for the cgroup attach types.
        type: path
      device:
        description: The network device, for tcx and XDP.
        type: str
      xdp_mode:
        description: XDP mode; C(auto) lets the kernel choose (native if the driver has it).
        type: str
        choices: [auto, native, generic, offload]
        default: auto
  state:
    description: C(present) loads and attaches; C(absent) detaches and unpins everything under O(name).
    type: str
    choices: [present, absent]
    default: present
requirements:
  - bpftool (libbpf) on the node, root, a kernel with BPF links (5.7+ for cgroup, 6.6+ for tcx).
notes:
  - Supports check mode and diff mode. The diff shows the object version, the map sizes and the
    attachments before and after.
  - Foreign programs on the same hooks are left alone (cgroup links always attach in multi mode).
seealso:
  - module: kldload.netstack.bpffs
  - module: kldload.netstack.lb_services
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Load the socket load balancer and attach it to every socket of the node
  kldload.netstack.bpf_program:
    name: sock_lb
    object: /usr/lib/kldload-netstack/bpf/sock_lb.o
    maps:
      kln_lb4_svc: 131072
    attach:
      - {program: kln_connect4, type: connect4, cgroup: /sys/fs/cgroup}
      - {program: kln_sendmsg4, type: sendmsg4, cgroup: /sys/fs/cgroup}
      - {program: kln_recvmsg4, type: recvmsg4, cgroup: /sys/fs/cgroup}
      - {program: kln_getpeer4, type: getpeername4, cgroup: /sys/fs/cgroup}

- name: An XDP program on eth0 in generic mode
  kldload.netstack.bpf_program:
    name: xdp_drop
    object: /usr/lib/kldload-netstack/bpf/xdp_drop.o
    attach:
      - {program: xdp_drop, type: xdp, device: eth0, xdp_mode: generic}

- name: Remove it all
  kldload.netstack.bpf_program:
    name: sock_lb
    state: absent
"""

RETURN = r"""
pin_dir:
  description: The directory everything is pinned under.
  returned: always
  type: str
  sample: /sys/fs/bpf/kldload-netstack/sock_lb
object_sha256:
  description: sha256 of the object file.
  returned: when state is present
  type: str
actions:
  description: What was done (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["load programs into /sys/fs/bpf/kldload-netstack/sock_lb/progs_51903671a747",
           "replace program of kln_connect4 cgroup_inet4_connect cgroup /sys/fs/cgroup (link update, no gap)"]
programs:
  description: The pinned programs by name, with kernel id, tag and type.
  returned: always
  type: dict
  sample: {kln_connect4: {id: 2961, tag: 803b34204fdd29c3, type: cgroup_sock_addr,
           pinned: /sys/fs/bpf/kldload-netstack/sock_lb/progs_51903671a747/kln_connect4}}
maps:
  description: The pinned maps by name, with id, type, sizes.
  returned: always
  type: dict
attachments:
  description: What is attached now, one entry per pinned link.
  returned: always
  type: list
  elements: dict
  sample:
    - {pinned: /sys/fs/bpf/kldload-netstack/sock_lb/links/kln_connect4-cgroup_inet4_connect-cg1,
       link_id: 89, prog_id: 2961, program: kln_connect4, type: cgroup_inet4_connect, cgroup_id: 1}
verifier_log:
  description: The tail of bpftool's output when the object failed to load.
  returned: on load failure
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import bpfprog


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            pin_path=dict(type="path", default=bpfprog.DEFAULT_PIN_PATH),
            object=dict(type="path"),
            maps=dict(type="dict", default={}),
            attach=dict(type="list", elements="dict", default=[], options=dict(
                program=dict(type="str", required=True),
                type=dict(type="str", required=True),
                cgroup=dict(type="path"),
                device=dict(type="str"),
                xdp_mode=dict(type="str", choices=["auto", "native", "generic", "offload"], default="auto"),
            )),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ["object"])],
        supports_check_mode=True,
    )
    p = module.params
    if "/" in p["name"] or "." in p["name"] or not p["name"]:
        module.fail_json(msg="name: %r must be a plain name without '/' or '.'" % p["name"])
    root = os.path.join(p["pin_path"], p["name"])
    bpftool = module.get_bin_path("bpftool", opt_dirs=["/usr/sbin", "/sbin", "/usr/local/sbin"])
    if p["state"] == "present" and not bpftool:
        module.fail_json(msg="bpftool is not installed on the node (package bpftool)")
    sizes = {}
    for k, v in p["maps"].items():
        try:
            sizes[k] = int(v)
        except (TypeError, ValueError):
            module.fail_json(msg="maps.%s: max_entries must be an integer, got %r" % (k, v))

    def run(argv):
        return module.run_command(argv, check_rc=False)

    try:
        res = bpfprog.ensure(root, p["object"], p["attach"], sizes, state=p["state"], check=module.check_mode,
                             run=run, bpftool=bpftool or "bpftool")
    except bpfprog.ProgError as e:
        module.fail_json(msg=str(e), verifier_log=e.details, pin_dir=root)
    except OSError as e:
        module.fail_json(msg="%s: %s" % (root, e), pin_dir=root)
    out = dict(changed=res["changed"], pin_dir=root, actions=res["actions"], programs=res["report"]["programs"],
               maps=res["report"]["maps"], attachments=res["report"]["attachments"])
    if res.get("sha256"):
        out["object_sha256"] = res["sha256"]
    if module._diff:
        out["diff"] = dict(before=res["before"], after=res["after"])
    module.exit_json(**out)


if __name__ == "__main__":
    main()
