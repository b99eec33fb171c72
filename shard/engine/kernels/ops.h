/* ops.h - the small element-wise and per-row kernels of a transformer layer.
 *
 * Pure functions over f32 arrays (weights may be any cpm_dtype); they know
 * nothing of models. Costs are O(n) per row, so clarity wins over SIMD here:
 * loops are written so the compiler vectorises them.
 */
#ifndef CPM_OPS_H
#define CPM_OPS_H

#include <stddef.h>

#include "dtype.h"

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i < n. out may alias x. */
void cpm_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

/* Rotate-half (NeoX) RoPE on one head vector v of rotary width d (even):
 * pairs (i, i + d/2) rotate by the angle whose cos/sin are cs[i], sn[i], i < d/2. */
void cpm_rope_neox(float *v, int d, const float *cs, const float *sn);

/* x[i] = e^(x[i] - shift), vectorised (within 2 ulp of expf; arguments below -87.3
 * give 0). Attention turns a block of scores into weights with it. */
void cpm_exp_shifted(float *x, int n, float shift);

/* In-place softmax over n values (max-subtracted, f32). */
void cpm_softmax(float *x, int n);

/* g[i] = silu(g[i]) * u[i]. */
void cpm_silu_mul(float *g, const float *u, int n);

/* g[i] = (g[i] > threshold ? g[i] : 0) * u[i]  (MiniCPM-S gated FATReLU). */
void cpm_fatrelu_mul(float *g, const float *u, int n, float threshold);

/* y[i] += a * x[i]. */
void cpm_axpy(float *y, float a, const float *x, int n);

/* y[i] *= a. */
void cpm_scale(float *y, float a, int n);

/* Dot product of two f32 vectors. */
float cpm_dot(const float *a, const float *b, int n);

/* Attention over a block of rows, one call instead of one per row:
 * scores[j] = dot(q, rows + j*stride, n) * scale, j < nb (each dot summed as cpm_dot does);
 * acc[i] += sum over j of p[j] * rows[j*stride + i], rows added in order j = 0, 1, ... */
void cpm_dot_rows(float *scores, const float *q, const float *rows, int stride, int nb, int n,
                  float scale);
void cpm_axpy_rows(float *acc, const float *p, const float *rows, int stride, int nb, int n);

/* Row conversions for an f16 KV cache: exact widening, round-to-nearest-even
 * narrowing. F16C instructions when the CPU has them (checked at run time). */
void cpm_f16_to_f32_row(float *dst, const uint16_t *src, int n);
void cpm_f32_to_f16_row(uint16_t *dst, const float *src, int n);

#endif
