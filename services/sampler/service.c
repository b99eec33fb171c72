/* service.c - cpm-sampler's request handler: validate, sample each row, pack the reply.
 *
 * The logits frame stays in the zmq message (no copy) except for one row at a time,
 * which the sampling library modifies in place.
 */
#include "service.h"

#include <stdlib.h>
#include <string.h>

#define MAX_TOP 32

int cpm_sampler_svc_params(const Cpm__V1__SamplingParams *in, cpm_sampling_params *ret,
                           cpm_error *err) {
    cpm_sampling_params p = cpm_sampling_params_default();
    p.temperature = in->temperature;
    p.top_k = in->top_k > (uint32_t)INT32_MAX ? INT32_MAX : (int)in->top_k;
    p.top_p = in->top_p == 0.0f ? 1.0f : in->top_p;
    p.min_p = in->min_p;
    p.repetition_penalty = in->repetition_penalty == 0.0f ? 1.0f : in->repetition_penalty;
    p.presence_penalty = in->presence_penalty;
    p.frequency_penalty = in->frequency_penalty;
    p.seed = in->seed;
    if (in->n_bias_ids != in->n_bias)
        return cpm_error_set(err, CPM_EFORMAT, "bias_ids: %zu ids for %zu biases", in->n_bias_ids,
                             in->n_bias);
    if (in->n_bias > CPM_SAMPLER_MAX_BIAS || in->n_min_tokens_stop_ids > 64 || in->min_tokens > INT32_MAX)
        return cpm_error_set(err, CPM_ELIMIT, "logit_bias (%zu) at most %d, min_tokens_stop_ids (%zu) "
                             "at most 64, min_tokens %u", in->n_bias, CPM_SAMPLER_MAX_BIAS,
                             in->n_min_tokens_stop_ids, in->min_tokens);
    p.bias_ids = in->bias_ids;
    p.bias = in->bias;
    p.n_bias = (int)in->n_bias;
    p.min_tokens = (int)in->min_tokens;
    p.stop_ids = in->min_tokens_stop_ids;
    p.n_stop_ids = (int)in->n_min_tokens_stop_ids;
    if (in->n_logprobs > MAX_TOP)
        return cpm_error_set(err, CPM_ERANGE, "n_logprobs %u must be at most %d", in->n_logprobs,
                             MAX_TOP);
    int rc = cpm_sampling_params_validate(&p, err);
    if (!rc)
        *ret = p;
    return rc;
}

/* Everything one reply owns, freed together. */
typedef struct reply_mem {
    Cpm__V1__SampledToken *tokens;
    Cpm__V1__SampledToken **token_ptrs;
    Cpm__V1__TopLogprob *tops;
    Cpm__V1__TopLogprob **top_ptrs;
    float *row;
    uint8_t *allowed; /* constrained rows: the token mask's scratch */
} reply_mem;

static void reply_mem_free(reply_mem *m) {
    free(m->tokens);
    free(m->token_ptrs);
    free(m->tops);
    free(m->top_ptrs);
    free(m->row);
    free(m->allowed);
}

/* A constrained row's mask on m->row (the generated ids are the history's last `step`). */
static int constrain_row(cpm_constrainer *c, const Cpm__V1__SampleRow *row, uint32_t r,
                         int vocab, reply_mem *m, cpm_error *err) {
    if (!row->constraint || row->constraint->kind == CPM__V1__CONSTRAINT_KIND__CONSTRAINT_NONE)
        return 0;
    if (!c)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "sample.rows[%u]: constrained output needs the "
                             "model's tokenizer files beside this sampler (cluster `model:`)", r);
    if (row->step > row->n_history)
        return cpm_error_set(err, CPM_EINVAL, "sample.rows[%u]: step %u but %zu history ids", r,
                             row->step, row->n_history);
    if (!m->allowed && !(m->allowed = malloc((size_t)vocab)))
        return cpm_error_set(err, CPM_ENOMEM, "sample: token mask");
    const int32_t *gen = row->history + (row->n_history - row->step);
    int rc = cpm_constrainer_apply(c, row->constraint, gen, row->step, m->row, vocab, m->allowed, err);
    return rc ? cpm_error_prefix(err, "sample.rows[%u]", r) : 0;
}

static int sample_row(cpm_constrainer *c, const Cpm__V1__SampleRow *row, uint32_t r,
                      const float *logits, int vocab, reply_mem *m, cpm_error *err) {
    cpm_sampling_params p;
    int rc = cpm_sampler_svc_params(row->params, &p, err);
    if (rc)
        return cpm_error_prefix(err, "sample.rows[%u]", r);
    for (size_t i = 0; i < row->n_history; i++)
        if (row->history[i] < 0 || row->history[i] >= vocab)
            return cpm_error_set(err, CPM_ERANGE, "sample.rows[%u].history[%zu]: id %d outside vocab %d",
                                 r, i, row->history[i], vocab);
    cpm_sampler *s = cpm_sampler_new(vocab, &p, err);
    if (!s)
        return err && err->code ? err->code : CPM_ENOMEM;
    cpm_sampler_set_step(s, row->step);
    memcpy(m->row, logits, (size_t)vocab * sizeof *logits);
    if ((rc = constrain_row(c, row, r, vocab, m, err))) {
        cpm_sampler_free(s);
        return rc;
    }
    float lp = 0.0f;
    int tok = cpm_sampler_sample(s, m->row, row->history, row->n_history, &lp);
    cpm_sampler_free(s);
    if (tok < 0)
        return cpm_error_set(err, tok, "sample.rows[%u]: %s", r,
                             tok == CPM_ERANGE ? "logits are NaN, +inf or all -inf"
                                               : "sampling failed");
    Cpm__V1__SampledToken *t = &m->tokens[r];
    cpm__v1__sampled_token__init(t);
    t->id = tok;
    t->logprob = lp;
    uint32_t k = row->params->n_logprobs;
    if (k) {
        int32_t ids[MAX_TOP];
        float lps[MAX_TOP];
        int got = cpm_top_logprobs(logits, vocab, (int)k, ids, lps);
        t->n_top = got > 0 ? (size_t)got : 0;
        t->top = &m->top_ptrs[(size_t)r * MAX_TOP];
        for (size_t i = 0; i < t->n_top; i++) {
            Cpm__V1__TopLogprob *tl = &m->tops[(size_t)r * MAX_TOP + i];
            cpm__v1__top_logprob__init(tl);
            tl->id = ids[i];
            tl->logprob = lps[i];
            t->top[i] = tl;
        }
    }
    return 0;
}

int cpm_sampler_svc_handle(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err) {
    cpm_constrainer *c = user;
    if (in->env->body_case != CPM__V1__ENVELOPE__BODY_SAMPLE)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "sampler: cannot handle '%s'",
                             cpm_wire_body_name(in->env->body_case));
    const Cpm__V1__SampleRequest *req = in->env->sample;
    size_t n = req->n_rows;
    int vocab = (int)req->logits->shape[1]; /* wire.c checked shape [n_rows, vocab] and the size */
    if (vocab <= 0)
        return cpm_error_set(err, CPM_EINVAL, "sample: empty vocabulary");
    reply_mem m = {0};
    m.tokens = calloc(n ? n : 1, sizeof *m.tokens);
    m.token_ptrs = calloc(n ? n : 1, sizeof *m.token_ptrs);
    m.tops = calloc((n ? n : 1) * MAX_TOP, sizeof *m.tops);
    m.top_ptrs = calloc((n ? n : 1) * MAX_TOP, sizeof *m.top_ptrs);
    m.row = malloc((size_t)vocab * sizeof *m.row);
    int rc = 0;
    if (!m.tokens || !m.token_ptrs || !m.tops || !m.top_ptrs || !m.row)
        rc = cpm_error_set(err, CPM_ENOMEM, "sample: %zu rows of %d", n, vocab);
    const float *logits = in->tensor;
    for (size_t r = 0; r < n && !rc; r++) {
        rc = sample_row(c, req->rows[r], (uint32_t)r, logits + r * (size_t)vocab, vocab, &m, err);
        m.token_ptrs[r] = &m.tokens[r];
    }
    if (!rc) {
        Cpm__V1__SampleReply rep = CPM__V1__SAMPLE_REPLY__INIT;
        rep.n_tokens = n;
        rep.tokens = m.token_ptrs;
        cpm_envelope env = CPM__V1__ENVELOPE__INIT;
        env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLED;
        env.sampled = &rep;
        rc = cpm_reply_set(out, &env, NULL, err);
    }
    reply_mem_free(&m);
    return rc;
}
