/* Unit tests for shard/engine/model/model.c: the forward pass gives the same logits
 * however the work is cut - sequences batched together or alone, prefill in
 * one call or in chunks, the layers in one stage or split into a pipeline.
 * This is what lets the cluster promise the tokens of one process. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kv_cache.h"
#include "shard/engine/model/model.h"

static const char *model_dir;
#define N 12

static const int32_t prompt_a[N] = {1, 7, 42, 99, 3, 500, 17, 2, 45, 700, 8, 9};
static const int32_t prompt_b[N] = {1, 300, 301, 302, 11, 12, 13, 14, 15, 16, 1023, 5};

static cpm_model *load(int begin, int end, int threads) {
    cpm_model_opts o = cpm_model_opts_default();
    o.layer_begin = begin;
    o.layer_end = end;
    o.n_threads = threads;
    cpm_model *m;
    cpm_error e = {0};
    if (cpm_model_load(model_dir, &o, &m, &e))
        fail_msg("%s", e.msg);
    return m;
}

/* Logits of every position of one prompt, fed in chunks of `chunk`. */
static float *run_alone(cpm_model *m, const int32_t *ids, int chunk) {
    int V = cpm_model_get_info(m)->vocab_size;
    float *out = malloc((size_t)N * V * sizeof(float));
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int s = cpm_kv_cache_seq_new(kv, &e);
    for (int at = 0; at < N; at += chunk) {
        int c = N - at < chunk ? N - at : chunk;
        int32_t seq[N], pos[N];
        for (int i = 0; i < c; i++) {
            seq[i] = s;
            pos[i] = at + i;
        }
        cpm_batch b = {.n_tokens = c, .ids = ids + at, .seq = seq, .pos = pos};
        assert_int_equal(cpm_model_forward(m, kv, &b, out + (size_t)at * V, &e), 0);
    }
    cpm_kv_cache_free(kv);
    return out;
}

static double max_rel(const float *a, const float *b, size_t n) {
    double d = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs((double)b[i]));
    }
    return d / mx;
}

static void test_chunked_prefill_matches(void **state) {
    (void)state;
    cpm_model *m = load(0, -1, 1);
    int V = cpm_model_get_info(m)->vocab_size;
    float *full = run_alone(m, prompt_a, N), *one = run_alone(m, prompt_a, 1);
    float *five = run_alone(m, prompt_a, 5);
    assert_true(max_rel(one, full, (size_t)N * V) < 1e-5);
    assert_true(max_rel(five, full, (size_t)N * V) < 1e-5);
    free(full);
    free(one);
    free(five);
    cpm_model_free(m);
}

/* Two sequences interleaved row by row in the same batches. */
static void test_interleaved_sequences_match(void **state) {
    (void)state;
    cpm_model *m = load(0, -1, 2);
    int V = cpm_model_get_info(m)->vocab_size;
    float *ra = run_alone(m, prompt_a, N), *rb = run_alone(m, prompt_b, N);
    float *out = malloc((size_t)2 * N * V * sizeof(float));
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
    assert_int_equal(cpm_model_forward(m, kv, &b, out, &e), 0);
    for (int i = 0; i < N; i++) {
        assert_true(max_rel(out + (size_t)(2 * i) * V, ra + (size_t)i * V, (size_t)V) < 1e-5);
        assert_true(max_rel(out + (size_t)(2 * i + 1) * V, rb + (size_t)i * V, (size_t)V) < 1e-5);
    }
    cpm_kv_cache_free(kv);
    free(out);
    free(ra);
    free(rb);
    cpm_model_free(m);
}

/* Layers [0,1) then [1,L) through two models and two caches, as two stages. */
static void test_pipeline_split_matches(void **state) {
    (void)state;
    cpm_model *whole = load(0, -1, 1);
    const cpm_model_info *in = cpm_model_get_info(whole);
    int V = in->vocab_size, H = in->hidden_size, L = in->n_layers;
    float *ref = run_alone(whole, prompt_a, N);
    cpm_model *s0 = load(0, 1, 1), *s1 = load(1, L, 1);
    assert_true(cpm_model_get_info(s0)->first_stage && !cpm_model_get_info(s0)->last_stage);
    cpm_error e = {0};
    cpm_kv_geometry g0 = cpm_model_kv_geometry(s0), g1 = cpm_model_kv_geometry(s1);
    cpm_kv_cache *k0 = cpm_kv_cache_new(&g0, 64, 1, &e), *k1 = cpm_kv_cache_new(&g1, 64, 1, &e);
    int q0 = cpm_kv_cache_seq_new(k0, &e), q1 = cpm_kv_cache_seq_new(k1, &e);
    int32_t seq0[N], seq1[N], pos[N];
    for (int i = 0; i < N; i++)
        seq0[i] = q0, seq1[i] = q1, pos[i] = i;
    float *act = malloc((size_t)N * H * sizeof(float)), *out = malloc((size_t)N * V * 4);
    cpm_batch b0 = {.n_tokens = N, .ids = prompt_a, .seq = seq0, .pos = pos};
    assert_int_equal(cpm_model_forward(s0, k0, &b0, act, &e), 0);
    cpm_batch b1 = {.n_tokens = N, .hidden = act, .seq = seq1, .pos = pos};
    assert_int_equal(cpm_model_forward(s1, k1, &b1, out, &e), 0);
    assert_true(max_rel(out, ref, (size_t)N * V) < 1e-6);
    cpm_kv_cache_free(k0);
    cpm_kv_cache_free(k1);
    free(act);
    free(out);
    free(ref);
    cpm_model_free(s0);
    cpm_model_free(s1);
    cpm_model_free(whole);
}

typedef struct progress {
    size_t calls, last_done, total;
    bool monotone;
} progress;

static void on_progress(void *ud, size_t done, size_t total) {
    progress *p = ud;
    p->monotone = p->monotone && done >= p->last_done && done <= total && (!p->calls || total == p->total);
    p->calls++;
    p->last_done = done;
    p->total = total;
}

/* Paging in touches every mapped weight once, reports progress up to the total, and the
 * stages of a split page in what the whole model does (the tied embedding twice). */
static void test_page_in(void **state) {
    (void)state;
    cpm_model *whole = load(0, -1, 1);
    progress p = {.monotone = true};
    size_t n = cpm_model_page_in(whole, on_progress, &p);
    assert_true(n > 0);
    assert_true(p.monotone);
    assert_true(p.calls >= 2);
    assert_int_equal(p.last_done, n);
    assert_int_equal(p.total, n);
    int L = cpm_model_get_info(whole)->n_layers;
    cpm_model *s0 = load(0, 1, 1), *s1 = load(1, L, 1);
    size_t split = cpm_model_page_in(s0, NULL, NULL) + cpm_model_page_in(s1, NULL, NULL);
    const cpm_model_info *in = cpm_model_get_info(whole);
    size_t embed = (size_t)in->vocab_size * (size_t)in->hidden_size * 4; /* at most (f32) */
    assert_true(split >= n && split <= n + embed);
    cpm_model_free(s0);
    cpm_model_free(s1);
    cpm_model_free(whole);
}

static void test_bad_batches(void **state) {
    (void)state;
    cpm_model *m = load(0, -1, 1);
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(m);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 1, &e);
    int s = cpm_kv_cache_seq_new(kv, &e);
    int32_t id = 5000, seq = s, pos = 0;
    float *out = malloc(1024 * 4);
    cpm_batch b = {.n_tokens = 1, .ids = &id, .seq = &seq, .pos = &pos};
    assert_int_equal(cpm_model_forward(m, kv, &b, out, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "token id 5000"));
    b.n_tokens = 0;
    assert_int_equal(cpm_model_forward(m, kv, &b, out, &e), CPM_ELIMIT);
    b.n_tokens = 1;
    b.ids = NULL;
    assert_int_equal(cpm_model_forward(m, kv, &b, out, &e), CPM_EINVAL);
    assert_int_equal(cpm_kv_cache_seq_len(kv, s), 0); /* nothing committed */
    free(out);
    cpm_kv_cache_free(kv);
    cpm_model_free(m);

    cpm_model_opts o = cpm_model_opts_default();
    o.layer_begin = 2;
    o.layer_end = 1;
    assert_int_equal(cpm_model_load(model_dir, &o, &m, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "layer range"));
}

/* MiniCPM-S (FATReLU): the sparse FFN, on by default, gives the dense FFN's logits up to
 * summation order, reads less, and gives a row the same bits alone or in a batch; other
 * models run the dense FFN either way. */
static void test_ffn_sparse_matches_dense(void **state) {
    (void)state;
    cpm_model_opts o = cpm_model_opts_default();
    o.n_threads = 2;
    o.ffn_dense = true;
    cpm_model *sp = load(0, -1, 2), *dn;
    cpm_error e = {0};
    assert_int_equal(cpm_model_load(model_dir, &o, &dn, &e), 0);
    assert_false(cpm_model_get_info(dn)->ffn_sparse);
    int V = cpm_model_get_info(sp)->vocab_size;
    bool sparse = cpm_model_get_info(sp)->ffn_sparse;
    print_message("%s: FFN %s\n", model_dir, sparse ? "sparse" : "dense");
    float *a = run_alone(sp, prompt_a, N), *one = run_alone(sp, prompt_a, 1);
    float *b = run_alone(dn, prompt_a, N);
    assert_true(max_rel(a, b, (size_t)N * V) < 1e-5);
    for (size_t i = 0; i < (size_t)N * V; i++) /* decode rows vs 4-row tiles: same bits */
        assert_true(a[i] == one[i]);
    cpm_ffn_stats st;
    cpm_model_ffn_stats(sp, &st, true);
    assert_true(st.weight_bytes <= st.dense_bytes);
    assert_true(st.rows > 0 || cpm_model_get_info(sp)->n_experts > 0); /* MoE: not counted */
    if (sparse) {
        assert_true(st.active > 0 && st.active < st.neurons);
        assert_true(st.weight_bytes < st.dense_bytes);
    }
    cpm_model_ffn_stats(sp, &st, false);
    assert_true(st.rows == 0 && st.weight_bytes == 0);
    free(a);
    free(one);
    free(b);
    cpm_model_free(sp);
    cpm_model_free(dn);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_model GOLDEN_MODEL_DIR\n");
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunked_prefill_matches),
        cmocka_unit_test(test_interleaved_sequences_match),
        cmocka_unit_test(test_pipeline_split_matches),
        cmocka_unit_test(test_bad_batches),
        cmocka_unit_test(test_page_in),
        cmocka_unit_test(test_ffn_sparse_matches_dense),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
