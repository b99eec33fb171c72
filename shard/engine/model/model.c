/* model.c - loading a model (or one pipeline stage) and its forward pass.
 *
 * The forward pass reads like the model: embed (first stage), then per layer
 * x += r * attn(norm(x)); x += r * ffn(norm(x)), then (last stage) the final
 * norm, the muP width division and lm_head for the rows that want logits.
 */
#include "layers.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

#include "../kernels/attn.h"
#include "../kernels/matmul.h"
#include "../kernels/ops.h"
#include "infllm.h"
#include "tp_split.h"

cpm_model_opts cpm_model_opts_default(void) {
    return (cpm_model_opts){.layer_begin = 0, .layer_end = -1, .n_threads = 1,
                            .max_batch_tokens = 512, .expert_begin = 0, .expert_end = -1,
                            .tp_rank = 0, .tp_size = 1};
}

/* ---- binding tensors to roles ---- */

typedef struct bind_ctx {
    cpm_model *m;
    cpm_error *err;
} bind_ctx;

static int norm_copy(float **dst, const cpm_tensor_view *t, cpm_error *err) {
    size_t n = (size_t)t->shape[0];
    *dst = malloc(n * sizeof(float));
    if (!*dst)
        return cpm_error_set(err, CPM_ENOMEM, "tensor %s: out of memory", t->name);
    cpm_dtype_to_f32(*dst, t->data, t->dtype, n);
    return 0;
}

static cpm_weight weight_of(const cpm_tensor_view *t) {
    return (cpm_weight){.data = t->data, .dtype = t->dtype, .rows = (int)t->shape[0],
                        .cols = t->ndim > 1 ? (int)t->shape[1] : 1};
}

static bool is_norm(cpm_role r) {
    return r == CPM_W_IN_NORM || r == CPM_W_POST_NORM || r == CPM_W_Q_A_NORM ||
           r == CPM_W_KV_A_NORM || r == CPM_W_FINAL_NORM;
}

/* ---- GPTQ / AWQ int4 linears (minicpm-spec.md §8) ----
 * A decoder linear X of a GPTQ checkpoint comes as X.qweight, X.scales,
 * X.qzeros and (optionally) X.g_idx; of an AWQ one as X.qweight, X.qzeros,
 * X.scales packed along the output instead. One still stored as X.weight (a
 * MoE router, an AWQ modules_to_not_convert entry) loads as a float weight.
 * Everything is checked against the config here, then repacked once by
 * cpm_q4_new into the one engine layout. */

static bool wants_q4(const cpm_model *m, const cpm_tensor_need *need) {
    return m->hp.quant != CPM_QUANT_NONE && need->layer >= 0 && need->ndim == 2 &&
           !cpm_checkpoint_find(m->ckpt, need->name);
}

static cpm_weight *slot_of(cpm_model *m, const cpm_tensor_need *need) {
    cpm_layer *L = &m->layers[need->layer - m->info.layer_begin];
    if (need->expert >= 0)
        return &L->experts[need->role - CPM_W_EXPERT_GATE][need->expert];
    return &L->w[need->role];
}

/* name of the linear's tensor `part` ("qweight", ...) from its "X.weight" */
static void part_name(char *out, size_t cap, const char *weight_name, const char *part) {
    size_t n = strlen(weight_name), k = strlen(".weight");
    int base = (int)(n > k && !strcmp(weight_name + n - k, ".weight") ? n - k : n);
    snprintf(out, cap, "%.*s.%s", base, weight_name, part);
}

/* f32 copy of a float tensor [rows, cols] (scales), or of a bias [rows]. */
static int float_copy(const cpm_checkpoint *ck, const char *name, int ndim, int64_t rows,
                      int64_t cols, float **ret, cpm_error *err) {
    const cpm_tensor_view *t;
    int64_t shape[2] = {rows, cols};
    int rc = cpm_checkpoint_expect(ck, name, ndim, shape, &t, err);
    if (rc)
        return rc;
    size_t n = (size_t)rows * (size_t)(ndim > 1 ? cols : 1);
    if (!(*ret = malloc((n ? n : 1) * sizeof(float))))
        return cpm_error_set(err, CPM_ENOMEM, "tensor %s: out of memory", name);
    cpm_dtype_to_f32(*ret, t->data, t->dtype, n);
    return 0;
}

/* MiniCPM linears have no bias; AutoGPTQ may still write an all-zero one. */
static int check_no_bias(const cpm_model *m, const char *wname, int N, cpm_error *err) {
    char name[160];
    float *b = NULL;
    part_name(name, sizeof name, wname, "bias");
    if (!cpm_checkpoint_find(m->ckpt, name))
        return 0;
    int rc = float_copy(m->ckpt, name, 1, N, 0, &b, err);
    for (int i = 0; rc == 0 && i < N; i++)
        if (b[i] != 0.0f)
            rc = cpm_error_set(err, CPM_EUNSUPPORTED,
                               "tensor %s: non-zero bias (%g at [%d]); MiniCPM linears have none",
                               name, b[i], i);
    free(b);
    return rc;
}

typedef struct q4_tensors {
    const int32_t *qweight, *qzeros, *g_idx;
    float *scales; /* owned */
} q4_tensors;

static int read_q4_tensors(const cpm_model *m, const char *wname, int K, int N, int G,
                           q4_tensors *q, cpm_error *err) {
    char name[160];
    const cpm_checkpoint *ck = m->ckpt;
    bool awq = m->hp.quant == CPM_QUANT_AWQ;
    int64_t qw[2] = {awq ? K : K / 8, awq ? N / 8 : N}, qz[2] = {G, N / 8}, gi[1] = {K};
    part_name(name, sizeof name, wname, "qweight");
    int rc = cpm_checkpoint_expect_i32(ck, name, 2, qw, &q->qweight, err);
    part_name(name, sizeof name, wname, "qzeros");
    if (rc == 0)
        rc = cpm_checkpoint_expect_i32(ck, name, 2, qz, &q->qzeros, err);
    part_name(name, sizeof name, wname, "scales");
    if (rc == 0)
        rc = float_copy(ck, name, 2, G, N, &q->scales, err);
    part_name(name, sizeof name, wname, "g_idx");
    if (rc == 0 && !awq) { /* AWQ has no act-order */
        rc = cpm_checkpoint_expect_i32(ck, name, 1, gi, &q->g_idx, err);
        if (rc == CPM_ENOTFOUND && !m->hp.quant_desc_act)
            rc = 0; /* without act-order the group of k is k / group_size */
        else if (rc == CPM_ENOTFOUND)
            rc = cpm_error_prefix(err, "quantization_config.desc_act is true");
    }
    return rc;
}

static int q4_error(int rc, const char *wname, int bad, int G, int gs, cpm_error *err) {
    char name[160];
    part_name(name, sizeof name, wname, "g_idx");
    switch (rc) {
    case CPM_Q4_EGIDX:
        return cpm_error_set(err, CPM_ERANGE, "tensor %s: entry [%d] is outside [0, %d)", name,
                             bad, G);
    case CPM_Q4_EGROUP:
        return cpm_error_set(err, CPM_EFORMAT,
                             "tensor %s: group %d does not hold exactly %d columns", name, bad, gs);
    case CPM_Q4_ENOMEM:
        return cpm_error_set(err, CPM_ENOMEM, "%s: repacking int4 weights: out of memory", wname);
    default:
        return cpm_error_set(err, CPM_EINTERNAL, "%s: int4 repack refused its input", wname);
    }
}

static int bind_q4(cpm_model *m, const cpm_tensor_need *need, cpm_error *err) {
    int N = (int)need->shape[0], K = (int)need->shape[1];
    int gs = m->hp.quant_group_size < 0 ? K : m->hp.quant_group_size;
    char name[160];
    part_name(name, sizeof name, need->name, "qweight");
    if (K % 8 || N % 8)
        return cpm_error_set(err, CPM_ESHAPE, "tensor %s: [%d out, %d in] features: int4 packs "
                             "multiples of 8", name, N, K);
    if (K % gs)
        return cpm_error_set(err, CPM_ESHAPE, "config.json: quantization_config.group_size %d "
                             "does not divide the %d input features of %s", gs, K, name);
    q4_tensors q = {0};
    int bad = 0, rc = read_q4_tensors(m, need->name, K, N, K / gs, &q, err);
    if (rc == 0)
        rc = check_no_bias(m, need->name, N, err);
    cpm_weight *w = slot_of(m, need);
    if (rc == 0) {
        cpm_q4_gptq src = {.qweight = q.qweight, .scales = q.scales, .qzeros = q.qzeros,
                           .g_idx = q.g_idx, .K = K, .N = N, .group_size = gs,
                           .zero_offset = m->hp.quant_zero_offset,
                           .format = m->hp.quant == CPM_QUANT_AWQ ? CPM_Q4_AWQ : CPM_Q4_GPTQ};
        rc = cpm_q4_new(&src, &w->q4, &bad);
        if (rc)
            rc = q4_error(rc, need->name, bad, K / gs, gs, err);
        else if (m->act_int8 && cpm_q4_to_panels(w->q4)) /* the int8-activation kernel's layout */
            rc = q4_error(CPM_Q4_ENOMEM, need->name, 0, K / gs, gs, err);
    }
    free(q.scales);
    w->rows = N;
    w->cols = K;
    return rc;
}

/* MLA's absorbed kv_b rows from an int4 kv_b_proj: dequantized, exactly. */
static void dequant_rows(const cpm_weight *w, int row0, int nrows, float *out) {
    for (int r = 0; r < nrows; r++)
        cpm_q4_dequant_row(w->q4, row0 + r, out + (size_t)r * (size_t)w->cols);
}

static void free_packed_weights(cpm_layer *L, int n_experts) {
    for (int r = 0; r < CPM_LAYER_ROLE_COUNT; r++) {
        cpm_q4_free(L->w[r].q4);
        cpm_t2_free(L->w[r].t2);
        cpm_bf16p_free(L->w[r].bp);
        free(L->w[r].t);
        free(L->w[r].own);
    }
    for (int j = 0; j < 3; j++)
        for (int e = 0; L->experts[j] && e < n_experts; e++) {
            cpm_q4_free(L->experts[j][e].q4);
            cpm_t2_free(L->experts[j][e].t2);
            cpm_bf16p_free(L->experts[j][e].bp);
            free(L->experts[j][e].own);
        }
}

/* BitCPM4 (minicpm-spec.md §2.10): a bf16 matrix whose rows hold only 0 and ±a is repacked
 * to 2 bits (matmul_t2.h) and run by the ternary kernels; anything else stays as it is.
 * Not with tensor parallelism (its column slices are views of the bf16 data) nor for
 * MLA's kv_b (absorbed in f32 from the bf16 data). */
static int maybe_ternary(cpm_model *m, cpm_role role, cpm_weight *w, cpm_error *err) {
    if (m->keep_bf16 || m->tp_size > 1 || role == CPM_W_KV_B || w->dtype != CPM_DTYPE_BF16 ||
        w->rows < 1 || w->cols < 16)
        return 0;
    int rc = cpm_t2_from_bf16(w->data, w->rows, w->cols, w->cols, &w->t2);
    if (rc < 0)
        return cpm_error_set(err, CPM_ENOMEM, "ternary weights: out of memory");
    m->info.n_ternary += rc == 0;
    return 0;
}

static int bind_one(const cpm_tensor_need *need, void *vctx) {
    bind_ctx *c = vctx;
    cpm_model *m = c->m;
    const cpm_tensor_view *t;
    if (need->expert >= 0 && (need->expert < m->expert_begin || need->expert >= m->expert_end))
        return 0; /* runs in another process (expert parallelism): never touched here */
    if (wants_q4(m, need))
        return bind_q4(m, need, c->err);
    int rc = cpm_checkpoint_expect(m->ckpt, need->name, need->ndim, need->shape, &t, c->err);
    if (rc)
        return rc;
    if (need->layer < 0) {
        if (need->role == CPM_W_EMBED)
            m->embed = weight_of(t);
        else if (need->role == CPM_W_LM_HEAD)
            m->lm_head = weight_of(t);
        else if (need->role == CPM_W_FINAL_NORM)
            return norm_copy(&m->final_norm, t, c->err);
        return 0;
    }
    cpm_layer *L = &m->layers[need->layer - m->info.layer_begin];
    if (is_norm(need->role))
        return norm_copy(&L->norm[need->role], t, c->err);
    if (need->expert >= 0) {
        int which = need->role - CPM_W_EXPERT_GATE;
        L->experts[which][need->expert] = weight_of(t);
        return maybe_ternary(m, need->role, &L->experts[which][need->expert], c->err);
    }
    L->w[need->role] = weight_of(t);
    return maybe_ternary(m, need->role, &L->w[need->role], c->err);
}

/* ---- geometry, rope, scratch ---- */

static void set_geometry(cpm_model *m) {
    const cpm_hparams *hp = &m->hp;
    if (m->arch->attn == CPM_ATTN_MLA) {
        m->qk_dim = hp->qk_nope_dim + hp->qk_rope_dim;
        m->v_dim = hp->v_head_dim;
        m->kv_heads = hp->n_heads;
        m->rot_offset = hp->qk_nope_dim;
        m->cache_k_dim = hp->kv_lora_rank + hp->qk_rope_dim;
        m->cache_v_dim = 0;
    } else {
        m->qk_dim = hp->head_dim;
        m->v_dim = hp->head_dim;
        m->kv_heads = hp->n_kv_heads;
        m->rot_offset = 0;
        m->cache_k_dim = m->kv_heads * m->qk_dim;
        m->cache_v_dim = m->kv_heads * m->v_dim;
    }
    m->rot_dim = cpm_hparams_rotary_dim(hp);
    m->attn_scale = (float)(1.0 / sqrt((double)m->qk_dim));
    size_t G = (size_t)(hp->n_heads / m->kv_heads);
    /* per thread: G heads x (v accumulator + max + sum), a block of keys and values
     * widened from an f16 cache, and the attention step's scratch (the keys and the
     * scratch each 64-byte aligned: 16 floats of slack apiece) */
    m->attn_tls_floats = G * ((size_t)m->v_dim + 2) +
                         (size_t)CPM_KV_BLOCK * (size_t)(m->qk_dim + m->v_dim) +
                         (size_t)cpm_attn_work_floats((int)G, m->qk_dim) + 32;
    /* MLA: q_abs, ctx, scores, a widened block of latent rows */
    size_t latent = 2 * (size_t)hp->kv_lora_rank + CPM_KV_BLOCK +
                    (size_t)CPM_KV_BLOCK * (size_t)(hp->kv_lora_rank + hp->qk_rope_dim) + 16;
    if (m->arch->attn == CPM_ATTN_MLA && latent > m->attn_tls_floats)
        m->attn_tls_floats = latent;
    if (hp->sparse)
        m->infllm_tls_floats = cpm_infllm_scratch_floats(hp, (int)G);
}

static int init_rope(cpm_model *m, cpm_error *err) {
    const cpm_hparams *hp = &m->hp;
    int half = m->rot_dim / 2;
    m->inv_freq = malloc((size_t)half * sizeof(double));
    if (!m->inv_freq)
        return cpm_error_set(err, CPM_ENOMEM, "rope: out of memory");
    for (int i = 0; i < half; i++)
        m->inv_freq[i] = 1.0 / pow(hp->rope_theta, (2.0 * i) / m->rot_dim);
    m->rope_mscale = 1.0;
    if (hp->rope_kind == CPM_ROPE_LONGROPE && hp->max_position > hp->rope_orig_max_position) {
        double s = (double)hp->max_position / hp->rope_orig_max_position;
        m->rope_mscale = sqrt(1.0 + log(s) / log((double)hp->rope_orig_max_position));
    }
    return 0;
}

static int alloc_scratch(cpm_model *m, cpm_error *err) {
    const cpm_hparams *hp = &m->hp;
    size_t T = (size_t)m->max_batch, H = (size_t)hp->hidden_size;
    size_t F = (size_t)hp->intermediate_size, E = (size_t)(hp->n_experts ? hp->n_experts : 1);
    size_t topk = (size_t)(hp->n_experts_per_tok ? hp->n_experts_per_tok : 1);
    size_t nh = (size_t)hp->n_heads, half = (size_t)m->rot_dim / 2;
    cpm_scratch *s = &m->s;
    struct { void **p; size_t bytes; } plan[] = {
        {(void **)&s->x, T * H * 4},
        {(void **)&s->xn, T * H * 4},
        {(void **)&s->q, T * nh * (size_t)m->qk_dim * 4},
        {(void **)&s->k, T * (size_t)(m->cache_k_dim > m->kv_heads * m->qk_dim
                                            ? m->cache_k_dim : m->kv_heads * m->qk_dim) * 4},
        {(void **)&s->v, T * (size_t)m->kv_heads * (size_t)m->v_dim * 4},
        {(void **)&s->attn, T * nh * (size_t)m->v_dim * 4},
        {(void **)&s->lat_q, T * (size_t)(hp->q_lora_rank + 1) * 4},
        {(void **)&s->lat_kv, T * (size_t)(hp->kv_lora_rank + hp->qk_rope_dim + 1) * 4},
        {(void **)&s->lat_kvn, T * (size_t)(hp->kv_lora_rank + 1) * 4},
        {(void **)&s->kv_b, T * nh * (size_t)(hp->qk_nope_dim + hp->v_head_dim + 1) * 4},
        {(void **)&s->gate, T * F * 4},
        {(void **)&s->up, T * F * 4},
        {(void **)&s->out, T * H * 4},
        {(void **)&s->rope_cos, T * half * 4},
        {(void **)&s->rope_sin, T * half * 4},
        {(void **)&s->router, T * E * 4},
        {(void **)&s->route_ids, T * topk * sizeof(int)},
        {(void **)&s->route_w, T * topk * 4},
        {(void **)&s->gather, T * topk * sizeof(int)},
        {(void **)&s->gather_w, T * topk * 4},
        {(void **)&s->xg, T * topk * H * 4},
        {(void **)&s->yg, T * topk * H * 4},
        {(void **)&s->moe_ids, E * sizeof(int)},
        {(void **)&s->moe_rows, E * sizeof(int)},
        {(void **)&s->attn_tls, (size_t)m->n_threads * m->attn_tls_floats * 4},
        {(void **)&s->infllm_tls, (size_t)m->n_threads * m->infllm_tls_floats * 4},
        {(void **)&s->rows, T * sizeof(int)},
        {(void **)&s->kv_slot, T * sizeof(int)},
        {(void **)&s->active, m->ffn_sparse ? F * sizeof(int) : 0},
    };
    for (size_t i = 0; i < sizeof plan / sizeof *plan; i++) {
        /* 64-byte alignment keeps SIMD loads on cache lines */
        size_t bytes = (plan[i].bytes + 63) & ~(size_t)63;
        *plan[i].p = aligned_alloc(64, bytes ? bytes : 64);
        if (!*plan[i].p)
            return cpm_error_set(err, CPM_ENOMEM, "scratch for %zu batch tokens: out of memory", T);
    }
    return 0;
}

static void free_scratch(cpm_scratch *s) {
    void *ptrs[] = {s->x, s->xn, s->q, s->k, s->v, s->attn, s->lat_q, s->lat_kv,
                    s->lat_kvn, s->kv_b, s->gate, s->up, s->out, s->rope_cos, s->rope_sin,
                    s->router, s->route_ids, s->route_w, s->gather, s->gather_w, s->xg, s->yg,
                    s->moe_ids, s->moe_rows, s->attn_tls, s->infllm_tls,
                    s->rows, s->kv_slot, s->active};
    for (size_t i = 0; i < sizeof ptrs / sizeof *ptrs; i++)
        free(ptrs[i]);
}

/* opts.lm_head_int8: the output layer quantized once (matmul_q8.h); the
 * checkpoint's matrix (the embedding too, when tied) stays for the lookup. */
static int quantize_lm_head(cpm_model *m, cpm_error *err) {
    cpm_weight *w = &m->lm_head;
    if (!w->data || w->q4 || w->t2 || w->ld)
        return cpm_error_set(err, CPM_EINVAL, "lm_head int8: the output layer is not a plain "
                             "F32/F16/BF16 matrix here");
    if (!(w->q8 = cpm_q8_from(w->data, w->dtype, w->rows, w->cols, w->cols)))
        return cpm_error_set(err, CPM_ENOMEM, "lm_head int8: no memory for %d x %d", w->rows,
                             w->cols);
    return 0;
}

/* MLA weight absorption: per head, the k_nope rows and the v rows of
 * kv_b_proj, decoded to f32 once, so attention can run on the latent cache
 * (q_nope·(W_k c) = (W_kᵀ q_nope)·c and Σ p·(W_v c) = W_v (Σ p·c)). */
static int build_absorb(cpm_model *m, cpm_layer *L, cpm_error *err) {
    const cpm_hparams *hp = &m->hp;
    int nh = hp->n_heads, nope = hp->qk_nope_dim, dv = hp->v_head_dim, lr = hp->kv_lora_rank;
    const cpm_weight *w = &L->w[CPM_W_KV_B];
    size_t row_bytes = (size_t)lr * cpm_dtype_size(w->dtype);
    L->absorb_k = malloc((size_t)nh * nope * lr * sizeof(float));
    L->absorb_v = malloc((size_t)nh * dv * lr * sizeof(float));
    if (!L->absorb_k || !L->absorb_v)
        return cpm_error_set(err, CPM_ENOMEM, "MLA absorbed weights: out of memory");
    for (int h = 0; w->q4 && h < nh; h++) {
        dequant_rows(w, h * (nope + dv), nope, L->absorb_k + (size_t)h * nope * lr);
        dequant_rows(w, h * (nope + dv) + nope, dv, L->absorb_v + (size_t)h * dv * lr);
    }
    for (int h = 0; !w->q4 && h < nh; h++) {
        const char *head = (const char *)w->data + (size_t)h * (nope + dv) * row_bytes;
        cpm_dtype_to_f32(L->absorb_k + (size_t)h * nope * lr, head, w->dtype, (size_t)nope * lr);
        cpm_dtype_to_f32(L->absorb_v + (size_t)h * dv * lr, head + (size_t)nope * row_bytes,
                         w->dtype, (size_t)dv * lr);
    }
    return 0;
}

/* ---- tensor parallelism: this rank's slice of every layer ----
 * Row slices (q/k/v, q_b, kv_b, gate/up) are contiguous; column slices (o_proj,
 * down) are strided views of the mmapped weights (ld = the full width): no copies. */

static void rows_slice(cpm_weight *w, int r0, int nr) {
    w->data = (const char *)w->data + (size_t)r0 * (size_t)w->cols * cpm_dtype_size(w->dtype);
    w->rows = nr;
}

static void cols_slice(cpm_weight *w, int c0, int nc) {
    w->ld = w->ld ? w->ld : w->cols;
    w->data = (const char *)w->data + (size_t)c0 * cpm_dtype_size(w->dtype);
    w->cols = nc;
}

static int check_tp(const cpm_model *m, const cpm_model_opts *o, cpm_error *err) {
    const cpm_hparams *hp = &m->hp;
    int T = o->tp_size;
    if (T < 1 || T > 64 || o->tp_rank < 0 || o->tp_rank >= T)
        return cpm_error_set(err, CPM_ERANGE, "tensor parallel rank %d of %d is invalid",
                             o->tp_rank, T);
    if (T == 1)
        return 0;
    int rc = cpm_tp_split_check(hp, T, err);
    if (rc)
        return rc;
    if (o->expert_begin != 0 || o->expert_end != hp->n_experts)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "tensor parallelism needs every MoE expert "
                             "in the stage (expert services and TP do not mix)");
    return 0;
}

/* The shapes this rank computes with: heads and FFN width divided by T. */
static void tp_localize(cpm_hparams *hp, int T) {
    hp->n_heads /= T;
    hp->n_kv_heads /= T;
    hp->intermediate_size /= T;
}

/* full: the whole model's hparams (the checkpoint's shapes). */
static void tp_slice_layer(cpm_model *m, const cpm_hparams *full, cpm_layer *L) {
    int T = m->tp_size, r = m->tp_rank;
    int nh = full->n_heads / T, h0 = r * nh, F = full->intermediate_size / T, f0 = r * F;
    if (m->arch->attn == CPM_ATTN_MLA) {
        int dq = full->qk_nope_dim + full->qk_rope_dim, dkv = full->qk_nope_dim + full->v_head_dim;
        rows_slice(&L->w[full->q_lora_rank ? CPM_W_Q_B : CPM_W_Q], h0 * dq, nh * dq);
        rows_slice(&L->w[CPM_W_KV_B], h0 * dkv, nh * dkv);
        cols_slice(&L->w[CPM_W_O], h0 * full->v_head_dim, nh * full->v_head_dim);
    } else {
        int d = full->head_dim, nkv = full->n_kv_heads / T;
        rows_slice(&L->w[CPM_W_Q], h0 * d, nh * d);
        rows_slice(&L->w[CPM_W_K], r * nkv * d, nkv * d);
        rows_slice(&L->w[CPM_W_V], r * nkv * d, nkv * d);
        cols_slice(&L->w[CPM_W_O], h0 * d, nh * d);
    }
    if (m->ffn != CPM_FFN_MOE) {
        rows_slice(&L->w[CPM_W_GATE], f0, F);
        rows_slice(&L->w[CPM_W_UP], f0, F);
        cols_slice(&L->w[CPM_W_DOWN], f0, F);
        return;
    }
    for (int e = 0; e < full->n_experts; e++) { /* the router stays whole */
        rows_slice(&L->experts[0][e], f0, F);
        rows_slice(&L->experts[1][e], f0, F);
        cols_slice(&L->experts[2][e], f0, F);
    }
}

void cpm_model_set_allreduce_backend(cpm_model *m, const cpm_allreduce_backend *b) {
    m->tp = b ? *b : (cpm_allreduce_backend){0};
}

/* ---- MiniCPM-S: the sparse FATReLU FFN (ffn_sparse.h) ----
 * Its down_proj is repacked once, transposed to [F, H] in its own dtype, so that an
 * active neuron's column is one contiguous row; the row-major original is then never
 * read again (its mapped pages are given back), so the weights take no extra memory.
 * Int4 (GPTQ/AWQ) and bf16-activation models, and any layer whose up or down was
 * repacked to 2 bits, keep the dense FFN. */

static bool sparse_ffn_wanted(const cpm_model *m, const cpm_model_opts *o) {
    return m->hp.act == CPM_ACT_FATRELU && m->ffn == CPM_FFN_GATED && !o->ffn_dense &&
           !o->act_bf16 && !o->act_int8 && m->hp.quant == CPM_QUANT_NONE;
}

static bool sparse_ffn_possible(const cpm_model *m) {
    for (int l = 0; l < m->info.layer_end - m->info.layer_begin; l++) {
        const cpm_weight *up = &m->layers[l].w[CPM_W_UP], *down = &m->layers[l].w[CPM_W_DOWN];
        if (up->q4 || up->t2 || down->q4 || down->t2 || !up->data || !down->data)
            return false;
    }
    return true;
}

static int repack_down(cpm_model *m, cpm_weight *w, cpm_error *err) {
    size_t esz = cpm_dtype_size(w->dtype), ld = (size_t)(w->ld ? w->ld : w->cols);
    w->t = aligned_alloc(64, ((size_t)w->rows * (size_t)w->cols * esz + 63) & ~(size_t)63);
    if (!w->t)
        return cpm_error_set(err, CPM_ENOMEM, "sparse FFN: transposed down_proj: out of memory");
    cpm_ffn_sparse_transpose(m->pool, w->t, w->data, w->dtype, w->rows, w->cols, (int)ld);
    cpm_checkpoint_release(m->ckpt, w->data, ((size_t)(w->rows - 1) * ld + (size_t)w->cols) * esz);
    w->data = NULL;
    w->ld = 0;
    return 0;
}

/* ---- resident matrices ---- */

/* Copies w's matrix out of the checkpoint's mapping into the model's own memory
 * (dense rows: a TP column slice drops the full-width stride) and, unless the
 * mapping must stay (release false: the tied embedding still reads it), lets
 * the mapped pages go. Decode streams anonymous memory faster than a file
 * mapping of the same bytes (docs/KERNELS.md). */
static int make_resident(cpm_model *m, cpm_weight *w, bool release, cpm_error *err) {
    if (!w->data || w->q4 || w->t2 || w->q8 || w->bp || w->own)
        return 0;
    size_t esz = cpm_dtype_size(w->dtype), row = (size_t)w->cols * esz;
    size_t ld = (size_t)(w->ld ? w->ld : w->cols) * esz;
    const size_t huge = (size_t)2 << 20, bytes = (size_t)w->rows * row;
    void *p = NULL;
    if (posix_memalign(&p, bytes >= huge ? huge : 64, (bytes + 63) & ~(size_t)63))
        return cpm_error_set(err, CPM_ENOMEM, "copying the weights into memory: out of memory "
                             "(map_weights keeps them in the file mapping)");
    /* 2 MB pages where the kernel gives them: a 4 KB page fault per 4 KB of weights
     * made loading 3x slower on the VMs measured */
    if (bytes >= huge)
        madvise(p, bytes / huge * huge, MADV_HUGEPAGE);
    /* a dense matrix is read from the file (no page faults on the mapping), a TP
     * column slice copied row by row */
    if (ld != row || cpm_checkpoint_copy(m->ckpt, w->data, bytes, p))
        for (int r = 0; r < w->rows; r++)
            memcpy((char *)p + (size_t)r * row, (const char *)w->data + (size_t)r * ld, row);
    if (release)
        cpm_checkpoint_release(m->ckpt, w->data, (size_t)(w->rows - 1) * ld + row);
    w->data = p;
    w->own = p;
    w->ld = 0;
    return 0;
}

static int make_all_resident(cpm_model *m, cpm_error *err) {
    int rc = 0;
    for (int l = 0; !rc && l < m->info.layer_end - m->info.layer_begin; l++) {
        cpm_layer *L = &m->layers[l];
        for (int r = 0; !rc && r < CPM_LAYER_ROLE_COUNT; r++)
            rc = make_resident(m, &L->w[r], true, err);
        for (int j = 0; j < 3; j++)
            for (int e = 0; !rc && L->experts[j] && e < m->hp.n_experts; e++)
                rc = make_resident(m, &L->experts[j][e], true, err);
    }
    if (!rc && m->info.last_stage)
        rc = make_resident(m, &m->lm_head, m->lm_head.data != m->embed.data, err);
    return rc;
}

/* ---- panels for bf16 activations ---- */

/* Whether w is a dense BF16/F16 matrix the panel kernel can take. */
static bool panel_candidate(const cpm_weight *w) {
    return w->data && !w->q4 && !w->t2 && !w->q8 && !w->t && w->rows > 0 && w->cols > 0 &&
           (w->dtype == CPM_DTYPE_BF16 || w->dtype == CPM_DTYPE_F16);
}

#define PANEL_READ_ROWS (16 * CPM_BF16P_COLS) /* rows read from the file per piece */

typedef struct read_buf { /* one buffer for every piece (fresh pages fault on this VM) */
    void *p;
    size_t cap;
} read_buf;

/* A dense matrix still in the checkpoint's mapping, read from the file a piece at a
 * time into rb and repacked from there: no page faults on the mapping and no whole
 * copy to fill first. -1 when the file cannot be read that way. */
static int panels_from_file(cpm_model *m, const cpm_weight *w, cpm_bf16p *p, read_buf *rb) {
    const size_t row = (size_t)w->cols * cpm_dtype_size(w->dtype);
    const int step = w->rows < PANEL_READ_ROWS ? w->rows : PANEL_READ_ROWS;
    if (rb->cap < (size_t)step * row) {
        free(rb->p);
        rb->cap = (size_t)step * row;
        if (!(rb->p = malloc(rb->cap))) {
            rb->cap = 0;
            return -1;
        }
    }
    int rc = 0;
    for (int r0 = 0; !rc && r0 < w->rows; r0 += step) {
        const int n = w->rows - r0 < step ? w->rows - r0 : step;
        rc = cpm_checkpoint_copy(m->ckpt, (const char *)w->data + (size_t)r0 * row,
                                 (size_t)n * row, rb->p);
        if (!rc)
            cpm_bf16p_fill(m->pool, p, rb->p, w->dtype, w->cols, r0, n);
    }
    return rc;
}

/* w repacked into panels (matmul_bf16p.h), its rows let go unless keep (the tied
 * embedding still reads them). */
static int repack_panels(cpm_model *m, cpm_weight *w, bool keep, read_buf *rb, cpm_error *err) {
    if (!panel_candidate(w))
        return 0;
    const int ld = w->ld ? w->ld : w->cols;
    if (!(w->bp = cpm_bf16p_new(w->rows, w->cols)))
        return cpm_error_set(err, CPM_ENOMEM, "bf16 activations: repacking a %d x %d matrix: "
                             "out of memory", w->rows, w->cols);
    if (w->own || ld != w->cols || panels_from_file(m, w, w->bp, rb) != 0)
        cpm_bf16p_fill(m->pool, w->bp, w->data, w->dtype, ld, 0, w->rows);
    if (keep)
        return 0;
    if (w->own)
        free(w->own);
    else
        cpm_checkpoint_release(m->ckpt, w->data, ((size_t)(w->rows - 1) * (size_t)ld +
                                                  (size_t)w->cols) * cpm_dtype_size(w->dtype));
    w->own = NULL;
    w->data = NULL;
    w->ld = 0;
    return 0;
}

/* Bf16 activations on a CPU with VDPBF16PS (AMX takes BF16 exactly instead): every
 * BF16/F16 matrix the layers multiply, and the output layer, into panels. Decode
 * streams a panel as one sequence and batches overlap reading it with the
 * arithmetic (docs/KERNELS.md). */
static int prepare_panels(cpm_model *m, cpm_error *err) {
    if (!m->act_bf16 || !cpm_bf16p_available() || cpm_isa_in_effect() == CPM_ISA_AMX)
        return 0;
    int rc = 0;
    read_buf rb = {0};
    for (int l = 0; !rc && l < m->info.layer_end - m->info.layer_begin; l++) {
        cpm_layer *L = &m->layers[l];
        for (int r = 0; !rc && r < CPM_LAYER_ROLE_COUNT; r++)
            rc = repack_panels(m, &L->w[r], false, &rb, err);
        for (int j = 0; j < 3; j++)
            for (int e = 0; !rc && L->experts[j] && e < m->hp.n_experts; e++)
                rc = repack_panels(m, &L->experts[j][e], false, &rb, err);
    }
    if (!rc && m->info.last_stage)
        rc = repack_panels(m, &m->lm_head, m->lm_head.data == m->embed.data, &rb, err);
    free(rb.p);
    return rc;
}

static int prepare_sparse_ffn(cpm_model *m, cpm_error *err) {
    if (!m->ffn_sparse || !(m->ffn_sparse = sparse_ffn_possible(m)))
        return 0;
    for (int l = 0; l < m->info.layer_end - m->info.layer_begin; l++) {
        int rc = repack_down(m, &m->layers[l].w[CPM_W_DOWN], err);
        if (rc)
            return rc;
    }
    m->info.ffn_sparse = true;
    return 0;
}

void cpm_model_ffn_stats(cpm_model *m, cpm_ffn_stats *ret, bool reset) {
    if (ret)
        *ret = m->ffn_stats;
    if (reset)
        m->ffn_stats = (cpm_ffn_stats){0};
}

/* ---- load / free ---- */

static int check_opts(const cpm_hparams *hp, cpm_model_opts *o, cpm_error *err) {
    if (o->layer_end < 0)
        o->layer_end = hp->n_layers;
    if (o->layer_begin < 0 || o->layer_begin >= o->layer_end || o->layer_end > hp->n_layers)
        return cpm_error_set(err, CPM_ERANGE, "layer range [%d, %d) is invalid for %d layers",
                             o->layer_begin, o->layer_end, hp->n_layers);
    if (o->n_threads < 1 || o->n_threads > 256)
        return cpm_error_set(err, CPM_ERANGE, "n_threads %d must be in [1, 256]", o->n_threads);
    if (o->max_batch_tokens < 1 || o->max_batch_tokens > 65536)
        return cpm_error_set(err, CPM_ERANGE, "max_batch_tokens %d must be in [1, 65536]",
                             o->max_batch_tokens);
    if (o->expert_end < 0)
        o->expert_end = hp->n_experts;
    if (o->expert_begin < 0 || o->expert_begin > o->expert_end || o->expert_end > hp->n_experts)
        return cpm_error_set(err, CPM_ERANGE, "expert range [%d, %d) is invalid for %d experts",
                             o->expert_begin, o->expert_end, hp->n_experts);
    return 0;
}

static void fill_info(cpm_model *m, const cpm_model_opts *o) {
    const cpm_hparams *hp = &m->hp;
    cpm_model_info *in = &m->info;
    in->arch = m->arch->hf_name;
    in->variant = cpm_arch_variant(m->arch, hp);
    in->vocab_size = hp->vocab_size;
    in->hidden_size = hp->hidden_size;
    in->n_layers = hp->n_layers;
    in->n_experts = hp->n_experts;
    in->layer_begin = o->layer_begin;
    in->layer_end = o->layer_end;
    in->first_stage = o->layer_begin == 0;
    in->last_stage = o->layer_end == hp->n_layers;
    in->max_position = hp->max_position;
    in->max_batch_tokens = o->max_batch_tokens;
    in->tp_rank = o->tp_rank;
    in->tp_size = o->tp_size;
    in->bos_id = hp->bos_id;
    in->n_eos = hp->n_eos;
    in->gen = hp->gen;
    memcpy(in->eos_ids, hp->eos_ids, sizeof in->eos_ids);
}

static int alloc_layers(cpm_model *m, cpm_error *err) {
    int n = m->info.layer_end - m->info.layer_begin;
    m->layers = calloc((size_t)n, sizeof *m->layers);
    if (!m->layers)
        return cpm_error_set(err, CPM_ENOMEM, "layers: out of memory");
    for (int l = 0; l < n && m->ffn == CPM_FFN_MOE; l++)
        for (int j = 0; j < 3; j++)
            if (!(m->layers[l].experts[j] = calloc((size_t)m->hp.n_experts, sizeof(cpm_weight))))
                return cpm_error_set(err, CPM_ENOMEM, "experts: out of memory");
    return 0;
}

int cpm_model_load(const char *dir, const cpm_model_opts *opts, cpm_model **ret,
                   cpm_error *err) {
    cpm_model_opts o = opts ? *opts : cpm_model_opts_default();
    cpm_model *m = calloc(1, sizeof *m);
    int rc;
    *ret = NULL;
    if (!m)
        return cpm_error_set(err, CPM_ENOMEM, "model: out of memory");
    if ((rc = cpm_hparams_load(dir, &m->hp, err)))
        goto fail;
    if (!(m->arch = cpm_arch_find(m->hp.arch))) {
        rc = cpm_error_set(err, CPM_EUNSUPPORTED, "config.json: architecture '%s' is not supported",
                           m->hp.arch);
        goto fail;
    }
    if ((rc = check_opts(&m->hp, &o, err)) || (rc = check_tp(m, &o, err)))
        goto fail;
    if (m->hp.sparse && m->arch->attn != CPM_ATTN_GQA) { /* InfLLM v2 is MiniCPM4 (GQA) only */
        rc = cpm_error_set(err, CPM_EUNSUPPORTED, "config.json: sparse_config needs GQA attention, "
                           "not %s", m->arch->hf_name);
        goto fail;
    }
    m->ffn = cpm_arch_ffn_kind(&m->hp);
    m->max_batch = o.max_batch_tokens;
    m->n_threads = o.n_threads;
    m->expert_begin = o.expert_begin;
    m->expert_end = o.expert_end;
    m->tp_rank = o.tp_rank;
    m->tp_size = o.tp_size;
    m->keep_bf16 = o.keep_bf16;
    m->act_bf16 = o.act_bf16 || o.act_int8;
    m->act_int8 = o.act_int8;
    m->ffn_sparse = sparse_ffn_wanted(m, &o);
    fill_info(m, &o);
    cpm_hparams full = m->hp; /* the checkpoint's shapes; m->hp becomes this rank's */
    tp_localize(&m->hp, o.tp_size);
    set_geometry(m);
    if ((rc = alloc_layers(m, err)) || (rc = init_rope(m, err)) || (rc = alloc_scratch(m, err)))
        goto fail;
    if ((rc = cpm_checkpoint_open(dir, &m->ckpt, err)))
        goto fail;
    bind_ctx bc = {m, err};
    rc = cpm_arch_for_each_tensor(m->arch, &full, o.layer_begin, o.layer_end,
                                  m->info.first_stage, m->info.last_stage, bind_one, &bc);
    if (rc)
        goto fail;
    if (m->info.last_stage && m->hp.tie_word_embeddings)
        m->lm_head = m->embed;
    if (m->info.last_stage && o.lm_head_int8 && (rc = quantize_lm_head(m, err)))
        goto fail;
    for (int l = 0; o.tp_size > 1 && l < o.layer_end - o.layer_begin; l++)
        tp_slice_layer(m, &full, &m->layers[l]);
    for (int l = 0; m->arch->attn == CPM_ATTN_MLA && l < o.layer_end - o.layer_begin; l++)
        if ((rc = build_absorb(m, &m->layers[l], err)))
            goto fail;
    if (!(m->pool = cpm_pool_new(o.n_threads))) {
        rc = cpm_error_set(err, CPM_ENOMEM, "cannot start %d threads", o.n_threads);
        goto fail;
    }
    if ((rc = prepare_sparse_ffn(m, err)))
        goto fail;
    /* panels first: what they repack is read from the file once, never copied whole */
    if ((rc = prepare_panels(m, err)))
        goto fail;
    if (!o.map_weights && (rc = make_all_resident(m, err)))
        goto fail;
    *ret = m;
    return 0;
fail:
    cpm_model_free(m);
    return rc;
}

void cpm_model_free(cpm_model *m) {
    if (!m)
        return;
    if (m->layers) {
        for (int l = 0; l < m->info.layer_end - m->info.layer_begin; l++) {
            for (int r = 0; r < CPM_LAYER_ROLE_COUNT; r++)
                free(m->layers[l].norm[r]);
            free_packed_weights(&m->layers[l], m->hp.n_experts);
            for (int j = 0; j < 3; j++)
                free(m->layers[l].experts[j]);
            free(m->layers[l].absorb_k);
            free(m->layers[l].absorb_v);
        }
        free(m->layers);
    }
    cpm_q8_free(m->lm_head.q8);
    cpm_bf16p_free(m->lm_head.bp);
    free(m->lm_head.own);
    free(m->final_norm);
    free(m->inv_freq);
    free_scratch(&m->s);
    cpm_pool_free(m->pool);
    cpm_checkpoint_free(m->ckpt);
    free(m);
}

const cpm_model_info *cpm_model_get_info(const cpm_model *m) {
    return &m->info;
}

size_t cpm_model_decode_bytes(const cpm_model *m) {
    size_t total = 0;
    for (int l = 0; l < m->info.layer_end - m->info.layer_begin; l++) {
        const cpm_layer *L = &m->layers[l];
        for (int r = 0; r < CPM_LAYER_ROLE_COUNT; r++)
            if (!(r == CPM_W_KV_B && L->absorb_k)) /* MLA reads the f32 absorbed copy instead */
                total += cpm_weight_bytes(&L->w[r]);
        if (L->absorb_k)
            total += (size_t)L->w[CPM_W_KV_B].rows * (size_t)L->w[CPM_W_KV_B].cols * sizeof(float);
        for (int j = 0; j < 3 && m->ffn == CPM_FFN_MOE; j++) /* k of E experts per token */
            total += cpm_weight_bytes(&L->experts[j][0]) * (size_t)m->hp.n_experts_per_tok;
    }
    if (m->info.last_stage)
        total += cpm_weight_bytes(&m->lm_head);
    if (m->info.first_stage)
        total += (size_t)m->hp.hidden_size * cpm_dtype_size(m->embed.dtype);
    return total;
}

/* ---- paging in ---- */

/* The bytes of w a page walk touches: its mapping (a TP column slice spans its rows at
 * the full width) or its copy. */
static size_t walk_bytes(const cpm_weight *w) {
    if (!w->data || w->q4 || w->t2) /* repacked: resident already */
        return 0;
    if (w->own) /* copied at load: dense, resident already (the walk touches it all the same) */
        return (size_t)w->rows * (size_t)w->cols * cpm_dtype_size(w->dtype);
    return (size_t)w->rows * (size_t)(w->ld ? w->ld : w->cols) * cpm_dtype_size(w->dtype);
}

typedef struct page_walk {
    size_t done, total, next_report;
    cpm_model_progress_fn fn;
    void *ud;
} page_walk;

/* Touches one byte per page of w (sum: so the reads are not optimised away). */
static void page_weight(page_walk *pw, const cpm_weight *w, volatile unsigned char *sink) {
    size_t n = walk_bytes(w);
    const unsigned char *p = w->data;
    unsigned char acc = 0;
    for (size_t off = 0; off < n; off += 4096) {
        acc ^= p[off];
        pw->done += n - off < 4096 ? n - off : 4096;
        if (pw->fn && pw->done >= pw->next_report) {
            pw->fn(pw->ud, pw->done, pw->total);
            pw->next_report = pw->done + pw->total / 20 + 1;
        }
    }
    *sink ^= acc;
}

/* Calls fn(pw, w, sink) for every weight the model holds (each once). */
static void each_weight(const cpm_model *m, page_walk *pw, volatile unsigned char *sink,
                        void (*fn)(page_walk *, const cpm_weight *, volatile unsigned char *)) {
    for (int l = 0; l < m->info.layer_end - m->info.layer_begin; l++) {
        const cpm_layer *L = &m->layers[l];
        for (int r = 0; r < CPM_LAYER_ROLE_COUNT; r++)
            fn(pw, &L->w[r], sink);
        for (int j = 0; j < 3; j++)
            for (int e = 0; L->experts[j] && e < m->hp.n_experts; e++)
                fn(pw, &L->experts[j][e], sink);
    }
    if (m->info.first_stage)
        fn(pw, &m->embed, sink);
    if (m->info.last_stage && m->lm_head.data != m->embed.data)
        fn(pw, &m->lm_head, sink);
}

static void count_weight(page_walk *pw, const cpm_weight *w, volatile unsigned char *sink) {
    (void)sink;
    pw->total += walk_bytes(w);
}

size_t cpm_model_page_in(const cpm_model *m, cpm_model_progress_fn fn, void *ud) {
    page_walk pw = {.fn = fn, .ud = ud};
    volatile unsigned char sink = 0;
    each_weight(m, &pw, &sink, count_weight);
    each_weight(m, &pw, &sink, page_weight);
    if (fn)
        fn(ud, pw.done, pw.total);
    return pw.done;
}

void cpm_model_set_expert_backend(cpm_model *m, const cpm_expert_backend *b) {
    m->experts_remote = b ? *b : (cpm_expert_backend){0};
}

/* ---- forward ---- */

cpm_kv_geometry cpm_model_kv_geometry(const cpm_model *m) {
    return (cpm_kv_geometry){.n_layers = m->info.layer_end - m->info.layer_begin,
                             .k_dim = m->cache_k_dim, .v_dim = m->cache_v_dim,
                             .dtype = CPM_DTYPE_F32, .key_sums = m->hp.sparse,
                             /* GQA's kernels read keys 16 to a vector; MLA's latent rows
                              * are keys and values at once */
                             .keys_by_column = m->arch->attn == CPM_ATTN_GQA};
}

static void embed_rows(cpm_model *m, const cpm_batch *b) {
    int H = m->hp.hidden_size;
    size_t row_bytes = (size_t)H * cpm_dtype_size(m->embed.dtype);
    for (int i = 0; i < b->n_tokens; i++) {
        float *x = m->s.x + (size_t)i * H;
        cpm_dtype_to_f32(x, (const char *)m->embed.data + (size_t)b->ids[i] * row_bytes,
                         m->embed.dtype, (size_t)H);
        cpm_scale(x, (float)m->hp.scale_emb, H);
    }
}

static void norm_rows(float *out, const float *x, const float *w, int n, int H, float eps) {
    for (int i = 0; i < n; i++)
        cpm_rmsnorm(out + (size_t)i * H, x + (size_t)i * H, w, H, eps);
}

static int check_batch(const cpm_model *m, const cpm_batch *b, cpm_error *err) {
    if (b->n_tokens < 1 || b->n_tokens > m->max_batch)
        return cpm_error_set(err, CPM_ELIMIT, "batch of %d tokens, limit is %d", b->n_tokens,
                             m->max_batch);
    if (m->info.first_stage ? !b->ids : !b->hidden)
        return cpm_error_set(err, CPM_EINVAL, "batch: missing %s for this stage",
                             m->info.first_stage ? "ids" : "hidden");
    for (int i = 0; i < b->n_tokens; i++) {
        if (m->info.first_stage && (b->ids[i] < 0 || b->ids[i] >= m->hp.vocab_size))
            return cpm_error_set(err, CPM_ERANGE, "batch row %d: token id %d outside [0, %d)",
                                 i, b->ids[i], m->hp.vocab_size);
        if (b->pos[i] < 0)
            return cpm_error_set(err, CPM_ERANGE, "batch row %d: negative position", i);
    }
    return 0;
}

/* Tensor parallelism: s.out holds this rank's partial sum; make it the total. */
static int tp_reduce(cpm_model *m, int li, int phase, int n, cpm_error *err) {
    if (m->tp_size == 1)
        return 0;
    return m->tp.sum(m->tp.ud, m->info.layer_begin + li, phase, m->s.out,
                     (size_t)n * (size_t)m->hp.hidden_size, err);
}

static int run_layer(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b, cpm_error *err) {
    const cpm_layer *L = &m->layers[li];
    int n = b->n_tokens, H = m->hp.hidden_size;
    float r = (float)(m->hp.scale_depth / sqrt((double)m->hp.n_layers));
    float eps = m->hp.rms_norm_eps;

    norm_rows(m->s.xn, m->s.x, L->norm[CPM_W_IN_NORM], n, H, eps);
    cpm_attention_forward(m, kv, li, b, n);
    int rc = tp_reduce(m, li, 0, n, err);
    if (rc)
        return rc;
    cpm_axpy(m->s.x, r, m->s.out, n * H);

    norm_rows(m->s.xn, m->s.x, L->norm[CPM_W_POST_NORM], n, H, eps);
    rc = cpm_ffn_forward(m, li, n, err); /* fails only over MoE experts held elsewhere */
    if (rc || (rc = tp_reduce(m, li, 1, n, err)))
        return rc;
    cpm_axpy(m->s.x, r, m->s.out, n * H);
    return 0;
}

/* Final norm, width division, lm_head, for the wanted rows only. */
static void head_rows(cpm_model *m, const cpm_batch *b, float *logits) {
    int H = m->hp.hidden_size, n = 0;
    float width = (float)(m->hp.hidden_size / m->hp.dim_model_base);
    for (int i = 0; i < b->n_tokens; i++) {
        if (b->want && !b->want[i])
            continue;
        float *xn = m->s.xn + (size_t)n * H;
        cpm_rmsnorm(xn, m->s.x + (size_t)i * H, m->final_norm, H, m->hp.rms_norm_eps);
        for (int j = 0; j < H; j++)
            xn[j] /= width;
        n++;
    }
    if (n > 0 && m->lm_head.q8)
        cpm_matmul_q8(m->pool, logits, m->hp.vocab_size, m->s.xn, H, m->lm_head.q8, n,
                      m->act_bf16);
    else if (n > 0 && m->lm_head.bp)
        cpm_matmul_bf16p(m->pool, logits, m->hp.vocab_size, m->s.xn, H, m->lm_head.bp, n);
    else if (n > 0 && m->act_bf16 &&
             (m->lm_head.dtype == CPM_DTYPE_BF16 || m->lm_head.dtype == CPM_DTYPE_F16))
        cpm_matmul_bf16x(m->pool, logits, m->hp.vocab_size, m->s.xn, H, m->lm_head.data,
                         m->lm_head.dtype, H, n, m->hp.vocab_size, H);
    else if (n > 0)
        cpm_matmul(m->pool, logits, m->hp.vocab_size, m->s.xn, H, m->lm_head.data,
                   m->lm_head.dtype, H, n, m->hp.vocab_size, H);
}

int cpm_model_forward(cpm_model *m, cpm_kv_cache *kv, const cpm_batch *b, float *out,
                      cpm_error *err) {
    int rc = check_batch(m, b, err);
    if (rc == 0 && m->tp_size > 1 && !m->tp.sum)
        rc = cpm_error_set(err, CPM_EINVAL, "tensor parallel rank %d of %d: no all-reduce backend "
                           "is set", m->tp_rank, m->tp_size);
    if (rc == 0 && m->tp_size > 1 && m->experts_remote.run)
        rc = cpm_error_set(err, CPM_EUNSUPPORTED, "tensor parallelism and an expert backend do "
                           "not mix");
    if (rc == 0 && m->hp.sparse && !kv->key_sums)
        rc = cpm_error_set(err, CPM_EINVAL, "kv cache: InfLLM v2 (sparse_config) needs key sums; "
                           "create the cache from cpm_model_kv_geometry");
    if (rc == 0 && m->arch->attn == CPM_ATTN_MLA && kv->keys_by_column)
        rc = cpm_error_set(err, CPM_EINVAL, "kv cache: MLA's latent rows cannot be stored by "
                           "column; create the cache from cpm_model_kv_geometry");
    if (rc || (rc = cpm_kv_cache_reserve(kv, b, m->s.kv_slot, err)))
        return rc;
    int H = m->hp.hidden_size;
    if (m->info.first_stage)
        embed_rows(m, b);
    else
        memcpy(m->s.x, b->hidden, (size_t)b->n_tokens * (size_t)H * sizeof(float));
    cpm_rope_prepare(m, b, kv);
    for (int li = 0; li < m->info.layer_end - m->info.layer_begin; li++)
        if ((rc = run_layer(m, kv, li, b, err)))
            return rc; /* not committed: the cache is as before the call */
    cpm_kv_cache_commit(kv, b);
    if (m->info.last_stage)
        head_rows(m, b, out);
    else
        memcpy(out, m->s.x, (size_t)b->n_tokens * (size_t)H * sizeof(float));
    return 0;
}
