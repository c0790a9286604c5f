/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kldload.netstack socket load balancer: map key/value layouts.
 *
 * This header is the ONE place the layouts are defined. It is shared by the
 * BPF programs and by userspace (C includes it; Python reads the "py:" lines).
 *
 * Conventions
 *  - Every struct is packed by construction (explicit padding, natural
 *    alignment, no implicit holes); _Static_assert below pins size and offsets.
 *  - Fields named address / port / dport hold NETWORK byte order bytes exactly as
 *    in struct sockaddr_in/_in6. Python packs them as raw bytes ("4s", "16s",
 *    "2s", e.g. socket.inet_pton(...) and port.to_bytes(2, "big")).
 *  - Every other integer is HOST byte order ("=" in Python's struct module:
 *    native byte order, standard sizes, no alignment).
 *  - Padding must be written as zero (it is part of hash keys).
 *  - Each "py:" line is machine-readable:   py: NAME FORMAT  (size N)
 *    bpf/tools/lbctl.py parses these lines; selftest.sh compares the sizes with
 *    the BTF of the compiled object.
 *
 * Services map (kln_lb4_svc / kln_lb6_svc, BPF_MAP_TYPE_HASH, no prealloc)
 *  key   {VIP, port, slot, protocol}; value struct lb_service.
 *  slot 0 = master: count (number of backend slots, 0 = reject), service_id,
 *           algorithm, flags, total weight, affinity timeout, rev.
 *  slot i (1..count) = backend_id of slot i (+ cumulative weight for
 *           LB_ALG_WEIGHTED). Write order: backends, slots, Maglev half, master
 *           LAST (see bpf/README.md).
 */
#ifndef KLN_LB_STRUCTS_H
#define KLN_LB_STRUCTS_H

#include <linux/types.h>

/* ---- constants ---------------------------------------------------------- */

/* lb_service.algorithm (master slot) */
#define LB_ALG_RANDOM    0  /* uniform over slots 1..count (bpf_get_prandom_u32) */
#define LB_ALG_MAGLEV    1  /* service's Maglev table half (rev & 1), hash of socket cookie */
#define LB_ALG_WEIGHTED  2  /* binary search over cumulative slot weights */

/* lb_service.flags (master slot) */
#define LB_SVC_F_AFFINITY 0x01  /* session affinity per client netns, affinity_timeout seconds */
#define LB_SVC_F_EXTERNAL 0x02  /* also answered at the node's edge (LoadBalancer IP, NodePort): nodeport.c */
#define LB_SVC_F_LOCAL    0x04  /* externalTrafficPolicy Local: local backends only, client address kept */

/* lb_config.flags */
#define LB_CFG_F_NONE     0x00

/* Service ids are 1..65535, one id space for IPv4 and IPv6 services. 0 = invalid. */

/* ---- services ----------------------------------------------------------- */

/* py: lb4_key =4s2sHB3x  (size 12)
 *  off 0  address[4]    VIP, network order
 *  off 4  dport[2]      VIP port, network order
 *  off 6  backend_slot  u16 host order, 0 = master
 *  off 8  proto         u8  IPPROTO_TCP (6) / IPPROTO_UDP (17)
 *  off 9  pad[3]        zero
 */
struct lb4_key {
	__be32 address;
	__be16 dport;
	__u16 backend_slot;
	__u8 proto;
	__u8 pad[3];
};

/* py: lb6_key =16s2sHB3x  (size 24)
 *  off 0  address[16]   VIP, network order
 *  off 16 dport[2]      network order
 *  off 18 backend_slot  u16
 *  off 20 proto         u8
 *  off 21 pad[3]        zero
 */
struct lb6_key {
	__be32 address[4];
	__be16 dport;
	__u16 backend_slot;
	__u8 proto;
	__u8 pad[3];
};

/* py: lb_service =IHHBBHII  (size 20)
 *                      master slot (0)                 backend slot (1..count)
 *  off 0  backend_id   0                               backend id (u32)
 *  off 4  count        number of slots (0 = reject)    0
 *  off 6  service_id   1..65535                        same service_id (informational)
 *  off 8  algorithm    LB_ALG_*                        0
 *  off 9  flags        LB_SVC_F_*                      0
 *  off 10 weight       total weight (WEIGHTED)         cumulative weight of slots 1..i (WEIGHTED)
 *  off 12 affinity_timeout  seconds (AFFINITY)         0
 *  off 16 rev          generation, +1 per commit;      0
 *                      Maglev half in use = rev & 1
 */
struct lb_service {
	__u32 backend_id;
	__u16 count;
	__u16 service_id;
	__u8 algorithm;
	__u8 flags;
	__u16 weight;
	__u32 affinity_timeout;
	__u32 rev;
};

/* ---- backends (kln_lb4_backend / kln_lb6_backend, HASH, key u32 id) ------ */

/* py: lb_backend_key =I  (size 4)   backend id, 1..2^32-1, own id space per family */

/* py: lb4_backend =4s2sBB  (size 8)
 *  off 0  address[4]  network order
 *  off 4  port[2]     network order
 *  off 6  proto       u8 (informational; the service decides)
 *  off 7  flags       u8, 0 (reserved)
 */
struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
};

/* py: lb6_backend =16s2sBB  (size 20)
 *  off 0  address[16] network order
 *  off 16 port[2]     network order
 *  off 18 proto       u8
 *  off 19 flags       u8, 0
 */
struct lb6_backend {
	__be32 address[4];
	__be16 port;
	__u8 proto;
	__u8 flags;
};

/* ---- reverse translation per socket (kln_lb4_revnat / kln_lb6_revnat, LRU) --
 * Written by connect/sendmsg, read by recvmsg/getpeername. Keyed by the socket
 * cookie AND the backend address, so one unconnected UDP socket can talk to
 * several services (and several backends of one service) at once.
 */

/* py: lb4_revnat_key =Q4s2sH  (size 16)
 *  off 0  cookie      u64 socket cookie
 *  off 8  address[4]  backend address, network order
 *  off 12 port[2]     backend port, network order
 *  off 14 pad         zero
 */
struct lb4_revnat_key {
	__u64 cookie;
	__be32 address;
	__be16 port;
	__u16 pad;
};

/* py: lb4_revnat =4s2sH  (size 8)
 *  off 0  address[4]  VIP
 *  off 4  port[2]     VIP port
 *  off 6  service_id  u16
 */
struct lb4_revnat {
	__be32 address;
	__be16 port;
	__u16 service_id;
};

/* py: lb6_revnat_key =Q16s2sHI  (size 32)
 *  off 0  cookie       u64
 *  off 8  address[16]  backend address
 *  off 24 port[2]      backend port
 *  off 26 pad          zero
 *  off 28 pad2         zero
 */
struct lb6_revnat_key {
	__u64 cookie;
	__be32 address[4];
	__be16 port;
	__u16 pad;
	__u32 pad2;
};

/* py: lb6_revnat =16s2sH  (size 20)
 *  off 0  address[16]  VIP
 *  off 16 port[2]      VIP port
 *  off 18 service_id   u16
 */
struct lb6_revnat {
	__be32 address[4];
	__be16 port;
	__u16 service_id;
};

/* ---- Maglev (kln_lb_maglev, ARRAY, key u32 index, value u32 backend id) ----
 * Flat array, two halves per service (double buffering):
 *   index = (service_id * 2 + (rev & 1)) * M + (hash % M)
 * M = lb_config.maglev_m (prime, e.g. 1021 / 16381). max_entries must be
 * >= (max_service_id + 1) * 2 * M. A 0 entry means "no table": random is used.
 *
 * py: lb_maglev_key =I  (size 4)
 * py: lb_maglev_val =I  (size 4)
 */

/* ---- session affinity (kln_lb_affinity, LRU_HASH) ------------------------ */

/* py: lb_affinity_key =QHHI  (size 16)
 *  off 0  client_cookie  u64 netns cookie of the client (bpf_get_netns_cookie)
 *  off 8  service_id     u16
 *  off 10 pad            zero
 *  off 12 pad2           zero
 */
struct lb_affinity_key {
	__u64 client_cookie;
	__u16 service_id;
	__u16 pad;
	__u32 pad2;
};

/* py: lb_affinity =IIQ  (size 16)
 *  off 0  backend_id  u32
 *  off 4  pad         zero
 *  off 8  last_used   u64 bpf_ktime_get_ns() (CLOCK_MONOTONIC ns) of last use
 */
struct lb_affinity {
	__u32 backend_id;
	__u32 pad;
	__u64 last_used;
};

/* ---- global config (kln_lb_config, ARRAY, 1 entry, key u32 0) ------------ */

/* py: lb_config_key =I  (size 4)   always 0 */

/* py: lb_config =II  (size 8)
 *  off 0  maglev_m  u32 Maglev table size M per half (0 = Maglev disabled)
 *  off 4  flags     u32 LB_CFG_F_*, 0
 */
struct lb_config {
	__u32 maglev_m;
	__u32 flags;
};

/* ---- userspace index (kln_lb_bidx, kln_lb_index): the programs never read it
 *
 * Kept by plugins/module_utils/lb.py so that one service can be changed with a
 * few point lookups instead of a dump of every map: which id a backend address
 * has and how many service slots use it, which service ids are taken, how full
 * the maps are. A full sync reads the maps themselves and rewrites the index;
 * an incremental change trusts it only while LB_IDX_F_VALID is set and the map
 * ids it recorded are still the pinned maps' ids (a recreated map drops it). */

#define LB_IDX_F_VALID 0x01  /* the last writer finished; cleared while a change is written */

/* py: lb_bidx_key =Bx2s16s  (size 20)
 *  off 0  family      u8 4 or 6
 *  off 1  pad         zero
 *  off 2  port[2]     backend port, network order
 *  off 4  address[16] backend address, network order (IPv4: 4 bytes, then zero)
 */
struct lb_bidx_key {
	__u8  family;
	__u8  pad;
	__be16 port;
	__u8  address[16];
};

/* py: lb_bidx =II  (size 8)
 *  off 0  backend_id  u32 key of the backend in kln_lb{4,6}_backend
 *  off 4  refs        u32 service slots that use it (0 = about to be deleted)
 */
struct lb_bidx {
	__u32 backend_id;
	__u32 refs;
};

/* py: lb_index =I6I2I2I2I8192s  (size 8244)
 *  off 0   flags            u32 LB_IDX_F_*
 *  off 4   map_ids[6]       kernel ids of kln_lb4_svc, kln_lb6_svc, kln_lb4_backend,
 *                           kln_lb6_backend, kln_lb_maglev, kln_lb_bidx when written
 *  off 28  svc_entries[2]   entries in kln_lb4_svc, kln_lb6_svc
 *  off 36  backends[2]      entries in kln_lb4_backend, kln_lb6_backend
 *  off 44  next_backend[2]  lowest backend id not tried yet, per family
 *  off 52  service_ids[8192] bitmap of service ids in use: bit (id & 7) of byte id >> 3
 */
struct lb_index {
	__u32 flags;
	__u32 map_ids[6];
	__u32 svc_entries[2];
	__u32 backends[2];
	__u32 next_backend[2];
	__u8  service_ids[8192];
};

/* ---- layout checks (compile time, both BPF and userspace C) -------------- */
#define KLN_OFF(t, m) __builtin_offsetof(t, m)
_Static_assert(sizeof(struct lb4_key) == 12, "lb4_key");
_Static_assert(KLN_OFF(struct lb4_key, proto) == 8, "lb4_key.proto");
_Static_assert(sizeof(struct lb6_key) == 24, "lb6_key");
_Static_assert(KLN_OFF(struct lb6_key, proto) == 20, "lb6_key.proto");
_Static_assert(sizeof(struct lb_service) == 20, "lb_service");
_Static_assert(KLN_OFF(struct lb_service, rev) == 16, "lb_service.rev");
_Static_assert(sizeof(struct lb4_backend) == 8, "lb4_backend");
_Static_assert(sizeof(struct lb6_backend) == 20, "lb6_backend");
_Static_assert(sizeof(struct lb4_revnat_key) == 16, "lb4_revnat_key");
_Static_assert(sizeof(struct lb4_revnat) == 8, "lb4_revnat");
_Static_assert(sizeof(struct lb6_revnat_key) == 32, "lb6_revnat_key");
_Static_assert(KLN_OFF(struct lb6_revnat_key, port) == 24, "lb6_revnat_key.port");
_Static_assert(sizeof(struct lb6_revnat) == 20, "lb6_revnat");
_Static_assert(sizeof(struct lb_affinity_key) == 16, "lb_affinity_key");
_Static_assert(sizeof(struct lb_affinity) == 16, "lb_affinity");
_Static_assert(sizeof(struct lb_config) == 8, "lb_config");
_Static_assert(sizeof(struct lb_bidx_key) == 20, "lb_bidx_key");
_Static_assert(sizeof(struct lb_bidx) == 8, "lb_bidx");
_Static_assert(sizeof(struct lb_index) == 8244, "lb_index");
_Static_assert(KLN_OFF(struct lb_index, service_ids) == 52, "lb_index.service_ids");

#endif /* KLN_LB_STRUCTS_H */
