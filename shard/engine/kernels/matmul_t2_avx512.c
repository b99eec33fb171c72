/* matmul_t2_avx512.c - the ternary kernel with AVX-512 masked adds: per 16 inputs, one
 * add under the +1 mask and one subtract under the −1 mask; no multiplication until the
 * row's scale. Lanes and folding as matmul_t2_ref, hence the same bits. */
#include <immintrin.h>

#include "matmul_t2_internal.h"

/* 8+8, 4+4, 2+2, 1+1, as fold16 in matmul_t2.c. */
static float fold(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
}

#define MB 4 /* rows of x per pass: each code word is used MB times from a register */

void cpm_t2_mm_avx512(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                      int m0, int m1, int n0, int n1) {
    const int G = w->G, full = w->K / 16;
    const __mmask16 tail = (__mmask16)((1u << (w->K % 16)) - 1u);
    for (int n = n0; n < n1; n++) {
        const uint32_t *words = w->codes + (size_t)n * (size_t)G;
        if (n + 1 < n1)
            _mm_prefetch((const char *)(words + G), _MM_HINT_T0);
        for (int m = m0; m < m1; m += MB) {
            int mb = m1 - m < MB ? m1 - m : MB;
            __m512 acc[MB];
            for (int i = 0; i < MB; i++)
                acc[i] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                uint32_t word = words[g];
                if (!word)
                    continue;
                __mmask16 plus = (__mmask16)word, minus = (__mmask16)(word >> 16);
                for (int i = 0; i < mb; i++) {
                    const float *xp = x + (size_t)(m + i) * ldx + (size_t)g * 16;
                    __m512 xv = g < full ? _mm512_loadu_ps(xp) : _mm512_maskz_loadu_ps(tail, xp);
                    acc[i] = _mm512_mask_add_ps(acc[i], plus, acc[i], xv);
                    acc[i] = _mm512_mask_sub_ps(acc[i], minus, acc[i], xv);
                }
            }
            for (int i = 0; i < mb; i++)
                y[(size_t)(m + i) * ldy + (size_t)n] = w->scale[n] * fold(acc[i]);
        }
    }
}
