/* test_prefix.c - router/prefix.c: chained block hashes (a block's hash names its whole
 * prefix, never 0) and the directory (leading matches, LRU eviction, touch, clear). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "router/prefix.h"

static void test_hashes(void **state) {
    (void)state;
    int32_t a[48], b[48];
    for (int i = 0; i < 48; i++)
        a[i] = b[i] = i * 7;
    b[20] = -1; /* block 1 differs: blocks 1 and 2 hash differently, block 0 the same */
    uint64_t ha[3], hb[3];
    assert_int_equal(cpm_prefix_hashes(a, 47, ha), 2); /* full blocks only */
    assert_int_equal(cpm_prefix_hashes(a, 48, ha), 3);
    assert_int_equal(cpm_prefix_hashes(b, 48, hb), 3);
    assert_true(ha[0] == hb[0] && ha[1] != hb[1] && ha[2] != hb[2]);
    assert_true(ha[0] && ha[1] && ha[2]);
    /* the same block after a different prefix is a different block */
    assert_true(cpm_prefix_hash(ha[0], a + 32) != cpm_prefix_hash(hb[0] + 1, a + 32));
    assert_true(cpm_prefix_hash(ha[1], a + 32) == ha[2]);
}

static void test_directory(void **state) {
    (void)state;
    cpm_prefix *d = cpm_prefix_new(3);
    uint64_t h[4] = {11, 22, 33, 44};
    for (int i = 0; i < 3; i++)
        cpm_prefix_add(d, h[i]);
    assert_int_equal(cpm_prefix_match(d, h, 4), 3);
    cpm_prefix_touch(d, h, 1);          /* 11 is now the newest */
    cpm_prefix_add(d, h[3]);            /* evicts the oldest: 22 */
    assert_int_equal(cpm_prefix_count(d), 3);
    assert_int_equal(cpm_prefix_match(d, h, 4), 1);
    assert_int_equal(cpm_prefix_match(d, h + 2, 2), 2);
    cpm_prefix_add(d, h[3]);            /* already there: no change in size */
    assert_int_equal(cpm_prefix_count(d), 3);
    cpm_prefix_clear(d);
    assert_int_equal(cpm_prefix_match(d, h, 4), 0);
    for (int i = 0; i < 1000; i++)      /* churn through the map's deletions */
        cpm_prefix_add(d, 1000 + (uint64_t)i);
    uint64_t last[3] = {1997, 1998, 1999};
    assert_int_equal(cpm_prefix_match(d, last, 3), 3);
    cpm_prefix_free(d);
    cpm_prefix_free(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hashes),
        cmocka_unit_test(test_directory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
