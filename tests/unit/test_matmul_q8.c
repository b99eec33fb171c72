/* test_matmul_q8.c - unit tests for shard/engine/kernels/matmul_q8.c: the
 * quantization (scale, rounding, padding, non-finite weights), every kernel
 * against the double reference, the f32 kernels bit for bit with each other,
 * and a row's bits independent of its batch and the threads in both modes. */
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
#include "shard/engine/kernels/matmul_q8.h"
#include "support/close.h"

static uint32_t rng = 12345;
static float frand(void) {
    rng = rng * 1664525u + 1013904223u;
    return (float)((rng >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* W [N, ld] as bf16 (the kernels read K <= ld of each row), x [M, K] f32. */
static uint16_t *make_w(int N, int ld) {
    uint16_t *w = malloc(sizeof(uint16_t) * (size_t)N * (size_t)ld);
    assert_non_null(w);
    for (size_t i = 0; i < (size_t)N * (size_t)ld; i++)
        w[i] = cpm_f32_to_bf16(frand() * (i % 97 == 0 ? 8.0f : 1.0f)); /* some outliers */
    return w;
}

static float *make_x(int M, int K) {
    float *x = malloc(sizeof(float) * (size_t)M * (size_t)K);
    assert_non_null(x);
    for (size_t i = 0; i < (size_t)M * (size_t)K; i++)
        x[i] = frand();
    return x;
}

static void test_quantize(void **state) {
    (void)state;
    const int N = 5, K = 70, ld = 75; /* K not a multiple of 32: a padded block */
    uint16_t *w = make_w(N, ld);
    w[3] = cpm_f32_to_bf16(NAN);
    cpm_q8 *q = cpm_q8_from(w, CPM_DTYPE_BF16, N, K, ld);
    assert_non_null(q);
    assert_int_equal(q->Kp, 96);
    assert_int_equal(cpm_q8_bytes(q), (size_t)N * (96 + 3 * sizeof(float)));
    for (int n = 0; n < N; n++)
        for (int k = 0; k < q->Kp; k++) {
            int8_t v = q->q[(size_t)n * q->Kp + k];
            float s = q->scale[(size_t)n * 3 + (size_t)k / 32];
            assert_true(v != -128); /* symmetric: -127..127 */
            if (k >= K || (n == 0 && k == 3)) { /* padding and the NaN: 0 */
                assert_int_equal(v, 0);
                continue;
            }
            float orig = cpm_bf16_to_f32(w[(size_t)n * ld + k]);
            if (fabsf(v * s - orig) > s * 0.5001f)
                fail_msg("w[%d,%d] = %g quantized to %d * %g", n, k, orig, v, s);
        }
    assert_null(cpm_q8_from(w, CPM_DTYPE_BF16, 0, K, ld));
    cpm_q8_free(q);
    cpm_q8_free(NULL);
    free(w);
}

typedef struct shape {
    int M, N, K;
} shape;
static const shape shapes[] = {{1, 1, 1}, {1, 37, 64}, {3, 50, 70}, {9, 33, 257}, {17, 64, 1536}};
#define NSHAPES (int)(sizeof(shapes) / sizeof(shapes[0]))

/* Every ISA in both modes against the reference (on bf16(x) in the bf16 mode); the f32
 * kernels agree bit for bit across ISAs. */
static void test_against_reference(void **state) {
    (void)state;
    cpm_pool *pool = cpm_pool_new(2);
    assert_non_null(pool);
    for (int c = 0; c < NSHAPES; c++) {
        shape s = shapes[c];
        uint16_t *w = make_w(s.N, s.K);
        float *x = make_x(s.M, s.K), *xr = make_x(s.M, s.K);
        for (size_t i = 0; i < (size_t)s.M * s.K; i++)
            xr[i] = cpm_bf16_to_f32(cpm_f32_to_bf16(x[i]));
        cpm_q8 *q = cpm_q8_from(w, CPM_DTYPE_BF16, s.N, s.K, s.K);
        assert_non_null(q);
        size_t ny = (size_t)s.M * s.N;
        float *ref = malloc(sizeof(float) * ny), *refr = malloc(sizeof(float) * ny);
        float *y = malloc(sizeof(float) * ny), *first = malloc(sizeof(float) * ny);
        assert_true(ref && refr && y && first);
        cpm_matmul_q8_ref(ref, s.N, x, s.K, q, s.M);
        cpm_matmul_q8_ref(refr, s.N, xr, s.K, q, s.M);
        for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
            cpm_isa_force((cpm_isa)isa);
            cpm_matmul_q8(c % 2 ? pool : NULL, y, s.N, x, s.K, q, s.M, false);
            check_close(y, ref, s.M, s.N, 1e-5, "f32");
            if (isa == CPM_ISA_SCALAR)
                memcpy(first, y, sizeof(float) * ny);
            else
                assert_memory_equal(first, y, sizeof(float) * ny); /* same order, same bits */
            cpm_matmul_q8(c % 2 ? NULL : pool, y, s.N, x, s.K, q, s.M, true);
            check_close(y, refr, s.M, s.N, 1e-5, "bf16 activations");
        }
        cpm_isa_force(cpm_isa_detect());
        free(ref), free(refr), free(y), free(first), free(x), free(xr), free(w);
        cpm_q8_free(q);
    }
    cpm_pool_free(pool);
}

/* Each row alone and in the whole batch, 1 or 3 threads, both modes: the same bits. */
static void test_row_bits_independent_of_batch(void **state) {
    (void)state;
    const int M = 21, N = 300, K = 200;
    cpm_pool *pool = cpm_pool_new(3);
    assert_non_null(pool);
    uint16_t *w = make_w(N, K);
    float *x = make_x(M, K), *all = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N);
    assert_true(all && one);
    cpm_q8 *q = cpm_q8_from(w, CPM_DTYPE_BF16, N, K, K);
    assert_non_null(q);
    for (int mode = 0; mode < 2; mode++) {
        cpm_matmul_q8(pool, all, N, x, K, q, M, mode);
        for (int m = 0; m < M; m++) {
            cpm_matmul_q8(m % 2 ? pool : NULL, one, N, x + (size_t)m * K, K, q, 1, mode);
            assert_memory_equal(one, all + (size_t)m * N, sizeof(float) * N);
        }
    }
    cpm_q8_free(q);
    free(w), free(x), free(all), free(one);
    cpm_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quantize),
        cmocka_unit_test(test_against_reference),
        cmocka_unit_test(test_row_bits_independent_of_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
