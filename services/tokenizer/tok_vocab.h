/* tok_vocab.h - the id <-> piece table of a tokenizer: piece strings in one blob,
 * per-id flags and merge ranks, and a hash index from piece text to id. Filled by
 * the loaders, then read-only; BPE looks up every candidate merge here.
 */
#ifndef CPM_TOK_VOCAB_H
#define CPM_TOK_VOCAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum cpm_vocab_flag {
    CPM_VOCAB_SET = 1,       /* the id has a piece */
    CPM_VOCAB_SPECIAL = 2,   /* dropped by decode(skip_special) */
    CPM_VOCAB_ADDED = 4,     /* matched whole in raw text */
    CPM_VOCAB_BYTE = 8,      /* "<0xNN>" byte-fallback piece */
    CPM_VOCAB_MERGEABLE = 16,/* SentencePiece: a merge may produce it */
    CPM_VOCAB_USERDEF = 32,  /* SentencePiece: user-defined, kept whole */
};

typedef struct cpm_vocab {
    int32_t n;        /* ids 0 .. n-1 */
    char *blob;       /* piece strings, each NUL-terminated */
    size_t blob_len, blob_cap;
    uint32_t *off, *len;
    uint8_t *flags;
    int32_t *rank;    /* merge priority, lower first (SentencePiece score order) */
    uint32_t max_len; /* longest piece, bytes */
    uint32_t *slots;  /* hash index: id + 1, 0 = empty */
    uint32_t *tags;   /* high hash bits of the slot's piece */
    size_t mask;
} cpm_vocab;

/* Sets up n ids with no pieces; returns 0 or CPM_ENOMEM. */
int cpm_vocab_init(cpm_vocab *v, int32_t n);
void cpm_vocab_release(cpm_vocab *v);
/* Grows the id range to n (new ids unset). */
int cpm_vocab_grow(cpm_vocab *v, int32_t n);
/* Stores the piece of id (once) and indexes it; when another id already has the
 * same text the index keeps the lower id. CPM_EINVAL when id is already set. */
int cpm_vocab_set(cpm_vocab *v, int32_t id, const char *s, size_t len);
/* The id of a piece, -1 if none. */
int32_t cpm_vocab_find(const cpm_vocab *v, const char *s, size_t len);

static inline const char *cpm_vocab_piece(const cpm_vocab *v, int32_t id) {
    return v->blob + v->off[id];
}

uint64_t cpm_vocab_hash(const char *s, size_t len);

#endif
