/* test_grammar.c - services/sampler/grammar.c: the byte grammar and its matcher.
 * Nested and ambiguous rules, the JSON string lexer (escapes, UTF-8 forms, the Python-
 * safe subset), min_close exact (a greedy walk closes in exactly that many bytes), a
 * grammar with no finite text refused, and self-calling rules that terminate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "services/sampler/grammar.h"

static cpm_gram_run *run;

/* Feeds s; how many bytes were taken before the matcher died. */
static size_t feed(cpm_gram_state *st, const char *s, size_t n) {
    size_t i = 0;
    while (i < n && cpm_gram_feed(run, st, (uint8_t)s[i]))
        i++;
    return i;
}

static bool matches(const cpm_gram *g, const char *s, size_t n) {
    cpm_gram_state st;
    assert_true(cpm_gram_start(run, g, &st));
    return feed(&st, s, n) == n && cpm_gram_done(&st);
}

#define MATCHES(g, s) matches(g, s, sizeof(s) - 1)

static cpm_gram_el ref(int r) {
    return (cpm_gram_el){CPM_GRAM_RULE, (uint32_t)r};
}

/* S = "a" S "b" | "" : a^n b^n */
static cpm_gram *anbn(void) {
    cpm_gram *g = cpm_gram_new();
    cpm_gram_seq s = {0};
    int S = cpm_gram_rule(g);
    cpm_gram_seq_lit(g, &s, "a", 1);
    cpm_gram_seq_push(&s, ref(S));
    cpm_gram_seq_lit(g, &s, "b", 1);
    assert_int_equal(cpm_gram_alt(g, S, &s), 0);
    assert_int_equal(cpm_gram_alt(g, S, &s), 0);
    cpm_gram_seq_free(&s);
    cpm_error e = {0};
    assert_int_equal(cpm_gram_finish(g, S, &e), 0);
    return g;
}

static void test_nested(void **state) {
    (void)state;
    cpm_gram *g = anbn();
    assert_true(MATCHES(g, ""));
    assert_true(MATCHES(g, "ab"));
    assert_true(MATCHES(g, "aaabbb"));
    assert_false(MATCHES(g, "aab"));
    assert_false(MATCHES(g, "abab"));
    cpm_gram_state st;
    cpm_gram_start(run, g, &st);
    assert_int_equal(feed(&st, "aaa", 3), 3);
    assert_int_equal(cpm_gram_min_close(run, &st), 3);
    assert_int_equal(feed(&st, "bb", 2), 2);
    assert_int_equal(cpm_gram_min_close(run, &st), 1);
    assert_false(cpm_gram_feed(run, &st, 'a')); /* an 'a' after a 'b' */
    assert_int_equal(st.n, 0);
    assert_int_equal(cpm_gram_min_close(run, &st), CPM_GRAM_INF);
    cpm_gram_free(g);
}

/* S = A | B;  A = "ab" "c";  B = "a" "bd": both alive after "ab", one after each end. */
static void test_ambiguous(void **state) {
    (void)state;
    cpm_gram *g = cpm_gram_new();
    cpm_gram_seq s = {0};
    int S = cpm_gram_rule(g), A = cpm_gram_rule(g), B = cpm_gram_rule(g);
    cpm_gram_seq_push(&s, ref(A));
    cpm_gram_alt(g, S, &s);
    cpm_gram_seq_push(&s, ref(B));
    cpm_gram_alt(g, S, &s);
    cpm_gram_seq_lit(g, &s, "abc", 3);
    cpm_gram_alt(g, A, &s);
    cpm_gram_seq_lit(g, &s, "abdd", 4);
    cpm_gram_alt(g, B, &s);
    cpm_gram_seq_free(&s);
    cpm_error e = {0};
    assert_int_equal(cpm_gram_finish(g, S, &e), 0);
    cpm_gram_state st;
    cpm_gram_start(run, g, &st);
    assert_int_equal(feed(&st, "ab", 2), 2);
    assert_int_equal(st.n, 2);
    assert_int_equal(cpm_gram_min_close(run, &st), 1);
    assert_true(MATCHES(g, "abc"));
    assert_true(MATCHES(g, "abdd"));
    assert_false(MATCHES(g, "abd"));
    assert_false(MATCHES(g, "abcd"));
    cpm_gram_free(g);
}

static cpm_gram *string_grammar(uint32_t flags) {
    cpm_gram *g = cpm_gram_new();
    cpm_gram_seq s = {0};
    int S = cpm_gram_rule(g);
    cpm_gram_seq_push(&s, (cpm_gram_el){CPM_GRAM_STRING, flags});
    cpm_gram_alt(g, S, &s);
    cpm_gram_seq_free(&s);
    cpm_error e = {0};
    assert_int_equal(cpm_gram_finish(g, S, &e), 0);
    return g;
}

static void test_strings(void **state) {
    (void)state;
    cpm_gram *g = string_grammar(0), *py = string_grammar(CPM_GRAM_STR_PY);
    static const char *const good[] = {
        "\"\"", "\"abc\"", "\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"", "\"\\u00e9\\uD83D\\ude00\"",
        "\"\xc3\xa9\"", "\"\xe2\x82\xac\"", "\"\xf0\x9f\x98\x80\"", "\"\xf4\x8f\xbf\xbf\"", "\"\xed\x9f\xbf\"",
    };
    static const char *const bad[] = {
        "\"a", "abc", "\"\\x41\"", "\"\\u12g4\"", "\"\n\"", "\"\xc0\x80\"", "\"\xc3\"",
        "\"\xe0\x80\x80\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"", "\"\xf5\x80\x80\x80\"",
        "\"\xff\"", "\"a\"b",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        if (!matches(g, good[i], strlen(good[i])))
            fail_msg("refused %s", good[i]);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (matches(g, bad[i], strlen(bad[i])))
            fail_msg("took %s", bad[i]);
    /* Python-safe strings: no \/ and no \u (toolcall.c reads them back as Python does) */
    assert_true(MATCHES(py, "\"a\\nb\\\"\""));
    assert_false(MATCHES(py, "\"a\\/b\""));
    assert_false(MATCHES(py, "\"\\u0041\""));
    /* what is left to close, mid-string */
    cpm_gram_state st;
    cpm_gram_start(run, g, &st);
    assert_int_equal(cpm_gram_min_close(run, &st), 2);
    feed(&st, "\"ab\\u00", 7);
    assert_int_equal(cpm_gram_min_close(run, &st), 3);
    feed(&st, "e9\xf0\x9f", 4);
    assert_int_equal(cpm_gram_min_close(run, &st), 3);
    cpm_gram_free(g);
    cpm_gram_free(py);
}

/* From every prefix of a text, always taking a byte that lowers min_close by one reaches a
 * complete text in exactly min_close bytes. */
static void test_min_close_exact(void **state) {
    (void)state;
    cpm_gram *g = anbn();
    const char *text = "aaaabbbb";
    for (size_t cut = 0; cut <= 4; cut++) {
        cpm_gram_state st;
        cpm_gram_start(run, g, &st);
        feed(&st, text, cut);
        int need = cpm_gram_min_close(run, &st), took = 0;
        while (!cpm_gram_done(&st)) {
            bool moved = false;
            for (int b = 0; b < 256 && !moved; b++) {
                cpm_gram_state t = st;
                if (cpm_gram_feed(run, &t, (uint8_t)b) && cpm_gram_min_close(run, &t) == need - took - 1)
                    st = t, moved = true;
            }
            assert_true(moved);
            took++;
        }
        assert_int_equal(took, need);
    }
    cpm_gram_free(g);
}

/* S = S "a": no finite text; T = T | "x": a rule that calls itself without a byte. */
static void test_degenerate(void **state) {
    (void)state;
    cpm_gram *g = cpm_gram_new();
    cpm_gram_seq s = {0};
    int S = cpm_gram_rule(g);
    cpm_gram_seq_push(&s, ref(S));
    cpm_gram_seq_lit(g, &s, "a", 1);
    cpm_gram_alt(g, S, &s);
    cpm_error e = {0};
    assert_int_equal(cpm_gram_finish(g, S, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "no finite text"));
    cpm_gram_free(g);
    g = cpm_gram_new();
    int T = cpm_gram_rule(g);
    cpm_gram_seq_push(&s, ref(T));
    cpm_gram_alt(g, T, &s);
    cpm_gram_seq_lit(g, &s, "x", 1);
    cpm_gram_alt(g, T, &s);
    cpm_gram_seq_free(&s);
    assert_int_equal(cpm_gram_finish(g, T, &e), 0);
    assert_true(MATCHES(g, "x"));
    assert_false(MATCHES(g, "xx"));
    cpm_gram_free(g);
}

static int setup(void **state) {
    (void)state;
    run = cpm_gram_run_new();
    return run ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    cpm_gram_run_free(run);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nested),
        cmocka_unit_test(test_ambiguous),
        cmocka_unit_test(test_strings),
        cmocka_unit_test(test_min_close_exact),
        cmocka_unit_test(test_degenerate),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
