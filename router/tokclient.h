/* tokclient.h - the router's side of the cpm-tokenizer protocol.
 *
 * The router turns text into ids once, at the door (tokenize, or chat: render the
 * template and tokenize), and turns sampled ids back into text incrementally through
 * the service's stateless Detokenize (and a logprob token's candidates through one
 * Pieces call). Each call goes out on a DEALER (a cpm_sock the
 * caller owns, one per replica) and its reply is validated here, so router.c sees
 * either well-formed results or one line saying which tokenizer failed and how.
 *
 *   cpm_tokc_tokenize(sock, "tokenizer0", "Hello", true, 30000, on_ids, job, &e);
 *   ... on_ids(job, &res): res->status == 0 ? use res->ids/res->n_ids : res->msg
 */
#ifndef CPM_TOKCLIENT_H
#define CPM_TOKCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../services/common/transport.h"

/* What a call came back with; borrowed, valid during the callback only. */
typedef struct cpm_tokc_result {
    int status;           /* 0 or CPM_E*: the service's code, CPM_ETIMEDOUT, CPM_ECLOSED, CPM_EFORMAT */
    bool refused;         /* the service answered with an error (the input's fault, or busy) */
    const char *msg;      /* on failure: names the tokenizer and the problem */
    const int32_t *ids;   /* tokenize / chat */
    size_t n_ids;
    const char *text;     /* detokenize: the new text; chat: the rendered prompt (NUL-terminated) */
    size_t text_len;
    size_t consumed;      /* detokenize: how many new ids the text covers */
    const char *const *texts; /* pieces: texts[i] (texts_len[i] bytes, not NUL-terminated) */
    const size_t *texts_len;  /* is the text of ids[i]; n_texts = the n sent */
    size_t n_texts;
} cpm_tokc_result;

/* Called exactly once per call that was sent (return 0), never when sending failed. */
typedef void (*cpm_tokc_cb)(void *user, const cpm_tokc_result *res);

/* One chat message; the last three may be NULL (none): an assistant's tool_calls array
 * (JSON text) and reasoning, a tool result's call id. */
typedef struct cpm_tokc_msg {
    const char *role, *content;
    const char *tool_calls_json, *thought, *tool_call_id;
} cpm_tokc_msg;

/* Text to ids (add_bos: prepend the model's BOS). name labels the replica in messages. */
int cpm_tokc_tokenize(cpm_sock *s, const char *name, const char *text, bool add_bos,
                      int timeout_ms, cpm_tokc_cb cb, void *user, cpm_error *err);

/* Renders the model's chat template over msgs (with the assistant prompt) and tools_json
 * (NULL or a JSON array of OpenAI tools), then tokenizes. */
int cpm_tokc_chat(cpm_sock *s, const char *name, const cpm_tokc_msg *msgs, size_t n,
                  const char *tools_json, int timeout_ms, cpm_tokc_cb cb, void *user, cpm_error *err);

/* Text that ids[prefix_len:n] add after ids[:prefix_len]. Trailing ids that end inside
 * a UTF-8 character are not consumed (resend them with the next ids). */
int cpm_tokc_detok(cpm_sock *s, const char *name, const int32_t *ids, size_t n,
                   size_t prefix_len, bool skip_special, int timeout_ms, cpm_tokc_cb cb,
                   void *user, cpm_error *err);

/* Most ids one pieces call may carry (the service's CPM_TOKENIZER_SVC_MAX_PIECES). */
#define CPM_TOKC_MAX_PIECES 64

/* The text each of ids[0..n) adds right after the token context: what a detok of
 * [context, ids[i]] with prefix_len 1 gives, for n ids in one call (logprob candidates).
 * n must be 1..CPM_TOKC_MAX_PIECES. */
int cpm_tokc_pieces(cpm_sock *s, const char *name, int32_t context, const int32_t *ids, size_t n,
                    bool skip_special, int timeout_ms, cpm_tokc_cb cb, void *user,
                    cpm_error *err);

#endif
