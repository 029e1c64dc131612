/* The per-frame work of the data plane: parse, select, rewrite.
 *
 * A GTP-U datagram to VIP:gtp-port leaves as a datagram from VIP:reg-port to
 * the PGW's registered address and port, payload untouched. The IPv4 header
 * checksum is verified on the way in and computed afresh on the way out (the
 * header is 20 bytes, cheaper than reasoning about it). The UDP checksum is
 * updated incrementally, except when the field holds only the pseudo-header
 * sum: a local sender behind a veth leaves it so (CHECKSUM_PARTIAL), and an
 * incremental update of that would put a wrong checksum on the wire. Then
 * the whole datagram is summed, which is right whatever the field held.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <netinet/in.h>

#include "pgwfwd.h"

#define IP_FRAGMENT_MASK 0x3fff

static const char *const drop_names[PGWFWD_DROP_MAX] = {
	[PGWFWD_DROP_NO_PGW] = "no_pgw",
	[PGWFWD_DROP_TRUNCATED] = "truncated",
	[PGWFWD_DROP_BAD_LENGTH] = "bad_length",
	[PGWFWD_DROP_BAD_IP_CSUM] = "bad_ip_csum",
	[PGWFWD_DROP_TTL] = "ttl",
	[PGWFWD_DROP_NOT_GTP] = "not_gtp",
	[PGWFWD_DROP_TX_FULL] = "tx_full",
};

const char *pgwfwd_drop_name(int reason)
{
	if (reason < 0 || reason >= PGWFWD_DROP_MAX)
		return NULL;
	return drop_names[reason];
}

/* Ones' complement sum of len bytes, not folded; words in memory order. */
static uint64_t csum_add_bytes(uint64_t sum, const uint8_t *bytes, size_t len)
{
	uint32_t word;

	while (len >= 4) {
		memcpy(&word, bytes, 4);
		sum += word;
		bytes += 4;
		len -= 4;
	}
	if (len >= 2) {
		uint16_t half;

		memcpy(&half, bytes, 2);
		sum += half;
		bytes += 2;
		len -= 2;
	}
	if (len) {
		/* The odd byte is the high byte of a zero-padded word. */
		uint8_t last[2] = { bytes[0], 0 };
		uint16_t half;

		memcpy(&half, last, 2);
		sum += half;
	}
	return sum;
}

static uint16_t csum_fold(uint64_t sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

static uint64_t pseudo_header_sum(uint32_t saddr, uint32_t daddr,
				  uint16_t udp_len_be)
{
	return (uint64_t)saddr + daddr + htons(IPPROTO_UDP) + udp_len_be;
}

/* Replace old 16-bit words by new ones in a checksum (RFC 1624, eqn. 3). */
static uint16_t csum_replace(uint16_t check, const uint16_t *old_words,
			     const uint16_t *new_words, int n_words)
{
	uint64_t sum = (uint16_t)~check;
	int i;

	for (i = 0; i < n_words; i++)
		sum += (uint16_t)~old_words[i] + (uint64_t)new_words[i];
	return (uint16_t)~csum_fold(sum);
}

static int select_pgw(const struct pgwfwd_table *table, uint32_t *cursor,
		      uint32_t *pgw_index)
{
	uint32_t n_slots = table->n_slots;
	uint32_t position = *cursor;
	uint16_t index;

	if (n_slots == 0 || n_slots > PGWFWD_MAX_SLOTS)
		return PGWFWD_DROP_NO_PGW;

	/* A table swap may leave the cursor past a shorter slot array. */
	if (position >= n_slots)
		position = 0;
	index = table->slots[position];
	*cursor = position + 1 < n_slots ? position + 1 : 0;

	if (index >= PGWFWD_MAX_PGWS)
		return PGWFWD_DROP_NO_PGW;
	*pgw_index = index;
	return -1;
}

int pgwfwd_process_frame(const struct pgwfwd_config *config,
			 const struct pgwfwd_table *table, uint32_t *cursor,
			 uint8_t *frame, uint32_t *len, uint32_t *pgw_index)
{
	uint32_t frame_len = *len;
	const struct pgwfwd_pgw *pgw;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	uint32_t ip_header_len, ip_total_len, udp_len;
	uint16_t old_words[6], new_words[6];
	uint16_t udp_check;
	uint32_t old_saddr, old_daddr;
	int verdict;

	/* Ethernet */
	if (frame_len < sizeof(*eth))
		return PGWFWD_DROP_TRUNCATED;
	eth = (struct ethhdr *)frame;
	if (eth->h_proto != htons(ETH_P_IP))
		return PGWFWD_DROP_NOT_GTP;

	/* IPv4: header, checksum, lengths, TTL */
	if (frame_len < sizeof(*eth) + sizeof(*ip))
		return PGWFWD_DROP_TRUNCATED;
	ip = (struct iphdr *)(eth + 1);
	if (ip->version != 4)
		return PGWFWD_DROP_NOT_GTP;
	ip_header_len = ip->ihl * 4u;
	if (ip_header_len < sizeof(*ip))
		return PGWFWD_DROP_BAD_LENGTH;
	if (frame_len < sizeof(*eth) + ip_header_len + sizeof(*udp))
		return PGWFWD_DROP_TRUNCATED;
	if (csum_fold(csum_add_bytes(0, (uint8_t *)ip, ip_header_len)) != 0xffff)
		return PGWFWD_DROP_BAD_IP_CSUM;
	if (ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & htons(IP_FRAGMENT_MASK)) ||
	    ip->daddr != config->vip)
		return PGWFWD_DROP_NOT_GTP;
	ip_total_len = ntohs(ip->tot_len);
	if (ip_total_len < ip_header_len + sizeof(*udp))
		return PGWFWD_DROP_BAD_LENGTH;
	/* Longer frames carry Ethernet padding, trimmed below. */
	if (sizeof(*eth) + ip_total_len > frame_len)
		return PGWFWD_DROP_TRUNCATED;
	if (config->ttl_decrement && ip->ttl <= 1)
		return PGWFWD_DROP_TTL;

	/* UDP */
	udp = (struct udphdr *)((uint8_t *)ip + ip_header_len);
	if (udp->dest != config->gtp_port)
		return PGWFWD_DROP_NOT_GTP;
	udp_len = ntohs(udp->len);
	if (udp_len != ip_total_len - ip_header_len)
		return PGWFWD_DROP_BAD_LENGTH;

	/* Select */
	verdict = select_pgw(table, cursor, pgw_index);
	if (verdict >= 0)
		return verdict;
	pgw = &table->pgws[*pgw_index];

	/* Rewrite Ethernet */
	memcpy(eth->h_dest, pgw->mac, ETH_ALEN);
	memcpy(eth->h_source, config->src_mac, ETH_ALEN);

	/* Rewrite IPv4 */
	old_saddr = ip->saddr;
	old_daddr = ip->daddr;
	ip->saddr = config->vip;
	ip->daddr = pgw->addr;
	if (config->ttl_decrement)
		ip->ttl--;
	ip->check = 0;
	ip->check = (uint16_t)~csum_fold(csum_add_bytes(0, (uint8_t *)ip,
							ip_header_len));

	/* Rewrite UDP; a zero checksum means none and stays so. */
	memcpy(old_words, &old_saddr, 4);
	memcpy(old_words + 2, &old_daddr, 4);
	old_words[4] = udp->source;
	old_words[5] = udp->dest;
	udp->source = config->reg_port;
	udp->dest = pgw->port;
	memcpy(new_words, &ip->saddr, 4);
	memcpy(new_words + 2, &ip->daddr, 4);
	new_words[4] = udp->source;
	new_words[5] = udp->dest;
	udp_check = udp->check;
	if (udp_check != 0) {
		uint16_t partial = csum_fold(pseudo_header_sum(
			old_saddr, old_daddr, udp->len));
		uint16_t partial_inverted = (uint16_t)~partial;

		if (udp_check == partial || udp_check == partial_inverted) {
			uint64_t sum = pseudo_header_sum(ip->saddr, ip->daddr,
							 udp->len);

			udp->check = 0;
			sum = csum_add_bytes(sum, (uint8_t *)udp, udp_len);
			udp_check = (uint16_t)~csum_fold(sum);
		} else {
			udp_check = csum_replace(udp_check, old_words,
						 new_words, 6);
		}
		/* 0 on the wire would mean "no checksum". */
		udp->check = udp_check ? udp_check : 0xffff;
	}

	*len = sizeof(*eth) + ip_total_len;
	return -1;
}

void pgwfwd_publish(struct pgwfwd_shared *shared, uint64_t generation)
{
	__atomic_store_n(&shared->generation, generation, __ATOMIC_SEQ_CST);
}

int pgwfwd_grace_done(const struct pgwfwd_shared *shared, uint32_t n_queues)
{
	uint64_t current = __atomic_load_n(&shared->generation, __ATOMIC_SEQ_CST);
	uint32_t queue;

	/* The buffer about to be rewritten served the generation before the
	 * current one; a worker announcing that or older may still read it. */
	for (queue = 0; queue < n_queues && queue < PGWFWD_MAX_QUEUES; queue++) {
		uint64_t seen = __atomic_load_n(&shared->reader_gen[queue],
						__ATOMIC_SEQ_CST);

		if (seen != 0 && seen < current)
			return 0;
	}
	return 1;
}
