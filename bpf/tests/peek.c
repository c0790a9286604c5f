// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Test object (selftest only, never installed on a node): a second object that shares a map with
 * the socket load balancer. It declares kln_lb_config exactly as sock_lb does, so the loader pins
 * one map in globals/ and both objects use it. On every packet a socket in its cgroup sends, it
 * copies the Maglev table size it reads there into its private map kln_peek_seen[0] and counts
 * the packet in kln_peek_seen[1]: the selftest writes the config through the socket LB's writer
 * and reads it back here.
 */
#include "../lib/common.h"
#include "../lib/lb_structs.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
} kln_lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} kln_peek_seen SEC(".maps");

SEC("cgroup_skb/egress")
int kln_peek_egress(struct __sk_buff *skb)
{
	__u32 zero = 0, one = 1;
	struct lb_config *cfg = bpf_map_lookup_elem(&kln_lb_config, &zero);
	__u64 *seen = bpf_map_lookup_elem(&kln_peek_seen, &zero);
	__u64 *count = bpf_map_lookup_elem(&kln_peek_seen, &one);

	if (cfg && seen)
		*seen = cfg->maglev_m;
	if (count)
		__sync_fetch_and_add(count, 1);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
