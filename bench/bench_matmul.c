/* bench_matmul.c - cpm_matmul on the MiniCPM-1B projection shapes, against the
 * machine's own read bandwidth measured in the same run.
 *
 * Decode (M = 1) is reported as GB/s of weights streamed and as a fraction of
 * that roofline; prefill (M = 64..256) as GFLOP/s. A per-token summary adds the
 * shapes up as the 1B model uses them (52 layers of q, k, v, o, gate, up, down;
 * lm_head once per decoded token, not at all in prefill, where only the last
 * prompt token needs logits). Weights rotate through copies larger than the
 * last-level cache, so decode figures are DRAM figures, not cache figures.
 * Every figure is the best of several rounds (the build machine is shared).
 *
 *   bench_matmul [--quick] [--max-threads N]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/clock.h"
#include "bench/membw.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/pool.h"

#define LAYERS 52
#define MAX_THREADS 8
#define NPREFILL 3

typedef struct mm_shape {
    const char *name;
    int N, K;
    int per_layer; /* 1: once per layer; 0: once per model (lm_head) */
} mm_shape;

static const mm_shape shapes[] = {
    {"q", 1536, 1536, 1},    {"k", 512, 1536, 1},    {"v", 512, 1536, 1},
    {"o", 1536, 1536, 1},    {"gate", 3840, 1536, 1}, {"up", 3840, 1536, 1},
    {"down", 1536, 3840, 1}, {"lm_head", 73440, 1536, 0},
};
#define NSHAPES (int)(sizeof(shapes) / sizeof(shapes[0]))

static const int prefill_m[NPREFILL] = {64, 128, 256};

typedef struct variant {
    cpm_dtype wt;
    cpm_isa isa;
} variant;

typedef struct result {
    double dec_s;              /* seconds per M = 1 call */
    double pre_s[NPREFILL];    /* seconds per prefill call */
} result;

typedef struct options {
    int quick;
    int max_threads;
} options;

static uint32_t rng = 12345u;

static float frand(void) {
    return cpm_bench_frand(&rng);
}

/* Copies of one weight matrix, together larger than the caches. */
typedef struct weights {
    void **copy;
    int ncopies;
    size_t bytes;
} weights;

static int make_weights(weights *w, const mm_shape *s, cpm_dtype wt, size_t rotate_bytes) {
    w->bytes = (size_t)s->N * s->K * cpm_dtype_size(wt);
    w->ncopies = (int)((rotate_bytes + w->bytes - 1) / w->bytes);
    if (w->ncopies < 2)
        w->ncopies = 2;
    w->copy = calloc((size_t)w->ncopies, sizeof(void *));
    if (!w->copy)
        return -1;
    for (int c = 0; c < w->ncopies; c++) {
        w->copy[c] = aligned_alloc(64, (w->bytes + 63) & ~(size_t)63);
        if (!w->copy[c])
            return -1;
        size_t n = (size_t)s->N * s->K;
        if (c > 0) { /* same values, different memory */
            memcpy(w->copy[c], w->copy[0], w->bytes);
            continue;
        }
        for (size_t i = 0; i < n; i++) {
            float v = frand() * 0.05f;
            if (wt == CPM_DTYPE_F32)
                ((float *)w->copy[c])[i] = v;
            else if (wt == CPM_DTYPE_F16)
                ((uint16_t *)w->copy[c])[i] = cpm_f32_to_f16(v);
            else
                ((uint16_t *)w->copy[c])[i] = cpm_f32_to_bf16(v);
        }
    }
    return 0;
}

static void free_weights(weights *w) {
    for (int c = 0; c < w->ncopies && w->copy; c++)
        free(w->copy[c]);
    free(w->copy);
}

/* Seconds per call of y[M, N] = x W^T: the best round, where a round is one
 * call per copy for decode (the copies are what keep W out of the caches) and
 * one call for prefill. Best-of, because this machine is shared: a round that
 * lost the CPU to another process says nothing about the kernel. */
static double time_calls(cpm_pool *pool, const weights *w, cpm_dtype wt, const mm_shape *s,
                         int M, float *x, float *y, double min_s) {
    int per_round = M == 1 ? w->ncopies : 1;
    double best = 1e30, start = cpm_bench_seconds();
    cpm_matmul(pool, y, s->N, x, s->K, w->copy[0], wt, s->K, M, s->N, s->K); /* warm-up */
    for (int round = 0; round < 3 || cpm_bench_seconds() - start < min_s; round++) {
        double t0 = cpm_bench_seconds();
        for (int c = 0; c < per_round; c++)
            cpm_matmul(pool, y, s->N, x, s->K, w->copy[(round + c) % w->ncopies], wt, s->K, M,
                       s->N, s->K);
        double dt = (cpm_bench_seconds() - t0) / per_round;
        best = dt < best ? dt : best;
    }
    return best;
}

static void bench_shape(const options *o, cpm_pool **pools, const mm_shape *s, cpm_dtype wt,
                        const variant *vars, int nvars, result res[][MAX_THREADS][NSHAPES],
                        int si) {
    weights w = {0};
    size_t rotate = o->quick ? (size_t)256 << 20 : (size_t)768 << 20;
    if (make_weights(&w, s, wt, rotate) != 0) {
        fprintf(stderr, "bench_matmul: out of memory for %s\n", s->name);
        exit(1);
    }
    float *x = malloc(sizeof(float) * (size_t)prefill_m[NPREFILL - 1] * s->K);
    float *y = malloc(sizeof(float) * (size_t)prefill_m[NPREFILL - 1] * s->N);
    if (!x || !y) {
        fprintf(stderr, "bench_matmul: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < (size_t)prefill_m[NPREFILL - 1] * s->K; i++)
        x[i] = frand();
    double min_s = o->quick ? 0.05 : 0.25;
    for (int v = 0; v < nvars; v++) {
        if (vars[v].wt != wt)
            continue;
        cpm_isa_force(vars[v].isa);
        for (int t = 0; t < o->max_threads; t++) {
            result *r = &res[v][t][si];
            r->dec_s = time_calls(pools[t], &w, wt, s, 1, x, y, min_s);
            for (int p = 0; p < NPREFILL; p++)
                r->pre_s[p] = time_calls(pools[t], &w, wt, s, prefill_m[p], x, y, min_s);
        }
    }
    free(x);
    free(y);
    free_weights(&w);
}

static void print_variant(const options *o, const variant *var, result res[][NSHAPES],
                          const double *membw) {
    printf("\n### %s weights, %s kernels\n\n", cpm_dtype_name(var->wt), cpm_isa_name(var->isa));
    printf("| thr | shape   |     N |    K | decode GB/s | %% roof | pp64 GFLOP/s | pp128 GFLOP/s | pp256 GFLOP/s |\n");
    printf("|-----|---------|-------|------|-------------|--------|--------------|---------------|---------------|\n");
    for (int t = 0; t < o->max_threads; t++) {
        for (int i = 0; i < NSHAPES; i++) {
            const mm_shape *s = &shapes[i];
            const result *r = &res[t][i];
            double bytes = (double)s->N * s->K * cpm_dtype_size(var->wt);
            double gbps = bytes / r->dec_s * 1e-9;
            printf("| %3d | %-7s | %5d | %4d | %11.2f | %5.1f%% |", t + 1, s->name, s->N, s->K,
                   gbps, 100.0 * gbps / membw[t]);
            for (int p = 0; p < NPREFILL; p++)
                printf(" %12.1f |", 2.0 * prefill_m[p] * s->N * s->K / r->pre_s[p] * 1e-9);
            printf("\n");
        }
    }
}

static void print_summary(const options *o, const variant *vars, int nvars,
                          result res[][MAX_THREADS][NSHAPES], const double *membw) {
    printf("\n### MiniCPM-1B per token (%d layers x q,k,v,o,gate,up,down; decode adds lm_head)\n\n",
           LAYERS);
    printf("| weights | kernels | thr | decode tok/s | decode GB/s | %% roof | pp64 tok/s | pp128 tok/s | pp256 tok/s |\n");
    printf("|---------|---------|-----|--------------|-------------|--------|------------|-------------|-------------|\n");
    for (int v = 0; v < nvars; v++) {
        for (int t = 0; t < o->max_threads; t++) {
            double dec_t = 0, bytes = 0, pre_t[NPREFILL] = {0};
            for (int i = 0; i < NSHAPES; i++) {
                const mm_shape *s = &shapes[i];
                const result *r = &res[v][t][i];
                int times = s->per_layer ? LAYERS : 1;
                dec_t += times * r->dec_s;
                bytes += (double)times * s->N * s->K * cpm_dtype_size(vars[v].wt);
                for (int p = 0; p < NPREFILL; p++)
                    pre_t[p] += s->per_layer ? LAYERS * r->pre_s[p] : 0.0;
            }
            double gbps = bytes / dec_t * 1e-9;
            printf("| %-7s | %-7s | %3d | %12.2f | %11.2f | %5.1f%% |", cpm_dtype_name(vars[v].wt),
                   cpm_isa_name(vars[v].isa), t + 1, 1.0 / dec_t, gbps, 100.0 * gbps / membw[t]);
            for (int p = 0; p < NPREFILL; p++)
                printf(" %10.1f |", prefill_m[p] / pre_t[p]);
            printf("\n");
        }
    }
}

static void empty_fn(void *arg, int tid, int n) {
    (void)arg;
    (void)tid;
    (void)n;
}

/* Best of 20 batches of 5000 empty runs: the fixed cost a kernel pays. */
static double pool_run_cost_us(cpm_pool *pool) {
    const int runs = 5000;
    double best = 1e30;
    for (int b = 0; b < 20; b++) {
        double t0 = cpm_bench_seconds();
        for (int i = 0; i < runs; i++)
            cpm_pool_run(pool, empty_fn, NULL);
        double dt = (cpm_bench_seconds() - t0) / runs * 1e6;
        best = dt < best ? dt : best;
    }
    return best;
}

static options parse_args(int argc, char **argv) {
    options o = {.quick = 0, .max_threads = 2};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            o.quick = 1;
        } else if (strcmp(argv[i], "--max-threads") == 0 && i + 1 < argc) {
            o.max_threads = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--quick] [--max-threads N]\n", argv[0]);
            exit(2);
        }
    }
    if (o.max_threads < 1 || o.max_threads > MAX_THREADS)
        o.max_threads = 2;
    return o;
}

int main(int argc, char **argv) {
    options o = parse_args(argc, argv);
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress shows even when piped */
    cpm_pool *pools[MAX_THREADS];
    for (int t = 0; t < o.max_threads; t++) {
        pools[t] = cpm_pool_new(t + 1);
        if (!pools[t]) {
            fprintf(stderr, "bench_matmul: cannot start %d threads\n", t + 1);
            return 1;
        }
    }
    cpm_isa best = cpm_isa_detect();
    variant vars[4];
    int nvars = 0;
    vars[nvars++] = (variant){CPM_DTYPE_BF16, best};
    if (best == CPM_ISA_AMX) /* AMX serves BF16 only: show the FMA kernel beside it */
        vars[nvars++] = (variant){CPM_DTYPE_BF16, CPM_ISA_AVX512};
    vars[nvars++] = (variant){CPM_DTYPE_F16, best};
    vars[nvars++] = (variant){CPM_DTYPE_F32, best};

    printf("# cpm_matmul on MiniCPM-1B shapes (best ISA: %s)\n\n", cpm_isa_name(best));
    double membw[MAX_THREADS];
    size_t bw_bytes = o.quick ? (size_t)512 << 20 : (size_t)1 << 30;
    for (int t = 0; t < o.max_threads; t++) {
        if (cpm_membw_read(pools[t], bw_bytes, o.quick ? 3 : 5, &membw[t]) != 0) {
            fprintf(stderr, "bench_matmul: cannot allocate the bandwidth buffer\n");
            return 1;
        }
        printf("read bandwidth, %d thread(s): %.2f GB/s (best of %d passes over %zu MiB)\n", t + 1,
               membw[t], o.quick ? 3 : 5, bw_bytes >> 20);
    }
    for (int t = 1; t < o.max_threads; t++)
        printf("empty cpm_pool_run, %d threads: %.2f us\n", t + 1, pool_run_cost_us(pools[t]));

    static result res[4][MAX_THREADS][NSHAPES];
    const cpm_dtype order[] = {CPM_DTYPE_BF16, CPM_DTYPE_F16, CPM_DTYPE_F32};
    for (int i = 0; i < NSHAPES; i++)
        for (int d = 0; d < 3; d++)
            bench_shape(&o, pools, &shapes[i], order[d], vars, nvars, res, i);
    for (int t = 0; t < o.max_threads; t++) { /* again: the roofline is the best seen */
        double again;
        if (cpm_membw_read(pools[t], bw_bytes, o.quick ? 3 : 5, &again) == 0 && again > membw[t])
            membw[t] = again;
        printf("read bandwidth, %d thread(s), best of both runs: %.2f GB/s\n", t + 1, membw[t]);
    }
    for (int v = 0; v < nvars; v++)
        print_variant(&o, &vars[v], res[v], membw);
    print_summary(&o, vars, nvars, res, membw);
    cpm_isa_force(best);
    for (int t = 0; t < o.max_threads; t++)
        cpm_pool_free(pools[t]);
    return 0;
}
