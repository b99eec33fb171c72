/* router.h - cpm-router, the cluster's front door, as a library on one libuv loop.
 *
 * Ties the pieces together: HTTP (http.h) and the internal RPC (ZeroMQ ROUTER
 * speaking proto/cpm.proto Generate) take requests; openai.h validates them; a
 * cpm-tokenizer replica tokenizes the prompt once, at the door (tokclient.h);
 * scheduler.h packs sequences into micro-batches that go round the pipeline ring
 * (stage 0 -> ... -> last stage -> back here); logits go to a cpm-sampler; sampled
 * ids are detokenized incrementally by a cpm-tokenizer and go back to the client
 * as JSON or SSE. With `router: tokenize: off` no tokenizer is used (token ids in
 * and out only). main.c is a thin shell around this.
 *
 *   cpm_router *r;
 *   if (cpm_router_new(loop, zctx, cfg, &opts, &r, &e)) die(e.msg);
 *   if (cpm_router_start(r, &e)) die(e.msg);
 *   uv_run(loop, UV_RUN_DEFAULT);   // until cpm_router_close(r, ...)
 */
#ifndef CPM_ROUTER_H
#define CPM_ROUTER_H

#include <stdbool.h>
#include <uv.h>

#include "../services/common/config.h"
#include "../services/common/curve.h"
#include "../common/error.h"
#include "../services/common/log.h"

typedef struct cpm_router cpm_router;

typedef struct cpm_router_opts {
    int http_port;          /* -1: the config's; 0: any free port (see cpm_router_http_port) */
    const char *http_addr;  /* NULL: the config's */
    int health_interval_ms; /* how often back-end health is polled (default 1000) */
    const cpm_log *log;     /* may be NULL: no logging */
    const cpm_curve *curve; /* the fabric's keys (services/common/curve.h); NULL = plain text */
} cpm_router_opts;

cpm_router_opts cpm_router_opts_default(void);

/* cfg and opts->log are borrowed and must outlive the router. zctx is a zmq context. */
int cpm_router_new(uv_loop_t *loop, void *zctx, const cpm_config *cfg,
                   const cpm_router_opts *opts, cpm_router **ret, cpm_error *err);

/* Binds HTTP, the RPC and results endpoints, connects to the services, and starts
 * polling their health. Requests get 503 (and /ready too) until every stage, sampler
 * and tokenizer has answered ready. */
int cpm_router_start(cpm_router *r, cpm_error *err);

int cpm_router_http_port(const cpm_router *r);

bool cpm_router_ready(const cpm_router *r);

/* Graceful stop (SIGTERM): admits nothing new (requests get 503, /ready 503 at once, so a
 * load balancer stops sending), lets what runs finish for up to grace_ms, then closes as
 * cpm_router_close does (whatever is left gets its one final error). done(ud) as there.
 * A cpm_router_close during the drain ends it at once. */
void cpm_router_drain(cpm_router *r, int grace_ms, void (*done)(void *ud), void *ud);

/* Stops accepting, fails what is running (each request still gets its one final
 * answer), closes everything; done(ud) runs when all handles are closed and the
 * router is freed. r may be NULL. */
void cpm_router_close(cpm_router *r, void (*done)(void *ud), void *ud);

#endif
