# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent (``netstack agent``, unit netstack-agent.service): reads the flow events of ``kln_flows``,
counts them (metrics.py), keeps the most recent ones in a bounded ring (``buffer`` flows: memory stays flat
whatever the rate) and makes them into Hubble's flow JSON (hubble.py), enriched (enrich.py) with what the node
knew when it read them, when they are asked for (a flow nobody asks for costs its decoding and counting only: the
agent shares the node's CPUs with the traffic); optionally appends every flow to a JSON lines file rotated by size
(then each is made at once); serves on one address of the node (never all of them):

- ``GET /flows?<filters>``  the flows kept that pass the filters (hubble.parse_filters: namespace, pod, from-pod,
  to-pod, label, identity, verdict, drop-reason, protocol, port, ip, since, last, follow, node), one JSON object a
  line, oldest first; with ``follow=1`` the connection stays open and new flows follow as they come. A follower
  that falls more than the ring behind gets ``{"lost_events": {...}}`` (like Hubble's) and goes on.
- ``GET /metrics``  Prometheus text: Hubble's metrics and ``netstack_*`` (events emitted / lost / rate-limited by
  the programs, map occupancy, services, endpoints, ring use, agent up).
- ``GET /pods``     the pods this node knows (its own and, as the last policy apply saw them, the cluster's).
- ``GET /healthz``  {status, node, flows, ...}.

Bad filters get 400 with the message. Events the programs could not write (ring buffer full) are counted by the
programs and reported, never fatal; a ring buffer map made again (a new size) is picked up. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import copy
import json
import os
import socket
import threading
import time

try:
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from socketserver import ThreadingMixIn
    from urllib.parse import parse_qs, urlparse
except ImportError:  # pragma: no cover - Python 2 has no node agent
    BaseHTTPRequestHandler = HTTPServer = ThreadingMixIn = object
    parse_qs = urlparse = None

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys
from ansible_collections.kldload.netstack.plugins.module_utils.flows import enrich, events, hubble, metrics
from ansible_collections.kldload.netstack.plugins.module_utils.flows.ringbuf import RingBuffer

OCCUPANCY_EVERY = 30.0
BATCH_DELAY = 0.1
OCCUPANCY_TYPES = ("hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "lpm_trie")


def boot_offset():
    """Unix time minus CLOCK_BOOTTIME (the programs' clock)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (IOError, OSError, ValueError):
        return 0


class Exporter:
    """JSON lines appended to ``path``, rotated when it would pass ``max_bytes``: path -> path.1 -> ... path.<keep>."""

    def __init__(self, path, max_bytes, keep):
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        d = os.path.dirname(path)
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o755)
        self.f = open(path, "a")
        self.size = self.f.tell()

    def write(self, obj):
        line = json.dumps(obj, sort_keys=True) + "\n"
        if self.size and self.size + len(line) > self.max_bytes:
            self.rotate()
        self.f.write(line)
        self.size += len(line)

    def flush(self):
        self.f.flush()

    def rotate(self):
        self.f.close()
        for i in range(self.keep - 1, 0, -1):
            if os.path.exists("%s.%d" % (self.path, i)):
                os.rename("%s.%d" % (self.path, i), "%s.%d" % (self.path, i + 1))
        if self.keep:
            os.rename(self.path, self.path + ".1")
        else:
            os.unlink(self.path)
        self.f = open(self.path, "a")
        self.size = 0


class _Flow(object):
    """One flow of the ring: its sequence number and time, and either the ring buffer record with the enricher's
    tables of the moment it was read (``enr``: a shallow copy - refresh() replaces the tables, never changes them),
    or the Hubble flow made of them. ``get()`` makes that flow on first use (events.decode, hubble.make_flow) and
    keeps it: a flow nobody asks for costs a peek at its record and its count in the metrics only."""

    __slots__ = ("seq", "t", "raw", "enr", "resp")

    def __init__(self, seq, t, raw=None, enr=None, resp=None):
        self.seq, self.t, self.raw, self.enr, self.resp = seq, t, raw, enr, resp

    def get(self, node_name):
        resp = self.resp
        if resp is None:
            raw, enr = self.raw, self.enr
            if raw is None:              # made by another thread meanwhile (it sets resp before clearing raw)
                return self.resp
            resp = self.resp = hubble.make_flow(events.decode(raw), enr, node_name, self.t, self.seq)
            self.raw = self.enr = None
        return resp


class Agent:
    """The flows of one node. ``globals_dir``: the shared maps (kln_flows is read there); ``cfg``: the node
    configuration (runtime.validate()d; None in tests); ``section``: its agent section (config.normalize()d)."""

    def __init__(self, globals_dir, section, cfg=None, enricher=None):
        self.globals_dir = globals_dir
        self.section = section
        self.cfg = cfg
        self.node_name = section.get("node_name") or socket.gethostname()
        self.ring = collections.deque(maxlen=section["buffer"])
        self.seq = 0                      # flows seen so far; the ring holds seq - len(ring) .. seq - 1
        self.cond = threading.Condition()
        self.metrics = metrics.Metrics()
        self.enricher = enricher or enrich.Enricher(cfg, self.node_name)
        exp = section.get("export")
        self.exporter = Exporter(exp["path"], exp["max_bytes"], exp["keep"]) if exp else None
        self.decode_errors = 0
        self.started = time.time()
        self.stop = threading.Event()
        self.rb = None
        self.rb_id = None
        self.occupancy = []
        self.occupancy_at = 0.0
        self.batch_delay = BATCH_DELAY

    # ---- reading ---------------------------------------------------------------------------------------

    def _open(self):
        path = events.pin(self.globals_dir, events.RINGBUF)
        if not os.path.exists(path):
            return False
        rb = RingBuffer(path)
        if self.rb is not None:
            self.rb.close()
        self.rb, self.rb_id = rb, bpfsys.map_info(rb.fd)["id"]
        return True

    def _current(self):
        """Whether the pinned ring buffer is still the one open (a map made again, e.g. a new size, is reopened)."""
        path = events.pin(self.globals_dir, events.RINGBUF)
        try:
            with bpfsys.obj_get(path) as fd:
                return bpfsys.map_info(fd)["id"] == self.rb_id
        except OSError:
            return False

    def poll_once(self, timeout=1.0, limit=4096):
        """Wait up to ``timeout`` for events and take what is there: the number of flows added."""
        if self.rb is None and not self._open():
            self.stop.wait(timeout)
            return 0
        self.rb.wait(timeout)
        records = self.rb.read(limit)
        if records:
            self.ingest(records)
            if len(records) < limit:
                # let events gather (the ring buffer holds ~32k): one wakeup per batch, not per event, keeps the
                # agent's CPU off the traffic's (benchmarks/flows); a full batch goes on at once
                self.stop.wait(self.batch_delay)
        return len(records)

    def ingest(self, records):
        """Decode, count and keep ring buffer records (bytes each); with an export, make and write their flows."""
        self.enricher.refresh()
        enr = copy.copy(self.enricher)            # the tables of this moment, for the flows made later
        offset = boot_offset()
        kept, counts = [], collections.Counter()
        for raw in records:
            try:
                t, key = events.peek(raw)
            except events.FlowError:
                self.decode_errors += 1
                continue
            counts[key] += 1                 # a flood repeats few keys: the labels are worked out once per key
            kept.append((offset + t / 1e9, raw))
        for key, n in counts.items():
            self.metrics.observe(events.peeked(key), enr, n)
        with self.cond:
            first = self.seq
            out = [_Flow(first + i, t, raw, enr) for i, (t, raw) in enumerate(kept)]
            self.ring.extend(out)
            self.seq += len(out)
            self.cond.notify_all()
        if self.exporter:
            for f in out:
                self.exporter.write(hubble.public(f.get(self.node_name)))
            self.exporter.flush()

    def add(self, resp):
        """Keep a flow made elsewhere (a hubble.make_flow() response)."""
        with self.cond:
            self.ring.append(_Flow(self.seq, resp["_meta"]["t"], resp=resp))
            self.seq += 1
            self.cond.notify_all()

    def run(self):
        last_check = time.time()
        while not self.stop.is_set():
            try:
                self.poll_once()
                if time.time() - last_check > 5:
                    last_check = time.time()
                    if self.rb is not None and not self._current():
                        self._open()
                    self.enricher.refresh()
            except OSError:
                self.rb = None
                self.stop.wait(1)

    # ---- reading the ring --------------------------------------------------------------------------------

    def snapshot(self, flt):
        """The flows kept that pass ``flt`` (hubble.parse_filters()), oldest first, the last ``flt['last']``."""
        with self.cond:
            items = list(self.ring)
            end = self.seq
        out = [r for r in (f.get(self.node_name) for f in items) if hubble.matches(r, flt)]
        if flt.get("last"):
            out = out[-flt["last"]:]
        return out, end

    def follow(self, flt, start, timeout=1.0):
        """Flows with sequence numbers from ``start`` on that pass ``flt`` (but ``since``: it selects among the flows
        kept; the ones that follow are newer), (flows, next start, lost)."""
        flt = dict((k, v) for k, v in flt.items() if k != "since")
        with self.cond:
            if self.seq <= start:
                self.cond.wait(timeout)
            first = self.seq - len(self.ring)
            lost = max(0, first - start)
            items = list(self.ring)[max(start, first) - first:]
            nxt = self.seq
        return [r for r in (f.get(self.node_name) for f in items) if hubble.matches(r, flt)], nxt, lost

    # ---- metrics -----------------------------------------------------------------------------------------

    def _map_occupancy(self):
        if time.time() - self.occupancy_at < OCCUPANCY_EVERY:
            return self.occupancy
        out = []
        try:
            names = sorted(os.listdir(self.globals_dir))
        except OSError:
            names = []
        for pin in names:
            try:
                with bpfsys.obj_get(os.path.join(self.globals_dir, pin)) as fd:
                    info = bpfsys.map_info(fd)
                    n = None
                    if info["type"] in OCCUPANCY_TYPES:
                        vs = info["value_size"]
                        if info["type"].startswith("percpu") or info["type"] == "lru_percpu_hash":
                            vs = bpfsys.percpu_value_size(vs)
                        n = bpfsys.map_dump_raw(fd, info["key_size"], vs, info["max_entries"])[2]
                    out.append((pin, info["max_entries"], n))
            except OSError:
                continue
        self.occupancy, self.occupancy_at = out, time.time()
        return out

    def render_metrics(self):
        k = events.counters(self.globals_dir)
        self.metrics.set_counter("hubble_lost_events_total", (("source", "perf_event_ring_buffer"),), k["lost"])
        self.metrics.set_counter("hubble_lost_events_total", (("source", "hubble_ring_buffer"),), self.decode_errors)
        occ = self._map_occupancy()
        node = (("node", self.node_name),)
        extra = [
            ("netstack_agent_up", "gauge", "The node agent is up and serving", [(node, 1)]),
            ("netstack_flow_events_emitted_total", "counter", "Flow events the eBPF programs wrote", [(node, k["emitted"])]),
            ("netstack_flow_events_lost_total", "counter", "Flow events lost: the ring buffer was full",
             [(node, k["lost"])]),
            ("netstack_flow_events_rate_limited_total", "counter", "Drop events not written: over the drop rate",
             [(node, k["rate_limited"])]),
            ("netstack_agent_flows_seen_total", "counter", "Flows the agent read", [(node, self.seq)]),
            ("netstack_agent_flows_buffered", "gauge", "Flows kept in the agent's ring", [(node, len(self.ring))]),
            ("netstack_agent_flows_buffer_size", "gauge", "Capacity of the agent's ring", [(node, self.ring.maxlen)]),
            ("netstack_agent_resident_memory_bytes", "gauge", "The agent's resident memory", [(node, rss_bytes())]),
            ("netstack_map_capacity", "gauge", "max_entries of each shared map",
             [(node + (("map", p),), cap) for p, cap, _n in occ]),
            ("netstack_map_entries", "gauge", "Entries of each shared hash and LPM map",
             [(node + (("map", p),), n) for p, _cap, n in occ if n is not None]),
            ("netstack_services", "gauge", "Services in the node's LB table", [(node, len(self.enricher.services))]),
            ("netstack_endpoints", "gauge", "Pods (endpoints) on this node", [(node, len(self.enricher.endpoints))]),
        ]
        return self.metrics.render(extra)

    def pods(self):
        out = []
        seen = set()
        for ip, rec in sorted(self.enricher.by_ip.items()):
            if rec.get("kind") != "pod":
                continue
            key = "%s/%s" % (rec["namespace"], rec["pod_name"])
            if key in seen:
                continue
            seen.add(key)
            out.append({"namespace": rec["namespace"], "name": rec["pod_name"], "ip": ip, "node": rec.get("node_name", ""),
                        "identity": rec.get("identity", 0), "labels": rec.get("labels", [])})
        return out

    def health(self):
        return {"status": "ok", "node": self.node_name, "flows_seen": self.seq, "flows_buffered": len(self.ring),
                "buffer": self.ring.maxlen, "ring_buffer": self.rb is not None, "uptime": round(time.time() - self.started, 1),
                "counters": events.counters(self.globals_dir), "enrich_errors": self.enricher.errors}


# ---- HTTP ----------------------------------------------------------------------------------------------

class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, family):
        self.address_family = family
        HTTPServer.__init__(self, addr, handler)


def send_lines(handler, objs):
    for o in objs:
        handler.wfile.write((json.dumps(o, sort_keys=True) + "\n").encode("utf-8"))


class Handler(BaseHTTPRequestHandler):
    """HTTP of one agent (``server.agent``)."""
    server_version = "netstack-agent"

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass

    def _reply(self, code, body, ctype="application/json"):
        data = body.encode("utf-8") if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        agent = self.server.agent
        url = urlparse(self.path)
        try:
            if url.path == "/metrics":
                return self._reply(200, agent.render_metrics(), "text/plain; version=0.0.4; charset=utf-8")
            if url.path == "/healthz":
                return self._reply(200, json.dumps(agent.health(), sort_keys=True) + "\n")
            if url.path == "/pods":
                agent.enricher.refresh()
                return self._reply(200, json.dumps(agent.pods(), sort_keys=True) + "\n")
            if url.path == "/flows":
                return self._flows(agent, parse_qs(url.query))
            return self._reply(404, json.dumps({"error": "no such path %s (/flows, /metrics, /pods, /healthz)" % url.path}) + "\n")
        except hubble.FilterError as e:
            return self._reply(400, json.dumps({"error": str(e)}) + "\n")
        except (BrokenPipeError, ConnectionResetError):
            return None

    def _flows(self, agent, params):
        flt = hubble.parse_filters(params)
        items, start = agent.snapshot(flt)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        send_lines(self, [hubble.public(r) for r in items])
        if not flt.get("follow"):
            return None
        self.wfile.flush()
        while not agent.stop.is_set():
            items, start, lost = agent.follow(flt, start)
            if lost:
                send_lines(self, [{"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": lost,
                                                   "node_name": agent.node_name}}])
            send_lines(self, [hubble.public(r) for r in items])
            self.wfile.flush()
        return None


def serve(agent, listen):
    """Start the HTTP server on ``listen`` (ADDRESS:PORT) in a thread; the server."""
    host, _sep, port = listen.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = _Server((host, int(port)), Handler, fam)
    srv.agent = agent
    t = threading.Thread(target=srv.serve_forever, name="http")
    t.daemon = True
    t.start()
    return srv
