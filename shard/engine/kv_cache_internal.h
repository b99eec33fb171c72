/* kv_cache_internal.h - the KV cache's layout, for the attention kernels that
 * read it in their inner loops (shard/engine/model/attention.c). Everyone else goes
 * through kv_cache.h.
 *
 * A block holds, for each stage layer, CPM_KV_BLOCK key rows then CPM_KV_BLOCK
 * value rows, as f32 (exact: the F32 reference bar needs it) or f16 elements.
 * With key sums (InfLLM v2), each block also owns, in a parallel f32 array, per
 * layer the sum of its keys as stored (f16 keys widened exactly): written when
 * the block's last key is, so truncating and refilling a sequence rewrites it.
 */
#ifndef CPM_KV_CACHE_INTERNAL_H
#define CPM_KV_CACHE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "kv_cache.h"

struct cpm_kv_seq {
    bool live;
    int len;
    int n_blocks;
    int *blocks; /* [max_blocks_per_seq] */
};

struct cpm_kv_cache {
    int n_layers;        /* layers of the stage */
    int k_dim, v_dim;    /* elements per token per layer */
    cpm_dtype dtype;     /* CPM_DTYPE_F32 or CPM_DTYPE_F16 */
    size_t elem;         /* bytes per element */
    int n_blocks;
    int max_seqs;
    int max_blocks_per_seq;
    size_t block_elems;  /* n_layers * CPM_KV_BLOCK * (k_dim + v_dim) */
    char *data;          /* [n_blocks, block_elems] elements */
    float *key_sums;     /* [n_blocks, n_layers, k_dim], or NULL without key sums */
    int *free_blocks;    /* stack of blocks neither held nor published */
    int n_free;
    /* prefix caching (kv_cache.h): per block, holders and hash (0: not published) */
    int *refs;
    uint64_t *hash;
    int *lru_prev, *lru_next; /* published blocks no sequence holds, oldest first */
    int lru_head, lru_tail, n_idle, n_published;
    struct cpm_u64map *table; /* hash -> published block */
    struct cpm_kv_seq *seqs;
    int *block_tables;   /* [max_seqs, max_blocks_per_seq] */
};

/* Slot of position pos in seq, which must be reserved. */
static inline int cpm_kv_slot(const cpm_kv_cache *kv, int seq, int pos) {
    const struct cpm_kv_seq *s = &kv->seqs[seq];
    return s->blocks[pos / CPM_KV_BLOCK] * CPM_KV_BLOCK + pos % CPM_KV_BLOCK;
}

static inline size_t cpm_kv_layer_elems(const cpm_kv_cache *kv) {
    return (size_t)CPM_KV_BLOCK * (size_t)(kv->k_dim + kv->v_dim);
}

/* Key row of token slot `slot` in stage layer li (elements of kv->dtype); the
 * rows of one block are contiguous, k_dim elements apart. */
static inline void *cpm_kv_key(const cpm_kv_cache *kv, int li, int slot) {
    size_t block = (size_t)(slot / CPM_KV_BLOCK), off = (size_t)(slot % CPM_KV_BLOCK);
    return kv->data + (block * kv->block_elems + (size_t)li * cpm_kv_layer_elems(kv) +
                       off * (size_t)kv->k_dim) * kv->elem;
}

/* Value row, v_dim elements apart within a block. */
static inline void *cpm_kv_value(const cpm_kv_cache *kv, int li, int slot) {
    size_t block = (size_t)(slot / CPM_KV_BLOCK), off = (size_t)(slot % CPM_KV_BLOCK);
    return kv->data + (block * kv->block_elems + (size_t)li * cpm_kv_layer_elems(kv) +
                       (size_t)CPM_KV_BLOCK * (size_t)kv->k_dim + off * (size_t)kv->v_dim) *
                          kv->elem;
}

/* Sum of the CPM_KV_BLOCK keys of pool block `block` in stage layer li: k_dim
 * floats (kv->key_sums must be set). */
static inline float *cpm_kv_key_sum(const cpm_kv_cache *kv, int li, int block) {
    return kv->key_sums + ((size_t)block * (size_t)kv->n_layers + (size_t)li) * (size_t)kv->k_dim;
}

/* Pool block holding position pos of seq (reserved). */
static inline int cpm_kv_block_of(const cpm_kv_cache *kv, int seq, int pos) {
    return kv->seqs[seq].blocks[pos / CPM_KV_BLOCK];
}

/* After the keys of n rows were written to their slots in layer li: refreshes
 * the key sum of every block whose last slot is among them. No-op without key
 * sums. */
void cpm_kv_cache_sum_keys(cpm_kv_cache *kv, int li, const int *slots, int n);

#endif
