/* The benchmark's peer: traffic generator and sink on the peer end of the
 * veth, driven by one line commands on stdin, one JSON line per answer.
 *
 *   gen RATE SECONDS   send for SECONDS at RATE datagrams/s (0: flat out)
 *   read               the sink's counts and latency histogram
 *   reset              zero the sink
 *   quit               detach and exit (also on EOF or SIGTERM)
 *
 * The generator runs its XDP program with BPF_PROG_RUN in live-frames mode:
 * the kernel runs it over and over on copies of the template frame, and
 * what it returns XDP_TX for leaves the peer end. One test run costs about
 * 25 ms to set up and tear down here, so pacing by many short runs would
 * send in bursts with gaps; instead one run lasts the whole send time and
 * the program paces itself (bpf/gen.bpf.c). The generator's CPU is busy
 * for the whole send time, whatever the rate.
 *
 * The sink's XDP program is attached through a BPF link, which the kernel
 * removes when this process ends, however it ends.
 */
#include <errno.h>
#include <getopt.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "bench.h"
#include "netdev.h"

#define TEST_RUN_BATCH 64
#define RUN_FOREVER 0x7fffffffu   /* repeat count of a test run */
#define MAX_LAG_NS 200000         /* catch up at most 200 us after a stall */
#define ALARM_MARGIN 0.05         /* s: a test run takes a while to start */
#ifndef ERESTART
#define ERESTART 85
#endif

struct peer {
	int ifindex;
	uint8_t frame[BENCH_FRAME_LEN];
	struct bench_gen_config gen_config;
	struct bpf_object *gen_obj;
	struct bpf_object *sink_obj;
	struct bpf_link *sink_link;
	int gen_fd;
	int state_fd;
	int dest_fd, hist_fd, counters_fd;
	int n_cpus;
};

static volatile sig_atomic_t stopping;

static void on_signal(int signo)
{
	stopping = 1;
}

static double now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_mac(const char *text, uint8_t *mac)
{
	unsigned int b[6];
	int i;

	if (sscanf(text, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4],
		   &b[5]) != 6)
		return -EINVAL;
	for (i = 0; i < 6; i++)
		mac[i] = (uint8_t)b[i];
	return 0;
}

/* Ones' complement sum of 16-bit words in memory order, not folded. */
static uint64_t sum_words(uint64_t sum, const void *bytes, size_t len)
{
	const uint8_t *p = bytes;
	uint16_t word;

	for (; len >= 2; p += 2, len -= 2) {
		memcpy(&word, p, 2);
		sum += word;
	}
	return sum;
}

/* The template frame and the generator's partial checksums. The varying
 * fields (source address, source port, TEID, timestamp) and both checksums
 * are left zero in the template, so its sums are the constant parts. */
static void build_template(struct peer *peer, const uint8_t *src_mac,
			   const uint8_t *dst_mac, uint32_t vip, uint16_t gtp_port)
{
	uint8_t *f = peer->frame;
	uint16_t word;
	uint32_t magic = htonl(BENCH_MAGIC);
	uint64_t sum;

	memset(f, 0, sizeof(peer->frame));
	memcpy(f, dst_mac, 6);
	memcpy(f + 6, src_mac, 6);
	f[12] = 0x08;                          /* IPv4 */

	f[BENCH_IP_OFF] = 0x45;
	word = htons(BENCH_FRAME_LEN - BENCH_IP_OFF);
	memcpy(f + BENCH_IP_OFF + 2, &word, 2);
	f[BENCH_IP_OFF + 6] = 0x40;            /* don't fragment */
	f[BENCH_IP_OFF + 8] = 64;              /* TTL */
	f[BENCH_IP_OFF + 9] = 17;              /* UDP */
	memcpy(f + BENCH_IP_OFF + 16, &vip, 4);

	memcpy(f + BENCH_UDP_OFF + 2, &gtp_port, 2);
	word = htons(BENCH_UDP_LEN);
	memcpy(f + BENCH_UDP_OFF + 4, &word, 2);

	f[BENCH_GTP_OFF] = 0x30;               /* version 1, PT=1 */
	f[BENCH_GTP_OFF + 1] = 255;            /* G-PDU */
	word = htons(BENCH_GTP_PAYLOAD_LEN);
	memcpy(f + BENCH_GTP_OFF + 2, &word, 2);
	memcpy(f + BENCH_MAGIC_OFF, &magic, 4);

	memcpy(peer->gen_config.frame, f, BENCH_FRAME_LEN);
	peer->gen_config.ip_sum = (uint32_t)sum_words(0, f + BENCH_IP_OFF, 20);

	/* Pseudo header: addresses (the source added per datagram), protocol
	 * and UDP length, then the UDP header and payload. */
	sum = sum_words(0, &vip, 4);
	word = htons(17);
	sum = sum_words(sum, &word, 2);
	word = htons(BENCH_UDP_LEN);
	sum = sum_words(sum, &word, 2);
	sum = sum_words(sum, f + BENCH_UDP_OFF, BENCH_UDP_LEN);
	peer->gen_config.udp_sum = (uint32_t)sum;
}

static int load_gen(struct peer *peer, const char *path)
{
	struct bpf_program *prog;
	struct bpf_map *map;
	int err;

	peer->gen_obj = bpf_object__open_file(path, NULL);
	if (!peer->gen_obj)
		return -errno;
	bpf_object__for_each_map(map, peer->gen_obj) {
		if (!strstr(bpf_map__name(map), ".data"))
			continue;
		err = bpf_map__set_initial_value(map, &peer->gen_config,
						 sizeof(peer->gen_config));
		if (err)
			return err;
	}
	err = bpf_object__load(peer->gen_obj);
	if (err)
		return err;
	prog = bpf_object__find_program_by_name(peer->gen_obj, "bench_gen");
	if (!prog)
		return -ENOENT;
	peer->gen_fd = bpf_program__fd(prog);
	peer->state_fd = bpf_object__find_map_fd_by_name(peer->gen_obj, "gen_state");
	return peer->state_fd < 0 ? -ENOENT : 0;
}

static int load_sink(struct peer *peer, const char *path)
{
	struct bpf_program *prog;
	int err;

	peer->sink_obj = bpf_object__open_file(path, NULL);
	if (!peer->sink_obj)
		return -errno;
	err = bpf_object__load(peer->sink_obj);
	if (err)
		return err;
	prog = bpf_object__find_program_by_name(peer->sink_obj, "bench_sink");
	if (!prog)
		return -ENOENT;
	peer->dest_fd = bpf_object__find_map_fd_by_name(peer->sink_obj,
							"dest_packets");
	peer->hist_fd = bpf_object__find_map_fd_by_name(peer->sink_obj,
							"latency_hist");
	peer->counters_fd = bpf_object__find_map_fd_by_name(peer->sink_obj,
							    "sink_counters");
	peer->sink_link = bpf_program__attach_xdp(prog, peer->ifindex);
	if (!peer->sink_link)
		return -errno;
	return 0;
}

static int run_chunk(struct peer *peer, uint32_t repeat)
{
	struct xdp_md ctx = {
		.data_end = BENCH_FRAME_LEN,
		.ingress_ifindex = peer->ifindex,
	};
	LIBBPF_OPTS(bpf_test_run_opts, opts,
		    .data_in = peer->frame,
		    .data_size_in = BENCH_FRAME_LEN,
		    .ctx_in = &ctx,
		    .ctx_size_in = sizeof(ctx),
		    .repeat = repeat,
		    .flags = BPF_F_TEST_XDP_LIVE_FRAMES,
		    .batch_size = TEST_RUN_BATCH);

	return bpf_prog_test_run_opts(peer->gen_fd, &opts);
}

static void on_alarm(int signo)
{
	/* Only interrupts the test run (no SA_RESTART). */
}

/* Send for `seconds` at `rate` (0: flat out). The program paces itself and
 * stops sending at end_ns; the test run, started with a repeat count that
 * it never reaches, is ended by SIGALRM: the kernel's loop stops at a
 * pending signal. The timer repeats in case the first alarm arrives before
 * the test run started. */
static void command_gen(struct peer *peer, double rate, double seconds)
{
	double alarm_at = seconds + ALARM_MARGIN;
	struct itimerval timer = {
		.it_value = { .tv_sec = (time_t)alarm_at,
			      .tv_usec = (long)((alarm_at - (time_t)alarm_at) * 1e6) },
		.it_interval = { .tv_usec = 5000 },
	};
	struct itimerval disarm = {};
	struct bench_gen_state state;
	uint32_t zero = 0;
	double start, end;
	int err = 0;

	bpf_map_lookup_elem(peer->state_fd, &zero, &state);
	start = now_seconds();
	state.interval_ns = rate > 0 ? (uint64_t)(1e9 / rate + 0.5) : 0;
	state.duration_ns = (uint64_t)(seconds * 1e9);
	state.max_lag_ns = MAX_LAG_NS;
	state.start_ns = 0;
	state.sent = 0;
	bpf_map_update_elem(peer->state_fd, &zero, &state, BPF_ANY);

	/* Until the program has seen its end time pass. */
	setitimer(ITIMER_REAL, &timer, NULL);
	while (!stopping) {
		err = run_chunk(peer, RUN_FOREVER);
		if (err == -EINTR || err == -ERESTART)
			err = 0;
		if (err)
			break;
		bpf_map_lookup_elem(peer->state_fd, &zero, &state);
		if (state.start_ns && now_seconds() * 1e9 >= (double)state.end_ns)
			break;
	}
	setitimer(ITIMER_REAL, &disarm, NULL);
	end = now_seconds();

	bpf_map_lookup_elem(peer->state_fd, &zero, &state);
	printf("{\"sent\": %llu, \"elapsed\": %.6f, \"wall\": %.6f, \"error\": %d}\n",
	       (unsigned long long)state.sent, state.duration_ns / 1e9, end - start, err);
}

/* One test run of n datagrams, timed: for finding the per-call cost. */
static void command_burst(struct peer *peer, uint32_t n)
{
	double start = now_seconds();
	int err = run_chunk(peer, n);

	printf("{\"sent\": %u, \"elapsed\": %.6f, \"error\": %d}\n", n,
	       now_seconds() - start, err);
}

static uint64_t sum_percpu(const uint64_t *values, int n_cpus)
{
	uint64_t total = 0;
	int cpu;

	for (cpu = 0; cpu < n_cpus; cpu++)
		total += values[cpu];
	return total;
}

static void command_read(struct peer *peer)
{
	uint64_t values[peer->n_cpus];
	struct bench_dest key, next, *prev = NULL;
	const char *separator = "";
	char addr[INET_ADDRSTRLEN];
	uint32_t i;

	printf("{\"dests\": {");
	while (bpf_map_get_next_key(peer->dest_fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(peer->dest_fd, &key, values))
			continue;
		inet_ntop(AF_INET, &key.addr, addr, sizeof(addr));
		printf("%s\"%s:%u\": %llu", separator, addr, ntohs(key.port),
		       (unsigned long long)sum_percpu(values, peer->n_cpus));
		separator = ", ";
	}

	printf("}, \"counters\": [");
	for (i = 0; i < SINK_COUNTERS; i++) {
		bpf_map_lookup_elem(peer->counters_fd, &i, values);
		printf("%s%llu", i ? ", " : "",
		       (unsigned long long)sum_percpu(values, peer->n_cpus));
	}

	printf("], \"hist\": [");
	separator = "";
	for (i = 0; i < BENCH_HIST_BUCKETS; i++) {
		uint64_t count;

		if (bpf_map_lookup_elem(peer->hist_fd, &i, values))
			continue;
		count = sum_percpu(values, peer->n_cpus);
		if (!count)
			continue;
		printf("%s[%u, %llu]", separator, i, (unsigned long long)count);
		separator = ", ";
	}
	printf("]}\n");
}

static void command_reset(struct peer *peer)
{
	uint64_t zeros[peer->n_cpus];
	struct bench_dest key;
	uint32_t i;

	memset(zeros, 0, sizeof(zeros));
	while (bpf_map_get_next_key(peer->dest_fd, NULL, &key) == 0)
		bpf_map_delete_elem(peer->dest_fd, &key);
	for (i = 0; i < BENCH_HIST_BUCKETS; i++)
		bpf_map_update_elem(peer->hist_fd, &i, zeros, BPF_ANY);
	for (i = 0; i < SINK_COUNTERS; i++)
		bpf_map_update_elem(peer->counters_fd, &i, zeros, BPF_ANY);
	printf("{\"ok\": true}\n");
}

static void usage(void)
{
	fprintf(stderr,
		"usage: peer --iface IF --dst-mac MAC --vip ADDR --gtp-port PORT\n"
		"            --sources ADDR[,ADDR...] [--sport-base N] [--sports 2^k]\n"
		"            [--teids 2^k] --gen OBJ --sink OBJ\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "iface", required_argument, NULL, 'i' },
		{ "dst-mac", required_argument, NULL, 'm' },
		{ "vip", required_argument, NULL, 'v' },
		{ "gtp-port", required_argument, NULL, 'p' },
		{ "sources", required_argument, NULL, 's' },
		{ "sport-base", required_argument, NULL, 'b' },
		{ "sports", required_argument, NULL, 'n' },
		{ "teids", required_argument, NULL, 't' },
		{ "gen", required_argument, NULL, 'g' },
		{ "sink", required_argument, NULL, 'k' },
		{}
	};
	struct peer peer = { .gen_fd = -1 };
	const char *ifname = NULL, *gen_path = NULL, *sink_path = NULL;
	uint8_t src_mac[6], dst_mac[6];
	uint32_t vip = 0, sports = 1024, teids = 65536, sport_base = 10000;
	uint16_t gtp_port = htons(2152);
	char line[256], *sources = NULL, *token;
	int opt, err, have_mac = 0;

	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 'i': ifname = optarg; break;
		case 'm': have_mac = parse_mac(optarg, dst_mac) == 0; break;
		case 'v': inet_pton(AF_INET, optarg, &vip); break;
		case 'p': gtp_port = htons((uint16_t)atoi(optarg)); break;
		case 's': sources = optarg; break;
		case 'b': sport_base = (uint32_t)atoi(optarg); break;
		case 'n': sports = (uint32_t)atoi(optarg); break;
		case 't': teids = (uint32_t)atoi(optarg); break;
		case 'g': gen_path = optarg; break;
		case 'k': sink_path = optarg; break;
		default: usage();
		}
	}
	if (!ifname || !have_mac || !vip || !sources || !gen_path || !sink_path ||
	    !sports || (sports & (sports - 1)) || !teids || (teids & (teids - 1)))
		usage();

	peer.ifindex = (int)if_nametoindex(ifname);
	if (!peer.ifindex || interface_mac(ifname, src_mac)) {
		fprintf(stderr, "peer: %s: no such interface\n", ifname);
		return 1;
	}
	for (token = strtok(sources, ","); token; token = strtok(NULL, ",")) {
		if (peer.gen_config.n_sources == BENCH_MAX_SOURCES)
			break;
		if (inet_pton(AF_INET, token,
			      &peer.gen_config.sources[peer.gen_config.n_sources]) != 1)
			usage();
		peer.gen_config.n_sources++;
	}
	peer.gen_config.sport_base = sport_base;
	peer.gen_config.sport_mask = sports - 1;
	peer.gen_config.teid_mask = teids - 1;
	build_template(&peer, src_mac, dst_mac, vip, gtp_port);
	peer.n_cpus = libbpf_num_possible_cpus();

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);
	{
		struct sigaction alarm_action = { .sa_handler = on_alarm };

		sigaction(SIGALRM, &alarm_action, NULL);
	}

	err = load_gen(&peer, gen_path);
	if (!err)
		err = load_sink(&peer, sink_path);
	if (err) {
		fprintf(stderr, "peer: %s: loading the BPF programs failed: %s\n",
			ifname, strerror(err < 0 ? -err : err));
		goto out;
	}

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("{\"ready\": true}\n");
	while (!stopping && fgets(line, sizeof(line), stdin)) {
		double rate, seconds;

		if (sscanf(line, "gen %lf %lf", &rate, &seconds) == 2)
			command_gen(&peer, rate, seconds);
		else if (sscanf(line, "burst %lf", &rate) == 1)
			command_burst(&peer, (uint32_t)rate);
		else if (strncmp(line, "read", 4) == 0)
			command_read(&peer);
		else if (strncmp(line, "reset", 5) == 0)
			command_reset(&peer);
		else if (strncmp(line, "quit", 4) == 0)
			break;
		else
			printf("{\"error\": \"unknown command\"}\n");
	}

out:
	bpf_link__destroy(peer.sink_link);
	bpf_object__close(peer.sink_obj);
	bpf_object__close(peer.gen_obj);
	return err ? 1 : 0;
}
