/* matmul_q4_q8x.c - int4 weights times x quantized to int8: the opt-in
 * "int8 activations" precision of cpm_matmul_q4_q8x (matmul_q4.h), the way
 * llama.cpp's Q4_0 meets Q8_0. Here: the panel layout (cpm_q4_to_panels),
 * quantizing x, and the portable kernel every vector one must match bit for
 * bit (the q8x order of matmul_q4_internal.h).
 *
 * Why it is fast: with 16 weight rows across the lanes, a nibble is an
 * unsigned byte after one AND or one shift, and VPDPBUSD does 64 byte products
 * per instruction against 4 broadcast x values, with no table and no shuffle;
 * scales apply once per block of 32 for 16 rows, the zero point once per
 * group. The bf16 path needs a widening and a table permute per 32 weights.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "matmul_q4_internal.h"

/* ---- the panel layout ---- */

/* Byte offset and shift of (row n, packed position p) in the panel layout. */
static size_t panel_at(const cpm_q4 *w, int n, int p, int *shift) {
    const int k = p / CPM_Q4_BLOCK, c = p % CPM_Q4_BLOCK / 4, i = p % 4, r = n % CPM_Q4_PANEL;
    *shift = r >= 16 ? 4 : 0;
    return (((size_t)(n / CPM_Q4_PANEL) * (size_t)(w->Kp / CPM_Q4_BLOCK) + (size_t)k) * 8 +
            (size_t)c) * 64 + (size_t)(r % 16) * 4 + (size_t)i;
}

int cpm_q4_panel_q(const cpm_q4 *w, int n, int p) {
    int shift = 0;
    size_t at = panel_at(w, n, p, &shift); /* before shift is read: not in one expression */
    return (w->nib[at] >> shift) & 15;
}

size_t cpm_q4_panel_meta(const cpm_q4 *w, int n, int g) {
    return ((size_t)(n / CPM_Q4_PANEL) * (size_t)w->G + (size_t)g) * CPM_Q4_PANEL +
           (size_t)(n % CPM_Q4_PANEL);
}

int cpm_q4_to_panels(cpm_q4 *w) {
    if (w->panels)
        return 0;
    const size_t np = ((size_t)w->N + CPM_Q4_PANEL - 1) / CPM_Q4_PANEL;
    const size_t nib_bytes = np * CPM_Q4_PANEL * ((size_t)w->Kp / 2);
    const size_t meta = np * CPM_Q4_PANEL * (size_t)w->G;
    uint8_t *nib = NULL;
    if (posix_memalign((void **)&nib, 64, nib_bytes))
        return CPM_Q4_ENOMEM;
    float *scale = calloc(meta, sizeof *scale);
    uint8_t *zero = calloc(meta, 1);
    if (!scale || !zero) {
        free(nib);
        free(scale);
        free(zero);
        return CPM_Q4_ENOMEM;
    }
    memset(nib, 0, nib_bytes); /* padding rows: q = 0, scale 0 */
    cpm_q4 out = *w;
    out.nib = nib;
    out.scale = scale;
    out.zero = zero;
    out.panels = 1;
    const size_t nb = (size_t)w->Kp / CPM_Q4_BLOCK;
    for (int n = 0; n < w->N; n++) {
        for (size_t k = 0; k < nb; k++) {
            const uint8_t *rb = w->nib + (size_t)n * (size_t)(w->Kp / 2) + k * 16;
            int shift = 0;
            uint8_t *d = nib + panel_at(&out, n, (int)k * CPM_Q4_BLOCK, &shift);
            for (int p = 0; p < CPM_Q4_BLOCK; p++) /* chunk p / 4, byte p % 4 */
                d[64 * (p / 4) + p % 4] |= (uint8_t)((p < 16 ? rb[p] & 15 : rb[p - 16] >> 4) << shift);
        }
        for (int g = 0; g < w->G; g++) {
            scale[cpm_q4_panel_meta(&out, n, g)] = w->scale[(size_t)n * (size_t)w->G + (size_t)g];
            zero[cpm_q4_panel_meta(&out, n, g)] = w->zero[(size_t)n * (size_t)w->G + (size_t)g];
        }
    }
    free(w->nib);
    free(w->scale);
    free(w->zero);
    *w = out;
    return 0;
}

/* ---- x ---- */

/* v rounded to the nearest integer, ties to even, for |v| < 2^22: adding and
 * taking away 1.5 · 2^23 leaves no fraction bits (what CVTPS2DQ does; this
 * file is C17, so the compiler contracts nothing into an FMA). */
static inline float round_even(float v) {
    return (v + 0x1.8p23f) - 0x1.8p23f;
}

/* One block of 32 packed positions: q8 and the scale; returns the sum of q8. */
static int quantize_block(const float *x, int8_t *q, float *ret_scale) {
    float amax = 0.0f;
    bool finite = true;
    for (int j = 0; j < CPM_Q4_BLOCK; j++) {
        float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
        finite = finite && isfinite(x[j]);
    }
    memset(q, 0, CPM_Q4_BLOCK);
    float scale = amax / 127.0f;
    if (!finite) {
        scale = NAN; /* a NaN or inf in x: the outputs say so */
    } else if (amax > 0.0f) {
        float inv = 127.0f / amax; /* |x · inv| ≤ 127 within an ulp: rounds into range */
        for (int j = 0; j < CPM_Q4_BLOCK; j++)
            q[j] = (int8_t)round_even(x[j] * inv);
    }
    int sum = 0;
    for (int j = 0; j < CPM_Q4_BLOCK; j++)
        sum += q[j];
    *ret_scale = scale;
    return sum;
}

void cpm_q4_q8x_pack(const cpm_q4_job *job, int m0, int m1) {
    cpm_q4_q8x_pack_with(job, m0, m1, quantize_block);
}

/* ---- the portable kernel ---- */

/* One output: weight row n against x row m, in the q8x order. */
static float dot_row(const cpm_q4_job *job, int m, int n) {
    const cpm_q4 *w = job->w;
    const size_t Kp = (size_t)w->Kp, bpg = (size_t)w->gp / CPM_Q4_BLOCK;
    const int8_t *q8 = job->x8 + (size_t)m * Kp;
    const float *xs = job->xs + (size_t)m * (Kp / CPM_Q4_BLOCK);
    const float *xz = job->xz + (size_t)m * (size_t)w->G;
    float A = 0.0f, C = 0.0f;
    for (int g = 0; g < w->G; g++) {
        const float s = w->scale[cpm_q4_panel_meta(w, n, g)];
        for (size_t k = (size_t)g * bpg; k < (size_t)(g + 1) * bpg; k++) {
            int32_t d = 0;
            for (int j = 0; j < CPM_Q4_BLOCK; j++) {
                int p = (int)k * CPM_Q4_BLOCK + j;
                d += cpm_q4_panel_q(w, n, p) * q8[p];
            }
            A = fmaf((float)d * xs[k], s, A);
        }
    }
    for (int g = 0; g < w->G; g++) {
        size_t at = cpm_q4_panel_meta(w, n, g);
        C = fmaf((float)w->zero[at] * w->scale[at], xz[g], C);
    }
    return A - C;
}

void cpm_q4_mm_q8x_scalar(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    for (int m = m0; m < m1; m++)
        for (int n = n0; n < n1; n++)
            job->y[(size_t)m * job->ldy + (size_t)n] = dot_row(job, m, n);
}
