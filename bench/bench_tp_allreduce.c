/* bench_tp_allreduce.c - the transport cost of one tensor-parallel all-reduce (shard/tp.c)
 * with no compute around it: T ranks on threads of this process, each a cpm_tp_mesh over
 * tcp loopback (or ipc), run K all-reduces of [rows, hidden] floats in lock-step. Prints
 * the mean wall time per all-reduce. Decode is rows = 1; each layer costs two of these.
 *
 *   build/bench/bench_tp_allreduce [--ranks 2] [--hidden 4096] [--rows 1] [--iters 2000] [--ipc]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>
#include <zmq.h>

#include "shard/tp.h"

typedef struct rank {
    cpm_tp_mesh *mesh;
    float *x;
    size_t n;
    int iters, rc;
    cpm_error err;
} rank;

static void *run(void *arg) {
    rank *k = arg;
    cpm_allreduce_backend b = cpm_tp_mesh_backend(k->mesh);
    cpm_tp_mesh_begin(k->mesh, 1);
    for (int i = 0; i < k->iters && k->rc == 0; i++)
        k->rc = b.sum(b.ud, i / 2, i % 2, k->x, k->n, &k->err);
    return NULL;
}

int main(int argc, char **argv) {
    int T = 2, hidden = 4096, rows = 1, iters = 2000, base = 7300 + (int)(getpid() % 500) * 8;
    int ipc = 0;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(argv[i], "--ranks"))
            T = atoi(v), i++;
        else if (!strcmp(argv[i], "--hidden"))
            hidden = atoi(v), i++;
        else if (!strcmp(argv[i], "--rows"))
            rows = atoi(v), i++;
        else if (!strcmp(argv[i], "--iters"))
            iters = atoi(v), i++;
        else if (!strcmp(argv[i], "--ipc"))
            ipc = 1;
        else {
            fprintf(stderr, "usage: bench_tp_allreduce [--ranks T] [--hidden H] [--rows N] "
                            "[--iters K] [--ipc]\n");
            return 2;
        }
    }
    if (T < 2 || T > CPM_TP_MAX || hidden < 1 || rows < 1 || iters < 1) {
        fprintf(stderr, "bench_tp_allreduce: ranks 2..%d, positive sizes\n", CPM_TP_MAX);
        return 2;
    }
    void *z = zmq_ctx_new();
    char eps[CPM_TP_MAX][64];
    const char *mesh[CPM_TP_MAX];
    rank k[CPM_TP_MAX];
    pthread_t th[CPM_TP_MAX];
    size_t n = (size_t)rows * (size_t)hidden;
    for (int r = 0; r < T; r++) {
        if (ipc)
            snprintf(eps[r], sizeof eps[r], "ipc:///tmp/cpm-bench-tp-%d-%d", (int)getpid(), r);
        else
            snprintf(eps[r], sizeof eps[r], "tcp://127.0.0.1:%d", base + r);
        mesh[r] = eps[r];
    }
    for (int r = 0; r < T; r++) {
        k[r] = (rank){.n = n, .iters = iters, .x = calloc(n, sizeof(float))};
        if (!k[r].x || cpm_tp_mesh_new(z, NULL, r, T, mesh, hidden, rows, 10000, &k[r].mesh, &k[r].err)) {
            fprintf(stderr, "bench_tp_allreduce: %s\n", k[r].err.msg);
            return 1;
        }
    }
    uint64_t t0 = uv_hrtime();
    for (int r = 0; r < T; r++)
        pthread_create(&th[r], NULL, run, &k[r]);
    for (int r = 0; r < T; r++)
        pthread_join(th[r], NULL);
    double us = (double)(uv_hrtime() - t0) / 1e3 / iters;
    for (int r = 0; r < T; r++)
        if (k[r].rc) {
            fprintf(stderr, "bench_tp_allreduce: rank %d: %s\n", r, k[r].err.msg);
            return 1;
        }
    printf("%d ranks over %s, [%d, %d] f32 (%zu KiB) per partial: %.1f us per all-reduce "
           "(%d all-reduces)\n", T, ipc ? "ipc" : "tcp loopback", rows, hidden, n * 4 / 1024, us,
           iters);
    for (int r = 0; r < T; r++) {
        cpm_tp_mesh_free(k[r].mesh);
        free(k[r].x);
    }
    zmq_ctx_term(z);
    return 0;
}
