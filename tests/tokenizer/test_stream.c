/* test_stream.c - streams every string of the parity corpus token by token, with
 * both vocabularies and both skip_special settings, and checks that each piece is
 * valid UTF-8 and that the pieces concatenate to the one-shot decode. Then does the
 * same for pseudo-random id sequences rich in byte pieces, which no encoder emits
 * but a sampler can.
 *   test_stream CORPUS.jsonl MODEL_DIR...
 */
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "services/tokenizer/tokenizer.h"
#include "common/utf8.h"

static const char *corpus_path;
static char **model_dirs;
static int n_model_dirs;

typedef struct stream_stats {
    size_t strings, pieces, ids;
} stream_stats;

/* Streams ids; every piece must be UTF-8 and the total must equal decode(). */
static void check_stream(const cpm_tokenizer *tok, const int32_t *ids, size_t n, bool skip, stream_stats *st) {
    cpm_error err = {0};
    char *want;
    size_t want_len;
    assert_int_equal(cpm_tokenizer_decode(tok, ids, n, skip, &want, &want_len, &err), 0);
    cpm_detok *d = cpm_detok_new(tok, skip);
    assert_non_null(d);
    char *got = malloc(want_len + 1);
    assert_non_null(got);
    size_t got_len = 0;
    for (size_t i = 0; i <= n; i++) {
        const char *piece;
        size_t len;
        int rc = i < n ? cpm_detok_push(d, ids[i], &piece, &len, &err) : cpm_detok_flush(d, &piece, &len, &err);
        assert_int_equal(rc, 0);
        assert_true(cpm_utf8_valid(piece, len, NULL));
        assert_true(got_len + len <= want_len);
        memcpy(got + got_len, piece, len);
        got_len += len;
        st->pieces += len > 0;
    }
    assert_int_equal(got_len, want_len);
    assert_memory_equal(got, want, want_len);
    st->ids += n;
    free(got);
    free(want);
    cpm_detok_free(d);
}

static void test_corpus_streams(void **state) {
    (void)state;
    for (int m = 0; m < n_model_dirs; m++) {
        cpm_tokenizer *tok;
        cpm_error err = {0};
        assert_int_equal(cpm_tokenizer_load(model_dirs[m], &tok, &err), 0);
        FILE *f = fopen(corpus_path, "r");
        assert_non_null(f);
        char *line = NULL;
        size_t cap = 0;
        stream_stats st = {0};
        while (getline(&line, &cap, f) > 0) {
            json_error_t jerr;
            json_t *s = json_loads(line, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
            assert_true(json_is_string(s));
            int32_t *ids;
            size_t n;
            assert_int_equal(cpm_tokenizer_encode(tok, json_string_value(s), json_string_length(s), true, &ids, &n, &err), 0);
            check_stream(tok, ids, n, false, &st);
            check_stream(tok, ids, n, true, &st);
            st.strings++;
            free(ids);
            json_decref(s);
        }
        free(line);
        fclose(f);
        assert_true(st.strings >= 2000);
        print_message("%s: streamed %zu strings (%zu ids), %zu non-empty pieces\n", model_dirs[m], st.strings, st.ids,
                      st.pieces);
        cpm_tokenizer_free(tok);
    }
}

/* Random ids where half are byte pieces (ids 1089..1344 in both vocabularies). */
static void test_random_byte_streams(void **state) {
    (void)state;
    for (int m = 0; m < n_model_dirs; m++) {
        cpm_tokenizer *tok;
        cpm_error err = {0};
        assert_int_equal(cpm_tokenizer_load(model_dirs[m], &tok, &err), 0);
        int32_t vocab = cpm_tokenizer_vocab_size(tok);
        uint64_t x = 0x9E3779B97F4A7C15ull;
        stream_stats st = {0};
        for (int round = 0; round < 3000; round++) {
            int32_t ids[24];
            size_t n = 1 + round % 24;
            for (size_t i = 0; i < n; i++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                ids[i] = (x >> 40) % 2 ? 1089 + (int32_t)((x >> 8) % 256) : (int32_t)((x >> 16) % (uint64_t)vocab);
            }
            check_stream(tok, ids, n, round % 2, &st);
        }
        cpm_tokenizer_free(tok);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_stream CORPUS.jsonl MODEL_DIR...\n");
        return 2;
    }
    corpus_path = argv[1];
    model_dirs = argv + 2;
    n_model_dirs = argc - 2;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus_streams),
        cmocka_unit_test(test_random_byte_streams),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
