/* bench_constrain.c - what constrained decoding costs per generated token: one
 * cpm_constrainer_apply (replay of the text so far + the mask over the whole vocabulary)
 * from the states an answer passes through, for json_object, a json_schema and a forced
 * tool call; the first row of a schema includes compiling it (later rows hit the cache).
 * Compare with a decode step of the model: 70-300 ms on the 1B shape on this machine kind.
 *
 *   bench_constrain TOKENIZER_DIR [REPEATS (50)]
 * A benchmark, never a test: nothing is asserted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/clock.h"
#include "services/sampler/constrain.h"
#include "services/tokenizer/tokenizer.h"

static const char SCHEMA[] =
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":"
    "\"integer\"},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"red\",\"green\",\"blue\"]}},"
    "\"address\":{\"$ref\":\"#/$defs/addr\"}},\"required\":[\"name\",\"age\",\"tags\"],"
    "\"additionalProperties\":false,\"$defs\":{\"addr\":{\"type\":\"object\",\"properties\":"
    "{\"city\":{\"type\":\"string\"},\"zip\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":"
    "\"null\"}]}},\"required\":[\"city\",\"zip\"],\"additionalProperties\":false}}}";

static const char TOOLS[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":"
    "\"object\",\"properties\":{\"city\":{\"type\":\"string\"},\"unit\":{\"enum\":[\"c\",\"f\"]}},"
    "\"required\":[\"city\"]}}}]";

static const struct {
    int kind;
    const char *schema, *state, *text;
} rows[] = {
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT, "", "start", ""},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT, "", "inside a key", "{\"na"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT, "", "inside a long string",
     "{\"name\":\"The quick brown fox jumps over"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT, "", "after ',' in a nested array",
     "{\"a\":[{\"b\":[1,"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "start (compiles)", ""},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "start", ""},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "inside a string",
     "{\"name\":\"The quick brown fox jumps over"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "inside a number",
     "{\"name\":\"Ann\",\"age\":12"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "in an enum array",
     "{\"name\":\"Ann\",\"age\":12,\"tags\":[\"red\","},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA, SCHEMA, "in a $ref anyOf",
     "{\"name\":\"Ann\",\"age\":12,\"tags\":[],\"address\":{\"city\":\"Oslo\",\"zip\":"},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS, TOOLS, "tool call: start (compiles)", ""},
    {CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS, TOOLS, "tool call: in an argument",
     "<|tool_call_start|>\n```python\nget_weather(city=\"San Fra"},
};

/* The text as one token per byte (the vocabulary has every byte as a token): the encoder
 * would add its dummy-prefix space, and byte tokens make the replay's worst case. */
static int32_t *byte_tokens(const cpm_tokenizer *tok, const char *text, size_t *n) {
    int32_t of[256];
    for (int b = 0; b < 256; b++)
        of[b] = -1;
    char buf[16];
    for (int id = 0; id < cpm_tokenizer_vocab_size(tok); id++)
        if (cpm_tokenizer_token_bytes(tok, id, buf, sizeof buf) == 1 && of[(uint8_t)buf[0]] < 0)
            of[(uint8_t)buf[0]] = id;
    *n = strlen(text);
    int32_t *ids = malloc((*n ? *n : 1) * sizeof *ids);
    for (size_t i = 0; ids && i < *n; i++)
        ids[i] = of[(uint8_t)text[i]];
    return ids;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_constrain TOKENIZER_DIR [REPEATS]\n");
        return 2;
    }
    int reps = argc > 2 ? atoi(argv[2]) : 50;
    if (reps < 1)
        reps = 1;
    cpm_tokenizer *tok;
    cpm_constrainer *cons;
    cpm_error e = {0};
    double t0 = cpm_bench_seconds();
    if (cpm_tokenizer_load(argv[1], &tok, &e) || cpm_constrainer_new(argv[1], &cons, &e)) {
        fprintf(stderr, "bench_constrain: %s\n", e.msg);
        return 1;
    }
    int V = cpm_tokenizer_vocab_size(tok);
    printf("vocabulary %d tokens, tokenizer + trie loaded in %.1f ms\n", V,
           (cpm_bench_seconds() - t0) * 1e3);
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *allowed = malloc((size_t)V);
    double *t = malloc((size_t)reps * sizeof *t);
    printf("%-12s %-32s %8s %10s %14s\n", "kind", "state", "tokens", "allowed", "median us/step");
    for (size_t s = 0; s < sizeof rows / sizeof *rows; s++) {
        size_t n;
        int32_t *ids = byte_tokens(tok, rows[s].text, &n);
        Cpm__V1__Constraint k = CPM__V1__CONSTRAINT__INIT;
        k.kind = rows[s].kind;
        k.schema = (char *)rows[s].schema;
        int once = strstr(rows[s].state, "compiles") != NULL, allowed_n = 0;
        for (int r = 0; r < (once ? 1 : reps); r++) {
            memset(logits, 0, (size_t)V * sizeof *logits);
            double a = cpm_bench_seconds();
            if (cpm_constrainer_apply(cons, &k, ids, n, logits, V, allowed, &e)) {
                fprintf(stderr, "bench_constrain: %s: %s\n", rows[s].state, e.msg);
                return 1;
            }
            t[r] = cpm_bench_seconds() - a;
        }
        for (int i = 0; i < V; i++)
            allowed_n += logits[i] == 0.0f;
        qsort(t, (size_t)(once ? 1 : reps), sizeof *t, cmp);
        static const char *const kinds[] = {"", "json_object", "json_schema", "tool_call"};
        printf("%-12s %-32s %8zu %10d %14.0f\n", kinds[rows[s].kind], rows[s].state, n, allowed_n,
               t[once ? 0 : reps / 2] * 1e6);
        free(ids);
    }
    free(t);
    free(allowed);
    free(logits);
    cpm_constrainer_free(cons);
    cpm_tokenizer_free(tok);
    return 0;
}
