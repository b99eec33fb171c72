/* test_ffn_sparse.c - unit tests for shard/engine/kernels/ffn_sparse.c and its ISA kernels:
 * the active set; up rows with the bits of cpm_matmul; down over the transposed layout
 * against a plain fma loop, bit for bit, for every ISA, thread count and row count; and
 * the whole FATReLU FFN at 0 %, ~88 % and 100 % active neurons: sparse equals the same
 * FFN visiting every neuron bit for bit (up to the sign of zero), and the row-major dense
 * FFN (cpm_matmul) within the summation-order bound of ffn_sparse.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kernels/ffn_sparse.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/ops.h"

#define SENTINEL 12345.0f

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / (1 << 23))) - 1.0f;
}

static const cpm_dtype dtypes[] = {CPM_DTYPE_F32, CPM_DTYPE_F16, CPM_DTYPE_BF16};

/* n random weights of type t, uniform in [-amp, amp). */
static void *rand_weights(cpm_dtype t, size_t n, float amp) {
    void *w = malloc(n * cpm_dtype_size(t) + 64);
    assert_non_null(w);
    for (size_t i = 0; i < n; i++) {
        float v = amp * frand();
        if (t == CPM_DTYPE_F32)
            ((float *)w)[i] = v;
        else if (t == CPM_DTYPE_F16)
            ((uint16_t *)w)[i] = cpm_f32_to_f16(v);
        else
            ((uint16_t *)w)[i] = cpm_f32_to_bf16(v);
    }
    return w;
}

static float w_at(const void *w, cpm_dtype t, size_t i) {
    if (t == CPM_DTYPE_F32)
        return ((const float *)w)[i];
    if (t == CPM_DTYPE_F16)
        return cpm_f16_to_f32(((const uint16_t *)w)[i]);
    return cpm_bf16_to_f32(((const uint16_t *)w)[i]);
}

static float *rand_floats(size_t n) {
    float *x = malloc(n * sizeof(float) + 64);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = frand();
    return x;
}

/* The ISAs whose rows kernels promise cpm_matmul's bits (not AMX: its own BF16 order). */
static int top_fma_isa(void) {
    int best = (int)cpm_isa_detect();
    return best > CPM_ISA_AVX512 ? CPM_ISA_AVX512 : best;
}

/* ---- the active set ---- */

static void test_active_set_is_the_union(void **state) {
    (void)state;
    enum { M = 5, F = 77 };
    float g[M * F];
    int ks[F];
    for (int i = 0; i < M * F; i++)
        g[i] = frand();
    for (int c = 0; c < 3; c++) {
        float thr = c == 0 ? 0.7f : c == 1 ? 2.0f : -INFINITY;
        long total = -1;
        int nk = cpm_ffn_sparse_active(g, F, M, F, thr, ks, &total);
        long want_total = 0;
        int t = 0;
        for (int j = 0; j < F; j++) {
            bool any = false;
            for (int m = 0; m < M; m++) {
                any |= g[m * F + j] > thr;
                want_total += g[m * F + j] > thr;
            }
            if (any) {
                assert_true(t < nk);
                assert_int_equal(ks[t++], j);
            }
        }
        assert_int_equal(t, nk);
        assert_int_equal(total, want_total);
    }
    assert_int_equal(cpm_ffn_sparse_active(g, F, M, F, 2.0f, ks, NULL), 0);
}

/* ---- up: the listed rows, with cpm_matmul's bits ---- */

/* Up and h for a random gate: h = fatrelu(g) * u on the batch's active set, u with the
 * bits of cpm_matmul; nothing off it written. */
static void check_up(cpm_pool *pool, cpm_dtype t, int M, int K, int N, int pad) {
    int ldx = K + pad, ldg = N + pad, w_ld = K + pad;
    float *x = rand_floats((size_t)M * ldx), *g = rand_floats((size_t)M * ldg);
    void *w = rand_weights(t, (size_t)N * w_ld, 1.0f);
    float *u = malloc(sizeof(float) * (size_t)M * N), *h = malloc(sizeof(float) * (size_t)M * ldg);
    int *ks = malloc(sizeof(int) * (size_t)N);
    float thr = M > 4 ? 0.8f : 0.5f;
    int nk = cpm_ffn_sparse_active(g, ldg, M, N, thr, ks, NULL);
    cpm_matmul(NULL, u, N, x, ldx, w, t, w_ld, M, N, K);
    memcpy(h, g, sizeof(float) * (size_t)M * ldg);
    cpm_ffn_sparse_up(pool, h, ldg, x, ldx, w, t, w_ld, M, K, thr, ks, nk);
    for (int m = 0; m < M; m++) {
        for (int j = 0; j < ldg; j++) {
            bool listed = false;
            for (int i = 0; i < M && j < N; i++)
                listed |= g[(size_t)i * ldg + j] > thr;
            float got = h[(size_t)m * ldg + j], gm = g[(size_t)m * ldg + j];
            float want = !listed ? gm : gm > thr ? gm * u[(size_t)m * N + j] : 0.0f;
            if (memcmp(&got, &want, sizeof got))
                fail_msg("%s %s M=%d K=%d: h[%d,%d] = %.9g, want %.9g (%s)",
                         cpm_isa_name(cpm_isa_in_effect()), cpm_dtype_name(t), M, K, m, j, got,
                         want, listed ? "active set" : "untouched");
        }
    }
    free(x);
    free(g);
    free(w);
    free(u);
    free(h);
    free(ks);
}

static void test_up_matches_matmul_bits(void **state) {
    (void)state;
    static const int shapes[][4] = {{1, 1, 5, 0},      {1, 1536, 300, 0}, {1, 33, 41, 3},
                                    {2, 100, 37, 1},   {5, 17, 64, 0},    {9, 257, 50, 2},
                                    {33, 64, 23, 0},   {13, 1536, 200, 0}, {17, 5000, 130, 1},
                                    {21, 70000, 3, 0}, {30, 1536, 300, 0}};
    cpm_pool *pool = cpm_pool_new(3);
    assert_non_null(pool);
    for (int isa = CPM_ISA_SCALAR; isa <= top_fma_isa(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++)
            for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
                check_up(s % 2 ? pool : NULL, dtypes[d], shapes[s][0], shapes[s][1],
                         shapes[s][2], shapes[s][3]);
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

/* ---- down over the transposed layout ---- */

typedef struct down_case {
    int M, N, K, pad;
    cpm_dtype t;
    float density; /* fraction of h that is non-zero */
    float *h;
    void *wt;
    int *ks, nk;
    int ldh, ldy, wt_ld;
} down_case;

static down_case make_down(int M, int N, int K, int pad, cpm_dtype t, float density) {
    down_case c = {.M = M, .N = N, .K = K, .pad = pad, .t = t, .density = density,
                   .ldh = K + pad, .ldy = N + pad, .wt_ld = N + pad};
    c.h = rand_floats((size_t)M * c.ldh);
    c.wt = rand_weights(t, (size_t)K * c.wt_ld, 1.0f);
    c.ks = malloc(sizeof(int) * (size_t)K);
    for (size_t i = 0; i < (size_t)M * c.ldh; i++) /* off ks: garbage the kernel must not read */
        if ((frand() + 1.0f) / 2.0f >= density)
            c.h[i] = 0.0f;
    for (int k = 0; k < K; k++) {
        bool any = false;
        for (int m = 0; m < M; m++)
            any |= c.h[(size_t)m * c.ldh + k] != 0.0f;
        if (any)
            c.ks[c.nk++] = k;
        else
            for (int m = 0; m < M; m++)
                c.h[(size_t)m * c.ldh + k] = NAN;
    }
    return c;
}

static void free_down(down_case *c) {
    free(c->h);
    free(c->wt);
    free(c->ks);
}

static float *run_down(cpm_pool *pool, const down_case *c) {
    float *y = malloc(sizeof(float) * (size_t)c->M * c->ldy);
    assert_non_null(y);
    for (size_t i = 0; i < (size_t)c->M * c->ldy; i++)
        y[i] = SENTINEL;
    cpm_ffn_sparse_down(pool, y, c->ldy, c->h, c->ldh, c->wt, c->t, c->wt_ld, c->M, c->N, c->ks,
                        c->nk);
    return y;
}

/* What ffn_sparse.h promises: one fma per non-zero term, k ascending, from +0. */
static void check_down_bits(const down_case *c, const float *y, const char *what) {
    for (int m = 0; m < c->M; m++) {
        const float *h = c->h + (size_t)m * c->ldh;
        for (int n = 0; n < c->ldy; n++) {
            float got = y[(size_t)m * c->ldy + n];
            if (n >= c->N) {
                assert_true(got == SENTINEL);
                continue;
            }
            float acc = 0.0f;
            for (int t = 0; t < c->nk; t++)
                if (h[c->ks[t]] != 0.0f)
                    acc = fmaf(h[c->ks[t]], w_at(c->wt, c->t, (size_t)c->ks[t] * c->wt_ld + n),
                               acc);
            if (!(got == acc))
                fail_msg("%s %s %s M=%d N=%d K=%d: y[%d,%d] = %.9g, fma loop %.9g", what,
                         cpm_isa_name(cpm_isa_in_effect()), cpm_dtype_name(c->t), c->M, c->N,
                         c->K, m, n, got, acc);
        }
    }
}

static void test_down_bits_every_isa_thread_count_and_batch(void **state) {
    (void)state;
    static const int shapes[][4] = {{1, 768, 3840, 0}, {1, 100, 50, 3},   {2, 64, 40, 0},
                                    {4, 33, 77, 1},    {5, 64, 64, 0},    {9, 130, 100, 2},
                                    {13, 16, 7, 0},    {3, 1, 9, 0},      {6, 600, 700, 0},
                                    {17, 300, 1100, 1}, {25, 70, 30, 0}, {40, 600, 300, 2}};
    static const float densities[] = {0.12f, 1.0f, 0.0f};
    cpm_pool *pools[3] = {NULL, cpm_pool_new(2), cpm_pool_new(3)};
    for (int isa = CPM_ISA_SCALAR; isa <= (int)cpm_isa_detect(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d++)
            for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
                for (int p = 0; p < 3; p++) {
                    down_case c = make_down(shapes[s][0], shapes[s][1], shapes[s][2],
                                            shapes[s][3], dtypes[d], densities[(s + p) % 3]);
                    float *y = run_down(pools[p], &c);
                    check_down_bits(&c, y, p ? "threads" : "alone");
                    free(y);
                    free_down(&c);
                }
    }
    cpm_isa_force(cpm_isa_detect());
    for (int p = 1; p < 3; p++)
        cpm_pool_free(pools[p]);
}

/* A row's bits do not depend on the batch it rides in (decode vs tiled path). */
static void test_down_row_alone_equals_row_in_batch(void **state) {
    (void)state;
    down_case c = make_down(11, 200, 300, 0, CPM_DTYPE_BF16, 0.12f);
    float *all = run_down(NULL, &c);
    for (int m = 0; m < c.M; m++) {
        down_case one = c;
        one.M = 1;
        one.h = c.h + (size_t)m * c.ldh;
        int *ks = malloc(sizeof(int) * (size_t)c.K);
        one.ks = ks;
        one.nk = 0;
        for (int t = 0; t < c.nk; t++) /* the row's own non-zero k: its decode active set */
            if (one.h[c.ks[t]] != 0.0f)
                ks[one.nk++] = c.ks[t];
        float *y = run_down(NULL, &one);
        for (int n = 0; n < c.N; n++)
            assert_true(y[n] == all[(size_t)m * c.ldy + n]);
        free(y);
        free(ks);
    }
    free(all);
    free_down(&c);
}

static void test_transpose_is_a_bit_copy(void **state) {
    (void)state;
    for (int d = 0; d < 3; d++) {
        int rows = 70, cols = 45, ld = 50;
        size_t esz = cpm_dtype_size(dtypes[d]);
        void *src = rand_weights(dtypes[d], (size_t)rows * ld, 1.0f);
        char *dst = malloc((size_t)rows * cols * esz);
        cpm_pool *pool = cpm_pool_new(3);
        cpm_ffn_sparse_transpose(d == 1 ? NULL : pool, dst, src, dtypes[d], rows, cols, ld);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                assert_memory_equal(dst + ((size_t)c * rows + r) * esz,
                                    (const char *)src + ((size_t)r * ld + c) * esz, esz);
        cpm_pool_free(pool);
        free(src);
        free(dst);
    }
}

/* ---- the whole FATReLU FFN: sparse vs dense ---- */

typedef struct ffn_case {
    int M, H, F;
    cpm_dtype t;
    float *x;
    void *gate, *up, *down, *down_t; /* [F,H], [F,H], [H,F], [F,H] */
} ffn_case;

static ffn_case make_ffn(int M, int H, int F, cpm_dtype t) {
    ffn_case c = {.M = M, .H = H, .F = F, .t = t};
    c.x = rand_floats((size_t)M * H);
    float amp = sqrtf(3.0f / (float)H); /* unit variance pre-activations, as gen_model */
    c.gate = rand_weights(t, (size_t)F * H, amp);
    c.up = rand_weights(t, (size_t)F * H, amp);
    c.down = rand_weights(t, (size_t)H * F, sqrtf(3.0f / (float)F));
    c.down_t = malloc((size_t)H * F * cpm_dtype_size(t));
    cpm_ffn_sparse_transpose(NULL, c.down_t, c.down, t, H, F, F);
    return c;
}

static void free_ffn(ffn_case *c) {
    free(c->x);
    free(c->gate);
    free(c->up);
    free(c->down);
    free(c->down_t);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* The q-quantile of the gate pre-activations (q = 0.88: 88 % of them at or below it). */
static float gate_quantile(const ffn_case *c, double q) {
    size_t n = (size_t)c->M * c->F;
    float *g = malloc(n * sizeof(float));
    cpm_matmul(NULL, g, c->F, c->x, c->H, c->gate, c->t, c->H, c->M, c->F, c->H);
    qsort(g, n, sizeof *g, cmp_float);
    float r = g[(size_t)(q * (double)(n - 1))];
    free(g);
    return r;
}

typedef struct ffn_out {
    float *y;      /* [M, H] */
    float *h;      /* [M, F] the dense path's h */
    double active; /* fraction of fatrelu(g) != 0 */
} ffn_out;

/* The engine's dense FFN as it was: cpm_matmul gate and up, cpm_fatrelu_mul, cpm_matmul
 * down on the row-major [H, F] weight; h kept for the error bound. */
static ffn_out ffn_dense(cpm_pool *pool, const ffn_case *c, float thr) {
    size_t MF = (size_t)c->M * c->F;
    ffn_out o = {.y = malloc(sizeof(float) * (size_t)c->M * c->H), .h = malloc(sizeof(float) * MF)};
    float *u = malloc(sizeof(float) * MF);
    cpm_matmul(pool, o.h, c->F, c->x, c->H, c->gate, c->t, c->H, c->M, c->F, c->H);
    cpm_matmul(pool, u, c->F, c->x, c->H, c->up, c->t, c->H, c->M, c->F, c->H);
    long act = 0;
    for (size_t i = 0; i < MF; i++)
        act += o.h[i] > thr;
    o.active = (double)act / (double)MF;
    cpm_fatrelu_mul(o.h, u, (int)MF, thr);
    cpm_matmul(pool, o.y, c->H, o.h, c->F, c->down, c->t, c->F, c->M, c->H, c->F);
    free(u);
    return o;
}

/* The sparse FFN as shard/engine/model/ffn.c runs it; all_k visits every neuron instead
 * (dense up, every k: the same FFN on the transposed layout, no sparsity used). */
static float *ffn_sparse(cpm_pool *pool, const ffn_case *c, float thr, bool all_k) {
    size_t MF = (size_t)c->M * c->F;
    float *g = malloc(sizeof(float) * MF), *u = malloc(sizeof(float) * MF);
    float *y = malloc(sizeof(float) * (size_t)c->M * c->H);
    int *ks = malloc(sizeof(int) * (size_t)c->F);
    cpm_matmul(pool, g, c->F, c->x, c->H, c->gate, c->t, c->H, c->M, c->F, c->H);
    int nk = cpm_ffn_sparse_active(g, c->F, c->M, c->F, thr, ks, NULL);
    if (all_k) {
        for (nk = 0; nk < c->F; nk++)
            ks[nk] = nk;
        cpm_matmul(pool, u, c->F, c->x, c->H, c->up, c->t, c->H, c->M, c->F, c->H);
        cpm_fatrelu_mul(g, u, (int)MF, thr);
    } else {
        cpm_ffn_sparse_up(pool, g, c->F, c->x, c->H, c->up, c->t, c->H, c->M, c->H, thr, ks, nk);
    }
    cpm_ffn_sparse_down(pool, y, c->H, g, c->F, c->down_t, c->t, c->H, c->M, c->H, ks, nk);
    free(g);
    free(u);
    free(ks);
    return y;
}

static double gamma_n(double n) {
    const double u = 1.0 / (1 << 24);
    return n * u / (1.0 - n * u);
}

/* |y_sparse - y_rowmajor| <= (gamma(nk) + gamma(ceil(F/16) + 4)) * sum_k |h_k w_k|. */
static void check_bound(const ffn_case *c, const ffn_out *d, const float *y, const char *what) {
    for (int m = 0; m < c->M; m++) {
        const float *h = d->h + (size_t)m * c->F;
        int nz = 0;
        for (int k = 0; k < c->F; k++)
            nz += h[k] != 0.0f;
        for (int n = 0; n < c->H; n++) {
            double S = 0.0;
            for (int k = 0; k < c->F; k++)
                S += fabs((double)h[k] * w_at(c->down, c->t, (size_t)n * c->F + k));
            double bound = (gamma_n(nz) + gamma_n((c->F + 15) / 16 + 4)) * S;
            double diff = fabs((double)y[(size_t)m * c->H + n] - d->y[(size_t)m * c->H + n]);
            if (!(diff <= bound))
                fail_msg("%s %s M=%d: y[%d,%d] sparse %.9g dense %.9g, |diff| %.3g > bound %.3g",
                         what, cpm_dtype_name(c->t), c->M, m, n, y[(size_t)m * c->H + n],
                         d->y[(size_t)m * c->H + n], diff, bound);
        }
    }
}

static void run_ffn_case(int M, cpm_dtype t, double active_want, cpm_pool *pool) {
    ffn_case c = make_ffn(M, 160, 384, t);
    float thr = active_want >= 1.0 ? -INFINITY : active_want <= 0.0 ? INFINITY
                                                 : gate_quantile(&c, 1.0 - active_want);
    ffn_out d = ffn_dense(pool, &c, thr);
    float *sp = ffn_sparse(pool, &c, thr, false), *all = ffn_sparse(pool, &c, thr, true);
    char what[64];
    snprintf(what, sizeof what, "%.0f %% active", 100.0 * active_want);
    assert_true(fabs(d.active - active_want) < 0.02);
    for (size_t i = 0; i < (size_t)M * c.H; i++) {
        if (!(sp[i] == all[i])) /* == : bit for bit up to the sign of zero */
            fail_msg("%s %s M=%d: y[%zu] sparse %.9g, every neuron %.9g", what,
                     cpm_dtype_name(t), M, i, sp[i], all[i]);
        if (active_want <= 0.0)
            assert_true(sp[i] == 0.0f && d.y[i] == 0.0f);
    }
    check_bound(&c, &d, sp, what);
    free(sp);
    free(all);
    free(d.y);
    free(d.h);
    free_ffn(&c);
}

static void test_ffn_sparse_equals_dense(void **state) {
    (void)state;
    static const double actives[] = {0.0, 0.12, 1.0};
    static const int rows[] = {1, 3, 7, 33};
    cpm_pool *pool = cpm_pool_new(2);
    for (int isa = CPM_ISA_SCALAR; isa <= top_fma_isa(); isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int d = 0; d < 3; d += 2) /* F32 and BF16: the golden checkpoints' dtypes */
            for (int a = 0; a < 3; a++)
                for (int r = 0; r < 4; r++)
                    run_ffn_case(rows[r], dtypes[d], actives[a], r % 2 ? pool : NULL);
    }
    cpm_isa_force(cpm_isa_detect());
    cpm_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_active_set_is_the_union),
        cmocka_unit_test(test_up_matches_matmul_bits),
        cmocka_unit_test(test_down_bits_every_isa_thread_count_and_batch),
        cmocka_unit_test(test_down_row_alone_equals_row_in_batch),
        cmocka_unit_test(test_transpose_is_a_bit_copy),
        cmocka_unit_test(test_ffn_sparse_equals_dense),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
