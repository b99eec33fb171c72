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
    int32_t *cand;    /* [vocab] kept candidates, most probable first */
    uint8_t *seen;    /* [vocab] repetition-penalty marks, all 0 between calls */
    float *logit_save;/* [vocab] unmodified logits for the logprob */
};

cpm_sampling_params cpm_sampling_params_default(void) {
    return (cpm_sampling_params){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f,
                                 .repetition_penalty = 1.0f, .seed = 0};
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
    return 0;
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
    if (cpm_sampling_params_validate(p, err))
        return NULL;
    cpm_sampler *s = calloc(1, sizeof *s);
    if (s) {
        s->heap = malloc((size_t)vocab_size * sizeof *s->heap);
        s->cand = malloc((size_t)vocab_size * sizeof *s->cand);
        s->seen = calloc((size_t)vocab_size, 1);
        s->logit_save = malloc((size_t)vocab_size * sizeof *s->logit_save);
    }
    if (!s || !s->heap || !s->cand || !s->seen || !s->logit_save) {
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
    free(s->seen);
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

/* Pops candidates in descending order of logit into s->cand until top-k,
 * top-p or min-p stops; returns how many were kept and their probability
 * mass. Cost O(V + kept log V), so a small nucleus never sorts the vocabulary. */
static int nucleus(cpm_sampler *s, const float *l, double *ret_mass, double *ret_total,
                   float *ret_top) {
    int n = s->vocab;
    int32_t *h = s->heap;
    for (int i = 0; i < n; i++)
        h[i] = i;
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_down(h, n, i, l);
    float top = l[h[0]];
    double total = 0.0;
    for (int i = 0; i < n; i++)
        total += exp((double)l[i] - top);
    int limit = s->p.top_k > 0 && s->p.top_k < n ? s->p.top_k : n;
    double mass = 0.0, min_p = s->p.min_p;
    int kept = 0, size = n;
    while (kept < limit && size > 0) {
        int32_t id = h[0];
        double rel = exp((double)l[id] - top); /* p(id) / p(top) */
        if (kept > 0 && (mass >= s->p.top_p || rel < min_p))
            break;
        s->cand[kept++] = id;
        mass += rel / total;
        h[0] = h[--size];
        sift_down(h, size, 0, l);
    }
    *ret_mass = mass;
    *ret_total = total;
    *ret_top = top;
    return kept;
}

static int draw(cpm_sampler *s, const float *l) {
    double mass, total;
    float top;
    int kept = nucleus(s, l, &mass, &total, &top);
    double u = draw_unit(s->p.seed, s->step) * mass, acc = 0.0;
    for (int i = 0; i < kept; i++) {
        acc += exp((double)l[s->cand[i]] - top) / total;
        if (u < acc)
            return s->cand[i];
    }
    return s->cand[kept - 1]; /* rounding left u at the very top of the mass */
}

int cpm_sampler_sample(cpm_sampler *s, float *logits, const int32_t *history, size_t n_history,
                       float *ret_logprob) {
    int V = s->vocab, tok;
    if (ret_logprob)
        memcpy(s->logit_save, logits, (size_t)V * sizeof(float));
    if (s->p.repetition_penalty != 1.0f && n_history > 0)
        apply_repetition_penalty(s, logits, history, n_history);
    if (s->p.temperature == 0.0f) {
        tok = argmax(logits, V);
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
