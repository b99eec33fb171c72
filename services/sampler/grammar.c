/* grammar.c - the byte-level grammar and its matcher (see grammar.h).
 *
 * Frozen layout: one code array holds every alternative's elements followed by END (0);
 * an element is kind << 28 | arg. A stack is a chain of arena nodes, each the position
 * of the next element to match in some alternative (and, for a string in progress, its
 * lexer state); below it, where to go once that alternative is done. A ready stack has a
 * byte set or a string on top: rules are expanded into their alternatives as soon as a
 * stack reaches them, so feeding a byte only looks at the tops. Each node carries the
 * shortest completion of its whole stack, so min_close is a minimum over the heads. */
#include "grammar.h"

#include <stdlib.h>
#include <string.h>

#define KIND_SHIFT 28
#define ARG_MASK ((1u << KIND_SHIFT) - 1)
#define END 0u
/* Rules reached without a byte in between, at most: a grammar whose rules call each other
 * without consuming (a $ref to itself) stops expanding there instead of looping. */
#define MAX_EXPAND 64
/* Arena nodes at most (16 bytes each): a text whose stacks need more is refused. */
#define MAX_NODES (1u << 24)

typedef struct alt {
    cpm_gram_el *el;
    int len;
} alt;

typedef struct rule {
    alt *alt;
    int n, cap;
} rule;

struct cpm_gram {
    uint8_t (*sets)[32];
    int n_sets, cap_sets;
    rule *rules;
    int n_rules, cap_rules;
    /* frozen by cpm_gram_finish */
    uint32_t *code;     /* alternatives, each ended by END */
    uint32_t *alt_at;   /* every alternative's first code position, rule by rule */
    uint32_t *first;    /* rule r's alternatives: alt_at[first[r] .. first[r + 1]) */
    int32_t *min_len;   /* per rule: its shortest derivation */
    int32_t *min_rest;  /* per code position: the shortest completion of its alternative from it */
    int root;
    bool frozen;
};

static bool grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap)
        return true;
    int nc = *cap ? *cap * 2 : 16;
    while (nc < need)
        nc *= 2;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q)
        return false;
    *p = q;
    *cap = nc;
    return true;
}

cpm_gram *cpm_gram_new(void) {
    return calloc(1, sizeof(cpm_gram));
}

void cpm_gram_free(cpm_gram *g) {
    if (!g)
        return;
    for (int r = 0; r < g->n_rules; r++) {
        for (int a = 0; a < g->rules[r].n; a++)
            free(g->rules[r].alt[a].el);
        free(g->rules[r].alt);
    }
    free(g->rules);
    free(g->sets);
    free(g->code);
    free(g->alt_at);
    free(g->first);
    free(g->min_len);
    free(g->min_rest);
    free(g);
}

int cpm_gram_rule(cpm_gram *g) {
    if (g->frozen || g->n_rules >= (int)ARG_MASK ||
        !grow((void **)&g->rules, &g->cap_rules, g->n_rules + 1, sizeof *g->rules))
        return -1;
    memset(&g->rules[g->n_rules], 0, sizeof *g->rules);
    return g->n_rules++;
}

int cpm_gram_set(cpm_gram *g, const uint8_t bits[32]) {
    for (int i = 0; i < g->n_sets; i++)
        if (memcmp(g->sets[i], bits, 32) == 0)
            return i;
    if (!grow((void **)&g->sets, &g->cap_sets, g->n_sets + 1, sizeof *g->sets))
        return -1;
    memcpy(g->sets[g->n_sets], bits, 32);
    return g->n_sets++;
}

int cpm_gram_alt(cpm_gram *g, int r, cpm_gram_seq *s) {
    if (s->oom || g->frozen || r < 0 || r >= g->n_rules)
        return CPM_ENOMEM;
    rule *ru = &g->rules[r];
    if (!grow((void **)&ru->alt, &ru->cap, ru->n + 1, sizeof *ru->alt))
        return CPM_ENOMEM;
    cpm_gram_el *copy = malloc((size_t)(s->n ? s->n : 1) * sizeof *copy);
    if (!copy)
        return CPM_ENOMEM;
    if (s->n)
        memcpy(copy, s->el, (size_t)s->n * sizeof *copy);
    ru->alt[ru->n++] = (alt){copy, s->n};
    s->n = 0;
    return 0;
}

void cpm_gram_seq_push(cpm_gram_seq *s, cpm_gram_el e) {
    if (s->oom || !grow((void **)&s->el, &s->cap, s->n + 1, sizeof *s->el)) {
        s->oom = true;
        return;
    }
    s->el[s->n++] = e;
}

void cpm_gram_seq_range(cpm_gram *g, cpm_gram_seq *s, uint8_t lo, uint8_t hi) {
    uint8_t bits[32] = {0};
    for (int b = lo; b <= hi; b++)
        bits[b >> 3] |= (uint8_t)(1u << (b & 7));
    int id = cpm_gram_set(g, bits);
    if (id < 0)
        s->oom = true;
    else
        cpm_gram_seq_push(s, (cpm_gram_el){CPM_GRAM_BYTE, (uint32_t)id});
}

void cpm_gram_seq_lit(cpm_gram *g, cpm_gram_seq *s, const char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++)
        cpm_gram_seq_range(g, s, (uint8_t)bytes[i], (uint8_t)bytes[i]);
}

void cpm_gram_seq_free(cpm_gram_seq *s) {
    free(s->el);
    *s = (cpm_gram_seq){0};
}

/* ---- freezing ------------------------------------------------------------------- */

static uint32_t kind_of(uint32_t c) {
    return c >> KIND_SHIFT;
}

static int32_t add_sat(int64_t a, int64_t b) {
    int64_t s = a + b;
    return s >= CPM_GRAM_INF ? CPM_GRAM_INF : (int32_t)s;
}

/* The shortest text element c derives, before it is started. */
static int32_t el_min(const cpm_gram *g, uint32_t c) {
    switch (kind_of(c)) {
    case CPM_GRAM_BYTE: return 1;
    case CPM_GRAM_STRING: return 2;
    case CPM_GRAM_RULE: return g->min_len[c & ARG_MASK];
    default: return 0;
    }
}

static int flatten(cpm_gram *g) {
    size_t n_code = 0, n_alts = 0;
    for (int r = 0; r < g->n_rules; r++) {
        n_alts += (size_t)g->rules[r].n;
        for (int a = 0; a < g->rules[r].n; a++)
            n_code += (size_t)g->rules[r].alt[a].len + 1;
    }
    g->code = malloc((n_code ? n_code : 1) * sizeof *g->code);
    g->min_rest = malloc((n_code ? n_code : 1) * sizeof *g->min_rest);
    g->alt_at = malloc((n_alts ? n_alts : 1) * sizeof *g->alt_at);
    g->first = malloc(((size_t)g->n_rules + 1) * sizeof *g->first);
    g->min_len = malloc(((size_t)g->n_rules ? (size_t)g->n_rules : 1) * sizeof *g->min_len);
    if (!g->code || !g->min_rest || !g->alt_at || !g->first || !g->min_len)
        return CPM_ENOMEM;
    uint32_t pos = 0, k = 0;
    for (int r = 0; r < g->n_rules; r++) {
        g->first[r] = k;
        g->min_len[r] = CPM_GRAM_INF;
        for (int a = 0; a < g->rules[r].n; a++) {
            g->alt_at[k++] = pos;
            for (int i = 0; i < g->rules[r].alt[a].len; i++) {
                cpm_gram_el e = g->rules[r].alt[a].el[i];
                g->code[pos++] = (uint32_t)e.kind << KIND_SHIFT | (e.arg & ARG_MASK);
            }
            g->code[pos++] = END;
        }
    }
    g->first[g->n_rules] = k;
    return 0;
}

/* The shortest derivation of every rule: a fixed point (a rule that only reaches itself
 * stays at CPM_GRAM_INF), then every position's shortest rest of its alternative. */
static void shortest(cpm_gram *g) {
    for (bool changed = true; changed;) {
        changed = false;
        for (int r = 0; r < g->n_rules; r++)
            for (uint32_t a = g->first[r]; a < g->first[r + 1]; a++) {
                int32_t s = 0;
                for (uint32_t p = g->alt_at[a]; g->code[p] != END; p++)
                    s = add_sat(s, el_min(g, g->code[p]));
                if (s < g->min_len[r])
                    g->min_len[r] = s, changed = true;
            }
    }
    for (uint32_t a = 0; a < g->first[g->n_rules]; a++) {
        uint32_t end = g->alt_at[a];
        while (g->code[end] != END)
            end++;
        g->min_rest[end] = 0;
        for (uint32_t p = end; p > g->alt_at[a]; p--)
            g->min_rest[p - 1] = add_sat(g->min_rest[p], el_min(g, g->code[p - 1]));
    }
}

int cpm_gram_finish(cpm_gram *g, int root, cpm_error *err) {
    if (g->frozen || root < 0 || root >= g->n_rules)
        return cpm_error_set(err, CPM_EINVAL, "grammar: no root rule");
    if (flatten(g))
        return cpm_error_set(err, CPM_ENOMEM, "grammar: out of memory");
    shortest(g);
    g->root = root;
    g->frozen = true;
    if (g->min_len[root] >= CPM_GRAM_INF)
        return cpm_error_set(err, CPM_EINVAL, "grammar: no finite text matches it (a schema "
                             "that only refers to itself?)");
    return 0;
}

/* ---- the string lexer ----------------------------------------------------------- */

/* A string's lexer state in one word: mode | count << 8 | lo << 16 | hi << 24. OPEN (0)
 * is a string not started. */
enum { S_OPEN = 0, S_BODY, S_ESC, S_HEX, S_UTF8 };
#define S_CLOSED 0xFFFFFFFFu
#define S_DEAD 0xFFFFFFFEu

static uint32_t s_make(uint32_t mode, uint32_t cnt, uint32_t lo, uint32_t hi) {
    return mode | cnt << 8 | lo << 16 | hi << 24;
}

/* Bytes that close a string from lexer state s. */
static int32_t s_rest(uint32_t s) {
    switch (s & 0xFF) {
    case S_OPEN: case S_ESC: return 2;
    case S_BODY: return 1;
    default: return (int32_t)((s >> 8) & 0xFF) + 1; /* hex digits or UTF-8 bytes, then '"' */
    }
}

/* The first byte of a multi-byte UTF-8 character: no overlong forms, no surrogates,
 * nothing past U+10FFFF (the same rules as json_match.c). */
static uint32_t s_lead(uint8_t b) {
    if (b >= 0xC2 && b <= 0xDF)
        return s_make(S_UTF8, 1, 0x80, 0xBF);
    if (b >= 0xE0 && b <= 0xEF)
        return s_make(S_UTF8, 2, b == 0xE0 ? 0xA0 : 0x80, b == 0xED ? 0x9F : 0xBF);
    if (b >= 0xF0 && b <= 0xF4)
        return s_make(S_UTF8, 3, b == 0xF0 ? 0x90 : 0x80, b == 0xF4 ? 0x8F : 0xBF);
    return S_DEAD;
}

static bool is_hex(uint8_t b) {
    return (b >= '0' && b <= '9') || ((b | 0x20) >= 'a' && (b | 0x20) <= 'f');
}

static uint32_t s_step(uint32_t s, uint8_t b, uint32_t flags) {
    uint32_t cnt = (s >> 8) & 0xFF;
    switch (s & 0xFF) {
    case S_OPEN:
        return b == '"' ? S_BODY : S_DEAD;
    case S_BODY:
        if (b == '"')
            return S_CLOSED;
        if (b == '\\')
            return S_ESC;
        if (b < 0x20)
            return S_DEAD;
        return b < 0x80 ? S_BODY : s_lead(b);
    case S_ESC: {
        const char *ok = flags & CPM_GRAM_STR_PY ? "\"\\bfnrt" : "\"\\/bfnrtu";
        if (!b || !strchr(ok, b))
            return S_DEAD;
        return b == 'u' ? s_make(S_HEX, 4, 0, 0) : S_BODY;
    }
    case S_HEX:
        if (!is_hex(b))
            return S_DEAD;
        return cnt == 1 ? S_BODY : s_make(S_HEX, cnt - 1, 0, 0);
    default: /* S_UTF8 */
        if (b < ((s >> 16) & 0xFF) || b > (s >> 24))
            return S_DEAD;
        return cnt == 1 ? S_BODY : s_make(S_UTF8, cnt - 1, 0x80, 0xBF);
    }
}

/* ---- matching ------------------------------------------------------------------- */

typedef struct node {
    uint32_t pos;   /* the element to match next (code position) */
    uint32_t below; /* the stack under it; 0 = empty */
    int32_t sum;    /* the shortest completion of this whole stack */
    uint32_t sub;   /* a string element's lexer state */
} node;

struct cpm_gram_run {
    const cpm_gram *g;
    node *nodes;
    uint32_t cap;
    bool oom;
};

cpm_gram_run *cpm_gram_run_new(void) {
    return calloc(1, sizeof(cpm_gram_run));
}

void cpm_gram_run_free(cpm_gram_run *r) {
    if (!r)
        return;
    free(r->nodes);
    free(r);
}

bool cpm_gram_run_oom(const cpm_gram_run *r) {
    return r->oom;
}

/* A new node above `below` at st->top; 0 (and r->oom) without room. */
static uint32_t push(cpm_gram_run *r, cpm_gram_state *st, uint32_t pos, uint32_t below, uint32_t sub) {
    if (st->top >= r->cap) {
        uint32_t nc = r->cap * 2;
        node *n = nc <= MAX_NODES ? realloc(r->nodes, (size_t)nc * sizeof *n) : NULL;
        if (!n) {
            r->oom = true;
            return 0;
        }
        r->nodes = n;
        r->cap = nc;
    }
    const cpm_gram *g = r->g;
    uint32_t c = g->code[pos];
    int32_t here = kind_of(c) == CPM_GRAM_STRING ? s_rest(sub) : el_min(g, c);
    uint32_t at = st->top++;
    r->nodes[at] = (node){pos, below, add_sat(add_sat(here, g->min_rest[pos + 1]), r->nodes[below].sum),
                          sub};
    return at;
}

static bool same_stack(const cpm_gram_run *r, uint32_t a, uint32_t b) {
    while (a != b) {
        if (!a || !b)
            return false;
        const node *x = &r->nodes[a], *y = &r->nodes[b];
        if (x->pos != y->pos || x->sub != y->sub)
            return false;
        a = x->below, b = y->below;
    }
    return true;
}

static void add_head(const cpm_gram_run *r, cpm_gram_state *st, uint32_t c) {
    for (int i = 0; i < st->n; i++)
        if (same_stack(r, st->head[i], c))
            return;
    if (st->n == CPM_GRAM_HEADS) {
        st->overflow = true;
        return;
    }
    st->head[st->n++] = c;
}

static void expand(cpm_gram_run *r, cpm_gram_state *st, uint32_t c, int depth);

/* Rule `ru`'s alternatives, each followed by the stack `rest`. */
static void expand_rule(cpm_gram_run *r, cpm_gram_state *st, uint32_t ru, uint32_t rest, int depth) {
    const cpm_gram *g = r->g;
    for (uint32_t a = g->first[ru]; a < g->first[ru + 1] && !r->oom; a++) {
        uint32_t at = g->alt_at[a];
        expand(r, st, g->code[at] == END ? rest : push(r, st, at, rest, 0), depth + 1);
    }
}

/* The stacks stack c stands for once its top rules are expanded, into st's heads. */
static void expand(cpm_gram_run *r, cpm_gram_state *st, uint32_t c, int depth) {
    if (r->oom || depth > MAX_EXPAND)
        return;
    if (c == 0) {
        add_head(r, st, 0);
        return;
    }
    node nd = r->nodes[c];
    if (nd.sum >= CPM_GRAM_INF)
        return; /* can never complete */
    uint32_t code = r->g->code[nd.pos];
    if (kind_of(code) != CPM_GRAM_RULE) {
        add_head(r, st, c);
        return;
    }
    uint32_t rest = r->g->code[nd.pos + 1] == END ? nd.below : push(r, st, nd.pos + 1, nd.below, 0);
    expand_rule(r, st, code & ARG_MASK, rest, depth);
}

bool cpm_gram_start(cpm_gram_run *r, const cpm_gram *g, cpm_gram_state *st) {
    r->g = g;
    r->oom = false;
    if (!r->nodes) {
        r->nodes = malloc(4096 * sizeof *r->nodes);
        if (!r->nodes)
            return false;
        r->cap = 4096;
    }
    r->nodes[0] = (node){UINT32_MAX, 0, 0, 0};
    st->top = 1;
    st->n = 0;
    st->overflow = false;
    expand_rule(r, st, (uint32_t)g->root, 0, 0);
    return !r->oom;
}

/* After the element at pos is matched: the rest of its alternative, then below. */
static void advance(cpm_gram_run *r, cpm_gram_state *st, uint32_t pos, uint32_t below) {
    expand(r, st, r->g->code[pos + 1] == END ? below : push(r, st, pos + 1, below, 0), 0);
}

bool cpm_gram_feed(cpm_gram_run *r, cpm_gram_state *st, uint8_t b) {
    const cpm_gram *g = r->g;
    cpm_gram_state next = {.top = st->top, .n = 0, .overflow = st->overflow};
    for (int i = 0; i < st->n && !r->oom; i++) {
        uint32_t h = st->head[i];
        if (h == 0)
            continue; /* a complete text takes no more bytes on this stack */
        node nd = r->nodes[h];
        uint32_t code = g->code[nd.pos];
        if (kind_of(code) == CPM_GRAM_BYTE) {
            if (g->sets[code & ARG_MASK][b >> 3] >> (b & 7) & 1)
                advance(r, &next, nd.pos, nd.below);
            continue;
        }
        uint32_t s = s_step(nd.sub, b, code & ARG_MASK); /* a string */
        if (s == S_CLOSED)
            advance(r, &next, nd.pos, nd.below);
        else if (s != S_DEAD)
            add_head(r, &next, push(r, &next, nd.pos, nd.below, s));
    }
    *st = next;
    if (r->oom)
        st->n = 0;
    return st->n > 0;
}

bool cpm_gram_done(const cpm_gram_state *st) {
    for (int i = 0; i < st->n; i++)
        if (st->head[i] == 0)
            return true;
    return false;
}

int cpm_gram_min_close(const cpm_gram_run *r, const cpm_gram_state *st) {
    int32_t best = CPM_GRAM_INF;
    for (int i = 0; i < st->n; i++) {
        int32_t s = r->nodes[st->head[i]].sum;
        if (s < best)
            best = s;
    }
    return best;
}
