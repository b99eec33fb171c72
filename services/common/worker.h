/* worker.h - the skeleton of every service: one ROUTER socket on the loop thread, a
 * bounded FIFO of requests, jobs on libuv's thread pool, health answered here.
 *
 * A service fills a cpm_worker_ops with what is its own (loading a model, running one
 * request, extra health fields) and the worker does the rest: it answers health,
 * drops errors, refuses work while loading or when full, runs at most max_running
 * jobs at once (1: strictly in arrival order, as a stage's KV cache needs) with up to
 * max_queue waiting behind them, and sends each job's reply from the loop thread.
 * Used by shard/stage.c, shard/expert.c and services/common/server.c.
 *
 *   static const cpm_worker_ops ops = {.run = handle};
 *   cpm_worker_opts o = {.service = "sampler", .name = "sampler0", .max_running = 256,
 *                        .ops = &ops, .user = svc};
 *   cpm_worker_new(loop, zctx, "tcp://127.0.0.1:5570", &o, &w, &e);
 *
 * Threads: ops.load and ops.run run on a pool thread, every other hook on the loop
 * thread. With max_running = 1 the job's hand-over (ops.done) is the point where the
 * loop may read what the job wrote.
 */
#ifndef CPM_WORKER_H
#define CPM_WORKER_H

#include "services/common/transport.h"

typedef struct cpm_worker cpm_worker;

/* A reply built on a worker thread: the packed Envelope and an optional tensor frame. */
typedef struct cpm_reply {
    uint64_t corr;       /* the request's, set by the worker; cpm_reply_set copies it into env */
    uint8_t *env_buf;
    size_t env_size;
    cpm_payload tensor;
    bool has_tensor;
} cpm_reply;

/* Packs env as the reply (env->corr is set to out->corr) plus an optional tensor (consumed). */
int cpm_reply_set(cpm_reply *out, cpm_envelope *env, cpm_payload *tensor, cpm_error *err);

typedef struct cpm_worker_ops {
    /* Pool thread, once, before any job (a model load). NULL: ready at once. */
    int (*load)(void *user, cpm_error *err);
    /* Loop thread, once, after load with its result (not when freed meanwhile). May be NULL. */
    void (*loaded)(void *user, int rc, const cpm_error *err);
    /* Loop thread: whether m (neither a health request nor an error) is a job. When not,
     * the hook answers it on s if it wants; the worker frees m. NULL: every body is one. */
    bool (*admit)(void *user, cpm_sock *s, const cpm_inmsg *m);
    /* Pool thread: runs one job; in is read-only. Returns 0 with out set, or an error with
     * err filled: unless the hook packed a reply of its own into out, the sender gets
     * Envelope{error} with that code and message. Required. */
    int (*run)(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err);
    /* Loop thread, after the reply went out (or was dropped: freed meanwhile); rc is run's
     * result. May be NULL. */
    void (*done)(void *user, const cpm_inmsg *in, int rc);
    /* Loop thread: a job refused (code CPM_EAGAIN while loading, CPM_ELIMIT when full).
     * Returns whether it answered; if not (or NULL) the sender gets Envelope{error}
     * with code and why, its corr echoed. */
    bool (*refuse)(void *user, const cpm_inmsg *m, int code, const char *why);
    /* Loop thread: adds the service's fields to a health reply whose service, name, ready,
     * status, queue_depth and uptime_s are set. The worker packs h after the hook returns,
     * so what the hook points h at lives in the service's struct. May be NULL. */
    void (*health)(void *user, Cpm__V1__Health *h);
    /* Loop thread, once, when cpm_worker_free was called and no job nor load runs any
     * more: the service frees what the jobs used. May be NULL. */
    void (*release)(void *user);
} cpm_worker_ops;

typedef struct cpm_worker_opts {
    const char *service;      /* role in health ("stage"); copied */
    const char *name;         /* instance ("stage1"); copied; NULL: the service */
    const char *what;         /* refusals while loading: "<what> is still loading" (default: service) */
    const char *full_msg;     /* refusal when full (default "busy: too many requests in flight") */
    int max_running;          /* jobs at once (>= 1) */
    int max_queue;            /* jobs waiting behind them (>= 0) */
    size_t max_bytes;         /* bytes held by queued + running jobs (0: 1 GiB) */
    int peer_pct;             /* share of either bound one sender may hold (0: 75 %, see
                               * services/common/quota.h) */
    bool pipeline;            /* false: each reply goes back to its sender. true (a stage):
                               * replies go to downstream when it is set, else nowhere, and a
                               * job that fails without packing a reply sends nothing */
    cpm_sock *downstream;     /* with pipeline: the next hop (a DEALER); borrowed, see
                               * cpm_worker_free */
    const cpm_sock_opts *sock; /* may be NULL */
    const cpm_worker_ops *ops; /* borrowed, must outlive the worker */
    void *user;
} cpm_worker_opts;

/* Binds endpoint and starts serving on loop; starts ops.load on the pool first when set.
 * *ret is freed with cpm_worker_free. */
int cpm_worker_new(uv_loop_t *loop, void *zctx, const char *endpoint, const cpm_worker_opts *opts,
                   cpm_worker **ret, cpm_error *err);

typedef struct cpm_worker_stats {
    unsigned long long served, failed;  /* jobs whose run returned 0 / an error */
    unsigned long long refused;         /* jobs turned away (loading, failed to load, full) */
    unsigned long long undelivered;     /* replies the socket would not take */
    unsigned long long bad_messages;    /* inbound messages that failed validation */
    int running, queued;
} cpm_worker_stats;

void cpm_worker_get_stats(const cpm_worker *w, cpm_worker_stats *ret);

/* Graceful stop, first step: health says not ready ("draining"); requests that still come
 * are served (the router notices at its next poll). */
void cpm_worker_drain(cpm_worker *w);

/* Work accepted and not finished (running, queued, or the load). */
bool cpm_worker_busy(const cpm_worker *w);

/* Stops taking requests (the ROUTER closes now); replies of running jobs are dropped.
 * ops.release runs, and the worker's memory goes, once no job nor load runs: at once
 * if none does (inside this call). After this call the worker sends nothing, so the
 * caller may free a downstream socket. Accepts NULL. */
void cpm_worker_free(cpm_worker *w);

#endif
