/* test_services.c - the handlers of cpm-sampler and cpm-tokenizer, called directly as the
 * server's workers call them: replies, reproducibility across "replicas", errors.
 * argv[1] = a model directory with tokenizer files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "services/sampler/service.h"
#include "services/tokenizer/service.h"

static const char *model_dir;

enum { ROWS = 3, VOCAB = 50 };

/* Runs the sampler handler on ROWS rows of logits; returns the unpacked reply. */
static cpm_envelope *sample(const float *logits, float temperature, uint64_t seed, uint32_t step,
                            cpm_error *e, int *ret_rc) {
    Cpm__V1__SamplingParams p = CPM__V1__SAMPLING_PARAMS__INIT;
    p.temperature = temperature;
    p.seed = seed;
    p.n_logprobs = 3;
    Cpm__V1__SampleRow rows[ROWS], *rp[ROWS];
    for (int i = 0; i < ROWS; i++) {
        cpm__v1__sample_row__init(&rows[i]);
        rows[i].params = &p;
        rows[i].step = step;
        rp[i] = &rows[i];
    }
    uint32_t shape[] = {ROWS, VOCAB};
    Cpm__V1__TensorDesc td = CPM__V1__TENSOR_DESC__INIT;
    td.dtype = CPM__V1__DTYPE__DTYPE_F32;
    td.n_shape = 2;
    td.shape = shape;
    Cpm__V1__SampleRequest req = CPM__V1__SAMPLE_REQUEST__INIT;
    req.n_rows = ROWS;
    req.rows = rp;
    req.logits = &td;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLE;
    env.sample = &req;
    cpm_inmsg in = {.env = &env, .tensor = logits, .tensor_size = sizeof(float) * ROWS * VOCAB};
    cpm_reply out = {.corr = 9};
    *ret_rc = cpm_sampler_svc_handle(NULL, &in, &out, e);
    if (*ret_rc)
        return NULL;
    cpm_envelope *r;
    assert_int_equal(cpm_wire_unpack(out.env_buf, out.env_size, -1, &r, NULL), 0);
    free(out.env_buf);
    assert_int_equal(r->corr, 9);
    return r;
}

static void test_sampler_greedy_and_seeded(void **state) {
    (void)state;
    float logits[ROWS * VOCAB];
    for (int i = 0; i < ROWS * VOCAB; i++)
        logits[i] = (float)((i * 37) % 101) / 10.0f;
    logits[0 * VOCAB + 7] = 50.0f;
    logits[1 * VOCAB + 33] = 50.0f;
    logits[2 * VOCAB + 0] = 50.0f;
    cpm_error e = {0};
    int rc;
    cpm_envelope *r = sample(logits, 0.0f, 0, 0, &e, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(r->sampled->n_tokens, ROWS);
    assert_int_equal(r->sampled->tokens[0]->id, 7);
    assert_int_equal(r->sampled->tokens[1]->id, 33);
    assert_int_equal(r->sampled->tokens[2]->id, 0);
    assert_int_equal(r->sampled->tokens[0]->n_top, 3);
    assert_int_equal(r->sampled->tokens[0]->top[0]->id, 7);
    assert_true(r->sampled->tokens[0]->logprob <= 0.0f);
    cpm_wire_free(r);
    /* Flat logits, temperature 1: the same (seed, step) gives the same draws on any call
     * (any replica); across 20 steps the draws are not all the same token. */
    for (int i = 0; i < ROWS * VOCAB; i++)
        logits[i] = 0.0f;
    int first[20], distinct = 0;
    for (uint32_t s = 0; s < 20; s++) {
        cpm_envelope *a = sample(logits, 1.0f, 1234, s, &e, &rc);
        cpm_envelope *b = sample(logits, 1.0f, 1234, s, &e, &rc);
        assert_int_equal(a->sampled->tokens[0]->id, b->sampled->tokens[0]->id);
        first[s] = a->sampled->tokens[0]->id;
        distinct += s > 0 && first[s] != first[0];
        cpm_wire_free(a);
        cpm_wire_free(b);
    }
    assert_true(distinct > 0);
}

static void test_sampler_rejects_bad_params(void **state) {
    (void)state;
    float logits[ROWS * VOCAB] = {0};
    cpm_error e = {0};
    int rc;
    assert_null(sample(logits, -1.0f, 0, 0, &e, &rc));
    assert_int_equal(rc, CPM_ERANGE);
    assert_non_null(strstr(e.msg, "sample.rows[0]"));
    assert_non_null(strstr(e.msg, "temperature"));
}

static void test_tokenizer_detok_holds_back_partial_chars(void **state) {
    (void)state;
    cpm_tokenizer *tok;
    cpm_error e = {0};
    if (cpm_tokenizer_load(model_dir, &tok, &e))
        fail_msg("%s", e.msg);
    const char *text = "Hello, world! 你好，MiniCPM。";
    int32_t *ids;
    size_t n;
    assert_int_equal(cpm_tokenizer_encode(tok, text, strlen(text), false, &ids, &n, &e), 0);
    /* Stream the ids one by one the way the router would, resending held-back ids. */
    char got[256] = "";
    size_t shown = 0;
    for (size_t upto = 1; upto <= n; upto++) {
        char *piece;
        size_t consumed;
        assert_int_equal(cpm_tokenizer_svc_detok(tok, ids, upto, shown, false, &piece, &consumed, &e), 0);
        /* Every piece is whole UTF-8: no U+FFFD ever reaches the client mid-stream. */
        assert_null(strstr(piece, "\xEF\xBF\xBD"));
        strcat(got, piece);
        free(piece);
        shown += consumed;
    }
    assert_int_equal(shown, n);
    char *whole;
    assert_int_equal(cpm_tokenizer_decode(tok, ids, n, false, &whole, NULL, &e), 0);
    assert_string_equal(got, whole);
    free(whole);
    free(ids);
    cpm_tokenizer_free(tok);
}

/* Runs the tokenizer handler on a Pieces request; the unpacked reply, or NULL with *ret_rc. */
static cpm_envelope *pieces(const cpm_tokenizer *tok, int32_t context, const int32_t *ids, size_t n,
                            bool skip_special, cpm_error *e, int *ret_rc) {
    Cpm__V1__PiecesRequest q = CPM__V1__PIECES_REQUEST__INIT;
    q.context = context;
    q.n_ids = n;
    q.ids = (int32_t *)ids;
    q.skip_special = skip_special;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_PIECES;
    env.pieces = &q;
    cpm_inmsg in = {.env = &env, .tensor_size = -1};
    cpm_reply out = {.corr = 5};
    *ret_rc = cpm_tokenizer_svc_handle((void *)tok, &in, &out, e);
    if (*ret_rc)
        return NULL;
    cpm_envelope *r;
    assert_int_equal(cpm_wire_unpack(out.env_buf, out.env_size, -1, &r, NULL), 0);
    free(out.env_buf);
    assert_int_equal(r->corr, 5);
    assert_int_equal(r->body_case, CPM__V1__ENVELOPE__BODY_PIECES_REPLY);
    return r;
}

/* Each text of a Pieces reply is, byte for byte, the Detokenize of [context, id] with
 * prefix_len 1: word-initial spaces, whole characters, "" for a byte that ends inside
 * one, special tokens shown or skipped. */
static void test_tokenizer_pieces_equal_pair_detok(void **state) {
    (void)state;
    cpm_tokenizer *tok;
    cpm_error e = {0};
    if (cpm_tokenizer_load(model_dir, &tok, &e))
        fail_msg("%s", e.msg);
    const char *text = "Hello world, 你好 😀 naïve 𝔘";
    int32_t *ids;
    size_t n;
    assert_int_equal(cpm_tokenizer_encode(tok, text, strlen(text), true, &ids, &n, &e), 0);
    assert_true(n >= 8 && n <= CPM_TOKENIZER_SVC_MAX_PIECES - 2);
    int32_t cand[CPM_TOKENIZER_SVC_MAX_PIECES];
    memcpy(cand, ids, n * sizeof *ids);
    cand[n] = 2; /* EOS: special */
    size_t m = n + 1;
    int held_back = 0;
    for (int skip = 0; skip < 2; skip++)
        for (size_t c = 0; c < n; c++) {
            int rc;
            cpm_envelope *r = pieces(tok, ids[c], cand, m, skip, &e, &rc);
            assert_int_equal(rc, 0);
            assert_int_equal(r->pieces_reply->n_texts, m);
            for (size_t i = 0; i < m; i++) {
                int32_t pair[2] = {ids[c], cand[i]};
                char *want;
                size_t consumed;
                assert_int_equal(cpm_tokenizer_svc_detok(tok, pair, 2, 1, skip, &want, &consumed, &e), 0);
                const ProtobufCBinaryData *got = &r->pieces_reply->texts[i];
                assert_int_equal(got->len, strlen(want));
                assert_memory_equal(got->data, want, got->len);
                held_back += consumed == 0;
                free(want);
            }
            cpm_wire_free(r);
        }
    assert_true(held_back > 0); /* 𝔘 is four byte tokens: pairs of them end inside it */
    free(ids);
    cpm_tokenizer_free(tok);
}

/* Bad requests get an error naming the field, as the other tokenizer calls do. */
static void test_tokenizer_pieces_rejects_bad_requests(void **state) {
    (void)state;
    cpm_tokenizer *tok;
    cpm_error e = {0};
    if (cpm_tokenizer_load(model_dir, &tok, &e))
        fail_msg("%s", e.msg);
    int32_t vocab = cpm_tokenizer_vocab_size(tok);
    int32_t many[CPM_TOKENIZER_SVC_MAX_PIECES + 1];
    for (int i = 0; i <= CPM_TOKENIZER_SVC_MAX_PIECES; i++)
        many[i] = 100 + i;
    int rc;
    cpm_envelope *r = pieces(tok, 5, many, CPM_TOKENIZER_SVC_MAX_PIECES, false, &e, &rc);
    assert_int_equal(rc, 0); /* the limit itself is fine */
    assert_int_equal(r->pieces_reply->n_texts, CPM_TOKENIZER_SVC_MAX_PIECES);
    cpm_wire_free(r);
    e = (cpm_error){0};
    assert_null(pieces(tok, 5, many, CPM_TOKENIZER_SVC_MAX_PIECES + 1, false, &e, &rc));
    assert_int_equal(rc, CPM_ELIMIT);
    assert_non_null(strstr(e.msg, "65 ids"));
    e = (cpm_error){0};
    assert_null(pieces(tok, 5, many, 0, false, &e, &rc)); /* nothing to ask about */
    assert_int_equal(rc, CPM_EINVAL);
    int32_t bad[] = {10, 11, vocab};
    e = (cpm_error){0};
    assert_null(pieces(tok, 5, bad, 3, false, &e, &rc));
    assert_int_equal(rc, CPM_ERANGE);
    assert_non_null(strstr(e.msg, "ids[2]"));
    bad[2] = -1;
    e = (cpm_error){0};
    assert_null(pieces(tok, 5, bad, 3, false, &e, &rc));
    assert_int_equal(rc, CPM_ERANGE);
    e = (cpm_error){0};
    assert_null(pieces(tok, vocab + 7, bad, 2, false, &e, &rc));
    assert_int_equal(rc, CPM_ERANGE);
    assert_non_null(strstr(e.msg, "context"));
    /* a truncated request never reaches the handler: the wire refuses it */
    Cpm__V1__PiecesRequest q = CPM__V1__PIECES_REQUEST__INIT;
    q.context = 5;
    q.n_ids = 3;
    q.ids = many;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.version = CPM_WIRE_VERSION;
    env.body_case = CPM__V1__ENVELOPE__BODY_PIECES;
    env.pieces = &q;
    uint8_t buf[256];
    size_t len = cpm__v1__envelope__pack(&env, buf);
    cpm_envelope *u;
    assert_int_equal(cpm_wire_unpack(buf, len, -1, &u, NULL), 0);
    assert_int_equal(u->pieces->n_ids, 3);
    cpm_wire_free(u);
    assert_int_equal(cpm_wire_unpack(buf, len - 1, -1, &u, NULL), CPM_EFORMAT);
    cpm_tokenizer_free(tok);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_services MODEL_DIR_WITH_TOKENIZER\n");
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sampler_greedy_and_seeded),
        cmocka_unit_test(test_sampler_rejects_bad_params),
        cmocka_unit_test(test_tokenizer_detok_holds_back_partial_chars),
        cmocka_unit_test(test_tokenizer_pieces_equal_pair_detok),
        cmocka_unit_test(test_tokenizer_pieces_rejects_bad_requests),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
