/* kv_cache_internal.h - the KV cache's layout, for the attention kernels that
 * read it in their inner loops (shard/model/attention.c). Everyone else goes
 * through kv_cache.h.
 *
 * A block holds, for each stage layer, CPM_KV_BLOCK key rows then CPM_KV_BLOCK
 * value rows, all f32 (the F32 reference bar needs f32 keys).
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
    int k_dim, v_dim;    /* floats per token per layer */
    int n_blocks;
    int max_seqs;
    int max_blocks_per_seq;
    size_t block_floats; /* n_layers * CPM_KV_BLOCK * (k_dim + v_dim) */
    float *data;         /* [n_blocks, block_floats] */
    int *free_blocks;    /* stack */
    int n_free;
    struct cpm_kv_seq *seqs;
    int *block_tables;   /* [max_seqs, max_blocks_per_seq] */
};

/* Slot of position pos in seq, which must be reserved. */
static inline int cpm_kv_slot(const cpm_kv_cache *kv, int seq, int pos) {
    const struct cpm_kv_seq *s = &kv->seqs[seq];
    return s->blocks[pos / CPM_KV_BLOCK] * CPM_KV_BLOCK + pos % CPM_KV_BLOCK;
}

static inline size_t cpm_kv_layer_floats(const cpm_kv_cache *kv) {
    return (size_t)CPM_KV_BLOCK * (size_t)(kv->k_dim + kv->v_dim);
}

/* Key row of token slot `slot` in stage layer li; the rows of one block are
 * contiguous, k_dim floats apart. */
static inline float *cpm_kv_key(const cpm_kv_cache *kv, int li, int slot) {
    size_t block = (size_t)(slot / CPM_KV_BLOCK), off = (size_t)(slot % CPM_KV_BLOCK);
    return kv->data + block * kv->block_floats + (size_t)li * cpm_kv_layer_floats(kv) +
           off * (size_t)kv->k_dim;
}

/* Value row, v_dim floats apart within a block. */
static inline float *cpm_kv_value(const cpm_kv_cache *kv, int li, int slot) {
    size_t block = (size_t)(slot / CPM_KV_BLOCK), off = (size_t)(slot % CPM_KV_BLOCK);
    return kv->data + block * kv->block_floats + (size_t)li * cpm_kv_layer_floats(kv) +
           (size_t)CPM_KV_BLOCK * (size_t)kv->k_dim + off * (size_t)kv->v_dim;
}

#endif
