/* u64map.h - a fixed-capacity map from non-zero 64-bit keys (hashes) to ints.
 *
 * Open addressing with linear probing, sized at creation to twice the most entries it
 * will hold, so nothing is allocated after cpm_u64map_new. Deletion shifts the rest of
 * a probe run back (no tombstones), so a map that churns forever stays fast. Used for
 * the prefix cache's block hashes (shard/engine/kv_cache.c, router/prefix.c).
 */
#ifndef CPM_U64MAP_H
#define CPM_U64MAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cpm_u64map cpm_u64map;

/* Room for max_entries; NULL without memory. */
cpm_u64map *cpm_u64map_new(int max_entries);
/* Accepts NULL. */
void cpm_u64map_free(cpm_u64map *m);

/* The value of key, or -1. */
int cpm_u64map_get(const cpm_u64map *m, uint64_t key);
/* Adds key -> value; false when key is 0, already there, or the map is full. */
bool cpm_u64map_put(cpm_u64map *m, uint64_t key, int value);
/* Removes key (absent: nothing). */
void cpm_u64map_remove(cpm_u64map *m, uint64_t key);
/* Removes every key. */
void cpm_u64map_clear(cpm_u64map *m);
int cpm_u64map_count(const cpm_u64map *m);

#endif
