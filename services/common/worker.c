/* worker.c - the service skeleton (see worker.h): admission on the loop thread, jobs
 * on libuv's pool, replies sent from the loop.
 *
 * The job slots (max_running) and the queue are allocated with the worker, so a
 * request allocates nothing here. The worker outlives cpm_worker_free until its last
 * job and its load have returned, because libuv cannot cancel work that already runs.
 */
#include "worker.h"

#include "services/common/quota.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct job {
    uv_work_t work;
    cpm_worker *w;
    cpm_inmsg *in;           /* NULL: the slot is free */
    cpm_reply out;
    cpm_error err;
    int rc;
} job;

struct cpm_worker {
    uv_loop_t *loop;
    cpm_sock *sock;
    cpm_worker_opts opts;
    char service[64], name[64], what[64], full_msg[128];
    char status[CPM_ERROR_MSG_MAX + 16]; /* the last health reply's */
    job *jobs;               /* [max_running] */
    cpm_inmsg **q;           /* ring of max_running + max_queue waiting requests */
    cpm_quota *quota;        /* per-sender and total bounds on what they hold */
    int q_cap, q_head;
    uv_work_t load_work;
    int load_rc;
    cpm_error load_err;
    bool loading, ready, closing, draining;
    cpm_worker_stats stats;
    uint64_t started_ns;
    uint64_t incarnation; /* this process's, in every health reply */
};

int cpm_reply_set(cpm_reply *out, cpm_envelope *env, cpm_payload *tensor, cpm_error *err) {
    env->corr = out->corr;
    int rc = cpm_wire_pack(env, &out->env_buf, &out->env_size, err);
    if (rc) {
        if (tensor && tensor->free_fn)
            tensor->free_fn(tensor->data, tensor->hint);
        return rc;
    }
    if (tensor) {
        out->tensor = *tensor;
        out->has_tensor = true;
    }
    return 0;
}

static void reply_clear(cpm_reply *r) {
    free(r->env_buf);
    if (r->has_tensor && r->tensor.free_fn)
        r->tensor.free_fn(r->tensor.data, r->tensor.hint);
    memset(r, 0, sizeof *r);
}

/* ------------------------------------------------------------------ lifecycle */

static bool idle(const cpm_worker *w) {
    return w->stats.running == 0 && !w->loading;
}

/* The end, once freed and idle: the service releases its part, then the worker goes. */
static void finish(cpm_worker *w) {
    if (w->opts.ops->release)
        w->opts.ops->release(w->opts.user);
    for (int i = 0; i < w->stats.queued; i++)
        cpm_inmsg_free(w->q[(w->q_head + i) % w->q_cap]);
    cpm_quota_free(w->quota);
    free(w->q);
    free(w->jobs);
    free(w);
}

void cpm_worker_free(cpm_worker *w) {
    if (!w || w->closing)
        return;
    w->closing = true;
    cpm_sock_free(w->sock);
    w->sock = NULL;
    if (idle(w))
        finish(w);
}

void cpm_worker_drain(cpm_worker *w) {
    w->draining = true;
}

bool cpm_worker_busy(const cpm_worker *w) {
    return w->stats.running > 0 || w->stats.queued > 0 || w->loading;
}

void cpm_worker_get_stats(const cpm_worker *w, cpm_worker_stats *ret) {
    *ret = w->stats;
}

/* ------------------------------------------------------------------ jobs */

static void job_done(uv_work_t *work, int status);

/* What a request holds while it waits or runs: its envelope and tensor frame. */
static size_t held_bytes(const cpm_inmsg *m) {
    return cpm__v1__envelope__get_packed_size(m->env) + m->tensor_size;
}

static void job_run(uv_work_t *work) {
    job *j = work->data;
    cpm_worker *w = j->w;
    j->rc = w->opts.ops->run(w->opts.user, j->in, &j->out, &j->err);
    if (!j->rc && !j->out.env_buf && !w->opts.pipeline)
        j->rc = cpm_error_set(&j->err, CPM_EINTERNAL, "handler gave no reply");
}

static job *free_slot(cpm_worker *w) {
    for (int i = 0; i < w->opts.max_running; i++)
        if (!w->jobs[i].in)
            return &w->jobs[i];
    return NULL; /* not reached: running < max_running */
}

static void start_next(cpm_worker *w) {
    while (w->ready && !w->closing && w->stats.queued && w->stats.running < w->opts.max_running) {
        job *j = free_slot(w);
        j->in = w->q[w->q_head];
        w->q_head = (w->q_head + 1) % w->q_cap;
        w->stats.queued--;
        j->out = (cpm_reply){.corr = j->in->env->corr};
        j->err = (cpm_error){0};
        j->rc = 0;
        j->w = w;
        j->work.data = j;
        w->stats.running++;
        uv_queue_work(w->loop, &j->work, job_run, job_done);
    }
}

/* Sends a finished job's reply: back to its sender, or downstream in a pipeline. What
 * is not sent here, reply_clear drops. */
static void deliver(cpm_worker *w, job *j) {
    bool back = !w->opts.pipeline;
    cpm_sock *to = back ? w->sock : w->opts.downstream;
    if (w->closing || !to)
        return;
    if (j->out.env_buf) {
        cpm_payload *t = j->out.has_tensor ? &j->out.tensor : NULL;
        if (cpm_sock_send_packed(to, back ? &j->in->peer : NULL, j->out.env_buf, j->out.env_size, t,
                                 NULL))
            w->stats.undelivered++;
        j->out.env_buf = NULL; /* the send consumed both, whatever its outcome */
        j->out.has_tensor = false;
    } else if (j->rc && back) {
        cpm_sock_send_error(to, &j->in->peer, j->in->env->corr,
                            j->err.code ? j->err.code : CPM_EINTERNAL, j->err.msg, NULL);
    }
}

static void job_done(uv_work_t *work, int status) {
    job *j = work->data;
    cpm_worker *w = j->w;
    if (status && !j->rc)
        j->rc = cpm_error_set(&j->err, CPM_EINTERNAL, "job cancelled");
    deliver(w, j);
    if (j->rc)
        w->stats.failed++;
    else
        w->stats.served++;
    if (w->opts.ops->done)
        w->opts.ops->done(w->opts.user, j->in, j->rc);
    reply_clear(&j->out);
    cpm_quota_give(w->quota, &j->in->peer, held_bytes(j->in));
    cpm_inmsg_free(j->in);
    j->in = NULL;
    w->stats.running--;
    if (w->closing) {
        if (idle(w))
            finish(w);
        return;
    }
    start_next(w);
}

/* ------------------------------------------------------------------ loading */

static void load_run(uv_work_t *work) {
    cpm_worker *w = work->data;
    w->load_rc = w->opts.ops->load(w->opts.user, &w->load_err);
}

static void load_done(uv_work_t *work, int status) {
    cpm_worker *w = work->data;
    (void)status;
    if (!w->closing) {
        w->ready = w->load_rc == 0;
        if (w->opts.ops->loaded) /* loading stays true: a cpm_worker_free inside defers to us */
            w->opts.ops->loaded(w->opts.user, w->load_rc, &w->load_err);
    }
    w->loading = false;
    if (w->closing) {
        if (idle(w))
            finish(w);
        return;
    }
    start_next(w);
}

/* ------------------------------------------------------------------ the loop side */

/* The one place a service's health reply is made (the router's is its own). */
static void answer_health(cpm_worker *w, const cpm_inmsg *m) {
    Cpm__V1__Health h = CPM__V1__HEALTH__INIT;
    h.service = w->service;
    h.name = w->name;
    h.ready = w->ready && !w->draining;
    if (w->draining)
        snprintf(w->status, sizeof w->status, CPM_HEALTH_DRAINING);
    else if (w->loading)
        snprintf(w->status, sizeof w->status, "loading");
    else if (!w->ready)
        snprintf(w->status, sizeof w->status, "failed: %s", w->load_err.msg);
    else
        snprintf(w->status, sizeof w->status, "serving");
    h.status = w->status;
    h.queue_depth = (uint32_t)(w->stats.queued + w->stats.running);
    h.uptime_s = (double)(uv_hrtime() - w->started_ns) / 1e9;
    h.incarnation = w->incarnation;
    if (w->opts.ops->health)
        w->opts.ops->health(w->opts.user, &h);
    cpm_sock_send_health(w->sock, &m->peer, m->env->corr, &h, NULL);
}

static void refuse(cpm_worker *w, const cpm_inmsg *m, int code, const char *why) {
    w->stats.refused++;
    if (!w->opts.ops->refuse || !w->opts.ops->refuse(w->opts.user, m, code, why))
        cpm_sock_send_error(w->sock, &m->peer, m->env->corr, code, why, NULL);
}

/* Queues m as a job, or refuses it; true when the queue owns m now. */
static bool take_job(cpm_worker *w, cpm_inmsg *m) {
    if (!w->ready) {
        char why[128];
        snprintf(why, sizeof why, "%s %s", w->what, w->loading ? "is still loading" : "failed to load");
        refuse(w, m, CPM_EAGAIN, why);
        return false;
    }
    if (w->stats.running + w->stats.queued >= w->opts.max_running + w->opts.max_queue) {
        refuse(w, m, CPM_ELIMIT, w->full_msg);
        return false;
    }
    cpm_error e;
    if (cpm_quota_take(w->quota, &m->peer, held_bytes(m), &e)) {
        refuse(w, m, CPM_ELIMIT, e.msg);
        return false;
    }
    w->q[(w->q_head + w->stats.queued++) % w->q_cap] = m;
    start_next(w);
    return true;
}

static void on_msg(cpm_sock *s, cpm_inmsg *m, void *user) {
    cpm_worker *w = user;
    const cpm_worker_ops *ops = w->opts.ops;
    switch (m->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST:
        answer_health(w, m);
        break;
    case CPM__V1__ENVELOPE__BODY_ERROR:
        break; /* never answer an error with an error */
    default:
        if ((!ops->admit || ops->admit(w->opts.user, s, m)) && take_job(w, m))
            return;
        break;
    }
    cpm_inmsg_free(m);
}

static void on_bad(cpm_sock *s, const cpm_error *err, void *user) {
    (void)s;
    (void)err;
    cpm_worker *w = user;
    w->stats.bad_messages++;
}

/* ------------------------------------------------------------------ construction */

static void copy_names(cpm_worker *w, const cpm_worker_opts *o) {
    snprintf(w->service, sizeof w->service, "%s", o->service ? o->service : "");
    snprintf(w->name, sizeof w->name, "%s", o->name ? o->name : w->service);
    snprintf(w->what, sizeof w->what, "%s", o->what ? o->what : w->service);
    snprintf(w->full_msg, sizeof w->full_msg, "%s",
             o->full_msg ? o->full_msg : "busy: too many requests in flight");
    w->opts.service = w->service;
    w->opts.name = w->name;
    w->opts.what = w->what;
    w->opts.full_msg = w->full_msg;
    w->opts.sock = NULL; /* used once, below */
}

int cpm_worker_new(uv_loop_t *loop, void *zctx, const char *endpoint, const cpm_worker_opts *opts,
                   cpm_worker **ret, cpm_error *err) {
    *ret = NULL;
    if (!opts->ops || !opts->ops->run || opts->max_running < 1 || opts->max_queue < 0 ||
        opts->max_queue > INT32_MAX - opts->max_running)
        return cpm_error_set(err, CPM_EINVAL, "worker: needs a run hook, max_running >= 1 and "
                             "max_queue >= 0 (got %d and %d)", opts->max_running, opts->max_queue);
    cpm_worker *w = calloc(1, sizeof *w);
    int qrc = CPM_ENOMEM;
    if (w) {
        w->q_cap = opts->max_running + opts->max_queue;
        w->jobs = calloc((size_t)opts->max_running, sizeof *w->jobs);
        w->q = calloc((size_t)w->q_cap, sizeof *w->q);
        qrc = cpm_quota_new(w->q_cap, opts->max_bytes ? opts->max_bytes : (size_t)1 << 30,
                            opts->peer_pct ? opts->peer_pct : 75, &w->quota, err);
    }
    if (!w || !w->jobs || !w->q || qrc) {
        if (w) {
            free(w->jobs);
            free(w->q);
            cpm_quota_free(w->quota);
        }
        free(w);
        if (qrc && qrc != CPM_ENOMEM)
            return qrc; /* err says why */
        return cpm_error_set(err, CPM_ENOMEM, "worker: %d jobs", opts->max_running);
    }
    w->loop = loop;
    w->opts = *opts;
    copy_names(w, opts);
    w->started_ns = uv_hrtime();
    w->incarnation = (w->started_ns * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)getpid() << 32) ^
                     (uint64_t)(uintptr_t)w;
    int rc = cpm_sock_new(loop, zctx, ZMQ_ROUTER, opts->sock, on_msg, w, &w->sock, err);
    if (!rc) {
        cpm_sock_set_bad_cb(w->sock, on_bad);
        rc = cpm_sock_bind(w->sock, endpoint, err);
    }
    if (rc) {
        cpm_sock_free(w->sock);
        cpm_quota_free(w->quota);
        free(w->jobs);
        free(w->q);
        free(w);
        return rc;
    }
    w->ready = !opts->ops->load;
    if (opts->ops->load) {
        w->loading = true;
        w->load_work.data = w;
        uv_queue_work(loop, &w->load_work, load_run, load_done);
    }
    *ret = w;
    return 0;
}
