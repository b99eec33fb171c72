/* chat_render.c - the C side of the chat-template test: renders every case of
 * chat_cases.json with cpm_chat_render and prints one JSON string per case.
 *   chat_render chat_cases.json MODEL_DIR
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tokenizer.h"

static char *dump_or_null(json_t *v) {
    if (!v)
        return NULL;
    return json_is_string(v) ? strdup(json_string_value(v)) : json_dumps(v, JSON_ENCODE_ANY);
}

static int render_case(cpm_tokenizer *tok, json_t *c) {
    const char *family = json_string_value(json_object_get(c, "family"));
    cpm_tokenizer_set_chat_family(tok, strcmp(family, "minicpm2") == 0   ? CPM_CHAT_MINICPM2
                                       : strcmp(family, "minicpm3") == 0 ? CPM_CHAT_MINICPM3
                                                                         : CPM_CHAT_CHATML);
    json_t *msgs = json_object_get(c, "messages");
    size_t n = json_array_size(msgs);
    cpm_chat_msg *m = calloc(n ? n : 1, sizeof *m);
    char **owned = calloc(2 * (n ? n : 1), sizeof *owned);
    for (size_t i = 0; i < n; i++) {
        json_t *jm = json_array_get(msgs, i);
        m[i].role = json_string_value(json_object_get(jm, "role"));
        m[i].content = json_string_value(json_object_get(jm, "content"));
        m[i].thought = json_string_value(json_object_get(jm, "thought"));
        m[i].tool_calls_json = owned[i] = dump_or_null(json_object_get(jm, "tool_calls"));
    }
    char *tools = dump_or_null(json_object_get(c, "tools"));
    char *text = NULL;
    cpm_error err = {0};
    int rc = cpm_chat_render(tok, m, n, tools, json_is_true(json_object_get(c, "add_generation_prompt")), &text, &err);
    if (rc == 0) {
        json_t *s = json_string(text);
        char *out = json_dumps(s, JSON_ENCODE_ANY);
        puts(out);
        free(out);
        json_decref(s);
    } else {
        fprintf(stderr, "chat_render: %s: %s\n", json_string_value(json_object_get(c, "name")), err.msg);
        puts("null");
    }
    free(text);
    free(tools);
    for (size_t i = 0; i < n; i++)
        free(owned[i]);
    free(owned);
    free(m);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: chat_render chat_cases.json MODEL_DIR\n");
        return 2;
    }
    json_error_t jerr;
    json_t *cases = json_load_file(argv[1], 0, &jerr);
    cpm_tokenizer *tok;
    cpm_error err = {0};
    if (!json_is_array(cases) || cpm_tokenizer_load(argv[2], &tok, &err) < 0) {
        fprintf(stderr, "chat_render: %s\n", cases ? err.msg : jerr.text);
        return 1;
    }
    int status = 0;
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) status |= render_case(tok, c) != 0;
    cpm_tokenizer_free(tok);
    json_decref(cases);
    return status;
}
