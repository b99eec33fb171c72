/* hf_config.c - config.json → cpm_hparams, with the official defaults. */
#include "hf_config.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Typed field readers. Each returns 0 when the field is absent (leaving the
 * default in place) or valid, and an error naming file and field otherwise. */

static int get_int(json_t *o, const char *key, int *out, int min, int max, const char *file,
                   cpm_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return cpm_error_set(err, CPM_EFORMAT, "%s: field %s: expected an integer", file, key);
    json_int_t x = json_integer_value(v);
    if (x < min || x > max)
        return cpm_error_set(err, CPM_ERANGE, "%s: field %s: %lld is outside [%d, %d]", file,
                             key, (long long)x, min, max);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *o, const char *key, double *out, const char *file, cpm_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return cpm_error_set(err, CPM_EFORMAT, "%s: field %s: expected a number", file, key);
    *out = json_number_value(v);
    return 0;
}

static int get_bool(json_t *o, const char *key, bool *out, const char *file, cpm_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return cpm_error_set(err, CPM_EFORMAT, "%s: field %s: expected true or false", file, key);
    *out = json_is_true(v);
    return 0;
}

static int require(json_t *o, const char *key, const char *file, cpm_error *err) {
    if (!json_object_get(o, key))
        return cpm_error_set(err, CPM_EFORMAT, "%s: required field %s is missing", file, key);
    return 0;
}

/* eos_token_id may be an int or a list; ids are merged without duplicates. */
/* The sampling keys of generation_config.json that a request may leave to the model;
 * values of the wrong type are ignored (transformers would fail later, not here). */
static void read_gen_defaults(json_t *g, cpm_gen_defaults *d) {
    json_t *v;
    if ((v = json_object_get(g, "temperature")) && json_is_number(v) && json_number_value(v) >= 0)
        d->has_temperature = true, d->temperature = (float)json_number_value(v);
    if ((v = json_object_get(g, "top_p")) && json_is_number(v) && json_number_value(v) > 0 &&
        json_number_value(v) <= 1)
        d->has_top_p = true, d->top_p = (float)json_number_value(v);
    if ((v = json_object_get(g, "top_k")) && json_is_integer(v) && json_integer_value(v) >= 0 &&
        json_integer_value(v) <= 1 << 20)
        d->has_top_k = true, d->top_k = (int)json_integer_value(v);
    if ((v = json_object_get(g, "repetition_penalty")) && json_is_number(v) &&
        json_number_value(v) > 0 && json_number_value(v) <= 10)
        d->has_repetition_penalty = true, d->repetition_penalty = (float)json_number_value(v);
    if ((v = json_object_get(g, "do_sample")) && json_is_false(v))
        d->has_temperature = true, d->temperature = 0.0f; /* greedy */
}

static int merge_eos(json_t *o, cpm_hparams *hp, const char *file, cpm_error *err) {
    json_t *v = json_object_get(o, "eos_token_id");
    if (!v || json_is_null(v))
        return 0;
    json_t *one[1] = {v};
    json_t **items = one;
    size_t n = 1;
    if (json_is_array(v)) {
        n = json_array_size(v);
        items = NULL;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = items ? items[i] : json_array_get(v, i);
        if (!json_is_integer(e) || json_integer_value(e) < 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: field eos_token_id: expected token ids",
                                 file);
        int id = (int)json_integer_value(e);
        bool seen = false;
        for (int k = 0; k < hp->n_eos; k++)
            seen |= hp->eos_ids[k] == id;
        if (!seen && hp->n_eos < CPM_MAX_EOS)
            hp->eos_ids[hp->n_eos++] = id;
    }
    return 0;
}

static int read_factor_list(json_t *rs, const char *key, double *out, int want, const char *file,
                            cpm_error *err) {
    json_t *v = json_object_get(rs, key);
    if (!json_is_array(v))
        return cpm_error_set(err, CPM_EFORMAT, "%s: rope_scaling.%s: expected a list", file, key);
    if ((int)json_array_size(v) != want)
        return cpm_error_set(err, CPM_ESHAPE,
                             "%s: rope_scaling.%s: %zu values, expected %d (rotary dim / 2)", file,
                             key, json_array_size(v), want);
    for (int i = 0; i < want; i++) {
        json_t *e = json_array_get(v, (size_t)i);
        if (!json_is_number(e) || json_number_value(e) <= 0)
            return cpm_error_set(err, CPM_EFORMAT,
                                 "%s: rope_scaling.%s[%d]: expected a positive number", file, key, i);
        out[i] = json_number_value(e);
    }
    return 0;
}

/* MiniCPM4 names the kind `rope_type`, MiniCPM3 `type`; accept either. */
static int parse_rope_scaling(json_t *root, cpm_hparams *hp, const char *file, cpm_error *err) {
    json_t *rs = json_object_get(root, "rope_scaling");
    if (!rs || json_is_null(rs))
        return 0;
    if (!json_is_object(rs))
        return cpm_error_set(err, CPM_EFORMAT, "%s: rope_scaling: expected an object or null", file);
    json_t *kind = json_object_get(rs, "rope_type");
    if (!kind)
        kind = json_object_get(rs, "type");
    if (!json_is_string(kind))
        return cpm_error_set(err, CPM_EFORMAT, "%s: rope_scaling: missing type/rope_type", file);
    const char *k = json_string_value(kind);
    if (strcmp(k, "dynamic") == 0) {
        hp->rope_kind = CPM_ROPE_DYNAMIC_NTK;
        hp->rope_factor = 1.0;
        if (get_num(rs, "factor", &hp->rope_factor, file, err))
            return cpm_error_prefix(err, "rope_scaling");
        return 0;
    }
    if (strcmp(k, "longrope") == 0) {
        hp->rope_kind = CPM_ROPE_LONGROPE;
        int half = cpm_hparams_rotary_dim(hp) / 2;
        if (half <= 0 || half > CPM_ROPE_MAX_FACTORS)
            return cpm_error_set(err, CPM_ERANGE, "%s: rotary dim %d unsupported", file, half * 2);
        hp->n_rope_factors = half;
        hp->rope_orig_max_position = hp->max_position;
        if (get_int(rs, "original_max_position_embeddings", &hp->rope_orig_max_position, 1,
                    1 << 30, file, err))
            return err ? err->code : CPM_EFORMAT;
        if (read_factor_list(rs, "short_factor", hp->rope_short, half, file, err) ||
            read_factor_list(rs, "long_factor", hp->rope_long, half, file, err))
            return err ? err->code : CPM_EFORMAT;
        return 0;
    }
    return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: rope_scaling type '%s' is not supported", file,
                         k);
}

static int parse_act(json_t *root, cpm_hparams *hp, const char *file, cpm_error *err) {
    json_t *a = json_object_get(root, "hidden_act");
    if (!a || json_is_null(a))
        return 0;
    if (!json_is_string(a))
        return cpm_error_set(err, CPM_EFORMAT, "%s: field hidden_act: expected a string", file);
    const char *s = json_string_value(a);
    if (strcmp(s, "silu") == 0)
        hp->act = CPM_ACT_SILU;
    else if (strcmp(s, "fatrelu") == 0)
        hp->act = CPM_ACT_FATRELU;
    else
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: hidden_act '%s' is not supported", file, s);
    double p = 0.0; /* vLLM and HF read hidden_act_param with default 0 */
    if (get_num(root, "hidden_act_param", &p, file, err))
        return err ? err->code : CPM_EFORMAT;
    hp->act_param = (float)p;
    return 0;
}

/* InfLLM v2 sparse_config (spec §5.1; defaults of the HF attention class).
 * Compressed keys are built from the KV cache's per-block key sums, so kernel
 * and stride must be whole cache blocks and a selection block whole strides;
 * the un-roped key cache that use_nope needs is not kept. */
static int sparse_field_error(cpm_error *err, const char *file, const char *key, int v,
                              const char *why) {
    return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: sparse_config.%s: %d is not supported (%s)",
                         file, key, v, why);
}

static int parse_sparse(json_t *root, cpm_hparams *hp, const char *file, cpm_error *err) {
    json_t *sc = json_object_get(root, "sparse_config");
    if (!sc || json_is_null(sc))
        return 0;
    if (!json_is_object(sc))
        return cpm_error_set(err, CPM_EFORMAT, "%s: sparse_config: expected an object", file);
    const int big = 1 << 30;
    bool nope = false;
    hp->sparse = true;
    hp->sparse_dense_len = 8192;
    hp->sparse_kernel = 32;
    hp->sparse_stride = 16;
    hp->sparse_block = 64;
    hp->sparse_init_blocks = 1;
    hp->sparse_window = 2048;
    hp->sparse_topk = 64;
    if (get_int(sc, "dense_len", &hp->sparse_dense_len, -1, big, file, err) ||
        get_int(sc, "kernel_size", &hp->sparse_kernel, 1, big, file, err) ||
        get_int(sc, "kernel_stride", &hp->sparse_stride, 1, big, file, err) ||
        get_int(sc, "block_size", &hp->sparse_block, 1, big, file, err) ||
        get_int(sc, "init_blocks", &hp->sparse_init_blocks, 0, big, file, err) ||
        get_int(sc, "window_size", &hp->sparse_window, 0, big, file, err) ||
        get_int(sc, "topk", &hp->sparse_topk, 1, 65536, file, err) ||
        get_bool(sc, "use_nope", &nope, file, err))
        return cpm_error_prefix(err, "sparse_config");
    if (hp->sparse_dense_len < 0) /* -1 = always sparse */
        hp->sparse_dense_len = 0;
    if (nope)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: sparse_config.use_nope: true is not supported (selection runs on "
                             "the roped keys of the cache)", file);
    if (hp->sparse_kernel % CPM_KV_BLOCK)
        return sparse_field_error(err, file, "kernel_size", hp->sparse_kernel,
                                  "must be a multiple of 16");
    if (hp->sparse_stride % CPM_KV_BLOCK)
        return sparse_field_error(err, file, "kernel_stride", hp->sparse_stride,
                                  "must be a multiple of 16");
    if (hp->sparse_block % hp->sparse_stride)
        return sparse_field_error(err, file, "block_size", hp->sparse_block,
                                  "must be a multiple of kernel_stride");
    return 0;
}

/* quantization_config (minicpm-spec.md §8): AutoGPTQ or AutoAWQ int4. In the
 * classic GPTQ checkpoint_format "gptq" every stored zero is the real one minus
 * one (AutoGPTQ's packer subtracts 1, its kernels add it back); "gptq_v2"
 * stores real zeros; "marlin" is a GPU tile layout. An absent
 * checkpoint_format is "gptq", as in every AutoGPTQ release before the field
 * existed. AWQ stores real zeros; only its "gemm" layout (qweight [in, out/8])
 * is read: "gemv" and "gemv_fast" pack along the input instead. */
static int quant_refuse(cpm_error *err, const char *file, const char *field, const char *v) {
    return cpm_error_set(err, CPM_EUNSUPPORTED,
                         "%s: quantization_config.%s: %s is not supported (only 4-bit GPTQ with "
                         "checkpoint_format gptq, or 4-bit AWQ version gemm with zero_point)",
                         file, field, v);
}

static int get_quant_string(json_t *q, const char *key, const char **out, const char *file,
                            cpm_error *err) {
    json_t *v = json_object_get(q, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return cpm_error_set(err, CPM_EFORMAT, "%s: quantization_config.%s: expected a string",
                             file, key);
    *out = json_string_value(v);
    return 0;
}

/* bits (AutoAWQ's own quant_config.json says w_bit): present, and 4. */
static int check_bits(json_t *q, const char *key, const char *file, cpm_error *err) {
    char bits[16];
    int nbits = 0;
    if (!json_object_get(q, key))
        return cpm_error_set(err, CPM_EFORMAT, "%s: quantization_config.%s is missing", file, key);
    if (get_int(q, key, &nbits, 1, 64, file, err))
        return cpm_error_prefix(err, "quantization_config");
    if (nbits != 4)
        return snprintf(bits, sizeof bits, "%d", nbits), quant_refuse(err, file, key, bits);
    return 0;
}

static int check_group_size(const cpm_hparams *hp, const char *file, cpm_error *err) {
    if (hp->quant_group_size == 0 || hp->quant_group_size < -1)
        return cpm_error_set(err, CPM_ERANGE,
                             "%s: quantization_config.group_size: %d (expected -1 or > 0)", file,
                             hp->quant_group_size);
    return 0;
}

static int parse_gptq(json_t *q, cpm_hparams *hp, const char *file, cpm_error *err) {
    const char *format = "gptq";
    bool lm_head = false;
    hp->quant_group_size = 128; /* AutoGPTQ's BaseQuantizeConfig default */
    if (get_quant_string(q, "checkpoint_format", &format, file, err))
        return err ? err->code : CPM_EFORMAT;
    if (strcmp(format, "gptq") != 0)
        return quant_refuse(err, file, "checkpoint_format", format);
    int rc = check_bits(q, "bits", file, err);
    if (rc)
        return rc;
    if (get_int(q, "group_size", &hp->quant_group_size, -1, 1 << 20, file, err) ||
        get_bool(q, "desc_act", &hp->quant_desc_act, file, err) ||
        get_bool(q, "sym", &hp->quant_sym, file, err) ||
        get_bool(q, "lm_head", &lm_head, file, err))
        return cpm_error_prefix(err, "quantization_config");
    if ((rc = check_group_size(hp, file, err)))
        return rc;
    if (lm_head)
        return quant_refuse(err, file, "lm_head", "true");
    hp->quant = CPM_QUANT_GPTQ;
    hp->quant_zero_offset = 1;
    return 0;
}

/* transformers' AwqConfig (bits, group_size, zero_point, version; defaults
 * 128, true, "gemm") or AutoAWQ's quant_config names (w_bit, q_group_size). */
static int parse_awq(json_t *q, cpm_hparams *hp, const char *file, cpm_error *err) {
    const char *version = "gemm";
    bool zero_point = true;
    bool autoawq = !json_object_get(q, "bits") && json_object_get(q, "w_bit");
    const char *bits_key = autoawq ? "w_bit" : "bits";
    const char *gs_key = autoawq ? "q_group_size" : "group_size";
    hp->quant_group_size = 128;
    int rc = check_bits(q, bits_key, file, err);
    if (rc)
        return rc;
    if (get_quant_string(q, "version", &version, file, err))
        return err ? err->code : CPM_EFORMAT;
    if (get_int(q, gs_key, &hp->quant_group_size, -1, 1 << 20, file, err) ||
        get_bool(q, "zero_point", &zero_point, file, err))
        return cpm_error_prefix(err, "quantization_config");
    if (strcasecmp(version, "gemm") != 0)
        return quant_refuse(err, file, "version", version);
    if (!zero_point)
        return quant_refuse(err, file, "zero_point", "false");
    if ((rc = check_group_size(hp, file, err)))
        return rc;
    hp->quant = CPM_QUANT_AWQ;
    hp->quant_zero_offset = 0;
    return 0;
}

static int parse_quant(json_t *root, cpm_hparams *hp, const char *file, cpm_error *err) {
    json_t *q = json_object_get(root, "quantization_config");
    if (!q || json_is_null(q))
        return 0;
    if (!json_is_object(q))
        return cpm_error_set(err, CPM_EFORMAT, "%s: quantization_config: expected an object", file);
    const char *method = NULL;
    if (get_quant_string(q, "quant_method", &method, file, err))
        return err ? err->code : CPM_EFORMAT;
    if (!method)
        return cpm_error_set(err, CPM_EFORMAT, "%s: quantization_config.quant_method is missing",
                             file);
    if (strcmp(method, "gptq") == 0)
        return parse_gptq(q, hp, file, err);
    if (strcmp(method, "awq") == 0)
        return parse_awq(q, hp, file, err);
    return quant_refuse(err, file, "quant_method", method);
}

static int parse_extensions(json_t *root, cpm_hparams *hp, const char *file, cpm_error *err) {
    int rc = parse_quant(root, hp, file, err);
    return rc ? rc : parse_sparse(root, hp, file, err);
}

static void set_defaults(cpm_hparams *hp) {
    memset(hp, 0, sizeof *hp);
    hp->rms_norm_eps = 1e-6f;   /* MiniCPMConfig default */
    hp->rope_theta = 10000.0;
    hp->scale_emb = 1.0;
    hp->scale_depth = 1.0;
    hp->dim_model_base = 1.0;
    hp->tie_word_embeddings = true;
    hp->max_position = 2048;
    hp->bos_id = 1;
}

static int parse_root(json_t *root, const char *file, cpm_hparams *hp, cpm_error *err) {
    static const char *required[] = {"vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads"};
    if (!json_is_object(root))
        return cpm_error_set(err, CPM_EFORMAT, "%s: expected a JSON object", file);
    for (size_t i = 0; i < sizeof required / sizeof *required; i++)
        if (require(root, required[i], file, err))
            return err ? err->code : CPM_EFORMAT;

    json_t *archs = json_object_get(root, "architectures");
    json_t *a0 = json_is_array(archs) ? json_array_get(archs, 0) : NULL;
    if (!json_is_string(a0))
        return cpm_error_set(err, CPM_EFORMAT, "%s: field architectures: expected a list of names",
                             file);
    snprintf(hp->arch, sizeof hp->arch, "%s", json_string_value(a0));

    const int big = 1 << 30;
    double eps = hp->rms_norm_eps;
    if (get_int(root, "vocab_size", &hp->vocab_size, 1, big, file, err) ||
        get_int(root, "hidden_size", &hp->hidden_size, 1, 1 << 20, file, err) ||
        get_int(root, "intermediate_size", &hp->intermediate_size, 1, big, file, err) ||
        get_int(root, "num_hidden_layers", &hp->n_layers, 1, 4096, file, err) ||
        get_int(root, "num_attention_heads", &hp->n_heads, 1, 4096, file, err) ||
        get_int(root, "max_position_embeddings", &hp->max_position, 1, big, file, err) ||
        get_num(root, "rms_norm_eps", &eps, file, err) ||
        get_num(root, "rope_theta", &hp->rope_theta, file, err) ||
        get_num(root, "scale_emb", &hp->scale_emb, file, err) ||
        get_num(root, "scale_depth", &hp->scale_depth, file, err) ||
        get_num(root, "dim_model_base", &hp->dim_model_base, file, err) ||
        get_bool(root, "tie_word_embeddings", &hp->tie_word_embeddings, file, err) ||
        get_int(root, "num_experts", &hp->n_experts, 0, 4096, file, err) ||
        get_int(root, "num_experts_per_tok", &hp->n_experts_per_tok, 0, 4096, file, err) ||
        get_int(root, "q_lora_rank", &hp->q_lora_rank, 0, big, file, err) ||
        get_int(root, "kv_lora_rank", &hp->kv_lora_rank, 0, big, file, err) ||
        get_int(root, "qk_nope_head_dim", &hp->qk_nope_dim, 0, 65536, file, err) ||
        get_int(root, "qk_rope_head_dim", &hp->qk_rope_dim, 0, 65536, file, err) ||
        get_int(root, "bos_token_id", &hp->bos_id, 0, big, file, err) ||
        parse_act(root, hp, file, err))
        return err ? err->code : CPM_EFORMAT;
    hp->rms_norm_eps = (float)eps;

    hp->n_kv_heads = hp->n_heads; /* absent → MHA */
    if (get_int(root, "num_key_value_heads", &hp->n_kv_heads, 1, 4096, file, err))
        return err ? err->code : CPM_EFORMAT;
    if (hp->hidden_size % hp->n_heads)
        return cpm_error_set(err, CPM_ESHAPE, "%s: hidden_size %d is not a multiple of %d heads",
                             file, hp->hidden_size, hp->n_heads);
    if (hp->n_heads % hp->n_kv_heads)
        return cpm_error_set(err, CPM_ESHAPE,
                             "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                             file, hp->n_heads, hp->n_kv_heads);
    hp->head_dim = hp->hidden_size / hp->n_heads;
    hp->v_head_dim = hp->head_dim; /* MLA: absent → hidden / heads */
    if (get_int(root, "v_head_dim", &hp->v_head_dim, 1, 65536, file, err))
        return err ? err->code : CPM_EFORMAT;
    if (hp->n_experts > 0 &&
        (hp->n_experts_per_tok < 1 || hp->n_experts_per_tok > hp->n_experts))
        return cpm_error_set(err, CPM_ERANGE, "%s: num_experts_per_tok %d with %d experts", file,
                             hp->n_experts_per_tok, hp->n_experts);
    if (hp->dim_model_base <= 0 || hp->scale_emb <= 0)
        return cpm_error_set(err, CPM_ERANGE, "%s: scale_emb and dim_model_base must be > 0", file);
    if (parse_rope_scaling(root, hp, file, err) || merge_eos(root, hp, file, err) ||
        parse_extensions(root, hp, file, err))
        return err ? err->code : CPM_EFORMAT;
    /* Early MiniCPM4 downloads lacked dim_model_base; the class default (1) would
     * silently scale the logits 16x wrong, so refuse rather than guess. */
    if (hp->rope_kind == CPM_ROPE_LONGROPE && !json_object_get(root, "dim_model_base") &&
        json_object_get(root, "scale_emb"))
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: dim_model_base is missing (MiniCPM4 needs it, usually 256)", file);
    return 0;
}

int cpm_hparams_rotary_dim(const cpm_hparams *hp) {
    return hp->qk_rope_dim > 0 ? hp->qk_rope_dim : hp->head_dim;
}

int cpm_hparams_parse(const char *text, const char *name, cpm_hparams *ret, cpm_error *err) {
    json_error_t je;
    set_defaults(ret);
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return cpm_error_set(err, CPM_EFORMAT, "%s: line %d column %d: %s", name, je.line,
                             je.column, je.text);
    int rc = parse_root(root, name, ret, err);
    json_decref(root);
    return rc;
}

static int load_json_file(const char *path, const char *name, json_t **ret, bool optional,
                          cpm_error *err) {
    json_error_t je;
    *ret = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (optional)
            return 0;
        return cpm_error_set(err, CPM_ENOTFOUND, "%s: cannot open", path);
    }
    *ret = json_loadf(f, JSON_REJECT_DUPLICATES, &je);
    fclose(f);
    if (!*ret)
        return cpm_error_set(err, CPM_EFORMAT, "%s: line %d column %d: %s", name, je.line,
                             je.column, je.text);
    return 0;
}

int cpm_hparams_load(const char *dir, cpm_hparams *ret, cpm_error *err) {
    char path[4096];
    json_t *root = NULL, *gen = NULL;
    set_defaults(ret);
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = load_json_file(path, "config.json", &root, false, err);
    if (rc)
        return rc;
    rc = parse_root(root, "config.json", ret, err);
    json_decref(root);
    if (rc)
        return rc;
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    rc = load_json_file(path, "generation_config.json", &gen, true, err);
    if (rc == 0 && gen) {
        if (!json_is_object(gen))
            rc = cpm_error_set(err, CPM_EFORMAT, "generation_config.json: expected an object");
        else if (!(rc = merge_eos(gen, ret, "generation_config.json", err)))
            read_gen_defaults(gen, &ret->gen);
    }
    json_decref(gen);
    return rc;
}
