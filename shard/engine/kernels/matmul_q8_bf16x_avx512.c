/* matmul_q8_bf16x_avx512.c - int8 weights (a scale per 32) times x rounded to
 * bf16, on VDPBF16PS: every q is exact in bf16, so one block of 32 is one
 * instruction's products (lane l: positions 2l and 2l + 1), then
 * T = fma(A, s, T). Compiled with -mavx512bf16 only here. */
#include <immintrin.h>

#include "bf16dot_avx512.h"
#include "matmul_q8_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 4 /* x rows per tile */
#define NR 4 /* weight rows per tile */

/* 32 int8 weights as bf16, exactly (|q| <= 127 needs 7 bits). */
INLINE __m512bh widen32(const int8_t *q) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

void cpm_q8_bf16x_pack(const cpm_q8_job *job, int m0, int m1) {
    const size_t Kp = (size_t)job->w->Kp;
    for (int m = m0; m < m1; m++)
        cpm_bf16dot_round_row(job->x + (size_t)m * job->ldx, job->w->K,
                              (uint16_t *)job->xh + (size_t)m * Kp);
}

/* y[i, j] for i < mr x rows from m, j < nr weight rows from n. */
INLINE void tile(const int mr, const int nr, const cpm_q8_job *job, int m, int n) {
    const cpm_q8 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q8_BLOCK;
    const int8_t *q = w->q + (size_t)n * Kp;
    const float *s = w->scale + (size_t)n * nb;
    const uint16_t *x = job->xh + (size_t)m * Kp;
    __m512 T[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            T[i][j] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const size_t k0 = b * CPM_Q8_BLOCK;
        __m512bh wv[NR];
        for (int j = 0; j < nr; j++) {
            _mm_prefetch((const char *)(q + (size_t)(j + nr) * Kp + k0), _MM_HINT_T0);
            wv[j] = widen32(q + (size_t)j * Kp + k0);
        }
        for (int i = 0; i < mr; i++) {
            __m512bh xv = cpm_bh_load(x + (size_t)i * Kp + k0);
            for (int j = 0; j < nr; j++) {
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), xv, wv[j]);
                T[i][j] = _mm512_fmadd_ps(a, _mm512_set1_ps(s[(size_t)j * nb + b]), T[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            job->y[(size_t)(m + i) * job->ldy + (size_t)(n + j)] = cpm_reduce16_avx512(T[i][j]);
}

INLINE void rows(const int nr, const cpm_q8_job *job, int m0, int m1, int n) {
    int m = m0;
    for (; m + MR <= m1; m += MR)
        tile(MR, nr, job, m, n);
    switch (m1 - m) {
    case 3: tile(3, nr, job, m, n); break;
    case 2: tile(2, nr, job, m, n); break;
    case 1: tile(1, nr, job, m, n); break;
    default: break;
    }
}

void cpm_q8_mm_bf16x(const cpm_q8_job *job, int m0, int m1, int n0, int n1) {
    int n = n0;
    for (; n + NR <= n1; n += NR)
        rows(NR, job, m0, m1, n);
    for (; n < n1; n++)
        rows(1, job, m0, m1, n);
}
