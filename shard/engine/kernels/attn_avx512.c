/* attn_avx512.c - the online-softmax step of attn.h on AVX-512, with the
 * portable code's arithmetic exactly (attn.c over ops.c): the same products,
 * sums, maxima and exponentials, in the same order, each rounded on its own.
 * Compiled with -mavx512* only here.
 *
 * What changes is the layout: the block's keys are transposed once (16 keys
 * to a vector) for all G heads of the group, so the eight partial sums of
 * cpm_dot's order become eight vectors whose lane j is key j, and the scores,
 * their exponentials and the weighted values are whole-vector operations with
 * the accumulators in registers.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "attn.h"

#define INLINE static inline __attribute__((always_inline))
#define BLOCK 16

/* r[i] becomes column i of the 16 x 16 tile that r held as rows. */
INLINE void transpose16(__m512 r[16]) {
    __m512 t[16], u[16], v[16];
    _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    _Pragma("GCC unroll 2") for (int i = 0; i < 2; i++)
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            v[8 * i + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0x88);
            v[8 * i + 4 + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0xDD);
        }
    _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0x88);
        r[8 + k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0xDD);
    }
}

INLINE __mmask16 first(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* kt[i * 16 + j] = K[j][i] for i < dk; keys j >= nb read as 0. */
void cpm_attn_transpose_avx512(const float *K, int ks, int nb, int dk, float *kt);
void cpm_attn_transpose_avx512(const float *K, int ks, int nb, int dk, float *kt) {
    for (int i0 = 0; i0 < dk; i0 += 16) {
        const int w = dk - i0 < 16 ? dk - i0 : 16;
        __m512 r[16];
        _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) /* a key past nb: all-zero mask */
            r[j] = _mm512_maskz_loadu_ps(j < nb ? first(w) : 0,
                                         K + (size_t)(j < nb ? j : 0) * ks + i0);
        transpose16(r);
        _Pragma("GCC unroll 16") for (int t = 0; t < w; t++)
            _mm512_store_ps(kt + (size_t)(i0 + t) * BLOCK, r[t]);
    }
}

/* cpm_dot(q, K_j) * scale for the 16 keys at once: s[k] is cpm_dot's partial
 * sum k (dimensions i = k mod 8, in order; the tail goes to s[0]), then its
 * tree. */
INLINE __m512 scores(const float *q, const float *kt, int dk, float scale) {
    __m512 s[8];
    for (int k = 0; k < 8; k++)
        s[k] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 8 <= dk; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] = _mm512_add_ps(s[k], _mm512_mul_ps(_mm512_set1_ps(q[i + k]),
                                                     _mm512_load_ps(kt + (size_t)(i + k) * BLOCK)));
    for (; i < dk; i++)
        s[0] = _mm512_add_ps(s[0], _mm512_mul_ps(_mm512_set1_ps(q[i]),
                                                 _mm512_load_ps(kt + (size_t)i * BLOCK)));
    __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])),
                             _mm512_add_ps(_mm512_add_ps(s[4], s[5]), _mm512_add_ps(s[6], s[7])));
    return _mm512_mul_ps(t, _mm512_set1_ps(scale));
}

/* ops.c's fast_expf, operation for operation (max/min select as its
 * comparisons do: maxps(a, b) is a > b ? a : b). */
INLINE __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __m512 xc = _mm512_max_ps(x, lo);
    xc = _mm512_min_ps(xc, _mm512_set1_ps(88.3f));
    __m512 big = _mm512_set1_ps(12582912.0f);
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                           big), big);
    __m512 r = _mm512_add_ps(_mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                             _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_EQ_OQ), x, y);
}

/* Heads [h0, h0 + hb) of the group, value columns [d0, d0 + 16 nv):
 * acc = acc * corr[h], then acc + p[h][j] * V_j for each key j in order. Each
 * value vector is loaded once for all hb heads, and the hb * nv accumulators
 * (independent chains) stay in registers. */
INLINE void fold_tile(const int hb, const int nv, const cpm_attn_block *b, int h0, int d0,
                      const float *p, const float *corr) {
    __m512 a[4][8];
    __mmask16 mk[8];
    for (int v = 0; v < nv; v++)
        mk[v] = first(b->dv - d0 - 16 * v);
    for (int h = 0; h < hb; h++)
        for (int v = 0; v < nv; v++)
            a[h][v] = _mm512_mul_ps(
                _mm512_maskz_loadu_ps(mk[v], b->acc + (size_t)(h0 + h) * b->dv + d0 + 16 * v),
                _mm512_set1_ps(corr[h0 + h]));
    for (int j = 0; j < b->nb; j++) {
        const float *row = b->V + (size_t)j * b->vs + d0;
        __m512 vv[8];
        for (int v = 0; v < nv; v++)
            vv[v] = _mm512_maskz_loadu_ps(mk[v], row + 16 * v);
        for (int h = 0; h < hb; h++) {
            const __m512 pj = _mm512_set1_ps(p[(size_t)(h0 + h) * BLOCK + j]);
            for (int v = 0; v < nv; v++)
                a[h][v] = _mm512_add_ps(a[h][v], _mm512_mul_ps(pj, vv[v]));
        }
    }
    for (int h = 0; h < hb; h++)
        for (int v = 0; v < nv; v++)
            _mm512_mask_storeu_ps(b->acc + (size_t)(h0 + h) * b->dv + d0 + 16 * v, mk[v], a[h][v]);
}

/* Every head and value column, in tiles of at most 16 accumulators: 4 heads
 * of 64 columns or 2 of 128 (the models' widths), else one head at a time. */
static void fold_values(const cpm_attn_block *b, const float *p, const float *corr) {
    for (int d0 = 0; d0 < b->dv; d0 += 128) {
        const int nv = (b->dv - d0 + 15) / 16 < 8 ? (b->dv - d0 + 15) / 16 : 8;
        int h = 0;
        if (nv == 4)
            for (; h + 4 <= b->G; h += 4)
                fold_tile(4, 4, b, h, d0, p, corr);
        if (nv == 8)
            for (; h + 2 <= b->G; h += 2)
                fold_tile(2, 8, b, h, d0, p, corr);
        for (; h < b->G; h++)
            switch (nv) {
            case 1: fold_tile(1, 1, b, h, d0, p, corr); break;
            case 2: fold_tile(1, 2, b, h, d0, p, corr); break;
            case 3: fold_tile(1, 3, b, h, d0, p, corr); break;
            case 4: fold_tile(1, 4, b, h, d0, p, corr); break;
            case 5: fold_tile(1, 5, b, h, d0, p, corr); break;
            case 6: fold_tile(1, 6, b, h, d0, p, corr); break;
            case 7: fold_tile(1, 7, b, h, d0, p, corr); break;
            default: fold_tile(1, 8, b, h, d0, p, corr); break;
            }
    }
}

void cpm_attn_fold_avx512(const cpm_attn_block *b) {
    float *p = b->work + (size_t)b->dk * BLOCK, *corr = p + (size_t)b->G * BLOCK;
    const __mmask16 valid = first(b->nb);
    const float *kt = b->kt;
    if (!kt) {
        cpm_attn_transpose_avx512(b->K, b->ks, b->nb, b->dk, b->work);
        kt = b->work;
    }
    for (int h = 0; h < b->G; h++) {
        const __m512 s = scores(b->q + (size_t)h * b->dk, kt, b->dk, b->scale);
        float bmax = _mm512_mask_reduce_max_ps(valid, s);
        float newmax = bmax > b->mx[h] ? bmax : b->mx[h];
        corr[h] = expf(b->mx[h] - newmax); /* 0 on the first block */
        _mm512_store_ps(p + (size_t)h * BLOCK, exp16(_mm512_sub_ps(s, _mm512_set1_ps(newmax))));
        b->mx[h] = newmax;
    }
    for (int h0 = 0; h0 < b->G; h0 += 4) { /* each head's sum in key order; 4 side by side */
        const int hb = b->G - h0 < 4 ? b->G - h0 : 4;
        float sum[4];
        for (int h = 0; h < hb; h++)
            sum[h] = b->sum[h0 + h] * corr[h0 + h];
        for (int j = 0; j < b->nb; j++)
            for (int h = 0; h < hb; h++)
                sum[h] += p[(size_t)(h0 + h) * BLOCK + j];
        for (int h = 0; h < hb; h++)
            b->sum[h0 + h] = sum[h];
    }
    fold_values(b, p, corr);
}
