/* test_constrain.c - services/sampler/constrain.c with the real 73448-token vocabulary:
 * whatever the logits (random rows stand for random weights, the hard case), every text
 * drawn under a json_object constraint is one JSON object (jansson parses it) that ends
 * with a stop token within tokens_left; a constraint it does not enforce leaves the
 * logits alone; a generated text that already breaks the JSON is an error. */
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

/* One constrained greedy generation over random logits; returns the ids (stop excluded). */
static int generate(int budget, int32_t *ids, bool *stopped) {
    int V = cpm_tokenizer_vocab_size(tok), n = 0;
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *allowed = malloc((size_t)V);
    *stopped = false;
    for (int step = 0; step < budget; step++) {
        for (int i = 0; i < V; i++)
            logits[i] = 10.0f * uniform();
        Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
        k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT;
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
        int n = generate(budget, ids, &stopped);
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

static void test_other_kinds_and_errors(void **state) {
    (void)state;
    int V = cpm_tokenizer_vocab_size(tok);
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *allowed = malloc((size_t)V);
    for (int i = 0; i < V; i++)
        logits[i] = (float)i;
    Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
    k.kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS; /* not enforced yet: untouched */
    k.schema = "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]";
    cpm_error e = {0};
    assert_int_equal(cpm_constrainer_apply(cons, &k, NULL, 0, logits, V, allowed, &e), 0);
    for (int i = 0; i < V; i++)
        assert_true(logits[i] == (float)i);
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
    assert_non_null(strstr(e.msg, "breaks the JSON"));
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
        cmocka_unit_test(test_other_kinds_and_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
