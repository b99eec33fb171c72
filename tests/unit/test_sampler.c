/* Unit tests for services/sampler/sampler.c: greedy, seeded reproducibility,
 * each filter's effect, the repetition penalty's HF semantics, validation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <string.h>

#include "services/sampler/sampler.h"

#define V 64

static void fill(float *l) {
    for (int i = 0; i < V; i++)
        l[i] = (float)((i * 37) % V) / 8.0f; /* a permutation of 0 .. 7.875 */
}

static int sample_once(const cpm_sampling_params *p, const int32_t *hist, size_t nh, int step) {
    cpm_error e = {0};
    cpm_sampler *s = cpm_sampler_new(V, p, &e);
    assert_non_null(s);
    int t = -1;
    for (int i = 0; i <= step; i++) {
        float l[V];
        fill(l);
        t = cpm_sampler_sample(s, l, hist, nh, NULL);
    }
    cpm_sampler_free(s);
    return t;
}

static int top_id(void) {
    float l[V];
    fill(l);
    int b = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[b])
            b = i;
    return b;
}

static void test_greedy(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = 0;
    assert_int_equal(sample_once(&p, NULL, 0, 0), top_id());
}

static void test_seed_reproducible(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.seed = 1234;
    int a[20], b[20], diff = 0;
    for (int i = 0; i < 20; i++) {
        a[i] = sample_once(&p, NULL, 0, i);
        b[i] = sample_once(&p, NULL, 0, i);
    }
    assert_memory_equal(a, b, sizeof a);
    p.seed = 99;
    for (int i = 0; i < 20; i++)
        diff += sample_once(&p, NULL, 0, i) != a[i];
    assert_true(diff > 0);
}

/* A sampler told it is at step t draws what a sampler that drew 0..t-1 does. */
static void test_stateless_steps(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.seed = 7;
    cpm_error e = {0};
    for (int t = 0; t < 10; t++) {
        cpm_sampler *s = cpm_sampler_new(V, &p, &e);
        cpm_sampler_set_step(s, (uint64_t)t);
        float l[V];
        fill(l);
        assert_int_equal(cpm_sampler_sample(s, l, NULL, 0, NULL), sample_once(&p, NULL, 0, t));
        cpm_sampler_free(s);
    }
}

static void test_top_k_one_is_greedy(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.top_k = 1;
    for (uint64_t s = 0; s < 50; s++) {
        p.seed = s;
        assert_int_equal(sample_once(&p, NULL, 0, 0), top_id());
    }
}

static void test_top_p_and_min_p_restrict(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    float l[V];
    fill(l);
    /* With a tiny top_p or min_p near 1 only the best token survives. */
    p.top_p = 1e-6f;
    for (uint64_t s = 0; s < 30; s++) {
        p.seed = s;
        assert_int_equal(sample_once(&p, NULL, 0, 0), top_id());
    }
    p.top_p = 1.0f;
    p.min_p = 0.99f;
    for (uint64_t s = 0; s < 30; s++) {
        p.seed = s;
        assert_int_equal(sample_once(&p, NULL, 0, 0), top_id());
    }
    /* top_k = 3 keeps exactly the three best. */
    p.min_p = 0;
    p.top_k = 3;
    for (uint64_t s = 0; s < 200; s++) {
        p.seed = s;
        int t = sample_once(&p, NULL, 0, 0);
        assert_true(l[t] >= 7.625f);
    }
}

static void test_repetition_penalty(void **state) {
    (void)state;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = 0;
    p.repetition_penalty = 100.0f;
    int32_t hist[] = {top_id(), top_id()};
    int t = sample_once(&p, hist, 2, 0);
    assert_int_not_equal(t, top_id()); /* divided by 100 once, not twice */
    cpm_error e = {0};
    cpm_sampler *s = cpm_sampler_new(V, &p, &e);
    float l[V];
    fill(l);
    l[5] = -2.0f;
    int32_t h5[] = {5, 5, 5};
    cpm_sampler_sample(s, l, h5, 3, NULL);
    assert_true(l[5] == -200.0f); /* negative logits are multiplied, once */
    cpm_sampler_free(s);
}

static void test_logprobs(void **state) {
    (void)state;
    float l[V];
    fill(l);
    int32_t ids[5];
    float lp[5];
    assert_int_equal(cpm_top_logprobs(l, V, 5, ids, lp), 5);
    assert_int_equal(ids[0], top_id());
    for (int i = 1; i < 5; i++)
        assert_true(lp[i] <= lp[i - 1]);
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += exp(cpm_logprob_of(l, V, i));
    assert_true(fabs(sum - 1.0) < 1e-5);
}

static void test_validation(void **state) {
    (void)state;
    cpm_error e = {0};
    cpm_sampling_params p = cpm_sampling_params_default();
    p.top_p = 0;
    assert_null(cpm_sampler_new(V, &p, &e));
    assert_non_null(strstr(e.msg, "top_p"));
    p = cpm_sampling_params_default();
    p.temperature = -1;
    assert_int_equal(cpm_sampling_params_validate(&p, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "temperature"));
    p = cpm_sampling_params_default();
    p.repetition_penalty = 0;
    assert_int_equal(cpm_sampling_params_validate(&p, &e), CPM_ERANGE);
    cpm_sampler_free(NULL);
}

/* One draw from a given row with temperature t and seed; the return of cpm_sampler_sample. */
static int sample_row(const float *row, float t, uint64_t seed, int top_k, float top_p) {
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = t;
    p.seed = seed;
    p.top_k = top_k;
    p.top_p = top_p;
    cpm_error e = {0};
    cpm_sampler *s = cpm_sampler_new(V, &p, &e);
    assert_non_null(s);
    float l[V];
    memcpy(l, row, sizeof l);
    float lp;
    int tok = cpm_sampler_sample(s, l, NULL, 0, &lp);
    cpm_sampler_free(s);
    return tok;
}

/* NaN, +inf and all -inf rows are refused on every path (they used to read before the
 * candidate array); all-equal rows, masked rows and near-zero temperatures draw in range. */
static void test_bad_logits(void **state) {
    (void)state;
    static const struct {
        float t;
        int top_k;
        float top_p;
    } paths[] = {{0.0f, 0, 1.0f}, {0.7f, 0, 1.0f}, {0.7f, 5, 1.0f}, {0.7f, 0, 0.9f},
                 {1.3f, 3, 0.5f}};
    float nan_row[V], one_nan[V], inf_row[V], neg_inf[V], equal[V], masked[V];
    for (int i = 0; i < V; i++) {
        nan_row[i] = NAN;
        one_nan[i] = inf_row[i] = (float)i / 8.0f;
        neg_inf[i] = masked[i] = -INFINITY;
        equal[i] = 1.5f;
    }
    one_nan[17] = NAN;
    inf_row[3] = INFINITY;
    masked[41] = 0.25f;
    for (size_t k = 0; k < sizeof paths / sizeof *paths; k++)
        for (uint64_t seed = 1; seed < 6; seed++) {
            float t = paths[k].t;
            int tk = paths[k].top_k;
            float tp = paths[k].top_p;
            assert_int_equal(sample_row(nan_row, t, seed, tk, tp), CPM_ERANGE);
            assert_int_equal(sample_row(one_nan, t, seed, tk, tp), CPM_ERANGE);
            assert_int_equal(sample_row(inf_row, t, seed, tk, tp), CPM_ERANGE);
            assert_int_equal(sample_row(neg_inf, t, seed, tk, tp), CPM_ERANGE);
            int eq = sample_row(equal, t, seed, tk, tp);
            assert_true(eq >= 0 && eq < V);
            assert_int_equal(sample_row(masked, t, seed, tk, tp), 41);
        }
    float row[V];
    fill(row);
    assert_int_equal(sample_row(row, 1e-38f, 7, 0, 1.0f), top_id()); /* logits / t overflow */
}

/* Greedy pick from a row where token 0 leads 3.0 > 2.5 (1) > 2.2 (2), after `step` tokens
 * were generated: the last `step` ids of hist. */
static int penalised(float presence, float frequency, const int32_t *hist, size_t n, int step) {
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = 0;
    p.presence_penalty = presence;
    p.frequency_penalty = frequency;
    cpm_error e = {0};
    cpm_sampler *s = cpm_sampler_new(V, &p, &e);
    assert_non_null(s);
    float l[V] = {0};
    l[0] = 3.0f, l[1] = 2.5f, l[2] = 2.2f;
    cpm_sampler_set_step(s, (uint64_t)step);
    int t = cpm_sampler_sample(s, l, hist, n, NULL);
    cpm_sampler_free(s);
    return t;
}

/* OpenAI's presence and frequency penalties act (they used to be accepted and ignored),
 * count only the generated tokens, and leave the arrays clean for the next call. */
static void test_presence_frequency_penalties(void **state) {
    (void)state;
    const int32_t hist[] = {0, 0, 7, 0, 0}; /* prompt {0, 0}, then generated 7, 0, 0 */
    assert_int_equal(penalised(0, 0, hist, 5, 3), 0);
    assert_int_equal(penalised(0, 0.3f, hist, 5, 3), 1);   /* 3.0 - 2 x 0.3 = 2.4 < 2.5 */
    assert_int_equal(penalised(0, 0.2f, hist, 5, 3), 0);   /* 2.6 still leads */
    assert_int_equal(penalised(0.6f, 0, hist, 5, 3), 1);   /* 2.4 */
    assert_int_equal(penalised(0.4f, 0, hist, 5, 3), 0);   /* 2.6 */
    assert_int_equal(penalised(2.0f, 2.0f, hist, 5, 0), 0); /* nothing generated: the prompt's
                                                              0s are not counted */
    assert_int_equal(penalised(0, 0.3f, hist, 5, 1), 0);   /* one generated 0: 2.7 */
    assert_int_equal(penalised(-1.0f, 0, (int32_t[]){2}, 1, 1), 2); /* negative: encourages */
    cpm_sampling_params p = cpm_sampling_params_default();
    cpm_error e = {0};
    p.frequency_penalty = 2.5f;
    assert_int_equal(cpm_sampling_params_validate(&p, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "frequency_penalty"));
}

/* logit_bias adds to the logits before anything else: +100 makes a token the argmax,
 * -100 removes the argmax; the reported logprob stays the model's own. */
static void test_logit_bias(void **state) {
    (void)state;
    int top = top_id(), other = (top + 1) % V;
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = 0;
    int32_t ids[2] = {other, top};
    float bias[2] = {100.0f, 0.0f};
    p.bias_ids = ids, p.bias = bias, p.n_bias = 1;
    assert_int_equal(sample_once(&p, NULL, 0, 0), other);
    bias[0] = 0.0f, bias[1] = -100.0f, p.n_bias = 2;
    int second = sample_once(&p, NULL, 0, 0);
    assert_true(second != top);
    float l[V];
    fill(l);
    assert_true(l[second] == 7.75f); /* the next best of the permutation */
    cpm_error e = {0};
    cpm_sampler *s = cpm_sampler_new(V, &p, &e);
    float lp, raw[V];
    fill(l), fill(raw);
    assert_int_equal(cpm_sampler_sample(s, l, NULL, 0, &lp), second);
    assert_true(fabsf(lp - cpm_logprob_of(raw, V, second)) < 1e-6f);
    cpm_sampler_free(s);
    bias[1] = 100.5f; /* out of range, and ids outside the vocabulary */
    assert_null(cpm_sampler_new(V, &p, &e));
    assert_non_null(strstr(e.msg, "logit_bias: 100.5"));
    bias[1] = 1.0f, ids[0] = V;
    assert_null(cpm_sampler_new(V, &p, &e));
    assert_non_null(strstr(e.msg, "outside the vocabulary"));
}

/* min_tokens: before that many tokens, no stop id is drawn; from then on they are. */
static void test_min_tokens(void **state) {
    (void)state;
    int top = top_id();
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = 0;
    int32_t stops[1] = {top};
    p.stop_ids = stops, p.n_stop_ids = 1, p.min_tokens = 3;
    for (int step = 0; step < 3; step++)
        assert_true(sample_once(&p, NULL, 0, step) != top);
    assert_int_equal(sample_once(&p, NULL, 0, 3), top);
    p.min_tokens = -1;
    cpm_error e = {0};
    assert_int_equal(cpm_sampling_params_validate(&p, &e), CPM_ERANGE);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),          cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_top_k_one_is_greedy), cmocka_unit_test(test_stateless_steps), cmocka_unit_test(test_top_p_and_min_p_restrict),
        cmocka_unit_test(test_repetition_penalty), cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_validation),          cmocka_unit_test(test_bad_logits),
        cmocka_unit_test(test_presence_frequency_penalties),
        cmocka_unit_test(test_logit_bias), cmocka_unit_test(test_min_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
