/* A batch loop around pgwfwd's per-frame path, for the micro-benchmark.
 *
 * Calling pgwfwd_process_frame through cffi costs far more than the call
 * itself, so the loop runs in C: each round copies a batch of fresh frames
 * over the work buffer (as a NIC would have written them; the path rewrites
 * in place, so a frame cannot be processed twice) and then runs the path on
 * each. With process = 0 only the copies are made, so the difference of the
 * two is the path's own cost.
 */
#include <stdint.h>
#include <string.h>

#include "pgwfwd.h"

uint64_t procbatch_run(const struct pgwfwd_config *config,
		       const struct pgwfwd_table *table,
		       const uint8_t *templates, uint8_t *work,
		       uint32_t frame_len, uint32_t n_frames, uint64_t rounds,
		       int process)
{
	uint32_t cursor = 0, i;
	uint64_t forwarded = 0, round;

	for (round = 0; round < rounds; round++) {
		memcpy(work, templates, (size_t)frame_len * n_frames);
		if (!process) {
			/* Keep the copy from being optimised away. */
			__asm__ volatile("" : : "r"(work) : "memory");
			continue;
		}
		for (i = 0; i < n_frames; i++) {
			uint32_t len = frame_len, pgw_index;

			if (pgwfwd_process_frame(config, table, &cursor,
						 work + (size_t)i * frame_len,
						 &len, &pgw_index) < 0)
				forwarded++;
		}
	}
	return forwarded;
}
