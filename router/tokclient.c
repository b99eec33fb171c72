/* tokclient.c - requests to cpm-tokenizer and the checks on their replies.
 *
 * One small heap context per call carries what the reply must be checked against
 * (the expected body, how many new ids a detokenize may consume, how many texts a
 * pieces reply must hold); the reply itself is freed as soon as the callback returns.
 */
#include "tokclient.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct call_ctx {
    cpm_tokc_cb cb;
    void *user;
    Cpm__V1__Envelope__BodyCase want;
    size_t n_new; /* detokenize: ids after prefix_len; pieces: ids sent */
    int timeout_ms;
    char name[32];
} call_ctx;

static void fail(call_ctx *c, int status, bool refused, const char *what) {
    char msg[CPM_ERROR_MSG_MAX];
    snprintf(msg, sizeof msg, "%s: %s", c->name, what);
    cpm_tokc_result res = {.status = status, .refused = refused, .msg = msg};
    c->cb(c->user, &res);
}

/* One text per id sent, or the reply is malformed. */
static void pieces_reply(call_ctx *c, const Cpm__V1__PiecesReply *p) {
    if (p->n_texts != c->n_new || p->n_texts > CPM_TOKC_MAX_PIECES) {
        char what[96];
        snprintf(what, sizeof what, "pieces reply has %zu texts for %zu ids", p->n_texts, c->n_new);
        fail(c, CPM_EFORMAT, false, what);
        return;
    }
    const char *texts[CPM_TOKC_MAX_PIECES];
    size_t lens[CPM_TOKC_MAX_PIECES];
    for (size_t i = 0; i < p->n_texts; i++) {
        texts[i] = p->texts[i].len ? (const char *)p->texts[i].data : "";
        lens[i] = p->texts[i].len;
    }
    cpm_tokc_result res = {.texts = texts, .texts_len = lens, .n_texts = p->n_texts};
    c->cb(c->user, &res);
}

static void on_reply(cpm_sock *s, cpm_inmsg *m, int status, void *user) {
    (void)s;
    call_ctx *c = user;
    char what[CPM_ERROR_MSG_MAX - 40];
    if (status == CPM_ETIMEDOUT) {
        snprintf(what, sizeof what, "no answer within %d ms", c->timeout_ms);
        fail(c, status, false, what);
    } else if (status != 0) {
        fail(c, status, false, cpm_strerror(status));
    } else if (m->env->body_case == CPM__V1__ENVELOPE__BODY_ERROR) {
        const Cpm__V1__Error *e = m->env->error;
        fail(c, e->code < 0 ? e->code : CPM_EINTERNAL, true,
             e->message && e->message[0] ? e->message : "error without a message");
    } else if (m->env->body_case != c->want) {
        snprintf(what, sizeof what, "unexpected reply '%s'", cpm_wire_body_name(m->env->body_case));
        fail(c, CPM_EFORMAT, false, what);
    } else if (c->want == CPM__V1__ENVELOPE__BODY_TOKENIZED) {
        const Cpm__V1__TokenizeReply *t = m->env->tokenized;
        const char *text = t->text ? t->text : "";
        cpm_tokc_result res = {.ids = t->ids, .n_ids = t->n_ids, .text = text,
                               .text_len = strlen(text)};
        c->cb(c->user, &res);
    } else if (c->want == CPM__V1__ENVELOPE__BODY_PIECES_REPLY) {
        pieces_reply(c, m->env->pieces_reply);
    } else {
        const Cpm__V1__DetokenizeReply *d = m->env->detokenized;
        const char *text = d->text ? d->text : "";
        if (d->consumed > c->n_new) {
            snprintf(what, sizeof what, "detokenize reply consumed %u ids of %zu sent",
                     d->consumed, c->n_new);
            fail(c, CPM_EFORMAT, false, what);
        } else {
            cpm_tokc_result res = {.text = text, .text_len = strlen(text),
                                   .consumed = d->consumed};
            c->cb(c->user, &res);
        }
    }
    cpm_inmsg_free(m);
    free(c);
}

static int call(cpm_sock *s, const char *name, Cpm__V1__Envelope *env,
                Cpm__V1__Envelope__BodyCase want, size_t n_new, int timeout_ms, cpm_tokc_cb cb,
                void *user, cpm_error *err) {
    call_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    c->cb = cb;
    c->user = user;
    c->want = want;
    c->n_new = n_new;
    c->timeout_ms = timeout_ms;
    snprintf(c->name, sizeof c->name, "%s", name);
    int rc = cpm_sock_call(s, env, NULL, timeout_ms, on_reply, c, err);
    if (rc < 0) {
        free(c);
        return cpm_error_prefix(err, "%s", name);
    }
    return 0;
}

int cpm_tokc_tokenize(cpm_sock *s, const char *name, const char *text, bool add_bos,
                      int timeout_ms, cpm_tokc_cb cb, void *user, cpm_error *err) {
    Cpm__V1__TokenizeRequest q = CPM__V1__TOKENIZE_REQUEST__INIT;
    q.text = (char *)text;
    q.add_bos = add_bos;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_TOKENIZE;
    env.tokenize = &q;
    return call(s, name, &env, CPM__V1__ENVELOPE__BODY_TOKENIZED, 0, timeout_ms, cb, user, err);
}

/* proto3 has no null string: "" stands for none. */
static const char *or_empty(const char *s) {
    return s ? s : "";
}

int cpm_tokc_chat(cpm_sock *s, const char *name, const cpm_tokc_msg *msgs, size_t n,
                  const char *tools_json, int timeout_ms, cpm_tokc_cb cb, void *user, cpm_error *err) {
    Cpm__V1__ChatMessage *m = calloc(n ? n : 1, sizeof *m);
    Cpm__V1__ChatMessage **mp = calloc(n ? n : 1, sizeof *mp);
    if (!m || !mp) {
        free(m);
        free(mp);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    }
    for (size_t i = 0; i < n; i++) {
        cpm__v1__chat_message__init(&m[i]);
        m[i].role = (char *)msgs[i].role;
        m[i].content = (char *)msgs[i].content;
        m[i].tool_calls_json = (char *)or_empty(msgs[i].tool_calls_json);
        m[i].thought = (char *)or_empty(msgs[i].thought);
        m[i].tool_call_id = (char *)or_empty(msgs[i].tool_call_id);
        mp[i] = &m[i];
    }
    Cpm__V1__ChatRequest q = CPM__V1__CHAT_REQUEST__INIT;
    q.n_messages = n;
    q.messages = mp;
    q.add_generation_prompt = true;
    q.tools_json = (char *)or_empty(tools_json);
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_CHAT;
    env.chat = &q;
    int rc = call(s, name, &env, CPM__V1__ENVELOPE__BODY_TOKENIZED, 0, timeout_ms, cb, user, err);
    free(m); /* packed by now */
    free(mp);
    return rc;
}

int cpm_tokc_detok(cpm_sock *s, const char *name, const int32_t *ids, size_t n,
                   size_t prefix_len, bool skip_special, int timeout_ms, cpm_tokc_cb cb,
                   void *user, cpm_error *err) {
    if (prefix_len > n)
        return cpm_error_set(err, CPM_EINVAL, "%s: detokenize prefix %zu beyond %zu ids", name,
                             prefix_len, n);
    Cpm__V1__DetokenizeRequest q = CPM__V1__DETOKENIZE_REQUEST__INIT;
    q.n_ids = n;
    q.ids = (int32_t *)ids;
    q.prefix_len = (uint32_t)prefix_len;
    q.skip_special = skip_special;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_DETOKENIZE;
    env.detokenize = &q;
    return call(s, name, &env, CPM__V1__ENVELOPE__BODY_DETOKENIZED, n - prefix_len, timeout_ms, cb,
                user, err);
}

int cpm_tokc_pieces(cpm_sock *s, const char *name, int32_t context, const int32_t *ids, size_t n,
                    bool skip_special, int timeout_ms, cpm_tokc_cb cb, void *user,
                    cpm_error *err) {
    if (n == 0 || n > CPM_TOKC_MAX_PIECES)
        return cpm_error_set(err, CPM_EINVAL, "%s: pieces of %zu ids, expected 1..%d", name, n,
                             CPM_TOKC_MAX_PIECES);
    Cpm__V1__PiecesRequest q = CPM__V1__PIECES_REQUEST__INIT;
    q.context = context;
    q.n_ids = n;
    q.ids = (int32_t *)ids;
    q.skip_special = skip_special;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_PIECES;
    env.pieces = &q;
    return call(s, name, &env, CPM__V1__ENVELOPE__BODY_PIECES_REPLY, n, timeout_ms, cb, user, err);
}
