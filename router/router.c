/* router.c - the hub: makes the router's rooms, wires their hooks, owns the sockets and
 * timers, and shuts them down in order.
 *
 * One request's path through the rooms (docs/ARCHITECTURE.md draws it):
 *   api_http.c / api_rpc.c   a request becomes a job with the front's answer sink (job.c)
 *   admit.c                  prompts to a cpm-tokenizer once, limits, gens into the pipeline
 *   pipeline.c               micro-batches to stage 0 (io.forward, here), the last stage's
 *                            logits back (on_result, here) and off to a sampler
 *                            (io.sample, here); each sampled token up through io.token
 *   textflow.c               token → text via Detokenize (io.detok, here), stop strings,
 *                            logprob texts; the gen's end
 *   job.c                    the one final answer, through the sink
 * health.c polls the services and tells the pipeline when a replica goes down or up.
 * Lower rooms never call higher ones: every upward call is a hook set here. Everything
 * runs on the loop thread.
 */
#include "router.h"

#include <stdlib.h>
#include <string.h>

#include "../services/common/transport.h"
#include "admit.h"
#include "api_http.h"
#include "api_rpc.h"
#include "front.h"
#include "health.h"
#include "job.h"
#include "metrics.h"
#include "pipeline.h"
#include "textflow.h"

struct cpm_router {
    uv_loop_t *loop;
    void *zctx;
    const cpm_config *cfg;
    cpm_router_opts o;
    char model_name[CPM_CFG_STR];
    const char *http_addr; /* where the HTTP front listens */
    cpm_metrics m;
    cpm_jobs *jobs;
    cpm_health *health;
    cpm_pipeline *pipeline;
    cpm_textflow *text;
    cpm_admit admit;
    cpm_front_ctx front;
    cpm_api_http *api_http;
    cpm_api_rpc *api_rpc;
    cpm_sock *results; /* the last stages' StageResults */
    uv_timer_t step_timer;
    uv_timer_t drain_timer; /* draining: the grace period, or at once when the last job ends */
    bool timer_open, closing, draining, drain_open;
    void (*drain_done)(void *ud);
    void *drain_ud;
    int closing_handles;
    void (*done)(void *ud);
    void *done_ud;
};

cpm_router_opts cpm_router_opts_default(void) {
    return (cpm_router_opts){.http_port = -1, .http_addr = NULL, .health_interval_ms = 1000,
                             .log = NULL};
}

/* ---- hooks: jobs ---------------------------------------------------------------------- */

static void router_maybe_free(cpm_router *r);

static void on_release(void *ud, cpm_gen *g) {
    cpm_pipeline_release(((cpm_router *)ud)->pipeline, g);
}

static void on_drain_timer(uv_timer_t *t);

static void on_jobs_empty(void *ud) {
    cpm_router *r = ud;
    if (r->closing)
        router_maybe_free(r);
    else if (r->draining) /* on the next turn: this runs while a job is being freed */
        uv_timer_start(&r->drain_timer, on_drain_timer, 0, 0);
}

/* ---- hooks: health -------------------------------------------------------------------- */

static void on_replica_down(void *ud, int replica, const char *why) {
    cpm_pipeline_replica_down(((cpm_router *)ud)->pipeline, replica, why);
}

static void on_replica_up(void *ud, int replica) {
    cpm_pipeline_replica_up(((cpm_router *)ud)->pipeline, replica);
}

static void on_replica_restarted(void *ud, int replica, const char *why) {
    cpm_pipeline_replica_restarted(((cpm_router *)ud)->pipeline, replica, why);
}

static void on_expert_lost(void *ud, const char *why) {
    cpm_pipeline_fail_all(((cpm_router *)ud)->pipeline, why);
}

static void on_model_info(void *ud, const Cpm__V1__ModelInfo *mi) {
    cpm_router *r = ud;
    cpm_pipeline_set_model(r->pipeline, mi, r->model_name);
}

/* ---- hooks: the pipeline's I/O -------------------------------------------------------- */

static int forward(void *ud, int replica, Cpm__V1__Envelope *env, cpm_error *err) {
    cpm_router *r = ud;
    cpm_svc *stage0 = cpm_health_first_stage(r->health, replica);
    int rc = cpm_sock_send(stage0->sock, NULL, env, NULL, err);
    return rc < 0 ? cpm_error_prefix(err, "%s", stage0->name) : rc;
}

static void on_sampled(cpm_sock *s, cpm_inmsg *reply, int status, void *user) {
    (void)s;
    cpm_pipeline_sampled(user, status == 0 ? reply->env : NULL, status);
    cpm_inmsg_free(reply);
}

static int sample(void *ud, Cpm__V1__Envelope *env, cpm_payload *logits, cpm_sample_call *call,
                  cpm_error *err) {
    cpm_router *r = ud;
    cpm_svc *sv = cpm_health_sampler(r->health);
    return cpm_sock_call(sv->sock, env, logits, r->cfg->router.timeout_ms, on_sampled, call, err);
}

static void on_token(void *ud, cpm_gen *g, bool stop_id, const char *end) {
    cpm_textflow_token(((cpm_router *)ud)->text, g, stop_id, end);
}

static void free_inmsg(void *data, void *hint) {
    (void)data;
    cpm_inmsg_free(hint);
}

/* The last stage's logits: the frame travels on to a sampler uncopied. */
static void on_result(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    cpm_router *r = user;
    if (m->env->body_case != CPM__V1__ENVELOPE__BODY_RESULT) {
        if (r->o.log)
            cpm_log_write(r->o.log, CPM_LOG_WARN, NULL, "results: unexpected %s message dropped",
                          cpm_wire_body_name(m->env->body_case));
        cpm_inmsg_free(m);
        return;
    }
    cpm_payload logits = {.data = (void *)m->tensor, .size = m->tensor_size,
                          .free_fn = free_inmsg, .hint = m};
    cpm_pipeline_on_result(r->pipeline, m->env->result, &logits);
}

static void on_step_timer(uv_timer_t *t) {
    cpm_router *r = t->data;
    cpm_pipeline_check_timeouts(r->pipeline, r->cfg->router.timeout_ms);
}

/* ---- hooks: the text flow's tokenizer ------------------------------------------------- */

static int detok(void *ud, const int32_t *ids, size_t n, size_t prefix_len, bool skip_special,
                 cpm_tokc_cb cb, void *cb_ud, cpm_error *err) {
    cpm_router *r = ud;
    cpm_svc *tk = cpm_health_tokenizer(r->health);
    return cpm_tokc_detok(tk->sock, tk->name, ids, n, prefix_len, skip_special,
                          r->cfg->router.timeout_ms, cb, cb_ud, err);
}

static int pieces(void *ud, int32_t context, const int32_t *ids, size_t n, cpm_tokc_cb cb,
                  void *cb_ud, cpm_error *err) {
    cpm_router *r = ud;
    cpm_svc *tk = cpm_health_tokenizer(r->health);
    return cpm_tokc_pieces(tk->sock, tk->name, context, ids, n, false, r->cfg->router.timeout_ms,
                           cb, cb_ud, err);
}

static void kick(void *ud) {
    cpm_pipeline_pump(((cpm_router *)ud)->pipeline);
}

/* ---- life ------------------------------------------------------------------------------ */

/* The rooms that need no sockets: jobs, pipeline, text flow, admission, the fronts' view. */
static int make_rooms(cpm_router *r, cpm_error *err) {
    const cpm_config *c = r->cfg;
    cpm_jobs_hooks jh = {.ud = r, .release = on_release, .empty = on_jobs_empty};
    cpm_pipeline_io pio = {.ud = r, .forward = forward, .sample = sample, .token = on_token};
    cpm_textflow_io tio = {.ud = r, .detok = detok, .pieces = pieces, .kick = kick};
    int n_replicas = c->n_pipelines > 0 ? c->n_pipelines : 1;
    if (!(r->jobs = cpm_jobs_new(&r->m, &jh)) || !(r->text = cpm_textflow_new(&tio, &r->m)))
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    int e = cpm_pipeline_new(c, n_replicas, r->jobs, r->o.log, &r->m, &pio, &r->pipeline, err);
    if (e)
        return e;
    /* text goes through the cpm-tokenizer replicas; `off` serves token ids only */
    r->admit = (cpm_admit){.cfg = c, .m = &r->m, .pipeline = r->pipeline,
                           .use_tok = strcmp(c->router.tokenize, "off") != 0};
    r->front = (cpm_front_ctx){.cfg = c, .model_name = r->model_name, .log = r->o.log,
                               .metrics = &r->m, .jobs = r->jobs, .admit = &r->admit,
                               .pipeline = r->pipeline};
    return 0;
}

int cpm_router_new(uv_loop_t *loop, void *zctx, const cpm_config *cfg,
                   const cpm_router_opts *opts, cpm_router **ret, cpm_error *err) {
    *ret = NULL;
    if (!loop || !zctx || !cfg)
        return cpm_error_set(err, CPM_EINVAL, "router: loop, zmq context and config are required");
    if (cfg->n_stages < 1 || cfg->n_samplers < 1)
        return cpm_error_set(err, CPM_EINVAL, "router: the config needs at least one stage and "
                                              "one sampler");
    if (strcmp(cfg->router.tokenize, "off") != 0 && cfg->n_tokenizers < 1)
        return cpm_error_set(err, CPM_EINVAL, "router: the config needs a tokenizer (or "
                                              "`router: tokenize: off`)");
    cpm_router *r = calloc(1, sizeof *r);
    if (!r)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    r->loop = loop;
    r->zctx = zctx;
    r->cfg = cfg;
    cpm_metrics_init(&r->m);
    r->o = opts ? *opts : cpm_router_opts_default();
    if (r->o.health_interval_ms <= 0)
        r->o.health_interval_ms = 1000;
    snprintf(r->model_name, sizeof r->model_name, "%s", cfg->name);
    *ret = r;
    return make_rooms(r, err);
}

/* The HTTP and RPC fronts and the results socket. */
static int open_doors(cpm_router *r, cpm_error *err) {
    const cpm_cfg_router *rc = &r->cfg->router;
    cpm_sock_opts ro = cpm_sock_opts_default();
    ro.curve = r->o.curve;
    int e;
    if ((e = cpm_sock_new(r->loop, r->zctx, ZMQ_ROUTER, &ro, on_result, r, &r->results, err)) ||
        (e = cpm_sock_bind(r->results, rc->results, err)))
        return cpm_error_prefix(err, "router: results endpoint %s", rc->results);
    if ((e = cpm_api_rpc_new(r->loop, r->zctx, r->o.curve, &r->front, rc->rpc, &r->api_rpc, err)))
        return e;
    r->http_addr = r->o.http_addr ? r->o.http_addr : rc->http_addr[0] ? rc->http_addr : "127.0.0.1";
    int port = r->o.http_port >= 0 ? r->o.http_port : rc->http_port;
    if ((e = cpm_api_http_new(r->loop, &r->front, r->http_addr, port, &r->api_http, err)))
        return e;
    cpm_api_rpc_set_http(r->api_rpc, r->http_addr, cpm_api_http_port(r->api_http));
    return 0;
}

int cpm_router_start(cpm_router *r, cpm_error *err) {
    cpm_health_hooks hh = {.ud = r, .replica_down = on_replica_down, .replica_up = on_replica_up,
                           .replica_restarted = on_replica_restarted, .expert_lost = on_expert_lost,
                           .model_info = on_model_info};
    int e = cpm_health_new(r->loop, r->zctx, r->o.curve, r->cfg, r->admit.use_tok, r->o.health_interval_ms,
                           r->o.log, &hh, &r->health, err);
    r->admit.health = r->front.health = r->health;
    if (e || (e = open_doors(r, err)))
        return e;
    uv_timer_init(r->loop, &r->step_timer);
    r->step_timer.data = r;
    r->timer_open = true;
    uv_timer_start(&r->step_timer, on_step_timer, 250, 250);
    cpm_health_start(r->health);
    return 0;
}

int cpm_router_http_port(const cpm_router *r) {
    return cpm_api_http_port(r->api_http);
}

bool cpm_router_ready(const cpm_router *r) {
    return r->health && cpm_admit_ready(&r->admit);
}

/* ---- shutdown ------------------------------------------------------------------------------ */

static void router_free(cpm_router *r) {
    void (*done)(void *) = r->done;
    void *ud = r->done_ud;
    cpm_pipeline_free(r->pipeline);
    cpm_textflow_free(r->text);
    cpm_jobs_free(r->jobs);
    free(r);
    if (done)
        done(ud);
}

/* Freed once its handles are closed and no job is left (a tokenizer call may still
 * hold one). */
static void router_maybe_free(cpm_router *r) {
    if (r->closing_handles == 0 && (!r->jobs || cpm_jobs_count(r->jobs) == 0))
        router_free(r);
}

static void close_step(void *ud) {
    cpm_router *r = ud;
    r->closing_handles--;
    router_maybe_free(r);
}

static void on_timer_closed(uv_handle_t *h) {
    close_step(h->data);
}

/* Every request still gets its one answer before the sockets go. */
static void fail_all(cpm_router *r) {
    for (cpm_job *j = r->jobs ? cpm_jobs_first(r->jobs) : NULL, *next; j; j = next) {
        next = j->next;
        cpm_job_fail(j, 503, "service_unavailable_error", "shutting_down",
                     "the server is shutting down");
    }
}

void cpm_router_close(cpm_router *r, void (*done)(void *ud), void *ud) {
    if (!r || r->closing)
        return;
    r->closing = true;
    r->admit.closing = true;
    r->done = done;
    r->done_ud = ud;
    /* taken first: failing the last job below may find no other reference, and this
     * one keeps r alive until the handles close */
    r->closing_handles = 1;
    if (r->pipeline)
        cpm_pipeline_stop(r->pipeline);
    fail_all(r);
    if (r->api_http) {
        r->closing_handles++;
        cpm_api_http_close(r->api_http, close_step, r);
    }
    if (r->health) {
        r->closing_handles++;
        cpm_health_close(r->health, close_step, r);
    }
    cpm_api_rpc_free(r->api_rpc);
    cpm_sock_free(r->results);
    if (r->timer_open) {
        r->closing_handles++;
        uv_close((uv_handle_t *)&r->step_timer, on_timer_closed);
    }
    if (r->drain_open) {
        r->closing_handles++;
        uv_close((uv_handle_t *)&r->drain_timer, on_timer_closed);
    }
    close_step(r);
}

/* ---- drain ---------------------------------------------------------------------------------- */

static void on_drain_timer(uv_timer_t *t) {
    cpm_router *r = t->data;
    int left = cpm_jobs_count(r->jobs);
    if (left && r->o.log)
        cpm_log_warn(r->o.log, "drain: %d request(s) still running at the end of the grace "
                     "period: each gets one final error", left);
    cpm_router_close(r, r->drain_done, r->drain_ud);
}

void cpm_router_drain(cpm_router *r, int grace_ms, void (*done)(void *ud), void *ud) {
    if (!r || r->closing || r->draining)
        return;
    r->draining = true;
    r->admit.closing = true; /* new requests: 503; /ready: 503 */
    r->drain_done = done;
    r->drain_ud = ud;
    int n = cpm_jobs_count(r->jobs);
    if (r->o.log)
        cpm_log_info(r->o.log, "draining: admitting nothing new, %d request(s) in flight get up "
                     "to %d ms to finish", n, grace_ms);
    uv_timer_init(r->loop, &r->drain_timer);
    r->drain_timer.data = r;
    r->drain_open = true;
    uv_timer_start(&r->drain_timer, on_drain_timer, n ? (uint64_t)grace_ms : 0, 0);
}
