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

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "pool.h"

typedef enum cpm_isa {
    CPM_ISA_SCALAR = 0,
    CPM_ISA_AVX2 = 1,
    CPM_ISA_AVX512 = 2,
    CPM_ISA_AMX = 3, /* AVX-512 + AMX-BF16 tiles; AMX serves BF16 weights only */
} cpm_isa;

/* The best ISA this CPU supports (detected once, cached). */
cpm_isa cpm_isa_detect(void);

/* Overrides the ISA used by cpm_matmul (for tests and benchmarks); an ISA the
 * CPU lacks is clamped to the best supported one. Returns the ISA in effect. */
cpm_isa cpm_isa_force(cpm_isa isa);

const char *cpm_isa_name(cpm_isa isa);

/* The ISA cpm_matmul uses now: the forced one, else the detected one (other
 * kernels, such as matmul_q4, follow it too). */
cpm_isa cpm_isa_in_effect(void);

/* "scalar", "avx2", "avx512", "amx" → *ret; false for any other name. Lets a
 * command line or a cluster file pin every node to the same kernels, since
 * bit-identical results across ISAs are not guaranteed (AMX vs the others). */
bool cpm_isa_from_name(const char *name, cpm_isa *ret);

/* y[M, N] = x[M, K] * W[N, K]^T. ldx/ldy are row strides of x and y in floats
 * (>= K and >= N). w_ld is the row stride of W in elements (>= K). pool may be NULL.
 *
 * Determinism: for a given ISA, y[m, n] depends only on row m of x and row n of
 * W - never on M, on the row's place in the batch, on N or on the thread count -
 * bit for bit, because every element is summed in one fixed order (see
 * matmul_internal.h). SCALAR, AVX2 and AVX512 share that order and agree bit
 * for bit with each other; so, for F32 and F16 weights, does AMX. With BF16
 * weights the AMX kernel splits x into three bf16 terms (x = x1 + x2 + x3
 * exactly, so every product is still the exact f32 x times w) and sums in
 * another fixed order: equally deterministic, but its last bits differ from
 * the other ISAs. Force one ISA on every node that must agree with another.
 *
 * With AMX and BF16 weights x is packed into a buffer taken from
 * cpm_pool_scratch (or, with no pool, allocated per call); if that allocation
 * fails, y is filled with NaN. */
void cpm_matmul(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K);

/* One output of cpm_matmul_multi: y[M, N] (row stride ldy) = x * W^T, with W
 * [N, K] of type wtype and row stride w_ld, as in cpm_matmul. */
typedef struct cpm_matmul_out {
    float *y;
    int ldy;
    const void *w;
    cpm_dtype wtype;
    int w_ld;
    int N;
} cpm_matmul_out;

/* Several weight matrices applied to the same x[M, K] (q/k/v, gate/up): every
 * outs[i].y gets exactly the bits a separate cpm_matmul would give it. With
 * AMX and BF16 weights x is split and packed once for all of them and the
 * threads share the outputs' combined N; otherwise it is one cpm_matmul per
 * output. No y may overlap x or another y. */
void cpm_matmul_multi(cpm_pool *pool, const float *x, int ldx, int M, int K,
                      const cpm_matmul_out *outs, int n_outs);

/* Whether this CPU has the AVX-512 BF16 dot product (VDPBF16PS) and this
 * build carries the kernel that uses it. */
bool cpm_cpu_has_bf16_dot(void);

/* Whether this CPU has the AVX-512 int8 dot product (VPDPBUSD, AVX512_VNNI)
 * and this build carries the kernel that uses it. */
bool cpm_cpu_has_int8_dot(void);

/* The opt-in "bf16 activations" precision, BF16 or F16 weights (wtype): y =
 * bf16(x) * W^T, each x rounded to the nearest bf16 first (as llama.cpp's BF16
 * path does), products summed in f32. With VDPBF16PS (cpm_cpu_has_bf16_dot, and
 * AVX-512 or better in effect) it runs at about twice the f32 FMA rate, F16
 * weights rounded to bf16 too (nothing multiplies f16 faster on these CPUs);
 * on AVX2 or scalar x is rounded and the FMA kernels run on the weights as
 * stored (for BF16 the same products, another summation order: last bits
 * differ); on AMX, BF16 weights take the exact AMX path (faster still, and
 * exact). A row's bits depend only on its x row and W, as for cpm_matmul.
 * Rounding x costs accuracy (docs/KERNELS.md has the measured error). The
 * rounded x lives in cpm_pool_scratch (or per call without a pool); if it
 * cannot be had, y is filled with NaN. */
void cpm_matmul_bf16x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                      const uint16_t *w, cpm_dtype wtype, int w_ld, int M, int N, int K);

/* cpm_matmul_bf16x for several weights applied to the same x (q/k/v, gate/up):
 * x rounded once, one parallel section over the outputs' combined rows; every
 * outs[i].y gets exactly the bits a separate cpm_matmul_bf16x would give it
 * (and the same NaN fill when no buffer can be had). No y may overlap x or
 * another y. */
void cpm_matmul_bf16x_multi(cpm_pool *pool, const float *x, int ldx, int M, int K,
                            const cpm_matmul_out *outs, int n_outs);

/* Single-threaded reference implementation (tests compare against it). */
void cpm_matmul_ref(float *y, int ldy, const float *x, int ldx,
                    const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K);

#endif
