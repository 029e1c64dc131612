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
#define DEFAULT_TTL 64

/* The IPv4 header starts 14 bytes into a frame, and frames start at
 * aligned addresses: the header sits at 2 modulo 4, and reading it through
 * struct iphdr, which promises 4-byte alignment, is undefined behaviour
 * (UBSan under the fuzzer said so). This type promises only 2. */
typedef struct iphdr __attribute__((aligned(2))) ipv4_header;

/* GTP-U (3GPP TS 29.281) */
#define GTPU_VERSION 1
#define GTPU_FLAG_PT 0x10
#define GTPU_FLAG_E 0x04
#define GTPU_FLAG_S 0x02
#define GTPU_FLAG_PN 0x01
#define GTPU_FLAGS_OPTIONAL (GTPU_FLAG_E | GTPU_FLAG_S | GTPU_FLAG_PN)
#define GTPU_ECHO_REQUEST 1
#define GTPU_ECHO_RESPONSE 2
#define GTPU_IE_RECOVERY 14
/* Extension headers are walked up to this many; a longer chain is taken
 * for garbage rather than for a header. */
#define GTPU_MAX_EXTENSIONS 16

struct gtpu_header {
	uint8_t flags;
	uint8_t type;
	uint16_t length;  /* of what follows these 8 bytes */
	uint32_t teid;
} __attribute__((packed));

/* Present when any of E, S, PN is set. */
struct gtpu_optional {
	uint16_t sequence;
	uint8_t npdu;
	uint8_t next_extension;
} __attribute__((packed));

/* What the parser learnt of a GTP-U payload. */
struct gtpu_info {
	uint32_t teid;      /* host byte order */
	uint16_t sequence;  /* network byte order, valid with has_sequence */
	uint8_t type;
	uint8_t has_sequence;
};

static const char *const drop_names[PGWFWD_DROP_MAX] = {
	[PGWFWD_DROP_NO_PGW] = "no_pgw",
	[PGWFWD_DROP_TRUNCATED] = "truncated",
	[PGWFWD_DROP_BAD_LENGTH] = "bad_length",
	[PGWFWD_DROP_BAD_IP_CSUM] = "bad_ip_csum",
	[PGWFWD_DROP_TTL] = "ttl",
	[PGWFWD_DROP_NOT_FOR_US] = "not_for_us",
	[PGWFWD_DROP_TX_FULL] = "tx_full",
	[PGWFWD_DROP_ECHO_RESPONSE] = "echo_response",
	[PGWFWD_DROP_BAD_DST_MAC] = "bad_dst_mac",
	[PGWFWD_DROP_BAD_SOURCE] = "bad_source",
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

/* Parse a GTP-U message that fills exactly len bytes. Returns 0 when it is
 * well formed, -1 otherwise; nothing is read past payload + len. */
static int gtpu_parse(const uint8_t *payload, uint32_t len,
		      struct gtpu_info *info)
{
	const struct gtpu_header *header = (const void *)payload;
	const struct gtpu_optional *optional;
	uint32_t end, offset;
	uint8_t next;
	int n;

	/* Mandatory header */
	if (len < sizeof(*header))
		return -1;
	if ((header->flags >> 5) != GTPU_VERSION ||
	    !(header->flags & GTPU_FLAG_PT))
		return -1;
	end = sizeof(*header) + ntohs(header->length);
	if (end != len)
		return -1;
	info->type = header->type;
	info->teid = ntohl(header->teid);
	info->has_sequence = 0;
	if (!(header->flags & GTPU_FLAGS_OPTIONAL))
		return 0;

	/* Sequence number, N-PDU number, next extension type */
	if (end < sizeof(*header) + sizeof(*optional))
		return -1;
	optional = (const void *)(payload + sizeof(*header));
	info->sequence = optional->sequence;
	info->has_sequence = !!(header->flags & GTPU_FLAG_S);
	next = header->flags & GTPU_FLAG_E ? optional->next_extension : 0;

	/* Extension headers: a length in 4-byte units, the content, and the
	 * type of the next one in the last byte. */
	offset = sizeof(*header) + sizeof(*optional);
	for (n = 0; next != 0; n++) {
		uint32_t extension_len;

		if (n == GTPU_MAX_EXTENSIONS || offset >= end)
			return -1;
		extension_len = payload[offset] * 4u;
		if (extension_len == 0 || extension_len > end - offset)
			return -1;
		next = payload[offset + extension_len - 1];
		offset += extension_len;
	}
	return 0;
}

/* A source no SGW can have: our own VIP (a looped or spoofed frame),
 * 0.0.0.0, loopback, multicast or the limited broadcast. Forwarding such a
 * datagram would spread spoofed traffic; an Echo Request from one must not
 * be answered either. */
static int bad_source(uint32_t saddr_be, uint32_t vip_be)
{
	uint32_t saddr = ntohl(saddr_be);

	return saddr_be == vip_be || saddr == 0 ||
	       (saddr >> 24) == 127 ||           /* 127.0.0.0/8 */
	       (saddr >> 28) == 0xe ||           /* 224.0.0.0/4 */
	       saddr == 0xffffffffu;
}

/* Avalanche of a 32-bit value (the murmur3 finaliser): tunnel identifiers
 * are often allocated in sequence, and neighbours must land apart. */
static uint32_t mix32(uint32_t value)
{
	value ^= value >> 16;
	value *= 0x85ebca6bu;
	value ^= value >> 13;
	value *= 0xc2b2ae35u;
	value ^= value >> 16;
	return value;
}

uint32_t pgwfwd_teid_slot(uint32_t teid, uint32_t n_slots)
{
	return n_slots ? mix32(teid) & (n_slots - 1) : 0;
}

uint32_t pgwfwd_flow_slot(uint32_t saddr, uint16_t sport, uint32_t n_slots)
{
	uint32_t hash = mix32(ntohl(saddr) ^ mix32(0x10000u | ntohs(sport)));

	return n_slots ? hash & (n_slots - 1) : 0;
}

/* wrr: the next slot in send order; a FINE slot defers to the next fine
 * slot. A table swap may leave a cursor past a shorter array. */
static uint32_t select_wrr(const struct pgwfwd_table *table,
			   struct pgwfwd_cursor *cursor)
{
	uint32_t n_slots = table->n_slots, n_fine = table->n_fine_slots;
	uint32_t position = cursor->slot < n_slots ? cursor->slot : 0;
	uint32_t index = table->slots[position];

	cursor->slot = position + 1 < n_slots ? position + 1 : 0;
	if (index != PGWFWD_SLOT_FINE)
		return index;
	if (n_fine == 0 || n_fine > PGWFWD_MAX_SLOTS)
		return PGWFWD_MAX_PGWS;
	position = cursor->fine_slot < n_fine ? cursor->fine_slot : 0;
	cursor->fine_slot = position + 1 < n_fine ? position + 1 : 0;
	return table->fine_slots[position];
}

/* Turn an Echo Request into its Echo Response, in place, back to where it
 * came from: sequence number kept, a Recovery IE (restart counter 0, as
 * TS 29.281 has it for GTP-U), no other IE. */
static int echo_reply(const struct pgwfwd_config *config, uint8_t *frame,
		      uint32_t *len, uint32_t capacity, uint16_t sequence)
{
	struct ethhdr *eth = (struct ethhdr *)frame;
	ipv4_header *ip = (ipv4_header *)(eth + 1);
	struct udphdr *udp = (struct udphdr *)(ip + 1);
	struct gtpu_header *gtpu;
	struct gtpu_optional *optional;
	uint8_t *recovery;
	uint32_t reply_len = sizeof(*eth) + sizeof(*ip) + sizeof(*udp) +
			     sizeof(*gtpu) + sizeof(*optional) + 2;
	uint32_t peer_addr;
	uint16_t peer_port, udp_len;
	uint64_t sum;

	if (reply_len > capacity)
		return PGWFWD_DROP_TRUNCATED;
	peer_addr = ip->saddr;
	peer_port = ((struct udphdr *)((uint8_t *)ip + ip->ihl * 4u))->source;

	/* Ethernet: back to the sender's hop */
	memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	memcpy(eth->h_source, config->src_mac, ETH_ALEN);

	/* GTP-U, written first: the IPv4 options it may overwrite are gone */
	udp_len = sizeof(*udp) + sizeof(*gtpu) + sizeof(*optional) + 2;
	gtpu = (struct gtpu_header *)(udp + 1);
	optional = (struct gtpu_optional *)(gtpu + 1);
	recovery = (uint8_t *)(optional + 1);
	gtpu->flags = (GTPU_VERSION << 5) | GTPU_FLAG_PT | GTPU_FLAG_S;
	gtpu->type = GTPU_ECHO_RESPONSE;
	gtpu->length = htons(sizeof(*optional) + 2);
	gtpu->teid = 0;
	optional->sequence = sequence;
	optional->npdu = 0;
	optional->next_extension = 0;
	recovery[0] = GTPU_IE_RECOVERY;
	recovery[1] = 0;

	/* UDP and IPv4, without options */
	udp->source = config->gtp_port;
	udp->dest = peer_port;
	udp->len = htons(udp_len);
	udp->check = 0;
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tos = 0;
	ip->tot_len = htons(sizeof(*ip) + udp_len);
	ip->frag_off = 0;
	ip->ttl = DEFAULT_TTL;
	ip->protocol = IPPROTO_UDP;
	ip->saddr = config->vip;
	ip->daddr = peer_addr;
	ip->check = 0;
	ip->check = (uint16_t)~csum_fold(csum_add_bytes(0, (uint8_t *)ip,
							sizeof(*ip)));
	sum = pseudo_header_sum(ip->saddr, ip->daddr, udp->len);
	udp->check = (uint16_t)~csum_fold(csum_add_bytes(sum, (uint8_t *)udp,
							 udp_len));
	if (!udp->check)
		udp->check = 0xffff;

	*len = reply_len;
	return PGWFWD_REPLY;
}

/* Rewrite the datagram for the PGW: Ethernet, addresses, ports, TTL and
 * both checksums (see the top of this file for the UDP checksum). */
static void rewrite(const struct pgwfwd_config *config,
		    const struct pgwfwd_pgw *pgw, struct ethhdr *eth,
		    ipv4_header *ip, struct udphdr *udp)
{
	uint32_t ip_header_len = ip->ihl * 4u;
	uint16_t old_words[6], new_words[6];
	uint32_t old_saddr = ip->saddr, old_daddr = ip->daddr;
	uint16_t udp_check;

	/* Ethernet */
	memcpy(eth->h_dest, pgw->mac, ETH_ALEN);
	memcpy(eth->h_source, config->src_mac, ETH_ALEN);

	/* IPv4 */
	ip->saddr = config->vip;
	ip->daddr = pgw->addr;
	if (config->ttl_decrement)
		ip->ttl--;
	ip->check = 0;
	ip->check = (uint16_t)~csum_fold(csum_add_bytes(0, (uint8_t *)ip,
							ip_header_len));

	/* UDP; a zero checksum means none and stays so. */
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
	if (udp_check == 0)
		return;
	{
		uint16_t partial = csum_fold(pseudo_header_sum(
			old_saddr, old_daddr, udp->len));
		uint16_t partial_inverted = (uint16_t)~partial;

		if (udp_check == partial || udp_check == partial_inverted) {
			uint64_t sum = pseudo_header_sum(ip->saddr, ip->daddr,
							 udp->len);

			udp->check = 0;
			sum = csum_add_bytes(sum, (uint8_t *)udp,
					     ntohs(udp->len));
			udp_check = (uint16_t)~csum_fold(sum);
		} else {
			udp_check = csum_replace(udp_check, old_words,
						 new_words, 6);
		}
	}
	/* 0 on the wire would mean "no checksum". */
	udp->check = udp_check ? udp_check : 0xffff;
}

int pgwfwd_process_frame(const struct pgwfwd_config *config,
			 const struct pgwfwd_table *table,
			 struct pgwfwd_cursor *cursor, uint8_t *frame,
			 uint32_t *len, uint32_t capacity,
			 uint32_t *pgw_index, uint32_t *not_gtpu)
{
	uint32_t frame_len = *len;
	struct ethhdr *eth;
	ipv4_header *ip;
	struct udphdr *udp;
	struct gtpu_info gtpu;
	uint32_t ip_header_len, ip_total_len, udp_len, n_slots, index;
	int parsed;

	*not_gtpu = 0;

	/* Ethernet */
	if (frame_len < sizeof(*eth))
		return PGWFWD_DROP_TRUNCATED;
	eth = (struct ethhdr *)frame;
	/* The group bit: multicast, or broadcast. A router hop never takes
	 * such a frame as addressed to it. */
	if (eth->h_dest[0] & 1)
		return PGWFWD_DROP_BAD_DST_MAC;
	if (eth->h_proto != htons(ETH_P_IP))
		return PGWFWD_DROP_NOT_FOR_US;

	/* IPv4: header, checksum, lengths, TTL */
	if (frame_len < sizeof(*eth) + sizeof(*ip))
		return PGWFWD_DROP_TRUNCATED;
	ip = (ipv4_header *)(eth + 1);
	if (ip->version != 4)
		return PGWFWD_DROP_NOT_FOR_US;
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
		return PGWFWD_DROP_NOT_FOR_US;
	if (bad_source(ip->saddr, config->vip))
		return PGWFWD_DROP_BAD_SOURCE;
	ip_total_len = ntohs(ip->tot_len);
	if (ip_total_len < ip_header_len + sizeof(*udp))
		return PGWFWD_DROP_BAD_LENGTH;
	/* Longer frames carry Ethernet padding, trimmed below. */
	if (sizeof(*eth) + ip_total_len > frame_len)
		return PGWFWD_DROP_TRUNCATED;

	/* UDP */
	udp = (struct udphdr *)((uint8_t *)ip + ip_header_len);
	if (udp->dest != config->gtp_port)
		return PGWFWD_DROP_NOT_FOR_US;
	udp_len = ntohs(udp->len);
	if (udp_len != ip_total_len - ip_header_len)
		return PGWFWD_DROP_BAD_LENGTH;

	/* GTP-U: echo is for us; the rest goes on, parseable or not. */
	parsed = gtpu_parse((uint8_t *)(udp + 1), udp_len - sizeof(*udp), &gtpu);
	if (parsed == 0 && gtpu.type == GTPU_ECHO_REQUEST)
		return echo_reply(config, frame, len, capacity,
				  gtpu.has_sequence ? gtpu.sequence : 0);
	if (parsed == 0 && gtpu.type == GTPU_ECHO_RESPONSE)
		return PGWFWD_DROP_ECHO_RESPONSE;
	*not_gtpu = parsed != 0;
	/* As a router hop: TTL 1 would leave as 0, and TTL 0 should never
	 * have arrived; both are the same drop (no ICMP Time Exceeded is
	 * sent). Echo, answered above, is for us and needs no hop. */
	if (config->ttl_decrement && ip->ttl <= 1)
		return PGWFWD_DROP_TTL;

	/* Select */
	n_slots = table->n_slots;
	if (n_slots == 0 || n_slots > PGWFWD_MAX_SLOTS)
		return PGWFWD_DROP_NO_PGW;
	if (table->policy == PGWFWD_POLICY_TEID)
		index = table->slots[parsed == 0 ?
			pgwfwd_teid_slot(gtpu.teid, n_slots) :
			pgwfwd_flow_slot(ip->saddr, udp->source, n_slots)];
	else
		index = select_wrr(table, cursor);
	if (index >= PGWFWD_MAX_PGWS)
		return PGWFWD_DROP_NO_PGW;
	*pgw_index = index;

	/* Rewrite */
	rewrite(config, &table->pgws[index], eth, ip, udp);
	*len = sizeof(*eth) + ip_total_len;
	return PGWFWD_FORWARD;
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
