/* matmul_q4_avx512.c - the int4 kernel of matmul_q4_tmpl.h over AVX-512: one
 * zmm per 16 lanes; a 16-byte block widens to two vectors of (q − z) with one
 * zero-extension, a mask and a shift. Compiled with -mavx512* only here. */
#include <immintrin.h>

#include "matmul_q4_internal.h"
#include "reduce_avx512.h"

typedef __m512 V;
typedef __m512 VZ; /* the 16 values q − z for q = 0..15, as f32 */

#define INLINE static inline __attribute__((always_inline))

INLINE V v_zero(void) { return _mm512_setzero_ps(); }
INLINE V v_load(const float *p) { return _mm512_loadu_ps(p); }
INLINE V v_set1(float f) { return _mm512_set1_ps(f); }
INLINE void v_store(float *p, V v) { _mm512_storeu_ps(p, v); }
INLINE V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
/* One load in a register: GCC would fold it into each of the tile's FMAs. */
#define V_KEEP(v) __asm__("" : "+v"(v))
/* Row z holds q − z for q = 0..15. A load from this table replaces the
 * convert, broadcast and subtract of building it per group and row (about
 * 12 % of decode time at group size 128, measured from cache). */
static const float ztab[17][16] __attribute__((aligned(64))) = {
#define ROW(z) {0 - z, 1 - z, 2 - z, 3 - z, 4 - z, 5 - z, 6 - z, 7 - z, 8 - z, 9 - z, \
                10 - z, 11 - z, 12 - z, 13 - z, 14 - z, 15 - z}
    ROW(0), ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7), ROW(8),
    ROW(9), ROW(10), ROW(11), ROW(12), ROW(13), ROW(14), ROW(15), ROW(16),
#undef ROW
};
INLINE VZ vz_set1(int z) { return _mm512_load_ps(ztab[z]); } /* z in 0..16 (repack) */

/* A table lookup instead of mask, subtract and convert: vpermps reads only
 * the low 4 bits of each index lane, which is the low nibble as it comes,
 * so a block costs 6 uops instead of 9 (decode is compute bound without it). */
INLINE void v_nibbles(const uint8_t *p, VZ table, V *lo, V *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_permutexvar_ps(b, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

INLINE float v_reduce(V a) { return cpm_reduce16_avx512(a); }

/* Decode outruns the hardware prefetchers (a row of W is used once): ask for
 * the nibbles 8 KiB ahead, several rows further on, since rows lie end to end.
 * Measured on the 1B shapes, cold: 5.5 -> 9.5-10 GB/s per core. */
#define Q4_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define Q4_PF_DIST 8192

/* 4x3 tiles: 24 accumulators + 3 weight vectors + x in 32 zmm registers. */
#define Q4_MR 4
#define Q4_NR 3
#define Q4_DEC 4
#define Q4_SMR 4
#define Q4_SDEC 2
#define Q4_SDEC2 4
#define Q4_SMALL_M 16
#define Q4_KERNEL cpm_q4_mm_avx512
#include "matmul_q4_tmpl.h"
