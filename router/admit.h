/* admit.h - a filled-in job enters the cluster: tokenize once, check limits, place.
 *
 * The fronts make a job (job.h) with its prompts as ids, text or chat messages and
 * hand it here. Prompts without ids go to a cpm-tokenizer replica (a chat is
 * rendered with the model's template there) once (again on another replica only when
 * that one is lost, times out or is busy); then every prompt is
 * checked against the server's and the model's limits (empty, too long, ids outside
 * the vocabulary, max_tokens beyond the context) and each gen joins the pipeline
 * (pipeline.h picks the replica). Any refusal is the job's one final answer.
 */
#ifndef CPM_ADMIT_H
#define CPM_ADMIT_H

#include <stdbool.h>

#include "../services/common/config.h"
#include "health.h"
#include "job.h"
#include "metrics.h"
#include "pipeline.h"

/* Sends of one prompt to tokenizers, the first included: a lost, timed-out or busy
 * tokenizer's prompt goes to another until this many were tried. */
#define CPM_ADMIT_TOKENIZE_ATTEMPTS 3

typedef struct cpm_admit {
    const cpm_config *cfg; /* router limits, timeout */
    cpm_metrics *m;
    cpm_health *health;    /* tokenizer replicas */
    cpm_pipeline *pipeline;
    bool use_tok;          /* false with `router: tokenize: off` */
    bool closing;          /* shutting down: nothing is admitted */
} cpm_admit;

/* Whether new work can be taken now; if not, *code ("shutting_down" while the router
 * drains or closes, else "not_ready") and *why say why (for a 503). */
bool cpm_admit_open(const cpm_admit *ad, const char **code, const char **why);

/* Ready: not shutting down or draining, the model is known and the services answer
 * (GET /ready). */
bool cpm_admit_ready(const cpm_admit *ad);

/* Takes j (state new, prompts and gens filled in): tokenizes, checks, places, and
 * begins its answer; or answers it with an error. */
void cpm_admit_job(cpm_admit *ad, cpm_job *j);

#endif
