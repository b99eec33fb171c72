/* u64map.c - the open-addressed hash map (see u64map.h). */
#include "u64map.h"

#include <stdlib.h>
#include <string.h>

typedef struct slot {
    uint64_t key; /* 0: empty */
    int value;
} slot;

struct cpm_u64map {
    slot *slots;
    size_t mask;
    int count, max;
};

cpm_u64map *cpm_u64map_new(int max_entries) {
    cpm_u64map *m = calloc(1, sizeof *m);
    size_t n = 16;
    while (n < 2 * (size_t)(max_entries > 0 ? max_entries : 1))
        n *= 2;
    if (m)
        m->slots = calloc(n, sizeof *m->slots);
    if (!m || !m->slots) {
        cpm_u64map_free(m);
        return NULL;
    }
    m->mask = n - 1;
    m->max = max_entries;
    return m;
}

void cpm_u64map_free(cpm_u64map *m) {
    if (!m)
        return;
    free(m->slots);
    free(m);
}

/* Keys are hashes already, but not always well mixed in their low bits. */
static size_t home(const cpm_u64map *m, uint64_t key) {
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & m->mask;
}

static size_t find(const cpm_u64map *m, uint64_t key) {
    size_t i = home(m, key);
    while (m->slots[i].key && m->slots[i].key != key)
        i = (i + 1) & m->mask;
    return i;
}

int cpm_u64map_get(const cpm_u64map *m, uint64_t key) {
    if (!key)
        return -1;
    const slot *s = &m->slots[find(m, key)];
    return s->key ? s->value : -1;
}

bool cpm_u64map_put(cpm_u64map *m, uint64_t key, int value) {
    if (!key || m->count >= m->max)
        return false;
    slot *s = &m->slots[find(m, key)];
    if (s->key)
        return false;
    *s = (slot){key, value};
    m->count++;
    return true;
}

void cpm_u64map_remove(cpm_u64map *m, uint64_t key) {
    if (!key)
        return;
    size_t i = find(m, key);
    if (!m->slots[i].key)
        return;
    /* move later entries of the run back into the hole, unless their home lies
     * cyclically in (hole, here] (they must stay at or after it) */
    for (size_t j = (i + 1) & m->mask; m->slots[j].key; j = (j + 1) & m->mask) {
        size_t want = home(m, m->slots[j].key);
        bool stays = i <= j ? (want > i && want <= j) : (want > i || want <= j);
        if (!stays) {
            m->slots[i] = m->slots[j];
            i = j;
        }
    }
    m->slots[i].key = 0;
    m->count--;
}

void cpm_u64map_clear(cpm_u64map *m) {
    memset(m->slots, 0, (m->mask + 1) * sizeof *m->slots);
    m->count = 0;
}

int cpm_u64map_count(const cpm_u64map *m) {
    return m->count;
}
