/* matmul_bf16p.h - BF16 (or F16) weights repacked at load into panels for the
 * VDPBF16PS kernel of the opt-in "bf16 activations" precision.
 *
 * A panel holds 64 output rows of W (columns of y) interleaved by pairs of k:
 * for pair q, 64 rows x (w[n, 2q], w[n, 2q + 1]) in 256 contiguous bytes,
 * four 16-lane vectors. The kernel broadcasts the pair (x[m, 2q], x[m, 2q + 1])
 * and adds its products into 16 outputs a lane (no sums across lanes at the
 * end), each output taking the pairs in order. Every M runs that one sequence,
 * so a row's bits never depend on its batch. What the layout buys (measured,
 * docs/KERNELS.md): a panel is one sequential stream the hardware prefetcher
 * follows (decode), and a 6-row tile reuses each loaded 64-byte vector six
 * times; batches cut K into blocks, every row tile runs over a block while the
 * next block is prefetched, so reading W overlaps the arithmetic.
 *
 * F16 weights are rounded to the nearest bf16 at repack (what cpm_matmul_bf16x
 * does to them in its kernel). This module knows nothing of models.
 *
 *   cpm_bf16p *p = cpm_bf16p_from(w, CPM_DTYPE_BF16, N, K, K);
 *   cpm_matmul_bf16p(pool, y, N, x, K, p, M);   // y[M, N] = bf16(x)[M, K] · Wᵀ
 *   cpm_bf16p_free(p);
 */
#ifndef CPM_MATMUL_BF16P_H
#define CPM_MATMUL_BF16P_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "pool.h"

#define CPM_BF16P_COLS 64 /* output rows per panel */

typedef struct cpm_bf16p {
    int N, K;
    int Q;          /* pairs of k: (K + 1) / 2; an odd K's last pair holds a 0 */
    int panels;     /* N rounded up to CPM_BF16P_COLS, in panels; the padding holds 0 */
    uint16_t *data; /* [panels][Q][CPM_BF16P_COLS][2] */
} cpm_bf16p;

/* Whether this CPU and build run the panel kernel (VDPBF16PS, AVX-512 or
 * better in effect): the loader repacks only where it is so. */
bool cpm_bf16p_available(void);

/* W [N, K] (BF16 or F16, row stride ld elements) repacked; NULL when out of
 * memory, N or K < 1, or wtype is neither. The rows are repacked by the
 * pool's threads (pool may be NULL). */
cpm_bf16p *cpm_bf16p_from(cpm_pool *pool, const void *w, cpm_dtype wtype, int N, int K, int ld);

/* The same in parts, for a caller that reads the rows in pieces: an unfilled
 * N x K matrix (NULL when out of memory or N, K < 1), then rows [row0, row0 + nrows)
 * from rows (row r at rows + (r - row0) * ld); row0 a multiple of
 * CPM_BF16P_COLS, and nrows too unless the piece ends at N. */
cpm_bf16p *cpm_bf16p_new(int N, int K);
void cpm_bf16p_fill(cpm_pool *pool, cpm_bf16p *p, const void *rows, cpm_dtype wtype, int ld,
                    int row0, int nrows);

/* Accepts NULL. */
void cpm_bf16p_free(cpm_bf16p *w);

/* Bytes a decode step reads (the padding included). */
size_t cpm_bf16p_bytes(const cpm_bf16p *w);

/* y[M, N] = bf16(x)[M, K] · Wᵀ (ldx, ldy in floats; pool may be NULL): x
 * rounded to the nearest bf16, then per output, for each pair q in order,
 * acc += x[2q + 1]·w[2q + 1], acc += x[2q]·w[2q] in f32 (the order VDPBF16PS
 * documents). Without the VDPBF16PS kernel (another ISA forced) a scalar loop
 * takes the same order, much slower. If x cannot be rounded for want of
 * memory, y is filled with NaN. */
void cpm_matmul_bf16p(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                      const cpm_bf16p *w, int M);

/* One weight of cpm_matmul_bf16p_multi and where its output goes. */
typedef struct cpm_bf16p_out {
    float *y;
    int ldy;
    const cpm_bf16p *w;
} cpm_bf16p_out;

/* cpm_matmul_bf16p for several weights of the same K applied to the same x
 * (q/k/v, gate/up): x rounded once, one parallel section over all their
 * panels; every y gets the bits a separate call would give it. */
void cpm_matmul_bf16p_multi(cpm_pool *pool, const float *x, int ldx, int M,
                            const cpm_bf16p_out *outs, int n_outs);

#endif
