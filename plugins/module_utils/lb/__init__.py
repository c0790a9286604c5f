# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The socket load balancer's service table: validate, read the maps, plan, write in commit order.

The model, for one service ``VIP:port/proto``: backends live in ``kln_lb{4,6}_backend`` by id (one id
per address:port, shared by services); the service is a master slot 0 ``{count, service id,
algorithm, flags, total weight, affinity timeout, rev}`` plus slots 1..count, each holding a backend
id and the cumulative weight; Maglev services also have a table half ``(id*2 + rev&1)*M ..`` in
``kln_lb_maglev``. The maps are the node's shared maps in ``<pin root>/globals/`` (``layout.pin()``).

One sync: ``spec.parse`` (validation) -> ``state.IndexView`` (incremental, point lookups; ``Untrusted``
-> full) or ``state.FullView`` (every map dumped) -> ``plan.make`` (ids, capacity, diff; all errors
before the first write) -> ``writer.write`` (commit order, then the index) -> ``store`` (state file or
its journal) -> ``table.rows``. No Ansible imports: the node-side ``netstack`` command uses it too.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import gc
import time

from ansible_collections.kldload.netstack.plugins.module_utils.lb import pinned, plan, spec, state, store, writer
from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import (  # noqa: F401 (public names)
    ALG_MAGLEV, ALG_RANDOM, ALG_WEIGHTED, FORMATS, MAPS, MAX_SERVICE_ID, MAX_WEIGHT_TOTAL, PROTO_NAMES, PROTOCOLS, S,
    SVC_F_AFFINITY, VERSIONS, pin)
from ansible_collections.kldload.netstack.plugins.module_utils.lb.maglev import is_prime, maglev_table  # noqa: F401
from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import (  # noqa: F401
    ALGORITHMS, BACKEND_KEYS, SERVICE_KEYS, LbError, addr_port, svc_key, svc_label)
from ansible_collections.kldload.netstack.plugins.module_utils.lb.store import load_state  # noqa: F401
from ansible_collections.kldload.netstack.plugins.module_utils.lb.table import format_table, rows  # noqa: F401
from ansible_collections.kldload.netstack.plugins.module_utils.lb.udp import destroy_udp_sockets  # noqa: F401

DEFAULT_MAGLEV_M = 16381


def normalize(services, maglev_m=DEFAULT_MAGLEV_M):
    """Check the declared services; return them in canonical form (backends sorted).

    Raises LbError naming the field (``services[2].backends[0].weight``) on the first problem.
    Entries with ``state: absent`` are checked too but not returned.
    """
    with _no_gc():
        return spec.normalize(services, maglev_m)


@contextlib.contextmanager
def _no_gc():
    """No cyclic garbage collection while a table is built: its hundreds of thousands of small
    acyclic objects make every full collection walk them all; reference counting frees them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def sync(map_dir, services, prune=True, check=False, maglev_m=DEFAULT_MAGLEV_M, state_file=None,
         on_backends_gone=None):
    """Make the maps in ``map_dir`` (the globals directory) hold ``services``; return {changed, diff,
    table, stats, services}.

    ``prune=True``: ``services`` is the whole table; services in the maps that it does not declare
    are removed. Every map is read (a full sync: it also repairs what it finds wrong).

    ``prune=False``: ``services`` lists only the services to add or change, and those to remove
    (``state: absent``); every other service stays as it is. This is the incremental path: it reads
    and writes only the listed services, with point lookups, through the userspace index
    (``kln_lb_bidx``, ``kln_lb_index``) the full sync keeps. When the index cannot be trusted
    (never built, a map recreated, a writer that did not finish) it falls back to the full path,
    which rebuilds it; ``stats.path`` says which ran. The returned ``table`` then holds only the
    listed services.

    ``check``: compute only. ``state_file``: JSON file with the declared services (names, for
    listing; restore at boot), written after a successful sync; the incremental path appends to
    its journal (``<state_file>.journal``) instead of rewriting it. ``on_backends_gone(list of (ip,
    port))``: called after the writes with backends that left every service (the module destroys
    connected UDP sockets). Writers of one map directory are serialized with flock().
    """
    t0 = time.time()
    if not is_prime(maglev_m) or maglev_m < 7:
        raise LbError("maglev_table_size: must be a prime >= 7, got %r" % maglev_m)
    with _no_gc():      # (what _sync() built is freed when it returns, before the collector runs again)
        return _sync(map_dir, plan.Request(None, None, prune, check, maglev_m, state_file, on_backends_gone),
                     services, t0)


def _sync(map_dir, req, services, t0):
    desired, absent = spec.parse(services, req.maglev_m)
    req = req._replace(desired=desired, absent=absent)
    maps = pinned.Maps(map_dir)
    try:
        if not req.check:
            maps.lock()
        p = None
        if not req.prune:
            try:
                p = plan.make(state.IndexView(maps, [s.key for s in desired] + sorted(absent), req.maglev_m), req,
                              maps.info)
            except state.Untrusted:
                p = None
        if p is None:
            p = plan.make(state.FullView(maps), req, maps.info)
        return _apply(maps, p, t0)
    finally:
        maps.close()


def _apply(maps, p, t0):
    """Write the plan (not in check mode), then the state file and the callback; the result of sync()."""
    req, full = p.req, p.view.complete
    stats = {"updates": 0, "deletes": 0, "calls": 0, "path": "full" if full else "incremental"}
    if not req.check:
        if p.changed:
            writer.write(maps, p, stats)
        elif full:
            writer.repair_index(maps, p, stats)
        if req.state_file and full:
            store.write_state(req.state_file, req.desired + [p.declared[c.key] for c in p.kept if c.key in p.declared],
                              only_if_changed=not p.changed)
        elif req.state_file and p.changed:
            store.journal(req.state_file, [r.svc for r in p.rewrite], [c.key for c in p.removed])
        if req.on_backends_gone and p.gone:
            req.on_backends_gone([(ip, port) for _fam, _bid, ip, port in sorted(p.gone, key=lambda g: (g[0], g[2], g[3]))])
    records = p.current() if req.check else p.after()
    if not req.prune:
        listed = set(s.key for s in req.desired)
        records = [r for r in records if r.key in listed]
    result = {"changed": p.changed, "diff": p.diff, "table": rows(records, p.names()), "stats": stats,
              "services": p.services}
    stats["seconds"] = round(time.time() - t0, 4)
    return result


def table(map_dir, state_file=None):
    """The service table in the maps (the rows ``sync`` returns)."""
    with _no_gc():
        maps = pinned.Maps(map_dir)
        try:
            view = state.FullView(maps)
        finally:
            maps.close()
        names = store.names(store.load(state_file)) if state_file else {}
        return rows([plan.current_record(view, c) for c in view.services.values()], names)
