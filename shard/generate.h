/* generate.h - single-process generation for one sequence: chunked prefill,
 * then one decode step per token, sampling each next token.
 *
 * Used by cpm-run (the correctness tool every golden test drives) and by the
 * whole-model benchmark. The cluster runs the same cpm_model_forward calls,
 * split into stages and batched across requests.
 */
#ifndef CPM_GENERATE_H
#define CPM_GENERATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../services/sampler/sampler.h"
#include "engine/kv_cache.h"
#include "engine/model/model.h"

typedef struct cpm_generate_opts {
    int max_new_tokens;        /* tokens to generate (>= 0) */
    bool ignore_eos;           /* generate exactly max_new_tokens */
    cpm_dtype kv_dtype;        /* KV cache elements: CPM_DTYPE_F32 (0, default) or CPM_DTYPE_F16 */
    cpm_sampling_params sampling;
    /* Called with every prompt row's logits [vocab] in order, when set
     * (--logits-out). Return non-zero to abort. */
    int (*on_prompt_logits)(const float *logits, int vocab, void *ctx);
    /* Called with each generated token. Return non-zero to stop. */
    int (*on_token)(int32_t token, void *ctx);
    void *ctx;
} cpm_generate_opts;

typedef struct cpm_generate_stats {
    int prompt_tokens;
    int generated_tokens;
    double prefill_seconds;
    double decode_seconds;     /* from the first decode step to the last */
    const char *finish;        /* "length", "stop" (eos) or "abort" */
} cpm_generate_stats;

/* Runs prompt[0..n_prompt) through m (which must hold every layer) and
 * generates. The KV cache is created inside for prompt + max_new_tokens. */
int cpm_generate(cpm_model *m, const int32_t *prompt, int n_prompt, const cpm_generate_opts *o,
                 cpm_generate_stats *ret_stats, cpm_error *err);

/* Monotonic seconds. */
double cpm_now_seconds(void);

#endif
