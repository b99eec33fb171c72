/* test_json_match.c - services/sampler/json_match.c: what it accepts and refuses, byte
 * by byte, and that min_close is exact: appending the cheapest closing bytes completes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "services/sampler/json_match.h"

/* Feeds s; returns the number of bytes taken before it died (strlen when all). */
static size_t feed(cpm_jm *m, const char *s) {
    size_t i = 0;
    while (s[i] && cpm_jm_feed(m, (uint8_t)s[i]))
        i++;
    return i;
}

static void test_accepts_complete_objects(void **state) {
    (void)state;
    const char *good[] = {
        "{}", "{\"a\":1}", "{\"a\":-0.5e+10,\"b\":[true,false,null,\"x\"],\"c\":{\"d\":{}}}",
        "{\"s\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\"}", "{\"u\":\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\"}",
        "{\"n\":[0,10,1.5,2E3,-7]}", "{\"e\":[]}",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        cpm_jm m;
        cpm_jm_init(&m);
        if (feed(&m, good[i]) != strlen(good[i]) || !cpm_jm_done(&m))
            fail_msg("refused: %s", good[i]);
        assert_int_equal(cpm_jm_min_close(&m), 0);
    }
}

static void test_refuses(void **state) {
    (void)state;
    const char *bad[][2] = { /* text, the prefix that is still fine */
        {"[1]", ""}, {" {}", ""}, {"{ }", "{"}, {"{\"a\":01}", "{\"a\":0"}, {"{\"a\":1}x", "{\"a\":1}"},
        {"{\"a\":.5}", "{\"a\":"}, {"{\"a\":1.}", "{\"a\":1."}, {"{\"a\":tru}", "{\"a\":tru"},
        {"{a:1}", "{"}, {"{\"a\"1}", "{\"a\""}, {"{\"a\":1,}", "{\"a\":1,"}, {"{\"a\":[1,]}", "{\"a\":[1,"},
        {"{\"a\":\"\\x\"}", "{\"a\":\"\\"}, {"{\"a\":\"\\u12g4\"}", "{\"a\":\"\\u12"},
        {"{\"a\":\"\x01\"}", "{\"a\":\""}, {"{\"a\":\"\xc0\xaf\"}", "{\"a\":\""},
        {"{\"a\":\"\xed\xa0\x80\"}", "{\"a\":\"\xed"}, {"{\"a\":\"\xf4\x90\x80\x80\"}", "{\"a\":\"\xf4"},
        {"{\"a\":1]", "{\"a\":1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cpm_jm m;
        cpm_jm_init(&m);
        size_t took = feed(&m, bad[i][0]);
        if (took != strlen(bad[i][1]))
            fail_msg("%s: took %zu bytes, expected %zu", bad[i][0], took, strlen(bad[i][1]));
        assert_true(m.dead && !cpm_jm_done(&m));
    }
    /* too deep */
    cpm_jm m;
    cpm_jm_init(&m);
    assert_true(cpm_jm_feed(&m, '{') && cpm_jm_feed(&m, '"') && cpm_jm_feed(&m, '"') && cpm_jm_feed(&m, ':'));
    int ok = 1;
    for (int d = 0; d < CPM_JM_MAX_DEPTH + 2 && ok; d++)
        ok = cpm_jm_feed(&m, '[');
    assert_false(ok);
}

/* The cheapest bytes after each state: what min_close counts, and they complete. */
static const char *closer(const cpm_jm *m, char *out) {
    /* greedy: among single bytes, one that lowers min_close */
    int k = 0;
    cpm_jm cur = *m;
    while (!cpm_jm_done(&cur) && k < 64) {
        const char cand[] = "}]\"0:eulsa{\x82";
        int best = -1, best_cost = 1 << 30;
        for (size_t c = 0; c < sizeof cand - 1; c++) {
            cpm_jm t = cur;
            if (cpm_jm_feed(&t, (uint8_t)cand[c]) && cpm_jm_min_close(&t) < best_cost)
                best = (int)c, best_cost = cpm_jm_min_close(&t);
        }
        if (best < 0)
            break;
        cpm_jm_feed(&cur, (uint8_t)cand[best]);
        out[k++] = cand[best];
    }
    out[k] = '\0';
    return out;
}

static void test_min_close_is_exact(void **state) {
    (void)state;
    const char *prefixes[] = {"", "{", "{\"", "{\"ab", "{\"a\"", "{\"a\":", "{\"a\":[", "{\"a\":[1,",
                              "{\"a\":{\"b\":-", "{\"a\":1.", "{\"a\":1e", "{\"a\":tr", "{\"a\":\"\\u0",
                              "{\"a\":\"\xe2\x82", "{\"a\":[{},[[", "{\"a\":\"\\"};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++) {
        cpm_jm m;
        cpm_jm_init(&m);
        assert_int_equal(feed(&m, prefixes[i]), strlen(prefixes[i]));
        int need = cpm_jm_min_close(&m);
        char out[80];
        closer(&m, out);
        cpm_jm t = m;
        feed(&t, out);
        if (!cpm_jm_done(&t) || (int)strlen(out) != need)
            fail_msg("%s: min_close %d, closed by %s (%zu bytes, done %d)", prefixes[i], need, out,
                     strlen(out), cpm_jm_done(&t));
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_complete_objects),
        cmocka_unit_test(test_refuses),
        cmocka_unit_test(test_min_close_is_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
