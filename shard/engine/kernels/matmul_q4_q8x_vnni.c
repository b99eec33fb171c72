/* matmul_q4_q8x_vnni.c - int4 weights times int8 x on AVX-512 VNNI
 * (VPDPBUSD): the fast kernel of cpm_matmul_q4_q8x, bit for bit the portable
 * one (matmul_q4_q8x.c; the q8x order of matmul_q4_internal.h). Compiled with
 * -mavx512vnni only here.
 *
 * A step of one weight row is one 64-byte load: AND 0x0f gives the low
 * nibbles as unsigned bytes, a 16-bit shift and the same AND the high ones;
 * two VPDPBUSD against the step's int8 x give the 16 lanes' exact dots. Each
 * loaded step meets every x row of the tile while it is in registers, so
 * decode streams the nibbles once and a batch reuses them MR times. Batches
 * go through x in chunks that stay in L2 (CHUNK_M rows).
 */
#include <immintrin.h>
#include <string.h>

#include "matmul_q4_internal.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 4       /* x rows per tile */
#define NR 4       /* weight rows per tile */
#define CHUNK_M 32 /* x rows whose steps stay in L2 while the weight rows go by */

typedef struct q8x_ctx {
    const cpm_q4 *w;
    int steps;          /* per group */
    int blocks;         /* per group */
    size_t per_row;     /* steps per x row */
    size_t row_bytes;   /* nibble bytes per weight row */
} q8x_ctx;

/* ---- x into steps: the bytes of cpm_q4_q8x_pack (matmul_q4_q8x.c) ---- */

/* One block of 32 packed positions into slot b of st: CVTPS2DQ rounds to
 * nearest even, as the portable code's round_even does. */
INLINE void quantize_block(const float *x, cpm_q4_xstep *st, int b) {
    const __m512 sign = _mm512_set1_ps(-0.0f), inf = _mm512_set1_ps(__builtin_inff());
    __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    __m512 aa = _mm512_andnot_ps(sign, a), ca = _mm512_andnot_ps(sign, c);
    __mmask16 finite = _mm512_cmp_ps_mask(aa, inf, _CMP_LT_OQ) &
                       _mm512_cmp_ps_mask(ca, inf, _CMP_LT_OQ);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ca));
    float scale = amax / 127.0f;
    __m128i qa = _mm_setzero_si128(), qc = _mm_setzero_si128();
    if (finite != 0xffff) {
        scale = __builtin_nanf("");
    } else if (amax > 0.0f) {
        __m512 inv = _mm512_set1_ps(127.0f / amax);
        qa = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)));
        qc = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(c, inv)));
    }
    _mm_storeu_si128((__m128i *)(st->lo + 16 * b), qa);
    _mm_storeu_si128((__m128i *)(st->hi + 16 * b), qc);
    _mm_storeu_ps(st->scale + 4 * b, _mm_set1_ps(scale));
}

/* The lanes' sums of the 8 int8 values each meets, once the step is filled. */
INLINE void step_sums(cpm_q4_xstep *st) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(st->lo));
    d = _mm512_dpbusd_epi32(d, ones, _mm512_loadu_si512(st->hi));
    _mm512_storeu_ps(st->sum, _mm512_cvtepi32_ps(d));
}

void cpm_q4_q8x_pack_vnni(const cpm_q4_job *job, int m0, int m1) {
    const cpm_q4 *w = job->w;
    const int steps = cpm_q4_q8x_steps(w->gp), blocks = w->gp / CPM_Q4_BLOCK;
    const size_t per_row = (size_t)w->G * (size_t)steps;
    for (int m = m0; m < m1; m++) {
        const float *x = job->x + (size_t)m * job->ldx;
        cpm_q4_xstep *out = job->xq + (size_t)m * per_row;
        for (int g = 0; g < w->G; g++) {
            for (int s = 0; s < steps; s++) {
                cpm_q4_xstep *st = out + (size_t)g * (size_t)steps + (size_t)s;
                const int nb = blocks - 4 * s < 4 ? blocks - 4 * s : 4;
                if (nb < 4)
                    memset(st, 0, sizeof *st);
                for (int b = 0; b < nb; b++)
                    quantize_block(x + (size_t)g * (size_t)w->gp + (size_t)(4 * s + b) * CPM_Q4_BLOCK,
                                   st, b);
                step_sums(st);
            }
        }
    }
}

/* ---- the kernel ---- */

/* Bytes of step st that hold blocks of the group (the rest reads as zero). */
INLINE __mmask64 step_mask(const q8x_ctx *c, int st) {
    int b = c->blocks - 4 * st;
    return b >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * b)) - 1);
}

/* y[i, j] for i < mr x rows (their steps per_row apart), j < nr weight rows from n. */
INLINE void tile(const int mr, const int nr, const q8x_ctx *c, const cpm_q4_xstep *x, int n,
                 float *y, size_t ldy) {
    const cpm_q4 *w = c->w;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        __m512 zf[NR], sv[NR];
        for (int j = 0; j < nr; j++) {
            size_t at = (size_t)(n + j) * (size_t)w->G + (size_t)g;
            zf[j] = _mm512_set1_ps((float)w->zero[at]);
            sv[j] = _mm512_set1_ps(w->scale[at]);
        }
        for (int st = 0; st < c->steps; st++) {
            const __mmask64 mask = step_mask(c, st);
            const cpm_q4_xstep *xs = x + (size_t)g * (size_t)c->steps + (size_t)st;
            const size_t off = ((size_t)g * (size_t)w->gp + (size_t)st * CPM_Q4_Q8X_STEP) / 2;
            for (int j = 0; j < nr; j++) {
                const uint8_t *b = w->nib + (size_t)(n + j) * c->row_bytes + off;
                /* rows lie end to end: fetch well ahead of a short row's end */
                _mm_prefetch((const char *)b + 8192, _MM_HINT_T0);
                __m512i v = _mm512_maskz_loadu_epi8(mask, b);
                __m512i lo = _mm512_and_si512(v, low4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < mr; i++) {
                    const cpm_q4_xstep *xi = xs + (size_t)i * c->per_row;
                    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                                    _mm512_loadu_si512(xi->lo));
                    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xi->hi));
                    __m512 t = _mm512_fnmadd_ps(zf[j], _mm512_loadu_ps(xi->sum),
                                                _mm512_cvtepi32_ps(d));
                    acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(t, _mm512_loadu_ps(xi->scale)),
                                                sv[j], acc[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + j] = cpm_reduce16_avx512(acc[i][j]);
}

/* x rows [m, m + mr) against weight rows [n, n + NR). */
INLINE void tile_rows(const q8x_ctx *c, const cpm_q4_job *job, int m, int mr, int n) {
    const cpm_q4_xstep *x = job->xq + (size_t)m * c->per_row;
    float *y = job->y + (size_t)m * job->ldy + n;
    switch (mr) { /* constant tile sizes: the accumulators stay in registers */
    case 4: tile(4, NR, c, x, n, y, job->ldy); break;
    case 3: tile(3, NR, c, x, n, y, job->ldy); break;
    case 2: tile(2, NR, c, x, n, y, job->ldy); break;
    default: tile(1, NR, c, x, n, y, job->ldy); break;
    }
}

void cpm_q4_mm_q8x_vnni(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    const int steps = cpm_q4_q8x_steps(job->w->gp);
    const q8x_ctx c = {.w = job->w, .steps = steps, .blocks = job->w->gp / CPM_Q4_BLOCK,
                       .per_row = (size_t)job->w->G * (size_t)steps,
                       .row_bytes = (size_t)job->w->Kp / 2};
    for (int mc = m0; mc < m1; mc += CHUNK_M) {
        const int mc1 = m1 - mc < CHUNK_M ? m1 : mc + CHUNK_M;
        int n = n0;
        for (; n + NR <= n1; n += NR)
            for (int m = mc; m < mc1; m += MR)
                tile_rows(&c, job, m, mc1 - m < MR ? mc1 - m : MR, n);
        for (; n < n1; n++)
            for (int m = mc; m < mc1; m++)
                tile(1, 1, &c, job->xq + (size_t)m * c.per_row, n,
                     job->y + (size_t)m * job->ldy + n, job->ldy);
    }
}
