/* stage.h - one pipeline stage as a service: layers [begin, end) of a model, its KV cache,
 * and the two sockets that put it in the ring router -> stage 0 -> ... -> last -> router.
 *
 * A stage receives StageForward micro-batches (ids on the first stage, an activation
 * frame on the others), runs them in arrival order on a worker thread (continuous
 * batching: any mix of prefill chunks and decode rows of any sequences), and sends
 * the activations to `next`, or, on the last stage, the logits of the wanted rows as
 * a StageResult. Sequences are the router's ids; a stage creates a KV entry when it
 * first sees a sequence and frees it on `release`. Every forward yields exactly one
 * message downstream: on failure a StageResult with the error (see proto/README.md).
 *
 *   cpm_stage_opts o = cpm_stage_opts_default();
 *   o.model_dir = "models/minicpm-1b"; o.layer_begin = 0; o.layer_end = 26;
 *   o.bind = "tcp://127.0.0.1:5580"; o.next = "tcp://127.0.0.1:5581";
 *   cpm_stage_new(loop, zctx, &o, &st, &e);   // binds now, loads on a worker
 *   uv_run(loop, UV_RUN_DEFAULT);
 */
#ifndef CPM_STAGE_H
#define CPM_STAGE_H

#include <stdbool.h>
#include <uv.h>

#include "common/error.h"
#include "shard/expert_client.h"
#include "shard/engine/kernels/dtype.h"
#include "shard/tp.h"

typedef struct cpm_stage cpm_stage;

typedef struct cpm_stage_opts {
    const char *model_dir;   /* borrowed until cpm_stage_new returns */
    int layer_begin;
    int layer_end;           /* -1 = through the last layer */
    int threads;             /* compute threads of the forward pass */
    int kv_tokens;           /* KV-cache capacity in tokens */
    cpm_dtype kv_dtype;      /* KV elements: CPM_DTYPE_F32 (default, exact) or CPM_DTYPE_F16 */
    bool act_bf16;           /* BF16 weights meet bf16-rounded activations (cpm_model_opts) */
    bool act_int8;           /* int4 weights meet int8 activations (cpm_model_opts) */
    bool ffn_dense;          /* MiniCPM-S: every FFN neuron, not only the active ones (cpm_model_opts) */
    bool lm_head_int8;       /* the output layer quantized to int8 at load (cpm_model_opts) */
    bool map_weights;        /* weights left in the file mapping (cpm_model_opts) */
    int max_seqs;            /* live sequences */
    int max_batch_tokens;    /* rows per forward call; bigger micro-batches run in chunks */
    int max_queue;           /* micro-batches waiting before new ones fail with CPM_ELIMIT */
    int out_buffers;         /* output tensors zmq may hold at once (default 4), allocated at
                                load: max_batch_tokens x hidden floats each, or on the last
                                stage min(max_batch_tokens, max_seqs) x vocab */
    const char *bind;        /* endpoint of the inbound ROUTER socket */
    const char *next;        /* the next stage, or the router's results endpoint */
    const char *name;        /* for health and error messages ("stage1") */
    /* Expert parallelism (MoE): the services running the experts, their ranges tiling
     * the experts in order (end -1 = through the last). The stage then binds no expert
     * weights and sends every MoE layer's expert rows there (shard/expert_client.h).
     * Borrowed until cpm_stage_new returns; n_experts 0 = run the experts here. */
    const cpm_expert_peer *experts;
    int n_experts;
    int expert_timeout_ms;   /* per layer call; a timeout fails the micro-batch (default 30000) */
    /* Tensor parallelism: this process is rank tp_rank of tp_size (default 0 of 1) of the
     * stage (shard/tp.h). tp_mesh: the tp_size all-reduce endpoints, by rank. Rank 0 is
     * the stage the cluster sees; tp_peers are the stage endpoints of ranks 1..T-1,
     * where it sends every micro-batch. Ranks > 0 take TpForward from rank 0 only,
     * send nothing downstream (next may be NULL) and answer health. Borrowed until
     * cpm_stage_new returns. The all-reduce deadline is expert_timeout_ms. */
    int tp_rank, tp_size;
    const char *const *tp_mesh;
    const char *const *tp_peers;
    /* The fabric's keys (every socket the stage opens: inbound, next hop, experts, TP);
     * NULL = plain text. Borrowed: must outlive the stage. */
    const cpm_curve *curve;
    /* Called on the loading thread while the weights are paged in (about every 5 %), so
     * the service can log it; health shows it too. May be NULL. */
    void (*load_progress)(void *ud, size_t done, size_t total);
    void *load_progress_ud;
} cpm_stage_opts;

cpm_stage_opts cpm_stage_opts_default(void);

/* Called on the loop thread when loading has finished (status 0) or failed. */
typedef void (*cpm_stage_ready_cb)(cpm_stage *st, int status, const cpm_error *err, void *user);

/* Binds and connects at once (errors are returned), then loads the model on a worker
 * thread; health says ready = false until then. cb may be NULL. */
int cpm_stage_new(uv_loop_t *loop, void *zctx, const cpm_stage_opts *opts, cpm_stage_ready_cb cb,
                  void *user, cpm_stage **ret, cpm_error *err);

typedef struct cpm_stage_stats {
    bool ready;
    unsigned long long batches, rows, failed, bad_messages;
    int queued;              /* micro-batches waiting */
    int live_seqs;
    int kv_used, kv_total;   /* blocks */
    double compute_s;        /* total forward time */
    unsigned long long out_allocs; /* allocations made by steps (0 in steady state): a
                                      micro-batch over the limits, or every output
                                      buffer still held by zmq */
    unsigned long long realigned;  /* activation frames copied because zmq delivered them
                                      at an address floats cannot be read from */
    unsigned long long tp_allreduces; /* tensor parallelism: all-reduces run, and their */
    double tp_allreduce_us;           /* mean wall time (send, wait, sum) in microseconds */
    size_t paged_bytes, page_bytes;   /* loading: weights paged in so far, of all */
} cpm_stage_stats;

void cpm_stage_get_stats(const cpm_stage *st, cpm_stage_stats *ret);

/* Stops taking work, closes the sockets, and frees everything once the running job (if
 * any) is done and the loop has run. Accepts NULL. */
/* Graceful stop (SIGTERM): health says "draining" (not ready) while accepted work
 * finishes; cpm_stage_busy says whether any is left. */
void cpm_stage_drain(cpm_stage *st);
bool cpm_stage_busy(const cpm_stage *st);

void cpm_stage_free(cpm_stage *st);

#endif
