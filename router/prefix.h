/* prefix.h - prefix caching, the router's side: block hashes and what each pipeline
 * replica is believed to hold.
 *
 * The stages keep full KV blocks after their sequences end (shard/engine/kv_cache.h),
 * named by a hash of every token up to and including the block, which only the router
 * can compute (later stages see activations, not tokens). The router remembers, per
 * replica, the hashes it asked the stages to publish (most recently used first, bounded
 * by the stages' KV blocks), so it can start a new sequence after the longest cached
 * prefix of its prompt and send it to the replica that holds the most of it. The stages
 * evict on their own when full: a prefix the router still lists may be gone, and a stage
 * then fails the micro-batch (CPM_ESTALE); the router forgets that replica's list and
 * runs the request again from its first token.
 *
 *   uint64_t h[n / 16];  cpm_prefix_hashes(tokens, n, h);
 *   int k = cpm_prefix_match(dir, h, n_blocks);      // leading blocks believed cached
 *   cpm_prefix_add(dir, h[i]);                        // published
 */
#ifndef CPM_PREFIX_H
#define CPM_PREFIX_H

#include <stdint.h>

#define CPM_PREFIX_BLOCK 16 /* the stages' CPM_KV_BLOCK */

/* The chained hash of block b of these tokens, given the hash of block b - 1 (0 for the
 * first): never 0. */
uint64_t cpm_prefix_hash(uint64_t prev, const int32_t *block_tokens);

/* The hashes of every full block of tokens[0 .. n): n / CPM_PREFIX_BLOCK of them. */
int cpm_prefix_hashes(const int32_t *tokens, int n, uint64_t *out);

typedef struct cpm_prefix cpm_prefix;

/* A directory of at most max_blocks hashes; NULL without memory. */
cpm_prefix *cpm_prefix_new(int max_blocks);
/* Accepts NULL. */
void cpm_prefix_free(cpm_prefix *d);

/* How many of hashes[0 .. n) from the first are listed (a lookup; changes nothing). */
int cpm_prefix_match(const cpm_prefix *d, const uint64_t *hashes, int n);
/* Marks hashes[0 .. n) used now (the longest listed go last to eviction). */
void cpm_prefix_touch(cpm_prefix *d, const uint64_t *hashes, int n);
/* Lists hash as most recently used, forgetting the oldest when full. */
void cpm_prefix_add(cpm_prefix *d, uint64_t hash);
/* Forgets everything (a stage said a listed block was gone, or restarted). */
void cpm_prefix_clear(cpm_prefix *d);
int cpm_prefix_count(const cpm_prefix *d);

#endif
