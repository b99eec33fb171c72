/* arch.c - the architecture table and the tensor-name rules of each kind. */
#include "arch.h"

#include <stdio.h>
#include <string.h>

static const cpm_arch arch_table[] = {
    {"MiniCPMForCausalLM", CPM_ATTN_GQA},
    {"MiniCPM3ForCausalLM", CPM_ATTN_MLA},
};

const cpm_arch *cpm_arch_find(const char *hf_name) {
    for (size_t i = 0; i < sizeof arch_table / sizeof *arch_table; i++)
        if (strcmp(arch_table[i].hf_name, hf_name) == 0)
            return &arch_table[i];
    return NULL;
}

cpm_ffn_kind cpm_arch_ffn_kind(const cpm_hparams *hp) {
    return hp->n_experts > 0 ? CPM_FFN_MOE : CPM_FFN_GATED;
}

const char *cpm_arch_variant(const cpm_arch *a, const cpm_hparams *hp) {
    if (a->attn == CPM_ATTN_MLA)
        return "mla";
    return cpm_arch_ffn_kind(hp) == CPM_FFN_MOE ? "moe" : "dense";
}

/* Symbolic dimensions, resolved against the config. */
typedef enum dim_sym {
    D_NONE = 0,
    D_HIDDEN,
    D_VOCAB,
    D_INTER,
    D_Q,        /* heads * head_dim */
    D_KV,       /* kv_heads * head_dim */
    D_Q_LORA,
    D_Q_B,      /* heads * (qk_nope + qk_rope) */
    D_KV_A,     /* kv_lora + qk_rope */
    D_KV_LORA,
    D_KV_B,     /* heads * (qk_nope + v_head) */
    D_O_IN,     /* heads * v_head (MLA) */
    D_EXPERTS,
} dim_sym;

static int64_t dim_value(dim_sym d, const cpm_hparams *hp) {
    switch (d) {
    case D_HIDDEN: return hp->hidden_size;
    case D_VOCAB: return hp->vocab_size;
    case D_INTER: return hp->intermediate_size;
    case D_Q: return (int64_t)hp->n_heads * hp->head_dim;
    case D_KV: return (int64_t)hp->n_kv_heads * hp->head_dim;
    case D_Q_LORA: return hp->q_lora_rank;
    case D_Q_B: return (int64_t)hp->n_heads * (hp->qk_nope_dim + hp->qk_rope_dim);
    case D_KV_A: return hp->kv_lora_rank + hp->qk_rope_dim;
    case D_KV_LORA: return hp->kv_lora_rank;
    case D_KV_B: return (int64_t)hp->n_heads * (hp->qk_nope_dim + hp->v_head_dim);
    case D_O_IN: return (int64_t)hp->n_heads * hp->v_head_dim;
    case D_EXPERTS: return hp->n_experts;
    default: return 0;
    }
}

typedef enum rule_when {
    WHEN_ALWAYS = 0,
    WHEN_Q_LORA,    /* MLA with q_lora_rank > 0 */
    WHEN_NO_Q_LORA, /* MLA with a plain q_proj */
} rule_when;

typedef struct tensor_rule {
    const char *suffix; /* after "model.layers.N." (with %d for the expert) */
    cpm_role role;
    dim_sym rows, cols; /* cols = D_NONE for vectors */
    rule_when when;
} tensor_rule;

static const tensor_rule norm_rules[] = {
    {"input_layernorm.weight", CPM_W_IN_NORM, D_HIDDEN, D_NONE, WHEN_ALWAYS},
    {"post_attention_layernorm.weight", CPM_W_POST_NORM, D_HIDDEN, D_NONE, WHEN_ALWAYS},
};

static const tensor_rule gqa_rules[] = {
    {"self_attn.q_proj.weight", CPM_W_Q, D_Q, D_HIDDEN, WHEN_ALWAYS},
    {"self_attn.k_proj.weight", CPM_W_K, D_KV, D_HIDDEN, WHEN_ALWAYS},
    {"self_attn.v_proj.weight", CPM_W_V, D_KV, D_HIDDEN, WHEN_ALWAYS},
    {"self_attn.o_proj.weight", CPM_W_O, D_HIDDEN, D_Q, WHEN_ALWAYS},
};

static const tensor_rule mla_rules[] = {
    {"self_attn.q_a_proj.weight", CPM_W_Q_A, D_Q_LORA, D_HIDDEN, WHEN_Q_LORA},
    {"self_attn.q_a_layernorm.weight", CPM_W_Q_A_NORM, D_Q_LORA, D_NONE, WHEN_Q_LORA},
    {"self_attn.q_b_proj.weight", CPM_W_Q_B, D_Q_B, D_Q_LORA, WHEN_Q_LORA},
    {"self_attn.q_proj.weight", CPM_W_Q, D_Q_B, D_HIDDEN, WHEN_NO_Q_LORA},
    {"self_attn.kv_a_proj_with_mqa.weight", CPM_W_KV_A, D_KV_A, D_HIDDEN, WHEN_ALWAYS},
    {"self_attn.kv_a_layernorm.weight", CPM_W_KV_A_NORM, D_KV_LORA, D_NONE, WHEN_ALWAYS},
    {"self_attn.kv_b_proj.weight", CPM_W_KV_B, D_KV_B, D_KV_LORA, WHEN_ALWAYS},
    {"self_attn.o_proj.weight", CPM_W_O, D_HIDDEN, D_O_IN, WHEN_ALWAYS},
};

static const tensor_rule gated_rules[] = {
    {"mlp.gate_proj.weight", CPM_W_GATE, D_INTER, D_HIDDEN, WHEN_ALWAYS},
    {"mlp.up_proj.weight", CPM_W_UP, D_INTER, D_HIDDEN, WHEN_ALWAYS},
    {"mlp.down_proj.weight", CPM_W_DOWN, D_HIDDEN, D_INTER, WHEN_ALWAYS},
};

static const tensor_rule moe_rules[] = {
    {"mlp.gate.weight", CPM_W_ROUTER, D_EXPERTS, D_HIDDEN, WHEN_ALWAYS},
};

/* Per expert e (the %d). */
static const tensor_rule expert_rules[] = {
    {"mlp.experts.%d.w1.weight", CPM_W_EXPERT_GATE, D_INTER, D_HIDDEN, WHEN_ALWAYS},
    {"mlp.experts.%d.w3.weight", CPM_W_EXPERT_UP, D_INTER, D_HIDDEN, WHEN_ALWAYS},
    {"mlp.experts.%d.w2.weight", CPM_W_EXPERT_DOWN, D_HIDDEN, D_INTER, WHEN_ALWAYS},
};

typedef struct rule_set {
    const tensor_rule *rules;
    size_t n;
} rule_set;

#define RULES(r) {r, sizeof r / sizeof *r}

static const rule_set attn_rule_sets[CPM_ATTN_KIND_COUNT] = {
    [CPM_ATTN_GQA] = RULES(gqa_rules),
    [CPM_ATTN_MLA] = RULES(mla_rules),
};

static const rule_set ffn_rule_sets[CPM_FFN_KIND_COUNT] = {
    [CPM_FFN_GATED] = RULES(gated_rules),
    [CPM_FFN_MOE] = RULES(moe_rules),
};

static bool rule_applies(const tensor_rule *r, const cpm_hparams *hp) {
    switch (r->when) {
    case WHEN_Q_LORA: return hp->q_lora_rank > 0;
    case WHEN_NO_Q_LORA: return hp->q_lora_rank == 0;
    default: return true;
    }
}

static int emit(const tensor_rule *r, const cpm_hparams *hp, int layer, int expert,
                cpm_tensor_need_fn fn, void *ctx) {
    cpm_tensor_need need = {.role = r->role, .layer = layer, .expert = expert};
    char suffix[96];
    if (expert >= 0)
        snprintf(suffix, sizeof suffix, r->suffix, expert);
    else
        snprintf(suffix, sizeof suffix, "%s", r->suffix);
    snprintf(need.name, sizeof need.name, "model.layers.%d.%s", layer, suffix);
    need.shape[0] = dim_value(r->rows, hp);
    need.ndim = 1;
    if (r->cols != D_NONE) {
        need.shape[1] = dim_value(r->cols, hp);
        need.ndim = 2;
    }
    return fn(&need, ctx);
}

static int emit_set(rule_set s, const cpm_hparams *hp, int layer, int expert,
                    cpm_tensor_need_fn fn, void *ctx) {
    for (size_t i = 0; i < s.n; i++) {
        if (!rule_applies(&s.rules[i], hp))
            continue;
        int rc = emit(&s.rules[i], hp, layer, expert, fn, ctx);
        if (rc)
            return rc;
    }
    return 0;
}

static int emit_global(const char *name, cpm_role role, int64_t rows, int64_t cols,
                       cpm_tensor_need_fn fn, void *ctx) {
    cpm_tensor_need need = {.role = role, .layer = -1, .expert = -1, .ndim = cols ? 2 : 1};
    snprintf(need.name, sizeof need.name, "%s", name);
    need.shape[0] = rows;
    need.shape[1] = cols;
    return fn(&need, ctx);
}

int cpm_arch_for_each_tensor(const cpm_arch *a, const cpm_hparams *hp, int layer_begin,
                             int layer_end, bool with_embed, bool with_head,
                             cpm_tensor_need_fn fn, void *ctx) {
    int rc = 0;
    if (with_embed || (with_head && hp->tie_word_embeddings))
        rc = emit_global("model.embed_tokens.weight", CPM_W_EMBED, hp->vocab_size,
                         hp->hidden_size, fn, ctx);
    for (int l = layer_begin; !rc && l < layer_end; l++) {
        rc = emit_set((rule_set)RULES(norm_rules), hp, l, -1, fn, ctx);
        if (!rc)
            rc = emit_set(attn_rule_sets[a->attn], hp, l, -1, fn, ctx);
        cpm_ffn_kind fk = cpm_arch_ffn_kind(hp);
        if (!rc)
            rc = emit_set(ffn_rule_sets[fk], hp, l, -1, fn, ctx);
        for (int e = 0; !rc && fk == CPM_FFN_MOE && e < hp->n_experts; e++)
            rc = emit_set((rule_set)RULES(expert_rules), hp, l, e, fn, ctx);
    }
    if (!rc && with_head) {
        rc = emit_global("model.norm.weight", CPM_W_FINAL_NORM, hp->hidden_size, 0, fn, ctx);
        if (!rc && !hp->tie_word_embeddings)
            rc = emit_global("lm_head.weight", CPM_W_LM_HEAD, hp->vocab_size, hp->hidden_size,
                             fn, ctx);
    }
    return rc;
}
