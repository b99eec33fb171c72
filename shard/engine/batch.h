/* batch.h - one step of work for a model or a pipeline stage: rows from any
 * number of sequences, each with its position (continuous batching). Shared by
 * the forward pass and the KV cache, which must agree on what a row is. */
#ifndef CPM_BATCH_H
#define CPM_BATCH_H

#include <stdint.h>

/* Rows of the same sequence must come in increasing position order and
 * positions must continue that sequence's cache without gaps. */
typedef struct cpm_batch {
    int n_tokens;
    const int32_t *ids;     /* [n_tokens] token ids; used by the first stage */
    const float *hidden;    /* [n_tokens, hidden_size] input activations; other stages */
    const int32_t *seq;     /* [n_tokens] KV-cache sequence handle of each row */
    const int32_t *pos;     /* [n_tokens] absolute position of each row */
    const uint8_t *want;    /* [n_tokens] last stage: 1 = produce logits for this row; NULL = all rows */
} cpm_batch;

#endif
