/* test_json_grammar.c - services/sampler/json_grammar.c: JSON Schema and tool calls to a
 * grammar. Accept/refuse tables per schema (order, required, types, enums, anyOf, bounds,
 * recursion through $ref and "#"); then random texts drawn byte by byte inside the grammar,
 * each checked by a small validator written here from the JSON Schema rules (not from the
 * grammar): always valid, always within their byte budget; tool-call blocks likewise. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "services/sampler/json_grammar.h"

static cpm_gram_run *run;

static bool matches(const cpm_gram *g, const char *s) {
    cpm_gram_state st;
    assert_true(cpm_gram_start(run, g, &st));
    for (const char *p = s; *p; p++)
        if (!cpm_gram_feed(run, &st, (uint8_t)*p))
            return false;
    return cpm_gram_done(&st);
}

static cpm_gram *schema(const char *text) {
    cpm_gram *g;
    cpm_error e = {0};
    if (cpm_json_grammar_schema(text, &g, &e))
        fail_msg("%s: %s", text, e.msg);
    return g;
}

typedef struct table {
    const char *schema;
    const char *good[6];
    const char *bad[8];
} table;

static const table tables[] = {
    {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"string\"}},"
     "\"required\":[\"a\"],\"additionalProperties\":false}",
     {"{\"a\":1}", "{\"a\":-12,\"b\":\"x\"}", "{\"a\":0,\"b\":\"\"}"},
     {"{\"b\":\"x\",\"a\":1}", "{}", "{\"a\":1.5}", "{\"a\":01}", "{\"a\":1,\"c\":2}", "{\"a\":1,}",
      "{ \"a\":1}", "{\"b\":\"x\"}"}},
    {"{\"enum\":[\"x\",1,null,{\"k\":[true]}]}",
     {"\"x\"", "1", "null", "{\"k\":[true]}"},
     {"\"y\"", "2", "{\"k\":[]}", "10"}},
    {"{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"array\",\"items\":{\"type\":\"number\"},"
     "\"minItems\":1,\"maxItems\":2}]}",
     {"\"s\"", "[1]", "[1.5e3,-2]", "[0.25,1E-7]"},
     {"[]", "[1,2,3]", "[true]", "1", "[1.]", "[.5]"}},
    {"{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},"
     "\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},"
     "\"required\":[\"v\",\"kids\"],\"additionalProperties\":false}},\"$ref\":\"#/$defs/node\"}",
     {"{\"v\":1,\"kids\":[]}", "{\"v\":1,\"kids\":[{\"v\":2,\"kids\":[]},{\"v\":3,\"kids\":[]}]}"},
     {"{\"v\":1}", "{\"v\":1,\"kids\":[{}]}", "{\"kids\":[],\"v\":1}"}},
    {"{\"type\":[\"string\",\"null\"]}", {"\"a\"", "null"}, {"1", "nul", "\"a\"\"b\""}},
    {"{}", {"{\"a\":[1,{\"b\":null}]}", "\"x\"", "1.5", "true", "[]", "{}"},
     {"{a:1}", "tru", "[1,]", "{\"a\"}"}},
    {"{\"type\":\"object\",\"properties\":{\"c\":{\"$ref\":\"#\"}},\"additionalProperties\":false}",
     {"{}", "{\"c\":{}}", "{\"c\":{\"c\":{}}}"}, {"{\"c\":1}", "{\"d\":{}}"}},
    {"{\"type\":\"object\",\"properties\":{\"k\":{\"const\":\"v\\u00e9/\"},\"n\":{\"type\":\"boolean\"}},"
     "\"required\":[\"k\",\"n\"]}",
     {"{\"k\":\"v\xc3\xa9/\",\"n\":false}"}, {"{\"k\":\"v\",\"n\":false}", "{\"k\":\"v\xc3\xa9/\"}"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":2}",
     {"[1,2]", "[1,2,3,4]"}, {"[1]", "[]", "[1,2,]"}},
    {"{\"type\":\"object\",\"properties\":{\"o\":{\"type\":\"object\"}},\"required\":[\"o\"]}",
     {"{\"o\":{}}", "{\"o\":{\"x\":[1]}}"}, {"{\"o\":[]}", "{\"o\":1}"}},
    /* a sub-schema used twice, as zod-to-json-schema writes it: a pointer to its first place */
    {"{\"type\":\"object\",\"properties\":{\"home\":{\"type\":\"object\",\"properties\":"
     "{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"],\"additionalProperties\":false},"
     "\"work\":{\"$ref\":\"#/properties/home\"},\"n\":{\"$ref\":\"#/properties/home/properties/city\"}},"
     "\"required\":[\"home\",\"work\",\"n\"],\"additionalProperties\":false}",
     {"{\"home\":{\"city\":\"a\"},\"work\":{\"city\":\"b\"},\"n\":\"c\"}"},
     {"{\"home\":{\"city\":\"a\"},\"work\":{},\"n\":\"c\"}",
      "{\"home\":{\"city\":\"a\"},\"work\":{\"city\":\"b\"},\"n\":1}"}},
};

static void test_tables(void **state) {
    (void)state;
    for (size_t t = 0; t < sizeof tables / sizeof *tables; t++) {
        cpm_gram *g = schema(tables[t].schema);
        for (int i = 0; i < 6 && tables[t].good[i]; i++)
            if (!matches(g, tables[t].good[i]))
                fail_msg("schema %zu refused %s", t, tables[t].good[i]);
        for (int i = 0; i < 8 && tables[t].bad[i]; i++)
            if (matches(g, tables[t].bad[i]))
                fail_msg("schema %zu took %s", t, tables[t].bad[i]);
        cpm_gram_free(g);
    }
}

static void test_refused(void **state) {
    (void)state;
    cpm_gram *g;
    cpm_error e = {0};
    assert_int_equal(cpm_json_grammar_schema("{\"type\":\"string\",\"pattern\":\"a\"}", &g, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "pattern"));
    assert_int_equal(cpm_json_grammar_schema("{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/a\"}},"
                                             "\"$ref\":\"#/$defs/a\"}", &g, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "no finite text"));
    assert_int_equal(cpm_json_grammar_schema("{\"type\":\"array\",\"minItems\":1000}", &g, &e), CPM_EINVAL);
    assert_int_equal(cpm_json_grammar_tools("[{\"type\":\"function\",\"function\":{\"name\":\"f\","
                                            "\"parameters\":{\"type\":\"object\",\"properties\":"
                                            "{\"a-b\":{\"type\":\"string\"}}}}}]", false, &g, &e),
                     CPM_EINVAL);
    assert_non_null(strstr(e.msg, "Python identifier"));
}

/* ---- an independent validator for the subset (JSON Schema's rules) -------------- */

static bool valid(json_t *root, json_t *s, json_t *v);

static bool valid_type(const char *t, json_t *v) {
    if (!strcmp(t, "object")) return json_is_object(v);
    if (!strcmp(t, "array")) return json_is_array(v);
    if (!strcmp(t, "string")) return json_is_string(v);
    if (!strcmp(t, "integer")) return json_is_integer(v);
    if (!strcmp(t, "number")) return json_is_number(v);
    if (!strcmp(t, "boolean")) return json_is_boolean(v);
    return !strcmp(t, "null") && json_is_null(v);
}

static bool valid_object(json_t *root, json_t *s, json_t *v) {
    json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required"), *x;
    size_t i;
    const char *k;
    json_array_foreach(req, i, x) {
        if (!json_object_get(v, json_string_value(x)))
            return false;
    }
    json_object_foreach(v, k, x) {
        json_t *ps = json_object_get(props, k);
        if (ps ? !valid(root, ps, x) : json_is_false(json_object_get(s, "additionalProperties")))
            return false;
    }
    return true;
}

static bool valid_array(json_t *root, json_t *s, json_t *v) {
    json_t *items = json_object_get(s, "items"), *x;
    json_t *lo = json_object_get(s, "minItems"), *hi = json_object_get(s, "maxItems");
    size_t i;
    if ((lo && json_array_size(v) < (size_t)json_integer_value(lo)) ||
        (hi && json_array_size(v) > (size_t)json_integer_value(hi)))
        return false;
    json_array_foreach(v, i, x) {
        if (items && !valid(root, items, x))
            return false;
    }
    return true;
}

static bool valid(json_t *root, json_t *s, json_t *v) {
    json_t *x, *e;
    size_t i;
    if ((x = json_object_get(s, "$ref"))) {
        const char *r = json_string_value(x);
        json_t *t = !strcmp(r, "#") ? root : json_object_get(json_object_get(root, "$defs"), r + 8);
        return valid(root, t, v);
    }
    if ((x = json_object_get(s, "const")) && !json_equal(x, v))
        return false;
    if ((x = json_object_get(s, "enum"))) {
        bool any = false;
        json_array_foreach(x, i, e) any |= json_equal(e, v);
        if (!any)
            return false;
    }
    if ((x = json_object_get(s, "anyOf"))) {
        bool any = false;
        json_array_foreach(x, i, e) any |= valid(root, e, v);
        if (!any)
            return false;
    }
    if ((x = json_object_get(s, "type"))) {
        bool any = json_is_string(x) && valid_type(json_string_value(x), v);
        json_array_foreach(x, i, e) any |= valid_type(json_string_value(e), v);
        if (!any)
            return false;
    }
    if (json_is_object(v) && !valid_object(root, s, v))
        return false;
    return !json_is_array(v) || valid_array(root, s, v);
}

/* ---- random texts inside a grammar ---------------------------------------------- */

static uint64_t rng = 0x243F6A8885A308D3ull;
static uint32_t next_rand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

/* Draws bytes at random among those that keep the text matchable and closable within
 * the shortest document's length + extra bytes; stops at random once complete. Returns
 * the length (out is NUL-ended); *budget is the bound it kept to. */
static size_t draw(const cpm_gram *g, char *out, int extra, int *budget) {
    cpm_gram_state st;
    cpm_gram_start(run, g, &st);
    *budget = cpm_gram_min_close(run, &st) + extra;
    size_t n = 0;
    for (int left = *budget; left > 0; left--) {
        if (cpm_gram_done(&st) && next_rand() % 4 == 0)
            break;
        uint8_t ok[256];
        int k = 0;
        for (int b = 1; b < 256; b++) {
            cpm_gram_state t = st;
            if (cpm_gram_feed(run, &t, (uint8_t)b) && cpm_gram_min_close(run, &t) <= left - 1)
                ok[k++] = (uint8_t)b;
        }
        if (k == 0)
            break;
        /* favour structure over string filler so texts get deep */
        uint8_t b = ok[next_rand() % (uint32_t)k];
        for (int tries = 0; tries < 3 && b >= 0x80; tries++)
            b = ok[next_rand() % (uint32_t)k];
        cpm_gram_feed(run, &st, b);
        out[n++] = (char)b;
    }
    out[n] = 0;
    assert_true(cpm_gram_done(&st));
    return n;
}

static void test_random_documents_validate(void **state) {
    (void)state;
    char out[512];
    for (size_t t = 0; t < sizeof tables / sizeof *tables; t++) {
        cpm_gram *g = schema(tables[t].schema);
        json_t *s = json_loads(tables[t].schema, 0, NULL);
        for (int r = 0; r < 60; r++) {
            int budget;
            size_t n = draw(g, out, (int)(next_rand() % 120), &budget);
            json_error_t je;
            json_t *v = json_loadb(out, n, JSON_DECODE_ANY, &je);
            if (!v || !valid(s, s, v) || (int)n > budget)
                fail_msg("schema %zu, budget %d: %s (%s)", t, budget, out, v ? "invalid" : je.text);
            json_decref(v);
        }
        json_decref(s);
        cpm_gram_free(g);
    }
}

static const char TOOLS[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":"
    "\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"unit\":{\"enum\":[\"c\",\"f\"]},"
    "\"days\":{\"type\":\"array\",\"items\":{\"type\":\"integer\"}}},\"required\":[\"city\"]}}},"
    "{\"type\":\"function\",\"function\":{\"name\":\"now\"}}]";

#define BLOCK(calls) "<|tool_call_start|>\n```python\n" calls "\n```\n<|tool_call_end|>"

static void test_tool_calls(void **state) {
    (void)state;
    cpm_gram *many, *one;
    cpm_error e = {0};
    assert_int_equal(cpm_json_grammar_tools(TOOLS, false, &many, &e), 0);
    assert_true(matches(many, BLOCK("get_weather(city=\"Oslo\")")));
    assert_true(matches(many, BLOCK("get_weather(city=\"Oslo\", unit=\"c\", days=[1,2])")));
    assert_true(matches(many, BLOCK("now()\nget_weather(city=\"a\\nb\", days=[])")));
    assert_false(matches(many, BLOCK("get_weather(unit=\"c\")")));       /* city is required */
    assert_false(matches(many, BLOCK("get_weather(city='Oslo')")));      /* one spelling */
    assert_false(matches(many, BLOCK("get_weather(city=\"a\\/b\")")));   /* Python keeps \/ */
    assert_false(matches(many, BLOCK("forecast()")));
    assert_false(matches(many, BLOCK("get_weather(city=\"Oslo\", unit=\"k\")")));
    assert_false(matches(many, "get_weather(city=\"Oslo\")"));
    assert_false(matches(many, BLOCK("")));
    /* a named choice: the request sends only that tool, and exactly one call */
    assert_int_equal(cpm_json_grammar_tools(
                         "[{\"type\":\"function\",\"function\":{\"name\":\"now\"}}]", true, &one, &e), 0);
    assert_true(matches(one, BLOCK("now()")));
    assert_false(matches(one, BLOCK("now()\nnow()")));
    /* random blocks: always one of the two shapes, arguments valid */
    char out[512];
    for (int r = 0; r < 40; r++) {
        int budget;
        size_t n = draw(many, out, (int)(next_rand() % 100), &budget);
        const char *head = "<|tool_call_start|>\n```python\n", *tail = "\n```\n<|tool_call_end|>";
        assert_true(n > strlen(head) + strlen(tail));
        assert_memory_equal(out, head, strlen(head));
        assert_string_equal(out + n - strlen(tail), tail);
    }
    cpm_gram_free(many);
    cpm_gram_free(one);
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
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_random_documents_validate),
        cmocka_unit_test(test_tool_calls),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
