/* matmul_q8_internal.h - the contract between matmul_q8.c (quantize, threads)
 * and its AVX-512 kernel files. */
#ifndef CPM_MATMUL_Q8_INTERNAL_H
#define CPM_MATMUL_Q8_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "matmul_q8.h"

typedef struct cpm_q8_job {
    const cpm_q8 *w;
    const float *x;     /* f32 kernels: [M][ldx] */
    size_t ldx;
    const uint16_t *xh; /* bf16 kernel: x rounded, [M][Kp], zero-padded */
    float *y;
    size_t ldy;
    int M;
} cpm_q8_job;

/* y[m, n], m in [m0, m1), n in [n0, n1). */
typedef void (*cpm_q8_kernel)(const cpm_q8_job *job, int m0, int m1, int n0, int n1);

void cpm_q8_mm_scalar(const cpm_q8_job *job, int m0, int m1, int n0, int n1);
void cpm_q8_mm_avx2(const cpm_q8_job *job, int m0, int m1, int n0, int n1);
void cpm_q8_mm_avx512(const cpm_q8_job *job, int m0, int m1, int n0, int n1);
void cpm_q8_mm_bf16x(const cpm_q8_job *job, int m0, int m1, int n0, int n1);
/* Rows [m0, m1) of job->x rounded to bf16 into job->xh (VDPBF16PS builds). */
void cpm_q8_bf16x_pack(const cpm_q8_job *job, int m0, int m1);

#endif
