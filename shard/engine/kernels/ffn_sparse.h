/* ffn_sparse.h - the kernels that let a FATReLU FFN (MiniCPM-S) skip its inactive neurons.
 *
 *   h = fatrelu(gate x) * (up x),  fatrelu(g) = g > threshold ? g : 0,   y = down h
 *
 * Most h are exactly 0 (about 88 % in MiniCPM-S-1B), and a zero h_j needs neither row j
 * of up nor column j of down. After the gate matmul the FFN finds the active set
 * (cpm_ffn_sparse_active), computes up for those rows only (cpm_ffn_sparse_rows), forms h
 * there (cpm_ffn_sparse_act) and sums down over those columns only (cpm_ffn_sparse_down).
 * A column of down [H, F] is strided, so down is repacked once, transposed to [F, H] in
 * its own dtype (cpm_ffn_sparse_transpose): an active neuron is then one contiguous row.
 *
 * Exactness. cpm_ffn_sparse_rows gives each element the bits cpm_matmul gives it (the
 * canonical order of matmul_internal.h; not the AMX order: under AMX, BF16 up rows differ
 * from AMX's in the last bits). cpm_ffn_sparse_down sums y[m, n] = sum_k h[m, k] Wt[k, n]
 * one fma per term, k ascending, from +0 - whatever M, the tile a row falls in, the thread
 * or the ISA - and a skipped term is an exact zero, which leaves the sum unchanged (fma(0,
 * w, a) = a for finite w, a != 0; at a = 0 only the sign of a zero may differ). So the
 * sparse FFN equals the same FFN with every neuron visited, bit for bit up to the sign of
 * zero; against cpm_matmul on the row-major down (16 lanes of ceil(F/16) terms then a
 * 4-level tree) only the order of down's sum differs, and with u = 2^-24,
 * gamma(n) = n u / (1 - n u), S = sum_k |h_k w_k|:
 *   |y_sparse - y_rowmajor| <= (gamma(nk) + gamma(ceil(F/16) + 4)) * S,
 * nk the nonzero terms (tests/unit/test_ffn_sparse.c checks it).
 *
 * Threads: every kernel splits its work over the pool's threads (pool may be NULL) and
 * allocates nothing; x/h and y are f32, weights F32, F16 or BF16.
 */
#ifndef CPM_FFN_SPARSE_H
#define CPM_FFN_SPARSE_H

#include <stddef.h>

#include "dtype.h"
#include "pool.h"

/* Rows of h per tile in cpm_ffn_sparse_down's tiled path: a tile visits the union of its
 * rows' active sets, so a small tile keeps most of each row's sparsity. */
#define CPM_FFN_SPARSE_TILE 4

/* The union over rows m < M of {j < F : g[m, j] > threshold}, ascending, into ks[0..F)
 * (ks must hold F ints); returns its size. *ret_active (may be NULL) gets the count
 * summed over the rows, for sparsity statistics. */
int cpm_ffn_sparse_active(const float *g, int ldg, int M, int F, float threshold, int *ks,
                          long *ret_active);

/* y[m, ks[t]] = x[m, 0..K) . W[ks[t], 0..K) for m < M, t < nk: W [*, K] of type wtype,
 * row stride w_ld elements. Each element gets the bits cpm_matmul would give it under
 * the same ISA (scalar, avx2, avx512); other elements of y are not touched. */
void cpm_ffn_sparse_rows(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const void *w, cpm_dtype wtype, int w_ld, int M, int K, const int *ks,
                         int nk);

/* h = fatrelu(g) * u on the active set: g[m, ks[t]] = g > threshold ? g * u : 0, in
 * place, for m < M, t < nk (g and u share the row stride ld). Entries of g off ks are
 * left as they are (cpm_ffn_sparse_down never reads them); u is read only where g is
 * above the threshold. */
void cpm_ffn_sparse_act(float *g, const float *u, int ld, int M, float threshold,
                        const int *ks, int nk);

/* Ints of work cpm_ffn_sparse_down needs for M rows of K (size scratch with it at load). */
size_t cpm_ffn_sparse_work_ints(int M, int K);

/* y[m, n] = sum over k in ks of h[m, k] * Wt[k, n], for m < M, n < N: Wt [K, N] of type
 * wtype, row stride wt_ld elements (the transposed down, cpm_ffn_sparse_transpose); ks
 * ascending, nk of them, h read only at ks. Up to CPM_FFN_SPARSE_TILE rows stream each
 * active row of Wt once (decode); more rows run in tiles of CPM_FFN_SPARSE_TILE rows,
 * each visiting only the k of ks where one of its rows has h != 0. work holds
 * cpm_ffn_sparse_work_ints(M, K) ints. Bits: see the top of this file. */
void cpm_ffn_sparse_down(cpm_pool *pool, float *y, int ldy, const float *h, int ldh,
                         const void *wt, cpm_dtype wtype, int wt_ld, int M, int N, int K,
                         const int *ks, int nk, int *work);

/* dst [cols, rows] (contiguous) = the transpose of src [rows, cols] (row stride src_ld
 * elements), both of type t: a bit copy, so exact. Split over the pool's threads. */
void cpm_ffn_sparse_transpose(cpm_pool *pool, void *dst, const void *src, cpm_dtype t,
                              int rows, int cols, int src_ld);

#endif
