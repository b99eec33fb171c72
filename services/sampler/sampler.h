/* sampler.h - turns one row of logits into the next token, as a request asked.
 *
 * The order of operations follows Hugging Face's generate(): repetition
 * penalty, then temperature, top-k, top-p, min-p, then a draw from the
 * renormalised distribution with a random number that depends only on the
 * request's seed and the step, so the same seed gives the same tokens on any
 * machine and in any service instance.
 * temperature == 0 means greedy (argmax; ties go to the lowest id).
 *
 *   cpm_sampling_params p = cpm_sampling_params_default();
 *   p.temperature = 0.8f; p.top_p = 0.9f; p.seed = 42;
 *   cpm_sampler *s = cpm_sampler_new(vocab, &p, &err);
 *   int tok = cpm_sampler_sample(s, logits, history, n_history, &logprob);
 *   cpm_sampler_free(s);
 */
#ifndef CPM_SAMPLER_H
#define CPM_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/error.h"

typedef struct cpm_sampling_params {
    float temperature;        /* 0 = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off; HF semantics (divide positive, multiply negative) */
    float presence_penalty;   /* 0 = off; OpenAI semantics over the generated tokens: */
    float frequency_penalty;  /* logit -= presence * [count > 0] + frequency * count */
    uint64_t seed;
    /* logit_bias: logits[bias_ids[i]] += bias[i] first of all (borrowed arrays) */
    const int32_t *bias_ids;
    const float *bias;
    int n_bias;
    /* min_tokens: while fewer tokens have been generated (the step), none of stop_ids is
     * drawn (the ids the request would stop on: EOS, stop_token_ids; borrowed) */
    int min_tokens;
    const int32_t *stop_ids;
    int n_stop_ids;
} cpm_sampling_params;

#define CPM_SAMPLER_MAX_BIAS 300 /* logit_bias entries, as OpenAI allows */

cpm_sampling_params cpm_sampling_params_default(void);

/* Checks ranges: temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= min_p <= 1,
 * repetition_penalty > 0, presence and frequency penalties in [-2, 2], biases in
 * [-100, 100] (at most 300), min_tokens >= 0. Message names the field. cpm_sampler_new
 * also checks that the bias and stop ids are in the vocabulary. */
int cpm_sampling_params_validate(const cpm_sampling_params *p, cpm_error *err);

typedef struct cpm_sampler cpm_sampler;

/* A sampler for one request: holds its generator state and vocab-sized scratch,
 * so sampling allocates nothing. Returns NULL on error. Free with cpm_sampler_free. */
cpm_sampler *cpm_sampler_new(int vocab_size, const cpm_sampling_params *p, cpm_error *err);

/* Accepts NULL. */
void cpm_sampler_free(cpm_sampler *s);

/* Picks the next token from logits[vocab_size] (modified in place). history is
 * every token of the sequence so far (prompt and generated) for the penalties (its
 * last `step` ids are the generated ones, which presence and frequency penalties
 * count); it may be NULL when n_history is 0. ret_logprob (may be NULL)
 * receives log p(token) under the unmodified model distribution. CPM_ERANGE (and
 * no draw) when the row holds a NaN or +inf or no finite value at all. */
int cpm_sampler_sample(cpm_sampler *s, float *logits, const int32_t *history, size_t n_history,
                       float *ret_logprob);

/* Sets the step (tokens already generated) the next draw belongs to. Each
 * draw's random number depends only on (seed, step), so a stateless service
 * can sample step t of any request and agree with a process that sampled
 * steps 0..t in order. cpm_sampler_sample advances the step by one. */
void cpm_sampler_set_step(cpm_sampler *s, uint64_t step);

/* log-softmax of logits at index id (the model's own log probability). */
float cpm_logprob_of(const float *logits, int vocab_size, int id);

/* The k most probable ids (descending) with their log probabilities, k <= 32. */
int cpm_top_logprobs(const float *logits, int vocab_size, int k, int32_t *ret_ids,
                     float *ret_logprobs);

#endif
