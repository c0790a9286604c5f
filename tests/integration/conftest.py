"""Integration tests run against the lab (the embedded default): real systemd-nspawn nodes.

The session fixture ``lab`` brings the lab up with lab/playbooks/lab.yml unless it is already up and
reachable, and gives tests a way to run a module on a node (through ansible, over SSH, exactly as
a user would) and to run shell commands on a node.
"""
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# The suite CI runs (make test) must stay under 45 minutes on one lab; the extended tier (make test-all,
# NETSTACK_TESTS=all) adds the tests marked ``extended``: deeper variants of capabilities whose main path the
# default tier covers (docs/testing.md lists them).
EXTENDED = os.environ.get("NETSTACK_TESTS") == "all"
STATE_DIR = Path(os.environ.get("NETSTACK_LAB_STATE_DIR", "/var/lib/kldload-netstack/lab"))
INVENTORY = STATE_DIR / "inventory.yml"


def _env(bin_dir=VENV_BIN, **extra):
    env = dict(os.environ)
    env["PATH"] = "%s:%s" % (bin_dir, env.get("PATH", ""))
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    env.update(extra)
    return env


def run_playbook(playbook, *args, check=True, inventory=INVENTORY, bin_dir=VENV_BIN):
    """ansible-playbook of the venv ``bin_dir`` (default .venv; .venv-oldest has the oldest ansible-core claimed)."""
    argv = [str(Path(bin_dir) / "ansible-playbook"), "-i", str(inventory), str(REPO / playbook)] + list(args)
    proc = subprocess.run(argv, cwd=REPO, env=_env(bin_dir), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError("%s failed (rc=%s)\n%s\n%s"
                             % (playbook, proc.returncode, proc.stdout[-6000:], proc.stderr[-3000:]))
    return proc


def changed_tasks(proc):
    """The tasks of a playbook run that reported a change, with the output lines that say so (for failure messages)."""
    found, task = [], ""
    for line in proc.stdout.splitlines():
        if line.startswith("TASK ["):
            task = line.rstrip("* ")
        elif line.startswith("changed:"):
            found.append("%s\n  %s" % (task, line[:300]))
    return "\n".join(found) or proc.stdout[-3000:]


class Lab:
    def __init__(self, inventory):
        self.inventory = inventory
        data = yaml.safe_load(inventory.read_text())
        self.hostvars = {}
        self.groups = {}

        def walk(name, grp):
            hosts = list((grp.get("hosts") or {}).keys())
            for h, hv in (grp.get("hosts") or {}).items():
                self.hostvars.setdefault(h, {}).update(hv or {})
            for child, cg in (grp.get("children") or {}).items():
                hosts += walk(child, cg or {})
            self.groups[name] = sorted(set(hosts))
            return hosts

        walk("all", data["all"])
        self.vars = data["all"].get("vars") or {}       # the cluster-wide variables
        self.key = data["all"]["vars"]["ansible_ssh_private_key_file"]

    def hosts(self, group="kube_nodes"):
        return self.groups.get(group, [])

    def module(self, host, name, args=None, check=False, diff=False, expect_fail=False):
        """Run one module on one host through ansible; return its result dict.

        ``localhost`` is the lab host itself (the lab modules run there), reached locally."""
        if host == "localhost":
            argv = [str(VENV_BIN / "ansible"), host, "-i", "localhost,", "-c", "local",
                    "-e", "ansible_python_interpreter=%s" % (VENV_BIN / "python"), "-m", name]
        else:
            argv = [str(VENV_BIN / "ansible"), host, "-i", str(self.inventory), "-m", name]
        if args:
            argv += ["-a", json.dumps(args)]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                              env=_env(ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="netstack_json",
                                       ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).parent / "callback_plugins")))
        try:
            out = json.loads(proc.stdout)
            result = out["plays"][0]["tasks"][0]["hosts"][host]
        except (ValueError, KeyError, IndexError):
            raise AssertionError("no result from %s: rc=%s\n%s\n%s"
                                 % (name, proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:]))
        failed = bool(result.get("failed") or result.get("unreachable"))
        if failed != expect_fail:
            raise AssertionError("%s on %s: expected failed=%s, got:\n%s" % (
                name, host, expect_fail, json.dumps(result, indent=2)[-6000:]))
        return result

    def four_times(self, host, name, args=None, changes=True):
        """check, apply, apply again, check again; assert the changed pattern - the first two change
        something (or, with ``changes=False``, nothing: a run against what is already there), the
        last two do not. Returns the results."""
        first = self.module(host, name, args, check=True, diff=True)
        applied = self.module(host, name, args, diff=True)
        again = self.module(host, name, args, diff=True)
        recheck = self.module(host, name, args, check=True, diff=True)
        assert first["changed"] is changes, first
        assert applied["changed"] is changes, applied
        assert again["changed"] is False, again
        assert recheck["changed"] is False, recheck
        return first, applied, again, recheck

    def sh(self, host, cmd, check=True, timeout=120):
        """Run a shell command on a node over SSH (management network)."""
        addr = self.hostvars[host]["ansible_host"]
        argv = ["ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "root@%s" % addr, cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError("%s: %r failed rc=%s\n%s\n%s"
                                 % (host, cmd, proc.returncode, proc.stdout, proc.stderr))
        return proc

    def restart(self, host, timeout=120):
        """Reboot one node container the lab's own way (clean poweroff, boot the same root)."""
        args = self.node_args(host, state="restarted", boot_timeout=timeout)
        self.module("localhost", "kldload.netstack_lab.lab_node", args)

    def node_args(self, host, **extra):
        """lab_node arguments that describe an existing lab node as the lab role made it."""
        args = {"name": host, "rootfs": self._rootfs(host),
                "mgmt_address": "%s/24" % self.hostvars[host]["ansible_host"],
                "lan_address": "%s/24" % self.hostvars[host]["netstack_underlay_ip"],
                "authorized_key": Path(self.key + ".pub").read_text()}
        args.update(extra)
        return args

    @staticmethod
    def _rootfs(host):
        # The lower layer the node was booted from, as recorded in its overlay mount.
        root = str(STATE_DIR / "nodes" / host / "root")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == root:
                opts = line.split(" - ")[1].split()[2]
                return dict(o.split("=", 1) for o in opts.split(",") if "=" in o)["lowerdir"]
        raise AssertionError("node %s has no overlay root mounted" % host)

    def put(self, host, path, text, mode="0644"):
        self.sh(host, "install -D -m %s /dev/stdin %s <<'__NETSTACK_EOF__'\n%s\n__NETSTACK_EOF__"
                % (mode, shlex.quote(path), text))


PROBE = (REPO / "roles" / "dataplane" / "files" / "verify_probe.py").read_text()
PROBE_PATH = "/run/netstack-test/verify_probe.py"


class Streams:
    """Continuous traffic from pod ``a`` (verify_probe.py stream: a long-lived TCP connection, new TCP
    connections, UDP datagrams with sequence numbers, 200 a second) to the stream server in pod ``b``,
    at b's address or at ``target`` (a service VIP whose backend is b:``port``). ``name`` tells
    concurrent streams from one node apart."""

    def __init__(self, lab, a, b, target=None, port=18900, name="stream"):
        self.lab, self.a, self.b, self.target, self.port = lab, a, b, target or b["ip"], port
        self.stop_file, self.out = "/run/netstack-test/%s.stop" % name, "/run/netstack-test/%s.json" % name
        for h in (a["host"], b["host"]):
            lab.put(h, PROBE_PATH, PROBE, mode="0755")
        self.srv = lab.sh(b["host"], "nohup nsenter --net=%s python3 %s stream-server --port %d --seconds 900 "
                          ">/dev/null 2>&1 & echo $!" % (shlex.quote(b["netns"]), PROBE_PATH, port)).stdout.strip()
        time.sleep(1)

    def start(self):
        self.lab.sh(self.a["host"], "rm -f %s %s; nohup nsenter --net=%s python3 %s stream --target %s --port %d "
                    "--rate 200 --stop-file %s --max-seconds 600 >%s 2>&1 &"
                    % (self.stop_file, self.out, shlex.quote(self.a["netns"]), PROBE_PATH, self.target, self.port,
                       self.stop_file, self.out))
        time.sleep(2)

    def stop(self):
        self.lab.sh(self.a["host"], "touch %s; for i in $(seq 30); do sleep 1; test -s %s && break; done"
                    % (self.stop_file, self.out))
        return json.loads(self.lab.sh(self.a["host"], "cat %s" % self.out).stdout)

    def close(self):
        self.lab.sh(self.b["host"], "kill %s" % self.srv, check=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: runs only with NETSTACK_TESTS=all (make test-all), not in CI")


def pytest_collection_modifyitems(config, items):
    if EXTENDED:
        return
    skip = pytest.mark.skip(reason="extended tier: NETSTACK_TESTS=all (make test-all)")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def _lab_reachable():
    if not INVENTORY.exists():
        return False
    proc = subprocess.run([str(VENV_BIN / "ansible"), "all", "-i", str(INVENTORY), "-m", "ansible.builtin.ping",
                           "-o"], cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    return proc.returncode == 0


@pytest.fixture(scope="session")
def lab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if not _lab_reachable():
        run_playbook("lab/playbooks/lab.yml", "-e", "lab_state=up", inventory="localhost,")
    return Lab(INVENTORY)
