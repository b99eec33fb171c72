/* matmul_t2.c - ternary weights: recognising and packing them, the reference kernel,
 * and the threaded dispatch (see matmul_t2.h for the layout and the precision). */
#include "matmul_t2.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "matmul.h"
#include "matmul_t2_internal.h"

#if defined(CPM_HAVE_X86_KERNELS) && (defined(__x86_64__) || defined(_M_X64))
#define X86_KERNELS 1
#else
#define X86_KERNELS 0
#endif

/* ---- packing ---- */

/* Row n's scale when every value is 0 or ±a (bit patterns compared: exact); -1 if not. */
static float row_scale(const uint16_t *row, int K) {
    uint16_t mag = 0; /* |a| as bf16 bits, 0 until the first non-zero */
    for (int k = 0; k < K; k++) {
        uint16_t v = row[k] & 0x7fff;
        if (v == 0)
            continue;
        if (!mag)
            mag = v;
        else if (v != mag)
            return -1.0f;
    }
    float a = cpm_bf16_to_f32(mag);
    return isfinite(a) ? a : -1.0f;
}

static void pack_row(const uint16_t *row, int K, uint32_t *words) {
    for (int k = 0; k < K; k++) {
        if (!(row[k] & 0x7fff))
            continue;
        uint32_t bit = 1u << (k % 16);
        words[k / 16] |= row[k] & 0x8000 ? bit << 16 : bit;
    }
}

int cpm_t2_from_bf16(const uint16_t *w, int N, int K, int ld, cpm_t2 **ret) {
    *ret = NULL;
    if (N < 1 || K < 1 || ld < K)
        return 1;
    for (int n = 0; n < N; n++) /* a cheap refusal: real weights fail in the first row */
        if (row_scale(w + (size_t)n * (size_t)ld, K) < 0)
            return 1;
    cpm_t2 *t = calloc(1, sizeof *t);
    int G = (K + 15) / 16;
    if (t) {
        t->codes = calloc((size_t)N * (size_t)G, sizeof *t->codes);
        t->scale = malloc((size_t)N * sizeof *t->scale);
    }
    if (!t || !t->codes || !t->scale) {
        cpm_t2_free(t);
        return -1;
    }
    *t = (cpm_t2){.N = N, .K = K, .G = G, .codes = t->codes, .scale = t->scale};
    for (int n = 0; n < N; n++) {
        const uint16_t *row = w + (size_t)n * (size_t)ld;
        t->scale[n] = row_scale(row, K);
        pack_row(row, K, t->codes + (size_t)n * (size_t)G);
    }
    *ret = t;
    return 0;
}

void cpm_t2_free(cpm_t2 *w) {
    if (!w)
        return;
    free(w->codes);
    free(w->scale);
    free(w);
}

size_t cpm_t2_bytes(const cpm_t2 *w) {
    return (size_t)w->N * ((size_t)w->G * sizeof(uint32_t) + sizeof(float));
}

void cpm_t2_dequant_row(const cpm_t2 *w, int n, float *out) {
    const uint32_t *words = w->codes + (size_t)n * (size_t)w->G;
    for (int k = 0; k < w->K; k++) {
        uint32_t word = words[k / 16], bit = 1u << (k % 16);
        out[k] = word & bit ? w->scale[n] : word & (bit << 16) ? -w->scale[n] : 0.0f;
    }
}

/* ---- the reference ---- */

/* 16 lanes folded 8+8, 4+4, 2+2, 1+1: what _mm512 code does with its halves. */
static float fold16(float l[16]) {
    for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; i++)
            l[i] += l[i + width];
    return l[0];
}

void cpm_t2_mm_scalar(const cpm_t2 *w, float *y, size_t ldy, const float *x, size_t ldx, int m0,
                      int m1, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        const uint32_t *words = w->codes + (size_t)n * (size_t)w->G;
        for (int m = m0; m < m1; m++) {
            const float *xm = x + (size_t)m * ldx;
            float lane[16] = {0};
            for (int g = 0; g < w->G; g++) {
                uint32_t word = words[g];
                for (int i = 0; i < 16 && word; i++) {
                    if (word & (1u << i))
                        lane[i] += xm[g * 16 + i];
                    if (word & (1u << (16 + i)))
                        lane[i] -= xm[g * 16 + i];
                }
            }
            y[(size_t)m * ldy + (size_t)n] = w->scale[n] * fold16(lane);
        }
    }
}

void cpm_matmul_t2_ref(float *y, int ldy, const float *x, int ldx, const cpm_t2 *w, int M) {
    cpm_t2_mm_scalar(w, y, (size_t)ldy, x, (size_t)ldx, 0, M, 0, w->N);
}

/* ---- threads ---- */

typedef struct t2_run {
    const cpm_t2 *w;
    float *y;
    size_t ldy, ldx;
    const float *x;
    int M;
    cpm_t2_kernel kernel;
} t2_run;

/* Each thread takes a contiguous share of the output rows (it streams their codes once). */
static void t2_worker(void *arg, int tid, int nt) {
    const t2_run *r = arg;
    long N = r->w->N;
    int lo = (int)(N * tid / nt), hi = (int)(N * (tid + 1) / nt);
    if (lo < hi)
        r->kernel(r->w, r->y, r->ldy, r->x, r->ldx, 0, r->M, lo, hi);
}

static cpm_t2_kernel pick_kernel(void) {
#if X86_KERNELS
    if (cpm_isa_in_effect() >= CPM_ISA_AVX512)
        return cpm_t2_mm_avx512;
#endif
    return cpm_t2_mm_scalar;
}

void cpm_matmul_t2(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_t2 *w,
                   int M) {
    if (M <= 0)
        return;
    t2_run r = {.w = w, .y = y, .ldy = (size_t)ldy, .ldx = (size_t)ldx, .x = x, .M = M,
                .kernel = pick_kernel()};
    cpm_pool_run(pool, t2_worker, &r);
}
