/* matmul.c - y = x * W^T for every projection of the model: ISA detection,
 * the split of the output across the pool's threads (cpm_matmul_multi: of
 * several outputs sharing one x), the scalar kernel and the reference. The
 * SIMD kernels live in matmul_<isa>.c, one static library each, so that only
 * they are compiled with -mavx2 / -mavx512* / -mamx-*.
 */
#include "matmul.h"

#include <string.h>

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "matmul_internal.h"
#include "split.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define X86_KERNELS 1
#else
#define X86_KERNELS 0
#endif

/* Detection is a pure function of the CPU, so caching it is not state that
 * changes behaviour; the forced ISA is the one knob, meant for tests. */
static atomic_int detected_isa = -1;
static atomic_int forced_isa = -1;
static atomic_int detected_bf16_dot = -1;
static atomic_int detected_int8_dot = -1;

#if X86_KERNELS
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Linux hands out AMX tile state only to processes that ask for it. */
static int amx_permitted(void) {
#if defined(__linux__)
    const long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
#else
    return 0;
#endif
}

static cpm_isa detect_x86(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return CPM_ISA_SCALAR;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !fma || !f16c)
        return CPM_ISA_SCALAR;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* XMM and YMM state */
        return CPM_ISA_SCALAR;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return CPM_ISA_SCALAR;
    int avx2 = (b >> 5) & 1;
    if (!avx2)
        return CPM_ISA_SCALAR;
    int avx512 = ((b >> 16) & 1) /* f */ && ((b >> 17) & 1) /* dq */ &&
                 ((b >> 30) & 1) /* bw */ && ((b >> 31) & 1) /* vl */;
    if (!avx512 || (xcr0 & 0xe0) != 0xe0) /* opmask, ZMM_Hi256, Hi16_ZMM */
        return CPM_ISA_AVX2;
    int amx = ((d >> 22) & 1) /* amx-bf16 */ && ((d >> 24) & 1) /* amx-tile */;
    if (!amx || (xcr0 & 0x60000) != 0x60000 || !amx_permitted())
        return CPM_ISA_AVX512;
    return CPM_ISA_AMX;
}
#endif

cpm_isa cpm_isa_detect(void) {
    int isa = atomic_load(&detected_isa);
    if (isa < 0) {
#if X86_KERNELS
        isa = (int)detect_x86();
#else
        isa = CPM_ISA_SCALAR;
#endif
        atomic_store(&detected_isa, isa);
    }
    return (cpm_isa)isa;
}

#if X86_KERNELS && (defined(CPM_HAVE_BF16X_KERNEL) || defined(CPM_HAVE_VNNI_KERNEL))
/* Bit `bit` of register `reg` (0 eax .. 3 edx) of CPUID leaf 7, subleaf `sub`, on a CPU
 * with AVX-512 (the extensions asked about here are AVX-512 ones). */
static int avx512_feature(unsigned sub, int reg, int bit) {
    unsigned r[4];
    if (cpm_isa_detect() < CPM_ISA_AVX512 || !__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3]))
        return 0;
    return (int)((r[reg] >> bit) & 1);
}
#endif

/* Detected once: *cache is -1 until then. */
static bool cached_feature(atomic_int *cache, int (*detect)(void)) {
    int has = atomic_load(cache);
    if (has < 0) {
        has = detect();
        atomic_store(cache, has);
    }
    return has != 0;
}

static int detect_bf16_dot(void) {
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
    return avx512_feature(1, 0, 5); /* AVX512_BF16 */
#else
    return 0;
#endif
}

static int detect_int8_dot(void) {
#if X86_KERNELS && defined(CPM_HAVE_VNNI_KERNEL)
    return avx512_feature(0, 2, 11); /* AVX512_VNNI */
#else
    return 0;
#endif
}

bool cpm_cpu_has_bf16_dot(void) { return cached_feature(&detected_bf16_dot, detect_bf16_dot); }

bool cpm_cpu_has_int8_dot(void) { return cached_feature(&detected_int8_dot, detect_int8_dot); }

cpm_isa cpm_isa_force(cpm_isa isa) {
    cpm_isa best = cpm_isa_detect();
    if ((int)isa < 0 || isa > best)
        isa = best;
    atomic_store(&forced_isa, (int)isa);
    return isa;
}

static cpm_isa isa_in_effect(void) {
    int f = atomic_load(&forced_isa);
    return f >= 0 ? (cpm_isa)f : cpm_isa_detect();
}

cpm_isa cpm_isa_in_effect(void) {
    return isa_in_effect();
}

const char *cpm_isa_name(cpm_isa isa) {
    switch (isa) {
    case CPM_ISA_SCALAR: return "scalar";
    case CPM_ISA_AVX2: return "avx2";
    case CPM_ISA_AVX512: return "avx512";
    case CPM_ISA_AMX: return "amx";
    default: return "?";
    }
}

bool cpm_isa_from_name(const char *name, cpm_isa *ret) {
    for (int i = CPM_ISA_SCALAR; i <= CPM_ISA_AMX; i++) {
        if (strcmp(name, cpm_isa_name((cpm_isa)i)) == 0) {
            *ret = (cpm_isa)i;
            return true;
        }
    }
    return false;
}

/* ---- scalar kernel: the canonical order written out plainly ---- */

void cpm_mm_scalar(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    const int K = job->K;
    for (int m = m0; m < m1; m++) {
        const float *x = job->x + (size_t)m * (size_t)job->ldx;
        for (int n = n0; n < n1; n++) {
            float acc[CPM_MM_LANES] = {0};
            for (int k0 = 0; k0 < K; k0 += CPM_MM_LANES) {
                for (int j = 0; j < CPM_MM_LANES; j++) {
                    int k = k0 + j;
                    float xv = k < K ? x[k] : 0.0f, wv = k < K ? cpm_mm_w_at(job, n, k) : 0.0f;
                    acc[j] = fmaf(xv, wv, acc[j]);
                }
            }
            job->y[(size_t)m * (size_t)job->ldy + n] = cpm_mm_tree16(acc);
        }
    }
}

void cpm_matmul_ref(float *y, int ldy, const float *x, int ldx,
                    const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K) {
    cpm_mm_job job = {.w = w, .wtype = wtype, .w_ld = w_ld};
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double s = 0.0; /* double: the reference should not share f32 rounding */
            for (int k = 0; k < K; k++)
                s += (double)x[(size_t)m * ldx + k] * cpm_mm_w_at(&job, n, k);
            y[(size_t)m * ldy + n] = (float)s;
        }
    }
}

/* ---- threading ---- */

typedef struct mm_run {
    cpm_mm_job job;
    cpm_mm_kernel kernel;
    int split_n;  /* 1: threads share N, 0: threads share M */
    int align;    /* chunk granularity along the split dimension */
    bool dynamic; /* N in chunks claimed from dyn (decode, small batches) */
    cpm_split dyn;
} mm_run;

static void mm_worker(void *arg, int tid, int nt) {
    mm_run *r = arg;
    int lo, hi;
    if (r->dynamic) {
        while (cpm_split_next(&r->dyn, tid, &lo, &hi))
            r->kernel(&r->job, 0, r->job.M, lo, hi);
    } else if (r->split_n) {
        cpm_split_static(r->job.N, r->align, tid, nt, &lo, &hi);
        if (lo < hi)
            r->kernel(&r->job, 0, r->job.M, lo, hi);
    } else {
        cpm_split_static(r->job.M, r->align, tid, nt, &lo, &hi);
        if (lo < hi)
            r->kernel(&r->job, lo, hi, 0, r->job.N);
    }
}

/* cpm_matmul_multi in one parallel section: the outputs' W rows laid end to end in
 * units of align rows and shared evenly by the threads (one barrier for q/k/v, not
 * three); each range runs the kernel a separate cpm_matmul would: the same bits. */
typedef struct mm_multi {
    cpm_mm_job base; /* x, ldx, M, K, packed */
    const cpm_matmul_out *outs;
    int n_outs;
    int units;
    cpm_mm_kernel kernel;
    int align;
    bool dynamic;  /* units claimed in chunks from dyn (decode, small batches) */
    cpm_split dyn;
} mm_multi;

static int multi_units(const cpm_matmul_out *o, int align) {
    return o->N > 0 ? (o->N + align - 1) / align : 0;
}

static mm_multi multi_of(const float *x, int ldx, int M, int K, const cpm_matmul_out *outs,
                         int n_outs, cpm_mm_kernel kernel, int align) {
    mm_multi r = {.base = {.x = x, .ldx = ldx, .M = M, .K = K}, .outs = outs, .n_outs = n_outs,
                  .kernel = kernel, .align = align};
    for (int i = 0; i < n_outs; i++)
        r.units += multi_units(&outs[i], align);
    return r;
}

/* Units [lo, hi) of r: each output's part of them, through its own job. */
static void multi_range(const mm_multi *r, int lo, int hi) {
    int off = 0;
    for (int i = 0; i < r->n_outs && off < hi; i++) {
        const cpm_matmul_out *o = &r->outs[i];
        int u = multi_units(o, r->align), a = lo > off ? lo - off : 0, b = hi - off < u ? hi - off : u;
        off += u;
        if (a >= b)
            continue;
        cpm_mm_job job = r->base;
        job.y = o->y;
        job.ldy = o->ldy;
        job.w = o->w;
        job.wtype = o->wtype;
        job.w_ld = o->w_ld;
        job.N = o->N;
        r->kernel(&job, 0, job.M, a * r->align, b * r->align < o->N ? b * r->align : o->N);
    }
}

static void multi_worker(void *arg, int tid, int nt) {
    mm_multi *r = arg;
    int lo, hi;
    if (!r->dynamic) {
        cpm_split_static(r->units, 1, tid, nt, &lo, &hi);
        multi_range(r, lo, hi);
        return;
    }
    while (cpm_split_next(&r->dyn, tid, &lo, &hi))
        multi_range(r, lo, hi);
}

/* Runs r's kernel over every output on the pool. */
static void run_multi(cpm_pool *pool, mm_multi *r) {
    int nt = cpm_pool_size(pool);
    r->dynamic = cpm_split_dynamic(r->base.M, nt);
    if (r->dynamic)
        cpm_split_init(&r->dyn, r->units, 1, nt, CPM_SPLIT_CHUNKS);
    cpm_pool_run(pool, multi_worker, r);
}

/* Runs r's kernel on the pool. Threads own contiguous column ranges (each streams
 * its own rows of W) unless N is too narrow to share, as for tiny test shapes. */
static void run_split(cpm_pool *pool, mm_run *r) {
    int nt = cpm_pool_size(pool), M = r->job.M, N = r->job.N;
    r->split_n = N >= 16 * nt || M < 2 * nt;
    r->align = r->split_n ? 16 : 1;
    r->dynamic = r->split_n && cpm_split_dynamic(M, nt);
    if (r->dynamic)
        cpm_split_init(&r->dyn, N, r->align, nt, CPM_SPLIT_CHUNKS);
    cpm_pool_run(pool, mm_worker, r);
}

#if X86_KERNELS
#define AMX_ALIGN 32 /* W rows per unit of work: one pair of 16-row tiles */

static void amx_pack_worker(void *arg, int tid, int nt) {
    const cpm_mm_job *job = arg;
    int blocks = (job->M + CPM_MM_AMX_ROWS - 1) / CPM_MM_AMX_ROWS, lo, hi;
    cpm_split_static(blocks, 1, tid, nt, &lo, &hi);
    if (lo < hi)
        cpm_mm_amx_pack(job, lo, hi);
}

/* Splits and packs job's x into job->packed; returns 0, or -1 when no pack
 * buffer could be had. The buffer comes from the pool (allocated once) or,
 * without a pool, per call: then *owned is set and the caller frees it. */
static int amx_pack(cpm_pool *pool, cpm_mm_job *job, void **owned) {
    size_t bytes = cpm_mm_amx_packed_size(job->M, job->K);
    if (!(job->packed = cpm_pool_buffer(pool, bytes, owned)))
        return -1;
    cpm_pool_run(pool, amx_pack_worker, job);
    return 0;
}

/* Returns 0 when the AMX path ran; -1 when no pack buffer could be had. */
static int run_amx(cpm_pool *pool, mm_run *r) {
    void *owned;
    if (amx_pack(pool, &r->job, &owned) != 0)
        return -1;
    r->kernel = cpm_mm_amx;
    r->split_n = 1;
    r->align = AMX_ALIGN;
    cpm_pool_run(pool, mm_worker, r);
    free(owned);
    return 0;
}

static int run_amx_multi(cpm_pool *pool, const float *x, int ldx, int M, int K,
                         const cpm_matmul_out *outs, int n_outs) {
    mm_multi r = multi_of(x, ldx, M, K, outs, n_outs, cpm_mm_amx, AMX_ALIGN);
    void *owned;
    if (amx_pack(pool, &r.base, &owned) != 0)
        return -1;
    run_multi(pool, &r);
    free(owned);
    return 0;
}

#endif

static cpm_mm_kernel pick_kernel(cpm_isa isa) {
#if X86_KERNELS
    if (isa >= CPM_ISA_AVX512)
        return cpm_mm_avx512;
    if (isa == CPM_ISA_AVX2)
        return cpm_mm_avx2;
#else
    (void)isa;
#endif
    return cpm_mm_scalar;
}

void cpm_matmul(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                const void *w, cpm_dtype wtype, int w_ld, int M, int N, int K) {
    if (M <= 0 || N <= 0)
        return;
    mm_run r = {
        .job = {.y = y, .ldy = ldy, .x = x, .ldx = ldx, .w = w, .wtype = wtype,
                .w_ld = w_ld, .M = M, .N = N, .K = K},
    };
    cpm_isa isa = isa_in_effect();
#if X86_KERNELS
    /* The AMX order differs from the FMA kernels', so it must serve every M
     * (decode included) for a row's result not to depend on its batch. If no
     * pack buffer can be had, NaN marks the failure rather than silently
     * changing the rounding. */
    if (isa == CPM_ISA_AMX && wtype == CPM_DTYPE_BF16 && K > 0) {
        if (run_amx(pool, &r) != 0)
            cpm_mm_fill_nan(y, (size_t)ldy, M, N);
        return;
    }
#endif
    r.kernel = pick_kernel(isa);
    run_split(pool, &r);
}

/* Whether every output can share one AMX pack of x (BF16 weights only). */
static bool multi_uses_amx(int K, const cpm_matmul_out *outs, int n_outs) {
#if X86_KERNELS
    if (isa_in_effect() != CPM_ISA_AMX || K <= 0)
        return false;
    for (int i = 0; i < n_outs; i++)
        if (outs[i].wtype != CPM_DTYPE_BF16)
            return false;
    return true;
#else
    (void)K, (void)outs, (void)n_outs;
    return false;
#endif
}

void cpm_matmul_multi(cpm_pool *pool, const float *x, int ldx, int M, int K,
                      const cpm_matmul_out *outs, int n_outs) {
    if (M <= 0 || n_outs <= 0)
        return;
    if (!multi_uses_amx(K, outs, n_outs)) {
        cpm_isa isa = isa_in_effect();
        bool amx_bf16 = false; /* an AMX output alone goes through cpm_matmul's AMX path */
        for (int i = 0; i < n_outs; i++)
            amx_bf16 |= isa == CPM_ISA_AMX && outs[i].wtype == CPM_DTYPE_BF16;
        if (amx_bf16 || K <= 0) {
            for (int i = 0; i < n_outs; i++)
                cpm_matmul(pool, outs[i].y, outs[i].ldy, x, ldx, outs[i].w, outs[i].wtype,
                           outs[i].w_ld, M, outs[i].N, K);
            return;
        }
        /* The FMA kernels pack nothing: one parallel section over every output */
        mm_multi r = multi_of(x, ldx, M, K, outs, n_outs, pick_kernel(isa), 16);
        run_multi(pool, &r);
        return;
    }
#if X86_KERNELS
    if (run_amx_multi(pool, x, ldx, M, K, outs, n_outs) != 0)
        for (int i = 0; i < n_outs; i++)
            if (outs[i].N > 0)
                cpm_mm_fill_nan(outs[i].y, (size_t)outs[i].ldy, M, outs[i].N);
#endif
}

/* ---- bf16 activations ---- */

#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
static void bf16x_pack_worker(void *arg, int tid, int nt) {
    const cpm_mm_job *job = arg;
    int lo, hi;
    cpm_split_static(job->M, 1, tid, nt, &lo, &hi);
    if (lo < hi)
        cpm_mm_bf16x_pack(job, lo, hi);
}
#endif

/* x rounded to bf16 and back into job->packed as f32 rows of K, for the FMA kernels. */
static void bf16x_round_worker(void *arg, int tid, int nt) {
    const cpm_mm_job *job = arg;
    int lo, hi;
    cpm_split_static(job->M, 1, tid, nt, &lo, &hi);
    for (int m = lo; m < hi; m++)
        for (int k = 0; k < job->K; k++)
            ((float *)job->packed)[(size_t)m * job->K + k] =
                cpm_bf16_to_f32(cpm_f32_to_bf16(job->x[(size_t)m * job->ldx + k]));
}

/* Whether cpm_matmul_bf16x hands W of this type to cpm_matmul as it is: AMX
 * tiles beat VDPBF16PS, exactly. */
static bool bf16x_goes_exact(cpm_isa isa, cpm_dtype wtype, int K) {
    return (isa == CPM_ISA_AMX && wtype == CPM_DTYPE_BF16) || K <= 0;
}

/* x rounded to bf16 once into a buffer (*owned if not the pool's scratch):
 * packed for VDPBF16PS, or as f32 rows of K for the FMA kernels, which base
 * then reads as its x. Sets base's x, ldx, M, K, packed and *kernel; returns
 * -1 when no buffer can be had. */
static int bf16x_prepare(cpm_pool *pool, cpm_isa isa, const float *x, int ldx, int M, int K,
                         cpm_mm_job *base, cpm_mm_kernel *kernel, void **owned) {
    bool dot = isa >= CPM_ISA_AVX512 && cpm_cpu_has_bf16_dot();
    size_t bytes = dot ? cpm_mm_bf16x_packed_size(M, K) : (size_t)M * (size_t)K * sizeof(float);
    void *buf = cpm_pool_buffer(pool, bytes, owned);
    if (!buf)
        return -1;
    *base = (cpm_mm_job){.x = x, .ldx = ldx, .M = M, .K = K, .packed = buf};
    if (dot) {
#if X86_KERNELS && defined(CPM_HAVE_BF16X_KERNEL)
        if (M <= 4) /* a decode row: not worth waking the threads for */
            cpm_mm_bf16x_pack(base, 0, M);
        else
            cpm_pool_run(pool, bf16x_pack_worker, base);
        *kernel = cpm_mm_bf16x;
#endif
    } else {
        cpm_pool_run(pool, bf16x_round_worker, base);
        base->x = buf;
        base->ldx = K;
        *kernel = pick_kernel(isa);
    }
    return 0;
}

void cpm_matmul_bf16x(cpm_pool *pool, float *y, int ldy, const float *x, int ldx,
                      const uint16_t *w, cpm_dtype wtype, int w_ld, int M, int N, int K) {
    cpm_isa isa = isa_in_effect();
    if (M <= 0 || N <= 0)
        return;
    if (bf16x_goes_exact(isa, wtype, K)) {
        cpm_matmul(pool, y, ldy, x, ldx, w, wtype, w_ld, M, N, K);
        return;
    }
    mm_run r = {0};
    void *owned;
    if (bf16x_prepare(pool, isa, x, ldx, M, K, &r.job, &r.kernel, &owned) != 0) {
        cpm_mm_fill_nan(y, (size_t)ldy, M, N);
        return;
    }
    r.job.y = y, r.job.ldy = ldy, r.job.w = w, r.job.wtype = wtype, r.job.w_ld = w_ld, r.job.N = N;
    run_split(pool, &r);
    free(owned);
}

void cpm_matmul_bf16x_multi(cpm_pool *pool, const float *x, int ldx, int M, int K,
                            const cpm_matmul_out *outs, int n_outs) {
    cpm_isa isa = isa_in_effect();
    bool shared = M > 0;
    for (int i = 0; i < n_outs && shared; i++)
        shared = !bf16x_goes_exact(isa, outs[i].wtype, K);
    if (!shared) {
        for (int i = 0; i < n_outs; i++)
            cpm_matmul_bf16x(pool, outs[i].y, outs[i].ldy, x, ldx, outs[i].w, outs[i].wtype,
                             outs[i].w_ld, M, outs[i].N, K);
        return;
    }
    mm_multi r = multi_of(x, ldx, M, K, outs, n_outs, NULL, 16);
    void *owned;
    if (bf16x_prepare(pool, isa, x, ldx, M, K, &r.base, &r.kernel, &owned) != 0) {
        for (int i = 0; i < n_outs; i++)
            if (outs[i].N > 0)
                cpm_mm_fill_nan(outs[i].y, (size_t)outs[i].ldy, M, outs[i].N);
        return;
    }
    run_multi(pool, &r);
    free(owned);
}
