# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flow observability (docs/observability.md): the events the eBPF programs write into the ring buffer
``kln_flows`` (bpf/lib/flow.h) read, enriched and served like Hubble's.

- ``events``   the event layout and its names (verdicts, drop reasons, TCP flags), the kernel-side configuration
               (``kln_flow_config``) and counters (``kln_flow_stat``)
- ``ringbuf``  a BPF ring buffer consumer in pure Python (mmap of the map)
- ``enrich``   what the node knows about an address: pods (endpoint records), identities and rules (the policy's
               compiled output), services (the LB table), network namespaces (socket events)
- ``hubble``   Hubble's flow JSON, the compact line, the filters of ``netstack observe``
- ``metrics``  Prometheus text exposition with Hubble's metric names
- ``agent``    the node agent (``netstack agent``): reader, bounded ring, JSON export, HTTP (flows, metrics)
- ``relay``    ``netstack observe``: one agent, or every node's agent merged by time (like Hubble Relay)
- ``service``  the agent's unit (netstack-agent.service), made by the node apply
- ``config``   the ``agent`` section of the node configuration

Standard library only (nodes have no PyYAML, no prometheus_client). No Ansible imports.
"""
