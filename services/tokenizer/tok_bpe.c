/* tok_bpe.c - byte-pair merging of one normalized text segment into ids: the
 * innermost step of cpm_tokenizer_encode, after added-token splitting and the
 * normalizer. Two rule sets, each reproducing its reference exactly:
 *  - HF (tokenizer.json): symbols start as vocabulary characters (unknown ones as
 *    <0xNN> bytes); the adjacent pair with the lowest merge rank merges first,
 *    leftmost on ties.
 *  - SPM (tokenizer.model): symbols start as characters or whole user-defined
 *    pieces (frozen); the adjacent pair whose concatenation is the best-scored
 *    piece merges first, leftmost on ties; unknown symbols become bytes at the end.
 * Both keep candidate pairs in a binary heap and discard stale entries when popped,
 * so a segment of n characters costs O(n log n), not the O(n^2) of rescanning.
 */
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tok_internal.h"

typedef struct bpe_cand {
    uint64_t key; /* rank << 32 | left position: the heap's order */
    int32_t b;    /* HF: merged id; SPM: right position */
    int32_t c;    /* SPM: merged length in bytes */
} bpe_cand;

struct cpm_bpe_scratch {
    uint32_t *start, *len;
    int32_t *id, *prev, *next;
    uint8_t *freeze;
    size_t cap;
    bpe_cand *heap;
    size_t heap_n, heap_cap;
};

cpm_bpe_scratch *cpm_bpe_scratch_new(void) {
    return calloc(1, sizeof(cpm_bpe_scratch));
}

void cpm_bpe_scratch_free(cpm_bpe_scratch *s) {
    if (!s)
        return;
    free(s->start);
    free(s->len);
    free(s->id);
    free(s->prev);
    free(s->next);
    free(s->freeze);
    free(s->heap);
    free(s);
}

/* A segment of len bytes has at most len symbols (byte fallback: one per byte). */
static int scratch_reserve(cpm_bpe_scratch *s, size_t n) {
    if (n <= s->cap)
        return 0;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < n)
        cap *= 2;
    void *p;
#define GROW(field)                                            \
    p = realloc(s->field, cap * sizeof *s->field);             \
    if (!p)                                                    \
        return CPM_ENOMEM;                                     \
    s->field = p;
    GROW(start) GROW(len) GROW(id) GROW(prev) GROW(next) GROW(freeze)
#undef GROW
    s->cap = cap;
    return 0;
}

int cpm_tok_ids_push(cpm_tok_ids *ids, int32_t id) {
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof *v);
        if (!v)
            return CPM_ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

/* --- binary min-heap on bpe_cand.key --- */

static int heap_push(cpm_bpe_scratch *s, uint32_t rank, int32_t pos, int32_t b, int32_t c) {
    if (s->heap_n == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 256;
        bpe_cand *h = realloc(s->heap, cap * sizeof *h);
        if (!h)
            return CPM_ENOMEM;
        s->heap = h;
        s->heap_cap = cap;
    }
    bpe_cand e = {((uint64_t)rank << 32) | (uint32_t)pos, b, c};
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (s->heap[parent].key <= e.key)
            break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = e;
    return 0;
}

static bpe_cand heap_pop(cpm_bpe_scratch *s) {
    bpe_cand top = s->heap[0];
    bpe_cand last = s->heap[--s->heap_n];
    size_t n = s->heap_n, i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && s->heap[child + 1].key < s->heap[child].key)
            child++;
        if (last.key <= s->heap[child].key)
            break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (n > 0)
        s->heap[i] = last;
    return top;
}

/* --- HF merges table --- */

static inline uint64_t pair_key(int32_t a, int32_t b) {
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
}

static inline size_t pair_slot(uint64_t key, size_t mask) {
    key ^= key >> 31;
    key *= 0x9E3779B97F4A7C15ull;
    return (size_t)(key >> 17) & mask;
}

/* The merge of (a, b), or false when the pair never merges. */
static bool merges_get(const cpm_tok_merges *m, int32_t a, int32_t b, uint32_t *ret_rank,
                       int32_t *ret_merged) {
    if (!m->slots)
        return false;
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_slot(key, m->mask);; i = (i + 1) & m->mask) {
        const cpm_tok_merge_slot *e = &m->slots[i];
        if (e->key == key) {
            *ret_rank = e->rank;
            *ret_merged = e->merged;
            return true;
        }
        if (e->key == 0)
            return false;
    }
}

int cpm_tok_merges_init(cpm_tok_merges *m, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    m->count = 0;
    return m->slots ? 0 : CPM_ENOMEM;
}

/* A pair listed twice keeps its last rank: the HF loader collects the list into
 * a hash map, where later entries overwrite earlier ones. */
int cpm_tok_merges_add(cpm_tok_merges *m, int32_t a, int32_t b, uint32_t rank, int32_t merged) {
    if (2 * (m->count + 1) > m->mask + 1)
        return CPM_ELIMIT;
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_slot(key, m->mask);; i = (i + 1) & m->mask) {
        cpm_tok_merge_slot *e = &m->slots[i];
        if (e->key == 0)
            m->count++;
        if (e->key == 0 || e->key == key) {
            *e = (cpm_tok_merge_slot){key, rank, merged};
            return 0;
        }
    }
}

/* --- HF (tokenizer.json) --- */

static inline size_t lead_len(uint8_t c) {
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

static int32_t model_find(const cpm_tokenizer *tok, const char *s, size_t len) {
    if (len == 1 && (uint8_t)s[0] < 128)
        return tok->ascii_id[(uint8_t)s[0]];
    int32_t id = cpm_vocab_find(&tok->vocab, s, len);
    return id < tok->n_model ? id : -1;
}

static void sym_add(cpm_bpe_scratch *s, size_t *n, int32_t id, uint32_t start, uint32_t len) {
    size_t i = (*n)++;
    s->id[i] = id;
    s->start[i] = start;
    s->len[i] = len;
    s->prev[i] = (int32_t)i - 1;
    s->next[i] = (int32_t)i + 1;
    s->freeze[i] = 0;
}

/* Initial symbols: one per character, unknown characters as byte pieces (or one
 * <unk>, fused with its unknown neighbours) - HF BPE::merge_word. */
static int hf_symbols(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text, size_t len,
                      size_t *ret_n, cpm_error *err) {
    size_t n = 0, i = 0;
    int32_t unk_len = 0; /* pending <unk> bytes, 0 = none */
    uint32_t unk_start = 0;
    while (i < len) {
        size_t cl = lead_len((uint8_t)text[i]);
        int32_t id = model_find(tok, text + i, cl);
        if (id >= 0) {
            if (unk_len) {
                sym_add(s, &n, tok->unk_id, unk_start, (uint32_t)unk_len);
                unk_len = 0;
            }
            sym_add(s, &n, id, (uint32_t)i, (uint32_t)cl);
        } else {
            bool bytes_ok = tok->byte_fallback;
            for (size_t k = 0; bytes_ok && k < cl; k++)
                bytes_ok = tok->byte_id[(uint8_t)text[i + k]] >= 0;
            if (bytes_ok) {
                for (size_t k = 0; k < cl; k++)
                    sym_add(s, &n, tok->byte_id[(uint8_t)text[i + k]], (uint32_t)(i + k), 1);
            } else if (tok->unk_id < 0) {
                return cpm_error_set(err, CPM_EINVAL,
                                     "text byte %zu: character not in the vocabulary and no <unk>", i);
            } else if (unk_len && tok->fuse_unk) {
                unk_len += (int32_t)cl;
            } else {
                if (unk_len)
                    sym_add(s, &n, tok->unk_id, unk_start, (uint32_t)unk_len);
                unk_start = (uint32_t)i;
                unk_len = (int32_t)cl;
            }
        }
        i += cl;
    }
    if (unk_len)
        sym_add(s, &n, tok->unk_id, unk_start, (uint32_t)unk_len);
    if (n)
        s->next[n - 1] = -1;
    *ret_n = n;
    return 0;
}

static int hf_push_pair(const cpm_tokenizer *tok, cpm_bpe_scratch *s, int32_t pos) {
    int32_t nx = s->next[pos];
    uint32_t rank;
    int32_t merged;
    if (nx < 0 || !merges_get(&tok->merges, s->id[pos], s->id[nx], &rank, &merged))
        return 0;
    return heap_push(s, rank, pos, merged, 0);
}

static int hf_merge(const cpm_tokenizer *tok, cpm_bpe_scratch *s, size_t n) {
    int rc = 0;
    s->heap_n = 0;
    for (size_t i = 0; i + 1 < n && rc == 0; i++)
        rc = hf_push_pair(tok, s, (int32_t)i);
    while (rc == 0 && s->heap_n > 0) {
        bpe_cand top = heap_pop(s);
        int32_t pos = (int32_t)(uint32_t)top.key;
        int32_t nx = s->next[pos];
        if (s->len[pos] == 0 || nx < 0)
            continue;
        /* Stale entry: the pair at pos changed since it was queued. */
        uint32_t rank;
        int32_t merged;
        if (!merges_get(&tok->merges, s->id[pos], s->id[nx], &rank, &merged) || merged != top.b)
            continue;
        s->id[pos] = top.b;
        s->len[pos] += s->len[nx];
        s->next[pos] = s->next[nx];
        s->len[nx] = 0;
        if (s->next[pos] >= 0)
            s->prev[s->next[pos]] = pos;
        if (s->prev[pos] >= 0)
            rc = hf_push_pair(tok, s, s->prev[pos]);
        if (rc == 0)
            rc = hf_push_pair(tok, s, pos);
    }
    return rc;
}

static int hf_encode(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text, size_t len,
                     cpm_tok_ids *ids, cpm_error *err) {
    if (tok->ignore_merges) {
        int32_t id = model_find(tok, text, len);
        if (id >= 0)
            return cpm_tok_ids_push(ids, id);
    }
    size_t n = 0;
    int rc = hf_symbols(tok, s, text, len, &n, err);
    if (rc == 0)
        rc = hf_merge(tok, s, n);
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (s->len[i])
            rc = cpm_tok_ids_push(ids, s->id[i]);
    return rc;
}

/* --- SPM (tokenizer.model) --- */

/* Length of the longest user-defined piece at s, 0 if none. */
static size_t spm_userdef_match(const cpm_tokenizer *tok, const char *s, size_t n) {
    uint8_t c = (uint8_t)s[0];
    if (tok->ud_long[c]) {
        size_t top = n < tok->ud_max_len ? n : tok->ud_max_len;
        for (size_t l = top; l > 32; l--) {
            int32_t id = cpm_vocab_find(&tok->vocab, s, l);
            if (id >= 0 && (tok->vocab.flags[id] & CPM_VOCAB_USERDEF))
                return l;
        }
    }
    uint32_t lengths = tok->ud_lengths[c];
    while (lengths) {
        size_t l = 32 - (size_t)__builtin_clz(lengths); /* longest candidate first */
        lengths &= ~(1u << (l - 1));
        if (l > n)
            continue;
        int32_t id = cpm_vocab_find(&tok->vocab, s, l);
        if (id >= 0 && (tok->vocab.flags[id] & CPM_VOCAB_USERDEF))
            return l;
    }
    return 0;
}

static int spm_push_pair(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text,
                         int32_t l, int32_t r) {
    if (l < 0 || r < 0 || s->freeze[l] || s->freeze[r])
        return 0;
    uint32_t size = s->len[l] + s->len[r];
    if (size > tok->vocab.max_len)
        return 0;
    int32_t id = cpm_vocab_find(&tok->vocab, text + s->start[l], size);
    if (id < 0 || id >= tok->n_model || !(tok->vocab.flags[id] & CPM_VOCAB_MERGEABLE))
        return 0;
    return heap_push(s, (uint32_t)tok->vocab.rank[id], l, r, (int32_t)size);
}

static int spm_emit(const cpm_tokenizer *tok, const char *p, size_t len, cpm_tok_ids *ids) {
    int32_t id = len == 1 && (uint8_t)p[0] < 128 ? tok->ascii_id[(uint8_t)p[0]]
                                                 : cpm_vocab_find(&tok->vocab, p, len);
    if (id >= 0 && id < tok->n_model)
        return cpm_tok_ids_push(ids, id);
    int rc = 0;
    if (!tok->byte_fallback)
        return cpm_tok_ids_push(ids, tok->unk_id);
    for (size_t k = 0; k < len && rc == 0; k++) {
        int32_t b = tok->byte_id[(uint8_t)p[k]];
        rc = cpm_tok_ids_push(ids, b >= 0 ? b : tok->unk_id);
    }
    return rc;
}

static int spm_encode(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text, size_t len,
                      cpm_tok_ids *ids) {
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        size_t l = spm_userdef_match(tok, text + i, len - i);
        bool frozen = l > 0;
        if (!frozen)
            l = lead_len((uint8_t)text[i]);
        sym_add(s, &n, -1, (uint32_t)i, (uint32_t)l);
        s->freeze[n - 1] = frozen;
        i += l;
    }
    if (n == 0)
        return 0;
    s->next[n - 1] = -1;
    s->heap_n = 0;
    int rc = 0;
    for (size_t i = 1; i < n && rc == 0; i++)
        rc = spm_push_pair(tok, s, text, (int32_t)i - 1, (int32_t)i);
    while (rc == 0 && s->heap_n > 0) {
        bpe_cand top = heap_pop(s);
        int32_t l = (int32_t)(uint32_t)top.key, r = top.b;
        /* Stale entry: one side was merged away or grew since it was queued. */
        if (s->len[l] == 0 || s->len[r] == 0 || s->len[l] + s->len[r] != (uint32_t)top.c)
            continue;
        s->len[l] = (uint32_t)top.c;
        s->next[l] = s->next[r];
        if (s->next[r] >= 0)
            s->prev[s->next[r]] = l;
        s->len[r] = 0;
        rc = spm_push_pair(tok, s, text, s->prev[l], l);
        if (rc == 0)
            rc = spm_push_pair(tok, s, text, l, s->next[l]);
    }
    for (int32_t i = 0; rc == 0 && i >= 0; i = s->next[i])
        rc = spm_emit(tok, text + s->start[i], s->len[i], ids);
    return rc;
}

/* End of the word starting at `start`: the next "▁" that follows another
 * character than "▁" (see cpm_tokenizer.word_split). */
static size_t next_word(const char *text, size_t start, size_t len) {
    static const char sp[3] = {'\xe2', '\x96', '\x81'};
    size_t i = start;
    while (i + 3 <= len && memcmp(text + i, sp, 3) == 0)
        i += 3;
    while (i < len) {
        const char *hit = memchr(text + i, '\xe2', len - i);
        if (!hit)
            return len;
        i = (size_t)(hit - text);
        bool prev_is_sp = i >= start + 3 && memcmp(text + i - 3, sp, 3) == 0;
        if (i + 3 <= len && memcmp(text + i, sp, 3) == 0 && i > start && !prev_is_sp)
            return i;
        i++;
    }
    return len;
}

int cpm_bpe_encode(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text, size_t len,
                   cpm_tok_ids *ids, cpm_error *err) {
    if (len == 0)
        return 0;
    if (len > INT32_MAX / 2)
        return cpm_error_set(err, CPM_ELIMIT, "text segment of %zu bytes is too long", len);
    int rc = scratch_reserve(s, len);
    if (rc < 0)
        return cpm_error_set(err, rc, "BPE scratch for %zu bytes: out of memory", len);
    size_t start = 0;
    while (rc == 0 && start < len) {
        size_t end = tok->word_split ? next_word(text, start, len) : len;
        rc = tok->kind == CPM_TOK_HF ? hf_encode(tok, s, text + start, end - start, ids, err)
                                     : spm_encode(tok, s, text + start, end - start, ids);
        start = end;
    }
    if (rc == CPM_ENOMEM)
        return cpm_error_set(err, rc, "BPE of %zu bytes: out of memory", len);
    return rc;
}

void cpm_tok_merges_release(cpm_tok_merges *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}
