/* service.h - the cpm-tokenizer service: tokenize, chat (render + tokenize) and
 * stateless incremental detokenize over the wire, for the router and other callers.
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

#endif
