// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kldload.netstack socket-level service load balancing (ClusterIP without
 * iptables): cgroup sock_addr programs that rewrite VIP:port to a backend at
 * connect()/sendmsg() time and rewrite it back at recvmsg()/getpeername().
 *
 *   connect4/6      TCP and connected UDP          -> backend, record reverse
 *   sendmsg4/6      unconnected UDP (sendto/sendmsg) -> backend, record reverse
 *   recvmsg4/6      UDP recvfrom/recvmsg source     -> VIP
 *   getpeername4/6  getpeername()                   -> VIP
 *
 * IPv4-mapped IPv6 addresses (::ffff:a.b.c.d on AF_INET6 sockets) are looked up
 * in the IPv4 maps by the *6 hooks. (An AF_INET6 UDP socket sending to a mapped
 * address runs the sendmsg4 hook: the kernel hands it to udp_sendmsg.)
 *
 * Return values: connect/sendmsg: 1 = proceed, 0 = EPERM (service with no
 * backends); recvmsg/getpeername must always return 1.
 */
#include "lib/common.h"
#include "lib/lb_structs.h"
#include "lib/lb_maps.h"
#include "lib/lb.h"
#include "lib/flow.h"

static __always_inline int ctx_ip6_is_v4mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

/* ---- IPv4 ------------------------------------------------------------------ */

static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx)
{
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;
	struct lb4_backend be;
	__u16 sid = 0;
	__u64 cookie = 0;
	int ret;

	ret = lb4_fwd(ctx, vip, vport, (__u8)ctx->protocol, &cookie, &be, &sid);
	if (ret == LB_PASS)
		return SYS_PROCEED;
	if (ret == LB_REJECT) {
		flow_sock(ctx, DROP_NO_SERVICE, vip, vport, 0, 0, 0);
		return SYS_REJECT;
	}
	ctx->user_ip4 = be.address;
	ctx->user_port = (__u32)be.port;
	lb4_revnat_put(cookie, &be, vip, vport, sid);
	flow_sock(ctx, 0, vip, vport, be.address, be.port, sid);
	return SYS_PROCEED;
}

static __always_inline int sock4_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_revnat v;

	if (lb4_revnat_get(bpf_get_socket_cookie(ctx), ctx->user_ip4,
			   (__be16)ctx->user_port, (__u8)ctx->protocol, &v) == 0) {
		ctx->user_ip4 = v.address;
		ctx->user_port = (__u32)v.port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int kln_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int kln_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int kln_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

SEC("cgroup/getpeername4")
int kln_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

/* ---- IPv6 (and IPv4-mapped on AF_INET6 sockets) ------------------------------ */

static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx)
{
	__be16 vport = (__be16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;
	__u16 sid = 0;
	__u64 cookie = 0;
	int ret;

	if (ctx_ip6_is_v4mapped(ctx)) {
		__be32 vip4 = ctx->user_ip6[3];
		struct lb4_backend be4;

		ret = lb4_fwd(ctx, vip4, vport, proto, &cookie, &be4, &sid);
		if (ret == LB_PASS)
			return SYS_PROCEED;
		if (ret == LB_REJECT) {
			flow_sock(ctx, DROP_NO_SERVICE, vip4, vport, 0, 0, 0);
			return SYS_REJECT;
		}
		ctx->user_ip6[3] = be4.address;
		ctx->user_port = (__u32)be4.port;
		lb4_revnat_put(cookie, &be4, vip4, vport, sid);
		flow_sock(ctx, 0, vip4, vport, be4.address, be4.port, sid);
		return SYS_PROCEED;
	} else {
		__be32 vip[4];
		struct lb6_backend be6;

		vip[0] = ctx->user_ip6[0];
		vip[1] = ctx->user_ip6[1];
		vip[2] = ctx->user_ip6[2];
		vip[3] = ctx->user_ip6[3];
		ret = lb6_fwd(ctx, vip, vport, proto, &cookie, &be6, &sid);
		if (ret == LB_PASS)
			return SYS_PROCEED;
		if (ret == LB_REJECT)
			return SYS_REJECT;
		ctx->user_ip6[0] = be6.address[0];
		ctx->user_ip6[1] = be6.address[1];
		ctx->user_ip6[2] = be6.address[2];
		ctx->user_ip6[3] = be6.address[3];
		ctx->user_port = (__u32)be6.port;
		lb6_revnat_put(cookie, &be6, vip, vport, sid);
		return SYS_PROCEED;
	}
}

static __always_inline int sock6_rev(struct bpf_sock_addr *ctx)
{
	__be16 port = (__be16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (ctx_ip6_is_v4mapped(ctx)) {
		struct lb4_revnat v4;

		if (lb4_revnat_get(cookie, ctx->user_ip6[3], port, proto, &v4) == 0) {
			ctx->user_ip6[3] = v4.address;
			ctx->user_port = (__u32)v4.port;
		}
	} else {
		struct lb6_revnat v6;
		__be32 addr[4];

		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
		if (lb6_revnat_get(cookie, addr, port, proto, &v6) == 0) {
			ctx->user_ip6[0] = v6.address[0];
			ctx->user_ip6[1] = v6.address[1];
			ctx->user_ip6[2] = v6.address[2];
			ctx->user_ip6[3] = v6.address[3];
			ctx->user_port = (__u32)v6.port;
		}
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int kln_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

SEC("cgroup/sendmsg6")
int kln_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

SEC("cgroup/recvmsg6")
int kln_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}

SEC("cgroup/getpeername6")
int kln_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
