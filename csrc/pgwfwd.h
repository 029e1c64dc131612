/* pgwfwd data plane: the API that Python sees through cffi.
 *
 * csrc/build.py feeds this file to cffi's cdef as it is, so it holds only
 * what cdef understands: integer #defines, plain structs and prototypes.
 * Byte order: every address and port stored in these structs is in network
 * byte order, as it stands in the frame, so C copies it without swapping.
 *
 * Table publication (one writer: Python; readers: one worker per queue).
 * shared->tables[generation & 1] is the live table. A worker announces the
 * generation it is about to read in reader_gen[queue] before each batch and
 * writes 0 there when it goes idle. The writer fills the other buffer only
 * once no worker announces an older generation (pgwfwd_grace_done), then
 * publishes with pgwfwd_publish(). A worker therefore never sees a
 * half-written table and no buffer is rewritten while a worker reads it.
 */
#ifndef PGWFWD_H
#define PGWFWD_H

#define PGWFWD_MAX_PGWS 1024
#define PGWFWD_MAX_SLOTS 65536
#define PGWFWD_MAX_QUEUES 64
#define PGWFWD_BATCH 64

/* UMEM frames: the default size, and the room the kernel keeps in front of
 * the data it copies into one (XDP_PACKET_HEADROOM). A frame longer than
 * the difference cannot be received on an AF_XDP socket, so the XDP program
 * passes it to the kernel instead (PGWFWD_XDP_TOO_BIG). */
#define PGWFWD_DEFAULT_FRAME_SIZE 4096
#define PGWFWD_FRAME_HEADROOM 256

/* Selection policies (struct pgwfwd_table.policy). */
#define PGWFWD_POLICY_WRR 0   /* smooth weighted round robin per datagram */
#define PGWFWD_POLICY_TEID 1  /* consistent hash of the GTP-U TEID */

/* A wrr slot holding this value defers to the fine slot array. */
#define PGWFWD_SLOT_FINE 65535

/* Verdicts of pgwfwd_process_frame other than drop reasons. */
#define PGWFWD_FORWARD -1     /* rewritten for a PGW */
#define PGWFWD_REPLY -2       /* turned into an answer to its sender */

/* Drop reasons: index into pgwfwd_queue_stats.drops. */
#define PGWFWD_DROP_NO_PGW 0       /* no live PGW in the table */
#define PGWFWD_DROP_TRUNCATED 1    /* frame shorter than its headers */
#define PGWFWD_DROP_BAD_LENGTH 2   /* IPv4 or UDP length disagrees with frame */
#define PGWFWD_DROP_BAD_IP_CSUM 3  /* IPv4 header checksum wrong */
#define PGWFWD_DROP_TTL 4          /* TTL 0 or 1: would leave as 0 */
#define PGWFWD_DROP_NOT_FOR_US 5      /* not IPv4/UDP to VIP:gtp-port */
#define PGWFWD_DROP_TX_FULL 6      /* TX ring had no room */
#define PGWFWD_DROP_ECHO_RESPONSE 7  /* GTP-U Echo Response to the VIP */
#define PGWFWD_DROP_BAD_DST_MAC 8  /* multicast or broadcast Ethernet dest. */
#define PGWFWD_DROP_BAD_SOURCE 9   /* source no SGW can have (process.c) */
#define PGWFWD_DROP_MAX 10

/* XDP program counters (per-CPU in the kernel, summed by C). */
#define PGWFWD_XDP_REDIRECTED 0    /* handed to an AF_XDP socket */
#define PGWFWD_XDP_PASSED 1        /* everything else, to the kernel */
#define PGWFWD_XDP_FRAGMENTS 2     /* GTP-U fragments, to the kernel */
#define PGWFWD_XDP_NO_SOCKET 3     /* GTP-U on a queue with no socket */
#define PGWFWD_XDP_TOO_BIG 4       /* GTP-U too long for a UMEM frame */
#define PGWFWD_XDP_COUNTERS 5
#define PGWFWD_KERNEL_COUNTERS 6

struct pgwfwd_pgw {
	uint32_t addr;     /* IPv4 destination */
	uint16_t port;     /* UDP destination */
	uint8_t mac[6];    /* next hop's Ethernet address */
};

/* wrr: slots[] is one cycle of the weights in send order. Weights are
 * apportioned to whole slots; what is left over of each weight is
 * apportioned again over fine_slots[], which the PGWFWD_SLOT_FINE entries of
 * slots[] step through, so the shares hold to about 1 in 2^32.
 * teid: slots[] maps a hash of the TEID (or, for a payload that is not
 * GTP-U, of the source address and port) to a PGW; n_slots is a power of
 * two. n_slots 0: no live PGW, every datagram is dropped. */
struct pgwfwd_table {
	uint32_t policy;
	uint32_t n_slots;
	uint32_t n_fine_slots;
	uint32_t reserved;
	struct pgwfwd_pgw pgws[PGWFWD_MAX_PGWS];  /* by stable PGW index */
	uint16_t slots[PGWFWD_MAX_SLOTS];         /* PGW index or FINE */
	uint16_t fine_slots[PGWFWD_MAX_SLOTS];    /* PGW index */
};

/* Where a queue stands in the wrr slot arrays. */
struct pgwfwd_cursor {
	uint32_t slot;
	uint32_t fine_slot;
};

struct pgwfwd_config {
	uint32_t vip;         /* source address of what we forward */
	uint16_t gtp_port;    /* where SGWs send */
	uint16_t reg_port;    /* source port of what we forward */
	uint8_t src_mac[6];   /* the interface's Ethernet address */
	uint8_t ttl_decrement;  /* 1: act as a router hop and drop at TTL 0 */
	uint8_t reserved;
};

struct pgwfwd_shared {
	uint64_t generation;
	uint64_t reader_gen[PGWFWD_MAX_QUEUES];
	struct pgwfwd_config config;
	struct pgwfwd_table tables[2];
};

/* Written by one worker, read by Python without locks (64-bit stores). */
struct pgwfwd_queue_stats {
	uint64_t rx_packets;
	uint64_t rx_bytes;
	uint64_t tx_packets;
	uint64_t tx_bytes;
	uint64_t tx_kicks;
	uint64_t echo_replies;    /* Echo Requests answered */
	uint64_t not_gtpu;        /* forwarded, but not parseable as GTP-U */
	uint64_t drops[PGWFWD_DROP_MAX];
	uint64_t pgw_packets[PGWFWD_MAX_PGWS];
	uint64_t pgw_bytes[PGWFWD_MAX_PGWS];
};

struct pgwfwd_ring_params {
	uint32_t n_frames;     /* UMEM frames: fill + in flight */
	uint32_t frame_size;
	uint32_t rx_size;
	uint32_t tx_size;
	uint32_t fill_size;
	uint32_t comp_size;
	uint32_t batch;        /* at most PGWFWD_BATCH */
	uint32_t bind_flags;   /* XDP_COPY, XDP_ZEROCOPY, or 0 to let it pick */
	uint32_t tx_budget;    /* frames one transmit call may send; 0: kernel's */
};

/* Frame accounting of one queue (all frames of the UMEM are somewhere). */
struct pgwfwd_frame_account {
	uint32_t n_frames;
	uint32_t fill;        /* in the fill ring, owned by the kernel */
	uint32_t in_flight;   /* in RX, TX or completion rings */
	uint32_t held;        /* in the loop's free stack */
};

/* Per-frame path: parse, select, rewrite in place. Returns PGWFWD_FORWARD
 * (*pgw_index set), PGWFWD_REPLY (an Echo Response to the sender now fills
 * the frame), or a drop reason; counting is the caller's, but for
 * *not_gtpu, set to 1 when the payload is not parseable GTP-U. *len is the
 * frame's length, set to what is to be sent (Ethernet padding is trimmed);
 * capacity is the room in the buffer, which a reply may need. Pure: no I/O,
 * so tests call it on byte buffers. */
int pgwfwd_process_frame(const struct pgwfwd_config *config,
			 const struct pgwfwd_table *table,
			 struct pgwfwd_cursor *cursor, uint8_t *frame,
			 uint32_t *len, uint32_t capacity,
			 uint32_t *pgw_index, uint32_t *not_gtpu);

/* The slot of a TEID or of a source address and port under the teid
 * policy, for tests and for Python's view of where a tunnel goes. */
uint32_t pgwfwd_teid_slot(uint32_t teid, uint32_t n_slots);
uint32_t pgwfwd_flow_slot(uint32_t saddr, uint16_t sport, uint32_t n_slots);

/* Table publication, see the top of this file. */
void pgwfwd_publish(struct pgwfwd_shared *shared, uint64_t generation);
int pgwfwd_grace_done(const struct pgwfwd_shared *shared, uint32_t n_queues);

/* One AF_XDP socket with its UMEM, bound to one queue of an interface. The
 * functions return 0 or a negative errno. */
struct pgwfwd_queue;
int pgwfwd_queue_create(struct pgwfwd_queue **out, const char *ifname,
			uint32_t queue_id, int xskmap_fd,
			struct pgwfwd_shared *shared,
			struct pgwfwd_queue_stats *stats,
			const struct pgwfwd_ring_params *params);
/* Runs until pgwfwd_queue_stop(); 0 when stopped, negative errno on error. */
int pgwfwd_queue_run(struct pgwfwd_queue *queue);
void pgwfwd_queue_stop(struct pgwfwd_queue *queue);
void pgwfwd_queue_frames(const struct pgwfwd_queue *queue,
			 struct pgwfwd_frame_account *account);
/* The kernel's own counters for the socket (struct xdp_statistics, in its
 * order: rx_dropped, rx_invalid_descs, tx_invalid_descs, rx_ring_full,
 * rx_fill_ring_empty_descs, tx_ring_empty_descs). */
int pgwfwd_queue_kernel_stats(const struct pgwfwd_queue *queue,
			      uint64_t *counters);
void pgwfwd_queue_destroy(struct pgwfwd_queue *queue);

/* The XDP program on an interface. On success, message holds a note worth
 * logging (a stale program replaced) or is empty; on failure, the reason. */
struct pgwfwd_xdp;
/* max_frame_len: the longest frame the AF_XDP sockets can take; longer
 * GTP-U frames go to the kernel. */
int pgwfwd_xdp_attach(struct pgwfwd_xdp **out, int ifindex,
		      const char *object_path, uint32_t vip, uint16_t gtp_port,
		      uint32_t max_frame_len, char *message,
		      uint32_t message_size);
int pgwfwd_xdp_xskmap_fd(const struct pgwfwd_xdp *xdp);
int pgwfwd_xdp_counters(const struct pgwfwd_xdp *xdp, uint64_t *counters);
/* 1 when attached in native (driver) mode, 0 in generic (skb) mode. */
int pgwfwd_xdp_mode(const struct pgwfwd_xdp *xdp);
void pgwfwd_xdp_detach(struct pgwfwd_xdp *xdp);
/* 0: libxdp and libbpf are silent; 1: their warnings; 2: info; 3: debug. */
void pgwfwd_set_library_verbosity(int verbosity);

const char *pgwfwd_drop_name(int reason);

#endif
