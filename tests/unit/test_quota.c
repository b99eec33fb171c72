/* test_quota.c - services/common/quota.c: the bounds in all and per sender, what a refusal
 * says, and that giving back frees both the share and the sender's slot. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "services/common/quota.h"

static cpm_peer peer(int i) {
    cpm_peer p = {.len = 5};
    snprintf((char *)p.id, sizeof p.id, "p%04d", i);
    return p;
}

static void test_share_and_total(void **state) {
    (void)state;
    cpm_quota *q;
    cpm_error e = {0};
    assert_int_equal(cpm_quota_new(4, 1000, 50, &q, &e), 0);
    cpm_peer a = peer(1), b = peer(2), c = peer(3);
    assert_int_equal(cpm_quota_take(q, &a, 100, &e), 0);
    assert_int_equal(cpm_quota_take(q, &a, 100, &e), 0);
    assert_int_equal(cpm_quota_take(q, &a, 100, &e), CPM_ELIMIT); /* 2 of 4 messages is its share */
    assert_non_null(strstr(e.msg, "this sender holds 2 messages, 200 bytes (its share: 2, 500)"));
    assert_int_equal(cpm_quota_take(q, &b, 600, &e), CPM_ELIMIT); /* more than half the bytes */
    assert_int_equal(cpm_quota_take(q, &b, 500, &e), 0);
    assert_int_equal(cpm_quota_take(q, &c, 301, &e), CPM_ELIMIT); /* 700 + 301 > 1000 in all */
    assert_non_null(strstr(e.msg, "bytes queued"));
    assert_int_equal(cpm_quota_take(q, &c, 300, &e), 0);
    assert_int_equal(cpm_quota_take(q, &c, 1, &e), CPM_ELIMIT); /* 4 messages in all */
    int msgs;
    size_t bytes;
    cpm_quota_held(q, &msgs, &bytes);
    assert_int_equal(msgs, 4);
    assert_int_equal(bytes, 1000);
    cpm_quota_give(q, &a, 100);
    assert_int_equal(cpm_quota_take(q, &a, 100, &e), 0);
    cpm_peer stranger = peer(9);
    cpm_quota_give(q, &stranger, 50); /* never charged: nothing changes */
    cpm_quota_held(q, &msgs, &bytes);
    assert_int_equal(msgs, 4);
    assert_int_equal(bytes, 1000);
    cpm_quota_free(q);
}

/* Senders that hold nothing leave no trace: many come and go through 64 slots. */
static void test_slots_are_reused(void **state) {
    (void)state;
    cpm_quota *q;
    cpm_error e = {0};
    assert_int_equal(cpm_quota_new(1000, 1 << 20, 100, &q, &e), 0);
    for (int i = 0; i < CPM_QUOTA_PEERS; i++) {
        cpm_peer p = peer(i);
        assert_int_equal(cpm_quota_take(q, &p, 10, &e), 0);
    }
    cpm_peer late = peer(500);
    assert_int_equal(cpm_quota_take(q, &late, 10, &e), CPM_ELIMIT);
    assert_non_null(strstr(e.msg, "64 senders"));
    for (int i = 0; i < CPM_QUOTA_PEERS; i++) {
        cpm_peer p = peer(i);
        cpm_quota_give(q, &p, 10);
    }
    for (int i = 0; i < 10 * CPM_QUOTA_PEERS; i++) {
        cpm_peer p = peer(1000 + i);
        assert_int_equal(cpm_quota_take(q, &p, 10, &e), 0);
        cpm_quota_give(q, &p, 10);
    }
    int msgs;
    size_t bytes;
    cpm_quota_held(q, &msgs, &bytes);
    assert_int_equal(msgs, 0);
    assert_int_equal(bytes, 0);
    cpm_quota_free(q);
}

static void test_bad_bounds(void **state) {
    (void)state;
    cpm_quota *q;
    cpm_error e = {0};
    assert_int_equal(cpm_quota_new(0, 10, 50, &q, &e), CPM_EINVAL);
    assert_int_equal(cpm_quota_new(1, 10, 101, &q, &e), CPM_EINVAL);
    assert_int_equal(cpm_quota_new(1, 0, 50, &q, &e), CPM_EINVAL);
    assert_int_equal(cpm_quota_new(3, 10, 1, &q, &e), 0); /* a sender may always hold one */
    cpm_peer a = peer(1);
    assert_int_equal(cpm_quota_take(q, &a, 0, &e), 0);
    cpm_quota_free(q);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_share_and_total),
        cmocka_unit_test(test_slots_are_reused),
        cmocka_unit_test(test_bad_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
