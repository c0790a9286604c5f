# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``netstack observe``: one or many node agents' flows, merged (like Hubble Relay), filtered and printed.

On a node, the one source is the local agent (the node configuration's ``agent.listen``); on the controller the
sources are every node's agent (``--inventory``: the hosts of ``kube_nodes`` and their management address, or
``--agent ADDRESS:PORT`` given again for each). The filters are hubble.parse_filters()'s, checked here first (a bad
one is an error before anything is asked) and sent to every agent, which applies them (agent.py); the merge orders
the flows by time across the nodes and applies ``--last N`` to the whole. ``--follow`` keeps a stream open to every
agent and prints flows as they come. Output: ``compact`` (hubble.compact()) or ``json`` (the agent's lines as they
are: Hubble's flow JSON). An agent that does not answer is reported on stderr (``nodes unavailable``, as Hubble
Relay says) and the others still answer; pods named by ``--pod``/``--from-pod``/``--to-pod`` that no agent knows are
said so, not an error. Standard library only. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import shutil
import subprocess
import threading

try:
    import http.client as httplib
    import queue
    from urllib.parse import urlencode
except ImportError:  # pragma: no cover - Python 2 has no observe
    httplib = queue = urlencode = None

from ansible_collections.kldload.netstack.plugins.module_utils.flows import config as fconfig
from ansible_collections.kldload.netstack.plugins.module_utils.flows import hubble

TIMEOUT = 10.0
FUTURE = 9.9e9
INVENTORY_GROUP = "kube_nodes"
PORT_VARS = ("dataplane_flows_port", "netstack_flows_port")
LISTEN_VARS = ("dataplane_flows_listen", "netstack_flows_listen")


class RelayError(Exception):
    """An answer that cannot be given (no agent reachable, an agent refused the filters)."""


def base_url(listen):
    """(address, port) of an agent's ADDRESS:PORT."""
    return fconfig.split_listen(listen, "agent")


def agents_from_inventory(inventory, group=INVENTORY_GROUP, port=None, run=None):
    """{host: ADDRESS:PORT} of every host of ``group`` in an Ansible inventory (through ``ansible-inventory --list``):
    the host's ``dataplane_flows_listen`` / ``netstack_flows_listen`` if set, else its ``ansible_host`` (the
    management address the agent listens on by default) and ``port`` (or the host's ``*_flows_port``, or 4245)."""
    argv = ["ansible-inventory", "-i", inventory, "--list"]
    if run is None:
        if not shutil.which(argv[0]):
            raise RelayError("ansible-inventory is not on PATH (the controller's Ansible); or name the agents with --agent")
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
        rc, out, err = p.returncode, p.stdout, p.stderr
    else:
        rc, out, err = run(argv)
    if rc != 0:
        raise RelayError("ansible-inventory -i %s failed: %s" % (inventory, (err or out).strip()[-500:]))
    data = json.loads(out)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    hosts = _group_hosts(data, group)
    if not hosts:
        raise RelayError("the inventory %s has no hosts in the group %s" % (inventory, group))
    out = {}
    for h in hosts:
        hv = hostvars.get(h, {})
        listen = next((hv[v] for v in LISTEN_VARS if hv.get(v)), None)
        if not listen:
            p = port or next((hv[v] for v in PORT_VARS if hv.get(v)), fconfig.DEFAULT_PORT)
            addr = hv.get("ansible_host", h)
            listen = ("[%s]:%s" if ":" in addr else "%s:%s") % (addr, p)
        out[h] = listen
    return out


def _group_hosts(data, group, seen=None):
    seen = seen or set()
    if group in seen:
        return []
    seen.add(group)
    g = data.get(group) or {}
    hosts = list(g.get("hosts") or [])
    for child in g.get("children") or []:
        hosts += [h for h in _group_hosts(data, child, seen) if h not in hosts]
    return hosts


def parse_cli(values):
    """Validated filters from the command line's {name: [values] or value} (names with _), FilterError naming the
    flag otherwise."""
    params = dict((k, v) for k, v in values.items() if v not in (None, [], False))
    return hubble.parse_filters(params)


def _open(base, path, timeout):
    """GET ``path`` of the agent at ``base`` (address, port): the response (200), RelayError with the agent's message
    (a refused filter: 400), OSError when it cannot be reached. http.client: the node has the standard library only."""
    conn = httplib.HTTPConnection(base[0], base[1], timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    if resp.status != 200:
        body = resp.read().decode("utf-8", "replace")
        conn.close()
        try:
            msg = json.loads(body).get("error")
        except ValueError:
            msg = None
        raise RelayError(msg or "HTTP %d from %s:%d%s" % (resp.status, base[0], base[1], path))
    return resp


def _lines(resp):
    for raw in resp:
        raw = raw.strip()
        if raw:
            yield json.loads(raw.decode("utf-8"))


class Relay:
    """The flows of ``agents`` ({name: ADDRESS:PORT}) merged."""

    def __init__(self, agents, timeout=TIMEOUT):
        if not agents:
            raise RelayError("no agent to ask")
        self.agents = dict((name, base_url(listen)) for name, listen in agents.items())
        self.timeout = timeout
        self.unavailable = {}

    def _gather(self, path, query):
        """{name: [objects]} of GET path?query from every agent at once; the ones that fail in self.unavailable."""
        results = {}
        refused = []

        def one(name, base):
            try:
                resp = _open(base, "%s?%s" % (path, urlencode(query)), self.timeout)
                with resp:
                    if path == "/flows":
                        results[name] = list(_lines(resp))
                    else:
                        results[name] = json.loads(resp.read().decode("utf-8"))
            except RelayError as e:
                refused.append(str(e))
            except (httplib.HTTPException, OSError, ValueError) as e:
                self.unavailable[name] = str(e) or e.__class__.__name__
        threads = [threading.Thread(target=one, args=(n, u)) for n, u in sorted(self.agents.items())]
        for t in threads:
            t.daemon = True
            t.start()
        for t in threads:
            t.join(self.timeout * 3)
        if refused:
            raise RelayError(refused[0])
        if not results:
            down = ["%s (%s:%d): %s" % ((n,) + tuple(self.agents[n]) + (e,)) for n, e in sorted(self.unavailable.items())]
            raise RelayError("no agent answered: %s" % "; ".join(down))
        return results

    def pods(self):
        """Every pod the agents know: {namespace/name: {namespace, name, ip, node, identity, labels}}."""
        out = {}
        for rows in self._gather("/pods", {}).values():
            for r in rows:
                out.setdefault("%s/%s" % (r["namespace"], r["name"]), r)
        return out

    def unknown_pods(self, flt):
        """The pods the filters name that no agent knows ([namespace/]name prefixes, as hubble matches them)."""
        specs = hubble.pod_filters(flt)
        if not specs:
            return []
        known = self.pods()
        out = []
        for spec in specs:
            ns, _sep, name = spec.rpartition("/")
            if not any((not ns or k.split("/", 1)[0] == ns) and k.split("/", 1)[1].startswith(name) for k in known):
                out.append(spec)
        return out

    def flows(self, flt):
        """The flows kept by every agent that pass ``flt``, merged in time order, the last ``flt['last']``."""
        q = hubble.query(dict((k, v) for k, v in flt.items() if k != "follow"))
        merged = []
        for rows in self._gather("/flows", q).values():
            merged += [r for r in rows if "flow" in r]
        merged.sort(key=lambda r: r["flow"].get("time", ""))
        if flt.get("last"):
            merged = merged[-flt["last"]:]
        return merged

    def follow(self, flt, emit, stop=None, history=True):
        """The flows kept (merged, as flows()), then every new one as it comes from any agent, through
        ``emit(obj)`` (objects in the agents' JSON, lost-event notices too) until ``stop`` is set or every stream
        ended."""
        stop = stop or threading.Event()
        if history:
            for r in self.flows(dict(flt, follow=False)):
                emit(r)
        # the streams: no history again (a since in the future: the agents' follow applies since to the flows kept
        # only) and no --last
        q = hubble.query(dict((k, v) for k, v in flt.items() if k not in ("last", "since", "follow")))
        q += [("follow", "1"), ("since", "%.6f" % FUTURE)]
        out = queue.Queue()

        def stream(name, base):
            try:
                resp = _open(base, "/flows?%s" % urlencode(q), None)
                with resp:
                    for obj in _lines(resp):
                        out.put(obj)
                        if stop.is_set():
                            break
            except (RelayError, httplib.HTTPException, OSError, ValueError) as e:
                self.unavailable[name] = str(e) or e.__class__.__name__
            out.put(None)
        threads = [threading.Thread(target=stream, args=(n, u)) for n, u in sorted(self.agents.items())]
        for t in threads:
            t.daemon = True
            t.start()
        open_streams = len(threads)
        while open_streams and not stop.is_set():
            try:
                obj = out.get(timeout=0.5)
            except queue.Empty:
                continue
            if obj is None:
                open_streams -= 1
                continue
            emit(obj)


def render(obj, fmt):
    """One output line for an agent's object (a flow or a lost-events notice)."""
    if fmt == "json":
        return json.dumps(obj, sort_keys=True)
    if "lost_events" in obj:
        le = obj["lost_events"]
        return "EVENTS LOST: %s %s (node %s)" % (le.get("source"), le.get("num_events_lost"), le.get("node_name", ""))
    return hubble.compact(obj)


# ---- the relay's own HTTP: the network map page and its data ---------------------------------------------

def serve(relay, listen, window="5m"):
    """``netstack relay``: serve on ``listen`` (ADDRESS:PORT, checked by the caller; the controller's loopback by
    default) the network map
    page (``/``, mappage.py), ``/api/pods`` (every agent's pods), ``/api/flows?<filters>`` (every agent's flows
    merged, one JSON object a line; no follow) and ``/healthz``; in a thread. The server."""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from socketserver import ThreadingMixIn
    from urllib.parse import parse_qs, urlparse
    import socket
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import mappage

    host, _sep, port = listen.rpartition(":")
    host = host.strip("[]")

    class Server(ThreadingMixIn, HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(BaseHTTPRequestHandler):
        server_version = "netstack-relay"

        def log_message(self, *args):  # pylint: disable=arguments-differ
            pass

        def _reply(self, code, body, ctype="application/json"):
            data = body.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    return self._reply(200, mappage.page(window), "text/html; charset=utf-8")
                if url.path == "/api/pods":
                    rows = sorted(relay.pods().values(), key=lambda r: (r["namespace"], r["name"]))
                    return self._reply(200, json.dumps(rows, sort_keys=True) + "\n")
                if url.path == "/api/flows":
                    flt = hubble.parse_filters(parse_qs(url.query))
                    if flt.get("follow"):
                        raise hubble.FilterError("follow: not on the relay's /api/flows (netstack observe --follow)")
                    rows = relay.flows(flt)
                    return self._reply(200, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows),
                                       "application/x-ndjson")
                if url.path == "/healthz":
                    return self._reply(200, json.dumps({"status": "ok", "agents": sorted(relay.agents),
                                                        "unavailable": relay.unavailable}, sort_keys=True) + "\n")
                return self._reply(404, json.dumps({"error": "no such path %s (/, /api/pods, /api/flows, /healthz)"
                                                    % url.path}) + "\n")
            except hubble.FilterError as e:
                return self._reply(400, json.dumps({"error": str(e)}) + "\n")
            except RelayError as e:
                return self._reply(502, json.dumps({"error": str(e)}) + "\n")
            except (BrokenPipeError, ConnectionResetError):
                return None

    srv = Server((host, int(port)), Handler)
    t = threading.Thread(target=srv.serve_forever, name="relay-http")
    t.daemon = True
    t.start()
    return srv
