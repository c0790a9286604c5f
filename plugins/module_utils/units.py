# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Files the collection owns on a node, and the systemd units among them: written atomically,
enabled by the wants symlink systemctl would make, systemd told only where it runs (the lab's
nodes and real nodes do; a container image being built may not). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

UNIT_DIR = "/etc/systemd/system"


def read(path):
    """The text of ``path``, or None when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return None


def write(path, text, mode=0o644):
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it), parents made 0755."""
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, 0o755)
    tmp = path + ".netstack-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def wants_path(name, wanted_by, unit_dir=UNIT_DIR):
    return os.path.join(unit_dir, wanted_by + ".wants", name)


def enable(unit_path, wants):
    """The symlink ``systemctl enable`` makes for [Install] WantedBy."""
    if not os.path.isdir(os.path.dirname(wants)):
        os.makedirs(os.path.dirname(wants), 0o755)
    if os.path.lexists(wants):
        os.unlink(wants)
    os.symlink(unit_path, wants)


def systemd_running():
    return os.path.isdir("/run/systemd/system")


def systemctl(module, *args):
    """Run systemctl where systemd runs (no-op otherwise); ToolError when it fails."""
    tool = Tool(module, "systemctl")
    if systemd_running() and tool.available:
        tool.run(*args)


def ensure_unit(name, text, wanted_by, check=False, module=None, unit_dir=UNIT_DIR):
    """Make unit ``name`` hold ``text`` and be enabled for ``wanted_by``; reload systemd when either
    changed. Returns the list of changes (empty: nothing to do)."""
    path = os.path.join(unit_dir, name)
    wants = wants_path(name, wanted_by, unit_dir)
    changes = []
    if read(path) != text:
        changes.append("write %s" % path)
    if not (os.path.islink(wants) and os.readlink(wants) == path):
        changes.append("enable %s (%s)" % (name, wanted_by))
    if changes and not check:
        write(path, text)
        enable(path, wants)
        systemctl(module, "daemon-reload")
    return changes


def remove_unit(name, wanted_by, check=False, module=None, unit_dir=UNIT_DIR):
    """Stop, disable and remove unit ``name``; the list of changes."""
    path = os.path.join(unit_dir, name)
    wants = wants_path(name, wanted_by, unit_dir)
    changes = [p for p in (wants, path) if os.path.lexists(p)]
    if changes and not check:
        try:
            systemctl(module, "stop", name)
        except Exception:  # pylint: disable=broad-except  # a unit that does not run is fine
            pass
        for p in changes:
            os.unlink(p)
        systemctl(module, "daemon-reload")
    return ["remove %s" % p for p in changes]
