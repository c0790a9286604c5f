# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.service_backends - services that select pods by label, turned into the service
table of kldload.netstack.lb_services (docs: service_backends.yml next to this file)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import labels as labels_mod

DEFAULT_NAMESPACE = "default"


def _flatten(endpoints):
    """Endpoints from a list, or a list of per-node lists (hostvars of every node); None skipped;
    one endpoint per namespace/name."""
    out, seen = [], set()
    stack = list(reversed(endpoints or []))
    while stack:
        e = stack.pop()
        if e is None:
            continue
        if isinstance(e, (list, tuple)):
            stack.extend(reversed(e))
            continue
        if not isinstance(e, dict):
            raise AnsibleFilterError("service_backends: an endpoint must be a mapping, not %r" % (e,))
        key = (e.get("namespace") or DEFAULT_NAMESPACE, e.get("name"))
        if key in seen:
            continue
        seen.add(key)
        if not e.get("ip") and e.get("ips"):       # an endpoint record of netstack-cni (endpoint_info)
            e = dict(e, ip=str(e["ips"][0]).split("/", maxsplit=1)[0])
        out.append(e)
    return out


def _order(b):
    try:
        a = ipaddress.ip_address(b["ip"])
        return (a.version, int(a), b.get("port") or 0)
    except (ValueError, TypeError):
        return (9, 0, str(b.get("ip")), b.get("port") or 0)


def _target_port(svc, where):
    t = svc.get("targetPort")
    if t is None or t == "":
        return svc.get("port")
    if isinstance(t, bool):
        raise AnsibleFilterError("%s.targetPort: %r must be a port number or a port name" % (where, t))
    if isinstance(t, int) or (isinstance(t, str) and t.isdigit()):
        t = int(t)
        if not 1 <= t <= 65535:
            raise AnsibleFilterError("%s.targetPort: %d must be from 1 to 65535" % (where, t))
        return t
    if isinstance(t, str):
        return t
    raise AnsibleFilterError("%s.targetPort: %r must be a port number or a port name" % (where, t))


def resolve(services, endpoints):
    """The services with their selected backends (pure Python; AnsibleFilterError on bad input)."""
    if services is None:
        return []
    if not isinstance(services, list):
        raise AnsibleFilterError("service_backends: services must be a list")
    eps = _flatten(endpoints)
    out = []
    for i, svc in enumerate(services):
        if not isinstance(svc, dict):
            raise AnsibleFilterError("services[%d]: must be a mapping" % i)
        ns = svc.get("namespace") or DEFAULT_NAMESPACE
        where = "services[%d] (%s/%s)" % (i, ns, svc.get("name") or svc.get("vip"))
        s = dict(svc)
        selector = s.pop("selector", None)
        s.pop("targetPort", None)
        if isinstance(s.get("protocol"), str):
            s["protocol"] = s["protocol"].lower()
        proto = (s.get("protocol") or "tcp").upper()
        target = _target_port(svc, where)
        listed = [dict(b) for b in s.get("backends") or []]
        if selector:
            if not isinstance(selector, dict):
                raise AnsibleFilterError("%s.selector: must be a mapping of label key to value" % where)
            try:
                labels_mod.validate_labels(selector, where + ".selector")
            except ValueError as e:
                raise AnsibleFilterError(str(e))
            selected = [e for e in eps if (e.get("namespace") or DEFAULT_NAMESPACE) == ns
                        and labels_mod.matches(selector, e.get("labels") or {}) and e.get("ip")]
            picked = []
            for e in selected:
                if isinstance(target, int):
                    picked.append(dict(ip=e["ip"], port=target))
                    continue
                named = [p for p in e.get("ports") or [] if p.get("name") == target
                         and (p.get("protocol") or "TCP").upper() == proto]
                if named:               # Kubernetes: a named port resolves per pod
                    picked.append(dict(ip=e["ip"], port=int(named[0]["port"])))
            if selected and not picked:
                raise AnsibleFilterError(
                    "%s.targetPort: no selected pod (%s) has a %s port named %r"
                    % (where, ", ".join(sorted("%s/%s" % (e.get("namespace") or DEFAULT_NAMESPACE, e.get("name"))
                                               for e in selected)), proto, target))
            # listed backends are kept; a listed backend with the same ip and port wins (its weight)
            have = set((b.get("ip"), b.get("port") if b.get("port") is not None else s.get("port")) for b in listed)
            listed += [b for b in picked if (b["ip"], b["port"]) not in have]
        elif isinstance(target, str) and svc.get("targetPort") not in (None, ""):
            raise AnsibleFilterError("%s.targetPort: the port name %r needs a selector (listed backends have no "
                                     "named ports)" % (where, target))
        elif svc.get("targetPort") not in (None, ""):
            for b in listed:
                if b.get("port") is None:
                    b["port"] = target
        s["backends"] = sorted(listed, key=_order)
        out.append(s)
    return out


def service_backends(services, endpoints):
    return resolve(services, endpoints)


class FilterModule(object):
    def filters(self):
        return {"service_backends": service_backends}
