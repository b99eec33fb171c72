/* expert_client.c - the stage's expert backend over ZeroMQ: scatter one MoE layer's
 * expert groups to the expert services, gather their outputs (see expert_client.h).
 *
 * Plain blocking zmq here, not the libuv transport: the call runs inside the forward
 * pass on the compute thread and must not return before every reply is in.
 */
#include "expert_client.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zmq.h>

#include "services/common/frames.h"
#include "services/common/peerwatch.h"
#include "services/common/transport.h"
#include "services/common/wire.h"

typedef struct peer {
    void *sock;
    cpm_peerwatch *watch; /* its link: a service that dies fails the call at once */
    unsigned drops;       /* the watch's count when this call began */
    char endpoint[256], name[64];
    int begin, end;
    /* this call's share */
    int g0, ng;          /* its groups */
    size_t row0, rows;   /* its rows */
    bool pending;
} peer;

struct cpm_expert_client {
    int hidden, timeout_ms, n;
    uint64_t corr;       /* id of the current call; replies to older calls are dropped */
    peer *peers;
};

static void peers_close(cpm_expert_client *c) {
    for (int i = 0; i < c->n; i++) {
        cpm_peerwatch_free(c->peers[i].watch);
        if (c->peers[i].sock)
            zmq_close(c->peers[i].sock);
    }
}

int cpm_expert_client_new(void *zctx, const cpm_curve *curve, const cpm_expert_peer *peers, int n_peers, int hidden,
                          int timeout_ms, cpm_expert_client **ret, cpm_error *err) {
    *ret = NULL;
    if (n_peers < 1 || hidden < 1 || timeout_ms < 1)
        return cpm_error_set(err, CPM_EINVAL, "expert client: %d services, hidden %d, timeout %d ms",
                             n_peers, hidden, timeout_ms);
    for (int i = 0; i < n_peers; i++)
        if (peers[i].begin != (i ? peers[i - 1].end : 0) || peers[i].end <= peers[i].begin)
            return cpm_error_set(err, CPM_EINVAL, "expert client: service %d serves [%d, %d); the "
                                 "ranges must tile the experts in order", i, peers[i].begin, peers[i].end);
    cpm_expert_client *c = calloc(1, sizeof *c);
    if (!c || !(c->peers = calloc((size_t)n_peers, sizeof *c->peers))) {
        free(c);
        return cpm_error_set(err, CPM_ENOMEM, "expert client");
    }
    c->hidden = hidden;
    c->timeout_ms = timeout_ms;
    c->n = n_peers;
    for (int i = 0; i < n_peers; i++) {
        peer *p = &c->peers[i];
        snprintf(p->endpoint, sizeof p->endpoint, "%s", peers[i].endpoint);
        if (peers[i].name)
            snprintf(p->name, sizeof p->name, "%s", peers[i].name);
        else
            snprintf(p->name, sizeof p->name, "expert%d", i);
        p->begin = peers[i].begin;
        p->end = peers[i].end;
        int zero = 0, one = 1;
        p->sock = zmq_socket(zctx, ZMQ_DEALER);
        /* IMMEDIATE: nothing queues for a service that is not connected, so a dead one
         * fails the call at its deadline instead of receiving stale work on restart. */
        if (!p->sock || zmq_setsockopt(p->sock, ZMQ_LINGER, &zero, sizeof zero) ||
            zmq_setsockopt(p->sock, ZMQ_IMMEDIATE, &one, sizeof one) ||
            cpm_sock_dial_opts(p->sock, curve, NULL) ||
            cpm_peerwatch_new(zctx, p->sock, &p->watch, NULL) || zmq_connect(p->sock, p->endpoint)) {
            int rc = cpm_error_set(err, CPM_EINVAL, "expert client: %s (%s): %s", p->name, p->endpoint,
                                   zmq_strerror(zmq_errno()));
            peers_close(c);
            free(c->peers);
            free(c);
            return rc;
        }
    }
    *ret = c;
    return 0;
}

void cpm_expert_client_free(cpm_expert_client *c) {
    if (!c)
        return;
    peers_close(c);
    free(c->peers);
    free(c);
}

static int ms_left(uint64_t deadline) {
    uint64_t now = uv_hrtime();
    return now >= deadline ? 0 : (int)((deadline - now) / 1000000u) + 1;
}

/* Which groups and rows go to which service: groups ascend and ranges tile, so each
 * service's share is one contiguous run. */
static int assign(cpm_expert_client *c, int n, const int *expert, const int *n_rows, cpm_error *err) {
    size_t row = 0;
    int g = 0;
    for (int i = 0; i < c->n; i++) {
        peer *p = &c->peers[i];
        p->g0 = g;
        p->row0 = row;
        p->rows = 0;
        p->pending = false;
        for (; g < n && expert[g] >= p->begin && expert[g] < p->end; g++)
            p->rows += (size_t)n_rows[g];
        p->ng = g - p->g0;
        row += p->rows;
    }
    if (g < n)
        return cpm_error_set(err, CPM_ERANGE, "experts: expert %d has no service (or groups out of order)",
                             expert[g]);
    return 0;
}

/* Sends one frame, waiting for the socket to become writable (a service that is
 * (re)connecting) until the deadline. */
static int send_frame(peer *p, const void *data, size_t size, int flags, uint64_t deadline,
                      int layer, cpm_error *err) {
    for (;;) {
        if (zmq_send(p->sock, data, size, flags | ZMQ_DONTWAIT) >= 0)
            return 0;
        if (zmq_errno() != EAGAIN)
            return cpm_error_set(err, CPM_EIO, "%s (%s): layer %d: send: %s", p->name, p->endpoint,
                                 layer, zmq_strerror(zmq_errno()));
        int left = ms_left(deadline);
        if (!left)
            return cpm_error_set(err, CPM_ETIMEDOUT, "%s (%s): layer %d: not connected", p->name,
                                 p->endpoint, layer);
        zmq_pollitem_t it = {.socket = p->sock, .events = ZMQ_POLLOUT};
        zmq_poll(&it, 1, left);
    }
}

static int send_request(cpm_expert_client *c, peer *p, int layer, const int *expert,
                        const int *n_rows, const float *x, uint64_t deadline, cpm_error *err) {
    uint32_t ids[p->ng > 0 ? p->ng : 1], rows[p->ng > 0 ? p->ng : 1];
    for (int g = 0; g < p->ng; g++) {
        ids[g] = (uint32_t)expert[p->g0 + g];
        rows[g] = (uint32_t)n_rows[p->g0 + g];
    }
    uint32_t shape[2] = {(uint32_t)p->rows, (uint32_t)c->hidden};
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    d.dtype = CPM__V1__DTYPE__DTYPE_F32;
    d.n_shape = 2;
    d.shape = shape;
    Cpm__V1__ExpertForward f = CPM__V1__EXPERT_FORWARD__INIT;
    f.layer = (uint32_t)layer;
    f.n_expert = f.n_n_rows = (size_t)p->ng;
    f.expert = ids;
    f.n_rows = rows;
    f.rows = &d;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = c->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD;
    env.expert_forward = &f;
    uint8_t *buf;
    size_t size;
    int rc = cpm_wire_pack(&env, &buf, &size, err);
    if (rc)
        return rc;
    size_t H = (size_t)c->hidden;
    rc = send_frame(p, buf, size, ZMQ_SNDMORE, deadline, layer, err);
    free(buf);
    if (!rc)
        rc = send_frame(p, x + p->row0 * H, p->rows * H * sizeof *x, 0, deadline, layer, err);
    p->pending = rc == 0;
    return rc;
}

/* Checks one reply against the request and copies its rows into y. */
static int take_reply(cpm_expert_client *c, peer *p, int layer, const int *expert, const int *n_rows,
                      const cpm_envelope *env, const void *tensor, float *y, cpm_error *err) {
    if (env->body_case == CPM__V1__ENVELOPE__BODY_ERROR)
        return cpm_error_set(err, env->error->code < 0 ? env->error->code : CPM_EINTERNAL, "%s: layer %d: %s",
                             p->name, layer, env->error->message ? env->error->message : "error");
    const Cpm__V1__ExpertResult *r = env->body_case == CPM__V1__ENVELOPE__BODY_EXPERT_RESULT
                                         ? env->expert_result : NULL;
    bool same = r && r->layer == (uint32_t)layer && r->n_expert == (size_t)p->ng;
    for (int g = 0; same && g < p->ng; g++)
        same = r->expert[g] == (uint32_t)expert[p->g0 + g] && r->n_rows[g] == (uint32_t)n_rows[p->g0 + g];
    if (!same)
        return cpm_error_set(err, CPM_EFORMAT, "%s: layer %d: the reply (%s) does not answer the request",
                             p->name, layer, cpm_wire_body_name(env->body_case));
    if (p->rows && (r->rows->dtype != CPM__V1__DTYPE__DTYPE_F32 || r->rows->shape[1] != (uint32_t)c->hidden))
        return cpm_error_set(err, CPM_ESHAPE, "%s: layer %d: rows are not F32 [%zu, %d]", p->name, layer,
                             p->rows, c->hidden);
    if (p->rows)
        memcpy(y + p->row0 * (size_t)c->hidden, tensor, p->rows * (size_t)c->hidden * sizeof *y);
    p->pending = false;
    return 0;
}

/* Reads every message waiting on p; 0 when none failed. Replies to older calls (a
 * timed-out one) are dropped. */
static int drain(cpm_expert_client *c, peer *p, int layer, const int *expert, const int *n_rows,
                 float *y, cpm_error *err) {
    int rc = 0;
    cpm_frames fr;
    while (p->pending && rc == 0 && cpm_frames_recv(&fr, p->sock, 2, ZMQ_DONTWAIT, NULL) == 0) {
        cpm_envelope *env = NULL;
        cpm_error ve = {0};
        if (fr.extra) /* frames beyond the tensor */
            rc = cpm_error_set(err, CPM_EFORMAT, "%s: layer %d: reply with more than two frames",
                               p->name, layer);
        else if (cpm_frames_envelope(&fr, 0, &env, &ve))
            rc = cpm_error_set(err, ve.code, "%s: layer %d: bad reply: %s", p->name, layer, ve.msg);
        else if (env->corr == c->corr) /* the rows are copied out: any alignment will do */
            rc = take_reply(c, p, layer, expert, n_rows, env, cpm_frames_data(&fr, 1), y, err);
        cpm_wire_free(env);
        cpm_frames_close(&fr);
    }
    return rc;
}

/* Sends p its share; a service whose link is down gets CPM_PEERWATCH_GRACE_MS to come
 * back (a restart), not the whole deadline. */
static int start_peer(cpm_expert_client *c, peer *p, int layer, const int *expert,
                      const int *n_rows, const float *x, uint64_t deadline, cpm_error *err) {
    deadline = cpm_peerwatch_deadline(p->watch, deadline);
    p->drops = cpm_peerwatch_drops(p->watch);
    return send_request(c, p, layer, expert, n_rows, x, deadline, err);
}

/* Whether a service this call waits on lost its connection (it died or restarted: the
 * reply will never come). */
static int check_links(cpm_expert_client *c, int layer, cpm_error *err) {
    for (int i = 0; i < c->n; i++) {
        peer *p = &c->peers[i];
        if (!p->pending)
            continue;
        cpm_peerwatch_update(p->watch);
        if (cpm_peerwatch_drops(p->watch) != p->drops)
            return cpm_error_set(err, CPM_ECLOSED, "%s (%s): connection lost during layer %d",
                                 p->name, p->endpoint, layer);
    }
    return 0;
}

static int client_run(void *ud, int layer, int n, const int *expert, const int *n_rows, const float *x,
                      float *y, cpm_error *err) {
    cpm_expert_client *c = ud;
    c->corr++;
    uint64_t deadline = uv_hrtime() + (uint64_t)c->timeout_ms * 1000000u;
    int rc = assign(c, n, expert, n_rows, err);
    for (int i = 0; i < c->n && rc == 0; i++)
        if (c->peers[i].ng)
            rc = start_peer(c, &c->peers[i], layer, expert, n_rows, x, deadline, err);
    zmq_pollitem_t items[2 * c->n];
    int idx[c->n];
    while (rc == 0) {
        int k = 0;
        for (int i = 0; i < c->n; i++)
            if (c->peers[i].pending) {
                items[k] = (zmq_pollitem_t){.socket = c->peers[i].sock, .events = ZMQ_POLLIN};
                items[c->n + k] = (zmq_pollitem_t){.socket = cpm_peerwatch_socket(c->peers[i].watch),
                                                   .events = ZMQ_POLLIN};
                idx[k++] = i;
            }
        if (!k)
            break;
        memmove(items + k, items + c->n, (size_t)k * sizeof *items);
        int left = ms_left(deadline);
        if (!left || zmq_poll(items, 2 * k, left) == 0) {
            peer *p = &c->peers[idx[0]];
            rc = cpm_error_set(err, CPM_ETIMEDOUT, "%s (%s): no reply for layer %d in %d ms", p->name,
                               p->endpoint, layer, c->timeout_ms);
            break;
        }
        for (int j = 0; j < k && rc == 0; j++)
            if (items[j].revents & ZMQ_POLLIN)
                rc = drain(c, &c->peers[idx[j]], layer, expert, n_rows, y, err);
        if (rc == 0)
            rc = check_links(c, layer, err);
    }
    return rc;
}

cpm_expert_backend cpm_expert_client_backend(cpm_expert_client *c) {
    return (cpm_expert_backend){.ud = c, .run = client_run};
}
