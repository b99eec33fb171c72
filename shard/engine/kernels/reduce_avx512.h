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

#endif
