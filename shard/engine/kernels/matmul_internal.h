/* matmul_internal.h - the contract between matmul.c (dispatch, threading) and
 * the per-ISA kernel files, each compiled with its own -m flags.
 *
 * Summation order (the "canonical order"), shared by the scalar, AVX2 and
 * AVX-512 kernels so that they agree bit for bit: K is cut into chunks of 16
 * (the last one zero-padded); lane j of a 16-lane f32 accumulator takes
 * acc[j] = fma(x[16c + j], w[16c + j], acc[j]) for c = 0, 1, ... in order;
 * the 16 lanes are then summed by the fixed tree
 *   r8[i] = a[i] + a[i+8], r4[i] = r8[i] + r8[i+4], r2[i] = r4[i] + r4[i+2],
 *   y = r2[0] + r2[1].
 * Every output element is produced this way whatever M, the tile it falls in
 * or the thread computing it, which is what makes results independent of both.
 * The AMX kernel (BF16 weights only) has its own, equally fixed, order.
 */
#ifndef CPM_MATMUL_INTERNAL_H
#define CPM_MATMUL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define CPM_MM_LANES 16

typedef struct cpm_mm_job {
    float *y;
    int ldy;
    const float *x;
    int ldx;
    const void *w;
    cpm_dtype wtype;
    int w_ld;
    int M, N, K;
    void *packed; /* AMX: x split and packed by cpm_mm_amx_pack */
} cpm_mm_job;

/* The canonical tree over 16 lanes, written out (the scalar kernels). */
static inline float cpm_mm_tree16(const float *a) {
    float r8[8], r4[4], r2[2];
    for (int i = 0; i < 8; i++)
        r8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++)
        r4[i] = r8[i] + r8[i + 4];
    for (int i = 0; i < 2; i++)
        r2[i] = r4[i] + r4[i + 2];
    return r2[0] + r2[1];
}

/* y[M, N] (row stride ldy) all NaN: how a call that could not get its buffer
 * fails loudly instead of rounding differently. */
static inline void cpm_mm_fill_nan(float *y, size_t ldy, int M, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            y[(size_t)m * ldy + n] = __builtin_nanf("");
}

/* Computes y[m, n] for m in [m0, m1), n in [n0, n1). */
typedef void (*cpm_mm_kernel)(const cpm_mm_job *job, int m0, int m1, int n0, int n1);

void cpm_mm_scalar(const cpm_mm_job *job, int m0, int m1, int n0, int n1);
void cpm_mm_avx2(const cpm_mm_job *job, int m0, int m1, int n0, int n1);
void cpm_mm_avx512(const cpm_mm_job *job, int m0, int m1, int n0, int n1);

/* AMX (BF16 weights): x is first split into three bf16 terms (x = x1 + x2 + x3
 * exactly) and packed into tiles, cpm_mm_amx_packed_size(M, K) bytes; blocks
 * [b0, b1) of CPM_MM_AMX_ROWS rows each are packed by one call. */
#define CPM_MM_AMX_ROWS 5
size_t cpm_mm_amx_packed_size(int M, int K);
void cpm_mm_amx_pack(const cpm_mm_job *job, int b0, int b1);
void cpm_mm_amx(const cpm_mm_job *job, int m0, int m1, int n0, int n1);

/* bf16 activations (cpm_matmul_bf16x, BF16 weights, VDPBF16PS): rows [m0, m1)
 * of x rounded to bf16 into job->packed (cpm_mm_bf16x_packed_size(M, K) bytes),
 * then the kernel over the packed rows. */
size_t cpm_mm_bf16x_packed_size(int M, int K);
void cpm_mm_bf16x_pack(const cpm_mm_job *job, int m0, int m1);
void cpm_mm_bf16x(const cpm_mm_job *job, int m0, int m1, int n0, int n1);

/* Element (row n, column k) of W as f32, for the scalar code. */
static inline float cpm_mm_w_at(const cpm_mm_job *job, int n, int k) {
    size_t i = (size_t)n * (size_t)job->w_ld + (size_t)k;
    switch (job->wtype) {
    case CPM_DTYPE_F32: return ((const float *)job->w)[i];
    case CPM_DTYPE_F16: return cpm_f16_to_f32(((const uint16_t *)job->w)[i]);
    default: return cpm_bf16_to_f32(((const uint16_t *)job->w)[i]);
    }
}

#endif
