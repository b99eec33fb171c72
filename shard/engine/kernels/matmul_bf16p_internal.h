/* matmul_bf16p_internal.h - the contract between matmul_bf16p.c (repack,
 * threads, the scalar order) and its VDPBF16PS kernel file. */
#ifndef CPM_MATMUL_BF16P_INTERNAL_H
#define CPM_MATMUL_BF16P_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "matmul_bf16p.h"

typedef struct cpm_bf16p_job {
    const cpm_bf16p *w;
    const uint16_t *xh; /* x rounded to bf16: [M][xs], zero past K */
    size_t xs;          /* K rounded up to 32 */
    float *y;
    size_t ldy;
    int M;
} cpm_bf16p_job;

/* Every row of y against panels [p0, p1) of job->w. */
typedef void (*cpm_bf16p_kernel)(const cpm_bf16p_job *job, int p0, int p1);

void cpm_bf16p_mm_scalar(const cpm_bf16p_job *job, int p0, int p1);
void cpm_bf16p_mm_avx512(const cpm_bf16p_job *job, int p0, int p1);
/* Rows [m0, m1) of x (K wide, stride ldx) rounded into xh (stride xs). */
void cpm_bf16p_round_avx512(const float *x, size_t ldx, int K, uint16_t *xh, size_t xs, int m0,
                            int m1);

#endif
