/* ffn_sparse_internal.h - the contract between ffn_sparse.c (dispatch, threading, scalar
 * code) and the per-ISA kernel files, each compiled with its own -m flags.
 *
 * rows kernels: the canonical order of matmul_internal.h per element (so the same bits
 * as cpm_matmul). down kernels: y[m, n] = fma(h[m, k], Wt[k, n], y[m, n]) for the k of a
 * list in order, from +0 - one lane per element, so every ISA gives the same bits.
 */
#ifndef CPM_FFN_SPARSE_INTERNAL_H
#define CPM_FFN_SPARSE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "dtype.h"
#include "ffn_sparse.h"

/* Tile lists (cpm_ffn_sparse_tiles): tiles[0] tiles of tiles[1] ints each, from
 * tiles + 2; a list is its count, then its k ascending. */
static inline const int *cpm_fs_tile(const int *tiles, int b) {
    return tiles + 2 + (size_t)b * (size_t)tiles[1];
}

/* The first of a[0..n) (ascending) at or past v. */
static inline int cpm_fs_lower_bound(const int *a, int n, int v) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (a[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

typedef struct cpm_fs_rows_job {
    float *y; /* g in, h out */
    int ldy;
    const float *x;
    int ldx;
    const void *w;
    cpm_dtype wtype;
    int w_ld;
    int M, K;
    const int *ks;
    int nk;
    const int *tiles; /* or NULL */
    float threshold;
} cpm_fs_rows_job;

/* The FATReLU at the store of an up element: h = fatrelu(g) * u, as cpm_fatrelu_mul. */
static inline float cpm_fs_act(float g, float u, float threshold) {
    return g > threshold ? g * u : 0.0f;
}

/* Up rows (h = fatrelu(g) * x . W[j] into y): the listed rows ks[t0..t1) of W against
 * every x row (ffn_sparse.c hands each tile its own list). */
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
    const int *ks; /* the active set (union path) */
    int nk;
    const int *tiles; /* or NULL */
} cpm_fs_down_job;

/* Columns [n0, n1) of y for every row: the union (decode) path streams each row of Wt in
 * ks once for all (at most CPM_FFN_SPARSE_UNION_ROWS) rows, a row skipping it where its
 * tile does not list it or its h is 0; the tiled path runs every tile of rows over its
 * own list. The SIMD kernels hand the columns past their last full vector to the scalar
 * ones. */
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

/* Union path with tiles: whether tile b lists k, walking its list with *cur as the k of
 * ks ascend (lists are subsets of ks). Always true without tiles. */
#define CPM_FS_UNION_TILES (CPM_FFN_SPARSE_UNION_ROWS / CPM_FFN_SPARSE_TILE)
static inline bool cpm_fs_listed(const int *tiles, int b, int *cur, int k) {
    if (!tiles)
        return true;
    const int *list = cpm_fs_tile(tiles, b);
    if (cur[b] < list[0] && list[1 + cur[b]] == k) {
        cur[b]++;
        return true;
    }
    return false;
}

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
