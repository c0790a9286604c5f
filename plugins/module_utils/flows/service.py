# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent's unit, made by the node apply (runtime.apply(), through units.py): netstack-agent.service runs
``netstack agent`` from the node bundle, restarts on failure, starts at boot after the dataplane is restored. The
apply starts it when it is not running and restarts it when its unit or its configuration changed; a node
configuration without an enabled agent section removes it. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.kldload.netstack.plugins.module_utils import units
from ansible_collections.kldload.netstack.plugins.module_utils.flows.config import UNIT
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

WANTED_BY = "multi-user.target"


def unit_text(bundle, config_path, default_config_path, bundle_sha256=None):
    """The unit; ``bundle_sha256`` (the installed bundle's digest, in a comment) makes a new release a changed unit,
    so the apply restarts the agent on the new code."""
    env = "" if config_path == default_config_path else "Environment=NETSTACK_CONFIG=%s\n" % config_path
    return ("# Managed by kldload.netstack (node_dataplane: the node configuration's agent section)\n"
            "# The flow agent: reads the eBPF programs' flow events, serves flows and metrics (docs/observability.md).\n"
            "# Bundle sha256: %s\n"
            "[Unit]\n"
            "Description=kldload.netstack flow agent (Hubble-style flows and metrics)\n"
            "After=network-online.target netstack-dataplane.service\n"
            "Wants=network-online.target\n"
            "StartLimitIntervalSec=0\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            "%s"
            "ExecStart=/usr/bin/python3 %s agent\n"
            "Restart=always\n"
            "RestartSec=1\n"
            "# observability yields to the traffic: under CPU contention the agent falls behind and the events the\n"
            "# ring buffer has no room for are counted as lost (netstack_flow_events_lost_total), never waited for\n"
            "Nice=19\n"
            "CPUSchedulingPolicy=batch\n"
            "\n"
            "[Install]\n"
            "WantedBy=%s\n") % (bundle_sha256 or "unknown", env, bundle, WANTED_BY)


def active(module=None):
    """Whether the unit runs now (False where systemd does not run)."""
    if not units.systemd_running():
        return False
    rc, out, _err = Tool(module, "systemctl").run("is-active", UNIT, check=False)
    return rc == 0 and out.strip() == "active"


def ensure(text, restart, check=False, module=None):
    """The unit written and enabled, and running: started when it does not run, restarted when ``restart`` (its
    configuration changed) or the unit changed. The changes as text."""
    changes = units.ensure_unit(UNIT, text, WANTED_BY, check=check, module=module)
    running = active(module) if units.systemd_running() else True
    if not running:
        changes.append("start %s" % UNIT)
    elif changes or restart:
        changes.append("restart %s" % UNIT)
    if changes and not check and units.systemd_running():
        units.systemctl(module, "restart" if running else "start", UNIT)
    return changes


def remove(check=False, module=None):
    return units.remove_unit(UNIT, WANTED_BY, check=check, module=module)


def _without_digest(text):
    return "".join(line for line in (text or "").splitlines(True) if not line.startswith("# Bundle sha256:"))


def follow_bundle(text, check=False, module=None):
    """Where the node apply does not own the unit (``netstack dataplane restore``: at boot, and after a rollback
    switched the bundle): the unit as it is but for the bundle's digest - another release installed - is written
    and the agent restarted on that bundle's code; any other difference (another configuration path: not this
    apply's agent) or no unit is left alone. The changes as text."""
    have = units.read(os.path.join(units.UNIT_DIR, UNIT))
    if have is None or have == text or _without_digest(have) != _without_digest(text):
        return []
    return ensure(text, restart=True, check=check, module=module)
