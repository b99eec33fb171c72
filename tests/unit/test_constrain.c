/* test_constrain.c - services/sampler/constrain.c with the real 73448-token vocabulary:
 * whatever the logits (random rows stand for random weights, the hard case), every text
 * drawn under a json_object constraint is one JSON object (jansson parses it), under a
 * json_schema one a document of the schema, under a forced tool choice one call block of
 * the tool, each ending with a stop token within tokens_left; a schema outside the subset
 * and a generated text that already breaks the format are errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "services/sampler/constrain.h"
#include "services/tokenizer/tokenizer.h"

static const char *tok_dir;
static cpm_constrainer *cons;
static cpm_tokenizer *tok;

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float uniform(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 11) % 1000001u) / 1e6f;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* One constrained greedy generation over random logits under k (its tokens_left is set
 * here); returns the ids (stop excluded). */
static int generate(Cpm__V1__Constraint k, int budget, int32_t *ids, bool *stopped) {
    int V = cpm_tokenizer_vocab_size(tok), n = 0;
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *allowed = malloc((size_t)V);
    *stopped = false;
    for (int step = 0; step < budget; step++) {
        for (int i = 0; i < V; i++)
            logits[i] = 10.0f * uniform();
        k.tokens_left = (uint32_t)(budget - step);
        cpm_error e = {0};
        if (cpm_constrainer_apply(cons, &k, ids, (size_t)n, logits, V, allowed, &e))
            fail_msg("step %d: %s", step, e.msg);
        int t = argmax(logits, V);
        assert_true(isfinite(logits[t]));
        if (cpm_tokenizer_is_stop(tok, t)) {
            *stopped = true;
            break;
        }
        ids[n++] = t;
    }
    free(logits);
    free(allowed);
    return n;
}

static void test_json_object_always(void **state) {
    (void)state;
    const int budgets[] = {4, 8, 16, 40};
    for (int run = 0; run < 24; run++) {
        int budget = budgets[run % 4];
        int32_t ids[64];
        bool stopped;
        Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
        k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT;
        int n = generate(k, budget, ids, &stopped);
        char *text;
        size_t len;
        cpm_error e = {0};
        assert_int_equal(cpm_tokenizer_decode(tok, ids, (size_t)n, true, &text, &len, &e), 0);
        json_error_t je;
        json_t *o = json_loadb(text, len, 0, &je);
        if (!stopped || !o || !json_is_object(o))
            fail_msg("run %d (budget %d, %d tokens, stopped %d): not one JSON object: %s (%s)", run,
                     budget, n, stopped, text, je.text);
        json_decref(o);
        free(text);
    }
}

static char *decode(const int32_t *ids, int n) {
    char *text;
    size_t len;
    cpm_error e = {0};
    assert_int_equal(cpm_tokenizer_decode(tok, ids, (size_t)n, true, &text, &len, &e), 0);
    return text;
}

static const char SCHEMA[] =
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":"
    "\"integer\"},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"red\",\"blue\"]},"
    "\"maxItems\":2},\"zip\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}]}},"
    "\"required\":[\"name\",\"age\",\"tags\",\"zip\"],\"additionalProperties\":false}";

/* One generation under SCHEMA with budget tokens: a valid document, stopped in time. */
static void schema_run(int run, int budget) {
    int32_t ids[64];
    bool stopped;
    Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
    k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA;
    k.schema = (char *)SCHEMA;
    int n = generate(k, budget, ids, &stopped);
    char *text = decode(ids, n);
    json_error_t je;
    json_t *o = json_loads(text, 0, &je), *tags = json_object_get(o, "tags"), *zip = json_object_get(o, "zip");
    bool ok = stopped && json_is_object(o) && json_object_size(o) == 4 &&
              json_is_string(json_object_get(o, "name")) && json_is_integer(json_object_get(o, "age")) &&
              json_is_array(tags) && json_array_size(tags) <= 2 && (json_is_string(zip) || json_is_null(zip));
    for (size_t i = 0; ok && i < json_array_size(tags); i++) {
        const char *t = json_string_value(json_array_get(tags, i));
        ok = t && (!strcmp(t, "red") || !strcmp(t, "blue"));
    }
    if (!ok)
        fail_msg("run %d (budget %d, %d tokens, stopped %d): not valid: %s", run, budget, n, stopped, text);
    json_decref(o);
    free(text);
}

static void test_json_schema_always(void **state) {
    (void)state;
    const int budgets[] = {44, 52, 64}; /* the shortest document is 40 bytes */
    for (int run = 0; run < 12; run++)
        schema_run(run, budgets[run % 3]);
}

/* A budget under the shortest document's 40 bytes but over its ~16 tokens: no token closes
 * in time by the one-byte-a-token count from the start, and the text must still close (by
 * the shortest way) rather than run on in a string to the end of its budget. */
static void test_json_schema_tight_budget(void **state) {
    (void)state;
    const int budgets[] = {24, 30, 38};
    for (int run = 0; run < 6; run++)
        schema_run(run, budgets[run % 3]);
}

/* One forced call of get_weather with budget tokens: one call block, stopped in time. */
static void tool_call_run(int run, int budget) {
    int32_t ids[160];
    bool stopped;
    Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
    k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS;
    k.single_call = true;
    k.schema = "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":"
               "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"days\":"
               "{\"type\":\"integer\"}},\"required\":[\"city\",\"days\"]}}}]";
    int n = generate(k, budget, ids, &stopped);
    char *text = decode(ids, n);
    const char *head = "<|tool_call_start|>\n```python\nget_weather(city=\"";
    const char *tail = ")\n```\n<|tool_call_end|>";
    size_t len = strlen(text);
    if (!stopped || strncmp(text, head, strlen(head)) || len < strlen(tail) ||
        strcmp(text + len - strlen(tail), tail) || !strstr(text, "\", days="))
        fail_msg("run %d (budget %d, %d tokens): not one call: %s", run, budget, n, text);
    free(text);
}

static void test_tool_call_always(void **state) {
    (void)state;
    for (int run = 0; run < 6; run++)
        tool_call_run(run, 90 + 10 * run);
    /* under the shortest block's 80 bytes: closed by the shortest way */
    tool_call_run(6, 44);
    tool_call_run(7, 56);
}

static void test_errors(void **state) {
    (void)state;
    int V = cpm_tokenizer_vocab_size(tok);
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *allowed = malloc((size_t)V);
    for (int i = 0; i < V; i++)
        logits[i] = (float)i;
    Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
    cpm_error e = {0};
    /* A schema outside the subset: the row's error, named by its JSON pointer. */
    k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA;
    k.schema = "{\"type\":\"string\",\"pattern\":\"a\"}";
    assert_int_equal(cpm_constrainer_apply(cons, &k, NULL, 0, logits, V, allowed, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "/pattern: not supported"));
    k.schema = "{\"type\":";
    assert_int_equal(cpm_constrainer_apply(cons, &k, NULL, 0, logits, V, allowed, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "not JSON"));
    k.schema = "{\"type\":\"object\"}";
    k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT;
    int32_t hello[4];
    size_t n = 0;
    int32_t *enc;
    assert_int_equal(cpm_tokenizer_encode(tok, "hello", 5, false, &enc, &n, &e), 0);
    memcpy(hello, enc, (n < 4 ? n : 4) * sizeof *hello);
    free(enc);
    assert_int_equal(cpm_constrainer_apply(cons, &k, hello, n < 4 ? n : 4, logits, V, allowed, &e),
                     CPM_EINVAL);
    assert_non_null(strstr(e.msg, "breaks the format"));
    assert_int_equal(cpm_constrainer_apply(cons, &k, NULL, 0, logits, V - 1, allowed, &e), CPM_ERANGE);
    free(logits);
    free(allowed);
}

static int setup(void **state) {
    (void)state;
    cpm_error e = {0};
    if (cpm_constrainer_new(tok_dir, &cons, &e) || cpm_tokenizer_load(tok_dir, &tok, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    cpm_constrainer_free(cons);
    cpm_tokenizer_free(tok);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_constrain TOKENIZER_DIR\n");
        return 2;
    }
    tok_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_object_always),
        cmocka_unit_test(test_json_schema_always),
        cmocka_unit_test(test_json_schema_tight_budget),
        cmocka_unit_test(test_tool_call_always),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
