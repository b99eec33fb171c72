/* test_split.c - unit tests for shard/engine/kernels/split.h: the static split
 * and the claimed chunks each cover every row exactly once, in whole units of
 * align, and the chunks hold under threads of a real pool. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdlib.h>

#include "shard/engine/kernels/pool.h"
#include "shard/engine/kernels/split.h"

#define MAX_ROWS 100000

typedef struct split_case {
    int total, align, nt, per_thread;
} split_case;

static const split_case cases[] = {
    {1, 1, 1, 8},     {1, 16, 2, 8},    {15, 16, 2, 8},   {16, 16, 2, 8},
    {512, 16, 2, 8},  {1536, 16, 3, 8}, {73440, 16, 2, 8}, {100, 32, 4, 1},
    {1000, 1, 7, 3},  {33, 16, 8, 8},   {0, 16, 2, 8},
};
#define NCASES (int)(sizeof(cases) / sizeof(cases[0]))

/* Marks [lo, hi) in seen, checking the range starts on a unit and ends on one or at total. */
static void mark(int *seen, int total, int align, int lo, int hi) {
    assert_true(lo >= 0 && lo < hi && hi <= total);
    assert_int_equal(lo % align, 0);
    assert_true(hi == total || hi % align == 0);
    for (int i = lo; i < hi; i++)
        seen[i]++;
}

static void assert_each_once(const int *seen, int total) {
    for (int i = 0; i < total; i++)
        if (seen[i] != 1)
            fail_msg("row %d of %d taken %d times", i, total, seen[i]);
}

static void test_static_covers_each_row_once(void **state) {
    (void)state;
    int *seen = malloc(sizeof(int) * MAX_ROWS);
    assert_non_null(seen);
    for (int c = 0; c < NCASES; c++) {
        const split_case *k = &cases[c];
        for (int i = 0; i < k->total; i++)
            seen[i] = 0;
        for (int t = 0; t < k->nt; t++) {
            int lo, hi;
            cpm_split_static(k->total, k->align, t, k->nt, &lo, &hi);
            if (lo < hi)
                mark(seen, k->total, k->align, lo, hi);
        }
        assert_each_once(seen, k->total);
    }
    free(seen);
}

static void test_chunks_cover_each_row_once(void **state) {
    (void)state;
    int *seen = malloc(sizeof(int) * MAX_ROWS);
    assert_non_null(seen);
    for (int c = 0; c < NCASES; c++) {
        const split_case *k = &cases[c];
        cpm_split s;
        cpm_split_init(&s, k->total, k->align, k->nt, k->per_thread);
        assert_true(s.chunk >= k->align && s.chunk % k->align == 0);
        for (int i = 0; i < k->total; i++)
            seen[i] = 0;
        /* one thread alone: first its own range front to back (one stream), then
         * the others' chunks from their backs */
        int lo, hi, chunks = 0, tid = k->nt - 1;
        long n_chunks = (k->total + s.chunk - 1) / s.chunk;
        long own_first = n_chunks * tid / k->nt, own_end = n_chunks * (tid + 1) / k->nt;
        while (cpm_split_next(&s, tid, &lo, &hi)) {
            mark(seen, k->total, k->align, lo, hi);
            if (chunks < own_end - own_first)
                assert_int_equal(lo, (own_first + chunks) * s.chunk);
            else
                assert_true(lo < own_first * s.chunk); /* taken from another thread */
            chunks++;
        }
        assert_each_once(seen, k->total);
        /* about per_thread chunks each, never more (the chunk is rounded up) */
        assert_true(chunks <= k->nt * k->per_thread);
        for (int t = 0; t < k->nt; t++)
            assert_false(cpm_split_next(&s, t, &lo, &hi)); /* stays exhausted */
    }
    free(seen);
}

typedef struct shared_claim {
    cpm_split split;
    atomic_int *seen;
    atomic_int chunks_by[4];
} shared_claim;

static void claim_fn(void *arg, int tid, int nt) {
    (void)nt;
    shared_claim *c = arg;
    int lo, hi;
    while (cpm_split_next(&c->split, tid, &lo, &hi)) {
        for (int i = lo; i < hi; i++)
            atomic_fetch_add(&c->seen[i], 1);
        atomic_fetch_add(&c->chunks_by[tid], 1);
    }
}

/* Four threads of a real pool claim the chunks of many runs: no row twice, none missed. */
static void test_chunks_under_threads(void **state) {
    (void)state;
    enum { TOTAL = 73440 };
    cpm_pool *pool = cpm_pool_new(4);
    assert_non_null(pool);
    shared_claim c;
    c.seen = malloc(sizeof(atomic_int) * TOTAL);
    assert_non_null(c.seen);
    for (int run = 0; run < 50; run++) {
        for (int i = 0; i < TOTAL; i++)
            atomic_init(&c.seen[i], 0);
        for (int t = 0; t < 4; t++)
            atomic_init(&c.chunks_by[t], 0);
        cpm_split_init(&c.split, TOTAL, 16, 4, 8);
        cpm_pool_run(pool, claim_fn, &c);
        for (int i = 0; i < TOTAL; i++)
            if (atomic_load(&c.seen[i]) != 1)
                fail_msg("run %d: row %d taken %d times", run, i, atomic_load(&c.seen[i]));
        int sum = 0;
        for (int t = 0; t < 4; t++)
            sum += atomic_load(&c.chunks_by[t]);
        assert_int_equal(sum, (TOTAL + c.split.chunk - 1) / c.split.chunk);
    }
    free(c.seen);
    cpm_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_static_covers_each_row_once),
        cmocka_unit_test(test_chunks_cover_each_row_once),
        cmocka_unit_test(test_chunks_under_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
