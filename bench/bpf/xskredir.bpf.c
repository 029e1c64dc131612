// SPDX-License-Identifier: GPL-2.0
/* The bare AF_XDP forwarder's filter: the same test as pgwfwd's XDP program
 * (IPv4 UDP to VIP:gtp-port, not a fragment), then the AF_XDP socket of the
 * receive queue; everything else to the kernel. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "bench.h"

#define IP_FRAGMENT_MASK 0x3fff

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

/* Set by the loader before loading; network byte order. */
const volatile struct {
	__u32 vip;
	__u16 gtp_port;
	__u16 pad;
} cfg = {};

SEC("xdp")
int bench_xskredir(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 ||
	    ip->protocol != IPPROTO_UDP || ip->daddr != cfg.vip ||
	    (ip->frag_off & bpf_htons(IP_FRAGMENT_MASK)))
		return XDP_PASS;
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > data_end || udp->dest != cfg.gtp_port)
		return XDP_PASS;
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
