/* test_matmul_t2.c - shard/engine/kernels/matmul_t2.c: ternary matrices are recognised
 * exactly (and nothing else is), packed losslessly, and every kernel gives the reference's
 * bits on every ISA of this machine, any thread count and batch; against the bf16 weights
 * the result differs by float summation order only (the bound of matmul_t2.h). */
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
#include "shard/engine/kernels/matmul_t2.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}
static float uniform(void) { return (float)(next_u32() % 2000001u) / 1e6f - 1.0f; }

/* A ternary W [N, K] in bf16 (stride ld): row n uses ±a_n, a third of entries each. */
static uint16_t *ternary(int N, int K, int ld) {
    uint16_t *w = calloc((size_t)N * (size_t)ld, sizeof *w);
    for (int n = 0; n < N; n++) {
        float a = 0.01f + 0.05f * (float)(n % 7);
        uint16_t pos = cpm_f32_to_bf16(a), neg = pos | 0x8000;
        for (int k = 0; k < K; k++) {
            uint32_t r = next_u32() % 3;
            w[(size_t)n * ld + k] = r == 0 ? 0 : r == 1 ? pos : neg;
        }
    }
    return w;
}

static float *random_x(int M, int K) {
    float *x = malloc((size_t)M * (size_t)K * sizeof *x);
    for (size_t i = 0; i < (size_t)M * (size_t)K; i++)
        x[i] = uniform();
    return x;
}

static void test_recognises_exactly(void **state) {
    (void)state;
    const int N = 9, K = 37, ld = 40;
    uint16_t *w = ternary(N, K, ld);
    cpm_t2 *t;
    assert_int_equal(cpm_t2_from_bf16(w, N, K, ld, &t), 0);
    float row[64];
    for (int n = 0; n < N; n++) { /* lossless */
        cpm_t2_dequant_row(t, n, row);
        for (int k = 0; k < K; k++)
            assert_true(row[k] == cpm_bf16_to_f32(w[(size_t)n * ld + k]));
    }
    assert_int_equal(cpm_t2_bytes(t), (size_t)N * (3 * 4 + 4));
    cpm_t2_free(t);
    /* one value off the grid anywhere, even in the last row: not ternary */
    uint16_t keep = w[(size_t)(N - 1) * ld + 5];
    w[(size_t)(N - 1) * ld + 5] = cpm_f32_to_bf16(0.123f);
    assert_int_equal(cpm_t2_from_bf16(w, N, K, ld, &t), 1);
    assert_null(t);
    w[(size_t)(N - 1) * ld + 5] = keep;
    /* outside the row's K (the stride's padding) does not count */
    w[(size_t)0 * ld + K + 1] = cpm_f32_to_bf16(7.0f);
    assert_int_equal(cpm_t2_from_bf16(w, N, K, ld, &t), 0);
    cpm_t2_free(t);
    /* a row of zeros is ternary; an infinite scale is not */
    memset(w, 0, (size_t)ld * sizeof *w);
    assert_int_equal(cpm_t2_from_bf16(w, N, K, ld, &t), 0);
    cpm_t2_free(t);
    w[3] = 0x7f80; /* +inf */
    assert_int_equal(cpm_t2_from_bf16(w, N, K, ld, &t), 1);
    free(w);
}

/* Every ISA here, 1 and 2 threads, several batch sizes: the reference's bits. */
static void test_kernels_match_reference(void **state) {
    (void)state;
    const int shapes[][2] = {{33, 16}, {64, 100}, {17, 1543}, {40, 2048}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int N = shapes[s][0], K = shapes[s][1];
        uint16_t *w = ternary(N, K, K);
        cpm_t2 *t;
        assert_int_equal(cpm_t2_from_bf16(w, N, K, K, &t), 0);
        for (int M = 1; M <= 17; M += 4) {
            float *x = random_x(M, K), *ref = malloc((size_t)M * N * 4), *y = malloc((size_t)M * N * 4);
            cpm_matmul_t2_ref(ref, N, x, K, t, M);
            for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
                cpm_isa_force((cpm_isa)isa);
                for (int threads = 1; threads <= 2; threads++) {
                    cpm_pool *pool = cpm_pool_new(threads);
                    memset(y, 0xff, (size_t)M * N * 4);
                    cpm_matmul_t2(pool, y, N, x, K, t, M);
                    if (memcmp(y, ref, (size_t)M * N * 4))
                        fail_msg("N %d K %d M %d isa %s threads %d: not the reference's bits", N, K, M,
                                 cpm_isa_name((cpm_isa)isa), threads);
                    cpm_pool_free(pool);
                }
            }
            cpm_isa_force(cpm_isa_detect());
            /* and the bf16 weights' product in double, within the stated bound */
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double exact = 0, mag = 0;
                    for (int k = 0; k < K; k++) {
                        double wk = cpm_bf16_to_f32(w[(size_t)n * K + k]), xk = x[(size_t)m * K + k];
                        exact += wk * xk;
                        mag += fabs(wk * xk);
                    }
                    double bound = (double)K * ldexp(1.0, -24) * mag + 1e-30;
                    if (fabs(ref[(size_t)m * N + n] - exact) > bound)
                        fail_msg("N %d K %d: y %g vs %g, bound %g", N, K, ref[(size_t)m * N + n], exact, bound);
                }
            free(x), free(ref), free(y);
        }
        cpm_t2_free(t);
        free(w);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recognises_exactly),
        cmocka_unit_test(test_kernels_match_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
