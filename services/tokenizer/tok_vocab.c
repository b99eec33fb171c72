/* tok_vocab.c - piece table and piece -> id hash index (see tok_vocab.h). The
 * index is open addressing with linear probing at load factor <= 1/2, so the
 * lookups BPE does for every candidate merge cost one or two probes. */
#include "services/tokenizer/tok_vocab.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"

/* A multiply-xorshift hash reading 8 bytes at a time: pieces are short, and this
 * runs for every merge candidate, so it must beat byte-at-a-time FNV. */
uint64_t cpm_vocab_hash(const char *s, size_t len) {
    const uint64_t m = 0x9E3779B97F4A7C15ull;
    uint64_t h = (uint64_t)len * m;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        s += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, len);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    h *= m;
    h ^= h >> 32;
    return h;
}

int cpm_vocab_init(cpm_vocab *v, int32_t n) {
    memset(v, 0, sizeof *v);
    return cpm_vocab_grow(v, n);
}

void cpm_vocab_release(cpm_vocab *v) {
    if (!v)
        return;
    free(v->blob);
    free(v->off);
    free(v->len);
    free(v->flags);
    free(v->rank);
    free(v->slots);
    free(v->tags);
    memset(v, 0, sizeof *v);
}

static int index_insert(uint32_t *slots, uint32_t *tags, size_t mask, const cpm_vocab *v,
                        int32_t id) {
    const char *s = cpm_vocab_piece(v, id);
    uint64_t h = cpm_vocab_hash(s, v->len[id]);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        if (slots[i] == 0) {
            slots[i] = (uint32_t)id + 1;
            tags[i] = tag;
            return 0;
        }
        int32_t other = (int32_t)slots[i] - 1;
        if (tags[i] == tag && v->len[other] == v->len[id] &&
            memcmp(cpm_vocab_piece(v, other), s, v->len[id]) == 0) {
            if (id < other)
                slots[i] = (uint32_t)id + 1;
            return 0;
        }
    }
}

/* Rebuilds the index with room for n pieces at load <= 1/2. */
static int index_resize(cpm_vocab *v, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    if (cap - 1 == v->mask && v->slots)
        return 0;
    uint32_t *slots = calloc(cap, sizeof *slots);
    uint32_t *tags = calloc(cap, sizeof *tags);
    if (!slots || !tags) {
        free(slots);
        free(tags);
        return CPM_ENOMEM;
    }
    for (int32_t id = 0; id < v->n; id++)
        if (v->flags[id] & CPM_VOCAB_SET)
            index_insert(slots, tags, cap - 1, v, id);
    free(v->slots);
    free(v->tags);
    v->slots = slots;
    v->tags = tags;
    v->mask = cap - 1;
    return 0;
}

int cpm_vocab_grow(cpm_vocab *v, int32_t n) {
    if (n < v->n)
        return 0;
    size_t nn = (size_t)(n > 0 ? n : 1);
    uint32_t *off = realloc(v->off, nn * sizeof *off);
    if (off)
        v->off = off;
    uint32_t *len = realloc(v->len, nn * sizeof *len);
    if (len)
        v->len = len;
    uint8_t *flags = realloc(v->flags, nn);
    if (flags)
        v->flags = flags;
    int32_t *rank = realloc(v->rank, nn * sizeof *rank);
    if (rank)
        v->rank = rank;
    if (!off || !len || !flags || !rank)
        return CPM_ENOMEM;
    for (int32_t i = v->n; i < n; i++) {
        v->off[i] = 0;
        v->len[i] = 0;
        v->flags[i] = 0;
        v->rank[i] = INT32_MAX;
    }
    v->n = n;
    return index_resize(v, (size_t)n);
}

int cpm_vocab_set(cpm_vocab *v, int32_t id, const char *s, size_t len) {
    if (id < 0 || id >= v->n || (v->flags[id] & CPM_VOCAB_SET) || len > UINT32_MAX / 4)
        return CPM_EINVAL;
    if (v->blob_len + len + 1 > v->blob_cap) {
        size_t cap = v->blob_cap ? v->blob_cap : 4096;
        while (cap < v->blob_len + len + 1)
            cap *= 2;
        if (cap > UINT32_MAX)
            return CPM_ELIMIT;
        char *blob = realloc(v->blob, cap);
        if (!blob)
            return CPM_ENOMEM;
        v->blob = blob;
        v->blob_cap = cap;
    }
    memcpy(v->blob + v->blob_len, s, len);
    v->blob[v->blob_len + len] = '\0';
    v->off[id] = (uint32_t)v->blob_len;
    v->len[id] = (uint32_t)len;
    v->blob_len += len + 1;
    v->flags[id] |= CPM_VOCAB_SET;
    if (len > v->max_len)
        v->max_len = (uint32_t)len;
    return index_insert(v->slots, v->tags, v->mask, v, id);
}

int32_t cpm_vocab_find(const cpm_vocab *v, const char *s, size_t len) {
    if (!v->slots || len > v->max_len)
        return -1;
    uint64_t h = cpm_vocab_hash(s, len);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = (size_t)h & v->mask;; i = (i + 1) & v->mask) {
        uint32_t slot = v->slots[i];
        if (slot == 0)
            return -1;
        int32_t id = (int32_t)slot - 1;
        if (v->tags[i] == tag && v->len[id] == len &&
            memcmp(v->blob + v->off[id], s, len) == 0)
            return id;
    }
}
