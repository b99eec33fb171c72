/* membw.c - streaming read bandwidth: the roofline for decode matmuls.
 *
 * Each thread sums its slice with 64-byte (AVX-512) or 32-byte (AVX2) loads
 * and four independent accumulators, so neither the core nor the adds limit
 * the figure; only the memory system does.
 */
#include "membw.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"

typedef struct membw_job {
    const char *buf;
    size_t bytes;
    double sink[64]; /* one slot per thread, so the sums are not optimised out */
} membw_job;

__attribute__((target("avx512f"))) static double sum_avx512(const char *p, size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps((const float *)(p + i)));
        a1 = _mm512_add_ps(a1, _mm512_load_ps((const float *)(p + i + 64)));
        a2 = _mm512_add_ps(a2, _mm512_load_ps((const float *)(p + i + 128)));
        a3 = _mm512_add_ps(a3, _mm512_load_ps((const float *)(p + i + 192)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

__attribute__((target("avx2"))) static double sum_avx2(const char *p, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps((const float *)(p + i)));
        a1 = _mm256_add_ps(a1, _mm256_load_ps((const float *)(p + i + 32)));
        a2 = _mm256_add_ps(a2, _mm256_load_ps((const float *)(p + i + 64)));
        a3 = _mm256_add_ps(a3, _mm256_load_ps((const float *)(p + i + 96)));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

static void membw_worker(void *arg, int tid, int nt) {
    membw_job *job = arg;
    size_t chunk = job->bytes / (size_t)nt & ~(size_t)255;
    const char *p = job->buf + chunk * (size_t)tid;
    double s = __builtin_cpu_supports("avx512f") ? sum_avx512(p, chunk) : sum_avx2(p, chunk);
    job->sink[tid & 63] += s;
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int cpm_membw_read(cpm_pool *pool, size_t bytes, int reps, double *ret_gbps) {
    bytes &= ~(size_t)4095;
    char *buf = aligned_alloc(4096, bytes);
    if (!buf)
        return CPM_ENOMEM;
    memset(buf, 0, bytes); /* fault every page in before timing (zeros sum fast and exactly) */
    membw_job job = {.buf = buf, .bytes = bytes};
    int nt = cpm_pool_size(pool);
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        double t0 = seconds();
        cpm_pool_run(pool, membw_worker, &job);
        double dt = seconds() - t0;
        double gbps = (double)(bytes / (size_t)nt & ~(size_t)255) * nt / dt * 1e-9;
        if (gbps > best)
            best = gbps;
    }
    free(buf);
    *ret_gbps = best;
    return 0;
}
