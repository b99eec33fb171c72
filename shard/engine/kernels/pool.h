/* pool.h - a fixed team of worker threads that run one parallel section at a time.
 *
 * The engine calls cpm_pool_run() several hundred times per token, so a run must
 * cost a few microseconds: workers are created once and wait on a shared
 * generation counter; nothing is allocated or locked per run beyond that.
 */
#ifndef CPM_POOL_H
#define CPM_POOL_H

#include <stddef.h>

typedef struct cpm_pool cpm_pool;

/* Work function: called once on every thread with tid in [0, nthreads). */
typedef void (*cpm_pool_fn)(void *arg, int tid, int nthreads);

/* Creates a pool of n_threads (>= 1; the calling thread counts as thread 0).
 * Returns NULL on failure. Free with cpm_pool_free. */
cpm_pool *cpm_pool_new(int n_threads);

/* Joins the workers and frees the pool. Accepts NULL. */
void cpm_pool_free(cpm_pool *pool);

int cpm_pool_size(const cpm_pool *pool);

/* Runs fn(arg, tid, n) on all n threads and returns when every call returned.
 * Not reentrant: one run at a time per pool. pool may be NULL (runs fn(arg,0,1)). */
void cpm_pool_run(cpm_pool *pool, cpm_pool_fn fn, void *arg);

/* A buffer of at least bytes owned by the pool, 64-byte aligned, for kernels
 * that pack an operand once per call and share it across the threads of a run.
 * Call it from the calling thread, outside a run. It grows only, so once the
 * largest shape has been seen (or reserved at load time) no call allocates.
 * The contents are clobbered by the next kernel; the pool frees it. Returns
 * NULL when pool is NULL or the allocation fails. */
void *cpm_pool_scratch(cpm_pool *pool, size_t bytes);

/* A call's buffer of at least bytes, 64-byte aligned: the pool's scratch, or
 * (no pool, or its scratch cannot grow) one allocated for this call, which is
 * then also stored in *owned for the caller to free (else *owned = NULL).
 * NULL when neither can be had. */
void *cpm_pool_buffer(cpm_pool *pool, size_t bytes, void **owned);

#endif
