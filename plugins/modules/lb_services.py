#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: lb_services
short_description: Program the socket load balancer's service table (ClusterIP-style services) in its eBPF maps
version_added: 0.1.0
description:
  - Declares the whole table of virtual services (C(VIP:port/protocol) with their backends) answered
    by the socket-level eBPF load balancer (C(bpf/sock_lb.c), loaded by M(kldload.netstack.bpf_program)
    or the C(kldload.netstack.dataplane) role). A C(connect()) or C(sendmsg()) to a VIP from any process
    in the attached cgroup goes straight to a backend; no iptables rule, no conntrack entry.
  - Reads the pinned maps, computes the entries wanted, and writes only the difference with batched
    C(bpf()) calls (C(BPF_MAP_UPDATE_BATCH) / C(BPF_MAP_DELETE_BATCH)), in an order that never shows a
    reader a half-written service - backends, then slots, then the spare Maglev half, then each
    service's master entry (the commit), then deletions (stale slots, removed services, backends no
    service uses, session-affinity entries of changed services).
  - Every service is validated (and the maps' capacity checked) before the first write; bad input
    fails the task with the offending field named and the maps untouched.
  - With O(prune=true) (the default) O(services) is the whole table - services in the maps that are
    not listed are removed - and every run reads all the maps (a full sync; it also repairs entries it
    finds wrong).
  - With O(prune=false) O(services) lists only what changes - services to add or change, and services to
    remove with O(services[].state=absent) - and every other service stays as it is. This path reads and
    writes only the listed services, by point lookups, through an index kept in two userspace-only maps
    (C(kln_lb_bidx), C(kln_lb_index)); its cost grows with the change, not with the table (about 1 ms for
    one service among 10,000, see C(docs/performance.md)). When that index cannot be trusted (never built,
    a map recreated, a writer that did not finish) the run takes the full path, which rebuilds it.
  - Backends that leave every service have their connected UDP sockets destroyed in every network
    namespace of the node (C(ss -K); the socket is disconnected - a pending C(recv) fails with
    C(ECONNABORTED), a C(send) with C(EDESTADDRREQ) - and the application connects again through
    the VIP), so a connected UDP client does not keep sending to a backend that is gone. Established
    TCP connections are left to finish, like kube-proxy does.
options:
  prune:
    description:
      - V(true) - O(services) is the whole table; remove services found in the maps that it does not list.
      - V(false) - change only the services listed (incremental); RV(table) then holds only those.
    type: bool
    default: true
  map_dir:
    description:
      - The node's shared map directory, C(<pin root>/globals), where the socket LB object's shared maps are
        pinned once per node under C(<map name>_v<layout version>) (C(kln_lb4_svc_v1), ...). The module opens
        those maps and checks their layout; the object's private maps are never opened.
    type: path
    default: /sys/fs/bpf/kldload-netstack/globals
requirements:
  - The socket LB object loaded, its shared maps pinned in O(map_dir) (the C(kldload.netstack.dataplane) role); root.
notes:
  - Supports check mode and diff mode. The diff lists services added, removed and changed, with the
    backends added or removed and the weights changed.
seealso:
  - module: kldload.netstack.bpf_program
extends_documentation_fragment:
  - kldload.netstack.dataplane.services
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Two services, one with a 90/10 canary split
  kldload.netstack.lb_services:
    services:
      - name: web
        namespace: production
        vip: 10.96.0.10
        port: 80
        backends:
          - {ip: 10.244.1.5, port: 8080, weight: 90}
          - {ip: 10.244.2.7, port: 8080, weight: 10}
      - name: dns
        namespace: kube-system
        vip: 10.96.0.53
        port: 53
        protocol: udp
        algorithm: maglev
        backends:
          - {ip: 10.244.1.2}
          - {ip: 10.244.2.2}
  diff: true

- name: Change one service and remove another, leaving the rest of the table as it is
  kldload.netstack.lb_services:
    prune: false
    services:
      - name: web
        namespace: production
        vip: 10.96.0.10
        port: 80
        backends:
          - {ip: 10.244.1.5, port: 8080, weight: 50}
          - {ip: 10.244.2.7, port: 8080, weight: 50}
      - vip: 10.96.0.53
        port: 53
        protocol: udp
        state: absent
"""

RETURN = r"""
table:
  description:
    - The service table in the maps after the change (in check mode, as it is now), like C(cilium bpf lb list).
    - With O(prune=false), only the services listed in O(services).
  returned: always
  type: list
  elements: dict
  sample:
    - service: 10.96.0.10:80/TCP
      name: production/web
      id: 65535
      algorithm: random
      weighted: true
      affinity_timeout: 0
      rev: 1
      backends:
        - {address: 10.244.1.5:8080, id: 1, slot: 1, weight: 90}
        - {address: 10.244.2.7:8080, id: 2, slot: 2, weight: 10}
table_text:
  description: The same table as text lines (what C(netstack lb list) prints).
  returned: always
  type: list
  elements: str
added:
  description: Services added.
  returned: always
  type: list
  elements: dict
removed:
  description: Services removed.
  returned: always
  type: list
  elements: dict
service_changes:
  description: Services changed, with C(backends_added), C(backends_removed), C(weights_changed) and changed fields.
  returned: always
  type: list
  elements: dict
stats:
  description:
    - Entries written and deleted, bpf() calls made, seconds taken, and the path taken - V(full) (every map
      read) or V(incremental) (O(prune=false) with a valid index).
  returned: always
  type: dict
  sample: {updates: 110010, deletes: 0, calls: 5, seconds: 0.41, path: full}
udp_sockets_destroyed:
  description: Connected UDP sockets destroyed because their backend left every service.
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kldload.netstack.plugins.module_utils import argspec, lb, runtime
from ansible_collections.kldload.netstack.plugins.module_utils.bpfsys import BpfError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            prune=dict(type="bool", default=True),
            map_dir=dict(type="path", default="/sys/fs/bpf/kldload-netstack/globals"),
            **argspec.SERVICES
        ),
        supports_check_mode=True,
    )
    p = module.params
    services = argspec.services_from_params(p)
    destroyed = [0]

    def gone(backends):
        if p["destroy_udp_sockets"]:
            destroyed[0] = lb.destroy_udp_sockets(backends, runtime.runner(module))

    try:
        res = lb.sync(p["map_dir"], services, prune=p["prune"], check=module.check_mode,
                      maglev_m=p["maglev_table_size"], state_file=p["state_file"], on_backends_gone=gone)
    except lb.LbError as e:
        module.fail_json(msg=str(e))
    except (BpfError, OSError) as e:
        module.fail_json(msg="writing the maps in %s failed: %s" % (p["map_dir"], e))
    table = res["table"]
    out = dict(changed=res["changed"], table=table, table_text=lb.format_table(table).splitlines(),
               added=res["diff"]["added"], removed=res["diff"]["removed"], service_changes=res["diff"]["changed"],
               stats=res["stats"], udp_sockets_destroyed=destroyed[0])
    if module._diff:
        out["diff"] = dict(before=_diff_text(res["diff"], "before"), after=_diff_text(res["diff"], "after"))
    module.exit_json(**out)


def _diff_text(d, side):
    lines = []
    if side == "before":
        for s in d["removed"]:
            lines.append("%s %s backends %s" % (s["service"], s["name"], ", ".join(s["backends"]) or "-"))
        for s in d["changed"]:
            lines.append("%s %s: %s" % (s["service"], s["name"], "; ".join(
                "%s %s" % (k, v if not isinstance(v, list) or k.startswith("backends") or k.startswith("weights")
                           else v[0]) for k, v in sorted(s.items())
                if k in ("backends_removed", "algorithm", "affinity_timeout", "id"))))
    else:
        for s in d["added"]:
            lines.append("%s %s backends %s" % (s["service"], s["name"], ", ".join(s["backends"]) or "-"))
        for s in d["changed"]:
            parts = []
            for k, v in sorted(s.items()):
                if k in ("backends_added", "weights_changed"):
                    parts.append("%s %s" % (k, ", ".join(v)))
                elif k in ("algorithm", "affinity_timeout", "id"):
                    parts.append("%s %s" % (k, v[1]))
            lines.append("%s %s: %s" % (s["service"], s["name"], "; ".join(parts) or "rewritten"))
    return "\n".join(lines) + ("\n" if lines else "")


if __name__ == "__main__":
    main()
