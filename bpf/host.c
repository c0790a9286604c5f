// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The node's network device (tcx ingress of the underlay, like Cilium's bpf_host.c from-netdev):
 * a packet for a pod of this node goes straight into the pod (bpf_redirect_peer); everything else
 * goes on to the stack. See lib/fwd.h.
 */
#include "lib/fwd.h"

SEC("tc")
int kln_from_netdev(struct __sk_buff *skb)
{
	struct iphdr *ip = fwd_ipv4(skb);

	if (!ip)
		return TCX_NEXT;
	return fwd_to_local_pod(skb, ip->daddr, ip->ttl);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
