/* libFuzzer harness for the per-frame path, pgwfwd_process_frame().
 *
 * Input: one control byte, then the frame. The control byte picks the
 * policy (bit 0), whether the TTL is decremented (bit 1) and how much room
 * the buffer has past the frame (bits 2-7, 0 to 63 bytes: an Echo Reply
 * needs 56 bytes in all, so short frames in short buffers are reached).
 * The frame is copied into a heap buffer of exactly that room, so that
 * AddressSanitizer sees any access past it.
 *
 * Besides the sanitizers, each verdict is checked against what the data
 * plane promises, and a broken promise aborts (a "crash" to the fuzzer):
 * - a drop leaves the frame untouched;
 * - what is forwarded or answered fits the buffer, has a valid IPv4 header
 *   checksum, and a valid UDP checksum when it arrived with one that was
 *   valid (or held only the pseudo-header sum, as veth leaves it);
 * - what is forwarded goes to the PGW chosen, from VIP:reg-port, with the
 *   payload unchanged and the TTL one lower.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "pgwfwd.h"

#define ETH_LEN 14
#define UDP_LEN 8
#define N_PGWS 3
#define TEID_SLOTS 64

static struct pgwfwd_config config;
static struct pgwfwd_table *tables[2];  /* by policy */

static void fail(const char *what)
{
	fprintf(stderr, "fuzz_process: broken promise: %s\n", what);
	abort();
}

static uint64_t sum_bytes(uint64_t sum, const uint8_t *bytes, size_t len)
{
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)bytes[i] << 8 | bytes[i + 1];
	if (len & 1)
		sum += (uint32_t)bytes[len - 1] << 8;
	return sum;
}

static uint16_t fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/* Sum of the UDP datagram at ip with its pseudo-header; 0xffff is valid. */
static uint16_t udp_sum(const uint8_t *ip, const uint8_t *udp,
			uint32_t udp_len)
{
	uint64_t sum = sum_bytes(0, ip + 12, 8) + 17 + udp_len;

	return fold(sum_bytes(sum, udp, udp_len));
}

static uint16_t pseudo_sum(const uint8_t *ip, uint32_t udp_len)
{
	return fold(sum_bytes(0, ip + 12, 8) + 17 + udp_len);
}

static void set_up(void)
{
	static const uint8_t macs[N_PGWS][6] = {
		{ 2, 0, 0, 0, 0, 0x11 }, { 2, 0, 0, 0, 0, 0x12 },
		{ 2, 0, 0, 0, 0, 0x13 },
	};
	int policy, i;

	config.vip = htonl(0xc6120001);  /* 198.18.0.1 */
	config.gtp_port = htons(2152);
	config.reg_port = htons(3000);
	memcpy(config.src_mac, "\x02\x00\x00\x00\x00\x01", 6);

	for (policy = 0; policy < 2; policy++) {
		struct pgwfwd_table *table = calloc(1, sizeof(*table));

		if (!table)
			abort();
		for (i = 0; i < N_PGWS; i++) {
			table->pgws[i].addr = htonl(0xc612000b + i);
			table->pgws[i].port = htons(40001 + i);
			memcpy(table->pgws[i].mac, macs[i], 6);
		}
		tables[policy] = table;
	}

	/* wrr: whole slots and a fine level; teid: PGWs in turn */
	tables[PGWFWD_POLICY_WRR]->policy = PGWFWD_POLICY_WRR;
	tables[PGWFWD_POLICY_WRR]->n_slots = 4;
	tables[PGWFWD_POLICY_WRR]->slots[0] = 0;
	tables[PGWFWD_POLICY_WRR]->slots[1] = 1;
	tables[PGWFWD_POLICY_WRR]->slots[2] = PGWFWD_SLOT_FINE;
	tables[PGWFWD_POLICY_WRR]->slots[3] = 2;
	tables[PGWFWD_POLICY_WRR]->n_fine_slots = 2;
	tables[PGWFWD_POLICY_WRR]->fine_slots[0] = 2;
	tables[PGWFWD_POLICY_WRR]->fine_slots[1] = 0;
	tables[PGWFWD_POLICY_TEID]->policy = PGWFWD_POLICY_TEID;
	tables[PGWFWD_POLICY_TEID]->n_slots = TEID_SLOTS;
	for (i = 0; i < TEID_SLOTS; i++)
		tables[PGWFWD_POLICY_TEID]->slots[i] = i % N_PGWS;
}

/* Checks of a forwarded frame against the frame that came in. */
static void check_forward(const uint8_t *in, const uint8_t *out,
			  uint32_t out_len, uint32_t pgw_index, int ttl_dec)
{
	const struct pgwfwd_pgw *pgw;
	const uint8_t *ip_in = in + ETH_LEN, *ip_out = out + ETH_LEN;
	uint32_t ihl, udp_len;
	uint16_t check_in;

	if (pgw_index >= N_PGWS)
		fail("forwarded to a PGW not in the table");
	pgw = &tables[0]->pgws[pgw_index];
	if (out_len < ETH_LEN + 20 + UDP_LEN)
		fail("forwarded frame shorter than its headers");
	ihl = (ip_out[0] & 0xf) * 4u;
	udp_len = (uint32_t)ip_out[ihl + 4] << 8 | ip_out[ihl + 5];
	if ((ip_out[0] >> 4) != 4 || ihl < 20 ||
	    out_len != ETH_LEN + ihl + udp_len ||
	    ((uint32_t)ip_out[2] << 8 | ip_out[3]) != ihl + udp_len)
		fail("forwarded lengths disagree");

	/* Addresses, ports, TTL, MACs */
	if (memcmp(out, pgw->mac, 6) || memcmp(out + 6, config.src_mac, 6) ||
	    memcmp(ip_out + 12, &config.vip, 4) ||
	    memcmp(ip_out + 16, &pgw->addr, 4) ||
	    memcmp(ip_out + ihl, &config.reg_port, 2) ||
	    memcmp(ip_out + ihl + 2, &pgw->port, 2))
		fail("forwarded to the wrong place");
	if (ip_out[8] != (uint8_t)(ip_in[8] - (ttl_dec ? 1 : 0)) ||
	    (ttl_dec && ip_in[8] <= 1))
		fail("wrong TTL");

	/* Payload and IPv4 options untouched */
	if (memcmp(ip_in + 20, ip_out + 20, ihl - 20) ||
	    memcmp(ip_in + ihl + UDP_LEN, ip_out + ihl + UDP_LEN,
		   udp_len - UDP_LEN))
		fail("payload changed");

	/* Checksums */
	if (fold(sum_bytes(0, ip_out, ihl)) != 0xffff)
		fail("bad IPv4 header checksum");
	check_in = (uint16_t)(ip_in[ihl + 6] << 8 | ip_in[ihl + 7]);
	if (check_in == 0) {
		if (ip_out[ihl + 6] || ip_out[ihl + 7])
			fail("UDP checksum 0 did not stay 0");
		return;
	}
	if (udp_sum(ip_in, ip_in + ihl, udp_len) == 0xffff ||
	    check_in == pseudo_sum(ip_in, udp_len) ||
	    check_in == (uint16_t)~pseudo_sum(ip_in, udp_len)) {
		if (udp_sum(ip_out, ip_out + ihl, udp_len) != 0xffff)
			fail("bad UDP checksum on a datagram that had a good one");
	}
	if (!ip_out[ihl + 6] && !ip_out[ihl + 7])
		fail("UDP checksum turned into 0 (none)");
}

static void check_reply(const uint8_t *out, uint32_t out_len)
{
	const uint8_t *ip = out + ETH_LEN;

	if (out_len != ETH_LEN + 20 + UDP_LEN + 14)
		fail("echo reply of the wrong length");
	if (fold(sum_bytes(0, ip, 20)) != 0xffff ||
	    udp_sum(ip, ip + 20, UDP_LEN + 14) != 0xffff)
		fail("echo reply with a bad checksum");
	if (memcmp(ip + 12, &config.vip, 4) || ip[28] != 0x32 || ip[29] != 2)
		fail("echo reply not from the VIP or not an Echo Response");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct pgwfwd_cursor cursor = { 0, 0 };
	uint32_t frame_len, capacity, len, pgw_index = 0, not_gtpu = 0;
	uint8_t control, *frame, *copy;
	int policy, verdict;

	if (!tables[0])
		set_up();
	if (size < 1 || size > 65536)
		return 0;
	control = data[0];
	policy = control & 1;
	config.ttl_decrement = (control >> 1) & 1;
	frame_len = (uint32_t)size - 1;
	capacity = frame_len + (control >> 2);
	/* A stale cursor past the table (after a swap) must be survived. */
	cursor.slot = frame_len % 7;
	cursor.fine_slot = frame_len % 3;

	frame = malloc(capacity ? capacity : 1);
	copy = malloc(frame_len ? frame_len : 1);
	if (!frame || !copy)
		abort();
	memcpy(frame, data + 1, frame_len);
	memcpy(copy, data + 1, frame_len);
	len = frame_len;

	verdict = pgwfwd_process_frame(&config, tables[policy], &cursor, frame,
				       &len, capacity, &pgw_index, &not_gtpu);

	if (not_gtpu > 1)
		fail("not_gtpu is a flag");
	if (verdict == PGWFWD_FORWARD) {
		if (len > frame_len)
			fail("forwarded frame grew");
		check_forward(copy, frame, len, pgw_index, config.ttl_decrement);
	} else if (verdict == PGWFWD_REPLY) {
		if (len > capacity)
			fail("reply larger than the buffer");
		check_reply(frame, len);
	} else if (verdict >= 0 && verdict < PGWFWD_DROP_MAX) {
		if (len != frame_len || memcmp(frame, copy, frame_len))
			fail("a dropped frame was changed");
		if (!pgwfwd_drop_name(verdict))
			fail("a drop reason without a name");
	} else {
		fail("unknown verdict");
	}
	free(frame);
	free(copy);
	return 0;
}
