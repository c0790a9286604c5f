/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts of the edge load balancer's own maps (nodeport.h). Addresses and ports in network byte
 * order, other integers in host byte order. The "py:" lines are the Python struct formats of the
 * writer (plugins/module_utils/nodeport.py); a unit test holds them to the manifest's sizes.
 */
#ifndef KLN_NODEPORT_STRUCTS_H
#define KLN_NODEPORT_STRUCTS_H

#include <linux/types.h>

/* kln_ns_config (array, 1 entry, key u32 0): this node.                 py: ns_config "=4s4sIHHII" (24 bytes)
 *   0 node_ip      the node's underlay address: NodePorts are answered on it, Cluster-policy flows are
 *                  SNATed to it
 *   4 pod_net      this node's pod CIDR (network address) ...
 *   8 pod_mask     ... and its mask (host order); a backend inside it, or the node's address, is local
 *  12 snat_lo      SNAT source ports: snat_lo..snat_hi (above the node's ephemeral port range)
 *  14 snat_hi
 *  16 flags        NS_F_*
 *  20 pad */
struct ns_config {
	__be32 node_ip;
	__be32 pod_net;
	__u32 pod_mask;
	__u16 snat_lo;
	__u16 snat_hi;
	__u32 flags;
	__u32 pad;
};

#define NS_F_ENABLED      1   /* written by the collection: without it the program passes everything */
#define NS_F_HOST_ROUTING 2   /* BPF host routing (the host object after this one) delivers to local pods */

/* kln_ns_ct4 (LRU hash): one entry per direction of a translated flow.
 * key: the packet's addresses, ports and protocol as it arrives.        py: ns_ct4_key "=4s4s2s2sB3x" (16 bytes) */
struct ns_ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* value:                                                                 py: ns_ct4 "=4s4s2s2sIQB7x" (32 bytes)
 *   NS_CT_FWD (client -> service): addr1:port1 the backend (new destination), addr2:port2 the SNAT source
 *             (0: no SNAT, externalTrafficPolicy Local), backend_id the backend's id in kln_lb4_backend
 *   NS_CT_REV (backend -> client or node): addr1:port1 the service address (new source), addr2:port2 the
 *             client (new destination)
 *   last_seen  bpf_ktime_get_ns() of the last packet */
struct ns_ct4 {
	__be32 addr1;
	__be32 addr2;
	__be16 port1;
	__be16 port2;
	__u32 backend_id;
	__u64 last_seen;
	__u8 flags;
	__u8 pad[7];
};

#define NS_CT_FWD 1
#define NS_CT_REV 2
#define NS_CT_DIR 3          /* the direction bits */
#define NS_CT_CLOSING 0x80   /* a TCP FIN or RST passed: the entry (and its SNAT port) is free again after 1 s */

#ifndef __bpf__
_Static_assert(sizeof(struct ns_config) == 24, "ns_config");
_Static_assert(sizeof(struct ns_ct4_key) == 16, "ns_ct4_key");
_Static_assert(sizeof(struct ns_ct4) == 32, "ns_ct4");
#endif

#endif /* KLN_NODEPORT_STRUCTS_H */
