/* sampler.c - repetition penalty, temperature, top-k/top-p/min-p and a seeded draw. */
#include "sampler.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct cpm_sampler {
    cpm_sampling_params p;
    int vocab;
    uint64_t step;    /* tokens drawn so far: the draw for step t depends on (seed, t) only */
    int32_t *heap;    /* [vocab] candidate ids, max-heap by logit */
    int32_t *cand;    /* [vocab] candidates still in the running */
    int32_t *edge;    /* [vocab] top-p: the bucket where the mass crosses top_p */
    float *weight;    /* [vocab] exp(logit - best) of the candidates */
    uint8_t *seen;    /* [vocab] repetition-penalty marks, all 0 between calls */
    int32_t *count;   /* [vocab] occurrences in the generated tokens, all 0 between calls */
    float *logit_save;/* [vocab] unmodified logits for the logprob */
};

cpm_sampling_params cpm_sampling_params_default(void) {
    return (cpm_sampling_params){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f,
                                 .repetition_penalty = 1.0f, .seed = 0};
}

static int check_ids(const char *what, const int32_t *ids, int n, int vocab, cpm_error *err) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return cpm_error_set(err, CPM_ERANGE, "%s: token %d outside the vocabulary (%d)", what,
                                 ids[i], vocab);
    return 0;
}

static int check_edits(const cpm_sampling_params *p, cpm_error *err) {
    if (p->n_bias < 0 || p->n_bias > CPM_SAMPLER_MAX_BIAS)
        return cpm_error_set(err, CPM_ELIMIT, "logit_bias: %d entries, at most %d", p->n_bias,
                             CPM_SAMPLER_MAX_BIAS);
    for (int i = 0; i < p->n_bias; i++)
        if (!(p->bias[i] >= -100.0f && p->bias[i] <= 100.0f))
            return cpm_error_set(err, CPM_ERANGE, "logit_bias: %g for token %d must be in [-100, 100]",
                                 (double)p->bias[i], p->bias_ids[i]);
    if (p->min_tokens < 0 || p->n_stop_ids < 0)
        return cpm_error_set(err, CPM_ERANGE, "min_tokens %d must be >= 0", p->min_tokens);
    return 0;
}

int cpm_sampling_params_validate(const cpm_sampling_params *p, cpm_error *err) {
    if (!(p->temperature >= 0.0f) || p->temperature > 100.0f)
        return cpm_error_set(err, CPM_ERANGE, "temperature %g must be in [0, 100]",
                             (double)p->temperature);
    if (p->top_k < 0)
        return cpm_error_set(err, CPM_ERANGE, "top_k %d must be >= 0", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return cpm_error_set(err, CPM_ERANGE, "top_p %g must be in (0, 1]", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return cpm_error_set(err, CPM_ERANGE, "min_p %g must be in [0, 1]", (double)p->min_p);
    if (!(p->repetition_penalty > 0.0f) || p->repetition_penalty > 100.0f)
        return cpm_error_set(err, CPM_ERANGE, "repetition_penalty %g must be in (0, 100]",
                             (double)p->repetition_penalty);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return cpm_error_set(err, CPM_ERANGE, "presence_penalty %g must be in [-2, 2]",
                             (double)p->presence_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return cpm_error_set(err, CPM_ERANGE, "frequency_penalty %g must be in [-2, 2]",
                             (double)p->frequency_penalty);
    return check_edits(p, err);
}

/* ---- the generator: splitmix64 seeds xoshiro256** ---- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The uniform number of one draw: a pure function of (seed, step), so any
 * process - cpm-run or any sampler replica of the cluster - that samples step
 * t of a request with the same seed draws the same number. 53 random bits. */
static double draw_unit(uint64_t seed, uint64_t step) {
    uint64_t x = seed ^ (step * 0xd1b54a32d192ed03ull);
    splitmix64(&x);
    uint64_t r = splitmix64(&x);
    return (double)(r >> 11) * (1.0 / 9007199254740992.0);
}

cpm_sampler *cpm_sampler_new(int vocab_size, const cpm_sampling_params *p, cpm_error *err) {
    if (vocab_size < 1) {
        cpm_error_set(err, CPM_EINVAL, "sampler: vocab_size %d", vocab_size);
        return NULL;
    }
    if (cpm_sampling_params_validate(p, err) ||
        check_ids("logit_bias", p->bias_ids, p->n_bias, vocab_size, err) ||
        check_ids("min_tokens stop ids", p->stop_ids, p->n_stop_ids, vocab_size, err))
        return NULL;
    cpm_sampler *s = calloc(1, sizeof *s);
    if (s) {
        s->heap = malloc((size_t)vocab_size * sizeof *s->heap);
        s->cand = malloc((size_t)vocab_size * sizeof *s->cand);
        s->edge = malloc((size_t)vocab_size * sizeof *s->edge);
        s->weight = malloc((size_t)vocab_size * sizeof *s->weight);
        s->seen = calloc((size_t)vocab_size, 1);
        s->count = calloc((size_t)vocab_size, sizeof *s->count);
        s->logit_save = malloc((size_t)vocab_size * sizeof *s->logit_save);
    }
    if (!s || !s->heap || !s->cand || !s->edge || !s->weight || !s->seen || !s->count ||
        !s->logit_save) {
        cpm_sampler_free(s);
        cpm_error_set(err, CPM_ENOMEM, "sampler: out of memory");
        return NULL;
    }
    s->p = *p;
    s->vocab = vocab_size;
    return s;
}

void cpm_sampler_free(cpm_sampler *s) {
    if (!s)
        return;
    free(s->heap);
    free(s->cand);
    free(s->edge);
    free(s->weight);
    free(s->seen);
    free(s->count);
    free(s->logit_save);
    free(s);
}

/* ---- helpers over logit arrays ---- */

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static double log_sum_exp(const float *x, int n) {
    float mx = x[argmax(x, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += exp((double)x[i] - mx);
    return mx + log(sum);
}

float cpm_logprob_of(const float *logits, int vocab_size, int id) {
    return (float)((double)logits[id] - log_sum_exp(logits, vocab_size));
}

/* HF penalises each distinct token of the history once: positive logits are
 * divided, negative ones multiplied. `seen` marks tokens already handled and
 * is cleared again on the way out, so the cost is O(history). */
static void apply_repetition_penalty(cpm_sampler *s, float *logits, const int32_t *hist,
                                     size_t n) {
    float penalty = s->p.repetition_penalty;
    for (size_t i = 0; i < n; i++) {
        int32_t t = hist[i];
        if (t < 0 || t >= s->vocab || s->seen[t])
            continue;
        s->seen[t] = 1;
        logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty;
    }
    for (size_t i = 0; i < n; i++)
        if (hist[i] >= 0 && hist[i] < s->vocab)
            s->seen[hist[i]] = 0;
}

/* OpenAI's presence and frequency penalties over the generated tokens gen[0..n): each
 * distinct token t loses presence + frequency * count(t). O(n); count is zero again
 * on the way out. */
static void apply_openai_penalties(cpm_sampler *s, float *logits, const int32_t *gen, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (gen[i] >= 0 && gen[i] < s->vocab)
            s->count[gen[i]]++;
    for (size_t i = 0; i < n; i++) {
        int32_t t = gen[i];
        if (t < 0 || t >= s->vocab || s->count[t] == 0)
            continue;
        logits[t] -= s->p.presence_penalty + s->p.frequency_penalty * (float)s->count[t];
        s->count[t] = 0; /* once per distinct token; also what clears the array */
    }
}

/* ---- filtering: HF order top-k, then top-p (over what top-k kept), then min-p ---- */

/* Max-heap of ids keyed by logits; ties keep the lower id on top. */
static bool above(const float *l, int32_t a, int32_t b) {
    return l[a] > l[b] || (l[a] == l[b] && a < b);
}

static void sift_down(int32_t *h, int n, int i, const float *l) {
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && above(l, h[c + 1], h[c]))
            c++;
        if (!above(l, h[c], h[i]))
            return;
        int32_t t = h[c];
        h[c] = h[i];
        h[i] = t;
        i = c;
    }
}

/* The k best ids, most probable first, into s->cand. O(V + k log V). */
static int select_top_k(cpm_sampler *s, const float *l, int k) {
    int n = s->vocab, size = n;
    int32_t *h = s->heap;
    for (int i = 0; i < n; i++)
        h[i] = i;
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_down(h, n, i, l);
    for (int j = 0; j < k; j++) {
        s->cand[j] = h[0];
        h[0] = h[--size];
        sift_down(h, size, 0, l);
    }
    return k;
}

static int by_logit_desc(const void *a, const void *b, void *logits) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return above(logits, x, y) ? -1 : above(logits, y, x) ? 1 : 0;
}

#define CPM_BUCKETS 1024
#define CPM_BUCKETS_PER_NAT 8.0f

/* Top-p over the candidates cand[0..n) (any order): keeps the most probable
 * ones until their mass reaches top_p. Instead of sorting the vocabulary it
 * buckets candidates by log-probability below the best, finds the bucket where
 * the mass crosses top_p, and sorts only that bucket. O(n). Rewrites cand. */
static int top_p_filter(cpm_sampler *s, const float *l, int n, float top, double total) {
    double mass[CPM_BUCKETS] = {0}, need = s->p.top_p * total, cum = 0;
    int32_t *key = s->heap; /* free here: holds each candidate's bucket */
    for (int i = 0; i < n; i++) {
        float d = (top - l[s->cand[i]]) * CPM_BUCKETS_PER_NAT;
        int b = d < CPM_BUCKETS - 1 ? (int)d : CPM_BUCKETS - 1;
        key[i] = b;
        mass[b] += s->weight[s->cand[i]];
    }
    int cut = 0;
    while (cut < CPM_BUCKETS - 1 && cum + mass[cut] < need)
        cum += mass[cut++];
    int kept = 0, n_edge = 0; /* tokens above the cut bucket, then the cut bucket sorted */
    for (int i = 0; i < n; i++) {
        if (key[i] < cut)
            s->cand[kept++] = s->cand[i];
        else if (key[i] == cut)
            s->edge[n_edge++] = s->cand[i];
    }
    qsort_r(s->edge, (size_t)n_edge, sizeof *s->edge, by_logit_desc, (void *)l);
    for (int i = 0; i < n_edge; i++) {
        if (kept > 0 && cum >= need)
            break;
        s->cand[kept++] = s->edge[i];
        cum += s->weight[s->edge[i]];
    }
    return kept;
}

static int draw(cpm_sampler *s, const float *l) {
    int V = s->vocab, n = V;
    bool by_k = s->p.top_k > 0 && s->p.top_k < V;
    if (by_k)
        n = select_top_k(s, l, s->p.top_k);
    else
        for (int i = 0; i < V; i++)
            s->cand[i] = i;
    float top = l[s->cand[0]];
    for (int i = 1; i < n; i++)
        top = l[s->cand[i]] > top ? l[s->cand[i]] : top;
    double total = 0.0; /* weights relative to the best token, computed once */
    for (int i = 0; i < n; i++)
        total += s->weight[s->cand[i]] = expf(l[s->cand[i]] - top);
    if (s->p.top_p < 1.0f)
        n = top_p_filter(s, l, n, top, total);
    double mass = 0.0;
    int kept = 0;
    for (int i = 0; i < n; i++) { /* min-p: relative to the best token */
        double rel = s->weight[s->cand[i]];
        if (rel >= s->p.min_p || l[s->cand[i]] == top) {
            s->cand[kept++] = s->cand[i];
            mass += rel;
        }
    }
    double u = draw_unit(s->p.seed, s->step) * mass, acc = 0.0;
    for (int i = 0; i < kept; i++) {
        acc += s->weight[s->cand[i]];
        if (u < acc)
            return s->cand[i];
    }
    return s->cand[kept - 1]; /* rounding left u at the very top of the mass */
}

/* Whether a row can be sampled: no NaN, no +inf (both make every weight NaN), and at
 * least one finite value (-inf alone masks a token, all -inf leaves none). */
static bool logits_usable(const float *l, int n) {
    bool finite = false;
    for (int i = 0; i < n; i++) {
        if (isnan(l[i]) || l[i] == INFINITY)
            return false;
        finite |= l[i] != -INFINITY;
    }
    return finite;
}

/* logit_bias, then min_tokens: what the request asked of the logits before any sampling
 * step (the reported logprob stays the model's own). The bias arrays are the request's,
 * read during the call only. */
static void apply_edits(cpm_sampler *s, float *logits) {
    for (int i = 0; i < s->p.n_bias; i++)
        logits[s->p.bias_ids[i]] += s->p.bias[i];
    if (s->step < (uint64_t)s->p.min_tokens)
        for (int i = 0; i < s->p.n_stop_ids; i++)
            logits[s->p.stop_ids[i]] = -INFINITY;
}

int cpm_sampler_sample(cpm_sampler *s, float *logits, const int32_t *history, size_t n_history,
                       float *ret_logprob) {
    int V = s->vocab, tok;
    if (!logits_usable(logits, V))
        return CPM_ERANGE;
    if (ret_logprob)
        memcpy(s->logit_save, logits, (size_t)V * sizeof(float));
    apply_edits(s, logits);
    if (s->p.repetition_penalty != 1.0f && n_history > 0)
        apply_repetition_penalty(s, logits, history, n_history);
    size_t n_gen = s->step < n_history ? (size_t)s->step : n_history;
    if ((s->p.presence_penalty != 0.0f || s->p.frequency_penalty != 0.0f) && n_gen > 0)
        apply_openai_penalties(s, logits, history + n_history - n_gen, n_gen);
    if (s->p.temperature == 0.0f) {
        tok = argmax(logits, V);
    } else if (isinf(logits[argmax(logits, V)] / s->p.temperature)) {
        tok = argmax(logits, V); /* a temperature so near 0 that it is greedy */
    } else {
        float inv_t = 1.0f / s->p.temperature;
        for (int i = 0; i < V; i++)
            logits[i] *= inv_t;
        tok = draw(s, logits);
    }
    s->step++;
    if (ret_logprob)
        *ret_logprob = cpm_logprob_of(s->logit_save, V, tok);
    return tok;
}

void cpm_sampler_set_step(cpm_sampler *s, uint64_t step) {
    s->step = step;
}

int cpm_top_logprobs(const float *logits, int vocab_size, int k, int32_t *ret_ids,
                     float *ret_logprobs) {
    if (k > 32)
        k = 32;
    if (k > vocab_size)
        k = vocab_size;
    int n = 0;
    for (int i = 0; i < vocab_size; i++) { /* insertion into a sorted list of <= 32 */
        if (n == k && logits[i] <= logits[ret_ids[n - 1]])
            continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && logits[ret_ids[j - 1]] < logits[i]) {
            ret_ids[j] = ret_ids[j - 1];
            j--;
        }
        ret_ids[j] = i;
    }
    double lse = log_sum_exp(logits, vocab_size);
    for (int j = 0; j < n; j++)
        ret_logprobs[j] = (float)((double)logits[ret_ids[j]] - lse);
    return n;
}
