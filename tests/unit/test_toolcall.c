/* test_toolcall.c - router/toolcall.c: MiniCPM tool-call answers to OpenAI fields.
 *
 * Each example is parsed whole and checked against what OpenAI's fields must be;
 * then fed cut at every byte boundary (two pieces), one byte at a time, and in
 * three pieces, and the reassembled result must equal the whole parse.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/toolcall.h"

static const char *const NAMES[] = {"get_weather", "search", "send-mail", "noargs"};

/* A reassembled result. */
typedef struct result {
    char reasoning[4096], content[4096];
    int n_calls;
    char calls[8][2][512]; /* name, arguments */
    char ids[8][64];
    int n_rejected;
} result;

static void add(char *dst, size_t cap, const char *s, size_t n) {
    size_t used = strlen(dst);
    assert_true(used + n < cap);
    memcpy(dst + used, s, n);
    dst[used + n] = '\0';
}

static void take(cpm_toolcall *tc, const cpm_toolcall_delta *d, result *r) {
    add(r->reasoning, sizeof r->reasoning, d->reasoning, d->reasoning_len);
    add(r->content, sizeof r->content, d->content, d->content_len);
    assert_int_equal(d->call_from, r->n_calls);
    for (int i = d->call_from; i < d->call_to; i++) {
        const cpm_toolcall_call *c = cpm_toolcall_get(tc, i);
        assert_non_null(c);
        snprintf(r->calls[i][0], sizeof r->calls[i][0], "%s", c->name);
        snprintf(r->calls[i][1], sizeof r->calls[i][1], "%s", c->arguments);
        snprintf(r->ids[i], sizeof r->ids[i], "%s", c->id);
        r->n_calls++;
    }
}

/* Feeds text cut at the given points (ascending, within the text). */
static void run_cuts(const char *text, const size_t *cuts, int n_cuts, result *r) {
    memset(r, 0, sizeof *r);
    cpm_toolcall *tc = cpm_toolcall_new(NAMES, 4, "call_t");
    assert_non_null(tc);
    cpm_toolcall_delta d;
    size_t at = 0, n = strlen(text);
    for (int k = 0; k <= n_cuts; k++) {
        size_t to = k < n_cuts ? cuts[k] : n;
        assert_int_equal(cpm_toolcall_feed(tc, text + at, to - at, &d), 0);
        take(tc, &d, r);
        at = to;
    }
    assert_int_equal(cpm_toolcall_finish(tc, &d), 0);
    take(tc, &d, r);
    assert_int_equal(cpm_toolcall_count(tc), r->n_calls);
    r->n_rejected = cpm_toolcall_rejected(tc);
    cpm_toolcall_free(tc);
}

static void same(const result *a, const result *b, const char *text, const char *how) {
    if (strcmp(a->reasoning, b->reasoning) || strcmp(a->content, b->content) ||
        a->n_calls != b->n_calls)
        fail_msg("%s differs for %s:\nreasoning [%s] vs [%s]\ncontent [%s] vs [%s]\ncalls %d vs %d",
                 how, text, a->reasoning, b->reasoning, a->content, b->content, a->n_calls,
                 b->n_calls);
    for (int i = 0; i < a->n_calls; i++) {
        assert_string_equal(a->calls[i][0], b->calls[i][0]);
        assert_string_equal(a->calls[i][1], b->calls[i][1]);
        assert_string_equal(a->ids[i], b->ids[i]);
    }
}

/* cpm_toolcall_whole: one delta. */
static void run_whole(const char *text, result *r) {
    memset(r, 0, sizeof *r);
    cpm_toolcall *tc = cpm_toolcall_new(NAMES, 4, "call_t");
    assert_non_null(tc);
    cpm_toolcall_delta d;
    assert_int_equal(cpm_toolcall_whole(tc, text, strlen(text), &d), 0);
    take(tc, &d, r);
    r->n_rejected = cpm_toolcall_rejected(tc);
    cpm_toolcall_free(tc);
}

/* The whole parse, then every cut must agree with it. */
static void check_cuts(const char *text, result *whole) {
    run_whole(text, whole);
    size_t n = strlen(text);
    result r;
    run_cuts(text, NULL, 0, &r);
    same(whole, &r, text, "one feed and the finish");
    for (size_t i = 0; i <= n; i++) {
        run_cuts(text, &i, 1, &r);
        same(whole, &r, text, "a cut in two");
    }
    size_t *bytes = malloc((n + 1) * sizeof *bytes);
    for (size_t i = 0; i < n; i++)
        bytes[i] = i;
    run_cuts(text, bytes, n ? (int)n - 1 : 0, &r);
    same(whole, &r, text, "byte by byte");
    free(bytes);
    for (size_t i = 0; i <= n; i += 3)
        for (size_t j = i; j <= n; j += 5) {
            size_t c[2] = {i, j};
            run_cuts(text, c, 2, &r);
            same(whole, &r, text, "a cut in three");
        }
}

/* arguments must be this JSON (compared as values). */
static void args_equal(const char *got, const char *want) {
    json_t *g = json_loads(got, 0, NULL), *w = json_loads(want, 0, NULL);
    if (!g || !w || !json_equal(g, w))
        fail_msg("arguments %s, expected %s", got, want);
    json_decref(g);
    json_decref(w);
}

/* The official answer format (the template's own example). */
static void test_official_format(void **state) {
    (void)state;
    const char *text = "<|thought_start|>\nThe user wants the weather; I call get_weather.\n"
                       "<|thought_end|>\n<|tool_call_start|>\n```python\n"
                       "get_weather(city=\"Paris\", unit='celsius')\n```\n<|tool_call_end|>\n";
    result r;
    check_cuts(text, &r);
    assert_string_equal(r.reasoning, "The user wants the weather; I call get_weather.");
    assert_string_equal(r.content, "");
    assert_int_equal(r.n_calls, 1);
    assert_string_equal(r.calls[0][0], "get_weather");
    args_equal(r.calls[0][1], "{\"city\":\"Paris\",\"unit\":\"celsius\"}");
    assert_string_equal(r.ids[0], "call_t_0");
}

static void test_several_calls_and_trailing_content(void **state) {
    (void)state;
    const char *text = "<|tool_call_start|>\n```python\nget_weather(city='Paris')\n"
                       "search(query=\"a \\\"quoted\\\" word\", limit=3)\nnoargs()\n```\n"
                       "<|tool_call_end|>\nI asked three tools.";
    result r;
    check_cuts(text, &r);
    assert_string_equal(r.reasoning, "");
    assert_string_equal(r.content, "I asked three tools.");
    assert_int_equal(r.n_calls, 3);
    assert_string_equal(r.calls[1][0], "search");
    args_equal(r.calls[1][1], "{\"query\":\"a \\\"quoted\\\" word\",\"limit\":3}");
    assert_string_equal(r.calls[2][0], "noargs");
    args_equal(r.calls[2][1], "{}");
    assert_string_equal(r.ids[2], "call_t_2");
}

static void test_nested_arguments(void **state) {
    (void)state;
    const char *text = "<|tool_call_start|>\n```python\nsearch(filters={'tags': ['a', \"b\"], "
                       "'range': (1, 2.5), 3: None, 'deep': {'x': [True, False, {}]}}, "
                       "n=-7, f=1., g=.5, h=1e-3, big=1_000, j=true, k=null,)\n```\n<|tool_call_end|>";
    result r;
    check_cuts(text, &r);
    assert_int_equal(r.n_calls, 1);
    args_equal(r.calls[0][1],
               "{\"filters\":{\"tags\":[\"a\",\"b\"],\"range\":[1,2.5],\"3\":null,"
               "\"deep\":{\"x\":[true,false,{}]}},\"n\":-7,\"f\":1.0,\"g\":0.5,\"h\":0.001,"
               "\"big\":1000,\"j\":true,\"k\":null}");
}

static void test_unicode(void **state) {
    (void)state;
    const char *text = "<|thought_start|>\n查询北京的天气 🌤\n<|thought_end|>\n"
                       "<|tool_call_start|>\n```python\nget_weather(city=\"北京\", note='caf\\u00e9 "
                       "\\x41\\n\\t\\\\', emoji=\"🌤\")\n```\n<|tool_call_end|>\n好的。";
    result r;
    check_cuts(text, &r);
    assert_string_equal(r.reasoning, "查询北京的天气 🌤");
    assert_string_equal(r.content, "好的。");
    assert_int_equal(r.n_calls, 1);
    args_equal(r.calls[0][1], "{\"city\":\"北京\",\"note\":\"café A\\n\\t\\\\\",\"emoji\":\"🌤\"}");
}

/* Plain answers pass through whole, markers' look-alikes included. */
static void test_plain_text(void **state) {
    (void)state;
    const char *texts[] = {"Hello, world!", "", "a <| b <|tool c <|thought_start", "<|thought",
                           "x<|tool_call_start", "line\n\n<|tool_call_end|>\n"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        result r;
        check_cuts(texts[i], &r);
        assert_string_equal(r.content, texts[i]);
        assert_string_equal(r.reasoning, "");
        assert_int_equal(r.n_calls, 0);
    }
}

/* Anything that is not a call we take comes back as content, byte for byte. */
static void test_malformed_is_content(void **state) {
    (void)state;
    const char *blocks[] = {
        "<|tool_call_start|>\n```python\nunknown_tool(x=1)\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather('Paris')\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(city='Paris'\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(city=Paris)\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(city='a', city='b')\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(city='a') + 1\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(x={1, 2})\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(x=0x1f)\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\nget_weather(x='unterminated)\n```",
    };
    for (size_t i = 0; i < sizeof blocks / sizeof *blocks; i++) {
        char text[512];
        snprintf(text, sizeof text, "%s\nafter", blocks[i]);
        result r;
        check_cuts(text, &r);
        assert_int_equal(r.n_calls, 0);
        assert_int_equal(r.n_rejected, 1);
        assert_string_equal(r.content, text);
    }
}

/* The end marker may be missing when the model stops right after the fence. */
static void test_block_without_end_marker(void **state) {
    (void)state;
    result r;
    check_cuts("<|tool_call_start|>\n```python\nget_weather(city='Oslo')\n```\n", &r);
    assert_int_equal(r.n_calls, 1);
    assert_string_equal(r.content, "");
    check_cuts("<|tool_call_start|>\nget_weather(city='Oslo')\n<|tool_call_end|>", &r);
    assert_int_equal(r.n_calls, 1); /* no fence */
}

static void test_thoughts(void **state) {
    (void)state;
    result r;
    check_cuts("<|thought_start|>\nhmm\n\nstill thinking", &r); /* never ends: reasoning */
    assert_string_equal(r.reasoning, "hmm\n\nstill thinking");
    assert_string_equal(r.content, "");
    check_cuts("<|thought_start|>\nshort<|thought_end|>The answer is 4.", &r);
    assert_string_equal(r.reasoning, "short");
    assert_string_equal(r.content, "The answer is 4.");
    check_cuts("Before <|thought_start|>x<|thought_end|>", &r); /* only at the start */
    assert_string_equal(r.reasoning, "");
    assert_string_equal(r.content, "Before <|thought_start|>x<|thought_end|>");
    check_cuts("Let me look.\n<|tool_call_start|>\n```python\nsend-mail(to='a@b.c')\n```\n"
               "<|tool_call_end|>\n<|tool_call_start|>\n```python\nsearch(q=1)\n```\n"
               "<|tool_call_end|>\nDone.", &r);
    assert_string_equal(r.content, "Let me look.\nDone.");
    assert_int_equal(r.n_calls, 2);
    assert_string_equal(r.calls[0][0], "send-mail");
}

static void test_args_json(void **state) {
    (void)state;
    char *j = cpm_toolcall_args_json("a=1, b='x'", 10);
    assert_non_null(j);
    args_equal(j, "{\"a\":1,\"b\":\"x\"}");
    free(j);
    assert_null(cpm_toolcall_args_json("1, 2", 4));
    j = cpm_toolcall_args_json("", 0);
    assert_string_equal(j, "{}");
    free(j);
    /* a broken UTF-8 sequence in a string: still valid JSON, with U+FFFD */
    const char *bad = "s='a\x93" "b'";
    j = cpm_toolcall_args_json(bad, strlen(bad));
    assert_non_null(j);
    args_equal(j, "{\"s\":\"a\xef\xbf\xbd" "b\"}");
    free(j);
    /* deeper than any call we take: refused, not a stack overflow */
    char deep[4096];
    size_t k = 0;
    k += (size_t)snprintf(deep, sizeof deep, "a=");
    for (int i = 0; i < 1000; i++)
        deep[k++] = '[';
    assert_null(cpm_toolcall_args_json(deep, k));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_official_format),
        cmocka_unit_test(test_several_calls_and_trailing_content),
        cmocka_unit_test(test_nested_arguments),
        cmocka_unit_test(test_unicode),
        cmocka_unit_test(test_plain_text),
        cmocka_unit_test(test_malformed_is_content),
        cmocka_unit_test(test_block_without_end_marker),
        cmocka_unit_test(test_thoughts),
        cmocka_unit_test(test_args_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
