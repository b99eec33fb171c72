/* vocab_trie.c - the vocabulary's byte trie and the constrained-decoding mask. */
#include "vocab_trie.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tokenizer.h"

typedef struct node {
    int32_t child, sibling; /* first child, next sibling (-1: none) */
    int32_t tokens;         /* first token ending here (-1: none), then next_token[] */
    uint8_t byte;
} node;

struct cpm_vtrie {
    int vocab;
    node *nodes;
    int n_nodes, cap_nodes;
    int32_t *next_token;    /* [vocab] */
    uint32_t *off;          /* [vocab + 1] each token's bytes in bytes[] */
    uint8_t *bytes;
};

static int32_t add_node(cpm_vtrie *t, uint8_t b) {
    if (t->n_nodes == t->cap_nodes) {
        int cap = t->cap_nodes ? t->cap_nodes * 2 : 1 << 16;
        node *n = realloc(t->nodes, (size_t)cap * sizeof *n);
        if (!n)
            return -1;
        t->nodes = n;
        t->cap_nodes = cap;
    }
    t->nodes[t->n_nodes] = (node){.child = -1, .sibling = -1, .tokens = -1, .byte = b};
    return t->n_nodes++;
}

/* The child of parent for byte b, made when missing; -1 without memory. */
static int32_t child_of(cpm_vtrie *t, int32_t parent, uint8_t b) {
    for (int32_t c = t->nodes[parent].child; c >= 0; c = t->nodes[c].sibling)
        if (t->nodes[c].byte == b)
            return c;
    int32_t c = add_node(t, b);
    if (c >= 0) {
        t->nodes[c].sibling = t->nodes[parent].child;
        t->nodes[parent].child = c;
    }
    return c;
}

static int insert(cpm_vtrie *t, int32_t id) {
    int32_t at = 0;
    for (uint32_t i = t->off[id]; i < t->off[id + 1] && at >= 0; i++)
        at = child_of(t, at, t->bytes[i]);
    if (at < 0)
        return CPM_ENOMEM;
    t->next_token[id] = t->nodes[at].tokens;
    t->nodes[at].tokens = id;
    return 0;
}

/* Every token's bytes into one pool. */
static int read_bytes(cpm_vtrie *t, const cpm_tokenizer *tok) {
    size_t cap = (size_t)t->vocab * 8, used = 0;
    t->bytes = malloc(cap);
    if (!t->bytes)
        return CPM_ENOMEM;
    for (int id = 0; id < t->vocab; id++) {
        t->off[id] = (uint32_t)used;
        int n;
        while ((n = cpm_tokenizer_token_bytes(tok, id, (char *)t->bytes + used, cap - used)) < 0) {
            uint8_t *b = realloc(t->bytes, cap * 2);
            if (!b)
                return CPM_ENOMEM;
            t->bytes = b;
            cap *= 2;
        }
        used += (size_t)n;
    }
    t->off[t->vocab] = (uint32_t)used;
    return 0;
}

int cpm_vtrie_new(const cpm_tokenizer *tok, cpm_vtrie **ret, cpm_error *err) {
    *ret = NULL;
    cpm_vtrie *t = calloc(1, sizeof *t);
    if (!t)
        return cpm_error_set(err, CPM_ENOMEM, "vocabulary trie");
    t->vocab = cpm_tokenizer_vocab_size(tok);
    t->next_token = malloc((size_t)t->vocab * sizeof *t->next_token);
    t->off = malloc(((size_t)t->vocab + 1) * sizeof *t->off);
    int rc = t->next_token && t->off && add_node(t, 0) == 0 ? read_bytes(t, tok) : CPM_ENOMEM;
    for (int id = 0; rc == 0 && id < t->vocab; id++)
        if (t->off[id + 1] > t->off[id])
            rc = insert(t, id);
    if (rc) {
        cpm_vtrie_free(t);
        return cpm_error_set(err, rc, "vocabulary trie: out of memory");
    }
    *ret = t;
    return 0;
}

void cpm_vtrie_free(cpm_vtrie *t) {
    if (!t)
        return;
    free(t->nodes);
    free(t->next_token);
    free(t->off);
    free(t->bytes);
    free(t);
}

int cpm_vtrie_vocab(const cpm_vtrie *t) {
    return t->vocab;
}

bool cpm_vtrie_feed(const cpm_vtrie *t, const cpm_vtrie_matcher *mt, void *state, int32_t id) {
    if (id < 0 || id >= t->vocab || t->off[id + 1] == t->off[id])
        return false;
    for (uint32_t i = t->off[id]; i < t->off[id + 1]; i++)
        if (!mt->feed(mt->ctx, state, t->bytes[i]))
            return false;
    return true;
}

typedef struct walk {
    const cpm_vtrie *t;
    const cpm_vtrie_matcher *mt;
    int budget;
    int closest; /* >= 0: allow the tokens that leave at most this many bytes to close */
    int best;    /* the fewest bytes left to close after any one live token (INT_MAX: none) */
    uint8_t *allowed;
    int count;
} walk;

/* The subtree under node at, whose prefix leaves the matcher in state m. */
static void visit(walk *w, int32_t at, const void *m) {
    _Alignas(16) unsigned char next[CPM_VTRIE_STATE_MAX];
    const cpm_vtrie_matcher *mt = w->mt;
    for (int32_t c = w->t->nodes[at].child; c >= 0; c = w->t->nodes[c].sibling) {
        memcpy(next, m, mt->size);
        if (!mt->feed(mt->ctx, next, w->t->nodes[c].byte))
            continue;
        int32_t first = w->t->nodes[c].tokens;
        bool fits = true;
        if (first >= 0 && (w->budget > 0 || w->closest >= 0)) {
            int left = mt->min_close(mt->ctx, next);
            if (left < w->best)
                w->best = left;
            /* after this token: the closing bytes, one token each, then the stop token */
            fits = w->closest >= 0 ? left <= w->closest : left + 1 <= w->budget - 1;
        }
        for (int32_t id = first; fits && id >= 0; id = w->t->next_token[id]) {
            w->allowed[id] = 1;
            w->count++;
        }
        visit(w, c, &next);
    }
}

int cpm_vtrie_mask(const cpm_vtrie *t, const cpm_vtrie_matcher *mt, const void *state, int budget,
                   uint8_t *allowed) {
    memset(allowed, 0, (size_t)t->vocab);
    walk w = {.t = t, .mt = mt, .budget = budget, .closest = -1, .best = INT_MAX,
              .allowed = allowed};
    if (mt->size > CPM_VTRIE_STATE_MAX)
        return 0;
    visit(&w, 0, state);
    /* Nothing closes in time by the one-byte-a-token count (a budget under the shortest
     * completion's bytes: many tokens write several bytes): the tokens that bring the end
     * nearest, so the text closes in as few tokens as it can rather than running on. Only
     * when they make progress: a complete text that could go on ends with a stop instead. */
    if (w.count == 0 && budget > 0 && w.best < mt->min_close(mt->ctx, state)) {
        w.closest = w.best;
        visit(&w, 0, state);
    }
    return w.count;
}
