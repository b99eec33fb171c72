/* bench_ffn_sparse.c - one MiniCPM-S-1B FFN layer (hidden 1536, FFN 3840, FATReLU), dense
 * (cpm_matmul on the row-major weights, as the engine runs other models) against sparse
 * (ffn_sparse.h: gate, then up and the transposed down on the active neurons only), per
 * kernel (sets: the batch's active set), at a chosen share of active neurons.
 *
 * Decode (M = 1) rotates through copies of the layer larger than the last-level cache
 * and reports GB/s of weights actually read; prefill (M > 1) reports the dense FFN's
 * GFLOP/s equivalent (6 H F M flops) and the time per row. Best of several rounds: the
 * build machine is shared. A benchmark, never a test.
 *
 *   bench_ffn_sparse [--threads N] [--active 0.12] [--dtype bf16|f32] [--rows 1,4,32,128]
 */
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/clock.h"
#include "shard/engine/kernels/ffn_sparse.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/ops.h"

#define H 1536
#define F 3840
#define ROTATE_BYTES ((size_t)320 << 20)
#define MAX_M 512

typedef struct layer {
    void *gate, *up, *down, *down_t;
} layer;

typedef struct bench {
    cpm_pool *pool;
    cpm_dtype t;
    layer *L;
    int nl;
    float thr;
    float *x, *g, *u, *y;
    int *ks;
} bench;

static uint32_t rng = 12345u;

static void *rand_weights(cpm_dtype t, size_t n, float amp) {
    void *w = aligned_alloc(64, (n * cpm_dtype_size(t) + 63) & ~(size_t)63);
    for (size_t i = 0; w && i < n; i++) {
        float v = amp * cpm_bench_frand(&rng);
        if (t == CPM_DTYPE_F32)
            ((float *)w)[i] = v;
        else
            ((uint16_t *)w)[i] = cpm_f32_to_bf16(v);
    }
    return w;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* The threshold above which a share `active` of gate x lies, for this x. */
static float threshold_for(bench *b, double active, int M) {
    cpm_matmul(b->pool, b->g, F, b->x, H, b->L[0].gate, b->t, H, M, F, H);
    size_t n = (size_t)M * F;
    float *s = malloc(n * sizeof(float));
    memcpy(s, b->g, n * sizeof(float));
    qsort(s, n, sizeof(float), cmp_float);
    float thr = s[(size_t)((1.0 - active) * (double)(n - 1))];
    free(s);
    return thr;
}

static void ffn_dense(bench *b, const layer *l, int M) {
    cpm_matmul_out outs[2] = {
        {.y = b->g, .ldy = F, .w = l->gate, .wtype = b->t, .w_ld = H, .N = F},
        {.y = b->u, .ldy = F, .w = l->up, .wtype = b->t, .w_ld = H, .N = F}};
    cpm_matmul_multi(b->pool, b->x, H, M, H, outs, 2);
    cpm_fatrelu_mul(b->g, b->u, M * F, b->thr);
    cpm_matmul(b->pool, b->y, H, b->g, F, l->down, b->t, F, M, H, F);
}

typedef struct split {
    double gate, sets, rows, down, total;
    int nk;
} split;

/* The engine's sparse FFN (shard/engine/model/ffn.c), timed per kernel. */
static void ffn_sparse(bench *b, const layer *l, int M, split *sp) {
    double t0 = cpm_bench_seconds();
    cpm_matmul(b->pool, b->g, F, b->x, H, l->gate, b->t, H, M, F, H);
    double t1 = cpm_bench_seconds();
    int nk = cpm_ffn_sparse_active(b->g, F, M, F, b->thr, b->ks, NULL);
    double ta = cpm_bench_seconds();
    cpm_ffn_sparse_up(b->pool, b->g, F, b->x, H, l->up, b->t, H, M, H, b->thr, b->ks, nk);
    double t2 = cpm_bench_seconds();
    cpm_ffn_sparse_down(b->pool, b->y, H, b->g, F, l->down_t, b->t, H, M, H, b->ks, nk);
    double t3 = cpm_bench_seconds();
    sp->gate += t1 - t0;
    sp->sets += ta - t1;
    sp->rows += t2 - ta;
    sp->down += t3 - t2;
    sp->total += t3 - t0;
    sp->nk = nk;
}

static void run_rows(bench *b, int M, int reps) {
    double dense = 1e30, esz = (double)cpm_dtype_size(b->t);
    split best = {.total = 1e30};
    int layers = M == 1 ? b->nl : 1; /* decode from DRAM; prefill as the engine runs it */
    for (int round = 0; round < 5; round++) {
        double t0 = cpm_bench_seconds();
        for (int r = 0; r < reps; r++)
            ffn_dense(b, &b->L[r % layers], M);
        double d = (cpm_bench_seconds() - t0) / reps;
        dense = d < dense ? d : dense;
        split sp = {0};
        for (int r = 0; r < reps; r++)
            ffn_sparse(b, &b->L[r % layers], M, &sp);
        if (sp.total / reps < best.total)
            best = (split){sp.gate / reps, sp.sets / reps, sp.rows / reps, sp.down / reps,
                           sp.total / reps, sp.nk};
    }
    double dense_bytes = 3.0 * H * F * esz;
    double sparse_bytes = (1.0 + 2.0 * best.nk / F) * H * F * esz;
    double flops = 6.0 * H * F * M;
    printf("M %-4d union %5.1f%%  dense %8.1f us %7.1f GB/s %6.1f GF/s | sparse %8.1f us "
           "%7.1f GB/s (gate %.0f, sets %.0f, up %.0f, down %.0f us)  x%.2f\n",
           M, 100.0 * best.nk / F, dense * 1e6, dense_bytes / dense / 1e9, flops / dense / 1e9,
           best.total * 1e6, sparse_bytes / best.total / 1e9, best.gate * 1e6, best.sets * 1e6,
           best.rows * 1e6, best.down * 1e6, dense / best.total);
    fflush(stdout);
}

int main(int argc, char **argv) {
    static const struct option opts[] = {{"threads", 1, 0, 't'}, {"active", 1, 0, 'a'},
                                         {"dtype", 1, 0, 'd'},   {"rows", 1, 0, 'r'},
                                         {0, 0, 0, 0}};
    int threads = 2, c;
    double active = 0.12;
    const char *rows = "1,4,32,128";
    bench b = {.t = CPM_DTYPE_BF16};
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 't') threads = atoi(optarg);
        else if (c == 'a') active = atof(optarg);
        else if (c == 'd') b.t = strcmp(optarg, "f32") ? CPM_DTYPE_BF16 : CPM_DTYPE_F32;
        else if (c == 'r') rows = optarg;
        else return 2;
    }
    if (threads < 1 || !(active > 0 && active <= 1)) {
        fprintf(stderr, "usage: bench_ffn_sparse [--threads N] [--active 0.12] "
                        "[--dtype bf16|f32] [--rows 1,4,32,128]\n");
        return 2;
    }
    b.pool = cpm_pool_new(threads);
    size_t layer_bytes = 3 * (size_t)H * F * cpm_dtype_size(b.t);
    b.nl = (int)(ROTATE_BYTES / layer_bytes) + 1;
    b.L = calloc((size_t)b.nl, sizeof *b.L);
    float amp = sqrtf(3.0f / H);
    for (int l = 0; l < b.nl; l++) {
        b.L[l].gate = rand_weights(b.t, (size_t)F * H, amp);
        b.L[l].up = rand_weights(b.t, (size_t)F * H, amp);
        b.L[l].down = rand_weights(b.t, (size_t)H * F, sqrtf(3.0f / F));
        b.L[l].down_t = aligned_alloc(64, (size_t)H * F * cpm_dtype_size(b.t));
        cpm_ffn_sparse_transpose(b.pool, b.L[l].down_t, b.L[l].down, b.t, H, F, F);
    }
    b.x = aligned_alloc(64, sizeof(float) * MAX_M * H); /* as the engine's scratch: the */
    b.g = aligned_alloc(64, sizeof(float) * MAX_M * F); /* threads' column ranges of y  */
    b.u = aligned_alloc(64, sizeof(float) * MAX_M * F); /* share no cache line          */
    b.y = aligned_alloc(64, sizeof(float) * MAX_M * H);
    b.ks = malloc(sizeof(int) * F);
    for (size_t i = 0; i < (size_t)MAX_M * H; i++)
        b.x[i] = cpm_bench_frand(&rng) * 1.7f; /* unit variance, as rmsnorm's output */
    printf("bench_ffn_sparse: H %d F %d %s, %d threads, isa %s, %d layer copies\n", H, F,
           cpm_dtype_name(b.t), threads, cpm_isa_name(cpm_isa_detect()), b.nl);
    char *list = strdup(rows);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        int M = atoi(tok);
        if (M < 1 || M > MAX_M)
            continue;
        b.thr = threshold_for(&b, active, M);
        run_rows(&b, M, M == 1 ? 200 : M <= 8 ? 50 : 8);
    }
    free(list);
    return 0;
}
