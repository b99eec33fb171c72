/* ffn_sparse_avx512.c - AVX-512 kernels of the sparse FATReLU FFN (ffn_sparse_internal.h).
 *
 * up: matmul_avx512.c's decode tile over a list of W rows - the same fma per 16-lane
 * chunk, the same masked tail and tree, so the same bits as cpm_matmul - then h =
 * fatrelu(g) * u at the store, prefetching the next listed rows (the hardware cannot
 * guess them).
 * down: one fma per element and k, row by row over its active rows of Wt, one contiguous
 * slice of each per thread, DK of them folded into y per pass.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "ffn_sparse_internal.h"
#include "wload.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

#define RNR 4 /* listed W rows per up tile */
#define DK 4  /* down: Wt rows folded into each y vector per pass */

/* ---- up: h = fatrelu(g) * x . W[j] for the listed j ---- */

/* g[ks[j]] = fatrelu(g) * x . W[ks[j]] for j < nr: matmul_avx512.c's decode tile - one
 * 16-lane accumulator per W row over K's chunks in order, the zero-padded tail, the
 * canonical tree - over listed rows; next (or NULL): the rows to prefetch meanwhile. */
INLINE void rows_tile(const int nr, const int src, const cpm_fs_up_job *job, const int *ks,
                      const int *next) {
    const size_t esz = cpm_wsrc_size(src), w_ld = (size_t)job->w_ld;
    const int K = job->K;
    const float *x = job->x;
    const char *wr[RNR], *pf[RNR];
    __m512 acc[RNR];
    for (int j = 0; j < nr; j++) {
        wr[j] = (const char *)job->w + (size_t)ks[j] * w_ld * esz;
        pf[j] = next ? (const char *)job->w + (size_t)next[j] * w_ld * esz : NULL;
        acc[j] = _mm512_setzero_ps();
    }
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        if (next)
            for (int j = 0; j < nr; j++)
                _mm_prefetch(pf[j] + (size_t)k * esz, _MM_HINT_T0);
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int j = 0; j < nr; j++)
            acc[j] = _mm512_fmadd_ps(xv, cpm_wload16(src, wr[j], k), acc[j]);
    }
    if (k < K) { /* zero-padded last chunk, as the canonical order says */
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
        for (int j = 0; j < nr; j++)
            acc[j] = _mm512_fmadd_ps(xv, cpm_wload16_tail(src, wr[j], k, mk), acc[j]);
    }
    for (int j = 0; j < nr; j++)
        job->g[ks[j]] = cpm_fs_act(job->g[ks[j]], cpm_reduce16_avx512(acc[j]), job->threshold);
}

/* Memory bound: the next RNR rows arrive while these are summed. */
INLINE void rows_run(const int src, const cpm_fs_up_job *job, int t0, int t1) {
    const int *ks = job->ks;
    int t = t0;
    for (; t + RNR <= t1; t += RNR)
        rows_tile(RNR, src, job, ks + t, t + 2 * RNR <= job->nk ? ks + t + RNR : NULL);
    for (; t < t1; t++)
        rows_tile(1, src, job, ks + t, NULL);
}

void cpm_fs_up_avx512(const cpm_fs_up_job *job, int t0, int t1) {
    switch (cpm_wsrc_of(job->wtype)) {
    case CPM_WSRC_F32: rows_run(CPM_WSRC_F32, job, t0, t1); break;
    case CPM_WSRC_F16: rows_run(CPM_WSRC_F16, job, t0, t1); break;
    default: rows_run(CPM_WSRC_BF16, job, t0, t1); break;
    }
}

/* ---- down: y += h[k] * Wt[k] for the active k ----
 * Row by row, each over its own active k (those of ks where its h is not 0): DK rows of
 * Wt are folded into each y vector per pass, so y (in L1) is loaded and stored once per
 * DK terms, and the rows DK ahead are prefetched. A row that shares an active k with an
 * earlier one finds that Wt row in cache. */

#define SEG 1024 /* active k gathered per pass (stack) */

/* y[n0, n1) (zeroed) += h[k] Wt[k, n0..n1) for the ks[0..n) in order. */
INLINE void fold_rows(const int src, const cpm_fs_down_job *job, const float *h, float *y,
                      const int *ks, int n, int n0, int n1) {
    const size_t esz = cpm_wsrc_size(src), ld = (size_t)job->wt_ld;
    const char *wt = job->wt;
    int t = 0;
    for (; t + DK <= n; t += DK) {
        const char *w[DK], *pf[DK];
        __m512 a[DK];
        bool next = t + 2 * DK <= n;
        for (int j = 0; j < DK; j++) {
            w[j] = wt + (size_t)ks[t + j] * ld * esz;
            pf[j] = next ? wt + (size_t)ks[t + DK + j] * ld * esz : w[j];
            a[j] = _mm512_set1_ps(h[ks[t + j]]);
        }
        for (int c = n0; c < n1; c += 16) {
            for (int j = 0; j < DK; j++)
                _mm_prefetch(pf[j] + (size_t)c * esz, _MM_HINT_T0);
            __m512 acc = _mm512_loadu_ps(y + c);
            for (int j = 0; j < DK; j++)
                acc = _mm512_fmadd_ps(a[j], cpm_wload16(src, w[j], c), acc);
            _mm512_storeu_ps(y + c, acc);
        }
    }
    for (; t < n; t++) {
        const char *w = wt + (size_t)ks[t] * ld * esz;
        __m512 a = _mm512_set1_ps(h[ks[t]]);
        for (int c = n0; c < n1; c += 16)
            _mm512_storeu_ps(y + c, _mm512_fmadd_ps(a, cpm_wload16(src, w, c), _mm512_loadu_ps(y + c)));
    }
}

INLINE void down_row(const int src, const cpm_fs_down_job *job, int m, int n0, int n1) {
    const float *h = job->h + (size_t)m * job->ldh;
    float *y = job->y + (size_t)m * job->ldy;
    const int *src_ks = job->ks;
    int nk = job->nk;
    int mine[SEG];
    for (int c = n0; c < n1; c += 16)
        _mm512_storeu_ps(y + c, _mm512_setzero_ps());
    for (int t = 0; t < nk;) { /* this row's non-zero terms, SEG at a time, in k order */
        int n = 0;
        for (; t < nk && n < SEG; t++) {
            mine[n] = src_ks[t];
            n += h[src_ks[t]] != 0.0f;
        }
        fold_rows(src, job, h, y, mine, n, n0, n1);
    }
}

INLINE void down_rows(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    int full = n0 + (n1 - n0) / 16 * 16;
    for (int m = 0; full > n0 && m < job->M; m++)
        down_row(src, job, m, n0, full);
    if (full < n1)
        cpm_fs_down_scalar(job, full, n1);
}

void cpm_fs_down_avx512(const cpm_fs_down_job *job, int n0, int n1) {
    switch (cpm_wsrc_of(job->wtype)) {
    case CPM_WSRC_F32: down_rows(CPM_WSRC_F32, job, n0, n1); break;
    case CPM_WSRC_F16: down_rows(CPM_WSRC_F16, job, n0, n1); break;
    default: down_rows(CPM_WSRC_BF16, job, n0, n1); break;
    }
}
