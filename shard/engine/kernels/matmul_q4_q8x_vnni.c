/* matmul_q4_q8x_vnni.c - int4 weights times int8 x on AVX-512 VNNI
 * (VPDPBUSD): the fast kernel of cpm_matmul_q4_q8x, bit for bit the portable
 * one (matmul_q4_q8x.c; the q8x order and the panel layout of
 * matmul_q4_internal.h). Compiled with -mavx512vnni only here.
 *
 * A zmm lane is a weight row: each 64-byte load of a panel gives 32 rows × 4
 * positions, AND 0x0f and a shift make them two vectors of unsigned bytes, and
 * two VPDPBUSD against one broadcast of 4 int8 x values add 128 exact
 * products. A block of 32 positions is 8 loads, then per 16 rows one
 * conversion, one multiply by the x scale and one FMA by the group scales.
 * Each loaded chunk meets every x row of the tile (up to MR) while it is in
 * registers, so decode streams the panels once (one forward stream each) and a
 * batch reuses them MR times. Batches go through x in chunks that stay in L2
 * (CHUNK_M rows).
 */
#include <immintrin.h>
#include <string.h>

#include "matmul_q4_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 4       /* x rows per tile */
#define CHUNK_M 32 /* x rows whose q8 stay in L2 while the panels go by */

/* ---- x: the bytes of cpm_q4_q8x_pack (matmul_q4_q8x.c) ---- */

/* One block of 32 packed positions: q8 and the scale; returns the sum of q8.
 * CVTPS2DQ rounds to nearest even, as the portable round_even. */
INLINE int quantize_block(const float *x, int8_t *q, float *ret_scale) {
    const __m512 sign = _mm512_set1_ps(-0.0f), inf = _mm512_set1_ps(__builtin_inff());
    __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    __m512 aa = _mm512_andnot_ps(sign, a), ca = _mm512_andnot_ps(sign, c);
    __mmask16 finite = _mm512_cmp_ps_mask(aa, inf, _CMP_LT_OQ) &
                       _mm512_cmp_ps_mask(ca, inf, _CMP_LT_OQ);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ca));
    float scale = amax / 127.0f;
    __m512i qa = _mm512_setzero_si512(), qc = _mm512_setzero_si512();
    if (finite != 0xffff) {
        scale = __builtin_nanf("");
    } else if (amax > 0.0f) {
        __m512 inv = _mm512_set1_ps(127.0f / amax);
        qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
        qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, inv));
    }
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qc));
    *ret_scale = scale;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
}

void cpm_q4_q8x_pack_vnni(const cpm_q4_job *job, int m0, int m1) {
    cpm_q4_q8x_pack_with(job, m0, m1, quantize_block);
}

/* ---- the kernel ---- */

/* 4 int8 x values at q, in every lane. */
INLINE __m512i bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm512_set1_epi32(v);
}

/* y[m + i, 32P + r] for i < mr, r < 32 rows of panel P (rows at or past
 * `lanes` are not stored). */
INLINE void tile(const int mr, const cpm_q4_job *job, int m, int P, int lanes) {
    const cpm_q4 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q4_BLOCK, bpg = (size_t)w->gp / CPM_Q4_BLOCK;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const uint8_t *chunk = w->nib + (size_t)P * nb * 512;
    const float *scale = w->scale + (size_t)P * (size_t)w->G * CPM_Q4_PANEL;
    const uint8_t *zero = w->zero + (size_t)P * (size_t)w->G * CPM_Q4_PANEL;
    const int8_t *q8[MR];
    const float *xs[MR], *xz[MR];
    __m512 A0[MR], A1[MR]; /* rows 0..15 and 16..31 of the panel */
    for (int i = 0; i < mr; i++) {
        q8[i] = job->x8 + (size_t)(m + i) * Kp;
        xs[i] = job->xs + (size_t)(m + i) * nb;
        xz[i] = job->xz + (size_t)(m + i) * (size_t)w->G;
        A0[i] = A1[i] = _mm512_setzero_ps();
    }
    for (int g = 0; g < w->G; g++) {
        const __m512 s0 = _mm512_loadu_ps(scale + (size_t)g * CPM_Q4_PANEL);
        const __m512 s1 = _mm512_loadu_ps(scale + (size_t)g * CPM_Q4_PANEL + 16);
        for (size_t k = (size_t)g * bpg; k < (size_t)(g + 1) * bpg; k++, chunk += 512) {
            __m512i d0[MR], d1[MR];
            for (int i = 0; i < mr; i++)
                d0[i] = d1[i] = _mm512_setzero_si512();
            for (int c = 0; c < 8; c++) {
                /* a panel is one stream: 4 KB ahead covers the DRAM latency at ~20 GB/s a thread */
                _mm_prefetch((const char *)chunk + 64 * c + 4096, _MM_HINT_T0);
                __m512i v = _mm512_load_si512(chunk + 64 * c);
                __m512i lo = _mm512_and_si512(v, low4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < mr; i++) {
                    __m512i xb = bcast4(q8[i] + k * CPM_Q4_BLOCK + 4 * (size_t)c);
                    d0[i] = _mm512_dpbusd_epi32(d0[i], lo, xb);
                    d1[i] = _mm512_dpbusd_epi32(d1[i], hi, xb);
                }
            }
            for (int i = 0; i < mr; i++) {
                const __m512 x = _mm512_set1_ps(xs[i][k]);
                A0[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0[i]), x), s0, A0[i]);
                A1[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1[i]), x), s1, A1[i]);
            }
        }
    }
    __m512 C0[MR], C1[MR];
    for (int i = 0; i < mr; i++)
        C0[i] = C1[i] = _mm512_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        const uint8_t *z = zero + (size_t)g * CPM_Q4_PANEL;
        const float *sc = scale + (size_t)g * CPM_Q4_PANEL;
        __m512 zs0 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)z))),
            _mm512_loadu_ps(sc));
        __m512 zs1 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(z + 16)))),
            _mm512_loadu_ps(sc + 16));
        for (int i = 0; i < mr; i++) {
            const __m512 S = _mm512_set1_ps(xz[i][g]);
            C0[i] = _mm512_fmadd_ps(zs0, S, C0[i]);
            C1[i] = _mm512_fmadd_ps(zs1, S, C1[i]);
        }
    }
    const __mmask16 keep0 = lanes >= 16 ? 0xffff : (__mmask16)((1u << lanes) - 1);
    const __mmask16 keep1 = lanes >= 32 ? 0xffff
                            : lanes <= 16 ? 0 : (__mmask16)((1u << (lanes - 16)) - 1);
    for (int i = 0; i < mr; i++) {
        float *y = job->y + (size_t)(m + i) * job->ldy + (size_t)P * CPM_Q4_PANEL;
        _mm512_mask_storeu_ps(y, keep0, _mm512_sub_ps(A0[i], C0[i]));
        _mm512_mask_storeu_ps(y + 16, keep1, _mm512_sub_ps(A1[i], C1[i]));
    }
}

/* x rows [m, m + mr) against panel P. */
INLINE void tile_rows(const cpm_q4_job *job, int m, int mr, int P, int lanes) {
    switch (mr) { /* constant tile sizes: the accumulators stay in registers */
    case 4: tile(4, job, m, P, lanes); break;
    case 3: tile(3, job, m, P, lanes); break;
    case 2: tile(2, job, m, P, lanes); break;
    default: tile(1, job, m, P, lanes); break;
    }
}

void cpm_q4_mm_q8x_vnni(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    for (int mc = m0; mc < m1; mc += CHUNK_M) {
        const int mc1 = m1 - mc < CHUNK_M ? m1 : mc + CHUNK_M;
        for (int n = n0; n < n1; n += CPM_Q4_PANEL)
            for (int m = mc; m < mc1; m += MR)
                tile_rows(job, m, mc1 - m < MR ? mc1 - m : MR, n / CPM_Q4_PANEL,
                          n1 - n < CPM_Q4_PANEL ? n1 - n : CPM_Q4_PANEL);
    }
}
