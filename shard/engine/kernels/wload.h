/* wload.h - weights of an f32, bf16 or f16 row as f32 lanes: the one widening the vector
 * kernels share (matmul_avx2.c, matmul_avx512.c, ffn_sparse_avx2.c, ffn_sparse_avx512.c),
 * and the AVX2 form of the canonical 16-lane tree (matmul_internal.h). Each section is
 * compiled only in files built for its ISA. */
#ifndef CPM_WLOAD_H
#define CPM_WLOAD_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define CPM_WLOAD_INLINE static inline __attribute__((always_inline))

enum { CPM_WSRC_F32, CPM_WSRC_BF16, CPM_WSRC_F16 };

CPM_WLOAD_INLINE int cpm_wsrc_of(cpm_dtype t) {
    return t == CPM_DTYPE_F32 ? CPM_WSRC_F32 : t == CPM_DTYPE_F16 ? CPM_WSRC_F16 : CPM_WSRC_BF16;
}

CPM_WLOAD_INLINE size_t cpm_wsrc_size(int src) {
    return src == CPM_WSRC_F32 ? 4 : 2;
}

#if defined(__AVX2__) && defined(__F16C__)
/* 8 weights from row[k]. */
CPM_WLOAD_INLINE __m256 cpm_wload8(int src, const void *row, int k) {
    if (src == CPM_WSRC_F32)
        return _mm256_loadu_ps((const float *)row + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (src == CPM_WSRC_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The canonical tree of a 16-lane accumulator held as two 8-lane halves. */
CPM_WLOAD_INLINE float cpm_reduce16_avx2(__m256 lo, __m256 hi) {
    __m256 r8 = _mm256_add_ps(lo, hi);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}
#endif

#if defined(__AVX512F__)
/* 16 weights from row[k]. */
CPM_WLOAD_INLINE __m512 cpm_wload16(int src, const void *row, int k) {
    if (src == CPM_WSRC_F32)
        return _mm512_loadu_ps((const float *)row + k);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
    if (src == CPM_WSRC_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The weights of row[k ..] under mask mk (a row's tail), zero elsewhere. */
CPM_WLOAD_INLINE __m512 cpm_wload16_tail(int src, const void *row, int k, __mmask16 mk) {
    if (src == CPM_WSRC_F32)
        return _mm512_maskz_loadu_ps(mk, (const float *)row + k);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)row + k);
    if (src == CPM_WSRC_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

#endif
