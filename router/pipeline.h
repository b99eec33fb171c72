/* pipeline.h - the router's side of the pipeline ring: micro-batches out, results in,
 * sampling calls, step timeouts and failover between replicas.
 *
 * One scheduler (scheduler.h) per pipeline replica; sequence and step ids of replica k
 * are k mod the replica count, so an id names its replica. Admitted gens join the least
 * busy replica that is up; pump() sends every ready micro-batch (StageForward) to stage
 * 0 of its replica; the last stage's StageResult comes back through
 * cpm_pipeline_on_result, its logits go to a sampler, and each sampled token is recorded
 * in its gen and handed up through io.token. A step that fails, times out or is lost
 * with a replica moves its sequences, with their whole history, to another replica
 * (prefilled again; the sampler's draws depend only on seed and step, so no token is
 * lost or repeated), or fails their jobs.
 *
 * No sockets here: envelopes leave through io.forward / io.sample, which the hub
 * implements over ZeroMQ and tests implement in memory. Replies carry sequence ids,
 * never pointers, so a gen cancelled meanwhile is simply not found.
 */
#ifndef CPM_PIPELINE_H
#define CPM_PIPELINE_H

#include <stdbool.h>
#include <stdint.h>

#include "../proto/cpm.pb-c.h"
#include "../services/common/config.h"
#include "../services/common/log.h"
#include "../services/common/transport.h"
#include "job.h"
#include "metrics.h"
#include "scheduler.h"

/* A sequence moves at most this often, so that a request whose input makes every
 * replica fail ends with an error instead of travelling forever. */
#define CPM_PIPELINE_MAX_FAILOVERS 2

/* Sends of one step's logits to samplers, the first included: a call that times out or
 * whose sampler is lost goes to another sampler until this many were tried. */
#define CPM_PIPELINE_SAMPLE_ATTEMPTS 3

typedef struct cpm_pipeline cpm_pipeline;
typedef struct cpm_sample_call cpm_sample_call;

typedef struct cpm_pipeline_io {
    void *ud;
    /* Sends a StageForward envelope to stage 0 of replica; < 0 when it could not (the
     * step then times out). */
    int (*forward)(void *ud, int replica, Cpm__V1__Envelope *env, cpm_error *err);
    /* Sends a SampleRequest with the logits to a sampler; consumes logits whatever
     * happens. The reply (or failure) must come back through cpm_pipeline_sampled(call). */
    int (*sample)(void *ud, Cpm__V1__Envelope *env, cpm_payload *logits, cpm_sample_call *call,
                  cpm_error *err);
    /* g got a token (already in g->ids, g->lps, g->n_gen). stop_id: it is a stop id;
     * end: "stop" / "length" when generation is over, else NULL. */
    void (*token)(void *ud, cpm_gen *g, bool stop_id, const char *end);
} cpm_pipeline_io;

/* What the last stage says of the model, and the limits that follow. */
typedef struct cpm_model_facts {
    int vocab_size;
    /* generation_config.json's sampling defaults (temperature, top_p, top_k, repetition
     * penalty), for the fields a request left out; *_set false: none */
    bool temperature_set, top_p_set, top_k_set, repetition_penalty_set;
    float temperature, top_p, repetition_penalty;
    int top_k;
    int max_position; /* positions per sequence (the tightest stage's KV budget included) */
    int n_eos;
    int32_t eos_ids[8];
} cpm_model_facts;

/* cfg (router limits, stages' budgets), jobs (whose gens it runs) and log are
 * borrowed; m gets the counters. */
int cpm_pipeline_new(const cpm_config *cfg, int n_replicas, cpm_jobs *jobs, const cpm_log *log,
                     cpm_metrics *m, const cpm_pipeline_io *io, cpm_pipeline **ret,
                     cpm_error *err);
void cpm_pipeline_free(cpm_pipeline *p);

/* The model is known: schedulers are made. Later calls change nothing. */
int cpm_pipeline_set_model(cpm_pipeline *p, const Cpm__V1__ModelInfo *mi, const char *model_name);
/* NULL until cpm_pipeline_set_model. */
const cpm_model_facts *cpm_pipeline_model(const cpm_pipeline *p);

/* g (max_new set) joins the least busy replica that is up, with prompt[0..n):
 * 0, CPM_ELIMIT (queue full) or CPM_ERANGE (can never fit). Sets g->seq. */
int cpm_pipeline_add(cpm_pipeline *p, cpm_gen *g, const int32_t *prompt, int n, cpm_error *err);
/* g's sequence leaves its scheduler (and the stages' caches). */
void cpm_pipeline_release(cpm_pipeline *p, cpm_gen *g);

/* Sends every micro-batch the schedulers have ready. */
void cpm_pipeline_pump(cpm_pipeline *p);

/* The last stage's result for a step; logits (the frame after the envelope) is
 * consumed whatever happens. */
void cpm_pipeline_on_result(cpm_pipeline *p, const Cpm__V1__StageResult *res,
                            cpm_payload *logits);
/* A sampler's reply (status 0; reply is its envelope) or failure (status != 0, reply
 * NULL) for call, which is freed. */
void cpm_pipeline_sampled(cpm_sample_call *call, const Cpm__V1__Envelope *reply, int status);

/* Fails the steps out longer than timeout_ms; sends an idle replica that was busy a
 * micro-batch with only the live set (every micro-batch carries the router's epoch and
 * the replica's live sequence ids, so stages free what no request owns). Call it often
 * (the hub: every 250 ms). */
void cpm_pipeline_check_timeouts(cpm_pipeline *p, int timeout_ms);

/* A replica lost a service: no new work goes there; its steps in flight and its
 * sequences move to another replica or fail. */
void cpm_pipeline_replica_down(cpm_pipeline *p, int replica, const char *why);
void cpm_pipeline_replica_up(cpm_pipeline *p, int replica);
/* A service of replica came back from a restart between two health polls: its rows in
 * flight and cached sequences are gone. Every sequence of the replica starts again
 * (prefilled with its history) on the least busy replica, possibly the same one. */
void cpm_pipeline_replica_restarted(cpm_pipeline *p, int replica, const char *why);

/* Something every replica needs is gone (an expert service): every job with a sequence
 * in a scheduler fails now, rather than at the stages' deadline. */
void cpm_pipeline_fail_all(cpm_pipeline *p, const char *why);

/* From now on nothing is sent and replies are dropped (shutdown). */
void cpm_pipeline_stop(cpm_pipeline *p);

/* Totals over every replica (zero before the model is known). */
void cpm_pipeline_stats(const cpm_pipeline *p, cpm_sched_stats *ret);

#endif
