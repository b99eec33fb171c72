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
};

/* ---- int8 activations (cpm_matmul_q4_q8x) ----
 *
 * x in packed order is quantized per block of 32 positions (scale = max|x| /
 * 127, q8 = x / scale rounded to nearest even) and laid out in steps: a step is
 * up to 4 blocks of one group, the positions one 64-byte load of nibbles holds
 * (a group of gp positions takes cpm_q4_q8x_steps(gp) steps; blocks past the
 * group's end are zero). Slot b of a step holds its block's positions 0..15 at
 * lo[16b..], 16..31 at hi[16b..], matching the low and high nibbles of the
 * weight bytes 16b.. . A 32-bit lane l of the step (bytes 4l..4l+3, block l/4)
 * carries that block's scale. Per group, S_g = Σ over its blocks b in order of
 * fma(scale_b, T_b, S) with T_b the (exact) sum of block b's int8 values: what
 * the zero point multiplies.
 *
 * Summation order (the "q8x order"), shared by every ISA: for output (m, n),
 * A[16] = 0; for each group g (scale s) and each step in order, per lane:
 * d = Σ of the lane's 8 products q·q8 (an exact int32), A = fma(d · scale, s, A).
 * Then C[16] = 0; for each group g (zero z, scale s): C[g mod 16] =
 * fma(z · s, S_g, C[g mod 16]). y = the 16-lane tree of matmul_internal.h over
 * A − C. Integer dots make the order inside a lane free, and taking the zero
 * point out once per group (not per lane) keeps it out of the inner loop; the
 * cancellation it risks is far below the int8 rounding of x. */
#define CPM_Q4_Q8X_STEP 128 /* positions per step */

typedef struct cpm_q4_xstep {
    int8_t lo[64];
    int8_t hi[64];
    float scale[16];
} cpm_q4_xstep;

static inline int cpm_q4_q8x_steps(int gp) {
    return (gp + CPM_Q4_Q8X_STEP - 1) / CPM_Q4_Q8X_STEP;
}

typedef struct cpm_q4_job {
    const cpm_q4 *w;
    const float *x;   /* [M][ldx] in packed order: Kp floats per row, zero in the padding */
    size_t ldx;
    float *y;
    size_t ldy;
    int M;
    float *panels;    /* per thread cpm_q4_panel_floats(Kp) floats (prefill), or NULL */
    uint16_t *xh;     /* bf16 activations: x rounded to bf16, [M][Kp] (cpm_q4_bf16x_pack) */
    cpm_q4_xstep *xq; /* int8 activations: [M][G · cpm_q4_q8x_steps(gp)] (cpm_q4_q8x_pack) */
    float *xz;        /* int8 activations: [M][G], S_g of each x row */
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

/* int8 activations: rows [m0, m1) of job->x (packed order) quantized into
 * job->xq and job->xz; then the kernels, all giving the same bits (the VNNI
 * one needs AVX-512 VNNI, cpm_cpu_has_int8_dot). */
void cpm_q4_q8x_pack(const cpm_q4_job *job, int m0, int m1);
void cpm_q4_q8x_pack_vnni(const cpm_q4_job *job, int m0, int m1); /* the same bytes */
void cpm_q4_mm_q8x_scalar(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_q8x_avx2(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);
void cpm_q4_mm_q8x_vnni(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel);

#endif
