/* kv_cache_internal.h - the KV cache's layout, for the attention kernels that
 * read it in their inner loops (shard/engine/model/attention.c). Everyone else goes
 * through kv_cache.h.
 *
 * A block holds, for each stage layer, the keys of its CPM_KV_BLOCK tokens then
 * their CPM_KV_BLOCK value rows, as f32 (exact: the F32 reference bar needs it)
 * or f16 elements. Keys are rows too (k_dim elements apart), or, in a cache made
 * with keys_by_column, the block's k_dim x CPM_KV_BLOCK transpose: element e of
 * the key in the block's slot r at e * CPM_KV_BLOCK + r. That is the layout the
 * attention kernels read (16 keys to a vector, a KV head group's keys one
 * contiguous run), so a decode step reads its keys in place instead of
 * transposing every block again; writing a key scatters it instead.
 * The pool is 64-byte aligned, and so is each f32 block's key area (a KV group's
 * keys too: dk * 16 floats apart), which the kernels load as aligned vectors.
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
    bool keys_by_column; /* keys transposed per block (above) */
    size_t elem;         /* bytes per element */
    int n_blocks;
    int max_seqs;
    int max_blocks_per_seq;
    size_t block_elems;  /* n_layers * CPM_KV_BLOCK * (k_dim + v_dim) */
    char *data;          /* [n_blocks, block_elems] elements, 64-byte aligned in data_alloc */
    void *data_alloc;
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

/* The keys of pool block `block` in stage layer li: CPM_KV_BLOCK * k_dim
 * elements of kv->dtype, rows or by column as kv->keys_by_column says. */
static inline void *cpm_kv_block_keys(const cpm_kv_cache *kv, int li, int block) {
    return kv->data + ((size_t)block * kv->block_elems + (size_t)li * cpm_kv_layer_elems(kv)) *
                          kv->elem;
}

/* Key row of token slot `slot` in stage layer li, in a cache of key rows (not
 * keys_by_column): the rows of one block are contiguous, k_dim elements apart. */
static inline void *cpm_kv_key(const cpm_kv_cache *kv, int li, int slot) {
    return (char *)cpm_kv_block_keys(kv, li, slot / CPM_KV_BLOCK) +
           (size_t)(slot % CPM_KV_BLOCK) * (size_t)kv->k_dim * kv->elem;
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

/* Writes token slot `slot` of layer li: its key (k_dim floats) and value (v_dim
 * floats; NULL: none, as MLA's latent rows have none), in the cache's dtype and
 * layout. */
void cpm_kv_cache_store(cpm_kv_cache *kv, int li, int slot, const float *k, const float *v);

/* Element e of the key in token slot `slot` of layer li, widened to f32. */
float cpm_kv_cache_key_at(const cpm_kv_cache *kv, int li, int slot, int e);

/* After the keys of n rows were written to their slots in layer li: refreshes
 * the key sum of every block whose last slot is among them. No-op without key
 * sums. */
void cpm_kv_cache_sum_keys(cpm_kv_cache *kv, int li, const int *slots, int n);

#endif
