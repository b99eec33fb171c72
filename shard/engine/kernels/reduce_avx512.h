/* reduce_avx512.h - the canonical 16-lane tree of matmul_internal.h on AVX-512
 * (halves, then quarters, then pairs), shared by the AVX-512 kernel files; only
 * files compiled with -mavx512f include it. */
#ifndef CPM_REDUCE_AVX512_H
#define CPM_REDUCE_AVX512_H

#include <immintrin.h>

static inline __attribute__((always_inline)) float cpm_reduce16_avx512(__m512 a) {
    __m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

/* The same tree over 16 accumulators at once, each level adding two vectors
 * whose lanes hold the halves of several accumulators (a transposition, so
 * 15 adds instead of 64). Every sum keeps its own operands and order, so
 * out[i] has exactly the bits of cpm_reduce16_avx512(v[i]). */
static inline __attribute__((always_inline)) __m512 cpm_reduce16x16_avx512(const __m512 *v) {
    __m512 p[8], q[4], r[2];
    for (int k = 0; k < 8; k++) /* 128-bit lanes: [v2k r8 0..3, 4..7, v2k+1 r8 0..3, 4..7] */
        p[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xee));
    for (int k = 0; k < 4; k++) /* lane t: r4 of v[4k + t] */
        q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0xdd));
    for (int k = 0; k < 2; k++) /* lane t: r2 of v[8k + t], then of v[8k + 4 + t] */
        r[k] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * k], q[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(q[2 * k], q[2 * k + 1], 0xee));
    /* lane t, element e: the sum of v[4e + t] */
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88),
                             _mm512_shuffle_ps(r[0], r[1], 0xdd));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, s);
}

/* out[i] = cpm_reduce16_avx512(v[i]) for i < n; out has room for n rounded
 * up to 16 (the tail of the last group is scratch). */
static inline __attribute__((always_inline)) void cpm_reduce16_many_avx512(const __m512 *v, int n,
                                                                          float *out) {
    for (int g = 0; g < n; g += 16) {
        __m512 grp[16];
        for (int i = 0; i < 16; i++)
            grp[i] = g + i < n ? v[g + i] : _mm512_setzero_ps();
        _mm512_storeu_ps(out + g, cpm_reduce16x16_avx512(grp));
    }
}

#endif
