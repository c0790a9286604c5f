# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node's dataplane: one configuration, one apply path.

The node configuration (``/etc/kldload-netstack/dataplane.json``) says which eBPF objects the
node runs, where they attach, the map sizes, the socket LB's settings, the routes and the pod network.
``apply()`` makes the node match it - objects and attachments through the loader (loader.py),
the service table through the LB writer (lb/), routes and the pod network through netlink and nft
(routes.py, podnet.py) - and is called
the same way by the ``node_dataplane`` module (with the inventory's service table) and by
``netstack dataplane restore`` at boot (with the last applied table, from the LB state file and
its journal). Everything is validated before anything on the node is touched.

Configuration::

    {"schema": 1,
     "pin_path": "/sys/fs/bpf/kldload-netstack",
     "bundle": "/usr/lib/kldload-netstack/netstack.pyz",
     "objects": [{"name": "sock_lb", "targets": {"cgroup": null, "families": [4, 6], "devices": []}}],
     "maps": {"kln_lb4_svc": 131072},
     "lb": {"maglev_table_size": 16381, "state_file": "/var/lib/kldload-netstack/lb/services.json",
            "destroy_udp_sockets": true},
     "routes": [{"dst": "10.0.50.0/24", "via": "192.168.1.1"}],
     "pods": {"cidr": "10.244.11.0/24", "routing_mode": "tunnel", "underlay_interface": "eth0",
              "underlay_ip": "192.168.1.11", "mtu": 0, "vxlan": {"device": "kln_vxlan", "vni": 1, "port": 8472},
              "nodes": [{"name": "node2", "underlay_ip": "192.168.1.12", "pod_cidr": "10.244.12.0/24"}],
              "service_cidr": "10.96.0.0/12", "masquerade": true,
              "cni": {"conflist": "/etc/cni/net.d/05-kldload-netstack.conflist", "bin_dir": "/usr/lib/cni"}}}

``pods`` (podnet.py; null or absent: no pod network) is the node's pod network: its pod CIDR, the
routing mode to the other nodes' pod CIDRs (VXLAN ``tunnel`` or ``native`` routes via their underlay
addresses), the pod MTU (0: from the underlay's), masquerade out of the cluster, and the CNI conflist
(which the CNI plugin also reads for the pod CIDR and MTU). ``routes`` are extra routes the dataplane
owns; the routes to the other nodes' pod CIDRs come from ``pods`` (one routes.sync() makes both).

``bundle`` is the node unit the dataplane role installs (``make node``): the node command and its
library as one zipapp, with every eBPF object and its manifest inside (``netstack_objects/``); the
objects are unpacked from it into a private directory for each apply. ``maps`` sizes maps by name,
whichever object declares them. ``targets.cgroup`` null means the node's cgroup2 mount (detected, never assumed).

``agent`` (flows/config.py; null or absent: none) is the flow agent: the events the eBPF programs emit
(``kln_flow_config``: on or off, aggregation, drop rate) and the node agent's unit (netstack-agent.service:
``netstack agent``, which reads this same file), with the address it serves flows and metrics on - one of this
node's, checked before anything is touched.
No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import json
import os
import shutil
import socket
import tempfile
import zipfile

from ansible_collections.kldload.netstack.plugins.module_utils import cni, hostroute, lb, loader, podnet, release, routes, units
from ansible_collections.kldload.netstack.plugins.module_utils import nodeport
from ansible_collections.kldload.netstack.plugins.module_utils.flows import config as flows_config
from ansible_collections.kldload.netstack.plugins.module_utils.flows import events as flows_events
from ansible_collections.kldload.netstack.plugins.module_utils.flows import service as flows_service
from ansible_collections.kldload.netstack.plugins.module_utils import manifest as mf
from ansible_collections.kldload.netstack.plugins.module_utils.policy import maps as policy_maps
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node as policy_node
from ansible_collections.kldload.netstack.plugins.module_utils.policy.parse import PolicyError
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool

CONFIG_PATH = "/etc/kldload-netstack/dataplane.json"
BUNDLE = "/usr/lib/kldload-netstack/netstack.pyz"
BUNDLE_OBJECTS = "netstack_objects/"
RESTORE_UNIT = "netstack-dataplane.service"
STATE_FILE = "/var/lib/kldload-netstack/lb/services.json"
SCHEMA = 1
_TOP_KEYS = ("schema", "pin_path", "bundle", "objects", "maps", "lb", "routes", "pods", "nodeport", "agent")
_OBJ_KEYS = ("name", "targets")
_TARGET_KEYS = ("cgroup", "families", "devices", "xdp_mode")
_LB_KEYS = ("maglev_table_size", "state_file", "destroy_udp_sockets")


class ConfigError(ValueError):
    """A node configuration that cannot be applied; the message names the field."""


def default_config():
    return {"schema": SCHEMA, "pin_path": loader.DEFAULT_PIN_PATH, "bundle": BUNDLE,
            "objects": [{"name": "sock_lb", "targets": {"cgroup": None, "families": [4, 6], "devices": []}}],
            "maps": {},
            "lb": {"maglev_table_size": lb.DEFAULT_MAGLEV_M, "state_file": STATE_FILE, "destroy_udp_sockets": True},
            "routes": [], "pods": None, "nodeport": None, "agent": None}


def _keys(d, known, where):
    if not isinstance(d, dict):
        raise ConfigError("%s: must be a mapping" % where)
    bad = sorted(set(d) - set(known))
    if bad:
        raise ConfigError("%s: unknown field(s) %s (known: %s)" % (where, ", ".join(bad), ", ".join(known)))


def validate(cfg):
    """The configuration in canonical form (every field present); ConfigError names the field."""
    _keys(cfg, _TOP_KEYS, "config")
    out = default_config()
    if cfg.get("schema", SCHEMA) != SCHEMA:
        raise ConfigError("config.schema: %r is not a schema this release reads (%d)" % (cfg.get("schema"), SCHEMA))
    for k in ("pin_path", "bundle"):
        v = cfg.get(k, out[k])
        if not isinstance(v, str) or not os.path.isabs(v):
            raise ConfigError("config.%s: must be an absolute path, got %r" % (k, v))
        out[k] = os.path.normpath(v)
    if "." in out["pin_path"]:
        raise ConfigError("config.pin_path: %s contains a '.'; bpffs refuses dots in names" % out["pin_path"])
    objs = cfg.get("objects", out["objects"])
    if not isinstance(objs, list):
        raise ConfigError("config.objects: must be a list")
    out["objects"] = []
    seen = set()
    for i, o in enumerate(objs):
        w = "config.objects[%d]" % i
        _keys(o, _OBJ_KEYS, w)
        name = o.get("name")
        if not isinstance(name, str) or not name or "/" in name or "." in name or name in loader.RESERVED:
            raise ConfigError("%s.name: a plain object name, got %r" % (w, name))
        if name in seen:
            raise ConfigError("%s.name: object %s is listed twice" % (w, name))
        seen.add(name)
        t = o.get("targets") or {}
        _keys(t, _TARGET_KEYS, w + ".targets")
        fams = t.get("families") or [4, 6]
        if not isinstance(fams, list) or not fams or any(f not in (4, 6) for f in fams):
            raise ConfigError("%s.targets.families: a list of 4 and/or 6, got %r" % (w, fams))
        cg = t.get("cgroup") or None
        if cg is not None and (not isinstance(cg, str) or not os.path.isabs(cg)):
            raise ConfigError("%s.targets.cgroup: an absolute path or null, got %r" % (w, cg))
        devs = t.get("devices") or []
        if not isinstance(devs, list) or any(not isinstance(d, str) or not d for d in devs):
            raise ConfigError("%s.targets.devices: a list of device names, got %r" % (w, devs))
        target = {"cgroup": cg, "families": sorted(set(fams)), "devices": list(devs)}
        if t.get("xdp_mode"):
            target["xdp_mode"] = t["xdp_mode"]
        out["objects"].append({"name": name, "targets": target})
    sizes = cfg.get("maps") or {}
    if not isinstance(sizes, dict) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                          for v in sizes.values()):
        raise ConfigError("config.maps: must map map names to positive sizes, got %r" % (sizes,))
    out["maps"] = dict(sizes)
    lbc = cfg.get("lb") or {}
    _keys(lbc, _LB_KEYS, "config.lb")
    out["lb"].update(lbc)
    m = out["lb"]["maglev_table_size"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 7 or not lb.is_prime(m):
        raise ConfigError("config.lb.maglev_table_size: must be a prime >= 7, got %r" % (m,))
    if not isinstance(out["lb"]["state_file"], str) or not os.path.isabs(out["lb"]["state_file"]):
        raise ConfigError("config.lb.state_file: must be an absolute path")
    if not isinstance(out["lb"]["destroy_udp_sockets"], bool):
        raise ConfigError("config.lb.destroy_udp_sockets: must be true or false")
    try:
        out["routes"] = routes.normalize(cfg.get("routes") or [], "config.routes")
    except routes.RouteError as e:
        raise ConfigError(str(e))
    try:
        out["pods"] = podnet.normalize(cfg.get("pods"))
        podnet.check_routes(out["pods"], out["routes"])
    except podnet.PodError as e:
        raise ConfigError(str(e))
    _check_host_routing(out)
    _check_policy(out)
    _check_nodeport(cfg, out)
    _check_agent(cfg, out)
    return out


def _check_agent(cfg, out):
    """The flow agent's section (flows/config.py)."""
    try:
        out["agent"] = flows_config.normalize(cfg.get("agent"))
    except flows_config.AgentConfigError as e:
        raise ConfigError(str(e))


def _check_policy(cfg):
    """The policy and overlay objects need a pod network; a VXLAN device in external mode needs the overlay
    object (its programs give every packet its tunnel key), and the overlay object such a device."""
    names = [o["name"] for o in cfg["objects"]]
    for obj in (policy_node.OBJECT, policy_node.TUNNEL_OBJECT):
        if obj in names and cfg["pods"] is None:
            raise ConfigError("config.objects[%d].name: %s needs config.pods (a pod network)" % (names.index(obj), obj))
    if cfg["pods"] is None:
        return
    external = cfg["pods"]["vxlan"]["external"]
    if external and podnet.tunnelled(cfg["pods"]) and policy_node.TUNNEL_OBJECT not in names:
        raise ConfigError("config.pods.vxlan.external: the VXLAN device in external mode needs the %s object in "
                          "config.objects (it sets every packet's tunnel key)" % policy_node.TUNNEL_OBJECT)
    if policy_node.TUNNEL_OBJECT in names and not external:
        raise ConfigError("config.objects[%d].name: %s carries identities in the VNI of an external VXLAN device; "
                          "set config.pods.vxlan.external" % (names.index(policy_node.TUNNEL_OBJECT), policy_node.TUNNEL_OBJECT))


def _check_nodeport(cfg, out):
    """The edge load balancer (object nodeport, nodeport.py): its section, and the object on a device."""
    try:
        out["nodeport"] = nodeport.normalize(cfg.get("nodeport"))
    except nodeport.NodePortError as e:
        raise ConfigError(str(e))
    names = [o["name"] for o in out["objects"]]
    if nodeport.OBJECT in names:
        i = names.index(nodeport.OBJECT)
        if out["nodeport"] is None:
            raise ConfigError("config.objects[%d].name: the nodeport object needs config.nodeport (the node's address)" % i)
        if not out["objects"][i]["targets"]["devices"]:
            raise ConfigError("config.objects[%d].targets.devices: the nodeport object attaches to the underlay device" % i)


def _check_host_routing(cfg):
    """BPF host routing is the objects host and lxc together, on a node with a pod network, the host
    programs on its underlay device."""
    names = [o["name"] for o in cfg["objects"]]
    have = [n for n in hostroute.OBJECTS if n in names]
    if not have:
        return
    i = names.index(have[0])
    if len(have) != len(hostroute.OBJECTS):
        raise ConfigError("config.objects[%d].name: BPF host routing needs both objects %s (%s is missing)"
                          % (i, " and ".join(hostroute.OBJECTS), [n for n in hostroute.OBJECTS if n not in have][0]))
    if cfg["pods"] is None:
        raise ConfigError("config.objects[%d].name: %s is BPF host routing, which needs config.pods (a pod network)"
                          % (i, have[0]))
    host = cfg["objects"][names.index("host")]
    if cfg["pods"]["underlay_interface"] not in host["targets"]["devices"]:
        raise ConfigError("config.objects[%d].targets.devices: the host object must attach to the underlay device "
                          "%s (config.pods.underlay_interface), got %s"
                          % (names.index("host"), cfg["pods"]["underlay_interface"], host["targets"]["devices"]))


def read_config(path=CONFIG_PATH):
    try:
        with open(path) as f:
            return validate(json.load(f))
    except (IOError, OSError) as e:
        raise ConfigError("cannot read %s: %s (is the dataplane role applied?)" % (path, e.strerror))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise ConfigError("%s: %s" % (path, e))
        raise ConfigError("%s: not JSON: %s" % (path, e))


def config_text(cfg):
    return json.dumps(cfg, indent=1, sort_keys=True) + "\n"


def globals_dir(cfg):
    return os.path.join(cfg["pin_path"], loader.GLOBALS)


def bundle_objects(bundle):
    """Names of the objects inside the node bundle."""
    with zipfile.ZipFile(bundle) as z:
        return sorted(n[len(BUNDLE_OBJECTS):-2] for n in z.namelist()
                      if n.startswith(BUNDLE_OBJECTS) and n.endswith(".o"))


@contextlib.contextmanager
def unpacked(cfg):
    """The configured objects and their manifests unpacked from the bundle into a private directory
    (removed afterwards): {name: object path}. ConfigError names an object the bundle does not have."""
    tmp = tempfile.mkdtemp(prefix="netstack-objects-", dir="/run" if os.path.isdir("/run") else None)
    try:
        with zipfile.ZipFile(cfg["bundle"]) as z:
            have = set(z.namelist())
            out = {}
            for i, o in enumerate(cfg["objects"]):
                member = BUNDLE_OBJECTS + o["name"] + ".o"
                if member not in have:
                    raise ConfigError("config.objects[%d].name: %s is not in the bundle %s (it has %s)"
                                      % (i, o["name"], cfg["bundle"], ", ".join(bundle_objects(cfg["bundle"])) or "none"))
                for suffix in (".o", ".manifest.json"):
                    path = os.path.join(tmp, o["name"] + suffix)
                    with open(path, "wb") as f:
                        f.write(z.read(BUNDLE_OBJECTS + o["name"] + suffix))
                out[o["name"]] = os.path.join(tmp, o["name"] + ".o")
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _objects(cfg, paths):
    """loader.object_spec() of every object, each with the sizes of the maps its manifest declares."""
    out = []
    declared = set()
    for o in cfg["objects"]:
        path = paths[o["name"]]
        names = set(loader.load_manifest(path, required=True)["maps"])
        declared |= names
        out.append(loader.object_spec(o["name"], path, targets=o["targets"],
                                      map_sizes=dict((k, v) for k, v in cfg["maps"].items() if k in names)))
    unknown = sorted(set(cfg["maps"]) - declared)
    if unknown:
        raise ConfigError("config.maps: %s not a map of any object (%s)"
                          % (", ".join(unknown), ", ".join(o["name"] for o in cfg["objects"])))
    return out


def restore_unit_text(cfg, config_path):
    env = "" if config_path == CONFIG_PATH else "Environment=NETSTACK_CONFIG=%s\n" % config_path
    return ("# Managed by kldload.netstack (node_dataplane)\n"
            "# Applies the node configuration (%s) again at boot: bpffs is empty after a reboot, so the\n"
            "# objects are loaded and attached again, the last applied service table is written back and the\n"
            "# routes and the pod network are made - the same function the node_dataplane module runs.\n"
            "# network-online: the pod network needs the underlay's address.\n"
            "[Unit]\n"
            "Description=kldload.netstack dataplane (eBPF objects, service table, routes, pod network)\n"
            "After=local-fs.target network.target network-online.target netstack-bpffs-sys-fs-bpf.service\n"
            "Wants=network-online.target netstack-bpffs-sys-fs-bpf.service\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            "RemainAfterExit=yes\n"
            "%s"
            "ExecStart=/usr/bin/python3 %s dataplane restore\n"
            "\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n") % (config_path, env, cfg["bundle"])


def runner(module):
    """``run(argv) -> (rc, out, err)`` through runner.Tool (the C locale, the module's run_command when
    there is a module): what lb.destroy_udp_sockets() takes."""
    def run(argv):
        return Tool(module, argv[0]).run(*argv[1:], check=False)
    return run


def apply(cfg, services=None, check=False, config_path=None, module=None, restore_unit=False):
    """Make the node match ``cfg``: objects, attachments, the service table, routes; then write the
    configuration to ``config_path`` (when given) and, with ``restore_unit``, the unit that applies it
    again at boot. ``services``: the whole service table, or None for the last applied one (the LB
    state file and its journal: what boot-time restore programs). The shared maps the node's previous
    release (release.py) uses stay pinned, also when these objects migrate them to a newer layout: what a
    rollback to it needs.

    Returns {changed, config {changed, before, after}, dataplane (loader result), lb (lb.sync
    result), routes [changes], pods (podnet.apply() result), missing [objects not installed]}.
    Raises ConfigError, lb.LbError, loader.ProgError, routes.RouteError (all before the first write
    when the input is at fault)."""
    cfg = validate(cfg)
    table = services if services is not None else lb.load_state(cfg["lb"]["state_file"])
    lb.normalize(table, cfg["lb"]["maglev_table_size"])        # every service checked before anything is touched
    _pods_preflight(cfg, module, check)                        # the underlay the pod network needs, likewise
    _agent_preflight(cfg)                                      # the agent's address is one of the node's, likewise
    text = config_text(cfg)
    before_text = units.read(config_path) if config_path else None
    res = {"config": {"changed": config_path is not None and before_text != text, "path": config_path,
                      "before": before_text or "", "after": text}, "missing": [], "udp_sockets_destroyed": 0}
    if not os.path.isfile(cfg["bundle"]):
        if not check:
            raise ConfigError("config.bundle: %s is not installed (the dataplane role installs it)" % cfg["bundle"])
        # check mode on a node where the bundle is not installed yet: all of it would be new
        res["missing"] = [o["name"] for o in cfg["objects"]]
        res["dataplane"] = {"changed": True, "actions": ["install and load %s" % n for n in res["missing"]],
                            "before": {}, "after": {}, "report": {"objects": {}, "globals": {}}}
    else:
        with unpacked(cfg) as paths:
            res["dataplane"] = loader.ensure(cfg["pin_path"], _objects(cfg, paths), check=check, prune=True,
                                             module=module, keep_pins=previous_release_pins(cfg))
    res["lb"] = _lb(cfg, table, check, module, res)
    res["pods"] = apply_network(cfg, check=check, module=module)
    res["routes"] = res["pods"]["routes"]
    res["policy"] = _policy(cfg, check)                # identities and rules first: the programs below read them
    res["tunnel"] = _tunnel_links(cfg, check)
    res["endpoints"] = _endpoint_programs(cfg, check)
    res["host_routing"] = _host_routing(cfg, check)
    res["nodeport"] = _nodeport(cfg, check)
    if res["config"]["changed"] and not check:
        units.write(config_path, text)
    res["agent"] = _agent(cfg, check, module, restore_unit, config_path, before_text)   # reads the file written
    res["unit"] = units.ensure_unit(RESTORE_UNIT, restore_unit_text(cfg, config_path), "multi-user.target", check=check,
                                    module=module) if restore_unit else []
    res["changed"] = bool(res["config"]["changed"] or res["dataplane"]["changed"] or res["lb"]["changed"]
                          or res["routes"] or res["pods"]["changed"] or res["endpoints"] or res["host_routing"]
                          or res["policy"]["changed"] or res["tunnel"] or res["nodeport"] or res["unit"]
                          or res["agent"])
    return res


def previous_release_pins(cfg):
    """``globals/`` names of the shared maps the previous release beside the bundle declares (none without
    one): releases/previous/netstack.pyz of release.py's layout."""
    prev = os.path.join(os.path.dirname(cfg["bundle"]), release.RELEASES, release.PREVIOUS, release.BUNDLE)
    out = set()
    try:
        with zipfile.ZipFile(prev) as z:
            for n in z.namelist():
                if n.startswith(BUNDLE_OBJECTS) and n.endswith(".manifest.json"):
                    for name, m in (json.loads(z.read(n).decode("utf-8")).get("maps") or {}).items():
                        if m.get("shared"):
                            out.add(mf.pin_name(name, int(m.get("version", 1))))
    except (OSError, IOError, ValueError, zipfile.BadZipfile):
        return set()
    return out


def _endpoint_programs(cfg, check):
    """The pods of this node (the CNI plugin's endpoint records) attached to the endpoint programs of the
    objects loaded now (cni.reconcile_endpoints): the changes as text."""
    if cfg["pods"] is None:
        return []
    try:
        return cni.reconcile_endpoints(cfg, check=check)
    except (cni.CNIError, OSError) as e:
        raise ConfigError("config.objects: cannot attach the endpoint programs to the pods: %s" % (e,))


def _object_names(cfg):
    return [o["name"] for o in cfg["objects"]]


def _policy(cfg, check):
    """The identity and policy maps (policy/node.py) from the node's policy state and its pods, when the node
    runs the policy object: {changed, changes, diff, ...} (changed false without it)."""
    if policy_node.OBJECT not in _object_names(cfg):
        return {"changed": False, "changes": [], "diff": []}
    try:
        res = policy_node.apply(globals_dir(cfg), policy_node.read_state(), cni.list_endpoints(), cfg["pods"],
                                check=check, tunnel=policy_node.TUNNEL_OBJECT in _object_names(cfg))
    except (OSError, PolicyError, policy_maps.PolicyMapError) as e:
        raise ConfigError("config.objects: cannot write the policy maps: %s" % (e,))
    res.pop("output", None)
    return res


def _tunnel_links(cfg, check):
    """The programs of manifest target ``tunnel`` (the overlay object) attached to the pod network's VXLAN
    device when it is an external one (loader.hold_link: updated in place, made again when the device was
    made again); links of such programs that are not wanted (native mode, no overlay object) go. Changes as text."""
    pods = cfg["pods"]
    want = {}
    if pods is not None and podnet.tunnelled(pods) and pods["vxlan"]["external"]:
        try:
            progs = cni.endpoint_programs(cfg, target="tunnel")
        except cni.CNIError:
            if check:
                return ["attach the tunnel programs to %s" % pods["vxlan"]["device"]]
            raise
        for p in progs:
            want[os.path.join(cfg["pin_path"], p["object"], loader.TUNNEL_LINKS, p["program"])] = p
    changes = []
    if want:
        dev = pods["vxlan"]["device"]
        try:
            ifindex = socket.if_nametoindex(dev)
        except OSError:
            if check:
                return ["attach %s to %s" % (", ".join(p["program"] for p in want.values()), dev)]
            raise ConfigError("config.pods.vxlan.device: %s does not exist after the pod network was made" % dev)
        for pin, p in sorted(want.items()):
            if loader.hold_link(pin, p["prog_pin"], ifindex, p["attach"], p["order"], p["orders"], check):
                changes.append("attach %s/%s to %s (%s)" % (p["object"], p["program"], dev, p["attach"]))
    root = cfg["pin_path"]
    for obj in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        d = os.path.join(root, obj, loader.TUNNEL_LINKS)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if os.path.join(d, name) not in want:
                changes.append("detach %s/%s" % (obj, name))
                if not check:
                    loader.unpin_link(os.path.join(d, name))
    return changes


def _host_routing(cfg, check):
    """BPF host routing's maps (hostroute.py) made to match the pod network and the endpoint records:
    the changes as text ([] when the node has no BPF host routing)."""
    if not hostroute.enabled(cfg["objects"]):
        return []
    try:
        return hostroute.sync(globals_dir(cfg), cfg["pods"], cni.list_endpoints(), check=check)
    except (OSError, hostroute.HostRouteError) as e:
        raise ConfigError("config.objects: cannot write the BPF host routing maps: %s" % (e,))


def _nodeport(cfg, check):
    """The edge load balancer's node settings (nodeport.py) when the node runs the object: the changes."""
    if cfg["nodeport"] is None or nodeport.OBJECT not in [o["name"] for o in cfg["objects"]]:
        return []
    try:
        return nodeport.sync(cfg["pin_path"], cfg["nodeport"], cfg["pods"], hostroute.enabled(cfg["objects"]), check=check)
    except (OSError, nodeport.NodePortError) as e:
        raise ConfigError("config.nodeport: cannot write the edge load balancer's settings: %s" % (e,))


def _agent_preflight(cfg):
    if cfg["agent"] and cfg["agent"]["enabled"]:
        try:
            flows_config.check_listen(cfg["agent"]["listen"])
        except flows_config.AgentConfigError as e:
            raise ConfigError(str(e))


def _agent(cfg, check, module, manage_unit, config_path, before_text):
    """Flow events on or off in the kernel (kln_flow_config) and, with ``manage_unit`` (the module's apply, not the
    boot-time restore: at boot the enabled unit starts by itself, after the restore), the agent's unit running with
    this configuration: the changes as text."""
    section = cfg["agent"] if cfg["agent"] and cfg["agent"]["enabled"] else None
    try:
        changes = flows_events.sync_config(globals_dir(cfg), flows_config.kernel(section), check=check)
    except OSError as e:
        raise ConfigError("config.agent: cannot write kln_flow_config: %s" % (e,))
    text = flows_service.unit_text(cfg["bundle"], config_path or CONFIG_PATH, CONFIG_PATH,
                                   loader.file_sha256(cfg["bundle"]) if os.path.isfile(cfg["bundle"]) else None)
    if not manage_unit:
        # restore (boot, rollback): the agent follows a switched bundle; nothing else of its unit is ours here
        return changes + (flows_service.follow_bundle(text, check=check, module=module) if section else [])
    if section is None:
        return changes + flows_service.remove(check=check, module=module)
    try:
        before = json.loads(before_text).get("agent") if before_text else None
    except ValueError:
        before = None
    return changes + flows_service.ensure(text, restart=before != cfg["agent"], check=check, module=module)


def _pods_preflight(cfg, module, check=False):
    try:
        podnet.preflight(cfg["pods"], module, check)
    except podnet.PodError as e:
        raise ConfigError(str(e))


def apply_network(cfg, check=False, module=None):
    """The node's routes and pod network (``routes`` and ``pods`` of the validate()d ``cfg``): what
    apply() does after the objects and services. podnet.apply()'s result; ConfigError names the field."""
    try:
        return podnet.apply(cfg["pods"], cfg["routes"], bundle=cfg["bundle"], check=check, module=module)
    except podnet.PodError as e:
        raise ConfigError(str(e))


def _lb(cfg, table, check, module, res):
    gdir = globals_dir(cfg)
    if check and not os.path.exists(os.path.join(gdir, lb.pin("kln_lb4_svc"))):
        # the maps do not exist yet (check mode before the first install): every service would be added
        want = sorted(lb.normalize(table, cfg["lb"]["maglev_table_size"]), key=lb.svc_key)
        added = [{"service": lb.svc_label(lb.svc_key(s)), "name": "%s/%s" % (s["namespace"], s["name"]),
                  "backends": [lb.addr_port(b["ip"], b["port"]) for b in s["backends"]]} for s in want]
        return {"changed": bool(added), "diff": {"added": added, "removed": [], "changed": []}, "table": [],
                "stats": {"path": "none"}, "services": len(want)}

    def gone(backends):
        if cfg["lb"]["destroy_udp_sockets"]:
            res["udp_sockets_destroyed"] = lb.destroy_udp_sockets(backends, runner(module))
    return lb.sync(gdir, table, prune=True, check=check, maglev_m=cfg["lb"]["maglev_table_size"],
                   state_file=cfg["lb"]["state_file"], on_backends_gone=gone)


def remove(cfg, check=False, config_path=None, module=None, restore_unit=False):
    """Take the dataplane off the node: the restore unit (with ``restore_unit``), every object and
    shared map, the routes it owns, the pod network (podnet.remove(): the VXLAN device, nftables table,
    conflist, plugin symlink - of ``cfg["pods"]``' names and the defaults), the LB state file and its
    journal, the configuration file."""
    cfg = validate(cfg)
    unit = units.remove_unit(RESTORE_UNIT, "multi-user.target", check=check, module=module) if restore_unit else []
    if restore_unit:
        unit += flows_service.remove(check=check, module=module)
    pods = podnet.remove(cfg["pods"], [], check=check, module=module)
    res = {"dataplane": loader.ensure(cfg["pin_path"], [], state="absent", check=check, prune=True, module=module),
           "routes": pods["routes"], "pods": pods, "files": [], "unit": unit}
    sf = cfg["lb"]["state_file"]
    for p in [sf, sf + ".journal"] + ([config_path] if config_path else []):
        if os.path.lexists(p):
            res["files"].append(p)
            if not check:
                os.unlink(p)
    res["changed"] = bool(res["dataplane"]["changed"] or res["pods"]["changed"] or res["files"] or res["unit"])
    return res


def status(cfg):
    """What the node runs now: {objects, globals (loader.report), services (count), pods (podnet.status())}."""
    cfg = validate(cfg)
    rep = loader.report(cfg["pin_path"])
    rep["config"] = cfg
    try:
        rep["services"] = len(lb.table(globals_dir(cfg), cfg["lb"]["state_file"]))
    except (lb.LbError, OSError):
        rep["services"] = None
    try:
        rep["pods"] = podnet.status(cfg["pods"])
    except (ImportError, OSError, podnet.PodError) as e:
        rep["pods"] = {"enabled": cfg["pods"] is not None, "error": str(e)}
    if rep["pods"].get("enabled"):
        rep["pods"]["host_routing"] = "bpf" if hostroute.enabled(cfg["objects"]) else "legacy"
        if hostroute.enabled(cfg["objects"]):
            try:
                rep["pods"]["bpf_endpoints"] = len(hostroute.read(globals_dir(cfg), hostroute.ENDPOINTS) or {})
            except OSError as e:
                rep["pods"]["bpf_endpoints"] = str(e)
    return rep
