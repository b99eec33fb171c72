/* matmul_bf16p_avx512.c - x rounded to bf16 times panel-packed bf16 weights
 * (matmul_bf16p.h) with VDPBF16PS; compiled with -mavx512bf16 only here.
 *
 * A tile is up to 6 x rows by one panel (4 vectors of 16 outputs): per pair
 * of k, 4 loads of W, 6 broadcasts of x, 24 VDPBF16PS into 24 accumulators.
 *
 * One or a few rows (decode) run each tile over the whole of K: the panel is
 * one sequential stream and the hardware prefetcher keeps ahead of it. With
 * more rows, a tile over all of K would read the panel from DRAM in its
 * first tile (faster than DRAM gives it: the core waits) and from cache in the
 * others (no reads: DRAM idles). So K is cut in blocks of BLOCK_PAIRS pairs
 * (16 KiB of panel, in L1); every tile of the rows runs over a block, keeping
 * its sums in a small buffer between blocks (the same operations in the same
 * order: the same bits), and each tile prefetches its share of the block that
 * comes next, spread over its steps. Measured on the 1B's projections, 16 rows,
 * 2 threads (Zen 5): 0.66 of the time of the row-major kernel
 * (matmul_bf16x_avx512.c), where a whole-K tile order measured 0.86-0.98.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "bf16dot_avx512.h"
#include "matmul_bf16p_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define COLS CPM_BF16P_COLS
#define TILE_ROWS 6
#define BLOCK_PAIRS 64 /* pairs of k per block: 16 KiB of panel */
#define GROUP_ROWS 60  /* rows whose sums a block keeps (15 KiB): 10 tiles */
#define BLOCKED_MIN 6  /* from this many rows on, K is cut in blocks */

/* Rows of acc (R x 64 floats, 64-byte aligned) += x rows [R] · panel pairs
 * [q0, q1); zero first when first. Prefetches pf_lines lines from pf, two
 * per step while any are left. */
INLINE void tile(const int R, const uint16_t *x, size_t xs, const uint16_t *panel, int q0, int q1,
                 float *acc_io, bool first, const char *pf, int pf_lines) {
    __m512 acc[TILE_ROWS][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++)
            acc[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_io + r * COLS + v * 16);
    const int32_t *xp = (const int32_t *)x; /* a pair of bf16 as one 32-bit lane */
    const size_t xs2 = xs / 2;
    const uint16_t *p = panel + (size_t)q0 * COLS * 2;
    for (int q = q0; q < q1; q++, p += COLS * 2) {
        if (pf_lines > 0) {
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + 64, _MM_HINT_T0);
            pf += 128;
            pf_lines -= 2;
        }
        __m512bh w0 = (__m512bh)_mm512_load_si512(p), w1 = (__m512bh)_mm512_load_si512(p + 32);
        __m512bh w2 = (__m512bh)_mm512_load_si512(p + 64), w3 = (__m512bh)_mm512_load_si512(p + 96);
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[(size_t)r * xs2 + (size_t)q]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xb);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xb);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++)
            _mm512_store_ps(acc_io + r * COLS + v * 16, acc[r][v]);
}

/* tile() with R a literal (each size compiled with its registers). */
static void tile_any(int R, const uint16_t *x, size_t xs, const uint16_t *panel, int q0, int q1,
                     float *acc_io, bool first, const char *pf, int pf_lines) {
    switch (R) {
    case 6: tile(6, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    case 5: tile(5, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    case 4: tile(4, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    case 3: tile(3, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    case 2: tile(2, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    default: tile(1, x, xs, panel, q0, q1, acc_io, first, pf, pf_lines); break;
    }
}

/* Rows [m0, m1) (at most GROUP_ROWS) against one panel; sums into acc. next:
 * the panel bytes this thread reads after these rows, prefetched during the
 * last block. */
static void group_rows(const cpm_bf16p_job *job, const uint16_t *panel, int m0, int m1,
                       float *acc, const char *next) {
    const int Q = job->w->Q, rows = m1 - m0;
    const int block = rows < BLOCKED_MIN ? Q : BLOCK_PAIRS;
    const int tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    for (int q0 = 0; q0 < Q; q0 += block) {
        const int q1 = Q - q0 < block ? Q : q0 + block;
        const char *pf = q1 < Q ? (const char *)(panel + (size_t)q1 * COLS * 2) : next;
        const int lines = rows < BLOCKED_MIN ? 0 : (q1 - q0) * 4; /* the next block's */
        for (int t = 0; t < tiles; t++) {
            const int r0 = t * TILE_ROWS, R = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;
            const int a = lines * t / tiles, b = lines * (t + 1) / tiles;
            tile_any(R, job->xh + (size_t)(m0 + r0) * job->xs, job->xs, panel, q0, q1,
                     acc + (size_t)r0 * COLS, q0 == 0, pf + (size_t)a * 64, b - a);
        }
    }
}

void cpm_bf16p_mm_avx512(const cpm_bf16p_job *job, int p0, int p1) {
    const cpm_bf16p *w = job->w;
    const size_t panel_halfs = (size_t)w->Q * COLS * 2;
    float acc[GROUP_ROWS * COLS] __attribute__((aligned(64)));
    for (int p = p0; p < p1; p++) {
        const uint16_t *panel = w->data + (size_t)p * panel_halfs;
        const int n0 = p * COLS, cols = w->N - n0 < COLS ? w->N - n0 : COLS;
        for (int m0 = 0; m0 < job->M; m0 += GROUP_ROWS) {
            const int m1 = job->M - m0 < GROUP_ROWS ? job->M : m0 + GROUP_ROWS;
            /* after the last rows, the next panel; else this one again (from cache) */
            const char *next = (const char *)(m1 < job->M ? panel : panel + panel_halfs);
            group_rows(job, panel, m0, m1, acc, next);
            for (int m = m0; m < m1; m++) {
                float *y = job->y + (size_t)m * job->ldy + n0;
                const float *a = acc + (size_t)(m - m0) * COLS;
                for (int c = 0; c < cols; c += 16) {
                    const int n = cols - c < 16 ? cols - c : 16;
                    _mm512_mask_storeu_ps(y + c, (__mmask16)((1u << n) - 1), _mm512_load_ps(a + c));
                }
            }
        }
    }
}

void cpm_bf16p_round_avx512(const float *x, size_t ldx, int K, uint16_t *xh, size_t xs, int m0,
                            int m1) {
    for (int m = m0; m < m1; m++)
        cpm_bf16dot_round_row(x + (size_t)m * ldx, K, xh + (size_t)m * xs);
}
