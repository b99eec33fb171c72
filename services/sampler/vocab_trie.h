/* vocab_trie.h - the vocabulary as a byte trie, and the token mask of constrained decoding.
 *
 * Built once per tokenizer: every token's bytes (cpm_tokenizer_token_bytes; special tokens
 * have none and are never allowed inside a constrained text). A mask walks the trie from
 * the matcher's state, copying the matcher at each byte and pruning a subtree as soon as
 * its prefix is dead, so the cost follows how many tokens can fit, not the vocabulary.
 *
 *   cpm_vtrie *t;  cpm_vtrie_new(tok, &t, &e);
 *   cpm_vtrie_mask(t, &m, tokens_left, allowed);   // allowed[id] = 1 or 0
 */
#ifndef CPM_VOCAB_TRIE_H
#define CPM_VOCAB_TRIE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "services/sampler/json_match.h"

typedef struct cpm_tokenizer cpm_tokenizer;
typedef struct cpm_vtrie cpm_vtrie;

int cpm_vtrie_new(const cpm_tokenizer *tok, cpm_vtrie **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_vtrie_free(cpm_vtrie *t);

int cpm_vtrie_vocab(const cpm_vtrie *t);

/* Feeds token id's bytes to m; false when they kill it (or id has no bytes). */
bool cpm_vtrie_feed(const cpm_vtrie *t, cpm_jm *m, int32_t id);

/* allowed[0 .. vocab) = 1 for each token whose bytes keep m alive and, with budget > 0
 * (tokens the request may still make, this one included), leave at most budget - 2 bytes
 * to close: each closing byte exists as a one-byte token, and a stop token must still fit,
 * so the text always ends complete and stopped in time; 0 otherwise. Returns how many
 * are allowed. */
int cpm_vtrie_mask(const cpm_vtrie *t, const cpm_jm *m, int budget, uint8_t *allowed);

#endif
