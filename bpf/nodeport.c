// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * North-south load balancing at the node's edge: LoadBalancer IPs and NodePorts from the LAN, balanced
 * to the socket LB's service table (lib/lb.h) with SNAT (externalTrafficPolicy Cluster) or the client's
 * address kept (Local), replies translated back. See lib/nodeport.h and docs/bgp.md.
 *
 *  kln_nodeport_in        tcx ingress of the underlay, linked in FRONT of the host object (manifest
 *                         order "first"): new flows, their packets, and the replies of remote backends
 *  kln_nodeport_from_pod  tcx ingress of each pod's host interface (target endpoint): the replies of
 *                         local backends
 */
#include "lib/nodeport.h"

SEC("tc")
int kln_nodeport_in(struct __sk_buff *skb)
{
	return ns_from_netdev(skb);
}

SEC("tc")
int kln_nodeport_from_pod(struct __sk_buff *skb)
{
	return ns_from_pod(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
