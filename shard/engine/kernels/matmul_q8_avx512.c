/* matmul_q8_avx512.c - int8 weights (a scale per 32) times f32 x on AVX-512F:
 * the f32 order of matmul_q8.h, lane l of a block's accumulator taking
 * positions l and 16 + l, so the bits are the scalar kernel's. Each weight
 * block is widened once for up to MR x rows. */
#include <immintrin.h>

#include "matmul_q8_internal.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 2 /* x rows per tile */
#define NR 4 /* weight rows per tile */

INLINE __m512 widen16(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

INLINE __mmask16 lanes_below(int n) {
    return (__mmask16)(n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1);
}

/* y[i, j] for i < mr x rows from m, j < nr weight rows from n. */
INLINE void tile(const int mr, const int nr, const cpm_q8_job *job, int m, int n) {
    const cpm_q8 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q8_BLOCK;
    const int8_t *q = w->q + (size_t)n * Kp;
    const float *s = w->scale + (size_t)n * nb;
    const float *x = job->x + (size_t)m * job->ldx;
    __m512 T[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            T[i][j] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const int k0 = (int)b * CPM_Q8_BLOCK;
        const __mmask16 lo = lanes_below(w->K - k0), hi = lanes_below(w->K - k0 - 16);
        __m512 wl[NR], wh[NR];
        for (int j = 0; j < nr; j++) {
            /* the next rows' block: rows are short, the prefetcher learns them late */
            _mm_prefetch((const char *)(q + (size_t)(j + nr) * Kp + k0), _MM_HINT_T0);
            wl[j] = widen16(q + (size_t)j * Kp + k0);
            wh[j] = widen16(q + (size_t)j * Kp + k0 + 16);
        }
        for (int i = 0; i < mr; i++) {
            const float *xi = x + (size_t)i * job->ldx + k0;
            __m512 xl = _mm512_maskz_loadu_ps(lo, xi), xh = _mm512_maskz_loadu_ps(hi, xi + 16);
            for (int j = 0; j < nr; j++) {
                __m512 a = _mm512_fmadd_ps(xl, wl[j], _mm512_setzero_ps());
                a = _mm512_fmadd_ps(xh, wh[j], a);
                T[i][j] = _mm512_fmadd_ps(a, _mm512_set1_ps(s[(size_t)j * nb + b]), T[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            job->y[(size_t)(m + i) * job->ldy + (size_t)(n + j)] = cpm_reduce16_avx512(T[i][j]);
}

void cpm_q8_mm_avx512(const cpm_q8_job *job, int m0, int m1, int n0, int n1) {
    int n = n0;
    for (; n + NR <= n1; n += NR) {
        int m = m0;
        for (; m + MR <= m1; m += MR)
            tile(MR, NR, job, m, n);
        for (; m < m1; m++)
            tile(1, NR, job, m, n);
    }
    for (; n < n1; n++)
        for (int m = m0; m < m1; m++)
            tile(1, 1, job, m, n);
}
