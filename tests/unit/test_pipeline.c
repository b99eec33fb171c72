/* test_pipeline.c - router/pipeline.c with in-memory stages and sampler: prefill and
 * decode rows go out as micro-batches, sampled tokens come back in order, a replica
 * that goes down moves its sequence (prompt + generated tokens) to the other replica
 * and generation continues at the same sampler step, and failed, timed-out or
 * mis-sampled steps end their jobs with exactly one final answer. The text flow is the
 * real one, on token-id jobs (no tokenizer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "router/pipeline.h"
#include "router/textflow.h"
#include "support/job_sink.h"

static const char two_replicas[] =
    "version: 1\nmodel: m\nrouter:\n  rpc: tcp://127.0.0.1:5750\n  results: tcp://127.0.0.1:5751\n"
    "  micro_batches: 2\n  max_queue: 8\n"
    "tokenizers:\n  - endpoint: tcp://127.0.0.1:5760\n"
    "samplers:\n  - endpoint: tcp://127.0.0.1:5770\n"
    "stages:\n"
    "  - {layers: [0, end], endpoint: 'tcp://127.0.0.1:5780', pipeline: 0}\n"
    "  - {layers: [0, end], endpoint: 'tcp://127.0.0.1:5790', pipeline: 1}\n";

/* A micro-batch as stage 0 received it. */
typedef struct sent {
    int replica;
    uint64_t step;
    int n_rows;
    uint64_t seq[64];
    uint32_t pos[64];
    int32_t ids[64];
    int attached; /* prefix blocks the batch attaches (all its sequences) */
} sent;

typedef struct fixture {
    cpm_config *cfg;
    cpm_metrics m;
    cpm_jobs *jobs;
    cpm_pipeline *p;
    cpm_textflow *tf;
    sent fw[64];
    int n_fw, fw_read;
    cpm_sample_call *call; /* the sample call waiting for a reply */
    uint32_t call_step;    /* its first row's sampler step */
    int call_rows;
    /* its first row's constraint and history length */
    int cons_kind;
    char cons_schema[256];
    bool cons_single;
    uint32_t cons_left;
    int n_history;
} fixture;

static int fake_forward(void *ud, int replica, Cpm__V1__Envelope *env, cpm_error *err) {
    (void)err;
    fixture *f = ud;
    const Cpm__V1__StageForward *fw = env->forward;
    assert_int_equal(env->body_case, CPM__V1__ENVELOPE__BODY_FORWARD);
    assert_true(f->n_fw < 64 && fw->n_seq <= 64);
    sent *s = &f->fw[f->n_fw++];
    *s = (sent){.replica = replica, .step = fw->step, .n_rows = (int)fw->n_seq};
    for (size_t i = 0; i < fw->n_attach; i++)
        s->attached += (int)fw->attach[i]->n_hash;
    memcpy(s->seq, fw->seq, fw->n_seq * sizeof *s->seq);
    memcpy(s->pos, fw->pos, fw->n_seq * sizeof *s->pos);
    memcpy(s->ids, fw->ids, fw->n_seq * sizeof *s->ids);
    return 0;
}

static int fake_sample(void *ud, Cpm__V1__Envelope *env, cpm_payload *logits,
                       cpm_sample_call *call, cpm_error *err) {
    (void)err;
    fixture *f = ud;
    if (logits->free_fn) /* consumed, as the socket does once zmq has sent it */
        logits->free_fn(logits->data, logits->hint);
    assert_null(f->call);
    f->call = call;
    f->call_rows = (int)env->sample->n_rows;
    f->call_step = env->sample->rows[0]->step;
    const Cpm__V1__Constraint *c = env->sample->rows[0]->constraint;
    f->cons_kind = c ? (int)c->kind : -1;
    snprintf(f->cons_schema, sizeof f->cons_schema, "%s", c && c->schema ? c->schema : "");
    f->cons_single = c && c->single_call;
    f->cons_left = c ? c->tokens_left : 0;
    f->n_history = (int)env->sample->rows[0]->n_history;
    return 0;
}

static void on_token(void *ud, cpm_gen *g, bool stop_id, const char *end) {
    cpm_textflow_token(((fixture *)ud)->tf, g, stop_id, end);
}

static void on_release(void *ud, cpm_gen *g) {
    cpm_pipeline_release(((fixture *)ud)->p, g);
}

static int no_detok(void *ud, const int32_t *ids, size_t n, size_t prefix, bool skip_special,
                    cpm_tokc_cb cb, void *cb_ud, cpm_error *err) {
    (void)ud, (void)ids, (void)n, (void)prefix, (void)skip_special, (void)cb, (void)cb_ud;
    return cpm_error_set(err, CPM_EINTERNAL, "token-id jobs never detokenize");
}

static void kick(void *ud) {
    cpm_pipeline_pump(((fixture *)ud)->p);
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    cpm_error e = {0};
    if (cpm_config_parse(two_replicas, strlen(two_replicas), "test", &f->cfg, &e))
        fail_msg("%s", e.msg);
    cpm_jobs_hooks jh = {.ud = f, .release = on_release};
    cpm_pipeline_io pio = {.ud = f, .forward = fake_forward, .sample = fake_sample,
                           .token = on_token};
    cpm_textflow_io tio = {.ud = f, .detok = no_detok, .pieces = NULL, .kick = kick};
    f->jobs = cpm_jobs_new(&f->m, &jh);
    f->tf = cpm_textflow_new(&tio, &f->m);
    assert_int_equal(cpm_pipeline_new(f->cfg, 2, f->jobs, NULL, &f->m, &pio, &f->p, &e), 0);
    int32_t eos[] = {2};
    Cpm__V1__ModelInfo mi = CPM__V1__MODEL_INFO__INIT;
    mi.vocab_size = 100;
    mi.max_position = 64;
    mi.n_eos_ids = 1;
    mi.eos_ids = eos;
    assert_null(cpm_pipeline_model(f->p));
    assert_int_equal(cpm_pipeline_set_model(f->p, &mi, "m"), 0);
    assert_int_equal(cpm_pipeline_model(f->p)->vocab_size, 100);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    assert_int_equal(cpm_jobs_count(f->jobs), 0);
    cpm_sched_stats st;
    cpm_pipeline_stats(f->p, &st);
    assert_int_equal(st.live + st.queued, 0); /* every sequence left its scheduler */
    cpm_pipeline_free(f->p);
    cpm_textflow_free(f->tf);
    cpm_jobs_free(f->jobs);
    cpm_config_free(f->cfg);
    free(f);
    return 0;
}

/* A running token-id job of one gen with prompt ids[0 .. n), in the pipeline. */
static cpm_job *start_job_ids(fixture *f, rec *r, const int32_t *ids, int n, int max_new) {
    cpm_job *j = cpm_job_new(f->jobs, CPM_EP_RPC, "cmpl", &rec_sink, r);
    assert_int_equal(cpm_job_init_gens(j, 1, 1), 0);
    j->stream = true;
    j->prompt_ids[0] = malloc((size_t)n * sizeof(int32_t));
    memcpy(j->prompt_ids[0], ids, (size_t)n * sizeof(int32_t));
    j->prompt_len[0] = n;
    cpm_gen *g = &j->gens[0];
    g->max_new = max_new;
    g->ids = calloc((size_t)max_new, sizeof *g->ids);
    g->stopper = cpm_stopper_new(NULL, 0, false);
    cpm_error e = {0};
    assert_int_equal(cpm_pipeline_add(f->p, g, j->prompt_ids[0], n, &e), 0);
    assert_int_equal(cpm_req_transition(&g->state, CPM_REQ_PREFILLING), 0);
    assert_int_equal(cpm_job_transition(j, CPM_JOB_RUNNING), 0);
    cpm_pipeline_pump(f->p);
    return j;
}

/* A running token-id job of one gen with prompt 10 11 12, in the pipeline. */
static cpm_job *start_job(fixture *f, rec *r, int max_new) {
    return start_job_ids(f, r, (const int32_t[]){10, 11, 12}, 3, max_new);
}

/* The next micro-batch stage 0 got. */
static const sent *next_batch(fixture *f) {
    assert_true(f->fw_read < f->n_fw);
    return &f->fw[f->fw_read++];
}

/* The next micro-batch with rows (releases of finished sequences may go out alone). */
static const sent *next_rows(fixture *f) {
    const sent *b = next_batch(f);
    while (b->n_rows == 0)
        b = next_batch(f);
    return b;
}

/* The last stage's logits for every row of batch b. */
static void result_ok(fixture *f, const sent *b) {
    uint32_t shape[2] = {1, 100};
    Cpm__V1__TensorDesc desc = CPM__V1__TENSOR_DESC__INIT;
    desc.dtype = CPM__V1__DTYPE__DTYPE_F32;
    desc.n_shape = 2;
    desc.shape = shape;
    Cpm__V1__StageResult res = CPM__V1__STAGE_RESULT__INIT;
    res.step = b->step;
    res.n_seq = 1;
    res.seq = (uint64_t *)&b->seq[b->n_rows - 1];
    res.logits = &desc;
    cpm_payload logits = {0};
    cpm_pipeline_on_result(f->p, &res, &logits);
}

/* Stage 0's error (code, message) for batch b. */
static void result_error(fixture *f, const sent *b, int code, const char *msg) {
    Cpm__V1__Error err = CPM__V1__ERROR__INIT;
    err.code = code;
    err.message = (char *)msg;
    err.service = "stage0";
    Cpm__V1__StageResult res = CPM__V1__STAGE_RESULT__INIT;
    res.step = b->step;
    res.error = &err;
    cpm_payload none = {0};
    cpm_pipeline_on_result(f->p, &res, &none);
}

/* The sampler's answer to the waiting call: token id for its one row. */
static void sampled(fixture *f, int32_t id) {
    Cpm__V1__SampledToken t = CPM__V1__SAMPLED_TOKEN__INIT, *tp = &t;
    t.id = id;
    Cpm__V1__SampleReply sr = CPM__V1__SAMPLE_REPLY__INIT;
    sr.n_tokens = 1;
    sr.tokens = &tp;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLED;
    env.sampled = &sr;
    cpm_sample_call *call = f->call;
    f->call = NULL;
    cpm_pipeline_sampled(call, &env, 0);
}

/* One decode step on the batch just sent: its result, then token id. */
static void step(fixture *f, int32_t id) {
    result_ok(f, next_batch(f));
    assert_non_null(f->call);
    sampled(f, id);
}

static void test_prefill_then_decode(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = start_job(f, &r, 3);
    const sent *b = &f->fw[0];
    assert_int_equal(b->n_rows, 3); /* the whole prompt in one micro-batch */
    assert_int_equal(b->ids[2], 12);
    assert_int_equal(b->pos[2], 2);
    step(f, 50);
    assert_int_equal(f->call_step, 0);
    b = &f->fw[1];
    assert_int_equal(b->n_rows, 1); /* then one decode row: the token just sampled */
    assert_int_equal(b->ids[0], 50);
    assert_int_equal(b->pos[0], 3);
    assert_int_equal(r.gens[0].upto, 1);
    step(f, 51);
    assert_int_equal(f->call_step, 1);
    step(f, 52); /* the third token: length */
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(r.gens[0].upto, 3);
    assert_string_equal(r.gens[0].finish, "length");
    assert_int_equal(f->m.generation_tokens, 3);
    (void)j;
}

/* A job's constraint (response_format, tool_choice) is on every row of its gens, with
 * the tokens it may still generate and the history the sampler reads the text from. */
static void test_constraint_on_rows(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = start_job(f, &r, 3);
    step(f, 50);
    assert_int_equal(f->cons_kind, -1); /* none: no constraint, no history */
    assert_int_equal(f->n_history, 0);
    j->constraint_kind = CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS;
    j->constraint_schema = "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]";
    j->constraint_single = true;
    step(f, 51);
    assert_int_equal(f->cons_kind, CPM__V1__CONSTRAINT_KIND__CONSTRAINT_TOOL_CALLS);
    assert_string_equal(f->cons_schema, j->constraint_schema);
    assert_true(f->cons_single);
    assert_int_equal(f->cons_left, 2); /* max 3, one generated: this one and one more */
    assert_int_equal(f->n_history, 4);  /* prompt 10 11 12 and 50 */
    step(f, 52);
    assert_int_equal(f->cons_left, 1);
    assert_int_equal(r.dones, 1);
}

/* Replica 0 dies after two tokens: the sequence moves to replica 1 with its whole
 * history, which is prefilled again, and the next draw is the sampler's step 2. */
static void test_failover_moves_history(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = start_job(f, &r, 4);
    cpm_job_hold(j);
    cpm_gen *g = &j->gens[0];
    step(f, 50);
    step(f, 51);
    int from = f->fw[f->fw_read].replica; /* the decode step in flight */
    cpm_pipeline_replica_down(f->p, from, "stage0 stopped answering");
    const sent *b = next_batch(f); /* the lost step */
    assert_int_equal(b->replica, from);
    b = next_batch(f);
    assert_int_not_equal(b->replica, from);
    assert_int_equal(b->n_rows, 5); /* prompt + both tokens */
    int32_t want[] = {10, 11, 12, 50, 51};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(b->ids[i], want[i]);
        assert_int_equal(b->pos[i], (uint32_t)i);
    }
    assert_int_equal(f->m.failovers, 1);
    assert_int_equal(g->failovers, 1);
    f->fw_read--;
    step(f, 53);
    assert_int_equal(f->call_step, 2); /* the sampler continues where it was */
    step(f, 54);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(g->n_gen, 4);
    assert_int_equal(g->ids[2], 53);
    cpm_job_drop(j);
}

/* A stage of the only serving replica restarted between two polls: its caches are gone,
 * so the sequence starts again there with its whole history, at the same sampler step. */
static void test_restart_reprefills_in_place(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = start_job(f, &r, 4);
    cpm_job_hold(j);
    step(f, 50);
    int k = f->fw[f->fw_read].replica;
    cpm_pipeline_replica_down(f->p, k == 0 ? 1 : 0, "the other one is down");
    cpm_pipeline_replica_restarted(f->p, k, "pipeline stage stage1 restarted");
    next_batch(f); /* the lost step */
    const sent *b = next_batch(f);
    assert_int_equal(b->replica, k);
    assert_int_equal(b->n_rows, 4); /* prompt + the token */
    assert_int_equal(b->ids[3], 50);
    assert_int_equal(j->gens[0].failovers, 1); /* moved once, not twice */
    f->fw_read--;
    step(f, 51);
    assert_int_equal(f->call_step, 1);
    step(f, 52);
    step(f, 53);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.finals, 1);
    cpm_job_drop(j);
}

/* An expert service every stage needs is gone: each placed job fails once, now. */
static void test_fail_all(void **state) {
    fixture *f = *state;
    rec a = {0}, b = {0};
    start_job(f, &a, 4);
    start_job(f, &b, 4);
    cpm_pipeline_fail_all(f->p, "expert service expert1 stopped answering");
    assert_int_equal(a.fails, 1);
    assert_int_equal(b.fails, 1);
    assert_string_equal(b.last_msg, "expert service expert1 stopped answering");
    cpm_pipeline_fail_all(f->p, "again");
    assert_int_equal(a.finals + b.finals, 2);
    while (f->fw_read < f->n_fw) { /* the steps still come back, and are dropped */
        const sent *batch = next_batch(f);
        if (batch->n_rows == 0)
            continue;
        result_ok(f, batch);
        if (f->call)
            sampled(f, 1);
    }
}

/* A late result of the lost step changes nothing. */
static void test_late_result_ignored(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 2);
    const sent *lost = next_batch(f);
    cpm_pipeline_replica_down(f->p, lost->replica, "gone");
    result_ok(f, lost);
    assert_null(f->call);
    step(f, 60);
    step(f, 61);
    assert_int_equal(r.dones, 1);
}

/* With no replica to move to, a failed step fails its job once. */
static void test_failed_step_fails_job(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 4);
    cpm_pipeline_replica_down(f->p, f->fw[0].replica == 0 ? 1 : 0, "the other one is down");
    const sent *b = next_batch(f);
    result_error(f, b, 0, "out of KV blocks");
    assert_int_equal(r.fails, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(r.last_status, 503);
    assert_string_equal(r.last_code, "pipeline_error");
    assert_string_equal(r.last_msg, "stage0: out of KV blocks");
}

static void test_step_timeout(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 4);
    cpm_pipeline_replica_down(f->p, f->fw[0].replica == 0 ? 1 : 0, "down");
    nanosleep(&(struct timespec){0, 3000000}, NULL);
    cpm_pipeline_check_timeouts(f->p, 60000);
    assert_int_equal(r.finals, 0);
    cpm_pipeline_check_timeouts(f->p, 1);
    assert_int_equal(r.fails, 1);
    assert_string_equal(r.last_msg, "pipeline step timed out");
}

/* A sequence moves at most CPM_PIPELINE_MAX_FAILOVERS times; then its job fails. */
static void test_failover_limit(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 4);
    for (int k = 0; k <= CPM_PIPELINE_MAX_FAILOVERS; k++) {
        const sent *b = &f->fw[f->n_fw - 1];
        cpm_pipeline_replica_up(f->p, b->replica == 0 ? 1 : 0);
        cpm_pipeline_replica_down(f->p, b->replica, "flapping");
    }
    assert_int_equal(f->m.failovers, CPM_PIPELINE_MAX_FAILOVERS);
    assert_int_equal(r.fails, 1);
    assert_int_equal(r.finals, 1);
}

/* A sampler that times out or is lost: the same rows go to another sampler, at the
 * same step, and the token that comes back is taken. */
static void test_sampler_lost_retried(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 1);
    result_ok(f, next_batch(f));
    cpm_sample_call *call = f->call;
    f->call = NULL;
    cpm_pipeline_sampled(call, NULL, CPM_ECLOSED);
    assert_non_null(f->call); /* asked again */
    assert_int_equal(f->call_step, 0);
    assert_int_equal(f->m.retries, 1);
    assert_int_equal(r.finals, 0);
    sampled(f, 50);
    assert_int_equal(r.dones, 1);
    assert_int_equal(f->m.generation_tokens, 1);
}

/* Every attempt timed out: the job fails once. */
static void test_sampler_attempts_run_out(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 4);
    result_ok(f, next_batch(f));
    for (int k = 0; k < CPM_PIPELINE_SAMPLE_ATTEMPTS; k++) {
        cpm_sample_call *call = f->call;
        assert_non_null(call);
        f->call = NULL;
        cpm_pipeline_sampled(call, NULL, CPM_ETIMEDOUT);
    }
    assert_null(f->call);
    assert_int_equal(f->m.retries, CPM_PIPELINE_SAMPLE_ATTEMPTS - 1);
    assert_int_equal(r.fails, 1);
    assert_string_equal(r.last_code, "sampler_error");
}

/* A sampler that answers with an error is not asked again: the rows are at fault. */
static void test_sampler_error_not_retried(void **state) {
    fixture *f = *state;
    rec r = {0};
    start_job(f, &r, 4);
    result_ok(f, next_batch(f));
    Cpm__V1__Error err = CPM__V1__ERROR__INIT;
    err.code = CPM_ERANGE;
    err.message = "sample.rows[0]: logits are NaN, +inf or all -inf";
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_ERROR;
    env.error = &err;
    cpm_sample_call *call = f->call;
    f->call = NULL;
    cpm_pipeline_sampled(call, &env, 0);
    assert_null(f->call);
    assert_int_equal(r.fails, 1);
    assert_string_equal(r.last_msg, "sampler: sample.rows[0]: logits are NaN, +inf or all -inf");
}

/* A row cancelled while its step was out is sampled and dropped. */
static void test_cancelled_row_dropped(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = start_job(f, &r, 4);
    cpm_job_cancel(j);
    result_ok(f, next_batch(f)); /* the step's result still comes */
    if (f->call)
        sampled(f, 70);
    assert_int_equal(r.cancels, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(f->m.generation_tokens, 0);
}

/* Prefix caching: a prompt seen before starts after its cached blocks, on the replica that
 * holds them; when a stage says one is gone (CPM_ESTALE) the request starts over from its
 * first token without spending one of its failovers, and ends normally. */
static void test_stale_prefix_starts_over(void **state) {
    fixture *f = *state;
    int32_t prompt[40];
    for (int i = 0; i < 40; i++)
        prompt[i] = 10 + i;
    rec r1 = {0}, r2 = {0};
    start_job_ids(f, &r1, prompt, 40, 2);
    const sent *b = next_batch(f);
    int home = b->replica;
    assert_int_equal(b->n_rows, 40);
    assert_int_equal(b->attached, 0);
    result_ok(f, b);
    sampled(f, 50);
    step(f, 51);
    assert_int_equal(r1.dones, 1);
    start_job_ids(f, &r2, prompt, 40, 2);
    b = next_rows(f);
    assert_int_equal(b->replica, home);   /* where the prefix is */
    assert_int_equal(b->attached, 2);     /* blocks 0 and 1 */
    assert_int_equal(b->pos[0], 32);
    result_error(f, b, CPM_ESTALE, "kv cache: prefix block 1 of 2 is not cached");
    assert_int_equal(r2.fails, 0);
    assert_int_equal(f->m.prefix_misses, 1);
    assert_int_equal(f->m.failovers, 0);
    b = next_rows(f);                     /* from the first token, nothing attached */
    assert_int_equal(b->pos[0], 0);
    assert_int_equal(b->n_rows, 40);
    assert_int_equal(b->attached, 0);
    result_ok(f, b);
    sampled(f, 50);
    step(f, 51);
    assert_int_equal(r2.dones, 1);
    assert_int_equal(r2.finals, 1);
}

int main(void) {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_prefill_then_decode),        T(test_failover_moves_history),
        T(test_late_result_ignored),        T(test_restart_reprefills_in_place),
        T(test_fail_all),                   T(test_failed_step_fails_job),
        T(test_step_timeout),               T(test_failover_limit),
        T(test_sampler_lost_retried),       T(test_sampler_attempts_run_out),
        T(test_sampler_error_not_retried),  T(test_cancelled_row_dropped),
        T(test_constraint_on_rows),         T(test_stale_prefix_starts_over),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
