/* test_stage.c - one pipeline stage (the whole model) on a libuv loop with real sockets:
 * the test plays the router (forward in, result out). Greedy decoding by argmax of the
 * returned logits must give the reference continuation; releases, rewinds and bad
 * batches give one result each, errors included. argv[1] = golden model directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/transport.h"
#include "shard/stage.h"

static const char *model_dir;
static int first_layer; /* of the stage under test: 0 = the whole model */

typedef struct fx {
    uv_loop_t loop;
    void *z;
    cpm_stage *st;
    cpm_sock *results, *to_stage;
    bool ready;
    int load_status;
    cpm_inmsg *last; /* the last result received */
} fx;

static void on_ready(cpm_stage *st, int status, const cpm_error *err, void *user) {
    (void)st;
    (void)err;
    fx *f = user;
    f->ready = true;
    f->load_status = status;
}

static void on_result(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    fx *f = user;
    cpm_inmsg_free(f->last);
    f->last = m;
}

static void on_ignore(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    (void)user;
    cpm_inmsg_free(m);
}

static void run_until(fx *f, bool *flag, int ms) {
    uint64_t end = uv_hrtime() + (uint64_t)ms * 1000000u;
    while (!*flag && uv_hrtime() < end)
        uv_run(&f->loop, UV_RUN_NOWAIT);
}

static cpm_dtype kv_dtype = CPM_DTYPE_F32; /* set by setup_kv_f16 for one test */

static int setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    uv_loop_init(&f->loop);
    f->z = zmq_ctx_new();
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_ROUTER, NULL, on_result, f, &f->results, NULL), 0);
    assert_int_equal(cpm_sock_bind(f->results, "inproc://results", NULL), 0);
    cpm_stage_opts o = cpm_stage_opts_default();
    o.model_dir = model_dir;
    o.layer_begin = first_layer;
    o.bind = "inproc://stage0";
    o.next = "inproc://results";
    o.max_seqs = 4;
    o.kv_tokens = 1024;
    o.max_batch_tokens = 7; /* smaller than the prompt: exercises chunking */
    o.kv_dtype = kv_dtype;
    cpm_error e = {0};
    if (cpm_stage_new(&f->loop, f->z, &o, on_ready, f, &f->st, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_DEALER, NULL, on_ignore, f, &f->to_stage, NULL), 0);
    assert_int_equal(cpm_sock_connect(f->to_stage, "inproc://stage0", NULL), 0);
    run_until(f, &f->ready, 30000);
    assert_true(f->ready);
    assert_int_equal(f->load_status, 0);
    *state = f;
    return 0;
}

/* The stage with an f16 KV cache (cluster key stages[].kv_dtype: f16): greedy
 * tokens still equal the reference (the golden set's margins exceed f16's error). */
static int setup_kv_f16(void **state) {
    kv_dtype = CPM_DTYPE_F16;
    int rc = setup(state);
    kv_dtype = CPM_DTYPE_F32;
    return rc;
}

static int teardown(void **state) {
    fx *f = *state;
    cpm_inmsg_free(f->last);
    cpm_sock_free(f->to_stage);
    cpm_sock_free(f->results);
    cpm_stage_free(f->st);
    for (int i = 0; i < 10; i++)
        uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    zmq_ctx_term(f->z);
    free(f);
    return 0;
}

/* Sends fw to the stage and waits for its result. */
static const Cpm__V1__StageResult *send_forward(fx *f, Cpm__V1__StageForward *fw) {
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
    env.forward = fw;
    cpm_inmsg_free(f->last);
    f->last = NULL;
    assert_int_equal(cpm_sock_send(f->to_stage, NULL, &env, NULL, NULL), 0);
    uint64_t end = uv_hrtime() + 30000000000ull;
    while (!f->last && uv_hrtime() < end)
        uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_non_null(f->last);
    assert_int_equal(f->last->env->body_case, CPM__V1__ENVELOPE__BODY_RESULT);
    assert_int_equal(f->last->env->result->step, fw->step);
    return f->last->env->result;
}

/* Sends one micro-batch and waits for its result. */
static const Cpm__V1__StageResult *step(fx *f, uint64_t stepno, int n, const uint64_t *seq,
                                        const uint32_t *pos, const int32_t *ids, const int *want,
                                        int n_release, const uint64_t *release) {
    Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
    protobuf_c_boolean w[1024];
    for (int i = 0; i < n; i++)
        w[i] = want ? want[i] : 1;
    fw.step = stepno;
    fw.n_seq = fw.n_pos = fw.n_ids = fw.n_want = (size_t)n;
    fw.seq = (uint64_t *)seq;
    fw.pos = (uint32_t *)pos;
    fw.ids = (int32_t *)ids;
    fw.want = w;
    fw.n_release = (size_t)n_release;
    fw.release = (uint64_t *)release;
    return send_forward(f, &fw);
}

static int argmax(const float *row, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (row[i] > row[best])
            best = i;
    return best;
}

static int read_ids(const char *name, int32_t *ids, int max) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", model_dir, name);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    int n = 0;
    while (n < max && fscanf(fp, "%d", &ids[n]) == 1)
        n++;
    fclose(fp);
    return n;
}

static void test_greedy_matches_reference(void **state) {
    fx *f = *state;
    int32_t ids[256], ref[64];
    int n = read_ids("ids.txt", ids, 256), n_ref = read_ids("ref_greedy.txt", ref, 64);
    uint64_t seq[256];
    uint32_t pos[256];
    int want[256] = {0};
    for (int i = 0; i < n; i++) {
        seq[i] = 42;
        pos[i] = (uint32_t)i;
    }
    want[n - 1] = 1;
    const Cpm__V1__StageResult *r = step(f, 1, n, seq, pos, ids, want, 0, NULL);
    if (r->error)
        fail_msg("%s", r->error->message);
    assert_int_equal(r->n_seq, 1);
    int vocab = (int)r->logits->shape[1];
    int32_t tok = argmax(f->last->tensor, vocab);
    for (int t = 0; t < n_ref; t++) {
        assert_int_equal(tok, ref[t]);
        uint64_t s = 42;
        uint32_t p = (uint32_t)(n + t);
        r = step(f, 2 + (uint64_t)t, 1, &s, &p, &tok, NULL, 0, NULL);
        if (r->error)
            fail_msg("step %d: %s", t, r->error->message);
        tok = argmax(f->last->tensor, vocab);
    }
    cpm_stage_stats st;
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.live_seqs, 1);
    assert_true(st.kv_used > 0);
    /* A release-only micro-batch frees the sequence and still yields one (empty) result. */
    uint64_t rel = 42;
    r = step(f, 100, 0, NULL, NULL, NULL, NULL, 1, &rel);
    assert_null(r->error);
    assert_int_equal(r->n_seq, 0);
    assert_null(f->last->tensor);
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.live_seqs, 0);
    assert_int_equal(st.kv_used, 0);
}

/* Rewinding a sequence to position 0 (a re-prefill) gives the same logits again. */
static void test_rewind_repeats(void **state) {
    fx *f = *state;
    int32_t ids[4] = {1, 7, 42, 100};
    uint64_t seq[4] = {9, 9, 9, 9};
    uint32_t pos[4] = {0, 1, 2, 3};
    int want[4] = {0, 0, 0, 1};
    const Cpm__V1__StageResult *r = step(f, 1, 4, seq, pos, ids, want, 0, NULL);
    assert_null(r->error);
    size_t bytes = f->last->tensor_size;
    float *first = malloc(bytes);
    memcpy(first, f->last->tensor, bytes);
    r = step(f, 2, 4, seq, pos, ids, want, 0, NULL);
    assert_null(r->error);
    assert_memory_equal(first, f->last->tensor, bytes);
    free(first);
}

static void test_bad_batches_give_error_results(void **state) {
    fx *f = *state;
    uint64_t seq[2] = {5, 5};
    uint32_t pos[2] = {3, 4};
    int32_t ids[2] = {1, 2};
    const Cpm__V1__StageResult *r = step(f, 7, 1, seq, pos, ids, NULL, 0, NULL);
    assert_non_null(r->error);
    assert_non_null(strstr(r->error->message, "unknown here"));
    pos[0] = 0;
    pos[1] = 2; /* a gap inside one batch */
    r = step(f, 8, 2, seq, pos, ids, NULL, 0, NULL);
    assert_non_null(r->error);
    assert_non_null(strstr(r->error->message, "position 2 after 0"));
    ids[0] = 1 << 30;
    pos[1] = 1;
    r = step(f, 9, 2, seq, pos, ids, NULL, 0, NULL);
    assert_non_null(r->error);
    assert_non_null(strstr(r->error->message, "outside vocab"));
    /* max_seqs = 4 and seq 5 is live (its first row ran its mapping): three more fit,
     * the next is refused, naming the limit. */
    int32_t one = 1;
    uint32_t zero = 0;
    for (uint64_t s = 10; s < 13; s++) {
        r = step(f, 10 + s, 1, &s, &zero, &one, NULL, 0, NULL);
        assert_null(r->error);
    }
    r = step(f, 30, 1, (uint64_t[]){13}, &zero, &one, NULL, 0, NULL);
    assert_non_null(r->error);
    assert_non_null(strstr(r->error->message, "sequences already live"));
    /* The stage still serves after all of that. */
    uint64_t rel[] = {5, 10, 11, 12, 13};
    r = step(f, 40, 1, (uint64_t[]){20}, &zero, &one, NULL, 5, rel);
    assert_null(r->error);
}

/* Steady state allocates nothing: a prefill within max_batch_tokens and decode steps
 * use the buffers sized at load. A micro-batch over the limits still runs, on a one-off
 * (counted) allocation: a 24-row prefill grows the row scratch once; a last-stage
 * output wanting more rows than max_seqs gets a one-off tensor, whose last row equals
 * the pooled run's. */
static void test_buffers_sized_at_load(void **state) {
    fx *f = *state;
    int32_t ids[24];
    uint64_t seq[24];
    uint32_t pos[24];
    int want[24] = {0};
    for (int i = 0; i < 24; i++) {
        ids[i] = 100 + 3 * i;
        seq[i] = 77;
        pos[i] = (uint32_t)i;
    }
    want[6] = 1;
    const Cpm__V1__StageResult *r = step(f, 1, 7, seq, pos, ids, want, 0, NULL);
    assert_null(r->error);
    int vocab = (int)r->logits->shape[1];
    int32_t tok = argmax(f->last->tensor, vocab);
    for (int t = 0; t < 20; t++) {
        uint32_t p = (uint32_t)(7 + t);
        r = step(f, 2 + (uint64_t)t, 1, seq, &p, &tok, NULL, 0, NULL);
        assert_null(r->error);
        tok = argmax(f->last->tensor, vocab);
    }
    cpm_stage_stats st;
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.batches, 21);
    assert_int_equal(st.out_allocs, 0);

    want[6] = 0;
    want[23] = 1;
    for (int k = 0; k < 2; k++) { /* rewinds to 0 each time */
        r = step(f, 30 + (uint64_t)k, 24, seq, pos, ids, want, 0, NULL);
        assert_null(r->error);
    }
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.out_allocs, 1);
    float *last = malloc((size_t)vocab * sizeof *last);
    memcpy(last, f->last->tensor, (size_t)vocab * sizeof *last);

    r = step(f, 40, 24, seq, pos, ids, NULL, 0, NULL); /* every row: 24 > max_seqs rows */
    assert_null(r->error);
    assert_int_equal(r->n_seq, 24);
    assert_int_equal(f->last->tensor_size, (size_t)24 * (size_t)vocab * sizeof(float));
    assert_memory_equal(last, (const float *)f->last->tensor + (size_t)23 * (size_t)vocab,
                        (size_t)vocab * sizeof *last);
    free(last);
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.out_allocs, 2);
}

static int setup_last(void **state) {
    first_layer = 1;
    int rc = setup(state);
    first_layer = 0;
    return rc;
}

static int hidden_size(void) {
    char path[1024], text[8192];
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    size_t n = fread(text, 1, sizeof text - 1, fp);
    fclose(fp);
    text[n] = '\0';
    const char *at = strstr(text, "\"hidden_size\"");
    assert_non_null(at);
    return atoi(strchr(at, ':') + 1);
}

static void no_free(void *data, void *hint) {
    (void)data;
    (void)hint;
}

/* Sends rows of activations to a later stage from `hidden`, zero-copy (inproc hands the
 * receiver this very address) when zero_copy. */
static const Cpm__V1__StageResult *step_hidden(fx *f, uint64_t stepno, int n, const float *hidden, int cols,
                                               bool zero_copy) {
    uint64_t seq[8];
    uint32_t pos[8], shape[2] = {(uint32_t)n, (uint32_t)cols};
    for (int i = 0; i < n; i++) {
        seq[i] = 3;
        pos[i] = (uint32_t)i;
    }
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    d.dtype = CPM__V1__DTYPE__DTYPE_F32;
    d.n_shape = 2;
    d.shape = shape;
    Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
    fw.step = stepno;
    fw.n_seq = fw.n_pos = (size_t)n;
    fw.seq = seq;
    fw.pos = pos;
    fw.hidden = &d;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
    env.forward = &fw;
    cpm_payload t = {.data = (void *)hidden, .size = (size_t)n * (size_t)cols * sizeof(float),
                     .free_fn = zero_copy ? no_free : NULL};
    cpm_inmsg_free(f->last);
    f->last = NULL;
    assert_int_equal(cpm_sock_send(f->to_stage, NULL, &env, &t, NULL), 0);
    uint64_t end = uv_hrtime() + 30000000000ull;
    while (!f->last && uv_hrtime() < end)
        uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_non_null(f->last);
    assert_int_equal(f->last->env->body_case, CPM__V1__ENVELOPE__BODY_RESULT);
    return f->last->env->result;
}

/* zmq may deliver a small activation frame at any byte offset (inside its receive
 * buffer); the transport copies such a frame into an aligned buffer before the stage
 * sees it, and the logits are those of the same rows delivered aligned. */
static void test_misaligned_activations(void **state) {
    fx *f = *state;
    int cols = hidden_size(), n = 3;
    size_t bytes = (size_t)n * (size_t)cols * sizeof(float);
    float *rows = malloc(bytes);
    for (int i = 0; i < n * cols; i++)
        rows[i] = (float)((i * 7919) % 201 - 100) / 100.0f;
    const Cpm__V1__StageResult *r = step_hidden(f, 1, n, rows, cols, false);
    if (r->error)
        fail_msg("%s", r->error->message);
    size_t out_bytes = f->last->tensor_size;
    float *want = malloc(out_bytes);
    memcpy(want, f->last->tensor, out_bytes);
    cpm_stage_stats st;
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.realigned, 0);

    char *raw = malloc(bytes + 2);
    memcpy(raw + 2, rows, bytes);
    r = step_hidden(f, 2, n, (const float *)(raw + 2), cols, true); /* rewinds seq 3 to 0 */
    if (r->error)
        fail_msg("%s", r->error->message);
    assert_int_equal(f->last->tensor_size, out_bytes);
    assert_memory_equal(want, f->last->tensor, out_bytes);
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.realigned, 0); /* aligned by the transport, not the stage */
    cpm_inmsg_free(f->last); /* the stage is done with raw once its result is here */
    f->last = NULL;
    free(raw);
    free(want);
    free(rows);
}

/* One micro-batch with the router's epoch and live set: seqs[i] at position 0 (none:
 * a rows-free garbage-collection batch). Returns the stage's live sequences after it. */
static int gc_step(fx *f, uint64_t stepno, uint64_t epoch, int n, const uint64_t *seqs,
                   uint64_t horizon, int n_live, const uint64_t *live) {
    Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
    uint32_t pos[4] = {0};
    int32_t ids[4] = {1, 7, 42, 100};
    fw.step = stepno;
    fw.n_seq = fw.n_pos = fw.n_ids = (size_t)n;
    fw.seq = (uint64_t *)seqs;
    fw.pos = pos;
    fw.ids = ids;
    fw.router_epoch = epoch;
    fw.live_horizon = horizon;
    fw.n_live = (size_t)n_live;
    fw.live = (uint64_t *)live;
    assert_null(send_forward(f, &fw)->error);
    cpm_stage_stats st;
    cpm_stage_get_stats(f->st, &st);
    return st.live_seqs;
}

/* Sequences no live request owns are freed: ids under the horizon that the router no
 * longer lists, and all of an earlier router incarnation's; later ids are kept. */
static void test_garbage_collected(void **state) {
    fx *f = *state;
    const uint64_t e1 = 0x1111, e2 = 0x2222, two[2] = {3, 4}, four[1] = {4}, six[1] = {6};
    assert_int_equal(gc_step(f, 1, e1, 2, two, 0, 0, NULL), 2);
    assert_int_equal(gc_step(f, 2, e1, 0, NULL, 4, 1, four), 1);  /* 3 is not listed: freed */
    assert_int_equal(gc_step(f, 3, e1, 1, six, 4, 1, four), 2);   /* 6 is above the horizon */
    assert_int_equal(gc_step(f, 4, e1, 0, NULL, 6, 2, (uint64_t[]){4, 6}), 2);
    assert_int_equal(gc_step(f, 5, e2, 0, NULL, 0, 0, NULL), 0);  /* a new router: all go */
    cpm_stage_stats st;
    cpm_stage_get_stats(f->st, &st);
    assert_int_equal(st.kv_used, 0);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_stage MODEL_DIR\n");
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_greedy_matches_reference, setup, teardown),
        cmocka_unit_test_setup_teardown(test_greedy_matches_reference, setup_kv_f16, teardown),
        cmocka_unit_test_setup_teardown(test_rewind_repeats, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_batches_give_error_results, setup, teardown),
        cmocka_unit_test_setup_teardown(test_buffers_sized_at_load, setup, teardown),
        cmocka_unit_test_setup_teardown(test_misaligned_activations, setup_last, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_collected, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
