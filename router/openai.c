/* openai.c - OpenAI JSON <-> cpm_oai_request and response objects (jansson).
 *
 * Requests are checked field by field through one table (name, which endpoints,
 * parser), so the list of accepted fields is data and unknown fields fall out of
 * it. Responses are built as jansson objects and dumped compact.
 */
#include "openai.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/utf8.h"
#include "services/sampler/jschema.h"

cpm_oai_limits cpm_oai_limits_default(void) {
    return (cpm_oai_limits){
        .max_prompts = 16,
        .max_n = 16,
        .max_messages = 512,
        .max_prompt_ids = 1 << 17,
        .max_top_logprobs = 20,
        .max_stop_len = 256,
    };
}

int cpm_oai_fail(cpm_oai_error *e, int code, int http_status, const char *type,
                 const char *err_code, const char *param, const char *fmt, ...) {
    if (!e)
        return code;
    e->http_status = http_status;
    e->type = type;
    e->code = err_code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return code;
}

/* 400 invalid_request_error about param. */
#define BAD(e, param, ...) \
    cpm_oai_fail(e, CPM_EINVAL, 400, "invalid_request_error", "invalid_value", param, __VA_ARGS__)
#define UNSUPPORTED(e, param, ...) \
    cpm_oai_fail(e, CPM_EUNSUPPORTED, 400, "invalid_request_error", "unsupported_parameter", \
                 param, __VA_ARGS__)

char *cpm_oai_error_json(const cpm_oai_error *e) {
    json_t *err = json_object();
    size_t mlen;
    char *msg = cpm_oai_utf8_clean(e->message, strlen(e->message), &mlen);
    json_object_set_new(err, "message", json_stringn(msg ? msg : "", msg ? mlen : 0));
    free(msg);
    json_object_set_new(err, "type", json_string(e->type ? e->type : "invalid_request_error"));
    json_object_set_new(err, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(err, "code", e->code ? json_string(e->code) : json_null());
    json_t *root = json_pack("{s:o}", "error", err);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    return text;
}

char *cpm_oai_error_body(int status, const char *type, const char *code, const char *msg) {
    cpm_oai_error e;
    cpm_oai_fail(&e, CPM_EINVAL, status, type, code, NULL, "%s", msg ? msg : "");
    return cpm_oai_error_json(&e);
}

/* ---- UTF-8 ----------------------------------------------------------------- */

char *cpm_oai_utf8_clean(const char *s, size_t len, size_t *ret_len) {
    char *out = malloc(len * 3 + 1); /* each bad byte becomes 3 bytes of U+FFFD */
    if (!out)
        return NULL;
    size_t o = 0;
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        size_t k = cpm_utf8_seq_len(u + i, len - i);
        if (k == 0) {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, s + i, k);
            o += k;
            i += k;
        }
    }
    out[o] = '\0';
    if (ret_len)
        *ret_len = o;
    return out;
}

/* A JSON string from arbitrary bytes. */
static json_t *jstr(const char *s, size_t len) {
    size_t n;
    char *clean = cpm_oai_utf8_clean(s ? s : "", s ? len : 0, &n);
    json_t *j = clean ? json_stringn(clean, n) : NULL;
    free(clean);
    return j ? j : json_string("");
}

/* ---- request parsing ---------------------------------------------------------- */

typedef struct parse_ctx {
    cpm_oai_kind kind;
    const cpm_oai_limits *lim;
    bool saw_top_logprobs, saw_stream_options, saw_best_of;
    int best_of;
} parse_ctx;

typedef int (*field_fn)(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *name,
                        cpm_oai_error *e);

static int get_number(json_t *v, const char *name, double lo, double hi, double *ret,
                      cpm_oai_error *e) {
    if (!json_is_number(v))
        return BAD(e, name, "'%s' must be a number", name);
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi)
        return BAD(e, name, "'%s' must be between %g and %g, got %g", name, lo, hi, x);
    *ret = x;
    return 0;
}

static int get_int(json_t *v, const char *name, long long lo, long long hi, long long *ret,
                   cpm_oai_error *e) {
    if (!json_is_integer(v))
        return BAD(e, name, "'%s' must be an integer", name);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return BAD(e, name, "'%s' must be between %lld and %lld, got %lld", name, lo, hi, x);
    *ret = x;
    return 0;
}

static int get_bool(json_t *v, const char *name, bool *ret, cpm_oai_error *e) {
    if (!json_is_boolean(v))
        return BAD(e, name, "'%s' must be a boolean", name);
    *ret = json_is_true(v);
    return 0;
}

static char *dup_string(json_t *v) {
    return strndup(json_string_value(v), json_string_length(v));
}

static int f_model(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *name,
                   cpm_oai_error *e) {
    (void)c;
    if (!json_is_string(v))
        return BAD(e, name, "'model' must be a string");
    free(rq->model);
    rq->model = dup_string(v);
    return rq->model ? 0 : CPM_ENOMEM;
}

static int float_field(json_t *v, const char *name, double lo, double hi, float *dst,
                       cpm_oai_error *e) {
    double x = 0;
    int rc = get_number(v, name, lo, hi, &x, e);
    if (rc == 0)
        *dst = (float)x;
    return rc;
}

static int f_temperature(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                         cpm_oai_error *e) {
    (void)c;
    rq->given |= json_is_null(v) ? 0u : CPM_OAI_GIVEN_TEMPERATURE;
    return float_field(v, n, 0.0, 2.0, &rq->temperature, e);
}

static int f_top_p(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                   cpm_oai_error *e) {
    (void)c;
    rq->given |= json_is_null(v) ? 0u : CPM_OAI_GIVEN_TOP_P;
    int rc = float_field(v, n, 0.0, 1.0, &rq->top_p, e);
    if (rc == 0 && rq->top_p <= 0.0f)
        return BAD(e, n, "'top_p' must be greater than 0");
    return rc;
}

static int f_min_p(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                   cpm_oai_error *e) {
    (void)c;
    return float_field(v, n, 0.0, 1.0, &rq->min_p, e);
}

static int f_top_k(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                   cpm_oai_error *e) {
    (void)c;
    long long k = 0;
    int rc = get_int(v, n, -1, 1 << 20, &k, e);
    if (rc == 0)
        rq->top_k = k < 0 ? 0 : (int)k; /* -1 means off, as in vLLM */
    rq->given |= CPM_OAI_GIVEN_TOP_K;
    return rc;
}

static int f_repetition_penalty(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                                cpm_oai_error *e) {
    (void)c;
    rq->given |= json_is_null(v) ? 0u : CPM_OAI_GIVEN_REPETITION_PENALTY;
    int rc = float_field(v, n, 0.0, 10.0, &rq->repetition_penalty, e);
    if (rc == 0 && rq->repetition_penalty <= 0.0f)
        return BAD(e, n, "'repetition_penalty' must be greater than 0");
    return rc;
}

static int f_presence_penalty(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                              cpm_oai_error *e) {
    (void)c;
    return float_field(v, n, -2.0, 2.0, &rq->presence_penalty, e);
}

static int f_frequency_penalty(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                               cpm_oai_error *e) {
    (void)c;
    return float_field(v, n, -2.0, 2.0, &rq->frequency_penalty, e);
}

static int f_max_tokens(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                        cpm_oai_error *e) {
    (void)c;
    long long x = 0;
    int rc = get_int(v, n, 1, INT32_MAX, &x, e);
    if (rc == 0)
        rq->max_tokens = (int)x;
    return rc;
}

static int f_seed(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n, cpm_oai_error *e) {
    (void)c;
    if (!json_is_integer(v))
        return BAD(e, n, "'seed' must be an integer");
    rq->has_seed = true;
    rq->seed = (uint64_t)json_integer_value(v);
    return 0;
}

static int add_stop(cpm_oai_request *rq, json_t *s, parse_ctx *c, cpm_oai_error *e) {
    if (!json_is_string(s))
        return BAD(e, "stop", "'stop' must be a string or an array of strings");
    size_t len = json_string_length(s);
    if (len == 0)
        return BAD(e, "stop", "'stop' strings must not be empty");
    if (len > c->lim->max_stop_len)
        return BAD(e, "stop", "'stop' strings are limited to %zu bytes", c->lim->max_stop_len);
    if (rq->n_stop >= CPM_OAI_MAX_STOP)
        return BAD(e, "stop", "at most %d stop sequences are allowed", CPM_OAI_MAX_STOP);
    if (!(rq->stop[rq->n_stop] = dup_string(s)))
        return CPM_ENOMEM;
    rq->n_stop++;
    return 0;
}

static int f_stop(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n, cpm_oai_error *e) {
    (void)n;
    if (!json_is_array(v))
        return add_stop(rq, v, c, e);
    size_t i;
    json_t *s;
    json_array_foreach(v, i, s) {
        int rc = add_stop(rq, s, c, e);
        if (rc)
            return rc;
    }
    return 0;
}

static int f_n(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *name, cpm_oai_error *e) {
    long long x = 0;
    int rc = get_int(v, name, 1, c->lim->max_n, &x, e);
    if (rc == 0)
        rq->n = (int)x;
    return rc;
}

static int f_logprobs(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                      cpm_oai_error *e) {
    if (c->kind == CPM_OAI_CHAT)
        return get_bool(v, n, &rq->logprobs, e);
    /* completions: an integer, the number of alternatives (up to 5) */
    long long k = 0;
    int rc = get_int(v, n, 0, 5, &k, e);
    if (rc == 0) {
        rq->logprobs = true;
        rq->top_logprobs = (int)k;
    }
    return rc;
}

static int f_top_logprobs(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                          cpm_oai_error *e) {
    long long k = 0;
    int rc = get_int(v, n, 0, c->lim->max_top_logprobs, &k, e);
    if (rc == 0) {
        rq->top_logprobs = (int)k;
        c->saw_top_logprobs = true;
    }
    return rc;
}

static int f_stream(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                    cpm_oai_error *e) {
    (void)c;
    return get_bool(v, n, &rq->stream, e);
}

static int f_stream_options(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                            cpm_oai_error *e) {
    if (!json_is_object(v))
        return BAD(e, n, "'stream_options' must be an object");
    const char *key;
    json_t *x;
    json_object_foreach(v, key, x) {
        if (strcmp(key, "include_usage") == 0) {
            if (!json_is_null(x) && get_bool(x, "stream_options.include_usage",
                                             &rq->include_usage, e))
                return CPM_EINVAL;
        } else {
            return cpm_oai_fail(e, CPM_EINVAL, 400, "invalid_request_error", "unknown_parameter",
                                "stream_options", "Unrecognized stream option: %s", key);
        }
    }
    c->saw_stream_options = true;
    return 0;
}

/* {"token id": bias}: OpenAI's map (keys are decimal ids), biases in [-100, 100]. */
static int f_logit_bias(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                        cpm_oai_error *e) {
    (void)c;
    if (json_is_null(v))
        return 0;
    if (!json_is_object(v))
        return BAD(e, n, "'%s' must be an object mapping token ids to biases", n);
    if (json_object_size(v) > CPM_OAI_MAX_BIAS)
        return BAD(e, n, "'%s' has %zu entries, at most %d", n, json_object_size(v), CPM_OAI_MAX_BIAS);
    const char *key;
    json_t *b;
    json_object_foreach(v, key, b) {
        char *end;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || id > INT32_MAX)
            return BAD(e, n, "'%s': key '%.32s' is not a token id", n, key);
        if (!json_is_number(b) || !(json_number_value(b) >= -100.0 && json_number_value(b) <= 100.0))
            return BAD(e, n, "'%s': the bias of token %ld must be a number in [-100, 100]", n, id);
        rq->bias_ids[rq->n_bias] = (int32_t)id;
        rq->bias[rq->n_bias++] = (float)json_number_value(b);
    }
    return 0;
}

static int f_min_tokens(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                        cpm_oai_error *e) {
    (void)c;
    long long x = 0;
    int rc = get_int(v, n, 0, INT32_MAX, &x, e);
    if (rc == 0)
        rq->min_tokens = (int)x;
    return rc;
}

static int f_stop_token_ids(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                            cpm_oai_error *e) {
    (void)c;
    if (json_is_null(v))
        return 0;
    if (!json_is_array(v) || json_array_size(v) > CPM_OAI_MAX_STOP_IDS)
        return BAD(e, n, "'%s' must be an array of at most %d token ids", n, CPM_OAI_MAX_STOP_IDS);
    size_t i;
    json_t *id;
    json_array_foreach(v, i, id) {
        long long x = 0;
        int rc = get_int(id, n, 0, INT32_MAX, &x, e);
        if (rc)
            return rc;
        rq->stop_ids[rq->n_stop_ids++] = (int32_t)x;
    }
    return 0;
}

static int f_ignore_eos(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                        cpm_oai_error *e) {
    (void)c;
    return get_bool(v, n, &rq->ignore_eos, e);
}

static int f_skip_special_tokens(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                                 cpm_oai_error *e) {
    (void)c;
    bool skip = true;
    int rc = get_bool(v, n, &skip, e);
    rq->keep_special = !skip;
    return rc;
}

static int f_include_stop_str(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                              cpm_oai_error *e) {
    (void)c;
    return get_bool(v, n, &rq->include_stop_str, e);
}

static int f_return_token_ids(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                              cpm_oai_error *e) {
    (void)c;
    return get_bool(v, n, &rq->return_token_ids, e);
}

/* Accepted: MiniCPM may write several calls in one block whatever it says; a client
 * that asks for at most one still gets what the model wrote (as vLLM). */
static int f_parallel_tool_calls(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                                 cpm_oai_error *e) {
    (void)rq, (void)c;
    return json_is_boolean(v) ? 0 : BAD(e, n, "'%s' must be a boolean", n);
}

/* Known, harmless, no effect here (user ids, metadata for stored completions). */
static int f_ignored(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                     cpm_oai_error *e) {
    (void)rq, (void)v, (void)c, (void)n, (void)e;
    return 0;
}

static int f_user(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                  cpm_oai_error *e) {
    (void)rq, (void)c;
    return json_is_string(v) ? 0 : BAD(e, n, "'%s' must be a string", n);
}

static int f_best_of(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                     cpm_oai_error *e) {
    (void)rq;
    long long k = 0;
    int rc = get_int(v, n, 1, c->lim->max_n, &k, e);
    c->saw_best_of = true;
    c->best_of = (int)k;
    return rc;
}

static int f_echo(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n, cpm_oai_error *e) {
    (void)rq, (void)c;
    bool echo = false;
    if (get_bool(v, n, &echo, e))
        return CPM_EINVAL;
    return echo ? UNSUPPORTED(e, n, "'echo' is not supported") : 0;
}

static int f_suffix(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                    cpm_oai_error *e) {
    (void)rq, (void)c;
    if (!json_is_string(v))
        return BAD(e, n, "'suffix' must be a string");
    return json_string_length(v) ? UNSUPPORTED(e, n, "'suffix' is not supported") : 0;
}

static int f_empty_only(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                        cpm_oai_error *e) {
    (void)rq, (void)c;
    bool empty = (json_is_object(v) && json_object_size(v) == 0) ||
                 (json_is_array(v) && json_array_size(v) == 0);
    return empty ? 0 : UNSUPPORTED(e, n, "'%s' is not supported by this server", n);
}

/* ---- tools, tool_choice, response_format ------------------------------------------ */

/* OpenAI's rule for function names: what the model writes back must match one exactly. */
static bool valid_tool_name(const char *s, size_t len) {
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!(s[i] == '_' || s[i] == '-' || (s[i] >= '0' && s[i] <= '9') ||
              ((s[i] | 0x20) >= 'a' && (s[i] | 0x20) <= 'z')))
            return false;
    return true;
}

static bool key_in(const char *key, const char *const *keys) {
    for (; *keys; keys++)
        if (strcmp(key, *keys) == 0)
            return true;
    return false;
}

/* Object v has only keys from `allowed` (else 400 naming param and the key). */
static int only_keys(json_t *v, const char *const *allowed, const char *param, cpm_oai_error *e) {
    const char *key;
    json_t *x;
    json_object_foreach(v, key, x) {
        if (!key_in(key, allowed))
            return cpm_oai_fail(e, CPM_EINVAL, 400, "invalid_request_error", "unknown_parameter",
                                param, "Unrecognized argument in %s: %s", param, key);
    }
    return 0;
}

/* tools[i].function: {name, description?, parameters?, strict?}; its name into names[i]. */
static int check_function(json_t *fn, const char *param, char **name_out, cpm_oai_error *e) {
    static const char *const keys[] = {"name", "description", "parameters", "strict", NULL};
    if (!json_is_object(fn))
        return BAD(e, param, "'%s' must be an object", param);
    if (only_keys(fn, keys, param, e))
        return CPM_EINVAL;
    json_t *name = json_object_get(fn, "name"), *desc = json_object_get(fn, "description"),
           *params = json_object_get(fn, "parameters"), *strict = json_object_get(fn, "strict");
    if (!json_is_string(name) || !valid_tool_name(json_string_value(name), json_string_length(name)))
        return BAD(e, param, "'%s.name' must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
                   param);
    if (desc && !json_is_null(desc) && !json_is_string(desc))
        return BAD(e, param, "'%s.description' must be a string", param);
    if (params && !json_is_null(params) && !json_is_object(params))
        return BAD(e, param, "'%s.parameters' must be a JSON Schema object", param);
    if (strict && !json_is_null(strict) && !json_is_boolean(strict))
        return BAD(e, param, "'%s.strict' must be a boolean", param);
    return (*name_out = dup_string(name)) ? 0 : CPM_ENOMEM;
}

static int check_tool(cpm_oai_request *rq, json_t *t, size_t i, cpm_oai_error *e) {
    static const char *const keys[] = {"type", "function", NULL};
    char param[48];
    snprintf(param, sizeof param, "tools[%zu]", i);
    if (!json_is_object(t))
        return BAD(e, param, "'%s' must be an object", param);
    if (only_keys(t, keys, param, e))
        return CPM_EINVAL;
    const char *type = json_string_value(json_object_get(t, "type"));
    if (!type || strcmp(type, "function") != 0)
        return BAD(e, param, "'%s.type' must be \"function\"", param);
    snprintf(param, sizeof param, "tools[%zu].function", i);
    int rc = check_function(json_object_get(t, "function"), param, &rq->tool_names[i], e);
    for (size_t k = 0; rc == 0 && k < i; k++)
        if (strcmp(rq->tool_names[k], rq->tool_names[i]) == 0)
            rc = BAD(e, param, "tools[%zu] and tools[%zu] are both named '%s'", k, i,
                     rq->tool_names[i]);
    return rc;
}

static int f_tools(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                   cpm_oai_error *e) {
    (void)c;
    if (!json_is_array(v))
        return BAD(e, n, "'tools' must be an array of {\"type\":\"function\",\"function\":{...}}");
    size_t count = json_array_size(v);
    if (count == 0)
        return 0; /* no tools: a plain chat */
    if (count > CPM_OAI_MAX_TOOLS)
        return BAD(e, n, "at most %d tools per request, got %zu", CPM_OAI_MAX_TOOLS, count);
    if (!(rq->tool_names = calloc(count, sizeof *rq->tool_names)))
        return CPM_ENOMEM;
    rq->n_tools = (int)count;
    for (size_t i = 0; i < count; i++) {
        int rc = check_tool(rq, json_array_get(v, i), i, e);
        if (rc)
            return rc;
    }
    rq->tools_json = json_dumps(v, JSON_COMPACT | JSON_ENSURE_ASCII);
    return rq->tools_json ? 0 : CPM_ENOMEM;
}

/* "none" | "auto" | "required" | {"type":"function","function":{"name":...}}; whether a
 * named tool exists is checked once every field is read (check_tools). */
static int f_tool_choice(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                         cpm_oai_error *e) {
    (void)c;
    static const char *const modes[] = {"auto", "none", "required"};
    const char *s = json_string_value(v);
    for (int k = 0; s && k < 3; k++)
        if (strcmp(s, modes[k]) == 0) {
            rq->tool_choice = (cpm_oai_tool_choice)k;
            return 0;
        }
    if (s)
        return BAD(e, n, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                         "{\"type\":\"function\",\"function\":{\"name\":...}}, got \"%.64s\"", s);
    const char *type = json_string_value(json_object_get(v, "type"));
    const char *name = json_string_value(json_object_get(json_object_get(v, "function"), "name"));
    if (!json_is_object(v) || !type || strcmp(type, "function") != 0 || !name)
        return BAD(e, n, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                         "{\"type\":\"function\",\"function\":{\"name\":...}}");
    rq->tool_choice = CPM_OAI_TOOLS_NAMED;
    free(rq->tool_choice_name);
    return (rq->tool_choice_name = strdup(name)) ? 0 : CPM_ENOMEM;
}

/* The legacy function-calling fields: refused with the way to the current ones. */
static int f_functions(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                       cpm_oai_error *e) {
    (void)rq, (void)c;
    if (json_is_array(v) && json_array_size(v) == 0)
        return 0;
    return UNSUPPORTED(e, n, "'functions' is deprecated and not supported: send 'tools' "
                             "([{\"type\":\"function\",\"function\":{...}}])");
}

static int f_function_call(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                           cpm_oai_error *e) {
    (void)rq, (void)c;
    const char *s = json_string_value(v);
    if (s && (strcmp(s, "none") == 0 || strcmp(s, "auto") == 0))
        return 0; /* plain text either way without 'functions' */
    return UNSUPPORTED(e, n, "'function_call' is deprecated and not supported: send "
                             "'tool_choice'");
}

static int json_format(cpm_oai_request *rq, json_t *v, const char *n, cpm_oai_error *e) {
    json_t *js = json_object_get(v, "json_schema");
    static const char *const keys[] = {"name", "description", "schema", "strict", NULL};
    if (!json_is_object(js))
        return BAD(e, n, "'response_format.json_schema' must be an object {name, schema, strict}");
    if (only_keys(js, keys, "response_format.json_schema", e))
        return CPM_EINVAL;
    json_t *name = json_object_get(js, "name"), *schema = json_object_get(js, "schema");
    if (!json_is_string(name) || !valid_tool_name(json_string_value(name), json_string_length(name)))
        return BAD(e, "response_format.json_schema.name",
                   "'response_format.json_schema.name' must be 1 to 64 characters of a-z, A-Z, "
                   "0-9, _ and -");
    if (schema && !json_is_null(schema) && !json_is_object(schema))
        return BAD(e, "response_format.json_schema.schema",
                   "'response_format.json_schema.schema' must be a JSON Schema object");
    rq->constraint_kind = CPM_OAI_CONSTRAINT_JSON_SCHEMA;
    free(rq->constraint_schema);
    /* no schema: any JSON value the schema {} allows */
    rq->constraint_schema = json_is_object(schema) ? json_dumps(schema, JSON_COMPACT) : strdup("{}");
    if (!rq->constraint_schema)
        return CPM_ENOMEM;
    cpm_error why = {0}; /* the subset the sampler can hold the output to: the rest is a 400 */
    if (cpm_jschema_check(CPM_OAI_CONSTRAINT_JSON_SCHEMA, rq->constraint_schema, 0, &why))
        return BAD(e, "response_format.json_schema.schema", "'response_format.json_schema.schema': %s",
                   why.msg);
    return 0;
}

/* {"type":"text"} | {"type":"json_object"} | {"type":"json_schema","json_schema":{...}} */
static int f_response_format(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                             cpm_oai_error *e) {
    (void)c;
    static const char *const keys[] = {"type", "json_schema", NULL};
    const char *t = json_string_value(json_object_get(v, "type"));
    if (!json_is_object(v) || !t)
        return BAD(e, n, "'response_format' must be an object with a 'type'");
    if (only_keys(v, keys, n, e))
        return CPM_EINVAL;
    if (strcmp(t, "text") == 0)
        return 0;
    if (strcmp(t, "json_object") == 0) {
        rq->constraint_kind = CPM_OAI_CONSTRAINT_JSON_OBJECT;
        return 0;
    }
    if (strcmp(t, "json_schema") == 0)
        return json_format(rq, v, n, e);
    return BAD(e, n, "'response_format.type' must be \"text\", \"json_object\" or "
                     "\"json_schema\", got \"%.64s\"", t);
}

/* The tools array a TOOL_CALLS constraint allows: all of them, or the named one. */
static char *allowed_tools(const cpm_oai_request *rq) {
    json_t *all = json_loads(rq->tools_json, 0, NULL), *out = all;
    if (all && rq->tool_choice == CPM_OAI_TOOLS_NAMED) {
        out = json_array();
        size_t i;
        json_t *t;
        json_array_foreach(all, i, t) {
            if (strcmp(rq->tool_names[i], rq->tool_choice_name) == 0)
                json_array_append(out, t);
        }
        json_decref(all);
    }
    char *s = out ? json_dumps(out, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
    json_decref(out);
    return s;
}

/* tool_choice against tools, and the constraint it makes. */
static int check_tools(cpm_oai_request *rq, cpm_oai_error *e) {
    bool forced = rq->tool_choice == CPM_OAI_TOOLS_REQUIRED || rq->tool_choice == CPM_OAI_TOOLS_NAMED;
    if (forced && rq->n_tools == 0)
        return BAD(e, "tool_choice", "'tool_choice' \"required\" or a named function needs "
                                     "'tools'");
    bool found = false;
    for (int i = 0; rq->tool_choice == CPM_OAI_TOOLS_NAMED && i < rq->n_tools; i++)
        found |= strcmp(rq->tool_names[i], rq->tool_choice_name) == 0;
    if (rq->tool_choice == CPM_OAI_TOOLS_NAMED && !found)
        return BAD(e, "tool_choice", "'tool_choice' names '%.64s', which is not in 'tools'",
                   rq->tool_choice_name);
    if (forced && rq->constraint_kind)
        return BAD(e, "response_format", "'response_format' json_object/json_schema cannot be "
                                         "combined with 'tool_choice' \"required\" or a named "
                                         "function");
    rq->parse_tool_calls = rq->n_tools > 0 && rq->tool_choice != CPM_OAI_TOOLS_NONE;
    if (!forced)
        return 0;
    rq->constraint_kind = CPM_OAI_CONSTRAINT_TOOL_CALLS;
    rq->constraint_single = rq->tool_choice == CPM_OAI_TOOLS_NAMED;
    if (!(rq->constraint_schema = allowed_tools(rq)))
        return CPM_ENOMEM;
    cpm_error why = {0}; /* the sampler holds a forced call to the tool's parameters schema */
    if (cpm_jschema_check(CPM_OAI_CONSTRAINT_TOOL_CALLS, rq->constraint_schema, rq->constraint_single,
                          &why))
        return BAD(e, "tools", "'tools' with a forced 'tool_choice': %s", why.msg);
    return 0;
}

/* Adds an unknown field's name to rq->ignored ("a, b, ..."; cut at its size). */
static void note_ignored(cpm_oai_request *rq, const char *key) {
    size_t used = strlen(rq->ignored), room = sizeof rq->ignored - used;
    if (room > 1)
        snprintf(rq->ignored + used, room, "%s%.64s", used ? ", " : "", key);
}

static int f_prompt(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                    cpm_oai_error *e);
static int f_messages(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                      cpm_oai_error *e);

enum { K_COMP = 1, K_CHAT = 2, K_BOTH = 3 };

static const struct field {
    const char *name;
    int kinds;
    field_fn fn;
} fields[] = {
    {"model", K_BOTH, f_model},
    {"prompt", K_COMP, f_prompt},
    {"messages", K_CHAT, f_messages},
    {"max_tokens", K_BOTH, f_max_tokens},
    {"max_completion_tokens", K_CHAT, f_max_tokens},
    {"temperature", K_BOTH, f_temperature},
    {"top_p", K_BOTH, f_top_p},
    {"top_k", K_BOTH, f_top_k},
    {"min_p", K_BOTH, f_min_p},
    {"repetition_penalty", K_BOTH, f_repetition_penalty},
    {"presence_penalty", K_BOTH, f_presence_penalty},
    {"frequency_penalty", K_BOTH, f_frequency_penalty},
    {"seed", K_BOTH, f_seed},
    {"stop", K_BOTH, f_stop},
    {"n", K_BOTH, f_n},
    {"logprobs", K_BOTH, f_logprobs},
    {"top_logprobs", K_CHAT, f_top_logprobs},
    {"stream", K_BOTH, f_stream},
    {"stream_options", K_BOTH, f_stream_options},
    {"ignore_eos", K_BOTH, f_ignore_eos},
    {"return_token_ids", K_BOTH, f_return_token_ids},
    {"user", K_BOTH, f_user},
    {"metadata", K_BOTH, f_ignored},
    {"store", K_CHAT, f_ignored},
    {"service_tier", K_BOTH, f_ignored},
    {"parallel_tool_calls", K_CHAT, f_parallel_tool_calls},
    {"best_of", K_COMP, f_best_of},
    {"echo", K_COMP, f_echo},
    {"suffix", K_COMP, f_suffix},
    {"logit_bias", K_BOTH, f_logit_bias},
    {"tools", K_CHAT, f_tools},
    {"functions", K_CHAT, f_functions},
    {"tool_choice", K_CHAT, f_tool_choice},
    {"function_call", K_CHAT, f_function_call},
    {"response_format", K_CHAT, f_response_format},
    /* vLLM's extras: the ones honoured, then those that would change the output and are
     * refused until implemented (never silently ignored) */
    {"min_tokens", K_BOTH, f_min_tokens},
    {"stop_token_ids", K_BOTH, f_stop_token_ids},
    {"skip_special_tokens", K_BOTH, f_skip_special_tokens},
    {"include_stop_str_in_output", K_BOTH, f_include_stop_str},
    {"guided_json", K_BOTH, f_empty_only},
    {"guided_regex", K_BOTH, f_empty_only},
    {"guided_choice", K_BOTH, f_empty_only},
    {"guided_grammar", K_BOTH, f_empty_only},
    {"allowed_token_ids", K_BOTH, f_empty_only},
    {"bad_words", K_BOTH, f_empty_only},
};

/* ---- prompts and messages ----------------------------------------------------- */

static int parse_ids(json_t *arr, const char *param, parse_ctx *c, cpm_oai_prompt *p,
                     cpm_oai_error *e) {
    size_t n = json_array_size(arr);
    if (n == 0)
        return BAD(e, param, "a token-id prompt must not be empty");
    if (n > (size_t)c->lim->max_prompt_ids)
        return BAD(e, param, "prompt has %zu tokens, the limit is %d", n, c->lim->max_prompt_ids);
    if (!(p->ids = malloc(n * sizeof *p->ids)))
        return CPM_ENOMEM;
    p->n_ids = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(arr, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) > INT32_MAX)
            return BAD(e, param, "token ids must be non-negative integers (item %zu)", i);
        p->ids[i] = (int32_t)json_integer_value(t);
    }
    return 0;
}

static int alloc_prompts(cpm_oai_request *rq, size_t n, parse_ctx *c, cpm_oai_error *e) {
    if (n > (size_t)c->lim->max_prompts)
        return BAD(e, "prompt", "at most %d prompts per request", c->lim->max_prompts);
    if (!(rq->prompts = calloc(n, sizeof *rq->prompts)))
        return CPM_ENOMEM;
    rq->n_prompts = (int)n;
    return 0;
}

/* prompt: "text" | ["text", ...] | [id, ...] | [[id, ...], ...] */
static int f_prompt(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                    cpm_oai_error *e) {
    if (json_is_string(v)) {
        if (alloc_prompts(rq, 1, c, e))
            return CPM_EINVAL;
        return (rq->prompts[0].text = dup_string(v)) ? 0 : CPM_ENOMEM;
    }
    if (!json_is_array(v) || json_array_size(v) == 0)
        return BAD(e, n, "'prompt' must be a string, an array of strings, an array of token ids "
                         "or an array of token-id arrays, and not empty");
    json_t *first = json_array_get(v, 0);
    if (json_is_integer(first)) {
        if (alloc_prompts(rq, 1, c, e))
            return CPM_EINVAL;
        return parse_ids(v, n, c, &rq->prompts[0], e);
    }
    int rc = alloc_prompts(rq, json_array_size(v), c, e);
    if (rc)
        return rc;
    size_t i;
    json_t *x;
    json_array_foreach(v, i, x) {
        if (json_is_string(x) && json_is_string(first)) {
            if (!(rq->prompts[i].text = dup_string(x)))
                return CPM_ENOMEM;
        } else if (json_is_array(x) && json_is_array(first)) {
            if ((rc = parse_ids(x, n, c, &rq->prompts[i], e)))
                return rc;
        } else {
            return BAD(e, n, "'prompt' array items must all be strings or all token-id arrays");
        }
    }
    return 0;
}

/* content: "text" | [{"type":"text","text":"..."}, ...] | null (assistant) */
static int parse_content(json_t *v, const char *role, int idx, cpm_oai_message *m,
                         cpm_oai_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", idx);
    if (json_is_null(v) || !v) {
        if (strcmp(role, "assistant") != 0)
            return BAD(e, param, "messages[%d]: content is required for role '%s'", idx, role);
        return (m->content = strdup("")) ? 0 : CPM_ENOMEM;
    }
    if (json_is_string(v))
        return (m->content = dup_string(v)) ? 0 : CPM_ENOMEM;
    if (!json_is_array(v))
        return BAD(e, param, "messages[%d].content must be a string or an array of parts", idx);
    size_t total = 0, i;
    json_t *part;
    json_array_foreach(v, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        if (!type || strcmp(type, "text") != 0)
            return UNSUPPORTED(e, param, "messages[%d].content[%zu]: only text parts are supported",
                               idx, i);
        if (!json_is_string(text) || json_object_size(part) != 2)
            return BAD(e, param, "messages[%d].content[%zu] must be {\"type\":\"text\",\"text\":\"...\"}",
                       idx, i);
        total += json_string_length(text);
    }
    if (!(m->content = malloc(total + 1)))
        return CPM_ENOMEM;
    size_t off = 0;
    json_array_foreach(v, i, part) {
        json_t *text = json_object_get(part, "text");
        memcpy(m->content + off, json_string_value(text), json_string_length(text));
        off += json_string_length(text);
    }
    m->content[off] = '\0';
    return 0;
}

/* One of an assistant message's tool_calls: {id?, type: "function", function: {name,
 * arguments}}, arguments a JSON object as text (as OpenAI sends them) or as an object. */
/* v is an object of only those keys (else a 400 naming param). */
static int object_of(json_t *v, const char *const *keys, const char *param, const char *shape,
                     cpm_oai_error *e) {
    if (!json_is_object(v))
        return BAD(e, param, "'%s' must be %s", param, shape);
    return only_keys(v, keys, param, e);
}

static int check_call(json_t *call, const char *param, cpm_oai_error *e) {
    static const char *const keys[] = {"id", "type", "function", "index", NULL};
    static const char *const fkeys[] = {"name", "arguments", NULL};
    if (object_of(call, keys, param, "an object", e))
        return CPM_EINVAL;
    const char *type = json_string_value(json_object_get(call, "type"));
    json_t *fn = json_object_get(call, "function"), *id = json_object_get(call, "id");
    if (type && strcmp(type, "function") != 0)
        return BAD(e, param, "'%s.type' must be \"function\"", param);
    if (id && !json_is_null(id) && !json_is_string(id))
        return BAD(e, param, "'%s.id' must be a string", param);
    if (object_of(fn, fkeys, param, "an object with 'function': {name, arguments}", e))
        return CPM_EINVAL;
    json_t *name = json_object_get(fn, "name"), *args = json_object_get(fn, "arguments");
    if (!json_is_string(name) || json_string_length(name) == 0)
        return BAD(e, param, "'%s.function.name' must be a non-empty string", param);
    if (!args || json_is_null(args) || json_is_object(args))
        return 0; /* the template takes an object too */
    json_t *parsed = json_is_string(args) ? json_loads(json_string_value(args), 0, NULL) : NULL;
    bool ok = json_is_object(parsed);
    json_decref(parsed);
    return ok ? 0 : BAD(e, param, "'%s.function.arguments' must be a JSON object, as a string",
                        param);
}

static int parse_tool_calls(json_t *tc, int idx, cpm_oai_message *m, cpm_oai_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].tool_calls", idx);
    if (!json_is_array(tc))
        return BAD(e, param, "'%s' must be an array", param);
    size_t i;
    json_t *call;
    json_array_foreach(tc, i, call) {
        char p[96];
        snprintf(p, sizeof p, "%.64s[%zu]", param, i);
        int rc = check_call(call, p, e);
        if (rc)
            return rc;
    }
    m->tool_calls_json = json_dumps(tc, JSON_COMPACT | JSON_ENSURE_ASCII);
    return m->tool_calls_json ? 0 : CPM_ENOMEM;
}

/* The tool-calling parts of a message: an assistant's tool_calls and reasoning_content,
 * a tool result's tool_call_id (required, as OpenAI). */
static int parse_tool_parts(json_t *v, const char *role, int idx, cpm_oai_message *m,
                            cpm_oai_error *e) {
    char param[64];
    json_t *tc = json_object_get(v, "tool_calls"), *rc_ = json_object_get(v, "reasoning_content"),
           *id = json_object_get(v, "tool_call_id");
    bool assistant = strcmp(role, "assistant") == 0;
    bool has_calls = tc && !json_is_null(tc) && !(json_is_array(tc) && json_array_size(tc) == 0);
    snprintf(param, sizeof param, "messages[%d]", idx);
    if (has_calls && !assistant)
        return BAD(e, param, "messages[%d]: only assistant messages have 'tool_calls'", idx);
    int rc = has_calls ? parse_tool_calls(tc, idx, m, e) : 0;
    if (rc)
        return rc;
    if (rc_ && !json_is_null(rc_)) {
        if (!assistant || !json_is_string(rc_))
            return BAD(e, param, "messages[%d]: 'reasoning_content' must be a string, on an "
                                 "assistant message", idx);
        if (!(m->thought = dup_string(rc_)))
            return CPM_ENOMEM;
    }
    if (strcmp(role, "tool") == 0) {
        if (!json_is_string(id))
            return BAD(e, param, "messages[%d]: a 'tool' message needs 'tool_call_id' (a string)",
                       idx);
        return (m->tool_call_id = dup_string(id)) ? 0 : CPM_ENOMEM;
    }
    return 0;
}

static int parse_message(json_t *v, int idx, cpm_oai_message *m, cpm_oai_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d]", idx);
    if (!json_is_object(v))
        return BAD(e, param, "messages[%d] must be an object", idx);
    const char *key;
    json_t *x;
    json_object_foreach(v, key, x) {
        static const char *const known[] = {"role", "content", "name", "tool_calls",
                                            "tool_call_id", "refusal", "reasoning_content", NULL};
        if (!key_in(key, known))
            return cpm_oai_fail(e, CPM_EINVAL, 400, "invalid_request_error", "unknown_parameter",
                                param, "Unrecognized argument in messages[%d]: %s", idx, key);
    }
    const char *role = json_string_value(json_object_get(v, "role"));
    if (!role)
        return BAD(e, param, "messages[%d]: 'role' must be a string", idx);
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool", NULL};
    if (!key_in(role, roles))
        return BAD(e, param, "messages[%d]: unknown role '%s'", idx, role);
    /* the templates know "system"; OpenAI's newer "developer" means the same */
    if (!(m->role = strdup(strcmp(role, "developer") == 0 ? "system" : role)))
        return CPM_ENOMEM;
    int rc = parse_tool_parts(v, role, idx, m, e);
    return rc ? rc : parse_content(json_object_get(v, "content"), role, idx, m, e);
}

static int f_messages(cpm_oai_request *rq, json_t *v, parse_ctx *c, const char *n,
                      cpm_oai_error *e) {
    if (!json_is_array(v) || json_array_size(v) == 0)
        return BAD(e, n, "'messages' must be a non-empty array");
    size_t count = json_array_size(v);
    if (count > (size_t)c->lim->max_messages)
        return BAD(e, n, "at most %d messages per request", c->lim->max_messages);
    if (!(rq->messages = calloc(count, sizeof *rq->messages)))
        return CPM_ENOMEM;
    rq->n_messages = (int)count;
    for (size_t i = 0; i < count; i++) {
        int rc = parse_message(json_array_get(v, i), (int)i, &rq->messages[i], e);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- the whole request -------------------------------------------------------- */

static const struct field *find_field(const char *name, cpm_oai_kind kind) {
    int bit = kind == CPM_OAI_CHAT ? K_CHAT : K_COMP;
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if ((fields[i].kinds & bit) && strcmp(fields[i].name, name) == 0)
            return &fields[i];
    return NULL;
}

/* A field of the other endpoint (prompt on chat, messages on completions): sent here by
 * mistake, and ignoring it would answer another question than the one asked. */
static bool other_kinds_field(const char *name) {
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (strcmp(fields[i].name, name) == 0)
            return true;
    return false;
}

/* Rules across fields, once every field is parsed. */
static int check_request(cpm_oai_request *rq, const parse_ctx *c, cpm_oai_error *e) {
    if (rq->kind == CPM_OAI_COMPLETION && rq->n_prompts == 0)
        return BAD(e, "prompt", "'prompt' is required");
    if (rq->kind == CPM_OAI_CHAT && rq->n_messages == 0)
        return BAD(e, "messages", "'messages' is required");
    if (c->saw_top_logprobs && rq->top_logprobs > 0 && !rq->logprobs)
        return BAD(e, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
    if (c->saw_stream_options && !rq->stream)
        return BAD(e, "stream_options",
                   "'stream_options' is only allowed when 'stream' is enabled");
    if (c->saw_best_of && c->best_of != rq->n)
        return UNSUPPORTED(e, "best_of", "'best_of' must equal 'n' on this server");
    if (rq->kind == CPM_OAI_COMPLETION && rq->n_prompts * rq->n > c->lim->max_n)
        return BAD(e, "n", "too many choices: %d prompts x n=%d, the limit is %d", rq->n_prompts,
                   rq->n, c->lim->max_n);
    return rq->kind == CPM_OAI_CHAT ? check_tools(rq, e) : 0;
}

int cpm_oai_parse(cpm_oai_kind kind, const char *body, size_t len, const cpm_oai_limits *lim,
                  cpm_oai_request **ret, cpm_oai_error *e) {
    *ret = NULL;
    cpm_oai_limits dl = cpm_oai_limits_default();
    parse_ctx c = {.kind = kind, .lim = lim ? lim : &dl};
    json_error_t jerr;
    /* REJECT_DUPLICATES: {"n":1,"n":99} must not mean whichever came last */
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return cpm_oai_fail(e, CPM_EFORMAT, 400, "invalid_request_error", "invalid_json", NULL,
                            "request body is not valid JSON: %s (line %d, column %d)", jerr.text,
                            jerr.line, jerr.column);
    int rc = 0;
    cpm_oai_request *rq = calloc(1, sizeof *rq);
    if (!rq) {
        rc = cpm_oai_fail(e, CPM_ENOMEM, 500, "server_error", NULL, NULL, "out of memory");
        goto out_root;
    }
    *rq = (cpm_oai_request){.kind = kind, .temperature = 1.0f, .top_p = 1.0f,
                            .repetition_penalty = 1.0f, .n = 1};
    if (!json_is_object(root)) {
        rc = BAD(e, NULL, "request body must be a JSON object");
        goto out_rq;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const struct field *f = find_field(key, kind);
        if (!f && other_kinds_field(key)) {
            rc = cpm_oai_fail(e, CPM_EINVAL, 400, "invalid_request_error", "unknown_parameter", key,
                              "'%s' belongs to the other endpoint", key);
            goto out_rq;
        }
        if (!f) { /* as vLLM does: clients send their ecosystem's extras; the caller logs them */
            note_ignored(rq, key);
            continue;
        }
        if (json_is_null(v) && strcmp(key, "prompt") != 0 && strcmp(key, "messages") != 0)
            continue; /* clients send null for "not set" */
        if ((rc = f->fn(rq, v, &c, key, e)))
            goto out_rq;
    }
    if ((rc = check_request(rq, &c, e)))
        goto out_rq;
    json_decref(root);
    *ret = rq;
    return 0;

out_rq:
    if (rc == CPM_ENOMEM)
        cpm_oai_fail(e, CPM_ENOMEM, 500, "server_error", NULL, NULL, "out of memory");
    cpm_oai_request_free(rq);
out_root:
    json_decref(root);
    return rc;
}

void cpm_oai_request_free(cpm_oai_request *rq) {
    if (!rq)
        return;
    free(rq->model);
    for (int i = 0; i < rq->n_prompts; i++) {
        free(rq->prompts[i].text);
        free(rq->prompts[i].ids);
    }
    free(rq->prompts);
    for (int i = 0; i < rq->n_messages; i++) {
        free(rq->messages[i].role);
        free(rq->messages[i].content);
        free(rq->messages[i].tool_calls_json);
        free(rq->messages[i].thought);
        free(rq->messages[i].tool_call_id);
    }
    for (int i = 0; i < rq->n_tools; i++)
        free(rq->tool_names[i]);
    free(rq->tool_names);
    free(rq->tools_json);
    free(rq->tool_choice_name);
    free(rq->constraint_schema);
    free(rq->messages);
    for (int i = 0; i < rq->n_stop; i++)
        free(rq->stop[i]);
    free(rq);
}

/* ---- rendering ------------------------------------------------------------------ */

static json_t *bytes_array(const char *s) {
    json_t *a = json_array();
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        json_array_append_new(a, json_integer(*p));
    return a;
}

/* chat: {"content":[{"token","logprob","bytes","top_logprobs":[...]}]} */
static json_t *chat_logprobs(const cpm_oai_choice *ch) {
    json_t *content = json_array();
    for (int i = 0; i < ch->n_logprobs; i++) {
        const cpm_oai_logprob *lp = &ch->logprobs[i];
        json_t *top = json_array();
        for (int k = 0; k < lp->n_top; k++)
            json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token",
                                                 jstr(lp->top_tokens[k], strlen(lp->top_tokens[k])),
                                                 "logprob", (double)lp->top_logprobs[k], "bytes",
                                                 bytes_array(lp->top_tokens[k])));
        json_array_append_new(content,
                              json_pack("{s:o, s:f, s:o, s:o}", "token",
                                        jstr(lp->token, strlen(lp->token)), "logprob",
                                        (double)lp->logprob, "bytes", bytes_array(lp->token),
                                        "top_logprobs", top));
    }
    return json_pack("{s:o}", "content", content);
}

/* completions: {"tokens","token_logprobs","top_logprobs","text_offset"} */
static json_t *completion_logprobs(const cpm_oai_choice *ch, int text_offset) {
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    int off = text_offset;
    for (int i = 0; i < ch->n_logprobs; i++) {
        const cpm_oai_logprob *lp = &ch->logprobs[i];
        json_array_append_new(tokens, jstr(lp->token, strlen(lp->token)));
        json_array_append_new(lps, json_real(lp->logprob));
        json_t *top = json_object();
        for (int k = 0; k < lp->n_top; k++) {
            size_t n;
            char *key = cpm_oai_utf8_clean(lp->top_tokens[k], strlen(lp->top_tokens[k]), &n);
            if (key)
                json_object_set_new(top, key, json_real(lp->top_logprobs[k]));
            free(key);
        }
        json_array_append_new(tops, top);
        json_array_append_new(offs, json_integer(off));
        off += (int)strlen(lp->token);
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps,
                     "top_logprobs", tops, "text_offset", offs);
}

static json_t *logprobs_of(const cpm_oai_request *rq, const cpm_oai_choice *ch) {
    if (!rq->logprobs)
        return json_null();
    return rq->kind == CPM_OAI_CHAT ? chat_logprobs(ch) : completion_logprobs(ch, 0);
}

/* Adds "token_ids" to a rendered choice when the client asked for them. */
static json_t *with_ids(const cpm_oai_request *rq, json_t *c, const cpm_oai_choice *ch) {
    if (rq->return_token_ids && c) {
        json_t *ids = json_array();
        for (int i = 0; i < ch->n_token_ids; i++)
            json_array_append_new(ids, json_integer(ch->token_ids[i]));
        json_object_set_new(c, "token_ids", ids);
    }
    return c;
}

static json_t *finish_of(const cpm_oai_choice *ch) {
    return ch->finish_reason ? json_string(ch->finish_reason) : json_null();
}

static json_t *usage_json(const cpm_oai_usage *u) {
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", u->prompt_tokens,
                     "completion_tokens", u->completion_tokens, "total_tokens",
                     u->prompt_tokens + u->completion_tokens, "prompt_tokens_details",
                     "cached_tokens", u->cached_tokens);
}

static json_t *envelope(const char *object, const char *id, int64_t created, const char *model) {
    return json_pack("{s:s, s:s, s:I, s:s}", "id", id, "object", object, "created",
                     (json_int_t)created, "model", model);
}

static char *dump(json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(8)) : NULL;
    json_decref(j);
    return s;
}

/* tool_calls as OpenAI shows them: whole in a message; in a delta, a call's first piece
 * carries id, type and name, later pieces only arguments. */
static json_t *tool_calls_json(const cpm_oai_choice *ch, bool delta) {
    json_t *arr = json_array();
    for (int i = 0; i < ch->n_tool_calls; i++) {
        const cpm_oai_tool_call *t = &ch->tool_calls[i];
        json_t *fn = json_object(), *c = json_object();
        if (t->name)
            json_object_set_new(fn, "name", json_string(t->name));
        json_object_set_new(fn, "arguments", json_string(t->arguments ? t->arguments : ""));
        if (delta)
            json_object_set_new(c, "index", json_integer(t->index));
        if (t->id) {
            json_object_set_new(c, "id", json_string(t->id));
            json_object_set_new(c, "type", json_string("function"));
        }
        json_object_set_new(c, "function", fn);
        json_array_append_new(arr, c);
    }
    return arr;
}

/* A chat choice's message: content (null when there are tool calls and no text),
 * reasoning_content and tool_calls when there are some. */
static json_t *chat_message(const cpm_oai_choice *ch) {
    json_t *m = json_pack("{s:s}", "role", "assistant");
    bool null_content = ch->n_tool_calls > 0 && (!ch->text || ch->text_len == 0);
    json_object_set_new(m, "content", null_content ? json_null() : jstr(ch->text, ch->text_len));
    if (ch->reasoning && ch->reasoning_len)
        json_object_set_new(m, "reasoning_content", jstr(ch->reasoning, ch->reasoning_len));
    if (ch->n_tool_calls > 0)
        json_object_set_new(m, "tool_calls", tool_calls_json(ch, false));
    return m;
}

/* A chat chunk's delta: whatever of content, reasoning_content and tool_calls it has. */
static json_t *chat_delta(const cpm_oai_choice *ch) {
    json_t *delta = json_object();
    if (ch->reasoning && ch->reasoning_len)
        json_object_set_new(delta, "reasoning_content", jstr(ch->reasoning, ch->reasoning_len));
    /* the closing chunk of a chat choice has an empty delta */
    if (ch->text_len > 0 || (!ch->finish_reason && !ch->reasoning_len && !ch->n_tool_calls))
        json_object_set_new(delta, "content", jstr(ch->text, ch->text_len));
    if (ch->n_tool_calls > 0)
        json_object_set_new(delta, "tool_calls", tool_calls_json(ch, true));
    return delta;
}

char *cpm_oai_render_response(const cpm_oai_request *rq, const char *id, int64_t created,
                              const char *model, const cpm_oai_choice *choices, int n_choices,
                              const cpm_oai_usage *usage) {
    bool chat = rq->kind == CPM_OAI_CHAT;
    json_t *root = envelope(chat ? "chat.completion" : "text_completion", id, created, model);
    json_t *arr = json_array();
    for (int i = 0; i < n_choices; i++) {
        const cpm_oai_choice *ch = &choices[i];
        json_t *text = jstr(ch->text, ch->text_len);
        json_t *c = chat ? json_pack("{s:i, s:o, s:o, s:o}", "index", ch->index, "message",
                                     chat_message(ch), "logprobs", logprobs_of(rq, ch),
                                     "finish_reason", finish_of(ch))
                         : json_pack("{s:i, s:o, s:o, s:o}", "index", ch->index, "text", text,
                                     "logprobs", logprobs_of(rq, ch), "finish_reason",
                                     finish_of(ch));
        if (chat)
            json_decref(text);
        json_array_append_new(arr, with_ids(rq, c, ch));
    }
    json_object_set_new(root, "choices", arr);
    if (usage)
        json_object_set_new(root, "usage", usage_json(usage));
    return dump(root);
}

static char *sse(json_t *j) {
    char *body = dump(j);
    if (!body)
        return NULL;
    size_t n = strlen(body);
    char *out = malloc(n + 9);
    if (out) {
        memcpy(out, "data: ", 6);
        memcpy(out + 6, body, n);
        memcpy(out + 6 + n, "\n\n", 3);
    }
    free(body);
    return out;
}

char *cpm_oai_render_chunk(const cpm_oai_request *rq, cpm_oai_chunk_kind kind, const char *id,
                           int64_t created, const char *model, const cpm_oai_choice *choice,
                           const cpm_oai_usage *usage) {
    bool chat = rq->kind == CPM_OAI_CHAT;
    json_t *root = envelope(chat ? "chat.completion.chunk" : "text_completion", id, created,
                            model);
    json_t *arr = json_array();
    if (kind == CPM_OAI_CHUNK_ROLE) {
        json_array_append_new(arr, json_pack("{s:i, s:{s:s, s:s}, s:n, s:n}", "index",
                                             choice->index, "delta", "role", "assistant",
                                             "content", "", "logprobs", "finish_reason"));
    } else if (kind == CPM_OAI_CHUNK_CONTENT) {
        json_t *delta = chat ? chat_delta(choice) : json_object();
        json_t *c = chat ? json_pack("{s:i, s:o, s:o, s:o}", "index", choice->index, "delta",
                                     delta, "logprobs", logprobs_of(rq, choice), "finish_reason",
                                     finish_of(choice))
                         : json_pack("{s:i, s:o, s:o, s:o}", "index", choice->index, "text",
                                     jstr(choice->text, choice->text_len), "logprobs",
                                     logprobs_of(rq, choice), "finish_reason",
                                     finish_of(choice));
        if (!chat)
            json_decref(delta);
        json_array_append_new(arr, with_ids(rq, c, choice));
    }
    json_object_set_new(root, "choices", arr);
    /* with include_usage every chunk has "usage": null except the last one */
    if (kind == CPM_OAI_CHUNK_USAGE)
        json_object_set_new(root, "usage", usage_json(usage));
    else if (rq->include_usage)
        json_object_set_new(root, "usage", json_null());
    return sse(root);
}

/* One model object; max_model_len (the context length) once the stages told it. */
static json_t *model_object(const char *model, int64_t created, int max_model_len) {
    json_t *m = json_pack("{s:s, s:s, s:I, s:s}", "id", model, "object", "model", "created",
                          (json_int_t)created, "owned_by", "cpm-cluster");
    if (m && max_model_len > 0)
        json_object_set_new(m, "max_model_len", json_integer(max_model_len));
    return m;
}

char *cpm_oai_render_models(const char *model, int64_t created, int max_model_len) {
    return dump(json_pack("{s:s, s:[o]}", "object", "list", "data",
                          model_object(model, created, max_model_len)));
}

char *cpm_oai_render_model(const char *model, int64_t created, int max_model_len) {
    return dump(model_object(model, created, max_model_len));
}
