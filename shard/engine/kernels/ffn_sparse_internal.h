/* ffn_sparse_internal.h - the contract between ffn_sparse.c (dispatch, threading, scalar
 * code) and the per-ISA kernel files, each compiled with its own -m flags.
 *
 * up kernels: the canonical order of matmul_internal.h per element (so the same bits as
 * cpm_matmul). down kernels: y[m, n] = fma(h[m, k], Wt[k, n], y[m, n]) for the k of a
 * list in order, from +0 - one lane per element, so every ISA gives the same bits.
 */
#ifndef CPM_FFN_SPARSE_INTERNAL_H
#define CPM_FFN_SPARSE_INTERNAL_H

#include <stddef.h>

#include "dtype.h"
#include "ffn_sparse.h"

/* One row of the batch: g[ks[t]] = fatrelu(g) * x . W[ks[t]] for t < nk. */
typedef struct cpm_fs_up_job {
    float *g; /* in, and h out */
    const float *x;
    const void *w;
    cpm_dtype wtype;
    int w_ld;
    int K;
    const int *ks;
    int nk;
    float threshold;
} cpm_fs_up_job;

/* The FATReLU at the store of an up element: h = fatrelu(g) * u, as cpm_fatrelu_mul. */
static inline float cpm_fs_act(float g, float u, float threshold) {
    return g > threshold ? g * u : 0.0f;
}

/* The j of ks[t0..t1) (ffn_sparse.c hands each row its own active list). */
typedef void (*cpm_fs_up_kernel)(const cpm_fs_up_job *job, int t0, int t1);

typedef struct cpm_fs_down_job {
    float *y;
    int ldy;
    const float *h;
    int ldh;
    const void *wt;
    cpm_dtype wtype;
    int wt_ld;
    int M, N;
    const int *ks;
    int nk;
} cpm_fs_down_job;

/* Columns [n0, n1) of y for every row, row by row over its non-zero terms. The SIMD
 * kernels hand the columns past their last full vector to the scalar one. */
typedef void (*cpm_fs_down_kernel)(const cpm_fs_down_job *job, int n0, int n1);

void cpm_fs_up_scalar(const cpm_fs_up_job *job, int t0, int t1);
void cpm_fs_up_avx2(const cpm_fs_up_job *job, int t0, int t1);
void cpm_fs_up_avx512(const cpm_fs_up_job *job, int t0, int t1);

void cpm_fs_down_scalar(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_avx2(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_avx512(const cpm_fs_down_job *job, int n0, int n1);

/* Element (k, n) of Wt as f32, for the scalar code and the ragged edges. */
static inline float cpm_fs_wt_at(const cpm_fs_down_job *job, int k, int n) {
    size_t i = (size_t)k * (size_t)job->wt_ld + (size_t)n;
    switch (job->wtype) {
    case CPM_DTYPE_F32: return ((const float *)job->wt)[i];
    case CPM_DTYPE_F16: return cpm_f16_to_f32(((const uint16_t *)job->wt)[i]);
    default: return cpm_bf16_to_f32(((const uint16_t *)job->wt)[i]);
    }
}

#endif
