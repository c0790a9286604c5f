# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pods through CNI: both sides of the Container Network Interface (spec 1.1), no Ansible imports.

The runtime side (what containerd or cri-o do through libcni):

- ``load_conflist(path)``: a network configuration list, validated.
- ``invoke(conflist, command, container_id, netns, ifname, ...)``: ADD, DEL, CHECK, GC, STATUS of the
  whole chain, as libcni runs them - each plugin found in ``cni_path`` and executed with the CNI_*
  environment and its network configuration on stdin (``name`` and ``cniVersion`` injected,
  ``runtimeConfig`` from the plugin's ``capabilities`` and the caller's capability arguments,
  ``prevResult`` from the plugin before it); the ADD result is cached like libcni
  (``<cache_dir>/<network>-<container id>-<ifname>``) and is the prevResult of DEL and CHECK. A failed
  ADD is rolled back: DEL of the whole chain in reverse order, so no IPAM lease, veth or endpoint
  record is left, then ``CNIError`` with the failing plugin's code, msg and details.
- ``invoke_loopback(container_id, netns)``: the ``lo`` network a runtime sets up in every sandbox.

The plugin side, ``netstack-cni`` (``plugin_main``, reached through the node command when it is
run under that name): a chained plugin that passes the result before it through unchanged and
records the endpoint - ``<endpoints dir>/<container id>-<ifname>.json`` = {container_id, ifname,
netns, network, namespace, name, labels, ports, ips, host_interface, host_mac, mac, state, created}.
``list_endpoints`` and ``format_endpoints`` read them back (``netstack endpoint list``). ADD also
attaches the endpoint programs of the node's objects (``attach_endpoint``) and, with BPF host routing,
puts the pod in ``kln_endpoints4`` (hostroute.py); DEL and GC undo both. ``reconcile_endpoints`` holds
existing pods to the objects loaded now (what a dataplane apply runs).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import errno
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import zipfile

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys, hostroute, loader, manifest as _manifest
from ansible_collections.kldload.netstack.plugins.module_utils import labels as _labels
from ansible_collections.kldload.netstack.plugins.module_utils import podnet as _podnet
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps as _policy_maps
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node as _policy_node

NETWORK = "kldload-netstack"
CONFLIST_PATH = "/etc/cni/net.d/05-kldload-netstack.conflist"
CNI_PATH = ["/usr/lib/cni", "/opt/cni/bin"]
CACHE_DIR = "/var/lib/cni/results"
ENDPOINTS_DIR = "/var/lib/kldload-netstack/endpoints"
ENDPOINTS_DIR_ENV = "NETSTACK_ENDPOINTS_DIR"
PLUGIN_NAME = "netstack-cni"
SUPPORTED_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
PLUGIN_TIMEOUT = 60
LABELS_ANNOTATION = "netstack.kldload.io/labels"
PORTS_ANNOTATION = "netstack.kldload.io/ports"
POD_ANNOTATIONS = "io.kubernetes.cri.pod-annotations"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
DATAPLANE_CONFIG = "/etc/kldload-netstack/dataplane.json"
ENDPOINT_LINKS = loader.ENDPOINT_LINKS   # <pin root>/<object>/endpoints/<container id>-<ifname>-<program>

# Error codes of the CNI specification (1.1, "Error codes"); 100 and up are the plugin's own.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
E_ENDPOINT_MISMATCH = 100    # CHECK: the endpoint record is missing or does not match prevResult
E_INVOKER = 999              # the invoker's own failures (plugin not found, no output, timeout)

_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PORT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class CNIError(Exception):
    """A CNI error: ``code`` (int, the spec's codes), ``msg`` and ``details`` (text)."""

    def __init__(self, code, msg, details=""):
        self.code = int(code)
        self.msg = msg
        self.details = details or ""
        super(CNIError, self).__init__(code, msg, details)

    def __str__(self):
        return "CNI error %d: %s%s" % (self.code, self.msg, " (%s)" % self.details if self.details else "")

    def to_json(self, cni_version):
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


def _version_tuple(v):
    try:
        return tuple(int(x) for x in str(v).split("."))
    except ValueError:
        return (0,)


# ---------------------------------------------------------------------------------------------
# Runtime side
# ---------------------------------------------------------------------------------------------

def validate_conflist(doc, where="conflist"):
    """The conflist ``doc`` checked (name, cniVersion, plugins with type); CNIError 7 naming the field."""
    if not isinstance(doc, dict):
        raise CNIError(E_INVALID_CONFIG, "%s: must be a JSON object" % where)
    name = doc.get("name")
    if not isinstance(name, str) or not name or not _CONTAINER_ID_RE.match(name):
        raise CNIError(E_INVALID_CONFIG, "%s.name: must be a network name of letters, digits, '_', '.', '-', got %r"
                       % (where, name))
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not re.match(r"^\d+\.\d+\.\d+$", version):
        raise CNIError(E_INVALID_CONFIG, "%s.cniVersion: must be a version like 1.0.0, got %r" % (where, version))
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIError(E_INVALID_CONFIG, "%s.plugins: must be a non-empty list" % where)
    for i, p in enumerate(plugins):
        pw = "%s.plugins[%d]" % (where, i)
        if not isinstance(p, dict):
            raise CNIError(E_INVALID_CONFIG, "%s: must be an object" % pw)
        t = p.get("type")
        if not isinstance(t, str) or not t or "/" in t or t in (".", ".."):
            raise CNIError(E_INVALID_CONFIG, "%s.type: must be a plugin name (no '/'), got %r" % (pw, t))
        caps = p.get("capabilities", {})
        if not isinstance(caps, dict):
            raise CNIError(E_INVALID_CONFIG, "%s.capabilities: must be an object" % pw)
    return doc


def load_conflist(path):
    """The network configuration list at ``path`` (dict), validated; CNIError naming the file and field."""
    try:
        with open(path) as f:
            text = f.read()
    except (IOError, OSError) as e:
        raise CNIError(E_IO, "cannot read the network configuration list %s" % path, str(e))
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CNIError(E_DECODE, "%s is not JSON" % path, str(e))
    return validate_conflist(doc, path)


def _find_plugin(ptype, cni_path):
    for d in cni_path:
        p = os.path.join(d, ptype)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CNIError(E_INVOKER, "failed to find plugin %r in path %s" % (ptype, list(cni_path)))


def _plugin_config(conflist, plugin, capability_args, prev_result=None, extra=None):
    """One plugin's network configuration, as libcni builds it."""
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    rt = {}
    for cap, on in sorted((plugin.get("capabilities") or {}).items()):
        if on and capability_args and cap in capability_args:
            rt[cap] = capability_args[cap]
    if rt:
        conf["runtimeConfig"] = rt
    else:
        conf.pop("runtimeConfig", None)
    if prev_result is not None:
        conf["prevResult"] = prev_result
    if extra:
        conf.update(extra)
    return conf


def _cni_args(args):
    """CNI_ARGS text; ``IgnoreUnknown=1`` first, as containerd and cri-o send it (the reference plugins
    refuse keys they do not know otherwise)."""
    if not args:
        return ""
    pairs = list(args.items() if isinstance(args, dict) else args)
    out = [] if any(k == "IgnoreUnknown" for k, _v in pairs) else ["IgnoreUnknown=1"]
    for k, v in pairs:
        if not k or any(c in str(k) + str(v) for c in ";="):
            raise CNIError(E_INVALID_ENV, "CNI_ARGS: %r=%r may not contain ';' or '='" % (k, v))
        out.append("%s=%s" % (k, v))
    return ";".join(out)


def _exec_plugin(path, conf, env_cni, timeout):
    """Run one plugin; its parsed JSON output (None when it printed nothing) or CNIError."""
    env = dict(os.environ)
    env.update(env_cni)
    data = json.dumps(conf).encode("utf-8")
    try:
        proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, close_fds=True)
    except OSError as e:
        raise CNIError(E_INVOKER, "cannot run plugin %s" % path, str(e))
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CNIError(E_INVOKER, "plugin %s (%s) timed out after %ss"
                       % (conf.get("type"), env_cni["CNI_COMMAND"], timeout))
    out_t = out.decode("utf-8", "replace").strip()
    err_t = err.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        try:
            e = json.loads(out_t)
            code, msg, details = int(e["code"]), e.get("msg", ""), e.get("details", "")
        except (ValueError, KeyError, TypeError):
            raise CNIError(E_INVOKER, "plugin %s (%s) exited %d"
                           % (conf.get("type"), env_cni["CNI_COMMAND"], proc.returncode), out_t or err_t)
        raise CNIError(code, "plugin %s (%s): %s" % (conf.get("type"), env_cni["CNI_COMMAND"], msg),
                       details or err_t)
    if not out_t:
        return None
    try:
        return json.loads(out_t)
    except ValueError as e:
        raise CNIError(E_DECODE, "plugin %s (%s) printed no JSON" % (conf.get("type"), env_cni["CNI_COMMAND"]),
                       "%s: %r" % (e, out_t[:200]))


def cache_path(cache_dir, network, container_id, ifname):
    """The libcni cache file of one attachment."""
    return os.path.join(cache_dir, "%s-%s-%s" % (network, container_id, ifname))


def read_json(path):
    """The JSON document in ``path``; None when the file does not exist. OSError and ValueError (not JSON) go to
    the caller."""
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def _read_json(path):
    """The JSON object in ``path``; None when the file does not exist or holds no object."""
    doc = read_json(path)
    return doc if isinstance(doc, dict) else None


def _read_cache(path):
    try:
        return _read_json(path)
    except (IOError, OSError) as e:
        raise CNIError(E_IO, "cannot read the cached result %s" % path, str(e))
    except ValueError:
        return None


def _write_atomic(path, doc, mode=0o644):
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d, 0o755)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def _run_chain(conflist, plugins, env_cni, capability_args, cni_path, timeout, prev_result, best_effort=False):
    """Run ``plugins`` one after another; with ``best_effort`` every plugin runs and the first error is
    raised at the end, otherwise the first error stops the chain."""
    first = None
    for p in plugins:
        try:
            path = _find_plugin(p["type"], cni_path)
            _exec_plugin(path, _plugin_config(conflist, p, capability_args, prev_result), env_cni, timeout)
        except CNIError as e:
            if not best_effort:
                raise
            first = first or e
    if first:
        raise first


def invoke(conflist, command, container_id, netns, ifname, args=None, capability_args=None, cni_path=None,
           cache_dir=CACHE_DIR, timeout=PLUGIN_TIMEOUT, valid_attachments=None):
    """Run ``command`` (ADD, DEL, CHECK, GC, STATUS) of the network ``conflist`` (a dict, see
    ``load_conflist``) for one attachment, as a container runtime does through libcni.

    ``args``: CNI_ARGS as a dict or list of pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, ...);
    ``capability_args``: {capability: value} given as runtimeConfig to the plugins that declare the
    capability; ``cni_path``: plugin directories; ``timeout``: seconds per plugin run;
    ``valid_attachments`` (GC): [{"containerID", "ifname"}] still in use.
    Returns the ADD result (dict), or None. Raises CNIError.
    """
    validate_conflist(conflist)
    if command not in COMMANDS:
        raise CNIError(E_INVOKER, "unknown CNI command %r (one of %s)" % (command, ", ".join(COMMANDS)))
    cni_path = list(cni_path or CNI_PATH)
    name, plugins = conflist["name"], conflist["plugins"]
    env_cni = {"CNI_COMMAND": command, "CNI_PATH": os.pathsep.join(cni_path)}
    if command in ("GC", "STATUS"):
        if _version_tuple(conflist["cniVersion"]) < (1, 1, 0):
            return None          # libcni: GC and STATUS exist from spec 1.1 on; older networks skip them
        if command == "STATUS":
            for p in plugins:
                _exec_plugin(_find_plugin(p["type"], cni_path), _plugin_config(conflist, p, None), env_cni, timeout)
            return None
        valid = [{"containerID": a["containerID"], "ifname": a["ifname"]} for a in (valid_attachments or [])]
        for p in plugins:
            _exec_plugin(_find_plugin(p["type"], cni_path),
                         _plugin_config(conflist, p, None, extra={VALID_ATTACHMENTS: valid}), env_cni, timeout)
        keep = set(cache_path(cache_dir, name, a["containerID"], a["ifname"]) for a in valid)
        if os.path.isdir(cache_dir):
            for f in os.listdir(cache_dir):
                full = os.path.join(cache_dir, f)
                if f.startswith(name + "-") and full not in keep:
                    doc = _read_cache(full)
                    if doc and doc.get("networkName") == name:
                        _unlink(full)
        return None
    if not container_id or not _CONTAINER_ID_RE.match(container_id):
        raise CNIError(E_INVALID_ENV, "container id %r: letters, digits, '_', '.', '-' only" % (container_id,))
    if not ifname:
        raise CNIError(E_INVALID_ENV, "ifname must be given")
    env_cni.update({"CNI_CONTAINERID": container_id, "CNI_NETNS": netns or "", "CNI_IFNAME": ifname,
                    "CNI_ARGS": _cni_args(args)})
    cpath = cache_path(cache_dir, name, container_id, ifname)

    if command == "ADD":
        prev = None
        try:
            for p in plugins:
                path = _find_plugin(p["type"], cni_path)
                res = _exec_plugin(path, _plugin_config(conflist, p, capability_args, prev), dict(env_cni), timeout)
                if res is not None:
                    prev = res
        except CNIError:
            env_del = dict(env_cni, CNI_COMMAND="DEL")
            try:
                _run_chain(conflist, list(reversed(plugins)), env_del, capability_args, cni_path, timeout, prev,
                           best_effort=True)
            except CNIError:
                pass            # the ADD error is the one to report; DEL is idempotent and can be retried
            _unlink(cpath)
            raise
        _write_atomic(cpath, {
            "kind": "cniCacheV1", "containerId": container_id, "ifName": ifname, "networkName": name,
            "config": base64.b64encode(json.dumps(conflist).encode("utf-8")).decode("ascii"),
            "cniArgs": [list(kv) for kv in (args.items() if isinstance(args, dict) else (args or []))],
            "capabilityArgs": capability_args or {}, "result": prev}, 0o600)
        return prev

    cached = _read_cache(cpath)
    prev = cached.get("result") if cached else None
    if command == "CHECK":
        if _version_tuple(conflist["cniVersion"]) < (0, 4, 0):
            raise CNIError(E_INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later")
        if prev is None:
            raise CNIError(E_UNKNOWN_CONTAINER, "no cached result for %s/%s on network %s: was it added?"
                           % (container_id, ifname, name))
        _run_chain(conflist, plugins, env_cni, capability_args, cni_path, timeout, prev)
        return None
    # DEL: reverse order, the cached result as prevResult; an unknown container is not an error.
    if cached and not capability_args:
        capability_args = cached.get("capabilityArgs") or None
    _run_chain(conflist, list(reversed(plugins)), env_cni, capability_args, cni_path, timeout, prev)
    _unlink(cpath)
    return None


LOOPBACK_CONFLIST = {"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}


def invoke_loopback(container_id, netns, command="ADD", cni_path=None, cache_dir=CACHE_DIR):
    """The ``lo`` network a runtime brings up in every sandbox (containerd's cni-loopback)."""
    return invoke(LOOPBACK_CONFLIST, command, container_id, netns, "lo", cni_path=cni_path, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# Plugin side: netstack-cni
# ---------------------------------------------------------------------------------------------

def endpoints_dir(environ=None):
    return (environ if environ is not None else os.environ).get(ENDPOINTS_DIR_ENV) or ENDPOINTS_DIR


def record_path(directory, container_id, ifname):
    return os.path.join(directory, "%s-%s.json" % (container_id, ifname))


def _parse_cni_args(text):
    out = {}
    for pair in (text or "").split(";"):
        if not pair:
            continue
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise CNIError(E_INVALID_ENV, "CNI_ARGS: %r is not KEY=VALUE" % pair)
        out[k] = v
    return out


def _annotation_json(annotations, key, kind):
    raw = annotations.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise CNIError(E_INVALID_CONFIG, "annotation %s: must be a JSON %s in a string" % (key, kind))
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CNIError(E_INVALID_CONFIG, "annotation %s: not JSON" % key, str(e))


def parse_ports(ports, where=PORTS_ANNOTATION):
    """A validated list of {name, port, protocol} (protocol TCP or UDP, default TCP)."""
    if ports is None:
        return []
    if not isinstance(ports, list):
        raise CNIError(E_INVALID_CONFIG, "%s: must be a list of {name, port, protocol}" % where)
    out, names = [], set()
    for i, p in enumerate(ports):
        pw = "%s[%d]" % (where, i)
        if not isinstance(p, dict):
            raise CNIError(E_INVALID_CONFIG, "%s: must be an object {name, port, protocol}" % pw)
        unknown = sorted(set(p) - set(["name", "port", "protocol"]))
        if unknown:
            raise CNIError(E_INVALID_CONFIG, "%s: unknown field %s" % (pw, ", ".join(unknown)))
        port = p.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise CNIError(E_INVALID_CONFIG, "%s.port: must be an integer 1-65535, got %r" % (pw, port))
        proto = p.get("protocol", "TCP")
        if proto not in ("TCP", "UDP"):
            raise CNIError(E_INVALID_CONFIG, "%s.protocol: must be TCP or UDP, got %r" % (pw, proto))
        name = p.get("name", "")
        if name:
            if not isinstance(name, str) or len(name) > 15 or not _PORT_NAME_RE.match(name) \
                    or not re.search(r"[a-z]", name):
                raise CNIError(E_INVALID_CONFIG, "%s.name: must be an IANA service name (at most 15 lowercase "
                               "letters, digits and '-', with a letter), got %r" % (pw, name))
            if name in names:
                raise CNIError(E_INVALID_CONFIG, "%s.name: %r is used twice" % (pw, name))
            names.add(name)
        out.append({"name": name, "port": port, "protocol": proto})
    return out


def _pod_meta(conf):
    """(labels, ports) from the pod annotations the runtime passed in runtimeConfig."""
    annotations = (conf.get("runtimeConfig") or {}).get(POD_ANNOTATIONS) or {}
    if not isinstance(annotations, dict):
        raise CNIError(E_INVALID_CONFIG, "runtimeConfig.%s: must be an object of annotations" % POD_ANNOTATIONS)
    lbl = _annotation_json(annotations, LABELS_ANNOTATION, "object")
    try:
        lbl = _labels.validate_labels(lbl, "annotation %s" % LABELS_ANNOTATION)
    except ValueError as e:
        raise CNIError(E_INVALID_CONFIG, str(e))
    ports = parse_ports(_annotation_json(annotations, PORTS_ANNOTATION, "list"))
    return lbl, ports


def _from_prev_result(prev, ifname, netns):
    """(ips, host_interface, host_mac, mac) from a 0.4.0 or 1.x result."""
    if not isinstance(prev, dict):
        raise CNIError(E_INVALID_CONFIG, "prevResult: must be an object")
    ifaces = prev.get("interfaces") or []
    if not isinstance(ifaces, list):
        raise CNIError(E_INVALID_CONFIG, "prevResult.interfaces: must be a list")
    host = cont = None
    cont_idx = None
    for i, itf in enumerate(ifaces):
        if not isinstance(itf, dict):
            continue
        if itf.get("sandbox"):
            if itf.get("name") == ifname and cont is None:
                cont, cont_idx = itf, i
        elif host is None:
            host = itf
    ips = []
    for ip in prev.get("ips") or []:
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise CNIError(E_INVALID_CONFIG, "prevResult.ips: every entry needs an address")
        idx = ip.get("interface")
        if idx is None or cont_idx is None or idx == cont_idx:
            ips.append(ip["address"])
    if not ips:
        raise CNIError(E_INVALID_CONFIG, "prevResult has no IP address for %s: an IPAM plugin must come first" % ifname)
    return ips, (host or {}).get("name"), (host or {}).get("mac"), (cont or {}).get("mac")


def _check(conf, env, directory):
    prev = conf.get("prevResult")
    if prev is None:
        raise CNIError(E_INVALID_CONFIG, "CHECK: prevResult is required")
    cid, ifname = env["CNI_CONTAINERID"], env["CNI_IFNAME"]
    path = record_path(directory, cid, ifname)
    rec = _read_json(path)
    if rec is None:
        raise CNIError(E_ENDPOINT_MISMATCH, "no endpoint record for %s/%s" % (cid, ifname), path)
    ips, host_if, _host_mac, _mac = _from_prev_result(prev, ifname, env.get("CNI_NETNS"))
    if sorted(rec.get("ips") or []) != sorted(ips):
        raise CNIError(E_ENDPOINT_MISMATCH, "endpoint %s/%s: recorded IPs %s, prevResult %s"
                       % (cid, ifname, rec.get("ips"), ips))
    if rec.get("host_interface") != host_if:
        raise CNIError(E_ENDPOINT_MISMATCH, "endpoint %s/%s: recorded host interface %s, prevResult %s"
                       % (cid, ifname, rec.get("host_interface"), host_if))
    if host_if and not os.path.exists(os.path.join("/sys/class/net", host_if)):
        raise CNIError(E_ENDPOINT_MISMATCH, "endpoint %s/%s: host interface %s does not exist" % (cid, ifname, host_if))


def _need_env(env, names):
    for n in names:
        if not env.get(n):
            raise CNIError(E_INVALID_ENV, "%s must be set" % n)
    cid = env.get("CNI_CONTAINERID")
    if cid is not None and not _CONTAINER_ID_RE.match(cid):
        raise CNIError(E_INVALID_ENV, "CNI_CONTAINERID %r: letters, digits, '_', '.', '-' only" % cid)
    ifn = env.get("CNI_IFNAME")
    if ifn is not None and (len(ifn) > 15 or ifn in (".", "..") or re.search(r"[/:\s]", ifn)):
        raise CNIError(E_INVALID_ENV, "CNI_IFNAME %r is not a valid interface name" % ifn)


def _status(environ, directory):
    """STATUS: available when the endpoints directory can be written and a dataplane configuration,
    where there is one, is readable JSON."""
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        if not os.access(directory, os.W_OK):
            raise OSError(errno.EACCES, "not writable")
    except OSError as e:
        raise CNIError(E_NOT_AVAILABLE, "endpoints directory %s is not usable" % directory, str(e))
    cfg = environ.get("NETSTACK_CONFIG", "/etc/kldload-netstack/dataplane.json")
    if os.path.exists(cfg):
        try:
            with open(cfg) as f:
                json.load(f)
        except (IOError, OSError, ValueError) as e:
            raise CNIError(E_NOT_AVAILABLE, "the dataplane configuration %s is not readable" % cfg, str(e))


def _host_routing(dp, rec, add):
    """The pod's entries in BPF host routing's endpoint map (hostroute.py), when the node has it."""
    if not dp or not isinstance(dp.get("pin_path"), str):
        return
    gdir = os.path.join(dp["pin_path"], loader.GLOBALS)
    try:
        if add:
            hostroute.add_endpoint(gdir, rec)
        else:
            hostroute.remove_endpoint(gdir, rec)
    except (OSError, hostroute.HostRouteError) as e:
        raise CNIError(E_IO, "cannot %s the endpoint in %s" % ("add" if add else "remove", hostroute.ENDPOINTS), str(e))


def _policy(dp, directory):
    """The identity and policy maps made to match the endpoint records again (policy/node.py), when the node
    runs the policy object: a pod added is enforced at once, with an identity from its labels; one deleted
    leaves no entry."""
    if not dp or not isinstance(dp.get("pin_path"), str):
        return
    names = [o.get("name") for o in dp.get("objects") or [] if isinstance(o, dict)]
    if _policy_node.OBJECT not in names:
        return
    try:
        _policy_node.apply(os.path.join(dp["pin_path"], loader.GLOBALS), _policy_node.read_state(),
                           list_endpoints(directory), _podnet.normalize(dp.get("pods")),
                           tunnel=_policy_node.TUNNEL_OBJECT in names)
    except (OSError, ValueError, _policy_maps.PolicyMapError) as e:
        raise CNIError(E_IO, "cannot write the policy maps", str(e))


def _gc(conf, directory, dp):
    valid = conf.get(VALID_ATTACHMENTS)
    if valid is None:
        valid = []
    if not isinstance(valid, list):
        raise CNIError(E_INVALID_CONFIG, "%s: must be a list" % VALID_ATTACHMENTS)
    keep = set()
    for i, a in enumerate(valid):
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) or not isinstance(a.get("ifname"), str):
            raise CNIError(E_INVALID_CONFIG, "%s[%d]: must be {containerID, ifname}" % (VALID_ATTACHMENTS, i))
        keep.add((a["containerID"], a["ifname"]))
    for rec in list_endpoints(directory):
        if rec.get("state") == "invalid":
            continue
        if rec.get("network", conf.get("name")) != conf.get("name"):
            continue
        if (rec.get("container_id"), rec.get("ifname")) not in keep:
            _host_routing(dp, rec, add=False)
            detach_endpoint(rec.get("programs"))
            _unlink(record_path(directory, rec["container_id"], rec["ifname"]))
    _policy(dp, directory)


def _dataplane(environ):
    """The node's dataplane configuration (dict), or None where there is none."""
    path = environ.get("NETSTACK_CONFIG") or DATAPLANE_CONFIG
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (IOError, OSError, ValueError) as e:
        raise CNIError(E_NOT_AVAILABLE, "the dataplane configuration %s is not readable" % path, str(e))
    if not isinstance(cfg, dict):
        raise CNIError(E_NOT_AVAILABLE, "the dataplane configuration %s is not an object" % path)
    return cfg


def endpoint_programs(cfg, target="endpoint"):
    """The programs the node's objects declare for endpoints (manifest target ``endpoint``; or another
    target the loader does not attach itself: ``tunnel``): [{object, program, attach, order, orders, prog_pin}]
    (``orders``: the tcx orders of every program of the node's objects, loader.tcx_orders()),
    from the manifests in the node bundle and the programs the loader pinned
    (``<pin root>/<object>/progs_<version>/<program>``). CNIError 11 when an object with such programs is
    not loaded (yet)."""
    names = [o.get("name") for o in (cfg or {}).get("objects") or [] if isinstance(o, dict)]
    if not names:
        return []
    bundle, root = cfg.get("bundle"), cfg.get("pin_path")
    if not bundle or not os.path.isfile(bundle) or not root:
        raise CNIError(E_NOT_AVAILABLE, "the dataplane configuration names objects but no bundle or pin_path",
                       "bundle %r, pin_path %r" % (bundle, root))
    out = []
    try:
        with zipfile.ZipFile(bundle) as z:
            members = set(z.namelist())
            docs = dict((n, json.loads(z.read("netstack_objects/%s.manifest.json" % n).decode("utf-8")))
                        for n in names if "netstack_objects/%s.manifest.json" % n in members)
    except (IOError, OSError, ValueError, zipfile.BadZipfile) as e:
        raise CNIError(E_NOT_AVAILABLE, "cannot read the manifests in the node bundle %s" % bundle, str(e))
    manifests = {}
    for name in names:
        if name not in docs:
            continue
        try:
            manifests[name] = _manifest.validate(docs[name], "%s:%s" % (bundle, name), bpfsys.ATTACH_TYPES)
        except _manifest.ManifestError as e:
            raise CNIError(E_NOT_AVAILABLE, "the manifest of %s in the node bundle is invalid" % name, str(e))
    orders = loader.tcx_orders(manifests.values())
    for name in names:
        if name not in manifests:
            continue
        m = manifests[name]
        progs = sorted(p for p, v in m["programs"].items() if v["target"] == target)
        if not progs:
            continue
        objdir = os.path.join(root, name)
        loaded = sorted(d for d in (os.listdir(objdir) if os.path.isdir(objdir) else [])
                        if d.startswith(loader.PROGS_PREFIX))
        if not loaded:
            raise CNIError(E_TRY_AGAIN, "object %s, which has %s programs, is not loaded in %s" % (name, target, root))
        for p in progs:
            out.append({"object": name, "program": p, "attach": m["programs"][p]["attach"],
                        "order": m["programs"][p]["order"], "orders": orders,
                        "prog_pin": os.path.join(objdir, loaded[-1], p)})
    return out


def _link_pin(root, obj, container_id, ifname, program):
    name = "%s-%s-%s" % (container_id, ifname, program)
    return os.path.join(root, obj, ENDPOINT_LINKS, name.replace(".", "_"))   # bpffs refuses dots in names


def attach_endpoint(cfg, container_id, ifname, host_interface):
    """Attach every endpoint program (``endpoint_programs``) to ``host_interface`` as a pinned tcx
    link; [{object, program, attach, pin}]. All or nothing: a failure unpins what was attached."""
    progs = endpoint_programs(cfg)
    if not progs:
        return []
    try:
        ifindex = socket.if_nametoindex(host_interface or "")
    except OSError:
        raise CNIError(E_INVALID_CONFIG, "prevResult: host interface %r does not exist" % (host_interface,))
    done = []
    try:
        for p in progs:
            pin = _link_pin(cfg["pin_path"], p["object"], container_id, ifname, p["program"])
            loader.hold_link(pin, p["prog_pin"], ifindex, p["attach"], p["order"], p["orders"])
            done.append({"object": p["object"], "program": p["program"], "attach": p["attach"], "pin": pin})
    except OSError as e:
        for d in done:
            loader.unpin_link(d["pin"])
        raise CNIError(E_IO, "cannot attach the endpoint programs to %s" % host_interface, str(e))
    return done


def reconcile_endpoints(cfg, directory=None, check=False):
    """Every ready endpoint whose host interface exists gets the endpoint programs the node's objects
    declare now (``endpoint_programs``): a missing link is made, a link to an older program is moved to the
    current one (BPF_LINK_UPDATE: no moment without a program), a link of a program no longer declared
    goes; the record says what is attached. What a dataplane apply does after loading the objects, so pods
    made before an object was loaded or upgraded run what the node runs now. The changes as text; CNIError
    when an object with endpoint programs is not loaded (in check mode: every endpoint would be attached)."""
    recs = [r for r in list_endpoints(directory) if r.get("state") == "ready"]
    try:
        progs = endpoint_programs(cfg)
    except CNIError:
        if check:
            return ["attach the endpoint programs to %s" % _ep_name(r) for r in recs]
        raise
    directory = directory or endpoints_dir()
    changes = []
    for rec in recs:
        try:
            ifindex = socket.if_nametoindex(rec.get("host_interface") or "")
        except (OSError, ValueError):
            continue
        cid, ifn = rec["container_id"], rec["ifname"]
        have = [d for d in rec.get("programs") or [] if isinstance(d, dict)]
        out, mine = [], []
        for p in progs:
            pin = _link_pin(cfg["pin_path"], p["object"], cid, ifn, p["program"])
            mine.append(pin)
            out.append({"object": p["object"], "program": p["program"], "attach": p["attach"], "pin": pin})
            if loader.hold_link(pin, p["prog_pin"], ifindex, p["attach"], p["order"], p["orders"], check):
                changes.append("endpoint %s: attach %s/%s (%s)" % (_ep_name(rec), p["object"], p["program"], p["attach"]))
        for d in have:
            if d.get("pin") not in mine:
                if isinstance(d.get("pin"), str) and os.path.lexists(d["pin"]):
                    changes.append("endpoint %s: detach %s/%s" % (_ep_name(rec), d.get("object"), d.get("program")))
                    if not check:
                        loader.unpin_link(d["pin"])
        if [d.get("pin") for d in have] != mine and not check:
            rec["programs"] = out
            _write_atomic(record_path(directory, cid, ifn), rec)
    return changes


def _ep_name(rec):
    return "%s/%s" % (rec.get("namespace") or "-", rec.get("name") or rec.get("container_id", "")[:12])


def detach_endpoint(programs):
    """Detach and unpin the links an endpoint record lists (missing ones are fine)."""
    for d in programs or []:
        if isinstance(d, dict) and isinstance(d.get("pin"), str):
            loader.unpin_link(d["pin"])


def plugin_main(environ, stdin, stdout):
    """The ``netstack-cni`` plugin: one CNI command from ``environ`` and ``stdin`` (the network
    configuration), its result or error JSON on ``stdout``. Returns the exit status (0 or 1)."""
    version = "1.1.0"
    try:
        command = environ.get("CNI_COMMAND")
        if not command:
            raise CNIError(E_INVALID_ENV, "CNI_COMMAND must be set")
        text = stdin.read()
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        try:
            conf = json.loads(text) if text.strip() else {}
        except ValueError as e:
            raise CNIError(E_DECODE, "the network configuration on stdin is not JSON", str(e))
        if not isinstance(conf, dict):
            raise CNIError(E_DECODE, "the network configuration on stdin must be a JSON object")
        v = conf.get("cniVersion")
        if isinstance(v, str) and v:
            version = v
        if command == "VERSION":
            stdout.write(json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}) + "\n")
            return 0
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(E_INCOMPATIBLE_VERSION, "incompatible CNI version",
                           "config is %r, plugin supports %s" % (version, SUPPORTED_VERSIONS))
        if not isinstance(conf.get("name"), str) or not conf.get("name"):
            raise CNIError(E_INVALID_CONFIG, "name: the network name is required")
        directory = endpoints_dir(environ)
        if command == "ADD":
            _need_env(environ, ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"))
            prev = conf.get("prevResult")
            if prev is None:
                raise CNIError(E_INVALID_CONFIG, "prevResult is required: %s is a chained plugin that comes after "
                               "an interface and IPAM plugin (ptp with host-local)" % PLUGIN_NAME)
            cargs = _parse_cni_args(environ.get("CNI_ARGS"))
            lbl, ports = _pod_meta(conf)
            ips, host_if, host_mac, mac = _from_prev_result(prev, environ["CNI_IFNAME"], environ["CNI_NETNS"])
            rec = {"container_id": environ["CNI_CONTAINERID"], "ifname": environ["CNI_IFNAME"],
                   "netns": environ["CNI_NETNS"], "network": conf["name"],
                   "namespace": cargs.get("K8S_POD_NAMESPACE", ""), "name": cargs.get("K8S_POD_NAME", ""),
                   "pod_uid": cargs.get("K8S_POD_UID", ""), "labels": lbl, "ports": ports, "ips": ips,
                   "host_interface": host_if, "host_mac": host_mac, "mac": mac, "state": "ready",
                   "created": int(time.time())}
            try:
                old = _read_json(record_path(directory, rec["container_id"], rec["ifname"]))
            except (IOError, OSError, ValueError):
                old = None
            if old:
                detach_endpoint(old.get("programs"))
            dp = _dataplane(environ)
            rec["programs"] = attach_endpoint(dp, rec["container_id"], rec["ifname"], host_if)
            try:
                _write_atomic(record_path(directory, rec["container_id"], rec["ifname"]), rec)
            except (IOError, OSError) as e:
                detach_endpoint(rec["programs"])
                raise CNIError(E_IO, "cannot write the endpoint record in %s" % directory, str(e))
            try:
                _host_routing(dp, rec, add=True)
                _policy(dp, directory)
            except CNIError:
                _host_routing(dp, rec, add=False)
                detach_endpoint(rec["programs"])
                _unlink(record_path(directory, rec["container_id"], rec["ifname"]))
                raise
            result = dict(prev)
            result["cniVersion"] = version
            stdout.write(json.dumps(result) + "\n")
            return 0
        if command == "DEL":
            _need_env(environ, ("CNI_CONTAINERID", "CNI_IFNAME"))
            path = record_path(directory, environ["CNI_CONTAINERID"], environ["CNI_IFNAME"])
            try:
                old = _read_json(path)
            except (IOError, OSError, ValueError):
                old = None
            dp = _dataplane(environ)
            try:
                if old:
                    _host_routing(dp, old, add=False)
                detach_endpoint((old or {}).get("programs"))
                _unlink(path)
            except OSError as e:
                raise CNIError(E_IO, "cannot remove the endpoint record", str(e))
            if old:
                _policy(dp, directory)
            return 0
        if command == "CHECK":
            _need_env(environ, ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"))
            _check(conf, environ, directory)
            return 0
        if command == "GC":
            _gc(conf, directory, _dataplane(environ))
            return 0
        if command == "STATUS":
            _status(environ, directory)
            return 0
        raise CNIError(E_INVALID_ENV, "CNI_COMMAND %r is not one of ADD, DEL, CHECK, GC, STATUS, VERSION" % command)
    except CNIError as e:
        stdout.write(json.dumps(e.to_json(version)) + "\n")
        return 1
    except Exception as e:  # pylint: disable=broad-except  # a runtime reads stdout only: say what broke there
        stdout.write(json.dumps(CNIError(E_INVOKER, "%s: internal error" % PLUGIN_NAME,
                                         "%s: %s" % (type(e).__name__, e)).to_json(version)) + "\n")
        return 1


# ---------------------------------------------------------------------------------------------
# Endpoint records
# ---------------------------------------------------------------------------------------------

def list_endpoints(directory=None):
    """Every endpoint record in ``directory`` (default: NETSTACK_ENDPOINTS_DIR or the node's), sorted
    by namespace, name, container id, ifname. A record that cannot be parsed is listed with
    state ``invalid`` (container_id and ifname from its file name)."""
    directory = directory or endpoints_dir()
    rows = []
    try:
        names = os.listdir(directory)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return []
        raise
    for f in names:
        if not f.endswith(".json") or f.startswith("."):
            continue
        path = os.path.join(directory, f)
        try:
            rec = _read_json(path)
        except (IOError, OSError, ValueError):
            rec = None
        if not rec or not rec.get("container_id"):
            cid, _sep, ifn = f[:-len(".json")].rpartition("-")
            rec = {"container_id": cid, "ifname": ifn, "namespace": "", "name": "", "labels": {}, "ports": [],
                   "ips": [], "host_interface": None, "state": "invalid"}
        rows.append(rec)
    rows.sort(key=lambda r: (r.get("namespace") or "", r.get("name") or "", r.get("container_id") or "",
                             r.get("ifname") or ""))
    return rows


def format_endpoints(rows):
    """A table like ``cilium endpoint list``."""
    head = ("ENDPOINT", "NAMESPACE/NAME", "LABELS", "IPv4", "INTERFACE", "STATE")
    table = [head]
    for r in rows:
        v4 = [ip.split("/")[0] for ip in r.get("ips") or [] if ":" not in ip]
        lbl = ",".join("%s=%s" % (k, v) for k, v in sorted((r.get("labels") or {}).items())) or "-"
        ns_name = "%s/%s" % (r.get("namespace") or "-", r.get("name") or "-")
        table.append(((r.get("container_id") or "")[:12], ns_name, lbl, ",".join(v4) or "-",
                      r.get("host_interface") or "-", r.get("state") or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
