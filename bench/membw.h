/* membw.h - the machine's streaming read bandwidth, measured in-process.
 *
 * Benchmarks divide what a memory-bound kernel achieves by this figure (the
 * "roofline") so that results mean the same on every machine.
 */
#ifndef CPM_MEMBW_H
#define CPM_MEMBW_H

#include <stddef.h>

#include "shard/engine/kernels/pool.h"

/* Reads a buffer of `bytes` (make it several times the last-level cache)
 * `reps` times with every thread of pool (NULL: the calling thread), each
 * thread summing its own contiguous slice with the widest vector loads the
 * CPU has. Stores the best pass in GB/s (1e9 bytes/s) in *ret_gbps.
 * Returns 0, or CPM_ENOMEM when the buffer cannot be allocated. */
int cpm_membw_read(cpm_pool *pool, size_t bytes, int reps, double *ret_gbps);

#endif
