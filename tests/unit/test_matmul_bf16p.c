/* test_matmul_bf16p.c - unit tests for shard/engine/kernels/matmul_bf16p.c: the
 * panel layout (pairs, padding, F16 rounded to bf16), every kernel against a
 * double reference on bf16(x), the VDPBF16PS kernel against the scalar order,
 * and a row's bits independent of its batch (decode rows, K blocks, row
 * groups), the threads, and of sharing x with other weights (multi). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kernels/dtype.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/matmul_bf16p.h"
#include "support/close.h"

static uint32_t rng = 4242;
static float frand(void) {
    rng = rng * 1664525u + 1013904223u;
    return (float)((rng >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* W [N, ld] as bf16 (or f16), x [M, K] f32. */
static uint16_t *make_w(int N, int ld, cpm_dtype t) {
    uint16_t *w = malloc(sizeof(uint16_t) * (size_t)N * (size_t)ld);
    assert_non_null(w);
    for (size_t i = 0; i < (size_t)N * (size_t)ld; i++) {
        float v = frand() * (i % 97 == 0 ? 8.0f : 1.0f); /* some outliers */
        w[i] = t == CPM_DTYPE_BF16 ? cpm_f32_to_bf16(v) : cpm_f32_to_f16(v);
    }
    return w;
}

static float *make_x(int M, int K) {
    float *x = malloc(sizeof(float) * (size_t)M * (size_t)K);
    assert_non_null(x);
    for (size_t i = 0; i < (size_t)M * (size_t)K; i++)
        x[i] = frand();
    return x;
}

static float w_as_bf16(const uint16_t *w, cpm_dtype t, size_t i) {
    return t == CPM_DTYPE_BF16 ? cpm_bf16_to_f32(w[i])
                               : cpm_bf16_to_f32(cpm_f32_to_bf16(cpm_f16_to_f32(w[i])));
}

static void test_layout(void **state) {
    (void)state;
    const int N = 70, K = 5, ld = 7; /* two panels, the second mostly padding; an odd K */
    cpm_pool *pool = cpm_pool_new(2);
    for (int t = 0; t < 2; t++) {
        cpm_dtype dt = t ? CPM_DTYPE_F16 : CPM_DTYPE_BF16;
        uint16_t *w = make_w(N, ld, dt);
        cpm_bf16p *p = cpm_bf16p_from(t ? pool : NULL, w, dt, N, K, ld);
        assert_non_null(p);
        assert_int_equal(p->Q, 3);
        assert_int_equal(p->panels, 2);
        assert_int_equal(cpm_bf16p_bytes(p), (size_t)2 * 3 * 64 * 2 * sizeof(uint16_t));
        for (int n = 0; n < 128; n++)
            for (int k = 0; k < 6; k++) {
                uint16_t got = p->data[(((size_t)(n / 64) * 3 + (size_t)(k / 2)) * 64 +
                                        (size_t)(n % 64)) * 2 + (size_t)(k & 1)];
                float want = n < N && k < K ? w_as_bf16(w, dt, (size_t)n * ld + (size_t)k) : 0.0f;
                if (cpm_bf16_to_f32(got) != want)
                    fail_msg("%s w[%d,%d]: %g, want %g", cpm_dtype_name(dt), n, k,
                             cpm_bf16_to_f32(got), want);
            }
        cpm_bf16p_free(p);
        free(w);
    }
    assert_null(cpm_bf16p_from(NULL, NULL, CPM_DTYPE_F32, 4, 4, 4));
    uint16_t one = 0;
    assert_null(cpm_bf16p_from(NULL, &one, CPM_DTYPE_BF16, 0, 1, 1));
    cpm_bf16p_free(NULL);
    cpm_pool_free(pool);
}

/* y = bf16(x) · bf16(W)ᵀ in double. */
static void reference(float *y, const float *x, const uint16_t *w, cpm_dtype t, int M, int N,
                      int K) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = 0;
            for (int k = 0; k < K; k++)
                acc += (double)cpm_bf16_to_f32(cpm_f32_to_bf16(x[(size_t)m * K + k])) *
                       w_as_bf16(w, t, (size_t)n * K + (size_t)k);
            y[(size_t)m * N + n] = (float)acc;
        }
}

typedef struct shape {
    int M, N, K;
} shape;
/* decode rows, a ragged tile, several K blocks, more rows than a group holds */
static const shape shapes[] = {{1, 1, 1},   {1, 64, 33},   {3, 70, 129},  {6, 128, 256},
                               {16, 96, 1536}, {61, 65, 300}, {130, 20, 40}};
#define NSHAPES (int)(sizeof(shapes) / sizeof(shapes[0]))

/* Every ISA, both weight types, against the reference; the panel kernel and the
 * scalar order agree to rounding. */
static void test_against_reference(void **state) {
    (void)state;
    cpm_pool *pool = cpm_pool_new(2);
    assert_non_null(pool);
    for (int c = 0; c < NSHAPES; c++) {
        shape s = shapes[c];
        cpm_dtype dt = c % 2 ? CPM_DTYPE_F16 : CPM_DTYPE_BF16;
        uint16_t *w = make_w(s.N, s.K, dt);
        float *x = make_x(s.M, s.K);
        cpm_bf16p *p = cpm_bf16p_from(pool, w, dt, s.N, s.K, s.K);
        assert_non_null(p);
        size_t ny = (size_t)s.M * s.N;
        float *ref = malloc(sizeof(float) * ny), *y = malloc(sizeof(float) * ny);
        float *scalar = malloc(sizeof(float) * ny);
        assert_true(ref && y && scalar);
        reference(ref, x, w, dt, s.M, s.N, s.K);
        for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
            cpm_isa_force((cpm_isa)isa);
            cpm_matmul_bf16p(isa % 2 ? pool : NULL, y, s.N, x, s.K, p, s.M);
            check_close(y, ref, s.M, s.N, 1e-5, cpm_isa_name((cpm_isa)isa));
            if (isa == CPM_ISA_SCALAR)
                memcpy(scalar, y, sizeof(float) * ny);
            else
                check_close(y, scalar, s.M, s.N, 1e-6, "kernel vs the scalar order");
        }
        cpm_isa_force(cpm_isa_detect());
        free(ref), free(y), free(scalar), free(x), free(w);
        cpm_bf16p_free(p);
    }
    cpm_pool_free(pool);
}

/* Each row alone and in the whole batch (decode tiles, K blocks, two row groups),
 * 1 or 3 threads, alone or through multi with another weight: the same bits. */
static void test_row_bits_independent_of_batch(void **state) {
    (void)state;
    const int M = 70, N = 200, N2 = 64, K = 300;
    cpm_pool *pool = cpm_pool_new(3);
    assert_non_null(pool);
    uint16_t *w = make_w(N, K, CPM_DTYPE_BF16), *w2 = make_w(N2, K, CPM_DTYPE_BF16);
    float *x = make_x(M, K), *all = malloc(sizeof(float) * M * N);
    float *all2 = malloc(sizeof(float) * M * N2), *one = malloc(sizeof(float) * N);
    float *multi = malloc(sizeof(float) * M * N);
    assert_true(all && all2 && one && multi);
    cpm_bf16p *p = cpm_bf16p_from(pool, w, CPM_DTYPE_BF16, N, K, K);
    cpm_bf16p *p2 = cpm_bf16p_from(pool, w2, CPM_DTYPE_BF16, N2, K, K);
    assert_true(p && p2);
    cpm_matmul_bf16p(pool, all, N, x, K, p, M);
    for (int m = 0; m < M; m++) {
        cpm_matmul_bf16p(m % 2 ? pool : NULL, one, N, x + (size_t)m * K, K, p, 1);
        assert_memory_equal(one, all + (size_t)m * N, sizeof(float) * N);
    }
    for (int rows = 2; rows <= 12; rows += 5) { /* a small tile, then a K-blocked batch */
        cpm_matmul_bf16p(NULL, multi, N, x + (size_t)3 * K, K, p, rows);
        assert_memory_equal(multi, all + (size_t)3 * N, sizeof(float) * (size_t)rows * N);
    }
    cpm_bf16p_out outs[2] = {{.y = multi, .ldy = N, .w = p}, {.y = all2, .ldy = N2, .w = p2}};
    cpm_matmul_bf16p_multi(pool, x, K, M, outs, 2);
    assert_memory_equal(multi, all, sizeof(float) * M * N);
    cpm_matmul_bf16p(NULL, one, N2, x + (size_t)(M - 1) * K, K, p2, 1);
    assert_memory_equal(one, all2 + (size_t)(M - 1) * N2, sizeof(float) * N2);
    cpm_bf16p_free(p), cpm_bf16p_free(p2);
    free(w), free(w2), free(x), free(all), free(all2), free(one), free(multi);
    cpm_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_against_reference),
        cmocka_unit_test(test_row_bits_independent_of_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
