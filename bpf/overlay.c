// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The VXLAN device in tunnel mode (collect_md, like Cilium's bpf_overlay.c): the source's security
 * identity travels in the VNI, so the receiving node judges a pod's packet by who sent it without
 * knowing the sender's address (a pod that another node made since the last play, say).
 *
 * - kln_to_overlay (tcx egress of the device, attached by the dataplane): every packet the device sends
 *   gets its tunnel key here - the node that owns the destination's pod CIDR (kln_tunnel4) and as VNI
 *   the source's identity (its pod's, else the ipcache's; the node itself is sent as remote-node), or
 *   the fixed VNI a node of an older release expects.
 * - kln_from_overlay (tcx ingress): the identity in the VNI goes into skb->mark for the destination
 *   pod's tc egress program (policy.c), when the packet came from the node that owns its source's pod
 *   CIDR and that node sends identities; otherwise the receiver looks the source up in its ipcache.
 */
#include "lib/policy.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipc_key);
	__type(value, struct tun_info);
	__uint(max_entries, TUNNEL4_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_tunnel4 SEC(".maps");

#define ID_MAX_VNI 0xffffff

static __always_inline struct tun_info *tunnel_of(__be32 addr)
{
	struct ipc_key k = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&kln_tunnel4, &k);
}

SEC("tc")
int kln_to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct pol_pkt p = {};
	struct tun_info *t;
	struct pol_ep *ep;
	__u32 vni;

	if (pol_parse(skb, &p) < 0 || !p.saddr)
		return TCX_NEXT;	/* not IPv4: the device drops it (no tunnel key) */
	t = tunnel_of(p.daddr);
	if (!t) {
		pol_count(0, DROP_NO_TUNNEL_ENDPOINT, CT_EGRESS, p.len);
		flow_packet(flow_config(), 1, FLOW_SRC_TO_OVERLAY, p.ifindex, -1, DROP_NO_TUNNEL_ENDPOINT, 0, 0, p.saddr,
			    p.daddr, p.sport, p.dport, p.protocol, p.tcp_flags, p.len, 0, 0);
		return TC_ACT_SHOT;
	}
	vni = t->vni;
	if (!vni) {
		ep = pol_endpoint(p.saddr);
		vni = ep ? ep->identity : ipcache_identity(p.saddr, ID_WORLD);
		if (vni == ID_HOST)
			vni = ID_REMOTE_NODE;
		if (vni > ID_MAX_VNI || vni <= ID_HOST)	/* a CIDR identity stays on its node */
			vni = ID_WORLD;
	}
	key.remote_ipv4 = bpf_ntohl(t->remote);
	key.tunnel_id = vni;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return TCX_NEXT;
}

SEC("tc")
int kln_from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct ipc_key k = { .prefixlen = 32 };
	struct iphdr ip;
	struct tun_info *t;
	__u32 id;

	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TCX_NEXT;
	id = key.tunnel_id;
	if (id <= ID_HOST || id > ID_MAX_VNI)
		return TCX_NEXT;
	if (pkt_load(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return TCX_NEXT;
	k.addr = ip.saddr;
	t = bpf_map_lookup_elem(&kln_tunnel4, &k);
	if (!t || t->vni || bpf_ntohl(t->remote) != key.remote_ipv4)
		return TCX_NEXT;	/* not from the node that owns the source, or a node that sends no identity */
	skb->mark = (id << 8) | MARK_MAGIC_IDENTITY;
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
