/* tok_hf.c - loads a Hugging Face tokenizer.json (BPE model) into a cpm_tokenizer:
 * vocabulary, merge ranks, added tokens, and the normalizer / post-processor /
 * decoder steps MiniCPM uses. Anything outside that subset is refused with
 * CPM_EUNSUPPORTED naming the field, rather than encoded differently from HF.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tok_internal.h"

/* Vocabularies larger than this are not tokenizers but attacks on memory. */
#define HF_MAX_VOCAB (1 << 24)

static const char *type_of(json_t *obj) {
    return json_string_value(json_object_get(obj, "type"));
}

static bool is_null(json_t *v) {
    return v == NULL || json_is_null(v);
}

static int load_vocab(cpm_tokenizer *tok, json_t *model, json_t *added, const char *name,
                      cpm_error *err) {
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return cpm_error_set(err, CPM_EFORMAT, "%s: model.vocab is not an object", name);
    json_int_t max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= HF_MAX_VOCAB)
            return cpm_error_set(err, CPM_EFORMAT, "%s: model.vocab[\"%.40s\"]: bad id", name, key);
        if (id > max_id)
            max_id = id;
    }
    tok->n_model = (int32_t)(max_id + 1);
    size_t i;
    json_array_foreach(added, i, val) {
        json_int_t id = json_integer_value(json_object_get(val, "id"));
        if (id > max_id && id < HF_MAX_VOCAB)
            max_id = id;
    }
    if (cpm_vocab_init(&tok->vocab, (int32_t)(max_id + 1)) < 0)
        return cpm_error_set(err, CPM_ENOMEM, "%s: vocabulary of %lld: out of memory", name,
                             (long long)max_id + 1);
    /* Object keys come back without their length; re-read them as json strings
     * would cost a copy, and vocab keys never hold NUL, so strlen is exact. */
    json_object_foreach(vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        if (cpm_vocab_set(&tok->vocab, id, key, strlen(key)) < 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: model.vocab: id %d used twice", name, id);
        tok->vocab.flags[id] |= CPM_VOCAB_MERGEABLE;
    }
    return 0;
}

/* Splits one merges entry ("a b" or ["a", "b"]) into ids and the merged id;
 * tmp has room for the longest piece. */
static int merge_ids(const cpm_tokenizer *tok, json_t *entry, char *tmp, int32_t ids[3]) {
    const char *a, *b;
    size_t alen, blen;
    if (json_is_string(entry)) {
        const char *s = json_string_value(entry);
        const char *sp = strchr(s, ' ');
        if (!sp || strchr(sp + 1, ' '))
            return CPM_EFORMAT;
        a = s;
        alen = (size_t)(sp - s);
        b = sp + 1;
        blen = strlen(b);
    } else if (json_is_array(entry) && json_array_size(entry) == 2 &&
               json_is_string(json_array_get(entry, 0)) && json_is_string(json_array_get(entry, 1))) {
        a = json_string_value(json_array_get(entry, 0));
        alen = json_string_length(json_array_get(entry, 0));
        b = json_string_value(json_array_get(entry, 1));
        blen = json_string_length(json_array_get(entry, 1));
    } else {
        return CPM_EFORMAT;
    }
    if (alen + blen > tok->vocab.max_len)
        return CPM_ENOTFOUND;
    memcpy(tmp, a, alen);
    memcpy(tmp + alen, b, blen);
    ids[0] = cpm_vocab_find(&tok->vocab, a, alen);
    ids[1] = cpm_vocab_find(&tok->vocab, b, blen);
    ids[2] = cpm_vocab_find(&tok->vocab, tmp, alen + blen);
    for (int k = 0; k < 3; k++)
        if (ids[k] < 0 || ids[k] >= tok->n_model)
            return CPM_ENOTFOUND;
    return 0;
}

static int load_merges(cpm_tokenizer *tok, json_t *model, const char *name, cpm_error *err) {
    json_t *merges = json_object_get(model, "merges");
    if (is_null(merges))
        merges = json_array();
    else
        json_incref(merges);
    int rc = 0;
    char *tmp = malloc(tok->vocab.max_len + 1);
    if (!tmp) {
        rc = cpm_error_set(err, CPM_ENOMEM, "%s: merges: out of memory", name);
        goto out;
    }
    if (!json_is_array(merges)) {
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: model.merges is not an array", name);
        goto out;
    }
    if (cpm_tok_merges_init(&tok->merges, json_array_size(merges)) < 0) {
        rc = cpm_error_set(err, CPM_ENOMEM, "%s: merges: out of memory", name);
        goto out;
    }
    size_t i;
    json_t *entry;
    json_array_foreach(merges, i, entry) {
        int32_t ids[3];
        rc = merge_ids(tok, entry, tmp, ids);
        if (rc == CPM_EFORMAT) {
            rc = cpm_error_set(err, rc, "%s: model.merges[%zu]: not \"a b\" or [a, b]", name, i);
            goto out;
        }
        if (rc < 0) {
            rc = cpm_error_set(err, CPM_EFORMAT, "%s: model.merges[%zu]: token not in vocab", name, i);
            goto out;
        }
        rc = cpm_tok_merges_add(&tok->merges, ids[0], ids[1], (uint32_t)i, ids[2]);
        if (rc < 0) {
            rc = cpm_error_set(err, rc, "%s: model.merges[%zu]: table full", name, i);
            goto out;
        }
    }
out:
    free(tmp);
    json_decref(merges);
    return rc;
}

static int load_model(cpm_tokenizer *tok, json_t *model, const char *name, cpm_error *err) {
    if (!is_null(json_object_get(model, "dropout")))
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: model.dropout is set", name);
    const char *fields[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t k = 0; k < 2; k++) {
        json_t *v = json_object_get(model, fields[k]);
        if (!is_null(v) && !(json_is_string(v) && json_string_length(v) == 0))
            return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: model.%s is set", name, fields[k]);
    }
    tok->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    tok->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    tok->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    json_t *unk = json_object_get(model, "unk_token");
    tok->unk_id = -1;
    if (json_is_string(unk)) {
        tok->unk_id = cpm_vocab_find(&tok->vocab, json_string_value(unk), json_string_length(unk));
        if (tok->unk_id < 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: model.unk_token not in vocab", name);
    }
    return load_merges(tok, model, name, err);
}

static int load_added(cpm_tokenizer *tok, json_t *added, const char *name, cpm_error *err) {
    size_t i;
    json_t *t;
    json_array_foreach(added, i, t) {
        json_t *content = json_object_get(t, "content");
        json_t *id = json_object_get(t, "id");
        if (!json_is_string(content) || !json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= HF_MAX_VOCAB)
            return cpm_error_set(err, CPM_EFORMAT, "%s: added_tokens[%zu]: needs id and content", name, i);
        const char *flags[] = {"lstrip", "rstrip", "single_word", "normalized"};
        for (size_t k = 0; k < 4; k++)
            if (json_is_true(json_object_get(t, flags[k])))
                return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: added_tokens[%zu]: %s is true", name,
                                     i, flags[k]);
        int rc = cpm_tok_add_token(tok, (int32_t)json_integer_value(id), json_string_value(content),
                                   json_string_length(content),
                                   json_is_true(json_object_get(t, "special")), name, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int add_norm(cpm_tokenizer *tok, json_t *n, const char *name, cpm_error *err) {
    const char *type = type_of(n);
    if (tok->n_norm == CPM_TOK_MAX_NORM)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: more than %d normalizers", name,
                             CPM_TOK_MAX_NORM);
    cpm_tok_norm *op = &tok->norm[tok->n_norm];
    json_t *a = NULL, *b = NULL;
    if (type && strcmp(type, "Prepend") == 0) {
        op->op = CPM_NORM_PREPEND;
        a = json_object_get(n, "prepend");
        b = a;
    } else if (type && strcmp(type, "Replace") == 0) {
        op->op = CPM_NORM_REPLACE;
        a = json_object_get(json_object_get(n, "pattern"), "String");
        b = json_object_get(n, "content");
    } else {
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: normalizer \"%s\"", name,
                             type ? type : "?");
    }
    if (!json_is_string(a) || !json_is_string(b) || (op->op == CPM_NORM_REPLACE && json_string_length(a) == 0))
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: normalizer %s: needs literal strings", name, type);
    op->a = strndup(json_string_value(a), json_string_length(a));
    op->b = strndup(json_string_value(b), json_string_length(b));
    op->a_len = json_string_length(a);
    op->b_len = json_string_length(b);
    tok->n_norm++;
    if (!op->a || !op->b)
        return cpm_error_set(err, CPM_ENOMEM, "%s: normalizer: out of memory", name);
    return 0;
}

static int load_normalizer(cpm_tokenizer *tok, json_t *n, const char *name, cpm_error *err) {
    if (is_null(n))
        return 0;
    const char *type = type_of(n);
    if (type && strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *sub;
        json_array_foreach(json_object_get(n, "normalizers"), i, sub) {
            int rc = add_norm(tok, sub, name, err);
            if (rc < 0)
                return rc;
        }
        return 0;
    }
    return add_norm(tok, n, name, err);
}

/* TemplateProcessing "single": special token ids before and after $A. */
static int load_post(cpm_tokenizer *tok, json_t *post, const char *name, cpm_error *err) {
    if (is_null(post))
        return 0;
    const char *type = type_of(post);
    if (!type || strcmp(type, "TemplateProcessing") != 0)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: post_processor \"%s\"", name,
                             type ? type : "?");
    json_t *specials = json_object_get(post, "special_tokens");
    bool seen_seq = false;
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(post, "single"), i, item) {
        if (json_object_get(item, "Sequence")) {
            seen_seq = true;
            continue;
        }
        const char *sid = json_string_value(json_object_get(json_object_get(item, "SpecialToken"), "id"));
        json_t *ids = json_object_get(json_object_get(specials, sid ? sid : ""), "ids");
        size_t k;
        json_t *idv;
        json_array_foreach(ids, k, idv) {
            json_int_t id = json_integer_value(idv);
            int *n = seen_seq ? &tok->n_post_suffix : &tok->n_post_prefix;
            int32_t *dst = seen_seq ? tok->post_suffix : tok->post_prefix;
            if (!json_is_integer(idv) || id < 0 || id >= tok->vocab.n || *n == CPM_TOK_MAX_POST)
                return cpm_error_set(err, CPM_EFORMAT, "%s: post_processor.single[%zu]: bad ids", name, i);
            dst[(*n)++] = (int32_t)id;
        }
        if (!json_is_array(ids))
            return cpm_error_set(err, CPM_EFORMAT, "%s: post_processor: special token \"%s\" unknown",
                                 name, sid ? sid : "?");
    }
    return 0;
}

static int add_decoder(cpm_tokenizer *tok, json_t *d, bool *fused, const char *name, cpm_error *err) {
    const char *type = type_of(d);
    type = type ? type : "?";
    if (strcmp(type, "Replace") == 0) {
        json_t *a = json_object_get(json_object_get(d, "pattern"), "String");
        json_t *b = json_object_get(d, "content");
        if (!json_is_string(a) || !json_is_string(b) || json_string_length(a) == 0 ||
            json_string_length(a) >= sizeof tok->dec_from || json_string_length(b) >= sizeof tok->dec_to ||
            tok->dec_from_len)
            return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: decoder Replace: one literal only", name);
        tok->dec_from_len = json_string_length(a);
        tok->dec_to_len = json_string_length(b);
        memcpy(tok->dec_from, json_string_value(a), tok->dec_from_len);
        memcpy(tok->dec_to, json_string_value(b), tok->dec_to_len);
    } else if (strcmp(type, "ByteFallback") == 0) {
        tok->dec_byte_fallback = true;
    } else if (strcmp(type, "Fuse") == 0) {
        *fused = true;
    } else if (strcmp(type, "Strip") == 0) {
        json_t *c = json_object_get(d, "content");
        json_int_t start = json_integer_value(json_object_get(d, "start"));
        json_int_t stop = json_integer_value(json_object_get(d, "stop"));
        /* Per-token stripping (before Fuse) and trailing stripping would need
         * look-ahead when streaming; MiniCPM strips one leading space after Fuse. */
        if (!*fused || !json_is_string(c) || json_string_length(c) != 1 || stop != 0 || start < 0 ||
            start > 16)
            return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: decoder Strip: only leading, after Fuse", name);
        tok->dec_strip_char = json_string_value(c)[0];
        tok->dec_strip_start = (int)start;
    } else {
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: decoder \"%s\"", name, type);
    }
    return 0;
}

static int load_decoder(cpm_tokenizer *tok, json_t *d, const char *name, cpm_error *err) {
    if (is_null(d))
        return 0;
    bool fused = false;
    const char *type = type_of(d);
    if (type && strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *sub;
        json_array_foreach(json_object_get(d, "decoders"), i, sub) {
            int rc = add_decoder(tok, sub, &fused, name, err);
            if (rc < 0)
                return rc;
        }
        return 0;
    }
    return add_decoder(tok, d, &fused, name, err);
}

int cpm_tokhf_load(cpm_tokenizer *tok, const char *data, size_t len, const char *name,
                   cpm_error *err) {
    json_error_t jerr;
    json_t *root = json_loadb(data, len, JSON_ALLOW_NUL, &jerr);
    if (!root)
        return cpm_error_set(err, CPM_EFORMAT, "%s: line %d: %s", name, jerr.line, jerr.text);
    int rc = 0;
    json_t *model = json_object_get(root, "model");
    json_t *added = json_object_get(root, "added_tokens");
    if (!json_is_object(model)) {
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: no \"model\" object", name);
        goto out;
    }
    if (!is_null(added) && !json_is_array(added)) {
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: added_tokens is not an array", name);
        goto out;
    }
    if (!is_null(json_object_get(root, "pre_tokenizer"))) {
        rc = cpm_error_set(err, CPM_EUNSUPPORTED, "%s: pre_tokenizer is set (MiniCPM has none)", name);
        goto out;
    }
    const char *type = type_of(model);
    if (type && strcmp(type, "BPE") != 0) {
        rc = cpm_error_set(err, CPM_EUNSUPPORTED, "%s: model.type \"%s\" (only BPE)", name, type);
        goto out;
    }
    tok->kind = CPM_TOK_HF;
    if ((rc = load_vocab(tok, model, added, name, err)) < 0 ||
        (rc = load_model(tok, model, name, err)) < 0 ||
        (rc = load_added(tok, added, name, err)) < 0 ||
        (rc = load_normalizer(tok, json_object_get(root, "normalizer"), name, err)) < 0 ||
        (rc = load_post(tok, json_object_get(root, "post_processor"), name, err)) < 0 ||
        (rc = load_decoder(tok, json_object_get(root, "decoder"), name, err)) < 0)
        goto out;
    /* bos/eos default to what the post-processor adds; the configs may refine. */
    tok->add_bos = tok->n_post_prefix > 0;
    tok->bos_id = tok->n_post_prefix > 0 ? tok->post_prefix[0] : -1;
    rc = cpm_tok_finish(tok, name, err);
out:
    json_decref(root);
    return rc;
}
