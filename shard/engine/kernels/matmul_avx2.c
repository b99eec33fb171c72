/* matmul_avx2.c - AVX2+FMA+F16C kernels for cpm_matmul (CPUs without AVX-512).
 *
 * Same canonical order as the other kernels (matmul_internal.h): each output's
 * 16-lane accumulator is held as two 8-lane halves, lanes 0-7 and 8-15, so the
 * results match the scalar and AVX-512 kernels bit for bit.
 */
#include <immintrin.h>

#include "matmul_internal.h"

#define INLINE static inline __attribute__((always_inline))

enum { SRC_F32, SRC_BF16, SRC_F16 };

#define MR 2       /* x rows per register tile */
#define NR 2       /* W rows per register tile */
#define DEC_ROWS 4 /* W rows per step when there is one x row */
#define NMAX 4

INLINE __m256 load8(int src, const void *row, int k) {
    if (src == SRC_F32)
        return _mm256_loadu_ps((const float *)row + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (src == SRC_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float reduce16(__m256 lo, __m256 hi) {
    __m256 r8 = _mm256_add_ps(lo, hi);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

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
    const size_t esz = src == SRC_F32 ? 4 : 2;
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
        for (int j = 0; j < nr; j++) {
            wl[j] = load8(src, wr[j], k);
            wh[j] = load8(src, wr[j], k + 8);
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
            job->y[(size_t)(m + i) * job->ldy + n + j] = reduce16(lo[i][j], hi[i][j]);
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
    case CPM_DTYPE_F32: run(SRC_F32, job, m0, m1, n0, n1); break;
    case CPM_DTYPE_F16: run(SRC_F16, job, m0, m1, n0, n1); break;
    default: run(SRC_BF16, job, m0, m1, n0, n1); break;
    }
}
