/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events (like Cilium's monitor events that Hubble reads): every program that decides about traffic calls
 * one of the emit helpers below, which write a struct flow_event (flow_structs.h) into the one shared BPF ring
 * buffer kln_flows; the node agent (netstack agent, plugins/module_utils/flows/) reads it.
 *
 *  - policy verdicts (pol_check, policy.h): FORWARDED / DROPPED with the drop reason, the rule id, both
 *    identities and the direction; aggregated on the policy's own connection table kln_ct4 (the TCP flags seen
 *    per direction), like Cilium's monitorAggregation: the first packet of each direction and a packet with a TCP
 *    flag not seen before (medium, the default), or every packet (none), or the first packet and new SYN/FIN/RST
 *    (maximum). Drops always report, rate-limited per drop reason (kln_flow_rl, per CPU).
 *  - socket LB translations (sock_lb.c, at connect()/sendmsg()): TRANSLATED with the service address and the
 *    chosen backend, the socket's network namespace cookie (which pod); a service without backends: DROPPED.
 *  - the edge (nodeport.h): TRANSLATED for each new flow from the LAN, its drops.
 *
 * Nothing is emitted until the node apply writes kln_flow_config with FLOW_CFG_ENABLED: with events off the cost
 * is one array lookup per decision. Events the ring buffer has no room for are counted (kln_flow_stat, per CPU:
 * emitted, lost, rate-limited), never waited for. Including this header adds its four shared maps to an object.
 */
#ifndef KLN_FLOW_H
#define KLN_FLOW_H

#include "common.h"
#include "flow_structs.h"
#include "policy_structs.h"

#ifndef FLOWS_RINGBUF_SIZE
#define FLOWS_RINGBUF_SIZE (2 << 20)	/* 2 MiB: 32768 events */
#endif

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FLOWS_RINGBUF_SIZE);
	KLN_PINNING
} kln_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flow_config);
	__uint(max_entries, 1);
	KLN_PINNING
} kln_flow_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flow_rl);
	__uint(max_entries, 256);
	KLN_PINNING
} kln_flow_rl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, FLOW_STAT_MAX);
	KLN_PINNING
} kln_flow_stat SEC(".maps");

#define FLOW_TCP_SYN_FIN_RST 0x07

/* The configuration when events are on, else NULL. */
static __always_inline const struct flow_config *flow_config(void)
{
	__u32 zero = 0;
	struct flow_config *c = bpf_map_lookup_elem(&kln_flow_config, &zero);

	return (c && (c->flags & FLOW_CFG_ENABLED)) ? c : NULL;
}

static __always_inline void flow_count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&kln_flow_stat, &which);

	if (n)
		*n += 1;
}

/* Whether a packet of a connection the policy's table knows is reported: read BEFORE the packet updates the entry.
 * ``e``: the entry of the packet's direction (reply 0) or of the other direction (reply 1: the packet is a reply);
 * NULL for a packet that opens a connection (always reported). */
static __always_inline int flow_ct_report(const struct flow_config *c, const struct ct_entry *e, int reply,
					  __u8 tcp_flags)
{
	__u8 seen, fresh;

	if (!c)
		return 0;
	if (!e || c->aggregation == FLOW_AGG_NONE)
		return 1;
	if (reply && !(e->state & CT_S_REPLIED))
		return 1;				/* the first packet of the reply direction */
	seen = reply ? e->rx_flags : e->tx_flags;
	fresh = tcp_flags & ~seen;
	if (c->aggregation == FLOW_AGG_MAXIMUM)
		fresh &= FLOW_TCP_SYN_FIN_RST;
	return fresh != 0;
}

/* Whether a drop event of ``reason`` is within the configured rate (per reason, per CPU, per second). */
static __always_inline int flow_drop_allowed(const struct flow_config *c, __u32 reason)
{
	struct flow_rl *rl;
	__u32 key = reason & 0xff, now;

	if (!c->drop_rate)
		return 1;
	rl = bpf_map_lookup_elem(&kln_flow_rl, &key);
	if (!rl)
		return 1;
	now = (__u32)(bpf_ktime_get_ns() >> 30);
	if (rl->second != now) {
		rl->second = now;
		rl->count = 0;
	}
	if (rl->count >= c->drop_rate) {
		flow_count(FLOW_STAT_RATE_LIMITED);
		return 0;
	}
	rl->count += 1;
	return 1;
}

static __always_inline void flow_emit(struct flow_event *ev)
{
	ev->time = bpf_ktime_get_boot_ns();
	ev->version = FLOW_EVENT_VERSION;
	if (bpf_ringbuf_output(&kln_flows, ev, sizeof(*ev), 0))
		flow_count(FLOW_STAT_LOST);
	else
		flow_count(FLOW_STAT_EMITTED);
}

/* A packet's verdict (policy, overlay, edge): reported when ``report`` says so (aggregation, flow_ct_report) or it
 * is a drop within the rate. ``dir`` is the policy's CT_INGRESS / CT_EGRESS, or -1 for none. */
static __always_inline void flow_packet(const struct flow_config *c, int report, __u8 source, __u32 ifindex, int dir,
					__u32 reason, __u32 rule, __u8 flags, __be32 saddr, __be32 daddr, __be16 sport,
					__be16 dport, __u8 protocol, __u8 tcp_flags, __u32 len, __u32 src_id, __u32 dst_id)
{
	struct flow_event ev = {};

	if (!c)
		return;
	if (reason ? !flow_drop_allowed(c, reason) : !report)
		return;
	ev.source = source;
	ev.verdict = reason ? FLOW_V_DROPPED : FLOW_V_FORWARDED;
	ev.reason = (__u8)reason;
	ev.direction = dir == CT_INGRESS ? FLOW_DIR_INGRESS : dir == CT_EGRESS ? FLOW_DIR_EGRESS : 0;
	ev.protocol = protocol;
	ev.tcp_flags = tcp_flags;
	ev.flags = flags;
	ev.saddr = saddr;
	ev.daddr = daddr;
	ev.sport = sport;
	ev.dport = dport;
	ev.src_identity = src_id;
	ev.dst_identity = dst_id;
	ev.ifindex = ifindex;
	ev.rule = rule;
	ev.len = len;
	flow_emit(&ev);
}

/* A translation (or, with ``reason``, a drop) of a service: the packet or connection from saddr:sport (0 for a
 * socket not bound yet) to the service orig_addr:orig_port goes to the backend daddr:dport. */
static __always_inline void flow_xlate(const struct flow_config *c, __u8 source, __u32 ifindex, __u32 reason,
				       __be32 saddr, __be16 sport, __be32 orig_addr, __be16 orig_port, __be32 daddr,
				       __be16 dport, __u8 protocol, __u8 tcp_flags, __u32 len, __u16 service_id, __u64 cookie)
{
	struct flow_event ev = {};

	if (!c || (reason && !flow_drop_allowed(c, reason)))
		return;
	ev.source = source;
	ev.verdict = reason ? FLOW_V_DROPPED : FLOW_V_TRANSLATED;
	ev.reason = (__u8)reason;
	ev.direction = source == FLOW_SRC_SOCK ? FLOW_DIR_EGRESS : FLOW_DIR_INGRESS;
	ev.protocol = protocol;
	ev.tcp_flags = tcp_flags;
	ev.saddr = saddr;
	ev.sport = sport;
	ev.daddr = daddr;
	ev.dport = dport;
	ev.orig_addr = orig_addr;
	ev.orig_port = orig_port;
	ev.service_id = service_id;
	ev.ifindex = ifindex;
	ev.len = len;
	ev.cookie = cookie;
	flow_emit(&ev);
}

/* The socket LB's translation at connect()/sendmsg() of an IPv4 (or v4-mapped) destination. */
static __always_inline void flow_sock(struct bpf_sock_addr *ctx, __u32 reason, __be32 vip, __be16 vport, __be32 backend,
				      __be16 port, __u16 service_id)
{
	const struct flow_config *c = flow_config();

	if (!c)
		return;
	flow_xlate(c, FLOW_SRC_SOCK, 0, reason, 0, 0, vip, vport, backend, port, (__u8)ctx->protocol, 0, 0, service_id,
		   bpf_get_netns_cookie(ctx));
}

#endif /* KLN_FLOW_H */
