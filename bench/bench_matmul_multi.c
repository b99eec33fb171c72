/* bench_matmul_multi.c - the projections that share one input on the MiniCPM-1B
 * shapes (q/k/v: N 1536 + 512 + 512; gate/up: N 3840 + 3840; K 1536) with BF16
 * weights, as separate cpm_matmul calls and as one cpm_matmul_multi (x packed once
 * on AMX), at prefill sizes. Each figure is the best of several rounds, the two
 * ways alternating round by round, since the machine is shared.
 *
 *   bench_matmul_multi [--max-threads N] [--seconds S]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/clock.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/pool.h"

#define K_DIM 1536
#define MAX_OUTS 3
#define MAX_M 512

typedef struct group {
    const char *name;
    int n_outs;
    int N[MAX_OUTS];
} group;

static const group groups[] = {
    {"q/k/v", 3, {1536, 512, 512}},
    {"gate/up", 2, {3840, 3840}},
};
static const int sizes_m[] = {16, 64, 128, 512};

static uint32_t rng = 12345u;

static float frand(void) {
    return cpm_bench_frand(&rng);
}

static void run_separate(cpm_pool *pool, const float *x, int M, const cpm_matmul_out *o, int n) {
    for (int i = 0; i < n; i++)
        cpm_matmul(pool, o[i].y, o[i].ldy, x, K_DIM, o[i].w, o[i].wtype, o[i].w_ld, M, o[i].N,
                   K_DIM);
}

/* Best seconds per call of each way, alternating, for at least min_s in all. */
static void time_both(cpm_pool *pool, const float *x, int M, const cpm_matmul_out *o, int n,
                      double min_s, double best[2]) {
    best[0] = best[1] = 1e30;
    double start = cpm_bench_seconds();
    for (int round = 0; round < 6 || cpm_bench_seconds() - start < min_s; round++) {
        for (int way = 0; way < 2; way++) {
            double t0 = cpm_bench_seconds();
            if (way == 0)
                run_separate(pool, x, M, o, n);
            else
                cpm_matmul_multi(pool, x, K_DIM, M, K_DIM, o, n);
            double dt = cpm_bench_seconds() - t0;
            best[way] = dt < best[way] ? dt : best[way];
        }
    }
}

static void bench_group(const group *g, cpm_pool *pool, int threads, const float *x,
                        double min_s) {
    cpm_matmul_out o[MAX_OUTS];
    long n_total = 0;
    for (int i = 0; i < g->n_outs; i++) {
        size_t nw = (size_t)g->N[i] * K_DIM;
        uint16_t *w = malloc(nw * sizeof(uint16_t));
        float *y = malloc((size_t)MAX_M * g->N[i] * sizeof(float));
        if (!w || !y) {
            fprintf(stderr, "bench_matmul_multi: out of memory\n");
            exit(1);
        }
        for (size_t j = 0; j < nw; j++)
            w[j] = cpm_f32_to_bf16(frand() * 0.05f);
        o[i] = (cpm_matmul_out){.y = y, .ldy = g->N[i], .w = w, .wtype = CPM_DTYPE_BF16,
                                .w_ld = K_DIM, .N = g->N[i]};
        n_total += g->N[i];
    }
    for (size_t s = 0; s < sizeof(sizes_m) / sizeof(sizes_m[0]); s++) {
        int M = sizes_m[s];
        double best[2];
        time_both(pool, x, M, o, g->n_outs, min_s, best);
        double flop = 2.0 * M * n_total * K_DIM;
        printf("%-8s %7d %5d %12.1f %12.1f %8.1f%%\n", g->name, threads, M, flop / best[0] * 1e-9,
               flop / best[1] * 1e-9, (best[0] / best[1] - 1.0) * 100.0);
    }
    for (int i = 0; i < g->n_outs; i++) {
        free((void *)o[i].w);
        free(o[i].y);
    }
}

int main(int argc, char **argv) {
    int max_threads = 2;
    double min_s = 1.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--max-threads") == 0 && i + 1 < argc)
            max_threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            min_s = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_matmul_multi [--max-threads N] [--seconds S]\n");
            return 2;
        }
    }
    float *x = malloc((size_t)MAX_M * K_DIM * sizeof(float));
    if (!x || max_threads < 1)
        return 1;
    for (size_t i = 0; i < (size_t)MAX_M * K_DIM; i++)
        x[i] = frand();
    printf("isa %s, BF16 weights, K %d; GFLOP/s, best of alternating rounds\n",
           cpm_isa_name(cpm_isa_detect()), K_DIM);
    printf("%-8s %7s %5s %12s %12s %9s\n", "group", "threads", "M", "separate", "multi", "gain");
    for (int t = 1; t <= max_threads; t++) {
        cpm_pool *pool = cpm_pool_new(t);
        if (!pool)
            return 1;
        for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++)
            bench_group(&groups[g], pool, t, x, min_s);
        cpm_pool_free(pool);
    }
    free(x);
    return 0;
}
