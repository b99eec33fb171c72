/* service.h - the cpm-tokenizer service: tokenize, chat (render + tokenize) and
 * stateless incremental detokenize over the wire, for the router and other callers,
 * and the texts of logprob candidates (pieces) in one call per generated token.
 *
 * Handlers run on the server's worker threads; a loaded cpm_tokenizer is immutable,
 * so they share one without locks.
 */
#ifndef CPM_TOKENIZER_SERVICE_H
#define CPM_TOKENIZER_SERVICE_H

#include "services/common/server.h"
#include "services/tokenizer/tokenizer.h"

/* Ids of context kept before prefix_len when detokenizing, so spacing and
 * multi-id characters come out as in a whole decode. */
#define CPM_TOKENIZER_SVC_CONTEXT 8

/* cpm_server_handler; user is the (borrowed) const cpm_tokenizer *. */
int cpm_tokenizer_svc_handle(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err);

/* The text ids[prefix_len:] adds after ids[:prefix_len]; a trailing incomplete UTF-8
 * character is held back: *ret_consumed says how many new ids the text covers.
 * *ret_text is malloc'd (caller frees). */
int cpm_tokenizer_svc_detok(const cpm_tokenizer *tok, const int32_t *ids, size_t n,
                            size_t prefix_len, bool skip_special, char **ret_text,
                            size_t *ret_consumed, cpm_error *err);

/* Most ids one Pieces request may ask about (the chosen token and its alternatives). */
#define CPM_TOKENIZER_SVC_MAX_PIECES 64

/* The text each of ids[0..n) adds right after context, exactly as
 * cpm_tokenizer_svc_detok([context, ids[i]], prefix_len 1) gives it (held back: "").
 * n must be 1..CPM_TOKENIZER_SVC_MAX_PIECES and every id in the vocabulary.
 * *ret_texts is malloc'd, n malloc'd NUL-terminated strings (free with
 * cpm_tokenizer_svc_pieces_free); *ret_lens (malloc'd) holds their lengths. */
int cpm_tokenizer_svc_pieces(const cpm_tokenizer *tok, int32_t context, const int32_t *ids,
                             size_t n, bool skip_special, char ***ret_texts, size_t **ret_lens,
                             cpm_error *err);
void cpm_tokenizer_svc_pieces_free(char **texts, size_t *lens, size_t n);

#endif
