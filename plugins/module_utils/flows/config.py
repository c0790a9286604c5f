# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``agent`` section of the node configuration (runtime.py): flow events in the kernel and the node agent::

    "agent": {"enabled": true,
              "listen": "10.77.0.11:4245",   # the agent's HTTP (flows, metrics): an address of this node and a port
              "node_name": "cp1",            # the name flows carry (default: the host name)
              "buffer": 4096,                # flows kept in memory (a ring: the oldest go first)
              "aggregation": "medium",       # none (every packet) | medium | maximum, like monitorAggregation
              "drop_rate": 100,              # drop events per second per reason and CPU (0: no limit)
              "export": {"path": "/var/log/kldload-netstack/flows.json", "max_bytes": 10485760, "keep": 3}}

``enabled: false`` (or no section) turns the events off in the kernel and removes the agent's unit. ``export``
(null: none) writes every flow as a JSON line, rotated by size (``keep`` older files). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import ipaddress
import os
import socket

KEYS = ("enabled", "listen", "node_name", "buffer", "aggregation", "drop_rate", "export")
EXPORT_KEYS = ("path", "max_bytes", "keep")
AGGREGATIONS = ("none", "medium", "maximum")
DEFAULT_PORT = 4245
DEFAULTS = {"enabled": True, "listen": None, "node_name": None, "buffer": 4096, "aggregation": "medium",
            "drop_rate": 100, "export": None}
UNIT = "netstack-agent.service"


class AgentConfigError(ValueError):
    """An agent section that cannot be applied; the message names the field."""


def _int(v, where, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise AgentConfigError("%s: an integer %d-%d, got %r" % (where, lo, hi, v))
    return v


def split_listen(text, where="config.agent.listen"):
    """(address, port) of ``ADDRESS:PORT`` (``[v6]:PORT`` for IPv6); AgentConfigError otherwise."""
    if not isinstance(text, str) or not text:
        raise AgentConfigError("%s: ADDRESS:PORT (the node's management address), got %r" % (where, text))
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(u"%s" % host)
    except ValueError:
        raise AgentConfigError("%s: %r is not an IP address (the agent binds one address of the node, never all: "
                               "0.0.0.0 and :: are refused too)" % (where, host))
    if addr.is_unspecified:
        raise AgentConfigError("%s: %s would listen on every address of the node; name its management address" % (where, host))
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise AgentConfigError("%s: port %r out of range (1-65535)" % (where, port))
    return str(addr), int(port)


def normalize(section, where="config.agent"):
    """The canonical section (every field present), or None (no agent); AgentConfigError names the field."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise AgentConfigError("%s: must be a mapping" % where)
    bad = sorted(set(section) - set(KEYS))
    if bad:
        raise AgentConfigError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(KEYS)))
    out = dict(DEFAULTS)
    out.update(dict((k, v) for k, v in section.items() if v is not None or k == "export"))
    if not isinstance(out["enabled"], bool):
        raise AgentConfigError("%s.enabled: true or false, got %r" % (where, out["enabled"]))
    if out["enabled"] or out["listen"] is not None:
        addr, port = split_listen(out["listen"], where + ".listen")
        out["listen"] = ("[%s]:%d" if ":" in addr else "%s:%d") % (addr, port)
    if out["node_name"] is not None and (not isinstance(out["node_name"], str) or not out["node_name"]):
        raise AgentConfigError("%s.node_name: a name, got %r" % (where, out["node_name"]))
    _int(out["buffer"], where + ".buffer", 16, 1000000)
    if out["aggregation"] not in AGGREGATIONS:
        raise AgentConfigError("%s.aggregation: one of %s, got %r" % (where, ", ".join(AGGREGATIONS), out["aggregation"]))
    _int(out["drop_rate"], where + ".drop_rate", 0, 1000000)
    exp = out["export"]
    if exp is not None:
        if not isinstance(exp, dict):
            raise AgentConfigError("%s.export: a mapping or null" % where)
        bad = sorted(set(exp) - set(EXPORT_KEYS))
        if bad:
            raise AgentConfigError("%s.export: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(EXPORT_KEYS)))
        e = {"path": exp.get("path"), "max_bytes": exp.get("max_bytes", 10 * 1024 * 1024), "keep": exp.get("keep", 3)}
        if not isinstance(e["path"], str) or not os.path.isabs(e["path"]):
            raise AgentConfigError("%s.export.path: an absolute path, got %r" % (where, e["path"]))
        _int(e["max_bytes"], where + ".export.max_bytes", 4096, 2 ** 40)
        _int(e["keep"], where + ".export.keep", 0, 100)
        out["export"] = e
    return out


def check_listen(listen, where="config.agent.listen"):
    """AgentConfigError unless the address of ``listen`` is one of this node's (a test bind to it, port 0)."""
    addr, _port = split_listen(listen, where)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((addr, 0))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise AgentConfigError("%s: %s is not an address of this node (%s): the agent listens on the node's "
                                   "management address" % (where, addr, socket.gethostname()))
        raise AgentConfigError("%s: cannot bind %s: %s" % (where, addr, e.strerror))
    finally:
        s.close()


def kernel(section):
    """What kln_flow_config gets: {enabled, aggregation, drop_rate} (events off without an enabled section)."""
    if not section or not section.get("enabled"):
        return None
    return {"enabled": True, "aggregation": section["aggregation"], "drop_rate": section["drop_rate"]}
