/* matmul_q4.h - y = x·Wᵀ for 4-bit GPTQ / AWQ weights, repacked once at load.
 *
 *   W[n, k] = (q[k, n] − z[g(k), n]) · s[g(k), n]     q, z 4-bit; s per group
 *
 * A checkpoint's AutoGPTQ tensors (qweight, qzeros, scales, g_idx), or AutoAWQ's
 * GEMM ones (qweight, qzeros, scales, packed along n), go in through cpm_q4_new, which checks them and rewrites them into a layout made for decode:
 * per output row, the K nibbles contiguous in group order (with act-order, the
 * input columns are sorted by group once here and x is gathered by the same
 * permutation on every call), plus an f32 scale and a zero point per group.
 * The model layer (shard/engine/model) reads the tensors and reports errors; this
 * module knows nothing of files or models.
 *
 *   cpm_q4 *w;  cpm_q4_new(&src, &w, &bad);
 *   cpm_matmul_q4(pool, y, N, x, K, w, M);   // y[M, N] = x[M, K] · Wᵀ
 *   cpm_q4_free(w);
 */
#ifndef CPM_MATMUL_Q4_H
#define CPM_MATMUL_Q4_H

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

typedef struct cpm_q4 cpm_q4;

/* Where the packed tensors come from. Both hold W[n, k] = (q − z) · s. */
typedef enum cpm_q4_format {
    CPM_Q4_GPTQ = 0, /* AutoGPTQ: qweight [K/8, N] packed along k, qzeros [G, N/8] */
    CPM_Q4_AWQ,      /* AutoAWQ GEMM: qweight [K, N/8] and qzeros [G, N/8] packed along n,
                      * nibble slot i of a word holding column 8c + {0,2,4,6,1,3,5,7}[i] */
} cpm_q4_format;

/* One int4 linear as a checkpoint stores it (all borrowed). in = K, out = N,
 * G = K / group_size groups. */
typedef struct cpm_q4_gptq {
    const int32_t *qweight; /* GPTQ [K/8, N]: eight 4-bit q along k, lowest bits = lowest k;
                             * AWQ [K, N/8]: eight along n in the AWQ slot order */
    const float *scales;    /* [G, N] */
    const int32_t *qzeros;  /* [G, N/8]: eight 4-bit zeros along n (GPTQ: lowest bits = lowest
                             * n; AWQ: slot order as qweight) */
    const int32_t *g_idx;   /* [K]: group of each input column, or NULL (k / group_size) */
    int K, N;               /* K and N multiples of 8 */
    int group_size;         /* divides K */
    int zero_offset;        /* added to each stored zero: 1 for checkpoint_format "gptq", 0 AWQ */
    cpm_q4_format format;   /* zero-initialised: GPTQ */
} cpm_q4_gptq;

/* cpm_q4_new results besides 0. */
enum {
    CPM_Q4_ENOMEM = -1,
    CPM_Q4_EARG = -2,     /* K, N or group_size out of the rules above */
    CPM_Q4_EGIDX = -3,    /* g_idx[*ret_bad] is not in [0, G) */
    CPM_Q4_EGROUP = -4,   /* group *ret_bad does not hold exactly group_size columns */
};

/* Checks and repacks src. On success *ret owns its memory (free with
 * cpm_q4_free); src may be released. On CPM_Q4_EGIDX / CPM_Q4_EGROUP, *ret_bad
 * (if not NULL) names the offending column / group. */
int cpm_q4_new(const cpm_q4_gptq *src, cpm_q4 **ret, int *ret_bad);

/* Accepts NULL. */
void cpm_q4_free(cpm_q4 *w);

int cpm_q4_rows(const cpm_q4 *w); /* N */
int cpm_q4_cols(const cpm_q4 *w); /* K */

/* Bytes a decode step streams from memory for this weight (nibbles, scales,
 * zeros): the numerator of a bandwidth roofline. */
size_t cpm_q4_bytes(const cpm_q4 *w);

/* Row n of W, dequantized to f32 in the original column order (out[K]).
 * Exact: (q − z) · s has at most 5 + 24 significant bits. */
void cpm_q4_dequant_row(const cpm_q4 *w, int n, float *out);

/* y[M, N] = x[M, K] · Wᵀ; ldx, ldy are row strides in floats. pool may be NULL.
 *
 * Determinism: for a given ISA, y[m, n] depends only on row m of x and row n
 * of W, never on M, on the thread count or on which thread ran it; SCALAR,
 * AVX2 and AVX512 share one summation order and agree bit for bit (AMX, which
 * only serves BF16, runs the AVX-512 kernel here). The ISA is the one
 * cpm_matmul uses (cpm_isa_force applies). Needs a buffer for act-order
 * gathering and prefill panels: from cpm_pool_scratch, or allocated per call
 * without a pool; if that fails, y is filled with NaN. */
void cpm_matmul_q4(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_q4 *w,
                   int M);

/* The opt-in "bf16 activations" precision (cpm-run --activations bf16): each
 * x rounded to the nearest bf16 and, with VDPBF16PS (cpm_cpu_has_bf16_dot and
 * AVX-512 or better in effect), each weight taken as bf16((q − z) · s), 32
 * products per instruction; without it the rounded x runs through the exact
 * kernels above (exact weights, their summation order). A row's bits depend
 * only on its x row and W, as for cpm_matmul_q4. Buffers and failure as
 * cpm_matmul_q4; docs/KERNELS.md has the measured error. */
void cpm_matmul_q4_bf16x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const cpm_q4 *w, int M);

/* The opt-in "int8 activations" precision (cpm-run --activations int8), as
 * llama.cpp's Q4_0 meets Q8_0: x (in packed order) quantized per block of 32
 * to int8 with an f32 scale max|x| / 127, rounded to nearest even; each
 * block's products of nibbles and int8 x summed exactly in int32, then the
 * scales applied in f32 and the zero points taken out once per group. w must
 * be in the panel layout (cpm_q4_to_panels), else y is NaN. VPDPBUSD with
 * AVX-512 VNNI (cpm_cpu_has_int8_dot), AVX2 otherwise, plain C below that:
 * every one the same bits, and a row's bits depend only on its x row and W.
 * A NaN or inf in a block of x makes the outputs NaN. Buffers and failure as
 * cpm_matmul_q4; docs/KERNELS.md has the measured error. */
void cpm_matmul_q4_q8x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                       const cpm_q4 *w, int M);

/* Rewrites w into the layout cpm_matmul_q4_q8x runs on (rows in panels of 32,
 * matmul_q4_internal.h), in place; after it, cpm_matmul_q4 and
 * cpm_matmul_q4_bf16x fill y with NaN. 0, or CPM_Q4_ENOMEM (w unchanged). */
int cpm_q4_to_panels(cpm_q4 *w);

/* Whether cpm_q4_to_panels ran on w. */
int cpm_q4_panelled(const cpm_q4 *w);

/* x[K] as cpm_matmul_q4_q8x sees it (int8 times its block's scale), in the
 * original column order (tests). Returns 0, or -1 without memory. */
int cpm_q4_q8x_dequant_x(const cpm_q4 *w, const float *x, float *out);

/* Double-precision reference over the dequantized rows (tests). */
void cpm_matmul_q4_ref(float *y, int ldy, const float *x, int ldx, const cpm_q4 *w, int M);

#endif
