/* test_router_tokclient.c - the router's tokenizer client against a real cpm-tokenizer
 * handler (cpm_server + cpm_tokenizer_svc_handle on an inproc endpoint, same loop):
 * tokenize, chat, incremental detokenize, pieces, error replies, timeouts, closed sockets.
 * argv[1] = a model directory with tokenizer files (tests/golden/data/minicpm4-tokenizer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/tokclient.h"
#include "services/tokenizer/service.h"

static const char *model_dir;

typedef struct fixture {
    uv_loop_t loop;
    void *z;
    cpm_tokenizer *tok;
    cpm_server *srv;
    cpm_sock *dealer;
} fixture;

/* What one callback saw (copied: the result is borrowed). */
typedef struct seen {
    int calls, status;
    bool refused;
    char msg[CPM_ERROR_MSG_MAX];
    int32_t ids[4096];
    size_t n_ids;
    char text[4096];
    size_t consumed;
    size_t n_texts;
    char texts[CPM_TOKC_MAX_PIECES][64]; /* pieces (copied with their length) */
    size_t texts_len[CPM_TOKC_MAX_PIECES];
} seen;

static void on_result(void *user, const cpm_tokc_result *res) {
    seen *s = user;
    s->calls++;
    s->status = res->status;
    s->refused = res->refused;
    snprintf(s->msg, sizeof s->msg, "%s", res->msg ? res->msg : "");
    s->n_ids = res->n_ids < 4096 ? res->n_ids : 4096;
    if (res->ids)
        memcpy(s->ids, res->ids, s->n_ids * sizeof *s->ids);
    snprintf(s->text, sizeof s->text, "%s", res->text ? res->text : "");
    s->consumed = res->consumed;
    s->n_texts = res->n_texts;
    for (size_t i = 0; i < res->n_texts && i < CPM_TOKC_MAX_PIECES; i++) {
        s->texts_len[i] = res->texts_len[i] < 63 ? res->texts_len[i] : 63;
        memcpy(s->texts[i], res->texts[i], s->texts_len[i]);
        s->texts[i][s->texts_len[i]] = '\0';
    }
}

static void on_stray(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s, (void)user;
    cpm_inmsg_free(m);
}

/* Runs the loop until the callback has run. */
static void wait_for(fixture *f, const seen *s) {
    for (int i = 0; i < 100000 && s->calls == 0; i++)
        uv_run(&f->loop, UV_RUN_ONCE);
    assert_int_equal(s->calls, 1);
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    cpm_error e = {0};
    uv_loop_init(&f->loop);
    f->z = zmq_ctx_new();
    if (cpm_tokenizer_load(model_dir, &f->tok, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    cpm_server_opts o = {.service = "tokenizer", .name = "tok0",
                         .handler = cpm_tokenizer_svc_handle, .user = f->tok};
    if (cpm_server_new(&f->loop, f->z, "inproc://tok0", &o, &f->srv, &e) ||
        cpm_sock_new(&f->loop, f->z, ZMQ_DEALER, NULL, on_stray, NULL, &f->dealer, &e) ||
        cpm_sock_connect(f->dealer, "inproc://tok0", &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    cpm_sock_free(f->dealer);
    cpm_server_free(f->srv);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    uv_loop_close(&f->loop);
    zmq_ctx_term(f->z);
    cpm_tokenizer_free(f->tok);
    free(f);
    return 0;
}

static char *read_file(const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", model_dir, name);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    return buf;
}

/* The golden prompt text tokenizes to the golden ids (BOS included). */
static void test_tokenize_matches_golden_ids(void **state) {
    fixture *f = *state;
    char *prompt = strdup(read_file("prompt.txt"));
    char *ids_txt = read_file("ids.txt");
    int32_t want[256];
    size_t n_want = 0;
    for (char *p = ids_txt, *end; n_want < 256; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        want[n_want++] = (int32_t)v;
    }
    seen s = {0};
    cpm_error e = {0};
    assert_int_equal(cpm_tokc_tokenize(f->dealer, "tok0", prompt, true, 5000, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_int_equal(s.status, 0);
    assert_int_equal(s.n_ids, n_want);
    assert_memory_equal(s.ids, want, n_want * sizeof *want);
    free(prompt);
}

/* Chat: the service renders the model's template and tokenizes, as the library does. */
static void test_chat_renders_and_tokenizes(void **state) {
    fixture *f = *state;
    cpm_tokc_msg msgs[] = {{.role = "system", .content = "Be brief."},
                           {.role = "user", .content = "Hello, 世界!"}};
    seen s = {0};
    cpm_error e = {0};
    assert_int_equal(cpm_tokc_chat(f->dealer, "tok0", msgs, 2, NULL, 5000, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_int_equal(s.status, 0);
    cpm_chat_msg cm[] = {{.role = "system", .content = "Be brief."},
                         {.role = "user", .content = "Hello, 世界!"}};
    char *text;
    int32_t *ids;
    size_t n;
    assert_int_equal(cpm_chat_render(f->tok, cm, 2, NULL, true, &text, &e), 0);
    assert_int_equal(cpm_tokenizer_encode(f->tok, text, strlen(text), true, &ids, &n, &e), 0);
    assert_int_equal(s.n_ids, n);
    assert_memory_equal(s.ids, ids, n * sizeof *ids);
    free(text);
    free(ids);
}

/* Detokenizing id by id (resending what ended inside a character) gives the one-shot text. */
/* Tools, an assistant's tool calls and reasoning, and a tool result travel in the chat
 * request and render as the library renders them (MiniCPM3's tool format). */
static void test_chat_with_tools(void **state) {
    fixture *f = *state;
    const char *tools = "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
                        "\"description\":\"Weather of a city\",\"parameters\":{\"type\":\"object\","
                        "\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}}}]";
    const char *calls = "[{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":"
                        "\"get_weather\",\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]";
    cpm_tokc_msg msgs[] = {{"user", "Weather in Paris?", NULL, NULL, NULL},
                           {"assistant", "", calls, "I should look it up.", NULL},
                           {"tool", "sunny", NULL, NULL, "call_1"}};
    seen s = {0};
    cpm_error e = {0};
    assert_int_equal(cpm_tokc_chat(f->dealer, "tok0", msgs, 3, tools, 5000, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_int_equal(s.status, 0);
    cpm_chat_msg cm[] = {{.role = "user", .content = "Weather in Paris?"},
                         {.role = "assistant", .content = "", .tool_calls_json = calls,
                          .thought = "I should look it up."},
                         {.role = "tool", .content = "sunny"}};
    char *text;
    int32_t *ids;
    size_t n;
    assert_int_equal(cpm_chat_render(f->tok, cm, 3, tools, true, &text, &e), 0);
    assert_non_null(strstr(text, "get_weather(city=\"Paris\")"));
    assert_non_null(strstr(text, "<|thought_start|>\nI should look it up.\n<|thought_end|>"));
    assert_int_equal(cpm_tokenizer_encode(f->tok, text, strlen(text), true, &ids, &n, &e), 0);
    assert_int_equal(s.n_ids, n);
    assert_memory_equal(s.ids, ids, n * sizeof *ids);
    free(text);
    free(ids);
}

/* A tools array that is not JSON is the request's fault: refused, naming tools. */
static void test_chat_bad_tools_refused(void **state) {
    fixture *f = *state;
    cpm_tokc_msg msgs[] = {{"user", "hi", NULL, NULL, NULL}};
    seen s = {0};
    cpm_error e = {0};
    assert_int_equal(cpm_tokc_chat(f->dealer, "tok0", msgs, 1, "{oops", 5000, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_int_not_equal(s.status, 0);
    assert_true(s.refused);
    assert_non_null(strstr(s.msg, "tools"));
}

static void test_incremental_detok_equals_decode(void **state) {
    fixture *f = *state;
    const char *sample = "Streaming: 你好，MiniCPM! naïve café 😀 end.";
    int32_t *ids;
    size_t n;
    cpm_error e = {0};
    assert_int_equal(cpm_tokenizer_encode(f->tok, sample, strlen(sample), false, &ids, &n, &e), 0);
    char *want;
    size_t n_want;
    assert_int_equal(cpm_tokenizer_decode(f->tok, ids, n, true, &want, &n_want, &e), 0);
    char got[1024] = "";
    size_t done = 0;
    for (size_t upto = 1; upto <= n; upto++) {
        seen s = {0};
        assert_int_equal(cpm_tokc_detok(f->dealer, "tok0", ids, upto, done, true, 5000, on_result,
                                        &s, &e), 0);
        wait_for(f, &s);
        assert_int_equal(s.status, 0);
        assert_true(s.consumed <= upto - done);
        strncat(got, s.text, sizeof got - strlen(got) - 1);
        done += s.consumed;
    }
    assert_int_equal(done, n);
    assert_string_equal(got, want);
    free(ids);
    free(want);
}

/* An error reply reaches the callback as refused, naming the replica. */
static void test_error_reply_is_refused(void **state) {
    fixture *f = *state;
    int32_t bad[] = {5, 1 << 30};
    seen s = {0};
    cpm_error e = {0};
    assert_int_equal(cpm_tokc_detok(f->dealer, "tok0", bad, 2, 1, true, 5000, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_true(s.status < 0);
    assert_true(s.refused);
    assert_true(strncmp(s.msg, "tok0: ", 6) == 0);
    /* and the prefix beyond the ids is refused before sending */
    assert_int_not_equal(cpm_tokc_detok(f->dealer, "tok0", bad, 2, 3, true, 5000, on_result, &s,
                                        &e), 0);
    assert_int_equal(s.calls, 1);
}

/* One pieces call gives, per candidate, the text a [context, id] detokenize gives
 * (prefix_len 1), including "" where the id ends inside a character. */
static void test_pieces_equal_pair_detok(void **state) {
    fixture *f = *state;
    assert_int_equal(CPM_TOKC_MAX_PIECES, CPM_TOKENIZER_SVC_MAX_PIECES);
    const char *sample = " world 你好 😀 𝔘x";
    int32_t *ids;
    size_t n;
    cpm_error e = {0};
    assert_int_equal(cpm_tokenizer_encode(f->tok, sample, strlen(sample), false, &ids, &n, &e), 0);
    assert_true(n >= 6 && n < CPM_TOKC_MAX_PIECES);
    int empty = 0;
    for (size_t c = 0; c < n; c++) {
        seen s = {0};
        assert_int_equal(cpm_tokc_pieces(f->dealer, "tok0", ids[c], ids, n, false, 5000, on_result,
                                         &s, &e), 0);
        wait_for(f, &s);
        assert_int_equal(s.status, 0);
        assert_int_equal(s.n_texts, n);
        for (size_t i = 0; i < n; i++) {
            int32_t pair[2] = {ids[c], ids[i]};
            seen d = {0};
            assert_int_equal(cpm_tokc_detok(f->dealer, "tok0", pair, 2, 1, false, 5000, on_result,
                                            &d, &e), 0);
            wait_for(f, &d);
            assert_int_equal(d.status, 0);
            assert_string_equal(s.texts[i], d.text);
            assert_int_equal(s.texts_len[i], strlen(d.text));
            empty += s.texts_len[i] == 0;
        }
    }
    assert_true(empty > 0);
    free(ids);
}

/* Bad pieces calls: refused before sending (no ids, too many), or by the service (an id
 * outside the vocabulary), naming the replica. */
static void test_pieces_refused(void **state) {
    fixture *f = *state;
    int32_t ids[CPM_TOKC_MAX_PIECES + 1] = {0};
    seen s = {0};
    cpm_error e = {0};
    assert_int_not_equal(cpm_tokc_pieces(f->dealer, "tok0", 5, ids, 0, false, 5000, on_result, &s,
                                         &e), 0);
    assert_int_not_equal(cpm_tokc_pieces(f->dealer, "tok0", 5, ids, CPM_TOKC_MAX_PIECES + 1, false,
                                         5000, on_result, &s, &e), 0);
    assert_non_null(strstr(e.msg, "tok0"));
    assert_int_equal(s.calls, 0);
    ids[3] = 1 << 30;
    assert_int_equal(cpm_tokc_pieces(f->dealer, "tok0", 5, ids, 4, false, 5000, on_result, &s, &e),
                     0);
    wait_for(f, &s);
    assert_int_equal(s.status, CPM_ERANGE);
    assert_true(s.refused);
    assert_true(strncmp(s.msg, "tok0: ", 6) == 0);
    assert_non_null(strstr(s.msg, "ids[3]"));
}

/* Nobody answers: a timeout naming the replica and the limit; a freed socket: closed. */
static void test_timeout_and_close(void **state) {
    fixture *f = *state;
    cpm_sock *d;
    cpm_error e = {0};
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_DEALER, NULL, on_stray, NULL, &d, &e), 0);
    assert_int_equal(cpm_sock_connect(d, "inproc://nobody", &e), 0);
    seen s = {0};
    assert_int_equal(cpm_tokc_tokenize(d, "tok9", "hi", true, 50, on_result, &s, &e), 0);
    wait_for(f, &s);
    assert_int_equal(s.status, CPM_ETIMEDOUT);
    assert_false(s.refused);
    assert_non_null(strstr(s.msg, "tok9"));
    assert_non_null(strstr(s.msg, "50 ms"));
    seen s2 = {0};
    assert_int_equal(cpm_tokc_tokenize(d, "tok9", "hi", true, 5000, on_result, &s2, &e), 0);
    cpm_sock_free(d);
    assert_int_equal(s2.calls, 1);
    assert_int_equal(s2.status, CPM_ECLOSED);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenize_matches_golden_ids),
        cmocka_unit_test(test_chat_renders_and_tokenizes),
        cmocka_unit_test(test_chat_with_tools),
        cmocka_unit_test(test_chat_bad_tools_refused),
        cmocka_unit_test(test_incremental_detok_equals_decode),
        cmocka_unit_test(test_error_reply_is_refused),
        cmocka_unit_test(test_pieces_equal_pair_detok),
        cmocka_unit_test(test_pieces_refused),
        cmocka_unit_test(test_timeout_and_close),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
