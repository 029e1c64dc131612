// SPDX-License-Identifier: GPL-2.0
/* The traffic generator: run with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES
 * on the peer end of the veth, it stamps each copy of the template frame
 * (source address, source port, TEID, send time, both checksums) and sends
 * it with XDP_TX into the other end, paced by the program itself (see
 * struct bench_gen_state).
 *
 * The kernel hands the program recycled pages that hold whatever the
 * forwarder and the sink left there (frames come back to the test run's
 * page pool), so the whole template is written over each frame, and the
 * checksums are computed from constant partial sums, never from the frame.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "bench.h"

/* Written by the loader. Not const: the template is copied with memcpy,
 * which would read a const object's initializer rather than the map. */
struct bench_gen_config cfg SEC(".data") = {};

/* Only the test run's CPU uses it: no atomics needed. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_gen_state);
} gen_state SEC(".maps");

static __always_inline __u64 add_words32(__u64 sum, __u32 value)
{
	return sum + (value & 0xffff) + (value >> 16);
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u16 to_be16(__u16 value)
{
	return __builtin_bswap16(value);
}

static __always_inline __u32 to_be32(__u32 value)
{
	return __builtin_bswap32(value);
}

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	__u32 saddr, teid, n_sources = cfg.n_sources, zero = 0;
	struct bench_gen_state *state;
	__u64 n, now, sum;
	__u16 sport, check;
	__u8 *frame = data;

	if (data + BENCH_FRAME_LEN > data_end)
		return XDP_ABORTED;
	state = bpf_map_lookup_elem(&gen_state, &zero);
	if (!state)
		return XDP_ABORTED;

	/* Pacing */
	now = bpf_ktime_get_ns();
	if (!state->start_ns) {
		/* The send time starts with the first frame, not with the
		 * system call, whose set-up takes a while. */
		state->start_ns = now;
		state->next_ns = now;
		state->end_ns = now + state->duration_ns;
	}
	if (now >= state->end_ns)
		return XDP_DROP;
	if (state->interval_ns) {
		if (now < state->next_ns)
			return XDP_DROP;
		state->next_ns += state->interval_ns;
		if (state->next_ns + state->max_lag_ns < now)
			state->next_ns = now - state->max_lag_ns;
	}
	state->sent++;
	n = state->seq++;

	__builtin_memcpy(frame, cfg.frame, BENCH_FRAME_LEN);

	/* The varying fields, in network byte order. */
	saddr = cfg.sources[(n_sources ? n % n_sources : 0) &
			    (BENCH_MAX_SOURCES - 1)];
	sport = to_be16(cfg.sport_base + (n & cfg.sport_mask));
	teid = to_be32(1 + (n & cfg.teid_mask));
	__builtin_memcpy(frame + BENCH_IP_OFF + 12, &saddr, 4);
	__builtin_memcpy(frame + BENCH_UDP_OFF, &sport, 2);
	__builtin_memcpy(frame + BENCH_GTP_OFF + 4, &teid, 4);
	__builtin_memcpy(frame + BENCH_TS_OFF, &now, 8);

	/* IPv4 header checksum */
	sum = add_words32(cfg.ip_sum, saddr);
	check = ~fold(sum);
	__builtin_memcpy(frame + BENCH_IP_OFF + 10, &check, 2);

	/* UDP checksum; 0 on the wire would mean "none". */
	sum = add_words32(cfg.udp_sum, saddr) + sport;
	sum = add_words32(sum, teid);
	sum = add_words32(sum, (__u32)now);
	sum = add_words32(sum, (__u32)(now >> 32));
	check = ~fold(sum);
	if (!check)
		check = 0xffff;
	__builtin_memcpy(frame + BENCH_UDP_OFF + 6, &check, 2);

	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
