/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * BPF host routing (Cilium's "eBPF host-routing"): pod packets forwarded by tc programs instead of
 * the host's IP stack. A packet for a pod of this node goes straight into the pod's network
 * namespace with bpf_redirect_peer() (no forwarding, no netfilter, no second backlog queue); a pod's
 * packet for a pod of another node goes to the device and next hop the FIB names with bpf_redirect().
 * Everything else (the node itself, services by IP, the world - masqueraded by the stack - and any
 * packet the FIB cannot resolve yet) is passed to the stack unchanged (TCX_NEXT).
 *
 * Maps (shared by the host and lxc objects, written by the collection, never by the programs):
 *   kln_endpoints4  pod IPv4 -> {host-side ifindex, pod MAC, host-side MAC}    (CNI ADD/DEL, dataplane apply)
 *   kln_pod_cidr4   LPM: the cluster's pod CIDRs -> {flags}                    (dataplane apply)
 * Layouts (byte offsets, Python struct formats) in fwd_structs.h.
 */
#ifndef KLN_FWD_H
#define KLN_FWD_H

#include "common.h"
#include "fwd_structs.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#ifndef ENDPOINTS4_MAP_SIZE
#define ENDPOINTS4_MAP_SIZE 65536
#endif
#ifndef POD_CIDR4_MAP_SIZE
#define POD_CIDR4_MAP_SIZE 1024
#endif

#define TCX_NEXT (-1)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ep4_key);
	__type(value, struct ep_info);
	__uint(max_entries, ENDPOINTS4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_endpoints4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct cidr4_key);
	__type(value, struct cidr_info);
	__uint(max_entries, POD_CIDR4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_pod_cidr4 SEC(".maps");

#define IP_TTL_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, ttl))
#define IP_CSUM_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, check))

/* The IPv4 header of an Ethernet frame, or NULL (not IPv4, truncated, TTL about to expire: the
 * stack answers those with its ICMP errors). */
static __always_inline struct iphdr *fwd_ipv4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > end)
		return NULL;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl < 5 || ip->ttl <= 1)
		return NULL;
	return ip;
}

/* A forwarded packet: new MACs, TTL - 1 (IP checksum updated). 0 or a negative helper error. */
static __always_inline int fwd_rewrite(struct __sk_buff *skb, const __u8 *dmac, const __u8 *smac, __u8 ttl)
{
	__u8 macs[ETH_ALEN * 2];
	__be16 old = bpf_htons((__u16)ttl << 8), new = bpf_htons((__u16)(ttl - 1) << 8);
	__u8 nttl = ttl - 1;

	__builtin_memcpy(macs, dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, smac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return -1;
	/* TTL and protocol share a 16-bit word of the checksum; only the TTL byte changes. */
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 2) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, IP_TTL_OFF, &nttl, 1, 0) < 0)
		return -1;
	return 0;
}

/* Into the network namespace of the pod with address ``daddr`` on this node, or TCX_NEXT when it is
 * not one of this node's pods. */
static __always_inline int fwd_to_local_pod(struct __sk_buff *skb, __be32 daddr, __u8 ttl)
{
	struct ep4_key key = { .addr = daddr };
	struct ep_info *ep = bpf_map_lookup_elem(&kln_endpoints4, &key);
	struct ep_info e;

	if (!ep || !ep->ifindex)
		return TCX_NEXT;
	e = *ep;
	if (fwd_rewrite(skb, e.mac, e.host_mac, ttl) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(e.ifindex, 0);
}

/* A pod's packet for a pod of another node: out of the device towards the next hop the FIB names
 * (the VXLAN device in tunnel mode, the underlay in native mode). TCX_NEXT when the address is not
 * in a pod CIDR of another node, the traffic is to be encrypted (WireGuard: the stack routes it into the
 * device, and strict mode's filter sees what would leave otherwise), or the FIB has no complete answer yet (no neighbour entry: the
 * stack resolves it, and later packets take this path). */
static __always_inline int fwd_to_remote_pod(struct __sk_buff *skb, struct iphdr *ip)
{
	struct cidr4_key key = { .prefixlen = 32, .addr = ip->daddr };
	struct cidr_info *c = bpf_map_lookup_elem(&kln_pod_cidr4, &key);
	struct bpf_fib_lookup fib = {};
	__u8 ttl = ip->ttl;
	long rc;

	if (!c || (c->flags & (CIDR_F_LOCAL | CIDR_F_ENCRYPT)))
		return TCX_NEXT;
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = 0;		/* no MTU check: the pod MTU is made to fit the path */
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TCX_NEXT;
	if (fwd_rewrite(skb, fib.dmac, fib.smac, ttl) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

#endif /* KLN_FWD_H */
