/* The benchmark's reference forwarders, one program with three modes:
 *
 *   fwd xsk    a bare AF_XDP forwarder: pgwfwd's ring settings and loop
 *              shape, the same rewrite, none of its checks or counters
 *              (the AF_XDP limit of the machine);
 *   fwd kernel the in-kernel forwarder (kfwd.bpf.c) with its tables filled
 *              (the kernel's limit);
 *   fwd pass   an XDP program that passes everything, so that the socket
 *              relays receive through the same veth path as the others.
 *
 * Common options: --iface IF --obj OBJECT; xsk and kernel also take --vip,
 * --gtp-port, --reg-port and --pgw ADDR:PORT:MAC:WEIGHT (repeatable). Each
 * prints "ready" once attached, runs until SIGTERM or SIGINT, detaches
 * (BPF links: the kernel detaches also if the process dies) and prints its
 * counters as one JSON line.
 */
#include <errno.h>
#include <getopt.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/if_ether.h>
#include <linux/if_xdp.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/xsk.h>

#include "bench.h"
#include "netdev.h"

/* pgwfwd's defaults (csrc/queue.c), so that the comparison is like for like. */
#define N_FRAMES 4096
#define FRAME_SIZE XSK_UMEM__DEFAULT_FRAME_SIZE
#define RX_SIZE 2048
#define TX_SIZE 2048
#define FILL_SIZE 4096
#define COMP_SIZE 4096
#define BATCH 64
#define TX_BUDGET 256
#define IDLE_POLL_MS 1000

struct settings {
	const char *mode;
	const char *ifname;
	const char *obj_path;
	int ifindex;
	uint32_t vip;         /* network byte order */
	uint16_t gtp_port;    /* network byte order */
	uint16_t reg_port;    /* network byte order */
	uint8_t src_mac[6];
	struct bench_pgw pgws[BENCH_MAX_PGWS];
	uint32_t weights[BENCH_MAX_PGWS];
	uint32_t n_pgws;
	uint16_t *slots;
	uint32_t n_slots;
};

static volatile sig_atomic_t stopping;

static void on_signal(int signo)
{
	stopping = 1;
}

static void die(const char *what, int err)
{
	fprintf(stderr, "fwd: %s: %s\n", what, strerror(err < 0 ? -err : err));
	exit(1);
}

static int parse_pgw(const char *text, struct bench_pgw *pgw, uint32_t *weight)
{
	char addr[INET_ADDRSTRLEN];
	unsigned int port, m[6], w, i;

	if (sscanf(text, "%15[0-9.]:%u:%x:%x:%x:%x:%x:%x:%u", addr, &port, &m[0],
		   &m[1], &m[2], &m[3], &m[4], &m[5], &w) != 9 ||
	    inet_pton(AF_INET, addr, &pgw->addr) != 1 || !port || port > 65535 ||
	    !w)
		return -EINVAL;
	pgw->port = htons((uint16_t)port);
	for (i = 0; i < 6; i++)
		pgw->mac[i] = (uint8_t)m[i];
	*weight = w;
	return 0;
}

/* Weighted round robin, interleaved: pass k takes every PGW whose weight
 * is above k. Good enough for the benchmark's equal weights. */
static void build_slots(struct settings *s)
{
	uint32_t max_weight = 0, k, i;

	for (i = 0; i < s->n_pgws; i++)
		if (s->weights[i] > max_weight)
			max_weight = s->weights[i];
	s->slots = calloc(BENCH_MAX_SLOTS, sizeof(*s->slots));
	if (!s->slots)
		die("slots", ENOMEM);
	for (k = 0; k < max_weight; k++)
		for (i = 0; i < s->n_pgws && s->n_slots < BENCH_MAX_SLOTS; i++)
			if (s->weights[i] > k)
				s->slots[s->n_slots++] = (uint16_t)i;
}

static struct bpf_object *open_object(const char *path)
{
	struct bpf_object *obj = bpf_object__open_file(path, NULL);

	if (!obj)
		die(path, errno);
	return obj;
}

static void set_rodata(struct bpf_object *obj, const void *data, size_t size)
{
	struct bpf_map *map;
	int err;

	bpf_object__for_each_map(map, obj) {
		if (!strstr(bpf_map__name(map), ".rodata"))
			continue;
		err = bpf_map__set_initial_value(map, data, size);
		if (err)
			die("read-only data", err);
	}
}

static struct bpf_link *attach(struct bpf_object *obj, const char *prog_name,
			       int ifindex)
{
	struct bpf_program *prog;
	struct bpf_link *link;

	prog = bpf_object__find_program_by_name(obj, prog_name);
	if (!prog)
		die(prog_name, ENOENT);
	link = bpf_program__attach_xdp(prog, ifindex);
	if (!link)
		die("attaching XDP", errno);
	return link;
}

static void wait_for_signal(void)
{
	while (!stopping)
		pause();
}

static uint64_t sum_percpu_counter(int map_fd, uint32_t key)
{
	int n_cpus = libbpf_num_possible_cpus(), cpu;
	uint64_t values[n_cpus], total = 0;

	if (bpf_map_lookup_elem(map_fd, &key, values))
		return 0;
	for (cpu = 0; cpu < n_cpus; cpu++)
		total += values[cpu];
	return total;
}

/* fwd pass */

static void run_pass(struct settings *s)
{
	struct bpf_object *obj = open_object(s->obj_path);
	struct bpf_link *link;
	int err = bpf_object__load(obj);

	if (err)
		die("loading", err);
	link = attach(obj, "bench_pass", s->ifindex);
	printf("ready\n");
	fflush(stdout);
	wait_for_signal();
	bpf_link__destroy(link);
	bpf_object__close(obj);
	printf("{}\n");
}

/* fwd kernel */

static void run_kernel(struct settings *s)
{
	struct bench_kfwd_config config = {
		.vip = s->vip,
		.gtp_port = s->gtp_port,
		.reg_port = s->reg_port,
		.n_slots = s->n_slots,
	};
	struct bpf_object *obj = open_object(s->obj_path);
	struct bpf_link *link;
	int err, pgws_fd, slots_fd, counters_fd;
	uint32_t i;

	memcpy(config.src_mac, s->src_mac, 6);
	set_rodata(obj, &config, sizeof(config));
	err = bpf_object__load(obj);
	if (err)
		die("loading", err);

	pgws_fd = bpf_object__find_map_fd_by_name(obj, "pgws");
	slots_fd = bpf_object__find_map_fd_by_name(obj, "slots");
	counters_fd = bpf_object__find_map_fd_by_name(obj, "kfwd_counters");
	for (i = 0; i < s->n_pgws; i++)
		if (bpf_map_update_elem(pgws_fd, &i, &s->pgws[i], BPF_ANY))
			die("pgws map", errno);
	for (i = 0; i < s->n_slots; i++) {
		uint32_t index = s->slots[i];

		if (bpf_map_update_elem(slots_fd, &i, &index, BPF_ANY))
			die("slots map", errno);
	}

	link = attach(obj, "bench_kfwd", s->ifindex);
	printf("ready\n");
	fflush(stdout);
	wait_for_signal();
	printf("{\"tx\": %llu, \"passed\": %llu, \"dropped\": %llu}\n",
	       (unsigned long long)sum_percpu_counter(counters_fd, KFWD_TX),
	       (unsigned long long)sum_percpu_counter(counters_fd, KFWD_PASSED),
	       (unsigned long long)sum_percpu_counter(counters_fd, KFWD_DROPPED));
	bpf_link__destroy(link);
	bpf_object__close(obj);
}

/* fwd xsk */

struct xsk_fwd {
	struct xsk_ring_prod fq;
	struct xsk_ring_cons cq;
	struct xsk_ring_cons rxq;
	struct xsk_ring_prod txq;
	struct xsk_umem *umem;
	struct xsk_socket *xsk;
	void *area;
	uint64_t free_frames[N_FRAMES];
	uint32_t n_free;
	uint32_t in_flight;   /* on the TX ring or in the kernel's hands */
	uint32_t cursor;
	uint64_t rx, tx, tx_full, kicks;
};

static uint16_t fold(uint64_t sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

static uint64_t replace32(uint64_t sum, uint32_t old, uint32_t new)
{
	return sum + (uint16_t)~(old & 0xffff) + (uint16_t)~(old >> 16) +
	       (new & 0xffff) + (new >> 16);
}

/* The same rewrite as pgwfwd (and kfwd.bpf.c), nothing checked. */
static void rewrite(const struct settings *s, uint32_t *cursor, uint8_t *frame)
{
	struct ethhdr *eth = (struct ethhdr *)frame;
	struct iphdr *ip = (struct iphdr *)(eth + 1);
	struct udphdr *udp = (struct udphdr *)((uint8_t *)ip + ip->ihl * 4);
	const struct bench_pgw *pgw = &s->pgws[s->slots[*cursor]];
	uint32_t old_saddr = ip->saddr, old_daddr = ip->daddr;
	uint16_t words[10];
	uint64_t sum = 0;
	int i;

	*cursor = *cursor + 1 < s->n_slots ? *cursor + 1 : 0;

	memcpy(eth->h_dest, pgw->mac, ETH_ALEN);
	memcpy(eth->h_source, s->src_mac, ETH_ALEN);

	ip->saddr = s->vip;
	ip->daddr = pgw->addr;
	ip->ttl--;
	ip->check = 0;
	memcpy(words, ip, 20);
	for (i = 0; i < 10; i++)
		sum += words[i];
	ip->check = (uint16_t)~fold(sum);

	if (udp->check) {
		sum = (uint16_t)~udp->check;
		sum = replace32(sum, old_saddr, ip->saddr);
		sum = replace32(sum, old_daddr, ip->daddr);
		sum += (uint16_t)~udp->source + s->reg_port;
		sum += (uint16_t)~udp->dest + pgw->port;
		udp->check = (uint16_t)~fold(sum) ?: 0xffff;
	}
	udp->source = s->reg_port;
	udp->dest = pgw->port;
}

static void xsk_refill(struct xsk_fwd *f)
{
	uint32_t n = xsk_prod_nb_free(&f->fq, f->n_free), idx, i;

	if (n > f->n_free)
		n = f->n_free;
	if (!n || xsk_ring_prod__reserve(&f->fq, n, &idx) != n)
		return;
	for (i = 0; i < n; i++)
		*xsk_ring_prod__fill_addr(&f->fq, idx + i) = f->free_frames[--f->n_free];
	xsk_ring_prod__submit(&f->fq, n);
}

static void xsk_complete(struct xsk_fwd *f)
{
	uint32_t n, idx, i;

	if (!f->in_flight)
		return;
	n = xsk_ring_cons__peek(&f->cq, COMP_SIZE, &idx);
	for (i = 0; i < n; i++)
		f->free_frames[f->n_free++] = *xsk_ring_cons__comp_addr(&f->cq, idx + i);
	xsk_ring_cons__release(&f->cq, n);
	f->in_flight -= n;
}

static void xsk_kick(struct xsk_fwd *f)
{
	if (!xsk_ring_prod__needs_wakeup(&f->txq))
		return;
	sendto(xsk_socket__fd(f->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0);
	f->kicks++;
}

static void xsk_forward(const struct settings *s, struct xsk_fwd *f,
			uint32_t n_rx, uint32_t idx_rx)
{
	uint32_t n_tx, idx_tx, i;

	if (xsk_prod_nb_free(&f->txq, n_rx) < n_rx) {
		xsk_kick(f);
		xsk_complete(f);
	}
	n_tx = xsk_prod_nb_free(&f->txq, n_rx);
	if (n_tx > n_rx)
		n_tx = n_rx;
	if (n_tx && xsk_ring_prod__reserve(&f->txq, n_tx, &idx_tx) != n_tx)
		n_tx = 0;

	for (i = 0; i < n_rx; i++) {
		const struct xdp_desc *rx = xsk_ring_cons__rx_desc(&f->rxq, idx_rx + i);
		uint64_t addr = xsk_umem__extract_addr(rx->addr);
		struct xdp_desc *tx;

		if (i >= n_tx) {
			f->free_frames[f->n_free++] = addr;
			f->tx_full++;
			continue;
		}
		rewrite(s, &f->cursor, xsk_umem__get_data(f->area, addr));
		tx = xsk_ring_prod__tx_desc(&f->txq, idx_tx + i);
		tx->addr = addr;
		tx->len = rx->len;
	}
	xsk_ring_cons__release(&f->rxq, n_rx);
	xsk_ring_prod__submit(&f->txq, n_tx);
	f->rx += n_rx;
	f->tx += n_tx;
	f->in_flight += n_tx;
	xsk_kick(f);
}

static void run_xsk(struct settings *s)
{
	struct xsk_umem_config umem_config = {
		.fill_size = FILL_SIZE,
		.comp_size = COMP_SIZE,
		.frame_size = FRAME_SIZE,
	};
	struct xsk_socket_config socket_config = {
		.rx_size = RX_SIZE,
		.tx_size = TX_SIZE,
		.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
		.bind_flags = XDP_USE_NEED_WAKEUP,
	};
	struct bpf_object *obj = open_object(s->obj_path);
	struct xsk_fwd *f = calloc(1, sizeof(*f));
	struct bpf_link *link;
	struct pollfd pfd;
	struct {
		uint32_t vip;
		uint16_t gtp_port;
		uint16_t pad;
	} rodata = { s->vip, s->gtp_port, 0 };
	uint32_t i, n_rx, idx_rx;
	int err;

	if (!f)
		die("memory", ENOMEM);
	set_rodata(obj, &rodata, sizeof(rodata));
	err = bpf_object__load(obj);
	if (err)
		die("loading", err);

	f->area = mmap(NULL, (size_t)N_FRAMES * FRAME_SIZE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (f->area == MAP_FAILED)
		die("UMEM", errno);
	err = xsk_umem__create(&f->umem, f->area, (uint64_t)N_FRAMES * FRAME_SIZE,
			       &f->fq, &f->cq, &umem_config);
	if (err)
		die("xsk_umem__create", err);
	err = xsk_socket__create(&f->xsk, s->ifname, 0, f->umem, &f->rxq, &f->txq,
				 &socket_config);
	if (err)
		die("xsk_socket__create", err);
	err = xsk_socket__update_xskmap(f->xsk,
					bpf_object__find_map_fd_by_name(obj, "xsks_map"));
	if (err)
		die("xskmap", err);
	/* The same transmit budget as pgwfwd's (csrc/queue.c): SOL_XDP option 9. */
	setsockopt(xsk_socket__fd(f->xsk), SOL_XDP, 9, &(uint32_t){ TX_BUDGET },
		   sizeof(uint32_t));
	for (i = 0; i < N_FRAMES; i++)
		f->free_frames[i] = (uint64_t)i * FRAME_SIZE;
	f->n_free = N_FRAMES;
	link = attach(obj, "bench_xskredir", s->ifindex);

	printf("ready\n");
	fflush(stdout);
	pfd.fd = xsk_socket__fd(f->xsk);
	pfd.events = POLLIN;
	while (!stopping) {
		xsk_complete(f);
		xsk_refill(f);
		n_rx = xsk_ring_cons__peek(&f->rxq, BATCH, &idx_rx);
		if (n_rx) {
			xsk_forward(s, f, n_rx, idx_rx);
			continue;
		}
		if (f->in_flight) {
			xsk_kick(f);
			continue;
		}
		poll(&pfd, 1, IDLE_POLL_MS);
	}

	printf("{\"rx\": %llu, \"tx\": %llu, \"tx_full\": %llu, \"kicks\": %llu}\n",
	       (unsigned long long)f->rx, (unsigned long long)f->tx,
	       (unsigned long long)f->tx_full, (unsigned long long)f->kicks);
	bpf_link__destroy(link);
	xsk_socket__delete(f->xsk);
	xsk_umem__delete(f->umem);
	bpf_object__close(obj);
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "iface", required_argument, NULL, 'i' },
		{ "obj", required_argument, NULL, 'o' },
		{ "vip", required_argument, NULL, 'v' },
		{ "gtp-port", required_argument, NULL, 'g' },
		{ "reg-port", required_argument, NULL, 'r' },
		{ "pgw", required_argument, NULL, 'p' },
		{}
	};
	static struct settings s;
	int opt;

	s.gtp_port = htons(2152);
	s.reg_port = htons(3000);
	if (argc < 2) {
		fprintf(stderr, "usage: fwd xsk|kernel|pass --iface IF --obj OBJ "
			"[--vip A --pgw ADDR:PORT:MAC:WEIGHT...]\n");
		return 2;
	}
	s.mode = argv[1];
	optind = 2;
	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 'i': s.ifname = optarg; break;
		case 'o': s.obj_path = optarg; break;
		case 'v':
			if (inet_pton(AF_INET, optarg, &s.vip) != 1)
				die(optarg, EINVAL);
			break;
		case 'g': s.gtp_port = htons((uint16_t)atoi(optarg)); break;
		case 'r': s.reg_port = htons((uint16_t)atoi(optarg)); break;
		case 'p':
			if (s.n_pgws == BENCH_MAX_PGWS ||
			    parse_pgw(optarg, &s.pgws[s.n_pgws], &s.weights[s.n_pgws]))
				die(optarg, EINVAL);
			s.n_pgws++;
			break;
		default:
			return 2;
		}
	}
	if (!s.ifname || !s.obj_path)
		die("--iface and --obj are required", EINVAL);
	s.ifindex = (int)if_nametoindex(s.ifname);
	if (!s.ifindex || interface_mac(s.ifname, s.src_mac))
		die(s.ifname, ENODEV);

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);

	if (strcmp(s.mode, "pass") == 0) {
		run_pass(&s);
		return 0;
	}
	if (!s.vip || !s.n_pgws)
		die("--vip and at least one --pgw are required", EINVAL);
	build_slots(&s);
	if (strcmp(s.mode, "kernel") == 0)
		run_kernel(&s);
	else if (strcmp(s.mode, "xsk") == 0)
		run_xsk(&s);
	else
		die(s.mode, EINVAL);
	return 0;
}
