/* One AF_XDP socket and its UMEM, and the loop that forwards through it.
 *
 * Frames are forwarded in place: a frame received on the RX ring is
 * rewritten and put on the TX ring of the same socket. Every frame of the
 * UMEM is always in exactly one place: the fill ring or the kernel's hands
 * on the way to the RX ring, the RX ring, the TX ring or the kernel's hands
 * on the way to the completion ring, the completion ring, or the loop's own
 * stack of free frames. Dropped frames and completed ones go back to the
 * free stack, and the stack refills the fill ring, so none leak.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/if_xdp.h>
#include <bpf/bpf.h>
#include <xdp/xsk.h>

#include "pgwfwd.h"

#define IDLE_POLL_MS 1000

/* In copy mode one transmit system call sends at most this many frames
 * (32 unless raised); kernel 6.17 made it a socket option, which libxdp
 * 1.3.1's headers do not name yet. */
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9
#endif

struct pgwfwd_queue {
	/* Rings, named as libxdp names them. */
	struct xsk_ring_prod fq;
	struct xsk_ring_cons cq;
	struct xsk_ring_cons rxq;
	struct xsk_ring_prod txq;
	struct xsk_umem *umem;
	struct xsk_socket *xsk;
	void *umem_area;
	uint64_t umem_size;

	struct pgwfwd_ring_params params;
	struct pgwfwd_shared *shared;
	struct pgwfwd_queue_stats *stats;
	uint32_t queue_id;
	struct pgwfwd_cursor cursor;
	int stop_fd;
	int stop;

	/* Frames owned by the loop. */
	uint64_t *free_frames;
	uint32_t n_free;

	/* Running totals for frame accounting (u32, wrapping like rings). */
	uint32_t n_filled;     /* put on the fill ring */
	uint32_t n_received;   /* taken from the RX ring */
	uint32_t n_sent;       /* put on the TX ring */
	uint32_t n_completed;  /* taken from the completion ring */
};

static const struct pgwfwd_ring_params default_params = {
	.n_frames = 4096,
	.frame_size = PGWFWD_DEFAULT_FRAME_SIZE,
	.rx_size = 2048,
	.tx_size = 2048,
	.fill_size = 4096,
	.comp_size = 4096,
	.batch = PGWFWD_BATCH,
	.bind_flags = 0,
	/* Measured on veth in copy mode (bench/): 256 forwarded about 13% more
	 * than the kernel's 32, and 64 to 1024 alike. */
	.tx_budget = 256,
};

static int is_power_of_two(uint32_t value)
{
	return value && !(value & (value - 1));
}

static int check_params(const struct pgwfwd_ring_params *params)
{
	if (!is_power_of_two(params->rx_size) ||
	    !is_power_of_two(params->tx_size) ||
	    !is_power_of_two(params->fill_size) ||
	    !is_power_of_two(params->comp_size) ||
	    !is_power_of_two(params->frame_size))
		return -EINVAL;
	/* The fill and completion rings must hold every frame, so that
	 * returning frames to them never fails. */
	if (params->n_frames == 0 || params->n_frames > params->fill_size ||
	    params->n_frames > params->comp_size)
		return -EINVAL;
	if (params->batch == 0 || params->batch > PGWFWD_BATCH)
		return -EINVAL;
	return 0;
}

int pgwfwd_queue_create(struct pgwfwd_queue **out, const char *ifname,
			uint32_t queue_id, int xskmap_fd,
			struct pgwfwd_shared *shared,
			struct pgwfwd_queue_stats *stats,
			const struct pgwfwd_ring_params *params)
{
	struct xsk_umem_config umem_config = {};
	struct xsk_socket_config socket_config = {};
	struct pgwfwd_queue *queue;
	uint32_t i;
	int err;

	if (!params)
		params = &default_params;
	err = check_params(params);
	if (err)
		return err;
	if (queue_id >= PGWFWD_MAX_QUEUES)
		return -EINVAL;

	queue = calloc(1, sizeof(*queue));
	if (!queue)
		return -ENOMEM;
	queue->params = *params;
	queue->shared = shared;
	queue->stats = stats;
	queue->queue_id = queue_id;
	queue->stop_fd = -1;

	/* Stop signal */
	queue->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (queue->stop_fd < 0) {
		err = -errno;
		goto err_free;
	}

	/* UMEM */
	queue->umem_size = (uint64_t)params->n_frames * params->frame_size;
	queue->umem_area = mmap(NULL, queue->umem_size, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (queue->umem_area == MAP_FAILED) {
		err = -errno;
		queue->umem_area = NULL;
		goto err_close_stop;
	}
	umem_config.fill_size = params->fill_size;
	umem_config.comp_size = params->comp_size;
	umem_config.frame_size = params->frame_size;
	umem_config.frame_headroom = 0;
	err = xsk_umem__create(&queue->umem, queue->umem_area,
			       queue->umem_size, &queue->fq, &queue->cq,
			       &umem_config);
	if (err)
		goto err_unmap;

	/* Socket, bound to the queue; our own XDP program redirects to it. */
	socket_config.rx_size = params->rx_size;
	socket_config.tx_size = params->tx_size;
	socket_config.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD;
	socket_config.bind_flags = params->bind_flags | XDP_USE_NEED_WAKEUP;
	err = xsk_socket__create(&queue->xsk, ifname, queue_id, queue->umem,
				 &queue->rxq, &queue->txq, &socket_config);
	if (err)
		goto err_umem;
	err = xsk_socket__update_xskmap(queue->xsk, xskmap_fd);
	if (err)
		goto err_socket;

	/* Let one kick send a whole batch; older kernels say ENOPROTOOPT and
	 * keep their 32, which costs kicks, not correctness. */
	if (params->tx_budget)
		setsockopt(xsk_socket__fd(queue->xsk), SOL_XDP,
			   XDP_MAX_TX_SKB_BUDGET, &params->tx_budget,
			   sizeof(params->tx_budget));

	/* Free stack, then the fill ring */
	queue->free_frames = calloc(params->n_frames, sizeof(uint64_t));
	if (!queue->free_frames) {
		err = -ENOMEM;
		goto err_socket;
	}
	for (i = 0; i < params->n_frames; i++)
		queue->free_frames[i] = (uint64_t)i * params->frame_size;
	queue->n_free = params->n_frames;

	*out = queue;
	return 0;

err_socket:
	xsk_socket__delete(queue->xsk);
err_umem:
	xsk_umem__delete(queue->umem);
err_unmap:
	munmap(queue->umem_area, queue->umem_size);
err_close_stop:
	close(queue->stop_fd);
err_free:
	free(queue);
	return err;
}

/* Reserve as many entries as the ring has room for, up to wanted;
 * xsk_ring_prod__reserve itself is all or nothing. */
static uint32_t reserve_up_to(struct xsk_ring_prod *ring, uint32_t wanted,
			      uint32_t *idx)
{
	uint32_t n = xsk_prod_nb_free(ring, wanted);

	if (n > wanted)
		n = wanted;
	return n ? xsk_ring_prod__reserve(ring, n, idx) : 0;
}

static void free_push(struct pgwfwd_queue *queue, uint64_t addr)
{
	queue->free_frames[queue->n_free++] = addr;
}

/* Hand the kernel every free frame the fill ring has room for. */
static void refill(struct pgwfwd_queue *queue)
{
	uint32_t n, i, idx;

	if (!queue->n_free)
		return;
	n = reserve_up_to(&queue->fq, queue->n_free, &idx);
	for (i = 0; i < n; i++)
		*xsk_ring_prod__fill_addr(&queue->fq, idx + i) =
			queue->free_frames[--queue->n_free];
	xsk_ring_prod__submit(&queue->fq, n);
	queue->n_filled += n;
}

/* Take back the frames the kernel has finished sending. */
static void complete(struct pgwfwd_queue *queue)
{
	uint32_t n, i, idx;

	if (queue->n_sent == queue->n_completed)
		return;
	n = xsk_ring_cons__peek(&queue->cq, queue->params.comp_size, &idx);
	for (i = 0; i < n; i++)
		free_push(queue, *xsk_ring_cons__comp_addr(&queue->cq, idx + i));
	xsk_ring_cons__release(&queue->cq, n);
	queue->n_completed += n;
}

/* In copy mode the kernel transmits only inside a syscall. */
static void kick_tx(struct pgwfwd_queue *queue)
{
	if (!xsk_ring_prod__needs_wakeup(&queue->txq))
		return;
	sendto(xsk_socket__fd(queue->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0);
	queue->stats->tx_kicks++;
}

/* Announce the table generation this worker reads, see pgwfwd.h. */
static const struct pgwfwd_table *table_enter(struct pgwfwd_queue *queue)
{
	uint64_t *announced = &queue->shared->reader_gen[queue->queue_id];
	uint64_t generation, again;

	generation = __atomic_load_n(&queue->shared->generation,
				     __ATOMIC_SEQ_CST);
	for (;;) {
		__atomic_store_n(announced, generation, __ATOMIC_SEQ_CST);
		again = __atomic_load_n(&queue->shared->generation,
					__ATOMIC_SEQ_CST);
		if (again == generation)
			break;
		generation = again;
	}
	return &queue->shared->tables[generation & 1];
}

static void table_leave(struct pgwfwd_queue *queue)
{
	__atomic_store_n(&queue->shared->reader_gen[queue->queue_id], 0,
			 __ATOMIC_SEQ_CST);
}

static void forward_batch(struct pgwfwd_queue *queue, uint32_t n_rx,
			  uint32_t idx_rx)
{
	struct pgwfwd_queue_stats *stats = queue->stats;
	const struct pgwfwd_config *config = &queue->shared->config;
	const struct pgwfwd_table *table;
	uint64_t tx_addr[PGWFWD_BATCH];
	uint32_t tx_len[PGWFWD_BATCH];
	uint32_t frame_size = queue->params.frame_size;
	uint32_t n_tx = 0, n_reserved, idx_tx, i;

	/* Parse, select, rewrite */
	table = table_enter(queue);
	for (i = 0; i < n_rx; i++) {
		const struct xdp_desc *desc =
			xsk_ring_cons__rx_desc(&queue->rxq, idx_rx + i);
		uint64_t addr = xsk_umem__extract_addr(desc->addr);
		uint8_t *frame = xsk_umem__get_data(queue->umem_area, addr);
		uint32_t capacity = frame_size - (uint32_t)(addr % frame_size);
		uint32_t len = desc->len, pgw_index = 0, not_gtpu = 0;
		int verdict;

		stats->rx_packets++;
		stats->rx_bytes += len;
		verdict = pgwfwd_process_frame(config, table, &queue->cursor,
					       frame, &len, capacity,
					       &pgw_index, &not_gtpu);
		stats->not_gtpu += not_gtpu;
		if (verdict >= 0) {
			stats->drops[verdict]++;
			free_push(queue, addr);
			continue;
		}
		if (verdict == PGWFWD_FORWARD) {
			stats->pgw_packets[pgw_index]++;
			stats->pgw_bytes[pgw_index] += len;
		} else {
			stats->echo_replies++;
		}
		tx_addr[n_tx] = addr;
		tx_len[n_tx] = len;
		n_tx++;
	}
	table_leave(queue);
	xsk_ring_cons__release(&queue->rxq, n_rx);
	queue->n_received += n_rx;

	/* TX: a full ring gets one kick and one look at completions. */
	if (!n_tx)
		return;
	if (xsk_prod_nb_free(&queue->txq, n_tx) < n_tx) {
		kick_tx(queue);
		complete(queue);
	}
	n_reserved = reserve_up_to(&queue->txq, n_tx, &idx_tx);
	for (i = 0; i < n_reserved; i++) {
		struct xdp_desc *desc =
			xsk_ring_prod__tx_desc(&queue->txq, idx_tx + i);

		desc->addr = tx_addr[i];
		desc->len = tx_len[i];
		stats->tx_bytes += tx_len[i];
	}
	xsk_ring_prod__submit(&queue->txq, n_reserved);
	queue->n_sent += n_reserved;
	stats->tx_packets += n_reserved;
	for (i = n_reserved; i < n_tx; i++) {
		stats->drops[PGWFWD_DROP_TX_FULL]++;
		free_push(queue, tx_addr[i]);
	}
	kick_tx(queue);
}

int pgwfwd_queue_run(struct pgwfwd_queue *queue)
{
	struct pollfd fds[2] = {
		{ .fd = xsk_socket__fd(queue->xsk), .events = POLLIN },
		{ .fd = queue->stop_fd, .events = POLLIN },
	};
	uint32_t n_rx, idx_rx;

	while (!__atomic_load_n(&queue->stop, __ATOMIC_ACQUIRE)) {
		/* Frames back from TX, then to the fill ring */
		complete(queue);
		refill(queue);

		/* RX */
		n_rx = xsk_ring_cons__peek(&queue->rxq, queue->params.batch,
					   &idx_rx);
		if (n_rx) {
			forward_batch(queue, n_rx, idx_rx);
			continue;
		}

		/* Idle: finish sending before sleeping */
		if (queue->n_sent != queue->n_completed) {
			kick_tx(queue);
			continue;
		}
		if (poll(fds, 2, IDLE_POLL_MS) < 0 && errno != EINTR)
			return -errno;
	}
	return 0;
}

void pgwfwd_queue_stop(struct pgwfwd_queue *queue)
{
	uint64_t one = 1;

	__atomic_store_n(&queue->stop, 1, __ATOMIC_RELEASE);
	if (write(queue->stop_fd, &one, sizeof(one)) < 0) {
		/* The counter can only overflow after 2^64 stops; the flag
		 * alone still stops the loop within IDLE_POLL_MS. */
	}
}

void pgwfwd_queue_frames(const struct pgwfwd_queue *queue,
			 struct pgwfwd_frame_account *account)
{
	uint32_t produced_rx = __atomic_load_n(queue->rxq.producer,
					       __ATOMIC_ACQUIRE);
	uint32_t produced_cq = __atomic_load_n(queue->cq.producer,
					       __ATOMIC_ACQUIRE);

	/* Frames the kernel took from the fill ring but has not yet put on
	 * the RX ring stay counted as "fill": it owns them for receiving. */
	account->n_frames = queue->params.n_frames;
	account->fill = queue->n_filled - produced_rx;
	account->in_flight = (produced_rx - queue->n_received) +
			     (queue->n_sent - produced_cq) +
			     (produced_cq - queue->n_completed);
	account->held = queue->n_free;
}

int pgwfwd_queue_kernel_stats(const struct pgwfwd_queue *queue,
			      uint64_t *counters)
{
	struct xdp_statistics xdp_stats = {};
	socklen_t optlen = sizeof(xdp_stats);

	if (getsockopt(xsk_socket__fd(queue->xsk), SOL_XDP, XDP_STATISTICS,
		       &xdp_stats, &optlen) < 0)
		return -errno;
	counters[0] = xdp_stats.rx_dropped;
	counters[1] = xdp_stats.rx_invalid_descs;
	counters[2] = xdp_stats.tx_invalid_descs;
	counters[3] = xdp_stats.rx_ring_full;
	counters[4] = xdp_stats.rx_fill_ring_empty_descs;
	counters[5] = xdp_stats.tx_ring_empty_descs;
	return 0;
}

void pgwfwd_queue_destroy(struct pgwfwd_queue *queue)
{
	if (!queue)
		return;
	table_leave(queue);
	/* Closing the socket also takes it out of the XSKMAP. */
	xsk_socket__delete(queue->xsk);
	xsk_umem__delete(queue->umem);
	munmap(queue->umem_area, queue->umem_size);
	close(queue->stop_fd);
	free(queue->free_frames);
	free(queue);
}
