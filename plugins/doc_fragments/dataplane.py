# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options several kldload.netstack modules share, documented once (the argument specs are in
plugins/module_utils/argspec.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    # pin_path: bpf_program, node_dataplane
    DOCUMENTATION = r"""
options:
  pin_path:
    description:
      - Directory on a bpffs (see M(kldload.netstack.bpffs)) under which the dataplane's objects are pinned -
        C(<pin_path>/<object>/) for each object's programs, links and private maps, C(<pin_path>/globals/) for
        the maps objects share (as C(<map>_v<layout version>)). No C(.) is allowed anywhere in it (bpffs
        refuses dots in names).
    type: path
    default: /sys/fs/bpf/kldload-netstack
"""

    # the socket LB's service table: lb_services, node_dataplane
    SERVICES = r"""
options:
  services:
    description:
      - The service table of the socket load balancer (ClusterIP-style C(VIP:port/protocol) services with their backends).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Service name (reported in diffs and C(netstack lb list)). Required unless O(services[].state=absent).
        type: str
      state:
        description:
          - V(absent) removes the service (known by O(services[].vip), O(services[].port) and
            O(services[].protocol); a service not in the maps is no change). It takes no backends; its
            algorithm and affinity fields are not used.
        type: str
        choices: [present, absent]
        default: present
      namespace:
        description: Namespace, for reporting.
        type: str
        default: default
      vip:
        description: Virtual IP (IPv4 or IPv6).
        type: str
        required: true
      port:
        description: Virtual port.
        type: int
        required: true
      protocol:
        description: Protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      algorithm:
        description:
          - C(random) picks a backend per connection (weighted when the weights differ, e.g. a 90/10 canary).
          - C(maglev) uses a Maglev table (O(maglev_table_size) entries, built with turns proportional to
            the weights) - a client's bound source address and port (else its socket) always map to the
            same backend, and removing a backend moves only the flows that were on it (and about 0.05 % of
            the others at the default table size).
        type: str
        choices: [random, maglev]
        default: random
      affinity_timeout:
        description: Session affinity per client (network namespace) for this many seconds; 0 disables.
        type: int
        default: 0
      external:
        description:
          - Also answered at the node's edge (the C(nodeport) object - a LoadBalancer IP or a NodePort on the node's
            address, from the LAN) - V(cluster) with SNAT to the node's address (externalTrafficPolicy Cluster),
            V(local) keeping the client's address (externalTrafficPolicy Local; list only this node's backends).
            Absent - the socket LB only (a ClusterIP). (0.3.0)
        type: str
        choices: [cluster, local]
      backends:
        description: Backends. An empty list makes connections to the VIP fail at once (EPERM).
        type: list
        elements: dict
        default: []
        suboptions:
          ip:
            description: Backend address, of the VIP's address family.
            type: str
            required: true
          port:
            description: Backend port; defaults to the service port.
            type: int
          weight:
            description: Relative weight, > 0. The weights of one service add up to at most 65535.
            type: int
            default: 1
  maglev_table_size:
    description:
      - Maglev table size M per service (a prime, at least 10 times the largest Maglev backend count).
        Fixed while Maglev services exist. C(kln_lb_maglev) must hold C((Maglev services + 1) * 2 * M)
        entries (by default 64 * 2 * 16381, for up to 63 Maglev services).
    type: int
    default: 16381
  state_file:
    description:
      - JSON file where the declared services are kept after a successful write (names for listing,
        and what C(netstack dataplane restore) programs again after a reboot). Not written in check mode.
    type: path
    default: /var/lib/kldload-netstack/lb/services.json
  destroy_udp_sockets:
    description:
      - Destroy connected UDP sockets to backends that left every service (sock_diag, C(ss -K)); the
        application sees the socket disconnected and connects again through the VIP.
    type: bool
    default: true
"""
