# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The service table as rows (what sync() and table() return) and as text (like ``cilium bpf lb list``)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (
    ALG_MAGLEV, ALG_WEIGHTED, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL, packed_ip)
from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import fam_of, svc_label


def _order(rec):
    vip, port, proto = rec.key
    return fam_of(vip), packed_ip(vip), port, proto


def rows(records, names):
    """Rows of plan.Record's, sorted by family, address, port, protocol; ``names`` {key: "namespace/name"}."""
    out = []
    for r in sorted(records, key=_order):
        out.append({"service": svc_label(r.key), "name": names.get(r.key, ""), "id": r.id,
                    "algorithm": "maglev" if r.alg == ALG_MAGLEV else "random", "weighted": r.alg == ALG_WEIGHTED,
                    "affinity_timeout": r.aff if r.flags & SVC_F_AFFINITY else 0, "rev": r.rev,
                    "external": (None if not r.flags & SVC_F_EXTERNAL else "local" if r.flags & SVC_F_LOCAL else "cluster"),
                    "backends": [{"address": a, "id": bid, "slot": n, "weight": w}
                                 for n, (a, bid, w) in enumerate(r.entries, 1)]})
    return out


def format_table(table_rows):
    """Text like ``cilium bpf lb list``: one line per service master and per backend slot."""
    lines = ["%-28s %-32s %s" % ("SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)", "DETAILS")]
    for r in table_rows:
        detail = r["algorithm"] + (" weighted" if r["weighted"] else "")
        if r["affinity_timeout"]:
            detail += " affinity=%ds" % r["affinity_timeout"]
        if r.get("external"):
            detail += " external(%s)" % r["external"]
        if r["name"]:
            detail += " " + r["name"]
        if not r["backends"]:
            detail += " (no backends: connect refused)"
        lines.append("%-28s %-32s %s" % (r["service"], "0.0.0.0:0 (%d) (0)" % r["id"], detail))
        for b in r["backends"]:
            lines.append("%-28s %-32s %s" % ("", "%s (%d) (%d)" % (b["address"], r["id"], b["slot"]),
                                             "weight=%d" % b["weight"]))
    return "\n".join(lines)
