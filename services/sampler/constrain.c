/* constrain.c - the token mask of a constrained row (see constrain.h). */
#include "constrain.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "services/sampler/json_grammar.h"
#include "services/sampler/json_match.h"
#include "services/sampler/vocab_trie.h"
#include "services/tokenizer/tokenizer.h"

/* Compiled grammars kept (a request compiles its schema once, not at every token), and
 * idle matching arenas kept for reuse. */
#define CACHE_SLOTS 16
#define IDLE_RUNS 8
/* The model's stop ids we let through (tokenizers have one to three). */
#define MAX_STOPS 8

typedef struct slot {
    char *text;         /* the constraint's schema text; NULL: empty slot */
    int kind;
    bool single;
    cpm_gram *g;
    int users;          /* rows masking with it now: not evicted meanwhile */
    uint64_t used;      /* last use, for LRU */
} slot;

struct cpm_constrainer {
    cpm_tokenizer *tok;
    cpm_vtrie *trie;
    const int32_t *stops; /* the model's stop ids (the tokenizer's) */
    size_t n_stops;
    pthread_mutex_t lock; /* the cache and the idle runs: held for lookups, never for a mask */
    slot cache[CACHE_SLOTS];
    uint64_t clock;
    cpm_gram_run *idle[IDLE_RUNS];
    int n_idle;
};

int cpm_constrainer_new(const char *model_dir, cpm_constrainer **ret, cpm_error *err) {
    *ret = NULL;
    cpm_constrainer *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "constrainer");
    pthread_mutex_init(&c->lock, NULL);
    int rc = cpm_tokenizer_load(model_dir, &c->tok, err);
    if (!rc)
        rc = cpm_vtrie_new(c->tok, &c->trie, err);
    if (rc) {
        cpm_constrainer_free(c);
        return rc;
    }
    c->n_stops = cpm_tokenizer_stop_ids(c->tok, &c->stops);
    if (c->n_stops > MAX_STOPS)
        c->n_stops = MAX_STOPS;
    *ret = c;
    return 0;
}

void cpm_constrainer_free(cpm_constrainer *c) {
    if (!c)
        return;
    for (int i = 0; i < CACHE_SLOTS; i++) {
        free(c->cache[i].text);
        cpm_gram_free(c->cache[i].g);
    }
    for (int i = 0; i < c->n_idle; i++)
        cpm_gram_run_free(c->idle[i]);
    pthread_mutex_destroy(&c->lock);
    cpm_vtrie_free(c->trie);
    cpm_tokenizer_free(c->tok);
    free(c);
}

/* ---- compiled grammars ---------------------------------------------------------- */

static slot *find(cpm_constrainer *c, const Cpm__V1__Constraint *k) {
    for (int i = 0; i < CACHE_SLOTS; i++) {
        slot *s = &c->cache[i];
        if (s->text && s->kind == (int)k->kind && s->single == k->single_call &&
            strcmp(s->text, k->schema) == 0)
            return s;
    }
    return NULL;
}

/* Keeps g in the least recently used idle slot; false when every slot is in use. */
static slot *insert(cpm_constrainer *c, const Cpm__V1__Constraint *k, cpm_gram *g) {
    slot *victim = NULL;
    for (int i = 0; i < CACHE_SLOTS; i++) {
        slot *s = &c->cache[i];
        if (s->users == 0 && (!victim || !s->text || (victim->text && s->used < victim->used)))
            victim = s;
    }
    char *text = victim ? strdup(k->schema) : NULL;
    if (!text)
        return NULL;
    free(victim->text);
    cpm_gram_free(victim->g);
    *victim = (slot){text, (int)k->kind, k->single_call, g, 0, 0};
    return victim;
}

/* The grammar of k, compiled once; *own is set when it could not be cached (the caller
 * frees it). The slot's users count holds it until grammar_put. */
static int grammar_get(cpm_constrainer *c, const Cpm__V1__Constraint *k, cpm_gram **g, bool *own,
                       cpm_error *err) {
    *own = false;
    pthread_mutex_lock(&c->lock);
    slot *s = find(c, k);
    if (s) {
        s->users++;
        s->used = ++c->clock;
        *g = s->g;
    }
    pthread_mutex_unlock(&c->lock);
    if (s)
        return 0;
    cpm_gram *made = NULL;
    int rc = k->kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS
                 ? cpm_json_grammar_tools(k->schema, k->single_call, &made, err)
                 : cpm_json_grammar_schema(k->schema, &made, err);
    if (rc)
        return rc;
    pthread_mutex_lock(&c->lock);
    s = find(c, k); /* another thread may have compiled it meanwhile */
    if (!s)
        s = insert(c, k, made);
    else
        cpm_gram_free(made);
    if (s) {
        s->users++;
        s->used = ++c->clock;
        *g = s->g;
    } else {
        *g = made, *own = true;
    }
    pthread_mutex_unlock(&c->lock);
    return 0;
}

static void grammar_put(cpm_constrainer *c, cpm_gram *g, bool own) {
    if (own) {
        cpm_gram_free(g);
        return;
    }
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (c->cache[i].g == g && c->cache[i].users > 0)
            c->cache[i].users--;
    pthread_mutex_unlock(&c->lock);
}

static cpm_gram_run *run_get(cpm_constrainer *c) {
    pthread_mutex_lock(&c->lock);
    cpm_gram_run *r = c->n_idle ? c->idle[--c->n_idle] : NULL;
    pthread_mutex_unlock(&c->lock);
    return r ? r : cpm_gram_run_new();
}

static void run_put(cpm_constrainer *c, cpm_gram_run *r) {
    pthread_mutex_lock(&c->lock);
    if (c->n_idle < IDLE_RUNS) {
        c->idle[c->n_idle++] = r;
        r = NULL;
    }
    pthread_mutex_unlock(&c->lock);
    cpm_gram_run_free(r);
}

/* ---- the two matchers, as the trie walk drives them ------------------------------ */

static bool jm_feed(void *ctx, void *state, uint8_t b) {
    (void)ctx;
    return cpm_jm_feed(state, b);
}

static int jm_min_close(void *ctx, const void *state) {
    (void)ctx;
    return cpm_jm_min_close(state);
}

static bool gram_feed(void *ctx, void *state, uint8_t b) {
    return cpm_gram_feed(ctx, state, b);
}

static int gram_min_close(void *ctx, const void *state) {
    return cpm_gram_min_close(ctx, state);
}

/* ---- the mask ------------------------------------------------------------------- */

/* Replays the generated ids through the matcher, then masks the logits: tokens that keep
 * the text matchable and closable within the budget; the stop ids once it is complete. */
static int mask(const cpm_constrainer *c, const cpm_vtrie_matcher *mt, void *state,
                bool (*done)(const void *state), const Cpm__V1__Constraint *k,
                const int32_t *generated, size_t n, float *logits, int vocab, uint8_t *allowed,
                cpm_error *err) {
    for (size_t i = 0; i < n; i++)
        if (!cpm_vtrie_feed(c->trie, mt, state, generated[i]))
            return cpm_error_set(err, CPM_EINVAL, "constraint: generated token %zu (id %d) breaks "
                                 "the format", i, generated[i]);
    int budget = k->tokens_left > (uint32_t)INT32_MAX ? 0 : (int)k->tokens_left;
    bool complete = done(state);
    int count = cpm_vtrie_mask(c->trie, mt, state, budget, allowed);
    if (!complete && count == 0) /* no token brings the end nearer: still a valid text */
        count = cpm_vtrie_mask(c->trie, mt, state, 0, allowed);
    if (!complete && count == 0)
        return cpm_error_set(err, CPM_EINVAL, "constraint: no token continues the text");
    int tv = cpm_vtrie_vocab(c->trie);
    float stop_logit[MAX_STOPS];
    for (size_t i = 0; i < c->n_stops; i++)
        stop_logit[i] = c->stops[i] < vocab ? logits[c->stops[i]] : 0.0f;
    for (int id = 0; id < vocab; id++)
        if (id >= tv || !allowed[id])
            logits[id] = -INFINITY;
    /* complete: a stop may come, at its own odds when the text could also go on, surely
     * when nothing else may follow */
    for (size_t i = 0; complete && i < c->n_stops; i++)
        if (c->stops[i] < vocab)
            logits[c->stops[i]] = count ? stop_logit[i] : 0.0f;
    return 0;
}

static bool jm_done(const void *state) {
    return cpm_jm_done(state);
}

static bool gram_done(const void *state) {
    return cpm_gram_done(state);
}

int cpm_constrainer_apply(cpm_constrainer *c, const Cpm__V1__Constraint *k,
                          const int32_t *generated, size_t n, float *logits, int vocab,
                          uint8_t *allowed, cpm_error *err) {
    if (!k || k->kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_NONE)
        return 0;
    int tv = cpm_vtrie_vocab(c->trie);
    if (vocab < tv)
        return cpm_error_set(err, CPM_ERANGE, "constraint: logits of %d tokens, the tokenizer has %d",
                             vocab, tv);
    if (k->kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT) {
        cpm_jm m;
        cpm_jm_init(&m);
        cpm_vtrie_matcher mt = {sizeof m, jm_feed, jm_min_close, NULL};
        return mask(c, &mt, &m, jm_done, k, generated, n, logits, vocab, allowed, err);
    }
    if (k->kind != CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA &&
        k->kind != CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "constraint kind %d: unknown", (int)k->kind);
    cpm_gram *g;
    bool own;
    int rc = grammar_get(c, k, &g, &own, err);
    if (rc)
        return cpm_error_prefix(err, "constraint");
    cpm_gram_run *run = run_get(c);
    cpm_gram_state st;
    if (!run || !cpm_gram_start(run, g, &st)) {
        rc = cpm_error_set(err, CPM_ENOMEM, "constraint: out of memory");
    } else {
        cpm_vtrie_matcher mt = {sizeof st, gram_feed, gram_min_close, run};
        rc = mask(c, &mt, &st, gram_done, k, generated, n, logits, vocab, allowed, err);
        if (cpm_gram_run_oom(run))
            rc = cpm_error_set(err, CPM_ENOMEM, "constraint: the text's parse outgrew its memory");
    }
    if (run)
        run_put(c, run);
    grammar_put(c, g, own);
    return rc;
}
