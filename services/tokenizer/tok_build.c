/* tok_build.c - the vocabulary-building steps both loaders share (tok_hf.c for
 * tokenizer.json, tok_spm.c for tokenizer.model): registering added/special
 * tokens and finishing the lookup tables encoding needs. tokenizer.c picks the
 * loader; the loaders call down into here, never back up.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tok_internal.h"

int cpm_tok_byte_piece(const char *s, size_t len) {
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    /* The HF decoder parses the two characters with u8::from_str_radix, which
     * also accepts a leading '+'. */
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : (i == 3 && c == '+') ? 0 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

int cpm_tok_add_token(cpm_tokenizer *tok, int32_t id, const char *s, size_t len, bool special,
                      const char *name, cpm_error *err) {
    if (id < 0 || id >= (1 << 24) || len == 0)
        return cpm_error_set(err, CPM_EFORMAT, "%s: added token %d: bad id or empty", name, id);
    if (id >= tok->vocab.n && cpm_vocab_grow(&tok->vocab, id + 1) < 0)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    uint8_t *flags = &tok->vocab.flags[id];
    if (*flags & CPM_VOCAB_SET) {
        if (tok->vocab.len[id] != len || memcmp(cpm_vocab_piece(&tok->vocab, id), s, len) != 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: added token %d \"%.*s\" differs from vocab \"%.40s\"",
                                 name, id, (int)(len < 40 ? len : 40), s, cpm_vocab_piece(&tok->vocab, id));
    } else if (cpm_vocab_set(&tok->vocab, id, s, len) < 0) {
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    }
    if (special)
        *flags |= CPM_VOCAB_SPECIAL;
    if (*flags & CPM_VOCAB_ADDED)
        return 0;
    *flags |= CPM_VOCAB_ADDED;
    cpm_tok_added *a = realloc(tok->added, (tok->n_added + 1) * sizeof *a);
    if (!a)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    tok->added = a;
    a[tok->n_added++] = (cpm_tok_added){tok->vocab.off[id], (uint32_t)len, id};
    return 0;
}

static int cmp_added_longest(const void *a, const void *b) {
    const cpm_tok_added *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Whether a piece has "▁" right after a character other than "▁": then a merge
 * could join two words and BPE must see the whole segment at once. */
static bool piece_joins_words(const char *p, size_t len) {
    static const char sp[3] = {'\xe2', '\x96', '\x81'};
    for (size_t i = 1; i + 3 <= len; i++)
        if (memcmp(p + i, sp, 3) == 0 && !(i >= 3 && memcmp(p + i - 3, sp, 3) == 0))
            return true;
    return false;
}

int cpm_tok_finish(cpm_tokenizer *tok, const char *name, cpm_error *err) {
    cpm_vocab *v = &tok->vocab;
    for (int b = 0; b < 256; b++) {
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", b);
        int32_t id = cpm_vocab_find(v, piece, 6);
        tok->byte_id[b] = id >= 0 && id < tok->n_model ? id : -1;
    }
    for (int c = 0; c < 128; c++) {
        char ch = (char)c;
        int32_t id = cpm_vocab_find(v, &ch, 1);
        tok->ascii_id[c] = id < tok->n_model ? id : -1;
    }
    for (int32_t id = 0; id < v->n; id++)
        if ((v->flags[id] & CPM_VOCAB_SET) && cpm_tok_byte_piece(cpm_vocab_piece(v, id), v->len[id]) >= 0)
            v->flags[id] |= CPM_VOCAB_BYTE;
    tok->word_split = true;
    for (int32_t id = 0; id < tok->n_model && tok->word_split; id++)
        if ((v->flags[id] & CPM_VOCAB_SET) && piece_joins_words(cpm_vocab_piece(v, id), v->len[id]))
            tok->word_split = false;
    if (tok->n_added)
        qsort(tok->added, tok->n_added, sizeof *tok->added, cmp_added_longest);
    memset(tok->added_first, 0, sizeof tok->added_first);
    for (size_t i = 0; i < tok->n_added; i++)
        tok->added_first[(uint8_t)v->blob[tok->added[i].off]] = true;
    if (tok->unk_id >= v->n)
        return cpm_error_set(err, CPM_EFORMAT, "%s: unk id out of range", name);
    return 0;
}

