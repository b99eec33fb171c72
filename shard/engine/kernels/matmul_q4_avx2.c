/* matmul_q4_avx2.c - the int4 kernel of matmul_q4_tmpl.h over AVX2: each
 * 16-lane vector is a pair of ymm (lanes 0-7, 8-15), so the sums are those of
 * the scalar and AVX-512 kernels bit for bit. Compiled with -mavx2 -mfma only
 * here. */
#include <immintrin.h>

#include "matmul_q4_internal.h"

typedef struct V {
    __m256 a, b; /* lanes 0-7, 8-15 */
} V;
typedef __m256i VZ;

#define INLINE static inline __attribute__((always_inline))

INLINE V v_zero(void) { return (V){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
INLINE V v_load(const float *p) { return (V){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
INLINE V v_set1(float f) { return (V){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
INLINE void v_store(float *p, V v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
}
INLINE V v_fma(V x, V y, V c) {
    return (V){_mm256_fmadd_ps(x.a, y.a, c.a), _mm256_fmadd_ps(x.b, y.b, c.b)};
}
INLINE VZ vz_set1(int z) { return _mm256_set1_epi32(z); }

INLINE void v_nibbles(const uint8_t *p, VZ z, V *lo, V *hi) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m256i b0 = _mm256_cvtepu8_epi32(raw), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    __m256i m = _mm256_set1_epi32(15);
    lo->a = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, m), z));
    lo->b = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, m), z));
    hi->a = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), z));
    hi->b = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), z));
}

/* The canonical tree: lane i + lane i+8 is a.i + b.i. */
INLINE float v_reduce(V v) {
    __m256 r8 = _mm256_add_ps(v.a, v.b);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

/* Prefetch the nibbles ahead as on AVX-512 (see matmul_q4_avx512.c). */
#define Q4_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define Q4_PF_DIST 8192

/* 16 ymm registers: 2x1 tiles (8 for the sums), 2 decode rows. */
#define Q4_MR 2
#define Q4_NR 1
#define Q4_DEC 2
#define Q4_SMR 2
#define Q4_SDEC 1
#define Q4_SDEC2 1
#define Q4_SMALL_M 2
#define Q4_KERNEL cpm_q4_mm_avx2
#include "matmul_q4_tmpl.h"
