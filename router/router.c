/* router.c - cpm-router: requests in (HTTP, RPC), the pipeline ring driven, tokens out.
 *
 * Data flow of one request: on_http/on_rpc -> job (one per client request) with one
 * gen per choice -> tokenize (a cpm-tokenizer call) -> scheduler -> pump() sends
 * StageForward to stage 0 -> on_result (last stage's logits) -> SampleRequest to a
 * sampler -> on_sampled -> gen_token (stop ids, length) -> text_pump (Detokenize
 * calls, stop strings, emit) -> the job's one final answer. Everything here runs on
 * the loop thread; the loop only sends and receives, it never tokenizes.
 *
 * Pipeline replies never carry a gen or job pointer: they carry sequence ids and look
 * the owner up in the scheduler, so a request that was cancelled meanwhile is simply
 * not found. Tokenizer calls do carry one, and hold a reference on the job (refs)
 * until their callback has run, so the job outlives them.
 *
 * Generation runs ahead of text: the next token is scheduled as soon as one is
 * sampled, while its text comes back from the tokenizer; a gen ends once both its
 * generation and its text are over.
 */
#include "router.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../services/common/transport.h"
#include "http.h"
#include "metrics.h"
#include "openai.h"
#include "request.h"
#include "scheduler.h"
#include "tokclient.h"

#define MAX_TOP 20
_Static_assert(1 + MAX_TOP <= CPM_TOKC_MAX_PIECES, "a token and its alternatives fit one pieces call");
#define MAX_SERVICES (CPM_CFG_MAX_STAGES * CPM_CFG_MAX_TP + 2 * CPM_CFG_MAX_REPLICAS + \
                      CPM_CFG_MAX_EXPERT_SVCS)
#define REQUEST_ID_MAX 128
/* Ids of context sent before the new ones in a Detokenize call: the service looks
 * back no further (CPM_TOKENIZER_SVC_CONTEXT), so more would only cost bytes. */
#define DETOK_CONTEXT 8

/* ---- small buffers ------------------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t len, cap;
} buf;

static int buf_add(buf *b, const void *data, size_t len) {
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

/* ---- requests ------------------------------------------------------------------ */

typedef struct tok_lp {
    int32_t id;
    float lp;
    int n_top;
    int32_t top_ids[MAX_TOP];
    float top_lps[MAX_TOP];
    char *text;               /* the token as text (from the tokenizer), or NULL */
    char *top_text[MAX_TOP];
    int pending;              /* texts still being fetched */
} tok_lp;

typedef enum job_kind { JOB_HTTP, JOB_RPC } job_kind;

typedef struct job job;

/* One sequence: a choice of an HTTP request, or an RPC generate. */
typedef struct gen {
    job *job;
    int index;
    int prompt; /* which prompt of the job */
    uint64_t seq;
    cpm_req_state state;
    Cpm__V1__SamplingParams params;
    int max_new;
    int n_gen;
    int32_t *ids; /* generated ids (all of them; stream chunks use the tail) */
    int n_emitted_ids;
    tok_lp *lps; /* logprobs of generated ids, when asked */
    int n_emitted_lps;
    int n_lp_ready;  /* lps[0..n_lp_ready) have their texts */
    int lp_pending;  /* token-text calls in flight */
    cpm_stopper *stopper;
    buf text; /* non-stream: the whole text */
    const char *finish;
    uint64_t t_last; /* ns of the last token */
    /* text, behind generation: ids[0..n_text) are text (fed to the stopper) */
    int n_text;
    int n_textable;       /* ids that have text (a final stop id has none) */
    int n_tried;          /* end of the last Detokenize window */
    bool detok_busy;      /* a Detokenize call is in flight */
    bool text_stopped;    /* a stop string ended the text */
    const char *gen_end;  /* generation over: "stop" / "length"; NULL while running */
    bool released;        /* the pipeline sequence is finished */
    int failovers;        /* times it moved to another pipeline replica */
} gen;

struct job {
    cpm_router *r;
    job *prev, *next;
    job_kind kind;
    int ep; /* metrics endpoint */
    char id[48];
    int64_t created;
    uint64_t t_start;
    /* HTTP */
    cpm_http_conn *conn;
    cpm_oai_request *rq;
    bool streaming;
    /* RPC */
    cpm_peer peer;
    uint64_t corr;
    char request_id[REQUEST_ID_MAX + 1];
    int32_t *stop_ids;
    int n_stop_ids;
    /* both */
    bool stream, ignore_eos, logprobs;
    int top_logprobs;
    int n_prompts;
    int32_t **prompt_ids;
    int *prompt_len;
    int tok_pending; /* prompts at the tokenizer */
    int n_gens, n_done;
    gen *gens;
    bool answered; /* the one final answer was given */
    bool aborted;  /* the client is gone */
    bool first_token_seen;
    int refs;      /* tokenizer calls in flight */
};

/* ---- the router ---------------------------------------------------------------- */

typedef struct svc {
    char name[32];
    int replica;    /* stages: the pipeline replica it belongs to; -1 otherwise */
    cpm_sock *sock; /* DEALER to the service */
    bool ready, answered;
    int misses;     /* health polls in a row without an answer */
    char status[96];
    int kv_used, kv_total;
} svc;

/* One replica of the pipeline: its stages and the scheduler feeding them. Sequence and
 * step ids of replica k are = k (mod n_replicas), so an id tells its replica. */
typedef struct replica {
    cpm_sched *sched;
    int n_stages;
    int stage_svc[CPM_CFG_MAX_STAGES]; /* its stages' entries in svcs, in pipeline order */
    int n_tp;                          /* its stages' tensor-parallel ranks > 0: polled, and */
    int tp_svc[CPM_CFG_MAX_STAGES * (CPM_CFG_MAX_TP - 1)]; /* needed like stages */
    bool down; /* a stage stopped answering health polls: no new work goes here */
} replica;

typedef struct step_time {
    uint64_t step, t;
} step_time;

struct cpm_router {
    uv_loop_t *loop;
    void *zctx;
    const cpm_config *cfg;
    cpm_router_opts o;
    cpm_http_server *http;
    cpm_sock *rpc, *results;
    svc svcs[MAX_SERVICES];
    int n_svcs, first_sampler, n_samplers, first_stage, n_stages, rr_sampler;
    int first_tok, n_toks, rr_tok; /* tokenizers (none with `tokenize: off`) */
    bool use_tok;
    uv_timer_t health_timer, step_timer;
    char model_name[CPM_CFG_STR];
    const char *http_addr; /* the address the HTTP server listens on */
    bool have_model;
    int vocab_size, max_position, n_eos;
    int32_t eos_ids[8];
    replica replicas[CPM_CFG_MAX_REPLICAS];
    int n_replicas;
    cpm_oai_limits oai_lim;
    cpm_metrics m;
    job *jobs;
    int n_jobs;
    uint64_t next_job;
    step_time *steps;
    int n_steps;
    bool started, closing;
    int closing_handles;
    void (*done)(void *ud);
    void *done_ud;
};

cpm_router_opts cpm_router_opts_default(void) {
    return (cpm_router_opts){.http_port = -1, .http_addr = NULL, .health_interval_ms = 1000,
                             .log = NULL};
}

#define LOG(r, level, ...)                                            \
    do {                                                              \
        if ((r)->o.log)                                               \
            cpm_log_write((r)->o.log, (level), NULL, __VA_ARGS__);    \
    } while (0)

static void pump(cpm_router *r);
static void pump_replica(cpm_router *r, replica *p);
static void job_maybe_free(job *j);

static replica *replica_of(cpm_router *r, uint64_t id) {
    return &r->replicas[id % (uint64_t)r->n_replicas];
}

static cpm_sched *sched_of(cpm_router *r, uint64_t id) {
    return replica_of(r, id)->sched;
}

/* Scheduler totals over every replica. */
static void sched_totals(const cpm_router *r, cpm_sched_stats *ret) {
    *ret = (cpm_sched_stats){0};
    for (int i = 0; i < r->n_replicas && r->have_model; i++) {
        cpm_sched_stats st;
        cpm_sched_get_stats(r->replicas[i].sched, &st);
        ret->live += st.live;
        ret->queued += st.queued;
        ret->inflight += st.inflight;
        ret->kv_reserved += st.kv_reserved;
        ret->kv_tokens += st.kv_tokens;
        ret->steps += st.steps;
    }
}
static void gen_finish(gen *g, cpm_req_state to, const char *reason);

static double secs(uint64_t ns) {
    return (double)ns / 1e9;
}

/* ---- token texts ----------------------------------------------------------------- */

/* A token as OpenAI shows it in logprobs: its text in context (fetched from the
 * tokenizer), or its id when there is no text (as vLLM names unknown tokens). */
static char *piece_text(const char *text, int32_t id) {
    if (text)
        return strdup(text);
    char tmp[32];
    snprintf(tmp, sizeof tmp, "token_id:%d", id);
    return strdup(tmp);
}

static bool is_stop_id(const job *j, int32_t id) {
    const cpm_router *r = j->r;
    if (!j->ignore_eos)
        for (int i = 0; i < r->n_eos; i++)
            if (r->eos_ids[i] == id)
                return true;
    for (int i = 0; i < j->n_stop_ids; i++)
        if (j->stop_ids[i] == id)
            return true;
    return false;
}

/* ---- jobs ------------------------------------------------------------------------ */

static job *job_new(cpm_router *r, job_kind kind, int ep) {
    job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->r = r;
    j->kind = kind;
    j->ep = ep;
    j->t_start = uv_hrtime();
    j->created = (int64_t)time(NULL);
    snprintf(j->id, sizeof j->id, "%s-%" PRIx64 "%04" PRIx64,
             ep == CPM_EP_CHAT ? "chatcmpl" : "cmpl", (uint64_t)j->created, ++r->next_job);
    j->next = r->jobs;
    if (r->jobs)
        r->jobs->prev = j;
    r->jobs = j;
    r->n_jobs++;
    return j;
}

static void gen_clear(gen *g) {
    for (int i = 0; g->lps && i < g->max_new; i++) {
        free(g->lps[i].text);
        for (int k = 0; k < MAX_TOP; k++)
            free(g->lps[i].top_text[k]);
    }
    cpm_stopper_free(g->stopper);
    free(g->ids);
    free(g->lps);
    free(g->text.p);
}

static void router_maybe_free(cpm_router *r);

static void job_free(job *j) {
    cpm_router *r = j->r;
    if (j->prev)
        j->prev->next = j->next;
    else
        r->jobs = j->next;
    if (j->next)
        j->next->prev = j->prev;
    r->n_jobs--;
    for (int i = 0; i < j->n_gens; i++)
        gen_clear(&j->gens[i]);
    free(j->gens);
    for (int i = 0; i < j->n_prompts; i++)
        free(j->prompt_ids[i]);
    free(j->prompt_ids);
    free(j->prompt_len);
    free(j->stop_ids);
    cpm_oai_request_free(j->rq);
    free(j);
    if (r->closing)
        router_maybe_free(r);
}

/* Frees j once its answer is given and no worker holds it. */
static void job_maybe_free(job *j) {
    if (j->answered && j->refs == 0)
        job_free(j);
}

static void count(cpm_router *r, int ep, int outcome) {
    r->m.requests[ep][outcome]++;
}

/* ---- answers (HTTP) ---------------------------------------------------------------- */

static int oai_error_status(cpm_http_conn *c, int status, const char *type, const char *code,
                            const char *param, const char *msg) {
    cpm_oai_error e;
    cpm_oai_fail(&e, CPM_EINVAL, status, type, code, param, "%s", msg);
    char *json = cpm_oai_error_json(&e);
    int rc = cpm_http_respond(c, status, "application/json", json ? json : "{}",
                              json ? strlen(json) : 2, NULL);
    free(json);
    return rc;
}

static void send_oai_error(cpm_http_conn *c, const cpm_oai_error *e) {
    char *json = cpm_oai_error_json(e);
    cpm_http_respond(c, e->http_status, "application/json", json ? json : "{}",
                     json ? strlen(json) : 2, NULL);
    free(json);
}

static void stream_send(job *j, char *chunk) {
    if (chunk)
        cpm_http_stream_write(j->conn, chunk, strlen(chunk));
    free(chunk);
}

/* Builds the logprob view of tokens [from, to) of g (strings freed by lp_views_free). */
static cpm_oai_logprob *lp_views(const gen *g, int from, int to) {
    int n = to - from;
    cpm_oai_logprob *v = calloc((size_t)(n > 0 ? n : 1), sizeof *v);
    for (int i = 0; v && i < n; i++) {
        const tok_lp *t = &g->lps[from + i];
        v[i].token = piece_text(t->text, t->id);
        v[i].logprob = t->lp;
        v[i].n_top = t->n_top;
        const char **tt = calloc((size_t)t->n_top + 1, sizeof *tt);
        for (int k = 0; tt && k < t->n_top; k++)
            tt[k] = piece_text(t->top_text[k], t->top_ids[k]);
        v[i].top_tokens = (const char *const *)tt;
        v[i].top_logprobs = t->top_lps;
        if (!v[i].token || !tt)
            v[i].n_top = 0;
    }
    return v;
}

static void lp_views_free(cpm_oai_logprob *v, int n) {
    for (int i = 0; v && i < n; i++) {
        for (int k = 0; v[i].top_tokens && k < v[i].n_top; k++)
            free((char *)v[i].top_tokens[k]);
        free((void *)v[i].top_tokens);
        free((char *)v[i].token);
    }
    free(v);
}

/* SSE chunk with new text of g and the ids [n_emitted_ids, upto) (with their logprobs,
 * as far as their texts are known): a chunk carries the ids its text came from. */
static void http_emit_delta(gen *g, const char *text, size_t len, const char *finish, int upto) {
    job *j = g->job;
    cpm_router *r = j->r;
    int lp_upto = upto < g->n_lp_ready ? upto : g->n_lp_ready;
    int n_lp = j->logprobs && lp_upto > g->n_emitted_lps ? lp_upto - g->n_emitted_lps : 0;
    int n_ids = upto > g->n_emitted_ids ? upto - g->n_emitted_ids : 0;
    bool want_ids = j->rq->return_token_ids && n_ids > 0;
    if (len == 0 && !finish && n_lp == 0 && !want_ids)
        return; /* nothing a client could see */
    cpm_oai_logprob *lv = n_lp > 0 ? lp_views(g, g->n_emitted_lps, lp_upto) : NULL;
    cpm_oai_choice ch = {.index = g->index, .text = text, .text_len = len, .finish_reason = finish,
                         .n_logprobs = lv ? n_lp : 0, .logprobs = lv,
                         .n_token_ids = n_ids, .token_ids = g->ids + g->n_emitted_ids};
    stream_send(j, cpm_oai_render_chunk(j->rq, CPM_OAI_CHUNK_CONTENT, j->id, j->created,
                                        r->model_name, &ch, NULL));
    lp_views_free(lv, n_lp);
    g->n_emitted_lps += n_lp;
    g->n_emitted_ids += n_ids;
}

static void http_final(job *j) {
    cpm_router *r = j->r;
    cpm_oai_usage u = {0};
    for (int p = 0; p < j->n_prompts; p++)
        u.prompt_tokens += j->prompt_len[p];
    for (int i = 0; i < j->n_gens; i++)
        u.completion_tokens += j->gens[i].n_gen;
    if (j->streaming) {
        if (j->rq->include_usage)
            stream_send(j, cpm_oai_render_chunk(j->rq, CPM_OAI_CHUNK_USAGE, j->id, j->created,
                                                r->model_name, NULL, &u));
        cpm_http_stream_write(j->conn, CPM_OAI_SSE_DONE, strlen(CPM_OAI_SSE_DONE));
        cpm_http_stream_end(j->conn);
        return;
    }
    cpm_oai_choice *ch = calloc((size_t)j->n_gens, sizeof *ch);
    cpm_oai_logprob **lv = calloc((size_t)j->n_gens, sizeof *lv);
    if (!ch || !lv) {
        free(ch);
        free(lv);
        oai_error_status(j->conn, 500, "server_error", NULL, NULL, "out of memory");
        return;
    }
    for (int i = 0; i < j->n_gens; i++) {
        gen *g = &j->gens[i];
        lv[i] = j->logprobs ? lp_views(g, 0, g->n_gen) : NULL;
        ch[i] = (cpm_oai_choice){.index = g->index, .text = g->text.p ? g->text.p : "",
                                 .text_len = g->text.len, .finish_reason = g->finish,
                                 .n_logprobs = lv[i] ? g->n_gen : 0, .logprobs = lv[i],
                                 .n_token_ids = g->n_gen, .token_ids = g->ids};
    }
    char *json = cpm_oai_render_response(j->rq, j->id, j->created, r->model_name, ch, j->n_gens,
                                         &u);
    for (int i = 0; i < j->n_gens; i++)
        lp_views_free(lv[i], lv[i] ? j->gens[i].n_gen : 0);
    free(lv);
    free(ch);
    if (json)
        cpm_http_respond(j->conn, 200, "application/json", json, strlen(json), NULL);
    else
        oai_error_status(j->conn, 500, "server_error", NULL, NULL, "out of memory");
    free(json);
}

/* ---- answers (RPC) ----------------------------------------------------------------- */

static void rpc_event(job *j, const gen *g, int from, int to, Cpm__V1__FinishReason finish,
                      bool final, int err_code, const char *err_msg) {
    cpm_router *r = j->r;
    Cpm__V1__TokenEvent ev = CPM__V1__TOKEN_EVENT__INIT;
    ev.request_id = j->request_id;
    size_t n = g && to > from ? (size_t)(to - from) : 0;
    ev.n_ids = n;
    ev.ids = n ? g->ids + from : NULL;
    /* logprobs: parallel arrays built on the heap (a final event may carry every token) */
    float *lps = NULL;
    Cpm__V1__TopLogprobs *tops = NULL, **topp = NULL;
    Cpm__V1__TopLogprob *alts = NULL, **altp = NULL;
    if (n && j->logprobs) {
        lps = malloc(n * sizeof *lps);
        tops = malloc(n * sizeof *tops);
        topp = malloc(n * sizeof *topp);
        alts = malloc(n * MAX_TOP * sizeof *alts);
        altp = malloc(n * MAX_TOP * sizeof *altp);
    }
    if (lps && tops && topp && alts && altp) {
        for (size_t i = 0; i < n; i++) {
            const tok_lp *t = &g->lps[from + (int)i];
            lps[i] = t->lp;
            cpm__v1__top_logprobs__init(&tops[i]);
            for (int k = 0; k < t->n_top; k++) {
                Cpm__V1__TopLogprob *a = &alts[i * MAX_TOP + (size_t)k];
                cpm__v1__top_logprob__init(a);
                a->id = t->top_ids[k];
                a->logprob = t->top_lps[k];
                altp[i * MAX_TOP + (size_t)k] = a;
            }
            tops[i].n_alts = (size_t)t->n_top;
            tops[i].alts = &altp[i * MAX_TOP];
            topp[i] = &tops[i];
        }
        ev.n_logprobs = n;
        ev.logprobs = lps;
        if (j->top_logprobs > 0) {
            ev.n_top = n;
            ev.top = topp;
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
    env.corr = j->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_TOKEN_EVENT;
    env.token_event = &ev;
    cpm_error err;
    if (cpm_sock_send(r->rpc, &j->peer, &env, NULL, &err) < 0)
        LOG(r, CPM_LOG_WARN, "rpc %s: %s", j->request_id, err.msg);
    free(lps);
    free(tops);
    free(topp);
    free(alts);
    free(altp);
}

/* ---- the one final answer ------------------------------------------------------------ */

static int finish_code(const char *reason) {
    if (!reason)
        return CPM__V1__FINISH_REASON__FINISH_ERROR;
    return strcmp(reason, "length") == 0 ? CPM__V1__FINISH_REASON__FINISH_LENGTH
                                         : CPM__V1__FINISH_REASON__FINISH_STOP;
}

/* Every gen is terminal: answer once. */
static void job_complete(job *j) {
    cpm_router *r = j->r;
    if (j->answered)
        return;
    j->answered = true;
    bool cancelled = j->aborted;
    if (j->kind == JOB_HTTP) {
        if (cancelled) { /* nobody is listening, but the exchange must end */
            if (j->streaming)
                cpm_http_stream_end(j->conn);
            else
                cpm_http_respond(j->conn, 499, "application/json", "{}", 2, NULL);
        } else {
            http_final(j);
        }
    } else if (!cancelled) {
        gen *g = &j->gens[0];
        int from = j->stream ? g->n_emitted_ids : 0;
        rpc_event(j, g, from, g->n_gen, finish_code(g->finish), true, 0, NULL);
    } else {
        rpc_event(j, NULL, 0, 0, CPM__V1__FINISH_REASON__FINISH_CANCELLED, true, 0, NULL);
    }
    count(r, j->ep, cancelled ? CPM_OUT_CANCELLED : CPM_OUT_OK);
    cpm_hist_observe(&r->m.e2e, secs(uv_hrtime() - j->t_start));
    job_maybe_free(j);
}

/* A request that cannot go on: every gen ends, the client gets one error. */
static void job_fail(job *j, int status, const char *type, const char *code, const char *msg) {
    cpm_router *r = j->r;
    if (j->answered)
        return;
    for (int i = 0; i < j->n_gens; i++)
        if (!cpm_req_state_terminal(j->gens[i].state))
            gen_finish(&j->gens[i], CPM_REQ_FAILED, NULL);
    j->answered = true;
    if (j->kind == JOB_HTTP) {
        if (j->streaming) {
            /* the 200 is gone: report in-band, then end the stream as OpenAI does */
            cpm_oai_error e;
            cpm_oai_fail(&e, CPM_EINTERNAL, status, type, code, NULL, "%s", msg);
            char *json = cpm_oai_error_json(&e);
            if (json) {
                buf b = {0};
                buf_add(&b, "data: ", 6);
                buf_add(&b, json, strlen(json));
                buf_add(&b, "\n\n", 2);
                cpm_http_stream_write(j->conn, b.p, b.len);
                free(b.p);
            }
            free(json);
            cpm_http_stream_write(j->conn, CPM_OAI_SSE_DONE, strlen(CPM_OAI_SSE_DONE));
            cpm_http_stream_end(j->conn);
        } else {
            oai_error_status(j->conn, status, type, code, NULL, msg);
        }
    } else {
        rpc_event(j, NULL, 0, 0, CPM__V1__FINISH_REASON__FINISH_ERROR, true,
                  status == 429 ? CPM_ELIMIT : status == 400 ? CPM_EINVAL : CPM_EINTERNAL, msg);
    }
    count(r, j->ep, status == 429 || status == 503 ? CPM_OUT_OVERLOAD
                    : status < 500               ? CPM_OUT_REJECTED
                                                 : CPM_OUT_FAILED);
    job_maybe_free(j);
}

/* ---- generation ---------------------------------------------------------------------- */

/* The pipeline is done with g: its sequence leaves the scheduler (and the stages' caches). */
static void gen_release(gen *g) {
    if (g->released)
        return;
    g->released = true;
    if (g->seq)
        cpm_sched_finish(sched_of(g->job->r, g->seq), g->seq);
}

/* Moves g to a terminal state and frees its pipeline resources. reason: "stop"/"length". */
static void gen_finish(gen *g, cpm_req_state to, const char *reason) {
    job *j = g->job;
    if (cpm_req_transition(&g->state, to) != 0)
        return;
    gen_release(g);
    g->finish = reason;
    j->n_done++;
}

/* Text after the stop rules: streamed now (with the ids up to upto) or kept for the
 * final answer. */
static void gen_text_out(gen *g, const char *text, size_t len, const char *finish, int upto) {
    job *j = g->job;
    if (j->streaming)
        http_emit_delta(g, text, len, finish, upto);
    else if (len)
        buf_add(&g->text, text, len);
}

/* Generation and text are both over: flush held text, tell the client, maybe answer. */
static void gen_text_done(gen *g) {
    job *j = g->job;
    const char *out = "";
    size_t len = 0;
    if (!g->text_stopped)
        cpm_stopper_flush(g->stopper, &out, &len);
    gen_finish(g, CPM_REQ_FINISHED, g->text_stopped ? "stop" : g->gen_end);
    gen_text_out(g, out, len, g->finish, g->n_gen);
    if (j->n_done == j->n_gens)
        job_complete(j);
}

static svc *pick_tokenizer(cpm_router *r);
static void on_detok(void *user, const cpm_tokc_result *res);

/* Where the next Detokenize window ends, or 0 when there is nothing to send. With stop
 * strings, one new id at a time, so the id that completes a stop string is known and
 * nothing after it is returned; otherwise every id sampled so far. */
static int detok_window_end(const gen *g) {
    if (g->text_stopped || g->n_text >= g->n_textable || g->n_tried >= g->n_textable)
        return 0; /* done, or waiting for ids that complete a character */
    int from = g->n_tried > g->n_text ? g->n_tried : g->n_text;
    return g->job->rq->n_stop > 0 ? from + 1 : g->n_textable;
}

/* Moves g's text forward: asks the tokenizer for the next ids' text, emits what is
 * known, and ends g when generation and text are both over. */
static void text_pump(gen *g) {
    job *j = g->job;
    cpm_router *r = j->r;
    if (j->answered || cpm_req_state_terminal(g->state) || g->detok_busy)
        return;
    int end = detok_window_end(g);
    if (end && !r->use_tok) {
        g->n_text = g->n_tried = g->n_textable; /* token ids only: no text */
    } else if (end) {
        /* the window: a few ids of context (the prompt's tail at first, so the first
         * token's leading space comes out as it does after the prompt), then the new ids */
        int start = g->n_text > DETOK_CONTEXT ? g->n_text - DETOK_CONTEXT : 0;
        int plen = j->prompt_len[g->prompt];
        int n_ctx = start == 0 ? DETOK_CONTEXT - g->n_text : 0;
        n_ctx = n_ctx < plen ? n_ctx : plen;
        int n = n_ctx + end - start;
        int32_t *win = malloc((size_t)n * sizeof *win);
        svc *tk = pick_tokenizer(r);
        cpm_error e = {0};
        int rc = win ? 0 : cpm_error_set(&e, CPM_ENOMEM, "out of memory");
        if (win) {
            memcpy(win, j->prompt_ids[g->prompt] + plen - n_ctx, (size_t)n_ctx * sizeof *win);
            memcpy(win + n_ctx, g->ids + start, (size_t)(end - start) * sizeof *win);
            rc = cpm_tokc_detok(tk->sock, tk->name, win, (size_t)n,
                                (size_t)(n_ctx + g->n_text - start), true,
                                r->cfg->router.timeout_ms, on_detok, g, &e);
        }
        free(win);
        if (rc) {
            job_fail(j, 503, "server_error", "tokenizer_error", e.msg);
            return;
        }
        g->n_tried = end;
        g->detok_busy = true;
        j->refs++;
        return;
    }
    if (j->streaming)
        http_emit_delta(g, "", 0, NULL, g->n_text); /* ids and logprobs without new text */
    if (g->gen_end && g->lp_pending == 0 && !detok_window_end(g))
        gen_text_done(g);
}

static void on_detok(void *user, const cpm_tokc_result *res) {
    gen *g = user;
    job *j = g->job;
    cpm_router *r = j->r;
    j->refs--;
    g->detok_busy = false;
    if (j->answered || cpm_req_state_terminal(g->state)) {
        job_maybe_free(j);
        return;
    }
    if (res->status) {
        job_fail(j, 503, "server_error", "tokenizer_error", res->msg);
        return;
    }
    g->n_text += (int)res->consumed;
    const char *out;
    size_t len;
    bool stopped = false;
    cpm_stopper_feed(g->stopper, res->text, res->text_len, &out, &len, &stopped);
    if (stopped) {
        /* the ids sampled after the stop string are dropped, as if never generated */
        g->text_stopped = true;
        g->n_gen = g->n_textable = g->n_text;
        if (!g->gen_end)
            g->gen_end = "stop";
        gen_release(g);
    }
    gen_text_out(g, out, len, NULL, g->n_text);
    text_pump(g);
    pump(r);
}

/* ---- token texts for logprobs ---------------------------------------------------------- */

typedef struct piece_call {
    gen *g;
    int i; /* token index */
} piece_call;

static void lp_advance(gen *g) {
    while (g->n_lp_ready < g->n_gen && g->lps[g->n_lp_ready].pending == 0)
        g->n_lp_ready++;
}

/* The texts of token i and of its alternatives, from one Pieces reply. */
static void on_piece(void *user, const cpm_tokc_result *res) {
    piece_call *pc = user;
    gen *g = pc->g;
    job *j = g->job;
    tok_lp *t = &g->lps[pc->i];
    free(pc);
    j->refs--;
    g->lp_pending--;
    t->pending--;
    if (j->answered || cpm_req_state_terminal(g->state)) {
        job_maybe_free(j);
        return;
    }
    if (res->status) {
        job_fail(j, 503, "server_error", "tokenizer_error", res->msg);
        return;
    }
    /* tokclient checked one text per id sent: the chosen token, then t->n_top alternatives */
    for (size_t k = 0; k < res->n_texts && k <= (size_t)t->n_top; k++) {
        char **dst = k == 0 ? &t->text : &t->top_text[k - 1];
        free(*dst);
        *dst = strndup(res->texts[k], res->texts_len[k]);
    }
    lp_advance(g);
    text_pump(g);
}

/* Asks the tokenizer, in one call, for the text of token i and of its alternatives, each
 * in the context of the token before it (so a word-initial space shows, as in the
 * decoded text). Nonzero when the job failed (and may be freed). */
static int lp_fetch(gen *g, int i) {
    job *j = g->job;
    cpm_router *r = j->r;
    tok_lp *t = &g->lps[i];
    if (!r->use_tok) {
        lp_advance(g); /* no texts: ids stand in */
        return 0;
    }
    int32_t ctx = i > 0 ? g->ids[i - 1] : j->prompt_ids[g->prompt][j->prompt_len[g->prompt] - 1];
    int32_t cand[1 + MAX_TOP];
    cand[0] = t->id;
    memcpy(cand + 1, t->top_ids, (size_t)t->n_top * sizeof *cand);
    piece_call *pc = malloc(sizeof *pc);
    svc *tk = pick_tokenizer(r);
    cpm_error e = {0};
    if (!pc)
        cpm_error_set(&e, CPM_ENOMEM, "out of memory");
    if (!pc || cpm_tokc_pieces(tk->sock, tk->name, ctx, cand, (size_t)t->n_top + 1, false,
                               r->cfg->router.timeout_ms, on_piece, pc, &e)) {
        free(pc);
        job_fail(j, 503, "server_error", "tokenizer_error", e.msg);
        return CPM_EIO;
    }
    *pc = (piece_call){g, i};
    t->pending++;
    g->lp_pending++;
    j->refs++;
    return 0;
}

/* One sampled token for g. */
static void gen_token(gen *g, const Cpm__V1__SampledToken *t) {
    job *j = g->job;
    cpm_router *r = j->r;
    uint64_t now = uv_hrtime();
    if (!j->first_token_seen) {
        j->first_token_seen = true;
        cpm_hist_observe(&r->m.ttft, secs(now - j->t_start));
    } else if (g->t_last) {
        cpm_hist_observe(&r->m.inter_token, secs(now - g->t_last));
    }
    g->t_last = now;
    r->m.generation_tokens++;
    if (g->state == CPM_REQ_PREFILLING)
        cpm_req_transition(&g->state, CPM_REQ_DECODING);
    g->ids[g->n_gen] = t->id;
    if (j->logprobs) {
        tok_lp *lp = &g->lps[g->n_gen];
        lp->id = t->id;
        lp->lp = t->logprob;
        lp->n_top = (int)(t->n_top < (size_t)j->top_logprobs ? t->n_top : (size_t)j->top_logprobs);
        for (int k = 0; k < lp->n_top; k++) {
            lp->top_ids[k] = t->top[k]->id;
            lp->top_lps[k] = t->top[k]->logprob;
        }
    }
    g->n_gen++;
    bool stop_id = is_stop_id(j, t->id);
    const char *end = stop_id ? "stop" : g->n_gen >= g->max_new ? "length" : NULL;
    if (!end && cpm_sched_push_token(sched_of(r, g->seq), g->seq, t->id) != 0)
        end = "length";
    if (j->kind == JOB_RPC) { /* token-out: no text */
        if (j->stream && !stop_id) {
            rpc_event(j, g, g->n_emitted_ids, g->n_gen, CPM__V1__FINISH_REASON__FINISH_NONE, false,
                      0, NULL);
            g->n_emitted_ids = g->n_gen;
        }
        if (end) {
            gen_finish(g, CPM_REQ_FINISHED, end);
            if (j->n_done == j->n_gens)
                job_complete(j);
        }
        return;
    }
    if (end) {
        g->gen_end = end;
        gen_release(g);
    }
    g->n_textable = g->n_gen - (stop_id ? 1 : 0); /* the stop token is not shown as text */
    if (j->logprobs && lp_fetch(g, g->n_gen - 1))
        return;
    text_pump(g);
}

/* ---- admission ----------------------------------------------------------------------- */

static int gens_init(job *j, int n_per_prompt) {
    j->n_gens = j->n_prompts * n_per_prompt;
    if (!(j->gens = calloc((size_t)j->n_gens, sizeof *j->gens)))
        return CPM_ENOMEM;
    for (int i = 0; i < j->n_gens; i++) {
        gen *g = &j->gens[i];
        g->job = j;
        g->index = i;
        g->prompt = i / n_per_prompt;
        g->state = CPM_REQ_QUEUED;
    }
    return 0;
}

/* The replica new work should go to: the least busy healthy one other than avoid;
 * with none healthy, the least busy of all when avoid is NULL (the work waits there,
 * as with a single pipeline), else NULL. */
static replica *pick_replica(cpm_router *r, const replica *avoid) {
    replica *best = NULL, *any = NULL;
    int best_load = 0, any_load = 0;
    for (int i = 0; i < r->n_replicas; i++) {
        replica *p = &r->replicas[i];
        cpm_sched_stats st;
        cpm_sched_get_stats(p->sched, &st);
        int load = st.live + st.queued;
        if (p != avoid && !p->down && (!best || load < best_load))
            best = p, best_load = load;
        if (!any || load < any_load)
            any = p, any_load = load;
    }
    return best ? best : avoid ? NULL : any;
}

/* Checks the prompts and puts every gen in the scheduler; errors answer the job. */
static void job_admit(job *j, int max_tokens, char *const *stops, int n_stops) {
    cpm_router *r = j->r;
    const cpm_cfg_router *rc = &r->cfg->router;
    for (int p = 0; p < j->n_prompts; p++) {
        int n = j->prompt_len[p];
        char msg[256];
        if (n == 0) {
            job_fail(j, 400, "invalid_request_error", "invalid_prompt", "the prompt is empty");
            return;
        }
        if (n > rc->max_prompt_tokens || n >= r->max_position) {
            snprintf(msg, sizeof msg,
                     "prompt has %d tokens; this server accepts at most %d (context length %d)", n,
                     rc->max_prompt_tokens, r->max_position);
            job_fail(j, 400, "invalid_request_error", "context_length_exceeded", msg);
            return;
        }
        for (int i = 0; i < n; i++)
            if (j->prompt_ids[p][i] < 0 || j->prompt_ids[p][i] >= r->vocab_size) {
                snprintf(msg, sizeof msg, "token id %d at prompt position %d is outside the "
                                          "vocabulary (size %d)", j->prompt_ids[p][i], i,
                         r->vocab_size);
                job_fail(j, 400, "invalid_request_error", "invalid_token_id", msg);
                return;
            }
        int room = r->max_position - n;
        if (max_tokens > rc->max_tokens || max_tokens > room) {
            snprintf(msg, sizeof msg,
                     "max_tokens %d is too large: at most %d for this server and %d left in the "
                     "context after a %d-token prompt", max_tokens, rc->max_tokens, room, n);
            job_fail(j, 400, "invalid_request_error", "context_length_exceeded", msg);
            return;
        }
    }
    for (int i = 0; i < j->n_gens; i++) {
        gen *g = &j->gens[i];
        int n = j->prompt_len[g->prompt];
        int room = r->max_position - n;
        g->max_new = max_tokens ? max_tokens : (rc->max_tokens < room ? rc->max_tokens : room);
        g->ids = calloc((size_t)g->max_new, sizeof *g->ids);
        g->lps = j->logprobs ? calloc((size_t)g->max_new, sizeof *g->lps) : NULL;
        g->stopper = cpm_stopper_new(stops, n_stops);
        if (!g->ids || (j->logprobs && !g->lps) || !g->stopper) {
            job_fail(j, 500, "server_error", NULL, "out of memory");
            return;
        }
        cpm_error e = {0};
        replica *p = pick_replica(r, NULL);
        int rc2 = cpm_sched_add(p->sched, j->prompt_ids[g->prompt], n, g->max_new, g, &g->seq, &e);
        if (rc2) {
            g->seq = 0;
            if (rc2 == CPM_ELIMIT)
                job_fail(j, 429, "rate_limit_error", "queue_full", e.msg);
            else
                job_fail(j, 400, "invalid_request_error", "context_length_exceeded", e.msg);
            return;
        }
        cpm_req_transition(&g->state, CPM_REQ_PREFILLING);
        r->m.prompt_tokens += (uint64_t)n;
    }
    if (j->kind == JOB_HTTP && j->stream) {
        j->streaming = true;
        cpm_http_stream_start(j->conn, 200, "text/event-stream",
                              "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
        if (j->rq->kind == CPM_OAI_CHAT)
            for (int i = 0; i < j->n_gens; i++) {
                cpm_oai_choice ch = {.index = i};
                stream_send(j, cpm_oai_render_chunk(j->rq, CPM_OAI_CHUNK_ROLE, j->id, j->created,
                                                    r->model_name, &ch, NULL));
            }
    }
    pump(r);
}

/* ---- tokenizing at the door (cpm-tokenizer) ---------------------------------------- */

/* The next tokenizer replica: round robin over the ready ones (any, when none is). */
static svc *pick_tokenizer(cpm_router *r) {
    for (int k = 0; k < r->n_toks; k++) {
        int i = (r->rr_tok + k) % r->n_toks;
        if (r->svcs[r->first_tok + i].ready) {
            r->rr_tok = i + 1;
            return &r->svcs[r->first_tok + i];
        }
    }
    return &r->svcs[r->first_tok + r->rr_tok++ % r->n_toks];
}

typedef struct prompt_call {
    job *job;
    int p;
} prompt_call;

static void on_prompt_ids(void *user, const cpm_tokc_result *res) {
    prompt_call *pc = user;
    job *j = pc->job;
    int p = pc->p;
    free(pc);
    j->refs--;
    j->tok_pending--;
    if (j->answered) { /* aborted or failed meanwhile */
        job_maybe_free(j);
        return;
    }
    if (res->status) {
        /* the service refusing the text is the request's fault; no answer is ours */
        if (res->refused && res->status != CPM_ELIMIT)
            job_fail(j, 400, "invalid_request_error", "invalid_prompt", res->msg);
        else
            job_fail(j, 503, "server_error", "tokenizer_unavailable", res->msg);
        return;
    }
    j->prompt_ids[p] = malloc((res->n_ids ? res->n_ids : 1) * sizeof(int32_t));
    if (!j->prompt_ids[p]) {
        job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    memcpy(j->prompt_ids[p], res->ids, res->n_ids * sizeof(int32_t));
    j->prompt_len[p] = (int)res->n_ids;
    if (j->tok_pending == 0)
        job_admit(j, j->rq->max_tokens, j->rq->stop, j->rq->n_stop);
}

/* Sends prompt p of j (a chat's messages, or a completion's text) to a tokenizer. */
static int tokenize_prompt(job *j, int p, cpm_error *e) {
    cpm_router *r = j->r;
    const cpm_oai_request *rq = j->rq;
    prompt_call *pc = malloc(sizeof *pc);
    if (!pc)
        return cpm_error_set(e, CPM_ENOMEM, "out of memory");
    *pc = (prompt_call){j, p};
    svc *tk = pick_tokenizer(r);
    int timeout = r->cfg->router.timeout_ms, rc;
    if (rq->kind == CPM_OAI_CHAT) {
        cpm_tokc_msg *msgs = calloc((size_t)rq->n_messages + 1, sizeof *msgs);
        if (!msgs) {
            free(pc);
            return cpm_error_set(e, CPM_ENOMEM, "out of memory");
        }
        for (int i = 0; i < rq->n_messages; i++)
            msgs[i] = (cpm_tokc_msg){rq->messages[i].role, rq->messages[i].content};
        rc = cpm_tokc_chat(tk->sock, tk->name, msgs, (size_t)rq->n_messages, timeout,
                           on_prompt_ids, pc, e);
        free(msgs);
    } else {
        rc = cpm_tokc_tokenize(tk->sock, tk->name, rq->prompts[p].text, true, timeout,
                               on_prompt_ids, pc, e);
    }
    if (rc) {
        free(pc);
        return rc;
    }
    j->refs++;
    j->tok_pending++;
    return 0;
}

/* ---- HTTP ------------------------------------------------------------------------------ */

static void on_http_abort(void *ud) {
    job *j = ud;
    cpm_router *r = j->r; /* j may be freed below */
    j->aborted = true;
    for (int i = 0; i < j->n_gens; i++)
        if (!cpm_req_state_terminal(j->gens[i].state))
            gen_finish(&j->gens[i], CPM_REQ_CANCELLED, NULL);
    job_complete(j); /* freed once no tokenizer call holds it */
    pump(r);
}

static void copy_sampling(Cpm__V1__SamplingParams *p, const cpm_oai_request *rq) {
    cpm__v1__sampling_params__init(p);
    p->temperature = rq->temperature;
    p->top_p = rq->top_p;
    p->top_k = (uint32_t)rq->top_k;
    p->min_p = rq->min_p;
    p->repetition_penalty = rq->repetition_penalty;
    p->presence_penalty = rq->presence_penalty;
    p->frequency_penalty = rq->frequency_penalty;
    p->logprobs = rq->logprobs;
    p->n_logprobs = (uint32_t)rq->top_logprobs;
}

/* Seeds: the request's (choice i gets seed + i, so n > 1 gives different samples),
 * else one drawn from the clock and a counter. */
static uint64_t seed_for(cpm_router *r, bool has, uint64_t seed, int i) {
    if (has)
        return seed + (uint64_t)i;
    return uv_hrtime() * 0x9E3779B97F4A7C15ull + r->next_job * 7919 + (uint64_t)i;
}

static void on_generate_http(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req,
                             cpm_oai_kind kind) {
    int ep = kind == CPM_OAI_CHAT ? CPM_EP_CHAT : CPM_EP_COMPLETIONS;
    cpm_oai_request *rq;
    cpm_oai_error oe;
    if (cpm_oai_parse(kind, req->body, req->body_len, &r->oai_lim, &rq, &oe)) {
        send_oai_error(c, &oe);
        count(r, ep, CPM_OUT_REJECTED);
        return;
    }
    if (rq->model && rq->model[0] && strcmp(rq->model, r->model_name) != 0) {
        char msg[2 * CPM_CFG_STR + 96];
        snprintf(msg, sizeof msg, "The model `%.200s` does not exist; this server has `%s`",
                 rq->model, r->model_name);
        oai_error_status(c, 404, "invalid_request_error", "model_not_found", "model", msg);
        cpm_oai_request_free(rq);
        count(r, ep, CPM_OUT_REJECTED);
        return;
    }
    if (!cpm_router_ready(r) || r->closing) {
        oai_error_status(c, 503, "service_unavailable_error", "not_ready", NULL,
                         r->closing ? "the server is shutting down"
                                    : "the cluster is not ready yet (see GET /ready)");
        cpm_oai_request_free(rq);
        count(r, ep, CPM_OUT_OVERLOAD);
        return;
    }
    job *j = job_new(r, JOB_HTTP, ep);
    if (!j) {
        oai_error_status(c, 500, "server_error", NULL, NULL, "out of memory");
        cpm_oai_request_free(rq);
        return;
    }
    j->conn = c;
    j->rq = rq;
    j->stream = rq->stream;
    j->logprobs = rq->logprobs;
    j->top_logprobs = rq->top_logprobs;
    j->ignore_eos = rq->ignore_eos;
    j->n_prompts = kind == CPM_OAI_CHAT ? 1 : rq->n_prompts;
    j->prompt_ids = calloc((size_t)j->n_prompts, sizeof *j->prompt_ids);
    j->prompt_len = calloc((size_t)j->n_prompts, sizeof *j->prompt_len);
    cpm_http_conn_set_abort_cb(c, on_http_abort, j);
    if (!j->prompt_ids || !j->prompt_len || gens_init(j, rq->n)) {
        job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    for (int i = 0; i < j->n_gens; i++) {
        copy_sampling(&j->gens[i].params, rq);
        j->gens[i].params.seed = seed_for(r, rq->has_seed, rq->seed, i);
    }
    bool need_tok = kind == CPM_OAI_CHAT;
    for (int p = 0; kind == CPM_OAI_COMPLETION && p < j->n_prompts; p++) {
        if (rq->prompts[p].ids) {
            j->prompt_ids[p] = malloc((size_t)rq->prompts[p].n_ids * sizeof(int32_t));
            if (!j->prompt_ids[p]) {
                job_fail(j, 500, "server_error", NULL, "out of memory");
                return;
            }
            memcpy(j->prompt_ids[p], rq->prompts[p].ids,
                   (size_t)rq->prompts[p].n_ids * sizeof(int32_t));
            j->prompt_len[p] = rq->prompts[p].n_ids;
        } else {
            need_tok = true;
        }
    }
    if (!need_tok) {
        job_admit(j, rq->max_tokens, rq->stop, rq->n_stop);
        return;
    }
    if (!r->use_tok) {
        job_fail(j, 400, "invalid_request_error", "no_tokenizer",
                 "this server runs with `tokenize: off`: send the prompt as token ids");
        return;
    }
    for (int p = 0; p < j->n_prompts; p++) {
        if (j->prompt_ids[p])
            continue; /* token ids already */
        cpm_error e = {0};
        if (tokenize_prompt(j, p, &e)) {
            job_fail(j, 503, "server_error", "tokenizer_unavailable", e.msg);
            return;
        }
    }
}

static void on_completions(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    on_generate_http(r, c, req, CPM_OAI_COMPLETION);
}

static void on_chat(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    on_generate_http(r, c, req, CPM_OAI_CHAT);
}

static void respond_json(cpm_http_conn *c, int status, const char *json) {
    cpm_http_respond(c, status, "application/json", json, strlen(json), NULL);
}

static void on_health(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    (void)r, (void)req;
    respond_json(c, 200, "{\"status\":\"ok\"}");
}

static void on_ready(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    buf b = {0};
    bool ready = cpm_router_ready(r);
    char tmp[256];
    snprintf(tmp, sizeof tmp, "{\"ready\":%s,\"model\":%s,\"services\":[",
             ready ? "true" : "false", r->have_model ? "true" : "false");
    buf_add(&b, tmp, strlen(tmp));
    for (int i = 0; i < r->n_svcs; i++) {
        /* names and statuses are ours or short service strings; quotes are dropped */
        char status[96];
        size_t k = 0;
        for (const char *p = r->svcs[i].status; *p && k < sizeof status - 1; p++)
            if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
                status[k++] = *p;
        status[k] = '\0';
        snprintf(tmp, sizeof tmp, "%s{\"name\":\"%s\",\"ready\":%s,\"status\":\"%s\"}",
                 i ? "," : "", r->svcs[i].name, r->svcs[i].ready ? "true" : "false", status);
        buf_add(&b, tmp, strlen(tmp));
    }
    buf_add(&b, "]}", 2);
    if (b.p)
        respond_json(c, ready ? 200 : 503, b.p);
    else
        respond_json(c, 500, "{}");
    free(b.p);
}

static void on_models(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    char *json = cpm_oai_render_models(r->model_name, 0);
    respond_json(c, json ? 200 : 500, json ? json : "{}");
    free(json);
}

static void on_metrics(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    cpm_metrics_gauges g = {.ready = cpm_router_ready(r),
                            .http_connections = r->http ? cpm_http_server_connections(r->http) : 0};
    if (r->have_model) {
        cpm_sched_stats st;
        sched_totals(r, &st);
        g.queue_depth = st.queued;
        g.running = st.live;
        g.inflight = st.inflight;
        g.kv_reserved = st.kv_reserved;
        g.kv_budget = st.kv_tokens;
    }
    for (int i = 0; i < r->n_stages; i++) {
        g.kv_used_blocks += r->svcs[r->first_stage + i].kv_used;
        g.kv_total_blocks += r->svcs[r->first_stage + i].kv_total;
    }
    size_t len;
    char *text = cpm_metrics_render(&r->m, &g, &len);
    if (text)
        cpm_http_respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, NULL);
    else
        respond_json(c, 500, "{}");
    free(text);
}

typedef void (*route_fn)(cpm_router *r, cpm_http_conn *c, const cpm_http_request *req);

static const struct route {
    const char *method, *path;
    route_fn fn;
} routes[] = {
    {"POST", "/v1/completions", on_completions},
    {"POST", "/v1/chat/completions", on_chat},
    {"GET", "/v1/models", on_models},
    {"GET", "/health", on_health},
    {"GET", "/ready", on_ready},
    {"GET", "/metrics", on_metrics},
};

static void on_http(void *ud, cpm_http_conn *c, const cpm_http_request *req) {
    cpm_router *r = ud;
    bool path_known = false;
    for (size_t i = 0; i < sizeof routes / sizeof *routes; i++) {
        if (strcmp(req->path, routes[i].path) != 0)
            continue;
        path_known = true;
        if (strcmp(req->method, routes[i].method) == 0) {
            routes[i].fn(r, c, req);
            return;
        }
    }
    count(r, CPM_EP_OTHER, CPM_OUT_REJECTED);
    if (path_known)
        oai_error_status(c, 405, "invalid_request_error", "method_not_allowed", NULL,
                         "method not allowed for this path");
    else
        oai_error_status(c, 404, "invalid_request_error", "not_found", NULL, "no such route");
}

/* ---- the pipeline ring ----------------------------------------------------------------- */

/* Sends every micro-batch the replicas' schedulers have ready. */
static void pump(cpm_router *r) {
    if (!r->have_model || r->closing)
        return;
    bool any_up = false;
    for (int i = 0; i < r->n_replicas; i++)
        any_up |= !r->replicas[i].down;
    /* with every replica down, work still goes out: the step timeout answers it */
    for (int i = 0; i < r->n_replicas; i++)
        if (!r->replicas[i].down || !any_up)
            pump_replica(r, &r->replicas[i]);
}

static void pump_replica(cpm_router *r, replica *p) {
    svc *stage0 = &r->svcs[p->stage_svc[0]];
    cpm_sched_batch b;
    while (cpm_sched_next(p->sched, &b) == 1) {
        Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
        protobuf_c_boolean want[b.n_rows > 0 ? b.n_rows : 1];
        for (int i = 0; i < b.n_rows; i++)
            want[i] = b.want[i];
        fw.step = b.step;
        fw.n_seq = fw.n_pos = fw.n_ids = fw.n_want = (size_t)b.n_rows;
        fw.seq = (uint64_t *)b.seq;
        fw.pos = (uint32_t *)b.pos;
        fw.ids = (int32_t *)b.ids;
        fw.want = want;
        fw.n_release = (size_t)b.n_release;
        fw.release = (uint64_t *)b.release;
        Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
        env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
        env.forward = &fw;
        r->steps[r->n_steps++] = (step_time){b.step, uv_hrtime()};
        r->m.steps++;
        r->m.step_rows += (uint64_t)b.n_rows;
        cpm_error e = {0};
        if (cpm_sock_send(stage0->sock, NULL, &env, NULL, &e) < 0) {
            LOG(r, CPM_LOG_ERROR, "sending step %" PRIu64 " to %s: %s", b.step, stage0->name, e.msg);
            /* the step will time out and fail its requests */
        }
    }
}

static void forget_step(cpm_router *r, uint64_t step) {
    for (int i = 0; i < r->n_steps; i++)
        if (r->steps[i].step == step) {
            cpm_hist_observe(&r->m.step_latency, secs(uv_hrtime() - r->steps[i].t));
            r->steps[i] = r->steps[--r->n_steps];
            return;
        }
}

/* A sequence moves at most this often, so that a request whose input makes every
 * replica fail ends with an error instead of travelling forever. */
#define CPM_ROUTER_MAX_FAILOVERS 2

/* g's replica failed it: carry on from its tokens on another healthy replica. The
 * router holds the whole history, so the new replica prefills prompt + generated
 * tokens again and the sampler's draws, keyed by (seed, step), continue unchanged:
 * no token is lost or repeated. false when no replica can take it. */
static bool gen_failover(gen *g, const char *why) {
    cpm_router *r = g->job->r;
    if (g->released || cpm_req_state_terminal(g->state) || g->failovers >= CPM_ROUTER_MAX_FAILOVERS)
        return false;
    replica *from = replica_of(r, g->seq), *to = pick_replica(r, from);
    int n;
    const int32_t *tok = to ? cpm_sched_tokens(from->sched, g->seq, &n) : NULL;
    int32_t *copy = tok ? malloc((size_t)n * sizeof *copy) : NULL;
    if (!copy)
        return false;
    memcpy(copy, tok, (size_t)n * sizeof *copy);
    uint64_t seq;
    cpm_error e = {0};
    int rc = cpm_sched_add(to->sched, copy, n, g->max_new - g->n_gen, g, &seq, &e);
    free(copy);
    if (rc)
        return false;
    cpm_sched_finish(from->sched, g->seq);
    LOG(r, CPM_LOG_WARN, "request %s: sequence %" PRIu64 " moves to sequence %" PRIu64
        " on another pipeline replica after %d tokens (%s)", g->job->id, g->seq, seq, g->n_gen, why);
    g->seq = seq;
    g->failovers++;
    r->m.failovers++;
    return true;
}

/* The step failed: each request with a sequence in it moves to another replica, or
 * ends with an error when none can take it. */
static void fail_step(cpm_router *r, uint64_t step, const char *why) {
    const uint64_t *seqs;
    int n;
    cpm_sched *sched = sched_of(r, step);
    if (cpm_sched_step_done(sched, step, false, &seqs, &n) != 0)
        return;
    forget_step(r, step);
    /* copy: failing a job finishes sequences, which reuses the scheduler's buffer */
    uint64_t *copy = malloc((size_t)(n > 0 ? n : 1) * sizeof *copy);
    if (copy)
        memcpy(copy, seqs, (size_t)n * sizeof *copy);
    for (int i = 0; copy && i < n; i++) {
        gen *g = cpm_sched_owner(sched, copy[i]);
        if (g && !gen_failover(g, why))
            job_fail(g->job, 503, "server_error", "pipeline_error", why);
    }
    free(copy);
    LOG(r, CPM_LOG_WARN, "step %" PRIu64 " failed: %s", step, why);
}

typedef struct sample_ctx {
    cpm_router *r;
    int n;
    uint64_t seqs[];
} sample_ctx;

static void on_sampled(cpm_sock *s, cpm_inmsg *reply, int status, void *user) {
    (void)s;
    sample_ctx *ctx = user;
    cpm_router *r = ctx->r;
    const Cpm__V1__SampleReply *sr = NULL;
    char why[160] = "";
    if (status != 0)
        snprintf(why, sizeof why, "sampler: %s", cpm_strerror(status));
    else if (reply->env->body_case == CPM__V1__ENVELOPE__BODY_ERROR)
        snprintf(why, sizeof why, "sampler: %s", reply->env->error->message);
    else if (reply->env->body_case != CPM__V1__ENVELOPE__BODY_SAMPLED ||
             reply->env->sampled->n_tokens != (size_t)ctx->n)
        snprintf(why, sizeof why, "sampler: unexpected reply");
    else
        sr = reply->env->sampled;
    for (int i = 0; i < ctx->n && !r->closing; i++) {
        gen *g = cpm_sched_owner(sched_of(r, ctx->seqs[i]), ctx->seqs[i]);
        if (!g || cpm_req_state_terminal(g->state))
            continue; /* cancelled meanwhile */
        if (!sr) {
            job_fail(g->job, 503, "server_error", "sampler_error", why);
            continue;
        }
        const Cpm__V1__SampledToken *t = sr->tokens[i];
        if (t->id < 0 || t->id >= r->vocab_size) {
            job_fail(g->job, 503, "server_error", "sampler_error", "sampler: token out of range");
            continue;
        }
        gen_token(g, t);
    }
    cpm_inmsg_free(reply);
    free(ctx);
    pump(r);
}

static void free_inmsg(void *data, void *hint) {
    (void)data;
    cpm_inmsg_free(hint);
}

static bool needs_history(const Cpm__V1__SamplingParams *p) {
    return (p->repetition_penalty != 0.0f && p->repetition_penalty != 1.0f) ||
           p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
}

/* Logits of the wanted rows: off to a sampler (the logits frame travels on, uncopied). */
static void sample_rows(cpm_router *r, cpm_inmsg *m) {
    const Cpm__V1__StageResult *res = m->env->result;
    int n = (int)res->n_seq;
    sample_ctx *ctx = malloc(sizeof *ctx + (size_t)n * sizeof(uint64_t));
    Cpm__V1__SampleRow *rows = calloc((size_t)n, sizeof *rows);
    Cpm__V1__SampleRow **rowp = calloc((size_t)n, sizeof *rowp);
    Cpm__V1__SamplingParams neutral = CPM__V1__SAMPLING_PARAMS__INIT;
    if (!ctx || !rows || !rowp || r->n_samplers == 0) {
        free(ctx);
        free(rows);
        free(rowp);
        cpm_inmsg_free(m);
        return;
    }
    ctx->r = r;
    ctx->n = n;
    for (int i = 0; i < n; i++) {
        ctx->seqs[i] = res->seq[i];
        gen *g = cpm_sched_owner(sched_of(r, res->seq[i]), res->seq[i]);
        cpm__v1__sample_row__init(&rows[i]);
        rows[i].params = g ? &g->params : &neutral; /* a cancelled row is sampled and dropped */
        if (g) {
            rows[i].step = (uint32_t)g->n_gen;
            if (needs_history(&g->params)) {
                int nt;
                const int32_t *t = cpm_sched_tokens(sched_of(r, g->seq), g->seq, &nt);
                rows[i].n_history = (size_t)nt;
                rows[i].history = (int32_t *)t;
            }
        }
        rowp[i] = &rows[i];
    }
    Cpm__V1__SampleRequest sq = CPM__V1__SAMPLE_REQUEST__INIT;
    sq.n_rows = (size_t)n;
    sq.rows = rowp;
    sq.logits = res->logits;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLE;
    env.sample = &sq;
    cpm_payload pl = {.data = (void *)m->tensor, .size = m->tensor_size, .free_fn = free_inmsg,
                      .hint = m};
    svc *sv = &r->svcs[r->first_sampler + r->rr_sampler++ % r->n_samplers];
    cpm_error e = {0};
    /* the payload (and with it m) is consumed by this call, whatever happens */
    int rc = cpm_sock_call(sv->sock, &env, &pl, r->cfg->router.timeout_ms, on_sampled, ctx, &e);
    free(rows);
    free(rowp);
    if (rc < 0) {
        LOG(r, CPM_LOG_ERROR, "sampling: %s", e.msg);
        on_sampled(sv->sock, NULL, rc, ctx);
    }
}

static void on_result(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    cpm_router *r = user;
    if (m->env->body_case != CPM__V1__ENVELOPE__BODY_RESULT || !r->have_model) {
        LOG(r, CPM_LOG_WARN, "results: unexpected %s message dropped",
            cpm_wire_body_name(m->env->body_case));
        cpm_inmsg_free(m);
        return;
    }
    const Cpm__V1__StageResult *res = m->env->result;
    if (res->error) {
        char why[CPM_ERROR_MSG_MAX];
        snprintf(why, sizeof why, "%s: %s", res->error->service ? res->error->service : "stage",
                 res->error->message ? res->error->message : "error");
        fail_step(r, res->step, why);
        cpm_inmsg_free(m);
        pump(r);
        return;
    }
    if (cpm_sched_step_done(sched_of(r, res->step), res->step, true, NULL, NULL) != 0) {
        cpm_inmsg_free(m); /* late (timed out) or unknown step */
        return;
    }
    forget_step(r, res->step);
    if (res->n_seq > 0)
        sample_rows(r, m);
    else
        cpm_inmsg_free(m);
    pump(r);
}

/* Steps that never came back fail their requests (a stage died or dropped them). */
static void on_step_timer(uv_timer_t *t) {
    cpm_router *r = t->data;
    uint64_t now = uv_hrtime(), limit = (uint64_t)r->cfg->router.timeout_ms * 1000000ull;
    for (int i = 0; i < r->n_steps;) {
        if (now - r->steps[i].t > limit) {
            uint64_t step = r->steps[i].step;
            fail_step(r, step, "pipeline step timed out");
            i = 0; /* fail_step reorders the table */
        } else {
            i++;
        }
    }
    pump(r);
}

/* ---- internal RPC ------------------------------------------------------------------------ */

static void rpc_reply_error(cpm_router *r, const cpm_inmsg *m, const char *request_id, int code,
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
    cpm_sock_send(r->rpc, &m->peer, &env, NULL, NULL);
}

static job *rpc_find(cpm_router *r, const cpm_peer *peer, const char *request_id) {
    for (job *j = r->jobs; j; j = j->next)
        if (j->kind == JOB_RPC && !j->answered && strcmp(j->request_id, request_id) == 0 &&
            j->peer.len == peer->len && memcmp(j->peer.id, peer->id, peer->len) == 0)
            return j;
    return NULL;
}

static void rpc_generate(cpm_router *r, const cpm_inmsg *m) {
    const Cpm__V1__GenerateRequest *g = m->env->generate;
    const char *rid = g->request_id ? g->request_id : "";
    char msg[256];
    if (!rid[0] || strlen(rid) > REQUEST_ID_MAX) {
        snprintf(msg, sizeof msg, "request_id must be 1..%d characters", REQUEST_ID_MAX);
        rpc_reply_error(r, m, rid, CPM_EINVAL, msg);
        return;
    }
    if (!cpm_router_ready(r) || r->closing) {
        rpc_reply_error(r, m, rid, CPM_EAGAIN, "the cluster is not ready");
        return;
    }
    if (rpc_find(r, &m->peer, rid)) {
        rpc_reply_error(r, m, rid, CPM_EINVAL, "a request with this request_id is running");
        return;
    }
    if (g->n_stop_ids > 64) {
        rpc_reply_error(r, m, rid, CPM_EINVAL, "at most 64 stop_ids");
        return;
    }
    const Cpm__V1__SamplingParams *p = g->params;
    if (p && (!(p->temperature >= 0.0f && p->temperature <= 100.0f) ||
              !(p->top_p >= 0.0f && p->top_p <= 1.0f) || !(p->min_p >= 0.0f && p->min_p <= 1.0f) ||
              p->n_logprobs > MAX_TOP)) {
        rpc_reply_error(r, m, rid, CPM_EINVAL, "sampling parameters out of range");
        return;
    }
    job *j = job_new(r, JOB_RPC, CPM_EP_RPC);
    if (!j) {
        rpc_reply_error(r, m, rid, CPM_ENOMEM, "out of memory");
        return;
    }
    j->peer = m->peer;
    j->corr = m->env->corr;
    snprintf(j->request_id, sizeof j->request_id, "%s", rid);
    j->stream = g->stream;
    j->ignore_eos = g->ignore_eos;
    j->logprobs = p && p->logprobs;
    j->top_logprobs = p ? (int)p->n_logprobs : 0;
    j->n_prompts = 1;
    j->prompt_ids = calloc(1, sizeof *j->prompt_ids);
    j->prompt_len = calloc(1, sizeof *j->prompt_len);
    if (g->n_stop_ids)
        j->stop_ids = malloc(g->n_stop_ids * sizeof *j->stop_ids);
    if (!j->prompt_ids || !j->prompt_len || (g->n_stop_ids && !j->stop_ids) || gens_init(j, 1) ||
        !(j->prompt_ids[0] = malloc((g->n_prompt_ids ? g->n_prompt_ids : 1) * sizeof(int32_t)))) {
        job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    memcpy(j->prompt_ids[0], g->prompt_ids, g->n_prompt_ids * sizeof(int32_t));
    j->prompt_len[0] = (int)g->n_prompt_ids;
    if (g->n_stop_ids)
        memcpy(j->stop_ids, g->stop_ids, g->n_stop_ids * sizeof(int32_t));
    j->n_stop_ids = (int)g->n_stop_ids;
    if (p)
        j->gens[0].params = *p;
    else
        cpm__v1__sampling_params__init(&j->gens[0].params);
    if (!p || p->seed == 0)
        j->gens[0].params.seed = seed_for(r, false, 0, 0);
    job_admit(j, (int)g->max_tokens, NULL, 0);
}

static void rpc_cancel(cpm_router *r, const cpm_inmsg *m) {
    const char *rid = m->env->cancel->request_id ? m->env->cancel->request_id : "";
    job *j = rpc_find(r, &m->peer, rid);
    if (!j)
        return; /* finished already: its final event is on the way */
    j->aborted = true;
    for (int i = 0; i < j->n_gens; i++)
        if (!cpm_req_state_terminal(j->gens[i].state))
            gen_finish(&j->gens[i], CPM_REQ_CANCELLED, NULL);
    job_complete(j);
    pump(r);
}

static void rpc_health(cpm_router *r, const cpm_inmsg *m) {
    Cpm__V1__Health h = CPM__V1__HEALTH__INIT;
    h.service = "router";
    h.name = "router";
    h.ready = cpm_router_ready(r);
    h.status = h.ready ? "ready" : "waiting for services";
    h.http_addr = (char *)r->http_addr;
    h.http_port = (uint32_t)cpm_router_http_port(r);
    if (r->have_model) {
        cpm_sched_stats st;
        sched_totals(r, &st);
        h.queue_depth = (uint32_t)st.queued;
        h.live_seqs = (uint32_t)st.live;
    }
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = m->env->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH;
    env.health = &h;
    cpm_sock_send(r->rpc, &m->peer, &env, NULL, NULL);
}

static void on_rpc(cpm_sock *s, cpm_inmsg *m, void *user) {
    cpm_router *r = user;
    switch (m->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_GENERATE:
        rpc_generate(r, m);
        break;
    case CPM__V1__ENVELOPE__BODY_CANCEL:
        rpc_cancel(r, m);
        break;
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST:
        rpc_health(r, m);
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

/* ---- health and readiness -------------------------------------------------------------- */

/* A replica serves when every one of its stages answered ready on the last poll. */
static bool replica_ready(const cpm_router *r, const replica *p) {
    for (int i = 0; i < p->n_stages; i++)
        if (!r->svcs[p->stage_svc[i]].ready)
            return false;
    for (int i = 0; i < p->n_tp; i++)
        if (!r->svcs[p->tp_svc[i]].ready)
            return false;
    return !p->down;
}

/* Ready: the model is known, every tokenizer, sampler and expert service answers, and at least one
 * pipeline replica does (the others' requests move to it). */
bool cpm_router_ready(const cpm_router *r) {
    if (!r->have_model)
        return false;
    for (int i = 0; i < r->n_svcs; i++)
        if (r->svcs[i].replica < 0 && !r->svcs[i].ready)
            return false;
    for (int i = 0; i < r->n_replicas; i++)
        if (replica_ready(r, &r->replicas[i]))
            return true;
    return false;
}

/* The model facts come from the last stage (it owns lm_head and knows them all). */
static int take_model_info(cpm_router *r, const Cpm__V1__ModelInfo *mi) {
    if (r->have_model || !mi || mi->vocab_size == 0 || mi->max_position < 2)
        return 0;
    r->vocab_size = (int)mi->vocab_size;
    r->max_position = (int)mi->max_position;
    r->n_eos = 0;
    for (size_t i = 0; i < mi->n_eos_ids && r->n_eos < 8; i++)
        r->eos_ids[r->n_eos++] = mi->eos_ids[i];
    const cpm_config *c = r->cfg;
    cpm_sched_opts so = cpm_sched_opts_default();
    so.max_inflight = c->router.micro_batches > 0 ? c->router.micro_batches : 2;
    so.prefill_chunk = c->router.prefill_chunk > 0 ? c->router.prefill_chunk : 256;
    so.max_queue = c->router.max_queue >= 0 ? c->router.max_queue : 256;
    so.max_seqs = c->router.max_seqs > 0 ? c->router.max_seqs : 64;
    so.max_context = r->max_position;
    so.kv_tokens = 0;
    so.max_batch_tokens = 1 << 30;
    for (int i = 0; i < c->n_stages; i++) { /* the tightest stage of any replica */
        const cpm_cfg_stage *st = &c->stages[i];
        if (st->max_batch_tokens > 0 && st->max_batch_tokens < so.max_batch_tokens)
            so.max_batch_tokens = st->max_batch_tokens;
        if (st->max_seqs > 0 && st->max_seqs < so.max_seqs)
            so.max_seqs = st->max_seqs;
        if (st->kv_tokens > 0 && (so.kv_tokens == 0 || st->kv_tokens < so.kv_tokens))
            so.kv_tokens = st->kv_tokens;
    }
    if (so.max_batch_tokens == 1 << 30)
        so.max_batch_tokens = 512;
    if (so.kv_tokens && so.kv_tokens < so.max_context)
        so.max_context = so.kv_tokens; /* one sequence can never outgrow one stage's cache */
    r->max_position = so.max_context;
    cpm_error e = {0};
    free(r->steps);
    r->steps = calloc((size_t)(so.max_inflight * r->n_replicas), sizeof *r->steps);
    if (!r->steps)
        return CPM_ENOMEM;
    so.id_stride = r->n_replicas;
    for (int i = 0; i < r->n_replicas; i++) {
        so.id_offset = i;
        if (cpm_sched_new(&so, &r->replicas[i].sched, &e)) {
            LOG(r, CPM_LOG_ERROR, "scheduler: %s", e.msg);
            return CPM_ENOMEM;
        }
    }
    r->have_model = true;
    LOG(r, CPM_LOG_INFO,
        "model %s: vocab %d, context %d; micro-batches %d x %d rows, %d sequences", r->model_name,
        r->vocab_size, r->max_position, so.max_inflight, so.max_batch_tokens, so.max_seqs);
    return 0;
}

typedef struct health_ctx {
    cpm_router *r;
    int i;
} health_ctx;

/* Every micro-batch passes through every stage, so when one stage stops answering
 * health polls the steps in flight cannot come back: fail their requests now
 * rather than after router.timeout_ms. Two misses in a row, so that one slow
 * reply on a loaded machine never fails requests. */
#define CPM_ROUTER_STAGE_MISSES 2

/* sv, a stage of replica p, stopped answering: its replica takes no new work; the
 * steps in flight there cannot come back, so their sequences move to another replica
 * (or fail) now rather than after router.timeout_ms, and so do the sequences waiting
 * on it. With no healthy replica left, waiting ones stay (the stage may come back;
 * the step timeout still bounds what is sent). */
static void replica_down(cpm_router *r, replica *p, const svc *sv) {
    char why[160];
    snprintf(why, sizeof why, "pipeline stage %s stopped answering (%s)", sv->name, sv->status);
    if (!p->down)
        LOG(r, CPM_LOG_WARN, "%s; its pipeline replica takes no new work", why);
    p->down = true;
    uint64_t idx = (uint64_t)(p - r->replicas);
    for (int i = 0; i < r->n_steps;) {
        uint64_t step = r->steps[i].step;
        if (step % (uint64_t)r->n_replicas != idx) {
            i++;
            continue;
        }
        fail_step(r, step, why);
        if (i < r->n_steps && r->steps[i].step == step)
            forget_step(r, step); /* unknown to the scheduler: a stale entry */
        i = 0; /* fail_step reorders the table */
    }
    for (job *j = r->jobs; j; j = j->next)
        for (int k = 0; k < j->n_gens; k++) {
            gen *g = &j->gens[k];
            if (g->seq && replica_of(r, g->seq) == p)
                gen_failover(g, why);
        }
    pump(r);
}

/* A stage answered again: its replica serves again once all its stages do. */
static void replica_maybe_up(cpm_router *r, replica *p) {
    for (int i = 0; i < p->n_stages; i++)
        if (r->svcs[p->stage_svc[i]].misses > 0)
            return;
    for (int i = 0; i < p->n_tp; i++)
        if (r->svcs[p->tp_svc[i]].misses > 0)
            return;
    if (p->down)
        LOG(r, CPM_LOG_INFO, "pipeline replica %d answers again", (int)(p - r->replicas));
    p->down = false;
}

static void on_health_reply(cpm_sock *s, cpm_inmsg *reply, int status, void *user) {
    (void)s;
    health_ctx *hc = user;
    cpm_router *r = hc->r;
    svc *sv = &r->svcs[hc->i];
    replica *p = sv->replica >= 0 ? &r->replicas[sv->replica] : NULL;
    bool last_stage = p && p->stage_svc[p->n_stages - 1] == hc->i;
    free(hc);
    sv->answered = true;
    if (status != 0 || reply->env->body_case != CPM__V1__ENVELOPE__BODY_HEALTH) {
        sv->ready = false;
        sv->misses++;
        snprintf(sv->status, sizeof sv->status, "%s",
                 status ? cpm_strerror(status) : "unexpected reply to health_request");
        if (p && sv->misses >= CPM_ROUTER_STAGE_MISSES)
            replica_down(r, p, sv);
    } else {
        sv->misses = 0;
        const Cpm__V1__Health *h = reply->env->health;
        sv->ready = h->ready;
        snprintf(sv->status, sizeof sv->status, "%s", h->status ? h->status : "");
        sv->kv_used = (int)h->kv_used;
        sv->kv_total = (int)h->kv_total;
        if (p)
            replica_maybe_up(r, p);
        if (last_stage && h->ready && !r->closing)
            take_model_info(r, h->model);
    }
    cpm_inmsg_free(reply);
}

static void poll_health(cpm_router *r) {
    for (int i = 0; i < r->n_svcs; i++) {
        health_ctx *hc = malloc(sizeof *hc);
        if (!hc)
            return;
        hc->r = r;
        hc->i = i;
        Cpm__V1__HealthRequest hr = CPM__V1__HEALTH_REQUEST__INIT;
        Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
        env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST;
        env.health_request = &hr;
        int timeout = r->o.health_interval_ms > 200 ? r->o.health_interval_ms - 100 : 100;
        if (cpm_sock_call(r->svcs[i].sock, &env, NULL, timeout, on_health_reply, hc, NULL) < 0)
            free(hc);
    }
}

static void on_health_timer(uv_timer_t *t) {
    poll_health(t->data);
}

/* ---- life cycle ----------------------------------------------------------------------------- */

int cpm_router_new(uv_loop_t *loop, void *zctx, const cpm_config *cfg,
                   const cpm_router_opts *opts, cpm_router **ret, cpm_error *err) {
    *ret = NULL;
    if (!loop || !zctx || !cfg)
        return cpm_error_set(err, CPM_EINVAL, "router: loop, zmq context and config are required");
    if (cfg->n_stages < 1 || cfg->n_samplers < 1)
        return cpm_error_set(err, CPM_EINVAL, "router: the config needs at least one stage and "
                                              "one sampler");
    cpm_router *r = calloc(1, sizeof *r);
    if (!r)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    r->loop = loop;
    r->zctx = zctx;
    r->cfg = cfg;
    r->o = opts ? *opts : cpm_router_opts_default();
    if (r->o.health_interval_ms <= 0)
        r->o.health_interval_ms = 1000;
    r->oai_lim = cpm_oai_limits_default();
    r->oai_lim.max_prompt_ids = cfg->router.max_prompt_tokens;
    snprintf(r->model_name, sizeof r->model_name, "%s", cfg->name);
    /* text goes through the cpm-tokenizer replicas; `off` serves token ids only */
    r->use_tok = strcmp(cfg->router.tokenize, "off") != 0;
    if (r->use_tok && cfg->n_tokenizers < 1) {
        free(r);
        return cpm_error_set(err, CPM_EINVAL, "router: the config needs a tokenizer (or "
                                              "`router: tokenize: off`)");
    }
    *ret = r;
    return 0;
}

static void on_unexpected(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s, (void)user;
    cpm_inmsg_free(m); /* a late reply to a call that timed out */
}

static int add_svc(cpm_router *r, const char *name, const char *endpoint, cpm_error *err) {
    svc *sv = &r->svcs[r->n_svcs];
    snprintf(sv->name, sizeof sv->name, "%s", name);
    sv->replica = -1;
    snprintf(sv->status, sizeof sv->status, "not answered yet");
    int rc = cpm_sock_new(r->loop, r->zctx, ZMQ_DEALER, NULL, on_unexpected, r, &sv->sock, err);
    if (rc == 0)
        rc = cpm_sock_connect(sv->sock, endpoint, err);
    if (rc)
        return cpm_error_prefix(err, "router: %s (%s)", name, endpoint);
    r->n_svcs++;
    return 0;
}

int cpm_router_start(cpm_router *r, cpm_error *err) {
    const cpm_config *c = r->cfg;
    const cpm_cfg_router *rc = &c->router;
    char name[32];
    int e;
    r->first_stage = r->n_svcs;
    r->n_stages = c->n_stages;
    r->n_replicas = c->n_pipelines > 0 ? c->n_pipelines : 1;
    for (int i = 0; i < c->n_stages; i++) {
        snprintf(name, sizeof name, "stage%d", i);
        if ((e = add_svc(r, name, c->stages[i].svc.endpoint, err)))
            return e;
        replica *p = &r->replicas[c->stages[i].pipeline];
        r->svcs[r->n_svcs - 1].replica = (int)(p - r->replicas);
        p->stage_svc[p->n_stages++] = r->n_svcs - 1;
    }
    r->first_tok = r->n_svcs;
    r->n_toks = r->use_tok ? c->n_tokenizers : 0;
    for (int i = 0; i < r->n_toks; i++) {
        snprintf(name, sizeof name, "tokenizer%d", i);
        if ((e = add_svc(r, name, c->tokenizers[i].endpoint, err)))
            return e;
    }
    r->first_sampler = r->n_svcs;
    r->n_samplers = c->n_samplers;
    for (int i = 0; i < c->n_samplers; i++) {
        snprintf(name, sizeof name, "sampler%d", i);
        if ((e = add_svc(r, name, c->samplers[i].endpoint, err)))
            return e;
    }
    /* Expert services (expert parallelism) are polled like samplers: every stage needs
     * all of them, so /ready waits for each; a dead one fails the steps through the
     * stages' own timeouts or error replies. */
    for (int i = 0; i < c->n_experts; i++) {
        snprintf(name, sizeof name, "expert%d", i);
        if ((e = add_svc(r, name, c->experts[i].svc.endpoint, err)))
            return e;
    }
    /* Tensor-parallel ranks > 0 belong to their stage's replica: one that stops answering
     * takes the replica down like a stage (rank 0 would otherwise wait out timeout_ms). */
    for (int i = 0; i < c->n_stages; i++)
        for (int t = 0; t < c->stages[i].n_tp; t++) {
            snprintf(name, sizeof name, "stage%d.tp%d", i, t + 1);
            if ((e = add_svc(r, name, c->stages[i].tp[t].svc.endpoint, err)))
                return e;
            replica *p = &r->replicas[c->stages[i].pipeline];
            r->svcs[r->n_svcs - 1].replica = (int)(p - r->replicas);
            p->tp_svc[p->n_tp++] = r->n_svcs - 1;
        }
    cpm_sock_opts ro = cpm_sock_opts_default();
    if ((e = cpm_sock_new(r->loop, r->zctx, ZMQ_ROUTER, &ro, on_result, r, &r->results, err)) ||
        (e = cpm_sock_bind(r->results, rc->results, err)))
        return cpm_error_prefix(err, "router: results endpoint %s", rc->results);
    cpm_sock_opts po = cpm_sock_opts_default();
    po.max_msg_size = 16ll << 20; /* generate requests carry ids, never tensors */
    if ((e = cpm_sock_new(r->loop, r->zctx, ZMQ_ROUTER, &po, on_rpc, r, &r->rpc, err)) ||
        (e = cpm_sock_bind(r->rpc, rc->rpc, err)))
        return cpm_error_prefix(err, "router: rpc endpoint %s", rc->rpc);
    cpm_http_limits hl = cpm_http_limits_default();
    if (rc->max_body_bytes > 0)
        hl.max_body = (size_t)rc->max_body_bytes;
    if ((e = cpm_http_server_new(r->loop, &hl, on_http, r, &r->http, err)))
        return e;
    const char *addr = r->o.http_addr ? r->o.http_addr : rc->http_addr[0] ? rc->http_addr : "127.0.0.1";
    r->http_addr = addr;
    int port = r->o.http_port >= 0 ? r->o.http_port : rc->http_port;
    if ((e = cpm_http_server_listen(r->http, addr, port, err)))
        return e;
    uv_timer_init(r->loop, &r->health_timer);
    uv_timer_init(r->loop, &r->step_timer);
    r->health_timer.data = r;
    r->step_timer.data = r;
    r->started = true;
    uv_timer_start(&r->health_timer, on_health_timer, 0, (uint64_t)r->o.health_interval_ms);
    uv_timer_start(&r->step_timer, on_step_timer, 250, 250);
    return 0;
}

int cpm_router_http_port(const cpm_router *r) {
    return r->http ? cpm_http_server_port(r->http) : -1;
}

static void router_free(cpm_router *r) {
    void (*done)(void *) = r->done;
    void *ud = r->done_ud;
    for (int i = 0; i < r->n_replicas; i++)
        cpm_sched_free(r->replicas[i].sched);
    free(r->steps);
    free(r);
    if (done)
        done(ud);
}

/* Freed once its handles are closed and no job is left (a tokenizing worker may
 * still hold one). */
static void router_maybe_free(cpm_router *r) {
    if (r->closing_handles == 0 && r->n_jobs == 0)
        router_free(r);
}

static void close_step(cpm_router *r) {
    r->closing_handles--;
    router_maybe_free(r);
}

static void on_timer_closed(uv_handle_t *h) {
    close_step(h->data);
}

static void on_http_closed(void *ud) {
    close_step(ud);
}

void cpm_router_close(cpm_router *r, void (*done)(void *ud), void *ud) {
    if (!r)
        return;
    r->closing = true;
    r->done = done;
    r->done_ud = ud;
    /* Taken first: failing the last job below may drop the router's last
     * other reference, and this one keeps it alive until the handles close. */
    r->closing_handles = 1; /* this function's own reference */
    /* every request still gets its one answer before the sockets go */
    for (job *j = r->jobs, *next; j; j = next) {
        next = j->next;
        if (!j->answered)
            job_fail(j, 503, "service_unavailable_error", "shutting_down",
                     "the server is shutting down");
    }
    if (r->http) {
        r->closing_handles++;
        cpm_http_server_close(r->http, on_http_closed, r);
        r->http = NULL;
    }
    for (int i = 0; i < r->n_svcs; i++)
        cpm_sock_free(r->svcs[i].sock);
    cpm_sock_free(r->results);
    cpm_sock_free(r->rpc);
    if (r->started) {
        r->closing_handles += 2;
        uv_close((uv_handle_t *)&r->health_timer, on_timer_closed);
        uv_close((uv_handle_t *)&r->step_timer, on_timer_closed);
    }
    close_step(r);
}
