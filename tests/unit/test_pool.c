/* test_pool.c - unit tests for shard/engine/kernels/pool.c: every thread runs every
 * section exactly once, results are visible to the caller, sleeping workers
 * wake up, and the edge cases (one thread, NULL pool) behave. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shard/engine/kernels/pool.h"

#define MAX_THREADS 8

typedef struct counts {
    atomic_long calls[MAX_THREADS];
    atomic_int bad_n;
    int expect_n;
    long slot[MAX_THREADS]; /* plain writes, read by the caller after the run */
    long run;
} counts;

static void count_fn(void *arg, int tid, int n) {
    counts *c = arg;
    if (n != c->expect_n || tid < 0 || tid >= n)
        atomic_fetch_add(&c->bad_n, 1);
    else
        atomic_fetch_add(&c->calls[tid], 1);
    if (tid >= 0 && tid < MAX_THREADS)
        c->slot[tid] = c->run;
}

static void test_free_null(void **state) {
    (void)state;
    cpm_pool_free(NULL);
    assert_null(cpm_pool_new(0));
    assert_null(cpm_pool_new(-3));
    assert_int_equal(cpm_pool_size(NULL), 1);
}

static void test_null_pool_runs_inline(void **state) {
    (void)state;
    counts c = {.expect_n = 1};
    cpm_pool_run(NULL, count_fn, &c);
    assert_int_equal(atomic_load(&c.calls[0]), 1);
    assert_int_equal(atomic_load(&c.bad_n), 0);
}

static void test_one_thread(void **state) {
    (void)state;
    cpm_pool *p = cpm_pool_new(1);
    assert_non_null(p);
    assert_int_equal(cpm_pool_size(p), 1);
    counts c = {.expect_n = 1};
    for (int i = 0; i < 1000; i++)
        cpm_pool_run(p, count_fn, &c);
    assert_int_equal(atomic_load(&c.calls[0]), 1000);
    assert_int_equal(atomic_load(&c.bad_n), 0);
    cpm_pool_free(p);
}

/* 100k runs: every tid exactly once per run, and every worker's plain write
 * of the run number is visible when cpm_pool_run returns. */
static void check_many_runs(int nthreads, long runs) {
    cpm_pool *p = cpm_pool_new(nthreads);
    assert_non_null(p);
    assert_int_equal(cpm_pool_size(p), nthreads);
    counts *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    c->expect_n = nthreads;
    long stale = 0;
    for (long r = 1; r <= runs; r++) {
        c->run = r;
        cpm_pool_run(p, count_fn, c);
        for (int t = 0; t < nthreads; t++)
            stale += c->slot[t] != r;
    }
    assert_int_equal(stale, 0);
    assert_int_equal(atomic_load(&c->bad_n), 0);
    for (int t = 0; t < nthreads; t++)
        assert_int_equal(atomic_load(&c->calls[t]), runs);
    free(c);
    cpm_pool_free(p);
}

static void test_100k_runs_2_threads(void **state) {
    (void)state;
    check_many_runs(2, 100000);
}

static void test_runs_4_threads(void **state) {
    (void)state;
    /* More threads than this machine's cores: exercises the sleep path. */
    check_many_runs(4, 20000);
}

static void sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void test_wakes_after_idle(void **state) {
    (void)state;
    cpm_pool *p = cpm_pool_new(3);
    assert_non_null(p);
    counts c = {.expect_n = 3};
    for (int i = 0; i < 5; i++) {
        sleep_ms(20); /* long enough for the workers to stop spinning */
        cpm_pool_run(p, count_fn, &c);
    }
    for (int t = 0; t < 3; t++)
        assert_int_equal(atomic_load(&c.calls[t]), 5);
    cpm_pool_free(p);
}

/* A section whose threads finish at very different times. */
static void uneven_fn(void *arg, int tid, int n) {
    (void)n;
    atomic_long *sum = arg;
    if (tid == 1)
        sleep_ms(10);
    atomic_fetch_add(sum, tid + 1);
}

static void test_waits_for_slow_worker(void **state) {
    (void)state;
    cpm_pool *p = cpm_pool_new(2);
    assert_non_null(p);
    for (int i = 0; i < 3; i++) {
        atomic_long sum = 0;
        cpm_pool_run(p, uneven_fn, &sum);
        assert_int_equal(atomic_load(&sum), 3);
    }
    cpm_pool_free(p);
}

static void test_scratch(void **state) {
    (void)state;
    assert_null(cpm_pool_scratch(NULL, 16));
    cpm_pool *p = cpm_pool_new(2);
    assert_non_null(p);
    char *a = cpm_pool_scratch(p, 1000);
    assert_non_null(a);
    assert_int_equal((uintptr_t)a % 64, 0);
    memset(a, 1, 1000);
    assert_ptr_equal(cpm_pool_scratch(p, 10), a); /* smaller: no new buffer */
    char *b = cpm_pool_scratch(p, 1 << 20);
    assert_non_null(b);
    assert_int_equal((uintptr_t)b % 64, 0);
    memset(b, 2, 1 << 20);
    cpm_pool_free(p);
}

/* A call's buffer: the pool's scratch when there is a pool, else one the caller owns. */
static void test_buffer(void **state) {
    (void)state;
    void *owned;
    char *own = cpm_pool_buffer(NULL, 100, &owned);
    assert_non_null(own);
    assert_ptr_equal(own, owned); /* no pool: the caller frees it */
    assert_int_equal((uintptr_t)own % 64, 0);
    memset(own, 3, 100);
    free(owned);
    cpm_pool *p = cpm_pool_new(2);
    assert_non_null(p);
    char *a = cpm_pool_buffer(p, 1000, &owned);
    assert_null(owned);
    assert_ptr_equal(a, cpm_pool_scratch(p, 1000));
    cpm_pool_free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_free_null),
        cmocka_unit_test(test_null_pool_runs_inline),
        cmocka_unit_test(test_one_thread),
        cmocka_unit_test(test_100k_runs_2_threads),
        cmocka_unit_test(test_runs_4_threads),
        cmocka_unit_test(test_wakes_after_idle),
        cmocka_unit_test(test_waits_for_slow_worker),
        cmocka_unit_test(test_scratch),
        cmocka_unit_test(test_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
