/* bench_matmul_q4.c - GPTQ int4 matmul (cpm_matmul_q4) against the BF16
 * cpm_matmul on the MiniCPM-1B projection shapes: decode (M = 1) as weights/s,
 * bytes/s and a fraction of the read bandwidth measured in the same run; M = 4
 * (a few sequences decoding at once) as time per call; prefill (M = 128) as
 * GFLOP/s. Weights rotate through copies larger than the last-level cache, so
 * decode figures are DRAM figures. Best of several rounds (the build machine is
 * shared). A benchmark: nothing is asserted.
 *
 * --hot reuses one copy of each weight instead, so it stays in cache: the
 * kernel's compute ceiling, to tell a compute-bound kernel from a memory-bound
 * one.
 *
 * --activations bf16 times the opt-in bf16-activation int4 kernel
 * (cpm_matmul_q4_bf16x) in the q4 columns instead, --activations int8 the
 * int8-activation one (cpm_matmul_q4_q8x).
 *
 *   bench_matmul_q4 [--threads N] [--group-size G] [--desc-act] [--hot]
 *                   [--activations exact|bf16|int8]
 */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/membw.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/engine/kernels/matmul_q4.h"

#define COPIES_BYTES ((size_t)384 << 20) /* per format: well past any LLC */

static const char *act = "exact"; /* --activations exact|bf16|int8 */

typedef void (*q4_fn)(cpm_pool *, float *, int, const float *, int, const cpm_q4 *, int);

static q4_fn q4_kernel(void) {
    if (strcmp(act, "bf16") == 0)
        return cpm_matmul_q4_bf16x;
    if (strcmp(act, "int8") == 0)
        return cpm_matmul_q4_q8x;
    return cpm_matmul_q4;
}

typedef struct shape {
    const char *name;
    int N, K;
} shape;

static const shape shapes[] = {
    {"q/o", 1536, 1536}, {"k/v", 512, 1536}, {"gate/up", 3840, 1536}, {"down", 1536, 3840},
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 88172645463325252ull;

static uint32_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

static cpm_q4 *make_q4(int N, int K, int gs, int desc_act) {
    int G = K / gs;
    int32_t *qw = malloc((size_t)K / 8 * N * 4), *qz = malloc((size_t)G * N / 8 * 4);
    int32_t *gi = malloc((size_t)K * 4);
    float *sc = malloc((size_t)G * N * 4);
    for (size_t i = 0; i < (size_t)K / 8 * N; i++)
        qw[i] = (int32_t)next();
    for (size_t i = 0; i < (size_t)G * N / 8; i++)
        qz[i] = 0x77777777;
    for (size_t i = 0; i < (size_t)G * N; i++)
        sc[i] = 0.01f;
    for (int k = 0; k < K; k++)
        gi[k] = desc_act ? (int)((k * 7919u) % (unsigned)K) / gs : k / gs;
    cpm_q4_gptq src = {.qweight = qw, .scales = sc, .qzeros = qz, .g_idx = gi, .K = K, .N = N,
                       .group_size = gs, .zero_offset = 1};
    cpm_q4 *w = NULL;
    if (cpm_q4_new(&src, &w, NULL) || (strcmp(act, "int8") == 0 && cpm_q4_to_panels(w)))
        fprintf(stderr, "bench_matmul_q4: repack failed\n");
    free(qw);
    free(qz);
    free(gi);
    free(sc);
    return w;
}

static int hot;      /* --hot: one copy of each weight, cache resident, more rounds */

/* Best seconds per call over rounds, rotating through the copies. */
static double time_q4(cpm_pool *pool, cpm_q4 **ws, int nw, const float *x, float *y, int M) {
    double best = 1e9;
    for (int r = 0; r < (hot && M == 1 ? 200 : 5); r++) {
        double t0 = now();
        for (int i = 0; i < nw; i++)
            q4_kernel()(pool, y, cpm_q4_rows(ws[i]), x, cpm_q4_cols(ws[i]), ws[i], M);
        double t = (now() - t0) / nw;
        best = t < best ? t : best;
    }
    return best;
}

static double time_bf16(cpm_pool *pool, uint16_t **ws, int nw, const float *x, float *y, int M,
                        int N, int K) {
    double best = 1e9;
    for (int r = 0; r < (hot && M == 1 ? 200 : 5); r++) {
        double t0 = now();
        for (int i = 0; i < nw; i++)
            cpm_matmul(pool, y, N, x, K, ws[i], CPM_DTYPE_BF16, K, M, N, K);
        double t = (now() - t0) / nw;
        best = t < best ? t : best;
    }
    return best;
}

static void bench_shape(cpm_pool *pool, const shape *s, int gs, int desc_act, double gbps) {
    const int M = 128;
    int nq = hot ? 1 : (int)(COPIES_BYTES / ((size_t)s->N * s->K / 2)) + 1;
    int nb = hot ? 1 : (int)(COPIES_BYTES / ((size_t)s->N * s->K * 2)) + 1;
    cpm_q4 **qs = calloc((size_t)nq, sizeof *qs);
    uint16_t **bs = calloc((size_t)nb, sizeof *bs);
    float *x = malloc((size_t)M * s->K * 4), *y = malloc((size_t)M * s->N * 4);
    for (size_t i = 0; i < (size_t)M * s->K; i++)
        x[i] = (float)(next() >> 8) / (1 << 24) - 0.5f;
    for (int i = 0; i < nq; i++)
        qs[i] = make_q4(s->N, s->K, gs, desc_act);
    for (int i = 0; i < nb; i++) {
        bs[i] = malloc((size_t)s->N * s->K * 2);
        for (size_t j = 0; j < (size_t)s->N * s->K; j++)
            bs[i][j] = cpm_f32_to_bf16((float)(next() >> 8) / (1 << 24) - 0.5f);
    }
    double tq = time_q4(pool, qs, nq, x, y, 1), tb = time_bf16(pool, bs, nb, x, y, 1, s->N, s->K);
    double t4 = time_q4(pool, qs, nq, x, y, 4); /* a few sequences decoding together */
    double pq = time_q4(pool, qs, nq < 3 ? nq : 3, x, y, M);
    double pb = time_bf16(pool, bs, nb < 3 ? nb : 3, x, y, M, s->N, s->K);
    double qbytes = (double)cpm_q4_bytes(qs[0]), bbytes = (double)s->N * s->K * 2;
    double flops = 2.0 * M * s->N * s->K;
    printf("%-8s %5dx%-5d | q4 %7.1f us %6.1f GB/s %5.1f%% | bf16 %7.1f us %6.1f GB/s %5.1f%% | "
           "x%.2f | M=4 q4 %7.1f us | prefill q4 %6.1f bf16 %6.1f GFLOP/s\n",
           s->name, s->N, s->K, tq * 1e6, qbytes / tq / 1e9, 100 * qbytes / tq / 1e9 / gbps,
           tb * 1e6, bbytes / tb / 1e9, 100 * bbytes / tb / 1e9 / gbps, tb / tq, t4 * 1e6,
           flops / pq / 1e9, flops / pb / 1e9);
    for (int i = 0; i < nq; i++)
        cpm_q4_free(qs[i]);
    for (int i = 0; i < nb; i++)
        free(bs[i]);
    free(qs);
    free(bs);
    free(x);
    free(y);
}

int main(int argc, char **argv) {
    static const struct option opts[] = {{"threads", 1, 0, 't'}, {"group-size", 1, 0, 'g'},
                                         {"desc-act", 0, 0, 'd'}, {"hot", 0, 0, 'h'},
                                         {"activations", 1, 0, 'a'}, {0, 0, 0, 0}};
    int threads = 1, gs = 128, desc_act = 0, c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 't') threads = atoi(optarg);
        else if (c == 'g') gs = atoi(optarg);
        else if (c == 'd') desc_act = 1;
        else if (c == 'h') hot = 1;
        else if (c == 'a') act = optarg;
        else return 2;
    }
    cpm_pool *pool = cpm_pool_new(threads);
    double gbps = 0;
    cpm_membw_read(pool, (size_t)1 << 30, 3, &gbps);
    printf("isa %s  threads %d  group %d%s%s%s%s  read bandwidth %.1f GB/s (decode %% is of this)\n",
           cpm_isa_name(cpm_isa_in_effect()), threads, gs, desc_act ? " act-order" : "",
           hot ? "  hot (cache resident)" : "", strcmp(act, "exact") ? "  q4 activations: " : "",
           strcmp(act, "exact") ? act : "", gbps);
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++)
        bench_shape(pool, &shapes[i], gs, desc_act, gbps);
    cpm_pool_free(pool);
    return 0;
}
