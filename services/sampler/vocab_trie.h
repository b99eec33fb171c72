/* vocab_trie.h - the vocabulary as a byte trie, and the token mask of constrained decoding.
 *
 * Built once per tokenizer: every token's bytes (cpm_tokenizer_token_bytes; special tokens
 * have none and are never allowed inside a constrained text). A mask walks the trie from
 * a matcher's state (json_match.h's JSON object, grammar.h's schema grammar), copying the
 * state at each byte and pruning a subtree as soon as its prefix is dead, so the cost
 * follows how many tokens can fit, not the vocabulary.
 *
 *   cpm_vtrie *t;  cpm_vtrie_new(tok, &t, &e);
 *   cpm_vtrie_mask(t, &matcher, state, tokens_left, allowed);   // allowed[id] = 1 or 0
 */
#ifndef CPM_VOCAB_TRIE_H
#define CPM_VOCAB_TRIE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

typedef struct cpm_tokenizer cpm_tokenizer;
typedef struct cpm_vtrie cpm_vtrie;

/* Bytes of a matcher state at most (the walk keeps one per trie level on its stack). */
#define CPM_VTRIE_STATE_MAX 128

/* What the walk drives: a state of `size` bytes, copied by value at every trie node. */
typedef struct cpm_vtrie_matcher {
    size_t size;
    bool (*feed)(void *ctx, void *state, uint8_t b);    /* false: the text can never match */
    int (*min_close)(void *ctx, const void *state);     /* fewest bytes that complete it */
    void *ctx;
} cpm_vtrie_matcher;

int cpm_vtrie_new(const cpm_tokenizer *tok, cpm_vtrie **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_vtrie_free(cpm_vtrie *t);

int cpm_vtrie_vocab(const cpm_vtrie *t);

/* Feeds token id's bytes to state; false when they kill it (or id has no bytes). */
bool cpm_vtrie_feed(const cpm_vtrie *t, const cpm_vtrie_matcher *mt, void *state, int32_t id);

/* allowed[0 .. vocab) = 1 for each token whose bytes keep the (live) state alive and, with budget > 0
 * (tokens the request may still make, this one included), leave at most budget - 2 bytes
 * to close: each closing byte exists as a one-byte token, and a stop token must still fit,
 * so the text always ends complete and stopped in time; 0 otherwise. When no token leaves
 * that few (a budget under the bytes still to write), the tokens that leave the fewest
 * bytes to close, if fewer than now: the text then closes by the shortest way, one token
 * at least one byte nearer each, and most budgets in tokens still suffice. Returns how
 * many are allowed. */
int cpm_vtrie_mask(const cpm_vtrie *t, const cpm_vtrie_matcher *mt, const void *state, int budget,
                   uint8_t *allowed);

#endif
