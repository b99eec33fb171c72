/* infllm.c - InfLLM v2 stage 1: compressed keys, block scores, top-k.
 *
 * Compressed keys come from the KV cache's per-block key sums: kernel j is the
 * mean of p/16 consecutive 16-key blocks, so q·C_j = (Σ q·sum_i) / p and one dot
 * per 16-key block per head serves every kernel that covers it. The mean is
 * exact f32 where HF rounds it to bf16 (spec §5.3): selections can differ from
 * HF's only where two block scores nearly tie.
 */
#include "infllm.h"

#include <math.h>
#include <string.h>

#include "../kernels/ops.h"

typedef struct sel_ctx {
    const cpm_hparams *hp;
    const cpm_infllm_query *q;
    int G;
    int n_cached;  /* 16-key blocks whose dots are in dcache */
    float *dcache; /* [cap, G] q_h · sum_i */
    float *dtmp;   /* [G] dots of a block beyond the cache */
    float *mx;     /* [G] softmax max per head */
    float *sm;     /* [G] softmax denominator per head */
    float *klog;   /* [G] logits of one kernel */
} sel_ctx;

static int cache_cap(const cpm_hparams *hp) {
    return (hp->max_position + CPM_KV_BLOCK - 1) / CPM_KV_BLOCK;
}

size_t cpm_infllm_scratch_floats(const cpm_hparams *hp, int group) {
    size_t G = (size_t)group;
    return (size_t)cache_cap(hp) * G + 4 * G + 2 * (size_t)hp->sparse_topk + 16;
}

/* The G dots of 16-key block i with the group's queries. */
static void compute_dots(const sel_ctx *c, int i, float *out) {
    const cpm_infllm_query *q = c->q;
    const cpm_kv_cache *kv = q->kv;
    const float *sum = cpm_kv_key_sum(kv, q->layer, cpm_kv_block_of(kv, q->seq, i * CPM_KV_BLOCK)) +
                       (size_t)q->kv_head * q->head_dim;
    cpm_dot_rows(out, sum, q->q, q->head_dim, c->G, q->head_dim, 1.0f);
}

static const float *block_dots(const sel_ctx *c, int i) {
    if (i < c->n_cached)
        return c->dcache + (size_t)i * c->G;
    compute_dots(c, i, c->dtmp);
    return c->dtmp;
}

/* klog[h] = q_h · C_j · scale for kernel j. */
static void kernel_logits(const sel_ctx *c, int j) {
    int s16 = c->hp->sparse_stride / CPM_KV_BLOCK, p16 = c->hp->sparse_kernel / CPM_KV_BLOCK;
    memset(c->klog, 0, (size_t)c->G * sizeof(float));
    for (int i = 0; i < p16; i++) {
        const float *d = block_dots(c, j * s16 + i);
        for (int h = 0; h < c->G; h++)
            c->klog[h] += d[h];
    }
    float f = c->q->scale / (float)c->hp->sparse_kernel;
    for (int h = 0; h < c->G; h++)
        c->klog[h] *= f;
}

/* Pass 1: each head's softmax max and denominator over kernels 0..n_c-1
 * (online: one pass, rescaling the sum when the max grows). */
static void kernel_lse(sel_ctx *c, int n_c) {
    for (int h = 0; h < c->G; h++) {
        c->mx[h] = -INFINITY;
        c->sm[h] = 0.0f;
    }
    for (int j = 0; j < n_c; j++) {
        kernel_logits(c, j);
        for (int h = 0; h < c->G; h++) {
            float l = c->klog[h];
            if (l > c->mx[h]) {
                c->sm[h] = c->sm[h] * expf(c->mx[h] - l) + 1.0f;
                c->mx[h] = l;
            } else {
                c->sm[h] += expf(l - c->mx[h]);
            }
        }
    }
}

/* Pass 2: S(j), the group's summed probability of kernel j. */
static float kernel_score(const sel_ctx *c, int j) {
    kernel_logits(c, j);
    float s = 0.0f;
    for (int h = 0; h < c->G; h++)
        s += expf(c->klog[h] - c->mx[h]) / c->sm[h];
    return s;
}

/* Keeps the best n_slots (score, block) pairs seen, best first; a newcomer
 * must beat the worst strictly, and equal scores keep their arrival order, so
 * with blocks arriving in ascending order ties go to the lower index. */
typedef struct topk {
    float *score;
    int *id;
    int n, cap;
} topk;

static void topk_offer(topk *t, float score, int id) {
    if (t->n == t->cap && !(score > t->score[t->n - 1]))
        return;
    int at = t->n < t->cap ? t->n++ : t->n - 1;
    while (at > 0 && t->score[at - 1] < score) {
        t->score[at] = t->score[at - 1];
        t->id[at] = t->id[at - 1];
        at--;
    }
    t->score[at] = score;
    t->id[at] = id;
}

static void sort_ids(int *id, int n) {
    for (int i = 1; i < n; i++) {
        int v = id[i], k = i;
        for (; k > 0 && id[k - 1] > v; k--)
            id[k] = id[k - 1];
        id[k] = v;
    }
}

/* Scores candidate blocks [lo, hi) by max-pooling S over the kernels that
 * overlap each one and keeps the best n_slots. Neighbouring blocks share a
 * kernel (r·b + r − 1 = r·(b+1) − 1): its score is reused. */
static void score_candidates(sel_ctx *c, int n_c, int lo, int hi, topk *t) {
    int r = c->hp->sparse_block / c->hp->sparse_stride, last_j = -1;
    float last_s = 0.0f;
    for (int b = lo; b < hi; b++) {
        int j0 = r * b - 1 < 0 ? 0 : r * b - 1;
        int j1 = r * b + r - 1 < n_c - 1 ? r * b + r - 1 : n_c - 1;
        float best = -INFINITY;
        for (int j = j0; j <= j1; j++) {
            float s = j == last_j ? last_s : kernel_score(c, j);
            last_j = j;
            last_s = s;
            best = s > best ? s : best;
        }
        topk_offer(t, best, b);
    }
}

static void fill_dot_cache(sel_ctx *c, int n_c) {
    int s16 = c->hp->sparse_stride / CPM_KV_BLOCK, p16 = c->hp->sparse_kernel / CPM_KV_BLOCK;
    int need = n_c > 0 ? (n_c - 1) * s16 + p16 : 0, cap = cache_cap(c->hp);
    c->n_cached = need < cap ? need : cap;
    for (int i = 0; i < c->n_cached; i++)
        compute_dots(c, i, c->dcache + (size_t)i * c->G);
}

void cpm_infllm_select(const cpm_hparams *hp, const cpm_infllm_query *q, float *scratch,
                       cpm_infllm_blocks *ret) {
    int t = q->pos, m = hp->sparse_block, q_blk = t / m, n_out = q_blk + 1;
    int k = hp->sparse_topk < n_out ? hp->sparse_topk : n_out;
    int local = hp->sparse_window / m; /* window_size // block_size, as HF */
    /* forced blocks: [0, init_end) and [win_begin, q_blk], made disjoint */
    int init_end = hp->sparse_init_blocks < n_out ? hp->sparse_init_blocks : n_out;
    int win_begin = q_blk - local > init_end ? q_blk - local : init_end;
    int forced = init_end + (n_out - win_begin), n_cand = win_begin - init_end;
    int slots = k - forced > 0 ? k - forced : 0;

    size_t G = (size_t)q->group, cap = (size_t)cache_cap(hp);
    int *ids = (int *)(scratch + cap * G + 4 * G + (size_t)hp->sparse_topk);
    topk best = {scratch + cap * G + 4 * G, ids, 0, slots};
    *ret = (cpm_infllm_blocks){init_end, 0, ids, win_begin, n_out};
    if (slots >= n_cand) { /* every block fits: no scores needed (dense) */
        for (int b = 0; b < n_cand; b++)
            ids[b] = init_end + b;
        ret->n_sel = n_cand;
        return;
    }
    if (slots == 0)
        return;
    sel_ctx c = {hp, q, q->group, 0, scratch, scratch + cap * G, scratch + cap * G + G,
                 scratch + cap * G + 2 * G, scratch + cap * G + 3 * G};
    int T = t + 1;
    int n_c = T >= hp->sparse_kernel ? (T - hp->sparse_kernel) / hp->sparse_stride + 1 : 0;
    fill_dot_cache(&c, n_c);
    kernel_lse(&c, n_c);
    score_candidates(&c, n_c, init_end, win_begin, &best);
    sort_ids(ids, best.n);
    ret->n_sel = best.n;
}
