/* test_request.c - router/request.c: the request state machine's edges and the
 * stop-string matcher on text that arrives in arbitrary pieces.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "router/request.h"

static void test_state_edges(void **state) {
    (void)state;
    cpm_req_state s = CPM_REQ_QUEUED;
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_DECODING), CPM_EINVAL);
    assert_int_equal(s, CPM_REQ_QUEUED);
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_PREFILLING), 0);
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_DECODING), 0);
    assert_false(cpm_req_state_terminal(s));
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_FINISHED), 0);
    assert_true(cpm_req_state_terminal(s));
    /* a terminal state is never left: no second final answer */
    for (int to = CPM_REQ_QUEUED; to <= CPM_REQ_FAILED; to++)
        assert_int_equal(cpm_req_transition(&s, (cpm_req_state)to), CPM_EINVAL);
    s = CPM_REQ_QUEUED;
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_CANCELLED), 0);
    assert_int_equal(cpm_req_transition(&s, CPM_REQ_FAILED), CPM_EINVAL);
    assert_string_equal(cpm_req_state_name(CPM_REQ_PREFILLING), "prefilling");
}

/* Feeds pieces, returns everything shown (flushing at the end unless stopped). */
static char *run_inc(char *const *stops, int n_stops, const char *const *pieces, bool *stopped,
                     bool include) {
    cpm_stopper *s = cpm_stopper_new(stops, n_stops, include);
    assert_non_null(s);
    char *acc = calloc(1, 1024);
    *stopped = false;
    for (int i = 0; pieces[i]; i++) {
        const char *out;
        size_t len;
        assert_int_equal(cpm_stopper_feed(s, pieces[i], strlen(pieces[i]), &out, &len, stopped), 0);
        strncat(acc, out, len);
    }
    if (!*stopped) {
        const char *out;
        size_t len;
        cpm_stopper_flush(s, &out, &len);
        strncat(acc, out, len);
    }
    cpm_stopper_free(s);
    return acc;
}

static char *run(char *const *stops, int n_stops, const char *const *pieces, bool *stopped) {
    return run_inc(stops, n_stops, pieces, stopped, false);
}

static void test_stop_across_pieces(void **state) {
    (void)state;
    char *stops[] = {"END"};
    bool st;
    char *t = run(stops, 1, (const char *const[]){"Hello E", "N", "D and more", NULL}, &st);
    assert_true(st);
    assert_string_equal(t, "Hello ");
    free(t);
}

static void test_partial_match_is_released(void **state) {
    (void)state;
    char *stops[] = {"END"};
    cpm_stopper *s = cpm_stopper_new(stops, 1, false);
    const char *out;
    size_t len;
    bool st;
    cpm_stopper_feed(s, "abcEN", 5, &out, &len, &st);
    assert_int_equal(len, 3); /* "EN" could become "END": held */
    assert_memory_equal(out, "abc", 3);
    cpm_stopper_feed(s, "X", 1, &out, &len, &st);
    assert_false(st);
    assert_int_equal(len, 3);
    assert_memory_equal(out, "ENX", 3);
    cpm_stopper_free(s);
    bool stopped;
    char *t = run(stops, 1, (const char *const[]){"tail E", NULL}, &stopped);
    assert_false(stopped);
    assert_string_equal(t, "tail E"); /* flushed at the end */
    free(t);
}

static void test_earliest_stop_wins(void **state) {
    (void)state;
    char *stops[] = {"world", "lo w", ""};
    bool st;
    char *t = run(stops, 3, (const char *const[]){"hello world", NULL}, &st);
    assert_true(st);
    assert_string_equal(t, "hel");
    free(t);
}

/* include_stop_str_in_output: the text ends with the stop string that ended it (the
 * earliest; of two starting there, the longer), across pieces, and nothing after. */
static void test_include_stop_string(void **state) {
    (void)state;
    char *stops[] = {"END", "lo w", "lo wor"};
    bool st;
    char *t = run_inc(stops, 1, (const char *const[]){"Hello E", "N", "D and more", NULL}, &st, true);
    assert_true(st);
    assert_string_equal(t, "Hello END");
    free(t);
    t = run_inc(stops, 3, (const char *const[]){"hel", "lo world", NULL}, &st, true);
    assert_true(st);
    assert_string_equal(t, "hello wor");
    free(t);
    t = run_inc(stops, 3, (const char *const[]){"no stop here", NULL}, &st, true);
    assert_false(st);
    assert_string_equal(t, "no stop here");
    free(t);
}

static void test_no_stops_pass_through(void **state) {
    (void)state;
    bool st;
    char *t = run(NULL, 0, (const char *const[]){"a", "\n", "b", NULL}, &st);
    assert_false(st);
    assert_string_equal(t, "a\nb");
    free(t);
}

static void test_nothing_after_stop(void **state) {
    (void)state;
    char *stops[] = {"\n\n"};
    cpm_stopper *s = cpm_stopper_new(stops, 1, false);
    const char *out;
    size_t len;
    bool st;
    cpm_stopper_feed(s, "x\n", 2, &out, &len, &st);
    assert_int_equal(len, 1);
    cpm_stopper_feed(s, "\ny", 2, &out, &len, &st);
    assert_true(st);
    assert_int_equal(len, 0);
    cpm_stopper_feed(s, "more", 4, &out, &len, &st);
    assert_true(st);
    assert_int_equal(len, 0);
    cpm_stopper_flush(s, &out, &len);
    assert_int_equal(len, 0);
    cpm_stopper_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_edges),
        cmocka_unit_test(test_stop_across_pieces),
        cmocka_unit_test(test_include_stop_string),
        cmocka_unit_test(test_partial_match_is_released),
        cmocka_unit_test(test_earliest_stop_wins),
        cmocka_unit_test(test_no_stops_pass_through),
        cmocka_unit_test(test_nothing_after_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
