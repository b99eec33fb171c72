/* api_http.c - HTTP routes, OpenAI requests to jobs, and the HTTP answer sink. */
#include "api_http.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/cli.h"
#include "door.h"
#include "http.h"
#include "openai.h"
#include "tokclient.h"
#include "toolcall.h"

/* openai.c's constraint kinds travel as proto's (job.h, pipeline.c) unchanged. */
_Static_assert((int)CPM_OAI_CONSTRAINT_JSON_OBJECT ==
                   (int)CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT &&
               (int)CPM_OAI_CONSTRAINT_JSON_SCHEMA ==
                   (int)CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA &&
               (int)CPM_OAI_CONSTRAINT_TOOL_CALLS == (int)CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS,
               "constraint kinds");

struct cpm_api_http {
    const cpm_front_ctx *ctx;
    cpm_http_server *http;
    cpm_door *door;         /* API keys and CORS */
    cpm_oai_limits lim;
    void (*done)(void *ud); /* closing */
    void *done_ud;
};

/* The answer side of one HTTP job. */
typedef struct http_answer {
    cpm_api_http *api;
    cpm_http_conn *conn;
    cpm_oai_request *rq;
    bool streaming; /* the 200 and SSE headers are out */
    cpm_toolcall **tc; /* per gen, when the answer is parsed for tool calls; else NULL */
    int n_tc;
} http_answer;

static http_answer *answer_of(const cpm_job *j) {
    return j->sink_ud;
}

static void respond_json(cpm_http_conn *c, int status, const char *json) {
    cpm_http_respond(c, status, "application/json", json, strlen(json), NULL);
}

/* An error response before anything was sent (openai.c shapes the body). */
static void respond_error(cpm_http_conn *c, int status, const char *type, const char *code,
                          const char *param, const char *msg) {
    cpm_oai_error e;
    cpm_oai_fail(&e, CPM_EINVAL, status, type, code, param, "%s", msg);
    char *json = cpm_oai_error_json(&e);
    respond_json(c, status, json ? json : "{}");
    free(json);
}

static void stream_send(http_answer *a, char *chunk) {
    if (chunk)
        cpm_http_stream_write(a->conn, chunk, strlen(chunk));
    free(chunk);
}

/* ---- logprob views ---------------------------------------------------------------------- */

/* A token as OpenAI shows it in logprobs: its text in context (fetched from the
 * tokenizer), or its id when there is no text (as vLLM names unknown tokens). */
static char *piece_text(const char *text, int32_t id) {
    if (text)
        return strdup(text);
    char tmp[32];
    snprintf(tmp, sizeof tmp, "token_id:%d", id);
    return strdup(tmp);
}

/* The logprob view of tokens [from, to) of g (strings freed by lp_views_free). */
static cpm_oai_logprob *lp_views(const cpm_gen *g, int from, int to) {
    int n = to - from;
    cpm_oai_logprob *v = calloc((size_t)(n > 0 ? n : 1), sizeof *v);
    for (int i = 0; v && i < n; i++) {
        const cpm_tok_lp *t = &g->lps[from + i];
        v[i].token = piece_text(t->text, t->id);
        v[i].logprob = t->lp;
        v[i].n_top = t->n_top;
        const char **tt = calloc((size_t)t->n_top + 1, sizeof *tt);
        for (int k = 0; tt && k < t->n_top; k++)
            tt[k] = piece_text(t->top_text[k], t->top_ids[k]);
        v[i].top_tokens = (const char *const *)tt;
        v[i].top_logprobs = t->top_lps;
        if (!v[i].token || !tt)
            v[i].n_top = 0;
    }
    return v;
}

static void lp_views_free(cpm_oai_logprob *v, int n) {
    for (int i = 0; v && i < n; i++) {
        for (int k = 0; v[i].top_tokens && k < v[i].n_top; k++)
            free((char *)v[i].top_tokens[k]);
        free((void *)v[i].top_tokens);
        free((char *)v[i].token);
    }
    free(v);
}

/* ---- the sink --------------------------------------------------------------------------- */

static void sink_begin(cpm_job *j) {
    http_answer *a = answer_of(j);
    if (!j->stream)
        return;
    a->streaming = true;
    cpm_http_stream_start(a->conn, 200, "text/event-stream",
                          "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
    if (a->rq->kind != CPM_OAI_CHAT)
        return;
    for (int i = 0; i < j->n_gens; i++) {
        cpm_oai_choice ch = {.index = i};
        stream_send(a, cpm_oai_render_chunk(a->rq, CPM_OAI_CHUNK_ROLE, j->id, j->created,
                                            a->api->ctx->model_name, &ch, NULL));
    }
}

/* What one SSE chunk of a chat choice shows besides its ids and logprobs. */
typedef struct chunk_parts {
    const char *text, *reasoning;
    size_t text_len, reasoning_len;
    int n_calls;
    const cpm_oai_tool_call *calls;
} chunk_parts;

/* An SSE chunk with new parts of g and the ids [n_emitted_ids, upto) (with their
 * logprobs, as far as their texts are known): a chunk carries the ids its text came
 * from. Nothing is sent when a client could see nothing. */
static void stream_chunk(cpm_gen *g, const chunk_parts *pt, const char *finish, int upto) {
    cpm_job *j = g->job;
    http_answer *a = answer_of(j);
    int lp_upto = upto < g->n_lp_ready ? upto : g->n_lp_ready;
    int n_lp = j->logprobs && lp_upto > g->n_emitted_lps ? lp_upto - g->n_emitted_lps : 0;
    int n_ids = upto > g->n_emitted_ids ? upto - g->n_emitted_ids : 0;
    bool want_ids = a->rq->return_token_ids && n_ids > 0;
    if (pt->text_len == 0 && pt->reasoning_len == 0 && pt->n_calls == 0 && !finish && n_lp == 0 &&
        !want_ids)
        return;
    cpm_oai_logprob *lv = n_lp > 0 ? lp_views(g, g->n_emitted_lps, lp_upto) : NULL;
    cpm_oai_choice ch = {.index = g->index, .text = pt->text, .text_len = pt->text_len,
                         .reasoning = pt->reasoning, .reasoning_len = pt->reasoning_len,
                         .n_tool_calls = pt->n_calls, .tool_calls = pt->calls,
                         .finish_reason = finish, .n_logprobs = lv ? n_lp : 0, .logprobs = lv,
                         .n_token_ids = n_ids, .token_ids = g->ids + g->n_emitted_ids};
    stream_send(a, cpm_oai_render_chunk(a->rq, CPM_OAI_CHUNK_CONTENT, j->id, j->created,
                                        a->api->ctx->model_name, &ch, NULL));
    lp_views_free(lv, n_lp);
    g->n_emitted_lps += n_lp;
    g->n_emitted_ids += n_ids;
}

/* "tool_calls" once the parser found calls, else the gen's own reason. */
static const char *finish_of_parsed(const cpm_toolcall *tc, const char *finish) {
    return finish && tc && cpm_toolcall_count(tc) > 0 ? "tool_calls" : finish;
}

/* Calls [d->call_from, d->call_to) of tc as OpenAI tool calls (each whole). */
static cpm_oai_tool_call *calls_of(const cpm_toolcall *tc, int from, int to) {
    cpm_oai_tool_call *c = calloc((size_t)(to > from ? to - from : 1), sizeof *c);
    for (int i = from; c && i < to; i++) {
        const cpm_toolcall_call *t = cpm_toolcall_get(tc, i);
        c[i - from] = (cpm_oai_tool_call){i, t->id, t->name, t->arguments};
    }
    return c;
}

/* A parser's decision as one chunk. */
static void stream_parsed(cpm_gen *g, const cpm_toolcall *tc, const cpm_toolcall_delta *d,
                          const char *finish, int upto) {
    cpm_oai_tool_call *calls = calls_of(tc, d->call_from, d->call_to);
    chunk_parts pt = {d->content, d->reasoning, d->content_len, d->reasoning_len,
                      calls ? d->call_to - d->call_from : 0, calls};
    const char *fin = finish_of_parsed(tc, finish);
    if (fin && fin != finish)
        cpm_gen_found_tool_calls(g);
    stream_chunk(g, &pt, fin, upto);
    free(calls);
}

/* Notes in the log that a choice's call block was given back as text. */
static void log_rejected(const cpm_job *j, const cpm_gen *g, const cpm_toolcall *tc) {
    int n = cpm_toolcall_rejected(tc);
    if (n > 0)
        cpm_log_write(answer_of(j)->api->ctx->log, CPM_LOG_WARN, j->id,
                      "choice %d: %d tool-call block(s) did not parse (unknown function or not "
                      "Python keyword literals): returned as content", g->index, n);
}

/* New text of g. Streaming: as chunks (through the tool-call parser when the request has
 * tools); otherwise kept for the final answer. */
static void sink_delta(cpm_gen *g, const char *text, size_t len, const char *finish, int upto) {
    cpm_job *j = g->job;
    http_answer *a = answer_of(j);
    if (!a->streaming) {
        if (len)
            cpm_strbuf_add(&g->text, text, len);
        return;
    }
    cpm_toolcall *tc = a->tc && g->index < a->n_tc ? a->tc[g->index] : NULL;
    if (!tc) {
        chunk_parts pt = {.text = text, .text_len = len};
        stream_chunk(g, &pt, finish, upto);
        return;
    }
    cpm_toolcall_delta d;
    cpm_toolcall_feed(tc, text, len, &d);
    stream_parsed(g, tc, &d, NULL, upto);
    if (!finish)
        return;
    cpm_toolcall_finish(tc, &d);
    stream_parsed(g, tc, &d, finish, upto);
    log_rejected(j, g, tc);
}

static cpm_oai_usage usage_of(const cpm_job *j) {
    cpm_oai_usage u = {0};
    cpm_job_usage(j, &u.prompt_tokens, &u.completion_tokens);
    for (int p = 0; p < j->n_prompts; p++) { /* each prompt counted once, as prompt_tokens are */
        int most = 0;
        for (int i = 0; i < j->n_gens; i++)
            if (j->gens[i].prompt == p && j->gens[i].cached_tokens > most)
                most = j->gens[i].cached_tokens;
        u.cached_tokens += most;
    }
    return u;
}

/* A non-streamed choice through its tool-call parser: content, reasoning and calls
 * into *ch (borrowing the parser's strings); the calls array is the caller's. */
static cpm_oai_tool_call *parse_whole(const cpm_job *j, cpm_gen *g, cpm_toolcall *tc,
                                      cpm_oai_choice *ch) {
    cpm_toolcall_delta d;
    cpm_toolcall_whole(tc, g->text.p ? g->text.p : "", g->text.len, &d);
    ch->text = d.content;
    ch->text_len = d.content_len;
    ch->reasoning = d.reasoning;
    ch->reasoning_len = d.reasoning_len;
    ch->finish_reason = finish_of_parsed(tc, g->finish);
    if (ch->finish_reason && ch->finish_reason != g->finish)
        cpm_gen_found_tool_calls(g);
    cpm_oai_tool_call *calls = calls_of(tc, 0, cpm_toolcall_count(tc));
    ch->n_tool_calls = calls ? cpm_toolcall_count(tc) : 0;
    ch->tool_calls = calls;
    log_rejected(j, g, tc);
    return calls;
}

/* The whole answer as one JSON response. */
static void note_answer(http_answer *a, const cpm_job *j, const char *outcome);

static void respond_whole(cpm_job *j, const cpm_oai_usage *u) {
    http_answer *a = answer_of(j);
    cpm_oai_choice *ch = calloc((size_t)j->n_gens, sizeof *ch);
    cpm_oai_logprob **lv = calloc((size_t)j->n_gens, sizeof *lv);
    char *json = NULL;
    cpm_oai_tool_call **calls = calloc((size_t)j->n_gens, sizeof *calls);
    for (int i = 0; ch && lv && calls && i < j->n_gens; i++) {
        cpm_gen *g = &j->gens[i];
        lv[i] = j->logprobs ? lp_views(g, 0, g->n_gen) : NULL;
        ch[i] = (cpm_oai_choice){.index = g->index, .text = g->text.p ? g->text.p : "",
                                 .text_len = g->text.len, .finish_reason = g->finish,
                                 .n_logprobs = lv[i] ? g->n_gen : 0, .logprobs = lv[i],
                                 .n_token_ids = g->n_gen, .token_ids = g->ids};
        if (a->tc && i < a->n_tc && a->tc[i])
            calls[i] = parse_whole(j, g, a->tc[i], &ch[i]);
    }
    if (ch && lv && calls)
        json = cpm_oai_render_response(a->rq, j->id, j->created, a->api->ctx->model_name, ch,
                                       j->n_gens, u);
    for (int i = 0; lv && i < j->n_gens; i++)
        lp_views_free(lv[i], lv[i] ? j->gens[i].n_gen : 0);
    for (int i = 0; calls && i < j->n_gens; i++)
        free(calls[i]);
    free(calls);
    free(lv);
    free(ch);
    note_answer(a, j, NULL); /* after the parse: it may say "tool_calls" */
    if (json)
        respond_json(a->conn, 200, json);
    else
        respond_error(a->conn, 500, "server_error", NULL, NULL, "out of memory");
    free(json);
}

/* The context length, once the stages have told it (0 before). */
static int max_model_len(const cpm_front_ctx *ctx) {
    const cpm_model_facts *mf = cpm_pipeline_model(ctx->pipeline);
    return mf ? mf->max_position : 0;
}

/* A JSON string from the tokenizer's text (made valid UTF-8). */
static json_t *jstr_of(const char *s) {
    size_t n;
    char *clean = cpm_oai_utf8_clean(s, strlen(s), &n);
    json_t *j = clean ? json_stringn(clean, n) : NULL;
    free(clean);
    return j ? j : json_string("");
}

/* POST /tokenize's answer (vLLM's shape), with "prompt" for a chat. */
static void respond_tokens(http_answer *a, const cpm_job *j) {
    json_t *ids = json_array();
    for (int i = 0; ids && i < j->prompt_len[0]; i++)
        json_array_append_new(ids, json_integer(j->prompt_ids[0][i]));
    json_t *o = json_pack("{s:i, s:i, s:o}", "count", j->prompt_len[0], "max_model_len",
                          max_model_len(a->api->ctx), "tokens", ids);
    if (o && j->rendered) /* a chat: the prompt the template made (tools included) */
        json_object_set_new(o, "prompt", jstr_of(j->rendered));
    char *json = o ? json_dumps(o, JSON_COMPACT) : NULL;
    respond_json(a->conn, json ? 200 : 500, json ? json : "{}");
    free(json);
    json_decref(o);
}

/* What the access log says of a job's answer (request id, tokens, time to first token,
 * finish reason): the exchange's note, logged when it ends (on_exchange_done). */
static void note_answer(http_answer *a, const cpm_job *j, const char *outcome) {
    if (!outcome && a->tc && a->n_tc > 0 && a->tc[0] && cpm_toolcall_count(a->tc[0]) > 0)
        outcome = "tool_calls"; /* what the answer says, not the gen's own "stop" */
    char note[256];
    cpm_job_access_note(j, outcome, note, sizeof note);
    cpm_http_conn_set_note(a->conn, note);
}

static void sink_done(cpm_job *j) {
    http_answer *a = answer_of(j);
    if (j->tokenize_only) {
        note_answer(a, j, NULL);
        respond_tokens(a, j);
        return;
    }
    cpm_oai_usage u = usage_of(j);
    if (!a->streaming) {
        respond_whole(j, &u);
        return;
    }
    note_answer(a, j, NULL);
    if (a->rq->include_usage)
        stream_send(a, cpm_oai_render_chunk(a->rq, CPM_OAI_CHUNK_USAGE, j->id, j->created,
                                            a->api->ctx->model_name, NULL, &u));
    cpm_http_stream_write(a->conn, CPM_OAI_SSE_DONE, strlen(CPM_OAI_SSE_DONE));
    cpm_http_stream_end(a->conn);
}

static void sink_fail(cpm_job *j, const cpm_job_error *e) {
    http_answer *a = answer_of(j);
    note_answer(a, j, "error");
    if (!a->streaming) {
        respond_error(a->conn, e->status, e->type, e->code, NULL, e->msg);
        return;
    }
    /* the 200 is gone: report in-band, then end the stream as OpenAI does */
    char *json = cpm_oai_error_body(e->status, e->type, e->code, e->msg);
    cpm_strbuf b = {0};
    if (json) {
        cpm_strbuf_add(&b, "data: ", 6);
        cpm_strbuf_add(&b, json, strlen(json));
        cpm_strbuf_add(&b, "\n\n", 2);
        if (b.p)
            cpm_http_stream_write(a->conn, b.p, b.len);
    }
    free(b.p);
    free(json);
    cpm_http_stream_write(a->conn, CPM_OAI_SSE_DONE, strlen(CPM_OAI_SSE_DONE));
    cpm_http_stream_end(a->conn);
}

/* Nobody is listening, but the exchange must end. */
static void sink_cancelled(cpm_job *j) {
    http_answer *a = answer_of(j);
    note_answer(a, j, "abort");
    if (a->streaming)
        cpm_http_stream_end(a->conn);
    else
        cpm_http_respond(a->conn, 499, "application/json", "{}", 2, NULL);
}

static void sink_free(void *ud) {
    http_answer *a = ud;
    for (int i = 0; i < a->n_tc; i++)
        cpm_toolcall_free(a->tc[i]);
    free(a->tc);
    cpm_oai_request_free(a->rq);
    free(a);
}

static const cpm_job_sink http_sink = {sink_begin, sink_delta, sink_done,
                                       sink_fail,  sink_cancelled, sink_free};

/* ---- generate requests ------------------------------------------------------------------ */

static void on_abort(void *ud) {
    cpm_job *j = ud;
    cpm_pipeline *p = answer_of(j)->api->ctx->pipeline; /* j may be freed below */
    cpm_job_cancel(j);
    cpm_pipeline_pump(p);
}

static void copy_sampling(Cpm__V1__SamplingParams *p, const cpm_oai_request *rq) {
    cpm__v1__sampling_params__init(p);
    p->temperature = rq->temperature;
    p->top_p = rq->top_p;
    p->top_k = (uint32_t)rq->top_k;
    p->min_p = rq->min_p;
    p->repetition_penalty = rq->repetition_penalty;
    p->presence_penalty = rq->presence_penalty;
    p->frequency_penalty = rq->frequency_penalty;
    p->logprobs = rq->logprobs;
    p->n_logprobs = (uint32_t)rq->top_logprobs;
    p->min_tokens = (uint32_t)rq->min_tokens;
}

/* The request's prompts into j: token ids as they are, text and chats for the
 * tokenizer. CPM_ENOMEM. */
static int take_prompts(cpm_job *j, const cpm_oai_request *rq) {
    if (rq->kind == CPM_OAI_CHAT) {
        if (!(j->chat = calloc((size_t)rq->n_messages + 1, sizeof *j->chat)))
            return CPM_ENOMEM;
        for (int i = 0; i < rq->n_messages; i++) {
            const cpm_oai_message *m = &rq->messages[i];
            j->chat[i] = (cpm_tokc_msg){m->role, m->content, m->tool_calls_json, m->thought,
                                        m->tool_call_id};
        }
        j->n_chat = rq->n_messages;
        j->tools_json = rq->tools_json;
        return 0;
    }
    for (int p = 0; p < j->n_prompts; p++) {
        const cpm_oai_prompt *pr = &rq->prompts[p];
        if (!pr->ids) {
            j->prompt_text[p] = pr->text;
            continue;
        }
        if (!(j->prompt_ids[p] = malloc((size_t)(pr->n_ids ? pr->n_ids : 1) * sizeof(int32_t))))
            return CPM_ENOMEM;
        memcpy(j->prompt_ids[p], pr->ids, (size_t)pr->n_ids * sizeof(int32_t));
        j->prompt_len[p] = pr->n_ids;
    }
    return 0;
}

/* The client's X-Request-Id, when it is one line of at most 128 visible characters. */
static const char *client_request_id(const cpm_http_request *r) {
    const char *id = r ? cpm_http_request_header(r, "X-Request-Id") : NULL;
    if (!id || !*id || strlen(id) > 128)
        return NULL;
    for (const char *p = id; *p; p++)
        if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e)
            return NULL;
    return id;
}

/* One tool-call parser per choice. Call ids are "call_" and 16 hex digits drawn from the
 * clock and the job (as default seeds are), then the call's index. CPM_ENOMEM. */
static int make_parsers(http_answer *a, cpm_job *j) {
    if (!(a->tc = calloc((size_t)(j->n_gens ? j->n_gens : 1), sizeof *a->tc)))
        return CPM_ENOMEM;
    a->n_tc = j->n_gens;
    for (int i = 0; i < j->n_gens; i++) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "call_%016" PRIx64, cpm_job_default_seed(j, i + 1000));
        a->tc[i] = cpm_toolcall_new((const char *const *)a->rq->tool_names, a->rq->n_tools, prefix);
        if (!a->tc[i])
            return CPM_ENOMEM;
    }
    return 0;
}

/* A job for rq (owned by it from now on), answering on c. */
static void start_job(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req,
                      cpm_oai_request *rq, int ep, bool tokenize_only) {
    const cpm_front_ctx *ctx = api->ctx;
    http_answer *a = calloc(1, sizeof *a);
    cpm_job *j = a ? cpm_job_new(ctx->jobs, ep, ep == CPM_EP_CHAT ? "chatcmpl" : "cmpl",
                                 &http_sink, a) : NULL;
    if (!j) {
        free(a);
        cpm_oai_request_free(rq);
        respond_error(c, 500, "server_error", NULL, NULL, "out of memory");
        return;
    }
    *a = (http_answer){.api = api, .conn = c, .rq = rq};
    const char *xid = client_request_id(req);
    if (xid) /* echoed by response_head */
        cpm_log_write(ctx->log, CPM_LOG_INFO, j->id, "X-Request-Id %s", xid);
    else /* the client gets the id every log line about the request carries */
        cpm_http_conn_add_header(c, "X-Request-Id", j->id);
    if (rq->ignored[0])
        cpm_log_write(ctx->log, CPM_LOG_INFO, j->id, "ignored unknown request fields: %s",
                      rq->ignored);
    j->tokenize_only = tokenize_only;
    j->stream = rq->stream && !tokenize_only;
    j->logprobs = rq->logprobs;
    j->top_logprobs = rq->top_logprobs;
    j->ignore_eos = rq->ignore_eos;
    j->skip_special = !rq->keep_special;
    j->include_stop_str = rq->include_stop_str;
    j->want_text = ctx->admit->use_tok;
    j->max_tokens = rq->max_tokens;
    j->stops = rq->stop;
    j->n_stops = rq->n_stop;
    j->constraint_kind = (int)rq->constraint_kind;
    j->constraint_schema = rq->constraint_schema;
    j->constraint_single = rq->constraint_single;
    cpm_http_conn_set_abort_cb(c, on_abort, j);
    int n_prompts = rq->kind == CPM_OAI_CHAT || tokenize_only ? 1 : rq->n_prompts;
    if (cpm_job_init_gens(j, n_prompts, tokenize_only ? 0 : rq->n) || take_prompts(j, rq)) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    if (rq->parse_tool_calls && !tokenize_only && make_parsers(a, j)) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    for (int i = 0; i < j->n_gens; i++) {
        copy_sampling(&j->gens[i].params, rq);
        j->gens[i].params.seed = rq->has_seed ? rq->seed + (uint64_t)i : cpm_job_default_seed(j, i);
    }
    j->model_defaults = (rq->given & CPM_OAI_GIVEN_TEMPERATURE ? 0 : CPM_JOB_DEFAULT_TEMPERATURE) |
                        (rq->given & CPM_OAI_GIVEN_TOP_P ? 0 : CPM_JOB_DEFAULT_TOP_P) |
                        (rq->given & CPM_OAI_GIVEN_TOP_K ? 0 : CPM_JOB_DEFAULT_TOP_K) |
                        (rq->given & CPM_OAI_GIVEN_REPETITION_PENALTY ? 0
                                                                      : CPM_JOB_DEFAULT_REPETITION_PENALTY);
    if (cpm_job_set_bias(j, rq->bias_ids, rq->bias, rq->n_bias) ||
        cpm_job_set_stop_ids(j, rq->stop_ids, rq->n_stop_ids)) {
        cpm_job_fail(j, 500, "server_error", NULL, "out of memory");
        return;
    }
    cpm_admit_job(ctx->admit, j);
}

static void on_generate(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req,
                        cpm_oai_kind kind, bool tokenize_only) {
    const cpm_front_ctx *ctx = api->ctx;
    int ep = tokenize_only ? CPM_EP_OTHER : kind == CPM_OAI_CHAT ? CPM_EP_CHAT : CPM_EP_COMPLETIONS;
    cpm_oai_request *rq;
    cpm_oai_error oe;
    const char *code, *why;
    if (cpm_oai_parse(kind, req->body, req->body_len, &api->lim, &rq, &oe)) {
        char *json = cpm_oai_error_json(&oe);
        respond_json(c, oe.http_status, json ? json : "{}");
        free(json);
        ctx->metrics->requests[ep][CPM_OUT_REJECTED]++;
    } else if (rq->model && rq->model[0] && strcmp(rq->model, ctx->model_name) != 0) {
        char msg[2 * CPM_CFG_STR + 96];
        snprintf(msg, sizeof msg, "The model `%.200s` does not exist; this server has `%s`",
                 rq->model, ctx->model_name);
        respond_error(c, 404, "invalid_request_error", "model_not_found", "model", msg);
        cpm_oai_request_free(rq);
        ctx->metrics->requests[ep][CPM_OUT_REJECTED]++;
    } else if (!cpm_admit_open(ctx->admit, &code, &why)) {
        respond_error(c, 503, "service_unavailable_error", code, NULL, why);
        cpm_oai_request_free(rq);
        ctx->metrics->requests[ep][CPM_OUT_OVERLOAD]++;
    } else {
        start_job(api, c, req, rq, ep, tokenize_only);
    }
}

static void on_completions(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    on_generate(api, c, req, CPM_OAI_COMPLETION, false);
}

/* POST /tokenize (vLLM's): {"prompt": "..."} or {"messages": [...]} (the chat template
 * applied, with "tools" as in a chat request) -> {"count", "max_model_len", "tokens"} and, for a
 * chat, "prompt" (the rendered text); through admission's tokenizer calls. */
static void on_tokenize(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    json_t *root = json_loadb(req->body, req->body_len, 0, NULL);
    bool chat = json_is_object(root) && json_object_get(root, "messages");
    json_decref(root);
    on_generate(api, c, req, chat ? CPM_OAI_CHAT : CPM_OAI_COMPLETION, true);
}

/* ---- POST /detokenize (vLLM): {"tokens": [ids]} -> {"prompt": text} -------------------------- */

#define DETOK_MAX_IDS (1 << 20)

/* The tokenizer's answer: the text of every id, special tokens spelled out (as vLLM's
 * tokenizer.decode); ids that end inside a UTF-8 character add U+FFFD, as HF does. */
typedef struct detok_call {
    cpm_http_conn *c; /* stays valid until the exchange is answered, client gone or not */
    size_t n;         /* ids sent */
} detok_call;

static void on_detok_answer(void *user, const cpm_tokc_result *res) {
    detok_call call = *(detok_call *)user;
    cpm_http_conn *c = call.c;
    free(user);
    if (res->status) {
        respond_error(c, res->refused ? 400 : 503, res->refused ? "invalid_request_error"
                      : "server_error", NULL, NULL, res->msg ? res->msg : "tokenizer failed");
        return;
    }
    json_t *o = json_object();
    char *text = malloc(res->text_len + 4);
    if (text) {
        memcpy(text, res->text, res->text_len);
        size_t len = res->text_len;
        if (res->consumed < call.n)
            memcpy(text + len, "\xEF\xBF\xBD", 3), len += 3;
        json_object_set_new(o, "prompt", json_stringn(text, len));
    }
    char *json = text ? json_dumps(o, JSON_COMPACT) : NULL;
    if (json)
        respond_json(c, 200, json);
    else
        respond_error(c, 500, "server_error", NULL, NULL, "out of memory");
    free(json);
    free(text);
    json_decref(o);
}

static void on_detokenize(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    const cpm_front_ctx *ctx = api->ctx;
    const cpm_model_facts *mf = cpm_pipeline_model(ctx->pipeline);
    json_error_t jerr;
    json_t *root = json_loadb(req->body, req->body_len, 0, &jerr);
    json_t *tokens = json_is_object(root) ? json_object_get(root, "tokens") : NULL;
    size_t n = json_array_size(tokens);
    int32_t *ids = n && n <= DETOK_MAX_IDS ? malloc(n * sizeof *ids) : NULL;
    const char *bad = !root ? "request body is not valid JSON"
                    : !json_is_array(tokens) ? "'tokens' must be an array of token ids"
                    : n == 0 ? "'tokens' is empty"
                    : n > DETOK_MAX_IDS ? "'tokens' holds too many ids" : NULL;
    for (size_t i = 0; !bad && ids && i < n; i++) {
        json_t *v = json_array_get(tokens, i);
        json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
        if (id < 0 || (mf && id >= mf->vocab_size))
            bad = "'tokens' holds an id outside the vocabulary";
        else
            ids[i] = (int32_t)id;
    }
    json_decref(root);
    cpm_svc *tk = ctx->admit->use_tok ? cpm_health_tokenizer(ctx->health) : NULL;
    detok_call *call = malloc(sizeof *call);
    cpm_error e = {0};
    if (bad)
        respond_error(c, 400, "invalid_request_error", NULL, "tokens", bad);
    else if (!ids || !call)
        respond_error(c, 500, "server_error", NULL, NULL, "out of memory");
    else if (!tk)
        respond_error(c, 400, "invalid_request_error", NULL, NULL,
                      "this cluster has no tokenizer (router.tokenize: off)");
    else {
        *call = (detok_call){c, n};
        if (cpm_tokc_detok(tk->sock, tk->name, ids, n, 0, false, ctx->cfg->router.timeout_ms,
                           on_detok_answer, call, &e) == 0)
            call = NULL; /* the answer callback owns it now */
        else
            respond_error(c, 503, "server_error", NULL, NULL, e.msg);
    }
    free(call);
    free(ids);
}

static void on_chat(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    on_generate(api, c, req, CPM_OAI_CHAT, false);
}

/* ---- status endpoints ----------------------------------------------------------------------- */

static void on_health(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)api, (void)req;
    respond_json(c, 200, "{\"status\":\"ok\"}");
}

/* Names and statuses are ours or short service strings; quotes and controls are dropped. */
static void add_service(cpm_strbuf *b, const cpm_svc *sv, bool first) {
    char status[96], tmp[256];
    size_t k = 0;
    for (const char *p = sv->status; *p && k < sizeof status - 1; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            status[k++] = *p;
    status[k] = '\0';
    snprintf(tmp, sizeof tmp, "%s{\"name\":\"%s\",\"ready\":%s,\"status\":\"%s\"}",
             first ? "" : ",", sv->name, sv->ready ? "true" : "false", status);
    cpm_strbuf_add(b, tmp, strlen(tmp));
}

static void on_ready(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    const cpm_front_ctx *ctx = api->ctx;
    cpm_strbuf b = {0};
    bool ready = cpm_admit_ready(ctx->admit);
    char tmp[128];
    snprintf(tmp, sizeof tmp, "{\"ready\":%s,\"model\":%s,\"services\":[",
             ready ? "true" : "false", cpm_pipeline_model(ctx->pipeline) ? "true" : "false");
    cpm_strbuf_add(&b, tmp, strlen(tmp));
    int n;
    const cpm_svc *svcs = cpm_health_services(ctx->health, &n);
    for (int i = 0; i < n; i++)
        add_service(&b, &svcs[i], i == 0);
    cpm_strbuf_add(&b, "]}", 2);
    respond_json(c, b.p ? (ready ? 200 : 503) : 500, b.p ? b.p : "{}");
    free(b.p);
}

static void on_models(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    char *json = cpm_oai_render_models(api->ctx->model_name, 0, max_model_len(api->ctx));
    respond_json(c, json ? 200 : 500, json ? json : "{}");
    free(json);
}

/* GET /v1/models/{id}: this server's one model, or 404 in OpenAI's shape. */
static void on_model(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    const char *id = req->path + strlen("/v1/models/");
    if (strcmp(id, api->ctx->model_name) != 0) {
        char msg[2 * CPM_CFG_STR + 96];
        snprintf(msg, sizeof msg, "The model `%.200s` does not exist; this server has `%s`", id,
                 api->ctx->model_name);
        respond_error(c, 404, "invalid_request_error", "model_not_found", "model", msg);
        return;
    }
    char *json = cpm_oai_render_model(api->ctx->model_name, 0, max_model_len(api->ctx));
    respond_json(c, json ? 200 : 500, json ? json : "{}");
    free(json);
}

static void on_version(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)api, (void)req;
    char json[128];
    snprintf(json, sizeof json, "{\"version\":\"%s\"}", cpm_cli_version());
    respond_json(c, 200, json);
}

static void on_metrics(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)req;
    const cpm_front_ctx *ctx = api->ctx;
    cpm_metrics_gauges g = {.ready = cpm_admit_ready(ctx->admit),
                            .http_connections = cpm_http_server_connections(api->http)};
    cpm_sched_stats st;
    cpm_pipeline_stats(ctx->pipeline, &st);
    g.queue_depth = st.queued;
    g.running = st.live;
    g.inflight = st.inflight;
    g.kv_reserved = st.kv_reserved;
    g.kv_budget = st.kv_tokens;
    g.prefix_asked = st.prefix_blocks_asked * 16;
    g.prefix_reused = st.prefix_blocks_reused * 16;
    cpm_health_kv(ctx->health, &g.kv_used_blocks, &g.kv_total_blocks);
    g.model_name = ctx->model_name;
    int n;
    const cpm_svc *svcs = cpm_health_services(ctx->health, &n);
    cpm_metrics_service *ms = calloc((size_t)(n > 0 ? n : 1), sizeof *ms);
    char (*kinds)[32] = calloc((size_t)(n > 0 ? n : 1), sizeof *kinds);
    for (int i = 0; ms && kinds && i < n; i++) {
        snprintf(kinds[i], sizeof kinds[i], "%.*s", (int)strcspn(svcs[i].name, "0123456789."),
                 svcs[i].name); /* "stage0.tp1" -> "stage" */
        ms[i] = (cpm_metrics_service){svcs[i].name, kinds[i], svcs[i].ready, svcs[i].poll_s};
    }
    g.services = ms && kinds ? ms : NULL;
    g.n_services = ms && kinds ? n : 0;
    size_t len;
    char *text = cpm_metrics_render(ctx->metrics, &g, &len);
    free(ms);
    free(kinds);
    if (text)
        cpm_http_respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, NULL);
    else
        respond_json(c, 500, "{}");
    free(text);
}

/* The web chat page (router/web/index.html, compiled in by router/web/embed.py). It holds
 * no secret, so it is served without a key; what it calls is not. Inline script and
 * style only from this page, requests only to this server. */
extern const unsigned char cpm_web_index[];
extern const unsigned long cpm_web_index_len;

static void on_page(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req) {
    (void)api, (void)req;
    cpm_http_respond(c, 200, "text/html; charset=utf-8", (const char *)cpm_web_index, cpm_web_index_len,
                     "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                     "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                     "base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n"
                     "X-Content-Type-Options: nosniff\r\nCache-Control: no-cache\r\n");
}

/* ---- routing ----------------------------------------------------------------------------- */

typedef void (*route_fn)(cpm_api_http *api, cpm_http_conn *c, const cpm_http_request *req);

static const struct route {
    const char *method, *path;
    route_fn fn;
} routes[] = {
    {"POST", "/v1/completions", on_completions},
    {"POST", "/v1/chat/completions", on_chat},
    {"POST", "/tokenize", on_tokenize},
    {"POST", "/detokenize", on_detokenize},
    {"GET", "/v1/models", on_models},
    {"GET", "/health", on_health},
    {"GET", "/live", on_health},
    {"GET", "/ready", on_ready},
    {"GET", "/metrics", on_metrics},
    {"GET", "/version", on_version},
    {"GET", "/", on_page},
    {"GET", "/index.html", on_page},
};

/* Routes that take the rest of the path as a parameter. */
static const struct route prefix_routes[] = {
    {"GET", "/v1/models/", on_model},
};

/* 401 in OpenAI's shape, with the challenge RFC 6750 asks for. */
static void refuse_key(cpm_http_conn *c, const cpm_http_request *req) {
    bool given = cpm_http_request_header(req, "Authorization") != NULL;
    cpm_oai_error e;
    cpm_oai_fail(&e, CPM_EINVAL, 401, "invalid_request_error", "invalid_api_key", NULL, "%s",
                 given ? "Incorrect API key provided" : "No API key provided: send "
                 "Authorization: Bearer KEY");
    char *json = cpm_oai_error_json(&e);
    const char *body = json ? json : "{}";
    cpm_http_respond(c, 401, "application/json", body, strlen(body), "WWW-Authenticate: Bearer\r\n");
    free(json);
}

/* Header lines of every response (http.c calls this for each head it writes): CORS, and
 * the client's X-Request-Id echoed back so it can match answers and logs. */
static void response_head(void *ud, const cpm_http_request *r, char *out, size_t size) {
    cpm_api_http *api = ud;
    cpm_door_cors(api->door, r, r && !strcmp(r->method, "OPTIONS"), out, size);
    const char *id = client_request_id(r);
    size_t used = strlen(out);
    if (id && used < size)
        snprintf(out + used, size - used, "X-Request-Id: %s\r\n", id);
}

/* The access log: one line per exchange, whatever its end (answer, refusal, client gone:
 * status 0). A job's answer adds its note (note_answer). */
static void on_exchange_done(void *ud, const cpm_http_exchange *x) {
    cpm_api_http *api = ud;
    const char *xid = client_request_id(x->req);
    char kv[640];
    snprintf(kv, sizeof kv, "method=%s path=%.128s status=%d client=%s duration_ms=%.1f%s%s%s%s",
             x->req ? x->req->method : "-", x->req ? x->req->path : "-", x->status, x->client,
             x->seconds * 1e3, x->note[0] ? " " : "", x->note, xid ? " x_request_id=" : "",
             xid ? xid : "");
    for (char *p = kv; *p; p++) /* a path's odd bytes must not break the fields */
        if ((unsigned char)*p < 0x21 && *p != ' ')
            *p = '?';
    cpm_log_kv(api->ctx->log, CPM_LOG_INFO, NULL, "access", kv);
}

static void on_request(void *ud, cpm_http_conn *c, const cpm_http_request *req) {
    cpm_api_http *api = ud;
    if (!strcmp(req->method, "OPTIONS")) { /* a CORS preflight: the head carries the answer */
        cpm_http_respond(c, 204, "text/plain", "", 0, NULL);
        return;
    }
    if (!cpm_door_open(req->path) && !cpm_door_admits(api->door, req)) {
        api->ctx->metrics->requests[CPM_EP_OTHER][CPM_OUT_REJECTED]++;
        refuse_key(c, req);
        return;
    }
    bool path_known = false;
    for (size_t i = 0; i < sizeof routes / sizeof *routes; i++) {
        if (strcmp(req->path, routes[i].path) != 0)
            continue;
        path_known = true;
        if (strcmp(req->method, routes[i].method) == 0) {
            routes[i].fn(api, c, req);
            return;
        }
    }
    for (size_t i = 0; i < sizeof prefix_routes / sizeof *prefix_routes; i++) {
        const struct route *r = &prefix_routes[i];
        if (strncmp(req->path, r->path, strlen(r->path)) != 0 || !req->path[strlen(r->path)])
            continue;
        path_known = true;
        if (strcmp(req->method, r->method) == 0) {
            r->fn(api, c, req);
            return;
        }
    }
    api->ctx->metrics->requests[CPM_EP_OTHER][CPM_OUT_REJECTED]++;
    if (path_known)
        respond_error(c, 405, "invalid_request_error", "method_not_allowed", NULL,
                      "method not allowed for this path");
    else
        respond_error(c, 404, "invalid_request_error", "not_found", NULL, "no such route");
}

/* ---- life ---------------------------------------------------------------------------------- */

int cpm_api_http_new(uv_loop_t *loop, const cpm_front_ctx *ctx, const char *addr, int port,
                     cpm_api_http **ret, cpm_error *err) {
    cpm_api_http *api = calloc(1, sizeof *api);
    *ret = api;
    if (!api)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    api->ctx = ctx;
    int e = cpm_door_new(ctx->cfg, addr, ctx->log, &api->door, err);
    if (e)
        return e;
    api->lim = cpm_oai_limits_default();
    api->lim.max_prompt_ids = ctx->cfg->router.max_prompt_tokens;
    cpm_http_limits hl = cpm_http_limits_default();
    if (ctx->cfg->router.max_body_bytes > 0)
        hl.max_body = (size_t)ctx->cfg->router.max_body_bytes;
    e = cpm_http_server_new(loop, &hl, on_request, api, &api->http, err);
    if (e)
        return e;
    cpm_http_server_set_error_body(api->http, cpm_oai_error_body);
    cpm_http_server_set_head_fn(api->http, response_head, api);
    cpm_http_server_set_done_fn(api->http, on_exchange_done, api);
    return cpm_http_server_listen(api->http, addr, port, err);
}

int cpm_api_http_port(const cpm_api_http *a) {
    return a && a->http ? cpm_http_server_port(a->http) : -1;
}

static void on_closed(void *ud) {
    cpm_api_http *api = ud;
    void (*done)(void *) = api->done;
    void *done_ud = api->done_ud;
    cpm_door_free(api->door);
    free(api);
    if (done)
        done(done_ud);
}

void cpm_api_http_close(cpm_api_http *a, void (*done)(void *ud), void *ud) {
    if (!a)
        return;
    a->done = done;
    a->done_ud = ud;
    if (a->http)
        cpm_http_server_close(a->http, on_closed, a);
    else
        on_closed(a);
}
