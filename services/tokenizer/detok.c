/* detok.c - incremental detokenization (see detok.h): the one-shot decoder of
 * tokenizer.c cut at token boundaries. Byte pieces wait in `run` until a non-byte
 * piece (or the flush) closes the run; the decoder's leading Strip applies to the
 * first characters the stream ever emits.
 */
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tok_internal.h"

struct cpm_detok {
    const cpm_tokenizer *tok;
    bool skip_special;
    int strip_left; /* leading strip characters still to drop */
    cpm_strbuf run; /* held byte-fallback bytes */
    cpm_strbuf out; /* the piece handed back by the last call */
};

cpm_detok *cpm_detok_new(const cpm_tokenizer *tok, bool skip_special) {
    cpm_detok *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->tok = tok;
    d->skip_special = skip_special;
    d->strip_left = tok->dec_strip_start;
    if (cpm_strbuf_reserve(&d->out, 64) < 0 || cpm_strbuf_reserve(&d->run, 16) < 0) {
        cpm_detok_free(d);
        return NULL;
    }
    return d;
}

void cpm_detok_free(cpm_detok *d) {
    if (!d)
        return;
    cpm_strbuf_release(&d->run);
    cpm_strbuf_release(&d->out);
    free(d);
}

/* Drops the decoder's leading strip characters from the stream's first text. */
static void strip_start(cpm_detok *d) {
    size_t skip = 0;
    while (d->strip_left > 0 && skip < d->out.len) {
        if (d->out.p[skip] != d->tok->dec_strip_char) {
            d->strip_left = 0;
            break;
        }
        skip++;
        d->strip_left--;
    }
    if (skip) {
        memmove(d->out.p, d->out.p + skip, d->out.len - skip + 1);
        d->out.len -= skip;
    }
    if (d->out.len)
        d->strip_left = 0;
}

static int finish(cpm_detok *d, int rc, const char **ret_piece, size_t *ret_len, cpm_error *err) {
    if (rc < 0) {
        d->out.len = 0;
        *ret_piece = "";
        *ret_len = 0;
        return cpm_error_set(err, rc, "detok: out of memory");
    }
    strip_start(d);
    *ret_piece = d->out.p;
    *ret_len = d->out.len;
    return 0;
}

int cpm_detok_push(cpm_detok *d, int32_t id, const char **ret_piece, size_t *ret_len, cpm_error *err) {
    const cpm_tokenizer *tok = d->tok;
    *ret_piece = "";
    *ret_len = 0;
    if (id < 0 || id >= tok->vocab.n)
        return cpm_error_set(err, CPM_ERANGE, "detok: id %d is outside [0, %d)", id, tok->vocab.n);
    d->out.len = 0;
    d->out.p[0] = '\0';
    uint8_t f = tok->vocab.flags[id];
    if (d->skip_special && (f & CPM_VOCAB_SPECIAL))
        return finish(d, 0, ret_piece, ret_len, err);
    if (tok->dec_byte_fallback && (f & CPM_VOCAB_BYTE)) {
        char b = (char)cpm_tok_byte_piece(cpm_vocab_piece(&tok->vocab, id), tok->vocab.len[id]);
        return finish(d, cpm_strbuf_add(&d->run, &b, 1), ret_piece, ret_len, err);
    }
    int rc = d->run.len ? cpm_tok_flush_bytes(&d->out, &d->run) : 0;
    if (rc == 0)
        rc = cpm_tok_piece_text(tok, id, &d->out);
    return finish(d, rc, ret_piece, ret_len, err);
}

int cpm_detok_flush(cpm_detok *d, const char **ret_piece, size_t *ret_len, cpm_error *err) {
    d->out.len = 0;
    d->out.p[0] = '\0';
    int rc = d->run.len ? cpm_tok_flush_bytes(&d->out, &d->run) : 0;
    rc = finish(d, rc, ret_piece, ret_len, err);
    d->strip_left = d->tok->dec_strip_start;
    return rc;
}
