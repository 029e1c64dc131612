/* A batch loop around pgwfwd's per-frame path, for the micro-benchmark.
 *
 * Calling pgwfwd_process_frame through cffi costs far more than the call
 * itself, so the loop runs in C: each round copies a batch of fresh frames
 * over the work buffer (as a NIC would have written them; the path rewrites
 * in place, so a frame cannot be processed twice) and then runs the path on
 * each. Round r takes batch r mod n_batches of the templates, so that the
 * teid policy looks up n_batches * batch different TEIDs, as a queue sees
 * many tunnels, not the same few over and over. With process = 0 only the
 * copies are made, so the difference of the two is the path's own cost.
 *
 * verdicts[PGWFWD_DROP_MAX + 2] counts the outcomes, indexed by verdict + 2:
 * [0] replies, [1] forwards, [2 + reason] drops.
 */
#include <stdint.h>
#include <string.h>

#include "pgwfwd.h"

void procbatch_run(const struct pgwfwd_config *config,
		   const struct pgwfwd_table *table,
		   struct pgwfwd_cursor *cursor, const uint8_t *templates,
		   uint8_t *work, uint32_t frame_len, uint32_t batch,
		   uint32_t n_batches, uint64_t rounds, int process,
		   uint64_t *verdicts)
{
	size_t batch_bytes = (size_t)frame_len * batch;
	uint64_t round;
	uint32_t i;

	for (round = 0; round < rounds; round++) {
		memcpy(work, templates + (round % n_batches) * batch_bytes,
		       batch_bytes);
		if (!process) {
			/* Keep the copy from being optimised away. */
			__asm__ volatile("" : : "r"(work) : "memory");
			continue;
		}

		for (i = 0; i < batch; i++) {
			uint32_t len = frame_len, pgw_index, not_gtpu;
			int verdict;

			/* Each frame may use its whole slot for a reply. */
			verdict = pgwfwd_process_frame(
				config, table, cursor,
				work + (size_t)i * frame_len, &len, frame_len,
				&pgw_index, &not_gtpu);
			verdicts[verdict + 2]++;
		}
	}
}
