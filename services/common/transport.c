/* transport.c - zmq sockets on a libuv loop: drain, validate, dispatch; queue when full.
 *
 * The zmq fd only signals edges, so every wake-up (poll, or the "kick" timer armed
 * after our own sends, which may swallow an edge) loops on ZMQ_EVENTS until there is
 * nothing to read and nothing more that can be written.
 */
#include "transport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/frames.h"

static void free_aligned(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* Moves a received tensor frame into m. zmq delivers small frames in place
 * inside its receive buffer, at any byte offset; every reader of a tensor reads
 * floats, so a frame that is not 64-byte aligned is copied once into an aligned
 * buffer the message then owns. Large frames arrive in their own allocation
 * and are kept without a copy. */
static int take_tensor(cpm_inmsg *m, zmq_msg_t *frame) {
    zmq_msg_move(&m->tensor_msg, frame);
    m->tensor = zmq_msg_data(&m->tensor_msg);
    m->tensor_size = zmq_msg_size(&m->tensor_msg);
    if (((uintptr_t)m->tensor & 63u) == 0 || m->tensor_size == 0)
        return 0;
    void *copy = aligned_alloc(64, (m->tensor_size + 63) & ~(size_t)63);
    if (!copy)
        return -1;
    memcpy(copy, m->tensor, m->tensor_size);
    zmq_msg_close(&m->tensor_msg);
    zmq_msg_init_data(&m->tensor_msg, copy, m->tensor_size, free_aligned, NULL);
    m->tensor = copy;
    return 0;
}
#define KICK_RETRY_MS 10

typedef struct outmsg {
    struct outmsg *next;
    int n;
    zmq_msg_t frames[CPM_FRAMES_MAX]; /* identity, envelope, tensor */
} outmsg;

typedef struct call {
    struct call *next;
    uint64_t corr;
    uint64_t deadline; /* uv_now() ms */
    cpm_sock_reply_cb cb;
    void *user;
} call;

struct cpm_sock {
    uv_loop_t *loop;
    void *z;
    int type;
    cpm_sock_opts opts;
    cpm_sock_msg_cb on_msg;
    cpm_sock_bad_cb on_bad;
    void *user;
    uv_poll_t poll;
    uv_timer_t kick;      /* re-check ZMQ_EVENTS after our own sends; retry full queues */
    uv_timer_t deadlines; /* earliest pending call's timeout */
    int open_handles;
    bool closing;
    outmsg *q_head, *q_tail;
    int q_len;
    call *calls;
    uint64_t next_corr;
};

cpm_sock_opts cpm_sock_opts_default(void) {
    return (cpm_sock_opts){
        .max_msg_size = 256ll << 20,
        .sndhwm = 1000,
        .rcvhwm = 1000,
        .linger_ms = 200,
        .max_queue = 4096,
        .identity = NULL,
    };
}

void cpm_inmsg_free(cpm_inmsg *m) {
    if (!m)
        return;
    cpm_wire_free(m->env);
    zmq_msg_close(&m->tensor_msg);
    free(m);
}

static int zerr(cpm_error *err, const char *what) {
    int e = zmq_errno();
    int code = e == EAGAIN ? CPM_EAGAIN : e == EHOSTUNREACH ? CPM_ECLOSED : CPM_EIO;
    return cpm_error_set(err, code, "%s: %s", what, zmq_strerror(e));
}

/* ------------------------------------------------------------------ lifecycle */

static void on_poll(uv_poll_t *h, int status, int events);
static void on_kick(uv_timer_t *t);
static void on_deadline(uv_timer_t *t);

static int set_opts(void *z, int type, const cpm_sock_opts *o, cpm_error *err) {
    int one = 1;
    if (zmq_setsockopt(z, ZMQ_MAXMSGSIZE, &o->max_msg_size, sizeof o->max_msg_size) ||
        zmq_setsockopt(z, ZMQ_SNDHWM, &o->sndhwm, sizeof o->sndhwm) ||
        zmq_setsockopt(z, ZMQ_RCVHWM, &o->rcvhwm, sizeof o->rcvhwm) ||
        zmq_setsockopt(z, ZMQ_LINGER, &o->linger_ms, sizeof o->linger_ms))
        return zerr(err, "zmq_setsockopt");
    /* Without MANDATORY a ROUTER silently drops messages to unknown or full peers. */
    if (type == ZMQ_ROUTER && zmq_setsockopt(z, ZMQ_ROUTER_MANDATORY, &one, sizeof one))
        return zerr(err, "ZMQ_ROUTER_MANDATORY");
    if (o->identity && zmq_setsockopt(z, ZMQ_ROUTING_ID, o->identity, strlen(o->identity)))
        return zerr(err, "ZMQ_ROUTING_ID");
    return 0;
}

int cpm_sock_new(uv_loop_t *loop, void *zctx, int type, const cpm_sock_opts *opts,
                 cpm_sock_msg_cb on_msg, void *user, cpm_sock **ret, cpm_error *err) {
    *ret = NULL;
    cpm_sock *s = calloc(1, sizeof *s);
    if (!s)
        return cpm_error_set(err, CPM_ENOMEM, "socket");
    s->loop = loop;
    s->type = type;
    s->opts = opts ? *opts : cpm_sock_opts_default();
    s->on_msg = on_msg;
    s->user = user;
    s->next_corr = 1;
    s->z = zmq_socket(zctx, type);
    if (!s->z) {
        free(s);
        return zerr(err, "zmq_socket");
    }
    int fd;
    size_t fdlen = sizeof fd;
    int rc = set_opts(s->z, type, &s->opts, err);
    if (!rc && zmq_getsockopt(s->z, ZMQ_FD, &fd, &fdlen))
        rc = zerr(err, "ZMQ_FD");
    if (!rc && uv_poll_init_socket(loop, &s->poll, fd))
        rc = cpm_error_set(err, CPM_EIO, "uv_poll_init_socket failed");
    if (rc) {
        zmq_close(s->z);
        free(s);
        return rc;
    }
    uv_timer_init(loop, &s->kick);
    uv_timer_init(loop, &s->deadlines);
    s->poll.data = s->kick.data = s->deadlines.data = s;
    s->open_handles = 3;
    uv_poll_start(&s->poll, UV_READABLE, on_poll);
    *ret = s;
    return 0;
}

void cpm_sock_set_bad_cb(cpm_sock *s, cpm_sock_bad_cb cb) {
    s->on_bad = cb;
}

static void kick_soon(cpm_sock *s, uint64_t ms) {
    if (!s->closing)
        uv_timer_start(&s->kick, on_kick, ms, 0);
}

void cpm_endpoint_listen(const char *endpoint, char *out, size_t size) {
    const char *colon = strrchr(endpoint, ':');
    size_t hl = colon && !strncmp(endpoint, "tcp://", 6) ? (size_t)(colon - endpoint - 6) : 0;
    char host[256];
    unsigned char addr[16];
    if (hl == 0 || hl >= sizeof host) {
        snprintf(out, size, "%s", endpoint);
        return;
    }
    memcpy(host, endpoint + 6, hl);
    host[hl] = '\0';
    if (!strcmp(host, "localhost"))
        snprintf(out, size, "tcp://127.0.0.1%s", colon);
    else if (inet_pton(AF_INET, host, addr) == 1 || host[0] == '[' || !strcmp(host, "*"))
        snprintf(out, size, "%s", endpoint);
    else
        snprintf(out, size, "tcp://*%s", colon);
}

int cpm_sock_dial_opts(void *zsock, const cpm_curve *curve, cpm_error *err) {
    int connect_ms = CPM_SOCK_CONNECT_MS, ivl = CPM_SOCK_HEARTBEAT_MS,
        timeout = 3 * CPM_SOCK_HEARTBEAT_MS;
    if (zmq_setsockopt(zsock, ZMQ_CONNECT_TIMEOUT, &connect_ms, sizeof connect_ms) ||
        zmq_setsockopt(zsock, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl) ||
        zmq_setsockopt(zsock, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout))
        return zerr(err, "connect options");
    return cpm_sock_secure(zsock, curve, false, NULL, err);
}

int cpm_sock_secure(void *zsock, const cpm_curve *curve, bool listen, const char *admit,
                    cpm_error *err) {
    if (!curve)
        return 0;
    return listen ? cpm_curve_listen(curve, zsock, admit ? admit : CPM_CURVE_FABRIC, err)
                  : cpm_curve_dial(curve, zsock, err);
}

int cpm_sock_bind(cpm_sock *s, const char *endpoint, cpm_error *err) {
    char local[512];
    cpm_endpoint_listen(endpoint, local, sizeof local);
    int rc = cpm_sock_secure(s->z, s->opts.curve, true, s->opts.admit, err);
    if (rc)
        return rc;
    if (zmq_bind(s->z, local))
        return cpm_error_set(err, CPM_EIO, "bind %s: %s", local, zmq_strerror(zmq_errno()));
    kick_soon(s, 0);
    return 0;
}

int cpm_sock_connect(cpm_sock *s, const char *endpoint, cpm_error *err) {
    int rc = cpm_sock_dial_opts(s->z, s->opts.curve, err);
    if (rc)
        return rc;
    if (zmq_connect(s->z, endpoint))
        return cpm_error_set(err, CPM_EIO, "connect %s: %s", endpoint, zmq_strerror(zmq_errno()));
    kick_soon(s, 0);
    return 0;
}

void *cpm_sock_zmq(cpm_sock *s) {
    return s->z;
}

int cpm_sock_queued(const cpm_sock *s) {
    return s->q_len;
}

static void outmsg_free(outmsg *o) {
    for (int i = 0; i < o->n; i++)
        zmq_msg_close(&o->frames[i]);
    free(o);
}

static void on_closed(uv_handle_t *h) {
    cpm_sock *s = h->data;
    if (--s->open_handles == 0)
        free(s);
}

void cpm_sock_free(cpm_sock *s) {
    if (!s || s->closing)
        return;
    s->closing = true;
    while (s->calls) {
        call *c = s->calls;
        s->calls = c->next;
        c->cb(s, NULL, CPM_ECLOSED, c->user);
        free(c);
    }
    while (s->q_head) {
        outmsg *o = s->q_head;
        s->q_head = o->next;
        outmsg_free(o);
    }
    uv_poll_stop(&s->poll);
    zmq_close(s->z);
    s->z = NULL;
    uv_close((uv_handle_t *)&s->poll, on_closed);
    uv_close((uv_handle_t *)&s->kick, on_closed);
    uv_close((uv_handle_t *)&s->deadlines, on_closed);
}

/* ------------------------------------------------------------------ sending */

static void free_buf(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* Builds the frames of one message from a packed envelope (buf, consumed) or env;
 * consumes tensor. */
static int build_packed(outmsg *o, const cpm_peer *peer, uint8_t *buf, size_t size,
                        cpm_envelope *env, cpm_payload *tensor, cpm_error *err) {
    int rc = 0;
    o->n = 0;
    if (peer) {
        zmq_msg_init_size(&o->frames[o->n], peer->len);
        memcpy(zmq_msg_data(&o->frames[o->n]), peer->id, peer->len);
        o->n++;
    }
    if (!buf && (rc = cpm_wire_pack(env, &buf, &size, err)))
        goto out_payload;
    zmq_msg_init_data(&o->frames[o->n++], buf, size, free_buf, NULL);
    if (tensor) {
        zmq_msg_t *f = &o->frames[o->n++];
        if (tensor->free_fn) {
            zmq_msg_init_data(f, tensor->data, tensor->size, tensor->free_fn, tensor->hint);
            tensor->free_fn = NULL; /* zmq owns it now */
        } else {
            zmq_msg_init_size(f, tensor->size);
            memcpy(zmq_msg_data(f), tensor->data, tensor->size);
        }
    }
out_payload:
    if (tensor && tensor->free_fn) {
        tensor->free_fn(tensor->data, tensor->hint);
        tensor->free_fn = NULL;
    }
    return rc;
}

/* Tries to hand one message to zmq without blocking. A multipart message is atomic:
 * only its first frame can meet EAGAIN. Returns 0, CPM_EAGAIN, or an error. */
static int try_send(cpm_sock *s, outmsg *o, cpm_error *err) {
    for (int i = 0; i < o->n; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < o->n ? ZMQ_SNDMORE : 0);
        if (zmq_msg_send(&o->frames[i], s->z, flags) < 0) {
            if (i == 0)
                return zerr(err, "send");
            return zerr(err, "send (part)"); /* should not happen: zmq queued the first part */
        }
    }
    o->n = 0; /* zmq_msg_send took ownership of every frame */
    return 0;
}

static int build(outmsg *o, const cpm_peer *peer, cpm_envelope *env, cpm_payload *tensor,
                 cpm_error *err) {
    return build_packed(o, peer, NULL, 0, env, tensor, err);
}

static int flush_queue(cpm_sock *s) {
    int sent = 0;
    while (s->q_head) {
        int rc = try_send(s, s->q_head, NULL);
        if (rc == CPM_EAGAIN)
            break;
        outmsg *o = s->q_head; /* sent, or failed for good (peer gone): drop either way */
        s->q_head = o->next;
        if (!s->q_head)
            s->q_tail = NULL;
        s->q_len--;
        outmsg_free(o);
        sent++;
    }
    if (s->q_head)
        kick_soon(s, KICK_RETRY_MS);
    return sent;
}

static int send_built(cpm_sock *s, const cpm_peer *peer, uint8_t *buf, size_t size,
                      cpm_envelope *env, cpm_payload *tensor, cpm_error *err) {
    if (s->closing) {
        free(buf);
        if (tensor && tensor->free_fn)
            tensor->free_fn(tensor->data, tensor->hint);
        return cpm_error_set(err, CPM_ECLOSED, "send on a closed socket");
    }
    outmsg *o = calloc(1, sizeof *o);
    if (!o) {
        free(buf);
        if (tensor && tensor->free_fn)
            tensor->free_fn(tensor->data, tensor->hint);
        return cpm_error_set(err, CPM_ENOMEM, "send");
    }
    int rc = build_packed(o, s->type == ZMQ_ROUTER ? peer : NULL, buf, size, env, tensor, err);
    if (!rc && !s->q_head)
        rc = try_send(s, o, err);
    else if (!rc)
        rc = CPM_EAGAIN; /* keep order behind what is already queued */
    if (rc == CPM_EAGAIN) {
        if (s->q_len >= s->opts.max_queue) {
            outmsg_free(o);
            return cpm_error_set(err, CPM_ELIMIT, "send queue full (%d messages)", s->q_len);
        }
        if (s->q_tail)
            s->q_tail->next = o;
        else
            s->q_head = o;
        s->q_tail = o;
        s->q_len++;
        kick_soon(s, KICK_RETRY_MS);
        return 0;
    }
    outmsg_free(o);
    kick_soon(s, 0); /* our send may have consumed the fd's edge */
    return rc;
}

int cpm_sock_send(cpm_sock *s, const cpm_peer *peer, cpm_envelope *env, cpm_payload *tensor,
                  cpm_error *err) {
    return send_built(s, peer, NULL, 0, env, tensor, err);
}

int cpm_sock_send_packed(cpm_sock *s, const cpm_peer *peer, uint8_t *buf, size_t size,
                         cpm_payload *tensor, cpm_error *err) {
    return send_built(s, peer, buf, size, NULL, tensor, err);
}

int cpm_sock_send_error(cpm_sock *s, const cpm_peer *peer, uint64_t corr, int code,
                        const char *msg, cpm_error *err) {
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    Cpm__V1__Error e = CPM__V1__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    env.corr = corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_ERROR;
    env.error = &e;
    return cpm_sock_send(s, peer, &env, NULL, err);
}

int cpm_sock_send_health(cpm_sock *s, const cpm_peer *peer, uint64_t corr, Cpm__V1__Health *h,
                         cpm_error *err) {
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH;
    env.health = h;
    return cpm_sock_send(s, peer, &env, NULL, err);
}

/* ------------------------------------------------------------------ calls with timeout */

static void rearm_deadlines(cpm_sock *s) {
    if (s->closing)
        return;
    if (!s->calls) {
        uv_timer_stop(&s->deadlines);
        return;
    }
    uint64_t first = UINT64_MAX;
    for (call *c = s->calls; c; c = c->next)
        if (c->deadline < first)
            first = c->deadline;
    uint64_t now = uv_now(s->loop);
    uv_timer_start(&s->deadlines, on_deadline, first > now ? first - now : 0, 0);
}

static void on_deadline(uv_timer_t *t) {
    cpm_sock *s = t->data;
    uint64_t now = uv_now(s->loop);
    call **pp = &s->calls;
    while (*pp && !s->closing) {
        call *c = *pp;
        if (c->deadline > now) {
            pp = &c->next;
            continue;
        }
        *pp = c->next;
        c->cb(s, NULL, CPM_ETIMEDOUT, c->user);
        free(c);
        pp = &s->calls; /* the callback may have added or completed calls */
    }
    rearm_deadlines(s);
}

int cpm_sock_call(cpm_sock *s, cpm_envelope *env, cpm_payload *tensor, int timeout_ms,
                  cpm_sock_reply_cb cb, void *user, cpm_error *err) {
    call *c = calloc(1, sizeof *c);
    if (!c) {
        if (tensor && tensor->free_fn)
            tensor->free_fn(tensor->data, tensor->hint);
        return cpm_error_set(err, CPM_ENOMEM, "call");
    }
    env->corr = s->next_corr++;
    int rc = cpm_sock_send(s, NULL, env, tensor, err);
    if (rc) {
        free(c);
        return rc;
    }
    c->corr = env->corr;
    c->deadline = uv_now(s->loop) + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    c->cb = cb;
    c->user = user;
    c->next = s->calls;
    s->calls = c;
    rearm_deadlines(s);
    return 0;
}

/* Hands m to the pending call it answers, if any. */
static bool complete_call(cpm_sock *s, cpm_inmsg *m) {
    for (call **pp = &s->calls; *pp; pp = &(*pp)->next) {
        call *c = *pp;
        if (c->corr != m->env->corr)
            continue;
        *pp = c->next;
        c->cb(s, m, 0, c->user);
        free(c);
        rearm_deadlines(s);
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------ receiving */

static void report_bad(cpm_sock *s, const cpm_peer *peer, uint64_t corr, bool reply,
                       const cpm_error *e) {
    /* Only servers answer garbage; a client answering a server could ping-pong forever. */
    if (reply && s->type == ZMQ_ROUTER && peer && peer->len)
        cpm_sock_send_error(s, peer, corr, e->code, e->msg, NULL);
    if (s->on_bad)
        s->on_bad(s, e, s->user);
}

/* Reads one whole message (all its frames) and dispatches it. */
static void recv_one(cpm_sock *s) {
    cpm_frames fr;
    if (cpm_frames_recv(&fr, s->z, CPM_FRAMES_MAX, ZMQ_DONTWAIT, NULL))
        fr.n = 0; /* ZMQ_EVENTS said a message was there: count it as an empty one */
    cpm_error e = {0};
    cpm_inmsg *m = calloc(1, sizeof *m);
    int first = s->type == ZMQ_ROUTER ? 1 : 0, n = fr.n;
    uint64_t corr = 0;
    bool reply = true;
    if (!m) {
        cpm_error_set(&e, CPM_ENOMEM, "inbound message");
        goto out_bad;
    }
    zmq_msg_init(&m->tensor_msg);
    if (first && n > 0) {
        m->peer.len = cpm_frames_size(&fr, 0) <= CPM_PEER_MAX ? cpm_frames_size(&fr, 0) : 0;
        memcpy(m->peer.id, cpm_frames_data(&fr, 0), m->peer.len);
    }
    if (n <= first) {
        cpm_error_set(&e, CPM_EFORMAT, "empty message");
        goto out_bad;
    }
    if (fr.extra) {
        cpm_error_set(&e, CPM_EFORMAT, "message has %d frames, at most %d", n + fr.extra - first,
                      CPM_FRAMES_MAX - first);
        goto out_bad;
    }
    long long tsize = n > first + 1 ? (long long)cpm_frames_size(&fr, first + 1) : -1;
    cpm_envelope *env = cpm__v1__envelope__unpack(NULL, cpm_frames_size(&fr, first),
                                                  cpm_frames_data(&fr, first));
    if (!env) {
        cpm_error_set(&e, CPM_EFORMAT, "envelope of %zu bytes does not unpack",
                      cpm_frames_size(&fr, first));
        goto out_bad;
    }
    corr = env->corr;
    reply = env->body_case != CPM__V1__ENVELOPE__BODY_ERROR;
    if (cpm_wire_validate(env, tsize, &e)) {
        cpm_wire_free(env);
        goto out_bad;
    }
    m->env = env;
    if (tsize >= 0 && take_tensor(m, &fr.f[first + 1])) {
        cpm_error_set(&e, CPM_ENOMEM, "tensor frame of %lld bytes", tsize);
        goto out_bad;
    }
    cpm_frames_close(&fr);
    if (!complete_call(s, m))
        s->on_msg(s, m, s->user);
    return;
out_bad:
    report_bad(s, m ? &m->peer : NULL, corr, reply, &e);
    cpm_frames_close(&fr);
    cpm_inmsg_free(m);
}

/* Drains until zmq reports nothing readable and nothing more can be flushed. */
static void process(cpm_sock *s) {
    while (!s->closing) {
        uint32_t ev = 0;
        size_t len = sizeof ev;
        if (zmq_getsockopt(s->z, ZMQ_EVENTS, &ev, &len))
            return;
        int sent = (ev & ZMQ_POLLOUT) && s->q_head ? flush_queue(s) : 0;
        if (ev & ZMQ_POLLIN)
            recv_one(s);
        else if (!sent)
            return;
    }
}

static void on_poll(uv_poll_t *h, int status, int events) {
    (void)status;
    (void)events;
    process(h->data);
}

static void on_kick(uv_timer_t *t) {
    cpm_sock *s = t->data;
    process(s);
    if (s->q_head && !s->closing)
        kick_soon(s, KICK_RETRY_MS);
}

/* ------------------------------------------------------------------ blocking client */

static int rpc_recv(void *z, cpm_inmsg **ret, cpm_error *err) {
    cpm_frames fr;
    int rc = cpm_frames_recv(&fr, z, 2, 0, err);
    if (rc)
        return rc;
    cpm_inmsg *m = calloc(1, sizeof *m);
    if (!m)
        rc = cpm_error_set(err, CPM_ENOMEM, "reply");
    else if (fr.extra)
        rc = cpm_error_set(err, CPM_EFORMAT, "reply has too many frames");
    if (!rc) {
        zmq_msg_init(&m->tensor_msg);
        rc = cpm_frames_envelope(&fr, 0, &m->env, err);
    }
    if (!rc && fr.n > 1 && take_tensor(m, &fr.f[1]))
        rc = cpm_error_set(err, CPM_ENOMEM, "reply tensor frame");
    cpm_frames_close(&fr);
    if (rc) {
        cpm_inmsg_free(m);
        return rc;
    }
    *ret = m;
    return 0;
}

static int64_t now_ms(void) {
    return (int64_t)(uv_hrtime() / 1000000);
}

int cpm_rpc_call(void *zctx, const cpm_curve *curve, const char *endpoint, cpm_envelope *env,
                 cpm_payload *tensor, int timeout_ms, cpm_inmsg **ret, cpm_error *err) {
    *ret = NULL;
    outmsg o = {0};
    int rc;
    void *z = zmq_socket(zctx, ZMQ_DEALER);
    if (!z) {
        if (tensor && tensor->free_fn)
            tensor->free_fn(tensor->data, tensor->hint);
        return zerr(err, "zmq_socket");
    }
    cpm_sock_opts so = cpm_sock_opts_default();
    so.linger_ms = 0;
    /* A fresh socket per call, so corr only has to differ from stale replies: none can arrive. */
    env->corr = (uint64_t)uv_hrtime() | 1;
    if ((rc = set_opts(z, ZMQ_DEALER, &so, err)) || (rc = build(&o, NULL, env, tensor, err)) ||
        (rc = cpm_sock_dial_opts(z, curve, err)))
        goto out;
    if (zmq_connect(z, endpoint)) {
        rc = cpm_error_set(err, CPM_EIO, "connect %s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto out;
    }
    /* A DEALER queues before the connection exists, so the send itself never waits. */
    for (int i = 0; i < o.n; i++)
        if (zmq_msg_send(&o.frames[i], z, i + 1 < o.n ? ZMQ_SNDMORE : 0) < 0) {
            rc = zerr(err, endpoint);
            goto out;
        }
    o.n = 0;
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - now_ms();
        zmq_pollitem_t it = {.socket = z, .events = ZMQ_POLLIN};
        int p = left > 0 ? zmq_poll(&it, 1, (long)left) : 0;
        if (p < 0 && zmq_errno() == EINTR)
            continue;
        if (p <= 0) {
            rc = cpm_error_set(err, CPM_ETIMEDOUT, "%s: no reply within %d ms", endpoint,
                               timeout_ms);
            goto out;
        }
        cpm_inmsg *m = NULL;
        if ((rc = rpc_recv(z, &m, err)))
            goto out;
        if (m->env->corr == env->corr) {
            *ret = m;
            break;
        }
        cpm_inmsg_free(m); /* a stale reply to someone else's corr: keep waiting */
    }
out:
    for (int i = 0; i < o.n; i++)
        zmq_msg_close(&o.frames[i]);
    zmq_close(z);
    return rc;
}
