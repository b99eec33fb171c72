/* membw_main.c - prints this machine's streaming read bandwidth (bench/membw.h),
 * the figure every roofline in bench/ divides by.
 *
 *   bench_membw [THREADS (default 1)] [MiB (default 1024)] [PASSES (default 5)]
 *
 * Prints one line: "read GB/s <best pass> threads <n>". A benchmark, never a test.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bench/membw.h"
#include "shard/engine/kernels/pool.h"

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    long mib = argc > 2 ? atol(argv[2]) : 1024;
    int passes = argc > 3 ? atoi(argv[3]) : 5;
    if (threads < 1 || mib < 1 || passes < 1) {
        fprintf(stderr, "usage: bench_membw [THREADS] [MiB] [PASSES]\n");
        return 2;
    }
    cpm_pool *pool = cpm_pool_new(threads);
    if (!pool) {
        fprintf(stderr, "bench_membw: cannot start %d threads\n", threads);
        return 1;
    }
    double gbps = 0;
    int rc = cpm_membw_read(pool, (size_t)mib << 20, passes, &gbps);
    cpm_pool_free(pool);
    if (rc) {
        fprintf(stderr, "bench_membw: cannot allocate %ld MiB\n", mib);
        return 1;
    }
    printf("read GB/s %.2f threads %d\n", gbps, threads);
    return 0;
}
