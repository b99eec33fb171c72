/* matmul_q4.c - int4 weights: the one-time repack from AutoGPTQ's or AutoAWQ's layout,
 * the scalar kernel (matmul_q4_tmpl.h over plain arrays), and the call path
 * every quantized projection takes: gather x into packed order when needed,
 * then split the output rows across the pool's threads.
 */
#include "matmul_q4.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "matmul_internal.h"
#include "matmul_q4_internal.h"
#include "split.h"

/* ---- the scalar kernel: the template over 16-float structs ---- */

typedef struct V {
    float v[16];
} V;
typedef int VZ;

#define INLINE static inline __attribute__((always_inline))

INLINE V v_zero(void) { return (V){{0}}; }
INLINE V v_load(const float *p) {
    V r;
    memcpy(r.v, p, sizeof r.v);
    return r;
}
INLINE V v_set1(float f) {
    V r;
    for (int j = 0; j < 16; j++)
        r.v[j] = f;
    return r;
}
INLINE void v_store(float *p, V v) { memcpy(p, v.v, sizeof v.v); }
INLINE V v_fma(V a, V b, V c) {
    for (int j = 0; j < 16; j++)
        c.v[j] = fmaf(a.v[j], b.v[j], c.v[j]);
    return c;
}
INLINE VZ vz_set1(int z) { return z; }
INLINE void v_nibbles(const uint8_t *p, VZ z, V *lo, V *hi) {
    for (int j = 0; j < 16; j++) {
        lo->v[j] = (float)((p[j] & 15) - z);
        hi->v[j] = (float)((p[j] >> 4) - z);
    }
}
INLINE float v_reduce(V a) {
    float r8[8], r4[4];
    for (int i = 0; i < 8; i++)
        r8[i] = a.v[i] + a.v[i + 8];
    for (int i = 0; i < 4; i++)
        r4[i] = r8[i] + r8[i + 4];
    return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

#define Q4_MR 2
#define Q4_NR 2
#define Q4_DEC 2
#define Q4_SMR 2
#define Q4_SDEC 1
#define Q4_SDEC2 1
#define Q4_SMALL_M 2
#define Q4_KERNEL cpm_q4_mm_scalar
#include "matmul_q4_tmpl.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS)
#define X86_KERNELS 1
#else
#define X86_KERNELS 0
#endif

/* ---- repack ---- */

static int nibble_at(const int32_t *packed, size_t word, int shift) {
    return (int)(((uint32_t)packed[word] >> shift) & 15u);
}

/* AutoAWQ packs columns 8c + {0,2,4,6,1,3,5,7} into nibble slots 0..7 of word
 * c (AWQ_ORDER in AutoAWQ's awq/utils/packing_utils.py and WQLinear_GEMM.
 * from_linear; its dequantize_gemm undoes it with AWQ_REVERSE_ORDER), so
 * column 8c + j sits in slot awq_slot[j]. */
static const int awq_slot[8] = {0, 4, 1, 5, 2, 6, 3, 7};

/* q of input column k, output row n. */
static int stored_q(const cpm_q4_gptq *s, int k, size_t n) {
    size_t N = (size_t)s->N;
    if (s->format == CPM_Q4_AWQ)
        return nibble_at(s->qweight, (size_t)k * (N / 8) + n / 8, 4 * awq_slot[n % 8]);
    return nibble_at(s->qweight, (size_t)(k / 8) * N + n, 4 * (k % 8));
}

/* stored zero of group g, output row n (before zero_offset). */
static int stored_zero(const cpm_q4_gptq *s, int g, size_t n) {
    size_t at = (size_t)g * ((size_t)s->N / 8) + n / 8;
    int slot = s->format == CPM_Q4_AWQ ? awq_slot[n % 8] : (int)(n % 8);
    return nibble_at(s->qzeros, at, 4 * slot);
}

/* Sorts the input columns by group (stable, so without act-order nothing
 * moves) after checking that each group holds exactly gs columns. */
static int sort_columns(const cpm_q4_gptq *s, cpm_q4 *w, int *ret_bad) {
    if (!s->g_idx)
        return 0;
    int *fill = calloc((size_t)w->G, sizeof *fill);
    w->src_k = malloc((size_t)s->K * sizeof *w->src_k);
    if (!fill || !w->src_k) {
        free(fill);
        return CPM_Q4_ENOMEM;
    }
    int rc = 0;
    for (int k = 0; k < s->K && !rc; k++) {
        int g = s->g_idx[k];
        if (g < 0 || g >= w->G)
            rc = CPM_Q4_EGIDX, *ret_bad = k;
        else if (fill[g] == w->gs)
            rc = CPM_Q4_EGROUP, *ret_bad = g;
        else
            w->src_k[(size_t)g * w->gs + fill[g]++] = k;
    }
    bool identity = true;
    for (int k = 0; k < s->K && !rc && identity; k++)
        identity = w->src_k[k] == k;
    free(fill);
    if (rc || identity) {
        free(w->src_k);
        w->src_k = NULL;
    }
    return rc;
}

static void pack_rows(const cpm_q4_gptq *s, cpm_q4 *w) {
    const size_t row_bytes = (size_t)w->Kp / 2, N = (size_t)s->N;
    enum { TILE = 64 }; /* output rows per pass: 64 open destination lines fit L1 */
    for (size_t n0 = 0; n0 < N; n0 += TILE) {
        size_t n1 = n0 + TILE < N ? n0 + TILE : N;
        for (int g = 0; g < w->G; g++) {
            for (int i = 0; i < w->gs; i++) {
                int sp = g * w->gs + i, k = w->src_k ? w->src_k[sp] : sp;
                size_t p = (size_t)g * (size_t)w->gp + (size_t)i;
                size_t byte = p / CPM_Q4_BLOCK * 16 + p % 16;
                int high = p % CPM_Q4_BLOCK >= 16;
                for (size_t n = n0; n < n1; n++) {
                    uint8_t q = (uint8_t)stored_q(s, k, n);
                    uint8_t *b = w->nib + n * row_bytes + byte;
                    *b = high ? (uint8_t)((*b & 0x0f) | (q << 4)) : (uint8_t)((*b & 0xf0) | q);
                }
            }
        }
    }
    for (size_t n = 0; n < N; n++) {
        for (int g = 0; g < w->G; g++) {
            size_t at = n * (size_t)w->G + (size_t)g;
            w->scale[at] = s->scales[(size_t)g * N + n];
            w->zero[at] = (uint8_t)(stored_zero(s, g, n) + s->zero_offset);
        }
    }
}

int cpm_q4_new(const cpm_q4_gptq *s, cpm_q4 **ret, int *ret_bad) {
    int bad = 0;
    *ret = NULL;
    if (s->K <= 0 || s->N <= 0 || s->K % 8 || s->N % 8 || s->group_size <= 0 ||
        s->K % s->group_size || s->zero_offset < 0 || s->zero_offset > 1 ||
        (s->format != CPM_Q4_GPTQ && s->format != CPM_Q4_AWQ))
        return CPM_Q4_EARG;
    cpm_q4 *w = calloc(1, sizeof *w);
    if (!w)
        return CPM_Q4_ENOMEM;
    w->N = s->N;
    w->K = s->K;
    w->gs = s->group_size;
    w->G = s->K / s->group_size;
    w->gp = (w->gs + CPM_Q4_BLOCK - 1) / CPM_Q4_BLOCK * CPM_Q4_BLOCK;
    w->Kp = w->G * w->gp;
    int rc = sort_columns(s, w, &bad);
    if (rc) {
        if (ret_bad)
            *ret_bad = bad;
        cpm_q4_free(w);
        return rc;
    }
    w->gather = w->src_k != NULL || w->gp != w->gs;
    /* 64-byte aligned: a step of the int8-activation kernel is one whole cache line */
    size_t nib_bytes = (size_t)w->N * ((size_t)w->Kp / 2);
    if (posix_memalign((void **)&w->nib, 64, nib_bytes))
        w->nib = NULL;
    else
        memset(w->nib, 0, nib_bytes);
    w->scale = malloc((size_t)w->N * (size_t)w->G * sizeof *w->scale);
    w->zero = malloc((size_t)w->N * (size_t)w->G);
    if (!w->nib || !w->scale || !w->zero) {
        cpm_q4_free(w);
        return CPM_Q4_ENOMEM;
    }
    pack_rows(s, w);
    *ret = w;
    return 0;
}

void cpm_q4_free(cpm_q4 *w) {
    if (!w)
        return;
    free(w->nib);
    free(w->scale);
    free(w->zero);
    free(w->src_k);
    free(w);
}

int cpm_q4_rows(const cpm_q4 *w) { return w->N; }
int cpm_q4_cols(const cpm_q4 *w) { return w->K; }

size_t cpm_q4_bytes(const cpm_q4 *w) {
    return (size_t)w->N * ((size_t)w->Kp / 2 + (size_t)w->G * (sizeof(float) + 1));
}

void cpm_q4_dequant_row(const cpm_q4 *w, int n, float *out) {
    const uint8_t *row = w->nib + (size_t)n * (size_t)w->Kp / 2;
    for (int g = 0; g < w->G; g++) {
        size_t at = w->panels ? cpm_q4_panel_meta(w, n, g) : (size_t)n * (size_t)w->G + (size_t)g;
        float s = w->scale[at];
        int z = w->zero[at];
        for (int i = 0; i < w->gs; i++) {
            size_t p = (size_t)g * (size_t)w->gp + (size_t)i;
            int q;
            if (w->panels) {
                q = cpm_q4_panel_q(w, n, (int)p);
            } else {
                uint8_t b = row[p / CPM_Q4_BLOCK * 16 + p % 16];
                q = p % CPM_Q4_BLOCK >= 16 ? b >> 4 : b & 15;
            }
            int sp = g * w->gs + i;
            out[w->src_k ? w->src_k[sp] : sp] = (float)(q - z) * s;
        }
    }
}

void cpm_matmul_q4_ref(float *y, int ldy, const float *x, int ldx, const cpm_q4 *w, int M) {
    float *row = malloc((size_t)w->K * sizeof *row);
    if (!row)
        return;
    for (int n = 0; n < w->N; n++) {
        cpm_q4_dequant_row(w, n, row);
        for (int m = 0; m < M; m++) {
            double s = 0; /* double: the reference should not share f32 rounding */
            for (int k = 0; k < w->K; k++)
                s += (double)x[(size_t)m * ldx + k] * row[k];
            y[(size_t)m * ldy + n] = (float)s;
        }
    }
    free(row);
}

/* ---- the call path ---- */

typedef struct q4_run q4_run;
struct q4_run {
    cpm_q4_job job;
    cpm_q4_kernel kernel;
    void (*prepare)(const q4_run *r, int lo, int hi); /* x rows into the kernel's form */
    const float *x; /* caller's x when gathering */
    size_t ldx;
    int split_n;
    int align;      /* output rows per unit of the split: 16, or the q8x panel */
    bool dynamic;   /* output rows in chunks claimed from dyn (decode, small batches) */
    cpm_split dyn;
};

/* x rows [lo, hi) into packed order: sorted by group, each group padded with zeros. */
static void gather_rows(const q4_run *r, int lo, int hi) {
    const cpm_q4 *w = r->job.w;
    for (int m = lo; m < hi; m++) {
        const float *x = r->x + (size_t)m * r->ldx;
        float *d = (float *)r->job.x + (size_t)m * r->job.ldx;
        for (int g = 0; g < w->G; g++) {
            float *dg = d + (size_t)g * (size_t)w->gp;
            const int32_t *ks = w->src_k ? w->src_k + (size_t)g * (size_t)w->gs : NULL;
            if (ks)
                for (int i = 0; i < w->gs; i++)
                    dg[i] = x[ks[i]];
            else
                memcpy(dg, x + (size_t)g * (size_t)w->gs, (size_t)w->gs * sizeof *x);
            for (int i = w->gs; i < w->gp; i++)
                dg[i] = 0.0f;
        }
    }
}

static void prepare_worker(void *arg, int tid, int nt) {
    const q4_run *r = arg;
    int lo, hi;
    cpm_split_static(r->job.M, 1, tid, nt, &lo, &hi);
    if (lo < hi)
        r->prepare(r, lo, hi);
}

/* r->prepare over every x row: decode rows on this thread (not worth waking
 * the others for), batches on the pool. */
static void prepare_rows(cpm_pool *pool, const q4_run *r) {
    if (r->job.M <= 4)
        r->prepare(r, 0, r->job.M);
    else
        cpm_pool_run(pool, prepare_worker, (void *)r);
}

static void q4_worker(void *arg, int tid, int nt) {
    q4_run *r = arg;
    float *panel = r->job.panels ? r->job.panels + (size_t)tid * cpm_q4_panel_floats(r->job.w->Kp)
                                 : NULL;
    int lo, hi;
    if (r->dynamic) {
        while (cpm_split_next(&r->dyn, tid, &lo, &hi))
            r->kernel(&r->job, 0, r->job.M, lo, hi, panel);
    } else if (r->split_n) {
        cpm_split_static(r->job.w->N, r->align, tid, nt, &lo, &hi);
        if (lo < hi)
            r->kernel(&r->job, 0, r->job.M, lo, hi, panel);
    } else {
        cpm_split_static(r->job.M, 1, tid, nt, &lo, &hi);
        if (lo < hi)
            r->kernel(&r->job, lo, hi, 0, r->job.w->N, panel);
    }
}

/* Runs r's kernel on the pool, in chunks claimed at run time for small M. */
static void run_rows(cpm_pool *pool, q4_run *r) {
    int nt = cpm_pool_size(pool);
    if (!r->align)
        r->align = 16;
    r->dynamic = r->split_n && cpm_split_dynamic(r->job.M, nt);
    if (r->dynamic)
        cpm_split_init(&r->dyn, r->job.w->N, r->align, nt, CPM_SPLIT_CHUNKS);
    cpm_pool_run(pool, q4_worker, r);
}

static cpm_q4_kernel pick_kernel(void) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
    if (isa >= CPM_ISA_AVX512)
        return cpm_q4_mm_avx512;
    if (isa == CPM_ISA_AVX2)
        return cpm_q4_mm_avx2;
#endif
    return cpm_q4_mm_scalar;
}

void cpm_matmul_q4(cpm_pool *pool, float *y, int ldy, const float *x, int ldx, const cpm_q4 *w,
                   int M) {
    if (M <= 0)
        return;
    if (w->panels) { /* laid out for cpm_matmul_q4_q8x only */
        cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
        return;
    }
    int nt = cpm_pool_size(pool);
    size_t Kp = (size_t)w->Kp;
    size_t xg = w->gather ? (size_t)M * Kp : 0;
    size_t panels = M > 1 ? (size_t)nt * cpm_q4_panel_floats(w->Kp) : 0;
    size_t bytes = (xg + panels) * sizeof(float);
    void *owned = NULL;
    float *buf = bytes ? cpm_pool_buffer(pool, bytes, &owned) : NULL;
    if (bytes && !buf) {
        cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
        return;
    }
    q4_run r = {
        .job = {.w = w, .x = w->gather ? buf : x, .ldx = w->gather ? Kp : (size_t)ldx, .y = y,
                .ldy = (size_t)ldy, .M = M, .panels = panels ? buf + xg : NULL},
        .kernel = pick_kernel(),
        .prepare = gather_rows,
        .x = x,
        .ldx = (size_t)ldx,
    };
    if (w->gather)
        prepare_rows(pool, &r);
    /* Threads share the output rows (each streams its own nibbles) unless N is
     * too narrow to share. */
    r.split_n = w->N >= 16 * nt || M < 2 * nt;
    run_rows(pool, &r);
    free(owned);
}

/* ---- bf16 activations ---- */

/* Rows [lo, hi) of x into job.x in packed order, rounded to bf16 (and back
 * to f32): the exact kernels then see the same products as VDPBF16PS would,
 * in another summation order (CPUs without it). */
static void round_rows(const q4_run *r, int lo, int hi) {
    gather_rows(r, lo, hi);
    for (int m = lo; m < hi; m++) {
        float *d = (float *)r->job.x + (size_t)m * r->job.ldx;
        for (int k = 0; k < r->job.w->Kp; k++)
            d[k] = cpm_bf16_to_f32(cpm_f32_to_bf16(d[k]));
    }
}

/* Rows [lo, hi) of x as the kernel in job wants them: rounded to bf16 into
 * job.xh (gathered first where the layout needs it), or rounded in place. */
static void bf16x_prepare_rows(const q4_run *r, int lo, int hi) {
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
    if (r->job.xh) {
        if (r->job.w->gather)
            gather_rows(r, lo, hi);
        cpm_q4_bf16x_pack(&r->job, lo, hi);
        return;
    }
#endif
    round_rows(r, lo, hi);
}

void cpm_matmul_q4_bf16x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const cpm_q4 *w, int M) {
    if (M <= 0)
        return;
    if (w->panels) { /* laid out for cpm_matmul_q4_q8x only */
        cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
        return;
    }
    bool dot = false;
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
    dot = cpm_isa_in_effect() >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
#endif
    int nt = cpm_pool_size(pool);
    size_t Kp = (size_t)w->Kp;
    size_t xf = dot && !w->gather ? 0 : (size_t)M * Kp; /* f32 x in packed order */
    size_t xh = dot ? ((size_t)M * Kp + 31) / 32 * 16 : 0; /* bf16 x, counted in floats */
    size_t panels = M > 1 ? (size_t)nt * cpm_q4_panel_floats(w->Kp) : 0;
    size_t bytes = (xf + xh + panels) * sizeof(float);
    void *owned;
    float *buf = cpm_pool_buffer(pool, bytes, &owned);
    if (!buf) {
        cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
        return;
    }
    q4_run r = {
        .job = {.w = w, .x = xf ? buf : x, .ldx = xf ? Kp : (size_t)ldx, .y = y,
                .ldy = (size_t)ldy, .M = M, .panels = panels ? buf + xf + xh : NULL,
                .xh = xh ? (uint16_t *)(buf + xf) : NULL},
        .kernel = pick_kernel(),
        .prepare = bf16x_prepare_rows,
        .x = x,
        .ldx = (size_t)ldx,
        .split_n = w->N >= 16 * nt || M < 2 * nt,
    };
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
    if (dot)
        r.kernel = cpm_q4_mm_bf16x;
#endif
    prepare_rows(pool, &r);
    run_rows(pool, &r);
    free(owned);
}

/* ---- int8 activations ---- */

static bool q8x_vnni(void) {
#if X86_KERNELS && defined(CPM_HAVE_VNNI_KERNEL)
    return cpm_isa_in_effect() >= CPM_ISA_AVX512 && cpm_cpu_has_int8_dot();
#else
    return false;
#endif
}

static void q8x_prepare_rows(const q4_run *r, int lo, int hi) {
#if X86_KERNELS && defined(CPM_HAVE_VNNI_KERNEL)
    if (q8x_vnni()) {
        cpm_q4_q8x_pack_vnni(&r->job, lo, hi);
        return;
    }
#endif
    cpm_q4_q8x_pack(&r->job, lo, hi);
}

static cpm_q4_kernel pick_q8x_kernel(void) {
#if X86_KERNELS
    cpm_isa isa = cpm_isa_in_effect();
#if defined(CPM_HAVE_VNNI_KERNEL)
    if (q8x_vnni())
        return cpm_q4_mm_q8x_vnni;
#endif
    if (isa >= CPM_ISA_AVX2)
        return cpm_q4_mm_q8x_avx2;
#endif
    return cpm_q4_mm_q8x_scalar;
}

/* The int8 x of M rows: where each part sits in one buffer (byte offsets). */
typedef struct q8x_bufs {
    size_t x8, xs, xz, bytes;
} q8x_bufs;

static q8x_bufs q8x_layout(const cpm_q4 *w, int M) {
    const size_t Kp = (size_t)w->Kp, m = (size_t)M;
    q8x_bufs b = {0};
    b.xs = (m * Kp + 63) / 64 * 64;
    b.xz = b.xs + m * (Kp / CPM_Q4_BLOCK) * sizeof(float);
    b.bytes = b.xz + m * (size_t)w->G * sizeof(float);
    return b;
}

void cpm_matmul_q4_q8x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                       const cpm_q4 *w, int M) {
    if (M <= 0)
        return;
    int nt = cpm_pool_size(pool);
    q8x_bufs b = q8x_layout(w, M);
    void *owned = NULL;
    char *buf = w->panels ? cpm_pool_buffer(pool, b.bytes, &owned) : NULL;
    if (!buf) {
        cpm_mm_fill_nan(y, (size_t)ldy, M, w->N);
        return;
    }
    q4_run r = {
        .job = {.w = w, .x = x, .ldx = (size_t)ldx, .y = y, .ldy = (size_t)ldy, .M = M,
                .x8 = (int8_t *)(buf + b.x8), .xs = (float *)(buf + b.xs),
                .xz = (float *)(buf + b.xz)},
        .kernel = pick_q8x_kernel(),
        .prepare = q8x_prepare_rows,
        .x = x,
        .ldx = (size_t)ldx,
        .split_n = w->N >= CPM_Q4_PANEL * nt || M < 2 * nt,
        .align = CPM_Q4_PANEL, /* a thread's rows start at a panel */
    };
    prepare_rows(pool, &r);
    run_rows(pool, &r);
    free(owned);
}

int cpm_q4_q8x_dequant_x(const cpm_q4 *w, const float *x, float *out) {
    q8x_bufs b = q8x_layout(w, 1);
    char *buf = malloc(b.bytes);
    if (!buf)
        return -1;
    q4_run r = {.job = {.w = w, .x = x, .ldx = (size_t)w->K, .M = 1, .x8 = (int8_t *)(buf + b.x8),
                        .xs = (float *)(buf + b.xs), .xz = (float *)(buf + b.xz)}};
    cpm_q4_q8x_pack(&r.job, 0, 1);
    for (int g = 0; g < w->G; g++) {
        for (int i = 0; i < w->gs; i++) {
            int p = g * w->gp + i, sp = g * w->gs + i;
            out[w->src_k ? w->src_k[sp] : sp] = (float)r.job.x8[p] * r.job.xs[p / CPM_Q4_BLOCK];
        }
    }
    free(buf);
    return 0;
}

int cpm_q4_panelled(const cpm_q4 *w) { return w->panels; }
