// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * A pod's host-side interface (tcx ingress: packets from the pod, like Cilium's bpf_lxc.c
 * from-container). Attached per pod by the netstack-cni plugin (manifest target "endpoint").
 * A packet for a pod of this node goes straight into that pod, one for a pod of another node to the
 * FIB's next hop; everything else (the node, the world) goes on to the stack. See lib/fwd.h.
 */
#include "lib/fwd.h"

SEC("tc")
int kln_from_container(struct __sk_buff *skb)
{
	struct iphdr *ip = fwd_ipv4(skb);
	int rc;

	if (!ip)
		return TCX_NEXT;
	rc = fwd_to_local_pod(skb, ip->daddr, ip->ttl);
	if (rc != TCX_NEXT)
		return rc;
	ip = fwd_ipv4(skb);		/* the lookup helper does not change the packet, but re-check for the verifier */
	if (!ip)
		return TCX_NEXT;
	return fwd_to_remote_pod(skb, ip);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
