/* matmul_t2_internal.h - what the ternary kernels of each ISA share (matmul_t2.h). */
#ifndef CPM_MATMUL_T2_INTERNAL_H
#define CPM_MATMUL_T2_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

struct cpm_t2 {
    int N, K, G;       /* G = ceil(K / 16) words per row */
    uint32_t *codes;   /* [N, G]: low 16 bits +1, high 16 bits −1 */
    float *scale;      /* [N] */
};

/* Rows [n0, n1) of y = x·Wᵀ for rows [m0, m1) of x. */
typedef void (*cpm_t2_kernel)(const struct cpm_t2 *w, float *y, size_t ldy, const float *x,
                              size_t ldx, int m0, int m1, int n0, int n1);

void cpm_t2_mm_scalar(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                      int m0, int m1, int n0, int n1);
void cpm_t2_mm_avx512(const struct cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx,
                      int m0, int m1, int n0, int n1);

#endif
