/* test_openai.c - router/openai.c: request validation and response rendering.
 *
 * Requests: every accepted form, and the 400s (malformed JSON, wrong types, out of
 * range, unknown fields, unsupported features) with the field they name.
 * Responses are parsed back with jansson and checked field by field.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "router/openai.h"

static cpm_oai_request *parse_ok(cpm_oai_kind kind, const char *body) {
    cpm_oai_request *rq = NULL;
    cpm_oai_error e = {0};
    int rc = cpm_oai_parse(kind, body, strlen(body), NULL, &rq, &e);
    if (rc)
        fail_msg("unexpected error for %s: %s", body, e.message);
    assert_non_null(rq);
    return rq;
}

/* Expects a 400 naming param (NULL: no param) with code. */
static void parse_bad(cpm_oai_kind kind, const char *body, const char *param, const char *code) {
    cpm_oai_request *rq = (void *)1;
    cpm_oai_error e = {0};
    int rc = cpm_oai_parse(kind, body, strlen(body), NULL, &rq, &e);
    if (rc == 0)
        fail_msg("accepted: %s", body);
    assert_null(rq);
    assert_int_equal(e.http_status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    assert_true(strlen(e.message) > 0);
    assert_string_equal(e.param, param ? param : "");
    if (code)
        assert_string_equal(e.code, code);
}

static void test_completion_defaults(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"Hello\"}");
    assert_int_equal(rq->kind, CPM_OAI_COMPLETION);
    assert_string_equal(rq->model, "m");
    assert_int_equal(rq->n_prompts, 1);
    assert_string_equal(rq->prompts[0].text, "Hello");
    assert_null(rq->prompts[0].ids);
    assert_int_equal(rq->max_tokens, 0);
    assert_true(rq->temperature == 1.0f && rq->top_p == 1.0f && rq->repetition_penalty == 1.0f);
    assert_int_equal(rq->top_k, 0);
    assert_int_equal(rq->n, 1);
    assert_false(rq->stream || rq->logprobs || rq->has_seed || rq->include_usage);
    assert_int_equal(rq->n_stop, 0);
    cpm_oai_request_free(rq);
}

static void test_completion_all_fields(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(
        CPM_OAI_COMPLETION,
        "{\"model\":\"m\",\"prompt\":[1,2,3],\"max_tokens\":7,\"temperature\":0,"
        "\"top_p\":0.9,\"top_k\":40,\"min_p\":0.05,\"repetition_penalty\":1.1,"
        "\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,\"seed\":42,\"stop\":[\"\\n\",\"END\"],"
        "\"n\":2,\"logprobs\":3,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"user\":\"u1\",\"best_of\":2,\"echo\":false,\"suffix\":\"\",\"logit_bias\":{},"
        "\"ignore_eos\":true,\"metadata\":{\"a\":\"b\"},\"return_token_ids\":true,"
        "\"skip_special_tokens\":false,\"include_stop_str_in_output\":true}");
    assert_int_equal(rq->n_prompts, 1);
    assert_int_equal(rq->prompts[0].n_ids, 3);
    assert_int_equal(rq->prompts[0].ids[2], 3);
    assert_int_equal(rq->max_tokens, 7);
    assert_true(rq->temperature == 0.0f);
    assert_float_equal(rq->top_p, 0.9, 1e-6);
    assert_int_equal(rq->top_k, 40);
    assert_float_equal(rq->min_p, 0.05, 1e-6);
    assert_float_equal(rq->repetition_penalty, 1.1, 1e-6);
    assert_float_equal(rq->presence_penalty, 0.5, 1e-6);
    assert_float_equal(rq->frequency_penalty, -0.5, 1e-6);
    assert_true(rq->has_seed);
    assert_int_equal(rq->seed, 42);
    assert_int_equal(rq->n_stop, 2);
    assert_string_equal(rq->stop[0], "\n");
    assert_string_equal(rq->stop[1], "END");
    assert_int_equal(rq->n, 2);
    assert_true(rq->logprobs);
    assert_int_equal(rq->top_logprobs, 3);
    assert_true(rq->stream && rq->include_usage && rq->ignore_eos && rq->return_token_ids);
    assert_true(rq->keep_special && rq->include_stop_str);
    cpm_oai_request_free(rq);
    rq = parse_ok(CPM_OAI_COMPLETION, "{\"prompt\":\"a\",\"skip_special_tokens\":true}");
    assert_false(rq->keep_special || rq->include_stop_str); /* the defaults */
    cpm_oai_request_free(rq);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"a\",\"skip_special_tokens\":1}",
              "skip_special_tokens", NULL);
    parse_bad(CPM_OAI_CHAT,
              "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"include_stop_str_in_output\":\"yes\"}",
              "include_stop_str_in_output", NULL);
}

static void test_prompt_forms(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}");
    assert_int_equal(rq->n_prompts, 2);
    assert_string_equal(rq->prompts[1].text, "b");
    cpm_oai_request_free(rq);
    rq = parse_ok(CPM_OAI_COMPLETION, "{\"prompt\":[[5,6],[7]]}");
    assert_int_equal(rq->n_prompts, 2);
    assert_int_equal(rq->prompts[0].n_ids, 2);
    assert_int_equal(rq->prompts[1].ids[0], 7);
    cpm_oai_request_free(rq);
    rq = parse_ok(CPM_OAI_COMPLETION, "{\"prompt\":\"\"}"); /* BOS alone is a valid prompt */
    assert_string_equal(rq->prompts[0].text, "");
    cpm_oai_request_free(rq);

    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[]}", "prompt", "invalid_value");
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[\"a\",[1]]}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[1,-2]}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[1,2.5]}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[[]]}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":7}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":null}", "prompt", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"model\":\"m\"}", "prompt", NULL);
}

static void test_limits(void **state) {
    (void)state;
    cpm_oai_limits lim = cpm_oai_limits_default();
    lim.max_prompt_ids = 3;
    lim.max_prompts = 2;
    cpm_oai_request *rq;
    cpm_oai_error e;
    const char *b = "{\"prompt\":[1,2,3,4]}";
    assert_int_equal(cpm_oai_parse(CPM_OAI_COMPLETION, b, strlen(b), &lim, &rq, &e), CPM_EINVAL);
    assert_string_equal(e.param, "prompt");
    b = "{\"prompt\":[\"a\",\"b\",\"c\"]}";
    assert_int_equal(cpm_oai_parse(CPM_OAI_COMPLETION, b, strlen(b), &lim, &rq, &e), CPM_EINVAL);
    b = "{\"prompt\":[1,2,3]}";
    assert_int_equal(cpm_oai_parse(CPM_OAI_COMPLETION, b, strlen(b), &lim, &rq, &e), 0);
    cpm_oai_request_free(rq);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"n\":17}", "n", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":[\"a\",\"b\"],\"n\":9}", "n", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
              "stop", NULL);
}

static void test_malformed_json(void **state) {
    (void)state;
    parse_bad(CPM_OAI_CHAT, "{\"messages\":", NULL, "invalid_json");
    parse_bad(CPM_OAI_CHAT, "", NULL, "invalid_json");
    parse_bad(CPM_OAI_CHAT, "[1,2]", NULL, "invalid_value");
    parse_bad(CPM_OAI_CHAT, "\"just a string\"", NULL, NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[]} trailing", NULL, "invalid_json");
    /* invalid UTF-8 inside a string */
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"\xff\xfe\"}", NULL, "invalid_json");
    /* a duplicated key must not silently pick one value */
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"a\",\"n\":1,\"n\":16}", NULL, "invalid_json");
    /* deep nesting is refused by the parser, not the stack */
    char deep[5000];
    size_t k = 0;
    k += (size_t)sprintf(deep, "{\"prompt\":\"a\",\"metadata\":");
    for (int i = 0; i < 2100; i++)
        deep[k++] = '[';
    deep[k] = '\0';
    parse_bad(CPM_OAI_COMPLETION, deep, NULL, "invalid_json");
}

static void test_wrong_types_and_ranges(void **state) {
    (void)state;
    static const struct {
        const char *field;
        const char *value;
    } bad[] = {
        {"temperature", "\"hot\""}, {"temperature", "2.5"},  {"temperature", "-0.1"},
        {"top_p", "0"},             {"top_p", "1.5"},        {"top_k", "-2"},
        {"top_k", "1.5"},           {"min_p", "2"},          {"repetition_penalty", "0"},
        {"presence_penalty", "3"},  {"frequency_penalty", "true"}, {"max_tokens", "0"},
        {"max_tokens", "-1"},       {"max_tokens", "1.5"},   {"max_tokens", "\"10\""},
        {"n", "0"},                 {"seed", "1.5"},         {"seed", "\"42\""},
        {"stream", "1"},            {"stream", "\"true\""},  {"stop", "\"\""},
        {"stop", "5"},              {"stop", "[\"a\",3]"},   {"logprobs", "6"},
        {"logprobs", "true"},       {"model", "3"},          {"user", "5"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char body[256];
        snprintf(body, sizeof body, "{\"prompt\":\"x\",\"%s\":%s}", bad[i].field, bad[i].value);
        parse_bad(CPM_OAI_COMPLETION, body, bad[i].field, NULL);
    }
    /* null means "not set" */
    cpm_oai_request *rq = parse_ok(CPM_OAI_COMPLETION,
                                   "{\"prompt\":\"x\",\"temperature\":null,\"stop\":null,\"n\":null}");
    assert_true(rq->temperature == 1.0f);
    assert_int_equal(rq->n, 1);
    cpm_oai_request_free(rq);
}

static void test_unknown_fields(void **state) {
    (void)state;
    /* fields nobody here knows: accepted, named for the log (as vLLM does) */
    cpm_oai_request *ig = parse_ok(CPM_OAI_COMPLETION,
                                   "{\"prompt\":\"x\",\"temprature\":0.5,\"chat_template_kwargs\":{}}");
    assert_string_equal(ig->ignored, "temprature, chat_template_kwargs");
    assert_true(ig->temperature == 1.0f);
    cpm_oai_request_free(ig);
    /* extras that would change the output are refused, never ignored */
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"guided_regex\":\"a+\"}", "guided_regex",
              "unsupported_parameter");
    /* vLLM's min_tokens and stop_token_ids, OpenAI's logit_bias: taken */
    cpm_oai_request *ex = parse_ok(CPM_OAI_COMPLETION,
                                   "{\"prompt\":\"x\",\"min_tokens\":2,\"stop_token_ids\":[5,7],"
                                   "\"logit_bias\":{\"5\":10,\"900\":-100}}");
    assert_int_equal(ex->min_tokens, 2);
    assert_int_equal(ex->n_stop_ids, 2);
    assert_int_equal(ex->stop_ids[1], 7);
    assert_int_equal(ex->n_bias, 2);
    assert_int_equal(ex->bias_ids[1], 900);
    assert_true(ex->bias[1] == -100.0f);
    cpm_oai_request_free(ex);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"logit_bias\":{\"5\":101}}", "logit_bias",
              NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"logit_bias\":{\"a\":1}}", "logit_bias", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"min_tokens\":-1}", "min_tokens", NULL);
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"stop_token_ids\":[-3]}", "stop_token_ids",
              NULL);
    /* a field of the other endpoint is refused here */
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"messages\":[]}", "messages",
              "unknown_parameter");
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"prompt\":\"x\"}",
              "prompt", "unknown_parameter");
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"mood\":1}]}",
              "messages[0]", "unknown_parameter");
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"x\":1}}",
              "stream_options", "unknown_parameter");
    /* known but without effect here: accepted */
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT,
                                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"name\":\"bob\"}],"
                                   "\"user\":\"u\",\"store\":false,\"parallel_tool_calls\":true,"
                                   "\"tools\":[],\"tool_choice\":\"none\","
                                   "\"response_format\":{\"type\":\"text\"}}");
    cpm_oai_request_free(rq);
}

static void test_unsupported_features_are_named(void **state) {
    (void)state;
    const char *chat_bad[][2] = {
        {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
         "\"image_url\":{\"url\":\"http://x\"}}]}]}",
         "messages[0].content"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"functions\":[{\"name\":\"f\"}]}",
         "functions"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"function_call\":{\"name\":\"f\"}}",
         "function_call"},
    };
    for (size_t i = 0; i < sizeof chat_bad / sizeof *chat_bad; i++)
        parse_bad(CPM_OAI_CHAT, chat_bad[i][0], chat_bad[i][1], "unsupported_parameter");
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"echo\":true}", "echo",
              "unsupported_parameter");
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"suffix\":\"end\"}", "suffix",
              "unsupported_parameter");
    parse_bad(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"best_of\":3}", "best_of",
              "unsupported_parameter");
}

static void test_cross_field_rules(void **state) {
    (void)state;
    parse_bad(CPM_OAI_CHAT,
              "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}",
              "top_logprobs", NULL);
    parse_bad(CPM_OAI_CHAT,
              "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
              "\"stream_options\":{\"include_usage\":true}}",
              "stream_options", NULL);
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT,
                                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                   "\"logprobs\":true,\"top_logprobs\":2,\"max_completion_tokens\":5}");
    assert_true(rq->logprobs);
    assert_int_equal(rq->top_logprobs, 2);
    assert_int_equal(rq->max_tokens, 5);
    cpm_oai_request_free(rq);
}

static void test_chat_messages(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(
        CPM_OAI_CHAT,
        "{\"model\":\"m\",\"messages\":["
        "{\"role\":\"developer\",\"content\":\"Be brief.\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hel\"},"
        "{\"type\":\"text\",\"text\":\"lo\"}]},"
        "{\"role\":\"assistant\",\"content\":null},"
        "{\"role\":\"user\",\"content\":\"\\u4f60\\u597d\"}]}");
    assert_int_equal(rq->n_messages, 4);
    assert_string_equal(rq->messages[0].role, "system");
    assert_string_equal(rq->messages[0].content, "Be brief.");
    assert_string_equal(rq->messages[1].content, "Hello");
    assert_string_equal(rq->messages[2].role, "assistant");
    assert_string_equal(rq->messages[2].content, "");
    assert_string_equal(rq->messages[3].content, "\xe4\xbd\xa0\xe5\xa5\xbd");
    cpm_oai_request_free(rq);

    parse_bad(CPM_OAI_CHAT, "{\"messages\":[]}", "messages", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":{}}", "messages", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[\"hi\"]}", "messages[0]", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0]", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}",
              "messages[0]", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":null}]}",
              "messages[0].content", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}",
              "messages[0].content", NULL);
    parse_bad(CPM_OAI_CHAT, "{\"model\":\"m\"}", "messages", NULL);
}

static void test_error_json_shape(void **state) {
    (void)state;
    cpm_oai_error e;
    cpm_oai_fail(&e, CPM_EINVAL, 400, "invalid_request_error", "invalid_value", "n",
                 "bad \"n\" \xff");
    char *s = cpm_oai_error_json(&e);
    json_error_t je;
    json_t *j = json_loads(s, 0, &je);
    assert_non_null(j);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(json_string_value(json_object_get(err, "message")), "bad \"n\" \xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(err, "type")), "invalid_request_error");
    assert_string_equal(json_string_value(json_object_get(err, "param")), "n");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "invalid_value");
    json_decref(j);
    free(s);
    cpm_oai_fail(&e, CPM_ELIMIT, 429, "rate_limit_error", NULL, NULL, "queue full");
    s = cpm_oai_error_json(&e);
    assert_string_equal(s, "{\"error\":{\"message\":\"queue full\",\"type\":\"rate_limit_error\","
                           "\"param\":null,\"code\":null}}");
    free(s);
}

static json_t *load(const char *s) {
    json_error_t je;
    json_t *j = json_loads(s, 0, &je);
    if (!j)
        fail_msg("invalid JSON rendered: %s (%s)", s, je.text);
    return j;
}

static void test_render_chat_response(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT,
                                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                   "\"logprobs\":true,\"top_logprobs\":1}");
    const char *top_tok[] = {"Hi"};
    float top_lp[] = {-0.25f};
    cpm_oai_logprob lp = {.token = "Hi", .logprob = -0.25f, .n_top = 1, .top_tokens = top_tok,
                          .top_logprobs = top_lp};
    cpm_oai_choice ch = {.index = 0, .text = "Hi", .text_len = 2, .finish_reason = "stop",
                         .n_logprobs = 1, .logprobs = &lp};
    cpm_oai_usage u = {.prompt_tokens = 5, .completion_tokens = 1};
    char *s = cpm_oai_render_response(rq, "chatcmpl-7", 1700000000, "minicpm", &ch, 1, &u);
    json_t *j = load(s);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "chat.completion");
    assert_string_equal(json_string_value(json_object_get(j, "id")), "chatcmpl-7");
    assert_int_equal(json_integer_value(json_object_get(j, "created")), 1700000000);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "message"), "role")),
                        "assistant");
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(c0, "message"), "content")), "Hi");
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "stop");
    json_t *lpc = json_array_get(json_object_get(json_object_get(c0, "logprobs"), "content"), 0);
    assert_string_equal(json_string_value(json_object_get(lpc, "token")), "Hi");
    assert_float_equal(json_real_value(json_object_get(lpc, "logprob")), -0.25, 1e-6);
    assert_int_equal(json_array_size(json_object_get(lpc, "bytes")), 2);
    assert_int_equal(json_array_size(json_object_get(lpc, "top_logprobs")), 1);
    json_t *usage = json_object_get(j, "usage");
    assert_int_equal(json_integer_value(json_object_get(usage, "total_tokens")), 6);
    json_decref(j);
    free(s);
    cpm_oai_request_free(rq);
}

static void test_render_completion_response(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_COMPLETION, "{\"prompt\":\"x\",\"logprobs\":0}");
    cpm_oai_logprob lps[2] = {{.token = " a", .logprob = -1.0f}, {.token = "b", .logprob = -2.0f}};
    cpm_oai_choice ch[2] = {
        {.index = 0, .text = " ab", .text_len = 3, .finish_reason = "length", .n_logprobs = 2,
         .logprobs = lps},
        {.index = 1, .text = "", .text_len = 0, .finish_reason = "stop"},
    };
    cpm_oai_usage u = {3, 2, 0};
    char *s = cpm_oai_render_response(rq, "cmpl-1", 1, "m", ch, 2, &u);
    json_t *j = load(s);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "text_completion");
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(c0, "text")), " ab");
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "length");
    json_t *lp = json_object_get(c0, "logprobs");
    assert_string_equal(json_string_value(json_array_get(json_object_get(lp, "tokens"), 1)), "b");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 1)), 2);
    json_t *c1 = json_array_get(json_object_get(j, "choices"), 1);
    assert_int_equal(json_integer_value(json_object_get(c1, "index")), 1);
    json_decref(j);
    free(s);
    cpm_oai_request_free(rq);
}

/* "data: {...}\n\n" -> the object */
static json_t *load_sse(const char *s) {
    assert_memory_equal(s, "data: ", 6);
    size_t n = strlen(s);
    assert_true(n > 8 && s[n - 1] == '\n' && s[n - 2] == '\n');
    json_error_t je;
    json_t *j = json_loadb(s + 6, n - 8, 0, &je);
    assert_non_null(j);
    return j;
}

static void test_render_chat_stream(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT,
                                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                   "\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
    cpm_oai_choice ch = {.index = 0};
    char *s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_ROLE, "c1", 5, "m", &ch, NULL);
    json_t *j = load_sse(s);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "chat.completion.chunk");
    assert_true(json_is_null(json_object_get(j, "usage")));
    json_t *d = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "delta");
    assert_string_equal(json_string_value(json_object_get(d, "role")), "assistant");
    json_decref(j);
    free(s);

    ch.text = "He";
    ch.text_len = 2;
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "c1", 5, "m", &ch, NULL);
    j = load_sse(s);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "delta"), "content")),
                        "He");
    assert_true(json_is_null(json_object_get(c0, "finish_reason")));
    json_decref(j);
    free(s);

    ch.text = "";
    ch.text_len = 0;
    ch.finish_reason = "stop";
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "c1", 5, "m", &ch, NULL);
    j = load_sse(s);
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_int_equal(json_object_size(json_object_get(c0, "delta")), 0);
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "stop");
    json_decref(j);
    free(s);

    cpm_oai_usage u = {4, 2, 0};
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_USAGE, "c1", 5, "m", NULL, &u);
    j = load_sse(s);
    assert_int_equal(json_array_size(json_object_get(j, "choices")), 0);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")),
                     6);
    json_decref(j);
    free(s);
    cpm_oai_request_free(rq);
}

static void test_render_completion_stream_without_usage(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_COMPLETION,
                                   "{\"prompt\":\"x\",\"stream\":true,\"return_token_ids\":true}");
    int32_t ids[2] = {17, 4};
    cpm_oai_choice ch = {.index = 3, .text = "abc", .text_len = 3, .n_token_ids = 2,
                         .token_ids = ids};
    char *s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "cmpl-2", 5, "m", &ch, NULL);
    json_t *j = load_sse(s);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "text_completion");
    assert_null(json_object_get(j, "usage"));
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_int_equal(json_integer_value(json_object_get(c0, "index")), 3);
    assert_string_equal(json_string_value(json_object_get(c0, "text")), "abc");
    json_t *tids = json_object_get(c0, "token_ids");
    assert_int_equal(json_array_size(tids), 2);
    assert_int_equal(json_integer_value(json_array_get(tids, 1)), 4);
    json_decref(j);
    free(s);
    cpm_oai_request_free(rq);
}

static void test_utf8_clean(void **state) {
    (void)state;
    size_t n;
    char *s = cpm_oai_utf8_clean("a\xe4\xbd\xa0" "b", 5, &n);
    assert_int_equal(n, 5);
    assert_string_equal(s, "a\xe4\xbd\xa0" "b");
    free(s);
    /* truncated sequence, overlong, surrogate, stray continuation */
    s = cpm_oai_utf8_clean("\xe4\xbd" "x\xc0\xaf\xed\xa0\x80\x80", 8, &n);
    json_t *j = json_stringn(s, n);
    assert_non_null(j); /* valid UTF-8 now */
    json_decref(j);
    assert_memory_equal(s, "\xef\xbf\xbd\xef\xbf\xbdx", 7);
    free(s);
}

static void test_models(void **state) {
    (void)state;
    char *s = cpm_oai_render_models("minicpm-1b", 9, 4096);
    json_t *j = load(s);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "list");
    json_t *m = json_array_get(json_object_get(j, "data"), 0);
    assert_string_equal(json_string_value(json_object_get(m, "id")), "minicpm-1b");
    assert_string_equal(json_string_value(json_object_get(m, "object")), "model");
    assert_int_equal(json_integer_value(json_object_get(m, "max_model_len")), 4096);
    json_decref(j);
    free(s);
    s = cpm_oai_render_model("minicpm-1b", 9, 0); /* before the stages said: no length */
    j = load(s);
    assert_string_equal(json_string_value(json_object_get(j, "id")), "minicpm-1b");
    assert_null(json_object_get(j, "max_model_len"));
    json_decref(j);
    free(s);
}

#define USER "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]"
#define WEATHER "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"d\"," \
                "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}}}}}"
#define SEARCH "{\"type\":\"function\",\"function\":{\"name\":\"search\"}}"

/* tools and tool_choice: kept for the tokenizer, parsed or not, and the constraint. */
static void test_tools(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"tools\":[" WEATHER "," SEARCH "]}");
    assert_int_equal(rq->n_tools, 2);
    assert_string_equal(rq->tool_names[1], "search");
    assert_int_equal(rq->tool_choice, CPM_OAI_TOOLS_AUTO);
    assert_true(rq->parse_tool_calls);
    assert_int_equal(rq->constraint_kind, 0);
    json_t *tools = json_loads(rq->tools_json, 0, NULL);
    assert_int_equal(json_array_size(tools), 2);
    json_decref(tools);
    cpm_oai_request_free(rq);

    rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"tools\":[" WEATHER "],\"tool_choice\":\"none\"}");
    assert_false(rq->parse_tool_calls); /* rendered, not parsed (as vLLM) */
    assert_non_null(rq->tools_json);
    cpm_oai_request_free(rq);

    rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"tools\":[" WEATHER "," SEARCH "],"
                                "\"tool_choice\":\"required\",\"parallel_tool_calls\":false}");
    assert_int_equal(rq->constraint_kind, 3); /* TOOL_CALLS, all tools */
    assert_false(rq->constraint_single);
    tools = json_loads(rq->constraint_schema, 0, NULL);
    assert_int_equal(json_array_size(tools), 2);
    json_decref(tools);
    cpm_oai_request_free(rq);

    rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"tools\":[" WEATHER "," SEARCH "],\"tool_choice\":"
                                "{\"type\":\"function\",\"function\":{\"name\":\"search\"}}}");
    assert_int_equal(rq->tool_choice, CPM_OAI_TOOLS_NAMED);
    assert_int_equal(rq->constraint_kind, 3);
    assert_true(rq->constraint_single);
    tools = json_loads(rq->constraint_schema, 0, NULL);
    assert_int_equal(json_array_size(tools), 1);
    assert_string_equal(json_string_value(json_object_get(json_object_get(json_array_get(tools, 0),
                                                                          "function"), "name")),
                        "search");
    json_decref(tools);
    cpm_oai_request_free(rq);

    const char *bad[][2] = {
        {"{" USER ",\"tools\":{}}", "tools"},
        {"{" USER ",\"tools\":[{\"type\":\"function\"}]}", "tools[0].function"},
        {"{" USER ",\"tools\":[{\"type\":\"code\",\"function\":{\"name\":\"f\"}}]}", "tools[0]"},
        {"{" USER ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a b\"}}]}",
         "tools[0].function"},
        {"{" USER ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":3}}]}",
         "tools[0].function"},
        {"{" USER ",\"tools\":[" SEARCH "," SEARCH "]}", "tools[1].function"},
        {"{" USER ",\"tools\":[" SEARCH "],\"tool_choice\":\"always\"}", "tool_choice"},
        {"{" USER ",\"tool_choice\":\"required\"}", "tool_choice"},
        {"{" USER ",\"tools\":[" SEARCH "],\"tool_choice\":{\"type\":\"function\","
                  "\"function\":{\"name\":\"nope\"}}}", "tool_choice"},
        {"{" USER ",\"tools\":[" SEARCH "],\"tool_choice\":\"required\","
                  "\"response_format\":{\"type\":\"json_object\"}}", "response_format"},
        {"{" USER ",\"parallel_tool_calls\":1}", "parallel_tool_calls"},
        /* a forced call is held to its schema: keywords must be names, the subset enforceable */
        {"{" USER ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
                  "{\"type\":\"object\",\"properties\":{\"a-b\":{\"type\":\"string\"}}}}}],"
                  "\"tool_choice\":\"required\"}", "tools"},
        {"{" USER ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
                  "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"format\":"
                  "\"date\"}}}}}],\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"f\"}}}",
         "tools"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        parse_bad(CPM_OAI_CHAT, bad[i][0], bad[i][1], NULL);
}

/* A tool-calling conversation: assistant tool_calls (content null) and reasoning, tool results. */
static void test_tool_messages(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"weather?\"},"
        "{\"role\":\"assistant\",\"content\":null,\"reasoning_content\":\"look it up\","
        "\"tool_calls\":[{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":"
        "\"get_weather\",\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},"
        "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"sunny\"}],"
        "\"tools\":[" WEATHER "]}");
    assert_int_equal(rq->n_messages, 3);
    assert_string_equal(rq->messages[1].content, "");
    assert_string_equal(rq->messages[1].thought, "look it up");
    json_t *calls = json_loads(rq->messages[1].tool_calls_json, 0, NULL);
    assert_int_equal(json_array_size(calls), 1);
    json_decref(calls);
    assert_string_equal(rq->messages[2].tool_call_id, "call_1");
    assert_null(rq->messages[0].tool_calls_json);
    cpm_oai_request_free(rq);

    const char *bad[][2] = {
        {"{\"messages\":[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"1\"}]}]}",
         "messages[0].tool_calls[0]"},
        {"{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\",\"function\":"
         "{\"name\":\"f\",\"arguments\":\"not json\"}}]}]}", "messages[0].tool_calls[0]"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"tool_calls\":[{\"type\":\"function\","
         "\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}]}", "messages[0]"},
        {"{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", "messages[0]"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"reasoning_content\":\"r\"}]}",
         "messages[0]"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        parse_bad(CPM_OAI_CHAT, bad[i][0], bad[i][1], NULL);
}

/* response_format: the JSON constraints. */
static void test_response_format(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"response_format\":{\"type\":\"json_object\"}}");
    assert_int_equal(rq->constraint_kind, 1);
    cpm_oai_request_free(rq);
    rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":"
                                "{\"name\":\"person\",\"strict\":true,\"schema\":{\"type\":\"object\"}}}}");
    assert_int_equal(rq->constraint_kind, 2);
    assert_string_equal(rq->constraint_schema, "{\"type\":\"object\"}");
    cpm_oai_request_free(rq);
    const char *bad[][2] = {
        {"{" USER ",\"response_format\":{\"type\":\"xml\"}}", "response_format"},
        {"{" USER ",\"response_format\":{\"type\":\"json_schema\"}}", "response_format"},
        {"{" USER ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{}}}}",
         "response_format.json_schema.name"},
        {"{" USER ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"n\","
                  "\"schema\":[]}}}", "response_format.json_schema.schema"},
        /* outside the subset the sampler can hold the output to: refused, keyword named */
        {"{" USER ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"n\","
                  "\"schema\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\","
                  "\"pattern\":\"x+\"}}}}}}", "response_format.json_schema.schema"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        parse_bad(CPM_OAI_CHAT, bad[i][0], bad[i][1], NULL);
    cpm_oai_request *refused = (void *)1;
    cpm_oai_error e = {0};
    assert_int_not_equal(cpm_oai_parse(CPM_OAI_CHAT, bad[4][0], strlen(bad[4][0]), NULL, &refused, &e), 0);
    if (!strstr(e.message, "/properties/a/pattern"))
        fail_msg("%s", e.message);
}

/* Tool calls and reasoning: whole in the message (content null), in pieces in deltas. */
static void test_render_tool_calls(void **state) {
    (void)state;
    cpm_oai_request *rq = parse_ok(CPM_OAI_CHAT, "{" USER ",\"tools\":[" WEATHER "]}");
    cpm_oai_tool_call calls[] = {{0, "call_a_0", "get_weather", "{\"city\":\"Paris\"}"}};
    cpm_oai_choice ch = {.index = 0, .text = "", .text_len = 0, .reasoning = "think",
                         .reasoning_len = 5, .n_tool_calls = 1, .tool_calls = calls,
                         .finish_reason = "tool_calls"};
    cpm_oai_usage u = {3, 4, 0};
    char *s = cpm_oai_render_response(rq, "c1", 5, "m", &ch, 1, &u);
    json_t *j = json_loads(s, 0, NULL);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *m = json_object_get(c0, "message");
    assert_true(json_is_null(json_object_get(m, "content")));
    assert_string_equal(json_string_value(json_object_get(m, "reasoning_content")), "think");
    json_t *tc = json_array_get(json_object_get(m, "tool_calls"), 0);
    assert_string_equal(json_string_value(json_object_get(tc, "id")), "call_a_0");
    assert_string_equal(json_string_value(json_object_get(tc, "type")), "function");
    assert_string_equal(json_string_value(json_object_get(json_object_get(tc, "function"), "arguments")),
                        "{\"city\":\"Paris\"}");
    assert_null(json_object_get(tc, "index")); /* index is for deltas */
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "tool_calls");
    json_decref(j);
    free(s);

    ch.finish_reason = NULL;
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "c1", 5, "m", &ch, NULL);
    j = load_sse(s);
    json_t *d = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "delta");
    assert_null(json_object_get(d, "content")); /* nothing of it in this delta */
    assert_string_equal(json_string_value(json_object_get(d, "reasoning_content")), "think");
    tc = json_array_get(json_object_get(d, "tool_calls"), 0);
    assert_int_equal(json_integer_value(json_object_get(tc, "index")), 0);
    assert_string_equal(json_string_value(json_object_get(json_object_get(tc, "function"), "name")),
                        "get_weather");
    json_decref(j);
    free(s);
    /* a later piece of the same call: index and arguments only */
    cpm_oai_tool_call more = {0, NULL, NULL, "}"};
    ch = (cpm_oai_choice){.index = 0, .n_tool_calls = 1, .tool_calls = &more};
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "c1", 5, "m", &ch, NULL);
    j = load_sse(s);
    tc = json_array_get(json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0),
                                                        "delta"), "tool_calls"), 0);
    assert_null(json_object_get(tc, "id"));
    assert_null(json_object_get(json_object_get(tc, "function"), "name"));
    json_decref(j);
    free(s);
    cpm_oai_request_free(rq);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_completion_defaults),
        cmocka_unit_test(test_completion_all_fields),
        cmocka_unit_test(test_prompt_forms),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_malformed_json),
        cmocka_unit_test(test_wrong_types_and_ranges),
        cmocka_unit_test(test_unknown_fields),
        cmocka_unit_test(test_unsupported_features_are_named),
        cmocka_unit_test(test_cross_field_rules),
        cmocka_unit_test(test_tools),
        cmocka_unit_test(test_tool_messages),
        cmocka_unit_test(test_response_format),
        cmocka_unit_test(test_render_tool_calls),
        cmocka_unit_test(test_chat_messages),
        cmocka_unit_test(test_error_json_shape),
        cmocka_unit_test(test_render_chat_response),
        cmocka_unit_test(test_render_completion_response),
        cmocka_unit_test(test_render_chat_stream),
        cmocka_unit_test(test_render_completion_stream_without_usage),
        cmocka_unit_test(test_utf8_clean),
        cmocka_unit_test(test_models),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
