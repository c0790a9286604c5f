/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map definitions. Names are <= 15 characters so the kernel's map name, the
 * ELF name, bpftool's "map name NAME" and the pin file name are the same.
 *
 * Sizes: the defaults below can be changed at compile time (-DLB4_SVC_MAP_SIZE=...)
 * and, without recompiling, at load time: the loader creates the maps itself
 * with the sizes it wants, pins them, and loads the programs with
 *   bpftool prog loadall OBJ DIR map name kln_lb4_svc pinned MAPDIR/kln_lb4_svc ...
 * (libbpf then takes max_entries from the existing map). See bpf/README.md.
 *
 * Pinning: by default maps carry no libbpf pinning attribute and the loader pins
 * them by name (bpftool ... pinmaps MAPDIR, or bpftool map create MAPDIR/NAME).
 * Build with PIN_BY_NAME=1 to get __uint(pinning, LIBBPF_PIN_BY_NAME) for
 * libbpf loaders that set pin_root_path (bpftool always uses /sys/fs/bpf then).
 */
#ifndef KLN_LB_MAPS_H
#define KLN_LB_MAPS_H

#include "common.h"
#include "lb_structs.h"

#ifndef LB4_SVC_MAP_SIZE
#define LB4_SVC_MAP_SIZE 65536
#endif
#ifndef LB6_SVC_MAP_SIZE
#define LB6_SVC_MAP_SIZE 65536
#endif
#ifndef LB4_BACKEND_MAP_SIZE
#define LB4_BACKEND_MAP_SIZE 65536
#endif
#ifndef LB6_BACKEND_MAP_SIZE
#define LB6_BACKEND_MAP_SIZE 65536
#endif
#ifndef LB4_REVNAT_MAP_SIZE
#define LB4_REVNAT_MAP_SIZE 262144
#endif
#ifndef LB6_REVNAT_MAP_SIZE
#define LB6_REVNAT_MAP_SIZE 262144
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536
#endif
#ifndef LB_BIDX_MAP_SIZE
#define LB_BIDX_MAP_SIZE 131072
#endif
/* 64 service ids * 2 halves * M=16381 (8 MiB): up to 63 Maglev services; size it with the loader. */
#ifndef LB_MAGLEV_MAP_SIZE
#define LB_MAGLEV_MAP_SIZE (64 * 2 * 16381)
#endif

/* Hash maps written by userspace use BPF_F_NO_PREALLOC: a replaced element is
 * freed only after an RCU grace period, so a program that looked it up keeps a
 * consistent copy (preallocated hash elements are recycled at once). */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB4_SVC_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb6_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB6_SVC_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_lb6_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB4_BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_lb4_backend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb6_backend);
	__uint(max_entries, LB6_BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_lb6_backend SEC(".maps");

/* The socket-reverse maps are the socket LB's own; objects that only read the service table (the edge,
 * nodeport.c) define KLN_LB_NO_SOCK_REVNAT and do not carry them. */
#ifndef KLN_LB_NO_SOCK_REVNAT
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_revnat_key);
	__type(value, struct lb4_revnat);
	__uint(max_entries, LB4_REVNAT_MAP_SIZE);
	KLN_PINNING
} kln_lb4_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb6_revnat_key);
	__type(value, struct lb6_revnat);
	__uint(max_entries, LB6_REVNAT_MAP_SIZE);
	KLN_PINNING
} kln_lb6_revnat SEC(".maps");
#endif /* KLN_LB_NO_SOCK_REVNAT */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, LB_MAGLEV_MAP_SIZE);
	KLN_PINNING
} kln_lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	KLN_PINNING
} kln_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
	KLN_PINNING
} kln_lb_config SEC(".maps");

/* The userspace index (lb_structs.h): no program reads these two maps. They
 * live in the object so that the loader creates, sizes, pins and removes them
 * with the rest, and a recreated map set never meets a stale index. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_bidx_key);
	__type(value, struct lb_bidx);
	__uint(max_entries, LB_BIDX_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	KLN_PINNING
} kln_lb_bidx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_index);
	__uint(max_entries, 1);
	KLN_PINNING
} kln_lb_index SEC(".maps");

#endif /* KLN_LB_MAPS_H */
