/* constrain.h - constrained decoding in the sampler: which tokens may come next.
 *
 * A row with a Constraint (proto/cpm.proto: response_format, tool_choice) carries the ids
 * generated so far (its history's last `step`); the text they write is replayed through
 * the matcher (json_match.h, cheap), the vocabulary trie gives every token that keeps the
 * text a prefix of the format and lets it close within tokens_left, and every other
 * logit becomes -inf. The model's stop tokens are allowed exactly when the text is
 * complete. Stateless like the rest of the sampler: any replica gives the same mask.
 *
 * Kinds: JSON_OBJECT (one JSON object, json_match.h), JSON_SCHEMA (a document valid against
 * the schema) and TOOL_CALLS (MiniCPM's call block for the allowed tools), the last two as
 * grammars (json_grammar.h) compiled once per schema text and kept in a small LRU cache,
 * shared by the sampler's threads under a lock taken only to look up.
 */
#ifndef CPM_CONSTRAIN_H
#define CPM_CONSTRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "proto/cpm.pb-c.h"

typedef struct cpm_constrainer cpm_constrainer;

/* Loads the model directory's tokenizer and builds its trie. */
int cpm_constrainer_new(const char *model_dir, cpm_constrainer **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_constrainer_free(cpm_constrainer *c);

/* Masks logits[vocab] for constraint k after the generated ids; allowed is vocab bytes
 * of scratch. CPM_EINVAL when the schema cannot be compiled or the generated text already
 * breaks the format, CPM_ERANGE when the vocabularies differ. Thread-safe. */
int cpm_constrainer_apply(cpm_constrainer *c, const Cpm__V1__Constraint *k,
                          const int32_t *generated, size_t n, float *logits, int vocab,
                          uint8_t *allowed, cpm_error *err);

#endif
