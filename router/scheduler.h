/* scheduler.h - continuous batching: which tokens of which sequences go into the next micro-batch.
 *
 * The router drives the pipeline as a ring (proto/README.md): it sends micro-batches
 * (StageForward) to stage 0 and gets logits back from the last stage. This module
 * is the bookkeeping behind that, with no I/O: sequences join (admission against
 * slot, queue and KV-token budgets) and leave at every step; each micro-batch mixes
 * one decode row per ready sequence with prefill chunks; up to max_inflight
 * micro-batches travel at once, and a sequence is in at most one of them (its next
 * token depends on the previous one).
 *
 *   cpm_sched_add(s, prompt, n, max_new, owner, &seq, &e);   // 0, or CPM_ELIMIT: queue full -> 429
 *   while (cpm_sched_next(s, &b) == 1) send_forward(&b);     // ids/pos/seq/want rows + releases
 *   on result(step): cpm_sched_step_done(s, step, ok);       // prefill-only rows become ready again
 *   on sampled token for seq: cpm_sched_push_token(s, seq, tok) or cpm_sched_finish(s, seq)
 *
 * Prefix caching (opts.prefix_blocks > 0, router/prefix.h): a sequence admitted with the
 * first blocks of its prompt believed cached on the stages starts after them (the batch
 * says which blocks to attach), and every block its rows fill is published.
 */
#ifndef CPM_SCHEDULER_H
#define CPM_SCHEDULER_H

#include <stdbool.h>
#include <stdint.h>

#include "../common/error.h"

typedef struct cpm_sched cpm_sched;

typedef struct cpm_sched_opts {
    int max_batch_tokens; /* rows per micro-batch (the stages' max_batch_tokens) */
    int prefill_chunk;    /* most prompt rows of one sequence per micro-batch */
    int max_inflight;     /* micro-batches travelling the pipeline at once */
    int max_seqs;         /* live sequences (KV-cache entries on every stage) */
    int max_queue;        /* sequences waiting for admission; beyond: CPM_ELIMIT */
    int max_context;      /* positions per sequence (prompt + generated) */
    int kv_tokens;        /* KV-cache tokens per stage, reserved at admission (0 = unlimited) */
    /* Sequence and step ids are k * id_stride + id_offset (k = 1, 2, ...): schedulers of
     * several pipeline replicas get disjoint ids (stride = replicas, offset = replica; stride 0 means 1). */
    int id_stride, id_offset;
    int prefix_blocks;    /* prefix cache: blocks the directory lists at most (0: off) */
    /* Micro-batches the live sequences are shared out over: the pipeline's depth (one per
     * stage keeps every stage computing; 0 or 1: a batch takes every ready sequence). */
    int spread;
} cpm_sched_opts;

cpm_sched_opts cpm_sched_opts_default(void);

int cpm_sched_new(const cpm_sched_opts *opts, cpm_sched **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_sched_free(cpm_sched *s);

/* A new sequence with a copy of prompt[0..n_prompt) that may generate up to max_new
 * tokens (n_prompt + max_new must fit max_context). It is admitted at once or queued.
 * owner is returned by cpm_sched_owner. CPM_ELIMIT: the queue is full;
 * CPM_ERANGE: it can never fit (context or KV budget). */
int cpm_sched_add(cpm_sched *s, const int32_t *prompt, int n_prompt, int max_new, void *owner,
                  uint64_t *ret_seq, cpm_error *err);

/* One micro-batch, valid until the next cpm_sched_next call. Rows of one sequence
 * are consecutive and in position order. */
/* KV blocks of one sequence by prefix hash: block first + i is hash[i]. */
typedef struct cpm_sched_blocks {
    uint64_t seq;
    int first, n;
    const uint64_t *hash;
} cpm_sched_blocks;

typedef struct cpm_sched_batch {
    uint64_t step;
    int n_rows;
    const uint64_t *seq;
    const uint32_t *pos;
    const int32_t *ids;
    const uint8_t *want;     /* 1: logits wanted (the row that yields the next token) */
    int n_want;
    int n_release;
    const uint64_t *release; /* sequences the stages must free before these rows */
    int n_attach;            /* new sequences starting from cached blocks */
    const cpm_sched_blocks *attach;
    int n_publish;           /* full blocks to keep after these rows */
    const cpm_sched_blocks *publish;
} cpm_sched_batch;

/* 1 and *b filled when a micro-batch (rows and/or releases) should be sent now; 0
 * when there is nothing to send or max_inflight batches are already out. */
int cpm_sched_next(cpm_sched *s, cpm_sched_batch *b);

/* The pipeline answered step (ok = false: it failed). Sequences whose rows wanted no
 * logits become ready again; those that did wait for cpm_sched_push_token. On
 * failure every sequence of the step is marked failed (cpm_sched_failed) and must
 * be finished by the caller: *ret_seqs lists the step's live sequences (valid until
 * the next call into s; ret_seqs may be NULL). CPM_ENOTFOUND for an unknown step. */
int cpm_sched_step_done(cpm_sched *s, uint64_t step, bool ok, const uint64_t **ret_seqs,
                        int *ret_n);

/* The token sampled from seq's wanted row: appended; seq is ready for its next row.
 * CPM_ENOTFOUND for an unknown (e.g. finished) seq: drop the token. */
int cpm_sched_push_token(cpm_sched *s, uint64_t seq, int32_t token);

/* Ends seq (done, cancelled, failed): its slot and KV reservation are freed and its
 * release goes out with the next micro-batch; if it is in the pipeline, that happens
 * when its step comes back. A token sampled for it later gets CPM_ENOTFOUND.
 * Unknown seqs are ignored. */
void cpm_sched_finish(cpm_sched *s, uint64_t seq);

/* Per-sequence facts; NULL/-1/false for unknown seqs. */
void *cpm_sched_owner(const cpm_sched *s, uint64_t seq);
const int32_t *cpm_sched_tokens(const cpm_sched *s, uint64_t seq, int *ret_n); /* prompt + generated */
int cpm_sched_generated(const cpm_sched *s, uint64_t seq);
bool cpm_sched_failed(const cpm_sched *s, uint64_t seq);

typedef struct cpm_sched_stats {
    int live;        /* admitted sequences */
    int queued;      /* waiting for admission */
    int inflight;    /* micro-batches in the pipeline */
    int kv_reserved; /* tokens reserved by admitted sequences */
    int kv_tokens;   /* budget (0 = unlimited) */
    uint64_t steps;  /* micro-batches sent so far */
    uint64_t prefix_blocks_asked;  /* prompt blocks a cached prefix could have covered */
    uint64_t prefix_blocks_reused; /* of them, taken from the cache */
} cpm_sched_stats;

void cpm_sched_get_stats(const cpm_sched *s, cpm_sched_stats *ret);

/* Prompt tokens of seq taken from the prefix cache (0 until it is admitted). */
int cpm_sched_cached_tokens(const cpm_sched *s, uint64_t id);

/* How many leading full blocks of prompt[0 .. n) the directory lists (for routing a new
 * request to the replica that holds the most); 0 when prefix caching is off. */
int cpm_sched_prefix_match(const cpm_sched *s, const int32_t *prompt, int n);

/* A stage had lost a block the directory listed: forget them all. */
void cpm_sched_prefix_forget(cpm_sched *s);

/* Every sequence it knows (running, queued, or finished with rows still in flight) into
 * ids (room for cap; *ret_n set), and returns the horizon: the highest id it has given
 * out. Together they tell a stage which of its sequences are garbage. 0 (and no ids)
 * when it has given out none, or holds more than cap. */
uint64_t cpm_sched_live(const cpm_sched *s, uint64_t *ids, int cap, int *ret_n);

/* The highest sequence id given out so far (0: none). */
uint64_t cpm_sched_horizon(const cpm_sched *s);

#endif
