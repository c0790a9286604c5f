/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Identity-based policy, stateful (like Cilium's bpf_lxc.c policy path and lib/conntrack.h, much smaller).
 *
 * Every pod is an endpoint (kln_policy_ep4: its address -> host-side ifindex, security identity,
 * enforcement flags, generation). A peer's identity comes from the tunnel (the VNI, through skb->mark:
 * overlay.c), else from the ipcache (kln_ipcache4: every pod and node address of the cluster), else from
 * the CIDR identities the policies name (kln_cidr_ident4), else it is world.
 *
 * A packet is judged for the endpoint it leaves (egress) and for the endpoint it enters (ingress), each
 * with its own entry in the connection table kln_ct4 ({5-tuple, direction} -> state). A reply of a
 * connection the endpoint's table knows passes, so does an ICMP error about one (related); every other
 * packet - the first of a connection and every later one in the same direction - is looked up in the
 * endpoint's policy (kln_policy4, an LPM trie keyed {endpoint, peer identity, direction + generation,
 * protocol, port prefix}): three lookups, whatever the number of rules - the peer's identity, the peer's
 * CIDR identity by address (NetworkPolicy ipBlock, which matches pods too), any peer. A deny entry wins;
 * else an allow entry lets it through; else it passes only when the direction is not enforced for the
 * endpoint. So a policy change takes effect on established connections too (a connection the new rules
 * no longer allow stops at its next packet), and a reply never opens a connection the policy denies.
 * Traffic from the node itself (identity host) into its own pods always passes, like Cilium's
 * allow-localhost. Each verdict is counted per endpoint, reason and direction (kln_policy_stat).
 *
 * The writer (plugins/module_utils/policy/maps.py) swaps an endpoint's rules atomically: it writes the
 * new rules under the other generation, flips POL_EP_GEN in one update of the endpoint, then deletes the
 * old generation. A packet reads the endpoint once, so it sees all of the old rules or all of the new.
 */
#ifndef KLN_POLICY_H
#define KLN_POLICY_H

#include "common.h"
#include "policy_structs.h"
#include "flow.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#ifndef TCX_NEXT
#define TCX_NEXT (-1)
#endif

#ifndef POLICY_EP4_MAP_SIZE
#define POLICY_EP4_MAP_SIZE 65536
#endif
#ifndef POLICY4_MAP_SIZE
#define POLICY4_MAP_SIZE 262144
#endif
#ifndef IPCACHE4_MAP_SIZE
#define IPCACHE4_MAP_SIZE 65536
#endif
#ifndef CIDR_IDENT4_MAP_SIZE
#define CIDR_IDENT4_MAP_SIZE 16384
#endif
#ifndef CT4_MAP_SIZE
#define CT4_MAP_SIZE 131072
#endif
#ifndef POLICY_STAT_MAP_SIZE
#define POLICY_STAT_MAP_SIZE 65536
#endif
#ifndef TUNNEL4_MAP_SIZE
#define TUNNEL4_MAP_SIZE 1024
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct pol_ep_key);
	__type(value, struct pol_ep);
	__uint(max_entries, POLICY_EP4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_policy_ep4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct pol_key);
	__type(value, struct pol_entry);
	__uint(max_entries, POLICY4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_policy4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipc_key);
	__type(value, struct ipc_info);
	__uint(max_entries, IPCACHE4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_ipcache4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipc_key);
	__type(value, struct ipc_info);
	__uint(max_entries, CIDR_IDENT4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_cidr_ident4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, CT4_MAP_SIZE);
	KLN_PINNING
} kln_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct pol_stat_key);
	__type(value, struct pol_stat);
	__uint(max_entries, POLICY_STAT_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_policy_stat SEC(".maps");

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2
#define CT_RELATED 3

#define CT_LIFE_SYN 60		/* seconds: a TCP connection not answered yet, and every non-TCP flow */
#define CT_LIFE_TCP 21600	/* an answered TCP connection */
#define CT_LIFE_CLOSE 10	/* after FIN or RST */

/* What the policy needs of a packet. For an ICMP error, the i* fields are the packet it is about. */
struct pol_pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_err;
	__u8 frag;		/* a fragment after the first: no ports to judge by */
	__u32 len;
	__be32 isaddr;
	__be32 idaddr;
	__be16 isport;
	__be16 idport;
	__u8 iprotocol;
	__u8 source;		/* FLOW_SRC_* of the program judging it (flow events) */
	__u8 pad[2];
	__u32 ifindex;		/* where it was seen (flow events) */
};

/* Ports of a transport header at ``off`` (or the echo id of an ICMP echo), with the TCP flags when
``tcp_flags`` is given (not for the 8 bytes an ICMP error quotes): 0, or -1 when truncated. */
static __always_inline int pol_ports(struct __sk_buff *skb, __u32 off, __u8 protocol, __be16 *sport,
				     __be16 *dport, __u8 *tcp_flags, __u8 *icmp_type)
{
	__u8 b[14];

	switch (protocol) {
	case IPPROTO_TCP:
		if (tcp_flags) {
			if (pkt_load(skb, off, b, 14) < 0)
				return -1;
			*tcp_flags = b[13];
		} else if (pkt_load(skb, off, b, 4) < 0) {
			return -1;
		}
		break;
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (pkt_load(skb, off, b, 4) < 0)
			return -1;
		break;
	case IPPROTO_ICMP:
		if (pkt_load(skb, off, b, 8) < 0)
			return -1;
		*icmp_type = b[0];
		if (b[0] == 8) {		/* echo request: id as the source port */
			__builtin_memcpy(sport, &b[4], 2);
			*dport = 0;
		} else if (b[0] == 0) {		/* echo reply: id as the destination port */
			*sport = 0;
			__builtin_memcpy(dport, &b[4], 2);
		}
		return 0;
	default:
		return 0;
	}
	__builtin_memcpy(sport, &b[0], 2);
	__builtin_memcpy(dport, &b[2], 2);
	return 0;
}

/* 0 parsed, 1 not IPv4 (not ours to judge), or -DROP_INVALID. */
static __always_inline int pol_parse(struct __sk_buff *skb, struct pol_pkt *p)
{
	struct iphdr ip, in;
	__u32 off = ETH_HLEN;
	__u8 type = 0xff, unused_type = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 1;
	if (pkt_load(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
		return -DROP_INVALID;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->protocol = ip.protocol;
	p->len = skb->len;
	p->ifindex = skb->ifindex;
	if (ip.frag_off & bpf_htons(0x1fff)) {
		p->frag = 1;
		return 0;
	}
	off += ip.ihl * 4;
	if (pol_ports(skb, off, ip.protocol, &p->sport, &p->dport, &p->tcp_flags, &type) < 0)
		return -DROP_INVALID;
	if (ip.protocol != IPPROTO_ICMP || (type != 3 && type != 11 && type != 12))
		return 0;
	/* destination unreachable, time exceeded, parameter problem: about the packet inside */
	off += 8;
	if (pkt_load(skb, off, &in, sizeof(in)) < 0 || in.version != 4 || in.ihl < 5)
		return -DROP_INVALID;
	p->icmp_err = 1;
	p->isaddr = in.saddr;
	p->idaddr = in.daddr;
	p->iprotocol = in.protocol;
	if (pol_ports(skb, off + in.ihl * 4, in.protocol, &p->isport, &p->idport, NULL, &unused_type) < 0)
		return -DROP_INVALID;
	return 0;
}

/* ~seconds of CLOCK_MONOTONIC, from the coarse clock (a tick behind at most: no clock source read per packet). */
static __always_inline __u32 ct_now(void)
{
	return (__u32)(bpf_ktime_get_coarse_ns() >> 30);
}

static __always_inline struct ct_entry *ct_get(__be32 s, __be32 d, __be16 sp, __be16 dp, __u8 proto, __u32 dir,
					       __u32 now)
{
	struct ct_key k = { .saddr = s, .daddr = d, .sport = sp, .dport = dp, .protocol = proto, .dir = (__u8)dir };
	struct ct_entry *e = bpf_map_lookup_elem(&kln_ct4, &k);

	if (e && e->expires >= now)
		return e;
	return NULL;
}

/* How the endpoint's table knows the packet: CT_NEW, CT_ESTABLISHED (``*e`` its entry), CT_REPLY (``*e``
 * the entry of the other direction) or CT_RELATED (an ICMP error about a known connection). */
static __always_inline int ct_lookup(const struct pol_pkt *p, __u32 dir, __u32 now, struct ct_entry **e)
{
	if (p->icmp_err) {
		if (ct_get(p->isaddr, p->idaddr, p->isport, p->idport, p->iprotocol, !dir, now) ||
		    ct_get(p->idaddr, p->isaddr, p->idport, p->isport, p->iprotocol, dir, now))
			return CT_RELATED;
		return CT_NEW;
	}
	*e = ct_get(p->saddr, p->daddr, p->sport, p->dport, p->protocol, dir, now);
	if (*e)
		return CT_ESTABLISHED;
	*e = ct_get(p->daddr, p->saddr, p->dport, p->sport, p->protocol, !dir, now);
	if (*e)
		return CT_REPLY;
	return CT_NEW;
}

static __always_inline __u32 ct_life(__u8 protocol, __u8 state)
{
	if (protocol != IPPROTO_TCP)
		return CT_LIFE_SYN;
	if (state & CT_S_CLOSING)
		return CT_LIFE_CLOSE;
	return (state & CT_S_REPLIED) ? CT_LIFE_TCP : CT_LIFE_SYN;
}

static __always_inline void ct_refresh(struct ct_entry *e, const struct pol_pkt *p, int reply, __u32 now)
{
	__u8 state = e->state;
	__u32 expires;

	if (reply) {
		state |= CT_S_REPLIED;
		if ((e->rx_flags | p->tcp_flags) != e->rx_flags)
			e->rx_flags |= p->tcp_flags;
	} else if ((e->tx_flags | p->tcp_flags) != e->tx_flags) {
		e->tx_flags |= p->tcp_flags;
	}
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		state |= CT_S_CLOSING;
	if (state != e->state)
		e->state = state;
	expires = now + ct_life(p->protocol, state);
	if (e->expires != expires)
		e->expires = expires;
}

static __always_inline void ct_create(const struct pol_pkt *p, __u32 dir, __u32 rule, __u32 now)
{
	struct ct_key k = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
			    .protocol = p->protocol, .dir = (__u8)dir };
	struct ct_entry e = { .tx_flags = p->tcp_flags, .rule = rule };

	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		e.state = CT_S_CLOSING;
	e.expires = now + ct_life(p->protocol, e.state);
	bpf_map_update_elem(&kln_ct4, &k, &e, BPF_ANY);
}

/* The identity of a CIDR the policies name that holds ``addr`` (the most specific), else world. */
static __always_inline __u32 cidr_identity(__be32 addr)
{
	struct ipc_key k = { .prefixlen = 32, .addr = addr };
	struct ipc_info *i = bpf_map_lookup_elem(&kln_cidr_ident4, &k);

	return i ? i->identity : ID_WORLD;
}

/* The identity of the pod or node at ``addr``, else ``fallback`` (its CIDR identity). */
static __always_inline __u32 ipcache_identity(__be32 addr, __u32 fallback)
{
	struct ipc_key k = { .prefixlen = 32, .addr = addr };
	struct ipc_info *i = bpf_map_lookup_elem(&kln_ipcache4, &k);

	return i ? i->identity : fallback;
}

/* The peer of an endpoint's packet: its address and its identities, looked up only when something needs them (a
 * verdict, a flow event) - a packet of a known connection to an endpoint whose direction is not enforced needs
 * none. ``id`` may be given (the tunnel's, a local pod's); else it is the ipcache's, else the CIDR identity. */
struct pol_peer {
	__be32 addr;
	__u32 id;		/* 0: not known yet */
	__u32 cidr;
	__u32 resolved;
};

static __always_inline void pol_peer_resolve(struct pol_peer *x)
{
	if (x->resolved)
		return;
	x->cidr = cidr_identity(x->addr);
	if (!x->id)
		x->id = ipcache_identity(x->addr, x->cidr);
	x->resolved = 1;
}

static __always_inline struct pol_entry *pol_find(__be32 ep, __u32 identity, __u8 dirgen, const struct pol_pkt *p)
{
	struct pol_key k = { .prefixlen = POL_PREFIX_PORT, .ep = ep, .identity = identity, .dirgen = dirgen,
			     .protocol = p->protocol };

	if (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP || p->protocol == IPPROTO_SCTP)
		k.dport = p->dport;
	return bpf_map_lookup_elem(&kln_policy4, &k);
}

/* The endpoint's rules on the packet: 0 (allowed; ``*rule`` the entry's rule) or the drop reason. */
static __always_inline int pol_verdict(const struct pol_ep *ep, __be32 ep_addr, __u32 dir, __u32 peer_id,
				       __u32 addr_id, const struct pol_pkt *p, __u32 *rule)
{
	__u8 dirgen = (dir == CT_EGRESS ? 1 : 0) | ((ep->flags & POL_EP_GEN) ? 2 : 0);
	struct pol_entry *e;
	__u32 ids[3] = { peer_id, addr_id | ID_BY_ADDRESS, ID_UNKNOWN };
	__u32 found = 0, deny = 0, first = 0, deny_rule = 0;
	int i;

#pragma unroll
	for (i = 0; i < 3; i++) {
		e = pol_find(ep_addr, ids[i], dirgen, p);
		if (!e)
			continue;
		if ((e->flags & POL_DENY) && !deny) {
			deny = 1;
			deny_rule = e->rule;
		}
		if (!found)
			first = e->rule;
		found = 1;
	}
	if (deny) {
		*rule = deny_rule;		/* which rule denied it (flow events); the verdict is the deny */
		return DROP_POLICY_DENY;
	}
	if (found) {
		*rule = first;
		return 0;
	}
	return DROP_POLICY;
}

static __always_inline void pol_count(__be32 ep, __u32 reason, __u32 dir, __u32 len)
{
	struct pol_stat_key k = { .ep = ep, .reason = (__u8)reason, .dir = (__u8)dir };
	struct pol_stat *s = bpf_map_lookup_elem(&kln_policy_stat, &k);
	struct pol_stat n = { .packets = 1, .bytes = len };

	if (s) {
		s->packets += 1;
		s->bytes += len;
	} else {
		bpf_map_update_elem(&kln_policy_stat, &k, &n, BPF_NOEXIST);
	}
}

/* The verdict of the endpoint ``ep`` (at ``ep_addr``) on ``p`` in direction ``dir`` (CT_EGRESS: the
 * endpoint sends it, CT_INGRESS: it receives it) from or to ``peer``: 0 (let through) or the drop reason.
 * Counted either way. */
static __always_inline int pol_check(const struct pol_pkt *p, const struct pol_ep *ep, __be32 ep_addr, __u32 dir,
				     struct pol_peer *peer)
{
	__u32 now = ct_now(), rule = 0;
	__u32 enforced = ep->flags & (dir == CT_EGRESS ? POL_EP_EGRESS : POL_EP_INGRESS);
	struct ct_entry *e = NULL;
	int ct = ct_lookup(p, dir, now, &e);
	int rc = 0;
	const struct flow_config *fc = flow_config();
	int report = flow_ct_report(fc, (ct == CT_ESTABLISHED || ct == CT_REPLY) ? e : NULL, ct == CT_REPLY, p->tcp_flags);

	if (ct == CT_ESTABLISHED || ct == CT_REPLY)
		rule = e->rule;
	if (ct == CT_REPLY) {
		ct_refresh(e, p, 1, now);
		goto out;
	}
	if (ct == CT_RELATED)
		goto out;
	if (enforced) {
		pol_peer_resolve(peer);
		if (!(dir == CT_INGRESS && peer->id == ID_HOST)) {
			rc = pol_verdict(ep, ep_addr, dir, peer->id, peer->cidr, p, &rule);
			if (rc)
				goto out;
		}
	}
	if (ct == CT_ESTABLISHED)
		ct_refresh(e, p, 0, now);
	else if (!p->icmp_err)
		ct_create(p, dir, rule, now);
out:
	pol_count(ep_addr, rc, dir, p->len);
	if (fc && (report || rc)) {
		pol_peer_resolve(peer);
		flow_packet(fc, report, p->source, p->ifindex, dir, rc, rule,
			    FLOW_F_POLICY | (ct == CT_REPLY ? FLOW_F_REPLY : 0) | (enforced ? FLOW_F_ENFORCED : 0),
			    p->saddr, p->daddr, p->sport, p->dport, p->protocol, p->tcp_flags, p->len,
			    dir == CT_EGRESS ? ep->identity : peer->id, dir == CT_EGRESS ? peer->id : ep->identity);
	}
	return rc;
}

static __always_inline struct pol_ep *pol_endpoint(__be32 addr)
{
	struct pol_ep_key k = { .addr = addr };

	return bpf_map_lookup_elem(&kln_policy_ep4, &k);
}

/* The ingress verdict of the pod at ``p->daddr`` (a pod of this node: ``dep``) on a packet from a peer of
 * identity ``src_id`` (0: the ipcache's); on 0 the packet is marked so that the pod's own tc egress program does
 * not judge it again when the stack delivers it (legacy host routing). */
static __always_inline int pol_deliver(struct __sk_buff *skb, const struct pol_pkt *p, const struct pol_ep *dep,
				       __u32 src_id)
{
	struct pol_ep d = *dep;
	struct pol_peer src = { .addr = p->saddr, .id = src_id };
	int rc = pol_check(p, &d, p->daddr, CT_INGRESS, &src);

	if (!rc)
		skb->mark = MARK_MAGIC_ALLOWED;
	return rc;
}

#endif /* KLN_POLICY_H */
