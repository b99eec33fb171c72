/* job.c - a request's state machine, its gens, and the one final answer. */
#include "job.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

struct cpm_jobs {
    cpm_job *head;
    int n;
    uint64_t serial;
    cpm_metrics *m;
    cpm_jobs_hooks hooks;
};

int cpm_strbuf_add(cpm_strbuf *b, const void *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np)
            return CPM_ENOMEM;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
    return 0;
}

/* ---- states ---------------------------------------------------------------------- */

const char *cpm_job_state_name(cpm_job_state s) {
    static const char *const names[] = {"new", "tokenizing", "running",
                                        "done", "failed", "cancelled"};
    return (unsigned)s < CPM_JOB_STATES ? names[s] : "unknown";
}

bool cpm_job_state_terminal(cpm_job_state s) {
    return s == CPM_JOB_DONE || s == CPM_JOB_FAILED || s == CPM_JOB_CANCELLED;
}

int cpm_job_transition(cpm_job *j, cpm_job_state to) {
    static const bool edge[CPM_JOB_STATES][CPM_JOB_STATES] = {
        /*                     N  T  R  D  F  C */
        [CPM_JOB_NEW] = {0, 1, 1, 0, 1, 1},
        [CPM_JOB_TOKENIZING] = {0, 0, 1, 0, 1, 1},
        [CPM_JOB_RUNNING] = {0, 0, 0, 1, 1, 1},
    };
    if ((unsigned)j->state >= CPM_JOB_STATES || (unsigned)to >= CPM_JOB_STATES ||
        !edge[j->state][to])
        return CPM_EINVAL;
    j->state = to;
    return 0;
}

bool cpm_job_answered(const cpm_job *j) {
    return cpm_job_state_terminal(j->state);
}

/* ---- the registry ------------------------------------------------------------------ */

cpm_jobs *cpm_jobs_new(cpm_metrics *m, const cpm_jobs_hooks *hooks) {
    cpm_jobs *js = calloc(1, sizeof *js);
    if (!js)
        return NULL;
    js->m = m;
    if (hooks)
        js->hooks = *hooks;
    return js;
}

void cpm_jobs_free(cpm_jobs *js) {
    free(js);
}

int cpm_jobs_count(const cpm_jobs *js) {
    return js->n;
}

cpm_job *cpm_jobs_first(cpm_jobs *js) {
    return js->head;
}

cpm_job *cpm_job_new(cpm_jobs *js, int ep, const char *id_prefix, const cpm_job_sink *sink,
                     void *sink_ud) {
    cpm_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->jobs = js;
    j->state = CPM_JOB_NEW;
    j->sink = sink;
    j->sink_ud = sink_ud;
    j->ep = ep;
    j->t_start = uv_hrtime();
    j->created = (int64_t)time(NULL);
    j->serial = ++js->serial;
    snprintf(j->id, sizeof j->id, "%s-%" PRIx64 "%04" PRIx64, id_prefix, (uint64_t)j->created,
             j->serial);
    j->next = js->head;
    if (js->head)
        js->head->prev = j;
    js->head = j;
    js->n++;
    return j;
}

int cpm_job_init_gens(cpm_job *j, int n_prompts, int n_per_prompt) {
    j->n_prompts = n_prompts;
    j->prompt_ids = calloc((size_t)n_prompts, sizeof *j->prompt_ids);
    j->prompt_len = calloc((size_t)n_prompts, sizeof *j->prompt_len);
    j->prompt_text = calloc((size_t)n_prompts, sizeof *j->prompt_text);
    j->n_gens = n_prompts * n_per_prompt;
    j->gens = calloc((size_t)(j->n_gens > 0 ? j->n_gens : 1), sizeof *j->gens);
    if (!j->prompt_ids || !j->prompt_len || !j->prompt_text || !j->gens)
        return CPM_ENOMEM;
    for (int i = 0; i < j->n_gens; i++) {
        cpm_gen *g = &j->gens[i];
        g->job = j;
        g->index = i;
        g->prompt = i / n_per_prompt;
        g->state = CPM_REQ_QUEUED;
    }
    return 0;
}

uint64_t cpm_job_default_seed(const cpm_job *j, int i) {
    return uv_hrtime() * 0x9E3779B97F4A7C15ull + j->serial * 7919 + (uint64_t)i;
}

static void gen_clear(cpm_gen *g) {
    for (int i = 0; g->lps && i < g->max_new; i++) {
        free(g->lps[i].text);
        for (int k = 0; k < CPM_JOB_MAX_TOP; k++)
            free(g->lps[i].top_text[k]);
    }
    cpm_stopper_free(g->stopper);
    free(g->ids);
    free(g->lps);
    free(g->text.p);
}

static void job_free(cpm_job *j) {
    cpm_jobs *js = j->jobs;
    if (j->prev)
        j->prev->next = j->next;
    else
        js->head = j->next;
    if (j->next)
        j->next->prev = j->prev;
    js->n--;
    for (int i = 0; i < j->n_gens; i++)
        gen_clear(&j->gens[i]);
    free(j->gens);
    for (int i = 0; i < j->n_prompts; i++)
        free(j->prompt_ids[i]);
    free(j->prompt_ids);
    free(j->prompt_len);
    free(j->prompt_text);
    free(j->chat);
    free(j->rendered);
    free(j->stop_ids);
    free(j->bias_ids);
    free(j->bias);
    free(j->min_stop);
    j->sink->free(j->sink_ud);
    free(j);
    if (js->n == 0 && js->hooks.empty)
        js->hooks.empty(js->hooks.ud);
}

/* Frees j once its answer is given and no tokenizer call holds it. */
static void job_maybe_free(cpm_job *j) {
    if (cpm_job_answered(j) && j->refs == 0)
        job_free(j);
}

void cpm_job_hold(cpm_job *j) {
    j->refs++;
}

void cpm_job_drop(cpm_job *j) {
    j->refs--;
    job_maybe_free(j);
}

/* ---- gens ------------------------------------------------------------------------------ */

void cpm_gen_release(cpm_gen *g) {
    if (g->released)
        return;
    g->released = true;
    cpm_jobs *js = g->job->jobs;
    if (g->seq && js->hooks.release)
        js->hooks.release(js->hooks.ud, g);
}

/* The finish reason, its length and decode time, in the metrics. */
static void count_finish(cpm_gen *g, cpm_req_state to, const char *reason) {
    cpm_metrics *m = g->job->jobs->m;
    int f = to == CPM_REQ_CANCELLED ? CPM_FIN_ABORT
            : to == CPM_REQ_FAILED  ? CPM_FIN_ERROR
            : reason && !strcmp(reason, "length") ? CPM_FIN_LENGTH
            : g->tool_calls                       ? CPM_FIN_TOOL_CALLS
                                                  : CPM_FIN_STOP;
    m->finished[f]++;
    g->counted_fin = 1 + f;
    if (to != CPM_REQ_FINISHED)
        return;
    cpm_hist_observe(&m->gen_len, g->n_gen);
    if (g->t_first)
        cpm_hist_observe(&m->decode_time, (double)(uv_hrtime() - g->t_first) / 1e9);
}

void cpm_gen_finish(cpm_gen *g, cpm_req_state to, const char *reason) {
    if (cpm_req_transition(&g->state, to) != 0)
        return;
    cpm_gen_release(g);
    g->finish = reason;
    g->job->n_done++;
    count_finish(g, to, reason);
}

void cpm_gen_found_tool_calls(cpm_gen *g) {
    if (g->tool_calls)
        return;
    g->tool_calls = true;
    if (g->counted_fin == 1 + CPM_FIN_STOP) {
        cpm_metrics *m = g->job->jobs->m;
        m->finished[CPM_FIN_STOP]--;
        m->finished[CPM_FIN_TOOL_CALLS]++;
        g->counted_fin = 1 + CPM_FIN_TOOL_CALLS;
    }
}

static void end_gens(cpm_job *j, cpm_req_state to) {
    for (int i = 0; i < j->n_gens; i++)
        if (!cpm_req_state_terminal(j->gens[i].state))
            cpm_gen_finish(&j->gens[i], to, NULL);
}

bool cpm_job_is_stop_id(const cpm_job *j, const int32_t *eos, int n_eos, int32_t id) {
    if (!j->ignore_eos)
        for (int i = 0; i < n_eos; i++)
            if (eos[i] == id)
                return true;
    for (int i = 0; i < j->n_stop_ids; i++)
        if (j->stop_ids[i] == id)
            return true;
    return false;
}

int cpm_job_set_stop_ids(cpm_job *j, const int32_t *ids, int n) {
    if (n <= 0)
        return 0;
    if (!(j->stop_ids = malloc((size_t)n * sizeof *ids)))
        return CPM_ENOMEM;
    memcpy(j->stop_ids, ids, (size_t)n * sizeof *ids);
    j->n_stop_ids = n;
    return 0;
}

int cpm_job_set_bias(cpm_job *j, const int32_t *ids, const float *bias, int n) {
    if (n > 0) {
        j->bias_ids = malloc((size_t)n * sizeof *ids);
        j->bias = malloc((size_t)n * sizeof *bias);
        if (!j->bias_ids || !j->bias)
            return CPM_ENOMEM;
        memcpy(j->bias_ids, ids, (size_t)n * sizeof *ids);
        memcpy(j->bias, bias, (size_t)n * sizeof *bias);
    }
    j->n_bias = n > 0 ? n : 0;
    for (int i = 0; i < j->n_gens; i++) {
        Cpm__V1__SamplingParams *p = &j->gens[i].params;
        p->n_bias_ids = p->n_bias = (size_t)j->n_bias;
        p->bias_ids = j->bias_ids;
        p->bias = j->bias;
    }
    return 0;
}

const int32_t *cpm_job_min_stop_ids(cpm_job *j, const int32_t *eos, int n_eos, int *ret_n) {
    if (!j->min_stop_made) {
        int n = (j->ignore_eos ? 0 : n_eos) + j->n_stop_ids;
        if (!(j->min_stop = malloc((size_t)(n > 0 ? n : 1) * sizeof *j->min_stop)))
            return NULL;
        if (!j->ignore_eos)
            memcpy(j->min_stop, eos, (size_t)n_eos * sizeof *eos);
        memcpy(j->min_stop + (j->ignore_eos ? 0 : n_eos), j->stop_ids,
               (size_t)j->n_stop_ids * sizeof *j->stop_ids);
        j->n_min_stop = n;
        j->min_stop_made = true;
    }
    *ret_n = j->n_min_stop;
    return j->min_stop;
}

void cpm_job_usage(const cpm_job *j, int *ret_prompt, int *ret_completion) {
    int p = 0, c = 0;
    for (int i = 0; i < j->n_prompts; i++)
        p += j->prompt_len[i];
    for (int i = 0; i < j->n_gens; i++)
        c += j->gens[i].n_gen;
    *ret_prompt = p;
    *ret_completion = c;
}

void cpm_job_access_note(const cpm_job *j, const char *outcome, char *out, size_t size) {
    int prompt, completion;
    cpm_job_usage(j, &prompt, &completion);
    const char *finish = outcome ? outcome : j->n_gens && j->gens[0].finish ? j->gens[0].finish : "stop";
    int n = snprintf(out, size, "request_id=%s prompt_tokens=%d completion_tokens=%d finish_reason=%s",
                     j->id, prompt, completion, finish);
    if (j->first_token_seen && n > 0 && (size_t)n < size)
        snprintf(out + n, size - (size_t)n, " ttft_ms=%.1f", (double)(j->t_first_token - j->t_start) / 1e6);
}

/* ---- the one final answer ------------------------------------------------------------------ */

static void count(cpm_job *j, int outcome) {
    j->jobs->m->requests[j->ep][outcome]++;
}

void cpm_job_done(cpm_job *j) {
    if (j->n_done < j->n_gens || cpm_job_transition(j, CPM_JOB_DONE) != 0)
        return;
    j->sink->done(j);
    count(j, CPM_OUT_OK);
    cpm_hist_observe(&j->jobs->m->e2e, (double)(uv_hrtime() - j->t_start) / 1e9);
    job_maybe_free(j);
}

void cpm_job_fail(cpm_job *j, int status, const char *type, const char *code, const char *msg) {
    if (cpm_job_transition(j, CPM_JOB_FAILED) != 0)
        return;
    end_gens(j, CPM_REQ_FAILED);
    cpm_job_error e = {status, type, code, msg};
    j->sink->fail(j, &e);
    count(j, status == 429 || status == 503 ? CPM_OUT_OVERLOAD
             : status < 500                 ? CPM_OUT_REJECTED
                                            : CPM_OUT_FAILED);
    job_maybe_free(j);
}

void cpm_job_cancel(cpm_job *j) {
    if (cpm_job_transition(j, CPM_JOB_CANCELLED) != 0)
        return;
    end_gens(j, CPM_REQ_CANCELLED);
    j->sink->cancelled(j);
    count(j, CPM_OUT_CANCELLED);
    cpm_hist_observe(&j->jobs->m->e2e, (double)(uv_hrtime() - j->t_start) / 1e9);
    job_maybe_free(j);
}
