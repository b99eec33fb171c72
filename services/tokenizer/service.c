/* service.c - cpm-tokenizer's request handler over the tokenizer library.
 *
 * Detokenizing is stateless: the caller sends the ids so far and how many it has
 * already shown; we decode a short window with and without the new ids and return
 * the difference, so any replica can serve any stream. Pieces answers the texts of a
 * token's logprob candidates in one call, each through that same path.
 */
#include "service.h"

#include <stdlib.h>
#include <string.h>

static bool ends_incomplete(const char *s, size_t n) {
    /* The decoder turns an unfinished byte run into U+FFFD (EF BF BD). */
    return n >= 3 && !memcmp(s + n - 3, "\xEF\xBF\xBD", 3);
}

int cpm_tokenizer_svc_detok(const cpm_tokenizer *tok, const int32_t *ids, size_t n,
                            size_t prefix_len, bool skip_special, char **ret_text,
                            size_t *ret_consumed, cpm_error *err) {
    size_t start = prefix_len > CPM_TOKENIZER_SVC_CONTEXT ? prefix_len - CPM_TOKENIZER_SVC_CONTEXT : 0;
    char *pre = NULL, *full = NULL;
    size_t npre = 0, nfull = 0;
    int rc = cpm_tokenizer_decode(tok, ids + start, prefix_len - start, skip_special, &pre, &npre, err);
    size_t take = n - prefix_len;
    /* Hold back trailing ids while the text ends inside a character, but never all of a
     * run that can no longer complete (then U+FFFD is the true text). */
    for (; !rc; take--) {
        free(full);
        full = NULL;
        rc = cpm_tokenizer_decode(tok, ids + start, prefix_len + take - start, skip_special, &full,
                                  &nfull, err);
        if (rc || take == 0 || !ends_incomplete(full, nfull) || take == n - prefix_len - 4)
            break;
    }
    if (!rc) {
        /* The window's prefix text is a prefix of the longer decode except at the very
         * start, where one leading space may be dropped differently; fall back to all. */
        size_t off = nfull >= npre && !memcmp(full, pre, npre) ? npre : 0;
        char *text = malloc(nfull - off + 1);
        if (!text)
            rc = cpm_error_set(err, CPM_ENOMEM, "detokenize");
        else {
            memcpy(text, full + off, nfull - off);
            text[nfull - off] = '\0';
            *ret_text = text;
            *ret_consumed = take;
        }
    }
    free(pre);
    free(full);
    return rc;
}

/* Each candidate goes through the Detokenize path itself, so a logprob text can never
 * drift from what a [context, id] Detokenize would say about the same token. */
int cpm_tokenizer_svc_pieces(const cpm_tokenizer *tok, int32_t context, const int32_t *ids,
                             size_t n, bool skip_special, char ***ret_texts, size_t **ret_lens,
                             cpm_error *err) {
    *ret_texts = NULL;
    *ret_lens = NULL;
    int32_t vocab = cpm_tokenizer_vocab_size(tok);
    if (n == 0 || n > CPM_TOKENIZER_SVC_MAX_PIECES)
        return cpm_error_set(err, n ? CPM_ELIMIT : CPM_EINVAL, "pieces: %zu ids, expected 1..%d", n,
                             CPM_TOKENIZER_SVC_MAX_PIECES);
    if (context < 0 || context >= vocab)
        return cpm_error_set(err, CPM_ERANGE, "pieces: context id %d is outside [0, %d)", context,
                             vocab);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return cpm_error_set(err, CPM_ERANGE, "pieces: ids[%zu] = %d is outside [0, %d)", i,
                                 ids[i], vocab);
    char **texts = calloc(n, sizeof *texts);
    size_t *lens = calloc(n, sizeof *lens);
    int rc = texts && lens ? 0 : cpm_error_set(err, CPM_ENOMEM, "pieces: out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        int32_t pair[2] = {context, ids[i]};
        size_t consumed;
        rc = cpm_tokenizer_svc_detok(tok, pair, 2, 1, skip_special, &texts[i], &consumed, err);
        if (!rc)
            lens[i] = strlen(texts[i]);
    }
    if (rc) {
        cpm_tokenizer_svc_pieces_free(texts, lens, n);
        return rc;
    }
    *ret_texts = texts;
    *ret_lens = lens;
    return 0;
}

void cpm_tokenizer_svc_pieces_free(char **texts, size_t *lens, size_t n) {
    for (size_t i = 0; texts && i < n; i++)
        free(texts[i]);
    free(texts);
    free(lens);
}

static int reply_ids(cpm_reply *out, int32_t *ids, size_t n, char *text, cpm_error *err) {
    Cpm__V1__TokenizeReply r = CPM__V1__TOKENIZE_REPLY__INIT;
    r.n_ids = n;
    r.ids = ids;
    r.text = text ? text : "";
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_TOKENIZED;
    env.tokenized = &r;
    return cpm_reply_set(out, &env, NULL, err);
}

static int do_tokenize(const cpm_tokenizer *tok, const Cpm__V1__TokenizeRequest *q, cpm_reply *out,
                       cpm_error *err) {
    int32_t *ids;
    size_t n;
    int rc = cpm_tokenizer_encode(tok, q->text, strlen(q->text), q->add_bos, &ids, &n, err);
    if (rc)
        return rc;
    rc = reply_ids(out, ids, n, NULL, err);
    free(ids);
    return rc;
}

/* proto3 strings are "" when not set; the renderer takes NULL for "none". */
static const char *nonempty(const char *s) {
    return s && *s ? s : NULL;
}

static int do_chat(const cpm_tokenizer *tok, const Cpm__V1__ChatRequest *q, cpm_reply *out,
                   cpm_error *err) {
    cpm_chat_msg *msgs = calloc(q->n_messages ? q->n_messages : 1, sizeof *msgs);
    if (!msgs)
        return cpm_error_set(err, CPM_ENOMEM, "chat");
    for (size_t i = 0; i < q->n_messages; i++) {
        msgs[i].role = q->messages[i]->role;
        msgs[i].content = q->messages[i]->content;
        msgs[i].tool_calls_json = nonempty(q->messages[i]->tool_calls_json);
        msgs[i].thought = nonempty(q->messages[i]->thought);
    }
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = cpm_chat_render(tok, msgs, q->n_messages, nonempty(q->tools_json), q->add_generation_prompt, &text, err);
    if (!rc)
        rc = cpm_tokenizer_encode(tok, text, strlen(text), true, &ids, &n, err);
    if (!rc)
        rc = reply_ids(out, ids, n, text, err);
    free(msgs);
    free(text);
    free(ids);
    return rc;
}

static int do_detok(const cpm_tokenizer *tok, const Cpm__V1__DetokenizeRequest *q, cpm_reply *out,
                    cpm_error *err) {
    char *text;
    size_t consumed;
    int rc = cpm_tokenizer_svc_detok(tok, q->ids, q->n_ids, q->prefix_len, q->skip_special, &text,
                                     &consumed, err);
    if (rc)
        return rc;
    Cpm__V1__DetokenizeReply r = CPM__V1__DETOKENIZE_REPLY__INIT;
    r.text = text;
    r.consumed = (uint32_t)consumed;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_DETOKENIZED;
    env.detokenized = &r;
    rc = cpm_reply_set(out, &env, NULL, err);
    free(text);
    return rc;
}

static int do_pieces(const cpm_tokenizer *tok, const Cpm__V1__PiecesRequest *q, cpm_reply *out,
                     cpm_error *err) {
    char **texts;
    size_t *lens;
    int rc = cpm_tokenizer_svc_pieces(tok, q->context, q->ids, q->n_ids, q->skip_special, &texts,
                                      &lens, err);
    if (rc)
        return rc;
    ProtobufCBinaryData *bin = calloc(q->n_ids, sizeof *bin);
    if (!bin) {
        cpm_tokenizer_svc_pieces_free(texts, lens, q->n_ids);
        return cpm_error_set(err, CPM_ENOMEM, "pieces: out of memory");
    }
    for (size_t i = 0; i < q->n_ids; i++)
        bin[i] = (ProtobufCBinaryData){.len = lens[i], .data = (uint8_t *)texts[i]};
    Cpm__V1__PiecesReply r = CPM__V1__PIECES_REPLY__INIT;
    r.n_texts = q->n_ids;
    r.texts = bin;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_PIECES_REPLY;
    env.pieces_reply = &r;
    rc = cpm_reply_set(out, &env, NULL, err);
    free(bin);
    cpm_tokenizer_svc_pieces_free(texts, lens, q->n_ids);
    return rc;
}

int cpm_tokenizer_svc_handle(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err) {
    const cpm_tokenizer *tok = user;
    switch (in->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_TOKENIZE:
        return do_tokenize(tok, in->env->tokenize, out, err);
    case CPM__V1__ENVELOPE__BODY_CHAT:
        return do_chat(tok, in->env->chat, out, err);
    case CPM__V1__ENVELOPE__BODY_DETOKENIZE:
        return do_detok(tok, in->env->detokenize, out, err);
    case CPM__V1__ENVELOPE__BODY_PIECES:
        return do_pieces(tok, in->env->pieces, out, err);
    default:
        return cpm_error_set(err, CPM_EUNSUPPORTED, "tokenizer: cannot handle '%s'",
                             cpm_wire_body_name(in->env->body_case));
    }
}
