/* attention.c - the attention sublayer of every architecture kind.
 *
 * Each kind projects the normed input to per-head queries, keys and values,
 * applies RoPE and writes keys/values into the paged cache; one shared core then
 * attends each query over its sequence's cached positions <= its own (causal),
 * and the output projection writes s.out. GQA and MLA differ only in how q, k
 * and v are produced, which keeps the table of kinds small. MiniCPM4 with
 * sparse_config (InfLLM v2) is GQA whose long-context queries attend a selected
 * subset of blocks (infllm.c picks them) through the same core.
 */
#include <math.h>
#include <string.h>

#include "../kernels/attn.h"
#include "../kernels/ops.h"
#include "infllm.h"
#include "layers.h"

/* ---- RoPE ---- */

/* Total length the row's sequence reaches in this batch (HF picks LongRoPE
 * factors and the dynamic-NTK base from the whole call's length). */
static int seq_total_after(const cpm_batch *b, int i) {
    int last = b->pos[i];
    for (int j = i + 1; j < b->n_tokens; j++)
        if (b->seq[j] == b->seq[i])
            last = b->pos[j];
    return last + 1;
}

void cpm_rope_prepare(cpm_model *m, const cpm_batch *b, const cpm_kv_cache *kv) {
    (void)kv;
    const cpm_hparams *hp = &m->hp;
    int half = m->rot_dim / 2;
    for (int i = 0; i < b->n_tokens; i++) {
        float *cs = m->s.rope_cos + (size_t)i * half, *sn = m->s.rope_sin + (size_t)i * half;
        double pos = b->pos[i];
        int total = hp->rope_kind == CPM_ROPE_PLAIN ? 0 : seq_total_after(b, i);
        double base_scale = 1.0; /* dynamic NTK: inv_freq scales by base ratio^(-2i/d) */
        if (hp->rope_kind == CPM_ROPE_DYNAMIC_NTK && total > hp->max_position) {
            double f = hp->rope_factor, d = m->rot_dim;
            double ratio = pow(f * total / hp->max_position - (f - 1.0), d / (d - 2.0));
            base_scale = ratio;
        }
        const double *factors = NULL;
        if (hp->rope_kind == CPM_ROPE_LONGROPE)
            factors = total > hp->rope_orig_max_position ? hp->rope_long : hp->rope_short;
        for (int k = 0; k < half; k++) {
            double f = m->inv_freq[k];
            if (base_scale != 1.0)
                f = 1.0 / pow(hp->rope_theta * base_scale, (2.0 * k) / m->rot_dim);
            double angle = factors ? pos * (1.0 / factors[k]) * f : pos * f;
            cs[k] = (float)(cos(angle) * m->rope_mscale);
            sn[k] = (float)(sin(angle) * m->rope_mscale);
        }
    }
}

static void rope_heads(cpm_model *m, float *rows, int n, int n_heads, int head_stride,
                       int row_stride) {
    int half = m->rot_dim / 2;
    for (int i = 0; i < n; i++) {
        const float *cs = m->s.rope_cos + (size_t)i * half, *sn = m->s.rope_sin + (size_t)i * half;
        for (int h = 0; h < n_heads; h++)
            cpm_rope_neox(rows + (size_t)i * row_stride + (size_t)h * head_stride + m->rot_offset,
                          m->rot_dim, cs, sn);
    }
}

/* ---- the shared attention core ---- */

typedef struct core_args {
    cpm_model *m;
    const cpm_kv_cache *kv;
    int li;
    const cpm_batch *b;
    int n;
} core_args;

/* nb cache rows of `width` elements starting at column `col` of rows `stride`
 * apart, as f32: the cache itself when it is f32, else widened into buf (which
 * then holds them `width` apart). Returns the rows and sets *ret_stride. */
static const float *block_rows(const cpm_kv_cache *kv, const void *rows, int col, int width,
                               int stride, int nb, float *buf, int *ret_stride) {
    if (kv->dtype == CPM_DTYPE_F32) {
        *ret_stride = stride;
        return (const float *)rows + col;
    }
    for (int j = 0; j < nb; j++)
        cpm_f16_to_f32_row(buf + (size_t)j * width, (const uint16_t *)rows + (size_t)j * stride + col,
                           width);
    *ret_stride = width;
    return buf;
}

/* Online-softmax state of one KV head group of one row: G query heads share
 * each key read. Chunks of up to CPM_KV_BLOCK keys are folded in one at a
 * time, in ascending position order, so dense attention and a sparse key set
 * that happens to hold every block add the same numbers in the same order. */
typedef struct group_state {
    const core_args *a;
    int g, G, dk, dv, seq;
    const float *q;
    float *acc, *mx, *sum, *kbuf, *vbuf, *work;
} group_state;

static float *align64(float *p) { return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

static void group_begin(group_state *st, const core_args *a, int row, int g, float *tls) {
    const cpm_model *m = a->m;
    int G = m->hp.n_heads / m->kv_heads, dk = m->qk_dim, dv = m->v_dim;
    *st = (group_state){.a = a, .g = g, .G = G, .dk = dk, .dv = dv, .seq = a->b->seq[row]};
    st->q = m->s.q + (size_t)row * m->hp.n_heads * dk + (size_t)g * G * dk;
    st->acc = tls;
    st->mx = st->acc + (size_t)G * dv;
    st->sum = st->mx + G;
    st->vbuf = st->sum + G;
    /* the kernel's scratch and keys widened from f16: each 64-byte aligned */
    st->work = align64(st->vbuf + (size_t)CPM_KV_BLOCK * dv);
    st->kbuf = align64(st->work + cpm_attn_work_floats(G, dk));
    memset(st->acc, 0, (size_t)G * dv * sizeof(float));
    for (int h = 0; h < G; h++) {
        st->mx[h] = -INFINITY;
        st->sum[h] = 0.0f;
    }
}

/* The group's keys of a cache block stored by column, as f32 in the kernels'
 * layout (attn.h's kt): in place when the cache is f32, else widened into
 * kbuf. Slots past the sequence's end hold whatever they hold (unused lanes). */
static const float *group_columns(group_state *st, int block) {
    const cpm_kv_cache *kv = st->a->kv;
    size_t first = (size_t)st->g * (size_t)st->dk * CPM_KV_BLOCK, n = (size_t)st->dk * CPM_KV_BLOCK;
    const void *keys = cpm_kv_block_keys(kv, st->a->li, block);
    if (kv->dtype == CPM_DTYPE_F32)
        return (const float *)keys + first;
    cpm_f16_to_f32_row(st->kbuf, (const uint16_t *)keys + first, (int)n);
    return st->kbuf;
}

/* Folds keys j0 .. j0 + nb - 1 (one cache block, j0 at its start, nb <=
 * CPM_KV_BLOCK) in: keys stored by column go to the kernel as they lie, key
 * rows (a cache made so) as rows, which it transposes if it wants. */
static void group_chunk(group_state *st, int j0, int nb) {
    const core_args *a = st->a;
    const cpm_kv_cache *kv = a->kv;
    int G = st->G, dk = st->dk, dv = st->dv;
    int slot0 = cpm_kv_slot(kv, st->seq, j0), ks = 0, vs;
    const float *K = NULL, *kt = NULL;
    if (kv->keys_by_column)
        kt = group_columns(st, slot0 / CPM_KV_BLOCK);
    else
        K = block_rows(kv, cpm_kv_key(kv, a->li, slot0), st->g * dk, dk, kv->k_dim, nb,
                       st->kbuf, &ks);
    const float *V = block_rows(kv, cpm_kv_value(kv, a->li, slot0), st->g * dv, dv, kv->v_dim, nb,
                                st->vbuf, &vs);
    cpm_attn_fold(&(cpm_attn_block){.q = st->q, .K = K, .V = V, .ks = ks, .vs = vs, .nb = nb,
                                    .G = G, .dk = dk, .dv = dv, .scale = a->m->attn_scale,
                                    .acc = st->acc, .mx = st->mx, .sum = st->sum,
                                    .work = st->work, .kt = kt});
}

/* Keys [from, to] (inclusive), chunk by chunk along cache blocks. */
static void group_range(group_state *st, int from, int to) {
    for (int j0 = from; j0 <= to; j0 += CPM_KV_BLOCK)
        group_chunk(st, j0, to - j0 + 1 < CPM_KV_BLOCK ? to - j0 + 1 : CPM_KV_BLOCK);
}

static void group_end(group_state *st, int row) {
    const cpm_model *m = st->a->m;
    int G = st->G, dv = st->dv;
    float *out = m->s.attn + (size_t)row * m->hp.n_heads * dv + (size_t)st->g * G * dv;
    for (int h = 0; h < G; h++) {
        float inv = 1.0f / st->sum[h];
        for (int d = 0; d < dv; d++)
            out[(size_t)h * dv + d] = st->acc[(size_t)h * dv + d] * inv;
    }
}

/* InfLLM v2 stage 2 (spec §5.5): the query's selected blocks, in ascending
 * order, clipped to positions <= pos. */
static void group_sparse(group_state *st, int pos, float *sel_tls) {
    const cpm_model *m = st->a->m;
    const cpm_hparams *hp = &m->hp;
    int bs = hp->sparse_block;
    cpm_infllm_query q = {st->a->kv, st->a->li, st->seq, pos, st->g, st->G, st->dk,
                          m->attn_scale, st->q};
    cpm_infllm_blocks blk;
    cpm_infllm_select(hp, &q, sel_tls, &blk);
    int init_last = blk.init_end * bs - 1, win_last = blk.win_end * bs - 1;
    if (blk.init_end > 0) /* may hold the query's own block */
        group_range(st, 0, init_last < pos ? init_last : pos);
    for (int i = 0; i < blk.n_sel; i++) /* all before the query's block */
        group_range(st, blk.sel[i] * bs, blk.sel[i] * bs + bs - 1);
    if (blk.win_end > blk.win_begin)
        group_range(st, blk.win_begin * bs, win_last < pos ? win_last : pos);
}

/* One KV head group of one row: dense over positions 0..pos, or InfLLM v2. */
static void attend_group(const core_args *a, int row, int g, float *tls, float *sel_tls) {
    group_state st;
    int pos = a->b->pos[row];
    group_begin(&st, a, row, g, tls);
    if (cpm_infllm_is_sparse(&a->m->hp, pos))
        group_sparse(&st, pos, sel_tls);
    else
        group_range(&st, 0, pos);
    group_end(&st, row);
}

static void core_worker(void *arg, int tid, int nthreads) {
    core_args *a = arg;
    float *tls = a->m->s.attn_tls + (size_t)tid * a->m->attn_tls_floats;
    float *sel_tls = a->m->s.infllm_tls + (size_t)tid * a->m->infllm_tls_floats;
    int tasks = a->n * a->m->kv_heads;
    /* interleaved, as causal rows differ in cost; group by group, so that a thread
     * meets the rows of one sequence and group in turn (their blocks stay in cache) */
    for (int t = tid; t < tasks; t += nthreads)
        attend_group(a, t % a->n, t / a->n, tls, sel_tls);
}

static void store_kv(cpm_model *m, cpm_kv_cache *kv, int li, int n, const float *k,
                     const float *v) {
    for (int i = 0; i < n; i++)
        cpm_kv_cache_store(kv, li, m->s.kv_slot[i], k + (size_t)i * kv->k_dim,
                           v ? v + (size_t)i * kv->v_dim : NULL);
}

static void attend_and_project(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b,
                               int n) {
    core_args a = {m, kv, li, b, n};
    cpm_pool_run(m->pool, core_worker, &a);
    cpm_model_matmul(m, m->s.out, m->s.attn, &m->layers[li].w[CPM_W_O], n);
}

/* ---- GQA: MiniCPM 1/2/S/MoE/4 ---- */

static void gqa_forward(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b, int n) {
    const cpm_layer *L = &m->layers[li];
    int d = m->qk_dim, nh = m->hp.n_heads, nkv = m->kv_heads;
    float *const ys[3] = {m->s.q, m->s.k, m->s.v};
    const cpm_weight *const ws[3] = {&L->w[CPM_W_Q], &L->w[CPM_W_K], &L->w[CPM_W_V]};
    cpm_model_matmul_multi(m, ys, m->s.xn, ws, 3, n);
    rope_heads(m, m->s.q, n, nh, d, nh * d);
    rope_heads(m, m->s.k, n, nkv, d, nkv * d);
    store_kv(m, kv, li, n, m->s.k, m->s.v);
    cpm_kv_cache_sum_keys(kv, li, m->s.kv_slot, n); /* InfLLM v2 compressed keys */
    attend_and_project(m, kv, li, b, n);
}

/* ---- MLA: MiniCPM3 ---- */

/* The latent norms use eps 1e-6: the HF module builds them with the class
 * default, not rms_norm_eps (vLLM and llama.cpp differ; HF is the reference). */
#define CPM_MLA_LATENT_EPS 1e-6f

/* The two projections of xn: q (or its low-rank q_a) into s.q (s.lat_q) and the
 * latent kv_a into s.lat_kv, with xn packed once. */
static void mla_project_xn(cpm_model *m, const cpm_layer *L, int n) {
    bool lora = m->hp.q_lora_rank != 0;
    float *const ys[2] = {lora ? m->s.lat_q : m->s.q, m->s.lat_kv};
    const cpm_weight *const ws[2] = {&L->w[lora ? CPM_W_Q_A : CPM_W_Q], &L->w[CPM_W_KV_A]};
    cpm_model_matmul_multi(m, ys, m->s.xn, ws, 2, n);
}

/* Queries from s.lat_q (q_lora) once mla_project_xn has run. */
static void mla_queries(cpm_model *m, const cpm_layer *L, int n) {
    const cpm_hparams *hp = &m->hp;
    if (hp->q_lora_rank == 0)
        return;
    int r = hp->q_lora_rank;
    for (int i = 0; i < n; i++)
        cpm_rmsnorm(m->s.lat_q + (size_t)i * r, m->s.lat_q + (size_t)i * r,
                    L->norm[CPM_W_Q_A_NORM], r, CPM_MLA_LATENT_EPS);
    cpm_model_matmul(m, m->s.q, m->s.lat_q, &L->w[CPM_W_Q_B], n);
}

/* The cache row of each token: [rmsnorm(c_kv) | roped k_pe], kv_lora + rope
 * floats shared by every head (MiniCPM3-4B: 288 instead of 40 x 160), from
 * s.lat_kv (mla_project_xn). */
static void mla_latent_rows(cpm_model *m, const cpm_layer *L, int n) {
    const cpm_hparams *hp = &m->hp;
    int lr = hp->kv_lora_rank, rope = hp->qk_rope_dim, half = m->rot_dim / 2;
    for (int i = 0; i < n; i++) {
        const float *src = m->s.lat_kv + (size_t)i * (lr + rope);
        float *row = m->s.k + (size_t)i * (lr + rope);
        cpm_rmsnorm(row, src, L->norm[CPM_W_KV_A_NORM], lr, CPM_MLA_LATENT_EPS);
        memcpy(row + lr, src + lr, (size_t)rope * sizeof(float));
        cpm_rope_neox(row + lr, rope, m->s.rope_cos + (size_t)i * half,
                      m->s.rope_sin + (size_t)i * half);
    }
}

/* One head of one row over the latent cache (weight absorption):
 *   score_j = (W_kᵀ q_nope)·c_j + q_pe·k_pe_j,   out = W_v (Σ_j p_j c_j).
 * Online softmax over blocks, as in attend_group. */
static void attend_latent(core_args *a, int row, int h, float *tls) {
    cpm_model *m = a->m;
    const cpm_hparams *hp = &m->hp;
    const cpm_layer *L = &m->layers[a->li];
    const cpm_kv_cache *kv = a->kv;
    int lr = hp->kv_lora_rank, rope = hp->qk_rope_dim, nope = hp->qk_nope_dim;
    int dk = m->qk_dim, dv = m->v_dim;
    int seq = a->b->seq[row], pos = a->b->pos[row];
    float *q_abs = tls, *ctx = q_abs + lr, *score = ctx + lr, *cbuf = score + CPM_KV_BLOCK;
    const float *q = m->s.q + (size_t)row * hp->n_heads * dk + (size_t)h * dk;
    const float *wk = L->absorb_k + (size_t)h * nope * lr;
    memset(q_abs, 0, (size_t)lr * sizeof(float));
    for (int i = 0; i < nope; i++)
        cpm_axpy(q_abs, q[i], wk + (size_t)i * lr, lr);
    memset(ctx, 0, (size_t)lr * sizeof(float));
    float mx = -INFINITY, sum = 0.0f;
    for (int j0 = 0; j0 <= pos; j0 += CPM_KV_BLOCK) {
        int nb = pos - j0 + 1 < CPM_KV_BLOCK ? pos - j0 + 1 : CPM_KV_BLOCK;
        int cs;
        const float *C = block_rows(kv, cpm_kv_key(kv, a->li, cpm_kv_slot(kv, seq, j0)), 0,
                                    kv->k_dim, kv->k_dim, nb, cbuf, &cs);
        float bmax = -INFINITY, pe[CPM_KV_BLOCK];
        cpm_dot_rows(score, q_abs, C, cs, nb, lr, 1.0f);
        cpm_dot_rows(pe, q + nope, C + lr, cs, nb, rope, 1.0f);
        for (int j = 0; j < nb; j++) {
            score[j] = (score[j] + pe[j]) * m->attn_scale;
            bmax = score[j] > bmax ? score[j] : bmax;
        }
        float newmax = bmax > mx ? bmax : mx, corr = expf(mx - newmax);
        sum *= corr;
        cpm_scale(ctx, corr, lr);
        cpm_exp_shifted(score, nb, newmax); /* scores become weights in place */
        for (int j = 0; j < nb; j++)
            sum += score[j];
        cpm_axpy_rows(ctx, score, C, cs, nb, lr);
        mx = newmax;
    }
    float *out = m->s.attn + (size_t)row * hp->n_heads * dv + (size_t)h * dv;
    const float *wv = L->absorb_v + (size_t)h * dv * lr;
    for (int d = 0; d < dv; d++)
        out[d] = cpm_dot(wv + (size_t)d * lr, ctx, lr) / sum;
}

static void latent_worker(void *arg, int tid, int nthreads) {
    core_args *a = arg;
    float *tls = a->m->s.attn_tls + (size_t)tid * a->m->attn_tls_floats;
    int nh = a->m->hp.n_heads, tasks = a->n * nh;
    for (int t = tid; t < tasks; t += nthreads)
        attend_latent(a, t / nh, t % nh, tls);
}

static void mla_forward(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b, int n) {
    const cpm_layer *L = &m->layers[li];
    int nh = m->hp.n_heads, dk = m->qk_dim;
    mla_project_xn(m, L, n);
    mla_queries(m, L, n);
    rope_heads(m, m->s.q, n, nh, dk, nh * dk);
    mla_latent_rows(m, L, n);
    store_kv(m, kv, li, n, m->s.k, NULL);
    core_args a = {.m = m, .kv = kv, .li = li, .b = b, .n = n};
    cpm_pool_run(m->pool, latent_worker, &a);
    cpm_model_matmul(m, m->s.out, m->s.attn, &L->w[CPM_W_O], n);
}

/* ---- the table ---- */

typedef void (*attn_fn)(cpm_model *, cpm_kv_cache *, int, const cpm_batch *, int);

static const attn_fn attn_kinds[CPM_ATTN_KIND_COUNT] = {
    [CPM_ATTN_GQA] = gqa_forward,
    [CPM_ATTN_MLA] = mla_forward,
};

void cpm_attention_forward(cpm_model *m, cpm_kv_cache *kv, int li, const cpm_batch *b, int n) {
    attn_kinds[m->arch->attn](m, kv, li, b, n);
}
