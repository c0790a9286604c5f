/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup and backend selection, shared by all socket hooks.
 *
 * Reader protocol (the writer side is in bpf/README.md, "Write order"):
 *   1. look up the master slot {VIP, port, proto, slot 0} and COPY it;
 *      everything after that uses only the copy (count, algorithm, rev ...);
 *   2. pick a slot (or a Maglev entry) from the copy, look up the slot's
 *      backend id, then the backend;
 *   3. if a slot or backend vanished in between (the writer shrank the
 *      service after step 1), fall back to slot 1; if that fails too, reject.
 */
#ifndef KLN_LB_H
#define KLN_LB_H

#include "common.h"
#include "lb_structs.h"
#include "lb_maps.h"

/* results of lb4_fwd / lb6_fwd */
#define LB_XLATE   0   /* translated: write the backend into the socket address */
#define LB_PASS    1   /* not a service: leave the address alone */
#define LB_REJECT  2   /* service without a usable backend: fail the syscall */

#define LB_WEIGHT_SEARCH_STEPS 16  /* log2(65536): enough for any u16 slot count */

static __always_inline int lb_slot_backend(void *svc_map, void *key, __u16 *slot,
					   __u32 n, __u32 *id)
{
	struct lb_service *s;

	*slot = (__u16)n;
	s = bpf_map_lookup_elem(svc_map, key);
	if (!s || !s->backend_id)
		return -1;
	*id = s->backend_id;
	return 0;
}

/* Maglev flow hash: the client's bound source address and port when the socket has
 * one (so the same 5-tuple always lands on the same backend), else the socket cookie
 * (at connect() time an unbound socket has no source port yet). */
static __always_inline __u32 lb_flow_hash(struct bpf_sock_addr *ctx, __u64 cookie)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 port;

	if (!sk)
		return jhash_3words((__u32)cookie, (__u32)(cookie >> 32), 0, 0);
	port = sk->src_port;
	if (!port)
		return jhash_3words((__u32)cookie, (__u32)(cookie >> 32), 0, 0);
	if (sk->family == AF_INET)
		return jhash_3words(sk->src_ip4, port, 0, 1);
	return jhash_3words(sk->src_ip6[0] ^ sk->src_ip6[1], sk->src_ip6[2] ^ sk->src_ip6[3], port, 2);
}

static __always_inline int lb_maglev_pick(const struct lb_service *m, __u32 flow, __u32 *id)
{
	__u32 zero = 0, k, *v;
	struct lb_config *cfg;
	__u64 idx;
	__u32 mm;

	cfg = bpf_map_lookup_elem(&kln_lb_config, &zero);
	if (!cfg)
		return -1;
	mm = cfg->maglev_m;
	if (!mm)
		return -1;
	idx = ((__u64)m->service_id * 2 + (m->rev & 1)) * mm +
	      jhash_3words(flow, m->service_id, 0, 0) % mm;
	if (idx > 0xffffffffULL)
		return -1;
	k = (__u32)idx;
	v = bpf_map_lookup_elem(&kln_lb_maglev, &k);
	if (!v || !*v)
		return -1;
	*id = *v;
	return 0;
}

/* Smallest slot i in 1..count with target < cumulative_weight(i). */
static __always_inline int lb_weighted_slot(void *svc_map, void *key, __u16 *slot,
					    const struct lb_service *m, __u32 *out)
{
	__u32 lo = 1, hi = m->count, mid, target, i;
	struct lb_service *s;

	if (!m->weight)
		return -1;
	target = bpf_get_prandom_u32() % m->weight;
	for (i = 0; i < LB_WEIGHT_SEARCH_STEPS; i++) {
		if (lo >= hi)
			break;
		mid = lo + ((hi - lo) >> 1);
		*slot = (__u16)mid;
		s = bpf_map_lookup_elem(svc_map, key);
		if (!s)
			return -1;
		if (target < s->weight)
			hi = mid;
		else
			lo = mid + 1;
	}
	*out = lo;
	return 0;
}

/* Backend id for a service whose master copy is *m (m->count > 0); ``flow`` is the Maglev flow hash
 * (the socket hooks: lb_flow_hash(); the edge, nodeport.h: a hash of the packet's 5-tuple). */
static __always_inline int lb_select_flow(void *svc_map, void *key, __u16 *slot, const struct lb_service *m,
					  __u32 flow, __u32 *id)
{
	__u32 n = 0;

	if (m->algorithm == LB_ALG_MAGLEV) {
		if (lb_maglev_pick(m, flow, id) == 0)
			return 0;
	} else if (m->algorithm == LB_ALG_WEIGHTED) {
		if (lb_weighted_slot(svc_map, key, slot, m, &n) == 0)
			goto lookup;
	}
	n = bpf_get_prandom_u32() % m->count + 1;
lookup:
	if (lb_slot_backend(svc_map, key, slot, n, id) == 0)
		return 0;
	if (n != 1 && lb_slot_backend(svc_map, key, slot, 1, id) == 0)
		return 0;
	return -1;
}

static __always_inline int lb_select(struct bpf_sock_addr *ctx, void *svc_map, void *key,
				     __u16 *slot, const struct lb_service *m, __u64 cookie, __u32 *id)
{
	return lb_select_flow(svc_map, key, slot, m, m->algorithm == LB_ALG_MAGLEV ? lb_flow_hash(ctx, cookie) : 0, id);
}

/* ---- session affinity: per client netns and service ------------------------ */

static __always_inline __u32 lb_affinity_get(struct bpf_sock_addr *ctx,
					     const struct lb_service *m, __u64 now)
{
	struct lb_affinity_key k = {};
	struct lb_affinity *v;

	k.client_cookie = bpf_get_netns_cookie(ctx);
	k.service_id = m->service_id;
	v = bpf_map_lookup_elem(&kln_lb_affinity, &k);
	if (!v)
		return 0;
	if (now - v->last_used > (__u64)m->affinity_timeout * NSEC_PER_SEC)
		return 0;
	v->last_used = now;
	return v->backend_id;
}

static __always_inline void lb_affinity_put(struct bpf_sock_addr *ctx,
					    const struct lb_service *m, __u32 id, __u64 now)
{
	struct lb_affinity_key k = {};
	struct lb_affinity v = {};

	k.client_cookie = bpf_get_netns_cookie(ctx);
	k.service_id = m->service_id;
	v.backend_id = id;
	v.last_used = now;
	bpf_map_update_elem(&kln_lb_affinity, &k, &v, BPF_ANY);
}

/* ---- family-specific forward translation ----------------------------------- */

/* The two functions are the same algorithm; only the map and key types differ. */
#define LB_FWD_BODY(SVC_MAP, BE_MAP, BE_TYPE)                                          \
	struct lb_service *svc, m;                                                     \
	BE_TYPE *be = NULL;                                                            \
	__u64 now = 0, cookie;                                                         \
	__u32 id = 0;                                                                  \
                                                                                       \
	svc = bpf_map_lookup_elem(&SVC_MAP, &key);                                     \
	if (!svc)                                                                      \
		return LB_PASS;                                                        \
	m = *svc;                                                                      \
	if (!m.count)                                                                  \
		return LB_REJECT;                                                      \
	/* cookie only for sockets that talk to a service */                          \
	cookie = bpf_get_socket_cookie(ctx);                                           \
	*cookie_out = cookie;                                                          \
	if (m.flags & LB_SVC_F_AFFINITY) {                                             \
		now = bpf_ktime_get_ns();                                              \
		id = lb_affinity_get(ctx, &m, now);                                    \
		if (id) {                                                              \
			be = bpf_map_lookup_elem(&BE_MAP, &id);                        \
			if (be)                                                        \
				goto found;                                            \
		}                                                                      \
	}                                                                              \
	if (lb_select(ctx, &SVC_MAP, &key, &key.backend_slot, &m, cookie, &id))             \
		return LB_REJECT;                                                      \
	be = bpf_map_lookup_elem(&BE_MAP, &id);                                        \
	if (!be) {                                                                     \
		if (lb_slot_backend(&SVC_MAP, &key, &key.backend_slot, 1, &id))        \
			return LB_REJECT;                                              \
		be = bpf_map_lookup_elem(&BE_MAP, &id);                                \
		if (!be)                                                               \
			return LB_REJECT;                                              \
	}                                                                              \
	if (m.flags & LB_SVC_F_AFFINITY)                                               \
		lb_affinity_put(ctx, &m, id, now);                                     \
found:                                                                                 \
	*out = *be;                                                                    \
	*service_id = m.service_id;                                                    \
	return LB_XLATE;

static __always_inline int lb4_fwd(struct bpf_sock_addr *ctx, __be32 vip, __be16 vport,
				   __u8 proto, __u64 *cookie_out, struct lb4_backend *out,
				   __u16 *service_id)
{
	struct lb4_key key = {};

	key.address = vip;
	key.dport = vport;
	key.proto = proto;
	LB_FWD_BODY(kln_lb4_svc, kln_lb4_backend, struct lb4_backend)
}

static __always_inline int lb6_fwd(struct bpf_sock_addr *ctx, const __be32 vip[4],
				   __be16 vport, __u8 proto, __u64 *cookie_out,
				   struct lb6_backend *out, __u16 *service_id)
{
	struct lb6_key key = {};

	key.address[0] = vip[0];
	key.address[1] = vip[1];
	key.address[2] = vip[2];
	key.address[3] = vip[3];
	key.dport = vport;
	key.proto = proto;
	LB_FWD_BODY(kln_lb6_svc, kln_lb6_backend, struct lb6_backend)
}

/* ---- reverse translation records -------------------------------------------- */
#ifndef KLN_LB_NO_SOCK_REVNAT

static __always_inline void lb4_revnat_put(__u64 cookie, const struct lb4_backend *be,
					   __be32 vip, __be16 vport, __u16 sid)
{
	struct lb4_revnat_key k = {};
	struct lb4_revnat v = {}, *old;

	k.cookie = cookie;
	k.address = be->address;
	k.port = be->port;
	v.address = vip;
	v.port = vport;
	v.service_id = sid;
	old = bpf_map_lookup_elem(&kln_lb4_revnat, &k);
	if (old && old->address == v.address && old->port == v.port &&
	    old->service_id == v.service_id)
		return;
	bpf_map_update_elem(&kln_lb4_revnat, &k, &v, BPF_ANY);
}

static __always_inline void lb6_revnat_put(__u64 cookie, const struct lb6_backend *be,
					   const __be32 vip[4], __be16 vport, __u16 sid)
{
	struct lb6_revnat_key k = {};
	struct lb6_revnat v = {}, *old;

	k.cookie = cookie;
	k.address[0] = be->address[0];
	k.address[1] = be->address[1];
	k.address[2] = be->address[2];
	k.address[3] = be->address[3];
	k.port = be->port;
	v.address[0] = vip[0];
	v.address[1] = vip[1];
	v.address[2] = vip[2];
	v.address[3] = vip[3];
	v.port = vport;
	v.service_id = sid;
	old = bpf_map_lookup_elem(&kln_lb6_revnat, &k);
	if (old && old->address[0] == v.address[0] && old->address[1] == v.address[1] &&
	    old->address[2] == v.address[2] && old->address[3] == v.address[3] &&
	    old->port == v.port && old->service_id == v.service_id)
		return;
	bpf_map_update_elem(&kln_lb6_revnat, &k, &v, BPF_ANY);
}

/* Reverse lookups: 0 and *out filled if the address is a backend this socket was
 * sent to on behalf of a service that still exists. A stale entry (service
 * deleted) is removed and the real peer is reported. */
static __always_inline int lb4_revnat_get(__u64 cookie, __be32 addr, __be16 port,
					  __u8 proto, struct lb4_revnat *out)
{
	struct lb4_revnat_key k = {};
	struct lb4_key sk = {};
	struct lb4_revnat *v;

	k.cookie = cookie;
	k.address = addr;
	k.port = port;
	v = bpf_map_lookup_elem(&kln_lb4_revnat, &k);
	if (!v)
		return -1;
	*out = *v;
	sk.address = out->address;
	sk.dport = out->port;
	sk.proto = proto;
	if (!bpf_map_lookup_elem(&kln_lb4_svc, &sk)) {
		bpf_map_delete_elem(&kln_lb4_revnat, &k);
		return -1;
	}
	return 0;
}

static __always_inline int lb6_revnat_get(__u64 cookie, const __be32 addr[4], __be16 port,
					  __u8 proto, struct lb6_revnat *out)
{
	struct lb6_revnat_key k = {};
	struct lb6_key sk = {};
	struct lb6_revnat *v;

	k.cookie = cookie;
	k.address[0] = addr[0];
	k.address[1] = addr[1];
	k.address[2] = addr[2];
	k.address[3] = addr[3];
	k.port = port;
	v = bpf_map_lookup_elem(&kln_lb6_revnat, &k);
	if (!v)
		return -1;
	*out = *v;
	sk.address[0] = out->address[0];
	sk.address[1] = out->address[1];
	sk.address[2] = out->address[2];
	sk.address[3] = out->address[3];
	sk.dport = out->port;
	sk.proto = proto;
	if (!bpf_map_lookup_elem(&kln_lb6_svc, &sk)) {
		bpf_map_delete_elem(&kln_lb6_revnat, &k);
		return -1;
	}
	return 0;
}

#endif /* KLN_LB_NO_SOCK_REVNAT */

#endif /* KLN_LB_H */
