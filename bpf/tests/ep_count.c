// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Test object (selftest only, never installed on a node): per-endpoint programs. Its two programs
 * have the manifest target "endpoint": the netstack-cni plugin attaches them (tcx) to a pod's
 * host-side interface on ADD and detaches them on DEL. They count the packets they see in
 * kln_ep_count[0] (tcx ingress of the host interface: packets from the pod) and kln_ep_count[1]
 * (tcx egress: packets to the pod), and let every packet through.
 */
#include "../lib/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} kln_ep_count SEC(".maps");

static __always_inline int count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&kln_ep_count, &slot);

	if (n)
		__sync_fetch_and_add(n, 1);
	return -1;	/* TCX_NEXT: the next program, or pass */
}

SEC("tc")
int kln_ep_from_pod(struct __sk_buff *skb)
{
	return count(0);
}

SEC("tc")
int kln_ep_to_pod(struct __sk_buff *skb)
{
	return count(1);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
