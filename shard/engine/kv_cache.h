/* kv_cache.h - paged key/value cache of one stage for many sequences.
 *
 * Memory is a fixed pool of blocks (CPM_KV_BLOCK tokens each, all of this stage's
 * layers) reserved at creation; a sequence holds a table of block indices that
 * grows as it does, so short and long sequences share the pool without
 * fragmentation and nothing is allocated per token.
 *
 * Prefix caching: a full block can be published under a hash of every token up to
 * and including it (the router computes them: it knows the tokens, later stages only
 * see activations). A published block outlives its sequences in an LRU of cached
 * blocks, and a new sequence can start by attaching the blocks of its prompt's first
 * positions; shared blocks are counted, never written (a sequence that rewinds into
 * one gets a private copy), and cached blocks are evicted, oldest first, only when a
 * reservation finds no free block.
 */
#ifndef CPM_KV_CACHE_H
#define CPM_KV_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "../../common/error.h"
#include "batch.h"
#include "kernels/dtype.h"

#define CPM_KV_BLOCK 16

typedef struct cpm_kv_cache cpm_kv_cache;

/* What one token costs in the cache: elements of keys and of values per layer
 * (from cpm_model_kv_geometry), for the stage's n_layers layers, stored as
 * dtype: CPM_DTYPE_F32 (exact, the default) or CPM_DTYPE_F16 (half the memory;
 * logits move by ~1e-3 relative, greedy tokens normally unchanged).
 * key_sums (InfLLM v2 models) also keeps, per block and layer, the f32 sum of
 * the block's CPM_KV_BLOCK keys: the compressed keys are built from those
 * (k_dim floats per block and layer, 1/16 of the keys' own size in f32).
 * keys_by_column stores each block's keys transposed, as the attention
 * kernels read them (kv_cache_internal.h); same size. */
typedef struct cpm_kv_geometry {
    int n_layers;
    int k_dim;
    int v_dim;
    cpm_dtype dtype;
    bool key_sums;
    bool keys_by_column;
} cpm_kv_geometry;

/* Reserves room for max_tokens tokens in total across at most max_seqs sequences.
 * Returns NULL with err set on failure; free with cpm_kv_cache_free. */
cpm_kv_cache *cpm_kv_cache_new(const cpm_kv_geometry *g, int max_tokens, int max_seqs,
                               cpm_error *err);

/* Accepts NULL. */
void cpm_kv_cache_free(cpm_kv_cache *kv);

/* A new empty sequence; returns its handle (>= 0) or a negative CPM_E* code
 * (CPM_ELIMIT when max_seqs sequences are live). */
int cpm_kv_cache_seq_new(cpm_kv_cache *kv, cpm_error *err);

/* Releases the sequence and its blocks. Unknown handles are ignored. */
void cpm_kv_cache_seq_free(cpm_kv_cache *kv, int seq);

/* Tokens cached for seq, or -1 for an unknown handle. */
int cpm_kv_cache_seq_len(const cpm_kv_cache *kv, int seq);

/* Drops cached tokens at positions >= len (to rewind). A block kept partly that other
 * sequences share (or that is published) is first copied: CPM_ELIMIT when no block is
 * left for the copy (nothing changed then). */
int cpm_kv_cache_seq_truncate(cpm_kv_cache *kv, int seq, int len);

/* Starts the empty sequence seq with the n published blocks of these hashes, in order
 * (its length becomes n * CPM_KV_BLOCK). CPM_ESTALE when one is not cached (any more),
 * CPM_EINVAL when seq is not empty; nothing changes on failure. */
int cpm_kv_cache_seq_attach(cpm_kv_cache *kv, int seq, const uint64_t *hashes, int n,
                            cpm_error *err);

/* Publishes seq's blocks first .. first + n - 1 under hashes[0 .. n) (non-zero), each
 * when it is full and not published yet; a hash already held by another block is left
 * to it. Returns how many blocks were published. */
int cpm_kv_cache_seq_publish(cpm_kv_cache *kv, int seq, int first, const uint64_t *hashes, int n);

/* Blocks held by sequences, and in total (for the KV-usage metric); cached blocks no
 * sequence holds count as free. */
void cpm_kv_cache_usage(const cpm_kv_cache *kv, int *ret_used, int *ret_total);

/* Blocks published and held by no sequence (evictable), and published in all. */
void cpm_kv_cache_cached(const cpm_kv_cache *kv, int *ret_idle, int *ret_published);

/* For the forward pass: makes room for the batch rows and records each row's
 * cache slot (block * CPM_KV_BLOCK + offset) in slots[n_tokens]; checks that
 * positions continue each sequence. Changes nothing on failure. */
int cpm_kv_cache_reserve(cpm_kv_cache *kv, const cpm_batch *b, int *slots, cpm_error *err);

/* Marks the batch rows as cached, after a successful forward pass. */
void cpm_kv_cache_commit(cpm_kv_cache *kv, const cpm_batch *b);

#endif
