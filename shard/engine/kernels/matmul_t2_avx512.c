/* matmul_t2_avx512.c - the ternary kernel with AVX-512 masked adds: per 16 inputs, one
 * add under the +1 mask and one subtract under the −1 mask; no multiplication until the
 * row's scale. Lanes and folding as matmul_t2_ref, hence the same bits. */
#include <immintrin.h>

#include "matmul_t2_internal.h"

/* 8+8, 4+4, 2+2, 1+1, as fold16 in matmul_t2.c. */
static float fold(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
}

/* Blocks of NB output rows x MB input rows: NB * MB independent sums (a masked add waits
 * for the one before it on the same register, so one row alone would run at the adds'
 * latency, not their throughput), each code word loaded once per MB rows of x and each
 * x vector once per NB rows of W. Every sum still runs in its own 16 lanes in k order. */
#define NB 4
#define MB 4

typedef struct block {
    int n, nb, m, mb;
} block;

static void t2_block(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                     block b) {
    const int G = w->G, full = w->K / 16;
    const __mmask16 tail = (__mmask16)((1u << (w->K % 16)) - 1u);
    const uint32_t *rows[NB];
    __m512 acc[NB][MB];
    for (int j = 0; j < NB; j++) {
        rows[j] = w->codes + (size_t)(b.n + (j < b.nb ? j : 0)) * (size_t)G;
        for (int i = 0; i < MB; i++)
            acc[j][i] = _mm512_setzero_ps();
    }
    for (int g = 0; g < G; g++) {
        __m512 xv[MB];
        for (int i = 0; i < b.mb; i++) {
            const float *xp = x + (size_t)(b.m + i) * ldx + (size_t)g * 16;
            xv[i] = g < full ? _mm512_loadu_ps(xp) : _mm512_maskz_loadu_ps(tail, xp);
        }
        for (int j = 0; j < b.nb; j++) {
            uint32_t word = rows[j][g];
            __mmask16 plus = (__mmask16)word, minus = (__mmask16)(word >> 16);
            for (int i = 0; i < b.mb; i++) {
                acc[j][i] = _mm512_mask_add_ps(acc[j][i], plus, acc[j][i], xv[i]);
                acc[j][i] = _mm512_mask_sub_ps(acc[j][i], minus, acc[j][i], xv[i]);
            }
        }
    }
    for (int j = 0; j < b.nb; j++)
        for (int i = 0; i < b.mb; i++)
            y[(size_t)(b.m + i) * ldy + (size_t)(b.n + j)] = w->scale[b.n + j] * fold(acc[j][i]);
}

/* Prefill: NB2 output rows x MB2 input rows. The code word becomes a vector of +1, 0, −1
 * once per output row and group (two masked moves), then one FMA per input row: fma(±1, x,
 * acc) and fma(0, x, acc) round exactly as acc ± x and acc do, so the bits are the masked
 * adds' (and the reference's), with fewer instructions once several x rows share it. */
#define NB2 2
#define MB2 8

static void t2_block_fma(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                         block b) {
    const int G = w->G, full = w->K / 16;
    const __mmask16 tail = (__mmask16)((1u << (w->K % 16)) - 1u);
    const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
    const uint32_t *rows[NB2];
    __m512 acc[NB2][MB2];
    for (int j = 0; j < NB2; j++) {
        rows[j] = w->codes + (size_t)(b.n + (j < b.nb ? j : 0)) * (size_t)G;
        for (int i = 0; i < MB2; i++)
            acc[j][i] = _mm512_setzero_ps();
    }
    for (int g = 0; g < G; g++) {
        __m512 xv[MB2];
        for (int i = 0; i < b.mb; i++) {
            const float *xp = x + (size_t)(b.m + i) * ldx + (size_t)g * 16;
            xv[i] = g < full ? _mm512_loadu_ps(xp) : _mm512_maskz_loadu_ps(tail, xp);
        }
        for (int j = 0; j < b.nb; j++) {
            uint32_t word = rows[j][g];
            __m512 t = _mm512_maskz_mov_ps((__mmask16)word, one);
            t = _mm512_mask_mov_ps(t, (__mmask16)(word >> 16), minus_one);
            for (int i = 0; i < b.mb; i++)
                acc[j][i] = _mm512_fmadd_ps(t, xv[i], acc[j][i]);
        }
    }
    for (int j = 0; j < b.nb; j++)
        for (int i = 0; i < b.mb; i++)
            y[(size_t)(b.m + i) * ldy + (size_t)(b.n + j)] = w->scale[b.n + j] * fold(acc[j][i]);
}

void cpm_t2_mm_avx512(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                      int m0, int m1, int n0, int n1) {
    int m = m0;
    if (m1 - m0 >= MB2) { /* whole blocks of MB2 rows of x the FMA way, the rest below */
        int end = m0 + (m1 - m0) / MB2 * MB2;
        for (int n = n0; n < n1; n += NB2)
            for (int mm = m0; mm < end; mm += MB2)
                t2_block_fma(w, y, ldy, x, ldx, (block){n, n1 - n < NB2 ? n1 - n : NB2, mm, MB2});
        m = end;
    }
    for (int n = n0; n < n1 && m < m1; n += NB)
        for (int mm = m; mm < m1; mm += MB)
            t2_block(w, y, ldy, x, ldx,
                     (block){n, n1 - n < NB ? n1 - n : NB, mm, m1 - mm < MB ? m1 - mm : MB});
}
