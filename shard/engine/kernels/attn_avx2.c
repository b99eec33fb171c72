/* attn_avx2.c - the online-softmax step of attn.h on AVX2, with the portable
 * code's arithmetic exactly (attn.c over ops.c), as attn_avx512.c has it: the
 * same products, sums, maxima and exponentials, in the same order, each
 * rounded on its own. Compiled with -mavx2 -mfma only here (no FMA is used:
 * every product and sum is rounded on its own).
 *
 * The layout is attn_avx512.c's: the block's keys transposed once (kt[i * 16 +
 * j] = K_j[i]) for all G heads of the group. A 16-key row of kt is two 8-lane
 * vectors here, keys 0-7 and 8-15, each scored on its own: the eight partial
 * sums of cpm_dot's order are eight vectors whose lane j is key j.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "attn.h"

#define INLINE static inline __attribute__((always_inline))
#define BLOCK 16

/* r[i] becomes column i of the 8 x 8 tile that r held as rows. */
INLINE void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
}

/* The first n of 8 lanes (n clamped to 0 .. 8), as a maskload/maskstore mask. */
INLINE __m256i first8(int n) {
    n = n < 0 ? 0 : n > 8 ? 8 : n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* kt[i * 16 + j] = K[j][i] for i < dk; keys j >= nb read as 0. */
void cpm_attn_transpose_avx2(const float *K, int ks, int nb, int dk, float *kt);
void cpm_attn_transpose_avx2(const float *K, int ks, int nb, int dk, float *kt) {
    for (int i0 = 0; i0 < dk; i0 += 8) {
        const int w = dk - i0 < 8 ? dk - i0 : 8;
        const __m256i mk = first8(w), none = _mm256_setzero_si256();
        for (int j0 = 0; j0 < BLOCK; j0 += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) /* a key past nb: an all-zero mask */
                r[j] = _mm256_maskload_ps(K + (size_t)(j0 + j < nb ? j0 + j : 0) * ks + i0,
                                          j0 + j < nb ? mk : none);
            transpose8(r);
            for (int t = 0; t < w; t++)
                _mm256_store_ps(kt + (size_t)(i0 + t) * BLOCK + j0, r[t]);
        }
    }
}

/* cpm_dot(q, K_j) * scale for the 8 keys of column j0 of kt: s[k] is cpm_dot's
 * partial sum k (dimensions i = k mod 8, in order; the tail goes to s[0]),
 * then its tree. */
INLINE __m256 scores8(const float *q, const float *kt, int dk, float scale) {
    __m256 s[8];
    for (int k = 0; k < 8; k++)
        s[k] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= dk; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] = _mm256_add_ps(s[k], _mm256_mul_ps(_mm256_set1_ps(q[i + k]),
                                                     _mm256_load_ps(kt + (size_t)(i + k) * BLOCK)));
    for (; i < dk; i++)
        s[0] = _mm256_add_ps(s[0], _mm256_mul_ps(_mm256_set1_ps(q[i]),
                                                 _mm256_load_ps(kt + (size_t)i * BLOCK)));
    __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])),
                             _mm256_add_ps(_mm256_add_ps(s[4], s[5]), _mm256_add_ps(s[6], s[7])));
    return _mm256_mul_ps(t, _mm256_set1_ps(scale));
}

/* ops.c's fast_expf, operation for operation (max/min select as its
 * comparisons do: maxps(a, b) is a > b ? a : b). */
INLINE __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 xc = _mm256_max_ps(x, lo);
    xc = _mm256_min_ps(xc, _mm256_set1_ps(88.3f));
    __m256 big = _mm256_set1_ps(12582912.0f);
    __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                           big), big);
    __m256 r = _mm256_add_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                             _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(x, y, _mm256_cmp_ps(x, x, _CMP_EQ_OQ));
}

/* Head h, value columns [d0, d0 + 8 nv): acc = acc * corr, then acc + p[j] * V_j
 * for each key j in order; the nv accumulators (independent chains) stay in
 * registers. */
INLINE void fold_head(const int nv, const cpm_attn_block *b, int h, int d0, const float *p,
                      float corr) {
    __m256 a[8];
    __m256i mk[8];
    float *acc = b->acc + (size_t)h * b->dv + d0;
    for (int v = 0; v < nv; v++) {
        mk[v] = first8(b->dv - d0 - 8 * v);
        a[v] = _mm256_mul_ps(_mm256_maskload_ps(acc + 8 * v, mk[v]), _mm256_set1_ps(corr));
    }
    for (int j = 0; j < b->nb; j++) {
        const float *row = b->V + (size_t)j * b->vs + d0;
        const __m256 pj = _mm256_set1_ps(p[(size_t)h * BLOCK + j]);
        for (int v = 0; v < nv; v++)
            a[v] = _mm256_add_ps(a[v], _mm256_mul_ps(pj, _mm256_maskload_ps(row + 8 * v, mk[v])));
    }
    for (int v = 0; v < nv; v++)
        _mm256_maskstore_ps(acc + 8 * v, mk[v], a[v]);
}

/* Every head and value column, 64 columns (8 accumulators) at a time. */
static void fold_values(const cpm_attn_block *b, const float *p, const float *corr) {
    for (int h = 0; h < b->G; h++)
        for (int d0 = 0; d0 < b->dv; d0 += 64)
            switch ((b->dv - d0 + 7) / 8 < 8 ? (b->dv - d0 + 7) / 8 : 8) {
            case 1: fold_head(1, b, h, d0, p, corr[h]); break;
            case 2: fold_head(2, b, h, d0, p, corr[h]); break;
            case 3: fold_head(3, b, h, d0, p, corr[h]); break;
            case 4: fold_head(4, b, h, d0, p, corr[h]); break;
            case 5: fold_head(5, b, h, d0, p, corr[h]); break;
            case 6: fold_head(6, b, h, d0, p, corr[h]); break;
            case 7: fold_head(7, b, h, d0, p, corr[h]); break;
            default: fold_head(8, b, h, d0, p, corr[h]); break;
            }
}

void cpm_attn_fold_avx2(const cpm_attn_block *b);
void cpm_attn_fold_avx2(const cpm_attn_block *b) {
    float *p = b->work + (size_t)b->dk * BLOCK, *corr = p + (size_t)b->G * BLOCK;
    const float *kt = b->kt;
    if (!kt) {
        cpm_attn_transpose_avx2(b->K, b->ks, b->nb, b->dk, b->work);
        kt = b->work;
    }
    for (int h = 0; h < b->G; h++) {
        const float *q = b->q + (size_t)h * b->dk;
        float *ph = p + (size_t)h * BLOCK;
        _mm256_store_ps(ph, scores8(q, kt, b->dk, b->scale));
        if (b->nb > 8)
            _mm256_store_ps(ph + 8, scores8(q, kt + 8, b->dk, b->scale));
        float bmax = -INFINITY;
        for (int j = 0; j < b->nb; j++)
            bmax = ph[j] > bmax ? ph[j] : bmax;
        float newmax = bmax > b->mx[h] ? bmax : b->mx[h];
        corr[h] = expf(b->mx[h] - newmax); /* 0 on the first block */
        const __m256 shift = _mm256_set1_ps(newmax);
        _mm256_store_ps(ph, exp8(_mm256_sub_ps(_mm256_load_ps(ph), shift)));
        if (b->nb > 8)
            _mm256_store_ps(ph + 8, exp8(_mm256_sub_ps(_mm256_load_ps(ph + 8), shift)));
        float sum = b->sum[h] * corr[h]; /* in key order */
        for (int j = 0; j < b->nb; j++)
            sum += ph[j];
        b->sum[h] = sum;
        b->mx[h] = newmax;
    }
    fold_values(b, p, corr);
}
