/* clock.h - what every benchmark times with, and its reproducible test data. */
#ifndef CPM_BENCH_CLOCK_H
#define CPM_BENCH_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Monotonic seconds. */
static inline double cpm_bench_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Uniform in [-1, 1) from a linear congruential state: the same data on every run. */
static inline float cpm_bench_frand(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

#endif
