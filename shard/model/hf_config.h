/* hf_config.h - config.json (+ generation_config.json) of a MiniCPM checkpoint.
 *
 * Reads the Hugging Face field names into cpm_hparams, applying the defaults of
 * the official configuration classes where a field is absent, and rejects values
 * the engine cannot run with a message naming the file and field.
 */
#ifndef CPM_HF_CONFIG_H
#define CPM_HF_CONFIG_H

#include <stdbool.h>

#include "../../services/common/error.h"
#include "model.h"

#define CPM_ROPE_MAX_FACTORS 256

typedef enum cpm_rope_kind {
    CPM_ROPE_PLAIN = 0,
    CPM_ROPE_DYNAMIC_NTK,
    CPM_ROPE_LONGROPE,
} cpm_rope_kind;

typedef enum cpm_act {
    CPM_ACT_SILU = 0,
    CPM_ACT_FATRELU,
} cpm_act;

typedef struct cpm_hparams {
    char arch[64];             /* architectures[0] */
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;              /* hidden / heads (dense); see MLA dims otherwise */
    float rms_norm_eps;
    int max_position;

    /* muP skeleton */
    double scale_emb;
    double scale_depth;
    double dim_model_base;
    bool tie_word_embeddings;

    /* FFN */
    cpm_act act;
    float act_param;           /* FATReLU threshold */
    int n_experts;             /* 0 = dense FFN */
    int n_experts_per_tok;

    /* MLA (MiniCPM3) */
    int q_lora_rank;           /* 0 = plain q_proj */
    int kv_lora_rank;
    int qk_nope_dim;
    int qk_rope_dim;
    int v_head_dim;

    /* RoPE */
    double rope_theta;
    cpm_rope_kind rope_kind;
    double rope_factor;        /* dynamic NTK factor */
    int rope_orig_max_position;
    int n_rope_factors;        /* rotary_dim / 2 */
    double rope_short[CPM_ROPE_MAX_FACTORS];
    double rope_long[CPM_ROPE_MAX_FACTORS];

    /* InfLLM v2 (MiniCPM4 sparse_config): attention is dense while the
     * sequence is shorter than dense_len, which is all this engine runs yet. */
    bool sparse;
    int sparse_dense_len;

    /* special ids */
    int bos_id;
    int n_eos;
    int eos_ids[CPM_MAX_EOS];
} cpm_hparams;

/* Reads dir/config.json and, if present, dir/generation_config.json (its eos
 * ids are merged in). */
int cpm_hparams_load(const char *dir, cpm_hparams *ret, cpm_error *err);

/* Parses a config.json text (for tests). name is used in messages. */
int cpm_hparams_parse(const char *json_text, const char *name, cpm_hparams *ret,
                      cpm_error *err);

/* Rotary width: qk_rope_dim for MLA, head_dim otherwise. */
int cpm_hparams_rotary_dim(const cpm_hparams *hp);

#endif
