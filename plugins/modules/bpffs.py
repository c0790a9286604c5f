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
    live, and (with O(persistent=true)) that it is mounted again at boot through a systemd mount
    unit C(/etc/systemd/system/<escaped path>.mount) enabled in C(local-fs.target).
  - Except at the mount points systemd keeps for its own API file systems, C(/sys/fs/bpf) among
    them - systemd refuses to load a .mount unit for those ("Cannot create mount unit for API
    file system"). It mounts C(/sys/fs/bpf) itself at boot on a host (with C(mode=0700)), but not in
    a container. There the module writes C(/etc/systemd/system/netstack-bpffs-<escaped path>.service)
    instead, a oneshot service that mounts bpffs at boot unless something is mounted there already
    (and applies O(mode)). A C(sys-fs-bpf.mount) this module wrote earlier is removed; one written
    by someone else is left alone.
  - Reads the mount table (C(/proc/self/mountinfo)) for what is mounted at O(path) and confirms a
    bpffs with C(statfs(2)) (magic C(0xcafe4a11)). Another filesystem mounted there (a tmpfs, say)
    is an error with a clear message; the module never mounts over it. A O(path) that is a regular
    file, a symbolic link or a directory that is not empty is an error too. Every check is made
    before anything is changed, so a failed run changes nothing.
  - A missing mount point directory is created (mode 0755; the mounted bpffs root has its own
    mode, see O(mode)).
  - With O(state=absent) unmounts the bpffs at O(path) (pinned objects in it are released), and
    disables and removes the unit. Nothing there is not a change.
options:
  path:
    description:
      - Absolute path of the mount point. Symbolic links in its parent directories are resolved
        (the result is returned as RV(path)); O(path) itself must not be a symbolic link.
    type: path
    default: /sys/fs/bpf
  state:
    description: Whether bpffs is mounted at O(path).
    type: str
    choices: [present, absent]
    default: present
  persistent:
    description:
      - Also write and enable the systemd unit (see above) so the mount comes back at boot.
      - With V(false) an existing unit is left as it is.
    type: bool
    default: true
  mode:
    description:
      - Permission bits of the filesystem root (mount option C(mode=)), like Cilium's V(0700).
        Quote it (V("0700")); an unquoted YAML V(0700) is read as the octal number it is.
      - The kernel adds the sticky bit (V(0700) shows as C(1700)). A bpffs already mounted with
        other permissions gets them changed with C(chmod); the unit mounts with them from then on.
      - Unset, the permissions of a mounted bpffs are left alone (a new mount gets the kernel's
        default, C(1777)).
    type: raw
notes:
  - Why a systemd mount unit and not an fstab line - the unit is a file the module owns, so it can
    be created, compared and removed without editing a file that other tools and people also edit;
    it states its ordering explicitly (C(DefaultDependencies=no), before C(local-fs.target));
    and systemd's fstab generator turns fstab lines into exactly such units anyway.
  - The unit is enabled with the symlink C(systemctl enable) makes, so it works without a running
    systemd (a chroot or image build); C(systemctl daemon-reload) is run when systemd is running
    and a unit changed (and the service of an API mount point is started, or stopped on removal).
  - Supports check mode and diff mode (before/after of C(mounted), C(fstype), C(mode), C(unit)
    content, C(enabled) and C(stale_unit), the content of an own refused .mount unit).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: BPF filesystem at the usual place, persistent
  kldload.netstack.bpffs:

- name: A private bpffs instance for one tool, root-only
  kldload.netstack.bpffs:
    path: /run/netstack/bpf
    mode: "0700"

- name: Remove it again (unmount, remove the unit)
  kldload.netstack.bpffs:
    path: /run/netstack/bpf
    state: absent
"""

RETURN = r"""
path:
  description: The mount point, normalised (parent directories' symbolic links resolved).
  returned: always
  type: str
  sample: /sys/fs/bpf
mounted:
  description: Whether a bpffs is mounted at RV(path) now (in check mode, would be).
  returned: always
  type: bool
  sample: true
unit:
  description:
    - Path of the systemd unit if there is one (null if none) - the .mount unit, or the .service of
      an API mount point such as C(/sys/fs/bpf).
  returned: always
  type: str
  sample: /etc/systemd/system/run-netstack-bpf.mount
actions:
  description:
    - What was done (or would be in check mode), in order - C(mkdir), C(mount), C(chmod),
      C(write_unit), C(enable), C(stop), C(umount), C(disable), C(remove_unit), C(remove_stale_unit),
      C(daemon_reload), C(start).
    - Empty when nothing changed.
  returned: always
  type: list
  elements: str
  sample: [mount, write_unit, enable, daemon_reload]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils.bpffs import BpffsError, run_bpffs


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/sys/fs/bpf"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            persistent=dict(type="bool", default=True),
            mode=dict(type="raw"),
        ),
        supports_check_mode=True,
    )
    try:
        result = run_bpffs(module, module.params, module.check_mode, module._diff)
    except BpffsError as e:
        module.fail_json(msg=str(e), **e.fields)
    except OSError as e:
        module.fail_json(msg="bpffs at %s: reading the node failed: %s" % (module.params["path"], e),
                         path=module.params["path"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
