/* matmul_q4_q8x.c - int4 weights times x quantized to int8: the opt-in
 * "int8 activations" precision of cpm_matmul_q4_q8x (matmul_q4.h), the way
 * llama.cpp's Q4_0 meets Q8_0. Here: quantizing x into the step layout of
 * matmul_q4_internal.h, and the portable kernel every vector one must match
 * bit for bit (the q8x order).
 *
 * Why it is fast: a weight's nibble is an unsigned byte after one AND or one
 * shift, and VPDPBUSD takes 64 byte products per instruction with no table
 * and no shuffle; the scale and zero point are applied once per 16 lanes per
 * step. The bf16 path needs a widening and a table permute per 32 weights.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "matmul_internal.h"
#include "matmul_q4_internal.h"

/* v rounded to the nearest integer, ties to even, for |v| < 2^22: adding and
 * taking away 1.5 · 2^23 leaves no fraction bits (what CVTPS2DQ does). */
static inline float round_even(float v) {
    return (v + 0x1.8p23f) - 0x1.8p23f;
}

/* One block of 32 packed positions into slot b of a step; returns the sum of
 * its int8 values. */
static int quantize_block(const float *x, cpm_q4_xstep *st, int b) {
    float amax = 0.0f;
    bool finite = true;
    for (int j = 0; j < CPM_Q4_BLOCK; j++) {
        float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
        finite = finite && isfinite(x[j]);
    }
    int8_t q[CPM_Q4_BLOCK] = {0};
    float scale = amax / 127.0f;
    if (!finite) {
        scale = NAN; /* a NaN or inf in x: the outputs say so */
    } else if (amax > 0.0f) {
        float inv = 127.0f / amax; /* |x · inv| ≤ 127 within an ulp: rounds into range */
        for (int j = 0; j < CPM_Q4_BLOCK; j++)
            q[j] = (int8_t)round_even(x[j] * inv);
    }
    memcpy(st->lo + 16 * b, q, 16);
    memcpy(st->hi + 16 * b, q + 16, 16);
    int sum = 0;
    for (int j = 0; j < CPM_Q4_BLOCK; j++)
        sum += q[j];
    for (int l = 4 * b; l < 4 * b + 4; l++)
        st->scale[l] = scale;
    return sum;
}

/* x (packed order, Kp floats) into G · steps steps and G sums S_g. */
static void quantize_row(const cpm_q4 *w, const float *x, cpm_q4_xstep *out, float *xz) {
    const int steps = cpm_q4_q8x_steps(w->gp), blocks = w->gp / CPM_Q4_BLOCK;
    memset(out, 0, (size_t)w->G * (size_t)steps * sizeof *out);
    for (int g = 0; g < w->G; g++) {
        float S = 0.0f;
        for (int k = 0; k < blocks; k++) {
            cpm_q4_xstep *st = out + (size_t)g * (size_t)steps + (size_t)(k / 4);
            int T = quantize_block(x + (size_t)g * (size_t)w->gp + (size_t)k * CPM_Q4_BLOCK, st,
                                   k % 4);
            S = fmaf(st->scale[4 * (k % 4)], (float)T, S);
        }
        xz[g] = S;
    }
}

void cpm_q4_q8x_pack(const cpm_q4_job *job, int m0, int m1) {
    const size_t per_row = (size_t)job->w->G * (size_t)cpm_q4_q8x_steps(job->w->gp);
    for (int m = m0; m < m1; m++)
        quantize_row(job->w, job->x + (size_t)m * job->ldx, job->xq + (size_t)m * per_row,
                     job->xz + (size_t)m * (size_t)job->w->G);
}

/* One output: weight row n against x row m's steps and sums, in the q8x order. */
static float dot_row(const cpm_q4 *w, const cpm_q4_xstep *x, const float *xz, int n) {
    const int steps = cpm_q4_q8x_steps(w->gp), blocks = w->gp / CPM_Q4_BLOCK;
    const uint8_t *row = w->nib + (size_t)n * (size_t)(w->Kp / 2);
    const float *scale = w->scale + (size_t)n * (size_t)w->G;
    const uint8_t *zero = w->zero + (size_t)n * (size_t)w->G;
    float acc[16] = {0}, corr[16] = {0};
    for (int g = 0; g < w->G; g++) {
        for (int st = 0; st < steps; st++) {
            const cpm_q4_xstep *xs = x + (size_t)g * (size_t)steps + (size_t)st;
            const uint8_t *nib = row + ((size_t)g * (size_t)w->gp + (size_t)st * CPM_Q4_Q8X_STEP) / 2;
            const int lanes = 4 * (blocks - 4 * st < 4 ? blocks - 4 * st : 4);
            for (int l = 0; l < 16; l++) {
                int32_t d = 0;
                for (int i = 4 * l; i < 4 * l + 4 && l < lanes; i++)
                    d += (nib[i] & 15) * xs->lo[i] + (nib[i] >> 4) * xs->hi[i];
                acc[l] = fmaf((float)d * xs->scale[l], scale[g], acc[l]);
            }
        }
    }
    for (int g = 0; g < w->G; g++)
        corr[g % 16] = fmaf((float)zero[g] * scale[g], xz[g], corr[g % 16]);
    for (int l = 0; l < 16; l++)
        acc[l] -= corr[l];
    return cpm_mm_tree16(acc);
}

void cpm_q4_mm_q8x_scalar(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    (void)panel;
    const size_t per_row = (size_t)job->w->G * (size_t)cpm_q4_q8x_steps(job->w->gp);
    for (int m = m0; m < m1; m++)
        for (int n = n0; n < n1; n++)
            job->y[(size_t)m * job->ldy + (size_t)n] =
                dot_row(job->w, job->xq + (size_t)m * per_row, job->xz + (size_t)m * job->w->G, n);
}
