/* detok.h - incremental detokenization for streaming answers: the router pushes
 * each sampled id and forwards whatever text comes back as an SSE chunk.
 *
 * Every piece returned is complete UTF-8, and the concatenation of all pieces
 * (every push, then the final flush) equals cpm_tokenizer_decode() of the same ids.
 * Byte-fallback pieces (<0xE4> <0xBD> <0xA0> = "你") are held back until the run of
 * byte pieces ends, because the one-shot decoder judges a run as a whole: a valid
 * prefix followed by a stray byte turns the whole run into U+FFFD characters.
 */
#ifndef CPM_DETOK_H
#define CPM_DETOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct cpm_tokenizer cpm_tokenizer;
typedef struct cpm_detok cpm_detok;

/* A new stream over tok (borrowed: it must outlive the stream). NULL when out of
 * memory. skip_special as in cpm_tokenizer_decode. */
cpm_detok *cpm_detok_new(const cpm_tokenizer *tok, bool skip_special);

/* Frees a stream; NULL is a no-op. */
void cpm_detok_free(cpm_detok *d);

/* Feeds one id. *ret_piece and *ret_len get the text that became final (possibly
 * empty); the piece is owned by d and valid until the next call on d. An id out
 * of range is CPM_ERANGE and leaves the stream as it was. */
int cpm_detok_push(cpm_detok *d, int32_t id, const char **ret_piece, size_t *ret_len,
                   cpm_error *err);

/* Ends the stream: returns the held-back bytes (an incomplete or invalid byte run
 * becomes one U+FFFD per byte, as the one-shot decoder does). The stream can then
 * be reused from the start. */
int cpm_detok_flush(cpm_detok *d, const char **ret_piece, size_t *ret_len, cpm_error *err);

#endif
