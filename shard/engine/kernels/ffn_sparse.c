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

#define TILE CPM_FFN_SPARSE_TILE
#define ROWS_ALIGN 4  /* listed W rows per unit of the rows split: one decode step */
#define DEC_ALIGN 32  /* columns per unit of the decode split: whole cache lines of Wt */
#define TILE_ALIGN 64 /* columns per unit of the tiled split: one AVX-512 column block */
#define ROWS_TILED_ALIGN 64 /* W rows per unit of the tiled up split */
#define ROWS_CHUNK_BYTES (1024 * 1024) /* W rows every tile meets while they sit in L2 */

/* ---- the active set and h ---- */

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
void cpm_fs_rows_scalar(const cpm_fs_rows_job *job, int t0, int t1) {
    size_t esz = cpm_dtype_size(job->wtype);
    for (int t = t0; t < t1; t++) {
        int j = job->ks[t];
        for (int m = 0; m < job->M; m++) {
            float u, *g = job->y + (size_t)m * (size_t)job->ldy + j;
            if (!(*g > job->threshold)) {
                *g = 0.0f;
                continue;
            }
            cpm_mm_job one = {.y = &u, .ldy = 1, .x = job->x + (size_t)m * (size_t)job->ldx,
                              .ldx = job->ldx,
                              .w = (const char *)job->w + (size_t)j * (size_t)job->w_ld * esz,
                              .wtype = job->wtype, .w_ld = job->w_ld, .M = 1, .N = 1, .K = job->K};
            cpm_mm_scalar(&one, 0, 1, 0, 1);
            *g = cpm_fs_act(*g, u, job->threshold);
        }
    }
}

void cpm_fs_down_decode_scalar(const cpm_fs_down_job *job, int n0, int n1) {
    for (int m = 0; m < job->M; m++) {
        float *y = job->y + (size_t)m * (size_t)job->ldy;
        const float *h = job->h + (size_t)m * (size_t)job->ldh;
        const int *ks = job->ks, *list = job->tiles ? cpm_fs_tile(job->tiles, m / TILE) : NULL;
        int nk = list ? list[0] : job->nk;
        for (int n = n0; n < n1; n++)
            y[n] = 0.0f;
        for (int t = 0; t < nk; t++) {
            int k = list ? list[1 + t] : ks[t];
            if (h[k] == 0.0f)
                continue;
            for (int n = n0; n < n1; n++)
                y[n] = fmaf(h[k], cpm_fs_wt_at(job, k, n), y[n]);
        }
    }
}

void cpm_fs_down_tiles_scalar(const cpm_fs_down_job *job, int n0, int n1) {
    for (int m0 = 0; m0 < job->M; m0 += TILE) {
        const int *list = cpm_fs_tile(job->tiles, m0 / TILE);
        int mr = job->M - m0 < TILE ? job->M - m0 : TILE;
        for (int i = 0; i < mr; i++) {
            const float *h = job->h + (size_t)(m0 + i) * (size_t)job->ldh;
            float *y = job->y + (size_t)(m0 + i) * (size_t)job->ldy;
            for (int n = n0; n < n1; n++) {
                float acc = 0.0f;
                for (int t = 0; t < list[0]; t++)
                    acc = fmaf(h[list[1 + t]], cpm_fs_wt_at(job, list[1 + t], n), acc);
                y[n] = acc;
            }
        }
    }
}

/* ---- dispatch and threading ---- */

static cpm_fs_rows_kernel rows_kernel(void) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
    if (isa >= CPM_ISA_AVX512)
        return cpm_fs_rows_avx512;
    if (isa == CPM_ISA_AVX2)
        return cpm_fs_rows_avx2;
#endif
    return cpm_fs_rows_scalar;
}

static cpm_fs_down_kernel down_kernel(bool tiled) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
    if (isa >= CPM_ISA_AVX512)
        return tiled ? cpm_fs_down_tiles_avx512 : cpm_fs_down_decode_avx512;
    if (isa == CPM_ISA_AVX2)
        return tiled ? cpm_fs_down_tiles_avx2 : cpm_fs_down_decode_avx2;
#endif
    return tiled ? cpm_fs_down_tiles_scalar : cpm_fs_down_decode_scalar;
}

/* [*lo, *hi) of total, cut into units of align shared evenly by nt threads. */
static void share(int total, int align, int tid, int nt, int *lo, int *hi) {
    long units = (total + align - 1) / align;
    long a = units * tid / nt, b = units * (tid + 1) / nt;
    *lo = (int)(a * align < total ? a * align : total);
    *hi = (int)(b * align < total ? b * align : total);
}

/* ---- tiles ---- */

size_t cpm_ffn_sparse_work_ints(int M, int F) {
    return 2 + (M > TILE ? (size_t)((M + TILE - 1) / TILE) * ((size_t)F + 1) : 0);
}

typedef struct tiles_run {
    const float *g;
    int ldg, M;
    float threshold;
    const int *ks;
    int nk;
    int *work;
} tiles_run;

/* Tile b's list: the j of ks where one of its rows has g > threshold (count first). The
 * flags go into the list first, then are compacted in place, as cpm_ffn_sparse_active. */
static void build_tile(const tiles_run *r, int b) {
    int m0 = b * TILE, mr = r->M - m0 < TILE ? r->M - m0 : TILE, F = r->work[1] - 1, n = 0;
    int *list = r->work + 2 + (size_t)b * (size_t)r->work[1];
    mark_active(r->g + (size_t)m0 * (size_t)r->ldg, r->ldg, mr, F, r->threshold, list + 1);
    for (int t = 0; t < r->nk; t++) { /* list[1 + ks[t]] is read before list[1 + n <= ks[t]] */
        int j = r->ks[t], a = list[1 + j];
        list[1 + n] = j;
        n += a;
    }
    list[0] = n;
}

static void tiles_worker(void *arg, int tid, int nt) {
    const tiles_run *r = arg;
    int lo, hi;
    share(r->work[0], 1, tid, nt, &lo, &hi);
    for (int b = lo; b < hi; b++)
        build_tile(r, b);
}

const int *cpm_ffn_sparse_tiles(cpm_pool *pool, const float *g, int ldg, int M, int F,
                                float threshold, const int *ks, int nk, int *work) {
    if (M <= TILE)
        return NULL;
    work[0] = (M + TILE - 1) / TILE;
    work[1] = F + 1;
    tiles_run r = {.g = g, .ldg = ldg, .M = M, .threshold = threshold, .ks = ks, .nk = nk,
                   .work = work};
    cpm_pool_run(pool, tiles_worker, &r);
    return work;
}

/* ---- up and h ---- */

typedef struct rows_run {
    cpm_fs_rows_job job;
    cpm_fs_rows_kernel kernel;
} rows_run;

/* Tiled: W rows [j0, j1) in chunks that stay in L2 while every tile meets the rows of
 * its list there through the ISA's kernel (measured: as fast as widening the chunk into
 * f32 panels first, as cpm_matmul's prefill does, and simpler). */
static void rows_tiled(const rows_run *r, int j0, int j1) {
    const cpm_fs_rows_job *job = &r->job;
    size_t row_bytes = (size_t)job->K * cpm_dtype_size(job->wtype);
    int chunk = (int)(ROWS_CHUNK_BYTES / (row_bytes ? row_bytes : 1));
    chunk = chunk < 16 ? 16 : chunk;
    for (int c0 = j0; c0 < j1; c0 += chunk) {
        int c1 = j1 - c0 < chunk ? j1 : c0 + chunk;
        for (int b = 0; b < job->tiles[0]; b++) {
            const int *list = cpm_fs_tile(job->tiles, b);
            int a = cpm_fs_lower_bound(list + 1, list[0], c0);
            int e = a + cpm_fs_lower_bound(list + 1 + a, list[0] - a, c1);
            cpm_fs_rows_job one = *job;
            one.x += (size_t)b * TILE * (size_t)job->ldx;
            one.y += (size_t)b * TILE * (size_t)job->ldy;
            one.M = job->M - b * TILE < TILE ? job->M - b * TILE : TILE;
            one.ks = list + 1 + a;
            one.nk = e - a;
            one.tiles = NULL;
            if (e > a)
                r->kernel(&one, 0, e - a);
        }
    }
}

static void rows_worker(void *arg, int tid, int nt) {
    const rows_run *r = arg;
    int lo, hi;
    if (!r->job.tiles) {
        share(r->job.nk, ROWS_ALIGN, tid, nt, &lo, &hi);
        if (lo < hi)
            r->kernel(&r->job, lo, hi);
        return;
    }
    int first = r->job.ks[0], span = r->job.ks[r->job.nk - 1] + 1 - first;
    share(span, ROWS_TILED_ALIGN, tid, nt, &lo, &hi);
    if (lo < hi)
        rows_tiled(r, first + lo, first + hi);
}

void cpm_ffn_sparse_up(cpm_pool *pool, float *g, int ldg, const float *x, int ldx,
                       const void *w, cpm_dtype wtype, int w_ld, int M, int K, float threshold,
                       const int *ks, int nk, const int *tiles) {
    if (M <= 0 || nk <= 0)
        return;
    rows_run r = {.job = {.y = g, .ldy = ldg, .x = x, .ldx = ldx, .w = w, .wtype = wtype,
                          .w_ld = w_ld, .M = M, .K = K, .ks = ks, .nk = nk, .tiles = tiles,
                          .threshold = threshold},
                  .kernel = rows_kernel()};
    cpm_pool_run(pool, rows_worker, &r);
}

/* ---- down ---- */

typedef struct down_run {
    cpm_fs_down_job job;
    cpm_fs_down_kernel kernel;
    int align;
} down_run;

static void down_worker(void *arg, int tid, int nt) {
    const down_run *r = arg;
    int lo, hi;
    share(r->job.N, r->align, tid, nt, &lo, &hi);
    if (lo < hi)
        r->kernel(&r->job, lo, hi);
}

void cpm_ffn_sparse_down(cpm_pool *pool, float *y, int ldy, const float *h, int ldh,
                         const void *wt, cpm_dtype wtype, int wt_ld, int M, int N, const int *ks,
                         int nk, const int *tiles) {
    if (M <= 0 || N <= 0)
        return;
    bool tiled = tiles && M > CPM_FFN_SPARSE_UNION_ROWS;
    down_run r = {.job = {.y = y, .ldy = ldy, .h = h, .ldh = ldh, .wt = wt, .wtype = wtype,
                          .wt_ld = wt_ld, .M = M, .N = N, .ks = ks, .nk = nk, .tiles = tiles},
                  .kernel = down_kernel(tiled), .align = tiled ? TILE_ALIGN : DEC_ALIGN};
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
    share(r->cols, TR_BLOCK, tid, nt, &lo, &hi); /* each thread owns dst rows [lo, hi) */
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
