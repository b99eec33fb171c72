/* matmul_avx2.c - AVX2+FMA+F16C kernels for cpm_matmul (CPUs without AVX-512).
 *
 * Same canonical order as the other kernels (matmul_internal.h): each output's
 * 16-lane accumulator is held as two 8-lane halves, lanes 0-7 and 8-15, so the
 * results match the scalar and AVX-512 kernels bit for bit.
 *
 * Decode (one x row) streams W rows and prefetches the next rows ahead (a row
 * is too short for the hardware prefetcher to learn). Prefill widens a group
 * of W rows to f32 panels interleaved by chunk (one sequential stream each),
 * kept in L2, and runs every PMR-row tile of x against each panel with the x
 * vectors held in registers.
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
#define PMR 2      /* prefill: x rows per tile (x halves in registers) */
#define PNR 3      /* prefill: W rows per panel: 2 x 3 x 2 accumulators + 2 x + 1 w = 15 ymm */
#define GROUP_FLOATS (64 * 1024) /* W rows widened at once: 256 KiB of stack, held in L2 */

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

/* W rows [n, n + nr) as f32, chunk c of row j at dst[(c * nr + j) * 16], the
 * last chunk zero-padded. */
static void widen_panel(float *dst, const cpm_mm_job *job, const int src, int n, int nr) {
    const int K = job->K;
    for (int j = 0; j < nr; j++) {
        const char *row = (const char *)job->w + (size_t)(n + j) * job->w_ld * 2;
        float *d = dst + j * 16;
        int k = 0;
        for (; k + 16 <= K; k += 16, d += nr * 16) {
            _mm256_storeu_ps(d, src == CPM_WSRC_F16 ? cpm_wload8(CPM_WSRC_F16, row, k) : cpm_wload8(CPM_WSRC_BF16, row, k));
            _mm256_storeu_ps(d + 8, src == CPM_WSRC_F16 ? cpm_wload8(CPM_WSRC_F16, row, k + 8)
                                                   : cpm_wload8(CPM_WSRC_BF16, row, k + 8));
        }
        if (k < K)
            pad_w(d, job, n + j, k);
    }
}

/* y[i, j] for i < mr x rows from x, j < nr rows of a panel interleaved by nrp
 * rows: per chunk, each half of the mr x vectors is loaded once, each W half
 * once, and the FMAs are the canonical ones. */
INLINE void panel_tile(const int mr, const int nr, const float *x, size_t ldx, const float *w,
                       int nrp, int K, float *y, size_t ldy) {
    __m256 acc[PMR][PNR][2];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16, w += (size_t)nrp * 16) {
        for (int h = 0; h < 2; h++) {
            __m256 xv[PMR];
            for (int i = 0; i < mr; i++) {
                xv[i] = _mm256_loadu_ps(x + (size_t)i * ldx + k + 8 * h);
                __asm__("" : "+x"(xv[i])); /* loaded once, kept: GCC would reload or fold */
            }
            for (int j = 0; j < nr; j++) {
                __m256 wv = _mm256_loadu_ps(w + j * 16 + 8 * h);
                __asm__("" : "+x"(wv));
                for (int i = 0; i < mr; i++)
                    acc[i][j][h] = _mm256_fmadd_ps(xv[i], wv, acc[i][j][h]);
            }
        }
    }
    if (k < K) {
        float xt[CPM_MM_LANES];
        for (int i = 0; i < mr; i++) {
            pad_x(xt, x + (size_t)i * ldx, k, K);
            for (int h = 0; h < 2; h++) {
                __m256 xv = _mm256_loadu_ps(xt + 8 * h);
                for (int j = 0; j < nr; j++)
                    acc[i][j][h] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + j * 16 + 8 * h),
                                                   acc[i][j][h]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = cpm_reduce16_avx2(acc[i][j][0], acc[i][j][1]);
}

/* W rows [n, n + rows) widened into group, then every x tile against each
 * panel of it (the group in L2, the x tile in L1). */
static void prefill_group(const cpm_mm_job *job, const int src, float *group, int m0, int m1,
                          int n, int rows) {
    const size_t ldx = (size_t)job->ldx, ldy = (size_t)job->ldy;
    const int K = job->K;
    const size_t panel = (((size_t)K + 15) & ~(size_t)15) * PNR;
    for (int j = 0; j < rows; j += PNR)
        widen_panel(group + j / PNR * panel, job, src, n + j, rows - j < PNR ? rows - j : PNR);
    for (int m = m0; m < m1; m += PMR) {
        const int mr = m1 - m < PMR ? m1 - m : PMR;
        const float *x = job->x + m * ldx;
        float *y = job->y + m * ldy + n;
        for (int j = 0; j < rows; j += PNR) {
            const float *p = group + j / PNR * panel;
            const int nr = rows - j < PNR ? rows - j : PNR;
            if (mr == PMR && nr == PNR) {
                panel_tile(PMR, PNR, x, ldx, p, PNR, K, y + j, ldy);
                continue;
            }
            for (int i = 0; i < mr; i++)
                for (int jj = 0; jj < nr; jj++)
                    panel_tile(1, 1, x + i * ldx, ldx, p + jj * 16, nr, K, y + i * ldy + j + jj,
                               ldy);
        }
    }
}

/* Prefill of BF16 / F16 weights through widened panels; false when K is too
 * long for one panel per group (then the direct tiles serve). */
static bool prefill_panels(const cpm_mm_job *job, const int src, int m0, int m1, int n0, int n1) {
    const size_t ld = ((size_t)job->K + 15) & ~(size_t)15;
    const int rows = (int)(GROUP_FLOATS / ld) / PNR * PNR;
    if (rows < PNR)
        return false;
    _Static_assert(GROUP_FLOATS * sizeof(float) <= 256 * 1024, "group fits the stack");
    float group[GROUP_FLOATS] __attribute__((aligned(32)));
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
