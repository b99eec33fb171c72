/* server.c - the stateless services' skeleton: a cpm_worker whose requests all run at
 * once (up to max_inflight, none waiting), plus the hello handshake.
 *
 * The server object outlives cpm_server_free until its last job returns: the worker
 * calls release then, because libuv cannot cancel a job that is already running.
 */
#include "server.h"

#include <stdio.h>
#include <stdlib.h>

struct cpm_server {
    cpm_worker *w;
    cpm_server_opts opts;
    char service[64], name[64];
    bool closing;
};

static int server_run(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err) {
    cpm_server *s = user;
    return s->opts.handler(s->opts.user, in, out, err);
}

static void answer_hello(cpm_server *s, cpm_sock *sock, const cpm_inmsg *m) {
    Cpm__V1__Hello h = CPM__V1__HELLO__INIT;
    h.service = s->service;
    h.name = s->name;
    h.build = "cpm-cluster";
    cpm_envelope r = CPM__V1__ENVELOPE__INIT;
    r.corr = m->env->corr;
    r.body_case = CPM__V1__ENVELOPE__BODY_HELLO;
    r.hello = &h;
    cpm_sock_send(sock, &m->peer, &r, NULL, NULL);
}

/* Every body but hello is a request; the handler refuses those it does not know. */
static bool server_admit(void *user, cpm_sock *sock, const cpm_inmsg *m) {
    if (m->env->body_case != CPM__V1__ENVELOPE__BODY_HELLO)
        return true;
    answer_hello(user, sock, m);
    return false;
}

static void server_health(void *user, Cpm__V1__Health *h) {
    cpm_server *s = user;
    if (s->opts.health)
        s->opts.health(s->opts.user, h);
}

static void server_release(void *user) {
    free(user);
}

static const cpm_worker_ops server_ops = {
    .admit = server_admit,
    .run = server_run,
    .health = server_health,
    .release = server_release,
};

int cpm_server_new(uv_loop_t *loop, void *zctx, const char *endpoint, const cpm_server_opts *opts,
                   cpm_server **ret, cpm_error *err) {
    *ret = NULL;
    if (!opts->handler)
        return cpm_error_set(err, CPM_EINVAL, "server: no handler");
    cpm_server *s = calloc(1, sizeof *s);
    if (!s)
        return cpm_error_set(err, CPM_ENOMEM, "server");
    s->opts = *opts;
    snprintf(s->service, sizeof s->service, "%s", opts->service ? opts->service : "");
    snprintf(s->name, sizeof s->name, "%s", opts->name ? opts->name : s->service);
    cpm_worker_opts wo = {
        .service = s->service,
        .name = s->name,
        .max_running = opts->max_inflight > 0 ? opts->max_inflight : 256,
        .sock = opts->sock,
        .ops = &server_ops,
        .user = s,
    };
    int rc = cpm_worker_new(loop, zctx, endpoint, &wo, &s->w, err);
    if (rc) {
        free(s);
        return rc;
    }
    *ret = s;
    return 0;
}

void cpm_server_get_stats(const cpm_server *s, cpm_server_stats *ret) {
    cpm_worker_stats w;
    cpm_worker_get_stats(s->w, &w);
    *ret = (cpm_server_stats){.served = w.served, .failed = w.failed, .refused = w.refused,
                              .bad_messages = w.bad_messages, .inflight = w.running + w.queued};
}

void cpm_server_drain(cpm_server *s) {
    cpm_worker_drain(s->w);
}

bool cpm_server_busy(const cpm_server *s) {
    return cpm_worker_busy(s->w);
}

void cpm_server_free(cpm_server *s) {
    if (!s || s->closing)
        return;
    s->closing = true;
    cpm_worker_free(s->w); /* releases s once no handler runs */
}
