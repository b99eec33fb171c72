/* server.c - ROUTER socket + libuv thread pool: the loop receives and sends, workers compute.
 *
 * Each request becomes a job (uv_queue_work); its after-callback sends the reply the
 * handler packed. The server object outlives cpm_server_free until its last job
 * returns, because libuv cannot cancel a job that is already running.
 */
#include "server.h"

#include <stdlib.h>
#include <string.h>

struct cpm_server {
    uv_loop_t *loop;
    cpm_sock *sock;
    cpm_server_opts opts;
    char service[64], name[64];
    cpm_server_stats stats;
    uint64_t started_ns;
    bool closing;
};

typedef struct job {
    uv_work_t work;
    cpm_server *srv;
    cpm_inmsg *in;
    cpm_reply out;
    cpm_error err;
    int rc;
} job;

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

static void destroy_if_done(cpm_server *s) {
    if (s->closing && s->stats.inflight == 0)
        free(s);
}

static void job_run(uv_work_t *w) {
    job *j = w->data;
    j->rc = j->srv->opts.handler(j->srv->opts.user, j->in, &j->out, &j->err);
    if (!j->rc && !j->out.env_buf)
        j->rc = cpm_error_set(&j->err, CPM_EINTERNAL, "handler gave no reply");
}

static void job_done(uv_work_t *w, int status) {
    job *j = w->data;
    cpm_server *s = j->srv;
    s->stats.inflight--;
    if (!s->closing) {
        uint64_t corr = j->in->env->corr;
        if (status == 0 && j->rc == 0) {
            cpm_payload *t = j->out.has_tensor ? &j->out.tensor : NULL;
            cpm_sock_send_packed(s->sock, &j->in->peer, j->out.env_buf, j->out.env_size, t, NULL);
            j->out.env_buf = NULL;
            j->out.has_tensor = false;
            s->stats.served++;
        } else {
            s->stats.failed++;
            cpm_sock_send_error(s->sock, &j->in->peer, corr, j->err.code ? j->err.code : CPM_EINTERNAL,
                                j->err.msg, NULL);
        }
    }
    reply_clear(&j->out);
    cpm_inmsg_free(j->in);
    free(j);
    destroy_if_done(s);
}

static void answer_health(cpm_server *s, cpm_inmsg *m) {
    Cpm__V1__Health h = CPM__V1__HEALTH__INIT;
    h.service = s->service;
    h.name = s->name;
    h.ready = true;
    h.status = "serving";
    h.queue_depth = (uint32_t)s->stats.inflight;
    h.uptime_s = (double)(uv_hrtime() - s->started_ns) / 1e9;
    if (s->opts.health)
        s->opts.health(s->opts.user, &h);
    cpm_envelope r = CPM__V1__ENVELOPE__INIT;
    r.corr = m->env->corr;
    r.body_case = CPM__V1__ENVELOPE__BODY_HEALTH;
    r.health = &h;
    cpm_sock_send(s->sock, &m->peer, &r, NULL, NULL);
}

static void answer_hello(cpm_server *s, cpm_inmsg *m) {
    Cpm__V1__Hello h = CPM__V1__HELLO__INIT;
    h.service = s->service;
    h.name = s->name;
    h.build = "cpm-cluster";
    cpm_envelope r = CPM__V1__ENVELOPE__INIT;
    r.corr = m->env->corr;
    r.body_case = CPM__V1__ENVELOPE__BODY_HELLO;
    r.hello = &h;
    cpm_sock_send(s->sock, &m->peer, &r, NULL, NULL);
}

static void on_msg(cpm_sock *sock, cpm_inmsg *m, void *user) {
    cpm_server *s = user;
    switch (m->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST:
        answer_health(s, m);
        cpm_inmsg_free(m);
        return;
    case CPM__V1__ENVELOPE__BODY_HELLO:
        answer_hello(s, m);
        cpm_inmsg_free(m);
        return;
    case CPM__V1__ENVELOPE__BODY_ERROR:
        cpm_inmsg_free(m); /* never answer an error with an error */
        return;
    default:
        break;
    }
    if (s->stats.inflight >= s->opts.max_inflight) {
        s->stats.refused++;
        cpm_sock_send_error(sock, &m->peer, m->env->corr, CPM_ELIMIT, "busy: too many requests in flight",
                            NULL);
        cpm_inmsg_free(m);
        return;
    }
    job *j = calloc(1, sizeof *j);
    if (!j) {
        cpm_sock_send_error(sock, &m->peer, m->env->corr, CPM_ENOMEM, "out of memory", NULL);
        cpm_inmsg_free(m);
        return;
    }
    j->srv = s;
    j->in = m;
    j->out.corr = m->env->corr;
    j->work.data = j;
    s->stats.inflight++;
    uv_queue_work(s->loop, &j->work, job_run, job_done);
}

static void on_bad(cpm_sock *sock, const cpm_error *err, void *user) {
    (void)sock;
    (void)err;
    cpm_server *s = user;
    s->stats.bad_messages++;
}

int cpm_server_new(uv_loop_t *loop, void *zctx, const char *endpoint, const cpm_server_opts *opts,
                   cpm_server **ret, cpm_error *err) {
    *ret = NULL;
    if (!opts->handler)
        return cpm_error_set(err, CPM_EINVAL, "server: no handler");
    cpm_server *s = calloc(1, sizeof *s);
    if (!s)
        return cpm_error_set(err, CPM_ENOMEM, "server");
    s->loop = loop;
    s->opts = *opts;
    if (s->opts.max_inflight <= 0)
        s->opts.max_inflight = 256;
    snprintf(s->service, sizeof s->service, "%s", opts->service ? opts->service : "");
    snprintf(s->name, sizeof s->name, "%s", opts->name ? opts->name : s->service);
    s->started_ns = uv_hrtime();
    int rc = cpm_sock_new(loop, zctx, ZMQ_ROUTER, opts->sock, on_msg, s, &s->sock, err);
    if (!rc) {
        cpm_sock_set_bad_cb(s->sock, on_bad);
        rc = cpm_sock_bind(s->sock, endpoint, err);
    }
    if (rc) {
        cpm_sock_free(s->sock);
        free(s);
        return rc;
    }
    *ret = s;
    return 0;
}

void cpm_server_get_stats(const cpm_server *s, cpm_server_stats *ret) {
    *ret = s->stats;
}

void cpm_server_free(cpm_server *s) {
    if (!s || s->closing)
        return;
    s->closing = true;
    cpm_sock_free(s->sock);
    s->sock = NULL;
    destroy_if_done(s);
}
