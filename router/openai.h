/* openai.h - the OpenAI-compatible JSON of the router: requests in, responses out.
 *
 * Second hop of a client request: the body of POST /v1/completions or
 * /v1/chat/completions becomes a validated cpm_oai_request (every field typed,
 * bounded and checked here, so nothing after the door sees raw JSON); results
 * come back as completion objects, chat completion objects or SSE chunks.
 *
 * Unknown fields: strict. A top-level field (or message field) that this server
 * does not know gets 400 "Unrecognized request argument supplied: NAME", as
 * api.openai.com does; fields that are known but have no effect here (user,
 * metadata, store, ...) are accepted and ignored; known fields we cannot honour
 * (logit_bias, echo, images, legacy functions, ...) get 400 naming the field, never a
 * silent wrong answer.
 *
 * Tools (chat): `tools` is checked and kept as normalized JSON text for the tokenizer
 * (which renders it); `tool_choice` decides whether the answer is parsed for calls
 * (toolcall.h) and whether the sampler is constrained; `response_format` json_object
 * / json_schema sets a constraint too (cpm_oai_constraint: the values of proto's
 * ConstraintKind, asserted where both are seen, api_http.c).
 *
 *   cpm_oai_request *rq; cpm_oai_error oe;
 *   if (cpm_oai_parse(CPM_OAI_CHAT, body, len, NULL, &rq, &oe)) send(oe.http_status, cpm_oai_error_json(&oe));
 *   ... generate ...
 *   char *json = cpm_oai_render_response(rq, "chatcmpl-1", now, "minicpm", choices, 1, &usage);
 *   cpm_oai_request_free(rq);
 */
#ifndef CPM_OPENAI_H
#define CPM_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/error.h"

typedef enum cpm_oai_kind {
    CPM_OAI_COMPLETION, /* /v1/completions */
    CPM_OAI_CHAT,       /* /v1/chat/completions */
} cpm_oai_kind;

#define CPM_OAI_MAX_STOP 4 /* as api.openai.com */
#define CPM_OAI_MAX_BIAS 300     /* logit_bias entries (OpenAI's limit) */
#define CPM_OAI_MAX_STOP_IDS 64  /* stop_token_ids */

typedef struct cpm_oai_limits {
    int max_prompts;      /* entries of a completions prompt array */
    int max_n;            /* choices per prompt */
    int max_messages;     /* chat messages */
    int max_prompt_ids;   /* ids in one token-id prompt */
    int max_top_logprobs; /* chat top_logprobs (completions logprobs is capped at 5 too) */
    size_t max_stop_len;  /* bytes in one stop string */
} cpm_oai_limits;

cpm_oai_limits cpm_oai_limits_default(void);

/* One completions prompt: text, or token ids (token-in) when ids != NULL. */
typedef struct cpm_oai_prompt {
    char *text;
    int32_t *ids;
    int n_ids;
} cpm_oai_prompt;

typedef struct cpm_oai_message {
    char *role;    /* "system", "user", "assistant", "tool" ("developer" becomes "system") */
    char *content; /* text parts joined; "" for null content */
    char *tool_calls_json; /* assistant: its tool_calls (a JSON array, checked), or NULL */
    char *thought;         /* assistant: its reasoning_content, or NULL */
    char *tool_call_id;    /* tool: the call it answers, or NULL */
} cpm_oai_message;

#define CPM_OAI_MAX_TOOLS 128 /* as api.openai.com */

/* What the sampler must keep an answer to; proto's ConstraintKind values. */
typedef enum cpm_oai_constraint {
    CPM_OAI_CONSTRAINT_NONE = 0,
    CPM_OAI_CONSTRAINT_JSON_OBJECT = 1,
    CPM_OAI_CONSTRAINT_JSON_SCHEMA = 2,
    CPM_OAI_CONSTRAINT_TOOL_CALLS = 3,
} cpm_oai_constraint;

typedef enum cpm_oai_tool_choice {
    CPM_OAI_TOOLS_AUTO,     /* the model decides; its calls are parsed (default with tools) */
    CPM_OAI_TOOLS_NONE,     /* tools are still rendered (as vLLM); the answer is plain text */
    CPM_OAI_TOOLS_REQUIRED, /* at least one call: constrained, parsed */
    CPM_OAI_TOOLS_NAMED,    /* exactly one call of tool_choice_name: constrained, parsed */
} cpm_oai_tool_choice;

enum {
    CPM_OAI_GIVEN_TEMPERATURE = 1,
    CPM_OAI_GIVEN_TOP_P = 2,
    CPM_OAI_GIVEN_TOP_K = 4,
    CPM_OAI_GIVEN_REPETITION_PENALTY = 8,
};

typedef struct cpm_oai_request {
    cpm_oai_kind kind;
    char *model;
    int n_prompts; /* completions */
    cpm_oai_prompt *prompts;
    int n_messages; /* chat */
    cpm_oai_message *messages;

    int max_tokens; /* 0 = not given: up to the context length */
    unsigned given; /* CPM_OAI_GIVEN_*: sampling fields the request set (the rest may come
                       from the model's generation_config.json) */
    float temperature, top_p, min_p;
    int top_k; /* 0 = off */
    float repetition_penalty, presence_penalty, frequency_penalty;
    bool has_seed;
    uint64_t seed;
    int n_stop;
    char *stop[CPM_OAI_MAX_STOP];
    int n; /* choices per prompt */
    bool logprobs;
    int top_logprobs; /* alternatives per token */
    bool stream, include_usage;
    bool ignore_eos;       /* extension (as vLLM): keep going past EOS */
    bool keep_special;     /* extension (as vLLM): skip_special_tokens false */
    bool include_stop_str; /* extension (as vLLM): include_stop_str_in_output */
    int n_bias;            /* logit_bias: token id -> bias in [-100, 100] */
    int32_t bias_ids[CPM_OAI_MAX_BIAS];
    float bias[CPM_OAI_MAX_BIAS];
    int min_tokens;        /* extension (as vLLM): no EOS / stop_token_ids before this many */
    int n_stop_ids;        /* extension (as vLLM): stop_token_ids, besides EOS */
    int32_t stop_ids[CPM_OAI_MAX_STOP_IDS];
    bool return_token_ids; /* extension (as vLLM): each choice/chunk also lists "token_ids" */
    /* tools (chat) */
    char *tools_json; /* the tools as a compact JSON array, NULL when none were given */
    int n_tools;
    char **tool_names; /* [n_tools] */
    cpm_oai_tool_choice tool_choice;
    char *tool_choice_name; /* CPM_OAI_TOOLS_NAMED */
    bool parse_tool_calls;  /* the answer goes through the tool-call parser */
    /* the sampler's constraint (response_format, tool_choice required/named) */
    cpm_oai_constraint constraint_kind;
    char *constraint_schema; /* JSON_SCHEMA: the schema; TOOL_CALLS: the allowed tools */
    bool constraint_single;  /* TOOL_CALLS: exactly one call */
    char ignored[256];     /* unknown fields, accepted and ignored ("a, b"): for the log */
} cpm_oai_request;

/* Error in OpenAI's shape, with the HTTP status to send it with. */
typedef struct cpm_oai_error {
    int http_status;
    const char *type; /* "invalid_request_error", "server_error", ... */
    const char *code; /* machine-readable, or NULL */
    char param[64];   /* offending field, "" when none */
    char message[CPM_ERROR_MSG_MAX];
} cpm_oai_error;

/* Fills e and returns code (a CPM_E* value) so callers can `return cpm_oai_fail(...)`. */
int cpm_oai_fail(cpm_oai_error *e, int code, int http_status, const char *type,
                 const char *err_code, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

/* {"error":{"message","type","param","code"}}; caller frees. NULL only without memory. */
char *cpm_oai_error_json(const cpm_oai_error *e);

/* The same body from its parts (param null); fits http.h's cpm_http_error_body_fn. */
char *cpm_oai_error_body(int status, const char *type, const char *code, const char *msg);

/* Parses and validates a request body. lim may be NULL (defaults). On success *ret
 * is the caller's (cpm_oai_request_free); on failure e says why (status 400). */
int cpm_oai_parse(cpm_oai_kind kind, const char *body, size_t len, const cpm_oai_limits *lim,
                  cpm_oai_request **ret, cpm_oai_error *e);

/* Accepts NULL. */
void cpm_oai_request_free(cpm_oai_request *rq);

/* ---- responses -------------------------------------------------------------- */

/* One generated token as shown in logprobs. Strings are borrowed. */
typedef struct cpm_oai_logprob {
    const char *token;
    float logprob;
    int n_top;
    const char *const *top_tokens; /* [n_top] */
    const float *top_logprobs;     /* [n_top] */
} cpm_oai_logprob;

/* A parsed tool call. In a stream chunk, id == NULL continues the call at index
 * (arguments only); the first chunk of a call carries id, type and name. */
typedef struct cpm_oai_tool_call {
    int index;
    const char *id, *name, *arguments; /* arguments: JSON text */
} cpm_oai_tool_call;

/* One choice, whole (responses) or a delta (stream chunks). Everything borrowed. */
typedef struct cpm_oai_choice {
    int index;
    const char *text; /* chat with tool calls: NULL = "content": null */
    size_t text_len;
    const char *reasoning; /* chat: reasoning_content, NULL/0 = none */
    size_t reasoning_len;
    int n_tool_calls; /* chat: message.tool_calls / delta.tool_calls */
    const cpm_oai_tool_call *tool_calls;
    const char *finish_reason; /* "stop", "length", "tool_calls", or NULL while running */
    int n_logprobs;            /* entries in logprobs (tokens this text covers) */
    const cpm_oai_logprob *logprobs;
    int n_token_ids;           /* generated ids this choice/chunk covers (return_token_ids) */
    const int32_t *token_ids;
} cpm_oai_choice;

typedef struct cpm_oai_usage {
    int prompt_tokens;
    int completion_tokens;
    int cached_tokens; /* of prompt_tokens, supplied by the prefix cache */
} cpm_oai_usage;

/* The non-streamed answer: "text_completion" or "chat.completion". Caller frees. */
char *cpm_oai_render_response(const cpm_oai_request *rq, const char *id, int64_t created,
                              const char *model, const cpm_oai_choice *choices, int n_choices,
                              const cpm_oai_usage *usage);

/* Kinds of SSE chunk for cpm_oai_render_chunk. */
typedef enum cpm_oai_chunk_kind {
    CPM_OAI_CHUNK_ROLE,    /* chat only: first chunk of a choice, delta {"role":"assistant","content":""} */
    CPM_OAI_CHUNK_CONTENT, /* text (and logprobs), finish_reason when set */
    CPM_OAI_CHUNK_USAGE,   /* stream_options.include_usage: choices [], usage */
} cpm_oai_chunk_kind;

/* One SSE event "data: {...}\n\n". choice is unused for USAGE, usage only used there.
 * Caller frees. */
char *cpm_oai_render_chunk(const cpm_oai_request *rq, cpm_oai_chunk_kind kind, const char *id,
                           int64_t created, const char *model, const cpm_oai_choice *choice,
                           const cpm_oai_usage *usage);

/* The stream's last event. */
#define CPM_OAI_SSE_DONE "data: [DONE]\n\n"

/* GET /v1/models with one model, and GET /v1/models/{id}; max_model_len 0 leaves it out
 * (not known yet). Caller frees. */
char *cpm_oai_render_models(const char *model, int64_t created, int max_model_len);
char *cpm_oai_render_model(const char *model, int64_t created, int max_model_len);

/* Copies s (len bytes) replacing every invalid UTF-8 sequence with U+FFFD, so
 * any bytes become a valid JSON string. Caller frees. */
char *cpm_oai_utf8_clean(const char *s, size_t len, size_t *ret_len);

#endif
