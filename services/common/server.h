/* server.h - the request/reply skeleton of the stateless services (tokenizer, sampler).
 *
 * Binds one ROUTER socket, answers health and hello itself, and runs every other
 * request's handler on libuv's thread pool (the loop thread never computes); the
 * handler packs its reply there and the loop only sends bytes. Requests beyond
 * max_inflight are refused with CPM_ELIMIT ("busy") so callers can go elsewhere.
 * A cpm_worker (worker.h) with every request running at once, plus hello.
 *
 *   static int handle(void *svc, const cpm_inmsg *in, cpm_reply *out, cpm_error *e) {
 *       Cpm__V1__Envelope r = CPM__V1__ENVELOPE__INIT; ... fill r ...
 *       return cpm_reply_set(out, &r, NULL, e);
 *   }
 *   cpm_server_opts o = {.service = "sampler", .name = "sampler0", .handler = handle, .user = svc};
 *   cpm_server_new(loop, zctx, "tcp://127.0.0.1:5570", &o, &srv, &e);
 */
#ifndef CPM_SERVER_H
#define CPM_SERVER_H

#include "services/common/worker.h"

typedef struct cpm_server cpm_server;

/* Runs on a worker thread. Returns 0 with *out set, or an error code with err filled:
 * the server then replies Envelope{error} with that code and message. in is read-only. */
typedef int (*cpm_server_handler)(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err);

/* Runs on the loop thread when a health request comes: adds service-specific fields. */
typedef void (*cpm_server_health_fn)(void *user, Cpm__V1__Health *h);

typedef struct cpm_server_opts {
    const char *service;            /* role ("sampler"); borrowed */
    const char *name;               /* instance ("sampler0"); borrowed */
    int max_inflight;               /* queued + running requests (default 256) */
    cpm_server_handler handler;
    cpm_server_health_fn health;    /* may be NULL */
    void *user;
    const cpm_sock_opts *sock;      /* may be NULL */
} cpm_server_opts;

/* Binds endpoint and starts serving on loop. *ret is freed with cpm_server_free. */
int cpm_server_new(uv_loop_t *loop, void *zctx, const char *endpoint, const cpm_server_opts *opts,
                   cpm_server **ret, cpm_error *err);

typedef struct cpm_server_stats {
    uint64_t served, failed, refused, bad_messages;
    int inflight;
} cpm_server_stats;

void cpm_server_get_stats(const cpm_server *s, cpm_server_stats *ret);

/* Stops taking requests; replies of running handlers are dropped. The memory is
 * released once those handlers finish and the loop has run. Accepts NULL. */
/* Graceful stop (SIGTERM): health says "draining" (not ready) while accepted work
 * finishes; cpm_server_busy says whether any is left. */
void cpm_server_drain(cpm_server *s);
bool cpm_server_busy(const cpm_server *s);

void cpm_server_free(cpm_server *s);

#endif
