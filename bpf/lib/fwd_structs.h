/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts of the host-routing maps (fwd.h). Addresses in network byte order. The "py:" lines are
 * the Python struct formats the writer (plugins/module_utils/hostroute.py) uses; a unit test holds
 * them to the manifests' key and value sizes.
 */
#ifndef KLN_FWD_STRUCTS_H
#define KLN_FWD_STRUCTS_H

#include <linux/types.h>

/* kln_endpoints4 key: the pod's IPv4 address.                        py: "4s" (4 bytes) */
struct ep4_key {
	__be32 addr;
};

/* kln_endpoints4 value: where the pod is.                            py: "=I6s6s" (16 bytes)
 *   0 ifindex   host-side interface (the veth whose peer is the pod's)
 *   4 mac       the pod's interface MAC (destination of packets to the pod)
 *  10 host_mac  the host-side interface MAC (their source) */
struct ep_info {
	__u32 ifindex;
	__u8 mac[6];
	__u8 host_mac[6];
};

/* kln_pod_cidr4 key: LPM prefix.                                     py: "=I4s" (8 bytes) */
struct cidr4_key {
	__u32 prefixlen;
	__be32 addr;
};

#define CIDR_F_LOCAL 1	/* this node's pod CIDR */
#define CIDR_F_ENCRYPT 2	/* reached through the WireGuard device: left to the stack (strict mode's filter sees it) */

/* kln_pod_cidr4 value: flags                                            py: "=I" (4 bytes) */
struct cidr_info {
	__u32 flags;
};

#ifndef __bpf__
_Static_assert(sizeof(struct ep4_key) == 4, "ep4_key");
_Static_assert(sizeof(struct ep_info) == 16, "ep_info");
_Static_assert(sizeof(struct cidr4_key) == 8, "cidr4_key");
_Static_assert(sizeof(struct cidr_info) == 4, "cidr_info");
#endif

#endif /* KLN_FWD_STRUCTS_H */
