/* matmul_avx512.c - AVX-512 kernels for cpm_matmul, in the canonical order of
 * matmul_internal.h (one 16-lane accumulator per output element).
 *
 * Decode (one x row) and small batches (up to DIRECT_M rows) stream W straight
 * from memory, several rows at a time, widening bf16/f16 to f32 in registers
 * and prefetching the next rows. Prefill widens a group of W rows (L2-sized)
 * into chunk-interleaved f32 panels once and runs every MR-row tile of x
 * against each panel with the x vectors in registers. docs/KERNELS.md has the
 * measurements behind each choice.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "matmul_internal.h"
#include "wload.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 4          /* x rows per register tile */
#define NR 6          /* W rows per register tile (and per decoded panel) */
/* W rows per step of the decode (M = 1) loop: 8 streams read 4-10 % faster than
 * 4 on a Zen 5 (the 1B's projections, F16 and BF16, 2 threads, from DRAM) */
#define DEC_ROWS 8
#define GROUP_FLOATS (64 * 1024) /* W rows widened at once: 256 KiB of stack, held in L2 */
#define PANEL_K ((GROUP_FLOATS / NR) & ~15) /* longest K widened (then one panel per group) */
#ifndef DIRECT_M
#define DIRECT_M 32 /* up to this many x rows (batched decode) W is widened in registers per
                     * tile: a widened panel would serve too few rows to repay its stores */
#endif

INLINE float reduce16(__m512 a) { return cpm_reduce16_avx512(a); }

/* y[i, j] for i < mr, j < nr; mr and nr are constants after inlining, so
 * the accumulators live in registers. w_ld is in elements of src. The rows of
 * W and x are addressed from two bases each (rows 0 and 3 of W, 0 and 2 of x,
 * plus whole strides), advanced together: with one pointer per row GCC reloads
 * some of them from the stack in the inner loop. Prefetch as in
 * matmul_bf16x_avx512.c: one chunk in every pf_period, from pf_phase (0: none). */
INLINE void tile(const int mr, const int nr, const int src, const float *x, size_t ldx,
                 const void *w, size_t w_ld, int K, float *y, size_t ldy, const int pf_period,
                 int pf_phase) {
    const size_t esz = src == CPM_WSRC_F32 ? 4 : 2, wb = w_ld * esz, xb = ldx * sizeof(float);
    const char *w0 = w, *w3 = w0 + 3 * wb, *x0 = (const char *)x, *x2 = x0 + 2 * xb;
#define WROW(j) ((j) < 3 ? w0 + (size_t)(j) * wb : w3 + (size_t)((j) - 3) * wb)
#define XROW(i) ((const float *)((i) < 2 ? x0 + (size_t)(i) * xb : x2 + (size_t)((i) - 2) * xb))
    __m512 acc[MR][NR > DEC_ROWS ? NR : DEC_ROWS];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    int k = 0, pc = pf_phase;
    for (; k + 16 <= K; k += 16, w0 += 16 * esz, w3 += 16 * esz, x0 += 64, x2 += 64) {
        __m512 wv[NR > DEC_ROWS ? NR : DEC_ROWS];
        bool pf = false;
        if (pf_period) {
            pf = pc == 0;
            if (++pc == pf_period)
                pc = 0;
        }
        if (pf) /* the next rows' lines: a row is too short for the prefetcher to learn */
            for (int j = 0; j < nr; j++)
                _mm_prefetch(WROW(j + nr), _MM_HINT_T0);
        for (int j = 0; j < nr; j++)
            wv[j] = cpm_wload16(src, WROW(j), 0);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_loadu_ps(XROW(i));
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) { /* zero-padded last chunk, as the canonical order says */
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[NR > DEC_ROWS ? NR : DEC_ROWS];
        for (int j = 0; j < nr; j++)
            wv[j] = cpm_wload16_tail(src, WROW(j), 0, mk);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk, XROW(i));
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
#undef WROW
#undef XROW
    if (mr * nr >= 8) { /* a decode step or a batch tile: sums 16 at a time, the same bits */
        __m512 flat[MR * (NR > DEC_ROWS ? NR : DEC_ROWS)];
        float sums[MR * (NR > DEC_ROWS ? NR : DEC_ROWS) + 16];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                flat[i * nr + j] = acc[i][j];
        cpm_reduce16_many_avx512(flat, mr * nr, sums);
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                y[(size_t)i * ldy + j] = sums[i * nr + j];
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = reduce16(acc[i][j]);
}

/* Prefill tile over f32 W: the mr x vectors of a chunk stay in registers and
 * each W vector is loaded once and used mr times, so loads stay well below the
 * FMAs (mr + nr loads for mr * nr FMAs). W element (j, k) is at
 * w[j * w_rs + (k / 16) * w_cs + k % 16]: a row-major panel has w_rs = its row
 * stride, w_cs = 16; a chunk-interleaved one (one stream for the prefetcher)
 * w_rs = 16, w_cs = 16 * its rows. The same fma(x, w, acc) per lane and chunk
 * as tile(): the same bits. */
INLINE void tile_xreg(const int mr, const int nr, const float *x, size_t ldx, const float *w,
                      size_t w_rs, size_t w_cs, int K, float *y, size_t ldy) {
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16, w += w_cs) {
        __m512 xv[MR];
        for (int i = 0; i < mr; i++)
            xv[i] = _mm512_loadu_ps(x + (size_t)i * ldx + k);
        for (int j = 0; j < nr; j++) {
            __m512 wv = _mm512_loadu_ps(w + (size_t)j * w_rs);
            __asm__("" : "+v"(wv)); /* one load in a register: GCC would fold it into mr FMAs */
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    if (k < K) { /* the panel is zero-padded past K; x is masked */
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv[MR];
        for (int i = 0; i < mr; i++)
            xv[i] = _mm512_maskz_loadu_ps(mk, x + (size_t)i * ldx + k);
        for (int j = 0; j < nr; j++) {
            __m512 wv = _mm512_maskz_loadu_ps(mk, w + (size_t)j * w_rs);
            for (int i = 0; i < mr; i++)
                acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = reduce16(acc[i][j]);
}

/* One x row against W rows [n0, n1): memory bound, W read exactly once. */
INLINE void decode_rows(const int src, const cpm_mm_job *job, int m, int n0, int n1) {
    const size_t esz = src == CPM_WSRC_F32 ? 4 : 2, w_ld = (size_t)job->w_ld;
    const float *x = job->x + (size_t)m * job->ldx;
    float *y = job->y + (size_t)m * job->ldy;
    const char *w = job->w;
    int n = n0;
    for (; n + DEC_ROWS <= n1; n += DEC_ROWS)
        tile(1, DEC_ROWS, src, x, 0, w + n * w_ld * esz, w_ld, job->K, y + n, 0, 1, 0);
    for (; n < n1; n++)
        tile(1, 1, src, x, 0, w + n * w_ld * esz, w_ld, job->K, y + n, 0, 1, 0);
}

/* x rows [m0, m1) against W rows [n, n + nr); the first x tile prefetches
 * the W rows that follow (a literal flag: the loop is compiled without it). */
INLINE void direct_rows(const int src, const int nr, const cpm_mm_job *job, int m0, int m1, int n,
                        const bool prefetch) {
    const size_t esz = src == CPM_WSRC_F32 ? 4 : 2, w_ld = (size_t)job->w_ld;
    const size_t ldx = (size_t)job->ldx, ldy = (size_t)job->ldy;
    const char *w = (const char *)job->w + n * w_ld * esz;
    const int tiles = (m1 - m0) / MR;
    int m = m0;
    for (int t = 0; t < tiles; t++, m += MR)
        if (prefetch)
            tile(MR, nr, src, job->x + m * ldx, ldx, w, w_ld, job->K, job->y + m * ldy + n, ldy,
                 tiles, t);
        else
            tile(MR, nr, src, job->x + m * ldx, ldx, w, w_ld, job->K, job->y + m * ldy + n, ldy,
                 0, 0);
    for (; m < m1; m++)
        tile(1, nr, src, job->x + m * ldx, ldx, w, w_ld, job->K, job->y + m * ldy + n, ldy,
             prefetch && tiles == 0 && m == m0, 0);
}

/* Prefill with W streamed in its own type (f32 weights, or K too long for a
 * panel): the widening is repeated per x tile, which costs time, not bits.
 * The last W rows short of a whole tile go 4, 2 and 1 at a time. */
INLINE void prefill_direct(const int src, const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    int n = n0;
    for (; n + NR <= n1; n += NR)
        direct_rows(src, NR, job, m0, m1, n, true);
    if (n + 4 <= n1)
        direct_rows(src, 4, job, m0, m1, n, false), n += 4;
    if (n + 2 <= n1)
        direct_rows(src, 2, job, m0, m1, n, false), n += 2;
    if (n < n1)
        direct_rows(src, 1, job, m0, m1, n, false);
}

/* W rows [n, n + nr) widened to f32 and interleaved by chunk: chunk c of row j
 * at dst[(c * nr + j) * 16], the last chunk zero-padded. */
static void widen_panel(float *dst, const cpm_mm_job *job, int n, int nr) {
    const int K = job->K, src = job->wtype == CPM_DTYPE_F16 ? CPM_WSRC_F16 : CPM_WSRC_BF16;
    for (int j = 0; j < nr; j++) {
        const void *row = (const char *)job->w + ((size_t)(n + j) * job->w_ld) * 2;
        float *d = dst + j * 16;
        int k = 0;
        for (; k + 16 <= K; k += 16, d += nr * 16)
            _mm512_store_ps(d, src == CPM_WSRC_F16 ? cpm_wload16(CPM_WSRC_F16, row, k) : cpm_wload16(CPM_WSRC_BF16, row, k));
        if (k < K) {
            __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
            _mm512_store_ps(d, src == CPM_WSRC_F16 ? cpm_wload16_tail(CPM_WSRC_F16, row, k, mk)
                                              : cpm_wload16_tail(CPM_WSRC_BF16, row, k, mk));
        }
    }
}

/* W rows [n, n + rows) widened into group as panels of NR rows (the last may be
 * narrower), then every MR-row x tile of [m0, m1) run against each panel. The
 * group stays in L2 while x streams past once per group; each x tile stays in
 * L1 while it meets the group's panels, and each panel is one sequential
 * stream. */
static void prefill_group(const cpm_mm_job *job, float *group, int m0, int m1, int n, int rows) {
    const size_t ldx = (size_t)job->ldx, ldy = (size_t)job->ldy;
    const int K = job->K;
    const size_t panel = (((size_t)K + 15) & ~(size_t)15) * NR; /* floats per panel */
    for (int j = 0; j < rows; j += NR)
        widen_panel(group + j / NR * panel, job, n + j, rows - j < NR ? rows - j : NR);
    for (int m = m0; m < m1; m += MR) {
        const int mr = m1 - m < MR ? m1 - m : MR;
        const float *x = job->x + m * ldx;
        float *y = job->y + m * ldy + n;
        for (int j = 0; j < rows; j += NR) {
            const float *p = group + j / NR * panel;
            const int nr = rows - j < NR ? rows - j : NR;
            if (mr == MR && nr == NR) {
                tile_xreg(MR, NR, x, ldx, p, 16, NR * 16, K, y + j, ldy);
                continue;
            }
            for (int i = 0; i < mr; i++)
                for (int jj = 0; jj < nr; jj++)
                    tile_xreg(1, 1, x + i * ldx, ldx, p + jj * 16, 16, (size_t)nr * 16, K,
                              y + i * ldy + j + jj, ldy);
        }
    }
}

static void prefill_panel(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    _Static_assert(GROUP_FLOATS * sizeof(float) <= 256 * 1024, "group fits the stack");
    float group[GROUP_FLOATS] __attribute__((aligned(64)));
    const size_t ld = ((size_t)job->K + 15) & ~(size_t)15;
    const int rows = (int)(GROUP_FLOATS / ld) / NR * NR;
    for (int n = n0; n < n1; n += rows)
        prefill_group(job, group, m0, m1, n, n1 - n < rows ? n1 - n : rows);
}

void cpm_mm_avx512(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    const int src = job->wtype == CPM_DTYPE_F32 ? CPM_WSRC_F32
                  : job->wtype == CPM_DTYPE_F16 ? CPM_WSRC_F16 : CPM_WSRC_BF16;
    if (m1 - m0 == 1) {
        if (src == CPM_WSRC_F32)
            decode_rows(CPM_WSRC_F32, job, m0, n0, n1);
        else if (src == CPM_WSRC_F16)
            decode_rows(CPM_WSRC_F16, job, m0, n0, n1);
        else
            decode_rows(CPM_WSRC_BF16, job, m0, n0, n1);
    } else if (src == CPM_WSRC_F32) {
        prefill_direct(CPM_WSRC_F32, job, m0, m1, n0, n1);
    } else if (job->K <= PANEL_K && m1 - m0 > DIRECT_M) {
        prefill_panel(job, m0, m1, n0, n1);
    } else if (src == CPM_WSRC_F16) {
        prefill_direct(CPM_WSRC_F16, job, m0, m1, n0, n1);
    } else {
        prefill_direct(CPM_WSRC_BF16, job, m0, m1, n0, n1);
    }
}
