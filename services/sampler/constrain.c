/* constrain.c - the token mask of a constrained row (see constrain.h). */
#include "constrain.h"

#include <math.h>
#include <stdlib.h>

#include "services/sampler/jschema.h"
#include "services/sampler/json_match.h"
#include "services/sampler/vocab_trie.h"
#include "services/tokenizer/tokenizer.h"

struct cpm_constrainer {
    cpm_tokenizer *tok;
    cpm_vtrie *trie;
    const int32_t *stops; /* the model's stop ids (the tokenizer's) */
    size_t n_stops;
};

int cpm_constrainer_new(const char *model_dir, cpm_constrainer **ret, cpm_error *err) {
    *ret = NULL;
    cpm_constrainer *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "constrainer");
    int rc = cpm_tokenizer_load(model_dir, &c->tok, err);
    if (!rc)
        rc = cpm_vtrie_new(c->tok, &c->trie, err);
    if (rc) {
        cpm_constrainer_free(c);
        return rc;
    }
    c->n_stops = cpm_tokenizer_stop_ids(c->tok, &c->stops);
    *ret = c;
    return 0;
}

void cpm_constrainer_free(cpm_constrainer *c) {
    if (!c)
        return;
    cpm_vtrie_free(c->trie);
    cpm_tokenizer_free(c->tok);
    free(c);
}

static bool enforced(int kind) {
    return kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_OBJECT ||
           kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA;
}

int cpm_constrainer_apply(const cpm_constrainer *c, const Cpm__V1__Constraint *k,
                          const int32_t *generated, size_t n, float *logits, int vocab,
                          uint8_t *allowed, cpm_error *err) {
    if (!k)
        return 0;
    /* A schema outside the enforceable subset is the request's fault, refused before any
     * mask (the router refuses it first, with a 400); it is parsed again each step until
     * compiled grammars are cached. Tool calls are not masked yet, so their tools' schemas
     * are not judged here. */
    int rc = k->kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_JSON_SCHEMA
                 ? cpm_jschema_check((int)k->kind, k->schema, k->single_call, err)
                 : 0;
    if (rc)
        return cpm_error_prefix(err, "constraint");
    if (!enforced(k->kind))
        return 0;
    int tv = cpm_vtrie_vocab(c->trie);
    if (vocab < tv)
        return cpm_error_set(err, CPM_ERANGE, "constraint: logits of %d tokens, the tokenizer has %d",
                             vocab, tv);
    cpm_jm m;
    cpm_jm_init(&m);
    for (size_t i = 0; i < n; i++)
        if (!cpm_vtrie_feed(c->trie, &m, generated[i]))
            return cpm_error_set(err, CPM_EINVAL, "constraint: generated token %zu (id %d) breaks "
                                 "the JSON", i, generated[i]);
    int budget = k->tokens_left > (uint32_t)INT32_MAX ? 0 : (int)k->tokens_left;
    bool done = cpm_jm_done(&m);
    if (!done && cpm_vtrie_mask(c->trie, &m, budget, allowed) == 0 &&
        cpm_vtrie_mask(c->trie, &m, 0, allowed) == 0) /* out of budget: still valid JSON */
        return cpm_error_set(err, CPM_EINVAL, "constraint: no token continues the JSON");
    for (int id = 0; id < vocab; id++)
        if (done || id >= tv || !allowed[id])
            logits[id] = -INFINITY;
    for (size_t i = 0; done && i < c->n_stops; i++)
        if (c->stops[i] < vocab)
            logits[c->stops[i]] = 0.0f; /* complete: only a stop may follow */
    return 0;
}
