/* Unit tests for tensor parallelism in shard/engine/model (model.c's TP slicing, the
 * all-reduce hook in the forward): T ranks of one model, each a thread with an
 * in-process all-reduce (lock-step, rank-order sums), give the single model's
 * logits within 1e-5 relative, the same argmax, and bit-identical outputs on every
 * rank - whole prompts, chunked prefill and interleaved batches. Then the same over
 * shard/tp.c's ZeroMQ mesh (ipc sockets, one thread per rank): the same bits as the
 * in-process sum, and a missing rank fails the forward at the deadline. The whole
 * cluster over TCP is tests/e2e/core_tp.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>
#include <zmq.h>

#include "shard/engine/kv_cache.h"
#include "shard/engine/model/model.h"
#include "services/common/wire.h"
#include "shard/tp.h"

static const char *model_dir;
#define N 12
#define MAX_T 4

static const int32_t prompt_a[N] = {1, 7, 42, 99, 3, 500, 17, 2, 45, 700, 8, 9};
static const int32_t prompt_b[N] = {1, 300, 301, 302, 11, 12, 13, 14, 15, 16, 1023, 5};

/* ---- an in-process all-reduce: every rank posts its partial, all sum in rank order ---- */

typedef struct group {
    int T;
    pthread_barrier_t bar;
    float *part[MAX_T];
    int tag[MAX_T];
    float *tmp[MAX_T];
    long calls; /* rank 0's count: the test checks the hook really ran */
} group;

typedef struct rank_ctx {
    group *g;
    int r;
    cpm_model *m;
    int (*script)(cpm_model *m, float *out);
    float *out;
    int rc;
} rank_ctx;

static int group_sum(void *ud, int layer, int phase, float *x, size_t n, cpm_error *err) {
    rank_ctx *c = ud;
    group *g = c->g;
    g->part[c->r] = x;
    g->tag[c->r] = layer * 2 + phase;
    pthread_barrier_wait(&g->bar);
    int rc = 0;
    for (int k = 0; k < g->T; k++)
        if (g->tag[k] != g->tag[c->r])
            rc = cpm_error_set(err, CPM_EINTERNAL, "rank %d at tag %d, rank %d at %d", c->r,
                               g->tag[c->r], k, g->tag[k]);
    float *t = g->tmp[c->r];
    for (size_t i = 0; rc == 0 && i < n; i++) {
        float s = g->part[0][i];
        for (int k = 1; k < g->T; k++)
            s += g->part[k][i];
        t[i] = s;
    }
    pthread_barrier_wait(&g->bar); /* nobody overwrites x while another rank reads it */
    if (rc == 0)
        memcpy(x, t, n * sizeof(float));
    if (c->r == 0)
        g->calls++;
    return rc;
}

static cpm_model *load_tp(int rank, int size, int begin, int end) {
    cpm_model_opts o = cpm_model_opts_default();
    o.tp_rank = rank;
    o.tp_size = size;
    o.layer_begin = begin;
    o.layer_end = end;
    o.n_threads = 1;
    cpm_model *m;
    cpm_error e = {0};
    if (cpm_model_load(model_dir, &o, &m, &e))
        fail_msg("rank %d of %d: %s", rank, size, e.msg);
    return m;
}

/* ---- scripts: the same calls on the single model and on every rank ---- */

static int vocab(cpm_model *m) {
    return cpm_model_get_info(m)->vocab_size;
}

/* prompt_a in chunks of `chunk`, logits of every position into out [N, V] */
static int run_chunked(cpm_model *m, float *out, int chunk) {
    int V = vocab(m), rc = 0;
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int s = cpm_kv_cache_seq_new(kv, &e);
    for (int at = 0; rc == 0 && at < N; at += chunk) {
        int c = N - at < chunk ? N - at : chunk;
        int32_t seq[N], pos[N];
        for (int i = 0; i < c; i++)
            seq[i] = s, pos[i] = at + i;
        cpm_batch b = {.n_tokens = c, .ids = prompt_a + at, .seq = seq, .pos = pos};
        rc = cpm_model_forward(m, kv, &b, out + (size_t)at * V, &e);
    }
    cpm_kv_cache_free(kv);
    return rc;
}

static int whole(cpm_model *m, float *out) {
    return run_chunked(m, out, N);
}
static int chunk1(cpm_model *m, float *out) {
    return run_chunked(m, out, 1);
}
static int chunk5(cpm_model *m, float *out) {
    return run_chunked(m, out, 5);
}

/* two sequences interleaved row by row in one batch: out [2N, V] */
static int interleaved(cpm_model *m, float *out) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 2, &e);
    int sa = cpm_kv_cache_seq_new(kv, &e), sb = cpm_kv_cache_seq_new(kv, &e);
    int32_t ids[2 * N], seq[2 * N], pos[2 * N];
    for (int i = 0; i < N; i++) {
        ids[2 * i] = prompt_a[i], seq[2 * i] = sa, pos[2 * i] = i;
        ids[2 * i + 1] = prompt_b[i], seq[2 * i + 1] = sb, pos[2 * i + 1] = i;
    }
    cpm_batch b = {.n_tokens = 2 * N, .ids = ids, .seq = seq, .pos = pos};
    int rc = cpm_model_forward(m, kv, &b, out, &e);
    cpm_kv_cache_free(kv);
    return rc;
}

static void *rank_main(void *arg) {
    rank_ctx *c = arg;
    c->rc = c->script(c->m, c->out);
    return NULL;
}

/* ---- checks ---- */

static double max_rel(const float *a, const float *b, size_t n) {
    double d = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs((double)b[i]));
    }
    return d / mx;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* Runs script on the single model and on T ranks; compares. Returns false if the
 * model's heads do not split T ways (load refused, checked to say so). */
static bool check_tp(int T, int (*script)(cpm_model *, float *), int rows) {
    cpm_model_opts o = cpm_model_opts_default();
    o.tp_size = T;
    cpm_model *probe;
    cpm_error e = {0};
    int rc = cpm_model_load(model_dir, &o, &probe, &e);
    if (rc == CPM_EINVAL && strstr(e.msg, "do not split"))
        return false;
    assert_int_equal(rc, 0);
    cpm_model_free(probe);

    cpm_model *single = load_tp(0, 1, 0, -1);
    int V = vocab(single);
    size_t n = (size_t)rows * V;
    float *ref = malloc(n * sizeof(float));
    assert_int_equal(script(single, ref), 0);

    group g = {.T = T};
    pthread_barrier_init(&g.bar, NULL, (unsigned)T);
    rank_ctx ctx[MAX_T];
    pthread_t th[MAX_T];
    size_t H = (size_t)cpm_model_get_info(single)->hidden_size;
    for (int r = 0; r < T; r++) {
        ctx[r] = (rank_ctx){.g = &g, .r = r, .m = load_tp(r, T, 0, -1), .script = script,
                            .out = malloc(n * sizeof(float))};
        g.tmp[r] = malloc((size_t)2 * N * H * sizeof(float));
        cpm_allreduce_backend b = {.ud = &ctx[r], .sum = group_sum};
        cpm_model_set_allreduce_backend(ctx[r].m, &b);
    }
    for (int r = 0; r < T; r++)
        pthread_create(&th[r], NULL, rank_main, &ctx[r]);
    for (int r = 0; r < T; r++)
        pthread_join(th[r], NULL);
    const cpm_model_info *in = cpm_model_get_info(single);
    assert_true(g.calls >= 2L * in->n_layers); /* two all-reduces per layer per call */
    for (int r = 0; r < T; r++) {
        assert_int_equal(ctx[r].rc, 0);
        assert_memory_equal(ctx[r].out, ctx[0].out, n * sizeof(float)); /* same bits */
    }
    double rel = max_rel(ctx[0].out, ref, n);
    if (rel >= 1e-5)
        fail_msg("T=%d: max relative difference %g", T, rel);
    for (int i = 0; i < rows; i++)
        assert_int_equal(argmax(ctx[0].out + (size_t)i * V, V), argmax(ref + (size_t)i * V, V));
    for (int r = 0; r < T; r++) {
        cpm_model_free(ctx[r].m);
        free(ctx[r].out);
        free(g.tmp[r]);
    }
    pthread_barrier_destroy(&g.bar);
    free(ref);
    cpm_model_free(single);
    return true;
}

static void test_tp2_whole(void **state) {
    (void)state;
    assert_true(check_tp(2, whole, N)); /* every model this test runs on splits 2 ways */
}

static void test_tp2_chunked(void **state) {
    (void)state;
    assert_true(check_tp(2, chunk1, N));
    assert_true(check_tp(2, chunk5, N));
}

static void test_tp2_interleaved(void **state) {
    (void)state;
    assert_true(check_tp(2, interleaved, 2 * N));
}

/* T = 4 where the (KV) heads allow it; otherwise the load must refuse, saying why. */
static void test_tp4_where_heads_allow(void **state) {
    (void)state;
    if (check_tp(4, whole, N))
        assert_true(check_tp(4, interleaved, 2 * N));
}

typedef struct later_job {
    cpm_model *m;
    cpm_kv_cache *kv;
    const float *act;
    float *out;
    int rc;
} later_job;

static void *later_stage_job(void *arg) {
    later_job *j = arg;
    int32_t seq[N], pos[N];
    for (int i = 0; i < N; i++)
        seq[i] = 0, pos[i] = i;
    cpm_error e = {0};
    cpm_batch b = {.n_tokens = N, .hidden = j->act, .seq = seq, .pos = pos};
    j->rc = cpm_model_forward(j->m, j->kv, &b, j->out, &e);
    return NULL;
}

/* A TP stage is also a pipeline stage: layers [1, L) split 2 ways, fed hidden rows. */
static void test_tp2_later_stage(void **state) {
    (void)state;
    cpm_model *s0 = load_tp(0, 1, 0, 1), *whole_m = load_tp(0, 1, 0, -1);
    const cpm_model_info *in = cpm_model_get_info(whole_m);
    int V = in->vocab_size, H = in->hidden_size, L = in->n_layers;
    float *ref = malloc((size_t)N * V * 4), *act = malloc((size_t)N * H * 4);
    assert_int_equal(whole(whole_m, ref), 0);
    cpm_error e = {0};
    cpm_kv_geometry g0 = cpm_model_kv_geometry(s0);
    cpm_kv_cache *k0 = cpm_kv_cache_new(&g0, 64, 1, &e);
    int q0 = cpm_kv_cache_seq_new(k0, &e);
    int32_t seq[N], pos[N];
    for (int i = 0; i < N; i++)
        seq[i] = q0, pos[i] = i;
    cpm_batch b0 = {.n_tokens = N, .ids = prompt_a, .seq = seq, .pos = pos};
    assert_int_equal(cpm_model_forward(s0, k0, &b0, act, &e), 0);

    group g = {.T = 2};
    pthread_barrier_init(&g.bar, NULL, 2);
    rank_ctx ctx[2];
    cpm_kv_cache *kv[2];
    float *out[2];
    for (int r = 0; r < 2; r++) {
        ctx[r] = (rank_ctx){.g = &g, .r = r, .m = load_tp(r, 2, 1, L)};
        g.tmp[r] = malloc((size_t)N * H * 4);
        out[r] = malloc((size_t)N * V * 4);
        cpm_allreduce_backend b = {.ud = &ctx[r], .sum = group_sum};
        cpm_model_set_allreduce_backend(ctx[r].m, &b);
        cpm_kv_geometry gr = cpm_model_kv_geometry(ctx[r].m);
        kv[r] = cpm_kv_cache_new(&gr, 64, 1, &e);
        cpm_kv_cache_seq_new(kv[r], &e);
    }
    /* each sum waits for the other rank: rank 1 runs on a thread */
    later_job job[2];
    pthread_t th;
    for (int r = 0; r < 2; r++)
        job[r] = (later_job){.m = ctx[r].m, .kv = kv[r], .act = act, .out = out[r]};
    pthread_create(&th, NULL, later_stage_job, &job[1]);
    later_stage_job(&job[0]);
    pthread_join(th, NULL);
    assert_int_equal(job[0].rc, 0);
    assert_int_equal(job[1].rc, 0);
    assert_memory_equal(out[0], out[1], (size_t)N * V * 4);
    assert_true(max_rel(out[0], ref, (size_t)N * V) < 1e-5);
    for (int r = 0; r < 2; r++) {
        cpm_kv_cache_free(kv[r]);
        cpm_model_free(ctx[r].m);
        free(g.tmp[r]);
        free(out[r]);
    }
    pthread_barrier_destroy(&g.bar);
    cpm_kv_cache_free(k0);
    cpm_model_free(s0);
    cpm_model_free(whole_m);
    free(ref);
    free(act);
}

/* ---- the ZeroMQ mesh (shard/tp.c) ---- */

typedef struct mesh_rank {
    cpm_model *m;
    cpm_tp_mesh *mesh;
    float *out;
    int rc;
} mesh_rank;

static void *mesh_rank_main(void *arg) {
    mesh_rank *k = arg;
    cpm_tp_mesh_begin(k->mesh, 1);
    k->rc = interleaved(k->m, k->out);
    return NULL;
}

static void mesh_endpoints(char eps[][64], int T) {
    for (int r = 0; r < T; r++)
        snprintf(eps[r], 64, "ipc:///tmp/cpm-test-tp-%d-%d", (int)getpid(), r);
}

/* Two ranks over real sockets give exactly the in-process ranks' bits. */
static void test_mesh_matches_in_process(void **state) {
    (void)state;
    const int T = 2, rows = 2 * N;
    cpm_model *single = load_tp(0, 1, 0, -1);
    const cpm_model_info *in = cpm_model_get_info(single);
    size_t n = (size_t)rows * in->vocab_size;
    float *ref = malloc(n * sizeof(float));
    assert_int_equal(interleaved(single, ref), 0);

    void *z = zmq_ctx_new();
    char eps[MAX_T][64];
    const char *mesh[MAX_T];
    mesh_endpoints(eps, T);
    mesh_rank k[MAX_T];
    pthread_t th[MAX_T];
    cpm_error e = {0};
    for (int r = 0; r < T; r++) {
        mesh[r] = eps[r];
        k[r] = (mesh_rank){.m = load_tp(r, T, 0, -1), .out = malloc(n * sizeof(float))};
    }
    for (int r = 0; r < T; r++) {
        if (cpm_tp_mesh_new(z, NULL, r, T, mesh, in->hidden_size, in->max_batch_tokens, 10000,
                            &k[r].mesh, &e))
            fail_msg("%s", e.msg);
        cpm_allreduce_backend b = cpm_tp_mesh_backend(k[r].mesh);
        cpm_model_set_allreduce_backend(k[r].m, &b);
    }
    for (int r = 0; r < T; r++)
        pthread_create(&th[r], NULL, mesh_rank_main, &k[r]);
    for (int r = 0; r < T; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < T; r++) {
        assert_int_equal(k[r].rc, 0);
        assert_memory_equal(k[r].out, k[0].out, n * sizeof(float));
    }
    assert_true(max_rel(k[0].out, ref, n) < 1e-5);
    unsigned long long calls;
    cpm_tp_mesh_mean_us(k[0].mesh, &calls);
    assert_int_equal(calls, 2ull * (unsigned long long)in->n_layers);

    /* the in-process sum (same rank order) gives the very same bits */
    group g = {.T = T};
    pthread_barrier_init(&g.bar, NULL, (unsigned)T);
    rank_ctx ctx[MAX_T];
    for (int r = 0; r < T; r++) {
        ctx[r] = (rank_ctx){.g = &g, .r = r, .m = k[r].m, .script = interleaved,
                            .out = malloc(n * sizeof(float))};
        g.tmp[r] = malloc((size_t)rows * (size_t)in->hidden_size * sizeof(float));
        cpm_allreduce_backend b = {.ud = &ctx[r], .sum = group_sum};
        cpm_model_set_allreduce_backend(k[r].m, &b);
    }
    for (int r = 0; r < T; r++)
        pthread_create(&th[r], NULL, rank_main, &ctx[r]);
    for (int r = 0; r < T; r++)
        pthread_join(th[r], NULL);
    assert_memory_equal(ctx[0].out, k[0].out, n * sizeof(float));
    for (int r = 0; r < T; r++) {
        cpm_tp_mesh_free(k[r].mesh);
        cpm_model_free(k[r].m);
        free(k[r].out);
        free(ctx[r].out);
        free(g.tmp[r]);
    }
    pthread_barrier_destroy(&g.bar);
    zmq_ctx_term(z);
    free(ref);
    cpm_model_free(single);
}

/* Rank 0 alone: its first all-reduce fails at the deadline, naming the missing rank,
 * and nothing is committed to the KV cache. */
static void test_mesh_missing_rank_times_out(void **state) {
    (void)state;
    void *z = zmq_ctx_new();
    char eps[MAX_T][64];
    const char *mesh[2];
    mesh_endpoints(eps, 2);
    mesh[0] = eps[0];
    mesh[1] = eps[1];
    cpm_model *m = load_tp(0, 2, 0, -1);
    cpm_tp_mesh *t;
    cpm_error e = {0};
    assert_int_equal(cpm_tp_mesh_new(z, NULL, 0, 2, mesh, cpm_model_get_info(m)->hidden_size, 64, 200,
                                     &t, &e), 0);
    cpm_allreduce_backend b = cpm_tp_mesh_backend(t);
    cpm_model_set_allreduce_backend(m, &b);
    cpm_tp_mesh_begin(t, 1);
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int32_t seq = cpm_kv_cache_seq_new(kv, &e), pos[2] = {0, 1};
    int32_t seqs[2] = {seq, seq};
    float *out = malloc((size_t)2 * vocab(m) * sizeof(float));
    cpm_batch bt = {.n_tokens = 2, .ids = prompt_a, .seq = seqs, .pos = pos};
    assert_int_equal(cpm_model_forward(m, kv, &bt, out, &e), CPM_ETIMEDOUT);
    if (!strstr(e.msg, "tp rank 1") || !strstr(e.msg, "layer 0"))
        fail_msg("%s", e.msg);
    assert_int_equal(cpm_kv_cache_seq_len(kv, seq), 0);
    /* bad arguments are refused, not crashed on */
    cpm_tp_mesh *bad;
    assert_int_equal(cpm_tp_mesh_new(z, NULL, 2, 2, mesh, 64, 64, 200, &bad, &e), CPM_EINVAL);
    assert_int_equal(cpm_tp_mesh_new(z, NULL, 0, CPM_TP_MAX + 1, mesh, 64, 64, 200, &bad, &e), CPM_EINVAL);
    free(out);
    cpm_kv_cache_free(kv);
    cpm_tp_mesh_free(t);
    cpm_model_free(m);
    zmq_ctx_term(z);
}

/* Sends rank 1's word that it failed micro-batch seq to rank 0's mesh socket. */
static void push_failed(void *push, uint64_t seq) {
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = CPM_ERANGE;
    er.message = "unknown sequence 7";
    Cpm__V1__TpPartial tp = CPM__V1__TP_PARTIAL__INIT;
    tp.seq = seq;
    tp.rank = 1;
    tp.failed = &er;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_TP_PARTIAL;
    env.tp_partial = &tp;
    uint8_t *buf;
    size_t size;
    assert_int_equal(cpm_wire_pack(&env, &buf, &size, NULL), 0);
    assert_int_equal(zmq_send(push, buf, size, 0), (int)size);
    free(buf);
}

/* Sends rank 1's partial (seq, op) of `rows` rows of `value` to rank 0's mesh socket. */
static void push_partial(void *push, uint64_t seq, uint32_t op, int rows, int hidden, float value) {
    uint32_t shape[2] = {(uint32_t)rows, (uint32_t)hidden};
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    d.dtype = CPM__V1__DTYPE__DTYPE_F32;
    d.n_shape = 2;
    d.shape = shape;
    Cpm__V1__TpPartial tp = CPM__V1__TP_PARTIAL__INIT;
    tp.seq = seq;
    tp.op = op;
    tp.rank = 1;
    tp.partial = &d;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_TP_PARTIAL;
    env.tp_partial = &tp;
    uint8_t *buf;
    size_t size;
    cpm_error e = {0};
    assert_int_equal(cpm_wire_pack(&env, &buf, &size, &e), 0);
    size_t n = (size_t)rows * (size_t)hidden;
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = value;
    assert_int_equal(zmq_send(push, buf, size, ZMQ_SNDMORE), (int)size);
    assert_int_equal(zmq_send(push, x, n * sizeof *x, 0), (int)(n * sizeof *x));
    free(x);
    free(buf);
}

/* The mesh's tags order partials across lives of rank 0 (the stage starts its tags at its
 * start time, so a restarted rank 0 tags later): a partial of an earlier tag - a previous
 * life's, still queued - is dropped even when its op matches, and one of a later tag is
 * kept for its turn. Rank 1 is a raw socket pair here, so the test picks what arrives. */
static void test_mesh_orders_lives(void **state) {
    (void)state;
    const int hidden = 8, rows = 2;
    const size_t n = (size_t)rows * hidden;
    void *z = zmq_ctx_new();
    char eps[MAX_T][64];
    mesh_endpoints(eps, 2);
    const char *mesh[2] = {eps[0], eps[1]};
    void *sink = zmq_socket(z, ZMQ_PULL); /* takes rank 0's partials for rank 1 */
    assert_int_equal(zmq_bind(sink, eps[1]), 0);
    cpm_tp_mesh *t;
    cpm_error e = {0};
    assert_int_equal(cpm_tp_mesh_new(z, NULL, 0, 2, mesh, hidden, 4, 300, &t, &e), 0);
    void *push = zmq_socket(z, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sink, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_connect(push, eps[0]), 0);
    const uint64_t life1 = 1000, life2 = 5000000; /* tags of two lives of rank 0 */
    push_partial(push, life1 + 7, 0, rows, hidden, 100.0f); /* a previous life's, same op */
    push_partial(push, life2 + 2, 0, rows, hidden, 30.0f);  /* early: the next micro-batch's */
    push_partial(push, life2 + 1, 0, rows, hidden, 2.0f);   /* this one's */
    cpm_allreduce_backend b = cpm_tp_mesh_backend(t);
    float x[16];
    cpm_tp_mesh_begin(t, life2 + 1);
    for (size_t i = 0; i < n; i++)
        x[i] = 1.0f;
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), 0);
    for (size_t i = 0; i < n; i++)
        assert_true(x[i] == 3.0f);
    cpm_tp_mesh_begin(t, life2 + 2);
    for (size_t i = 0; i < n; i++)
        x[i] = 1.0f;
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), 0);
    for (size_t i = 0; i < n; i++)
        assert_true(x[i] == 31.0f);
    /* a life-1 tag that is now current again never is: nothing comes, the deadline names it */
    push_partial(push, life1 + 8, 0, rows, hidden, 100.0f);
    cpm_tp_mesh_begin(t, life2 + 3);
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), CPM_ETIMEDOUT);
    assert_non_null(strstr(e.msg, "tp rank 1"));
    /* rank 1 says it failed the micro-batch (a restarted rank handed sequences it never
     * saw): the all-reduce fails with its reason (CPM_ECLOSED), not at the deadline */
    cpm_tp_mesh_begin(t, life2 + 4);
    push_failed(push, life2 + 4);
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), CPM_ECLOSED);
    if (!strstr(e.msg, "failed this micro-batch: unknown sequence 7"))
        fail_msg("%s", e.msg);
    /* and the next micro-batch is not affected by it */
    push_partial(push, life2 + 5, 0, rows, hidden, 2.0f);
    cpm_tp_mesh_begin(t, life2 + 5);
    for (size_t i = 0; i < n; i++)
        x[i] = 1.0f;
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), 0);
    assert_true(x[0] == 3.0f);
    /* rank 1 sends a later micro-batch's partial while this one's is missing (its rank 0
     * restarted and went on): this one fails at once, the later one is kept */
    cpm_tp_mesh_begin(t, life2 + 6);
    push_partial(push, life2 + 9, 0, rows, hidden, 5.0f);
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), CPM_ECLOSED);
    if (!strstr(e.msg, "later micro-batch"))
        fail_msg("%s", e.msg);
    cpm_tp_mesh_begin(t, life2 + 9);
    for (size_t i = 0; i < n; i++)
        x[i] = 1.0f;
    assert_int_equal(b.sum(b.ud, 0, 0, x, n, &e), 0);
    assert_true(x[0] == 6.0f);
    zmq_close(push);
    cpm_tp_mesh_free(t);
    zmq_close(sink);
    zmq_ctx_term(z);
}

/* Rank 0 hears a rank refuse a forward (an Error reply on the fan-out, corr = the forward's
 * tag: it was still loading, say) and fails that micro-batch's all-reduce at once. */
static void test_mesh_hears_refusals(void **state) {
    (void)state;
    const int hidden = 8;
    void *z = zmq_ctx_new();
    char eps[MAX_T][64], stage1[96];
    mesh_endpoints(eps, 2);
    snprintf(stage1, sizeof stage1, "%s-stage", eps[1]);
    const char *mesh[2] = {eps[0], eps[1]};
    int zero = 0;
    void *sink = zmq_socket(z, ZMQ_PULL), *rank1 = zmq_socket(z, ZMQ_ROUTER);
    zmq_setsockopt(sink, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(rank1, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(sink, eps[1]), 0);
    assert_int_equal(zmq_bind(rank1, stage1), 0);
    cpm_tp_mesh *t;
    cpm_tp_fanout *f;
    cpm_error e = {0};
    const char *peers[1] = {stage1};
    assert_int_equal(cpm_tp_mesh_new(z, NULL, 0, 2, mesh, hidden, 4, 5000, &t, &e), 0);
    assert_int_equal(cpm_tp_fanout_new(z, NULL, peers, 1, 5000, &f, &e), 0);
    cpm_tp_mesh_watch_refusals(t, f);
    Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
    assert_int_equal(cpm_tp_fanout_send(f, 77, &fw, NULL, 0, &e), 0);
    cpm_tp_mesh_begin(t, 77);
    /* rank 1 refuses it, as its worker does while loading */
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    zmq_msg_init(&body);
    assert_true(zmq_msg_recv(&id, rank1, 0) > 0);
    assert_true(zmq_msg_recv(&body, rank1, 0) > 0);
    cpm_envelope *in = cpm__v1__envelope__unpack(NULL, zmq_msg_size(&body), zmq_msg_data(&body));
    assert_non_null(in);
    assert_int_equal(in->corr, 77);
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = CPM_EAGAIN;
    er.message = "stage is still loading";
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = in->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_ERROR;
    env.error = &er;
    uint8_t *buf;
    size_t size;
    assert_int_equal(cpm_wire_pack(&env, &buf, &size, NULL), 0);
    assert_true(zmq_msg_send(&id, rank1, ZMQ_SNDMORE) > 0);
    assert_int_equal(zmq_send(rank1, buf, size, 0), (int)size);
    free(buf);
    cpm__v1__envelope__free_unpacked(in, NULL);
    zmq_msg_close(&body);
    cpm_allreduce_backend b = cpm_tp_mesh_backend(t);
    float x[8] = {0};
    assert_int_equal(b.sum(b.ud, 0, 0, x, 8, &e), CPM_ECLOSED); /* not at the 5 s deadline */
    if (!strstr(e.msg, "failed this micro-batch: stage is still loading"))
        fail_msg("%s", e.msg);
    cpm_tp_fanout_free(f);
    cpm_tp_mesh_free(t);
    zmq_close(rank1);
    zmq_close(sink);
    zmq_ctx_term(z);
}

/* A GPTQ config is refused before any weight is read: a temporary directory holding
 * only this model's config.json with a quantization_config added is enough. */
static void test_refuses_quantized(void **state) {
    (void)state;
    char src[1024], dir[] = "/tmp/cpm-test-tp-XXXXXX", dst[1100];
    snprintf(src, sizeof src, "%s/config.json", model_dir);
    FILE *f = fopen(src, "rb");
    assert_non_null(f);
    static char text[1 << 16];
    size_t n = fread(text, 1, sizeof text - 256, f);
    fclose(f);
    text[n] = '\0';
    char *close = strrchr(text, '}');
    assert_non_null(close);
    snprintf(close, 256, ", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4, "
             "\"group_size\": 32, \"desc_act\": false, \"sym\": true}}\n");
    assert_non_null(mkdtemp(dir));
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    f = fopen(dst, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    cpm_model_opts o = cpm_model_opts_default();
    o.tp_size = 2;
    cpm_model *m;
    cpm_error e = {0};
    int rc = cpm_model_load(dir, &o, &m, &e);
    unlink(dst);
    rmdir(dir);
    assert_int_equal(rc, CPM_EUNSUPPORTED);
    if (!strstr(e.msg, "tensor parallelism over quantized"))
        fail_msg("%s", e.msg);
}

static void test_refusals(void **state) {
    (void)state;
    cpm_model_opts o = cpm_model_opts_default();
    cpm_model *m;
    cpm_error e = {0};
    o.tp_size = 2;
    o.tp_rank = 2;
    assert_int_equal(cpm_model_load(model_dir, &o, &m, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "rank 2 of 2"));
    o.tp_size = 64; /* no MiniCPM here has 64 KV heads */
    o.tp_rank = 0;
    assert_int_equal(cpm_model_load(model_dir, &o, &m, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "do not split over 64"));

    /* a rank without its all-reduce refuses to run rather than emit partial sums */
    o.tp_size = 2;
    assert_int_equal(cpm_model_load(model_dir, &o, &m, &e), 0);
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int32_t id = 1, seq = cpm_kv_cache_seq_new(kv, &e), pos = 0;
    float *out = malloc((size_t)vocab(m) * 4);
    cpm_batch b = {.n_tokens = 1, .ids = &id, .seq = &seq, .pos = &pos};
    assert_int_equal(cpm_model_forward(m, kv, &b, out, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "no all-reduce backend"));
    assert_int_equal(cpm_kv_cache_seq_len(kv, seq), 0);
    free(out);
    cpm_kv_cache_free(kv);
    cpm_model_free(m);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_tp GOLDEN_MODEL_DIR\n");
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tp2_whole),
        cmocka_unit_test(test_tp2_chunked),
        cmocka_unit_test(test_tp2_interleaved),
        cmocka_unit_test(test_tp4_where_heads_allow),
        cmocka_unit_test(test_tp2_later_stage),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_refuses_quantized),
        cmocka_unit_test(test_mesh_matches_in_process),
        cmocka_unit_test(test_mesh_missing_rank_times_out),
        cmocka_unit_test(test_mesh_orders_lives),
        cmocka_unit_test(test_mesh_hears_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
