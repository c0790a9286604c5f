/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts of the flow event maps (flow.h). Addresses and ports in network byte order, every other integer in
 * host byte order. The "py:" lines are the Python struct formats the node agent reads and the node apply writes
 * (plugins/module_utils/flows/events.py); a unit test holds them to this header and the manifests.
 */
#ifndef KLN_FLOW_STRUCTS_H
#define KLN_FLOW_STRUCTS_H

#include <linux/types.h>

#define FLOW_EVENT_VERSION 1

/* kln_flows record (BPF ring buffer): one flow event, version 1.            py: "=QBBBBBBBB4s4s2s2sIIIII4s2sHQ" (64 bytes)
 *   0 time          bpf_ktime_get_boot_ns() (CLOCK_BOOTTIME)
 *   8 version       FLOW_EVENT_VERSION
 *   9 source        FLOW_SRC_*: the program that saw it (Hubble's observation point)
 *  10 verdict       FLOW_V_* (Hubble's Verdict numbers)
 *  11 reason        drop reason (Cilium's code; 0 when not dropped)
 *  12 direction     1 ingress, 2 egress, 0 unknown (Hubble's TrafficDirection numbers)
 *  13 protocol      IPPROTO_*
 *  14 tcp_flags     the packet's TCP flags (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80)
 *  15 flags         FLOW_F_*
 *  16 saddr         source address (0: not known to the program - a socket before it is bound)
 *  20 daddr         destination address (after a translation: the backend's)
 *  24 sport, 26 dport
 *  28 src_identity  security identity of the source (0: not known to the program)
 *  32 dst_identity
 *  36 ifindex       the interface the packet was seen on (0 for socket events)
 *  40 rule          the policy rule id that allowed or denied it (kln_policy4's; 0: none - not enforced or default deny)
 *  44 len           packet length in bytes (0 for socket events)
 *  48 orig_addr     a translation's original destination: the service address (VIP, LoadBalancer IP, node address)
 *  52 orig_port     and port
 *  54 service_id    the service's id in the LB table (0: none)
 *  56 cookie        the network namespace cookie of a socket event (whose pod), else 0 */
struct flow_event {
	__u64 time;
	__u8 version;
	__u8 source;
	__u8 verdict;
	__u8 reason;
	__u8 direction;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 flags;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 rule;
	__u32 len;
	__be32 orig_addr;
	__be16 orig_port;
	__u16 service_id;
	__u64 cookie;
};

#define FLOW_SRC_FROM_ENDPOINT	1	/* tcx ingress of a pod's host interface: what the pod sends (policy) */
#define FLOW_SRC_TO_ENDPOINT	2	/* tcx egress of a pod's host interface: what the stack delivers (policy) */
#define FLOW_SRC_FROM_NETWORK	3	/* tcx ingress of the underlay (policy for local pods, the edge LB) */
#define FLOW_SRC_TO_OVERLAY	4	/* tcx egress of the VXLAN device */
#define FLOW_SRC_SOCK		5	/* the socket LB at connect()/sendmsg() */

#define FLOW_V_FORWARDED	1
#define FLOW_V_DROPPED		2
#define FLOW_V_TRANSLATED	7

#define FLOW_DIR_INGRESS	1
#define FLOW_DIR_EGRESS		2

#define FLOW_F_REPLY		1	/* a packet of the reply direction of a connection the endpoint knows */
#define FLOW_F_ENFORCED		2	/* the endpoint's policy is enforced in this direction */
#define FLOW_F_POLICY		4	/* a policy verdict (from pol_check) */

/* kln_flow_config value (array, one entry; written by the node apply).      py: "=IBBHI" (12 bytes)
 *   0 flags        FLOW_CFG_ENABLED: emit events at all
 *   4 aggregation  FLOW_AGG_*
 *   5 pad
 *   6 pad
 *   8 drop_rate    drop events per second per drop reason and CPU (0: no limit) */
struct flow_config {
	__u32 flags;
	__u8 aggregation;
	__u8 pad;
	__u16 pad2;
	__u32 drop_rate;
};

#define FLOW_CFG_ENABLED	1

/* Like Cilium's monitorAggregation: */
#define FLOW_AGG_NONE		0	/* every packet */
#define FLOW_AGG_MEDIUM		2	/* per connection and direction: the first packet, and a packet with a TCP flag not seen before */
#define FLOW_AGG_MAXIMUM	3	/* the first packet per direction, and SYN, FIN or RST not seen before */

/* kln_flow_rl value (per-CPU array, index = drop reason): the drop events of this second. py: "=II" (8 bytes) */
struct flow_rl {
	__u32 second;
	__u32 count;
};

/* kln_flow_stat (per-CPU array of u64, index FLOW_STAT_*).                 py: "=Q" (8 bytes) */
#define FLOW_STAT_EMITTED	0	/* events written into kln_flows */
#define FLOW_STAT_LOST		1	/* events lost: the ring buffer was full (the agent did not keep up) */
#define FLOW_STAT_RATE_LIMITED	2	/* drop events not written: over the drop rate of their reason */
#define FLOW_STAT_MAX		4

/* Drop reasons the edge and the socket LB report (Cilium's codes; the policy's are in policy_structs.h) */
#define DROP_NO_SERVICE		158	/* SERVICE_BACKEND_NOT_FOUND: a service without backends */
#define DROP_NAT_NO_MAPPING	167	/* NO_MAPPING_FOR_NAT_MASQUERADE: no SNAT port free */

#ifndef __bpf__
_Static_assert(sizeof(struct flow_event) == 64, "flow_event");
_Static_assert(sizeof(struct flow_config) == 12, "flow_config");
_Static_assert(sizeof(struct flow_rl) == 8, "flow_rl");
#endif

#endif /* KLN_FLOW_STRUCTS_H */
