/* api_rpc.c - the internal RPC front: Generate/Cancel/Health in, TokenEvents out. */
#include "api_rpc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUEST_ID_MAX 128

struct cpm_api_rpc {
    const cpm_front_ctx *ctx;
    cpm_sock *sock;
    const char *http_addr;
    int http_port;
};

/* The answer side of one RPC job. */
typedef struct rpc_answer {
    cpm_api_rpc *api;
    cpm_peer peer;
    uint64_t corr;
    char request_id[REQUEST_ID_MAX + 1];
} rpc_answer;

static rpc_answer *answer_of(const cpm_job *j) {
    return j->sink_ud;
}

/* ---- token events ---------------------------------------------------------------------- */

/* The logprobs of n tokens, as parallel arrays on the heap (a final event may carry
 * every token); freed by lp_arrays_free. */
typedef struct lp_arrays {
    float *lps;
    Cpm__V1__TopLogprobs *tops, **topp;
    Cpm__V1__TopLogprob *alts, **altp;
} lp_arrays;

static void lp_arrays_free(lp_arrays *a) {
    free(a->lps), free(a->tops), free(a->topp), free(a->alts), free(a->altp);
}

static bool lp_arrays_fill(lp_arrays *a, const cpm_tok_lp *t, size_t n) {
    a->lps = malloc(n * sizeof *a->lps);
    a->tops = malloc(n * sizeof *a->tops);
    a->topp = malloc(n * sizeof *a->topp);
    a->alts = malloc(n * CPM_JOB_MAX_TOP * sizeof *a->alts);
    a->altp = malloc(n * CPM_JOB_MAX_TOP * sizeof *a->altp);
    if (!a->lps || !a->tops || !a->topp || !a->alts || !a->altp)
        return false;
    for (size_t i = 0; i < n; i++) {
        a->lps[i] = t[i].lp;
        cpm__v1__top_logprobs__init(&a->tops[i]);
        for (int k = 0; k < t[i].n_top; k++) {
            Cpm__V1__TopLogprob *alt = &a->alts[i * CPM_JOB_MAX_TOP + (size_t)k];
            cpm__v1__top_logprob__init(alt);
            alt->id = t[i].top_ids[k];
            alt->logprob = t[i].top_lps[k];
            a->altp[i * CPM_JOB_MAX_TOP + (size_t)k] = alt;
        }
        a->tops[i].n_alts = (size_t)t[i].n_top;
        a->tops[i].alts = &a->altp[i * CPM_JOB_MAX_TOP];
        a->topp[i] = &a->tops[i];
    }
    return true;
}

/* A TokenEvent for j: g's ids [from, to) with their logprobs when asked; a final event
 * carries the counts and, with err_code, the error. */
static void send_event(cpm_job *j, const cpm_gen *g, int from, int to,
                       Cpm__V1__FinishReason finish, bool final, int err_code, const char *err_msg) {
    rpc_answer *a = answer_of(j);
    Cpm__V1__TokenEvent ev = CPM__V1__TOKEN_EVENT__INIT;
    ev.request_id = a->request_id;
    size_t n = g && to > from ? (size_t)(to - from) : 0;
    ev.n_ids = n;
    ev.ids = n ? g->ids + from : NULL;
    lp_arrays lp = {0};
    if (n && j->logprobs && lp_arrays_fill(&lp, g->lps + from, n)) {
        ev.n_logprobs = n;
        ev.logprobs = lp.lps;
        if (j->top_logprobs > 0) {
            ev.n_top = n;
            ev.top = lp.topp;
        }
    }
    ev.finish = finish;
    ev.final = final;
    Cpm__V1__Error e = CPM__V1__ERROR__INIT;
    if (final) {
        for (int p = 0; p < j->n_prompts; p++)
            ev.prompt_tokens += (uint32_t)j->prompt_len[p];
        ev.completion_tokens = g ? (uint32_t)g->n_gen : 0;
        if (err_code) {
            e.code = err_code;
            e.message = (char *)(err_msg ? err_msg : "");
            e.service = "router";
            ev.error = &e;
        }
    }
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = a->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_TOKEN_EVENT;
    env.token_event = &ev;
    cpm_error err;
    if (cpm_sock_send(a->api->sock, &a->peer, &env, NULL, &err) < 0 && a->api->ctx->log)
        cpm_log_write(a->api->ctx->log, CPM_LOG_WARN, NULL, "rpc %s: %s", a->request_id, err.msg);
    lp_arrays_free(&lp);
}

/* ---- the sink -------------------------------------------------------------------------------- */

static void sink_begin(cpm_job *j) {
    (void)j; /* events need no preamble */
}

/* Streaming: one event with the ids shown since the last (a final stop id is not
 * shown: it comes with the final event). */
static void sink_delta(cpm_gen *g, const char *text, size_t len, const char *finish, int upto) {
    (void)text, (void)len;
    cpm_job *j = g->job;
    if (!j->stream || finish || upto <= g->n_emitted_ids)
        return;
    send_event(j, g, g->n_emitted_ids, upto, CPM__V1__FINISH_REASON__FINISH_NONE, false, 0, NULL);
    g->n_emitted_ids = upto;
}

/* The access log's line for an RPC request (the HTTP front's come from http.c). */
static void log_access(const cpm_job *j, const char *outcome) {
    const rpc_answer *a = answer_of(j);
    char note[256], kv[512], xid[sizeof a->request_id];
    snprintf(xid, sizeof xid, "%s", a->request_id[0] ? a->request_id : "-");
    for (char *p = xid; *p; p++) /* a caller's id with spaces must not break the fields */
        if ((unsigned char)*p < 0x21)
            *p = '?';
    cpm_job_access_note(j, outcome, note, sizeof note);
    snprintf(kv, sizeof kv, "method=RPC path=generate duration_ms=%.1f %s x_request_id=%s",
             (double)(uv_hrtime() - j->t_start) / 1e6, note, xid);
    cpm_log_kv(a->api->ctx->log, CPM_LOG_INFO, NULL, "access", kv);
}

static void sink_done(cpm_job *j) {
    log_access(j, NULL);
    const cpm_gen *g = &j->gens[0];
    Cpm__V1__FinishReason finish = !g->finish ? CPM__V1__FINISH_REASON__FINISH_ERROR
                                   : strcmp(g->finish, "length") == 0
                                       ? CPM__V1__FINISH_REASON__FINISH_LENGTH
                                       : CPM__V1__FINISH_REASON__FINISH_STOP;
    send_event(j, g, j->stream ? g->n_emitted_ids : 0, g->n_gen, finish, true, 0, NULL);
}

static void sink_fail(cpm_job *j, const cpm_job_error *e) {
    log_access(j, "error");
    int code = e->status == 429 ? CPM_ELIMIT : e->status == 400 ? CPM_EINVAL : CPM_EINTERNAL;
    send_event(j, NULL, 0, 0, CPM__V1__FINISH_REASON__FINISH_ERROR, true, code, e->msg);
}

static void sink_cancelled(cpm_job *j) {
    log_access(j, "abort");
    send_event(j, NULL, 0, 0, CPM__V1__FINISH_REASON__FINISH_CANCELLED, true, 0, NULL);
}

static void sink_free(void *ud) {
    free(ud);
}

static const cpm_job_sink rpc_sink = {sink_begin, sink_delta, sink_done,
                                      sink_fail,  sink_cancelled, sink_free};

/* ---- requests ---------------------------------------------------------------------------- */

static void reply_error(cpm_api_rpc *api, const cpm_inmsg *m, const char *request_id, int code,
                        const char *msg) {
    Cpm__V1__TokenEvent ev = CPM__V1__TOKEN_EVENT__INIT;
    Cpm__V1__Error e = CPM__V1__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    e.service = "router";
    ev.request_id = (char *)(request_id ? request_id : "");
    ev.finish = CPM__V1__FINISH_REASON__FINISH_ERROR;
    ev.final = true;
    ev.error = &e;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = m->env->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_TOKEN_EVENT;
    env.token_event = &ev;
    cpm_sock_send(api->sock, &m->peer, &env, NULL, NULL);
}

/* The unanswered job of this client with this request_id. */
static cpm_job *find_job(cpm_api_rpc *api, const cpm_peer *peer, const char *request_id) {
    for (cpm_job *j = cpm_jobs_first(api->ctx->jobs); j; j = j->next) {
        if (j->sink != &rpc_sink || cpm_job_answered(j))
            continue;
        const rpc_answer *a = answer_of(j);
        if (strcmp(a->request_id, request_id) == 0 && a->peer.len == peer->len &&
            memcmp(a->peer.id, peer->id, peer->len) == 0)
            return j;
    }
    return NULL;
}

/* The ranges the HTTP API accepts too (openai.c); 0 leaves a penalty off. */
static bool bias_in_range(const Cpm__V1__SamplingParams *p) {
    if (p->n_bias_ids != p->n_bias || p->n_bias > CPM_JOB_MAX_BIAS)
        return false;
    for (size_t i = 0; i < p->n_bias; i++)
        if (!(p->bias[i] >= -100.0f && p->bias[i] <= 100.0f) || p->bias_ids[i] < 0)
            return false;
    return true;
}

static bool sampling_in_range(const Cpm__V1__SamplingParams *p) {
    return p->temperature >= 0.0f && p->temperature <= 100.0f && p->top_p >= 0.0f &&
           p->top_p <= 1.0f && p->min_p >= 0.0f && p->min_p <= 1.0f &&
           p->top_k <= INT32_MAX && p->n_logprobs <= CPM_JOB_MAX_TOP &&
           p->repetition_penalty >= 0.0f && p->repetition_penalty <= 10.0f &&
           p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f &&
           p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f &&
           p->min_tokens <= INT32_MAX && bias_in_range(p);
}

/* Why a GenerateRequest cannot be taken, or NULL. */
static const char *refusal(cpm_api_rpc *api, const cpm_inmsg *m, const char *rid, int *code) {
    const Cpm__V1__GenerateRequest *g = m->env->generate;
    const Cpm__V1__SamplingParams *p = g->params;
    const char *why, *why_code;
    *code = CPM_EINVAL;
    if (!rid[0] || strlen(rid) > REQUEST_ID_MAX)
        return "request_id must be 1..128 characters";
    if (!cpm_admit_open(api->ctx->admit, &why_code, &why)) {
        *code = CPM_EAGAIN;
        return why; /* not ready yet, or shutting down (draining) */
    }
    if (find_job(api, &m->peer, rid))
        return "a request with this request_id is running";
    if (g->n_stop_ids > 64)
        return "at most 64 stop_ids";
    if (g->max_tokens > INT32_MAX)
        return "max_tokens out of range";
    if (p && !sampling_in_range(p))
        return "sampling parameters out of range";
    return NULL;
}

/* The request's prompt, stop ids and sampling parameters into j. CPM_ENOMEM. */
static int take_request(cpm_job *j, const Cpm__V1__GenerateRequest *g) {
    const Cpm__V1__SamplingParams *p = g->params;
    if (cpm_job_init_gens(j, 1, 1) ||
        !(j->prompt_ids[0] = malloc((g->n_prompt_ids ? g->n_prompt_ids : 1) * sizeof(int32_t))) ||
        cpm_job_set_stop_ids(j, g->stop_ids, (int)g->n_stop_ids))
        return CPM_ENOMEM;
    memcpy(j->prompt_ids[0], g->prompt_ids, g->n_prompt_ids * sizeof(int32_t));
    j->prompt_len[0] = (int)g->n_prompt_ids;
    Cpm__V1__SamplingParams *gp = &j->gens[0].params;
    cpm__v1__sampling_params__init(gp);
    if (p) { /* the scalars; arrays are copied below, the message goes away after this call */
        gp->temperature = p->temperature, gp->top_p = p->top_p, gp->top_k = p->top_k;
        gp->min_p = p->min_p, gp->repetition_penalty = p->repetition_penalty;
        gp->presence_penalty = p->presence_penalty, gp->frequency_penalty = p->frequency_penalty;
        gp->seed = p->seed, gp->n_logprobs = p->n_logprobs, gp->logprobs = p->logprobs;
        gp->min_tokens = p->min_tokens;
    }
    if (!p || p->seed == 0)
        gp->seed = cpm_job_default_seed(j, 0);
    return p ? cpm_job_set_bias(j, p->bias_ids, p->bias, (int)p->n_bias) : 0;
}

static void on_generate(cpm_api_rpc *api, const cpm_inmsg *m) {
    const Cpm__V1__GenerateRequest *g = m->env->generate;
    const char *rid = g->request_id ? g->request_id : "";
    int code;
    const char *why = refusal(api, m, rid, &code);
    rpc_answer *a = why ? NULL : calloc(1, sizeof *a);
    cpm_job *j = a ? cpm_job_new(api->ctx->jobs, CPM_EP_RPC, "cmpl", &rpc_sink, a) : NULL;
    if (!j) {
        free(a);
        reply_error(api, m, rid, why ? code : CPM_ENOMEM, why ? why : "out of memory");
        return;
    }
    *a = (rpc_answer){.api = api, .peer = m->peer, .corr = m->env->corr};
    snprintf(a->request_id, sizeof a->request_id, "%s", rid);
    const Cpm__V1__SamplingParams *p = g->params;
    j->stream = g->stream;
    j->ignore_eos = g->ignore_eos;
    j->logprobs = p && p->logprobs;
    j->top_logprobs = p ? (int)p->n_logprobs : 0;
    j->max_tokens = (int)g->max_tokens;
    j->want_text = false; /* token ids in and out */
    if (take_request(j, g)) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    cpm_admit_job(api->ctx->admit, j);
}

static void on_cancel(cpm_api_rpc *api, const cpm_inmsg *m) {
    const char *rid = m->env->cancel->request_id ? m->env->cancel->request_id : "";
    cpm_job *j = find_job(api, &m->peer, rid);
    if (!j)
        return; /* finished already: its final event is on the way */
    cpm_job_cancel(j);
    cpm_pipeline_pump(api->ctx->pipeline);
}

static void on_health(cpm_api_rpc *api, const cpm_inmsg *m) {
    Cpm__V1__Health h = CPM__V1__HEALTH__INIT;
    h.service = "router";
    h.name = "router";
    h.ready = cpm_admit_ready(api->ctx->admit);
    h.status = h.ready ? "ready" : "waiting for services";
    h.http_addr = (char *)api->http_addr;
    h.http_port = (uint32_t)api->http_port;
    cpm_sched_stats st;
    cpm_pipeline_stats(api->ctx->pipeline, &st);
    h.queue_depth = (uint32_t)st.queued;
    h.live_seqs = (uint32_t)st.live;
    cpm_sock_send_health(api->sock, &m->peer, m->env->corr, &h, NULL);
}

static void on_message(cpm_sock *s, cpm_inmsg *m, void *user) {
    cpm_api_rpc *api = user;
    switch (m->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_GENERATE:
        on_generate(api, m);
        break;
    case CPM__V1__ENVELOPE__BODY_CANCEL:
        on_cancel(api, m);
        break;
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST:
        on_health(api, m);
        break;
    default: {
        char msg[96];
        snprintf(msg, sizeof msg, "router rpc: unexpected body '%s'",
                 cpm_wire_body_name(m->env->body_case));
        cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_EINVAL, msg, NULL);
    }
    }
    cpm_inmsg_free(m);
}

/* ---- life ------------------------------------------------------------------------------------ */

int cpm_api_rpc_new(uv_loop_t *loop, void *zctx, const cpm_curve *curve, const cpm_front_ctx *ctx, const char *endpoint,
                    cpm_api_rpc **ret, cpm_error *err) {
    cpm_api_rpc *api = calloc(1, sizeof *api);
    *ret = api;
    if (!api)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    api->ctx = ctx;
    cpm_sock_opts po = cpm_sock_opts_default();
    po.max_msg_size = 16ll << 20; /* generate requests carry ids, never tensors */
    po.curve = curve;
    po.admit = CPM_CURVE_RPC; /* other services call it with their own client keys */
    int e = cpm_sock_new(loop, zctx, ZMQ_ROUTER, &po, on_message, api, &api->sock, err);
    if (!e)
        e = cpm_sock_bind(api->sock, endpoint, err);
    return e ? cpm_error_prefix(err, "router: rpc endpoint %s", endpoint) : 0;
}

void cpm_api_rpc_set_http(cpm_api_rpc *a, const char *http_addr, int http_port) {
    a->http_addr = http_addr;
    a->http_port = http_port;
}

void cpm_api_rpc_free(cpm_api_rpc *a) {
    if (!a)
        return;
    cpm_sock_free(a->sock);
    free(a);
}
