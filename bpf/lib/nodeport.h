/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing at the node's edge (Cilium's nodeport_lb4): packets from the LAN to a
 * LoadBalancer IP or to a NodePort on the node's address, balanced to the backends of the SAME service
 * table the socket LB reads (lb.h, lb_maps.h: kln_lb4_svc / kln_lb4_backend, Maglev, weights,
 * affinity); only services whose master carries LB_SVC_F_EXTERNAL are answered here.
 *
 *  - externalTrafficPolicy Cluster: DNAT to the backend and SNAT to the node's address (a source port
 *    from kln_ns_config's SNAT range), so the reply comes back to this node wherever the backend is;
 *  - externalTrafficPolicy Local (LB_SVC_F_LOCAL; the writer lists only this node's backends): DNAT only,
 *    the backend sees the client's own address.
 *
 * A connection-tracking LRU (kln_ns_ct4) pins each flow to its backend and holds the reverse entry: the
 * reply is translated back (source = the address and port the client used) where it enters the node -
 * from a remote backend on the underlay (this program, ingress), from a local pod on the pod's host
 * interface (kln_nodeport_from_pod) - and sent out by the FIB's next hop. A service without backends is
 * answered with ICMP port unreachable. IPv4 only; fragments and IP options pass to the stack.
 */
#ifndef KLN_NODEPORT_H
#define KLN_NODEPORT_H

#define KLN_LB_NO_SOCK_REVNAT
#include "common.h"
#include "lb.h"
#include "nodeport_structs.h"
#include "flow.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>

#ifndef NS_CT4_MAP_SIZE
#define NS_CT4_MAP_SIZE 131072
#endif
#ifndef TCX_NEXT
#define TCX_NEXT (-1)
#endif

/* ICMP (linux/icmp.h pulls in libc headers that do not build for -target bpf) */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
struct ns_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused;
};

#define NS_SNAT_TRIES 16
#define NS_CT_STALE_NS (300ULL * NSEC_PER_SEC)   /* a reverse entry idle this long frees its SNAT port */
#define NS_CT_CLOSED_NS (1ULL * NSEC_PER_SEC)    /* ... or this long after its TCP connection closed */
#define NS_AFFINITY_TAG (1ULL << 63)             /* kln_lb_affinity keys of external clients: tag | IPv4 */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ns_config);
	__uint(max_entries, 1);
	KLN_PINNING
} kln_ns_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ns_ct4_key);
	__type(value, struct ns_ct4);
	__uint(max_entries, NS_CT4_MAP_SIZE);
	KLN_PINNING
} kln_ns_ct4 SEC(".maps");

#define NS_IP_OFF ETH_HLEN
#define NS_L4_OFF (ETH_HLEN + sizeof(struct iphdr))
#define NS_IP_CSUM (NS_IP_OFF + __builtin_offsetof(struct iphdr, check))
#define NS_IP_TTL (NS_IP_OFF + __builtin_offsetof(struct iphdr, ttl))
#define NS_IP_SADDR (NS_IP_OFF + __builtin_offsetof(struct iphdr, saddr))
#define NS_IP_DADDR (NS_IP_OFF + __builtin_offsetof(struct iphdr, daddr))
#define NS_TCP_CSUM (NS_L4_OFF + __builtin_offsetof(struct tcphdr, check))
#define NS_UDP_CSUM (NS_L4_OFF + __builtin_offsetof(struct udphdr, check))

/* The packet's 5-tuple (ct key), or -1: not IPv4 TCP/UDP without options, a fragment, truncated. */
static __always_inline int ns_parse(struct __sk_buff *skb, struct ns_ct4_key *k, __u8 *ttl)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	__be16 *ports = data + NS_L4_OFF;

	if ((void *)(ports + 2) > end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl != 5)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff))           /* MF or an offset: fragments go to the stack */
		return -1;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->sport = ports[0];
	k->dport = ports[1];
	k->proto = ip->protocol;
	*ttl = ip->ttl;
	return 0;
}

/* Rewrite source and/or destination (address and port), IP and L4 checksums updated. */
static __always_inline int ns_rewrite(struct __sk_buff *skb, const struct ns_ct4_key *k, __be32 saddr, __be16 sport,
				      __be32 daddr, __be16 dport)
{
	__u32 csum_off = k->proto == IPPROTO_TCP ? NS_TCP_CSUM : NS_UDP_CSUM;
	__u64 l4f = k->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (saddr != k->saddr) {
		if (bpf_l4_csum_replace(skb, csum_off, k->saddr, saddr, l4f | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, NS_IP_CSUM, k->saddr, saddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, NS_IP_SADDR, &saddr, 4, 0) < 0)
			return -1;
	}
	if (daddr != k->daddr) {
		if (bpf_l4_csum_replace(skb, csum_off, k->daddr, daddr, l4f | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, NS_IP_CSUM, k->daddr, daddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, NS_IP_DADDR, &daddr, 4, 0) < 0)
			return -1;
	}
	if (sport != k->sport) {
		if (bpf_l4_csum_replace(skb, csum_off, k->sport, sport, l4f | 2) < 0 ||
		    bpf_skb_store_bytes(skb, NS_L4_OFF, &sport, 2, 0) < 0)
			return -1;
	}
	if (dport != k->dport) {
		if (bpf_l4_csum_replace(skb, csum_off, k->dport, dport, l4f | 2) < 0 ||
		    bpf_skb_store_bytes(skb, NS_L4_OFF + 2, &dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* Out of the device and to the next hop the FIB names for the (rewritten) packet: its MACs, TTL - 1;
 * without a neighbour entry yet, bpf_redirect_neigh() resolves it. */
static __always_inline int ns_forward(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto, __u8 ttl)
{
	struct bpf_fib_lookup fib = {};
	__be16 old = bpf_htons((__u16)ttl << 8), new = bpf_htons((__u16)(ttl - 1) << 8);
	__u8 nttl = ttl - 1;
	long rc;

	if (ttl <= 1)
		return TC_ACT_SHOT;
	fib.family = AF_INET;
	fib.l4_protocol = proto;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_SHOT;
	if (bpf_l3_csum_replace(skb, NS_IP_CSUM, old, new, 2) < 0 ||
	    bpf_skb_store_bytes(skb, NS_IP_TTL, &nttl, 1, 0) < 0)
		return TC_ACT_SHOT;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {};

		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib.ipv4_dst;
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

/* TCP flags of the packet (0 for UDP) */
static __always_inline __u8 ns_tcp_flags(struct __sk_buff *skb, const struct ns_ct4_key *k)
{
	__u8 fl = 0;

	if (k->proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, NS_L4_OFF + 13, &fl, 1) < 0)
		return 0;
	return fl;
}

#define NS_TCP_FIN 0x01
#define NS_TCP_SYN 0x02
#define NS_TCP_RST 0x04

/* A FIN or RST closes the flow: both of its entries are marked, so its SNAT port is free again soon. */
static __always_inline void ns_mark_closing(struct ns_ct4 *ct, struct ns_ct4_key *other)
{
	struct ns_ct4 *o = bpf_map_lookup_elem(&kln_ns_ct4, other);

	ct->flags |= NS_CT_CLOSING;
	if (o)
		o->flags |= NS_CT_CLOSING;
}

static __always_inline int ns_stale(const struct ns_ct4 *ct, __u64 now)
{
	return now - ct->last_seen > ((ct->flags & NS_CT_CLOSING) ? NS_CT_CLOSED_NS : NS_CT_STALE_NS);
}

/* A reply of a translated flow (NS_CT_REV entry of its 5-tuple): back to the address the client used,
 * and out towards the client. TCX_NEXT when the packet is no such reply. */
static __always_inline int ns_reverse(struct __sk_buff *skb, struct ns_ct4_key *k, __u8 ttl)
{
	struct ns_ct4 *ct = bpf_map_lookup_elem(&kln_ns_ct4, k);
	struct ns_ct4_key fk = {};
	struct ns_ct4 c;

	if (!ct || (ct->flags & NS_CT_DIR) != NS_CT_REV)
		return TCX_NEXT;
	c = *ct;
	ct->last_seen = bpf_ktime_get_ns();
	if (ns_tcp_flags(skb, k) & (NS_TCP_FIN | NS_TCP_RST)) {
		fk.saddr = c.addr2;
		fk.daddr = c.addr1;
		fk.sport = c.port2;
		fk.dport = c.port1;
		fk.proto = k->proto;
		ns_mark_closing(ct, &fk);
	}
	if (ns_rewrite(skb, k, c.addr1, c.port1, c.addr2, c.port2) < 0)
		return TC_ACT_SHOT;
	return ns_forward(skb, c.addr1, c.addr2, k->proto, ttl);
}

/* ICMP port unreachable back to the sender, in place of the packet (a service without backends):
 * Ethernet + IPv4 + ICMP + the original IPv4 header and the first 8 bytes of its payload. */
#define NS_ICMP_LEN (ETH_HLEN + 20 + 8 + 28)
static __always_inline int ns_unreachable(struct __sk_buff *skb)
{
	__u8 orig[28], macs[12], sw[12];
	struct iphdr ip = {};
	struct ns_icmphdr icmp = {};
	__u32 csum;

	if (bpf_skb_load_bytes(skb, 0, macs, 12) < 0 || bpf_skb_load_bytes(skb, ETH_HLEN, orig, 28) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, NS_ICMP_LEN, 0) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(sw, macs + 6, 6);
	__builtin_memcpy(sw + 6, macs, 6);
	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = bpf_htons(20 + 8 + 28);
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	__builtin_memcpy(&ip.saddr, orig + 16, 4);     /* the service address the client used */
	__builtin_memcpy(&ip.daddr, orig + 12, 4);
	csum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	ip.check = ~csum;
	icmp.type = ICMP_DEST_UNREACH;
	icmp.code = ICMP_PORT_UNREACH;
	csum = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	csum = bpf_csum_diff(0, 0, (__be32 *)orig, sizeof(orig), csum);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	icmp.checksum = ~csum;
	if (bpf_skb_store_bytes(skb, 0, sw, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 20, &icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 28, orig, sizeof(orig), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int ns_is_local(const struct ns_config *cfg, __be32 addr)
{
	return addr == cfg->node_ip || (cfg->pod_mask && (bpf_ntohl(addr) & cfg->pod_mask) == bpf_ntohl(cfg->pod_net));
}

/* Send a forward-translated packet on: to a pod of this node through BPF host routing (the host
 * object runs next) when the node has it, else by the FIB. */
static __always_inline int ns_deliver(struct __sk_buff *skb, const struct ns_config *cfg, __be32 saddr,
				      __be32 daddr, __u8 proto, __u8 ttl)
{
	if ((cfg->flags & NS_F_HOST_ROUTING) && ns_is_local(cfg, daddr) && daddr != cfg->node_ip)
		return TCX_NEXT;
	return ns_forward(skb, saddr, daddr, proto, ttl);
}

static __always_inline int ns_backend(__u32 id, struct lb4_backend *out)
{
	struct lb4_backend *be = bpf_map_lookup_elem(&kln_lb4_backend, &id);

	if (!be)
		return -1;
	*out = *be;
	return 0;
}

/* Pick a backend of the service (master copy *m) for a new flow: affinity by client address, else the
 * service's algorithm with the 5-tuple as Maglev's flow hash. */
static __always_inline int ns_pick(struct lb4_key *key, const struct lb_service *m, const struct ns_ct4_key *k,
				   __u32 *id, struct lb4_backend *be)
{
	struct lb_affinity_key ak = {};
	struct lb_affinity av = {}, *a;
	__u64 now = 0;
	__u32 flow;

	if (m->flags & LB_SVC_F_AFFINITY) {
		now = bpf_ktime_get_ns();
		ak.client_cookie = NS_AFFINITY_TAG | bpf_ntohl(k->saddr);
		ak.service_id = m->service_id;
		a = bpf_map_lookup_elem(&kln_lb_affinity, &ak);
		if (a && now - a->last_used <= (__u64)m->affinity_timeout * NSEC_PER_SEC && !ns_backend(a->backend_id, be)) {
			a->last_used = now;
			*id = a->backend_id;
			return 0;
		}
	}
	flow = jhash_3words(k->saddr, k->daddr, ((__u32)k->sport << 16) | k->dport, k->proto);
	if (lb_select_flow(&kln_lb4_svc, key, &key->backend_slot, m, flow, id))
		return -1;
	if (ns_backend(*id, be)) {
		if (lb_slot_backend(&kln_lb4_svc, key, &key->backend_slot, 1, id) || ns_backend(*id, be))
			return -1;
	}
	if (m->flags & LB_SVC_F_AFFINITY) {
		av.backend_id = *id;
		av.last_used = now;
		bpf_map_update_elem(&kln_lb_affinity, &ak, &av, BPF_ANY);
	}
	return 0;
}

/* A free SNAT port for (backend, node) - the reverse entry claimed with it - or 0. */
static __always_inline __be16 ns_snat_port(const struct ns_config *cfg, const struct ns_ct4_key *k,
					   const struct lb4_backend *be, struct ns_ct4 *rev)
{
	struct ns_ct4_key rk = {};
	struct ns_ct4 *old;
	__u32 span = (__u32)cfg->snat_hi - cfg->snat_lo + 1, start, i;
	__u64 now = rev->last_seen;

	if (!cfg->snat_lo || cfg->snat_hi < cfg->snat_lo)
		return 0;
	rk.saddr = be->address;
	rk.daddr = cfg->node_ip;
	rk.sport = be->port;
	rk.proto = k->proto;
	start = jhash_3words(k->saddr, ((__u32)k->sport << 16) | k->dport, k->daddr, 7) % span;
	for (i = 0; i < NS_SNAT_TRIES; i++) {
		rk.dport = bpf_htons((__u16)(cfg->snat_lo + (start + i * 7919) % span));
		if (!bpf_map_update_elem(&kln_ns_ct4, &rk, rev, BPF_NOEXIST))
			return rk.dport;
		old = bpf_map_lookup_elem(&kln_ns_ct4, &rk);
		if (old && ns_stale(old, now)) {
			bpf_map_update_elem(&kln_ns_ct4, &rk, rev, BPF_ANY);
			return rk.dport;
		}
	}
	return 0;
}

/* The edge: a packet that arrived on the underlay. */
static __always_inline int ns_from_netdev(struct __sk_buff *skb)
{
	struct ns_ct4_key k = {}, rk = {};
	struct ns_ct4 fwd = {}, rev = {}, *ct;
	struct lb4_key key = {};
	struct lb_service *svc, m;
	struct lb4_backend be;
	struct ns_config *cfg;
	__u32 zero = 0, id = 0;
	__be32 saddr;
	__be16 sport;
	__u8 ttl;
	int rc;

	cfg = bpf_map_lookup_elem(&kln_ns_config, &zero);
	if (!cfg || !(cfg->flags & NS_F_ENABLED))
		return TCX_NEXT;
	if (ns_parse(skb, &k, &ttl))
		return TCX_NEXT;
	ct = bpf_map_lookup_elem(&kln_ns_ct4, &k);
	if (ct) {
		__u8 fl;

		if ((ct->flags & NS_CT_DIR) == NS_CT_REV)
			return ns_reverse(skb, &k, ttl);
		fwd = *ct;
		fl = ns_tcp_flags(skb, &k);
		if (!((fwd.flags & NS_CT_CLOSING) && (fl & NS_TCP_SYN)) &&    /* a new connection on a closed one's port */
		    !ns_backend(fwd.backend_id, &be) && be.address == fwd.addr1 && be.port == fwd.port1) {
			ct->last_seen = bpf_ktime_get_ns();
			if (fl & (NS_TCP_FIN | NS_TCP_RST)) {
				rk.saddr = fwd.addr1;
				rk.sport = fwd.port1;
				rk.daddr = fwd.addr2 ? fwd.addr2 : k.saddr;
				rk.dport = fwd.addr2 ? fwd.port2 : k.sport;
				rk.proto = k.proto;
				ns_mark_closing(ct, &rk);
			}
			saddr = fwd.addr2 ? fwd.addr2 : k.saddr;
			sport = fwd.addr2 ? fwd.port2 : k.sport;
			if (ns_rewrite(skb, &k, saddr, sport, fwd.addr1, fwd.port1) < 0)
				return TC_ACT_SHOT;
			return ns_deliver(skb, cfg, saddr, fwd.addr1, k.proto, ttl);
		}
		bpf_map_delete_elem(&kln_ns_ct4, &k);    /* its backend is gone, or the port starts a new connection */
	}
	key.address = k.daddr;
	key.dport = k.dport;
	key.proto = k.proto;
	svc = bpf_map_lookup_elem(&kln_lb4_svc, &key);
	if (!svc)
		return TCX_NEXT;
	m = *svc;
	if (!(m.flags & LB_SVC_F_EXTERNAL))
		return TCX_NEXT;                         /* a ClusterIP: the socket LB's, not the edge's */
	if (!m.count || ns_pick(&key, &m, &k, &id, &be)) {
		flow_xlate(flow_config(), FLOW_SRC_FROM_NETWORK, skb->ifindex, DROP_NO_SERVICE, k.saddr, k.sport, k.daddr,
			   k.dport, 0, 0, k.proto, ns_tcp_flags(skb, &k), skb->len, m.service_id, 0);
		return ns_unreachable(skb);
	}
	rev.flags = NS_CT_REV;
	rev.addr1 = k.daddr;
	rev.port1 = k.dport;
	rev.addr2 = k.saddr;
	rev.port2 = k.sport;
	rev.backend_id = id;
	rev.last_seen = bpf_ktime_get_ns();
	saddr = k.saddr;
	sport = k.sport;
	if (!(m.flags & LB_SVC_F_LOCAL)) {
		sport = ns_snat_port(cfg, &k, &be, &rev);
		if (!sport) {                            /* no SNAT port free: the client retries */
			flow_xlate(flow_config(), FLOW_SRC_FROM_NETWORK, skb->ifindex, DROP_NAT_NO_MAPPING, k.saddr, k.sport,
				   k.daddr, k.dport, be.address, be.port, k.proto, ns_tcp_flags(skb, &k), skb->len,
				   m.service_id, 0);
			return TC_ACT_SHOT;
		}
		saddr = cfg->node_ip;
	} else {
		rk.saddr = be.address;
		rk.daddr = k.saddr;
		rk.sport = be.port;
		rk.dport = k.sport;
		rk.proto = k.proto;
		bpf_map_update_elem(&kln_ns_ct4, &rk, &rev, BPF_ANY);
	}
	fwd.flags = NS_CT_FWD;
	fwd.addr1 = be.address;
	fwd.port1 = be.port;
	fwd.addr2 = saddr == k.saddr ? 0 : saddr;
	fwd.port2 = saddr == k.saddr ? 0 : sport;
	fwd.backend_id = id;
	fwd.last_seen = rev.last_seen;
	bpf_map_update_elem(&kln_ns_ct4, &k, &fwd, BPF_ANY);
	flow_xlate(flow_config(), FLOW_SRC_FROM_NETWORK, skb->ifindex, 0, k.saddr, k.sport, k.daddr, k.dport, be.address,
		   be.port, k.proto, ns_tcp_flags(skb, &k), skb->len, m.service_id, 0);
	rc = ns_rewrite(skb, &k, saddr, sport, be.address, be.port);
	if (rc < 0)
		return TC_ACT_SHOT;
	return ns_deliver(skb, cfg, saddr, be.address, k.proto, ttl);
}

/* A pod's host interface: the replies of local backends, translated back and sent to the client. */
static __always_inline int ns_from_pod(struct __sk_buff *skb)
{
	struct ns_ct4_key k = {};
	struct ns_config *cfg;
	__u32 zero = 0;
	__u8 ttl;

	cfg = bpf_map_lookup_elem(&kln_ns_config, &zero);
	if (!cfg || !(cfg->flags & NS_F_ENABLED))
		return TCX_NEXT;
	if (ns_parse(skb, &k, &ttl))
		return TCX_NEXT;
	return ns_reverse(skb, &k, ttl);
}

#endif /* KLN_NODEPORT_H */
