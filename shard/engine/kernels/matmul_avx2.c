/* matmul_avx2.c - AVX2+FMA+F16C kernels for cpm_matmul (CPUs without AVX-512).
 *
 * Same canonical order as the other kernels (matmul_internal.h): each output's
 * 16-lane accumulator is held as two 8-lane halves, lanes 0-7 and 8-15, so the
 * results match the scalar and AVX-512 kernels bit for bit.
 *
 * Decode (one x row) streams W rows and prefetches the next rows ahead (a row
 * is too short for the hardware prefetcher to learn). Batches and prefill
 * run PMR x rows against PNR W rows, one half of each canonical accumulator at
 * a time; up to DIRECT_M x rows they read W rows where they lie, beyond that a
 * group of W rows is first packed into panels interleaved by chunk and half
 * (one sequential stream each), kept in L2.
 */
#include <immintrin.h>

#include <stdbool.h>

#include "matmul_internal.h"
#include "wload.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 2       /* x rows per register tile */
#define NR 2       /* W rows per register tile */
#define DEC_ROWS 4 /* W rows per step when there is one x row */
#define NMAX 4
#define PMR 3      /* prefill: x rows per tile (in registers) */
#define PNR 4      /* prefill: W rows per panel: 3 x 4 accumulators of one half + 3 x + 1 w */
#define GROUP_HALFS (128 * 1024)
#define DIRECT_M 32 /* up to this many x rows W is read where it lies, not packed */ /* W rows packed at once: 256 KiB of stack, held in L2 */

/* The last, partial chunk of a row, zero-padded to 16 lanes in f32. */
static void pad_w(float *dst, const cpm_mm_job *job, int n, int k0) {
    for (int j = 0; j < CPM_MM_LANES; j++)
        dst[j] = k0 + j < job->K ? cpm_mm_w_at(job, n, k0 + j) : 0.0f;
}

static void pad_x(float *dst, const float *x, int k0, int K) {
    for (int j = 0; j < CPM_MM_LANES; j++)
        dst[j] = k0 + j < K ? x[k0 + j] : 0.0f;
}

/* y[i, j] for i < mr, j < nr, x rows from m, W rows from n. */
INLINE void tile(const int mr, const int nr, const int src, const cpm_mm_job *job, int m, int n) {
    const size_t esz = src == CPM_WSRC_F32 ? 4 : 2;
    const int K = job->K;
    const float *x[MR];
    const char *wr[NMAX];
    __m256 lo[MR][NMAX], hi[MR][NMAX];
    for (int i = 0; i < mr; i++)
        x[i] = job->x + (size_t)(m + i) * job->ldx;
    for (int j = 0; j < nr; j++)
        wr[j] = (const char *)job->w + (size_t)(n + j) * job->w_ld * esz;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            lo[i][j] = hi[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 wl[NMAX], wh[NMAX];
        if (mr == 1) /* decode: the next rows' lines, 32 bytes of each row per chunk */
            for (int j = 0; j < nr; j++)
                _mm_prefetch(wr[j] + (size_t)nr * job->w_ld * esz + (size_t)k * esz, _MM_HINT_T0);
        for (int j = 0; j < nr; j++) {
            wl[j] = cpm_wload8(src, wr[j], k);
            wh[j] = cpm_wload8(src, wr[j], k + 8);
        }
        for (int i = 0; i < mr; i++) {
            __m256 xl = _mm256_loadu_ps(x[i] + k), xh = _mm256_loadu_ps(x[i] + k + 8);
            for (int j = 0; j < nr; j++) {
                lo[i][j] = _mm256_fmadd_ps(xl, wl[j], lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(xh, wh[j], hi[i][j]);
            }
        }
    }
    if (k < K) {
        float wt[NMAX][CPM_MM_LANES], xt[CPM_MM_LANES];
        for (int j = 0; j < nr; j++)
            pad_w(wt[j], job, n + j, k);
        for (int i = 0; i < mr; i++) {
            pad_x(xt, x[i], k, K);
            __m256 xl = _mm256_loadu_ps(xt), xh = _mm256_loadu_ps(xt + 8);
            for (int j = 0; j < nr; j++) {
                lo[i][j] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(wt[j]), lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(wt[j] + 8), hi[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            job->y[(size_t)(m + i) * job->ldy + n + j] = cpm_reduce16_avx2(lo[i][j], hi[i][j]);
}

/* W rows [n, n + nr) repacked for panel_tile, still 16-bit: lanes 8h .. 8h + 7 of
 * chunk c of row j at dst[((h * C + c) * nr + j) * 8], C = the number of chunks
 * (the last one zero-padded). Each half of a canonical accumulator is a chain of
 * its own, so a tile runs the low halves over all of K, then the high halves:
 * with half the accumulators live, 3 x rows meet 4 W rows in the 16 registers
 * (7 loads per 12 FMAs instead of 10). W stays 16-bit in the group, widened as
 * it is loaded: half the bytes streamed from L2 per FMA. */
static void pack_panel(uint16_t *dst, const cpm_mm_job *job, int n, int nr) {
    const int K = job->K, C = (K + 15) / 16;
    for (int j = 0; j < nr; j++) {
        const uint16_t *row = (const uint16_t *)job->w + (size_t)(n + j) * job->w_ld;
        uint16_t *lo = dst + (size_t)j * 8, *hi = lo + (size_t)C * nr * 8;
        int k = 0;
        for (; k + 16 <= K; k += 16, lo += nr * 8, hi += nr * 8) {
            _mm_storeu_si128((__m128i *)lo, _mm_loadu_si128((const __m128i *)(row + k)));
            _mm_storeu_si128((__m128i *)hi, _mm_loadu_si128((const __m128i *)(row + k + 8)));
        }
        if (k < K)
            for (int t = 0; t < 8; t++) {
                lo[t] = k + t < K ? row[k + t] : 0;
                hi[t] = k + 8 + t < K ? row[k + 8 + t] : 0;
            }
    }
}

/* 8 weights of a panel as f32. */
INLINE __m256 widen8(const int src, const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (src == CPM_WSRC_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Half h of the accumulators of y[i, j], i < mr x rows, j < nr W rows (row j's
 * chunk c at w + j * rs + c * cs, its zero-padded last chunk at wt + j * 8): the
 * canonical FMAs of lanes 8h .. 8h + 7, each x vector and each W vector loaded
 * once per chunk; the sums go to out[i][j]. pf: the next rows, prefetched. */
INLINE void panel_half(const int src, const int mr, const int nr, const float *x, size_t ldx,
                       const uint16_t *w, size_t rs, size_t cs, const uint16_t *wt, int K, int h,
                       float *out, const char *pf) {
    __m256 acc[PMR][PNR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm256_setzero_ps();
    int k = 0;
    x += 8 * h;
    for (; k + 16 <= K; k += 16, w += cs) {
        if (pf && !(k & 16)) /* the next rows' next line, as W streams from DRAM */
            for (int j = 0; j < nr; j++)
                _mm_prefetch(pf + j * rs * 2 + (size_t)k * 2, _MM_HINT_T0);
        __m256 xv[PMR];
        for (int i = 0; i < mr; i++) {
            xv[i] = _mm256_loadu_ps(x + (size_t)i * ldx + k);
            __asm__("" : "+x"(xv[i])); /* loaded once, kept: GCC would reload or fold */
        }
        for (int j = 0; j < nr; j++) {
            __m256 wv = widen8(src, w + j * rs);
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    if (k < K) {
        float xt[CPM_MM_LANES];
        for (int i = 0; i < mr; i++) {
            pad_x(xt, x - 8 * h + (size_t)i * ldx, k, K);
            __m256 xv = _mm256_loadu_ps(xt + 8 * h);
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm256_fmadd_ps(xv, widen8(src, wt + j * 8), acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            _mm256_store_ps(out + (i * PNR + j) * 8, acc[i][j]);
}

/* The full tiles on their own: inlined into their callers, GCC spills accumulators. */
static __attribute__((noinline)) void panel_half_f16(const float *x, size_t ldx, const uint16_t *w,
                                                     size_t rs, size_t cs, const uint16_t *wt, int K,
                                                     int h, float *out, const char *pf) {
    panel_half(CPM_WSRC_F16, PMR, PNR, x, ldx, w, rs, cs, wt, K, h, out, pf);
}
static __attribute__((noinline)) void panel_half_bf16(const float *x, size_t ldx, const uint16_t *w,
                                                      size_t rs, size_t cs, const uint16_t *wt, int K,
                                                      int h, float *out, const char *pf) {
    panel_half(CPM_WSRC_BF16, PMR, PNR, x, ldx, w, rs, cs, wt, K, h, out, pf);
}

typedef struct wview { /* W rows as panel_half reads them */
    const uint16_t *w[2]; /* low and high half of row 0's first chunk */
    const uint16_t *t[2]; /* the zero-padded last chunk's halves, rows 8 apart */
    size_t rs, cs;        /* row and chunk strides */
} wview;

/* The view of a packed panel of nrp rows. */
static wview packed_view(const uint16_t *p, int nrp, int K) {
    const size_t half = (size_t)(K + 15) / 16 * nrp * 8, tail = (size_t)(K / 16) * nrp * 8;
    return (wview){{p, p + half}, {p + tail, p + half + tail}, 8, (size_t)nrp * 8};
}

/* v moved on to its row j. */
static wview view_row(const wview *v, int j) {
    return (wview){{v->w[0] + j * v->rs, v->w[1] + j * v->rs}, {v->t[0] + j * 8, v->t[1] + j * 8},
                   v->rs, v->cs};
}

/* y[i, j] for i < mr x rows from x, j < nr rows of v: both halves, then the
 * canonical tree of each pair. */
INLINE void panel_tile(const int src, const int mr, const int nr, const float *x, size_t ldx,
                       const wview *v, int K, float *y, size_t ldy, const char *pf) {
    float lo[PMR * PNR * 8] __attribute__((aligned(32))), hi[PMR * PNR * 8] __attribute__((aligned(32)));
    if (mr == PMR && nr == PNR) {
        if (src == CPM_WSRC_F16) {
            panel_half_f16(x, ldx, v->w[0], v->rs, v->cs, v->t[0], K, 0, lo, pf);
            panel_half_f16(x, ldx, v->w[1], v->rs, v->cs, v->t[1], K, 1, hi, NULL);
        } else {
            panel_half_bf16(x, ldx, v->w[0], v->rs, v->cs, v->t[0], K, 0, lo, pf);
            panel_half_bf16(x, ldx, v->w[1], v->rs, v->cs, v->t[1], K, 1, hi, NULL);
        }
    } else {
        panel_half(src, mr, nr, x, ldx, v->w[0], v->rs, v->cs, v->t[0], K, 0, lo, pf);
        panel_half(src, mr, nr, x, ldx, v->w[1], v->rs, v->cs, v->t[1], K, 1, hi, NULL);
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = cpm_reduce16_avx2(_mm256_load_ps(lo + (i * PNR + j) * 8),
                                                       _mm256_load_ps(hi + (i * PNR + j) * 8));
}

/* x rows [0, mr) (mr <= PMR) against the nr <= PNR W rows of v: the last x rows
 * of a batch, 1 or 2, run against all PNR rows; fewer W rows go one output at a
 * time. pf: the rows after v's, prefetched by the tile. */
static void tiles(const int src, int mr, int nr, const float *x, size_t ldx, const wview *v,
                  int K, float *y, size_t ldy, const char *pf) {
    if (nr == PNR) {
        if (mr == PMR)
            panel_tile(src, PMR, PNR, x, ldx, v, K, y, ldy, pf);
        else if (mr == 2)
            panel_tile(src, 2, PNR, x, ldx, v, K, y, ldy, pf);
        else
            panel_tile(src, 1, PNR, x, ldx, v, K, y, ldy, pf);
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const wview u = view_row(v, j);
            panel_tile(src, 1, 1, x + i * ldx, ldx, &u, K, y + i * ldy + j, ldy, NULL);
        }
}

/* A few x rows (batched decode): the same tiles over W rows read where they lie,
 * PNR at a time, the next rows prefetched by the first tile; packing W would cost
 * more than the few rows save. */
static void direct_rows(const cpm_mm_job *job, const int src, int m0, int m1, int n0, int n1) {
    const size_t ldx = (size_t)job->ldx, ldy = (size_t)job->ldy, w_ld = (size_t)job->w_ld;
    const int K = job->K, kt = K / 16 * 16;
    const uint16_t *W = job->w;
    uint16_t tail[2 * PNR * 8];
    for (int n = n0; n < n1; n += PNR) {
        const int nr = n1 - n < PNR ? n1 - n : PNR;
        const uint16_t *row = W + (size_t)n * w_ld;
        for (int j = 0; j < nr && kt < K; j++)
            for (int t = 0; t < 16; t++)
                tail[(t / 8) * PNR * 8 + j * 8 + t % 8] = kt + t < K ? row[(size_t)j * w_ld + kt + t] : 0;
        const wview v = {{row, row + 8}, {tail, tail + PNR * 8}, w_ld, 16};
        const char *pf = n + PNR < n1 ? (const char *)(row + PNR * w_ld) : NULL;
        for (int m = m0; m < m1; m += PMR, pf = NULL) {
            const int mr = m1 - m < PMR ? m1 - m : PMR;
            tiles(src, mr, nr, job->x + m * ldx, ldx, &v, K, job->y + m * ldy + n, ldy, pf);
        }
    }
}

/* W rows [n, n + rows) packed into group, then every x tile against each panel
 * of it (the group in L2, the x tile in L1). */
static void prefill_group(const cpm_mm_job *job, const int src, uint16_t *group, int m0, int m1,
                          int n, int rows) {
    const size_t ldx = (size_t)job->ldx, ldy = (size_t)job->ldy;
    const int K = job->K;
    const size_t panel = (((size_t)K + 15) & ~(size_t)15) * PNR;
    for (int j = 0; j < rows; j += PNR)
        pack_panel(group + j / PNR * panel, job, n + j, rows - j < PNR ? rows - j : PNR);
    for (int m = m0; m < m1; m += PMR) {
        const int mr = m1 - m < PMR ? m1 - m : PMR;
        const float *x = job->x + m * ldx;
        float *y = job->y + m * ldy + n;
        for (int j = 0; j < rows; j += PNR) {
            const int nr = rows - j < PNR ? rows - j : PNR;
            const wview v = packed_view(group + j / PNR * panel, nr, K);
            tiles(src, mr, nr, x, ldx, &v, K, y + j, ldy, NULL);
        }
    }
}

/* Prefill of BF16 / F16 weights through packed panels; false when K is too
 * long for one panel per group (then the row tiles of tile() serve). */
static bool prefill_panels(const cpm_mm_job *job, const int src, int m0, int m1, int n0, int n1) {
    const size_t ld = ((size_t)job->K + 15) & ~(size_t)15;
    const int rows = (int)(GROUP_HALFS / ld) / PNR * PNR;
    if (rows < PNR)
        return false;
    _Static_assert(GROUP_HALFS * sizeof(uint16_t) <= 256 * 1024, "group fits the stack");
    uint16_t group[GROUP_HALFS] __attribute__((aligned(32)));
    for (int n = n0; n < n1; n += rows)
        prefill_group(job, src, group, m0, m1, n, n1 - n < rows ? n1 - n : rows);
    return true;
}

INLINE void run(const int src, const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    if (m1 - m0 == 1) {
        int n = n0;
        for (; n + DEC_ROWS <= n1; n += DEC_ROWS)
            tile(1, DEC_ROWS, src, job, m0, n);
        for (; n < n1; n++)
            tile(1, 1, src, job, m0, n);
        return;
    }
    if (src != CPM_WSRC_F32 && m1 - m0 <= DIRECT_M) {
        direct_rows(job, src, m0, m1, n0, n1);
        return;
    }
    if (src != CPM_WSRC_F32 && prefill_panels(job, src, m0, m1, n0, n1))
        return;
    int n = n0;
    for (; n + NR <= n1; n += NR) {
        int m = m0;
        for (; m + MR <= m1; m += MR)
            tile(MR, NR, src, job, m, n);
        for (; m < m1; m++)
            tile(1, NR, src, job, m, n);
    }
    for (; n < n1; n++)
        for (int m = m0; m < m1; m++)
            tile(1, 1, src, job, m, n);
}

void cpm_mm_avx2(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    switch (job->wtype) {
    case CPM_DTYPE_F32: run(CPM_WSRC_F32, job, m0, m1, n0, n1); break;
    case CPM_DTYPE_F16: run(CPM_WSRC_F16, job, m0, m1, n0, n1); break;
    default: run(CPM_WSRC_BF16, job, m0, m1, n0, n1); break;
    }
}
