/* json_match.h - a byte-level matcher for one JSON object, for constrained decoding.
 *
 * The sampler asks, for every token of the vocabulary, whether the text generated so far
 * followed by that token's bytes can still become one complete JSON object (RFC 8259).
 * The matcher is a pushdown automaton small enough to copy by value at every byte, so
 * the vocabulary can be walked as a trie (services/sampler/vocab_trie.h) from a state.
 *
 * Deliberate restrictions, so a model with any weights finishes in bounded text: no
 * whitespace outside strings (JSON without it is the same JSON), nothing after the
 * object, nesting at most CPM_JM_MAX_DEPTH. Strings must be valid UTF-8 (no overlong
 * forms, no surrogates), escapes as JSON defines them.
 *
 *   cpm_jm m;  cpm_jm_init(&m);
 *   for each byte: if (!cpm_jm_feed(&m, b)) -> the text can never be JSON
 *   cpm_jm_done(&m)         -> the object is complete (only a stop token may follow)
 *   cpm_jm_min_close(&m)    -> fewest bytes that complete it
 */
#ifndef CPM_JSON_MATCH_H
#define CPM_JSON_MATCH_H

#include <stdbool.h>
#include <stdint.h>

#define CPM_JM_MAX_DEPTH 48

typedef struct cpm_jm {
    uint8_t depth;                    /* frames in use (frame[0] is the top level) */
    uint8_t frame[CPM_JM_MAX_DEPTH];  /* each frame's state (json_match.c) */
    uint8_t lex;                      /* the scalar being read, 0 between values */
    uint8_t aux;                      /* literal position / hex digits / UTF-8 bytes left */
    uint8_t lo, hi;                   /* the range of the next UTF-8 continuation byte */
    const char *lit;                  /* the literal being read ("true", ...) */
    bool dead;
} cpm_jm;

void cpm_jm_init(cpm_jm *m);

/* Takes one byte; false (and the matcher is dead) when no JSON object can start with
 * the text so far. */
bool cpm_jm_feed(cpm_jm *m, uint8_t b);

/* The object is complete: nothing but a stop may follow. */
bool cpm_jm_done(const cpm_jm *m);

/* The fewest bytes that complete the object from here (0 when done). */
int cpm_jm_min_close(const cpm_jm *m);

#endif
