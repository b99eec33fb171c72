/* generate.c - prefill in chunks of the model's batch limit, then decode. */
#include "generate.h"

#include <stdlib.h>
#include <time.h>

double cpm_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct gen_state {
    cpm_model *m;
    cpm_kv_cache *kv;
    int seq;
    int V;
    int max_batch;
    float *logits;     /* [max_batch, V] */
    int32_t *history;  /* prompt + generated, for the repetition penalty */
    int32_t *seqs, *pos;
    uint8_t *want;
} gen_state;

static bool is_eos(const cpm_model_info *in, int32_t t) {
    for (int i = 0; i < in->n_eos; i++)
        if (in->eos_ids[i] == t)
            return true;
    return false;
}

/* Feeds prompt tokens; leaves the last prompt row's logits in st->logits[0..V). */
static int prefill(gen_state *st, const int32_t *prompt, int n, const cpm_generate_opts *o,
                   cpm_error *err) {
    bool all_rows = o->on_prompt_logits != NULL;
    for (int at = 0; at < n; at += st->max_batch) {
        int c = n - at < st->max_batch ? n - at : st->max_batch;
        for (int i = 0; i < c; i++) {
            st->seqs[i] = st->seq;
            st->pos[i] = at + i;
            st->want[i] = all_rows || at + i == n - 1;
        }
        cpm_batch b = {.n_tokens = c, .ids = prompt + at, .seq = st->seqs, .pos = st->pos,
                       .want = st->want};
        int rc = cpm_model_forward(st->m, st->kv, &b, st->logits, err);
        if (rc)
            return rc;
        for (int i = 0; all_rows && i < c; i++)
            if (o->on_prompt_logits(st->logits + (size_t)i * st->V, st->V, o->ctx))
                return cpm_error_set(err, CPM_EIO, "prompt logits consumer failed");
        if (all_rows && at + c == n) /* move the last row to the front */
            for (int j = 0; j < st->V; j++)
                st->logits[j] = st->logits[(size_t)(c - 1) * st->V + j];
    }
    return 0;
}

static int decode(gen_state *st, int n_prompt, const cpm_generate_opts *o,
                  cpm_generate_stats *stats, cpm_error *err) {
    const cpm_model_info *in = cpm_model_get_info(st->m);
    cpm_sampler *smp = cpm_sampler_new(st->V, &o->sampling, err);
    if (!smp)
        return err ? err->code : CPM_EINVAL;
    int rc = 0, n_hist = n_prompt;
    double t0 = cpm_now_seconds();
    stats->finish = "length";
    for (int g = 0; g < o->max_new_tokens; g++) {
        int32_t tok = cpm_sampler_sample(smp, st->logits, st->history, (size_t)n_hist, NULL);
        st->history[n_hist++] = tok;
        stats->generated_tokens++;
        if (o->on_token && o->on_token(tok, o->ctx)) {
            stats->finish = "abort";
            break;
        }
        if (!o->ignore_eos && is_eos(in, tok)) {
            stats->finish = "stop";
            break;
        }
        if (g + 1 == o->max_new_tokens)
            break; /* the last token needs no forward pass */
        int32_t pos = n_hist - 1;
        cpm_batch b = {.n_tokens = 1, .ids = &tok, .seq = &st->seq, .pos = &pos};
        if ((rc = cpm_model_forward(st->m, st->kv, &b, st->logits, err)))
            break;
    }
    stats->decode_seconds = cpm_now_seconds() - t0;
    cpm_sampler_free(smp);
    return rc;
}

int cpm_generate(cpm_model *m, const int32_t *prompt, int n_prompt, const cpm_generate_opts *o,
                 cpm_generate_stats *ret_stats, cpm_error *err) {
    const cpm_model_info *in = cpm_model_get_info(m);
    cpm_generate_stats stats = {.prompt_tokens = n_prompt};
    if (n_prompt < 1)
        return cpm_error_set(err, CPM_EINVAL, "the prompt is empty");
    if (!in->first_stage || !in->last_stage)
        return cpm_error_set(err, CPM_EINVAL, "generation needs a model with every layer");
    int total = n_prompt + (o->max_new_tokens > 0 ? o->max_new_tokens : 0);
    gen_state st = {.m = m, .V = in->vocab_size, .max_batch = in->max_batch_tokens};
    if (st.max_batch > n_prompt)
        st.max_batch = n_prompt;
    int rc = CPM_ENOMEM;
    cpm_kv_geometry geo = cpm_model_kv_geometry(m);
    geo.dtype = o->kv_dtype;
    st.kv = cpm_kv_cache_new(&geo, total, 1, err);
    st.logits = malloc((size_t)st.max_batch * (size_t)st.V * sizeof(float));
    st.history = malloc((size_t)total * sizeof(int32_t));
    st.seqs = malloc((size_t)st.max_batch * sizeof(int32_t));
    st.pos = malloc((size_t)st.max_batch * sizeof(int32_t));
    st.want = malloc((size_t)st.max_batch);
    if (!st.kv || !st.logits || !st.history || !st.seqs || !st.pos || !st.want) {
        if (st.kv)
            cpm_error_set(err, CPM_ENOMEM, "generate: out of memory");
        goto out;
    }
    st.seq = cpm_kv_cache_seq_new(st.kv, err);
    for (int i = 0; i < n_prompt; i++)
        st.history[i] = prompt[i];
    double t0 = cpm_now_seconds();
    if ((rc = prefill(&st, prompt, n_prompt, o, err)))
        goto out;
    stats.prefill_seconds = cpm_now_seconds() - t0;
    rc = decode(&st, n_prompt, o, &stats, err);
out:
    if (ret_stats)
        *ret_stats = stats;
    cpm_kv_cache_free(st.kv);
    free(st.logits);
    free(st.history);
    free(st.seqs);
    free(st.pos);
    free(st.want);
    return rc;
}
