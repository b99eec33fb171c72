/* toolcall.h - MiniCPM's tool-call answers to OpenAI's message fields, incrementally.
 *
 * Sits between the text flow and the HTTP answer (api_http.c) for chat requests
 * with tools: a choice's generated text goes in piece by piece, and out come
 * reasoning_content, content and tool calls. The format (minicpm-spec.md §6.3, the
 * official MiniCPM3 template):
 *
 *   <|thought_start|>\n{reasoning}\n<|thought_end|>\n           (optional)
 *   <|tool_call_start|>\n```python\n{name(kw=value, ...)}\n...```\n<|tool_call_end|>\n
 *   {content}
 *
 * Values are Python literals (or JSON spellings: the template writes history
 * arguments with tojson); each call's keywords become OpenAI's `arguments`, a JSON
 * object as text. A block that does not parse, or calls a function not in the
 * request's tools, is given back as content, byte for byte: never an error.
 *
 * Text that may be the start of a marker is held back until it can be decided, and
 * a call block is held until it closes, so plain answers stream promptly and the
 * result never depends on how the text was cut: feeding a text in any pieces gives
 * the same reassembled result as feeding it whole (test_toolcall checks every cut).
 * A thought that never ends is all reasoning.
 *
 *   cpm_toolcall *tc = cpm_toolcall_new(names, n_names, "call_1f2e");
 *   cpm_toolcall_delta d;
 *   cpm_toolcall_feed(tc, text, len, &d);   ... d.content, d.reasoning, calls [d.call_from, d.call_to)
 *   cpm_toolcall_finish(tc, &d);            ... the rest
 *   cpm_toolcall_free(tc);
 */
#ifndef CPM_TOOLCALL_H
#define CPM_TOOLCALL_H

#include <stdbool.h>
#include <stddef.h>

typedef struct cpm_toolcall cpm_toolcall;

/* One parsed call; strings owned by the parser, valid until it is freed. */
typedef struct cpm_toolcall_call {
    char *id;        /* id_prefix + "_" + its index */
    char *name;
    char *arguments; /* a JSON object, compact */
} cpm_toolcall_call;

/* What one feed (or the finish) decided. Strings owned by the parser, valid until the
 * next feed/finish; content and reasoning are never NULL. */
typedef struct cpm_toolcall_delta {
    const char *reasoning;
    size_t reasoning_len;
    const char *content;
    size_t content_len;
    int call_from, call_to; /* new calls: cpm_toolcall_get(tc, call_from .. call_to - 1) */
} cpm_toolcall_delta;

/* A parser for one choice. names: the request's tool names (copied); only calls of these
 * are calls. id_prefix (copied) starts every call id ("call_..."). NULL without memory. */
cpm_toolcall *cpm_toolcall_new(const char *const *names, int n_names, const char *id_prefix);
/* Accepts NULL. */
void cpm_toolcall_free(cpm_toolcall *tc);

/* Feeds len bytes of generated text; *d says what can be decided now. CPM_ENOMEM (d
 * empty then), else 0. */
int cpm_toolcall_feed(cpm_toolcall *tc, const char *text, size_t len, cpm_toolcall_delta *d);

/* The text is over: *d is everything still held back. Further feeds are ignored. */
int cpm_toolcall_finish(cpm_toolcall *tc, cpm_toolcall_delta *d);

/* The whole text at once (a non-streamed answer): a feed and the finish in one delta. */
int cpm_toolcall_whole(cpm_toolcall *tc, const char *text, size_t len, cpm_toolcall_delta *d);

int cpm_toolcall_count(const cpm_toolcall *tc);
/* Call blocks that did not parse (given back as content): for the log. */
int cpm_toolcall_rejected(const cpm_toolcall *tc);
const cpm_toolcall_call *cpm_toolcall_get(const cpm_toolcall *tc, int i);

/* Python call arguments "kw=value, ..." (the text between the parentheses) as a JSON
 * object text (caller frees); NULL when they are not keyword literals. Exposed for
 * tests. */
char *cpm_toolcall_args_json(const char *s, size_t len);

#endif
