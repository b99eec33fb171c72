/* expert.h - the cpm-expert service: MoE experts [begin, end) of every MoE layer, run for
 * the pipeline stages (expert parallelism; docs/ARCHITECTURE.md "Expert parallelism").
 *
 * A stage whose model has an expert backend (shard/expert_client.h) sends one
 * ExpertForward per MoE layer and service: rows grouped by expert. This service runs
 * each group through cpm_expert_ffn - the code a stage runs for local experts - and
 * answers ExpertResult with the unweighted outputs in the same order, or an Error.
 * Everything from the network is checked (layer, experts, sizes) before compute.
 * Requests run one at a time, in arrival order, on a worker thread (the model's
 * scratch is single); the loop thread only receives, answers health and sends.
 *
 *   cpm_expert_opts o = cpm_expert_opts_default();
 *   o.model_dir = "models/minicpm-moe"; o.expert_begin = 0; o.expert_end = 4;
 *   o.bind = "tcp://127.0.0.1:5600";
 *   cpm_expert_new(loop, zctx, &o, on_ready, user, &ex, &e);   // binds now, loads on a worker
 *   uv_run(loop, UV_RUN_DEFAULT);
 */
#ifndef CPM_EXPERT_H
#define CPM_EXPERT_H

#include <stdbool.h>
#include <uv.h>

#include "common/error.h"
#include "services/common/curve.h"

typedef struct cpm_expert cpm_expert;

typedef struct cpm_expert_opts {
    const char *model_dir;   /* borrowed until cpm_expert_new returns */
    int expert_begin;        /* experts [begin, end) of every MoE layer */
    int expert_end;          /* -1 = through the last expert */
    int threads;             /* compute threads */
    int max_batch_tokens;    /* rows per expert matmul call (bigger groups run in chunks) */
    int max_queue;           /* requests waiting before new ones are refused (CPM_ELIMIT) */
    const char *bind;        /* endpoint of the ROUTER socket */
    const cpm_curve *curve;  /* the fabric's keys (NULL = plain text); must outlive it */
    const char *name;        /* for health and error messages ("expert0") */
} cpm_expert_opts;

cpm_expert_opts cpm_expert_opts_default(void);

/* Called on the loop thread when loading has finished (status 0) or failed. */
typedef void (*cpm_expert_ready_cb)(cpm_expert *ex, int status, const cpm_error *err, void *user);

/* Binds at once (errors are returned), then loads the model on a worker thread; until
 * then health says ready = false and requests get CPM_EAGAIN. cb may be NULL. */
int cpm_expert_new(uv_loop_t *loop, void *zctx, const cpm_expert_opts *opts, cpm_expert_ready_cb cb,
                   void *user, cpm_expert **ret, cpm_error *err);

typedef struct cpm_expert_stats {
    unsigned long long served, failed, rows, bad_messages;
    double compute_s;
} cpm_expert_stats;

void cpm_expert_get_stats(const cpm_expert *ex, cpm_expert_stats *ret);

/* Stops taking work, closes the socket, and frees everything once the running job (if
 * any) is done and the loop has run. Accepts NULL. */
/* Graceful stop (SIGTERM): health says "draining" (not ready) while accepted work
 * finishes; cpm_expert_busy says whether any is left. */
void cpm_expert_drain(cpm_expert *ex);
bool cpm_expert_busy(const cpm_expert *ex);

void cpm_expert_free(cpm_expert *ex);

#endif
