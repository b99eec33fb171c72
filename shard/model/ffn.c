/* ffn.c - the feed-forward sublayer: gated (SwiGLU or MiniCPM-S FATReLU) and
 * mixture-of-experts (MiniCPM-MoE: softmax router, top-k, renormalised). Reads
 * s.xn, writes s.out. */
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
    cpm_model_matmul(m, m->s.gate, x, gate, n);
    cpm_model_matmul(m, m->s.up, x, up, n);
    gated_act(&m->hp, m->s.gate, m->s.up, n * F);
    cpm_model_matmul(m, y, m->s.gate, down, n);
}

static void dense_forward(cpm_model *m, int li, int n) {
    const cpm_layer *L = &m->layers[li];
    gated_mlp(m, m->s.out, m->s.xn, n, &L->w[CPM_W_GATE], &L->w[CPM_W_UP], &L->w[CPM_W_DOWN]);
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

static void moe_forward(cpm_model *m, int li, int n) {
    const cpm_layer *L = &m->layers[li];
    int E = m->hp.n_experts, k = m->hp.n_experts_per_tok, H = m->hp.hidden_size;
    cpm_scratch *s = &m->s;
    cpm_model_matmul(m, s->router, s->xn, &L->w[CPM_W_ROUTER], n);
    for (int i = 0; i < n; i++)
        route_row(s->router + (size_t)i * E, E, k, s->route_ids + (size_t)i * k,
                  s->route_w + (size_t)i * k);
    memset(s->out, 0, (size_t)n * H * sizeof(float));
    for (int e = 0; e < E; e++) {
        int cnt = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < k; j++)
                if (s->route_ids[(size_t)i * k + j] == e) {
                    s->gather[cnt] = i;
                    s->gather_w[cnt++] = s->route_w[(size_t)i * k + j];
                }
        if (cnt == 0)
            continue;
        for (int c = 0; c < cnt; c++)
            memcpy(s->xg + (size_t)c * H, s->xn + (size_t)s->gather[c] * H, (size_t)H * 4);
        gated_mlp(m, s->yg, s->xg, cnt, &L->experts[0][e], &L->experts[1][e], &L->experts[2][e]);
        for (int c = 0; c < cnt; c++)
            cpm_axpy(s->out + (size_t)s->gather[c] * H, s->gather_w[c], s->yg + (size_t)c * H, H);
    }
}

typedef void (*ffn_fn)(cpm_model *, int, int);

static const ffn_fn ffn_kinds[CPM_FFN_KIND_COUNT] = {
    [CPM_FFN_GATED] = dense_forward,
    [CPM_FFN_MOE] = moe_forward,
};

void cpm_ffn_forward(cpm_model *m, int li, int n) {
    ffn_kinds[m->ffn](m, li, n);
}
