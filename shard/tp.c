/* tp.c - tensor parallelism over ZeroMQ: the all-reduce mesh of a stage's ranks and
 * rank 0's fan-out of micro-batches (see tp.h for the data flow).
 *
 * Plain blocking zmq on the compute thread, as in expert_client.c. Partials are tagged
 * (seq, op): seq names the micro-batch (rank 0's counter), op the all-reduce within it.
 * A rank may run at most one all-reduce ahead of another (it cannot pass the next one
 * without our partial), so one stash slot per peer holds an early partial; partials of
 * older tags (left over from a failed micro-batch) are dropped. A rank whose forward
 * fails says so to the others (a `failed` partial), so they fail that micro-batch at
 * once instead of waiting for partials that will never come.
 */
#include "tp.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zmq.h>

#include "services/common/frames.h"
#include "services/common/peerwatch.h"
#include "services/common/transport.h"

typedef struct slot {
    float *rows;           /* [max_rows, hidden] */
    size_t n;              /* floats held */
    uint64_t seq;
    uint32_t op;
    bool full;
} slot;

typedef struct mesh_peer {
    void *push;            /* to this rank's mesh endpoint (NULL for ourselves) */
    cpm_peerwatch *watch;  /* its link: a rank that dies fails the all-reduce at once */
    unsigned drops;        /* the watch's count when this all-reduce began */
    char endpoint[256];
    slot got, early;       /* this all-reduce's partial; one that came ahead of time */
    uint64_t failed_seq;   /* the latest micro-batch this rank said it failed (0: none) */
    char failed_why[160];
    int failed_code;       /* its code, when it said (CPM_ESTALE passes on: the router retries) */
} mesh_peer;

/* Rank 0's DEALERs to the other ranks' stage endpoints. They carry no replies, except
 * an Error when a rank refused a TpForward (still loading, queue full, malformed): its
 * corr is the forward's seq. */
struct cpm_tp_fanout {
    int n, timeout_ms;
    void *sock[CPM_TP_MAX];
    cpm_peerwatch *watch[CPM_TP_MAX];
    char endpoint[CPM_TP_MAX][256];
};

struct cpm_tp_mesh {
    int rank, size, hidden, max_rows, timeout_ms;
    void *pull;
    cpm_tp_fanout *refusals; /* rank 0: where refused forwards are answered (may be NULL) */
    mesh_peer peers[CPM_TP_MAX];
    uint64_t seq;
    uint32_t op;
    unsigned long long calls;
    double total_us;
};

static int ms_left(uint64_t deadline) {
    uint64_t now = uv_hrtime();
    return now >= deadline ? 0 : (int)((deadline - now) / 1000000u) + 1;
}

/* A connected socket that drops nothing silently: IMMEDIATE queues only for a live
 * peer, so a dead rank fails the send at the deadline instead of buffering forever. */
static void *dial(void *zctx, const cpm_curve *curve, int type, const char *endpoint,
                  cpm_peerwatch **watch) {
    int zero = 0, one = 1;
    void *s = zmq_socket(zctx, type);
    if (s && (zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) ||
              zmq_setsockopt(s, ZMQ_IMMEDIATE, &one, sizeof one) ||
              cpm_sock_dial_opts(s, curve, NULL) ||
              cpm_peerwatch_new(zctx, s, watch, NULL) || zmq_connect(s, endpoint))) {
        cpm_peerwatch_free(*watch);
        *watch = NULL;
        zmq_close(s);
        return NULL;
    }
    return s;
}


/* Sends one frame, waiting for the socket to become writable until the deadline. */
static int send_frame(void *sock, const char *who, const void *data, size_t size, int flags,
                      uint64_t deadline, cpm_error *err) {
    for (;;) {
        if (zmq_send(sock, data, size, flags | ZMQ_DONTWAIT) >= 0)
            return 0;
        if (zmq_errno() != EAGAIN)
            return cpm_error_set(err, CPM_EIO, "%s: send: %s", who, zmq_strerror(zmq_errno()));
        int left = ms_left(deadline);
        if (!left)
            return cpm_error_set(err, CPM_ETIMEDOUT, "%s: not reachable", who);
        zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLOUT};
        zmq_poll(&it, 1, left);
    }
}

/* ------------------------------------------------------------------ the mesh */

void cpm_tp_mesh_free(cpm_tp_mesh *t) {
    if (!t)
        return;
    if (t->pull)
        zmq_close(t->pull);
    for (int r = 0; r < t->size; r++) {
        cpm_peerwatch_free(t->peers[r].watch);
        if (t->peers[r].push)
            zmq_close(t->peers[r].push);
        free(t->peers[r].got.rows);
        free(t->peers[r].early.rows);
    }
    free(t);
}

int cpm_tp_mesh_new(void *zctx, const cpm_curve *curve, int rank, int size, const char *const *mesh, int hidden,
                    int max_rows, int timeout_ms, cpm_tp_mesh **ret, cpm_error *err) {
    *ret = NULL;
    if (size < 2 || size > CPM_TP_MAX || rank < 0 || rank >= size || hidden < 1 || max_rows < 1 ||
        timeout_ms < 1)
        return cpm_error_set(err, CPM_EINVAL, "tp mesh: rank %d of %d (at most %d), hidden %d, "
                             "%d rows, timeout %d ms", rank, size, CPM_TP_MAX, hidden, max_rows,
                             timeout_ms);
    cpm_tp_mesh *t = calloc(1, sizeof *t);
    if (!t)
        return cpm_error_set(err, CPM_ENOMEM, "tp mesh");
    *t = (cpm_tp_mesh){.rank = rank, .size = size, .hidden = hidden, .max_rows = max_rows,
                       .timeout_ms = timeout_ms};
    size_t floats = (size_t)max_rows * (size_t)hidden;
    int zero = 0;
    char local[512];
    cpm_endpoint_listen(mesh[rank], local, sizeof local);
    t->pull = zmq_socket(zctx, ZMQ_PULL);
    if (!t->pull || zmq_setsockopt(t->pull, ZMQ_LINGER, &zero, sizeof zero) ||
        cpm_sock_secure(t->pull, curve, true, CPM_CURVE_FABRIC, NULL) || zmq_bind(t->pull, local)) {
        int rc = cpm_error_set(err, CPM_EIO, "tp rank %d: bind %s: %s", rank, local,
                               zmq_strerror(zmq_errno()));
        cpm_tp_mesh_free(t);
        return rc;
    }
    for (int r = 0; r < size; r++) {
        mesh_peer *p = &t->peers[r];
        snprintf(p->endpoint, sizeof p->endpoint, "%s", mesh[r]);
        if (r == rank)
            continue;
        p->got.rows = malloc(floats * sizeof(float));
        p->early.rows = malloc(floats * sizeof(float));
        p->push = dial(zctx, curve, ZMQ_PUSH, mesh[r], &p->watch);
        if (!p->got.rows || !p->early.rows || !p->push) {
            int rc = cpm_error_set(err, p->push ? CPM_ENOMEM : CPM_EIO, "tp rank %d: peer %d (%s)",
                                   rank, r, mesh[r]);
            cpm_tp_mesh_free(t);
            return rc;
        }
    }
    *ret = t;
    return 0;
}

void cpm_tp_mesh_begin(cpm_tp_mesh *t, uint64_t seq) {
    t->seq = seq;
    t->op = 0;
}

double cpm_tp_mesh_mean_us(const cpm_tp_mesh *t, unsigned long long *ret_calls) {
    if (ret_calls)
        *ret_calls = t->calls;
    return t->calls ? t->total_us / (double)t->calls : 0.0;
}

/* -1, 0, 1 as tag (seq, op) is before, equal to, after the current one. */
static int tag_cmp(const cpm_tp_mesh *t, uint64_t seq, uint32_t op) {
    if (seq != t->seq)
        return seq < t->seq ? -1 : 1;
    return op < t->op ? -1 : op > t->op;
}

/* tp, tagged with this rank and the current all-reduce, as one packed Envelope. */
static int pack_partial(const cpm_tp_mesh *t, Cpm__V1__TpPartial *tp, uint8_t **buf, size_t *size,
                        cpm_error *err) {
    tp->seq = t->seq;
    tp->op = t->op;
    tp->rank = (uint32_t)t->rank;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_TP_PARTIAL;
    env.tp_partial = tp;
    return cpm_wire_pack(&env, buf, size, err);
}

static int send_partial(cpm_tp_mesh *t, mesh_peer *p, int layer, int phase, const float *x,
                        size_t n, uint64_t deadline, cpm_error *err) {
    uint32_t shape[2] = {(uint32_t)(n / (size_t)t->hidden), (uint32_t)t->hidden};
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    d.dtype = CPM__V1__DTYPE__DTYPE_F32;
    d.n_shape = 2;
    d.shape = shape;
    Cpm__V1__TpPartial tp = CPM__V1__TP_PARTIAL__INIT;
    tp.layer = (uint32_t)layer;
    tp.phase = (uint32_t)phase;
    tp.partial = &d;
    uint8_t *buf;
    size_t size;
    int rc = pack_partial(t, &tp, &buf, &size, err);
    if (rc)
        return rc;
    char who[300];
    snprintf(who, sizeof who, "tp rank %d (%s): layer %d", (int)(p - t->peers), p->endpoint, layer);
    deadline = cpm_peerwatch_deadline(p->watch, deadline);
    p->drops = cpm_peerwatch_drops(p->watch);
    rc = send_frame(p->push, who, buf, size, ZMQ_SNDMORE, deadline, err);
    free(buf);
    if (!rc)
        rc = send_frame(p->push, who, x, n * sizeof *x, 0, deadline, err);
    return rc;
}

/* Rank p failed micro-batch seq (or refused it): no partial of it will come. */
static void note_failure(cpm_tp_mesh *t, mesh_peer *p, uint64_t seq, const char *why, int code) {
    if (seq >= t->seq && seq > p->failed_seq) {
        p->failed_seq = seq;
        p->failed_code = code;
        snprintf(p->failed_why, sizeof p->failed_why, "%s", why ? why : "");
    }
}

/* Files one validated partial: this all-reduce's, an early one, or a stale one (dropped);
 * or a peer's word that it failed a micro-batch (this one's or a later one). */
static int file_partial(cpm_tp_mesh *t, const Cpm__V1__TpPartial *tp, const void *rows,
                        size_t n, int layer, cpm_error *err) {
    if (tp->rank >= (uint32_t)t->size || tp->rank == (uint32_t)t->rank)
        return 0; /* not from a peer of this stage: ignore it */
    mesh_peer *p = &t->peers[tp->rank];
    if (tp->failed) {
        note_failure(t, p, tp->seq, tp->failed->message, tp->failed->code);
        return 0;
    }
    if (tp->partial->shape[1] != (uint32_t)t->hidden || tp->partial->shape[0] > (uint32_t)t->max_rows)
        return cpm_error_set(err, CPM_ESHAPE, "tp rank %u: partial [%u, %u], this stage has hidden "
                             "%d and at most %d rows", tp->rank, tp->partial->shape[0],
                             tp->partial->shape[1], t->hidden, t->max_rows);
    size_t floats = (size_t)tp->partial->shape[0] * (size_t)t->hidden;
    int c = tag_cmp(t, tp->seq, tp->op);
    if (c < 0)
        return 0;
    if (c == 0 && floats != n)
        return cpm_error_set(err, CPM_ESHAPE, "tp rank %u: layer %d: partial of %zu floats, expected "
                             "%zu", tp->rank, layer, floats, n);
    /* A rank sends this micro-batch's partials before any of a later one (one connection
     * keeps order), so a later one while this one's is missing means it never comes: the
     * rank restarted, or its rank 0 did and went on. */
    if (c > 0 && tp->seq != t->seq && !p->got.full)
        note_failure(t, p, t->seq, "it went on to a later micro-batch without this one", 0);
    slot *s = c == 0 ? &p->got : &p->early;
    if (c > 0 && s->full && (s->seq < tp->seq || (s->seq == tp->seq && s->op < tp->op)))
        return 0; /* keep the early partial needed sooner */
    memcpy(s->rows, rows, floats * sizeof(float));
    *s = (slot){.rows = s->rows, .n = floats, .seq = tp->seq, .op = tp->op, .full = true};
    return 0;
}

/* Reads every message waiting on the mesh socket. */
static int drain(cpm_tp_mesh *t, size_t n, int layer, cpm_error *err) {
    int rc = 0;
    cpm_frames fr;
    while (rc == 0 && cpm_frames_recv(&fr, t->pull, 2, ZMQ_DONTWAIT, NULL) == 0) {
        cpm_envelope *env = NULL;
        /* a malformed message on the mesh is not from a rank of this stage: drop it */
        if (!fr.extra && !cpm_frames_envelope(&fr, 0, &env, NULL) &&
            env->body_case == CPM__V1__ENVELOPE__BODY_TP_PARTIAL)
            rc = file_partial(t, env->tp_partial, cpm_frames_data(&fr, 1), n, layer, err);
        cpm_wire_free(env);
        cpm_frames_close(&fr);
    }
    return rc;
}

/* Rank 0: reads the other ranks' refusals of forwards (Error replies on the fan-out). */
static void drain_refusals(cpm_tp_mesh *t) {
    cpm_tp_fanout *f = t->refusals;
    for (int i = 0; f && i < f->n; i++) {
        cpm_frames fr;
        while (cpm_frames_recv(&fr, f->sock[i], 2, ZMQ_DONTWAIT, NULL) == 0) {
            cpm_envelope *env = NULL;
            if (!cpm_frames_envelope(&fr, 0, &env, NULL) && env->body_case == CPM__V1__ENVELOPE__BODY_ERROR &&
                i + 1 < t->size)
                note_failure(t, &t->peers[i + 1], env->corr, env->error->message, env->error->code);
            cpm_wire_free(env);
            cpm_frames_close(&fr);
        }
    }
}

/* An early partial kept from before this all-reduce started becomes this one's. */
static void take_early(cpm_tp_mesh *t) {
    for (int r = 0; r < t->size; r++) {
        mesh_peer *p = &t->peers[r];
        p->got.full = false;
        if (r == t->rank || !p->early.full)
            continue;
        int c = tag_cmp(t, p->early.seq, p->early.op);
        if (c < 0)
            p->early.full = false;
        if (c == 0) {
            slot tmp = p->got;
            p->got = p->early;
            p->early = tmp;
            p->early.full = false;
        }
    }
}

static int missing_peer(const cpm_tp_mesh *t) {
    for (int r = 0; r < t->size; r++)
        if (r != t->rank && !t->peers[r].got.full)
            return r;
    return -1;
}

/* x = p0 + p1 + ... + p(T-1), in rank order, so every rank gets the same bits. */
static void sum_in_rank_order(cpm_tp_mesh *t, float *x, size_t n) {
    const float *part[CPM_TP_MAX];
    for (int r = 0; r < t->size; r++)
        part[r] = r == t->rank ? x : t->peers[r].got.rows;
    for (size_t i = 0; i < n; i++) {
        float s = part[0][i];
        for (int r = 1; r < t->size; r++)
            s += part[r][i];
        x[i] = s; /* x[i] was read above: in place is safe */
    }
}

/* Whether a rank lost its link since this all-reduce began (it died or restarted), or
 * said it failed this micro-batch: either way its partial will never come. */
static int check_links(cpm_tp_mesh *t, int layer, cpm_error *err) {
    for (int r = 0; r < t->size; r++) {
        mesh_peer *p = &t->peers[r];
        if (r == t->rank)
            continue;
        if (p->failed_seq == t->seq)
            return cpm_error_set(err, p->failed_code == CPM_ESTALE ? CPM_ESTALE : CPM_ECLOSED,
                                 "tp rank %d (%s) failed this micro-batch: %s", r, p->endpoint,
                                 p->failed_why);
        cpm_peerwatch_update(p->watch);
        if (cpm_peerwatch_drops(p->watch) != p->drops)
            return cpm_error_set(err, CPM_ECLOSED, "tp rank %d (%s): connection lost during layer %d",
                                 r, p->endpoint, layer);
    }
    return 0;
}

static int mesh_sum(void *ud, int layer, int phase, float *x, size_t n, cpm_error *err) {
    cpm_tp_mesh *t = ud;
    uint64_t t0 = uv_hrtime(), deadline = t0 + (uint64_t)t->timeout_ms * 1000000u;
    if (n > (size_t)t->max_rows * (size_t)t->hidden || n % (size_t)t->hidden)
        return cpm_error_set(err, CPM_ELIMIT, "tp: all-reduce of %zu floats (hidden %d, at most %d "
                             "rows)", n, t->hidden, t->max_rows);
    take_early(t);
    int rc = 0;
    for (int r = 0; r < t->size && rc == 0; r++)
        if (r != t->rank)
            rc = send_partial(t, &t->peers[r], layer, phase, x, n, deadline, err);
    int miss;
    while (rc == 0 && (miss = missing_peer(t)) >= 0) {
        rc = drain(t, n, layer, err);
        drain_refusals(t);
        if (rc || missing_peer(t) < 0 || (rc = check_links(t, layer, err)))
            break;
        zmq_pollitem_t it[2 * CPM_TP_MAX + 1] = {{.socket = t->pull, .events = ZMQ_POLLIN}};
        int k = 1;
        for (int r = 0; r < t->size; r++)
            if (r != t->rank)
                it[k++] = (zmq_pollitem_t){.socket = cpm_peerwatch_socket(t->peers[r].watch),
                                           .events = ZMQ_POLLIN};
        for (int i = 0; t->refusals && i < t->refusals->n; i++)
            it[k++] = (zmq_pollitem_t){.socket = t->refusals->sock[i], .events = ZMQ_POLLIN};
        /* a rank whose link is down (it died before this all-reduce began, so no drop is
         * new) gets the grace period, not the whole deadline */
        int left = ms_left(cpm_peerwatch_deadline(t->peers[miss].watch, deadline));
        if (!left || zmq_poll(it, k, left) == 0)
            rc = cpm_error_set(err, CPM_ETIMEDOUT, "tp rank %d (%s): no partial for layer %d in %d ms",
                               miss, t->peers[miss].endpoint, layer, t->timeout_ms);
    }
    if (rc == 0)
        sum_in_rank_order(t, x, n);
    t->op++; /* even on failure: the peers count the same all-reduces */
    t->calls++;
    t->total_us += (double)(uv_hrtime() - t0) / 1e3;
    return rc;
}

void cpm_tp_mesh_abort(cpm_tp_mesh *t, const cpm_error *why) {
    Cpm__V1__Error e = CPM__V1__ERROR__INIT;
    e.code = why && why->code ? why->code : CPM_EINTERNAL;
    e.message = (char *)(why ? why->msg : "");
    Cpm__V1__TpPartial tp = CPM__V1__TP_PARTIAL__INIT;
    tp.failed = &e;
    uint8_t *buf;
    size_t size;
    if (pack_partial(t, &tp, &buf, &size, NULL))
        return;
    /* best effort and brief: a peer that is gone fails the micro-batch by itself */
    uint64_t deadline = uv_hrtime() + 200 * 1000000ull;
    for (int r = 0; r < t->size; r++) {
        mesh_peer *p = &t->peers[r];
        if (r != t->rank)
            send_frame(p->push, "tp abort", buf, size, 0, cpm_peerwatch_deadline(p->watch, deadline),
                       NULL);
    }
    free(buf);
}

void cpm_tp_mesh_watch_refusals(cpm_tp_mesh *t, cpm_tp_fanout *f) {
    t->refusals = f;
}

cpm_allreduce_backend cpm_tp_mesh_backend(cpm_tp_mesh *t) {
    return (cpm_allreduce_backend){.ud = t, .sum = mesh_sum};
}

/* ------------------------------------------------------------------ rank 0's fan-out */

void cpm_tp_fanout_free(cpm_tp_fanout *f) {
    if (!f)
        return;
    for (int i = 0; i < f->n; i++) {
        cpm_peerwatch_free(f->watch[i]);
        if (f->sock[i])
            zmq_close(f->sock[i]);
    }
    free(f);
}

int cpm_tp_fanout_new(void *zctx, const cpm_curve *curve, const char *const *endpoints, int n, int timeout_ms,
                      cpm_tp_fanout **ret, cpm_error *err) {
    *ret = NULL;
    if (n < 1 || n >= CPM_TP_MAX || timeout_ms < 1)
        return cpm_error_set(err, CPM_EINVAL, "tp fan-out: %d ranks, timeout %d ms", n, timeout_ms);
    cpm_tp_fanout *f = calloc(1, sizeof *f);
    if (!f)
        return cpm_error_set(err, CPM_ENOMEM, "tp fan-out");
    f->n = n;
    f->timeout_ms = timeout_ms;
    for (int i = 0; i < n; i++) {
        snprintf(f->endpoint[i], sizeof f->endpoint[i], "%s", endpoints[i]);
        if (!(f->sock[i] = dial(zctx, curve, ZMQ_DEALER, endpoints[i], &f->watch[i]))) {
            int rc = cpm_error_set(err, CPM_EIO, "tp rank %d (%s): %s", i + 1, endpoints[i],
                                   zmq_strerror(zmq_errno()));
            cpm_tp_fanout_free(f);
            return rc;
        }
    }
    *ret = f;
    return 0;
}

int cpm_tp_fanout_send(cpm_tp_fanout *f, uint64_t seq, const Cpm__V1__StageForward *forward,
                       const void *tensor, size_t tensor_bytes, cpm_error *err) {
    Cpm__V1__TpForward tf = CPM__V1__TP_FORWARD__INIT;
    tf.seq = seq;
    tf.forward = (Cpm__V1__StageForward *)forward; /* packed, not modified */
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = seq; /* a refusal's Error echoes it: the mesh fails that micro-batch */
    env.body_case = CPM__V1__ENVELOPE__BODY_TP_FORWARD;
    env.tp_forward = &tf;
    uint8_t *buf;
    size_t size;
    int rc = cpm_wire_pack(&env, &buf, &size, err);
    if (rc)
        return rc;
    uint64_t deadline = uv_hrtime() + (uint64_t)f->timeout_ms * 1000000u;
    for (int i = 0; i < f->n && rc == 0; i++) {
        char who[300];
        snprintf(who, sizeof who, "tp rank %d (%s): forward", i + 1, f->endpoint[i]);
        uint64_t until = cpm_peerwatch_deadline(f->watch[i], deadline);
        rc = send_frame(f->sock[i], who, buf, size, tensor ? ZMQ_SNDMORE : 0, until, err);
        if (rc == 0 && tensor)
            rc = send_frame(f->sock[i], who, tensor, tensor_bytes, 0, until, err);
    }
    free(buf);
    return rc;
}
