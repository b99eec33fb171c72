/* matmul_q8.c - int8 weights with a scale per 32: quantizing at load, the
 * scalar kernel (the f32 order of matmul_q8.h, lane by lane), the reference,
 * and the call path (x rounded for the bf16 mode, output rows over the threads).
 */
#include "matmul_q8.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "matmul_internal.h"
#include "matmul_q8_internal.h"
#include "split.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS)
#define X86_KERNELS 1
#else
#define X86_KERNELS 0
#endif

#define LANES 16

static size_t q8_blocks(const cpm_q8 *w) { return (size_t)w->Kp / CPM_Q8_BLOCK; }

/* One block of up to 32 weights (n of them) into q[32] and its scale. */
static float quantize_block(const float *v, int n, int8_t *q) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++)
        if (isfinite(v[i]) && fabsf(v[i]) > amax)
            amax = fabsf(v[i]);
    float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < CPM_Q8_BLOCK; i++) {
        float r = i < n && isfinite(v[i]) ? nearbyintf(v[i] * inv) : 0.0f;
        q[i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r);
    }
    return s;
}

cpm_q8 *cpm_q8_from(const void *w, cpm_dtype wtype, int N, int K, int ld) {
    if (N < 1 || K < 1 || ld < K)
        return NULL;
    cpm_q8 *q = calloc(1, sizeof *q);
    float *row = malloc(sizeof(float) * (size_t)K);
    if (!q || !row)
        goto fail;
    q->N = N, q->K = K, q->Kp = (K + CPM_Q8_BLOCK - 1) / CPM_Q8_BLOCK * CPM_Q8_BLOCK;
    size_t qbytes = (size_t)N * (size_t)q->Kp, sbytes = (size_t)N * q8_blocks(q) * sizeof(float);
    q->q = aligned_alloc(64, (qbytes + 63) & ~(size_t)63);
    q->scale = aligned_alloc(64, (sbytes + 63) & ~(size_t)63);
    if (!q->q || !q->scale)
        goto fail;
    for (int n = 0; n < N; n++) {
        cpm_dtype_to_f32(row, (const char *)w + (size_t)n * (size_t)ld * cpm_dtype_size(wtype),
                         wtype, (size_t)K);
        for (int b = 0; b < q->Kp / CPM_Q8_BLOCK; b++) {
            int k0 = b * CPM_Q8_BLOCK, len = K - k0 < CPM_Q8_BLOCK ? K - k0 : CPM_Q8_BLOCK;
            q->scale[(size_t)n * q8_blocks(q) + (size_t)b] =
                quantize_block(row + k0, len, q->q + (size_t)n * (size_t)q->Kp + (size_t)k0);
        }
    }
    free(row);
    return q;
fail:
    free(row);
    cpm_q8_free(q);
    return NULL;
}

void cpm_q8_free(cpm_q8 *w) {
    if (!w)
        return;
    free(w->q);
    free(w->scale);
    free(w);
}

size_t cpm_q8_bytes(const cpm_q8 *w) {
    return (size_t)w->N * ((size_t)w->Kp + q8_blocks(w) * sizeof(float));
}

/* The f32 order lane by lane: per block, A[l] = fma(x[k0 + 16 + l], q, fma(x[k0 + l], q, 0)),
 * T[l] = fma(A[l], s, T[l]); then the tree. x past K reads as 0. */
void cpm_q8_mm_scalar(const cpm_q8_job *job, int m0, int m1, int n0, int n1) {
    const cpm_q8 *w = job->w;
    for (int m = m0; m < m1; m++) {
        const float *x = job->x + (size_t)m * job->ldx;
        for (int n = n0; n < n1; n++) {
            const int8_t *q = w->q + (size_t)n * (size_t)w->Kp;
            const float *s = w->scale + (size_t)n * q8_blocks(w);
            float T[LANES] = {0};
            for (int k0 = 0; k0 < w->Kp; k0 += CPM_Q8_BLOCK) {
                for (int l = 0; l < LANES; l++) {
                    float a = 0.0f;
                    for (int h = 0; h < 2; h++) {
                        int k = k0 + h * LANES + l;
                        a = fmaf(k < w->K ? x[k] : 0.0f, (float)q[k], a);
                    }
                    T[l] = fmaf(a, s[k0 / CPM_Q8_BLOCK], T[l]);
                }
            }
            job->y[(size_t)m * job->ldy + n] = cpm_mm_tree16(T);
        }
    }
}

void cpm_matmul_q8_ref(float *y, int ldy, const float *x, int ldx, const cpm_q8 *w, int M) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < w->N; n++) {
            double acc = 0;
            for (int k = 0; k < w->K; k++)
                acc += (double)x[(size_t)m * ldx + k] * (double)w->q[(size_t)n * w->Kp + k] *
                       (double)w->scale[(size_t)n * q8_blocks(w) + (size_t)k / CPM_Q8_BLOCK];
            y[(size_t)m * ldy + n] = (float)acc;
        }
}

/* ---- the call path ---- */

typedef struct q8_run {
    cpm_q8_job job;
    cpm_q8_kernel kernel;
    bool dynamic;
    cpm_split dyn;
} q8_run;

static void q8_worker(void *arg, int tid, int nt) {
    q8_run *r = arg;
    int lo, hi;
    if (r->dynamic) {
        while (cpm_split_next(&r->dyn, tid, &lo, &hi))
            r->kernel(&r->job, 0, r->job.M, lo, hi);
        return;
    }
    cpm_split_static(r->job.w->N, 16, tid, nt, &lo, &hi);
    if (lo < hi)
        r->kernel(&r->job, 0, r->job.M, lo, hi);
}

#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
static void pack_worker(void *arg, int tid, int nt) {
    const q8_run *r = arg;
    int lo, hi;
    cpm_split_static(r->job.M, 1, tid, nt, &lo, &hi);
    cpm_q8_bf16x_pack(&r->job, lo, hi);
}
#endif

/* x rounded to bf16 into job's buffer: packed for VDPBF16PS (job->xh), or as
 * f32 rows of K for the f32 kernels, which then read it as their x. */
static void round_x(cpm_pool *pool, q8_run *r, void *buf, bool dot) {
    const cpm_q8 *w = r->job.w;
    if (!dot) {
        float *xr = buf;
        for (int m = 0; m < r->job.M; m++)
            for (int k = 0; k < w->K; k++)
                xr[(size_t)m * w->K + k] =
                    cpm_bf16_to_f32(cpm_f32_to_bf16(r->job.x[(size_t)m * r->job.ldx + k]));
        r->job.x = xr;
        r->job.ldx = (size_t)w->K;
        return;
    }
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
    r->job.xh = buf;
    r->kernel = cpm_q8_mm_bf16x;
    if (r->job.M <= 4) /* decode rows: not worth waking the threads for */
        cpm_q8_bf16x_pack(&r->job, 0, r->job.M);
    else
        cpm_pool_run(pool, pack_worker, r);
#else
    (void)pool;
#endif
}

static cpm_q8_kernel f32_kernel(void) {
#if X86_KERNELS
    if (cpm_isa_in_effect() >= CPM_ISA_AVX512)
        return cpm_q8_mm_avx512;
    if (cpm_isa_in_effect() == CPM_ISA_AVX2)
        return cpm_q8_mm_avx2;
#endif
    return cpm_q8_mm_scalar;
}

void cpm_matmul_q8(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_q8 *w,
                   int M, bool act_bf16) {
    if (M <= 0)
        return;
    int nt = cpm_pool_size(pool);
    q8_run r = {.job = {.w = w, .x = x, .ldx = (size_t)ldx, .y = y, .ldy = (size_t)ldy, .M = M},
                .kernel = f32_kernel()};
    void *owned = NULL;
    if (act_bf16) {
        bool dot = false;
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
        dot = cpm_isa_in_effect() >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
#endif
        size_t bytes = dot ? (size_t)M * (size_t)w->Kp * sizeof(uint16_t)
                           : (size_t)M * (size_t)w->K * sizeof(float);
        void *buf = cpm_pool_buffer(pool, bytes, &owned);
        if (!buf) {
            cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
            return;
        }
        round_x(pool, &r, buf, dot);
    }
    r.dynamic = cpm_split_dynamic(M, nt);
    if (r.dynamic)
        cpm_split_init(&r.dyn, w->N, 16, nt, CPM_SPLIT_CHUNKS);
    cpm_pool_run(pool, q8_worker, &r);
    free(owned);
}
