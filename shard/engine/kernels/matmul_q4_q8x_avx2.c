/* matmul_q4_q8x_avx2.c - int4 weights times int8 x on AVX2: the kernel of
 * cpm_matmul_q4_q8x for CPUs without AVX-512 VNNI, bit for bit the portable
 * one (the q8x order of matmul_q4_internal.h), each 16-lane step held as two
 * 8-lane halves.
 *
 * A lane's dot is VPMADDUBSW (nibble bytes times int8 x, pairs summed into
 * int16: at most 2 · 15 · 127, no saturation) then VPMADDWD by ones (pairs
 * into int32): the same exact integer VPDPBUSD gives.
 */
#include <immintrin.h>

#include "matmul_q4_internal.h"
#include "wload.h"

#define INLINE static inline __attribute__((always_inline))

#define NR 4       /* weight rows per tile, one x row at a time */
#define CHUNK_M 32 /* x rows whose steps stay in L2 while the weight rows go by */

/* Half h (bytes 32h..32h+31) of a step holding `blocks` blocks; the rest zero. */
INLINE __m256i load_half(const uint8_t *p, int blocks, int h) {
    int b = blocks - 2 * h;
    if (b >= 2)
        return _mm256_loadu_si256((const __m256i *)(p + 32 * h));
    if (b == 1)
        return _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(p + 32 * h)));
    return _mm256_setzero_si256();
}

/* The 8 lanes' exact dots of one half. */
INLINE __m256i half_dot(__m256i v, const int8_t *xlo, const int8_t *xhi) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i lo = _mm256_and_si256(v, low4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    __m256i a = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xlo));
    __m256i b = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)xhi));
    return _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones));
}

INLINE __m256 half_step(__m256i d, const float *scale, __m256 s, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(scale)), s, acc);
}

/* y of one x row and weight row n: the tree over A − C (the q8x order), C
 * gathered 16 groups at a time into lanes g mod 16. */
INLINE float finish(const cpm_q4 *w, int n, const float *xz, __m256 lo, __m256 hi) {
    const uint8_t *zero = w->zero + (size_t)n * (size_t)w->G;
    const float *scale = w->scale + (size_t)n * (size_t)w->G;
    __m256 clo = _mm256_setzero_ps(), chi = _mm256_setzero_ps();
    for (int g = 0; g < w->G; g += 16) {
        float zs[16] = {0}, S[16] = {0};
        for (int i = 0; i < 16 && g + i < w->G; i++) {
            zs[i] = (float)zero[g + i] * scale[g + i];
            S[i] = xz[g + i];
        }
        clo = _mm256_fmadd_ps(_mm256_loadu_ps(zs), _mm256_loadu_ps(S), clo);
        chi = _mm256_fmadd_ps(_mm256_loadu_ps(zs + 8), _mm256_loadu_ps(S + 8), chi);
    }
    return cpm_reduce16_avx2(_mm256_sub_ps(lo, clo), _mm256_sub_ps(hi, chi));
}

/* y[m, n + j] for j < nr: one x row against nr weight rows. */
INLINE void tile(const int nr, const cpm_q4_job *job, int m, int n) {
    const cpm_q4 *w = job->w;
    const int steps = cpm_q4_q8x_steps(w->gp), blocks = w->gp / CPM_Q4_BLOCK;
    const size_t row_bytes = (size_t)w->Kp / 2;
    const cpm_q4_xstep *x = job->xq + (size_t)m * (size_t)w->G * (size_t)steps;
    __m256 lo[NR], hi[NR];
    for (int j = 0; j < nr; j++)
        lo[j] = hi[j] = _mm256_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        for (int st = 0; st < steps; st++) {
            const cpm_q4_xstep *xs = x + (size_t)g * (size_t)steps + (size_t)st;
            const size_t off = ((size_t)g * (size_t)w->gp + (size_t)st * CPM_Q4_Q8X_STEP) / 2;
            const int nb = blocks - 4 * st < 4 ? blocks - 4 * st : 4;
            for (int j = 0; j < nr; j++) {
                const __m256 s = _mm256_set1_ps(w->scale[(size_t)(n + j) * (size_t)w->G + (size_t)g]);
                const uint8_t *b = w->nib + (size_t)(n + j) * row_bytes + off;
                _mm_prefetch((const char *)b + 8192, _MM_HINT_T0);
                __m256i d0 = half_dot(load_half(b, nb, 0), xs->lo, xs->hi);
                __m256i d1 = half_dot(load_half(b, nb, 1), xs->lo + 32, xs->hi + 32);
                lo[j] = half_step(d0, xs->scale, s, lo[j]);
                hi[j] = half_step(d1, xs->scale + 8, s, hi[j]);
            }
        }
    }
    for (int j = 0; j < nr; j++)
        job->y[(size_t)m * job->ldy + (size_t)(n + j)] =
            finish(w, n + j, job->xz + (size_t)m * (size_t)w->G, lo[j], hi[j]);
}

/* Each step of NR weight rows meets every x row of a chunk while its nibbles
 * are in L1; a chunk's x steps stay in L2 while the weight rows go by. */
void cpm_q4_mm_q8x_avx2(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    for (int mc = m0; mc < m1; mc += CHUNK_M) {
        const int mc1 = m1 - mc < CHUNK_M ? m1 : mc + CHUNK_M;
        int n = n0;
        for (; n + NR <= n1; n += NR)
            for (int m = mc; m < mc1; m++)
                tile(NR, job, m, n);
        for (; n < n1; n++)
            for (int m = mc; m < mc1; m++)
                tile(1, job, m, n);
    }
}
