/* matmul_q8.h - int8 weights with a scale per 32 (as llama.cpp's Q8_0), made at
 * load from a BF16/F16/F32 matrix: the opt-in 8-bit output layer.
 *
 *   W[n, k] ≈ q[n, k] · s[n, k / 32]      q in [-127, 127], s = max |W| / 127 of the block
 *
 * An int4 checkpoint keeps its (tied) lm_head in BF16: on the 1B shape that is
 * 377 of the 898 MB a decode token reads. Quantizing it here halves those
 * bytes (+ 1/8 for the scales), as llama.cpp does to its output layer (Q6_K
 * with Q4_0). It is lossy: cpm-run --lm-head int8 asks for it, and
 * docs/KERNELS.md has the measured error. This module knows nothing of models.
 *
 *   cpm_q8 *w = cpm_q8_from(data, CPM_DTYPE_BF16, N, K, K);
 *   cpm_matmul_q8(pool, y, N, x, K, w, M, false);    // y[M, N] = x[M, K] · Wᵀ
 *   cpm_q8_free(w);
 */
#ifndef CPM_MATMUL_Q8_H
#define CPM_MATMUL_Q8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "pool.h"

#define CPM_Q8_BLOCK 32 /* weights per scale */

typedef struct cpm_q8 {
    int N, K;
    int Kp;       /* K rounded up to CPM_Q8_BLOCK; the padding holds q = 0 */
    int8_t *q;    /* [N][Kp] */
    float *scale; /* [N][Kp / CPM_Q8_BLOCK] */
} cpm_q8;

/* W [N, K] of type wtype (row stride ld elements) quantized; NULL when out of
 * memory or N, K < 1. Non-finite weights quantize as 0 in a block scaled by
 * its finite ones (a corrupt checkpoint is the loader's business, not ours). */
cpm_q8 *cpm_q8_from(const void *w, cpm_dtype wtype, int N, int K, int ld);

/* Accepts NULL. */
void cpm_q8_free(cpm_q8 *w);

/* Bytes a decode step reads: the int8 weights and their scales. */
size_t cpm_q8_bytes(const cpm_q8 *w);

/* y[M, N] = x[M, K] · Wᵀ (ldx, ldy in floats; pool may be NULL). act_bf16:
 * x rounded to bf16 first, as for cpm_matmul_bf16x, and with VDPBF16PS the
 * products taken 32 per instruction (q is exact in bf16). Per output, for
 * each block in order: A = the block's 32 products (f32 lanes), T = fma(s, A, T),
 * then the 16-lane tree: so a row's bits depend only on its x row and W, never
 * on M or the threads (the bf16 dot path pairs products as VDPBF16PS does:
 * other last bits than the f32 path). If x cannot be rounded for want of
 * memory, y is filled with NaN. */
void cpm_matmul_q8(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_q8 *w,
                   int M, bool act_bf16);

/* Double-precision reference over the dequantized weights (tests). */
void cpm_matmul_q8_ref(float *y, int ldy, const float *x, int ldx, const cpm_q8 *w, int M);

#endif
