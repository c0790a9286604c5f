# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""netstack - the node command of kldload.netstack (one zipapp with the library it needs, built by
`make node` and installed by the dataplane role as /usr/local/sbin/netstack).

  netstack version [--json]            collection version, the objects it was built with, what is installed and pinned
  netstack lb list [--json]            the socket load balancer's service table (like cilium bpf lb list)
  netstack dataplane status [--json]   objects, programs, attachments, shared and private maps, routes
  netstack endpoint list [--json]      the pods' endpoints on this node, as the netstack-cni plugin recorded them
  netstack encrypt status [--json] [--interface NAME]
                                       the WireGuard device: backend, public key, port, peers and their handshakes
  netstack encrypt restore [--interface NAME]
                                       apply the saved WireGuard configuration again (netstack-wireguard-NAME.service)
  netstack bgp peers [--json]          BGP sessions per neighbour and family: state, uptime, prefixes received /
                                       advertised (like cilium bgp peers), from FRR
  netstack lb flows [--json]           the edge load balancer's translated flows (LoadBalancer IPs, NodePorts)
  netstack dataplane restore           apply the node configuration again with the last applied service
                                       table (what netstack-dataplane.service runs at boot)
  netstack identity list [--json]      the security identities the node knows, with their labels (like cilium identity list)
  netstack policy get ENDPOINT [--json]
                                       one pod's policy entries and verdict counters (like cilium bpf policy get);
                                       ENDPOINT is namespace/name, a container id or the pod's address
  netstack observe [FILTERS] [--last N] [--follow] [-o compact|json] [--agent ADDRESS:PORT ... | --inventory FILE]
                                       flows like hubble observe: this node's agent, or (on the controller) every
                                       node's agent of an inventory merged like Hubble Relay (docs/observability.md)
  netstack relay [--listen ADDRESS:PORT] (--inventory FILE | --agent ADDRESS:PORT ...)
                                       (on the controller) every node's agent merged: the network map page (/) and
                                       its API (/api/pods, /api/flows), like Hubble Relay and Hubble UI
  netstack agent                       the flow agent (netstack-agent.service): reads the eBPF programs' flow
                                       events, serves flows and Prometheus metrics on config.agent.listen

Product commands only. Configuration:
/etc/kldload-netstack/dataplane.json (NETSTACK_CONFIG overrides), written by the node_dataplane module.

Run under the name netstack-cni (the symlink /usr/lib/cni/netstack-cni), this command is the CNI
plugin of the same name: the CNI_* environment and the network configuration on stdin, the result on
stdout (see docs/pods.md).
"""
import argparse
import json
import os
import re
import sys
import time

from ansible_collections.kldload.netstack.plugins.module_utils import cni, lb, loader, routes, runtime, wireguard
from ansible_collections.kldload.netstack.plugins.module_utils.policy import node as policy_node

BUILD_INFO = "netstack_build.json"


def _config():
    return runtime.read_config(os.environ.get("NETSTACK_CONFIG", runtime.CONFIG_PATH))


def build_info():
    """What `make node` recorded: {collection, commit, objects {name: sha256}}."""
    try:
        import pkgutil
        return json.loads(pkgutil.get_data("netstack_cli", BUILD_INFO) or b"{}")
    except (OSError, ValueError, ImportError):
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_INFO)
        if os.path.exists(here):
            with open(here) as f:
                return json.load(f)
        return {"collection": "unknown (not built by make node)", "objects": {}}


def cmd_version(args):
    info = build_info()
    out = {"collection": info.get("collection"), "commit": info.get("commit"), "built_objects": info.get("objects", {}),
           "installed_objects": {}, "pinned_versions": {}}
    try:
        cfg = _config()
    except runtime.ConfigError:
        cfg = runtime.default_config()
    if os.path.isfile(cfg["bundle"]):
        with runtime.unpacked(dict(cfg, objects=[{"name": n} for n in runtime.bundle_objects(cfg["bundle"])])) as paths:
            for name, path in paths.items():
                out["installed_objects"][name] = loader.file_sha256(path)
    for name, rep in loader.report(cfg["pin_path"])["objects"].items():
        out["pinned_versions"][name] = rep["version"]
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return
    print("kldload.netstack %s%s" % (out["collection"], " (%s)" % out["commit"] if out["commit"] else ""))
    for name in sorted(set(out["built_objects"]) | set(out["installed_objects"])):
        built, inst = out["built_objects"].get(name), out["installed_objects"].get(name)
        pinned = out["pinned_versions"].get(name) or "not loaded"
        print("  %-10s built %s  installed %s  pinned %s%s" % (
            name, (built or "-")[:12], (inst or "missing")[:12], pinned,
            "" if built == inst else "  (the installed bundle is not this command's build)"))


def cmd_lb_list(args):
    cfg = _config()
    rows = lb.table(runtime.globals_dir(cfg), cfg["lb"]["state_file"])
    print(json.dumps(rows, indent=1) if args.json else lb.format_table(rows))


def cmd_endpoint_list(args):
    rows = cni.list_endpoints()
    print(json.dumps(rows, indent=1, sort_keys=True) if args.json else cni.format_endpoints(rows))


def cmd_identity_list(args):
    rows = policy_node.identity_rows()
    print(json.dumps(rows, indent=1, sort_keys=True) if args.json else policy_node.format_identities(rows))


def cmd_policy_get(args):
    out = policy_node.endpoint_policy(runtime.globals_dir(_config()), args.endpoint, cni.list_endpoints())
    if out is None:
        sys.exit("netstack: no pod %r on this node (netstack endpoint list shows them)" % args.endpoint)
    print(json.dumps(out, indent=1, sort_keys=True) if args.json else policy_node.format_endpoint_policy(out))


def cmd_encrypt_status(args):
    st = wireguard.status(args.interface)
    print(json.dumps(st, indent=1, sort_keys=True) if args.json else wireguard.format_status(st))


def cmd_encrypt_restore(args):
    res = wireguard.restore(args.interface)
    print("netstack: %s (%s backend): %s" % (args.interface, res["backend"], "; ".join(res["changes"]) or "in place"))


def cmd_bgp_peers(args):
    from ansible_collections.kldload.netstack.plugins.module_utils import frr
    try:
        rows = frr.peers(frr.Frr())
    except frr.FrrRuntimeError as e:
        sys.exit("netstack: %s" % e)
    print(json.dumps(rows, indent=1, sort_keys=True) if args.json else frr.format_peers(rows))


def cmd_lb_flows(args):
    from ansible_collections.kldload.netstack.plugins.module_utils import nodeport
    rows = nodeport.flows(_config()["pin_path"])
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
        return
    print("%-6s %-8s %-44s %s" % ("PROTO", "DIR", "PACKET", "TRANSLATED"))
    for r in sorted(rows, key=lambda r: (r["direction"], r["packet"])):
        print("%-6s %-8s %-44s %s" % (r["proto"], r["direction"], r["packet"], r["translated"]))


def cmd_agent(_args):
    import signal
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import agent as fagent
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import config as fconfig
    cfg = _config()
    section = cfg.get("agent")
    if not section or not section["enabled"]:
        sys.exit("netstack agent: the node configuration has no enabled agent section (config.agent)")
    fconfig.check_listen(section["listen"])
    ag = fagent.Agent(runtime.globals_dir(cfg), section, cfg)
    srv = fagent.serve(ag, section["listen"])
    signal.signal(signal.SIGTERM, lambda *_a: ag.stop.set())
    signal.signal(signal.SIGINT, lambda *_a: ag.stop.set())
    print("netstack agent: node %s, serving flows and metrics on %s (buffer %d flows%s)"
          % (ag.node_name, section["listen"], section["buffer"],
             ", export %s" % section["export"]["path"] if section["export"] else ""), flush=True)
    try:
        ag.run()
    finally:
        srv.shutdown()


FILTER_FLAGS = (("namespace", "a namespace (either end)"), ("pod", "[namespace/]pod-name prefix (either end)"),
                ("from-pod", "source pod"), ("to-pod", "destination pod"),
                ("label", "key=value[,key=value] (either end)"), ("identity", "security identity (either end)"),
                ("verdict", "FORWARDED, DROPPED, TRANSLATED, ..."), ("drop-reason", "POLICY_DENIED, ... or a code"),
                ("protocol", "tcp, udp, icmp, sctp"), ("port", "L4 port (either end)"),
                ("ip", "address or CIDR (either end)"), ("from-ip", "source address or CIDR"),
                ("to-ip", "destination address or CIDR"), ("node", "node name"))


def cmd_observe(args):
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    values = dict((name.replace("-", "_"), getattr(args, name.replace("-", "_"))) for name, _h in FILTER_FLAGS)
    values.update(since=args.since, last=args.last, follow=args.follow)
    flt = relay.parse_cli(values)                     # a bad filter is an error before any agent is asked
    agents = _named_agents(args, "observe")
    if agents is None:
        cfg = _config()
        if not cfg.get("agent") or not cfg["agent"]["enabled"]:
            sys.exit("netstack observe: no flow agent on this node (the node configuration has no enabled agent "
                     "section); on the controller, name the agents with --inventory or --agent")
        agents = {"local": cfg["agent"]["listen"]}
    try:
        rl = relay.Relay(agents)
        unknown = rl.unknown_pods(flt)
        if unknown:
            print("netstack observe: no pod %s on the nodes asked (%s): no flows to show for it"
                  % (", ".join(unknown), ", ".join(sorted(agents))), file=sys.stderr)
        n = [0]

        def emit(obj):
            print(relay.render(obj, args.output), flush=bool(args.follow))
            n[0] += 1
        if args.follow:
            try:
                rl.follow(flt, emit)
            except KeyboardInterrupt:
                pass
        else:
            for obj in rl.flows(flt):
                emit(obj)
        for name, err in sorted(rl.unavailable.items()):
            print("netstack observe: node unavailable: %s (%s): %s" % (name, agents[name], err), file=sys.stderr)
        if not n[0] and not unknown:
            print("netstack observe: no flows match", file=sys.stderr)
    except BrokenPipeError:
        sys.stderr.close()
    except relay.RelayError as e:
        sys.exit("netstack observe: %s" % e)


def _named_agents(args, cmd):
    """The agents named with --agent, or every node's of --inventory; None when neither is given."""
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    if args.agent:
        return dict((a, a) for a in args.agent)
    if args.inventory:
        try:
            return relay.agents_from_inventory(args.inventory, args.group, args.agent_port)
        except relay.RelayError as e:
            sys.exit("netstack %s: %s" % (cmd, e))
    return None


def cmd_relay(args):
    import signal
    import threading
    from ansible_collections.kldload.netstack.plugins.module_utils.flows import relay
    agents = _named_agents(args, "relay")
    if agents is None:
        sys.exit("netstack relay: name the agents with --inventory or --agent")
    if not re.match(r"^[0-9]+(s|m|h|d)$", args.window):
        sys.exit("netstack relay: --window: %r is not a duration (30s, 5m, 2h)" % args.window)
    try:
        relay.fconfig.split_listen(args.listen, "--listen")
    except ValueError as e:
        sys.exit("netstack relay: %s" % e)
    srv = relay.serve(relay.Relay(agents), args.listen, args.window)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    signal.signal(signal.SIGINT, lambda *_a: stop.set())
    names = ", ".join(sorted(agents))
    print("netstack relay: %d agents (%s), the network map on http://%s/" % (len(agents), names, args.listen), flush=True)
    stop.wait()
    srv.shutdown()


def cmd_restore(_args):
    t0 = time.time()
    res = runtime.apply(_config())
    print("netstack: dataplane restored in %.2fs: programs %s, %d services %s, routes %s"
          % (time.time() - t0, "reloaded" if res["dataplane"]["changed"] else "already in place",
             res["lb"]["services"], "written" if res["lb"]["changed"] else "already in place",
             ", ".join(res["routes"]) if res["routes"] else "in place"))


def cmd_status(args):
    rep = runtime.status(_config())
    if args.json:
        print(json.dumps(rep, indent=1, sort_keys=True))
        return
    for name, o in sorted(rep["objects"].items()):
        print("object %s (version %s)" % (name, o["version"]))
        for pname, p in sorted(o["programs"].items()):
            print("  program %-16s id %-6d tag %s" % (pname, p["id"], p["tag"]))
        for a in o["attachments"]:
            where = "cgroup id %s" % a["cgroup_id"] if "cgroup_id" in a else "device %s" % a.get("device")
            print("  link    %-16s %-26s link %d, %s" % (a["program"], a["type"], a["link_id"], where))
        for mname, m in sorted(o["maps"].items()):
            print("  map     %-16s %-9s %d entries (private)" % (mname, m["type"], m["max_entries"]))
    print("shared maps (%s):" % runtime.globals_dir(rep["config"]))
    for pin, m in sorted(rep["globals"].items()):
        print("  %-20s %-9s %d entries" % (pin, m["type"], m["max_entries"]))
    print("services: %s" % ("unknown (maps not readable)" if rep["services"] is None else rep["services"]))
    print("routes: %s" % (", ".join("%s via %s" % (r["dst"], r["via"]) for r in rep["config"]["routes"]) or "none"))
    pods = rep.get("pods") or {}
    if pods.get("enabled"):
        print("pods: %s mode, CIDR %s, MTU %s, host routing %s%s"
              % (pods.get("mode"), pods.get("cidr"), pods.get("mtu"), pods.get("host_routing"),
                 " (%s pods in kln_endpoints4)" % pods["bpf_endpoints"] if "bpf_endpoints" in pods else ""))


def main(argv=None):
    if os.path.basename(sys.argv[0]) == cni.PLUGIN_NAME:
        sys.exit(cni.plugin_main(os.environ, sys.stdin, sys.stdout))
    ap = argparse.ArgumentParser(prog="netstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("version", help="collection version and object hashes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_version)
    p_lb = sub.add_parser("lb", help="the socket load balancer").add_subparsers(dest="sub", required=True)
    p = p_lb.add_parser("list", help="the service table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lb_list)
    p = p_lb.add_parser("flows", help="the edge load balancer's translated flows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lb_flows)
    p_bgp = sub.add_parser("bgp", help="BGP (FRR)").add_subparsers(dest="sub", required=True)
    p = p_bgp.add_parser("peers", help="the BGP sessions: state, uptime, prefixes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bgp_peers)
    p_ep = sub.add_parser("endpoint", help="the pods' endpoints").add_subparsers(dest="sub", required=True)
    p = p_ep.add_parser("list", help="the endpoints on this node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_endpoint_list)
    p_dp = sub.add_parser("dataplane", help="the node's eBPF dataplane").add_subparsers(dest="sub", required=True)
    p_dp.add_parser("restore", help="apply the node configuration again (boot)").set_defaults(fn=cmd_restore)
    p = p_dp.add_parser("status", help="what is loaded and attached")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p_id = sub.add_parser("identity", help="security identities").add_subparsers(dest="sub", required=True)
    p = p_id.add_parser("list", help="the identities this node knows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_identity_list)
    p_pol = sub.add_parser("policy", help="identity-based network policy").add_subparsers(dest="sub", required=True)
    p = p_pol.add_parser("get", help="one pod's policy entries and counters")
    p.add_argument("endpoint", help="namespace/name, container id or address of a pod of this node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy_get)
    p_enc = sub.add_parser("encrypt", help="WireGuard encryption").add_subparsers(dest="sub", required=True)
    p = p_enc.add_parser("status", help="the WireGuard device and its peers")
    p.add_argument("--json", action="store_true")
    p.add_argument("--interface", default=wireguard.DEFAULT_INTERFACE)
    p.set_defaults(fn=cmd_encrypt_status)
    p = p_enc.add_parser("restore", help="apply the saved WireGuard configuration again (boot)")
    p.add_argument("--interface", default=wireguard.DEFAULT_INTERFACE)
    p.set_defaults(fn=cmd_encrypt_restore)
    p = sub.add_parser("observe", help="flows like hubble observe (this node, or every node from the controller)")
    for name, helptext in FILTER_FLAGS:
        p.add_argument("--" + name, action="append", metavar=name.rsplit("-", maxsplit=1)[-1].upper(), help=helptext)
    p.add_argument("--since", help="a duration back (30s, 5m, 2h) or a time (2024-05-01T10:00:00Z)")
    p.add_argument("--last", help="the last N flows (over all nodes asked)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing flows as they come")
    p.add_argument("-o", "--output", choices=["compact", "json"], default="compact",
                   help="compact: one line per flow; json: Hubble's flow JSON, one object a line")
    p.add_argument("--agent", action="append", metavar="ADDRESS:PORT", help="an agent to ask (repeat for more)")
    p.add_argument("--inventory", metavar="FILE", help="ask the agent of every host of --group in this inventory")
    p.add_argument("--group", default="kube_nodes", help="the inventory group (default kube_nodes)")
    p.add_argument("--agent-port", type=int, help="the agents' port when the inventory does not say (default 4245)")
    p.set_defaults(fn=cmd_observe)
    sub.add_parser("agent", help="the flow agent (what netstack-agent.service runs)").set_defaults(fn=cmd_agent)
    p = sub.add_parser("relay", help="every node's agent merged: the network map page and its API (on the controller)")
    p.add_argument("--listen", default="127.0.0.1:4250", help="ADDRESS:PORT (default 127.0.0.1:4250)")
    p.add_argument("--agent", action="append", metavar="ADDRESS:PORT", help="an agent (repeat for more)")
    p.add_argument("--inventory", metavar="FILE", help="the agent of every host of --group in this inventory")
    p.add_argument("--group", default="kube_nodes")
    p.add_argument("--agent-port", type=int)
    p.add_argument("--window", default="5m", help="how far back the map's flows go (default 5m)")
    p.set_defaults(fn=cmd_relay)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (runtime.ConfigError, lb.LbError, loader.ProgError, routes.RouteError, wireguard.WgError, OSError,
            ValueError) as e:
        sys.exit("netstack: %s" % e)


if __name__ == "__main__":
    main()
