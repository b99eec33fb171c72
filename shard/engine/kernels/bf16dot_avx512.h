/* bf16dot_avx512.h - the pieces of the VDPBF16PS kernels that both weight
 * formats of the opt-in "bf16 activations" precision share: rounding x rows
 * to bf16, and the prefill tile against a chunk-interleaved bf16 panel. Only
 * files compiled with -mavx512bf16 include it (matmul_bf16x_avx512.c for BF16
 * weights, matmul_q4_bf16x_avx512.c for int4).
 *
 * Order: lane j of a 16-lane f32 accumulator takes the pair (2j, 2j + 1) of
 * each 32-wide chunk in turn, as VDPBF16PS adds it; then the canonical tree of
 * matmul_internal.h. The direct (decode) tiles of both files follow the same
 * order, so a row's bits never depend on the path its batch took.
 */
#ifndef CPM_BF16DOT_AVX512_H
#define CPM_BF16DOT_AVX512_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#include "reduce_avx512.h"

#define CPM_BF16DOT_MR 4 /* x rows per prefill tile */
#define CPM_BF16DOT_NR 6 /* W rows per prefill tile and per panel */

static inline __attribute__((always_inline)) __m512bh cpm_bh_load(const uint16_t *p) {
    return (__m512bh)_mm512_loadu_si512(p);
}

/* x[0..K) rounded to bf16 (nearest even) into d[0..Kp), Kp = K rounded up to
 * 32, zero-padded: the kernels then need no mask on x. */
static inline void cpm_bf16dot_round_row(const float *x, int K, uint16_t *d) {
    const int Kp = (K + 31) & ~31;
    for (int k = 0; k < Kp; k += 32) {
        __mmask16 lo = (__mmask16)(K - k >= 16 ? 0xffff : K - k <= 0 ? 0 : (1u << (K - k)) - 1);
        __mmask16 hi = (__mmask16)(K - k >= 32 ? 0xffff : K - k <= 16 ? 0
                                                          : (1u << (K - k - 16)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(lo, x + k), b = _mm512_maskz_loadu_ps(hi, x + k + 16);
        _mm512_storeu_si512(d + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

/* y[i, j], i < mr rows of packed x (stride Kp), j < nr rows of a panel
 * interleaved by chunk: chunk c of row j at p[(c * nrp + j) * 32], Kp wide. */
static inline __attribute__((always_inline)) void
cpm_bf16dot_tile_panel(const int mr, const int nr, const uint16_t *x, size_t Kp,
                       const uint16_t *p, int nrp, float *y, size_t ldy) {
    __m512 acc[CPM_BF16DOT_MR][CPM_BF16DOT_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (size_t k = 0; k < Kp; k += 32, p += (size_t)nrp * 32) {
        __m512bh xv[CPM_BF16DOT_MR];
        for (int i = 0; i < mr; i++)
            xv[i] = cpm_bh_load(x + (size_t)i * Kp + k);
        for (int j = 0; j < nr; j++) {
            __m512bh wv = cpm_bh_load(p + (size_t)j * 32);
            __asm__("" : "+v"(wv)); /* one load in a register: GCC would fold it into mr ops */
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
        }
    }
    if (mr == CPM_BF16DOT_MR && nr == CPM_BF16DOT_NR) { /* acc is then mr * nr in a row */
        float sums[CPM_BF16DOT_MR * CPM_BF16DOT_NR + 16];
        cpm_reduce16_many_avx512(&acc[0][0], mr * nr, sums);
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                y[(size_t)i * ldy + j] = sums[i * nr + j];
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = cpm_reduce16_avx512(acc[i][j]);
}

/* Every tile of x rows [m0, m1) (packed, stride Kp) against a group of nrows
 * panel rows (panels of CPM_BF16DOT_NR rows, Kp * CPM_BF16DOT_NR apart),
 * writing y columns [0, nrows) of those rows; ragged edges go one by one. */
static inline void cpm_bf16dot_group(const uint16_t *xp, size_t Kp, int m0, int m1,
                                     const uint16_t *group, int nrows, float *y, size_t ldy) {
    const int MR = CPM_BF16DOT_MR, NR = CPM_BF16DOT_NR;
    const size_t panel = Kp * NR;
    for (int m = m0; m < m1; m += MR) {
        const int mr = m1 - m < MR ? m1 - m : MR;
        for (int j = 0; j < nrows; j += NR) {
            const uint16_t *p = group + (size_t)(j / NR) * panel;
            const int nr = nrows - j < NR ? nrows - j : NR;
            float *yt = y + (size_t)m * ldy + j;
            if (mr == MR && nr == NR) {
                cpm_bf16dot_tile_panel(MR, NR, xp + (size_t)m * Kp, Kp, p, NR, yt, ldy);
                continue;
            }
            for (int i = 0; i < mr; i++)
                for (int jj = 0; jj < nr; jj++)
                    cpm_bf16dot_tile_panel(1, 1, xp + (size_t)(m + i) * Kp, Kp, p + jj * 32, nr,
                                           yt + (size_t)i * ldy + jj, ldy);
        }
    }
}

#endif
