# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the node knows about the two ends of a flow: the pods (this node's endpoint records, the cluster's pods
as the last policy apply saw them), their security identities and labels (the policy's compiled output), the
nodes' addresses (the pod network of the node configuration), the policy rules by id, the services by id (the LB
table) and, for socket events, which pod a network namespace cookie is (each pod's netns entered once to read
it). Everything is re-read at most every ``refresh`` seconds. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import ctypes.util
import os
import socket
import threading
import time

from ansible_collections.kldload.netstack.plugins.module_utils import cni, lb
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node as policy_node

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000
RESERVED = {1: "reserved:host", 2: "reserved:world", 3: "reserved:unmanaged", 4: "reserved:health", 5: "reserved:init",
            6: "reserved:remote-node", 7: "reserved:kube-apiserver", 8: "reserved:ingress"}
NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"


def netns_cookie(path=None):
    """The network namespace cookie (what bpf_get_netns_cookie() gives a program) of the namespace at ``path``
    (None: this process's), read with SO_NETNS_COOKIE from a socket made there; None when it cannot be read."""
    out = []

    def run():
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        try:
            if path:
                fd = os.open(path, os.O_RDONLY)
                try:
                    if lib.setns(fd, CLONE_NEWNET) != 0:
                        return
                finally:
                    os.close(fd)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                out.append(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little"))
            finally:
                s.close()
        except OSError:
            return
    # setns() changes the calling thread only: a thread of its own, which ends with the namespace it entered
    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    return out[0] if out else None


def identity_labels(ident, identities):
    info = identities.get(ident) or identities.get(str(ident))
    if info:
        return list(info.get("labels") or [])
    if ident in RESERVED:
        return [RESERVED[ident]]
    return []


def pod_labels(namespace, labels):
    return sorted(["k8s:%s=%s" % (k, v) for k, v in (labels or {}).items()] + ["%s=%s" % (NAMESPACE_LABEL, namespace)])


class Enricher:
    """``lookup(ip)``: {namespace, pod_name, labels, identity, node_name, kind} of an address (kind pod, node,
    world); ``rule(id)``, ``service(id)``, ``cookie(c)``, ``ifname(index)``. ``refresh()`` re-reads (at most every
    ``interval`` seconds unless forced)."""

    def __init__(self, cfg=None, node_name=None, compiled_path=None, state_path=None, endpoints_dir=None, interval=5.0,
                 netns_cookies=True):
        self.cfg = cfg
        self.node_name = node_name or socket.gethostname()
        self.compiled_path = compiled_path or policy_node.COMPILED_PATH
        self.state_path = state_path or policy_node.STATE_PATH
        self.endpoints_dir = endpoints_dir
        self.interval = interval
        self.netns_cookies = netns_cookies
        self._at = 0.0
        self._lock = threading.Lock()
        self.by_ip, self.rules, self.services, self.cookies, self.identities = {}, {}, {}, {}, {}
        self.endpoints, self.rule_kinds = [], {}
        self._cookie_cache = {}
        self.errors = []

    def refresh(self, force=False):
        now = time.time()
        if not force and now - self._at < self.interval:
            return False
        with self._lock:
            self._at = now
            self._load()
        return True

    def _load(self):
        errors = []
        compiled = policy_node.read_compiled(self.compiled_path) or {}
        identities = dict((int(k), v) for k, v in (compiled.get("identities") or {}).items())
        by_ip = {}
        ipcache = dict((p.split("/", 1)[0], i) for p, i in compiled.get("ipcache") or [])
        try:
            state = policy_node.read_state(self.state_path)
        except (OSError, ValueError) as e:
            state = policy_node.default_state()
            errors.append("policy state: %s" % e)
        for e in (state.get("cluster") or {}).get("endpoints") or []:
            for ip in e.get("ips") or []:
                ip = str(ip).split("/", 1)[0]
                by_ip[ip] = self._pod(e.get("namespace") or "default", e.get("name"), e.get("labels"), ipcache.get(ip),
                                      identities, e.get("node"))
        try:
            records = cni.list_endpoints(self.endpoints_dir)
        except OSError as e:
            records = []
            errors.append("endpoint records: %s" % e)
        cookies = {}
        mine = []
        for r in records:
            if r.get("state", "ready") != "ready":
                continue
            ips = [str(ip).split("/", 1)[0] for ip in r.get("ips") or [] if ":" not in str(ip)]
            rec = self._pod(r.get("namespace") or "default", r.get("name") or (r.get("container_id") or "")[:12],
                            r.get("labels"), ipcache.get(ips[0]) if ips else None, identities, self.node_name)
            rec["ip"] = ips[0] if ips else ""
            rec["netns"] = r.get("netns") or ""
            rec["ports"] = r.get("ports") or []
            for ip in ips:
                by_ip[ip] = rec
            mine.append(rec)
            if self.netns_cookies and rec["netns"]:
                c = self._cookie_cache.get(rec["netns"])
                if c is None and os.path.exists(rec["netns"]):
                    c = netns_cookie(rec["netns"])
                    if c is not None:
                        self._cookie_cache[rec["netns"]] = c
                if c is not None:
                    cookies[c] = rec
        pods = (self.cfg or {}).get("pods")
        for n in policy_node.node_addresses(pods, self.node_name):
            for ip in n["ips"]:
                by_ip.setdefault(ip, {"kind": "node", "namespace": "", "pod_name": "", "node_name": n["name"],
                                      "identity": 1 if n["name"] == self.node_name else 6,
                                      "labels": ["reserved:host" if n["name"] == self.node_name else "reserved:remote-node"]})
        if self.netns_cookies:
            own = self._cookie_cache.get("") or netns_cookie(None)
            if own is not None:
                self._cookie_cache[""] = own
                cookies[own] = {"kind": "node", "namespace": "", "pod_name": "", "node_name": self.node_name,
                                "identity": 1, "labels": ["reserved:host"],
                                "ip": (pods or {}).get("underlay_ip") or ""}
        rules = dict((int(k), v) for k, v in (compiled.get("rules") or {}).items())
        services = {}
        if self.cfg:
            try:
                for row in lb.table(os.path.join(self.cfg["pin_path"], "globals"), self.cfg["lb"]["state_file"]):
                    ns, _sep, name = (row.get("name") or "").partition("/")
                    services[row["id"]] = {"namespace": ns if name else "", "name": name or ns, "address": row["service"]}
            except (OSError, ValueError, lb.LbError) as e:
                errors.append("service table: %s" % e)
        self.rule_kinds = _rule_kinds(compiled)
        self.by_ip, self.rules, self.services, self.cookies = by_ip, rules, services, cookies
        self.identities, self.endpoints, self.errors = identities, mine, errors

    @staticmethod
    def _pod(namespace, name, labels, ident, identities, node):
        lbls = identity_labels(ident, identities) if ident else []
        return {"kind": "pod", "namespace": namespace, "pod_name": name or "", "identity": ident or 0,
                "labels": lbls or pod_labels(namespace, labels), "node_name": node or ""}

    def lookup(self, ip, identity=0):
        rec = self.by_ip.get(ip)
        if rec is not None:
            if identity and not rec.get("identity"):
                rec = dict(rec, identity=identity)
            return rec
        labels = identity_labels(identity, self.identities) if identity else []
        return {"kind": "world", "namespace": "", "pod_name": "", "identity": identity or 2, "node_name": "",
                "labels": labels or ["reserved:world"]}

    def rule(self, rule_id):
        return self.rules.get(rule_id, "")

    def service(self, service_id):
        return self.services.get(service_id)

    def cookie(self, cookie):
        return self.cookies.get(cookie)

    @staticmethod
    def ifname(index):
        try:
            return socket.if_indextoname(index) if index else ""
        except OSError:
            return ""


def _rule_kinds(compiled):
    """{rule text: Hubble's policy match type} from the entries that name it: l3-l4 (a peer and a port),
    l3-only, l4-only, all."""
    kinds = {}
    for ep in (compiled.get("endpoints") or {}).values():
        for e in ep.get("entries") or []:
            l3 = bool(e.get("identity"))
            l4 = bool(e.get("port") or e.get("protocol"))
            kind = "l3-l4" if l3 and l4 else "l3-only" if l3 else "l4-only" if l4 else "all"
            kinds.setdefault(e.get("rule"), kind)
    return kinds
