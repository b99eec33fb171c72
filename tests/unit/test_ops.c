/* test_ops.c - shard/engine/kernels/ops.c: the vectorised exponential behind softmax, SiLU and
 * attention weights, against libm, and the element-wise kernels built on it. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "shard/engine/kernels/ops.h"

/* Distance in representable floats (both finite, same sign). */
static int64_t ulps(float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    return llabs((int64_t)ia - (int64_t)ib);
}

/* Every argument softmax and SiLU can meet, on a fine grid: within 2 ulp of exp
 * computed in double, wherever the result is a normal float. */
static void test_exp_accuracy(void **state) {
    (void)state;
    enum { N = 1 << 16 };
    static float x[N];
    int64_t worst = 0;
    for (int pass = 0; pass < 4; pass++) {
        for (int i = 0; i < N; i++)
            x[i] = -87.0f + 175.0f * (float)(pass * N + i) / (4.0f * N);
        float in[N];
        memcpy(in, x, sizeof in);
        cpm_exp_shifted(x, N, 0.0f);
        for (int i = 0; i < N; i++) {
            float want = (float)exp((double)in[i]);
            int64_t d = ulps(x[i], want);
            if (d > worst)
                worst = d;
            if (d > 2)
                fail_msg("exp(%.9g) = %.9g, want %.9g (%lld ulp)", in[i], x[i], want, (long long)d);
        }
    }
    print_message("worst error: %lld ulp\n", (long long)worst);
}

static void test_exp_edges(void **state) {
    (void)state;
    float x[8] = {-INFINITY, -1000.0f, -87.31f, 0.0f, 1e-8f, 200.0f, NAN, -0.0f};
    cpm_exp_shifted(x, 8, 0.0f);
    assert_true(x[0] == 0.0f && x[1] == 0.0f && x[2] == 0.0f); /* attention's first block: e^-inf */
    assert_true(x[3] == 1.0f && x[7] == 1.0f);
    assert_true(fabsf(x[4] - 1.0f) <= 1.2e-7f);
    assert_true(isfinite(x[5]) && x[5] > 1e38f);
    assert_true(isnan(x[6]));
    float y[3] = {5.0f, 6.0f, 7.0f}; /* the shift is subtracted first */
    cpm_exp_shifted(y, 3, 7.0f);
    assert_true(ulps(y[0], expf(-2.0f)) <= 2 && ulps(y[1], expf(-1.0f)) <= 2 && y[2] == 1.0f);
}

static void test_softmax_and_silu(void **state) {
    (void)state;
    enum { N = 1000 };
    float p[N], g[N], u[N], g0[N];
    for (int i = 0; i < N; i++) {
        p[i] = (float)((i * 37) % 101) / 7.0f - 6.0f;
        g0[i] = g[i] = (float)((i * 53) % 199) / 9.0f - 11.0f;
        u[i] = 0.5f + (float)(i % 7);
    }
    float p0[N];
    memcpy(p0, p, sizeof p);
    cpm_softmax(p, N);
    double mx = -INFINITY, z = 0.0, sum = 0.0;
    for (int i = 0; i < N; i++)
        mx = p0[i] > mx ? p0[i] : mx;
    for (int i = 0; i < N; i++)
        z += exp(p0[i] - mx);
    for (int i = 0; i < N; i++) {
        sum += p[i];
        assert_true(fabs(p[i] - exp(p0[i] - mx) / z) <= 1e-6 * exp(p0[i] - mx) / z + 1e-12);
    }
    assert_true(fabs(sum - 1.0) < 1e-5);
    cpm_silu_mul(g, u, N);
    for (int i = 0; i < N; i++) {
        double want = g0[i] / (1.0 + exp(-(double)g0[i])) * u[i];
        assert_true(fabs(g[i] - want) <= 1e-6 * fabs(want) + 1e-30);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exp_accuracy),
        cmocka_unit_test(test_exp_edges),
        cmocka_unit_test(test_softmax_and_silu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
