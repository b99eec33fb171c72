/* prefix.c - block hashes and the per-replica directory (see prefix.h): a u64map from
 * hash to entry, the entries in a doubly linked LRU list. */
#include "prefix.h"

#include <stdlib.h>

#include "../common/u64map.h"

uint64_t cpm_prefix_hash(uint64_t prev, const int32_t *block_tokens) {
    /* FNV-1a over the previous hash and the tokens, then a strong final mix: the chain
     * makes a block's hash name its whole prefix */
    uint64_t h = 0xcbf29ce484222325ull ^ prev;
    for (int i = 0; i < CPM_PREFIX_BLOCK; i++) {
        uint32_t t = (uint32_t)block_tokens[i];
        for (int b = 0; b < 4; b++) {
            h ^= (t >> (8 * b)) & 0xFF;
            h *= 0x100000001b3ull;
        }
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h ? h : 1;
}

int cpm_prefix_hashes(const int32_t *tokens, int n, uint64_t *out) {
    uint64_t prev = 0;
    int k = 0;
    for (; (k + 1) * CPM_PREFIX_BLOCK <= n; k++)
        out[k] = prev = cpm_prefix_hash(prev, tokens + k * CPM_PREFIX_BLOCK);
    return k;
}

typedef struct entry {
    uint64_t hash;
    int prev, next; /* LRU: head oldest */
} entry;

struct cpm_prefix {
    cpm_u64map *map; /* hash -> entry */
    entry *e;
    int cap, used, head, tail;
    int *free_list, n_free;
};

cpm_prefix *cpm_prefix_new(int max_blocks) {
    if (max_blocks < 1)
        max_blocks = 1;
    cpm_prefix *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->cap = max_blocks;
    d->map = cpm_u64map_new(max_blocks);
    d->e = malloc((size_t)max_blocks * sizeof *d->e);
    d->free_list = malloc((size_t)max_blocks * sizeof *d->free_list);
    if (!d->map || !d->e || !d->free_list) {
        cpm_prefix_free(d);
        return NULL;
    }
    cpm_prefix_clear(d);
    return d;
}

void cpm_prefix_free(cpm_prefix *d) {
    if (!d)
        return;
    cpm_u64map_free(d->map);
    free(d->e);
    free(d->free_list);
    free(d);
}

void cpm_prefix_clear(cpm_prefix *d) {
    cpm_u64map_clear(d->map);
    d->head = d->tail = -1;
    d->used = 0;
    d->n_free = d->cap;
    for (int i = 0; i < d->cap; i++)
        d->free_list[i] = d->cap - 1 - i;
}

int cpm_prefix_count(const cpm_prefix *d) {
    return d->used;
}

int cpm_prefix_match(const cpm_prefix *d, const uint64_t *hashes, int n) {
    int k = 0;
    while (k < n && cpm_u64map_get(d->map, hashes[k]) >= 0)
        k++;
    return k;
}

static void unlink_entry(cpm_prefix *d, int i) {
    entry *x = &d->e[i];
    if (x->prev >= 0)
        d->e[x->prev].next = x->next;
    else
        d->head = x->next;
    if (x->next >= 0)
        d->e[x->next].prev = x->prev;
    else
        d->tail = x->prev;
}

static void append(cpm_prefix *d, int i) {
    d->e[i].prev = d->tail;
    d->e[i].next = -1;
    if (d->tail >= 0)
        d->e[d->tail].next = i;
    else
        d->head = i;
    d->tail = i;
}

void cpm_prefix_touch(cpm_prefix *d, const uint64_t *hashes, int n) {
    for (int k = 0; k < n; k++) {
        int i = cpm_u64map_get(d->map, hashes[k]);
        if (i >= 0) {
            unlink_entry(d, i);
            append(d, i);
        }
    }
}

void cpm_prefix_add(cpm_prefix *d, uint64_t hash) {
    if (cpm_u64map_get(d->map, hash) >= 0) {
        cpm_prefix_touch(d, &hash, 1);
        return;
    }
    if (d->n_free == 0) { /* forget the oldest */
        int old = d->head;
        unlink_entry(d, old);
        cpm_u64map_remove(d->map, d->e[old].hash);
        d->free_list[d->n_free++] = old;
        d->used--;
    }
    int i = d->free_list[--d->n_free];
    d->e[i].hash = hash;
    cpm_u64map_put(d->map, hash, i);
    append(d, i);
    d->used++;
}
