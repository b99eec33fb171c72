/* ffn.c - the feed-forward sublayer: gated (SwiGLU or MiniCPM-S FATReLU) and
 * mixture-of-experts (MiniCPM-MoE: softmax router, top-k, renormalised). Reads
 * s.xn, writes s.out. MoE experts run here, or, with an expert backend set (expert
 * parallelism, shard/expert.c), in expert services; both give the same bits.
 * MiniCPM-S runs its FFN on the active neurons only (sparse_mlp, ffn_sparse.h). */
#include <string.h>

#include "../kernels/ops.h"
#include "layers.h"

static void gated_act(const cpm_hparams *hp, float *g, const float *u, int n) {
    if (hp->act == CPM_ACT_FATRELU)
        cpm_fatrelu_mul(g, u, n, hp->act_param);
    else
        cpm_silu_mul(g, u, n);
}

/* y[n, H] = down(act(gate x) * up x) */
static void gated_mlp(cpm_model *m, float *y, const float *x, int n, const cpm_weight *gate,
                      const cpm_weight *up, const cpm_weight *down) {
    int F = gate->rows;
    float *const ys[2] = {m->s.gate, m->s.up};
    const cpm_weight *const ws[2] = {gate, up};
    cpm_model_matmul_multi(m, ys, x, ws, 2, n);
    gated_act(&m->hp, m->s.gate, m->s.up, n * F);
    cpm_model_matmul(m, y, m->s.gate, down, n);
}

static void dense_forward(cpm_model *m, int li, int n) {
    const cpm_layer *L = &m->layers[li];
    gated_mlp(m, m->s.out, m->s.xn, n, &L->w[CPM_W_GATE], &L->w[CPM_W_UP], &L->w[CPM_W_DOWN]);
    size_t bytes = cpm_weight_bytes(&L->w[CPM_W_GATE]) + cpm_weight_bytes(&L->w[CPM_W_UP]) +
                   cpm_weight_bytes(&L->w[CPM_W_DOWN]);
    m->ffn_stats.rows += (uint64_t)n;
    m->ffn_stats.weight_bytes += bytes;
    m->ffn_stats.dense_bytes += bytes;
}

/* MiniCPM-S: h = fatrelu(gate x) * up x is mostly exact zeros. After the gate, each row
 * reads only its active neurons' rows of up and of the transposed down: decode reads
 * about 40 % of the FFN's bytes at 88 % sparsity, and a prefill batch's rows share the
 * weight rows they have in common through the caches. The logits equal the dense FFN's
 * up to the order of down's sum (the bound is in ffn_sparse.h). */
static void sparse_mlp(cpm_model *m, int li, int n) {
    const cpm_layer *L = &m->layers[li];
    const cpm_weight *gate = &L->w[CPM_W_GATE], *up = &L->w[CPM_W_UP], *down = &L->w[CPM_W_DOWN];
    cpm_scratch *s = &m->s;
    int F = gate->rows, H = m->hp.hidden_size;
    float thr = m->hp.act_param;
    long active;
    cpm_model_matmul(m, s->gate, s->xn, gate, n);
    int nk = cpm_ffn_sparse_active(s->gate, F, n, F, thr, s->active, &active);
    cpm_ffn_sparse_up(m->pool, s->gate, F, s->xn, H, up->data, up->dtype,
                      up->ld ? up->ld : up->cols, n, H, thr, s->active, nk);
    cpm_ffn_sparse_down(m->pool, s->out, H, s->gate, F, down->t, down->dtype, H, n, H,
                        s->active, nk);

    size_t gb = cpm_weight_bytes(gate), row_bytes = (size_t)H * cpm_dtype_size(up->dtype);
    cpm_ffn_stats *st = &m->ffn_stats;
    st->rows += (uint64_t)n;
    st->neurons += (uint64_t)n * (uint64_t)F;
    st->active += (uint64_t)active;
    st->weight_bytes += gb + (size_t)nk * (row_bytes + (size_t)H * cpm_dtype_size(down->dtype));
    st->dense_bytes += gb + cpm_weight_bytes(up) + cpm_weight_bytes(down);
}

/* Top-k of softmax(router logits) for one row, weights renormalised to sum 1.
 * Ties go to the lower expert index (documented choice; torch.topk leaves it open). */
static void route_row(float *probs, int E, int k, int *ids, float *w) {
    cpm_softmax(probs, E);
    float total = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int t = 0; t < j; t++)
                taken |= ids[t] == e;
            if (!taken && (best < 0 || probs[e] > probs[best]))
                best = e;
        }
        ids[j] = best;
        w[j] = probs[best];
        total += w[j];
    }
    for (int j = 0; j < k; j++)
        w[j] /= total;
}

/* Rows routed to expert e, in row order, with their weights; returns how many. */
static int gather_expert(const cpm_scratch *s, int n, int k, int e, int *rows, float *w) {
    int cnt = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < k; j++)
            if (s->route_ids[(size_t)i * k + j] == e) {
                rows[cnt] = i;
                w[cnt++] = s->route_w[(size_t)i * k + j];
            }
    return cnt;
}

/* One expert on n rows, in chunks of the scratch's capacity (the matmul gives each row
 * the same bits whatever the chunk, so chunking changes nothing). */
static void expert_mlp(cpm_model *m, const cpm_layer *L, int e, const float *x, int n, float *y) {
    size_t H = (size_t)m->hp.hidden_size;
    for (int at = 0; at < n; at += m->max_batch) {
        int c = n - at < m->max_batch ? n - at : m->max_batch;
        gated_mlp(m, y + (size_t)at * H, x + (size_t)at * H, c, &L->experts[0][e],
                  &L->experts[1][e], &L->experts[2][e]);
    }
}

int cpm_expert_ffn(cpm_model *m, int layer, int expert, const float *x, int n, float *y,
                   cpm_error *err) {
    if (m->ffn != CPM_FFN_MOE)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "experts: the model has no MoE layers");
    if (layer < m->info.layer_begin || layer >= m->info.layer_end)
        return cpm_error_set(err, CPM_ERANGE, "experts: layer %d outside this model's [%d, %d)",
                             layer, m->info.layer_begin, m->info.layer_end);
    if (expert < m->expert_begin || expert >= m->expert_end)
        return cpm_error_set(err, CPM_ERANGE, "experts: expert %d outside the loaded [%d, %d)",
                             expert, m->expert_begin, m->expert_end);
    if (n < 0)
        return cpm_error_set(err, CPM_EINVAL, "experts: %d rows", n);
    expert_mlp(m, &m->layers[layer - m->info.layer_begin], expert, x, n, y);
    return 0;
}

/* The experts run elsewhere: every routed expert's rows go out in one call (so all
 * expert services work at once), then are combined exactly as moe_forward does -
 * experts ascending, rows in order - so the sums are the same bits. */
static int moe_remote(cpm_model *m, int li, int n, cpm_error *err) {
    int E = m->hp.n_experts, k = m->hp.n_experts_per_tok;
    size_t H = (size_t)m->hp.hidden_size;
    cpm_scratch *s = &m->s;
    int total = 0, groups = 0;
    for (int e = 0; e < E; e++) {
        int cnt = gather_expert(s, n, k, e, s->gather + total, s->gather_w + total);
        if (cnt == 0)
            continue;
        for (int c = 0; c < cnt; c++)
            memcpy(s->xg + (size_t)(total + c) * H, s->xn + (size_t)s->gather[total + c] * H, H * 4);
        s->moe_ids[groups] = e;
        s->moe_rows[groups++] = cnt;
        total += cnt;
    }
    int rc = m->experts_remote.run(m->experts_remote.ud, m->info.layer_begin + li, groups,
                                   s->moe_ids, s->moe_rows, s->xg, s->yg, err);
    if (rc)
        return rc;
    for (int c = 0; c < total; c++)
        cpm_axpy(s->out + (size_t)s->gather[c] * H, s->gather_w[c], s->yg + (size_t)c * H, (int)H);
    return 0;
}

static int moe_forward(cpm_model *m, int li, int n, cpm_error *err) {
    const cpm_layer *L = &m->layers[li];
    int E = m->hp.n_experts, k = m->hp.n_experts_per_tok, H = m->hp.hidden_size;
    cpm_scratch *s = &m->s;
    cpm_model_matmul(m, s->router, s->xn, &L->w[CPM_W_ROUTER], n);
    for (int i = 0; i < n; i++)
        route_row(s->router + (size_t)i * E, E, k, s->route_ids + (size_t)i * k,
                  s->route_w + (size_t)i * k);
    memset(s->out, 0, (size_t)n * H * sizeof(float));
    if (m->experts_remote.run)
        return moe_remote(m, li, n, err);
    for (int e = 0; e < E; e++) {
        int cnt = gather_expert(s, n, k, e, s->gather, s->gather_w);
        if (cnt == 0)
            continue;
        if (e < m->expert_begin || e >= m->expert_end)
            return cpm_error_set(err, CPM_EINVAL, "layer %d: expert %d is not loaded here and no "
                                 "expert backend is set", m->info.layer_begin + li, e);
        for (int c = 0; c < cnt; c++)
            memcpy(s->xg + (size_t)c * H, s->xn + (size_t)s->gather[c] * H, (size_t)H * 4);
        expert_mlp(m, L, e, s->xg, cnt, s->yg);
        for (int c = 0; c < cnt; c++)
            cpm_axpy(s->out + (size_t)s->gather[c] * H, s->gather_w[c], s->yg + (size_t)c * H, H);
    }
    return 0;
}

static int gated_ffn(cpm_model *m, int li, int n, cpm_error *err) {
    (void)err;
    if (m->ffn_sparse)
        sparse_mlp(m, li, n);
    else
        dense_forward(m, li, n);
    return 0;
}

typedef int (*ffn_fn)(cpm_model *, int, int, cpm_error *);

static const ffn_fn ffn_kinds[CPM_FFN_KIND_COUNT] = {
    [CPM_FFN_GATED] = gated_ffn,
    [CPM_FFN_MOE] = moe_forward,
};

int cpm_ffn_forward(cpm_model *m, int li, int n, cpm_error *err) {
    return ffn_kinds[m->ffn](m, li, n, err);
}
