/* test_u64map.c - common/u64map.c against a plain array, through random puts and
 * removes (deletion inside probe runs), keys that collide in their low bits, full and
 * zero-key refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>

#include "common/u64map.h"

#define N 200

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

static void test_against_array(void **state) {
    (void)state;
    cpm_u64map *m = cpm_u64map_new(N);
    uint64_t keys[N] = {0};
    int vals[N];
    for (int round = 0; round < 100000; round++) {
        int i = (int)(next() % N);
        /* keys sharing low bits make long probe runs */
        uint64_t k = ((next() % 64) + 1) << 40 | (uint64_t)i;
        if (keys[i]) {
            cpm_u64map_remove(m, keys[i]);
            keys[i] = 0;
        } else if (cpm_u64map_get(m, k) < 0) {
            assert_true(cpm_u64map_put(m, k, round));
            keys[i] = k, vals[i] = round;
        }
        if (round % 997 == 0) {
            int live = 0;
            for (int j = 0; j < N; j++)
                if (keys[j]) {
                    assert_int_equal(cpm_u64map_get(m, keys[j]), vals[j]);
                    live++;
                }
            assert_int_equal(cpm_u64map_count(m), live);
        }
    }
    cpm_u64map_free(m);
}

static void test_limits(void **state) {
    (void)state;
    cpm_u64map *m = cpm_u64map_new(2);
    assert_false(cpm_u64map_put(m, 0, 1));
    assert_int_equal(cpm_u64map_get(m, 0), -1);
    assert_true(cpm_u64map_put(m, 5, 1));
    assert_false(cpm_u64map_put(m, 5, 2)); /* already there */
    assert_true(cpm_u64map_put(m, 6, 2));
    assert_false(cpm_u64map_put(m, 7, 3)); /* full */
    cpm_u64map_remove(m, 99);
    cpm_u64map_clear(m);
    assert_int_equal(cpm_u64map_count(m), 0);
    assert_int_equal(cpm_u64map_get(m, 5), -1);
    cpm_u64map_free(m);
    cpm_u64map_free(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_array),
        cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
