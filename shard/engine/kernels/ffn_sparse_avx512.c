/* ffn_sparse_avx512.c - AVX-512 kernels of the sparse FATReLU FFN (ffn_sparse_internal.h).
 *
 * rows: matmul_avx512.c's tile over a list of W rows - the same fma per 16-lane chunk,
 * the same masked tail and tree, so the same bits as cpm_matmul - prefetching the next
 * listed rows (the hardware cannot guess them). down: one fma per element and k; decode
 * streams each active row of Wt once, one contiguous slice per thread; the tiled path
 * keeps a 64-column slab of Wt in L2 while every 4-row tile of h runs over it.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "ffn_sparse_internal.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

enum { SRC_F32, SRC_BF16, SRC_F16 };

#define RNR 4 /* listed W rows per rows tile */
#define RMR 4 /* x rows per rows tile (prefill) */
#define DK 4  /* decode: Wt rows folded into each y vector per pass */
#define TV 4  /* tiled: 16-float vectors per column block (64 columns) */

INLINE int src_of(cpm_dtype t) {
    return t == CPM_DTYPE_F32 ? SRC_F32 : t == CPM_DTYPE_F16 ? SRC_F16 : SRC_BF16;
}

INLINE size_t esz_of(int src) { return src == SRC_F32 ? 4 : 2; }

INLINE __m512 load_w(int src, const void *row, int k) {
    if (src == SRC_F32)
        return _mm512_loadu_ps((const float *)row + k);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
    if (src == SRC_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE __m512 load_w_mask(int src, const void *row, int k, __mmask16 mk) {
    if (src == SRC_F32)
        return _mm512_maskz_loadu_ps(mk, (const float *)row + k);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)row + k);
    if (src == SRC_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* ---- rows: x . W[ks[j]] ---- */

/* y_i[cols[j]] = fatrelu(y_i[cols[j]]) * x_i . w_j for i < mr, j < nr (stored for
 * i < mr_store): the dot products are the tile of
 * matmul_avx512.c - one 16-lane accumulator per element over K's chunks in order, the
 * zero-padded tail, the canonical tree - over rows given by pointer; pf (or NULL): the
 * rows to prefetch meanwhile. */
INLINE void dot_tile(const int mr, const int nr, const int src, const float *const *xr,
                     const char *const *wr, const char *const *pf, int K, float *const *yr,
                     int mr_store, const int *cols, float threshold) {
    const size_t esz = esz_of(src);
    __m512 acc[RMR][RNR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[RNR];
        if (pf)
            for (int j = 0; j < nr; j++)
                _mm_prefetch(pf[j] + (size_t)k * esz, _MM_HINT_T0);
        for (int j = 0; j < nr; j++) {
            wv[j] = load_w(src, wr[j], k);
            __asm__("" : "+v"(wv[j])); /* one load in a register: GCC would fold it into mr FMAs */
        }
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_loadu_ps(xr[i] + k);
            __asm__("" : "+v"(xv));
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) { /* zero-padded last chunk, as the canonical order says */
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[RNR];
        for (int j = 0; j < nr; j++)
            wv[j] = load_w_mask(src, wr[j], k, mk);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk, xr[i] + k);
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr_store; i++)
        for (int j = 0; j < nr; j++)
            yr[i][cols[j]] = cpm_fs_act(yr[i][cols[j]], cpm_reduce16_avx512(acc[i][j]), threshold);
}

/* y[m + i, ks[j]] for i < mr, j < nr, from W in place; next (or NULL): rows to prefetch. */
INLINE void rows_tile(const int mr, const int nr, const int src, const cpm_fs_rows_job *job,
                      int m, const int *ks, const int *next) {
    const size_t esz = esz_of(src), w_ld = (size_t)job->w_ld;
    const float *xr[RMR];
    float *yr[RMR];
    const char *wr[RNR], *pf[RNR];
    for (int i = 0; i < mr; i++) {
        xr[i] = job->x + (size_t)(m + i) * (size_t)job->ldx;
        yr[i] = job->y + (size_t)(m + i) * (size_t)job->ldy;
    }
    for (int j = 0; j < nr; j++) {
        wr[j] = (const char *)job->w + (size_t)ks[j] * w_ld * esz;
        pf[j] = next ? (const char *)job->w + (size_t)next[j] * w_ld * esz : NULL;
    }
    dot_tile(mr, nr, src, xr, wr, next ? pf : NULL, job->K, yr, mr, ks, job->threshold);
}

INLINE void rows_run(const int src, const cpm_fs_rows_job *job, int t0, int t1) {
    const int *ks = job->ks;
    int t = t0;
    if (job->M == 1) { /* decode: memory bound; the next rows arrive while these are summed */
        for (; t + RNR <= t1; t += RNR)
            rows_tile(1, RNR, src, job, 0, ks + t, t + 2 * RNR <= job->nk ? ks + t + RNR : NULL);
        for (; t < t1; t++)
            rows_tile(1, 1, src, job, 0, ks + t, NULL);
        return;
    }
    for (; t + RNR <= t1; t += RNR) {
        int m = 0;
        for (; m + RMR <= job->M; m += RMR)
            rows_tile(RMR, RNR, src, job, m, ks + t, NULL);
        for (; m < job->M; m++)
            rows_tile(1, RNR, src, job, m, ks + t, NULL);
    }
    for (; t < t1; t++) {
        int m = 0;
        for (; m + RMR <= job->M; m += RMR)
            rows_tile(RMR, 1, src, job, m, ks + t, NULL);
        for (; m < job->M; m++)
            rows_tile(1, 1, src, job, m, ks + t, NULL);
    }
}

void cpm_fs_rows_avx512(const cpm_fs_rows_job *job, int t0, int t1) {
    switch (src_of(job->wtype)) {
    case SRC_F32: rows_run(SRC_F32, job, t0, t1); break;
    case SRC_F16: rows_run(SRC_F16, job, t0, t1); break;
    default: rows_run(SRC_BF16, job, t0, t1); break;
    }
}

/* ---- down, decode: y += h[k] * Wt[k] for the active k ---- */

/* One row of h: DK rows of Wt folded into each y vector per pass (y stays in L1 and is
 * loaded and stored once per DK terms), k still in list order for every element. */
INLINE void decode_one(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    const size_t esz = esz_of(src), ld = (size_t)job->wt_ld;
    const char *wt = job->wt;
    const float *h = job->h;
    float *y = job->y;
    const int *ks = job->ks;
    for (int n = n0; n < n1; n += 16)
        _mm512_storeu_ps(y + n, _mm512_setzero_ps());
    int t = 0;
    for (; t + DK <= job->nk; t += DK) {
        const char *w[DK], *pf[DK];
        __m512 a[DK];
        bool next = t + 2 * DK <= job->nk;
        for (int j = 0; j < DK; j++) {
            w[j] = wt + (size_t)ks[t + j] * ld * esz;
            pf[j] = next ? wt + (size_t)ks[t + DK + j] * ld * esz : w[j];
            a[j] = _mm512_set1_ps(h[ks[t + j]]);
        }
        for (int n = n0; n < n1; n += 16) {
            for (int j = 0; j < DK; j++)
                _mm_prefetch(pf[j] + (size_t)n * esz, _MM_HINT_T0);
            __m512 acc = _mm512_loadu_ps(y + n);
            for (int j = 0; j < DK; j++)
                acc = _mm512_fmadd_ps(a[j], load_w(src, w[j], n), acc);
            _mm512_storeu_ps(y + n, acc);
        }
    }
    for (; t < job->nk; t++) {
        const char *w = wt + (size_t)ks[t] * ld * esz;
        __m512 a = _mm512_set1_ps(h[ks[t]]);
        for (int n = n0; n < n1; n += 16)
            _mm512_storeu_ps(y + n, _mm512_fmadd_ps(a, load_w(src, w, n), _mm512_loadu_ps(y + n)));
    }
}

/* A few rows (batched decode): each listed row of Wt is read once for all of them; a row
 * whose tile does not list it, or whose h is 0 there, skips it (the same bits: an exact
 * zero term). */
INLINE void decode_few(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    const size_t esz = esz_of(src), ld = (size_t)job->wt_ld;
    const int T = CPM_FFN_SPARSE_TILE;
    int cur[CPM_FS_UNION_TILES + 1] = {0};
    for (int m = 0; m < job->M; m++)
        for (int n = n0; n < n1; n += 16)
            _mm512_storeu_ps(job->y + (size_t)m * job->ldy + n, _mm512_setzero_ps());
    for (int t = 0; t < job->nk; t++) {
        int k = job->ks[t];
        const char *w = (const char *)job->wt + (size_t)k * ld * esz;
        if (t + 1 < job->nk)
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
                __m512 a = _mm512_set1_ps(hk);
                float *y = job->y + (size_t)m * job->ldy;
                for (int n = n0; n < n1; n += 16)
                    _mm512_storeu_ps(y + n, _mm512_fmadd_ps(a, load_w(src, w, n),
                                                            _mm512_loadu_ps(y + n)));
            }
        }
    }
}

INLINE void decode_run(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    int full = n0 + (n1 - n0) / 16 * 16;
    if (full > n0 && job->M == 1)
        decode_one(src, job, n0, full);
    else if (full > n0)
        decode_few(src, job, n0, full);
    if (full < n1)
        cpm_fs_down_decode_scalar(job, full, n1);
}

void cpm_fs_down_decode_avx512(const cpm_fs_down_job *job, int n0, int n1) {
    switch (src_of(job->wtype)) {
    case SRC_F32: decode_run(SRC_F32, job, n0, n1); break;
    case SRC_F16: decode_run(SRC_F16, job, n0, n1); break;
    default: decode_run(SRC_BF16, job, n0, n1); break;
    }
}

/* ---- down, tiled: 4 rows of h x 64 columns over the tile's list ----
 * Read in place, the rows of a column slab of Wt sit a hidden size apart: few cache sets
 * and no stream for the prefetcher. So a panel of KC rows x SB columns (the rows of ks in
 * [k0, k0 + KC); 512 contiguous bytes of each bf16 row) is first widened into 256 KiB of
 * f32 that stays in L2, then every tile of h runs over it, 64 columns at a time. A chunk's
 * partial sums wait in y, exact f32: each element still sees its fmas in k order. */

#define SB 256 /* columns per panel */
#define KC 256 /* Wt rows per panel */

/* Rows [m0, m0 + mr) (mr <= 4; missing rows repeat row m0 and are not stored), columns
 * [c, c + 64) under the masks mk, over the tile's ks[0..n) (all in [k0, k0 + KC)): Wt row
 * k is panel row k - k0 (SB floats apart). first: start from 0, else from y. */
INLINE void down_tile(const cpm_fs_down_job *job, const int *ks, int n, const float *panel,
                      int k0, int m0, int mr, int c, const __mmask16 *mk, bool first) {
    const float *hr[CPM_FFN_SPARSE_TILE];
    __m512 acc[CPM_FFN_SPARSE_TILE][TV];
    for (int i = 0; i < CPM_FFN_SPARSE_TILE; i++) {
        int m = m0 + (i < mr ? i : 0);
        const float *y = job->y + (size_t)m * job->ldy + c;
        hr[i] = job->h + (size_t)m * (size_t)job->ldh;
        for (int v = 0; v < TV; v++)
            acc[i][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk[v], y + 16 * v);
    }
    for (int t = 0; t < n; t++) {
        int k = ks[t];
        const float *row = panel + (size_t)(k - k0) * SB;
        __m512 wv[TV];
        for (int v = 0; v < TV; v++)
            wv[v] = _mm512_load_ps(row + 16 * v);
        for (int i = 0; i < CPM_FFN_SPARSE_TILE; i++) {
            __m512 b = _mm512_set1_ps(hr[i][k]);
            for (int v = 0; v < TV; v++)
                acc[i][v] = _mm512_fmadd_ps(b, wv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < TV; v++)
            _mm512_mask_storeu_ps(job->y + (size_t)(m0 + i) * job->ldy + c + 16 * v, mk[v],
                                  acc[i][v]);
}

/* Wt rows ks[t0..t1) (within [k0, k0 + KC)), columns [c, c + SB) under mk (zero past the
 * edge), widened into panel row k - k0. */
INLINE void pack_panel(const int src, const cpm_fs_down_job *job, float *panel, int k0,
                       int t0, int t1, int c, int width, const __mmask16 *mk) {
    const size_t esz = esz_of(src), ld = (size_t)job->wt_ld;
    for (int t = t0; t < t1; t++) {
        const char *row = (const char *)job->wt + ((size_t)job->ks[t] * ld + (size_t)c) * esz;
        float *d = panel + (size_t)(job->ks[t] - k0) * SB;
        if (t + 4 < t1) { /* rows ahead: scattered, so the prefetcher cannot guess them */
            const char *next = (const char *)job->wt + ((size_t)job->ks[t + 4] * ld + (size_t)c) * esz;
            for (size_t b = 0; b < (size_t)width * esz; b += 64)
                _mm_prefetch(next + b, _MM_HINT_T0);
        }
        for (int v = 0; v < SB / 16; v++)
            _mm512_store_ps(d + 16 * v, load_w_mask(src, row, 16 * v, mk[v]));
    }
}

INLINE void tiles_run(const int src, const cpm_fs_down_job *job, int n0, int n1) {
    _Static_assert(KC * SB * sizeof(float) <= 256 * 1024, "the panel fits the stack");
    float panel[KC * SB] __attribute__((aligned(64)));
    const int T = CPM_FFN_SPARSE_TILE;
    for (int c = n0; c < n1; c += SB) {
        int width = n1 - c < SB ? n1 - c : SB;
        __mmask16 mk[SB / 16];
        for (int v = 0; v < SB / 16; v++) {
            int left = width - 16 * v;
            mk[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        int t0 = 0;
        for (int k0 = 0; k0 == 0 || t0 < job->nk; k0 += KC) {
            int t1 = t0 + cpm_fs_lower_bound(job->ks + t0, job->nk - t0, k0 + KC);
            pack_panel(src, job, panel, k0, t0, t1, c, width, mk);
            for (int m0 = 0; m0 < job->M; m0 += T) {
                const int *list = cpm_fs_tile(job->tiles, m0 / T);
                int a = cpm_fs_lower_bound(list + 1, list[0], k0);
                int b = a + cpm_fs_lower_bound(list + 1 + a, list[0] - a, k0 + KC);
                for (int cb = 0; cb < width; cb += 16 * TV)
                    down_tile(job, list + 1 + a, b - a, panel + cb, k0, m0,
                              job->M - m0 < T ? job->M - m0 : T, c + cb, mk + cb / 16, k0 == 0);
            }
            t0 = t1;
        }
    }
}

void cpm_fs_down_tiles_avx512(const cpm_fs_down_job *job, int n0, int n1) {
    switch (src_of(job->wtype)) {
    case SRC_F32: tiles_run(SRC_F32, job, n0, n1); break;
    case SRC_F16: tiles_run(SRC_F16, job, n0, n1); break;
    default: tiles_run(SRC_BF16, job, n0, n1); break;
    }
}
