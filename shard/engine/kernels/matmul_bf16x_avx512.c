/* matmul_bf16x_avx512.c - BF16 (or F16, rounded) weights times x rounded to bf16, with the
 * AVX-512 BF16 dot-product instruction (VDPBF16PS: 32 products per
 * instruction, twice the f32 FMA's). The opt-in "bf16 activations" precision
 * of cpm_matmul_bf16x (matmul.h); compiled with -mavx512bf16 only here.
 *
 * x arrives already rounded and packed (cpm_mm_bf16x_pack): each row Kp = K
 * rounded up to 32 bf16, zero-padded, so only W needs a mask at the tail.
 * Every M goes through the per-output sequence of bf16dot_avx512.h, so a
 * row's bits never depend on its batch.
 *
 * Decode and small batches stream W rows (8 or 6 at a time, the next ones
 * prefetched); prefill copies a group of W rows into chunk-interleaved panels
 * (one sequential stream each, L2-sized) and runs 4-row x tiles against them
 * with the x chunks held in registers.
 */
#include <immintrin.h>
#include <stdbool.h>
#include <string.h>

#include "bf16dot_avx512.h"
#include "matmul_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define MR CPM_BF16DOT_MR
#define NR CPM_BF16DOT_NR
/* W rows per step with one x row: 8 streams read 10 % faster than 4 on a
 * Zen 5 (the 1B's projections, 2 threads, weights from DRAM) */
#define DEC_ROWS 8
#define DIRECT_M 16               /* up to this many x rows W is read in place */
#define GROUP_HALFS (128 * 1024)  /* bf16 of W copied per group: 256 KiB, in L2 */

INLINE float reduce16(__m512 a) { return cpm_reduce16_avx512(a); }

/* 32 weights as bf16: BF16 as stored; F16 widened (exactly) and rounded to
 * the nearest bf16, the same in every path. Lanes outside mk read as 0. */
INLINE __m512bh w_bf16(const int f16, const uint16_t *p, __mmask32 mk) {
    __m512i h = mk == (__mmask32)~0u ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mk, p);
    if (!f16)
        return (__m512bh)h;
    return _mm512_cvtne2ps_pbh(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)),
                               _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
}

size_t cpm_mm_bf16x_packed_size(int M, int K) {
    return (size_t)M * (size_t)((K + 31) & ~31) * sizeof(uint16_t);
}

/* Rows [m0, m1) of x rounded to bf16 (nearest even) into job->packed. */
void cpm_mm_bf16x_pack(const cpm_mm_job *job, int m0, int m1) {
    const size_t Kp = (size_t)((job->K + 31) & ~31);
    for (int m = m0; m < m1; m++)
        cpm_bf16dot_round_row(job->x + (size_t)m * job->ldx, job->K,
                              (uint16_t *)job->packed + (size_t)m * Kp);
}

/* y[i, j], i < mr x rows (packed, stride Kp), j < nr W rows read in place.
 * A step holds the mr x chunks in registers and takes the W rows one at a
 * time (mr * nr accumulators + mr + 1 registers). The rows are addressed
 * from two bases each (row 0 and row 3, plus 0..2 strides), advanced
 * together: with one pointer per row GCC reloads some of them from the stack
 * in the inner loop. The accumulators are summed 16 at a time
 * (cpm_reduce16_many_avx512): at 4 x 6 one by one, the sums cost a fifth of
 * the tile at K = 1536.
 *
 * Prefetch: a tile prefetches the W rows that follow its own on one chunk in
 * every pf_period, starting at pf_phase (0: none). The x tiles that share W
 * rows take the phases in turn, so the next rows' lines are asked for evenly
 * over all of them: asked for all at once by the first tile, they queued
 * behind each other (M = 16 streamed W at 20 GB/s and ran 30-40 % slower than
 * with W in cache; spread, as fast). */
INLINE void tile_direct(const int f16, const int mr, const int nr, const uint16_t *x, size_t Kp,
                        const uint16_t *w, size_t w_ld, int K, float *y, size_t ldy,
                        const int pf_period, int pf_phase) {
    __m512 acc[MR * NR];
    for (int t = 0; t < mr * nr; t++)
        acc[t] = _mm512_setzero_ps();
    const size_t wb = w_ld * sizeof(uint16_t), xb = Kp * sizeof(uint16_t);
    const char *w0 = (const char *)w, *w3 = w0 + 3 * wb;
    const char *x0 = (const char *)x, *x2 = x0 + 2 * xb;
#define WROW(j) ((j) < 3 ? w0 + (size_t)(j) * wb : w3 + (size_t)((j) - 3) * wb)
#define XROW(i) ((i) < 2 ? x0 + (size_t)(i) * xb : x2 + (size_t)((i) - 2) * xb)
    int k = 0, pc = pf_phase;
    for (; k + 32 <= K; k += 32, w0 += 64, w3 += 64, x0 += 64, x2 += 64) {
        if (pf_period) {
            if (pc == 0) /* the next rows: a row is too short for the prefetcher to learn */
                for (int j = 0; j < nr; j++)
                    _mm_prefetch(WROW(j + nr), _MM_HINT_T0);
            if (++pc == pf_period)
                pc = 0;
        }
        __m512bh xv[MR];
        for (int i = 0; i < mr; i++)
            xv[i] = cpm_bh_load((const uint16_t *)XROW(i));
        for (int j = 0; j < nr; j++) {
            __m512bh wv = w_bf16(f16, (const uint16_t *)WROW(j), (__mmask32)~0u);
            __asm__("" : "+v"(wv)); /* one load in a register: GCC would fold it into mr ops */
            for (int i = 0; i < mr; i++)
                acc[i * nr + j] = _mm512_dpbf16_ps(acc[i * nr + j], xv[i], wv);
        }
    }
    if (k < K) {
        __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1);
        for (int i = 0; i < mr; i++) {
            __m512bh xv = cpm_bh_load((const uint16_t *)XROW(i));
            for (int j = 0; j < nr; j++)
                acc[i * nr + j] = _mm512_dpbf16_ps(acc[i * nr + j], xv,
                                                   w_bf16(f16, (const uint16_t *)WROW(j), mk));
        }
    }
#undef WROW
#undef XROW
    if (mr * nr < 8) { /* a few sums (rows at the end of a range): one at a time */
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                y[(size_t)i * ldy + j] = reduce16(acc[i * nr + j]);
        return;
    }
    float sums[MR * NR + 16];
    cpm_reduce16_many_avx512(acc, mr * nr, sums);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = sums[i * nr + j];
}

/* W rows [n, n + nr) as bf16 into a panel interleaved by 32-wide chunk. */
INLINE void copy_panel(const int f16, uint16_t *dst, const cpm_mm_job *job, int n, int nr) {
    const int K = job->K;
    for (int j = 0; j < nr; j++) {
        const uint16_t *row = (const uint16_t *)job->w + (size_t)(n + j) * job->w_ld;
        uint16_t *d = dst + j * 32;
        int k = 0;
        for (; k + 32 <= K; k += 32, d += nr * 32)
            _mm512_storeu_si512(d, (__m512i)w_bf16(f16, row + k, (__mmask32)~0u));
        if (k < K)
            _mm512_storeu_si512(d, (__m512i)w_bf16(f16, row + k,
                                                   (__mmask32)((1ull << (K - k)) - 1)));
    }
}

/* x rows [m0, m1) against W rows [n, n + nr); the first x tile prefetches
 * the W rows that follow (a literal flag: the loop is compiled without it). */
INLINE void direct_rows(const int f16, const int nr, const cpm_mm_job *job, int m0, int m1, int n,
                        const bool prefetch) {
    const size_t Kp = (size_t)((job->K + 31) & ~31), w_ld = (size_t)job->w_ld;
    const size_t ldy = (size_t)job->ldy;
    const uint16_t *xp = (const uint16_t *)job->packed, *w = (const uint16_t *)job->w + n * w_ld;
    const int tiles = (m1 - m0) / MR;
    int m = m0;
    for (int t = 0; t < tiles; t++, m += MR)
        if (prefetch)
            tile_direct(f16, MR, nr, xp + m * Kp, Kp, w, w_ld, job->K, job->y + m * ldy + n, ldy,
                        tiles, t);
        else
            tile_direct(f16, MR, nr, xp + m * Kp, Kp, w, w_ld, job->K, job->y + m * ldy + n, ldy,
                        0, 0);
    for (; m < m1; m++)
        tile_direct(f16, 1, nr, xp + m * Kp, Kp, w, w_ld, job->K, job->y + m * ldy + n, ldy,
                    prefetch && tiles == 0 && m == m0, 0);
}

/* Decode (one x row) streams DEC_ROWS W rows a step; small batches take NR
 * rows a step, the last rows short of a step 4, 2 and 1 at a time. */
INLINE void run_direct(const int f16, const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    int n = n0;
    if (m1 - m0 == 1) {
        for (; n + DEC_ROWS <= n1; n += DEC_ROWS)
            direct_rows(f16, DEC_ROWS, job, m0, m1, n, true);
        for (; n < n1; n++)
            direct_rows(f16, 1, job, m0, m1, n, true);
        return;
    }
    for (; n + NR <= n1; n += NR)
        direct_rows(f16, NR, job, m0, m1, n, true);
    if (n + 4 <= n1)
        direct_rows(f16, 4, job, m0, m1, n, false), n += 4;
    if (n + 2 <= n1)
        direct_rows(f16, 2, job, m0, m1, n, false), n += 2;
    if (n < n1)
        direct_rows(f16, 1, job, m0, m1, n, false);
}

INLINE void run_panels(const int f16, const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    const size_t Kp = (size_t)((job->K + 31) & ~31), ldy = (size_t)job->ldy;
    const size_t panel = Kp * NR;
    const int rows = (int)(GROUP_HALFS / Kp) / NR * NR;
    if (rows < NR) {
        run_direct(f16, job, m0, m1, n0, n1);
        return;
    }
    _Static_assert(GROUP_HALFS * sizeof(uint16_t) <= 256 * 1024, "group fits the stack");
    uint16_t group[GROUP_HALFS] __attribute__((aligned(64)));
    const uint16_t *xp = (const uint16_t *)job->packed;
    for (int n = n0; n < n1; n += rows) {
        const int nrows = n1 - n < rows ? n1 - n : rows;
        for (int j = 0; j < nrows; j += NR)
            copy_panel(f16, group + j / NR * panel, job, n + j, nrows - j < NR ? nrows - j : NR);
        cpm_bf16dot_group(xp, Kp, m0, m1, group, nrows, job->y + n, ldy);
    }
}

void cpm_mm_bf16x(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    const bool f16 = job->wtype == CPM_DTYPE_F16, direct = m1 - m0 <= DIRECT_M;
    if (f16 && direct)
        run_direct(1, job, m0, m1, n0, n1);
    else if (f16)
        run_panels(1, job, m0, m1, n0, n1);
    else if (direct)
        run_direct(0, job, m0, m1, n0, n1);
    else
        run_panels(0, job, m0, m1, n0, n1);
}
