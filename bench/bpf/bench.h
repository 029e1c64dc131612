/* What the benchmark's BPF programs and their loaders (bench/src) share.
 *
 * The generator's frame is 64 bytes (the smallest Ethernet frame, FCS not
 * counted): Ethernet, IPv4 without options, UDP, the 8-byte GTP-U G-PDU
 * header and a 14-byte payload that carries a magic number and the send
 * time, so that the sink can tell our datagrams from anything else and
 * measure how long each one took.
 */
#ifndef BENCH_H
#define BENCH_H

#define BENCH_FRAME_LEN 64
#define BENCH_ETH_LEN 14
#define BENCH_IP_OFF 14
#define BENCH_UDP_OFF 34
#define BENCH_GTP_OFF 42
#define BENCH_MAGIC_OFF 50
#define BENCH_TS_OFF 54
#define BENCH_UDP_LEN (BENCH_FRAME_LEN - BENCH_UDP_OFF)
#define BENCH_GTP_PAYLOAD_LEN (BENCH_FRAME_LEN - BENCH_GTP_OFF - 8)
#define BENCH_MAGIC 0x424e4348u   /* "BNCH", stored big-endian */

#define BENCH_MAX_SOURCES 16
#define BENCH_MAX_PGWS 1024
#define BENCH_MAX_SLOTS 65536
#define BENCH_MAX_DESTS 256

/* Latency histogram: log-linear buckets of nanoseconds, 16 per power of
 * two (6% resolution). Bucket i < 16 holds exactly i ns; above, bucket
 * (m - 3) * 16 + k holds [(16 + k) << (m - 4), (17 + k) << (m - 4)) where
 * m is the index of the value's highest set bit. */
#define BENCH_HIST_SUB 16
#define BENCH_HIST_BUCKETS 1024

/* Generator settings, in the program's read-only data. The template is
 * copied over each frame in full: a page that comes back to the test run's
 * pool still holds what the forwarder made of it. The partial sums
 * are ones' complement sums of 16-bit words in memory order over the
 * template frame with the varying fields zeroed; the program adds the
 * varying fields and folds. */
struct bench_gen_config {
	__u8 frame[BENCH_FRAME_LEN];       /* the template */
	__u32 n_sources;
	__u32 sources[BENCH_MAX_SOURCES];  /* IPv4, network byte order */
	__u32 sport_mask;       /* source ports: base + (seq & mask) */
	__u32 sport_base;       /* host byte order */
	__u32 teid_mask;        /* TEIDs: 1 + (seq & mask) */
	__u32 ip_sum;           /* IPv4 header without saddr and checksum */
	__u32 udp_sum;          /* pseudo header and datagram without saddr,
				 * sport, checksum, TEID and timestamp */
};

/* The generator's pacing state (one-entry array map), set by the loader
 * before each run and read back after it. A datagram is sent when it is
 * due (next_ns <= now); a frame that is not yet due is dropped at once, so
 * the test run spins at full speed and sends on time, not in bursts. */
struct bench_gen_state {
	__u64 interval_ns;   /* 0: flat out */
	__u64 duration_ns;
	__u64 max_lag_ns;    /* catch up at most this far after a stall */
	__u64 start_ns;      /* 0 until the first frame: the program sets it */
	__u64 next_ns;       /* when the next datagram is due */
	__u64 end_ns;        /* nothing is sent from then on */
	__u64 sent;
	__u64 seq;           /* never reset: TEIDs and ports keep rolling */
};

/* Where the sink counts a datagram: its destination. */
struct bench_dest {
	__u32 addr;   /* network byte order */
	__u16 port;   /* network byte order */
	__u16 pad;
};

/* A PGW as the bench forwarders store it (like struct pgwfwd_pgw). */
struct bench_pgw {
	__u32 addr;   /* network byte order */
	__u16 port;   /* network byte order */
	__u8 mac[6];
};

/* In-kernel forwarder settings, in its read-only data. */
struct bench_kfwd_config {
	__u32 vip;        /* network byte order */
	__u16 gtp_port;   /* network byte order */
	__u16 reg_port;   /* network byte order */
	__u32 n_slots;
	__u8 src_mac[6];
	__u8 pad[2];
};

/* Sink counters (per-CPU array). */
enum bench_sink_counter {
	SINK_COUNTED,     /* our datagrams, counted and dropped */
	SINK_PASSED,      /* anything else, to the kernel */
	SINK_CLOCK_SKEW,  /* timestamp in the future (should not happen) */
	SINK_BAD_IP_SUM,  /* counted datagrams with a wrong IPv4 header checksum */
	SINK_BAD_UDP_SUM, /* ... with a wrong or zero UDP checksum, or a UDP
			   * length other than the generator's */
	SINK_COUNTERS,
};

/* In-kernel forwarder counters (per-CPU array). */
enum bench_kfwd_counter {
	KFWD_TX,
	KFWD_PASSED,
	KFWD_DROPPED,
	KFWD_COUNTERS,
};

#endif
