/* matmul_q4_internal.h - the repacked int4 layout and the contract between
 * matmul_q4.c (repack, dispatch, threading) and the per-ISA kernel files,
 * which all instantiate matmul_q4_tmpl.h with their own vector primitives.
 *
 * Layout: a group's gs columns occupy gp = gs rounded up to 32 positions of
 * the packed row (padding holds q = 0 and meets x = 0, adding nothing). Positions
 * come in blocks of 32 stored in 16 bytes: byte j holds position j in its low
 * nibble and position 16 + j in its high one, so one 16-byte load widens to
 * two 16-lane vectors without shuffles.
 *
 * Summation order (the "q4 canonical order"), shared by every ISA: for output
 * (m, n), T[16] = 0; for each group g in order, A[16] = 0, then for each block
 * of 16 positions p in order, A[j] = fma(x[p + j], q[p + j] − z, A[j]); then
 * T[j] = fma(s[g], A[j], T[j]). y = the 16-lane tree of matmul_internal.h over
 * T. Subtracting z in integers first (exact) rather than z·Σx afterwards
 * avoids cancelling two large sums, so the result is as close to the f32
 * dequantized matmul as the BF16 path is to its own.
 */
#ifndef CPM_MATMUL_Q4_INTERNAL_H
#define CPM_MATMUL_Q4_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "matmul_q4.h"

#define CPM_Q4_BLOCK 32  /* positions per 16-byte block */
#define CPM_Q4_NR_MAX 4  /* most weight rows any kernel dequantizes into a panel */
#define CPM_Q4_GROUP_FLOATS (64 * 1024) /* weight rows widened at once: 256 KiB, in L2 */

/* Floats of one thread's prefill panels: a group of rows, at least CPM_Q4_NR_MAX. */
static inline size_t cpm_q4_panel_floats(int Kp) {
    size_t min = (size_t)CPM_Q4_NR_MAX * (size_t)Kp;
    return min > CPM_Q4_GROUP_FLOATS ? min : CPM_Q4_GROUP_FLOATS;
}

struct cpm_q4 {
    int N, K;
    int G;            /* groups */
    int gs;           /* columns per group */
    int gp;           /* gs rounded up to CPM_Q4_BLOCK */
    int Kp;           /* G * gp: positions per packed row */
    uint8_t *nib;     /* [N][Kp / 2] */
    float *scale;     /* [N][G] */
    uint8_t *zero;    /* [N][G] effective zero point, 0..16 */
    int32_t *src_k;   /* [G * gs] original column of each sorted position; NULL = identity */
    int gather;       /* x must be permuted or padded into packed order before the kernel */
    int panels;       /* cpm_q4_to_panels ran: the panel layout, cpm_matmul_q4_q8x only */
};

/* ---- int8 activations (cpm_matmul_q4_q8x): the panel layout ----
 *
 * cpm_q4_to_panels rewrites a weight for this kernel: rows in panels of 32 (N
 * padded with zero rows). For panel P and block k of the packed row (positions
 * 32k..32k+31), 512 bytes in 8 chunks of 64: chunk c holds, in byte 4r + i
 * (r < 16, i < 4), position 32k + 4c + i of row 32P + r in the low nibble and
 * of row 32P + 16 + r in the high one. AND 0x0f makes 16 rows' 4 positions the
 * unsigned bytes VPDPBUSD takes (32-bit lane r = row r), a shift and the AND
 * the other 16 rows', and both meet one broadcast of the same 4 int8 x values:
 * 64 products per instruction, no shuffle, one x load per 128 products, and a
 * panel is one forward stream. scale and zero become [P][G][32].
 *
 * x in packed order is quantized per block of 32 positions (xs = max|x| / 127,
 * q8 = x / xs rounded to nearest even), and per group S_g = Σ over its blocks
 * in order of fma(xs_k, T_k, S), T_k the exact sum of block k's q8.
 *
 * Summation order (the "q8x order"), every ISA and batch: for output (m, n),
 * A = 0; for each group g (scale s, zero z) and each of its blocks k in order,
 * d = Σ of the block's 32 products q·q8 (an exact int32) and A = fma(d · xs_k,
 * s, A); then C = 0 and for each group C = fma(z · s, S_g, C); y = A − C.
 * Taking the zero point out once per group keeps it out of the inner loop; the
 * cancellation it risks is far below the int8 rounding of x. */
#define CPM_Q4_PANEL 32 /* weight rows per panel: two zmm of 32-bit lanes */

/* In a panel-layout weight: q of row n at packed position p, and the index of
 * (row n, group g) in scale and zero. */
int cpm_q4_panel_q(const cpm_q4 *w, int n, int p);
size_t cpm_q4_panel_meta(const cpm_q4 *w, int n, int g);

typedef struct cpm_q4_job {
    const cpm_q4 *w;
    const float *x;   /* [M][ldx] in packed order: Kp floats per row, zero in the padding */
    size_t ldx;
    float *y;
    size_t ldy;
    int M;
    float *panels;    /* per thread cpm_q4_panel_floats(Kp) floats (prefill), or NULL */
    uint16_t *xh;     /* bf16 activations: x rounded to bf16, [M][Kp] (cpm_q4_bf16x_pack) */
    int8_t *x8;       /* int8 activations (cpm_q4_q8x_pack): [M][Kp] q8 in packed order, */
    float *xs;        /* [M][Kp / 32] block scales, */
    float *xz;        /* [M][G] S_g */
} cpm_q4_job;

/* y[m, n] for m in [m0, m1), n in [n0, n1); panel is this thread's (may be NULL:
 * then every row decodes straight from the nibbles, same bits, slower). */
typedef void (*cpm_q4_kernel)(const cpm_q4_job *job, int m0, int m1, int n0, int n1,
                              float *panel);

void cpm_q4_mm_scalar(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_avx2(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_avx512(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);

/* bf16 activations on VDPBF16PS (matmul_q4_bf16x_avx512.c): rows [m0, m1) of
 * job->x (packed order) rounded into job->xh, then the kernel over job->xh;
 * its panels hold bf16, two per float of the thread's panel buffer. */
void cpm_q4_bf16x_pack(const cpm_q4_job *job, int m0, int m1);
void cpm_q4_mm_bf16x(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);

/* Block k (32 packed positions) of x, a row in the checkpoint's column order:
 * x itself where no gathering is needed, else gathered into tmp (act-order
 * columns by src_k, a group's padding as zeros). */
static inline const float *cpm_q4_x_block(const cpm_q4 *w, const float *x, size_t k, float *tmp) {
    if (!w->gather)
        return x + k * CPM_Q4_BLOCK;
    const size_t bpg = (size_t)w->gp / CPM_Q4_BLOCK, g = k / bpg; /* a block lies in one group */
    const size_t i0 = (k % bpg) * CPM_Q4_BLOCK, gs = (size_t)w->gs;
    const size_t n = i0 >= gs ? 0 : gs - i0 < CPM_Q4_BLOCK ? gs - i0 : CPM_Q4_BLOCK;
    const size_t sp = g * gs + i0;
    if (w->src_k)
        for (size_t j = 0; j < n; j++)
            tmp[j] = x[w->src_k[sp + j]];
    else
        memcpy(tmp, x + sp, n * sizeof *tmp);
    for (size_t j = n; j < CPM_Q4_BLOCK; j++)
        tmp[j] = 0.0f; /* the group's padding */
    return tmp;
}

/* One block of 32 f32 into q8 and its scale; returns the sum of q8. */
typedef int (*cpm_q4_quantize_fn)(const float *x, int8_t *q, float *ret_scale);

/* Rows [m0, m1) of job->x into job->x8, xs, xz with quantize (the portable or
 * the AVX-512 one: the same bytes); S_g in block order, as the q8x order says. */
static inline __attribute__((always_inline)) void
cpm_q4_q8x_pack_with(const cpm_q4_job *job, int m0, int m1, cpm_q4_quantize_fn quantize) {
    const cpm_q4 *w = job->w;
    const size_t Kp = (size_t)w->Kp, nb = Kp / CPM_Q4_BLOCK, bpg = (size_t)w->gp / CPM_Q4_BLOCK;
    for (int m = m0; m < m1; m++) {
        const float *x = job->x + (size_t)m * job->ldx;
        int8_t *q = job->x8 + (size_t)m * Kp;
        float *xs = job->xs + (size_t)m * nb, *xz = job->xz + (size_t)m * (size_t)w->G;
        for (int g = 0; g < w->G; g++) {
            float S = 0.0f;
            for (size_t k = (size_t)g * bpg; k < (size_t)(g + 1) * bpg; k++) {
                float tmp[CPM_Q4_BLOCK];
                int T = quantize(cpm_q4_x_block(w, x, k, tmp), q + k * CPM_Q4_BLOCK, &xs[k]);
                S = __builtin_fmaf(xs[k], (float)T, S);
            }
            xz[g] = S;
        }
    }
}

/* int8 activations: rows [m0, m1) of job->x (the caller's order) quantized into
 * job->x8, xs, xz; then the kernels over a panel-layout weight, all giving the
 * same bits (the VNNI one needs AVX-512 VNNI, cpm_cpu_has_int8_dot). n0 is a
 * multiple of CPM_Q4_PANEL. */
void cpm_q4_q8x_pack(const cpm_q4_job *job, int m0, int m1);
void cpm_q4_q8x_pack_vnni(const cpm_q4_job *job, int m0, int m1); /* the same bytes */
void cpm_q4_mm_q8x_scalar(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_q8x_avx2(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_q8x_vnni(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);

#endif
