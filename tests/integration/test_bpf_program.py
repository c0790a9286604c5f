"""bpf_program with device hooks on a lab node: XDP and tcx links on a veth, four times, upgrade, absent."""
import json
import subprocess
import tempfile
from pathlib import Path

import pytest

NAME = "netdev_test"
PIN = "/sys/fs/bpf/kldload-netstack-netdev"   # not the dataplane's pin root (node_dataplane owns that one)
DEV = "kln-test0"

SRC = r"""
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __type(key, __u32);
    __type(value, __u64);
    __uint(max_entries, 4);
} counters SEC(".maps");

static __always_inline void count(__u32 i)
{
    __u64 *v = bpf_map_lookup_elem(&counters, &i);

    if (v)
        __sync_fetch_and_add(v, VARIANT);
}

SEC("xdp") int xdp_count(struct xdp_md *ctx) { count(0); return XDP_PASS; }
SEC("tc") int tc_in(struct __sk_buff *skb) { count(1); return TC_ACT_OK; }
SEC("tc") int tc_out(struct __sk_buff *skb) { count(2); return TC_ACT_OK; }
char LICENSE[] SEC("license") = "GPL";
"""


def _build(tmp, variant):
    src = Path(tmp) / "netdev.c"
    src.write_text(SRC)
    obj = Path(tmp) / ("netdev%d.o" % variant)
    multiarch = subprocess.run(["clang", "-print-multiarch"], capture_output=True, text=True, check=False).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-DVARIANT=%d" % variant,
                    "-I/usr/include/%s" % (multiarch or "x86_64-linux-gnu"), "-c", str(src), "-o", str(obj)], check=True)
    return obj


def _scp(lab, host, src, dst):
    addr = lab.hostvars[host]["ansible_host"]
    subprocess.run(["scp", "-q", "-i", lab.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR", str(src), "root@%s:%s" % (addr, dst)], check=True)


@pytest.fixture(scope="module")
def node(lab):
    host = lab.hosts("kube_workers")[-1]
    lab.module(host, "kldload.netstack.bpffs", {})
    with tempfile.TemporaryDirectory() as tmp:
        _scp(lab, host, _build(tmp, 1), "/run/netdev1.o")
        _scp(lab, host, _build(tmp, 2), "/run/netdev2.o")
    # a veth pair inside the node: traffic over it runs the programs (no lab traffic leaves the node)
    lab.sh(host, "ip link del %s 2>/dev/null; ip link add %s type veth peer name %s-p && "
                 "ip addr add 169.254.77.1/30 dev %s && ip link set %s up && ip netns add kln-test-peer && "
                 "ip link set %s-p netns kln-test-peer && ip -n kln-test-peer addr add 169.254.77.2/30 dev %s-p && "
                 "ip -n kln-test-peer link set %s-p up" % ((DEV,) * 8))
    yield host
    lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"})
    lab.sh(host, "ip link del %s; ip netns del kln-test-peer; rm -f /run/netdev1.o /run/netdev2.o" % DEV, check=False)


def _args(obj="/run/netdev1.o", **extra):
    args = {"name": NAME, "pin_path": PIN, "object": obj, "attach": [
        {"program": "xdp_count", "type": "xdp", "device": DEV, "xdp_mode": "generic"},
        {"program": "tc_in", "type": "tc_ingress", "device": DEV},
        {"program": "tc_out", "type": "tcx_egress", "device": DEV}]}
    args.update(extra)
    return args


def _counters(lab, host):
    out = json.loads(lab.sh(host, "bpftool -j map dump pinned %s/%s/maps/counters" % (PIN, NAME)).stdout)
    return [int(e["value"]) if not isinstance(e["value"], list) else
            int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little") for e in out]


def test_xdp_and_tcx_four_times_and_traffic(lab, node):
    host = node
    lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"})
    first, applied, again, recheck = lab.four_times(host, "kldload.netstack.bpf_program", _args())
    assert sorted(a["type"] for a in applied["attachments"]) == ["tcx_egress", "tcx_ingress", "xdp"]
    assert all(a["device"] == DEV for a in applied["attachments"])
    net = json.loads(lab.sh(host, "bpftool -j net show dev %s" % DEV).stdout)[0]
    ids = dict((a["type"], a["prog_id"]) for a in applied["attachments"])
    assert [x["id"] for x in net["xdp"]] == [ids["xdp"]] and net["xdp"][0]["mode"] == "generic"
    assert sorted((t["kind"], t["name"]) for t in net["tc"]) == [("tcx/egress", "tc_out"), ("tcx/ingress", "tc_in")]
    lab.sh(host, "ping -c 3 -i 0.2 -W 1 169.254.77.2")
    xdp, tc_in, tc_out = _counters(lab, host)[:3]
    assert xdp >= 3 and tc_in >= 3 and tc_out >= 3, (xdp, tc_in, tc_out)


def test_upgrade_keeps_links_and_map_contents(lab, node):
    host = node
    before = lab.module(host, "kldload.netstack.bpf_program", _args())
    lab.sh(host, "ping -c 2 -i 0.2 -W 1 169.254.77.2")
    counted = _counters(lab, host)
    res = lab.module(host, "kldload.netstack.bpf_program", _args(obj="/run/netdev2.o"), diff=True)
    assert sum(a.startswith("%s: replace program of" % NAME) for a in res["actions"]) == 3, res["actions"]
    assert not any(": detach" in a or ": attach " in a for a in res["actions"]), res["actions"]
    old = dict((a["type"], a["link_id"]) for a in before["attachments"])
    assert all(old[a["type"]] == a["link_id"] for a in res["attachments"])
    kept = _counters(lab, host)[:3]
    assert all(k >= c > 0 for k, c in zip(kept, counted[:3])), (kept, counted)   # the map was kept, not recreated
    lab.sh(host, "ping -c 1 -W 1 169.254.77.2")
    after = _counters(lab, host)
    assert after[0] - counted[0] >= 2                                 # variant 2 adds 2 per packet


def test_absent_detaches_from_the_device(lab, node):
    host = node
    lab.module(host, "kldload.netstack.bpf_program", _args())
    lab.module(host, "kldload.netstack.bpf_program", {"name": NAME, "pin_path": PIN, "state": "absent"})
    net = json.loads(lab.sh(host, "bpftool -j net show dev %s" % DEV).stdout)[0]
    assert net["xdp"] == [] and net["tc"] == []
    assert lab.sh(host, "test -e %s" % PIN, check=False).returncode != 0
