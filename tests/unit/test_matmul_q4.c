/* test_matmul_q4.c - unit tests for shard/engine/kernels/matmul_q4.c and its ISA
 * kernels: hand-packed AutoGPTQ words decode to the values worked out by hand
 * (zero + 1, act-order groups), hand-packed AutoAWQ words likewise (the
 * interleaved column order, real zeros); random GPTQ and AWQ linears of odd
 * shapes against a naive double loop over the raw tensors (not the repacked ones), on every ISA
 * this CPU has; the same bits for 1 and 2 threads, for a row alone or in a
 * batch, and across ISAs; and the repack's refusals. The bf16-activation path
 * (cpm_matmul_q4_bf16x) against the double loop on rounded operands, with a
 * row's bits independent of its batch and thread count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kernels/dtype.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/matmul_q4.h"

/* ---- hand-built words ---- */

/* K = 8, N = 8, one group. Column n = 0 holds q = k (0x76543210), n = 1 holds
 * q = 8 + k (0xFEDCBA98); stored zeros 7 (n = 0) and 3 (n = 1) are real zeros
 * 8 and 4; scales 0.5 and 0.25. */
static void test_hand_packed(void **state) {
    (void)state;
    int32_t qweight[8] = {0x76543210, (int32_t)0xFEDCBA98u, 0, 0, 0, 0, 0, 0};
    int32_t qzeros[1] = {0x00000037};
    float scales[8] = {0.5f, 0.25f, 1, 1, 1, 1, 1, 1};
    cpm_q4_gptq src = {.qweight = qweight, .scales = scales, .qzeros = qzeros, .K = 8, .N = 8,
                       .group_size = 8, .zero_offset = 1};
    cpm_q4 *w;
    assert_int_equal(cpm_q4_new(&src, &w, NULL), 0);
    float row[8];
    const float want0[8] = {-4, -3.5f, -3, -2.5f, -2, -1.5f, -1, -0.5f}; /* (k - 8) / 2 */
    const float want1[8] = {1, 1.25f, 1.5f, 1.75f, 2, 2.25f, 2.5f, 2.75f}; /* (8 + k - 4) / 4 */
    cpm_q4_dequant_row(w, 0, row);
    assert_memory_equal(row, want0, sizeof row);
    cpm_q4_dequant_row(w, 1, row);
    assert_memory_equal(row, want1, sizeof row);
    cpm_q4_dequant_row(w, 2, row); /* q = 0, stored zero 0 → real zero 1 */
    for (int k = 0; k < 8; k++)
        assert_true(row[k] == -1.0f);

    /* y = x · Wᵀ with x = 1..8: Σ (k+1)(k-8)/2 = -60, Σ (k+1)(k+4)/4 = 78 */
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    cpm_matmul_q4(NULL, y, 8, x, 8, w, 1);
    assert_true(y[0] == -60.0f);
    assert_true(y[1] == 78.0f);
    assert_true(y[2] == -36.0f);
    cpm_q4_free(w);
}

/* Act-order: K = 16 in two groups of 8, g_idx alternating 1, 0, 1, 0, ...;
 * every q is 5, zeros 1 and 3 (stored 0 and 2), scales 2 (group 0) and 10
 * (group 1): even columns (group 1) give (5 - 3)·10, odd ones (5 - 1)·2. */
static void test_hand_act_order(void **state) {
    (void)state;
    int32_t qweight[2 * 8], qzeros[2] = {0x0, 0x2};
    float scales[2 * 8];
    int32_t g_idx[16];
    for (int i = 0; i < 16; i++)
        qweight[i] = 0x55555555;
    for (int n = 0; n < 8; n++)
        scales[n] = 2, scales[8 + n] = 10;
    qzeros[1] = 0x22222222;
    for (int k = 0; k < 16; k++)
        g_idx[k] = k % 2 == 0 ? 1 : 0;
    cpm_q4_gptq src = {.qweight = qweight, .scales = scales, .qzeros = qzeros, .g_idx = g_idx,
                       .K = 16, .N = 8, .group_size = 8, .zero_offset = 1};
    cpm_q4 *w;
    assert_int_equal(cpm_q4_new(&src, &w, NULL), 0);
    float row[16], x[16], y[8];
    for (int n = 0; n < 8; n++) {
        cpm_q4_dequant_row(w, n, row);
        for (int k = 0; k < 16; k++)
            assert_true(row[k] == (k % 2 == 0 ? 20.0f : 8.0f));
    }
    for (int k = 0; k < 16; k++)
        x[k] = (float)k; /* Σ even k·20 + Σ odd k·8 = 56·20 + 64·8 */
    cpm_matmul_q4(NULL, y, 8, x, 16, w, 1);
    for (int n = 0; n < 8; n++)
        assert_true(y[n] == 56.0f * 20 + 64.0f * 8);
    cpm_q4_free(w);
}

/* AWQ GEMM, K = 8, N = 8, one group: q[k, n] = n + k, real zeros z[n] = 2n,
 * scales 2^-n, so W[n, k] = (k - n)·2^-n. AutoAWQ puts column 8c + order[i],
 * order = {0,2,4,6,1,3,5,7}, in nibble i: row k's word reads, from the top
 * nibble down, 7+k 5+k 3+k 1+k 6+k 4+k 2+k 0+k. */
static void test_hand_awq(void **state) {
    (void)state;
    int32_t qweight[8] = {0x75316420, (int32_t)0x86427531u, (int32_t)0x97538642u,
                          (int32_t)0xA8649753u, (int32_t)0xB975A864u, (int32_t)0xCA86B975u,
                          (int32_t)0xDB97CA86u, (int32_t)0xECA8DB97u};
    int32_t qzeros[1] = {(int32_t)0xEA62C840u}; /* 2·order[i] in nibble i */
    float scales[8];
    for (int n = 0; n < 8; n++)
        scales[n] = ldexpf(1.0f, -n);
    cpm_q4_gptq src = {.qweight = qweight, .scales = scales, .qzeros = qzeros, .K = 8, .N = 8,
                       .group_size = 8, .format = CPM_Q4_AWQ};
    cpm_q4 *w;
    assert_int_equal(cpm_q4_new(&src, &w, NULL), 0);
    float row[8], x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    for (int n = 0; n < 8; n++) {
        cpm_q4_dequant_row(w, n, row);
        for (int k = 0; k < 8; k++)
            assert_true(row[k] == (float)(k - n) * scales[n]);
    }
    /* y[n] = 2^-n · Σ (k+1)(k-n) = 2^-n · (168 - 36n) */
    cpm_matmul_q4(NULL, y, 8, x, 8, w, 1);
    for (int n = 0; n < 8; n++)
        assert_true(y[n] == (float)(168 - 36 * n) * scales[n]);
    cpm_q4_free(w);
}

static void test_refusals(void **state) {
    (void)state;
    int32_t qweight[4 * 8] = {0}, qzeros[2] = {0}, g_idx[32];
    float scales[2 * 8] = {0};
    cpm_q4 *w = NULL;
    int bad = -1;
    cpm_q4_gptq src = {.qweight = qweight, .scales = scales, .qzeros = qzeros, .K = 32, .N = 8,
                       .group_size = 16, .zero_offset = 1};
    src.K = 28;
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EARG); /* K % 8 */
    src.K = 32;
    src.group_size = 12;
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EARG); /* 12 does not divide 32 */
    src.group_size = 16;
    src.g_idx = g_idx;
    for (int k = 0; k < 32; k++)
        g_idx[k] = k / 16;
    g_idx[9] = 2;
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EGIDX);
    assert_int_equal(bad, 9);
    g_idx[9] = -1;
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EGIDX);
    g_idx[9] = 1; /* group 1 now has 17 columns */
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EGROUP);
    assert_int_equal(bad, 1);
    src.g_idx = NULL;
    src.format = (cpm_q4_format)7;
    assert_int_equal(cpm_q4_new(&src, &w, &bad), CPM_Q4_EARG); /* no such layout */
    assert_null(w);
    cpm_q4_free(NULL);
}

/* ---- random linears ---- */

typedef struct qshape {
    int M, N, K, gs;
    int act_order;
    int pad_x, pad_y;
} qshape;

static const qshape shapes[] = {
    {1, 8, 8, 8, 0, 0, 0},       {3, 24, 40, 8, 0, 1, 2},     {5, 40, 40, 40, 1, 0, 0},
    {1, 16, 24, 24, 0, 3, 0},    {7, 64, 136, 8, 1, 0, 5},    {2, 8, 256, 128, 0, 0, 0},
    {9, 72, 512, 32, 1, 2, 1},   {1, 200, 96, 96, 1, 0, 0},   {17, 48, 128, 64, 0, 0, 0},
    {1, 256, 1024, 128, 1, 0, 0}, {12, 8, 48, 16, 1, 0, 0},
};
#define NSHAPES (int)(sizeof shapes / sizeof *shapes)

static uint64_t rng = 0x243f6a8885a308d3ull;

static uint32_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

static float frand(void) { /* [-1, 1) */
    return (float)(next() >> 8) * (1.0f / (1 << 23)) - 1.0f;
}

typedef struct raw {
    qshape s;
    cpm_q4_format format; /* AWQ: qweight [K][N/8] along n, no g_idx */
    int32_t *qweight, *qzeros, *g_idx;
    float *scales, *x;
    cpm_q4 *w;
} raw;

static raw make_raw(qshape s, cpm_q4_format format) {
    raw r = {.s = s, .format = format};
    int G = s.K / s.gs;
    r.qweight = malloc((size_t)s.K / 8 * s.N * 4);
    r.qzeros = malloc((size_t)G * s.N / 8 * 4);
    r.scales = malloc((size_t)G * s.N * 4);
    r.g_idx = malloc((size_t)s.K * 4);
    r.x = malloc((size_t)s.M * (s.K + s.pad_x) * 4);
    assert_true(r.qweight && r.qzeros && r.scales && r.g_idx && r.x);
    for (size_t i = 0; i < (size_t)s.K / 8 * s.N; i++)
        r.qweight[i] = (int32_t)next();
    for (size_t i = 0; i < (size_t)G * s.N / 8; i++)
        r.qzeros[i] = (int32_t)next();
    for (size_t i = 0; i < (size_t)G * s.N; i++)
        r.scales[i] = 0.01f + 0.05f * (frand() + 1);
    /* act-order as GPTQ writes it: g_idx[k] = rank of k in a random order / gs */
    int *perm = malloc((size_t)s.K * sizeof *perm);
    for (int k = 0; k < s.K; k++)
        perm[k] = k;
    for (int k = s.K - 1; s.act_order && k > 0; k--) {
        int j = (int)(next() % (uint32_t)(k + 1)), t = perm[k];
        perm[k] = perm[j];
        perm[j] = t;
    }
    for (int i = 0; i < s.K; i++)
        r.g_idx[perm[i]] = format == CPM_Q4_AWQ ? perm[i] / s.gs : i / s.gs;
    free(perm);
    for (size_t i = 0; i < (size_t)s.M * (s.K + s.pad_x); i++)
        r.x[i] = frand();
    cpm_q4_gptq src = {.qweight = r.qweight, .scales = r.scales, .qzeros = r.qzeros,
                       .g_idx = format == CPM_Q4_AWQ ? NULL : r.g_idx, .K = s.K, .N = s.N,
                       .group_size = s.gs, .zero_offset = format == CPM_Q4_AWQ ? 0 : 1,
                       .format = format};
    assert_int_equal(cpm_q4_new(&src, &r.w, NULL), 0);
    return r;
}

static void free_raw(raw *r) {
    free(r->qweight);
    free(r->qzeros);
    free(r->scales);
    free(r->g_idx);
    free(r->x);
    cpm_q4_free(r->w);
}

/* Nibble slot of column n within its AWQ word: where AutoAWQ's order puts it. */
static int awq_slot_of(int n) {
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int i = 0; i < 8; i++)
        if (order[i] == n % 8)
            return i;
    return -1;
}

/* W[n, k] straight from the AutoGPTQ or AutoAWQ tensors. */
static double raw_w(const raw *r, int n, int k) {
    int N = r->s.N, g = r->g_idx[k];
    if (r->format == CPM_Q4_AWQ) {
        int sh = 4 * awq_slot_of(n);
        int q = (int)(((uint32_t)r->qweight[(size_t)k * (N / 8) + n / 8] >> sh) & 15);
        int z = (int)(((uint32_t)r->qzeros[(size_t)g * (N / 8) + n / 8] >> sh) & 15);
        return (double)(q - z) * r->scales[(size_t)g * N + n];
    }
    int q = (int)(((uint32_t)r->qweight[(size_t)(k / 8) * N + n] >> (4 * (k % 8))) & 15);
    int z = (int)(((uint32_t)r->qzeros[(size_t)g * (N / 8) + n / 8] >> (4 * (n % 8))) & 15) + 1;
    return (double)(q - z) * r->scales[(size_t)g * N + n];
}

static float *run(cpm_pool *pool, const raw *r) {
    int ldy = r->s.N + r->s.pad_y;
    float *y = malloc((size_t)r->s.M * ldy * sizeof *y);
    for (int i = 0; i < r->s.M * ldy; i++)
        y[i] = 12345.0f;
    cpm_matmul_q4(pool, y, ldy, r->x, r->s.K + r->s.pad_x, r->w, r->s.M);
    return y;
}

static void check_against_loop(const raw *r, const float *y) {
    const qshape *s = &r->s;
    int ldx = s->K + s->pad_x, ldy = s->N + s->pad_y;
    for (int m = 0; m < s->M; m++) {
        for (int n = 0; n < ldy; n++) {
            float got = y[(size_t)m * ldy + n];
            if (n >= s->N) {
                assert_true(got == 12345.0f); /* stride padding untouched */
                continue;
            }
            double want = 0, mag = 0;
            for (int k = 0; k < s->K; k++) {
                double t = r->x[(size_t)m * ldx + k] * raw_w(r, n, k);
                want += t;
                mag += fabs(t);
            }
            if (fabs(got - want) > 1e-5 * mag + 1e-6) {
                fprintf(stderr, "M%d N%d K%d gs%d: y[%d,%d] = %.9g, want %.9g\n", s->M, s->N,
                        s->K, s->gs, m, n, got, want);
                fail();
            }
        }
    }
}

/* Case i < 2·NSHAPES: every shape as GPTQ, then as AWQ. */
static raw make_case(int i) {
    return make_raw(shapes[i % NSHAPES], i < NSHAPES ? CPM_Q4_GPTQ : CPM_Q4_AWQ);
}

static void test_dequant_exact(void **state) {
    (void)state;
    for (int i = 0; i < 2 * NSHAPES; i++) {
        raw r = make_case(i);
        float *row = malloc((size_t)r.s.K * sizeof *row);
        for (int n = 0; n < r.s.N; n++) {
            cpm_q4_dequant_row(r.w, n, row);
            for (int k = 0; k < r.s.K; k++)
                assert_true(row[k] == (float)raw_w(&r, n, k));
        }
        free(row);
        free_raw(&r);
    }
}

static const cpm_isa isas[] = {CPM_ISA_SCALAR, CPM_ISA_AVX2, CPM_ISA_AVX512};

/* Every ISA against the loop; every ISA's bits equal the scalar kernel's,
 * for 1 and 2 threads and for each row run alone. */
static void test_every_isa(void **state) {
    (void)state;
    cpm_pool *p2 = cpm_pool_new(2);
    assert_non_null(p2);
    for (int i = 0; i < 2 * NSHAPES; i++) {
        raw r = make_case(i);
        size_t ny = (size_t)r.s.M * (r.s.N + r.s.pad_y) * sizeof(float);
        cpm_isa_force(CPM_ISA_SCALAR);
        float *base = run(NULL, &r);
        check_against_loop(&r, base);
        for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
            if (cpm_isa_force(isas[a]) != isas[a])
                continue; /* not on this CPU */
            float *y1 = run(NULL, &r), *y2 = run(p2, &r);
            check_against_loop(&r, y1);
            assert_memory_equal(y1, base, ny);
            assert_memory_equal(y2, base, ny);
            /* row m alone (decode path) == row m inside the batch (panel path) */
            raw one = r;
            one.s.M = 1;
            for (int m = 0; m < r.s.M; m++) {
                one.x = r.x + (size_t)m * (r.s.K + r.s.pad_x);
                float *ym = run(p2, &one);
                assert_memory_equal(ym, base + (size_t)m * (r.s.N + r.s.pad_y),
                                    (size_t)r.s.N * sizeof(float));
                free(ym);
            }
            free(y1);
            free(y2);
        }
        cpm_isa_force(cpm_isa_detect());
        free(base);
        free_raw(&r);
    }
    cpm_pool_free(p2);
}

/* A realistic decode shape against the double reference of the module. */
static void test_ref_1b_shape(void **state) {
    (void)state;
    qshape s = {2, 3840, 1536, 128, 1, 0, 0};
    raw r = make_raw(s, CPM_Q4_GPTQ);
    float *y = run(NULL, &r), *ref = malloc((size_t)s.M * s.N * sizeof *ref);
    cpm_matmul_q4_ref(ref, s.N, r.x, s.K, r.w, s.M);
    double maxd = 0, maxr = 0;
    for (int i = 0; i < s.M * s.N; i++) {
        maxd = fmax(maxd, fabs(y[i] - ref[i]));
        maxr = fmax(maxr, fabs(ref[i]));
    }
    assert_true(maxd <= 1e-5 * maxr);
    assert_true(cpm_q4_bytes(r.w) == (size_t)3840 * (1536 / 2 + 12 * 5));
    free(y);
    free(ref);
    free_raw(&r);
}

/* ---- bf16 activations (cpm_matmul_q4_bf16x) ---- */

static float *run_bf16x(cpm_pool *pool, const raw *r, int m0, int M) {
    int ldy = r->s.N + r->s.pad_y, ldx = r->s.K + r->s.pad_x;
    float *y = malloc((size_t)M * ldy * sizeof *y);
    assert_non_null(y);
    for (int i = 0; i < M * ldy; i++)
        y[i] = 12345.0f;
    cpm_matmul_q4_bf16x(pool, y, ldy, r->x + (size_t)m0 * ldx, ldx, r->w, M);
    return y;
}

static double bf16_of(double v) { return cpm_bf16_to_f32(cpm_f32_to_bf16((float)v)); }

/* Against the double loop on bf16(x) and, where VDPBF16PS runs, bf16((q − z)·s)
 * (else the exact weight): the only other loss allowed is f32 summation. */
static void check_bf16x(const raw *r, const float *y, int rounded_w) {
    const qshape *s = &r->s;
    int ldx = s->K + s->pad_x, ldy = s->N + s->pad_y;
    for (int m = 0; m < s->M; m++)
        for (int n = 0; n < ldy; n++) {
            float got = y[(size_t)m * ldy + n];
            if (n >= s->N) {
                assert_true(got == 12345.0f);
                continue;
            }
            double want = 0, mag = 0;
            for (int k = 0; k < s->K; k++) {
                double w = rounded_w ? bf16_of(raw_w(r, n, k)) : raw_w(r, n, k);
                double t = bf16_of(r->x[(size_t)m * ldx + k]) * w;
                want += t;
                mag += fabs(t);
            }
            if (fabs(got - want) > 1e-5 * mag + 1e-6) {
                fprintf(stderr, "bf16x M%d N%d K%d gs%d: y[%d,%d] = %.9g, want %.9g\n", s->M,
                        s->N, s->K, s->gs, m, n, got, want);
                fail();
            }
        }
}

static void test_bf16x_against_rounded_ref(void **state) {
    (void)state;
    cpm_pool *p2 = cpm_pool_new(2);
    assert_non_null(p2);
    print_message("VDPBF16PS here: %s\n", cpm_cpu_has_bf16_dot() ? "yes" : "no");
    for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
        if (cpm_isa_force(isas[a]) != isas[a])
            continue;
        int dot = isas[a] >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
        for (int i = 0; i < 2 * NSHAPES; i++) {
            raw r = make_case(i);
            float *y = run_bf16x(i % 2 ? p2 : NULL, &r, 0, r.s.M);
            check_bf16x(&r, y, dot);
            free(y);
            free_raw(&r);
        }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(p2);
}

typedef float *(*run_fn)(cpm_pool *pool, const raw *r, int m0, int M);
typedef void (*check_fn)(const raw *r, const float *y);

/* A row alone, in a sub-batch and in the whole batch (every path a kernel has
 * by batch size), with 1 or 3 threads: the same bits, on every ISA; the batch
 * also meets check. */
static void check_rows_independent_of_batch(run_fn run_it, check_fn check) {
    const qshape cases[] = {{37, 64, 256, 128, 0, 0, 0}, {21, 40, 136, 8, 1, 1, 2},
                            {70, 48, 512, 64, 1, 0, 0}, {9, 40, 384, 384, 1, 0, 0}};
    const int n_cases = (int)(sizeof cases / sizeof *cases);
    cpm_pool *p3 = cpm_pool_new(3);
    assert_non_null(p3);
    for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
        if (cpm_isa_force(isas[a]) != isas[a])
            continue;
        for (int c = 0; c < n_cases; c++) {
            raw r = make_raw(cases[c], c == 1 ? CPM_Q4_AWQ : CPM_Q4_GPTQ);
            size_t ldy = (size_t)r.s.N + (size_t)r.s.pad_y, row = (size_t)r.s.N * sizeof(float);
            float *all = run_it(p3, &r, 0, r.s.M), *sub = run_it(NULL, &r, 3, 5);
            check(&r, all);
            for (int m = 0; m < r.s.M; m++) {
                float *one = run_it(m % 2 ? p3 : NULL, &r, m, 1);
                assert_memory_equal(one, all + (size_t)m * ldy, row);
                if (m >= 3 && m < 8)
                    assert_memory_equal(sub + (size_t)(m - 3) * ldy, one, row);
                free(one);
            }
            free(all);
            free(sub);
            free_raw(&r);
        }
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(p3);
}

/* check_bf16x with the weights rounded where this ISA runs VDPBF16PS. */
static void check_bf16x_here(const raw *r, const float *y) {
    check_bf16x(r, y, cpm_isa_in_effect() >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot());
}

static void test_bf16x_row_bits_independent_of_batch(void **state) {
    (void)state;
    check_rows_independent_of_batch(run_bf16x, check_bf16x_here);
}

/* ---- int8 activations (cpm_matmul_q4_q8x) ---- */

static float *run_q8x(cpm_pool *pool, const raw *r, int m0, int M) {
    int ldy = r->s.N + r->s.pad_y, ldx = r->s.K + r->s.pad_x;
    float *y = malloc((size_t)M * ldy * sizeof *y);
    assert_non_null(y);
    for (int i = 0; i < M * ldy; i++)
        y[i] = 12345.0f;
    assert_int_equal(cpm_q4_to_panels(r->w), 0); /* the layout it runs on (idempotent) */
    cpm_matmul_q4_q8x(pool, y, ldy, r->x + (size_t)m0 * ldx, ldx, r->w, M);
    return y;
}

/* The panel layout holds the same weights (cpm_q4_dequant_row reads both), and
 * the kernels made for the row layout refuse it loudly. */
static void test_q8x_panel_layout(void **state) {
    (void)state;
    for (int i = 0; i < 2 * NSHAPES; i++) {
        raw r = make_case(i);
        size_t K = (size_t)r.s.K;
        float *before = malloc((size_t)r.s.N * K * sizeof *before), *after = malloc(K * sizeof *after);
        assert_true(before && after);
        for (int n = 0; n < r.s.N; n++)
            cpm_q4_dequant_row(r.w, n, before + (size_t)n * K);
        assert_false(cpm_q4_panelled(r.w));
        assert_int_equal(cpm_q4_to_panels(r.w), 0);
        assert_true(cpm_q4_panelled(r.w));
        for (int n = 0; n < r.s.N; n++) {
            cpm_q4_dequant_row(r.w, n, after);
            assert_memory_equal(after, before + (size_t)n * K, K * sizeof *after);
        }
        float *y = run(NULL, &r);
        for (int m = 0; m < r.s.M; m++)
            for (int n = 0; n < r.s.N; n++)
                assert_true(isnan(y[(size_t)m * (r.s.N + r.s.pad_y) + n]));
        free(y);
        free(before);
        free(after);
        free_raw(&r);
    }
}

/* x as the kernel sees it is x to within half a step of its block's scale,
 * and y is the double loop over that x to f32 summation. */
static void check_q8x(const raw *r, const float *y) {
    const qshape *s = &r->s;
    int ldx = s->K + s->pad_x, ldy = s->N + s->pad_y;
    double *want = malloc((size_t)s->N * sizeof *want), *mag = malloc((size_t)s->N * sizeof *mag);
    float *xq = malloc((size_t)s->K * sizeof *xq);
    assert_true(want && mag && xq);
    for (int m = 0; m < s->M; m++) {
        const float *x = r->x + (size_t)m * ldx;
        assert_int_equal(cpm_q4_q8x_dequant_x(r->w, x, xq), 0);
        float amax = 0;
        for (int k = 0; k < s->K; k++)
            amax = fmaxf(amax, fabsf(x[k]));
        for (int k = 0; k < s->K; k++)
            assert_true(fabsf(xq[k] - x[k]) <= amax / 254 * 1.0001f);
        for (int n = 0; n < s->N; n++) {
            want[n] = mag[n] = 0;
            for (int k = 0; k < s->K; k++) {
                double t = (double)xq[k] * raw_w(r, n, k);
                want[n] += t;
                mag[n] += fabs(t);
            }
        }
        for (int n = 0; n < ldy; n++) {
            float got = y[(size_t)m * ldy + n];
            if (n >= s->N) {
                assert_true(got == 12345.0f);
                continue;
            }
            if (fabs(got - want[n]) > 1e-5 * mag[n] + 1e-6) {
                fprintf(stderr, "q8x M%d N%d K%d gs%d: y[%d,%d] = %.9g, want %.9g\n", s->M,
                        s->N, s->K, s->gs, m, n, got, want[n]);
                fail();
            }
        }
    }
    free(want);
    free(mag);
    free(xq);
}

/* Every shape, GPTQ and AWQ, every ISA, 1 and 2 threads: against the loop,
 * and every ISA's bits equal the plain C kernel's. */
static void test_q8x_every_isa(void **state) {
    (void)state;
    cpm_pool *p2 = cpm_pool_new(2);
    assert_non_null(p2);
    print_message("VPDPBUSD here: %s\n", cpm_cpu_has_int8_dot() ? "yes" : "no");
    for (int i = 0; i < 2 * NSHAPES; i++) {
        raw r = make_case(i);
        size_t ny = (size_t)r.s.M * (r.s.N + r.s.pad_y) * sizeof(float);
        cpm_isa_force(CPM_ISA_SCALAR);
        float *base = run_q8x(NULL, &r, 0, r.s.M);
        check_q8x(&r, base);
        for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
            if (cpm_isa_force(isas[a]) != isas[a])
                continue;
            float *y1 = run_q8x(NULL, &r, 0, r.s.M), *y2 = run_q8x(p2, &r, 0, r.s.M);
            assert_memory_equal(y1, base, ny);
            assert_memory_equal(y2, base, ny);
            free(y1);
            free(y2);
        }
        cpm_isa_force(cpm_isa_detect());
        free(base);
        free_raw(&r);
    }
    cpm_pool_free(p2);
}

/* Batches past a tile and an L2 chunk, a group of 384 (three 128-position steps). */
static void test_q8x_row_bits_independent_of_batch(void **state) {
    (void)state;
    check_rows_independent_of_batch(run_q8x, check_q8x);
}

/* Halves round to even in every ISA's quantization: a block whose largest |x| is
 * 127 has scale 1, so x = n + 0.5 must become the even neighbour. */
static void test_q8x_ties_to_even(void **state) {
    (void)state;
    qshape s = {3, 24, 256, 64, 0, 0, 0}; /* no act-order: blocks are columns 32i.. */
    raw r = make_raw(s, CPM_Q4_GPTQ);
    for (int k = 0; k < s.M * s.K; k++)
        r.x[k] = k % 32 == 5 ? -127.0f : (float)((k * 7) % 200 - 100) + 0.5f;
    float *xq = malloc((size_t)s.K * sizeof *xq);
    assert_non_null(xq);
    assert_int_equal(cpm_q4_q8x_dequant_x(r.w, r.x, xq), 0);
    for (int k = 0; k < s.K; k++) {
        float lo = floorf(r.x[k]), want = r.x[k];
        if (lo != r.x[k]) /* n + 0.5: the even one of n, n + 1 */
            want = ((long)lo & 1) == 0 ? lo : lo + 1.0f;
        assert_true(xq[k] == want);
    }
    cpm_isa_force(CPM_ISA_SCALAR);
    float *base = run_q8x(NULL, &r, 0, s.M);
    check_q8x(&r, base);
    for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
        if (cpm_isa_force(isas[a]) != isas[a])
            continue;
        float *y = run_q8x(NULL, &r, 0, s.M);
        assert_memory_equal(y, base, (size_t)s.M * s.N * sizeof *y);
        free(y);
    }
    cpm_isa_force(cpm_isa_detect());
    free(base);
    free(xq);
    free_raw(&r);
}

/* A NaN in x makes its row's outputs NaN, not a quiet number; other rows are untouched. */
static void test_q8x_nan_is_loud(void **state) {
    (void)state;
    qshape s = {2, 16, 256, 128, 0, 0, 0};
    for (size_t a = 0; a < sizeof isas / sizeof *isas; a++) {
        if (cpm_isa_force(isas[a]) != isas[a])
            continue;
        raw r = make_raw(s, CPM_Q4_GPTQ);
        r.x[77] = NAN;
        float *y = run_q8x(NULL, &r, 0, 2);
        for (int n = 0; n < s.N; n++) {
            assert_true(isnan(y[n]));
            assert_true(isfinite(y[s.N + n]));
        }
        free(y);
        free_raw(&r);
    }
    cpm_isa_force(cpm_isa_detect());
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_packed),
        cmocka_unit_test(test_hand_act_order),
        cmocka_unit_test(test_hand_awq),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_dequant_exact),
        cmocka_unit_test(test_every_isa),
        cmocka_unit_test(test_ref_1b_shape),
        cmocka_unit_test(test_bf16x_against_rounded_ref),
        cmocka_unit_test(test_bf16x_row_bits_independent_of_batch),
        cmocka_unit_test(test_q8x_panel_layout),
        cmocka_unit_test(test_q8x_every_isa),
        cmocka_unit_test(test_q8x_row_bits_independent_of_batch),
        cmocka_unit_test(test_q8x_ties_to_even),
        cmocka_unit_test(test_q8x_nan_is_loud),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
