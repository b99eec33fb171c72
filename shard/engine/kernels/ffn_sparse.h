/* ffn_sparse.h - the kernels that let a FATReLU FFN (MiniCPM-S) skip its inactive neurons.
 *
 *   h = fatrelu(gate x) * (up x),  fatrelu(g) = g > threshold ? g : 0,   y = down h
 *
 * Most h are exactly 0 (about 88 % in MiniCPM-S-1B), and a zero h_j needs neither row j
 * of up nor column j of down. After the gate matmul the FFN finds the active set of the
 * batch (cpm_ffn_sparse_active), then, row by row, computes up and h for that row's
 * active neurons only (cpm_ffn_sparse_up) and sums down over them only
 * (cpm_ffn_sparse_down); the rows of a batch share the weight rows they both use
 * through the caches. A column of down [H, F] is strided, so down is repacked once,
 * transposed to [F, H] in its own dtype (cpm_ffn_sparse_transpose): an active neuron
 * is then one contiguous row.
 *
 * Exactness. cpm_ffn_sparse_up gives each up element the bits cpm_matmul gives it (the
 * canonical order of matmul_internal.h; not the AMX order: under AMX, BF16 up rows differ
 * from AMX's in the last bits) and h = g * u as cpm_fatrelu_mul does. cpm_ffn_sparse_down
 * sums y[m, n] = sum_k h[m, k] Wt[k, n] one fma per term, k ascending, from +0 -
 * whatever M, the row's place in the batch, the thread or the ISA - and a skipped term
 * is an exact zero, which leaves the sum unchanged (fma(0, w, a) = a for finite w,
 * a != 0; at a = 0 only the sign of a zero may differ). So the sparse FFN equals the
 * same FFN with every neuron visited, bit for bit up to the sign of zero; against
 * cpm_matmul on the row-major down (16 lanes of ceil(F/16) terms then a 4-level tree)
 * only the order of down's sum differs, and with u = 2^-24, gamma(n) = n u / (1 - n u),
 * S = sum_k |h_k w_k|:
 *   |y_sparse - y_rowmajor| <= (gamma(nk) + gamma(ceil(F/16) + 4)) * S,
 * nk the nonzero terms (tests/unit/test_ffn_sparse.c checks it). Weights and h are
 * finite (a NaN or inf weight would poison the dense sum through 0 * inf, not this one).
 *
 * Threads: every kernel splits its work over the pool's threads (pool may be NULL) and
 * allocates nothing; x, g/h and y are f32, weights F32, F16 or BF16.
 */
#ifndef CPM_FFN_SPARSE_H
#define CPM_FFN_SPARSE_H

#include <stddef.h>

#include "dtype.h"
#include "pool.h"

/* The union over rows m < M of {j < F : g[m, j] > threshold}, ascending, into ks[0..F)
 * (ks must hold F ints); returns its size. *ret_active (may be NULL) gets the count
 * summed over the rows, for sparsity statistics. */
int cpm_ffn_sparse_active(const float *g, int ldg, int M, int F, float threshold, int *ks,
                          long *ret_active);

/* h = fatrelu(g) * u in place of g, for m < M and j in ks (nk of them, ascending): g[m, j]
 * = g > threshold ? g * u : 0 with u = x[m, 0..K) . W[j, 0..K) (W [*, K] of type wtype,
 * row stride w_ld elements). Row by row, u is computed (row j of W read) only where
 * g[m, j] > threshold, with the bits cpm_matmul would give it under the same ISA
 * (scalar, avx2, avx512). Entries of g off ks are not touched. */
void cpm_ffn_sparse_up(cpm_pool *pool, float *g, int ldg, const float *x, int ldx,
                       const void *w, cpm_dtype wtype, int w_ld, int M, int K, float threshold,
                       const int *ks, int nk);

/* y[m, n] = sum over k in ks of h[m, k] * Wt[k, n], for m < M, n < N: Wt [K, N] of type
 * wtype, row stride wt_ld elements (the transposed down, cpm_ffn_sparse_transpose); ks
 * ascending, nk of them; h read only there. Row by row, over the k where h[m, k] != 0:
 * each row reads its own active rows of Wt, and a batch's rows share them through the
 * caches (measured faster than tiles of 4 rows over their unions, which do ~3x the
 * flops at 88 % sparsity). Bits: see the top of this file. */
void cpm_ffn_sparse_down(cpm_pool *pool, float *y, int ldy, const float *h, int ldh,
                         const void *wt, cpm_dtype wtype, int wt_ld, int M, int N, const int *ks,
                         int nk);

/* dst [cols, rows] (contiguous) = the transpose of src [rows, cols] (row stride src_ld
 * elements), both of type t: a bit copy, so exact. Split over the pool's threads. */
void cpm_ffn_sparse_transpose(cpm_pool *pool, void *dst, const void *src, cpm_dtype t,
                              int rows, int cols, int src_ld);

#endif
