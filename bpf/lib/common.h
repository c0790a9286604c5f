/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Common includes and small helpers. UAPI headers + libbpf-dev only. */
#ifndef KLN_COMMON_H
#define KLN_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Return codes of cgroup sock_addr programs. */
#define SYS_REJECT  0   /* connect()/sendmsg() fails with EPERM */
#define SYS_PROCEED 1

#define NSEC_PER_SEC 1000000000ULL

/* Map pinning: none by default (the loader pins by name); PIN_BY_NAME=1 for libbpf loaders. */
#ifdef KLN_PIN_BY_NAME
#define KLN_PINNING __uint(pinning, LIBBPF_PIN_BY_NAME);
#else
#define KLN_PINNING
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* ``len`` (a constant) bytes at ``off`` of a tc program's packet into ``to``: straight from the linear data when
 * they are there (no helper call: the headers of a packet almost always are), else bpf_skb_load_bytes().
 * 0, or < 0 when the packet is shorter. */
#define KLN_PKT_MAX_OFF 256
static __always_inline int pkt_load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= KLN_PKT_MAX_OFF && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Jenkins hash (include/linux/jhash.h), enough for Maglev bucket selection. */
#define __rol32(w, s) (((w) << (s)) | ((w) >> (32 - (s))))
#define __jhash_final(a, b, c)              \
	do {                                \
		c ^= b; c -= __rol32(b, 14); \
		a ^= c; a -= __rol32(c, 11); \
		b ^= a; b -= __rol32(a, 25); \
		c ^= b; c -= __rol32(b, 16); \
		a ^= c; a -= __rol32(c, 4);  \
		b ^= a; b -= __rol32(a, 14); \
		c ^= b; c -= __rol32(b, 24); \
	} while (0)
#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += JHASH_INITVAL + (3 << 2) + initval;
	b += JHASH_INITVAL + (3 << 2) + initval;
	c += JHASH_INITVAL + (3 << 2) + initval;
	__jhash_final(a, b, c);
	return c;
}

#endif /* KLN_COMMON_H */
