// SPDX-License-Identifier: GPL-2.0
/* The sink, on the PGWs' end of the veth: counts each generator datagram
 * that a forwarder delivered by destination address and port, checks its
 * IPv4 header and UDP checksums (counting the bad ones), puts its
 * one-way latency (now - the generator's timestamp, both CLOCK_MONOTONIC on
 * one machine) in a histogram, and drops it before the kernel spends
 * anything on it. Everything else (ARP, registrations, ICMP) passes. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "bench.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, BENCH_MAX_DESTS);
	__type(key, struct bench_dest);
	__type(value, __u64);
} dest_packets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BENCH_HIST_BUCKETS);
	__type(key, __u32);
	__type(value, __u64);
} latency_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SINK_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} sink_counters SEC(".maps");

static __always_inline void bump(void *map, __u32 key)
{
	__u64 *value = bpf_map_lookup_elem(map, &key);

	if (value)
		*value += 1;
}

static __always_inline __u32 highest_bit(__u64 v)
{
	__u32 bit = 0;

	if (v >> 32) { v >>= 32; bit += 32; }
	if (v >> 16) { v >>= 16; bit += 16; }
	if (v >> 8) { v >>= 8; bit += 8; }
	if (v >> 4) { v >>= 4; bit += 4; }
	if (v >> 2) { v >>= 2; bit += 2; }
	if (v >> 1)
		bit += 1;
	return bit;
}

/* Ones' complement sum of n 16-bit words in memory order, not folded; the
 * caller has checked that they lie inside the packet. */
static __always_inline __u64 sum_words(const void *start, int n)
{
	const __u16 *word = start;
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < n; i++)
		sum += word[i];
	return sum;
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Whether the datagram's IPv4 header and UDP checksums hold. A zero UDP
 * checksum is legal IPv4 but the generator never sends one: a forwarder
 * that zeroes it counts as bad here. */
static __always_inline void check_sums(struct iphdr *ip, struct udphdr *udp)
{
	__u64 sum;

	if (fold(sum_words(ip, 10)) != 0xffff)
		bump(&sink_counters, SINK_BAD_IP_SUM);

	if (udp->check == 0 || udp->len != bpf_htons(BENCH_UDP_LEN)) {
		bump(&sink_counters, SINK_BAD_UDP_SUM);
		return;
	}
	/* Pseudo header (addresses, protocol, UDP length), then the datagram. */
	sum = sum_words(&ip->saddr, 4) + bpf_htons(IPPROTO_UDP) + udp->len;
	sum += sum_words(udp, BENCH_UDP_LEN / 2);
	if (fold(sum) != 0xffff)
		bump(&sink_counters, SINK_BAD_UDP_SUM);
}

static __always_inline __u32 hist_bucket(__u64 ns)
{
	__u32 top;

	if (ns < BENCH_HIST_SUB)
		return ns;
	top = highest_bit(ns);
	return (top - 3) * BENCH_HIST_SUB + ((ns >> (top - 4)) & (BENCH_HIST_SUB - 1));
}

SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + BENCH_IP_OFF;
	struct udphdr *udp = data + BENCH_UDP_OFF;
	struct bench_dest dest = {};
	__u64 sent, now, *count;
	__u32 magic;

	/* Only IPv4/UDP without options that carries our magic number. */
	if (data + BENCH_FRAME_LEN > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_UDP) {
		bump(&sink_counters, SINK_PASSED);
		return XDP_PASS;
	}
	__builtin_memcpy(&magic, data + BENCH_MAGIC_OFF, 4);
	if (magic != bpf_htonl(BENCH_MAGIC)) {
		bump(&sink_counters, SINK_PASSED);
		return XDP_PASS;
	}

	/* Count by destination */
	dest.addr = ip->daddr;
	dest.port = udp->dest;
	count = bpf_map_lookup_elem(&dest_packets, &dest);
	if (count) {
		*count += 1;
	} else {
		__u64 one = 1;

		bpf_map_update_elem(&dest_packets, &dest, &one, BPF_NOEXIST);
	}
	bump(&sink_counters, SINK_COUNTED);
	check_sums(ip, udp);

	/* Latency */
	__builtin_memcpy(&sent, data + BENCH_TS_OFF, 8);
	now = bpf_ktime_get_ns();
	if (sent > now) {
		bump(&sink_counters, SINK_CLOCK_SKEW);
		return XDP_DROP;
	}
	bump(&latency_hist, hist_bucket(now - sent));
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
