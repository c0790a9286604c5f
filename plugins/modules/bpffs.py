#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: bpffs
short_description: Mount the BPF filesystem at a path and keep it mounted across reboots
version_added: 0.1.0
description:
  - Makes sure a BPF filesystem (bpffs) is mounted at O(path), where pinned eBPF programs and maps
    live, and that it is mounted again at boot through a systemd mount unit
    C(/etc/systemd/system/<escaped path>.mount) enabled in C(local-fs.target).
  - Checks the filesystem type at O(path) first. Another filesystem mounted there is an error with
    a clear message; the module never mounts over it. A O(path) that is a regular file or a
    symbolic link is an error too. Nothing is changed when the module fails.
  - With O(state=absent) unmounts the bpffs at O(path) (pinned objects in it are released) and
    removes the mount unit.
options:
  path:
    description: Mount point. Created (mode 0755) if missing.
    type: path
    default: /sys/fs/bpf
  state:
    description: Whether bpffs is mounted at O(path).
    type: str
    choices: [present, absent]
    default: present
  persistent:
    description: Also write and enable the systemd mount unit so the mount comes back at boot.
    type: bool
    default: true
  mode:
    description: Permission bits of the filesystem root (mount option C(mode=)), for example V(0700).
    type: str
notes:
  - Why a mount unit and not an fstab line - the unit is a file the module owns, so it can be
    compared and removed without editing a file other tools and people edit; it states its ordering
    (before C(local-fs.target)); and systemd turns fstab lines into such units anyway.
  - Supports check mode and diff mode (before/after of filesystem type, unit content, enablement).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: BPF filesystem at the usual place, persistent
  kldload.netstack.bpffs:

- name: A private bpffs instance for one tool
  kldload.netstack.bpffs:
    path: /run/netstack/bpf
    mode: "0700"

- name: Remove it again
  kldload.netstack.bpffs:
    path: /run/netstack/bpf
    state: absent
"""

RETURN = r"""
path:
  description: The normalised mount point.
  returned: always
  type: str
  sample: /sys/fs/bpf
mounted:
  description: Whether a bpffs is mounted at RV(path) now.
  returned: always
  type: bool
unit:
  description: Path of the systemd mount unit, if there is one.
  returned: always
  type: str
  sample: /etc/systemd/system/sys-fs-bpf.mount
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils.bpf import run_bpffs


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/sys/fs/bpf"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            persistent=dict(type="bool", default=True),
            mode=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run_bpffs(module, module.params, module.check_mode, module._diff))


if __name__ == "__main__":
    main()
