/* test_textflow.c - router/textflow.c over an in-memory tokenizer: text arrives in
 * order behind generation, UTF-8 characters split across tokens are shown whole, stop
 * strings split across tokens end the text before them (and drop the ids after),
 * stop ids are not shown, jobs without text see ids only, logprob texts arrive, and a
 * tokenizer failure or a cancel with calls in flight gives exactly one final answer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "router/textflow.h"
#include "support/job_sink.h"

/* The vocabulary: id -> bytes ("\xC3" and "\xA9" are the two halves of "é"). */
static const char *const vocab[] = {"<s>", "Hel", "lo", " w", "orld", "\xC3", "\xA9", "x",
                                    "</s>", "!"};
enum { BOS, HEL, LO, SP_W, ORLD, E1, E2, X, EOS, BANG };

/* A tokenizer call waiting to be answered (answers are never given inside the call). */
typedef struct call {
    bool pieces;
    int32_t ids[64];
    size_t n, prefix;
    cpm_tokc_cb cb;
    void *ud;
} call;

typedef struct fixture {
    cpm_metrics m;
    cpm_jobs *jobs;
    cpm_textflow *tf;
    call queue[64];
    int head, tail;
    int calls, kicks, releases;
    int fail_status; /* nonzero: answers are this error ... */
    int fail_left;   /* ... this many more times (-1: always) */
} fixture;

static int enqueue(fixture *f, bool pieces, const int32_t *ids, size_t n, size_t prefix,
                   cpm_tokc_cb cb, void *ud) {
    assert_true(n <= 64 && f->tail - f->head < 64);
    call *c = &f->queue[f->tail++ % 64];
    *c = (call){.pieces = pieces, .n = n, .prefix = prefix, .cb = cb, .ud = ud};
    memcpy(c->ids, ids, n * sizeof *ids);
    f->calls++;
    return 0;
}

static int fake_detok(void *ud, const int32_t *ids, size_t n, size_t prefix_len, bool skip_special,
                      cpm_tokc_cb cb, void *cb_ud, cpm_error *err) {
    (void)err, (void)skip_special;
    return enqueue(ud, false, ids, n, prefix_len, cb, cb_ud);
}

static int fake_pieces(void *ud, int32_t context, const int32_t *ids, size_t n, cpm_tokc_cb cb,
                       void *cb_ud, cpm_error *err) {
    (void)context, (void)err;
    return enqueue(ud, true, ids, n, 0, cb, cb_ud);
}

static void fake_kick(void *ud) {
    ((fixture *)ud)->kicks++;
}

static void on_release(void *ud, cpm_gen *g) {
    (void)g;
    ((fixture *)ud)->releases++;
}

/* The status of the next answer. */
static int next_status(fixture *f) {
    if (f->fail_left == 0)
        return 0;
    if (f->fail_left > 0)
        f->fail_left--;
    return f->fail_status;
}

/* Bytes that end inside a UTF-8 character are held back, as the real service does. */
static size_t complete_prefix(const char *s, size_t len) {
    size_t end = len;
    while (end > 0 && ((unsigned char)s[end - 1] & 0xC0) == 0x80)
        end--;
    if (end > 0 && (unsigned char)s[end - 1] >= 0xC0) {
        unsigned char lead = (unsigned char)s[end - 1];
        size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
        return len - (end - 1) >= need ? len : end - 1;
    }
    return len;
}

static void answer_detok(fixture *f, const call *c) {
    char text[512] = "";
    size_t len = 0, consumed = 0;
    for (size_t i = c->prefix; i < c->n; i++) {
        size_t plen = strlen(vocab[c->ids[i]]);
        memcpy(text + len, vocab[c->ids[i]], plen);
        len += plen;
        if (complete_prefix(text, len) == len)
            consumed = i + 1 - c->prefix;
    }
    size_t shown = 0; /* the bytes of the consumed ids */
    for (size_t i = c->prefix; i < c->prefix + consumed; i++)
        shown += strlen(vocab[c->ids[i]]);
    text[shown] = '\0';
    cpm_tokc_result res = {.status = next_status(f), .msg = "tokenizer0: broken",
                           .text = text, .text_len = shown, .consumed = consumed};
    c->cb(c->ud, &res);
}

static void answer_pieces(fixture *f, const call *c) {
    const char *texts[64];
    size_t lens[64];
    for (size_t i = 0; i < c->n; i++) {
        texts[i] = vocab[c->ids[i]];
        lens[i] = strlen(texts[i]);
    }
    cpm_tokc_result res = {.status = next_status(f), .msg = "tokenizer0: broken",
                           .texts = texts, .texts_len = lens, .n_texts = c->n};
    c->cb(c->ud, &res);
}

/* Answers every call, including those the answers make. */
static void flush(fixture *f) {
    while (f->head < f->tail) {
        call c = f->queue[f->head++ % 64];
        if (c.pieces)
            answer_pieces(f, &c);
        else
            answer_detok(f, &c);
    }
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    cpm_jobs_hooks jh = {.ud = f, .release = on_release};
    cpm_textflow_io io = {.ud = f, .detok = fake_detok, .pieces = fake_pieces, .kick = fake_kick};
    f->jobs = cpm_jobs_new(&f->m, &jh);
    f->tf = cpm_textflow_new(&io, &f->m);
    *state = f;
    return f->jobs && f->tf ? 0 : -1;
}

static int teardown(void **state) {
    fixture *f = *state;
    assert_int_equal(f->head, f->tail); /* no call left unanswered */
    assert_int_equal(cpm_jobs_count(f->jobs), 0);
    cpm_textflow_free(f->tf);
    cpm_jobs_free(f->jobs);
    free(f);
    return 0;
}

/* A running job of one gen (prompt <s> Hel) that may generate max_new tokens. */
static cpm_job *make_job(fixture *f, rec *r, char *const *stops, int n_stops, bool text,
                         bool logprobs) {
    cpm_job *j = cpm_job_new(f->jobs, CPM_EP_COMPLETIONS, "cmpl", &rec_sink, r);
    assert_non_null(j);
    assert_int_equal(cpm_job_init_gens(j, 1, 1), 0);
    j->want_text = text;
    j->stream = true;
    j->stops = stops;
    j->n_stops = n_stops;
    j->logprobs = logprobs;
    j->top_logprobs = logprobs ? 2 : 0;
    j->prompt_ids[0] = malloc(2 * sizeof(int32_t));
    j->prompt_ids[0][0] = BOS;
    j->prompt_ids[0][1] = HEL;
    j->prompt_len[0] = 2;
    cpm_gen *g = &j->gens[0];
    g->max_new = 16;
    g->seq = 1;
    g->ids = calloc(16, sizeof *g->ids);
    g->lps = logprobs ? calloc(16, sizeof *g->lps) : NULL;
    g->stopper = cpm_stopper_new(stops, n_stops, false);
    assert_int_equal(cpm_req_transition(&g->state, CPM_REQ_PREFILLING), 0);
    assert_int_equal(cpm_job_transition(j, CPM_JOB_RUNNING), 0);
    return j;
}

/* What the pipeline does with a sampled token: record it, then tell the text flow. */
static void token(fixture *f, cpm_gen *g, int32_t id, bool stop_id, const char *end) {
    g->ids[g->n_gen] = id;
    if (g->lps) {
        cpm_tok_lp *lp = &g->lps[g->n_gen];
        *lp = (cpm_tok_lp){.id = id, .lp = -0.5f, .n_top = 2, .top_ids = {id, BANG},
                           .top_lps = {-0.5f, -2.0f}};
    }
    g->n_gen++;
    cpm_textflow_token(f->tf, g, stop_id, end);
}

static void test_text_behind_generation(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, false);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    token(f, g, SP_W, false, NULL); /* generation runs ahead of the call in flight */
    assert_int_equal(f->calls, 1);
    flush(f);
    token(f, g, ORLD, false, "length");
    assert_int_equal(r.finals, 0); /* its text is not back yet */
    flush(f);
    assert_string_equal(r.gens[0].text, "lo world");
    assert_string_equal(r.gens[0].finish, "length");
    assert_int_equal(r.gens[0].finishes, 1);
    assert_int_equal(r.gens[0].upto, 3);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(f->releases, 1);
    assert_true(f->kicks > 0);
}

static void test_utf8_split_across_tokens(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, false);
    cpm_gen *g = &j->gens[0];
    token(f, g, E1, false, NULL);
    flush(f);
    assert_int_equal(r.gens[0].len, 0); /* half a character is never shown */
    assert_int_equal(g->n_text, 0);
    token(f, g, E2, false, NULL);
    flush(f);
    assert_string_equal(r.gens[0].text, "\xC3\xA9");
    token(f, g, X, false, "length");
    flush(f);
    assert_string_equal(r.gens[0].text, "\xC3\xA9x");
    assert_int_equal(r.dones, 1);
}

/* "lo w" spans two tokens: the text ends before it, later ids are dropped. */
static void test_stop_string_across_tokens(void **state) {
    fixture *f = *state;
    rec r = {0};
    char *stops[] = {"o w"};
    cpm_job *j = make_job(f, &r, stops, 1, true, false);
    cpm_job_hold(j); /* keep j to look at its gen after the answer */
    cpm_gen *g = &j->gens[0];
    token(f, g, X, false, NULL);
    token(f, g, LO, false, NULL);
    token(f, g, SP_W, false, NULL);
    token(f, g, ORLD, false, NULL); /* sampled before the stop string was seen */
    flush(f);
    assert_string_equal(r.gens[0].text, "xl");
    assert_string_equal(r.gens[0].finish, "stop");
    assert_int_equal(g->n_gen, 3); /* x lo " w": ORLD is dropped as never generated */
    assert_int_equal(r.dones, 1);
    assert_int_equal(f->releases, 1);
    cpm_job_drop(j);
}

/* A held-back prefix of a stop string that never completes is shown at the end. */
static void test_stop_prefix_released(void **state) {
    fixture *f = *state;
    rec r = {0};
    char *stops[] = {"lo!"};
    cpm_job *j = make_job(f, &r, stops, 1, true, false);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    flush(f);
    assert_string_equal(r.gens[0].text, ""); /* "lo" may start "lo!" */
    token(f, g, X, false, "length");
    flush(f);
    assert_string_equal(r.gens[0].text, "lox");
    assert_string_equal(r.gens[0].finish, "length");
}

static void test_stop_id_not_shown(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, false);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    token(f, g, EOS, true, "stop");
    flush(f);
    assert_string_equal(r.gens[0].text, "lo");
    assert_string_equal(r.gens[0].finish, "stop");
    assert_int_equal(r.gens[0].upto, 2); /* the final delta names every id, the stop id too */
    assert_int_equal(r.dones, 1);
}

/* Token ids only (RPC, tokenize: off): no tokenizer call, one delta per token, the end
 * at once. */
static void test_ids_only(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, false, true);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    assert_int_equal(r.gens[0].upto, 1);
    token(f, g, SP_W, false, NULL);
    assert_int_equal(r.gens[0].upto, 2);
    token(f, g, EOS, true, "stop");
    assert_int_equal(f->calls, 0);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.gens[0].len, 0);
    assert_string_equal(r.gens[0].finish, "stop");
}

static void test_logprob_texts(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, true);
    cpm_job_hold(j); /* keep j to look at its gen after the answer */
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    token(f, g, ORLD, false, "length");
    assert_int_equal(g->lp_pending, 2);
    flush(f);
    assert_int_equal(g->n_lp_ready, 2);
    assert_string_equal(g->lps[0].text, "lo");
    assert_string_equal(g->lps[0].top_text[1], "!");
    assert_string_equal(g->lps[1].text, "orld");
    assert_int_equal(r.dones, 1);
    cpm_job_drop(j);
}

/* A tokenizer that refuses (the input's fault) fails the job at once, exactly once. */
static void test_tokenizer_refusal_one_answer(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, true);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL); /* a detok and a pieces call */
    f->fail_status = CPM_EINVAL;
    f->fail_left = -1;
    flush(f);
    assert_int_equal(f->calls, 2);
    assert_int_equal(r.finals, 1);
    assert_int_equal(r.fails, 1);
    assert_int_equal(r.last_status, 503);
    assert_string_equal(r.last_code, "tokenizer_error");
    assert_int_equal(r.frees, 1); /* freed once the last call came back */
}

/* A lost tokenizer call goes again (the hub's io picks another replica): the text
 * arrives whole and in order. */
static void test_lost_call_retried(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, true);
    cpm_gen *g = &j->gens[0];
    token(f, g, LO, false, NULL);
    f->fail_status = CPM_ECLOSED;
    f->fail_left = 2; /* the first detok and the first pieces call */
    flush(f);
    token(f, g, SP_W, false, "length");
    flush(f);
    assert_int_equal(f->m.retries, 2);
    assert_string_equal(r.gens[0].text, "lo w");
    assert_int_equal(r.dones, 1);
}

/* Every attempt timed out: one error. */
static void test_attempts_run_out(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, false);
    token(f, &j->gens[0], LO, false, NULL);
    f->fail_status = CPM_ETIMEDOUT;
    f->fail_left = -1;
    flush(f);
    assert_int_equal(f->calls, CPM_TEXTFLOW_ATTEMPTS);
    assert_int_equal(r.fails, 1);
    assert_int_equal(r.finals, 1);
}

/* Cancelled with a call in flight: the late answer shows nothing and frees the job. */
static void test_cancel_with_call_in_flight(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, NULL, 0, true, false);
    token(f, &j->gens[0], LO, false, NULL);
    cpm_job_cancel(j);
    assert_int_equal(r.cancels, 1);
    assert_int_equal(r.frees, 0);
    flush(f);
    assert_int_equal(r.gens[0].len, 0);
    assert_int_equal(r.finals, 1);
    assert_int_equal(r.frees, 1);
}

int main(void) {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_text_behind_generation), T(test_utf8_split_across_tokens),
        T(test_stop_string_across_tokens), T(test_stop_prefix_released),
        T(test_stop_id_not_shown), T(test_ids_only), T(test_logprob_texts),
        T(test_tokenizer_refusal_one_answer), T(test_lost_call_retried), T(test_attempts_run_out),
        T(test_cancel_with_call_in_flight),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
