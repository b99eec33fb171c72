/* health.c - the service table, health polls, readiness of replicas and services. */
#include "health.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SERVICES (CPM_CFG_MAX_STAGES * CPM_CFG_MAX_TP + 2 * CPM_CFG_MAX_REPLICAS + \
                      CPM_CFG_MAX_EXPERT_SVCS)

/* The services one pipeline replica needs: its stages (in order) and their TP ranks > 0. */
typedef struct replica {
    int n_stages;
    int stage_svc[CPM_CFG_MAX_STAGES];
    int n_tp;
    int tp_svc[CPM_CFG_MAX_STAGES * (CPM_CFG_MAX_TP - 1)];
    bool down;
} replica;

struct cpm_health {
    uv_loop_t *loop;
    void *zctx;
    const cpm_curve *curve; /* every connection to a service is a CURVE client (NULL: plain) */
    const cpm_log *log;
    cpm_health_hooks hooks;
    int interval_ms;
    cpm_svc svcs[MAX_SERVICES];
    int n_svcs;
    int first_tok, n_toks, rr_tok;
    int first_sampler, n_samplers, rr_sampler;
    replica replicas[CPM_CFG_MAX_REPLICAS];
    int n_replicas;
    uv_timer_t timer;
    bool started, closing;
    void (*done)(void *ud);
    void *done_ud;
};

#define LOG(h, level, ...)                                            \
    do {                                                              \
        if ((h)->log)                                                 \
            cpm_log_write((h)->log, (level), NULL, __VA_ARGS__);      \
    } while (0)

/* ---- the table --------------------------------------------------------------------- */

static void on_unexpected(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s, (void)user;
    cpm_inmsg_free(m); /* a late reply to a call that timed out */
}

static int add_svc(cpm_health *h, const char *name, const char *endpoint, int replica_idx,
                   cpm_error *err) {
    cpm_svc *sv = &h->svcs[h->n_svcs];
    snprintf(sv->name, sizeof sv->name, "%s", name);
    snprintf(sv->endpoint, sizeof sv->endpoint, "%s", endpoint);
    sv->replica = replica_idx;
    snprintf(sv->status, sizeof sv->status, "not answered yet");
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = h->curve;
    int rc = cpm_sock_new(h->loop, h->zctx, ZMQ_DEALER, &so, on_unexpected, h, &sv->sock, err);
    if (rc == 0)
        rc = cpm_sock_connect(sv->sock, endpoint, err);
    if (rc)
        return cpm_error_prefix(err, "router: %s (%s)", name, endpoint);
    h->n_svcs++;
    return 0;
}

static int add_stages(cpm_health *h, const cpm_config *c, cpm_error *err) {
    char name[32];
    for (int i = 0; i < c->n_stages; i++) {
        int k = c->stages[i].pipeline, e;
        snprintf(name, sizeof name, "stage%d", i);
        if ((e = add_svc(h, name, c->stages[i].svc.endpoint, k, err)))
            return e;
        replica *p = &h->replicas[k];
        p->stage_svc[p->n_stages++] = h->n_svcs - 1;
    }
    return 0;
}

/* Services outside the replicas, named kind0, kind1, ... */
static int add_group(cpm_health *h, const char *kind, const cpm_cfg_service *svcs, int n,
                     cpm_error *err) {
    char name[32];
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "%s%d", kind, i);
        int e = add_svc(h, name, svcs[i].endpoint, -1, err);
        if (e)
            return e;
    }
    return 0;
}

/* Tensor-parallel ranks > 0 belong to their stage's replica: one that stops answering
 * takes the replica down like a stage (rank 0 would otherwise wait out timeout_ms). */
static int add_tp_ranks(cpm_health *h, const cpm_config *c, cpm_error *err) {
    char name[32];
    for (int i = 0; i < c->n_stages; i++)
        for (int t = 0; t < c->stages[i].n_tp; t++) {
            int k = c->stages[i].pipeline, e;
            snprintf(name, sizeof name, "stage%d.tp%d", i, t + 1);
            if ((e = add_svc(h, name, c->stages[i].tp[t].svc.endpoint, k, err)))
                return e;
            replica *p = &h->replicas[k];
            p->tp_svc[p->n_tp++] = h->n_svcs - 1;
        }
    return 0;
}

/* Expert services (expert parallelism) are polled like samplers: every stage needs all
 * of them, so readiness waits for each; a dead one fails the steps through the stages'
 * own timeouts or error replies. */
static int add_services(cpm_health *h, const cpm_config *c, bool use_tok, cpm_error *err) {
    int e;
    h->n_replicas = c->n_pipelines > 0 ? c->n_pipelines : 1;
    if ((e = add_stages(h, c, err)))
        return e;
    h->first_tok = h->n_svcs;
    h->n_toks = use_tok ? c->n_tokenizers : 0;
    if ((e = add_group(h, "tokenizer", c->tokenizers, h->n_toks, err)))
        return e;
    h->first_sampler = h->n_svcs;
    h->n_samplers = c->n_samplers;
    if ((e = add_group(h, "sampler", c->samplers, c->n_samplers, err)))
        return e;
    for (int i = 0; i < c->n_experts; i++) {
        char name[32];
        snprintf(name, sizeof name, "expert%d", i);
        if ((e = add_svc(h, name, c->experts[i].svc.endpoint, -1, err)))
            return e;
    }
    return add_tp_ranks(h, c, err);
}

int cpm_health_new(uv_loop_t *loop, void *zctx, const cpm_curve *curve, const cpm_config *cfg, bool use_tok,
                   int interval_ms, const cpm_log *log, const cpm_health_hooks *hooks,
                   cpm_health **ret, cpm_error *err) {
    cpm_health *h = calloc(1, sizeof *h);
    *ret = h;
    if (!h)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    h->loop = loop;
    h->zctx = zctx;
    h->curve = curve;
    h->log = log;
    h->hooks = *hooks;
    h->interval_ms = interval_ms;
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    h->started = true;
    return add_services(h, cfg, use_tok, err);
}

/* ---- readiness -------------------------------------------------------------------------- */

/* A replica serves when every one of its services answered ready on the last poll. */
static bool replica_ready(const cpm_health *h, const replica *p) {
    for (int i = 0; i < p->n_stages; i++)
        if (!h->svcs[p->stage_svc[i]].ready)
            return false;
    for (int i = 0; i < p->n_tp; i++)
        if (!h->svcs[p->tp_svc[i]].ready)
            return false;
    return !p->down;
}

/* Whether one of n services from first answered ready (n == 0: none is needed). */
static bool any_ready(const cpm_health *h, int first, int n) {
    for (int i = 0; i < n; i++)
        if (h->svcs[first + i].ready)
            return true;
    return n == 0;
}

bool cpm_health_ready(const cpm_health *h) {
    if (!any_ready(h, h->first_tok, h->n_toks) || !any_ready(h, h->first_sampler, h->n_samplers))
        return false;
    for (int i = h->first_sampler + h->n_samplers; i < h->n_svcs; i++)
        if (h->svcs[i].replica < 0 && !h->svcs[i].ready)
            return false; /* expert services: each owns its experts */
    for (int i = 0; i < h->n_replicas; i++)
        if (replica_ready(h, &h->replicas[i]))
            return true;
    return false;
}

int cpm_health_replicas(const cpm_health *h) {
    return h->n_replicas;
}

/* Round robin over the ready services of a kind (any, when none is). */
static cpm_svc *pick(cpm_health *h, int first, int n, int *rr) {
    if (n == 0)
        return NULL;
    for (int k = 0; k < n; k++) {
        int i = (*rr + k) % n;
        if (h->svcs[first + i].ready) {
            *rr = i + 1;
            return &h->svcs[first + i];
        }
    }
    return &h->svcs[first + (*rr)++ % n];
}

cpm_svc *cpm_health_tokenizer(cpm_health *h) {
    return pick(h, h->first_tok, h->n_toks, &h->rr_tok);
}

cpm_svc *cpm_health_sampler(cpm_health *h) {
    return pick(h, h->first_sampler, h->n_samplers, &h->rr_sampler);
}

cpm_svc *cpm_health_first_stage(cpm_health *h, int replica_idx) {
    return &h->svcs[h->replicas[replica_idx].stage_svc[0]];
}

const cpm_svc *cpm_health_services(const cpm_health *h, int *n) {
    *n = h->n_svcs;
    return h->svcs;
}

void cpm_health_kv(const cpm_health *h, int *used, int *total) {
    *used = *total = 0;
    for (int k = 0; k < h->n_replicas; k++)
        for (int i = 0; i < h->replicas[k].n_stages; i++) {
            const cpm_svc *sv = &h->svcs[h->replicas[k].stage_svc[i]];
            *used += sv->kv_used;
            *total += sv->kv_total;
        }
}

/* ---- polls ---------------------------------------------------------------------------- */

/* sv of replica p stopped answering, or is draining (stopping): the replica takes no new
 * work; the owner moves or fails what it had (every micro-batch passes every stage, so
 * none can come back). */
static void replica_down(cpm_health *h, replica *p, const cpm_svc *sv) {
    char why[256];
    if (!strcmp(sv->status, CPM_HEALTH_DRAINING))
        snprintf(why, sizeof why, "pipeline stage %s is stopping (draining)", sv->name);
    else
        snprintf(why, sizeof why, "pipeline stage %s stopped answering (%s)", sv->name, sv->status);
    if (!p->down)
        LOG(h, CPM_LOG_WARN, "%s; its pipeline replica takes no new work", why);
    p->down = true;
    h->hooks.replica_down(h->hooks.ud, (int)(p - h->replicas), why);
}

/* A service of p answered again: p serves again once all of them answer ready. */
static void replica_maybe_up(cpm_health *h, replica *p) {
    for (int i = 0; i < p->n_stages; i++)
        if (h->svcs[p->stage_svc[i]].misses > 0 || !h->svcs[p->stage_svc[i]].ready)
            return;
    for (int i = 0; i < p->n_tp; i++)
        if (h->svcs[p->tp_svc[i]].misses > 0 || !h->svcs[p->tp_svc[i]].ready)
            return;
    if (!p->down)
        return;
    LOG(h, CPM_LOG_INFO, "pipeline replica %d answers again", (int)(p - h->replicas));
    p->down = false;
    h->hooks.replica_up(h->hooks.ud, (int)(p - h->replicas));
}

static bool is_expert(const cpm_health *h, const cpm_svc *sv) {
    int i = (int)(sv - h->svcs);
    return sv->replica < 0 && i >= h->first_sampler + h->n_samplers;
}

static void expert_lost(cpm_health *h, const cpm_svc *sv, const char *what) {
    char why[160];
    snprintf(why, sizeof why, "expert service %s %s", sv->name, what);
    LOG(h, CPM_LOG_WARN, "%s: the requests in flight cannot finish", why);
    h->hooks.expert_lost(h->hooks.ud, why);
}

typedef struct poll_ctx {
    cpm_health *h;
    int i;
    uint64_t t0; /* sent, ns */
} poll_ctx;

static void on_missed(cpm_health *h, cpm_svc *sv, replica *p, int status) {
    sv->ready = false;
    sv->misses++;
    snprintf(sv->status, sizeof sv->status, "%s",
             status ? cpm_strerror(status) : "unexpected reply to health_request");
    if (p && sv->misses >= CPM_HEALTH_STAGE_MISSES)
        replica_down(h, p, sv);
    sv->reset_due |= !p && sv->misses == CPM_HEALTH_STAGE_MISSES;
    if (is_expert(h, sv) && sv->misses == CPM_HEALTH_STAGE_MISSES)
        expert_lost(h, sv, "stopped answering");
}

static void on_answer(cpm_health *h, cpm_svc *sv, replica *p, bool last_stage,
                      const Cpm__V1__Health *hr) {
    bool restarted = sv->incarnation && hr->incarnation && hr->incarnation != sv->incarnation;
    sv->incarnation = hr->incarnation;
    sv->reset_due |= restarted && !p; /* a tokenizer or sampler: its calls died with it */
    if (restarted && is_expert(h, sv))
        expert_lost(h, sv, "restarted");
    if (p && restarted && !p->down) {
        char why[160];
        snprintf(why, sizeof why, "pipeline stage %s restarted", sv->name);
        LOG(h, CPM_LOG_WARN, "%s: its rows in flight and caches are gone", why);
        h->hooks.replica_restarted(h->hooks.ud, (int)(p - h->replicas), why);
    }
    sv->misses = 0;
    sv->ready = hr->ready;
    snprintf(sv->status, sizeof sv->status, "%s", hr->status ? hr->status : "");
    sv->kv_used = (int)hr->kv_used;
    sv->kv_total = (int)hr->kv_total;
    if (p && !strcmp(sv->status, CPM_HEALTH_DRAINING))
        replica_down(h, p, sv);
    else if (p)
        replica_maybe_up(h, p);
    if (last_stage && hr->ready && hr->model)
        h->hooks.model_info(h->hooks.ud, hr->model);
}

static void on_health_reply(cpm_sock *s, cpm_inmsg *reply, int status, void *user) {
    (void)s;
    poll_ctx *pc = user;
    cpm_health *h = pc->h;
    cpm_svc *sv = &h->svcs[pc->i];
    replica *p = sv->replica >= 0 ? &h->replicas[sv->replica] : NULL;
    bool last_stage = p && p->stage_svc[p->n_stages - 1] == pc->i;
    uint64_t t0 = pc->t0;
    free(pc);
    sv->answered = true;
    /* while closing, the sockets are going and their calls end with CPM_ECLOSED */
    bool answered = status == 0 && reply->env->body_case == CPM__V1__ENVELOPE__BODY_HEALTH;
    if (!h->closing && answered) {
        sv->poll_s = (double)(uv_hrtime() - t0) / 1e9;
        on_answer(h, sv, p, last_stage, reply->env->health);
    }
    else if (!h->closing)
        on_missed(h, sv, p, status);
    cpm_inmsg_free(reply);
}

/* A tokenizer or sampler just reached the miss threshold, or answered as a new process:
 * its calls in flight end now
 * (CPM_ECLOSED), so their owners ask another replica instead of waiting out
 * router.timeout_ms, and a fresh connection waits for it to come back. The new
 * socket is in place before the old one goes, since its calls' owners may pick it. */
static void reset_socket(cpm_health *h, cpm_svc *sv) {
    cpm_sock *fresh = NULL, *old = sv->sock;
    cpm_error e = {0};
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = h->curve;
    if (cpm_sock_new(h->loop, h->zctx, ZMQ_DEALER, &so, on_unexpected, h, &fresh, &e) ||
        cpm_sock_connect(fresh, sv->endpoint, &e)) {
        LOG(h, CPM_LOG_ERROR, "%s: reconnecting: %s", sv->name, e.msg);
        cpm_sock_free(fresh);
        return;
    }
    LOG(h, CPM_LOG_WARN, "%s was lost (%s): its calls in flight go elsewhere", sv->name,
        sv->status);
    sv->sock = fresh;
    cpm_sock_free(old);
}

static void poll_all(cpm_health *h) {
    int timeout = h->interval_ms > 200 ? h->interval_ms - 100 : 100;
    for (int i = h->first_tok; i < h->first_sampler + h->n_samplers; i++)
        if (h->svcs[i].reset_due) {
            h->svcs[i].reset_due = false;
            reset_socket(h, &h->svcs[i]);
        }
    for (int i = 0; i < h->n_svcs; i++) {
        poll_ctx *pc = malloc(sizeof *pc);
        if (!pc)
            return;
        *pc = (poll_ctx){h, i, uv_hrtime()};
        Cpm__V1__HealthRequest hr = CPM__V1__HEALTH_REQUEST__INIT;
        Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
        env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST;
        env.health_request = &hr;
        if (cpm_sock_call(h->svcs[i].sock, &env, NULL, timeout, on_health_reply, pc, NULL) < 0)
            free(pc);
    }
}

static void on_timer(uv_timer_t *t) {
    poll_all(t->data);
}

void cpm_health_start(cpm_health *h) {
    uv_timer_start(&h->timer, on_timer, 0, (uint64_t)h->interval_ms);
}

/* ---- closing ---------------------------------------------------------------------------- */

static void on_timer_closed(uv_handle_t *t) {
    cpm_health *h = t->data;
    void (*done)(void *) = h->done;
    void *ud = h->done_ud;
    free(h);
    if (done)
        done(ud);
}

void cpm_health_close(cpm_health *h, void (*done)(void *ud), void *ud) {
    if (!h)
        return;
    h->closing = true;
    h->done = done;
    h->done_ud = ud;
    for (int i = 0; i < h->n_svcs; i++)
        cpm_sock_free(h->svcs[i].sock);
    uv_close((uv_handle_t *)&h->timer, on_timer_closed);
}
