/* matmul.h - the weight matmul every projection of the model goes through.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k]      (W stored [N, K] row-major, as HF nn.Linear)
 *
 * x and y are f32; W is F32, F16 or BF16; accumulation is in f32. M = 1 is the
 * decode case (matrix-vector, bound by memory bandwidth); M > 1 is prefill or a
 * batched decode step (matrix-matrix). The implementation is chosen at run time
 * from the CPU's features (AVX-512, AVX2+FMA+F16C, scalar) and split across the
 * pool's threads. Kernels know nothing of models.
 */
#ifndef CPM_MATMUL_H
#define CPM_MATMUL_H

#include <stddef.h>

#include "dtype.h"
#include "pool.h"

typedef enum cpm_isa {
    CPM_ISA_SCALAR = 0,
    CPM_ISA_AVX2 = 1,
    CPM_ISA_AVX512 = 2,
} cpm_isa;

/* The best ISA this CPU supports (detected once, cached). */
cpm_isa cpm_isa_detect(void);

/* Overrides the ISA used by cpm_matmul (for tests and benchmarks); an ISA the
 * CPU lacks is clamped to the best supported one. Returns the ISA in effect. */
cpm_isa cpm_isa_force(cpm_isa isa);

const char *cpm_isa_name(cpm_isa isa);

/* y[M, N] = x[M, K] * W[N, K]^T. ldx/ldy are row strides of x and y in floats
 * (>= K and >= N). w_ld is the row stride of W in elements (>= K). pool may be NULL. */
void cpm_matmul(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K);

/* Single-threaded reference implementation (tests compare against it). */
void cpm_matmul_ref(float *y, int ldy, const float *x, int ldx,
                    const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K);

#endif
