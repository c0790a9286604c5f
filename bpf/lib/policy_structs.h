/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts of the identity and policy maps (policy.h). Addresses and ports in network byte order,
 * every other integer in host byte order. The "py:" lines are the Python struct formats the writer
 * (plugins/module_utils/policy/maps.py) uses; a unit test holds them to the manifests' key and value
 * sizes.
 */
#ifndef KLN_POLICY_STRUCTS_H
#define KLN_POLICY_STRUCTS_H

#include <linux/types.h>

/* Reserved security identities (Cilium's numbers). Identities of label sets are 256 .. 2^24-1 (they
 * travel in the 24-bit VXLAN VNI); CIDR identities are 2^24 + n and never leave the node. */
#define ID_UNKNOWN	0	/* in keys: any peer */
#define ID_HOST		1
#define ID_WORLD	2
#define ID_UNMANAGED	3
#define ID_REMOTE_NODE	6
#define ID_BY_ADDRESS	0x80000000U	/* key flag: entries that match the peer's address (NetworkPolicy ipBlock, pods too) */

/* kln_policy_ep4 key: a pod's IPv4 address.                            py: "4s" (4 bytes) */
struct pol_ep_key {
	__be32 addr;
};

/* kln_policy_ep4 value: the pod as policy sees it.                     py: "=III" (12 bytes)
 *   0 ifindex   its host-side interface (a packet from the pod must come from there)
 *   4 identity  its security identity
 *   8 flags     POL_EP_* */
struct pol_ep {
	__u32 ifindex;
	__u32 identity;
	__u32 flags;
};

#define POL_EP_INGRESS	1	/* ingress enforced: what no entry allows is dropped */
#define POL_EP_EGRESS	2	/* egress enforced */
#define POL_EP_GEN	4	/* which generation of kln_policy4 entries is the endpoint's now */

/* kln_policy4 key: one entry of one endpoint (LPM trie).               py: "=I4sIBB2s" (16 bytes)
 *   0 prefixlen  72 (any protocol), 80 (a protocol, any port), 80 + n (a port prefix of n bits)
 *   4 ep         the endpoint's address
 *   8 identity   the peer's identity (0: any; | ID_BY_ADDRESS: by address)
 *  12 dirgen     bit 0 egress, bit 1 generation
 *  13 protocol   IPPROTO_*
 *  14 dport      destination port (network byte order) */
struct pol_key {
	__u32 prefixlen;
	__be32 ep;
	__u32 identity;
	__u8 dirgen;
	__u8 protocol;
	__be16 dport;
};

#define POL_PREFIX_ANY_PROTO	72
#define POL_PREFIX_PROTO	80
#define POL_PREFIX_PORT		96

/* kln_policy4 value: what the entry says.                              py: "=II" (8 bytes)
 *   0 flags  POL_DENY
 *   4 rule   the rule that made the entry (an index the writer keeps: netstack policy get names it) */
struct pol_entry {
	__u32 flags;
	__u32 rule;
};

#define POL_DENY 1

/* kln_ipcache4 and kln_cidr_ident4 key: a prefix (LPM trie).           py: "=I4s" (8 bytes) */
struct ipc_key {
	__u32 prefixlen;
	__be32 addr;
};

/* kln_ipcache4 and kln_cidr_ident4 value: the identity.                py: "=II" (8 bytes)
 *   0 identity
 *   4 flags (0) */
struct ipc_info {
	__u32 identity;
	__u32 flags;
};

/* kln_ct4 key: a connection as one endpoint saw it.                    py: "=4s4s2s2sBBH" (16 bytes)
 * dir: CT_INGRESS (the endpoint is the destination) or CT_EGRESS (the source). For ICMP echo, sport
 * of a request / dport of a reply carry the echo id. */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 dir;
	__u16 pad;
};

#define CT_INGRESS 0
#define CT_EGRESS 1

/* kln_ct4 value: the connection's state.                               py: "=IBBBBII" (16 bytes)
 *   0 expires   seconds (bpf_ktime_get_ns() >> 30) after which the entry is dead
 *   4 state     CT_S_*
 *   5 tx_flags  TCP flags seen in the direction of the key
 *   6 rx_flags  TCP flags seen in the reply direction
 *   7 pad
 *   8 rule      the rule that allowed the connection (0: not enforced)
 *  12 pad */
struct ct_entry {
	__u32 expires;
	__u8 state;
	__u8 tx_flags;
	__u8 rx_flags;
	__u8 pad;
	__u32 rule;
	__u32 pad2;
};

#define CT_S_REPLIED 1	/* a reply was seen */
#define CT_S_CLOSING 2	/* FIN or RST seen */

/* kln_policy_stat key: per endpoint, reason, direction (per-CPU hash). py: "=4sBBH" (8 bytes)
 * reason 0 counts what was let through, any other is the drop reason (DROP_* below). */
struct pol_stat_key {
	__be32 ep;
	__u8 reason;
	__u8 dir;
	__u16 pad;
};

/* kln_policy_stat value: one CPU's counts.                             py: "=QQ" (16 bytes) */
struct pol_stat {
	__u64 packets;
	__u64 bytes;
};

/* Drop reasons: Cilium's numbers (bpf/lib/common.h there; Hubble's names in the comments). */
#define DROP_INVALID_SIP	132	/* INVALID_SOURCE_IP: not the address of the pod it came from */
#define DROP_POLICY		133	/* POLICY_DENIED: enforced and no entry allows it */
#define DROP_INVALID		134	/* INVALID_PACKET: truncated headers */
#define DROP_NO_TUNNEL_ENDPOINT	160	/* NO_TUNNEL_ENDPOINT: into the VXLAN device for no pod CIDR */
#define DROP_POLICY_DENY	181	/* POLICY_DENY: a deny entry matched */

/* kln_tunnel4 key: a pod CIDR of another node (ipc_key, LPM trie).
 * kln_tunnel4 value: where it is.                                      py: "=4sI" (8 bytes)
 *   0 remote  the node's underlay address
 *   4 vni     0: the VNI carries the source's identity; else this fixed VNI (a node whose release does
 *             not read identities from the VNI) */
struct tun_info {
	__be32 remote;
	__u32 vni;
};

/* skb->mark between the VXLAN device's ingress and a pod's host interface: the low byte says what the
 * rest is. */
#define MARK_MAGIC_MASK		0xff
#define MARK_MAGIC_IDENTITY	0x4b	/* identity << 8: the source identity the tunnel carried */
#define MARK_MAGIC_ALLOWED	0x4c	/* the destination's ingress verdict is taken (allowed) already */

#ifndef __bpf__
_Static_assert(sizeof(struct pol_ep_key) == 4, "pol_ep_key");
_Static_assert(sizeof(struct pol_ep) == 12, "pol_ep");
_Static_assert(sizeof(struct pol_key) == 16, "pol_key");
_Static_assert(sizeof(struct pol_entry) == 8, "pol_entry");
_Static_assert(sizeof(struct ipc_key) == 8, "ipc_key");
_Static_assert(sizeof(struct ipc_info) == 8, "ipc_info");
_Static_assert(sizeof(struct ct_key) == 16, "ct_key");
_Static_assert(sizeof(struct ct_entry) == 16, "ct_entry");
_Static_assert(sizeof(struct pol_stat_key) == 8, "pol_stat_key");
_Static_assert(sizeof(struct pol_stat) == 16, "pol_stat");
_Static_assert(sizeof(struct tun_info) == 8, "tun_info");
#endif

#endif /* KLN_POLICY_STRUCTS_H */
