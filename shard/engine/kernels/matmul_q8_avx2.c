/* matmul_q8_avx2.c - int8 weights (a scale per 32) times f32 x on AVX2 + FMA:
 * the f32 order of matmul_q8.h with each 16-lane accumulator held as two
 * 8-lane halves, so the bits are the scalar kernel's. */
#include <immintrin.h>

#include "matmul_q8_internal.h"
#include "wload.h"

#define INLINE static inline __attribute__((always_inline))

#define NR 4 /* weight rows per tile, one x row */

INLINE __m256 widen8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* x[k0 + off .. + 8), lanes at or past K read as 0. */
INLINE __m256 load_x8(const float *x, int k0, int off, int K) {
    int n = K - k0 - off;
    if (n >= 8)
        return _mm256_loadu_ps(x + k0 + off);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
    return _mm256_maskload_ps(x + k0 + off, mask);
}

/* y[m, n + j] for j < nr. */
INLINE void tile(const int nr, const cpm_q8_job *job, int m, int n) {
    const cpm_q8 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q8_BLOCK;
    const int8_t *q = w->q + (size_t)n * Kp;
    const float *s = w->scale + (size_t)n * nb, *x = job->x + (size_t)m * job->ldx;
    __m256 lo[NR], hi[NR];
    for (int j = 0; j < nr; j++)
        lo[j] = hi[j] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const int k0 = (int)b * CPM_Q8_BLOCK;
        /* lane l of the 16: positions l and 16 + l; lanes 0-7 in lo, 8-15 in hi */
        __m256 x0 = load_x8(x, k0, 0, w->K), x1 = load_x8(x, k0, 8, w->K);
        __m256 x2 = load_x8(x, k0, 16, w->K), x3 = load_x8(x, k0, 24, w->K);
        for (int j = 0; j < nr; j++) {
            const int8_t *qb = q + (size_t)j * Kp + k0;
            __m256 sv = _mm256_set1_ps(s[(size_t)j * nb + b]);
            __m256 a = _mm256_fmadd_ps(x0, widen8(qb), _mm256_setzero_ps());
            a = _mm256_fmadd_ps(x2, widen8(qb + 16), a);
            lo[j] = _mm256_fmadd_ps(a, sv, lo[j]);
            a = _mm256_fmadd_ps(x1, widen8(qb + 8), _mm256_setzero_ps());
            a = _mm256_fmadd_ps(x3, widen8(qb + 24), a);
            hi[j] = _mm256_fmadd_ps(a, sv, hi[j]);
        }
    }
    for (int j = 0; j < nr; j++)
        job->y[(size_t)m * job->ldy + (size_t)(n + j)] = cpm_reduce16_avx2(lo[j], hi[j]);
}

void cpm_q8_mm_avx2(const cpm_q8_job *job, int m0, int m1, int n0, int n1) {
    for (int m = m0; m < m1; m++) {
        int n = n0;
        for (; n + NR <= n1; n += NR)
            tile(NR, job, m, n);
        for (; n < n1; n++)
            tile(1, job, m, n);
    }
}
