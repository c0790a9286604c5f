# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs several modules share, declared once (their docs: plugins/doc_fragments/dataplane.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

PIN_PATH = dict(type="path", default="/sys/fs/bpf/kldload-netstack")

SERVICES = dict(
    services=dict(type="list", elements="dict", default=[], required_if=[("state", "present", ("name",))], options=dict(
        name=dict(type="str"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        namespace=dict(type="str", default="default"),
        vip=dict(type="str", required=True),
        port=dict(type="int", required=True),
        protocol=dict(type="str", choices=["tcp", "udp"], default="tcp"),
        algorithm=dict(type="str", choices=["random", "maglev"], default="random"),
        affinity_timeout=dict(type="int", default=0),
        external=dict(type="str", choices=["cluster", "local"]),
        backends=dict(type="list", elements="dict", default=[], options=dict(
            ip=dict(type="str", required=True),
            port=dict(type="int"),
            weight=dict(type="int", default=1),
        )),
    )),
    maglev_table_size=dict(type="int", default=16381),
    state_file=dict(type="path", default="/var/lib/kldload-netstack/lb/services.json"),
    destroy_udp_sockets=dict(type="bool", default=True),
)


def services_from_params(params):
    """The services as the LB writer takes them: absent optional backend fields dropped."""
    out = []
    for s in params.get("services") or []:
        s = dict(s)
        if s.get("external") is None:
            s.pop("external", None)
        s["backends"] = [dict((k, v) for k, v in b.items() if v is not None) for b in s.get("backends") or []]
        out.append(s)
    return out
