/* tok_spm.c - loads a SentencePiece tokenizer.model (protobuf, parsed with the
 * protoc-c code generated from proto/sentencepiece_model.proto) into a
 * cpm_tokenizer. Only BPE models with the identity normalizer are accepted: the
 * MiniCPM 122753 and 73440 vocabularies. Encoding then follows SentencePiece's BPE
 * (score-ordered merges, user-defined pieces whole) on text normalized the way the
 * HF Llama tokenizer does ("▁" prefix, " " -> "▁").
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "proto/sentencepiece_model.pb-c.h"
#include "services/tokenizer/tok_internal.h"
#include "common/utf8.h"

#define SPM_MAX_PIECES (1 << 24)

typedef CpmSpm__ModelProto__SentencePiece spm_piece;

static int check_specs(const CpmSpm__ModelProto *m, const char *name, cpm_error *err) {
    const CpmSpm__TrainerSpec *t = m->trainer_spec;
    if (!t || t->model_type != CPM_SPM__TRAINER_SPEC__MODEL_TYPE__BPE)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: not a BPE model (model_type %d)", name,
                             t ? (int)t->model_type : 1);
    if (t->treat_whitespace_as_suffix)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: treat_whitespace_as_suffix is set", name);
    const CpmSpm__NormalizerSpec *n = m->normalizer_spec;
    if (n && (n->precompiled_charsmap.len > 0 || n->remove_extra_whitespaces))
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: normalizer with a charsmap or whitespace folding (only identity)", name);
    return 0;
}

static int cmp_score_desc(const void *a, const void *b, void *ctx) {
    const float *score = ctx;
    float x = score[*(const int32_t *)a], y = score[*(const int32_t *)b];
    return x > y ? -1 : x < y ? 1 : 0;
}

/* Merge rank = position of the piece's score among the distinct scores, best
 * first: SentencePiece merges the highest score, so equal scores tie (and the
 * leftmost pair wins, which the heap's position key does). */
static int assign_ranks(cpm_tokenizer *tok, const CpmSpm__ModelProto *m, const char *name,
                        cpm_error *err) {
    size_t n = m->n_pieces;
    float *score = malloc(n * sizeof *score);
    int32_t *order = malloc(n * sizeof *order);
    if (!score || !order) {
        free(score);
        free(order);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    }
    for (size_t i = 0; i < n; i++) {
        score[i] = m->pieces[i]->score;
        order[i] = (int32_t)i;
    }
    qsort_r(order, n, sizeof *order, cmp_score_desc, score);
    int32_t rank = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && score[order[i]] != score[order[i - 1]])
            rank++;
        tok->vocab.rank[order[i]] = rank;
    }
    free(score);
    free(order);
    return 0;
}

static int load_piece(cpm_tokenizer *tok, int32_t id, const spm_piece *p, const char *name,
                      cpm_error *err) {
    const char *s = (const char *)p->piece.data;
    size_t len = p->piece.len;
    if (len == 0 || !cpm_utf8_valid(s, len, NULL) || isnan(p->score))
        return cpm_error_set(err, CPM_EFORMAT, "%s: piece %d: empty, not UTF-8 or NaN score", name, id);
    if (cpm_vocab_set(&tok->vocab, id, s, len) < 0 || cpm_vocab_find(&tok->vocab, s, len) != id)
        return cpm_error_set(err, CPM_EFORMAT, "%s: piece %d \"%.*s\" appears twice", name, id,
                             (int)(len < 40 ? len : 40), s);
    uint8_t *flags = &tok->vocab.flags[id];
    switch (p->type) {
    case CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__NORMAL:
        *flags |= CPM_VOCAB_MERGEABLE;
        break;
    case CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__USER_DEFINED: {
        *flags |= CPM_VOCAB_MERGEABLE | CPM_VOCAB_USERDEF;
        uint8_t c = (uint8_t)s[0];
        if (len <= 32)
            tok->ud_lengths[c] |= 1u << (len - 1);
        else
            tok->ud_long[c] = true;
        if (len > tok->ud_max_len)
            tok->ud_max_len = (uint32_t)len;
        break;
    }
    case CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__BYTE:
        if (cpm_tok_byte_piece(s, len) < 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: byte piece %d is \"%.*s\"", name, id,
                                 (int)(len < 40 ? len : 40), s);
        break;
    case CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__UNKNOWN:
        if (tok->unk_id >= 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: two unknown pieces", name);
        tok->unk_id = id;
        break;
    case CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__CONTROL:
        break;
    default:
        /* UNUSED pieces need SentencePiece's re-segmentation; no MiniCPM model has one. */
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: piece %d has type %d", name, id, (int)p->type);
    }
    return 0;
}

/* Control and unknown pieces are special tokens matched whole in the text, as the
 * HF converter registers them (<s>, </s>, <unk>). */
static int add_specials(cpm_tokenizer *tok, const CpmSpm__ModelProto *m, const char *name,
                        cpm_error *err) {
    for (size_t i = 0; i < m->n_pieces; i++) {
        int t = m->pieces[i]->type;
        if (t != CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__CONTROL &&
            t != CPM_SPM__MODEL_PROTO__SENTENCE_PIECE__TYPE__UNKNOWN)
            continue;
        int rc = cpm_tok_add_token(tok, (int32_t)i, (const char *)m->pieces[i]->piece.data,
                                   m->pieces[i]->piece.len, true, name, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* The HF Llama "legacy" pipeline: normalizer Prepend("▁") + Replace(" ", "▁"),
 * decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1). */
static int set_llama_pipeline(cpm_tokenizer *tok, const char *name, cpm_error *err) {
    static const char sp[] = "\xe2\x96\x81"; /* U+2581 */
    tok->norm[0] = (cpm_tok_norm){CPM_NORM_PREPEND, strdup(sp), strdup(sp), 3, 3};
    tok->norm[1] = (cpm_tok_norm){CPM_NORM_REPLACE, strdup(" "), strdup(sp), 1, 3};
    tok->n_norm = 2;
    for (int i = 0; i < 2; i++)
        if (!tok->norm[i].a || !tok->norm[i].b)
            return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    memcpy(tok->dec_from, sp, 3);
    tok->dec_from_len = 3;
    tok->dec_to[0] = ' ';
    tok->dec_to_len = 1;
    tok->dec_byte_fallback = true;
    tok->dec_strip_char = ' ';
    tok->dec_strip_start = 1;
    return 0;
}

static int set_bos_eos(cpm_tokenizer *tok, const CpmSpm__TrainerSpec *t) {
    int32_t n = tok->n_model;
    tok->bos_id = t->bos_id >= 0 && t->bos_id < n ? t->bos_id : -1;
    tok->eos_id = t->eos_id >= 0 && t->eos_id < n ? t->eos_id : -1;
    /* LlamaTokenizer's defaults: add_bos_token true, add_eos_token false. */
    tok->add_bos = tok->bos_id >= 0;
    if (tok->add_bos)
        tok->post_prefix[tok->n_post_prefix++] = tok->bos_id;
    return 0;
}

int cpm_tokspm_load(cpm_tokenizer *tok, const uint8_t *data, size_t len, const char *name,
                    cpm_error *err) {
    CpmSpm__ModelProto *m = cpm_spm__model_proto__unpack(NULL, len, data);
    if (!m)
        return cpm_error_set(err, CPM_EFORMAT, "%s: not a SentencePiece model (protobuf parse failed)",
                             name);
    int rc = 0;
    if (m->n_pieces == 0 || m->n_pieces > SPM_MAX_PIECES) {
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: %zu pieces", name, m->n_pieces);
        goto out;
    }
    if ((rc = check_specs(m, name, err)) < 0)
        goto out;
    tok->kind = CPM_TOK_SPM;
    tok->n_model = (int32_t)m->n_pieces;
    tok->unk_id = -1;
    tok->byte_fallback = m->trainer_spec->byte_fallback;
    if (cpm_vocab_init(&tok->vocab, tok->n_model) < 0) {
        rc = cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
        goto out;
    }
    for (size_t i = 0; i < m->n_pieces && rc == 0; i++)
        rc = load_piece(tok, (int32_t)i, m->pieces[i], name, err);
    if (rc == 0 && tok->unk_id < 0)
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: no unknown piece", name);
    if (rc == 0)
        rc = assign_ranks(tok, m, name, err);
    if (rc == 0)
        rc = add_specials(tok, m, name, err);
    if (rc == 0)
        rc = set_llama_pipeline(tok, name, err);
    if (rc == 0)
        rc = set_bos_eos(tok, m->trainer_spec);
    if (rc == 0)
        rc = cpm_tok_finish(tok, name, err);
out:
    cpm_spm__model_proto__free_unpacked(m, NULL);
    return rc;
}
