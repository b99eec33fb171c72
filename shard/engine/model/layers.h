/* layers.h - the loaded model as the layer kernels see it: weights bound to
 * roles, scratch buffers, geometry. Shared by the loader (model.c) and the
 * layer kernels (attention.c, ffn.c); not part of the public API (model.h). */
#ifndef CPM_LAYERS_H
#define CPM_LAYERS_H

#include <stdbool.h>
#include <stdint.h>

#include "../kernels/dtype.h"
#include "../kernels/ffn_sparse.h"
#include "../kernels/pool.h"
#include "../kernels/matmul.h"
#include "../kernels/matmul_bf16p.h"
#include "../kernels/matmul_q4.h"
#include "../kernels/matmul_q8.h"
#include "../kernels/matmul_t2.h"
#include "../kv_cache_internal.h"
#include "arch.h"
#include "checkpoint.h"
#include "hf_config.h"
#include "model.h"

/* A weight matrix [rows, cols] (row = output feature) pointing into the checkpoint,
 * or, for a GPTQ int4 linear, repacked at load into q4 (owned by the model; data NULL). */
typedef struct cpm_weight {
    const void *data;
    cpm_dtype dtype;
    int rows, cols;
    int ld;    /* row stride in elements; 0 = cols (a TP column slice keeps the full width) */
    cpm_q4 *q4;
    cpm_t2 *t2; /* a ternary bf16 matrix (BitCPM4), repacked to 2 bits: used instead of data */
    cpm_q8 *q8; /* the output layer quantized at load (opts.lm_head_int8): used instead of data */
    cpm_bf16p *bp; /* BF16/F16 repacked into panels at load for bf16 activations
                    * (matmul_bf16p.h): used instead of data */
    void *t;    /* FATReLU down_proj transposed to [cols, rows], same dtype (ffn_sparse.h),
                 * owned by the model: used instead of data, which is then NULL */
    void *own;  /* data copied out of the checkpoint's mapping at load (dense rows), owned by
                 * the model: data points here (NULL: data is the mapping's) */
} cpm_weight;

/* Bytes of w's weights, in whichever form the kernels read them. */
static inline size_t cpm_weight_bytes(const cpm_weight *w) {
    if (w->q4)
        return cpm_q4_bytes(w->q4);
    if (w->t2)
        return cpm_t2_bytes(w->t2);
    if (w->q8)
        return cpm_q8_bytes(w->q8);
    if (w->bp)
        return cpm_bf16p_bytes(w->bp);
    return w->data || w->t ? (size_t)w->rows * (size_t)w->cols * cpm_dtype_size(w->dtype) : 0;
}

typedef struct cpm_layer {
    cpm_weight w[CPM_LAYER_ROLE_COUNT]; /* experts' roles unused here */
    cpm_weight *experts[3];             /* MoE: [n_experts] gate, up, down */
    float *norm[CPM_LAYER_ROLE_COUNT];  /* f32 copies of the norm vectors */
    /* MLA: kv_b_proj split per head and kept in f32 for weight absorption:
     * absorb_k [heads, qk_nope, kv_lora], absorb_v [heads, v_head, kv_lora]. */
    float *absorb_k;
    float *absorb_v;
} cpm_layer;

/* Scratch sized at load time from max_batch_tokens; forward allocates nothing. */
typedef struct cpm_scratch {
    float *x;        /* [T, H] residual stream */
    float *xn;       /* [T, H] normed input of a sublayer */
    float *q;        /* [T, heads * qk_dim] */
    float *k;        /* [T, kv_heads * qk_dim] */
    float *v;        /* [T, kv_heads * v_dim] */
    float *attn;     /* [T, heads * v_dim] */
    float *lat_q;    /* MLA: [T, q_lora] */
    float *lat_kv;   /* MLA: [T, kv_lora + rope] */
    float *lat_kvn;  /* MLA: [T, kv_lora] */
    float *kv_b;     /* MLA: [T, heads * (nope + v)] */
    float *gate;     /* [T, F] */
    float *up;       /* [T, F] */
    float *out;      /* [T, H] */
    float *rope_cos; /* [T, rot/2] */
    float *rope_sin; /* [T, rot/2] */
    float *router;   /* MoE: [T, E] */
    int *route_ids;  /* MoE: [T, top_k] */
    float *route_w;  /* MoE: [T, top_k] */
    int *gather;     /* MoE: [T * top_k] row indices routed to one expert (remote: to each) */
    float *gather_w; /* MoE: [T * top_k] their routing weights */
    float *xg;       /* MoE: [T * top_k, H] gathered rows (local: one expert's; remote: all) */
    float *yg;       /* MoE: [T * top_k, H] the experts' outputs */
    int *moe_ids;    /* MoE, remote experts: [E] experts routed to in this layer */
    int *moe_rows;   /* MoE, remote experts: [E] rows of each */
    float *attn_tls; /* per thread: online-softmax state of one KV-head group */
    float *infllm_tls; /* per thread: InfLLM v2 block selection (sparse models only) */
    int *rows;       /* [T] wanted rows (last stage) */
    int *kv_slot;    /* [T] KV cache slot (block * BLOCK + offset) of each row */
    int *active;     /* sparse FFN: [F] the batch's active neurons */
} cpm_scratch;

struct cpm_model {
    cpm_model_info info;
    cpm_hparams hp;
    const cpm_arch *arch;
    cpm_ffn_kind ffn;
    cpm_checkpoint *ckpt;
    cpm_pool *pool;
    int max_batch;
    int n_threads;
    size_t attn_tls_floats; /* per thread */
    size_t infllm_tls_floats; /* per thread, 0 without sparse_config */

    /* attention geometry, uniform for GQA and MLA */
    int qk_dim;      /* per-head query/key width */
    int v_dim;       /* per-head value width */
    int kv_heads;    /* key/value heads (MLA: every head has its own, expanded on the fly) */
    int cache_k_dim; /* floats the KV cache keeps per token per layer: keys... */
    int cache_v_dim; /* ...and values (MLA caches the latent [c_kv | k_pe] only, no values) */
    int rot_dim;     /* rotary width */
    int rot_offset;  /* where the rotary slice starts inside a head (MLA: after nope) */
    float attn_scale;
    double *inv_freq;     /* [rot/2] base inverse frequencies */
    double rope_mscale;   /* LongRoPE attention factor */

    cpm_weight embed;
    float *final_norm;
    cpm_weight lm_head;
    cpm_layer *layers;    /* [layer_end - layer_begin] */
    cpm_scratch s;
    int expert_begin, expert_end; /* MoE experts bound here */
    cpm_expert_backend experts_remote; /* run != NULL: MoE experts run there */
    int tp_rank, tp_size;              /* hp holds this rank's heads and FFN width */
    bool keep_bf16;                    /* opts.keep_bf16: no ternary repacking */
    bool act_bf16;                     /* opts.act_bf16: BF16, F16, int4 weights meet bf16(x) */
    bool act_int8;                     /* opts.act_int8: int4 weights meet int8(x) */
    bool ffn_sparse;                   /* FATReLU FFN on its active neurons (ffn_sparse.h) */
    cpm_ffn_stats ffn_stats;
    cpm_allreduce_backend tp;          /* sums the partial outputs of the TP ranks */
};

/* Layer kernels (attention.c, ffn.c): read s.xn, write s.out, for n rows. */
void cpm_attention_forward(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b, int n);
int cpm_ffn_forward(cpm_model *m, int li, int n, cpm_error *err);

/* RoPE cos/sin for every row of the batch into s.rope_cos / s.rope_sin. */
void cpm_rope_prepare(cpm_model *m, const cpm_batch *b, const cpm_kv_cache *kv);

/* Weight matmul for n rows: y[n, w.rows] = x[n, w.cols] * W^T. */
static inline void cpm_model_matmul(cpm_model *m, float *y, const float *x, const cpm_weight *w,
                                    int n) {
    if (w->q4 && m->act_int8)
        cpm_matmul_q4_q8x(m->pool, y, w->rows, x, w->cols, w->q4, n);
    else if (w->q4 && m->act_bf16)
        cpm_matmul_q4_bf16x(m->pool, y, w->rows, x, w->cols, w->q4, n);
    else if (w->q4)
        cpm_matmul_q4(m->pool, y, w->rows, x, w->cols, w->q4, n);
    else if (w->t2)
        cpm_matmul_t2(m->pool, y, w->rows, x, w->cols, w->t2, n);
    else if (w->bp)
        cpm_matmul_bf16p(m->pool, y, w->rows, x, w->cols, w->bp, n);
    else if (m->act_bf16 && (w->dtype == CPM_DTYPE_BF16 || w->dtype == CPM_DTYPE_F16))
        cpm_matmul_bf16x(m->pool, y, w->rows, x, w->cols, w->data, w->dtype,
                         w->ld ? w->ld : w->cols, n, w->rows, w->cols);
    else
        cpm_matmul(m->pool, y, w->rows, x, w->cols, w->data, w->dtype, w->ld ? w->ld : w->cols, n,
                   w->rows, w->cols);
}

/* Several weights applied to the same x[n, K] (q/k/v, gate/up): ys[i][n, ws[i]->rows] =
 * x * Ws[i]^T, the same bits as one cpm_model_matmul each, with x packed once where the
 * kernel packs it (AMX, bf16 activations, panels). Int4 or ternary weights, or weights of different widths, go one by
 * one. */
#define CPM_MODEL_MULTI_MAX 4
static inline void cpm_model_matmul_multi(cpm_model *m, float *const *ys, const float *x,
                                          const cpm_weight *const *ws, int count, int n) {
    cpm_matmul_out outs[CPM_MODEL_MULTI_MAX];
    cpm_bf16p_out pouts[CPM_MODEL_MULTI_MAX];
    bool shared = count <= CPM_MODEL_MULTI_MAX, panels = shared;
    for (int i = 0; i < count && panels; i++)
        panels = ws[i]->bp && ws[i]->cols == ws[0]->cols;
    if (panels) {
        for (int i = 0; i < count; i++)
            pouts[i] = (cpm_bf16p_out){.y = ys[i], .ldy = ws[i]->rows, .w = ws[i]->bp};
        cpm_matmul_bf16p_multi(m->pool, x, ws[0]->cols, n, pouts, count);
        return;
    }
    for (int i = 0; i < count && shared; i++)
        shared = !ws[i]->q4 && !ws[i]->t2 && !ws[i]->bp && ws[i]->cols == ws[0]->cols &&
                 (!m->act_bf16 || ws[i]->dtype == CPM_DTYPE_BF16 || ws[i]->dtype == CPM_DTYPE_F16);
    if (!shared) {
        for (int i = 0; i < count; i++)
            cpm_model_matmul(m, ys[i], x, ws[i], n);
        return;
    }
    for (int i = 0; i < count; i++)
        outs[i] = (cpm_matmul_out){.y = ys[i], .ldy = ws[i]->rows, .w = ws[i]->data,
                                   .wtype = ws[i]->dtype,
                                   .w_ld = ws[i]->ld ? ws[i]->ld : ws[i]->cols, .N = ws[i]->rows};
    if (m->act_bf16)
        cpm_matmul_bf16x_multi(m->pool, x, ws[0]->cols, n, ws[0]->cols, outs, count);
    else
        cpm_matmul_multi(m->pool, x, ws[0]->cols, n, ws[0]->cols, outs, count);
}

#endif
