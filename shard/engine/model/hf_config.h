/* hf_config.h - config.json (+ generation_config.json) of a MiniCPM checkpoint.
 *
 * Reads the Hugging Face field names into cpm_hparams, applying the defaults of
 * the official configuration classes where a field is absent, and rejects values
 * the engine cannot run with a message naming the file and field.
 */
#ifndef CPM_HF_CONFIG_H
#define CPM_HF_CONFIG_H

#include <stdbool.h>

#include "../../../common/error.h"
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

typedef enum cpm_quant_kind {
    CPM_QUANT_NONE = 0,
    CPM_QUANT_GPTQ,  /* AutoGPTQ int4: X.qweight/scales/qzeros/g_idx per decoder linear */
    CPM_QUANT_AWQ,   /* AutoAWQ GEMM int4: X.qweight/qzeros/scales packed along the output */
} cpm_quant_kind;

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

    /* InfLLM v2 (MiniCPM4 sparse_config, minicpm-spec.md §5; shard/engine/model/infllm.h).
     * A query at position t attends sparsely iff t + 1 >= sparse_dense_len
     * (0 when the config says -1: always sparse). Lengths are in tokens;
     * kernel and stride are multiples of CPM_KV_BLOCK (16), block a multiple
     * of stride, use_nope false: hf_config refuses anything else. */
    bool sparse;
    int sparse_dense_len;
    int sparse_kernel;      /* kernel_size p: tokens per compressed key */
    int sparse_stride;      /* kernel_stride s: step between compressed keys */
    int sparse_block;       /* block_size m: the unit of selection */
    int sparse_init_blocks; /* init_blocks: first blocks always attended */
    int sparse_window;      /* window_size: tokens of recent blocks always attended */
    int sparse_topk;        /* topk: blocks kept per query (forced ones included) */

    /* quantization_config (GPTQ or AWQ 4-bit): the decoder layers' linears may be
     * stored as int4; embeddings, norms and lm_head stay float. */
    cpm_quant_kind quant;
    int quant_group_size;   /* columns per group; -1 = one group per row */
    bool quant_desc_act;    /* act-order: columns permuted, g_idx says each one's group */
    bool quant_sym;
    int quant_zero_offset;  /* added to stored zeros: 1 for checkpoint_format "gptq", 0 AWQ */

    /* special ids */
    int bos_id;
    int n_eos;
    int eos_ids[CPM_MAX_EOS];

    /* generation_config.json's sampling defaults (what a request that names none gets):
     * do_sample false means greedy whatever the temperature says */
    cpm_gen_defaults gen;
} cpm_hparams;

/* Reads dir/config.json and, if present, dir/generation_config.json (its eos
 * ids are merged in, its sampling defaults kept in hp.gen). */
int cpm_hparams_load(const char *dir, cpm_hparams *ret, cpm_error *err);

/* Parses a config.json text (for tests). name is used in messages. */
int cpm_hparams_parse(const char *json_text, const char *name, cpm_hparams *ret,
                      cpm_error *err);

/* Rotary width: qk_rope_dim for MLA, head_dim otherwise. */
int cpm_hparams_rotary_dim(const cpm_hparams *hp);

#endif
