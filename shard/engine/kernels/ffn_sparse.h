/* ffn_sparse.h - the kernels that let a FATReLU FFN (MiniCPM-S) skip its inactive neurons.
 *
 *   h = fatrelu(gate x) * (up x),  fatrelu(g) = g > threshold ? g : 0,   y = down h
 *
 * Most h are exactly 0 (about 88 % in MiniCPM-S-1B), and a zero h_j needs neither row j
 * of up nor column j of down. After the gate matmul the FFN finds the active set
 * (cpm_ffn_sparse_active; for a prefill batch also each 4-row tile's, cpm_ffn_sparse_tiles),
 * computes up and h for those neurons only (cpm_ffn_sparse_up) and sums down over them
 * only (cpm_ffn_sparse_down). A column of down [H, F] is strided, so down is repacked
 * once, transposed to [F, H] in its own dtype (cpm_ffn_sparse_transpose): an active
 * neuron is then one contiguous row.
 *
 * Exactness. cpm_ffn_sparse_up gives each up element the bits cpm_matmul gives it (the
 * canonical order of matmul_internal.h; not the AMX order: under AMX, BF16 up rows differ
 * from AMX's in the last bits) and h = g * u as cpm_fatrelu_mul does. cpm_ffn_sparse_down
 * sums y[m, n] = sum_k h[m, k] Wt[k, n] one fma per term, k ascending, from +0 - whatever
 * M, the tile a row falls in, the thread or the ISA - and a skipped term is an exact zero,
 * which leaves the sum unchanged (fma(0, w, a) = a for finite w, a != 0; at a = 0 only
 * the sign of a zero may differ). So the sparse FFN equals the same FFN with every neuron
 * visited, bit for bit up to the sign of zero; against cpm_matmul on the row-major down
 * (16 lanes of ceil(F/16) terms then a 4-level tree) only the order of down's sum
 * differs, and with u = 2^-24, gamma(n) = n u / (1 - n u), S = sum_k |h_k w_k|:
 *   |y_sparse - y_rowmajor| <= (gamma(nk) + gamma(ceil(F/16) + 4)) * S,
 * nk the nonzero terms (tests/unit/test_ffn_sparse.c checks it).
 *
 * Threads: every kernel splits its work over the pool's threads (pool may be NULL) and
 * allocates nothing; x, g/h and y are f32, weights F32, F16 or BF16.
 */
#ifndef CPM_FFN_SPARSE_H
#define CPM_FFN_SPARSE_H

#include <stddef.h>

#include "dtype.h"
#include "pool.h"

/* Past this many rows (prefill, large batches) the rows run in tiles of this many, each
 * tile over the union of its rows' active sets: a union of many rows is nearly dense, a
 * small tile's keeps most of each row's sparsity. Up to it, one union serves all rows. */
#define CPM_FFN_SPARSE_TILE 4

/* Up to this many rows cpm_ffn_sparse_down still reads each active row of the transposed
 * down once for all rows, each row taking it only where its tile lists it (measured
 * faster than tiles for batched decode); past it, tile by tile. */
#define CPM_FFN_SPARSE_UNION_ROWS 16

/* The union over rows m < M of {j < F : g[m, j] > threshold}, ascending, into ks[0..F)
 * (ks must hold F ints); returns its size. *ret_active (may be NULL) gets the count
 * summed over the rows, for sparsity statistics. */
int cpm_ffn_sparse_active(const float *g, int ldg, int M, int F, float threshold, int *ks,
                          long *ret_active);

/* Ints of work cpm_ffn_sparse_tiles needs for M rows of F (size scratch with it at load). */
size_t cpm_ffn_sparse_work_ints(int M, int F);

/* For M > CPM_FFN_SPARSE_TILE: the active set of every tile of CPM_FFN_SPARSE_TILE rows
 * (the j of ks where one of its rows has g > threshold), built in work and returned for
 * the kernels below. NULL for fewer rows: the kernels then use ks for every row. */
const int *cpm_ffn_sparse_tiles(cpm_pool *pool, const float *g, int ldg, int M, int F,
                                float threshold, const int *ks, int nk, int *work);

/* h = fatrelu(g) * u in place of g, u = x[m, 0..K) . W[j, 0..K), for m < M and j in ks
 * (nk of them) or, with tiles, in the list of m's tile: g[m, j] = g > threshold ? g * u
 * : 0. W [*, K] of type wtype, row stride w_ld elements. u gets the bits cpm_matmul
 * would give it under the same ISA (scalar, avx2, avx512), and is computed (W row j
 * read) only there; other entries of g are not touched (cpm_ffn_sparse_down never reads
 * them). */
void cpm_ffn_sparse_up(cpm_pool *pool, float *g, int ldg, const float *x, int ldx,
                       const void *w, cpm_dtype wtype, int w_ld, int M, int K, float threshold,
                       const int *ks, int nk, const int *tiles);

/* y[m, n] = sum over k of h[m, k] * Wt[k, n], for m < M, n < N: Wt [K, N] of type wtype,
 * row stride wt_ld elements (the transposed down, cpm_ffn_sparse_transpose). The k
 * visited are ks (ascending, nk of them) or, with tiles, the list of m's tile; h is read
 * only there and must be 0 at every other k. Bits: see the top of this file. */
void cpm_ffn_sparse_down(cpm_pool *pool, float *y, int ldy, const float *h, int ldh,
                         const void *wt, cpm_dtype wtype, int wt_ld, int M, int N, const int *ks,
                         int nk, const int *tiles);

/* dst [cols, rows] (contiguous) = the transpose of src [rows, cols] (row stride src_ld
 * elements), both of type t: a bit copy, so exact. Split over the pool's threads. */
void cpm_ffn_sparse_transpose(cpm_pool *pool, void *dst, const void *src, cpm_dtype t,
                              int rows, int cols, int src_ld);

#endif
