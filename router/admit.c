/* admit.c - tokenize once, check limits, place each gen on a pipeline replica. */
#include "admit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool cpm_admit_ready(const cpm_admit *ad) {
    return !ad->closing && cpm_pipeline_model(ad->pipeline) && cpm_health_ready(ad->health);
}

bool cpm_admit_open(const cpm_admit *ad, const char **code, const char **why) {
    if (ad->closing) {
        *code = "shutting_down";
        *why = "the server is shutting down";
    } else if (!cpm_admit_ready(ad)) {
        *code = "not_ready";
        *why = "the cluster is not ready yet (see GET /ready)";
    } else {
        return true;
    }
    return false;
}

/* ---- checks ----------------------------------------------------------------------------- */

static void refuse(cpm_job *j, const char *code, const char *msg) {
    cpm_job_fail(j, 400, "invalid_request_error", code, msg);
}

/* logit_bias and stop_token_ids name tokens of the vocabulary. */
static bool ids_in_vocab(const cpm_job *j, int vocab, char *msg, size_t size) {
    for (int i = 0; i < j->n_bias; i++)
        if (j->bias_ids[i] >= vocab) {
            snprintf(msg, size, "logit_bias names token %d, outside the vocabulary (size %d)",
                     j->bias_ids[i], vocab);
            return false;
        }
    for (int i = 0; i < j->n_stop_ids; i++)
        if (j->stop_ids[i] < 0 || j->stop_ids[i] >= vocab) {
            snprintf(msg, size, "stop token %d is outside the vocabulary (size %d)", j->stop_ids[i],
                     vocab);
            return false;
        }
    return true;
}

/* Prompt p of j against the limits; false when j was refused. */
static bool check_prompt(const cpm_admit *ad, cpm_job *j, int p) {
    const cpm_cfg_router *rc = &ad->cfg->router;
    const cpm_model_facts *mf = cpm_pipeline_model(ad->pipeline);
    int n = j->prompt_len[p], room = mf->max_position - n;
    char msg[256];
    if (n == 0) {
        refuse(j, "invalid_prompt", "the prompt is empty");
        return false;
    }
    if (n > rc->max_prompt_tokens || n >= mf->max_position) {
        snprintf(msg, sizeof msg,
                 "prompt has %d tokens; this server accepts at most %d (context length %d)", n,
                 rc->max_prompt_tokens, mf->max_position);
        refuse(j, "context_length_exceeded", msg);
        return false;
    }
    for (int i = 0; i < n; i++) {
        int32_t id = j->prompt_ids[p][i];
        if (id < 0 || id >= mf->vocab_size) {
            snprintf(msg, sizeof msg, "token id %d at prompt position %d is outside the "
                                      "vocabulary (size %d)", id, i, mf->vocab_size);
            refuse(j, "invalid_token_id", msg);
            return false;
        }
    }
    if (!ids_in_vocab(j, mf->vocab_size, msg, sizeof msg)) {
        refuse(j, "invalid_token_id", msg);
        return false;
    }
    if (j->max_tokens > room) {
        snprintf(msg, sizeof msg, "max_tokens %d is too large: %d tokens are left in the context "
                 "(%d) after a %d-token prompt", j->max_tokens, room, mf->max_position, n);
        refuse(j, "context_length_exceeded", msg);
        return false;
    }
    if (rc->max_tokens && j->max_tokens > rc->max_tokens) {
        snprintf(msg, sizeof msg, "max_tokens %d is above this server's cap of %d (router.max_tokens)",
                 j->max_tokens, rc->max_tokens);
        refuse(j, "max_tokens_too_large", msg);
        return false;
    }
    return true;
}

/* What a request that names no max_tokens gets: the context left, within the server's cap. */
static int default_max_new(const cpm_cfg_router *rc, int room) {
    return rc->max_tokens && rc->max_tokens < room ? rc->max_tokens : room;
}

/* The model's generation_config.json values for what the request left out. */
static void apply_model_defaults(const cpm_model_facts *mf, cpm_gen *g) {
    unsigned want = g->job->model_defaults;
    Cpm__V1__SamplingParams *p = &g->params;
    if ((want & CPM_JOB_DEFAULT_TEMPERATURE) && mf->temperature_set)
        p->temperature = mf->temperature;
    if ((want & CPM_JOB_DEFAULT_TOP_P) && mf->top_p_set)
        p->top_p = mf->top_p;
    if ((want & CPM_JOB_DEFAULT_TOP_K) && mf->top_k_set)
        p->top_k = (uint32_t)mf->top_k;
    if ((want & CPM_JOB_DEFAULT_REPETITION_PENALTY) && mf->repetition_penalty_set)
        p->repetition_penalty = mf->repetition_penalty;
}

/* g's buffers and its place in the pipeline; false when j was answered. */
static bool place_gen(cpm_admit *ad, cpm_gen *g) {
    cpm_job *j = g->job;
    const cpm_cfg_router *rc = &ad->cfg->router;
    int n = j->prompt_len[g->prompt];
    int room = cpm_pipeline_model(ad->pipeline)->max_position - n;
    g->max_new = j->max_tokens ? j->max_tokens : default_max_new(rc, room);
    apply_model_defaults(cpm_pipeline_model(ad->pipeline), g);
    g->ids = calloc((size_t)g->max_new, sizeof *g->ids);
    g->lps = j->logprobs ? calloc((size_t)g->max_new, sizeof *g->lps) : NULL;
    g->stopper = cpm_stopper_new(j->stops, j->n_stops, j->include_stop_str);
    if (!g->ids || (j->logprobs && !g->lps) || !g->stopper) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return false;
    }
    cpm_error e = {0};
    int rc2 = cpm_pipeline_add(ad->pipeline, g, j->prompt_ids[g->prompt], n, &e);
    if (rc2 == CPM_ELIMIT) {
        cpm_job_fail(j, 429, "rate_limit_error", "queue_full", e.msg);
        return false;
    }
    if (rc2) {
        refuse(j, "context_length_exceeded", e.msg);
        return false;
    }
    cpm_req_transition(&g->state, CPM_REQ_PREFILLING);
    ad->m->prompt_tokens += (uint64_t)n;
    cpm_hist_observe(&ad->m->prompt_len, n);
    return true;
}

/* Every prompt has its ids: check them all, then place every gen. */
static void admit(cpm_admit *ad, cpm_job *j) {
    if (j->tokenize_only) { /* the ids are the answer: no limits, no pipeline */
        cpm_job_transition(j, CPM_JOB_RUNNING);
        cpm_job_done(j);
        return;
    }
    for (int p = 0; p < j->n_prompts; p++)
        if (!check_prompt(ad, j, p))
            return;
    for (int i = 0; i < j->n_gens; i++)
        if (!place_gen(ad, &j->gens[i]))
            return;
    cpm_job_transition(j, CPM_JOB_RUNNING);
    j->sink->begin(j);
    cpm_pipeline_pump(ad->pipeline);
}

/* ---- tokenizing at the door ------------------------------------------------------------- */

typedef struct prompt_call {
    cpm_admit *ad;
    cpm_job *job;
    int p;
} prompt_call;

static int tokenize_prompt(cpm_admit *ad, cpm_job *j, int p, cpm_error *e);

/* A tokenizer lost, timed out or busy: prompt p goes again (the next ready replica),
 * up to CPM_ADMIT_TOKENIZE_ATTEMPTS sends. true when it went. */
static bool retry_prompt(cpm_admit *ad, cpm_job *j, int p, int status) {
    cpm_error e = {0};
    if ((status != CPM_ETIMEDOUT && status != CPM_ECLOSED && status != CPM_ELIMIT) ||
        ++j->tok_attempts >= CPM_ADMIT_TOKENIZE_ATTEMPTS || tokenize_prompt(ad, j, p, &e))
        return false;
    ad->m->retries++;
    return true;
}

static void on_prompt_ids(void *user, const cpm_tokc_result *res) {
    prompt_call *pc = user;
    cpm_job *j = pc->job;
    cpm_admit *ad = pc->ad;
    int p = pc->p;
    free(pc);
    j->tok_pending--;
    bool gone = cpm_job_answered(j); /* aborted or failed meanwhile */
    cpm_job_drop(j);
    if (gone)
        return;
    if (res->status && retry_prompt(ad, j, p, res->status))
        return;
    if (res->status) {
        /* the service refusing the text is the request's fault; no answer is ours */
        if (res->refused && res->status != CPM_ELIMIT)
            refuse(j, "invalid_prompt", res->msg);
        else
            cpm_job_fail(j, 503, "server_error", "tokenizer_unavailable", res->msg);
        return;
    }
    j->prompt_ids[p] = malloc((res->n_ids ? res->n_ids : 1) * sizeof(int32_t));
    if (!j->prompt_ids[p]) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    memcpy(j->prompt_ids[p], res->ids, res->n_ids * sizeof(int32_t));
    if (j->tokenize_only && j->chat && res->text && !j->rendered)
        j->rendered = strdup(res->text); /* shown by /tokenize; none without memory */
    j->prompt_len[p] = (int)res->n_ids;
    if (j->tok_pending == 0)
        admit(ad, j);
}

/* Sends prompt p of j (a chat's messages, or a completion's text) to a tokenizer. */
static int tokenize_prompt(cpm_admit *ad, cpm_job *j, int p, cpm_error *e) {
    prompt_call *pc = malloc(sizeof *pc);
    if (!pc)
        return cpm_error_set(e, CPM_ENOMEM, "out of memory");
    *pc = (prompt_call){ad, j, p};
    cpm_svc *tk = cpm_health_tokenizer(ad->health);
    int timeout = ad->cfg->router.timeout_ms, rc;
    if (j->chat)
        rc = cpm_tokc_chat(tk->sock, tk->name, j->chat, (size_t)j->n_chat, j->tools_json, timeout,
                           on_prompt_ids, pc, e);
    else
        rc = cpm_tokc_tokenize(tk->sock, tk->name, j->prompt_text[p], true, timeout,
                               on_prompt_ids, pc, e);
    if (rc) {
        free(pc);
        return rc;
    }
    cpm_job_hold(j);
    j->tok_pending++;
    return 0;
}

void cpm_admit_job(cpm_admit *ad, cpm_job *j) {
    bool need_tok = false;
    for (int p = 0; p < j->n_prompts; p++)
        need_tok |= !j->prompt_ids[p];
    if (!need_tok) {
        admit(ad, j);
        return;
    }
    if (!ad->use_tok) {
        refuse(j, "no_tokenizer", "this server runs with `tokenize: off`: send the prompt as "
                                  "token ids");
        return;
    }
    cpm_job_transition(j, CPM_JOB_TOKENIZING);
    for (int p = 0; p < j->n_prompts; p++) {
        cpm_error e = {0};
        if (!j->prompt_ids[p] && tokenize_prompt(ad, j, p, &e)) {
            cpm_job_fail(j, 503, "server_error", "tokenizer_unavailable", e.msg);
            return;
        }
    }
}
