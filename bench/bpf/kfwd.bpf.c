// SPDX-License-Identifier: GPL-2.0
/* The in-kernel forwarder: pgwfwd's selection and rewrite done in XDP and
 * sent back out of the same interface with XDP_TX (the kernel's limit on
 * this machine). Selection: a slot array of PGW indices, walked with one
 * cursor per CPU, as pgwfwd walks it with one cursor per queue. Rewrite:
 * Ethernet addresses, IPv4 addresses and TTL with a fresh header checksum,
 * UDP ports with an incremental checksum update (a zero checksum stays 0).
 *
 * XXX: IPv4 options and a UDP checksum left partial by a local sender are
 * not handled (pgwfwd handles both); the generator sends neither, so the
 * comparison is fair, but this is no product.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "bench.h"

#define IP_FRAGMENT_MASK 0x3fff

const volatile struct bench_kfwd_config cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX_PGWS);
	__type(key, __u32);
	__type(value, struct bench_pgw);
} pgws SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cursors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KFWD_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} kfwd_counters SEC(".maps");

static __always_inline int count(__u32 counter, int verdict)
{
	__u64 *value = bpf_map_lookup_elem(&kfwd_counters, &counter);

	if (value)
		*value += 1;
	return verdict;
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u64 ip_header_sum(const __u16 *words)
{
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < 10; i++)
		sum += words[i];
	return sum;
}

/* RFC 1624 eqn. 3 for a 32-bit field */
static __always_inline __u64 replace32(__u64 sum, __u32 old, __u32 new)
{
	return sum + (__u16)~(old & 0xffff) + (__u16)~(old >> 16) +
	       (new & 0xffff) + (new >> 16);
}

static __always_inline __u64 replace16(__u64 sum, __u16 old, __u16 new)
{
	return sum + (__u16)~old + new;
}

SEC("xdp")
int bench_kfwd(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct bench_pgw *pgw;
	__u32 zero = 0, *cursor, *slot, index, old_saddr, old_daddr;
	__u16 old_sport, old_dport, tot_len;
	__u64 sum;
	int i;

	/* IPv4 UDP to VIP:gtp-port, as pgwfwd's filter */
	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    ip->daddr != cfg.vip || (ip->frag_off & bpf_htons(IP_FRAGMENT_MASK)) ||
	    udp->dest != cfg.gtp_port)
		return count(KFWD_PASSED, XDP_PASS);

	/* The checks pgwfwd's C path makes */
	if (fold(ip_header_sum((__u16 *)ip)) != 0xffff || ip->ttl <= 1)
		return count(KFWD_DROPPED, XDP_DROP);
	tot_len = bpf_ntohs(ip->tot_len);
	if ((void *)ip + tot_len > data_end || bpf_ntohs(udp->len) != tot_len - 20)
		return count(KFWD_DROPPED, XDP_DROP);

	/* Select */
	cursor = bpf_map_lookup_elem(&cursors, &zero);
	if (!cursor || cfg.n_slots == 0)
		return count(KFWD_DROPPED, XDP_DROP);
	if (*cursor >= cfg.n_slots)
		*cursor = 0;
	slot = bpf_map_lookup_elem(&slots, cursor);
	*cursor = *cursor + 1 < cfg.n_slots ? *cursor + 1 : 0;
	if (!slot)
		return count(KFWD_DROPPED, XDP_DROP);
	index = *slot;
	pgw = bpf_map_lookup_elem(&pgws, &index);
	if (!pgw)
		return count(KFWD_DROPPED, XDP_DROP);

	/* Rewrite Ethernet */
	__builtin_memcpy(eth->h_dest, pgw->mac, ETH_ALEN);
	/* Byte by byte: each read of the volatile settings reads the map. */
#pragma unroll
	for (i = 0; i < ETH_ALEN; i++)
		eth->h_source[i] = cfg.src_mac[i];

	/* Rewrite IPv4 */
	old_saddr = ip->saddr;
	old_daddr = ip->daddr;
	ip->saddr = cfg.vip;
	ip->daddr = pgw->addr;
	ip->ttl--;
	ip->check = 0;
	ip->check = ~fold(ip_header_sum((__u16 *)ip));

	/* Rewrite UDP */
	old_sport = udp->source;
	old_dport = udp->dest;
	udp->source = cfg.reg_port;
	udp->dest = pgw->port;
	if (udp->check) {
		sum = (__u16)~udp->check;
		sum = replace32(sum, old_saddr, ip->saddr);
		sum = replace32(sum, old_daddr, ip->daddr);
		sum = replace16(sum, old_sport, udp->source);
		sum = replace16(sum, old_dport, udp->dest);
		udp->check = ~fold(sum) ?: 0xffff;
	}
	return count(KFWD_TX, XDP_TX);
}

char _license[] SEC("license") = "GPL";
