/* matmul_bf16p.c - panel-packed bf16 weights: the repack at load, the scalar
 * order (matmul_bf16p.h), and the call path (x rounded once, panels over the
 * threads).
 */
#include "matmul_bf16p.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "matmul.h"
#include "matmul_bf16p_internal.h"
#include "matmul_internal.h"
#include "split.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS) && defined(CPM_HAVE_BF16X_KERNEL)
#define PANEL_KERNEL 1
#else
#define PANEL_KERNEL 0
#endif

#define COLS CPM_BF16P_COLS
#define MULTI_MAX 8 /* weights one cpm_matmul_bf16p_multi call shares x between */
/* up to this many x values the calling thread rounds alone: a few microseconds, about
 * what a pool run costs (16 rows of the 1B's widest K take 61440) */
#define ROUND_ALONE 65536

bool cpm_bf16p_available(void) {
#if PANEL_KERNEL
    return cpm_isa_in_effect() >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
#else
    return false;
#endif
}

static size_t panel_halfs(const cpm_bf16p *w) { return (size_t)w->Q * COLS * 2; }

/* ---- repack ---- */

typedef struct repack_job {
    cpm_bf16p *p;
    const void *rows; /* row row0 of the matrix */
    cpm_dtype wtype;
    int ld, row0, nrows;
} repack_job;

/* One weight as bf16: BF16 as stored, F16 rounded to the nearest bf16; 0 past K. */
static uint32_t weight_bf16(const uint16_t *row, cpm_dtype t, int k, int K) {
    if (k >= K)
        return 0;
    return t == CPM_DTYPE_BF16 ? row[k] : cpm_f32_to_bf16(cpm_f16_to_f32(row[k]));
}

/* Panels [p0, p1) of the job's rows: row n's pair q is the 32-bit word (q * COLS + c)
 * of its panel; rows past N are 0. The panel is written in order, pair by pair, from
 * its 64 rows at once (their current lines stay in L1). */
static void repack_panels(const repack_job *j, int p0, int p1) {
    const cpm_bf16p *p = j->p;
    const int full = p->K / 2; /* pairs with both weights inside K */
    const bool bf16 = j->wtype == CPM_DTYPE_BF16;
    for (int pn = p0; pn < p1; pn++) {
        uint32_t *dst = (uint32_t *)(p->data + (size_t)pn * panel_halfs(p));
        const uint16_t *row[COLS];
        for (int c = 0; c < COLS; c++) {
            const int n = pn * COLS + c;
            row[c] = n < p->N ? (const uint16_t *)j->rows + (size_t)(n - j->row0) * (size_t)j->ld
                              : NULL;
        }
        int q = 0;
        if (bf16 && (pn + 1) * COLS <= p->N) /* a whole panel of BF16 rows: pairs as they are */
            for (; q < full; q++, dst += COLS)
                for (int c = 0; c < COLS; c++)
                    memcpy(&dst[c], row[c] + 2 * q, sizeof *dst); /* little-endian: k = 2q low */
        for (; q < p->Q; q++, dst += COLS)
            for (int c = 0; c < COLS; c++) {
                uint32_t v = 0;
                if (row[c] && bf16 && q < full)
                    memcpy(&v, row[c] + 2 * q, sizeof v); /* little-endian: k = 2q low */
                else if (row[c])
                    v = weight_bf16(row[c], j->wtype, 2 * q, p->K) |
                        weight_bf16(row[c], j->wtype, 2 * q + 1, p->K) << 16;
                dst[c] = v;
            }
    }
}

static void repack_worker(void *arg, int tid, int nt) {
    const repack_job *j = arg;
    const int first = j->row0 / COLS, count = (j->nrows + COLS - 1) / COLS;
    int lo, hi;
    cpm_split_static(count, 1, tid, nt, &lo, &hi);
    repack_panels(j, first + lo, first + hi);
}

cpm_bf16p *cpm_bf16p_new(int N, int K) {
    if (N < 1 || K < 1)
        return NULL;
    cpm_bf16p *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->N = N, p->K = K, p->Q = (K + 1) / 2, p->panels = (N + COLS - 1) / COLS;
    /* 2 MB pages where the kernel gives them: filling fresh 4 KB pages one fault at a
     * time was a third of loading the 1B on the VM measured */
    const size_t bytes = cpm_bf16p_bytes(p), huge = (size_t)2 << 20;
    void *data = NULL;
    if (posix_memalign(&data, bytes >= huge ? huge : 64, bytes)) {
        free(p);
        return NULL;
    }
    if (bytes >= huge)
        madvise(data, bytes / huge * huge, MADV_HUGEPAGE);
    p->data = data;
    return p;
}

void cpm_bf16p_fill(cpm_pool *pool, cpm_bf16p *p, const void *rows, cpm_dtype wtype, int ld,
                    int row0, int nrows) {
    repack_job j = {.p = p, .rows = rows, .wtype = wtype, .ld = ld, .row0 = row0, .nrows = nrows};
    cpm_pool_run(pool, repack_worker, &j);
}

cpm_bf16p *cpm_bf16p_from(cpm_pool *pool, const void *w, cpm_dtype wtype, int N, int K, int ld) {
    if (ld < K || (wtype != CPM_DTYPE_BF16 && wtype != CPM_DTYPE_F16))
        return NULL;
    cpm_bf16p *p = cpm_bf16p_new(N, K);
    if (p)
        cpm_bf16p_fill(pool, p, w, wtype, ld, 0, N);
    return p;
}

void cpm_bf16p_free(cpm_bf16p *w) {
    if (!w)
        return;
    free(w->data);
    free(w);
}

size_t cpm_bf16p_bytes(const cpm_bf16p *w) {
    return (size_t)w->panels * panel_halfs(w) * sizeof(uint16_t);
}

/* ---- the scalar order ---- */

/* bf16 as f32, flushed to 0 when subnormal (VDPBF16PS reads them as 0). */
static float bf16_daz(uint16_t h) {
    return (h & 0x7f80) == 0 ? 0.0f * cpm_bf16_to_f32(h) : cpm_bf16_to_f32(h);
}

void cpm_bf16p_mm_scalar(const cpm_bf16p_job *job, int p0, int p1) {
    const cpm_bf16p *w = job->w;
    for (int m = 0; m < job->M; m++) {
        const uint16_t *x = job->xh + (size_t)m * job->xs;
        for (int pn = p0; pn < p1; pn++) {
            const uint16_t *panel = w->data + (size_t)pn * panel_halfs(w);
            for (int c = 0; c < COLS && pn * COLS + c < w->N; c++) {
                float acc = 0.0f;
                for (int q = 0; q < w->Q; q++) {
                    const uint16_t *pw = panel + ((size_t)q * COLS + (size_t)c) * 2;
                    acc += bf16_daz(x[2 * q + 1]) * bf16_daz(pw[1]);
                    acc += bf16_daz(x[2 * q]) * bf16_daz(pw[0]);
                }
                job->y[(size_t)m * job->ldy + (size_t)(pn * COLS + c)] = acc;
            }
        }
    }
}

/* ---- the call path ---- */

typedef struct bf16p_run {
    cpm_bf16p_job jobs[MULTI_MAX];
    int first_panel[MULTI_MAX + 1]; /* job i owns combined panels [first[i], first[i + 1]) */
    int n_jobs;
    cpm_bf16p_kernel kernel;
    bool dynamic;
    cpm_split dyn;
    /* rounding x */
    const float *x;
    size_t ldx;
    int K;
} bf16p_run;

/* Combined panels [lo, hi), each job's share in turn. */
static void run_panels(const bf16p_run *r, int lo, int hi) {
    for (int i = 0; i < r->n_jobs && lo < hi; i++) {
        int a = lo > r->first_panel[i] ? lo : r->first_panel[i];
        int b = hi < r->first_panel[i + 1] ? hi : r->first_panel[i + 1];
        if (a < b)
            r->kernel(&r->jobs[i], a - r->first_panel[i], b - r->first_panel[i]);
    }
}

static void mm_worker(void *arg, int tid, int nt) {
    bf16p_run *r = arg;
    int lo, hi;
    if (r->dynamic) {
        while (cpm_split_next(&r->dyn, tid, &lo, &hi))
            run_panels(r, lo, hi);
        return;
    }
    cpm_split_static(r->first_panel[r->n_jobs], 1, tid, nt, &lo, &hi);
    run_panels(r, lo, hi);
}

static void round_rows(const bf16p_run *r, int m0, int m1) {
    const cpm_bf16p_job *j = &r->jobs[0];
    uint16_t *xh = (uint16_t *)j->xh;
#if PANEL_KERNEL
    if (r->kernel == cpm_bf16p_mm_avx512) {
        cpm_bf16p_round_avx512(r->x, r->ldx, r->K, xh, j->xs, m0, m1);
        return;
    }
#endif
    for (int m = m0; m < m1; m++)
        for (size_t k = 0; k < j->xs; k++)
            xh[(size_t)m * j->xs + k] =
                (int)k < r->K ? cpm_f32_to_bf16(r->x[(size_t)m * r->ldx + k]) : 0;
}

static void round_worker(void *arg, int tid, int nt) {
    const bf16p_run *r = arg;
    int lo, hi;
    cpm_split_static(r->jobs[0].M, 1, tid, nt, &lo, &hi);
    round_rows(r, lo, hi);
}

void cpm_matmul_bf16p_multi(cpm_pool *pool, const float *x, int ldx, int M,
                            const cpm_bf16p_out *outs, int n_outs) {
    if (M <= 0 || n_outs <= 0)
        return;
    if (n_outs > MULTI_MAX) {
        for (int i = 0; i < n_outs; i += MULTI_MAX)
            cpm_matmul_bf16p_multi(pool, x, ldx, M, outs + i,
                                   n_outs - i < MULTI_MAX ? n_outs - i : MULTI_MAX);
        return;
    }
    const int K = outs[0].w->K;
    const size_t xs = (size_t)((K + 31) & ~31);
    void *owned;
    uint16_t *xh = cpm_pool_buffer(pool, (size_t)M * xs * sizeof(uint16_t), &owned);
    if (!xh) {
        for (int i = 0; i < n_outs; i++)
            cpm_mm_fill_nan(outs[i].y, (size_t)outs[i].ldy, M, outs[i].w->N);
        return;
    }
    bf16p_run r = {.n_jobs = n_outs, .kernel = cpm_bf16p_mm_scalar, .x = x, .ldx = (size_t)ldx,
                   .K = K};
#if PANEL_KERNEL
    if (cpm_bf16p_available())
        r.kernel = cpm_bf16p_mm_avx512;
#endif
    for (int i = 0; i < n_outs; i++) {
        r.jobs[i] = (cpm_bf16p_job){.w = outs[i].w, .xh = xh, .xs = xs, .y = outs[i].y,
                                    .ldy = (size_t)outs[i].ldy, .M = M};
        r.first_panel[i + 1] = r.first_panel[i] + outs[i].w->panels;
    }
    if ((size_t)M * (size_t)K <= ROUND_ALONE) /* not worth waking the threads for */
        round_rows(&r, 0, M);
    else
        cpm_pool_run(pool, round_worker, &r);
    int nt = cpm_pool_size(pool);
    r.dynamic = cpm_split_dynamic(M, nt);
    if (r.dynamic) /* a panel a chunk: microseconds each, so the threads end together */
        cpm_split_init(&r.dyn, r.first_panel[n_outs], 1, nt, r.first_panel[n_outs]);
    cpm_pool_run(pool, mm_worker, &r);
    free(owned);
}

void cpm_matmul_bf16p(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                      const cpm_bf16p *w, int M) {
    cpm_bf16p_out out = {.y = y, .ldy = ldy, .w = w};
    cpm_matmul_bf16p_multi(pool, x, ldx, M, &out, 1);
}
