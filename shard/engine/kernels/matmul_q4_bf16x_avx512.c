/* matmul_q4_bf16x_avx512.c - int4 weights times x rounded to bf16 on
 * VDPBF16PS: the opt-in "bf16 activations" precision of cpm_matmul_q4_bf16x
 * (matmul_q4.h). Compiled with -mavx512bf16 only here.
 *
 * Each weight is taken as bf16((q − z) · s): per weight row and group, a
 * 32-entry table of those values (entry i for q = i mod 16) turns a 16-byte
 * block of nibbles into 32 bf16 weights with one widening, one shift and one
 * word permute, so decode streams the nibbles and does 32 products per
 * instruction. Prefill writes the same bf16 weights into L2-sized panels once
 * per group of rows and runs the shared 4x6 tile of bf16dot_avx512.h. Both
 * paths feed one accumulator per output in position order (the order of
 * bf16dot_avx512.h over the packed positions), so a row's bits never depend
 * on its batch or its thread.
 *
 * Rounding the weight (8 significant bits; (q − z) alone has at most 5) costs
 * about what rounding x does, and keeps the per-group scale out of the inner
 * loop: a tile needs no second set of accumulators.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "bf16dot_avx512.h"
#include "matmul_q4_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define MR CPM_BF16DOT_MR
#define NR CPM_BF16DOT_NR
#define DEC_ROWS 4  /* weight rows per step of the direct path */
#define DIRECT_M 16 /* up to this many x rows the nibbles are read in place */

/* Entry i: bf16(((i mod 16) − z) · s), rounded from the f32 product. */
INLINE __m512i q4_table(int z, float s) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps((float)z)), _mm512_set1_ps(s));
    return (__m512i)_mm512_cvtne2ps_pbh(f, f);
}

/* The 32 positions of a 16-byte block (byte j: position j low, 16 + j high)
 * as bf16 weights in position order. vpermw reads the low 5 bits of each
 * word: a low-half word is the whole byte, whose low 5 bits index the table's
 * low nibble copy (i mod 16); a high-half word is the byte shifted by 4. */
INLINE __m512bh q4_block(const uint8_t *p, __m512i table) {
    const __m512i shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                           0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
    __m512i b = _mm512_cvtepu8_epi16(
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)));
    return (__m512bh)_mm512_permutexvar_epi16(_mm512_srlv_epi16(b, shift), table);
}

INLINE const uint8_t *q4_row(const cpm_q4 *w, int n) {
    return w->nib + (size_t)n * (size_t)(w->Kp / 2);
}

INLINE __m512i q4_group_table(const cpm_q4 *w, int n, int g) {
    size_t at = (size_t)n * (size_t)w->G + (size_t)g;
    return q4_table(w->zero[at], w->scale[at]);
}

/* y[i, j] for i < mr rows of packed x (stride Kp), j < nr weight rows from n,
 * straight from the nibbles; each block is widened once for all mr rows. */
INLINE void tile_direct(const int mr, const int nr, const cpm_q4 *w, const uint16_t *x, int n,
                        float *y, size_t ldy) {
    const size_t Kp = (size_t)w->Kp;
    __m512 acc[MR][DEC_ROWS];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        __m512i table[DEC_ROWS];
        for (int j = 0; j < nr; j++)
            table[j] = q4_group_table(w, n + j, g);
        const size_t p0 = (size_t)g * (size_t)w->gp;
        for (size_t p = p0; p < p0 + (size_t)w->gp; p += CPM_Q4_BLOCK) {
            __m512bh xv[MR];
            for (int i = 0; i < mr; i++)
                xv[i] = cpm_bh_load(x + (size_t)i * Kp + p);
            for (int j = 0; j < nr; j++) {
                const uint8_t *b = q4_row(w, n + j) + p / 2;
                /* rows lie end to end: fetch well ahead of a short row's end */
                _mm_prefetch((const char *)b + 8192, _MM_HINT_T0);
                __m512bh wv = q4_block(b, table[j]);
                for (int i = 0; i < mr; i++)
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = cpm_reduce16_avx512(acc[i][j]);
}

/* x rows [m, m + mr) against weight rows [n, n + DEC_ROWS). */
INLINE void tile_rows(const cpm_q4_job *job, int m, int mr, int n) {
    const uint16_t *x = job->xh + (size_t)m * (size_t)job->w->Kp;
    float *y = job->y + (size_t)m * job->ldy + n;
    switch (mr) { /* constant tile sizes: the accumulators stay in registers */
    case 4: tile_direct(4, DEC_ROWS, job->w, x, n, y, job->ldy); break;
    case 3: tile_direct(3, DEC_ROWS, job->w, x, n, y, job->ldy); break;
    case 2: tile_direct(2, DEC_ROWS, job->w, x, n, y, job->ldy); break;
    default: tile_direct(1, DEC_ROWS, job->w, x, n, y, job->ldy); break;
    }
}

/* Each step of DEC_ROWS weight rows meets every x tile while its nibbles are
 * in L1, so the weight is streamed once for all the rows. */
static void run_direct(const cpm_q4_job *job, int m0, int m1, int n0, int n1) {
    const size_t Kp = (size_t)job->w->Kp;
    int n = n0;
    for (; n + DEC_ROWS <= n1; n += DEC_ROWS)
        for (int m = m0; m < m1; m += MR)
            tile_rows(job, m, m1 - m < MR ? m1 - m : MR, n);
    for (; n < n1; n++)
        for (int m = m0; m < m1; m++)
            tile_direct(1, 1, job->w, job->xh + (size_t)m * Kp, n,
                        job->y + (size_t)m * job->ldy + n, job->ldy);
}

/* Weight rows [n, n + nr) as bf16 into a panel interleaved by 32-wide chunk. */
static void fill_panel(uint16_t *dst, const cpm_q4 *w, int n, int nr) {
    const size_t step = (size_t)nr * 32; /* halves from one chunk of a row to its next */
    for (int j = 0; j < nr; j++) {
        const uint8_t *row = q4_row(w, n + j);
        uint16_t *d = dst + (size_t)j * 32;
        for (int g = 0; g < w->G; g++) {
            __m512i table = q4_group_table(w, n + j, g);
            const size_t p0 = (size_t)g * (size_t)w->gp;
            for (size_t p = p0; p < p0 + (size_t)w->gp; p += CPM_Q4_BLOCK)
                _mm512_storeu_si512(d + p / 32 * step, (__m512i)q4_block(row + p / 2, table));
        }
    }
}

static void run_panels(const cpm_q4_job *job, int m0, int m1, int n0, int n1, uint16_t *group) {
    const size_t Kp = (size_t)job->w->Kp, panel = Kp * NR;
    const int rows = (int)(cpm_q4_panel_floats(job->w->Kp) * 2 / Kp) / NR * NR;
    for (int n = n0; n < n1; n += rows) {
        const int nrows = n1 - n < rows ? n1 - n : rows;
        for (int j = 0; j < nrows; j += NR)
            fill_panel(group + (size_t)(j / NR) * panel, job->w, n + j,
                       nrows - j < NR ? nrows - j : NR);
        cpm_bf16dot_group(job->xh, Kp, m0, m1, group, nrows, job->y + n, job->ldy);
    }
}

void cpm_q4_bf16x_pack(const cpm_q4_job *job, int m0, int m1) {
    const size_t Kp = (size_t)job->w->Kp;
    for (int m = m0; m < m1; m++)
        cpm_bf16dot_round_row(job->x + (size_t)m * job->ldx, job->w->Kp,
                              job->xh + (size_t)m * Kp);
}

void cpm_q4_mm_bf16x(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    _Static_assert(CPM_Q4_BLOCK == 32, "a block is one 32-wide chunk");
    if (m1 - m0 <= DIRECT_M || !panel)
        run_direct(job, m0, m1, n0, n1);
    else
        run_panels(job, m0, m1, n0, n1, (uint16_t *)panel);
}
