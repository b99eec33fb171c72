/* test_expert.c - expert parallelism (shard/expert.c, shard/expert_client.c and the
 * engine's expert backend hook in shard/engine/model/ffn.c).
 *
 * 1. In process, no sockets: a stage model that binds no experts, with a backend
 *    calling cpm_expert_ffn on two other models (experts [0, 4) and [4, 8)), gives
 *    logits bit-identical to the plain local MoE path - batched, chunked, decoding.
 *    A failing backend fails the forward and leaves the KV cache as it was.
 * 2. Over real zmq sockets: two expert services on a libuv loop (own thread) and the
 *    stage's client backend give the same bits; malformed ExpertForwards get an
 *    Error reply and the services keep serving; a service that does not answer
 *    fails the call at the deadline.
 * argv[1] = a MiniCPM-MoE golden model directory (8 experts, top-2). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "services/common/transport.h"
#include "shard/expert.h"
#include "shard/expert_client.h"
#include "shard/engine/kv_cache.h"
#include "shard/engine/model/model.h"

static const char *model_dir;
#define N 12

static const int32_t prompt_a[N] = {1, 7, 42, 99, 3, 500, 17, 2, 45, 700, 8, 9};
static const int32_t prompt_b[N] = {1, 300, 301, 302, 11, 12, 13, 14, 15, 16, 1023, 5};

static cpm_model *load(int expert_begin, int expert_end, int threads, int max_batch) {
    cpm_model_opts o = cpm_model_opts_default();
    o.n_threads = threads;
    o.expert_begin = expert_begin;
    o.expert_end = expert_end;
    o.max_batch_tokens = max_batch;
    cpm_model *m;
    cpm_error e = {0};
    if (cpm_model_load(model_dir, &o, &m, &e))
        fail_msg("%s", e.msg);
    return m;
}

/* Logits of both prompts: prefill chunk by chunk with the two sequences batched
 * together, then `decode` single-token steps of both (fed the prompt's ids again). */
static float *run(cpm_model *m, int chunk, int decode, int *ret_rc) {
    int V = cpm_model_get_info(m)->vocab_size;
    size_t rows = (size_t)2 * (N + decode);
    float *out = calloc(rows * (size_t)V, sizeof(float));
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 256, 2, &e);
    int sa = cpm_kv_cache_seq_new(kv, &e), sb = cpm_kv_cache_seq_new(kv, &e);
    size_t done = 0;
    *ret_rc = 0;
    for (int at = 0, c = 0; at < N + decode && *ret_rc == 0; at += c) {
        c = at < N ? (N - at < chunk ? N - at : chunk) : 1;
        int32_t ids[2 * N], seq[2 * N], pos[2 * N];
        for (int i = 0; i < c; i++) {
            ids[i] = prompt_a[(at + i) % N];
            ids[c + i] = prompt_b[(at + i) % N];
            seq[i] = sa;
            seq[c + i] = sb;
            pos[i] = pos[c + i] = at + i;
        }
        cpm_batch b = {.n_tokens = 2 * c, .ids = ids, .seq = seq, .pos = pos};
        *ret_rc = cpm_model_forward(m, kv, &b, out + done * V, &e);
        if (*ret_rc)
            fprintf(stderr, "forward: %s\n", e.msg);
        done += (size_t)(2 * c);
    }
    cpm_kv_cache_free(kv);
    return out;
}

/* ---- 1. in process ---- */

typedef struct local_experts {
    cpm_model *part[2]; /* experts [0, 4) and [4, 8) */
    int calls, fail_at;
} local_experts;

static int local_run(void *ud, int layer, int n, const int *expert, const int *n_rows, const float *x,
                     float *y, cpm_error *err) {
    local_experts *le = ud;
    if (++le->calls == le->fail_at)
        return cpm_error_set(err, CPM_ETIMEDOUT, "expert1: no reply (test)");
    int H = cpm_model_get_info(le->part[0])->hidden_size;
    size_t at = 0;
    for (int g = 0; g < n; g++) {
        cpm_model *m = le->part[expert[g] >= 4];
        int rc = cpm_expert_ffn(m, layer, expert[g], x + at * H, n_rows[g], y + at * H, err);
        if (rc)
            return rc;
        at += (size_t)n_rows[g];
    }
    return 0;
}

static void assert_same_bits(const float *a, const float *b, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof *a))
            fail_msg("%s: element %zu differs: %.9g vs %.9g", what, i, a[i], b[i]);
}

static void test_backend_bit_identical(void **state) {
    (void)state;
    cpm_model *local = load(0, -1, 2, 64);
    int V = cpm_model_get_info(local)->vocab_size;
    assert_int_equal(cpm_model_get_info(local)->n_experts, 8);
    /* the stage binds no experts; the parts run with other thread counts and chunk sizes */
    cpm_model *stage = load(0, 0, 1, 64);
    local_experts le = {.part = {load(0, 4, 3, 5), load(4, 8, 1, 512)}};
    cpm_expert_backend b = {.ud = &le, .run = local_run};
    cpm_model_set_expert_backend(stage, &b);
    const int chunks[] = {N, 5, 1};
    for (size_t k = 0; k < sizeof chunks / sizeof *chunks; k++) {
        int rc1, rc2;
        float *want = run(local, chunks[k], 4, &rc1), *got = run(stage, chunks[k], 4, &rc2);
        assert_int_equal(rc1, 0);
        assert_int_equal(rc2, 0);
        char what[64];
        snprintf(what, sizeof what, "chunk %d", chunks[k]);
        assert_same_bits(got, want, (size_t)2 * (N + 4) * V, what);
        free(want);
        free(got);
    }
    /* the backend is called once per MoE layer and forward call */
    assert_true(le.calls > 0);
    cpm_model_free(stage);
    cpm_model_free(le.part[0]);
    cpm_model_free(le.part[1]);
    cpm_model_free(local);
}

static void test_backend_failure(void **state) {
    (void)state;
    cpm_model *stage = load(0, 0, 1, 64);
    local_experts le = {.part = {load(0, 4, 1, 64), load(4, 8, 1, 64)}, .fail_at = 2};
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(stage);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int s = cpm_kv_cache_seq_new(kv, &e);
    int32_t seq[3] = {s, s, s}, pos[3] = {0, 1, 2};
    cpm_batch bt = {.n_tokens = 3, .ids = prompt_a, .seq = seq, .pos = pos};
    float *out = malloc((size_t)3 * cpm_model_get_info(stage)->vocab_size * sizeof(float));
    /* no backend and no experts here: refused, not garbage */
    assert_int_equal(cpm_model_forward(stage, kv, &bt, out, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "not loaded here"));
    cpm_expert_backend b = {.ud = &le, .run = local_run};
    cpm_model_set_expert_backend(stage, &b);
    /* the second layer's call fails: the forward fails with the backend's message */
    assert_int_equal(cpm_model_forward(stage, kv, &bt, out, &e), CPM_ETIMEDOUT);
    assert_non_null(strstr(e.msg, "expert1"));
    assert_int_equal(cpm_kv_cache_seq_len(kv, s), 0);
    assert_int_equal(cpm_model_forward(stage, kv, &bt, out, &e), 0); /* and works again */
    assert_int_equal(cpm_kv_cache_seq_len(kv, s), 3);
    /* cpm_expert_ffn refuses experts and layers it does not hold */
    float x[64] = {0}, y[64];
    assert_int_equal(cpm_expert_ffn(le.part[0], 0, 4, x, 1, y, &e), CPM_ERANGE);
    assert_int_equal(cpm_expert_ffn(le.part[0], 7, 0, x, 1, y, &e), CPM_ERANGE);
    free(out);
    cpm_kv_cache_free(kv);
    cpm_model_free(stage);
    cpm_model_free(le.part[0]);
    cpm_model_free(le.part[1]);
}

/* ---- 2. over sockets ---- */

typedef struct svc_fx {
    uv_loop_t loop;
    uv_async_t stop;
    pthread_t thread;
    void *z;
    cpm_expert *ex[2];
    atomic_int ready, load_failed;
} svc_fx;

static void on_ready(cpm_expert *ex, int status, const cpm_error *err, void *user) {
    (void)ex;
    svc_fx *f = user;
    if (status)
        fprintf(stderr, "expert load: %s\n", err->msg), atomic_fetch_add(&f->load_failed, 1);
    atomic_fetch_add(&f->ready, 1);
}

static void on_stop(uv_async_t *a) {
    svc_fx *f = a->data;
    cpm_expert_free(f->ex[0]);
    cpm_expert_free(f->ex[1]);
    uv_close((uv_handle_t *)a, NULL);
}

static void *loop_thread(void *arg) {
    svc_fx *f = arg;
    uv_run(&f->loop, UV_RUN_DEFAULT);
    return NULL;
}

static const char *eps[2] = {"inproc://expert0", "inproc://expert1"};

static int svc_setup(void **state) {
    svc_fx *f = calloc(1, sizeof *f);
    uv_loop_init(&f->loop);
    f->z = zmq_ctx_new();
    for (int i = 0; i < 2; i++) {
        cpm_expert_opts o = cpm_expert_opts_default();
        o.model_dir = model_dir;
        o.expert_begin = 4 * i;
        o.expert_end = i ? -1 : 4; /* `end` */
        o.threads = 2;
        o.max_batch_tokens = 3; /* smaller than a group: exercises chunking */
        o.bind = eps[i];
        o.name = i ? "expert1" : "expert0";
        cpm_error e = {0};
        if (cpm_expert_new(&f->loop, f->z, &o, on_ready, f, &f->ex[i], &e))
            fail_msg("%s", e.msg);
    }
    uv_async_init(&f->loop, &f->stop, on_stop);
    f->stop.data = f;
    pthread_create(&f->thread, NULL, loop_thread, f);
    for (int i = 0; i < 3000 && atomic_load(&f->ready) < 2; i++)
        usleep(10000);
    assert_int_equal(atomic_load(&f->ready), 2);
    assert_int_equal(atomic_load(&f->load_failed), 0);
    *state = f;
    return 0;
}

static int svc_teardown(void **state) {
    svc_fx *f = *state;
    uv_async_send(&f->stop);
    pthread_join(f->thread, NULL);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    zmq_ctx_term(f->z);
    free(f);
    return 0;
}

static void test_services_bit_identical(void **state) {
    svc_fx *f = *state;
    cpm_model *local = load(0, -1, 1, 64), *stage = load(0, 0, 2, 64);
    int V = cpm_model_get_info(local)->vocab_size, H = cpm_model_get_info(local)->hidden_size;
    cpm_expert_peer peers[2] = {{eps[0], 0, 4, "expert0"}, {eps[1], 4, 8, "expert1"}};
    cpm_expert_client *cl;
    cpm_error e = {0};
    if (cpm_expert_client_new(f->z, NULL, peers, 2, H, 10000, &cl, &e))
        fail_msg("%s", e.msg);
    cpm_expert_backend b = cpm_expert_client_backend(cl);
    cpm_model_set_expert_backend(stage, &b);
    for (int chunk = N; chunk >= 4; chunk -= 8) {
        int rc1, rc2;
        float *want = run(local, chunk, 3, &rc1), *got = run(stage, chunk, 3, &rc2);
        assert_int_equal(rc1, 0);
        assert_int_equal(rc2, 0);
        assert_same_bits(got, want, (size_t)2 * (N + 3) * V, "over sockets");
        free(want);
        free(got);
    }
    cpm_expert_client_free(cl);
    cpm_model_free(stage);
    cpm_model_free(local);
}

/* One ExpertForward by hand; returns the reply's error code (0 = an ExpertResult). */
static int call(svc_fx *f, int svc, uint32_t layer, size_t n, const uint32_t *expert,
                const uint32_t *n_rows, uint32_t rows, uint32_t width, size_t bytes, char *msg) {
    uint32_t shape[2] = {rows, width};
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    d.dtype = CPM__V1__DTYPE__DTYPE_F32;
    d.n_shape = 2;
    d.shape = shape;
    Cpm__V1__ExpertForward fw = CPM__V1__EXPERT_FORWARD__INIT;
    fw.layer = layer;
    fw.n_expert = fw.n_n_rows = n;
    fw.expert = (uint32_t *)expert;
    fw.n_rows = (uint32_t *)n_rows;
    fw.rows = &d;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD;
    env.expert_forward = &fw;
    void *x = calloc(bytes ? bytes : 1, 1);
    cpm_payload t = {.data = x, .size = bytes};
    cpm_inmsg *r = NULL;
    cpm_error e = {0};
    assert_int_equal(cpm_rpc_call(f->z, NULL, eps[svc], &env, &t, 5000, &r, &e), 0);
    free(x);
    int rc = 0;
    if (r->env->body_case == CPM__V1__ENVELOPE__BODY_ERROR) {
        rc = r->env->error->code;
        snprintf(msg, 256, "%s", r->env->error->message);
    } else {
        assert_int_equal(r->env->body_case, CPM__V1__ENVELOPE__BODY_EXPERT_RESULT);
        assert_int_equal(r->tensor_size, bytes);
    }
    cpm_inmsg_free(r);
    return rc;
}

static void test_services_refuse_bad_requests(void **state) {
    svc_fx *f = *state;
    char msg[256] = "";
    const uint32_t H = 64, two[2] = {1, 2}, rows[2] = {2, 1}, out_of_range[1] = {5}, desc[2] = {2, 1};
    /* good: experts 1 and 2 on 3 rows */
    assert_int_equal(call(f, 0, 1, 2, two, rows, 3, H, 3 * H * 4, msg), 0);
    /* expert 5 belongs to the other service */
    assert_int_equal(call(f, 0, 0, 1, out_of_range, rows, 2, H, 2 * H * 4, msg), CPM_ERANGE);
    assert_non_null(strstr(msg, "outside this service's [0, 4)"));
    /* layer 2 of a two-layer model */
    assert_int_equal(call(f, 0, 2, 2, two, rows, 3, H, 3 * H * 4, msg), CPM_ERANGE);
    assert_non_null(strstr(msg, "layer 2"));
    /* rows of the wrong width */
    assert_int_equal(call(f, 0, 0, 2, two, rows, 3, H + 1, 3 * (H + 1) * 4, msg), CPM_ESHAPE);
    /* experts not ascending */
    assert_int_equal(call(f, 0, 0, 2, desc, rows, 3, H, 3 * H * 4, msg), CPM_EINVAL);
    /* the frame disagrees with n_rows / with its own shape: the wire check refuses */
    assert_int_equal(call(f, 0, 0, 2, two, rows, 4, H, 4 * H * 4, msg), CPM_ESHAPE);
    assert_int_equal(call(f, 0, 0, 2, two, rows, 3, H, 3 * H * 4 - 4, msg), CPM_ESHAPE);
    /* bytes that are no protobuf at all */
    cpm_envelope *env = NULL;
    cpm_error e = {0};
    void *s = zmq_socket(f->z, ZMQ_DEALER);
    int zero = 0, tmo = 5000;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof tmo);
    zmq_connect(s, eps[1]);
    zmq_send(s, "\xff\xff\xff garbage", 12, 0);
    char buf[512];
    int got = zmq_recv(s, buf, sizeof buf, 0);
    assert_true(got > 0);
    assert_int_equal(cpm_wire_unpack(buf, (size_t)got, -1, &env, &e), 0);
    assert_int_equal(env->body_case, CPM__V1__ENVELOPE__BODY_ERROR);
    assert_int_equal(env->error->code, CPM_EFORMAT);
    cpm_wire_free(env);
    zmq_close(s);
    /* and both services still serve */
    const uint32_t hi[2] = {6, 7};
    assert_int_equal(call(f, 1, 1, 2, hi, rows, 3, H, 3 * H * 4, msg), 0);
    assert_int_equal(call(f, 0, 0, 2, two, rows, 3, H, 3 * H * 4, msg), 0);
}

static void test_client_timeout(void **state) {
    svc_fx *f = *state;
    /* expert1 is an endpoint nobody binds: the call fails at its deadline */
    cpm_expert_peer peers[2] = {{eps[0], 0, 4, "expert0"}, {"inproc://nobody", 4, 8, "expert1"}};
    cpm_expert_client *cl;
    cpm_error e = {0};
    assert_int_equal(cpm_expert_client_new(f->z, NULL, peers, 2, 64, 200, &cl, &e), 0);
    cpm_expert_backend b = cpm_expert_client_backend(cl);
    float x[3 * 64] = {0}, y[3 * 64];
    int ids[2] = {1, 6}, rows[2] = {2, 1};
    uint64_t t0 = uv_hrtime();
    assert_int_equal(b.run(b.ud, 0, 2, ids, rows, x, y, &e), CPM_ETIMEDOUT);
    assert_non_null(strstr(e.msg, "expert1"));
    assert_true(uv_hrtime() - t0 < 3000000000u);
    /* groups only for the live service still work on the same client */
    int ids0[1] = {3}, rows0[1] = {3};
    assert_int_equal(b.run(b.ud, 1, 1, ids0, rows0, x, y, &e), 0);
    cpm_expert_client_free(cl);
    /* ranges that do not tile are refused */
    cpm_expert_peer gap[2] = {{eps[0], 0, 3, NULL}, {eps[1], 4, 8, NULL}};
    assert_int_equal(cpm_expert_client_new(f->z, NULL, gap, 2, 64, 200, &cl, &e), CPM_EINVAL);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MOE_MODEL_DIR\n", argv[0]);
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backend_bit_identical),
        cmocka_unit_test(test_backend_failure),
        cmocka_unit_test_setup_teardown(test_services_bit_identical, svc_setup, svc_teardown),
        cmocka_unit_test_setup_teardown(test_services_refuse_bad_requests, svc_setup, svc_teardown),
        cmocka_unit_test_setup_teardown(test_client_timeout, svc_setup, svc_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
