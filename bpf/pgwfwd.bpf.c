// SPDX-License-Identifier: GPL-2.0
/* pgwfwd's XDP program: hand IPv4 UDP datagrams for VIP:gtp-port to the
 * AF_XDP socket of the receive queue; let everything else through to the
 * kernel untouched, so ARP, ICMP, registrations and the rest behave as if
 * pgwfwd were not there. GTP-U that an AF_XDP socket cannot take (IPv4
 * fragments, frames longer than a UMEM frame) goes to the kernel too, where
 * pgwfwd's slow-path socket picks it up. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "pgwfwd_shared.h"

#define MAX_QUEUES 64
#define IP_FRAGMENT_MASK 0x3fff  /* MF flag and fragment offset */

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdp_counters SEC(".maps");

const volatile struct pgwfwd_xdp_settings settings = {};

static __always_inline int count(__u32 counter, int verdict)
{
	__u64 *value = bpf_map_lookup_elem(&xdp_counters, &counter);

	if (value)
		*value += 1;
	return verdict;
}

SEC("xdp")
int pgwfwd_xdp(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;
	__u32 queue;

	/* Ethernet */
	if ((void *)(eth + 1) > data_end ||
	    eth->h_proto != bpf_htons(ETH_P_IP))
		return count(XDP_CNT_PASSED, XDP_PASS);

	/* IPv4 to the VIP */
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 ||
	    ip->protocol != IPPROTO_UDP || ip->daddr != settings.vip)
		return count(XDP_CNT_PASSED, XDP_PASS);

	/* Fragments carry no UDP header past the first; the kernel
	 * reassembles them and pgwfwd's slow path sees the datagram. */
	if (ip->frag_off & bpf_htons(IP_FRAGMENT_MASK))
		return count(XDP_CNT_FRAGMENTS, XDP_PASS);

	/* UDP to the GTP-U port; the C loop checks the lengths. */
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > data_end || udp->dest != settings.gtp_port)
		return count(XDP_CNT_PASSED, XDP_PASS);

	/* A frame longer than a UMEM frame holds would be dropped by the
	 * socket; the kernel's own stack takes it, like a fragment. */
	if (data_end - data > settings.max_frame_len)
		return count(XDP_CNT_TOO_BIG, XDP_PASS);

	/* AF_XDP socket of this queue, if pgwfwd runs one there */
	queue = ctx->rx_queue_index;
	if (!bpf_map_lookup_elem(&xsks_map, &queue))
		return count(XDP_CNT_NO_SOCKET, XDP_PASS);
	count(XDP_CNT_REDIRECTED, 0);
	return bpf_redirect_map(&xsks_map, queue, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
