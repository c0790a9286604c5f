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
    module creates first with the sizes you ask for, and pins everything under O(pin_path) -
    C(<name>/maps/<map>) for the object's private maps, C(<name>/progs_<version>/<program>),
    C(<name>/links/<link>), and C(globals/<map>_v<version>) for the maps its manifest declares shared.
  - The object's manifest (C(<object without .o>.manifest.json) next to it, see C(bpf/README.md)) says
    which maps are shared with other objects and where each program attaches. A shared map is pinned once
    and reused by every object that declares it; one pinned with another type, key or value size or flags is
    an error naming both; one pinned in an older layout version is migrated when the manifest declares how,
    else refused. An object without a manifest keeps all its maps private.
  - Attaches programs with BPF links (C(BPF_LINK_CREATE)) to a cgroup v2 directory (the socket and
    cgroup hooks), to the tcx ingress/egress of a network device (kernel 6.6+), or to a device's XDP
    hook - where O(attach) says, or where the manifest says for O(targets). The pinned link keeps the
    attachment after the module exits and across program upgrades.
  - A new version of the object (a different file content, sizes or manifest) is loaded next to the running
    one and swapped in with C(BPF_LINK_UPDATE) (atomic per hook, with the old program as the expected one), so
    no hook is ever left without a program. The map contents are kept. Only then are the old programs unpinned.
  - A map whose size differs from the wanted one is created anew (its contents are lost; re-fill it
    afterwards, for example with M(kldload.netstack.lb_services)); the programs are loaded against the new
    map before the links are switched.
  - Before anything is loaded, the object is loaded once into a private, temporary bpffs; a verifier
    failure (or a manifest that does not describe the object) fails the task with the verifier's message
    and changes nothing. This also runs in check mode, but is skipped when the pinned version is already
    this object.
  - If a step fails, the steps already made by this run are undone (links switched back, created links
    and maps unpinned).
  - O(state=absent) unpins the object's links (which detaches them), programs and private maps; the shared
    maps go with the last object under O(pin_path).
  - To run the node's whole dataplane (several objects, the service table, routes) use
    M(kldload.netstack.node_dataplane), which owns its O(pin_path); load objects of your own with this
    module under another O(pin_path).
options:
  name:
    description:
      - Name of this loaded object; the pin directory is C(<pin_path>/<name>).
    type: str
    required: true
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
      - The attachments wanted. Any pinned link of O(name) not listed is detached. Mutually exclusive with O(targets).
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
  targets:
    description:
      - Attach every program where the object's manifest says - C(cgroup) programs to O(targets.cgroup),
        C(device) programs to each of O(targets.devices) - instead of listing them in O(attach).
    type: dict
    suboptions:
      cgroup:
        description: The cgroup v2 directory; empty means the node's cgroup2 mount (detected).
        type: path
      families:
        description: Only programs of these address families (those the manifest gives a family).
        type: list
        elements: int
        choices: [4, 6]
        default: [4, 6]
      devices:
        description: Network devices for the device programs.
        type: list
        elements: str
        default: []
  state:
    description: C(present) loads and attaches; C(absent) detaches and unpins the object.
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
extends_documentation_fragment:
  - kldload.netstack.dataplane
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: A second socket LB instance on one cgroup, its IPv4 hooks only, where its manifest says
  kldload.netstack.bpf_program:
    name: sock_lb
    pin_path: /sys/fs/bpf/my-test
    object: /usr/local/lib/my-bpf/sock_lb.o
    maps:
      kln_lb4_svc: 131072
    targets:
      cgroup: /sys/fs/cgroup/my-test
      families: [4]
- name: The same, attachments listed by hand
  kldload.netstack.bpf_program:
    name: sock_lb
    pin_path: /sys/fs/bpf/my-test
    object: /usr/local/lib/my-bpf/sock_lb.o
    attach:
      - {program: kln_connect4, type: connect4, cgroup: /sys/fs/cgroup/my-test}
      - {program: kln_sendmsg4, type: sendmsg4, cgroup: /sys/fs/cgroup/my-test}

- name: An XDP program on eth0 in generic mode
  kldload.netstack.bpf_program:
    name: xdp_drop
    object: /usr/local/lib/my-bpf/xdp_drop.o
    attach:
      - {program: xdp_drop, type: xdp, device: eth0, xdp_mode: generic}

- name: Remove it all
  kldload.netstack.bpf_program:
    name: sock_lb
    state: absent
"""

RETURN = r"""
pin_dir:
  description: The directory the object is pinned under.
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
  sample: ["sock_lb: load programs into /sys/fs/bpf/kldload-netstack/sock_lb/progs_51903671a747",
           "sock_lb: replace program of kln_connect4 cgroup_inet4_connect cgroup /sys/fs/cgroup (link update, no gap)"]
version:
  description: The pinned version of the object (sha256 prefix, plus a hash of the sizes and manifest).
  returned: always
  type: str
programs:
  description: The pinned programs by name, with kernel id, tag, type and the ids of the maps they use.
  returned: always
  type: dict
  sample: {kln_connect4: {id: 2961, tag: 803b34204fdd29c3, type: cgroup_sock_addr, map_ids: [12, 13],
           pinned: /sys/fs/bpf/kldload-netstack/sock_lb/progs_51903671a747/kln_connect4}}
maps:
  description: The object's private maps by name, with id, type, sizes.
  returned: always
  type: dict
shared_maps:
  description: The shared maps under C(<pin_path>/globals/) by pin name (C(<map>_v<version>)), with id, type, sizes.
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
from ansible_collections.kldload.netstack.plugins.module_utils import argspec, loader
from ansible_collections.kldload.netstack.plugins.module_utils.bpfsys import BpfError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            pin_path=argspec.PIN_PATH,
            object=dict(type="path"),
            maps=dict(type="dict", default={}),
            attach=dict(type="list", elements="dict", default=[], options=dict(
                program=dict(type="str", required=True),
                type=dict(type="str", required=True),
                cgroup=dict(type="path"),
                device=dict(type="str"),
                xdp_mode=dict(type="str", choices=["auto", "native", "generic", "offload"], default="auto"),
            )),
            targets=dict(type="dict", options=dict(
                cgroup=dict(type="path"),
                families=dict(type="list", elements="int", choices=[4, 6], default=[4, 6]),
                devices=dict(type="list", elements="str", default=[]),
            )),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ["object"])],
        mutually_exclusive=[("attach", "targets")],
        supports_check_mode=True,
    )
    p = module.params
    root = os.path.join(p["pin_path"], p["name"])
    sizes = {}
    for k, v in p["maps"].items():
        try:
            sizes[k] = int(v)
        except (TypeError, ValueError):
            module.fail_json(msg="maps.%s: max_entries must be an integer, got %r" % (k, v))
    try:
        spec = loader.object_spec(p["name"], p["object"], attach=p["attach"], targets=p["targets"], map_sizes=sizes)
        res = loader.ensure(p["pin_path"], [spec], state=p["state"], check=module.check_mode, module=module)
    except loader.ProgError as e:
        module.fail_json(msg=str(e), verifier_log=e.details, pin_dir=root)
    except (BpfError, OSError) as e:
        module.fail_json(msg="%s: %s" % (root, e), pin_dir=root)
    rep = res["report"]["objects"].get(p["name"], {"programs": {}, "maps": {}, "attachments": [], "version": []})
    out = dict(changed=res["changed"], pin_dir=root, actions=res["actions"], programs=rep["programs"],
               maps=rep["maps"], attachments=rep["attachments"], version=rep["version"],
               shared_maps=res["report"]["globals"])
    if res["sha256"].get(p["name"]):
        out["object_sha256"] = res["sha256"][p["name"]]
    if module._diff:
        out["diff"] = dict(before=res["before"], after=res["after"])
    module.exit_json(**out)


if __name__ == "__main__":
    main()
