/* bench_constrain.c - the cost of one constrained-decoding mask over the whole vocabulary
 * (json_object), from the states a JSON answer passes through, against nothing else: a
 * decode step of the model costs 70-300 ms on the 1B shape on this kind of machine.
 *
 *   bench_constrain TOKENIZER_DIR [REPEATS (50)]
 * A benchmark, never a test: nothing is asserted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/clock.h"
#include "services/sampler/json_match.h"
#include "services/sampler/vocab_trie.h"
#include "services/tokenizer/tokenizer.h"

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
    cpm_tokenizer *tok;
    cpm_vtrie *trie;
    cpm_error e = {0};
    double t0 = cpm_bench_seconds();
    if (cpm_tokenizer_load(argv[1], &tok, &e) || cpm_vtrie_new(tok, &trie, &e)) {
        fprintf(stderr, "bench_constrain: %s\n", e.msg);
        return 1;
    }
    printf("vocabulary %d tokens, trie built in %.1f ms\n", cpm_vtrie_vocab(trie),
           (cpm_bench_seconds() - t0) * 1e3);
    static const char *states[][2] = {
        {"start", ""},
        {"after '{'", "{"},
        {"inside a key", "{\"na"},
        {"inside a long string", "{\"name\":\"The quick brown fox jumps over"},
        {"inside a number", "{\"n\":12"},
        {"after ',' in a nested array", "{\"a\":[{\"b\":[1,"},
    };
    uint8_t *allowed = malloc((size_t)cpm_vtrie_vocab(trie));
    double *t = malloc((size_t)reps * sizeof *t);
    printf("%-30s %10s %14s\n", "state", "allowed", "median us/mask");
    for (size_t s = 0; s < sizeof states / sizeof *states; s++) {
        cpm_jm m;
        cpm_jm_init(&m);
        for (const char *p = states[s][1]; *p; p++)
            cpm_jm_feed(&m, (uint8_t)*p);
        int n = 0;
        for (int r = 0; r < reps; r++) {
            double a = cpm_bench_seconds();
            n = cpm_vtrie_mask(trie, &m, 0, allowed);
            t[r] = cpm_bench_seconds() - a;
        }
        qsort(t, (size_t)reps, sizeof *t, cmp);
        printf("%-30s %10d %14.0f\n", states[s][0], n, t[reps / 2] * 1e6);
    }
    free(t);
    free(allowed);
    cpm_vtrie_free(trie);
    cpm_tokenizer_free(tok);
    return 0;
}
