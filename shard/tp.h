/* tp.h - a stage's side of tensor parallelism over ZeroMQ: the all-reduce mesh between
 * the T ranks of one stage, and rank 0's fan-out of micro-batches to ranks 1..T-1.
 *
 * Data flow inside a TP stage: rank 0 receives a StageForward like any stage, sends it
 * as a TpForward to every other rank (cpm_tp_fanout), and all T ranks run the same
 * forward on their slice of the heads and FFN (shard/engine/model: tp_rank/tp_size). Twice
 * per layer the model calls the all-reduce backend (cpm_tp_mesh): each rank sends its
 * partial [rows, hidden] to every other rank's mesh endpoint (a PULL socket) and sums
 * the T partials in rank order, so every rank holds the same residual stream bit for bit.
 * Only rank 0 sends anything downstream.
 *
 * Blocking and single-threaded like expert_client.c: both run on the compute thread
 * inside a job; libuv's work queue orders the jobs. Every wait ends at timeout_ms: a
 * dead or stuck rank fails the micro-batch (rank 0 then sends an Error StageResult).
 *
 *   cpm_tp_mesh_new(zctx, curve, rank, 2, (const char *[]){"tcp://h:5700", "tcp://h:5701"},
 *                   hidden, max_rows, 30000, &mesh, &e);
 *   cpm_allreduce_backend b = cpm_tp_mesh_backend(mesh);
 *   cpm_model_set_allreduce_backend(model, &b);
 *   cpm_tp_mesh_begin(mesh, seq);   // before each micro-batch's forward
 */
#ifndef CPM_TP_H
#define CPM_TP_H

#include <stddef.h>

#include "services/common/curve.h"
#include <stdint.h>

#include "common/error.h"
#include "services/common/wire.h"
#include "shard/engine/model/model.h"

#define CPM_TP_MAX 8 /* ranks of one stage */

typedef struct cpm_tp_mesh cpm_tp_mesh;

/* Binds mesh[rank] (PULL) and connects to the other size - 1 endpoints of mesh
 * (index = rank). Partials hold at most max_rows rows of hidden floats. */
int cpm_tp_mesh_new(void *zctx, const cpm_curve *curve, int rank, int size, const char *const *mesh, int hidden,
                    int max_rows, int timeout_ms, cpm_tp_mesh **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_tp_mesh_free(cpm_tp_mesh *t);

/* Starts micro-batch seq: the all-reduces that follow are tagged (seq, 0), (seq, 1), ...
 * Partials of earlier micro-batches still arriving are dropped. */
void cpm_tp_mesh_begin(cpm_tp_mesh *t, uint64_t seq);

/* Tells every other rank that this rank's forward of the current micro-batch failed
 * (why: the error), so their all-reduces of it fail at once rather than at the
 * deadline. Best effort, waits at most 200 ms per peer. */
void cpm_tp_mesh_abort(cpm_tp_mesh *t, const cpm_error *why);

typedef struct cpm_tp_fanout cpm_tp_fanout;

/* Rank 0: while an all-reduce waits, a rank's refusal of the micro-batch's forward (an
 * Error reply on f: still loading, queue full, malformed) fails it at once, as a
 * `failed` partial does. f must outlive t's use, or be detached with NULL. */
void cpm_tp_mesh_watch_refusals(cpm_tp_mesh *t, cpm_tp_fanout *f);

/* The backend to install with cpm_model_set_allreduce_backend; valid while t lives. */
cpm_allreduce_backend cpm_tp_mesh_backend(cpm_tp_mesh *t);

/* Mean wall time of one all-reduce so far, in microseconds, and how many ran. */
double cpm_tp_mesh_mean_us(const cpm_tp_mesh *t, unsigned long long *ret_calls);

/* Rank 0: one DEALER to each of ranks 1..n (their stage endpoints). */
int cpm_tp_fanout_new(void *zctx, const cpm_curve *curve, const char *const *endpoints, int n, int timeout_ms,
                      cpm_tp_fanout **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_tp_fanout_free(cpm_tp_fanout *f);

/* Sends TpForward{seq, forward} (+ the activation frame of tensor_bytes, if tensor) to
 * every rank; fails when one cannot take it before the deadline. */
int cpm_tp_fanout_send(cpm_tp_fanout *f, uint64_t seq, const Cpm__V1__StageForward *forward,
                       const void *tensor, size_t tensor_bytes, cpm_error *err);

#endif
