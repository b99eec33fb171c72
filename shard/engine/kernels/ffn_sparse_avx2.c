/* ffn_sparse_avx2.c - AVX2+FMA+F16C kernels of the sparse FATReLU FFN (CPUs without
 * AVX-512), the same arithmetic as ffn_sparse_avx512.c: rows as matmul_avx2.c's tile
 * (two 8-lane halves of the canonical 16-lane accumulator) over listed W rows; down one
 * fma per element and k, 8 columns per vector. Ragged column edges go to the scalar code,
 * which computes the same fmas.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "ffn_sparse_internal.h"

#define INLINE static inline __attribute__((always_inline))

enum { SRC_F32, SRC_BF16, SRC_F16 };

#define RNR 4 /* listed W rows per rows tile (decode) */
#define RMR 2 /* x rows per rows tile (prefill), against 2 W rows */
#define TV 2  /* tiled: 8-float vectors per column block (16 columns) */

INLINE int src_of(cpm_dtype t) {
    return t == CPM_DTYPE_F32 ? SRC_F32 : t == CPM_DTYPE_F16 ? SRC_F16 : SRC_BF16;
}

INLINE size_t esz_of(int src) { return src == SRC_F32 ? 4 : 2; }

INLINE __m256 load8(int src, const void *row, int k) {
    if (src == SRC_F32)
        return _mm256_loadu_ps((const float *)row + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (src == SRC_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float reduce16(__m256 lo, __m256 hi) {
    __m256 r8 = _mm256_add_ps(lo, hi);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

static float w_at(int src, const void *row, int k) {
    if (src == SRC_F32)
        return ((const float *)row)[k];
    uint16_t v = ((const uint16_t *)row)[k];
    return src == SRC_F16 ? cpm_f16_to_f32(v) : cpm_bf16_to_f32(v);
}

/* ---- rows: x . W[ks[j]] ---- */

/* h at [m + i, ks[j]] for i < mr, j < nr; next (or NULL) lists the rows to prefetch. */
INLINE void rows_tile(const int mr, const int nr, const int src, const cpm_fs_rows_job *job,
                      int m, const int *ks, const int *next) {
    const size_t esz = esz_of(src), w_ld = (size_t)job->w_ld, ldx = (size_t)job->ldx;
    const int K = job->K;
    const float *x = job->x + (size_t)m * ldx;
    const char *wr[RNR], *pf[RNR];
    __m256 lo[RMR][RNR], hi[RMR][RNR];
    for (int j = 0; j < nr; j++) {
        wr[j] = (const char *)job->w + (size_t)ks[j] * w_ld * esz;
        pf[j] = next ? (const char *)job->w + (size_t)next[j] * w_ld * esz : NULL;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            lo[i][j] = hi[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 wl[RNR], wh[RNR];
        if (next)
            for (int j = 0; j < nr; j++)
                _mm_prefetch(pf[j] + (size_t)k * esz, _MM_HINT_T0);
        for (int j = 0; j < nr; j++) {
            wl[j] = load8(src, wr[j], k);
            wh[j] = load8(src, wr[j], k + 8);
        }
        for (int i = 0; i < mr; i++) {
            __m256 xl = _mm256_loadu_ps(x + i * ldx + k), xh = _mm256_loadu_ps(x + i * ldx + k + 8);
            for (int j = 0; j < nr; j++) {
                lo[i][j] = _mm256_fmadd_ps(xl, wl[j], lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(xh, wh[j], hi[i][j]);
            }
        }
    }
    if (k < K) { /* the last chunk zero-padded, as matmul_avx2.c pads it */
        float wt[RNR][16], xt[16];
        for (int j = 0; j < nr; j++)
            for (int l = 0; l < 16; l++)
                wt[j][l] = k + l < K ? w_at(src, wr[j], k + l) : 0.0f;
        for (int i = 0; i < mr; i++) {
            for (int l = 0; l < 16; l++)
                xt[l] = k + l < K ? x[i * ldx + k + l] : 0.0f;
            __m256 xl = _mm256_loadu_ps(xt), xh = _mm256_loadu_ps(xt + 8);
            for (int j = 0; j < nr; j++) {
                lo[i][j] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(wt[j]), lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(wt[j] + 8), hi[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *g = job->y + (size_t)(m + i) * (size_t)job->ldy + ks[j];
            *g = cpm_fs_act(*g, reduce16(lo[i][j], hi[i][j]), job->threshold);
        }
}

INLINE void rows_run(const int src, const cpm_fs_rows_job *job, int t0, int t1) {
    const int *ks = job->ks;
    int t = t0;
    if (job->M == 1) {
        for (; t + RNR <= t1; t += RNR)
            rows_tile(1, RNR, src, job, 0, ks + t, t + 2 * RNR <= job->nk ? ks + t + RNR : NULL);
        for (; t < t1; t++)
            rows_tile(1, 1, src, job, 0, ks + t, NULL);
        return;
    }
    for (; t + 2 <= t1; t += 2) {
        int m = 0;
        for (; m + RMR <= job->M; m += RMR)
            rows_tile(RMR, 2, src, job, m, ks + t, NULL);
        for (; m < job->M; m++)
            rows_tile(1, 2, src, job, m, ks + t, NULL);
    }
    for (; t < t1; t++)
        for (int m = 0; m < job->M; m++)
            rows_tile(1, 1, src, job, m, ks + t, NULL);
}

void cpm_fs_rows_avx2(const cpm_fs_rows_job *job, int t0, int t1) {
    switch (src_of(job->wtype)) {
    case SRC_F32: rows_run(SRC_F32, job, t0, t1); break;
    case SRC_F16: rows_run(SRC_F16, job, t0, t1); break;
    default: rows_run(SRC_BF16, job, t0, t1); break;
    }
}

/* ---- down, decode: y += h[k] * Wt[k] for the active k, each Wt row read once ---- */

INLINE void decode_run(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    const size_t esz = esz_of(src), ld = (size_t)job->wt_ld;
    const int T = CPM_FFN_SPARSE_TILE;
    int cur[CPM_FS_UNION_TILES + 1] = {0};
    for (int m = 0; m < job->M; m++)
        for (int n = n0; n < n1; n += 8)
            _mm256_storeu_ps(job->y + (size_t)m * job->ldy + n, _mm256_setzero_ps());
    for (int t = 0; t < job->nk; t++) {
        int k = job->ks[t];
        const char *w = (const char *)job->wt + (size_t)k * ld * esz;
        if (t + 1 < job->nk) /* the next active row: the prefetcher cannot guess it */
            for (int n = n0; n < n1; n += 32)
                _mm_prefetch((const char *)job->wt + (size_t)job->ks[t + 1] * ld * esz +
                             (size_t)n * esz, _MM_HINT_T0);
        for (int m0 = 0; m0 < job->M; m0 += T) {
            if (!cpm_fs_listed(job->tiles, m0 / T, cur, k))
                continue;
            for (int m = m0; m < m0 + T && m < job->M; m++) {
                float hk = job->h[(size_t)m * job->ldh + k];
                if (hk == 0.0f)
                    continue;
                __m256 a = _mm256_set1_ps(hk);
                float *y = job->y + (size_t)m * job->ldy;
                for (int n = n0; n < n1; n += 8)
                    _mm256_storeu_ps(y + n, _mm256_fmadd_ps(a, load8(src, w, n),
                                                            _mm256_loadu_ps(y + n)));
            }
        }
    }
}

void cpm_fs_down_decode_avx2(const cpm_fs_down_job *job, int n0, int n1) {
    int full = n0 + (n1 - n0) / 8 * 8;
    if (full > n0) {
        switch (src_of(job->wtype)) {
        case SRC_F32: decode_run(SRC_F32, job, n0, full); break;
        case SRC_F16: decode_run(SRC_F16, job, n0, full); break;
        default: decode_run(SRC_BF16, job, n0, full); break;
        }
    }
    if (full < n1)
        cpm_fs_down_decode_scalar(job, full, n1);
}

/* ---- down, tiled: 4 rows of h x 16 columns over the tile's list ---- */

INLINE void down_tile(const int src, const cpm_fs_down_job *job, const int *list, int m0,
                      int mr, int c) {
    const size_t esz = esz_of(src), ld = (size_t)job->wt_ld;
    const float *hr[CPM_FFN_SPARSE_TILE];
    __m256 acc[CPM_FFN_SPARSE_TILE][TV];
    for (int i = 0; i < CPM_FFN_SPARSE_TILE; i++) {
        hr[i] = job->h + (size_t)(m0 + (i < mr ? i : 0)) * (size_t)job->ldh;
        for (int v = 0; v < TV; v++)
            acc[i][v] = _mm256_setzero_ps();
    }
    const char *wt = (const char *)job->wt + (size_t)c * esz;
    for (int t = 0; t < list[0]; t++) {
        int k = list[1 + t];
        const char *row = wt + (size_t)k * ld * esz;
        __m256 wv[TV];
        for (int v = 0; v < TV; v++)
            wv[v] = load8(src, row, 8 * v);
        for (int i = 0; i < CPM_FFN_SPARSE_TILE; i++) {
            __m256 b = _mm256_set1_ps(hr[i][k]);
            for (int v = 0; v < TV; v++)
                acc[i][v] = _mm256_fmadd_ps(b, wv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < TV; v++)
            _mm256_storeu_ps(job->y + (size_t)(m0 + i) * job->ldy + c + 8 * v, acc[i][v]);
}

INLINE void tiles_run(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    const int T = CPM_FFN_SPARSE_TILE;
    for (int c = n0; c < n1; c += 8 * TV)
        for (int m0 = 0; m0 < job->M; m0 += T)
            down_tile(src, job, cpm_fs_tile(job->tiles, m0 / T), m0,
                      job->M - m0 < T ? job->M - m0 : T, c);
}

void cpm_fs_down_tiles_avx2(const cpm_fs_down_job *job, int n0, int n1) {
    int full = n0 + (n1 - n0) / (8 * TV) * (8 * TV);
    if (full > n0) {
        switch (src_of(job->wtype)) {
        case SRC_F32: tiles_run(SRC_F32, job, n0, full); break;
        case SRC_F16: tiles_run(SRC_F16, job, n0, full); break;
        default: tiles_run(SRC_BF16, job, n0, full); break;
        }
    }
    if (full < n1)
        cpm_fs_down_tiles_scalar(job, full, n1);
}
