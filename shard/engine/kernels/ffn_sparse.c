/* ffn_sparse.c - the FATReLU FFN's sparse kernels (ffn_sparse.h): the active set, h on
 * it, the transposed repack, the split of the work over the pool's threads, and the
 * scalar kernels. The SIMD kernels live in ffn_sparse_<isa>.c, compiled with their own
 * flags, and are chosen by the ISA cpm_matmul uses (cpm_isa_in_effect).
 */
#include "ffn_sparse.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ffn_sparse_internal.h"
#include "matmul.h"
#include "matmul_internal.h"
#include "split.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS)
#define X86_KERNELS 1
#else
#define X86_KERNELS 0
#endif

/* Runs once per layer and token over F gate values: let GCC build SIMD variants. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

#define UP_ALIGN 16   /* active-set entries per unit of the up split: each thread its j */
#define SEG 1024      /* a row's active j gathered per pass (stack) */
#define DOWN_ALIGN 32 /* columns per unit of the down split: whole cache lines of Wt */

/* ---- the active set ---- */

SIMD_CLONES
static long mark_active(const float *g, int ldg, int M, int F, float threshold, int *flag) {
    long active = 0;
    memset(flag, 0, (size_t)F * sizeof(int));
    for (int m = 0; m < M; m++) {
        const float *row = g + (size_t)m * (size_t)ldg;
        for (int j = 0; j < F; j++) {
            int a = row[j] > threshold;
            flag[j] |= a;
            active += a;
        }
    }
    return active;
}

int cpm_ffn_sparse_active(const float *g, int ldg, int M, int F, float threshold, int *ks,
                          long *ret_active) {
    long active = mark_active(g, ldg, M, F, threshold, ks);
    int nk = 0;
    for (int j = 0; j < F; j++) { /* in place, branch-free: ks[j] is read before ks[nk <= j] */
        int a = ks[j];
        ks[nk] = j;
        nk += a;
    }
    if (ret_active)
        *ret_active = active;
    return nk;
}

/* ---- scalar kernels ---- */

/* One element at a time through cpm_matmul's own scalar kernel: the canonical bits. */
void cpm_fs_up_scalar(const cpm_fs_up_job *job, int t0, int t1) {
    size_t esz = cpm_dtype_size(job->wtype);
    for (int t = t0; t < t1; t++) {
        int j = job->ks[t];
        float u;
        cpm_mm_job one = {.y = &u, .ldy = 1, .x = job->x, .ldx = job->K,
                          .w = (const char *)job->w + (size_t)j * (size_t)job->w_ld * esz,
                          .wtype = job->wtype, .w_ld = job->w_ld, .M = 1, .N = 1, .K = job->K};
        cpm_mm_scalar(&one, 0, 1, 0, 1);
        job->g[j] = cpm_fs_act(job->g[j], u, job->threshold);
    }
}

void cpm_fs_down_scalar(const cpm_fs_down_job *job, int n0, int n1) {
    for (int m = 0; m < job->M; m++) {
        float *y = job->y + (size_t)m * (size_t)job->ldy;
        const float *h = job->h + (size_t)m * (size_t)job->ldh;
        for (int n = n0; n < n1; n++)
            y[n] = 0.0f;
        for (int t = 0; t < job->nk; t++) {
            int k = job->ks[t];
            if (h[k] == 0.0f)
                continue;
            for (int n = n0; n < n1; n++)
                y[n] = fmaf(h[k], cpm_fs_wt_at(job, k, n), y[n]);
        }
    }
}

/* ---- dispatch and threading ---- */

static cpm_fs_up_kernel up_kernel(void) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
    if (isa >= CPM_ISA_AVX512)
        return cpm_fs_up_avx512;
    if (isa == CPM_ISA_AVX2)
        return cpm_fs_up_avx2;
#endif
    return cpm_fs_up_scalar;
}

static cpm_fs_down_kernel down_kernel(void) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
    if (isa >= CPM_ISA_AVX512)
        return cpm_fs_down_avx512;
    if (isa == CPM_ISA_AVX2)
        return cpm_fs_down_avx2;
#endif
    return cpm_fs_down_scalar;
}

/* ---- up and h ---- */

typedef struct up_run {
    float *g;
    int ldg;
    const float *x;
    int ldx, M;
    cpm_fs_up_job row; /* what every row shares */
    cpm_fs_up_kernel kernel;
} up_run;

/* Each row over the j of ks[t0..t1) where its gate passes the threshold, SEG at a time;
 * on the way, h = 0 where it does not (so cpm_ffn_sparse_down can read every j of ks). */
static void up_rows(const up_run *r, int t0, int t1) {
    const int *ks = r->row.ks;
    int mine[SEG];
    for (int m = 0; m < r->M; m++) {
        float *g = r->g + (size_t)m * (size_t)r->ldg;
        for (int t = t0; t < t1;) {
            int n = 0;
            for (; t < t1 && n < SEG; t++) { /* branch-free, as cpm_ffn_sparse_active */
                int j = ks[t], a = g[j] > r->row.threshold;
                g[j] = a ? g[j] : 0.0f;
                mine[n] = j;
                n += a;
            }
            cpm_fs_up_job one = r->row;
            one.g = g;
            one.x = r->x + (size_t)m * (size_t)r->ldx;
            one.ks = mine;
            one.nk = n;
            if (n > 0)
                r->kernel(&one, 0, n);
        }
    }
}

static void up_worker(void *arg, int tid, int nt) {
    const up_run *r = arg;
    int lo, hi;
    cpm_split_static(r->row.nk, UP_ALIGN, tid, nt, &lo, &hi);
    if (lo < hi)
        up_rows(r, lo, hi);
}

void cpm_ffn_sparse_up(cpm_pool *pool, float *g, int ldg, const float *x, int ldx,
                       const void *w, cpm_dtype wtype, int w_ld, int M, int K, float threshold,
                       const int *ks, int nk) {
    if (M <= 0 || nk <= 0)
        return;
    up_run r = {.g = g, .ldg = ldg, .x = x, .ldx = ldx, .M = M,
                .row = {.w = w, .wtype = wtype, .w_ld = w_ld, .K = K, .ks = ks, .nk = nk,
                        .threshold = threshold},
                .kernel = up_kernel()};
    cpm_pool_run(pool, up_worker, &r);
}

/* ---- down ---- */

typedef struct down_run {
    cpm_fs_down_job job;
    cpm_fs_down_kernel kernel;
} down_run;

static void down_worker(void *arg, int tid, int nt) {
    const down_run *r = arg;
    int lo, hi;
    cpm_split_static(r->job.N, DOWN_ALIGN, tid, nt, &lo, &hi);
    if (lo < hi)
        r->kernel(&r->job, lo, hi);
}

void cpm_ffn_sparse_down(cpm_pool *pool, float *y, int ldy, const float *h, int ldh,
                         const void *wt, cpm_dtype wtype, int wt_ld, int M, int N, const int *ks,
                         int nk) {
    if (M <= 0 || N <= 0)
        return;
    down_run r = {.job = {.y = y, .ldy = ldy, .h = h, .ldh = ldh, .wt = wt, .wtype = wtype,
                          .wt_ld = wt_ld, .M = M, .N = N, .ks = ks, .nk = nk},
                  .kernel = down_kernel()};
    cpm_pool_run(pool, down_worker, &r);
}

/* ---- the repack ---- */

#define TR_BLOCK 32 /* a block of rows x cols: both sides' lines stay in L1 */

typedef struct transpose_run {
    void *dst;
    const void *src;
    size_t esz;
    int rows, cols, src_ld;
} transpose_run;

static void transpose_block(const transpose_run *r, int c0, int c1, int r0, int r1) {
    for (int c = c0; c < c1; c++) {
        size_t d = (size_t)c * (size_t)r->rows;
        if (r->esz == 4)
            for (int i = r0; i < r1; i++)
                ((uint32_t *)r->dst)[d + i] =
                    ((const uint32_t *)r->src)[(size_t)i * (size_t)r->src_ld + c];
        else
            for (int i = r0; i < r1; i++)
                ((uint16_t *)r->dst)[d + i] =
                    ((const uint16_t *)r->src)[(size_t)i * (size_t)r->src_ld + c];
    }
}

static void transpose_worker(void *arg, int tid, int nt) {
    const transpose_run *r = arg;
    int lo, hi;
    cpm_split_static(r->cols, TR_BLOCK, tid, nt, &lo, &hi); /* each thread owns dst rows [lo, hi) */
    for (int c = lo; c < hi; c += TR_BLOCK)
        for (int i = 0; i < r->rows; i += TR_BLOCK)
            transpose_block(r, c, c + TR_BLOCK < hi ? c + TR_BLOCK : hi, i,
                            i + TR_BLOCK < r->rows ? i + TR_BLOCK : r->rows);
}

void cpm_ffn_sparse_transpose(cpm_pool *pool, void *dst, const void *src, cpm_dtype t,
                              int rows, int cols, int src_ld) {
    transpose_run r = {.dst = dst, .src = src, .esz = cpm_dtype_size(t), .rows = rows,
                       .cols = cols, .src_ld = src_ld};
    cpm_pool_run(pool, transpose_worker, &r);
}
