/* arch.h - the MiniCPM architectures as data.
 *
 * One row per Hugging Face architecture name gives the attention kind; the FFN
 * kind follows from config.json (num_experts, hidden_act). Tensor-name rules,
 * with shapes expressed in config dimensions, drive both the loader (which
 * binds each tensor to a role) and the checkpoint generator in tools/ (which
 * writes them). Adding a variant is adding rows, not editing the forward pass.
 */
#ifndef CPM_ARCH_H
#define CPM_ARCH_H

#include <stdbool.h>
#include <stdint.h>

#include "hf_config.h"

typedef enum cpm_attn_kind {
    CPM_ATTN_GQA = 0, /* MiniCPM 1/2/S/MoE/4: q/k/v/o projections, grouped KV heads */
    CPM_ATTN_MLA,     /* MiniCPM3: low-rank q and kv with a shared rope key */
    CPM_ATTN_KIND_COUNT
} cpm_attn_kind;

typedef enum cpm_ffn_kind {
    CPM_FFN_GATED = 0, /* W_down(act(W_gate x) * W_up x); act = silu or FATReLU */
    CPM_FFN_MOE,       /* softmax router, top-k experts, each gated silu */
    CPM_FFN_KIND_COUNT
} cpm_ffn_kind;

/* Roles a tensor can play. Per-layer roles come first. */
typedef enum cpm_role {
    CPM_W_IN_NORM = 0,
    CPM_W_POST_NORM,
    CPM_W_Q,          /* GQA q_proj, or MLA q_proj when q_lora_rank = 0 */
    CPM_W_K,
    CPM_W_V,
    CPM_W_O,
    CPM_W_Q_A,        /* MLA */
    CPM_W_Q_A_NORM,
    CPM_W_Q_B,
    CPM_W_KV_A,
    CPM_W_KV_A_NORM,
    CPM_W_KV_B,
    CPM_W_GATE,       /* dense FFN */
    CPM_W_UP,
    CPM_W_DOWN,
    CPM_W_ROUTER,     /* MoE */
    CPM_W_EXPERT_GATE,/* per expert: w1 */
    CPM_W_EXPERT_UP,  /*             w3 */
    CPM_W_EXPERT_DOWN,/*             w2 */
    CPM_LAYER_ROLE_COUNT,
    CPM_W_EMBED = CPM_LAYER_ROLE_COUNT,
    CPM_W_FINAL_NORM,
    CPM_W_LM_HEAD,
    CPM_ROLE_COUNT
} cpm_role;

typedef struct cpm_arch {
    const char *hf_name;
    cpm_attn_kind attn;
} cpm_arch;

/* The row for config.json's architectures[0], or NULL if unsupported. */
const cpm_arch *cpm_arch_find(const char *hf_name);

cpm_ffn_kind cpm_arch_ffn_kind(const cpm_hparams *hp);

/* "dense", "moe" or "mla" (for logs and model info). */
const char *cpm_arch_variant(const cpm_arch *a, const cpm_hparams *hp);

/* One tensor the model needs. layer / expert are -1 where not applicable. */
typedef struct cpm_tensor_need {
    char name[128];
    cpm_role role;
    int layer;
    int expert;
    int ndim;
    int64_t shape[2];
} cpm_tensor_need;

typedef int (*cpm_tensor_need_fn)(const cpm_tensor_need *need, void *ctx);

/* Calls fn for every tensor of layers [layer_begin, layer_end), plus the
 * embedding when with_embed, and the final norm and lm_head (when untied)
 * when with_head. Stops at, and returns, the first non-zero fn result. */
int cpm_arch_for_each_tensor(const cpm_arch *a, const cpm_hparams *hp, int layer_begin,
                             int layer_end, bool with_embed, bool with_head,
                             cpm_tensor_need_fn fn, void *ctx);

#endif
