/* matmul_q4_q8x_avx2.c - int4 weights times int8 x on AVX2: the kernel of
 * cpm_matmul_q4_q8x for CPUs without AVX-512 VNNI, bit for bit the portable
 * one (the q8x order and panel layout of matmul_q4_internal.h), a panel's 32
 * rows held as four 8-lane vectors.
 *
 * A row's dot over 4 positions is VPMADDUBSW (nibble bytes times the 4
 * broadcast int8 x, pairs into int16: at most 2 · 15 · 127, no saturation)
 * then VPMADDWD by ones (pairs into int32): the exact integer VPDPBUSD gives.
 */
#include <immintrin.h>
#include <string.h>

#include "matmul_q4_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define CHUNK_M 32 /* x rows whose q8 stay in L2 while the panels go by */

INLINE __m256i bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm256_set1_epi32(v);
}

/* Accumulator j of a panel holds rows 8j..8j+7: the low nibbles of chunk
 * bytes 32h.. are rows 8h.., the high ones rows 16 + 8h.. . */
static void tile(const cpm_q4_job *job, int m, int P, int lanes) {
    const cpm_q4 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q4_BLOCK, bpg = (size_t)w->gp / CPM_Q4_BLOCK;
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const uint8_t *chunk = w->nib + (size_t)P * nb * 512;
    const float *scale = w->scale + (size_t)P * (size_t)w->G * CPM_Q4_PANEL;
    const uint8_t *zero = w->zero + (size_t)P * (size_t)w->G * CPM_Q4_PANEL;
    const int8_t *q8 = job->x8 + (size_t)m * Kp;
    const float *xs = job->xs + (size_t)m * nb, *xz = job->xz + (size_t)m * (size_t)w->G;
    __m256 A[4], C[4];
    for (int j = 0; j < 4; j++)
        A[j] = C[j] = _mm256_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        for (size_t k = (size_t)g * bpg; k < (size_t)(g + 1) * bpg; k++, chunk += 512) {
            __m256i d[4];
            for (int j = 0; j < 4; j++)
                d[j] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i xb = bcast4(q8 + k * CPM_Q4_BLOCK + 4 * (size_t)c);
                _mm_prefetch((const char *)chunk + 64 * c + 4096, _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(chunk + 64 * c + 32 * h));
                    __m256i lo = _mm256_and_si256(v, low4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    d[h] = _mm256_add_epi32(d[h], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xb), ones));
                    d[2 + h] = _mm256_add_epi32(d[2 + h],
                                                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb), ones));
                }
            }
            const __m256 x = _mm256_set1_ps(xs[k]);
            for (int j = 0; j < 4; j++)
                A[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d[j]), x),
                                       _mm256_loadu_ps(scale + (size_t)g * CPM_Q4_PANEL + 8 * j), A[j]);
        }
    }
    for (int g = 0; g < w->G; g++) {
        const __m256 S = _mm256_set1_ps(xz[g]);
        for (int j = 0; j < 4; j++) {
            const uint8_t *z = zero + (size_t)g * CPM_Q4_PANEL + 8 * j;
            __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)z)));
            __m256 zs = _mm256_mul_ps(zf, _mm256_loadu_ps(scale + (size_t)g * CPM_Q4_PANEL + 8 * j));
            C[j] = _mm256_fmadd_ps(zs, S, C[j]);
        }
    }
    float out[CPM_Q4_PANEL];
    for (int j = 0; j < 4; j++)
        _mm256_storeu_ps(out + 8 * j, _mm256_sub_ps(A[j], C[j]));
    memcpy(job->y + (size_t)m * job->ldy + (size_t)P * CPM_Q4_PANEL, out,
           (size_t)lanes * sizeof(float));
}

/* Each panel meets every x row of a chunk while it is in L1/L2; a chunk's q8
 * stay in L2 while the panels go by. */
void cpm_q4_mm_q8x_avx2(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    for (int mc = m0; mc < m1; mc += CHUNK_M) {
        const int mc1 = m1 - mc < CHUNK_M ? m1 : mc + CHUNK_M;
        for (int n = n0; n < n1; n += CPM_Q4_PANEL)
            for (int m = mc; m < mc1; m++)
                tile(job, m, n / CPM_Q4_PANEL, n1 - n < CPM_Q4_PANEL ? n1 - n : CPM_Q4_PANEL);
    }
}
