/* matmul_t2.h - y = x·Wᵀ for ternary weights (BitCPM4), two bits per weight.
 *
 *   W[n, k] = a_n · t[n, k],   t ∈ {−1, 0, +1},   one scale a_n per output row
 *
 * BitCPM4 checkpoints are "pseudo-quantized": ordinary bf16 tensors whose every row
 * holds only 0 and ±a (minicpm-spec.md §2.10, §8). cpm_t2_from_bf16 recognises such a
 * matrix and packs it losslessly; anything else is left to the bf16 kernels.
 *
 * Layout: per row, per group of 16 inputs, one 32-bit word: bits 0-15 say which of the
 * 16 inputs add (+1), bits 16-31 which subtract (−1); a row is ceil(K/16) words.
 * Decode reads 0.25 byte per weight instead of 2, and multiplies nothing but the final
 * sum: y[m, n] = a_n · (Σ_{t=+1} x[m, k] − Σ_{t=−1} x[m, k]).
 *
 * Precision: each row's sum runs in 16 lanes (lane i takes inputs k ≡ i mod 16, in k
 * order), folded 8+8, 4+4, 2+2, 1+1, then times a_n - on every ISA and thread count,
 * so the scalar reference and the AVX-512 kernel give the same bits. Against the bf16
 * matmul of the same weights it differs by float summation order only (|Δy| ≤ K · ε ·
 * a_n · Σ|x|, ε = 2⁻²⁴; test_matmul_t2 and the ternary model test check it).
 *
 *   cpm_t2 *w;  if (cpm_t2_from_bf16(bf16, N, K, K, &w) == 0) ...
 *   cpm_matmul_t2(pool, y, N, x, K, w, M);   // y[M, N] = x[M, K] · Wᵀ
 *   cpm_t2_free(w);
 */
#ifndef CPM_MATMUL_T2_H
#define CPM_MATMUL_T2_H

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

typedef struct cpm_t2 cpm_t2;

/* Packs W [N, K] (bf16, row stride ld elements) when every row is ternary (all values 0
 * or ±a_n, a_n > 0 finite; a row of zeros is ternary with a_n = 0). Returns 0 with *ret,
 * 1 when W is not ternary (nothing allocated), -1 without memory. */
int cpm_t2_from_bf16(const uint16_t *w, int N, int K, int ld, cpm_t2 **ret);

/* Accepts NULL. */
void cpm_t2_free(cpm_t2 *w);

/* Bytes of the packed weights and scales (what a decode step reads). */
size_t cpm_t2_bytes(const cpm_t2 *w);

/* Row n of W as floats (a_n · t). */
void cpm_t2_dequant_row(const cpm_t2 *w, int n, float *out);

/* The reference: plain C, the same lanes and folding as every kernel. */
void cpm_matmul_t2_ref(float *y, int ldy, const float *x, int ldx, const cpm_t2 *w, int M);

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) · Wᵀ on the pool's threads, with
 * the best kernel of the ISA in effect (cpm_isa_in_effect). */
void cpm_matmul_t2(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_t2 *w,
                   int M);

#endif
