/* bench_fabric.c - what CurveZMQ costs on the fabric: request/reply round trips over tcp
 * loopback between two threads of this process, plain text vs CURVE (the default), for
 * the message sizes the cluster sends: a decode step's hidden row (MiniCPM-1B: 1536
 * floats), a prefill chunk's hidden rows, one logits row (vocab 73440 floats) and a
 * batch of 16. The echo side answers every request with a 16-byte reply, as a stage
 * forwarding to the next one would be answered by nothing heavier. A benchmark: it prints
 * a table and asserts nothing.
 *
 *   build/bench/bench_fabric [--iters N] [--glibc-defaults]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "services/common/curve.h"
#include "services/common/svcmain.h"

typedef struct echo {
    void *z;
    const cpm_curve *curve;
    char ep[64];
    int msgs;
    pthread_barrier_t bound;
} echo;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *echo_main(void *arg) {
    echo *e = arg;
    void *s = zmq_socket(e->z, ZMQ_ROUTER);
    if (e->curve)
        cpm_curve_listen(e->curve, s, CPM_CURVE_FABRIC, NULL);
    zmq_bind(s, "tcp://127.0.0.1:*");
    size_t n = sizeof e->ep;
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, e->ep, &n);
    pthread_barrier_wait(&e->bound);
    char id[256], ack[16] = {0};
    for (int i = 0; i < e->msgs; i++) {
        int idn = zmq_recv(s, id, sizeof id, 0);
        zmq_msg_t m;
        zmq_msg_init(&m);
        zmq_msg_recv(&m, s, 0);
        zmq_msg_close(&m);
        zmq_send(s, id, (size_t)idn, ZMQ_SNDMORE);
        zmq_send(s, ack, sizeof ack, 0);
    }
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(s);
    return NULL;
}

/* Mean seconds per round trip of a size-byte request, iters times (after a warm-up). */
static double round_trips(void *z, const cpm_curve *curve, size_t size, int iters) {
    int warm = 10;
    echo e = {.z = z, .curve = curve, .msgs = iters + warm};
    pthread_barrier_init(&e.bound, NULL, 2);
    pthread_t th;
    pthread_create(&th, NULL, echo_main, &e);
    pthread_barrier_wait(&e.bound);
    void *d = zmq_socket(z, ZMQ_DEALER);
    if (curve)
        cpm_curve_dial(curve, d, NULL);
    zmq_connect(d, e.ep);
    char *buf = calloc(1, size), ack[16];
    double t0 = 0;
    for (int i = 0; i < iters + warm; i++) {
        if (i == warm)
            t0 = now_s();
        zmq_send(d, buf, size, 0);
        zmq_recv(d, ack, sizeof ack, 0);
    }
    double per = (now_s() - t0) / iters;
    pthread_join(th, NULL);
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(d);
    free(buf);
    pthread_barrier_destroy(&e.bound);
    return per;
}

int main(int argc, char **argv) {
    int iters = 200;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--iters"))
            iters = atoi(argv[i + 1]);
    bool tuned = !(argc > 1 && !strcmp(argv[argc - 1], "--glibc-defaults"));
    if (tuned)
        cpm_svc_tune_malloc(); /* as every service does */
    char dir[] = "/tmp/cpm-bench-fabric-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char keys[sizeof dir + 8];
    snprintf(keys, sizeof keys, "%s/keys", dir);
    cpm_error err = {0};
    bool made;
    cpm_curve *curve;
    void *z = zmq_ctx_new();
    if (cpm_curve_generate(keys, NULL, &made, &err) || cpm_curve_load(keys, &curve, &err) ||
        cpm_curve_attach(curve, z, NULL, &err)) {
        fprintf(stderr, "bench_fabric: %s\n", err.msg);
        return 1;
    }
    static const struct {
        const char *what;
        size_t bytes;
    } sizes[] = {
        {"decode hidden row (1 x 1536 f32)", 1536 * 4},
        {"prefill hidden rows (256 x 1536 f32)", 256 * 1536 * 4},
        {"logits row (1 x 73440 f32)", 73440 * 4},
        {"logits rows (16 x 73440 f32)", 16 * 73440 * 4},
    };
    printf("round trips over tcp loopback, %d each; the reply is 16 bytes; malloc %s\n", iters,
           tuned ? "tuned as in the services (cpm_svc_tune_malloc)" : "glibc defaults");
    printf("  %-38s %10s %12s %12s %10s %8s\n", "message", "bytes", "plain us", "CURVE us",
           "CURVE MB/s", "CURVE/plain");
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        int n = sizes[i].bytes > (1 << 20) ? iters / 4 : iters;
        double plain = round_trips(z, NULL, sizes[i].bytes, n);
        double cur = round_trips(z, curve, sizes[i].bytes, n);
        printf("  %-38s %10zu %12.1f %12.1f %10.0f %7.2fx\n", sizes[i].what, sizes[i].bytes,
               plain * 1e6, cur * 1e6, (double)sizes[i].bytes / cur / 1e6, cur / plain);
    }
    zmq_ctx_term(z);
    cpm_curve_free(curve);
    char cmd[sizeof dir + 16];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : 1;
}
