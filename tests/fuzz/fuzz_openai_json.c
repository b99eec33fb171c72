/* fuzz_openai_json.c - libFuzzer target for router/openai.c request parsing.
 *
 * The first byte picks the endpoint (completions or chat), the rest is the body.
 * Whatever the input, cpm_oai_parse must either fail with a 4xx/5xx OpenAI error
 * that names something, or return a request within every documented bound, which
 * must then render as valid JSON.
 */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "router/openai.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A JSON array text of n items. */
static void check_array(const char *text, int n) {
    json_t *j = text ? json_loads(text, 0, NULL) : NULL;
    if (!json_is_array(j) || (n >= 0 && json_array_size(j) != (size_t)n))
        __builtin_trap();
    json_decref(j);
}

/* Tools: kept as a JSON array of n_tools; a constraint only of a known kind, with its
 * schema; a named choice is one of the tools; assistant tool_calls are JSON arrays. */
static void check_tools(const cpm_oai_request *rq) {
    if (rq->n_tools < 0 || rq->n_tools > CPM_OAI_MAX_TOOLS || (rq->n_tools > 0) != !!rq->tools_json)
        __builtin_trap();
    if (rq->n_tools)
        check_array(rq->tools_json, rq->n_tools);
    if (rq->constraint_kind < 0 || rq->constraint_kind > 3 ||
        (rq->constraint_kind >= 2 && !rq->constraint_schema))
        __builtin_trap();
    if (rq->constraint_kind == 3)
        check_array(rq->constraint_schema, rq->constraint_single ? 1 : rq->n_tools);
    bool found = rq->tool_choice != CPM_OAI_TOOLS_NAMED;
    for (int i = 0; i < rq->n_tools; i++)
        found |= rq->tool_choice_name && !strcmp(rq->tool_names[i], rq->tool_choice_name);
    if (!found || (rq->parse_tool_calls && rq->n_tools == 0))
        __builtin_trap();
    for (int i = 0; i < rq->n_messages; i++)
        if (rq->messages[i].tool_calls_json)
            check_array(rq->messages[i].tool_calls_json, -1);
}

static void check_request(const cpm_oai_request *rq) {
    cpm_oai_limits lim = cpm_oai_limits_default();
    if (rq->n < 1 || rq->n > lim.max_n || rq->n_stop > CPM_OAI_MAX_STOP || rq->top_logprobs < 0 ||
        rq->top_logprobs > lim.max_top_logprobs || rq->max_tokens < 0)
        __builtin_trap();
    if (!(rq->temperature >= 0.0f && rq->temperature <= 2.0f) ||
        !(rq->top_p > 0.0f && rq->top_p <= 1.0f))
        __builtin_trap();
    if (rq->kind == CPM_OAI_COMPLETION) {
        if (rq->n_prompts < 1 || rq->n_prompts > lim.max_prompts)
            __builtin_trap();
        for (int i = 0; i < rq->n_prompts; i++) {
            const cpm_oai_prompt *p = &rq->prompts[i];
            if (!!p->text == !!p->ids || (p->ids && (p->n_ids < 1 || p->n_ids > lim.max_prompt_ids)))
                __builtin_trap();
            for (int k = 0; p->ids && k < p->n_ids; k++)
                if (p->ids[k] < 0)
                    __builtin_trap();
        }
    } else if (rq->n_messages < 1 || rq->n_messages > lim.max_messages) {
        __builtin_trap();
    }
    for (int i = 0; i < rq->n_stop; i++)
        if (!rq->stop[i][0])
            __builtin_trap();
    check_tools(rq);
}

static void check_render(const cpm_oai_request *rq) {
    cpm_oai_choice ch = {.index = 0, .text = "a\xff", .text_len = 2, .finish_reason = "stop"};
    cpm_oai_usage u = {1, 1, 0};
    char *s = cpm_oai_render_response(rq, "id", 1, "m", &ch, 1, &u);
    json_error_t je;
    json_t *j = s ? json_loads(s, 0, &je) : NULL;
    if (!j)
        __builtin_trap();
    json_decref(j);
    free(s);
    s = cpm_oai_render_chunk(rq, CPM_OAI_CHUNK_CONTENT, "id", 1, "m", &ch, NULL);
    if (!s || strncmp(s, "data: {", 7) != 0)
        __builtin_trap();
    free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1)
        return 0;
    cpm_oai_kind kind = data[0] & 1 ? CPM_OAI_CHAT : CPM_OAI_COMPLETION;
    cpm_oai_request *rq = NULL;
    cpm_oai_error e;
    memset(&e, 0, sizeof e);
    if (cpm_oai_parse(kind, (const char *)data + 1, size - 1, NULL, &rq, &e) != 0) {
        if (rq || e.http_status < 400 || e.http_status > 599 || !e.message[0] ||
            !memchr(e.message, '\0', sizeof e.message))
            __builtin_trap();
        char *err = cpm_oai_error_json(&e);
        json_error_t je;
        json_t *j = err ? json_loads(err, 0, &je) : NULL;
        if (!j) /* the error itself must be valid JSON, whatever bytes it quotes */
            __builtin_trap();
        json_decref(j);
        free(err);
        return 0;
    }
    check_request(rq);
    check_render(rq);
    cpm_oai_request_free(rq);
    return 0;
}
