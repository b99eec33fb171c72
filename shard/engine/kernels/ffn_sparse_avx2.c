/* ffn_sparse_avx2.c - AVX2+FMA+F16C kernels of the sparse FATReLU FFN (CPUs without
 * AVX-512), the same arithmetic as ffn_sparse_avx512.c: up as matmul_avx2.c's tile (two
 * 8-lane halves of the canonical 16-lane accumulator) over listed W rows; down one fma
 * per element and k, 8 columns per vector. Ragged column edges go to the scalar code,
 * which computes the same fmas.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "ffn_sparse_internal.h"
#include "wload.h"

#define INLINE static inline __attribute__((always_inline))

#define RNR 4 /* listed W rows per rows tile */
#define DK 4  /* down: Wt rows folded into each y vector per pass */

static float w_at(int src, const void *row, int k) {
    if (src == CPM_WSRC_F32)
        return ((const float *)row)[k];
    uint16_t v = ((const uint16_t *)row)[k];
    return src == CPM_WSRC_F16 ? cpm_f16_to_f32(v) : cpm_bf16_to_f32(v);
}

/* ---- up: h = fatrelu(g) * x . W[j] for the listed j ---- */

/* g[ks[j]] = fatrelu(g) * x . W[ks[j]] for j < nr: matmul_avx2.c's decode tile (the
 * 16-lane accumulator as two 8-lane halves, the padded tail, the canonical tree) over
 * listed rows; next (or NULL): the rows to prefetch meanwhile. */
INLINE void rows_tile(const int nr, const int src, const cpm_fs_up_job *job, const int *ks,
                      const int *next) {
    const size_t esz = cpm_wsrc_size(src), w_ld = (size_t)job->w_ld;
    const int K = job->K;
    const float *x = job->x;
    const char *wr[RNR], *pf[RNR];
    __m256 lo[RNR], hi[RNR];
    for (int j = 0; j < nr; j++) {
        wr[j] = (const char *)job->w + (size_t)ks[j] * w_ld * esz;
        pf[j] = next ? (const char *)job->w + (size_t)next[j] * w_ld * esz : NULL;
        lo[j] = hi[j] = _mm256_setzero_ps();
    }
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        if (next)
            for (int j = 0; j < nr; j++)
                _mm_prefetch(pf[j] + (size_t)k * esz, _MM_HINT_T0);
        __m256 xl = _mm256_loadu_ps(x + k), xh = _mm256_loadu_ps(x + k + 8);
        for (int j = 0; j < nr; j++) {
            lo[j] = _mm256_fmadd_ps(xl, cpm_wload8(src, wr[j], k), lo[j]);
            hi[j] = _mm256_fmadd_ps(xh, cpm_wload8(src, wr[j], k + 8), hi[j]);
        }
    }
    if (k < K) { /* the last chunk zero-padded, as matmul_avx2.c pads it */
        float wt[16], xt[16];
        for (int l = 0; l < 16; l++)
            xt[l] = k + l < K ? x[k + l] : 0.0f;
        __m256 xl = _mm256_loadu_ps(xt), xh = _mm256_loadu_ps(xt + 8);
        for (int j = 0; j < nr; j++) {
            for (int l = 0; l < 16; l++)
                wt[l] = k + l < K ? w_at(src, wr[j], k + l) : 0.0f;
            lo[j] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(wt), lo[j]);
            hi[j] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(wt + 8), hi[j]);
        }
    }
    for (int j = 0; j < nr; j++)
        job->g[ks[j]] = cpm_fs_act(job->g[ks[j]], cpm_reduce16_avx2(lo[j], hi[j]), job->threshold);
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

void cpm_fs_up_avx2(const cpm_fs_up_job *job, int t0, int t1) {
    switch (cpm_wsrc_of(job->wtype)) {
    case CPM_WSRC_F32: rows_run(CPM_WSRC_F32, job, t0, t1); break;
    case CPM_WSRC_F16: rows_run(CPM_WSRC_F16, job, t0, t1); break;
    default: rows_run(CPM_WSRC_BF16, job, t0, t1); break;
    }
}

/* ---- down: row by row over its own active rows of Wt (as ffn_sparse_avx512.c) ---- */

#define SEG 1024 /* active k gathered per pass (stack) */

/* y[n0, n1) (zeroed) += h[k] Wt[k, n0..n1) for the ks[0..n) in order, DK rows of Wt
 * folded into each y vector per pass, the rows DK ahead prefetched. */
INLINE void fold_rows(const int src, const cpm_fs_down_job *job, const float *h, float *y,
                      const int *ks, int n, int n0, int n1) {
    const size_t esz = cpm_wsrc_size(src), ld = (size_t)job->wt_ld;
    const char *wt = job->wt;
    int t = 0;
    for (; t + DK <= n; t += DK) {
        const char *w[DK], *pf[DK];
        __m256 a[DK];
        bool next = t + 2 * DK <= n;
        for (int j = 0; j < DK; j++) {
            w[j] = wt + (size_t)ks[t + j] * ld * esz;
            pf[j] = next ? wt + (size_t)ks[t + DK + j] * ld * esz : w[j];
            a[j] = _mm256_set1_ps(h[ks[t + j]]);
        }
        for (int c = n0; c < n1; c += 8) {
            if ((c & 15) == 0) /* one line of bf16 per 32 columns, of f32 per 16 */
                for (int j = 0; j < DK; j++)
                    _mm_prefetch(pf[j] + (size_t)c * esz, _MM_HINT_T0);
            __m256 acc = _mm256_loadu_ps(y + c);
            for (int j = 0; j < DK; j++)
                acc = _mm256_fmadd_ps(a[j], cpm_wload8(src, w[j], c), acc);
            _mm256_storeu_ps(y + c, acc);
        }
    }
    for (; t < n; t++) {
        const char *w = wt + (size_t)ks[t] * ld * esz;
        __m256 a = _mm256_set1_ps(h[ks[t]]);
        for (int c = n0; c < n1; c += 8)
            _mm256_storeu_ps(y + c, _mm256_fmadd_ps(a, cpm_wload8(src, w, c), _mm256_loadu_ps(y + c)));
    }
}

INLINE void down_row(const int src, const cpm_fs_down_job *job, int m, int n0, int n1) {
    const float *h = job->h + (size_t)m * job->ldh;
    float *y = job->y + (size_t)m * job->ldy;
    const int *src_ks = job->ks;
    int nk = job->nk;
    int mine[SEG];
    for (int c = n0; c < n1; c += 8)
        _mm256_storeu_ps(y + c, _mm256_setzero_ps());
    for (int t = 0; t < nk;) { /* this row's non-zero terms, SEG at a time, in k order */
        int n = 0;
        for (; t < nk && n < SEG; t++) {
            mine[n] = src_ks[t];
            n += h[src_ks[t]] != 0.0f;
        }
        fold_rows(src, job, h, y, mine, n, n0, n1);
    }
}

void cpm_fs_down_avx2(const cpm_fs_down_job *job, int n0, int n1) {
    int full = n0 + (n1 - n0) / 8 * 8;
    for (int m = 0; full > n0 && m < job->M; m++) {
        switch (cpm_wsrc_of(job->wtype)) {
        case CPM_WSRC_F32: down_row(CPM_WSRC_F32, job, m, n0, full); break;
        case CPM_WSRC_F16: down_row(CPM_WSRC_F16, job, m, n0, full); break;
        default: down_row(CPM_WSRC_BF16, job, m, n0, full); break;
        }
    }
    if (full < n1)
        cpm_fs_down_scalar(job, full, n1);
}
