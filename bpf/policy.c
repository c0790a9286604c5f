// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Identity-based policy at the pods' host-side interfaces and the node's underlay (lib/policy.h).
 *
 * - kln_pol_from_container (tcx ingress of each pod's host interface, attached first by netstack-cni: the
 *   packets the pod sends, like Cilium's bpf_lxc.c from-container): the pod's egress rules; for a pod of
 *   this node as destination also that pod's ingress rules (BPF host routing delivers it with
 *   bpf_redirect_peer, past the destination's own tc programs).
 * - kln_pol_to_container (tcx egress of each pod's host interface: what the stack delivers to the pod):
 *   the pod's ingress rules, with the source identity the tunnel carried (skb->mark) or the ipcache's.
 * - kln_pol_from_netdev (tcx ingress of the underlay, before the host object): the ingress rules of a pod
 *   of this node that a packet from another node is for (native routing; host routing's bpf_redirect_peer
 *   skips the pod's tc egress).
 * A packet whose ingress verdict was taken on the way is marked, so it is not judged twice.
 */
#include "lib/policy.h"

SEC("tc")
int kln_pol_from_container(struct __sk_buff *skb)
{
	struct pol_pkt p = {};
	struct pol_ep *ep, *dep;
	struct pol_ep src;
	struct pol_peer dst = {};
	int rc = pol_parse(skb, &p);

	if (rc > 0)
		return TCX_NEXT;
	if (rc < 0)
		return TC_ACT_SHOT;
	p.source = FLOW_SRC_FROM_ENDPOINT;
	ep = pol_endpoint(p.saddr);
	if (!ep || ep->ifindex != skb->ifindex) {
		pol_count(p.saddr, DROP_INVALID_SIP, CT_EGRESS, p.len);
		flow_packet(flow_config(), 1, p.source, p.ifindex, CT_EGRESS, DROP_INVALID_SIP, 0, 0, p.saddr, p.daddr,
			    p.sport, p.dport, p.protocol, p.tcp_flags, p.len, 0, 0);
		return TC_ACT_SHOT;
	}
	if (p.frag)
		return TCX_NEXT;
	src = *ep;
	dst.addr = p.daddr;
	if (pol_check(&p, &src, p.saddr, CT_EGRESS, &dst))
		return TC_ACT_SHOT;
	dep = pol_endpoint(p.daddr);
	if (dep && pol_deliver(skb, &p, dep, src.identity))
		return TC_ACT_SHOT;
	return TCX_NEXT;
}

SEC("tc")
int kln_pol_to_container(struct __sk_buff *skb)
{
	struct pol_pkt p = {};
	struct pol_ep *dep;
	struct pol_ep d;
	struct pol_peer src = {};
	__u32 mark = skb->mark;
	int rc;

	if ((mark & MARK_MAGIC_MASK) == MARK_MAGIC_ALLOWED) {
		skb->mark = 0;
		return TCX_NEXT;
	}
	rc = pol_parse(skb, &p);
	if (rc > 0)
		return TCX_NEXT;
	if (rc < 0)
		return TC_ACT_SHOT;
	p.source = FLOW_SRC_TO_ENDPOINT;
	dep = pol_endpoint(p.daddr);
	if (!dep || p.frag)
		return TCX_NEXT;
	d = *dep;
	src.addr = p.saddr;
	if ((mark & MARK_MAGIC_MASK) == MARK_MAGIC_IDENTITY) {
		src.id = mark >> 8;	/* the tunnel's (never 0: overlay.c passes identities above host only) */
		skb->mark = 0;
	}
	if (pol_check(&p, &d, p.daddr, CT_INGRESS, &src))
		return TC_ACT_SHOT;
	return TCX_NEXT;
}

SEC("tc")
int kln_pol_from_netdev(struct __sk_buff *skb)
{
	struct pol_pkt p = {};
	struct pol_ep *dep;
	__be32 daddr;

	/* most packets here are for the node itself (the tunnel's among them): one lookup, no parse */
	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    pkt_load(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, daddr), &daddr, sizeof(daddr)) < 0)
		return TCX_NEXT;
	dep = pol_endpoint(daddr);
	if (!dep || pol_parse(skb, &p) != 0 || p.frag)
		return TCX_NEXT;
	p.source = FLOW_SRC_FROM_NETWORK;
	if (pol_deliver(skb, &p, dep, 0))
		return TC_ACT_SHOT;
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
