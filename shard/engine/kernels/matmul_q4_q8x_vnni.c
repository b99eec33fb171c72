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
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "matmul_q4_internal.h"
#include "reduce_avx512.h"

#define INLINE static inline __attribute__((always_inline))

#define MR 4       /* x rows per tile */
#define NR 4       /* weight rows per tile */
#define CHUNK_M 32 /* x rows whose steps stay in L2 while the weight rows go by */
#define PRELOAD_M 2 /* up to this many x rows are held in registers through a step */

typedef struct q8x_ctx {
    const cpm_q4 *w;
    int steps;          /* per group */
    int blocks;         /* per group */
    size_t per_row;     /* steps per x row */
    size_t row_bytes;   /* nibble bytes per weight row */
} q8x_ctx;

/* ---- x into steps: the bytes of cpm_q4_q8x_pack (matmul_q4_q8x.c) ---- */

/* One block of 32 packed positions into slot b of st; returns the sum of its
 * int8 values. CVTPS2DQ rounds to nearest even, as the portable round_even. */
INLINE int quantize_block(const float *x, cpm_q4_xstep *st, int b) {
    const __m512 sign = _mm512_set1_ps(-0.0f), inf = _mm512_set1_ps(__builtin_inff());
    __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    __m512 aa = _mm512_andnot_ps(sign, a), ca = _mm512_andnot_ps(sign, c);
    __mmask16 finite = _mm512_cmp_ps_mask(aa, inf, _CMP_LT_OQ) &
                       _mm512_cmp_ps_mask(ca, inf, _CMP_LT_OQ);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ca));
    float scale = amax / 127.0f;
    __m512i qa = _mm512_setzero_si512(), qc = _mm512_setzero_si512();
    if (finite != 0xffff) {
        scale = __builtin_nanf("");
    } else if (amax > 0.0f) {
        __m512 inv = _mm512_set1_ps(127.0f / amax);
        qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
        qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, inv));
    }
    _mm_storeu_si128((__m128i *)(st->lo + 16 * b), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(st->hi + 16 * b), _mm512_cvtsepi32_epi8(qc));
    _mm_storeu_ps(st->scale + 4 * b, _mm_set1_ps(scale));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
}

void cpm_q4_q8x_pack_vnni(const cpm_q4_job *job, int m0, int m1) {
    const cpm_q4 *w = job->w;
    const int steps = cpm_q4_q8x_steps(w->gp), blocks = w->gp / CPM_Q4_BLOCK;
    const size_t per_row = (size_t)w->G * (size_t)steps;
    for (int m = m0; m < m1; m++) {
        const float *x = job->x + (size_t)m * job->ldx;
        cpm_q4_xstep *out = job->xq + (size_t)m * per_row;
        float *xz = job->xz + (size_t)m * (size_t)w->G;
        for (int g = 0; g < w->G; g++) {
            float S = 0.0f;
            for (int k = 0; k < blocks; k++) {
                cpm_q4_xstep *st = out + (size_t)g * (size_t)steps + (size_t)(k / 4);
                if (k % 4 == 0 && blocks - k < 4)
                    memset(st, 0, sizeof *st); /* a step the group does not fill */
                int T = quantize_block(x + (size_t)g * (size_t)w->gp + (size_t)k * CPM_Q4_BLOCK,
                                       st, k % 4);
                S = fmaf(st->scale[4 * (k % 4)], (float)T, S);
            }
            xz[g] = S;
        }
    }
}

/* ---- the kernel ---- */

/* Bytes of step st that hold blocks of the group (the rest reads as zero). */
INLINE __mmask64 step_mask(const q8x_ctx *c, int st) {
    int b = c->blocks - 4 * st;
    return b >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * b)) - 1);
}

/* The zero points' share of y[i, j] (C of the q8x order), 16 groups a vector. */
INLINE __m512 zero_share(const cpm_q4 *w, int n, const float *xz) {
    __m512 C = _mm512_setzero_ps();
    const uint8_t *zero = w->zero + (size_t)n * (size_t)w->G;
    const float *scale = w->scale + (size_t)n * (size_t)w->G;
    for (int g = 0; g < w->G; g += 16) {
        const __mmask16 k = w->G - g >= 16 ? 0xffff : (__mmask16)((1u << (w->G - g)) - 1);
        __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, zero + g)));
        __m512 zs = _mm512_mul_ps(z, _mm512_maskz_loadu_ps(k, scale + g));
        C = _mm512_fmadd_ps(zs, _mm512_maskz_loadu_ps(k, xz + g), C);
    }
    return C;
}

/* y[i, j] for i < mr x rows (their steps per_row apart), j < nr weight rows from n. */
INLINE void tile(const int mr, const int nr, const q8x_ctx *c, const cpm_q4_xstep *x,
                 const float *xz, int n, float *y, size_t ldy) {
    const cpm_q4 *w = c->w;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < w->G; g++) {
        __m512 sv[NR];
        for (int j = 0; j < nr; j++)
            sv[j] = _mm512_set1_ps(w->scale[(size_t)(n + j) * (size_t)w->G + (size_t)g]);
        for (int st = 0; st < c->steps; st++) {
            const __mmask64 mask = step_mask(c, st);
            const cpm_q4_xstep *xs = x + (size_t)g * (size_t)c->steps + (size_t)st;
            const size_t off = ((size_t)g * (size_t)w->gp + (size_t)st * CPM_Q4_Q8X_STEP) / 2;
            /* x in registers across the weight rows: the 512-bit loads, not the
             * arithmetic, bound a decode step that reloads them per row */
            __m512i xl[PRELOAD_M], xh[PRELOAD_M];
            __m512 xsc[PRELOAD_M];
            for (int i = 0; i < mr && mr <= PRELOAD_M; i++) {
                xl[i] = _mm512_loadu_si512(xs[(size_t)i * c->per_row].lo);
                xh[i] = _mm512_loadu_si512(xs[(size_t)i * c->per_row].hi);
                xsc[i] = _mm512_loadu_ps(xs[(size_t)i * c->per_row].scale);
            }
            for (int j = 0; j < nr; j++) {
                const uint8_t *b = w->nib + (size_t)(n + j) * c->row_bytes + off;
                /* rows lie end to end: fetch well ahead of a short row's end */
                _mm_prefetch((const char *)b + 8192, _MM_HINT_T0);
                __m512i v = _mm512_maskz_loadu_epi8(mask, b);
                __m512i lo = _mm512_and_si512(v, low4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < mr; i++) {
                    const cpm_q4_xstep *xi = xs + (size_t)i * c->per_row;
                    const bool pre = mr <= PRELOAD_M;
                    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                                    pre ? xl[i] : _mm512_loadu_si512(xi->lo));
                    d = _mm512_dpbusd_epi32(d, hi, pre ? xh[i] : _mm512_loadu_si512(xi->hi));
                    __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(d),
                                             pre ? xsc[i] : _mm512_loadu_ps(xi->scale));
                    acc[i][j] = _mm512_fmadd_ps(u, sv[j], acc[i][j]);
                }
            }
        }
    }
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mr; i++) {
            __m512 C = zero_share(w, n + j, xz + (size_t)i * (size_t)w->G);
            y[(size_t)i * ldy + j] = cpm_reduce16_avx512(_mm512_sub_ps(acc[i][j], C));
        }
}

/* x rows [m, m + mr) against weight rows [n, n + NR). */
INLINE void tile_rows(const q8x_ctx *c, const cpm_q4_job *job, int m, int mr, int n) {
    const cpm_q4_xstep *x = job->xq + (size_t)m * c->per_row;
    const float *xz = job->xz + (size_t)m * (size_t)c->w->G;
    float *y = job->y + (size_t)m * job->ldy + n;
    switch (mr) { /* constant tile sizes: the accumulators stay in registers */
    case 4: tile(4, NR, c, x, xz, n, y, job->ldy); break;
    case 3: tile(3, NR, c, x, xz, n, y, job->ldy); break;
    case 2: tile(2, NR, c, x, xz, n, y, job->ldy); break;
    default: tile(1, NR, c, x, xz, n, y, job->ldy); break;
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
                tile(1, 1, &c, job->xq + (size_t)m * c.per_row,
                     job->xz + (size_t)m * (size_t)job->w->G, n,
                     job->y + (size_t)m * job->ldy + n, job->ldy);
    }
}
