/* test_matmul.c - unit tests for shard/engine/kernels/matmul.c and its ISA kernels:
 * every ISA this CPU has, against the reference, for F32/F16/BF16 weights,
 * odd shapes and strides; plus the determinism promises of matmul.h (same
 * bits for any thread count, for a row alone or inside a batch, and across
 * the FMA ISAs); and cpm_matmul_multi against separate calls, bit for bit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kernels/matmul.h"

typedef struct shape {
    int M, N, K;
    int pad_x, pad_y, pad_w; /* extra row stride beyond K, N, K */
} shape;

static const shape shapes[] = {
    {1, 1, 1, 0, 0, 0},       {3, 17, 33, 0, 0, 0},     {37, 129, 257, 0, 0, 0},
    {2, 5, 16, 0, 0, 0},      {6, 40, 31, 3, 5, 7},     {11, 33, 64, 1, 2, 9},
    {1, 3840, 1536, 0, 0, 0}, {1, 77, 100, 4, 1, 2},    {64, 48, 96, 0, 0, 0},
    {9, 16, 15, 2, 0, 1},     {4, 200, 1, 0, 3, 0},
    /* prefill groups: several per call with a narrow last panel; few panels per group; none */
    {13, 301, 1536, 0, 0, 0}, {6, 20, 3000, 1, 0, 0}, {3, 7, 11000, 0, 0, 0},
    {2, 3, 33000, 0, 0, 0},
};
#define NSHAPES (int)(sizeof(shapes) / sizeof(shapes[0]))

static const cpm_dtype dtypes[] = {CPM_DTYPE_F32, CPM_DTYPE_F16, CPM_DTYPE_BF16};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / (1 << 23))) - 1.0f;
}

typedef struct operands {
    shape s;
    cpm_dtype wt;
    int ldx, ldy, w_ld;
    float *x;
    void *w;
} operands;

static operands make_operands(shape s, cpm_dtype wt) {
    operands o = {.s = s, .wt = wt, .ldx = s.K + s.pad_x, .ldy = s.N + s.pad_y,
                  .w_ld = s.K + s.pad_w};
    o.x = malloc(sizeof(float) * (size_t)s.M * o.ldx);
    o.w = malloc(cpm_dtype_size(wt) * (size_t)s.N * o.w_ld);
    assert_non_null(o.x);
    assert_non_null(o.w);
    for (size_t i = 0; i < (size_t)s.M * o.ldx; i++)
        o.x[i] = frand();
    for (size_t i = 0; i < (size_t)s.N * o.w_ld; i++) {
        float v = frand();
        if (wt == CPM_DTYPE_F32)
            ((float *)o.w)[i] = v;
        else if (wt == CPM_DTYPE_F16)
            ((uint16_t *)o.w)[i] = cpm_f32_to_f16(v);
        else
            ((uint16_t *)o.w)[i] = cpm_f32_to_bf16(v);
    }
    return o;
}

static void free_operands(operands *o) {
    free(o->x);
    free(o->w);
}

#define SENTINEL 12345.0f

/* y filled with a sentinel so that writes outside [M, N] show up. */
static float *run(cpm_pool *pool, const operands *o) {
    size_t len = (size_t)o->s.M * o->ldy;
    float *y = malloc(sizeof(float) * len);
    assert_non_null(y);
    for (size_t i = 0; i < len; i++)
        y[i] = SENTINEL;
    cpm_matmul(pool, y, o->ldy, o->x, o->ldx, o->w, o->wt, o->w_ld, o->s.M, o->s.N, o->s.K);
    return y;
}

static float w_value(const operands *o, int n, int k) {
    size_t i = (size_t)n * o->w_ld + k;
    if (o->wt == CPM_DTYPE_F32)
        return ((const float *)o->w)[i];
    if (o->wt == CPM_DTYPE_F16)
        return cpm_f16_to_f32(((const uint16_t *)o->w)[i]);
    return cpm_bf16_to_f32(((const uint16_t *)o->w)[i]);
}

/* Bound on f32 summation error: the FMA kernels add ceil(K/16) terms per lane
 * then 4 tree levels; AMX adds up to K terms in sequence per x term. */
static double error_terms(cpm_isa isa, cpm_dtype wt, int K) {
    if (isa == CPM_ISA_AMX && wt == CPM_DTYPE_BF16)
        return K + 8;
    return (K + 15) / 16 + 5;
}

static void check_against_ref(cpm_isa isa, const operands *o, const float *y) {
    const shape s = o->s;
    float *ref = malloc(sizeof(float) * (size_t)s.M * o->ldy);
    assert_non_null(ref);
    cpm_matmul_ref(ref, o->ldy, o->x, o->ldx, o->w, o->wt, o->w_ld, s.M, s.N, s.K);
    const double u = 1.0 / (1 << 24);
    for (int m = 0; m < s.M; m++) {
        for (int n = 0; n < s.N; n++) {
            double mag = 0.0;
            for (int k = 0; k < s.K; k++)
                mag += fabs((double)o->x[(size_t)m * o->ldx + k] * w_value(o, n, k));
            double tol = 2.0 * error_terms(isa, o->wt, s.K) * u * mag + 1e-30;
            double got = y[(size_t)m * o->ldy + n], want = ref[(size_t)m * o->ldy + n];
            if (!(fabs(got - want) <= tol))
                fail_msg("%s %s M=%d N=%d K=%d: y[%d,%d] = %.9g, ref %.9g, tol %.3g",
                         cpm_isa_name(isa), cpm_dtype_name(o->wt), s.M, s.N, s.K, m, n, got,
                         want, tol);
        }
        for (int n = s.N; n < o->ldy; n++)
            assert_true(y[(size_t)m * o->ldy + n] == SENTINEL);
    }
    free(ref);
}

static void test_ref_small_exact(void **state) {
    (void)state;
    const float x[2 * 3] = {1, 2, 3, -1, 0.5f, 4};
    const float w[2 * 3] = {1, 0, -1, 2, 2, 2};
    float y[4];
    cpm_matmul_ref(y, 2, x, 3, w, CPM_DTYPE_F32, 3, 2, 2, 3);
    assert_true(y[0] == -2.0f && y[1] == 12.0f && y[2] == -5.0f && y[3] == 7.0f);
}

static void test_isa_force_and_names(void **state) {
    (void)state;
    cpm_isa best = cpm_isa_detect();
    assert_int_equal(cpm_isa_force((cpm_isa)99), best);
    assert_int_equal(cpm_isa_force(CPM_ISA_SCALAR), CPM_ISA_SCALAR);
    assert_string_equal(cpm_isa_name(CPM_ISA_SCALAR), "scalar");
    assert_string_equal(cpm_isa_name(CPM_ISA_AVX512), "avx512");
    print_message("best ISA on this CPU: %s\n", cpm_isa_name(best));
    cpm_isa_force(best);
}

static void test_all_isas_against_ref(void **state) {
    (void)state;
    cpm_pool *pool = cpm_pool_new(2);
    assert_non_null(pool);
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        assert_int_equal(cpm_isa_force((cpm_isa)isa), isa);
        for (int d = 0; d < 3; d++) {
            for (int i = 0; i < NSHAPES; i++) {
                operands o = make_operands(shapes[i], dtypes[d]);
                float *y = run(i % 2 ? pool : NULL, &o);
                check_against_ref((cpm_isa)isa, &o, y);
                free(y);
                free_operands(&o);
            }
        }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

static void assert_same_bits(const float *a, const float *b, const operands *o, const char *what) {
    for (int m = 0; m < o->s.M; m++)
        if (memcmp(a + (size_t)m * o->ldy, b + (size_t)m * o->ldy, sizeof(float) * o->s.N) != 0)
            fail_msg("%s: %s M=%d N=%d K=%d differs in row %d", what, cpm_dtype_name(o->wt),
                     o->s.M, o->s.N, o->s.K, m);
}

static void test_thread_count_does_not_change_bits(void **state) {
    (void)state;
    const shape cases[] = {{37, 129, 257, 0, 0, 0}, {1, 1029, 515, 0, 0, 0}, {5, 7, 40, 0, 0, 0}};
    cpm_pool *pools[4];
    for (int t = 0; t < 4; t++)
        assert_non_null(pools[t] = cpm_pool_new(t + 1));
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++) {
            for (int c = 0; c < 3; c++) {
                operands o = make_operands(cases[c], dtypes[d]);
                float *base = run(NULL, &o);
                for (int t = 0; t < 4; t++) {
                    float *y = run(pools[t], &o);
                    assert_same_bits(base, y, &o, cpm_isa_name((cpm_isa)isa));
                    free(y);
                }
                free(base);
                free_operands(&o);
            }
        }
    }
    cpm_isa_force(cpm_isa_detect());
    for (int t = 0; t < 4; t++)
        cpm_pool_free(pools[t]);
}

/* Row m computed alone (M = 1), in a sub-batch at another offset, and inside
 * the whole batch must give the same bits. */
static void test_row_alone_equals_row_in_batch(void **state) {
    (void)state;
    const shape cases[] = {{37, 129, 257, 0, 0, 0}, {23, 300, 1536, 0, 0, 0}};
    cpm_pool *pool = cpm_pool_new(2);
    assert_non_null(pool);
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++) {
            for (int c = 0; c < 2; c++) {
                operands o = make_operands(cases[c], dtypes[d]);
                float *batch = run(pool, &o);
                float *one = malloc(sizeof(float) * (size_t)o.ldy * 3);
                assert_non_null(one);
                for (int m = 0; m < o.s.M; m++) {
                    cpm_matmul(pool, one, o.ldy, o.x + (size_t)m * o.ldx, o.ldx, o.w, o.wt,
                               o.w_ld, 1, o.s.N, o.s.K);
                    if (memcmp(one, batch + (size_t)m * o.ldy, sizeof(float) * o.s.N) != 0)
                        fail_msg("%s %s: row %d alone differs from the batch",
                                 cpm_isa_name((cpm_isa)isa), cpm_dtype_name(o.wt), m);
                }
                for (int m = 0; m + 3 <= o.s.M; m += 7) { /* a 3-row batch at offset m */
                    cpm_matmul(pool, one, o.ldy, o.x + (size_t)m * o.ldx, o.ldx, o.w, o.wt,
                               o.w_ld, 3, o.s.N, o.s.K);
                    assert_memory_equal(one, batch + (size_t)m * o.ldy,
                                        sizeof(float) * (size_t)o.ldy * 2 + sizeof(float) * o.s.N);
                }
                free(one);
                free(batch);
                free_operands(&o);
            }
        }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

/* Scalar, AVX2 and AVX-512 share one summation order; AMX shares it for the
 * weight types it does not accelerate. */
static void test_isas_agree_bit_for_bit(void **state) {
    (void)state;
    cpm_isa best = cpm_isa_detect();
    for (int d = 0; d < 3; d++) {
        for (int i = 0; i < NSHAPES; i++) {
            operands o = make_operands(shapes[i], dtypes[d]);
            cpm_isa_force(CPM_ISA_SCALAR);
            float *base = run(NULL, &o);
            for (int isa = CPM_ISA_AVX2; isa <= (int)best; isa++) {
                if (isa == CPM_ISA_AMX && dtypes[d] == CPM_DTYPE_BF16)
                    continue;
                cpm_isa_force((cpm_isa)isa);
                float *y = run(NULL, &o);
                assert_same_bits(base, y, &o, cpm_isa_name((cpm_isa)isa));
                free(y);
            }
            free(base);
            free_operands(&o);
        }
    }
    cpm_isa_force(best);
}

/* Inf or NaN in W past K (inside the row stride) must not leak into y. */
static void test_stride_padding_is_ignored(void **state) {
    (void)state;
    shape s = {7, 21, 45, 0, 0, 19};
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++) {
            operands o = make_operands(s, dtypes[d]);
            for (int n = 0; n < s.N; n++) {
                for (int k = s.K; k < o.w_ld; k++) {
                    size_t i = (size_t)n * o.w_ld + k;
                    if (o.wt == CPM_DTYPE_F32)
                        ((float *)o.w)[i] = NAN;
                    else
                        ((uint16_t *)o.w)[i] = 0x7fc0; /* NaN as bf16; also as f16 */
                }
            }
            float *y = run(NULL, &o);
            check_against_ref((cpm_isa)isa, &o, y);
            free(y);
            free_operands(&o);
        }
    }
    cpm_isa_force(cpm_isa_detect());
}

/* cpm_matmul_multi must give every output the bits of its own cpm_matmul, for every
 * ISA, thread count and weight type, odd shapes, strides, and mixed types. */
typedef struct multi_case {
    int M, K, pad_x;
    int n_outs;
    int N[4], pad_y[4], pad_w[4];
    cpm_dtype wt[4];
} multi_case;

#define BF CPM_DTYPE_BF16
static const multi_case multi_cases[] = {
    {1, 1, 0, 1, {1}, {0}, {0}, {BF}},
    {3, 33, 2, 3, {17, 5, 40}, {1, 0, 3}, {0, 7, 1}, {BF, BF, BF}},
    {37, 257, 0, 3, {129, 33, 33}, {0, 2, 0}, {3, 0, 0}, {BF, BF, BF}},
    {7, 15, 1, 2, {200, 1}, {0, 0}, {0, 0}, {BF, BF}},
    {12, 100, 0, 4, {64, 0, 31, 96}, {0, 0, 1, 0}, {5, 0, 0, 2}, {BF, BF, BF, BF}},
    {6, 48, 3, 2, {50, 70}, {0, 1}, {0, 0}, {BF, CPM_DTYPE_F32}}, /* mixed: per output */
};
#undef BF
#define NMULTI (int)(sizeof(multi_cases) / sizeof(multi_cases[0]))

static float *run_bf16x(cpm_pool *pool, const operands *o, int m0, int M);

/* The weight type output i of c takes: all overrides, unless it is BF16; with
 * bf16 activations (F16 or BF16 weights only) c's F32 outputs take F16. */
static cpm_dtype multi_wtype(const multi_case *c, int i, cpm_dtype all, bool bf16x) {
    cpm_dtype t = all == CPM_DTYPE_BF16 ? c->wt[i] : all;
    return bf16x && t == CPM_DTYPE_F32 ? CPM_DTYPE_F16 : t;
}

/* bf16x: cpm_matmul_bf16x_multi against cpm_matmul_bf16x; else cpm_matmul_multi
 * against cpm_matmul. */
static void check_multi_case(cpm_pool *pool, const multi_case *c, cpm_dtype all, bool bf16x) {
    operands o[4];
    cpm_matmul_out outs[4];
    float *sep[4];
    for (int i = 0; i < c->n_outs; i++) {
        shape s = {c->M, c->N[i], c->K, c->pad_x, c->pad_y[i], c->pad_w[i]};
        o[i] = make_operands(s, multi_wtype(c, i, all, bf16x));
        if (i > 0) /* one x for all: copy the first's (same M, K and stride) */
            memcpy(o[i].x, o[0].x, sizeof(float) * (size_t)c->M * o[0].ldx);
        sep[i] = bf16x ? run_bf16x(NULL, &o[i], 0, c->M) : run(NULL, &o[i]);
        size_t len = (size_t)c->M * o[i].ldy;
        outs[i] = (cpm_matmul_out){.y = malloc(sizeof(float) * (len ? len : 1)), .ldy = o[i].ldy,
                                   .w = o[i].w, .wtype = o[i].wt, .w_ld = o[i].w_ld,
                                   .N = c->N[i]};
        assert_non_null(outs[i].y);
        for (size_t j = 0; j < len; j++)
            outs[i].y[j] = SENTINEL;
    }
    if (bf16x)
        cpm_matmul_bf16x_multi(pool, o[0].x, o[0].ldx, c->M, c->K, outs, c->n_outs);
    else
        cpm_matmul_multi(pool, o[0].x, o[0].ldx, c->M, c->K, outs, c->n_outs);
    for (int i = 0; i < c->n_outs; i++) {
        /* whole rows, padding included: the padding must stay the sentinel */
        if (memcmp(outs[i].y, sep[i], sizeof(float) * (size_t)c->M * o[i].ldy) != 0)
            fail_msg("%s %s%s M=%d K=%d: output %d (N=%d) differs from a call of its own with %d "
                     "threads", cpm_isa_name(cpm_isa_in_effect()), cpm_dtype_name(o[i].wt),
                     bf16x ? " bf16x" : "", c->M, c->K, i,
                     c->N[i], cpm_pool_size(pool));
        free(outs[i].y);
        free(sep[i]);
        free_operands(&o[i]);
    }
}

static void test_multi_equals_separate_calls(void **state) {
    (void)state;
    cpm_pool *pools[4];
    for (int t = 0; t < 4; t++)
        assert_non_null(pools[t] = cpm_pool_new(t + 1));
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++)
            for (int i = 0; i < NMULTI; i++)
                for (int t = -1; t < 4; t++)
                    check_multi_case(t < 0 ? NULL : pools[t], &multi_cases[i], dtypes[d], false);
    }
    cpm_isa_force(cpm_isa_detect());
    for (int t = 0; t < 4; t++)
        cpm_pool_free(pools[t]);
}

/* A 1B-shaped q/k/v (N 1536 + 512 + 512, K 1536) at prefill size: the combined split
 * hands threads ranges that cross from one output into the next. */
static void test_multi_qkv_shape(void **state) {
    (void)state;
    const multi_case qkv = {19, 1536, 0, 3, {1536, 512, 512}, {0}, {0}, {CPM_DTYPE_BF16,
                            CPM_DTYPE_BF16, CPM_DTYPE_BF16}};
    cpm_pool *pool3 = cpm_pool_new(3);
    assert_non_null(pool3);
    check_multi_case(pool3, &qkv, CPM_DTYPE_BF16, false);
    check_multi_case(NULL, &qkv, CPM_DTYPE_BF16, false);
    cpm_pool_free(pool3);
}

/* ---- bf16 activations (cpm_matmul_bf16x) ---- */

static float *run_bf16x(cpm_pool *pool, const operands *o, int m0, int M) {
    float *y = malloc(sizeof(float) * (size_t)M * o->ldy);
    assert_non_null(y);
    for (size_t i = 0; i < (size_t)M * o->ldy; i++)
        y[i] = SENTINEL;
    cpm_matmul_bf16x(pool, y, o->ldy, o->x + (size_t)m0 * o->ldx, o->ldx, o->w, o->wt, o->w_ld, M,
                     o->s.N, o->s.K);
    return y;
}

/* Against the double reference on x rounded to bf16 (and, where VDPBF16PS runs,
 * F16 weights rounded to bf16): the only other loss allowed is f32 summation. */
static void test_bf16x_against_rounded_ref(void **state) {
    (void)state;
    cpm_pool *pool = cpm_pool_new(2);
    assert_non_null(pool);
    print_message("VDPBF16PS here: %s\n", cpm_cpu_has_bf16_dot() ? "yes" : "no");
    const cpm_dtype wts[] = {CPM_DTYPE_BF16, CPM_DTYPE_F16};
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        bool dot = isa >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
        for (int d = 0; d < 2; d++)
            for (int i = 0; i < NSHAPES; i++) {
                operands o = make_operands(shapes[i], wts[d]);
                float *y = run_bf16x(i % 2 ? pool : NULL, &o, 0, o.s.M);
                for (size_t j = 0; j < (size_t)o.s.M * o.ldx; j++) /* the reference sees bf16(x) */
                    o.x[j] = cpm_bf16_to_f32(cpm_f32_to_bf16(o.x[j]));
                uint16_t *w = o.w;
                for (size_t j = 0; dot && wts[d] == CPM_DTYPE_F16 && j < (size_t)o.s.N * o.w_ld; j++)
                    w[j] = cpm_f32_to_f16(cpm_bf16_to_f32(cpm_f32_to_bf16(cpm_f16_to_f32(w[j]))));
                check_against_ref((cpm_isa)isa, &o, y);
                free(y);
                free_operands(&o);
            }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

/* A row alone, in a sub-batch and in the whole batch (direct and panel paths),
 * with 1 or 3 threads: the same bits. */
static void test_bf16x_row_bits_independent_of_batch(void **state) {
    (void)state;
    const shape cases[] = {{37, 129, 257, 0, 0, 0}, {23, 300, 1536, 0, 0, 0}, {70, 40, 100, 1, 2, 3}};
    cpm_pool *pool = cpm_pool_new(3);
    assert_non_null(pool);
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int c = 0; c < 4; c++) { /* the last: the first shape with F16 weights */
            operands o = make_operands(cases[c % 3], c < 3 ? CPM_DTYPE_BF16 : CPM_DTYPE_F16);
            float *all = run_bf16x(pool, &o, 0, o.s.M), *sub = run_bf16x(NULL, &o, 3, 5);
            for (int m = 0; m < o.s.M; m++) {
                float *one = run_bf16x(m % 2 ? pool : NULL, &o, m, 1);
                assert_memory_equal(one, all + (size_t)m * o.ldy, sizeof(float) * o.s.N);
                if (m >= 3 && m < 8)
                    assert_memory_equal(sub + (size_t)(m - 3) * o.ldy, one, sizeof(float) * o.s.N);
                free(one);
            }
            free(all);
            free(sub);
            free_operands(&o);
        }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

/* cpm_matmul_bf16x_multi: every output the bits of its own cpm_matmul_bf16x, for
 * every ISA (VDPBF16PS, the FMA fallback, AMX's exact path), thread count and
 * the multi cases with BF16 and F16 weights; and the 1B q/k/v at a batched
 * decode step of 16 rows and at prefill size. */
static void test_bf16x_multi_equals_separate_calls(void **state) {
    (void)state;
    cpm_pool *pools[3];
    for (int t = 0; t < 3; t++)
        assert_non_null(pools[t] = cpm_pool_new(t + 1));
    const cpm_dtype wts[] = {CPM_DTYPE_BF16, CPM_DTYPE_F16};
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 2; d++)
            for (int i = 0; i < NMULTI; i++)
                for (int t = -1; t < 3; t++)
                    check_multi_case(t < 0 ? NULL : pools[t], &multi_cases[i], wts[d], true);
    }
    cpm_isa_force(cpm_isa_detect());
    for (int M = 16; M <= 19; M += 3) {
        const multi_case qkv = {M, 1536, 0, 3, {1536, 512, 512}, {0}, {0}, {CPM_DTYPE_BF16,
                                CPM_DTYPE_BF16, CPM_DTYPE_BF16}};
        check_multi_case(pools[1], &qkv, CPM_DTYPE_BF16, true);
        check_multi_case(pools[2], &qkv, CPM_DTYPE_F16, true);
    }
    for (int t = 0; t < 3; t++)
        cpm_pool_free(pools[t]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ref_small_exact),
        cmocka_unit_test(test_isa_force_and_names),
        cmocka_unit_test(test_all_isas_against_ref),
        cmocka_unit_test(test_thread_count_does_not_change_bits),
        cmocka_unit_test(test_row_alone_equals_row_in_batch),
        cmocka_unit_test(test_isas_agree_bit_for_bit),
        cmocka_unit_test(test_stride_padding_is_ignored),
        cmocka_unit_test(test_multi_equals_separate_calls),
        cmocka_unit_test(test_multi_qkv_shape),
        cmocka_unit_test(test_bf16x_against_rounded_ref),
        cmocka_unit_test(test_bf16x_row_bits_independent_of_batch),
        cmocka_unit_test(test_bf16x_multi_equals_separate_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
