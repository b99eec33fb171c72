/* matmul_q4_avx512.c - the int4 kernel of matmul_q4_tmpl.h over AVX-512: one
 * zmm per 16 lanes; a 16-byte block widens to two vectors of (q − z) with one
 * zero-extension, a mask and a shift. Compiled with -mavx512* only here. */
#include <immintrin.h>

#include "matmul_q4_internal.h"

typedef __m512 V;
typedef __m512 VZ; /* the 16 values q − z for q = 0..15, as f32 */

#define INLINE static inline __attribute__((always_inline))

INLINE V v_zero(void) { return _mm512_setzero_ps(); }
INLINE V v_load(const float *p) { return _mm512_loadu_ps(p); }
INLINE V v_set1(float f) { return _mm512_set1_ps(f); }
INLINE void v_store(float *p, V v) { _mm512_storeu_ps(p, v); }
INLINE V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
INLINE VZ vz_set1(int z) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_sub_ps(iota, _mm512_set1_ps((float)z)); /* exact: small integers */
}

/* A table lookup instead of mask, subtract and convert: vpermps reads only
 * the low 4 bits of each index lane, which is the low nibble as it comes,
 * so a block costs 6 uops instead of 9 (decode is compute bound without it). */
INLINE void v_nibbles(const uint8_t *p, VZ table, V *lo, V *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_permutexvar_ps(b, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

/* The canonical tree: halves, then quarters, then pairs. */
INLINE float v_reduce(V a) {
    __m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

/* 4x3 tiles: 24 accumulators + 3 weight vectors + x in 32 zmm registers. */
#define Q4_MR 4
#define Q4_NR 3
#define Q4_DEC 4
#define Q4_KERNEL cpm_q4_mm_avx512
#include "matmul_q4_tmpl.h"
