/* grammar.h - a byte-level context-free grammar and its matcher, for constrained decoding.
 *
 * A JSON Schema (json_grammar.h) becomes rules of alternatives, each a sequence of
 * elements: a byte from a set, another rule, or a whole JSON string (read by a small
 * lexer, so the inside of a string costs one stack, not one per UTF-8 form). Matching
 * keeps every stack that can still derive the text (the grammar may be ambiguous, as
 * anyOf is), each a persistent linked list in an arena: a state is a handful of stack
 * heads plus the arena's fill mark, small enough to copy at every node of the vocabulary
 * trie. A depth-first walk allocates above its parent's mark and so reuses the space its
 * siblings used.
 *
 *   cpm_gram *g = cpm_gram_new();
 *   int r = cpm_gram_rule(g);  cpm_gram_seq s = {0};
 *   cpm_gram_seq_lit(g, &s, "true", 4);  cpm_gram_alt(g, r, &s);  ...
 *   cpm_gram_finish(g, r, &err);
 *   cpm_gram_run *run = cpm_gram_run_new();  cpm_gram_state st;
 *   cpm_gram_start(run, g, &st);  cpm_gram_feed(run, &st, byte) ...
 *
 * Every element's shortest completion is known after finish, so cpm_gram_min_close is
 * exact: the fewest bytes that complete the text from a state.
 */
#ifndef CPM_GRAMMAR_H
#define CPM_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* Stacks one state follows at most. Past it, further alternatives of an ambiguous
 * grammar are dropped (cpm_gram_state.overflow); the schemas we compile stay far below. */
#define CPM_GRAM_HEADS 24
/* A shortest completion this long or more means "cannot complete". */
#define CPM_GRAM_INF (1 << 28)

enum cpm_gram_kind {
    CPM_GRAM_BYTE = 1,   /* one byte of set `arg` (cpm_gram_set) */
    CPM_GRAM_RULE = 2,   /* rule `arg` */
    CPM_GRAM_STRING = 3, /* a JSON string, quotes included; arg: CPM_GRAM_STR_* flags */
};

/* A string whose escapes Python reads as JSON does: no \/ and no \u (tool-call arguments
 * are Python literals; toolcall.c reads them back). */
#define CPM_GRAM_STR_PY 1u

typedef struct cpm_gram_el {
    uint8_t kind;
    uint32_t arg;
} cpm_gram_el;

/* A sequence being built (one alternative). oom is sticky. */
typedef struct cpm_gram_seq {
    cpm_gram_el *el;
    int n, cap;
    bool oom;
} cpm_gram_seq;

typedef struct cpm_gram cpm_gram;

cpm_gram *cpm_gram_new(void);
void cpm_gram_free(cpm_gram *g);

/* A new rule with no alternatives yet: its id, or -1 without memory. */
int cpm_gram_rule(cpm_gram *g);
/* A byte set from a 256-bit map (bit b of bits[b / 8]), interned: its id, or -1. */
int cpm_gram_set(cpm_gram *g, const uint8_t bits[32]);
/* Adds s (copied) as one alternative of rule; s is emptied for reuse. CPM_ENOMEM. */
int cpm_gram_alt(cpm_gram *g, int rule, cpm_gram_seq *s);

void cpm_gram_seq_push(cpm_gram_seq *s, cpm_gram_el e);
/* Appends n literal bytes, one single-byte set each. */
void cpm_gram_seq_lit(cpm_gram *g, cpm_gram_seq *s, const char *bytes, size_t n);
/* Appends one byte of [lo, hi]. */
void cpm_gram_seq_range(cpm_gram *g, cpm_gram_seq *s, uint8_t lo, uint8_t hi);
void cpm_gram_seq_free(cpm_gram_seq *s);

/* Freezes the grammar with `root` as its start and computes the shortest completions.
 * CPM_EINVAL when root derives no finite text, CPM_ENOMEM. */
int cpm_gram_finish(cpm_gram *g, int root, cpm_error *err);

/* ---- matching ------------------------------------------------------------------- */

/* The arena a state's stacks live in; one per thread of matching, reused. */
typedef struct cpm_gram_run cpm_gram_run;

typedef struct cpm_gram_state {
    uint32_t top;       /* arena nodes this state (and its ancestors) use */
    uint16_t n;         /* live stacks; 0: the text can never match */
    bool overflow;      /* some alternatives were dropped (more than CPM_GRAM_HEADS) */
    uint32_t head[CPM_GRAM_HEADS]; /* 0 is the empty stack: the text is complete */
} cpm_gram_state;

cpm_gram_run *cpm_gram_run_new(void);
void cpm_gram_run_free(cpm_gram_run *r);

/* Resets r's arena for grammar g and sets st to the start. false without memory. */
bool cpm_gram_start(cpm_gram_run *r, const cpm_gram *g, cpm_gram_state *st);

/* Takes one byte; false when no stack survives it (or the arena ran out of memory:
 * cpm_gram_run_oom). */
bool cpm_gram_feed(cpm_gram_run *r, cpm_gram_state *st, uint8_t b);

bool cpm_gram_run_oom(const cpm_gram_run *r);

/* The text so far is a complete sentence (a stop may follow; more bytes may too). */
bool cpm_gram_done(const cpm_gram_state *st);

/* The fewest bytes that complete the text (0 when done, CPM_GRAM_INF when dead). */
int cpm_gram_min_close(const cpm_gram_run *r, const cpm_gram_state *st);

#endif
