/* ffn_sparse_internal.h - the contract between ffn_sparse.c (dispatch, threading, scalar
 * code) and the per-ISA kernel files, each compiled with its own -m flags.
 *
 * rows kernels: the canonical order of matmul_internal.h per element (so the same bits
 * as cpm_matmul). down kernels: y[m, n] = fma(h[m, k], Wt[k, n], y[m, n]) for the k of a
 * list in order, from +0 - one lane per element, so every ISA gives the same bits.
 */
#ifndef CPM_FFN_SPARSE_INTERNAL_H
#define CPM_FFN_SPARSE_INTERNAL_H

#include "dtype.h"
#include "ffn_sparse.h"

typedef struct cpm_fs_rows_job {
    float *y;
    int ldy;
    const float *x;
    int ldx;
    const void *w;
    cpm_dtype wtype;
    int w_ld;
    int M, K;
    const int *ks;
    int nk;
} cpm_fs_rows_job;

/* The listed rows ks[t0..t1) of W, against every x row. */
typedef void (*cpm_fs_rows_kernel)(const cpm_fs_rows_job *job, int t0, int t1);

typedef struct cpm_fs_down_job {
    float *y;
    int ldy;
    const float *h;
    int ldh;
    const void *wt;
    cpm_dtype wtype;
    int wt_ld;
    int M, N;
    const int *ks; /* the active set (decode path) */
    int nk;
    const int *tiles; /* tiled path: tile b's list at tiles + b * stride: count, then the k */
    size_t stride;
} cpm_fs_down_job;

/* Columns [n0, n1) of y for every row: the decode path streams each listed row of Wt
 * once for all (at most CPM_FFN_SPARSE_TILE) rows, skipping a row's h == 0; the tiled
 * path runs every tile of rows over its own list. */
typedef void (*cpm_fs_down_kernel)(const cpm_fs_down_job *job, int n0, int n1);

void cpm_fs_rows_scalar(const cpm_fs_rows_job *job, int t0, int t1);
void cpm_fs_rows_avx2(const cpm_fs_rows_job *job, int t0, int t1);
void cpm_fs_rows_avx512(const cpm_fs_rows_job *job, int t0, int t1);

void cpm_fs_down_decode_scalar(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_decode_avx2(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_decode_avx512(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_tiles_scalar(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_tiles_avx2(const cpm_fs_down_job *job, int n0, int n1);
void cpm_fs_down_tiles_avx512(const cpm_fs_down_job *job, int n0, int n1);

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
