/* tokenizer.c - the tokenizer object: loading a model directory (tokenizer file +
 * configs), encoding (added-token split -> normalizer -> BPE in tok_bpe.c) and
 * one-shot decoding. The router's tokenizer service and cpm-run call these.
 */
#include "services/tokenizer/tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/strbuf.h"
#include "services/tokenizer/tok_internal.h"
#include "common/utf8.h"

#define MAX_FILE_BYTES (512u << 20)

static const char REPLACEMENT[] = "\xef\xbf\xbd"; /* U+FFFD */

/* --- files --- */

/* Reads a whole file. CPM_ENOTFOUND when it does not exist (callers treat most
 * config files as optional). */
static int read_file(const char *dir, const char *file, char **ret, size_t *ret_len, cpm_error *err) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, file) >= sizeof path)
        return cpm_error_set(err, CPM_EINVAL, "%s/%s: path too long", dir, file);
    FILE *f = fopen(path, "rb");
    if (!f)
        return cpm_error_set(err, errno == ENOENT ? CPM_ENOTFOUND : CPM_EIO, "%s: %s", path,
                             strerror(errno));
    int rc = 0;
    char *buf = NULL;
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (size < 0 || (unsigned long)size > MAX_FILE_BYTES || fseek(f, 0, SEEK_SET) != 0) {
        rc = cpm_error_set(err, size < 0 ? CPM_EIO : CPM_ELIMIT, "%s: unreadable or larger than %u bytes",
                           path, MAX_FILE_BYTES);
        goto out;
    }
    buf = malloc((size_t)size + 1);
    if (!buf) {
        rc = cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) {
        rc = cpm_error_set(err, CPM_EIO, "%s: short read", path);
        goto out;
    }
    buf[size] = '\0';
    *ret = buf;
    *ret_len = (size_t)size;
    buf = NULL;
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Parses an optional JSON config; *ret = NULL when the file does not exist. */
static int read_json(const char *dir, const char *file, json_t **ret, cpm_error *err) {
    char *data;
    size_t len;
    *ret = NULL;
    int rc = read_file(dir, file, &data, &len, err);
    if (rc == CPM_ENOTFOUND) {
        cpm_error_clear(err);
        return 0;
    }
    if (rc < 0)
        return rc;
    json_error_t jerr;
    /* INT_AS_REAL: tokenizer configs carry model_max_length = 1e30 as an integer
     * literal, too big for jansson's integers; ids are read back with json_id(). */
    *ret = json_loadb(data, len, JSON_DECODE_INT_AS_REAL, &jerr);
    free(data);
    if (!*ret || !json_is_object(*ret)) {
        json_decref(*ret);
        *ret = NULL;
        return cpm_error_set(err, CPM_EFORMAT, "%s/%s: line %d: %s", dir, file, jerr.line,
                             *jerr.text ? jerr.text : "not an object");
    }
    return 0;
}

/* --- configs --- */

/* A token id from a config number, -1 when it is not a non-negative integer. */
static json_int_t json_id(const json_t *v) {
    double d = json_number_value(v);
    if (!json_is_number(v) || d < 0 || d >= (1 << 24) || d != (double)(json_int_t)d)
        return -1;
    return (json_int_t)d;
}

/* "<s>" or {"content": "<s>"} -> id, -1 when absent or unknown. */
static int32_t token_id_of(const cpm_tokenizer *tok, json_t *v) {
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!json_is_string(v))
        return -1;
    return cpm_tokenizer_piece_to_id(tok, json_string_value(v), json_string_length(v));
}

static int apply_added_decoder(cpm_tokenizer *tok, json_t *dec, const char *name, cpm_error *err) {
    const char *key;
    json_t *t;
    json_object_foreach(dec, key, t) {
        char *end;
        long id = strtol(key, &end, 10);
        json_t *content = json_object_get(t, "content");
        if (*end || end == key || id < 0 || !json_is_string(content))
            return cpm_error_set(err, CPM_EFORMAT, "%s: added_tokens_decoder[\"%.20s\"]: bad entry", name, key);
        if (json_is_true(json_object_get(t, "lstrip")) || json_is_true(json_object_get(t, "rstrip")) ||
            json_is_true(json_object_get(t, "single_word")) ||
            json_is_true(json_object_get(t, "normalized")))
            return cpm_error_set(err, CPM_EUNSUPPORTED,
                                 "%s: added token %ld: lstrip/rstrip/single_word/normalized", name, id);
        int rc = cpm_tok_add_token(tok, (int32_t)id, json_string_value(content),
                                   json_string_length(content),
                                   json_is_true(json_object_get(t, "special")), name, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int apply_added_tokens_json(cpm_tokenizer *tok, json_t *added, const char *name, cpm_error *err) {
    const char *key;
    json_t *idv;
    json_object_foreach(added, key, idv) {
        if (json_id(idv) < 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: \"%.40s\": id is not an integer", name, key);
        int rc = cpm_tok_add_token(tok, (int32_t)json_id(idv), key, strlen(key), false,
                                   name, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static cpm_chat_family family_from_template(const char *tpl, bool *found) {
    *found = true;
    if (strstr(tpl, "<\xe7\x94\xa8\xe6\x88\xb7>")) /* <用户> */
        return CPM_CHAT_MINICPM2;
    if (strstr(tpl, "tool_call"))
        return CPM_CHAT_MINICPM3;
    if (strstr(tpl, "<|im_start|>"))
        return CPM_CHAT_CHATML;
    *found = false;
    return CPM_CHAT_MINICPM2;
}

static void apply_tokenizer_config(cpm_tokenizer *tok, json_t *cfg, bool *family_found) {
    json_t *v;
    if ((v = json_object_get(cfg, "bos_token")) && token_id_of(tok, v) >= 0)
        tok->bos_id = token_id_of(tok, v);
    if ((v = json_object_get(cfg, "eos_token")) && token_id_of(tok, v) >= 0)
        tok->eos_id = token_id_of(tok, v);
    /* transformers rebuilds the post-processor from these flags (Llama tokenizers). */
    json_t *add_bos = json_object_get(cfg, "add_bos_token");
    json_t *add_eos = json_object_get(cfg, "add_eos_token");
    if (json_is_boolean(add_bos) || json_is_boolean(add_eos)) {
        tok->add_bos = json_is_boolean(add_bos) ? json_is_true(add_bos) : tok->add_bos;
        tok->add_eos = json_is_true(add_eos);
        tok->n_post_prefix = tok->n_post_suffix = 0;
        if (tok->add_bos && tok->bos_id >= 0)
            tok->post_prefix[tok->n_post_prefix++] = tok->bos_id;
        if (tok->add_eos && tok->eos_id >= 0)
            tok->post_suffix[tok->n_post_suffix++] = tok->eos_id;
        tok->add_bos = tok->n_post_prefix > 0;
    }
    const char *tpl = json_string_value(json_object_get(cfg, "chat_template"));
    if (tpl)
        tok->chat_family = family_from_template(tpl, family_found);
}

static void add_stop(cpm_tokenizer *tok, json_int_t id) {
    if (id < 0 || id >= tok->vocab.n || tok->n_stop == CPM_TOK_MAX_STOP || cpm_tokenizer_is_stop(tok, (int32_t)id))
        return;
    tok->stop_ids[tok->n_stop++] = (int32_t)id;
}

static void add_stops_from(cpm_tokenizer *tok, json_t *eos) {
    size_t i;
    json_t *v;
    if (json_is_number(eos))
        add_stop(tok, json_id(eos));
    json_array_foreach(eos, i, v) add_stop(tok, json_id(v));
}

static int load_configs(cpm_tokenizer *tok, const char *dir, cpm_error *err) {
    json_t *tcfg = NULL, *added = NULL, *gen = NULL, *cfg = NULL;
    char name[4200];
    int rc;
    if ((rc = read_json(dir, "tokenizer_config.json", &tcfg, err)) < 0 ||
        (rc = read_json(dir, "added_tokens.json", &added, err)) < 0 ||
        (rc = read_json(dir, "generation_config.json", &gen, err)) < 0 ||
        (rc = read_json(dir, "config.json", &cfg, err)) < 0)
        goto out;
    snprintf(name, sizeof name, "%s/added_tokens.json", dir);
    if (added && (rc = apply_added_tokens_json(tok, added, name, err)) < 0)
        goto out;
    snprintf(name, sizeof name, "%s/tokenizer_config.json", dir);
    json_t *dec = json_object_get(tcfg, "added_tokens_decoder");
    if (json_is_object(dec) && (rc = apply_added_decoder(tok, dec, name, err)) < 0)
        goto out;
    if ((rc = cpm_tok_finish(tok, name, err)) < 0)
        goto out;
    bool family_found = false;
    if (tcfg)
        apply_tokenizer_config(tok, tcfg, &family_found);
    const char *model_type = json_string_value(json_object_get(cfg, "model_type"));
    if (model_type && strcmp(model_type, "minicpm3") == 0)
        tok->chat_family = CPM_CHAT_MINICPM3;
    else if (!family_found)
        tok->chat_family = cpm_tokenizer_piece_to_id(tok, "<|im_start|>", 12) >= 0 ? CPM_CHAT_CHATML
                                                                                   : CPM_CHAT_MINICPM2;
    add_stops_from(tok, json_object_get(gen ? gen : cfg, "eos_token_id"));
    add_stop(tok, tok->eos_id);
out:
    json_decref(tcfg);
    json_decref(added);
    json_decref(gen);
    json_decref(cfg);
    return rc;
}

/* --- load / free --- */

static cpm_tokenizer *tok_alloc(void) {
    cpm_tokenizer *tok = calloc(1, sizeof *tok);
    if (tok) {
        tok->unk_id = tok->bos_id = tok->eos_id = -1;
        tok->chat_family = CPM_CHAT_MINICPM2;
    }
    return tok;
}

static int load_image(cpm_tokenizer *tok, const void *data, size_t len, bool is_json, const char *name,
                      cpm_error *err) {
    int rc = is_json ? cpm_tokhf_load(tok, data, len, name, err)
                     : cpm_tokspm_load(tok, data, len, name, err);
    if (rc < 0)
        return rc;
    if (tok->eos_id < 0) {
        int32_t eos = cpm_tokenizer_piece_to_id(tok, "</s>", 4);
        tok->eos_id = eos;
    }
    tok->chat_family = cpm_tokenizer_piece_to_id(tok, "<|im_start|>", 12) >= 0 ? CPM_CHAT_CHATML
                                                                               : CPM_CHAT_MINICPM2;
    return 0;
}

int cpm_tokenizer_load_mem(const void *data, size_t len, bool is_json, const char *name,
                           cpm_tokenizer **ret, cpm_error *err) {
    *ret = NULL;
    cpm_tokenizer *tok = tok_alloc();
    if (!tok)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    int rc = load_image(tok, data, len, is_json, name, err);
    if (rc == 0)
        add_stop(tok, tok->eos_id);
    if (rc < 0) {
        cpm_tokenizer_free(tok);
        return rc;
    }
    *ret = tok;
    return 0;
}

int cpm_tokenizer_load(const char *dir, cpm_tokenizer **ret, cpm_error *err) {
    *ret = NULL;
    char *data = NULL;
    size_t len;
    bool is_json = true;
    const char *file = "tokenizer.json";
    int rc = read_file(dir, file, &data, &len, err);
    if (rc == CPM_ENOTFOUND) {
        is_json = false;
        file = "tokenizer.model";
        rc = read_file(dir, file, &data, &len, err);
        if (rc == CPM_ENOTFOUND)
            return cpm_error_set(err, rc, "%s: neither tokenizer.json nor tokenizer.model", dir);
    }
    if (rc < 0)
        return rc;
    cpm_tokenizer *tok = tok_alloc();
    char name[4200];
    snprintf(name, sizeof name, "%s/%s", dir, file);
    if (!tok)
        rc = cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    if (rc == 0)
        rc = load_image(tok, data, len, is_json, name, err);
    free(data);
    if (rc == 0)
        rc = load_configs(tok, dir, err);
    if (rc < 0) {
        cpm_tokenizer_free(tok);
        return rc;
    }
    *ret = tok;
    return 0;
}

void cpm_tokenizer_free(cpm_tokenizer *tok) {
    if (!tok)
        return;
    cpm_vocab_release(&tok->vocab);
    cpm_tok_merges_release(&tok->merges);
    for (int i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].a);
        free(tok->norm[i].b);
    }
    free(tok->added);
    free(tok);
}

/* --- encode --- */

/* The leftmost added token in text[from..len), longest on ties (the HF added
 * vocabulary's leftmost-longest match). Returns its start, or len if none. */
static size_t find_added(const cpm_tokenizer *tok, const char *text, size_t from, size_t len,
                         const cpm_tok_added **ret) {
    if (tok->n_added == 0)
        return len;
    for (size_t i = from; i < len; i++) {
        if (!tok->added_first[(uint8_t)text[i]])
            continue;
        for (size_t k = 0; k < tok->n_added; k++) {
            const cpm_tok_added *a = &tok->added[k];
            if (a->len <= len - i && memcmp(text + i, tok->vocab.blob + a->off, a->len) == 0) {
                *ret = a;
                return i;
            }
        }
    }
    return len;
}

/* Applies the normalizer steps to one segment (HF: Prepend only when non-empty). */
static int normalize(const cpm_tokenizer *tok, const char *s, size_t len, cpm_strbuf *out,
                     cpm_strbuf *tmp) {
    out->len = 0;
    int rc = cpm_strbuf_add(out, s, len);
    for (int k = 0; k < tok->n_norm && rc == 0; k++) {
        const cpm_tok_norm *op = &tok->norm[k];
        if (out->len == 0)
            continue;
        tmp->len = 0;
        if (op->op == CPM_NORM_PREPEND) {
            rc = cpm_strbuf_add(tmp, op->a, op->a_len);
            if (rc == 0)
                rc = cpm_strbuf_add(tmp, out->p, out->len);
        } else {
            const char *p = out->p, *end = out->p + out->len;
            while (rc == 0 && p < end) {
                const char *hit = memmem(p, (size_t)(end - p), op->a, op->a_len);
                const char *stop = hit ? hit : end;
                rc = cpm_strbuf_add(tmp, p, (size_t)(stop - p));
                if (rc == 0 && hit)
                    rc = cpm_strbuf_add(tmp, op->b, op->b_len);
                p = hit ? hit + op->a_len : end;
            }
        }
        cpm_strbuf swap = *out;
        *out = *tmp;
        *tmp = swap;
    }
    return rc;
}

static int encode_text(const cpm_tokenizer *tok, const char *text, size_t len, cpm_tok_ids *ids,
                       cpm_error *err) {
    cpm_bpe_scratch *scratch = cpm_bpe_scratch_new();
    cpm_strbuf norm = {0}, tmp = {0};
    int rc = scratch ? 0 : CPM_ENOMEM;
    size_t pos = 0;
    while (rc == 0 && pos < len) {
        const cpm_tok_added *a = NULL;
        size_t at = find_added(tok, text, pos, len, &a);
        if (at > pos) {
            rc = normalize(tok, text + pos, at - pos, &norm, &tmp);
            if (rc == 0)
                rc = cpm_bpe_encode(tok, scratch, norm.p, norm.len, ids, err);
        }
        if (rc == 0 && a)
            rc = cpm_tok_ids_push(ids, a->id);
        pos = a ? at + a->len : len;
    }
    cpm_bpe_scratch_free(scratch);
    cpm_strbuf_release(&norm);
    cpm_strbuf_release(&tmp);
    if (rc == CPM_ENOMEM)
        return cpm_error_set(err, rc, "encode: out of memory");
    return rc;
}

int cpm_tokenizer_encode(const cpm_tokenizer *tok, const char *text, size_t len, bool add_special,
                         int32_t **ret_ids, size_t *ret_n, cpm_error *err) {
    *ret_ids = NULL;
    *ret_n = 0;
    if (!text && len)
        return cpm_error_set(err, CPM_EINVAL, "encode: NULL text");
    if (len > CPM_TOKENIZER_MAX_TEXT)
        return cpm_error_set(err, CPM_ELIMIT, "encode: text of %zu bytes exceeds %u", len,
                             CPM_TOKENIZER_MAX_TEXT);
    size_t bad;
    if (!cpm_utf8_valid(text, len, &bad))
        return cpm_error_set(err, CPM_EINVAL, "encode: invalid UTF-8 at byte %zu (0x%02x)", bad,
                             (uint8_t)text[bad]);
    cpm_tok_ids ids = {0};
    int rc = 0;
    for (int i = 0; add_special && i < tok->n_post_prefix && rc == 0; i++)
        rc = cpm_tok_ids_push(&ids, tok->post_prefix[i]);
    if (rc == 0)
        rc = encode_text(tok, text, len, &ids, err);
    for (int i = 0; add_special && i < tok->n_post_suffix && rc == 0; i++)
        rc = cpm_tok_ids_push(&ids, tok->post_suffix[i]);
    if (rc == 0 && !ids.v && !(ids.v = malloc(sizeof *ids.v)))
        rc = CPM_ENOMEM;
    if (rc < 0) {
        free(ids.v);
        if (rc == CPM_ENOMEM)
            return cpm_error_set(err, rc, "encode: out of memory");
        return rc;
    }
    *ret_ids = ids.v;
    *ret_n = ids.n;
    return 0;
}

/* --- decode --- */

int cpm_tok_flush_bytes(cpm_strbuf *out, cpm_strbuf *run) {
    int rc = 0;
    if (cpm_utf8_valid(run->p, run->len, NULL)) {
        rc = cpm_strbuf_add(out, run->p, run->len);
    } else {
        for (size_t i = 0; i < run->len && rc == 0; i++)
            rc = cpm_strbuf_add(out, REPLACEMENT, 3);
    }
    run->len = 0;
    return rc;
}

int cpm_tok_piece_text(const cpm_tokenizer *tok, int32_t id, cpm_strbuf *out) {
    const char *p = cpm_vocab_piece(&tok->vocab, id);
    size_t len = tok->vocab.len[id];
    if (tok->dec_from_len == 0)
        return cpm_strbuf_add(out, p, len);
    const char *end = p + len;
    int rc = 0;
    while (rc == 0 && p < end) {
        const char *hit = memmem(p, (size_t)(end - p), tok->dec_from, tok->dec_from_len);
        const char *stop = hit ? hit : end;
        rc = cpm_strbuf_add(out, p, (size_t)(stop - p));
        if (rc == 0 && hit)
            rc = cpm_strbuf_add(out, tok->dec_to, tok->dec_to_len);
        p = hit ? hit + tok->dec_from_len : end;
    }
    return rc;
}

int cpm_tokenizer_token_bytes(const cpm_tokenizer *tok, int32_t id, char *out, size_t cap) {
    if (id < 0 || id >= tok->vocab.n || (tok->vocab.flags[id] & CPM_VOCAB_SPECIAL))
        return 0;
    if (tok->dec_byte_fallback && (tok->vocab.flags[id] & CPM_VOCAB_BYTE)) {
        if (cap < 1)
            return -1;
        out[0] = (char)cpm_tok_byte_piece(cpm_vocab_piece(&tok->vocab, id), tok->vocab.len[id]);
        return 1;
    }
    cpm_strbuf b = {0};
    int rc = cpm_tok_piece_text(tok, id, &b);
    int n = rc < 0 || b.len > cap ? -1 : (int)b.len;
    if (n > 0)
        memcpy(out, b.p, b.len);
    free(b.p);
    return n;
}

int cpm_tokenizer_decode(const cpm_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                         char **ret_text, size_t *ret_len, cpm_error *err) {
    *ret_text = NULL;
    if (ret_len)
        *ret_len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= tok->vocab.n)
            return cpm_error_set(err, CPM_ERANGE, "decode: id %d at index %zu is outside [0, %d)", ids[i],
                                 i, tok->vocab.n);
    cpm_strbuf out = {0}, run = {0};
    int rc = cpm_strbuf_reserve(&out, n * 4);
    for (size_t i = 0; i < n && rc == 0; i++) {
        uint8_t f = tok->vocab.flags[ids[i]];
        if (skip_special && (f & CPM_VOCAB_SPECIAL))
            continue;
        if (tok->dec_byte_fallback && (f & CPM_VOCAB_BYTE)) {
            const char *p = cpm_vocab_piece(&tok->vocab, ids[i]);
            char b = (char)cpm_tok_byte_piece(p, tok->vocab.len[ids[i]]);
            rc = cpm_strbuf_add(&run, &b, 1);
            continue;
        }
        if (run.len)
            rc = cpm_tok_flush_bytes(&out, &run);
        if (rc == 0)
            rc = cpm_tok_piece_text(tok, ids[i], &out);
    }
    if (rc == 0 && run.len)
        rc = cpm_tok_flush_bytes(&out, &run);
    cpm_strbuf_release(&run);
    size_t skip = 0;
    while (rc == 0 && (int)skip < tok->dec_strip_start && skip < out.len && out.p[skip] == tok->dec_strip_char)
        skip++;
    if (rc == 0 && skip) {
        memmove(out.p, out.p + skip, out.len - skip);
        out.len -= skip;
    }
    char *text = rc == 0 ? cpm_strbuf_take(&out, ret_len) : NULL;
    cpm_strbuf_release(&out);
    if (!text)
        return cpm_error_set(err, CPM_ENOMEM, "decode: out of memory");
    *ret_text = text;
    return 0;
}

/* --- information --- */

int32_t cpm_tokenizer_vocab_size(const cpm_tokenizer *tok) {
    return tok->vocab.n;
}

int32_t cpm_tokenizer_bos_id(const cpm_tokenizer *tok) {
    return tok->bos_id;
}

int32_t cpm_tokenizer_eos_id(const cpm_tokenizer *tok) {
    return tok->eos_id;
}

bool cpm_tokenizer_add_bos(const cpm_tokenizer *tok) {
    return tok->add_bos;
}

size_t cpm_tokenizer_stop_ids(const cpm_tokenizer *tok, const int32_t **ret_ids) {
    *ret_ids = tok->stop_ids;
    return tok->n_stop;
}

bool cpm_tokenizer_is_stop(const cpm_tokenizer *tok, int32_t id) {
    for (size_t i = 0; i < tok->n_stop; i++)
        if (tok->stop_ids[i] == id)
            return true;
    return false;
}

bool cpm_tokenizer_is_special(const cpm_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->vocab.n && (tok->vocab.flags[id] & CPM_VOCAB_SPECIAL);
}

const char *cpm_tokenizer_id_to_piece(const cpm_tokenizer *tok, int32_t id, size_t *ret_len) {
    if (id < 0 || id >= tok->vocab.n)
        return NULL;
    if (ret_len)
        *ret_len = tok->vocab.len[id];
    return cpm_vocab_piece(&tok->vocab, id);
}

int32_t cpm_tokenizer_piece_to_id(const cpm_tokenizer *tok, const char *piece, size_t len) {
    return cpm_vocab_find(&tok->vocab, piece, len);
}

cpm_chat_family cpm_tokenizer_chat_family(const cpm_tokenizer *tok) {
    return tok->chat_family;
}

void cpm_tokenizer_set_chat_family(cpm_tokenizer *tok, cpm_chat_family family) {
    tok->chat_family = family;
}
