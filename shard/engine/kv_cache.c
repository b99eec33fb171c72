/* kv_cache.c - paged KV cache: a block pool, per-sequence block tables, and the
 * prefix cache's published blocks (a hash table and an LRU of the idle ones).
 * The layout is in kv_cache_internal.h. */
#include "kv_cache.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../../common/u64map.h"
#include "kernels/ops.h"
#include "kv_cache_internal.h"

/* Every page of the block pool made resident now. Untouched, the first store into
 * each fresh block faulted its pages in during a decode step (a 1B block is 3.4 MB:
 * milliseconds per new block, in the middle of serving); and a pool the machine
 * cannot back fails here, at start, rather than killing the process mid-request.
 * llama.cpp clears its KV buffer at start for the same effect. */
static void prefault(void *p, size_t bytes) {
    const size_t page = 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(uintptr_t)(page - 1);
    if (end > a) /* 2 MB pages where the kernel gives them: each decode row stored lands
                  * in another block, a TLB miss per row on 4 KB pages */
        madvise((void *)a, end - a, MADV_HUGEPAGE);
#ifdef MADV_POPULATE_WRITE
    if (end > a && madvise((void *)a, end - a, MADV_POPULATE_WRITE) == 0)
        return;
#endif
    for (volatile char *c = p; (uintptr_t)c < (uintptr_t)p + bytes; c += page)
        *c = 0; /* calloc's zeros: writing one faults the page in */
}

cpm_kv_cache *cpm_kv_cache_new(const cpm_kv_geometry *g, int max_tokens, int max_seqs,
                               cpm_error *err) {
    if (max_tokens < 1 || max_seqs < 1) {
        cpm_error_set(err, CPM_EINVAL, "kv cache: max_tokens and max_seqs must be >= 1");
        return NULL;
    }
    if (g->dtype != CPM_DTYPE_F32 && g->dtype != CPM_DTYPE_F16) {
        cpm_error_set(err, CPM_EUNSUPPORTED, "kv cache: dtype %s (F32 and F16 are supported)",
                      cpm_dtype_name(g->dtype));
        return NULL;
    }
    cpm_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv)
        goto out_nomem;
    kv->n_layers = g->n_layers;
    kv->k_dim = g->k_dim;
    kv->v_dim = g->v_dim;
    kv->dtype = g->dtype;
    kv->keys_by_column = g->keys_by_column;
    kv->elem = cpm_dtype_size(g->dtype);
    kv->max_seqs = max_seqs;
    kv->n_blocks = (max_tokens + CPM_KV_BLOCK - 1) / CPM_KV_BLOCK;
    kv->max_blocks_per_seq = kv->n_blocks;
    kv->block_elems = (size_t)kv->n_layers * cpm_kv_layer_elems(kv);
    /* calloc for its zeros (fresh pages, no clearing pass), 64 bytes over to align */
    size_t pool = (size_t)kv->n_blocks * kv->block_elems * kv->elem;
    if ((kv->data_alloc = calloc(1, pool + 64)))
        kv->data = (char *)(((uintptr_t)kv->data_alloc + 63) & ~(uintptr_t)63);
    if (g->key_sums && !(kv->key_sums = calloc((size_t)kv->n_blocks * (size_t)kv->n_layers,
                                               (size_t)kv->k_dim * sizeof(float))))
        goto out_nomem;
    kv->free_blocks = malloc((size_t)kv->n_blocks * sizeof(int));
    kv->seqs = calloc((size_t)max_seqs, sizeof *kv->seqs);
    kv->block_tables = malloc((size_t)max_seqs * (size_t)kv->max_blocks_per_seq * sizeof(int));
    kv->table = cpm_u64map_new(kv->n_blocks);
    kv->refs = calloc((size_t)kv->n_blocks, sizeof *kv->refs);
    kv->hash = calloc((size_t)kv->n_blocks, sizeof *kv->hash);
    kv->lru_prev = malloc((size_t)kv->n_blocks * sizeof *kv->lru_prev);
    kv->lru_next = malloc((size_t)kv->n_blocks * sizeof *kv->lru_next);
    kv->lru_head = kv->lru_tail = -1;
    if (!kv->data || !kv->free_blocks || !kv->seqs || !kv->block_tables || !kv->table ||
        !kv->refs || !kv->hash || !kv->lru_prev || !kv->lru_next)
        goto out_nomem;
    prefault(kv->data, pool);
    for (int i = 0; i < kv->n_blocks; i++) /* pop order: block 0 first */
        kv->free_blocks[i] = kv->n_blocks - 1 - i;
    kv->n_free = kv->n_blocks;
    for (int s = 0; s < max_seqs; s++)
        kv->seqs[s].blocks = kv->block_tables + (size_t)s * (size_t)kv->max_blocks_per_seq;
    return kv;

out_nomem:
    cpm_kv_cache_free(kv);
    cpm_error_set(err, CPM_ENOMEM, "kv cache: cannot reserve %d tokens x %d layers", max_tokens,
                  g->n_layers);
    return NULL;
}

void cpm_kv_cache_free(cpm_kv_cache *kv) {
    if (!kv)
        return;
    free(kv->data_alloc);
    free(kv->key_sums);
    free(kv->free_blocks);
    free(kv->seqs);
    free(kv->block_tables);
    cpm_u64map_free(kv->table);
    free(kv->refs);
    free(kv->hash);
    free(kv->lru_prev);
    free(kv->lru_next);
    free(kv);
}

/* ---- published blocks: the hash map and the LRU of idle ones --------------------- */

static int table_find(const cpm_kv_cache *kv, uint64_t h) {
    return cpm_u64map_get(kv->table, h);
}

static void unpublish(cpm_kv_cache *kv, int b) {
    cpm_u64map_remove(kv->table, kv->hash[b]);
    kv->hash[b] = 0;
    kv->n_published--;
}

static void lru_push(cpm_kv_cache *kv, int b) {
    kv->lru_prev[b] = kv->lru_tail;
    kv->lru_next[b] = -1;
    if (kv->lru_tail >= 0)
        kv->lru_next[kv->lru_tail] = b;
    else
        kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_idle++;
}

static void lru_remove(cpm_kv_cache *kv, int b) {
    if (kv->lru_prev[b] >= 0)
        kv->lru_next[kv->lru_prev[b]] = kv->lru_next[b];
    else
        kv->lru_head = kv->lru_next[b];
    if (kv->lru_next[b] >= 0)
        kv->lru_prev[kv->lru_next[b]] = kv->lru_prev[b];
    else
        kv->lru_tail = kv->lru_prev[b];
    kv->n_idle--;
}

/* A block for one holder: a free one, else the oldest idle published one (evicted).
 * The caller checked that one exists. */
static int block_take(cpm_kv_cache *kv) {
    int b;
    if (kv->n_free > 0) {
        b = kv->free_blocks[--kv->n_free];
    } else {
        b = kv->lru_head;
        lru_remove(kv, b);
        unpublish(kv, b);
    }
    kv->refs[b] = 1;
    return b;
}

static void block_drop(cpm_kv_cache *kv, int b) {
    if (--kv->refs[b] > 0)
        return;
    if (kv->hash[b])
        lru_push(kv, b); /* kept for a later prompt with the same prefix */
    else
        kv->free_blocks[kv->n_free++] = b;
}

/* A private copy of the seq's block index i (shared: rewinding will overwrite it). */
static void copy_on_write(cpm_kv_cache *kv, struct cpm_kv_seq *s, int i) {
    int from = s->blocks[i], to = block_take(kv);
    memcpy(kv->data + (size_t)to * kv->block_elems * kv->elem,
           kv->data + (size_t)from * kv->block_elems * kv->elem, kv->block_elems * kv->elem);
    if (kv->key_sums)
        memcpy(cpm_kv_key_sum(kv, 0, to), cpm_kv_key_sum(kv, 0, from),
               (size_t)kv->n_layers * (size_t)kv->k_dim * sizeof(float));
    s->blocks[i] = to;
    block_drop(kv, from);
}

int cpm_kv_cache_seq_new(cpm_kv_cache *kv, cpm_error *err) {
    for (int s = 0; s < kv->max_seqs; s++) {
        if (!kv->seqs[s].live) {
            kv->seqs[s].live = true;
            kv->seqs[s].len = 0;
            kv->seqs[s].n_blocks = 0;
            return s;
        }
    }
    return cpm_error_set(err, CPM_ELIMIT, "kv cache: all %d sequence slots are in use",
                         kv->max_seqs);
}

static bool seq_valid(const cpm_kv_cache *kv, int seq) {
    return seq >= 0 && seq < kv->max_seqs && kv->seqs[seq].live;
}

int cpm_kv_cache_seq_truncate(cpm_kv_cache *kv, int seq, int len) {
    if (!seq_valid(kv, seq) || len < 0)
        return 0;
    struct cpm_kv_seq *s = &kv->seqs[seq];
    int keep = (len + CPM_KV_BLOCK - 1) / CPM_KV_BLOCK;
    if (len < s->len && len % CPM_KV_BLOCK && keep <= s->n_blocks) {
        /* the kept block will be written again from len on */
        int b = s->blocks[keep - 1];
        if (kv->refs[b] > 1) {
            if (kv->n_free + kv->n_idle == 0)
                return CPM_ELIMIT;
            copy_on_write(kv, s, keep - 1);
        } else if (kv->hash[b]) {
            unpublish(kv, b);
        }
    }
    while (s->n_blocks > keep)
        block_drop(kv, s->blocks[--s->n_blocks]);
    if (s->len > len)
        s->len = len;
    return 0;
}

int cpm_kv_cache_seq_attach(cpm_kv_cache *kv, int seq, const uint64_t *hashes, int n,
                            cpm_error *err) {
    if (!seq_valid(kv, seq) || kv->seqs[seq].len || kv->seqs[seq].n_blocks)
        return cpm_error_set(err, CPM_EINVAL, "kv cache: a prefix attaches only to a new sequence");
    if (n < 0 || n > kv->max_blocks_per_seq)
        return cpm_error_set(err, CPM_ELIMIT, "kv cache: a prefix of %d blocks", n);
    for (int i = 0; i < n; i++)
        if (!hashes[i] || table_find(kv, hashes[i]) < 0)
            return cpm_error_set(err, CPM_ESTALE, "kv cache: prefix block %d of %d is not cached "
                                 "(evicted, or never reached this stage)", i, n);
    struct cpm_kv_seq *s = &kv->seqs[seq];
    for (int i = 0; i < n; i++) {
        int b = table_find(kv, hashes[i]);
        if (kv->refs[b]++ == 0)
            lru_remove(kv, b);
        s->blocks[s->n_blocks++] = b;
    }
    s->len = n * CPM_KV_BLOCK;
    return 0;
}

int cpm_kv_cache_seq_publish(cpm_kv_cache *kv, int seq, int first, const uint64_t *hashes, int n) {
    if (!seq_valid(kv, seq) || first < 0)
        return 0;
    const struct cpm_kv_seq *s = &kv->seqs[seq];
    int done = 0;
    for (int i = 0; i < n && first + i < s->n_blocks; i++) {
        int b = s->blocks[first + i];
        if (s->len < (first + i + 1) * CPM_KV_BLOCK)
            break; /* not full yet */
        if (kv->hash[b] || !hashes[i] || table_find(kv, hashes[i]) >= 0)
            continue;
        kv->hash[b] = hashes[i];
        cpm_u64map_put(kv->table, hashes[i], b);
        kv->n_published++;
        done++;
    }
    return done;
}

void cpm_kv_cache_cached(const cpm_kv_cache *kv, int *ret_idle, int *ret_published) {
    *ret_idle = kv->n_idle;
    *ret_published = kv->n_published;
}

void cpm_kv_cache_seq_free(cpm_kv_cache *kv, int seq) {
    if (!seq_valid(kv, seq))
        return;
    cpm_kv_cache_seq_truncate(kv, seq, 0);
    kv->seqs[seq].live = false;
}

int cpm_kv_cache_seq_len(const cpm_kv_cache *kv, int seq) {
    return seq_valid(kv, seq) ? kv->seqs[seq].len : -1;
}

void cpm_kv_cache_usage(const cpm_kv_cache *kv, int *ret_used, int *ret_total) {
    *ret_used = kv->n_blocks - kv->n_free - kv->n_idle;
    *ret_total = kv->n_blocks;
}

/* Positions of each sequence must continue its cache: the first row of seq s
 * has pos == len(s) and each later row of s has the previous pos + 1. `next`
 * tracks the expected position per sequence during validation, in a pass that
 * first counts the blocks needed so a failure changes nothing. */
int cpm_kv_cache_reserve(cpm_kv_cache *kv, const cpm_batch *b, int *slots, cpm_error *err) {
    int need = 0;
    for (int i = 0; i < b->n_tokens; i++) {
        int sq = b->seq[i];
        if (!seq_valid(kv, sq))
            return cpm_error_set(err, CPM_EINVAL, "batch row %d: unknown sequence %d", i, sq);
        int expect = kv->seqs[sq].len;
        for (int j = 0; j < i; j++)
            if (b->seq[j] == sq)
                expect = b->pos[j] + 1;
        if (b->pos[i] != expect)
            return cpm_error_set(err, CPM_EINVAL,
                                 "batch row %d: sequence %d position %d, expected %d", i, sq,
                                 b->pos[i], expect);
        if (b->pos[i] / CPM_KV_BLOCK >= kv->max_blocks_per_seq)
            return cpm_error_set(err, CPM_ELIMIT, "sequence %d: position %d exceeds the cache",
                                 sq, b->pos[i]);
        if (b->pos[i] % CPM_KV_BLOCK == 0 && b->pos[i] / CPM_KV_BLOCK >= kv->seqs[sq].n_blocks)
            need++;
    }
    if (need > kv->n_free + kv->n_idle)
        return cpm_error_set(err, CPM_ELIMIT, "kv cache full: %d blocks needed, %d free", need,
                             kv->n_free + kv->n_idle);
    for (int i = 0; i < b->n_tokens; i++) {
        struct cpm_kv_seq *s = &kv->seqs[b->seq[i]];
        if (b->pos[i] / CPM_KV_BLOCK >= s->n_blocks)
            s->blocks[s->n_blocks++] = block_take(kv);
        slots[i] = cpm_kv_slot(kv, b->seq[i], b->pos[i]);
    }
    return 0;
}

void cpm_kv_cache_commit(cpm_kv_cache *kv, const cpm_batch *b) {
    for (int i = 0; i < b->n_tokens; i++) {
        struct cpm_kv_seq *s = &kv->seqs[b->seq[i]];
        if (b->pos[i] + 1 > s->len)
            s->len = b->pos[i] + 1;
    }
}

/* ---- writing and reading keys in either layout ----------------------------------- */

/* Index of element e of the block's key r among the block's key elements. */
static size_t key_index(const cpm_kv_cache *kv, int r, int e) {
    return kv->keys_by_column ? (size_t)e * CPM_KV_BLOCK + (size_t)r
                              : (size_t)r * (size_t)kv->k_dim + (size_t)e;
}

static void store_row(const cpm_kv_cache *kv, void *dst, const float *src, int n) {
    if (kv->dtype == CPM_DTYPE_F16)
        cpm_f32_to_f16_row(dst, src, n);
    else
        memcpy(dst, src, (size_t)n * sizeof(float));
}

/* One key scattered down its block's columns, CPM_KV_BLOCK elements apart; f16
 * goes through the row conversion (the same rounding as a stored row). */
static void store_key_column(const cpm_kv_cache *kv, void *keys, int r, const float *k) {
    enum { CHUNK = 64 };
    for (int e0 = 0; e0 < kv->k_dim; e0 += CHUNK) {
        int n = kv->k_dim - e0 < CHUNK ? kv->k_dim - e0 : CHUNK;
        if (kv->dtype == CPM_DTYPE_F32) {
            for (int e = 0; e < n; e++)
                ((float *)keys)[(size_t)(e0 + e) * CPM_KV_BLOCK + (size_t)r] = k[e0 + e];
        } else {
            uint16_t h[CHUNK];
            cpm_f32_to_f16_row(h, k + e0, n);
            for (int e = 0; e < n; e++)
                ((uint16_t *)keys)[(size_t)(e0 + e) * CPM_KV_BLOCK + (size_t)r] = h[e];
        }
    }
}

void cpm_kv_cache_store(cpm_kv_cache *kv, int li, int slot, const float *k, const float *v) {
    if (kv->keys_by_column)
        store_key_column(kv, cpm_kv_block_keys(kv, li, slot / CPM_KV_BLOCK), slot % CPM_KV_BLOCK, k);
    else
        store_row(kv, cpm_kv_key(kv, li, slot), k, kv->k_dim);
    if (v)
        store_row(kv, cpm_kv_value(kv, li, slot), v, kv->v_dim);
}

float cpm_kv_cache_key_at(const cpm_kv_cache *kv, int li, int slot, int e) {
    const void *keys = cpm_kv_block_keys(kv, li, slot / CPM_KV_BLOCK);
    size_t i = key_index(kv, slot % CPM_KV_BLOCK, e);
    return kv->dtype == CPM_DTYPE_F32 ? ((const float *)keys)[i]
                                      : cpm_f16_to_f32(((const uint16_t *)keys)[i]);
}

/* Sums in f32, keys in slot order: the block's 16 keys are all in place once its
 * last slot is written (earlier ones by this batch or by earlier calls). */
void cpm_kv_cache_sum_keys(cpm_kv_cache *kv, int li, const int *slots, int n) {
    if (!kv->key_sums)
        return;
    for (int i = 0; i < n; i++) {
        if (slots[i] % CPM_KV_BLOCK != CPM_KV_BLOCK - 1)
            continue;
        int block = slots[i] / CPM_KV_BLOCK;
        float *sum = cpm_kv_key_sum(kv, li, block);
        for (int e = 0; e < kv->k_dim; e++) {
            float s = 0.0f;
            for (int r = 0; r < CPM_KV_BLOCK; r++)
                s += cpm_kv_cache_key_at(kv, li, block * CPM_KV_BLOCK + r, e);
            sum[e] = s;
        }
    }
}
