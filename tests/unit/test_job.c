/* test_job.c - router/job.c: the job state machine's edges, and "exactly one final
 * answer" on every path: done, fail, cancel, in any order and repeated, with gens in
 * any state and tokenizer calls holding the job. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "router/job.h"
#include "support/job_sink.h"

typedef struct fixture {
    cpm_metrics m;
    cpm_jobs *jobs;
    int releases;   /* the release hook's calls */
    uint64_t released[16];
    int empties;    /* the "no job left" hook's calls */
} fixture;

static void on_release(void *ud, cpm_gen *g) {
    fixture *f = ud;
    f->released[f->releases++ % 16] = g->seq;
}

static void on_empty(void *ud) {
    ((fixture *)ud)->empties++;
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    cpm_jobs_hooks h = {.ud = f, .release = on_release, .empty = on_empty};
    f->jobs = cpm_jobs_new(&f->m, &h);
    *state = f;
    return f->jobs ? 0 : -1;
}

static int teardown(void **state) {
    fixture *f = *state;
    assert_int_equal(cpm_jobs_count(f->jobs), 0); /* every job was freed */
    cpm_jobs_free(f->jobs);
    free(f);
    return 0;
}

/* A job of n gens (one prompt), each with a sequence id 1..n when seqs, in state to. */
static cpm_job *make_job(fixture *f, rec *r, int n, bool seqs, cpm_job_state to) {
    cpm_job *j = cpm_job_new(f->jobs, CPM_EP_COMPLETIONS, "cmpl", &rec_sink, r);
    assert_non_null(j);
    assert_int_equal(cpm_job_init_gens(j, 1, n), 0);
    for (int i = 0; seqs && i < n; i++) {
        j->gens[i].seq = (uint64_t)i + 1;
        assert_int_equal(cpm_req_transition(&j->gens[i].state, CPM_REQ_PREFILLING), 0);
    }
    if (to != CPM_JOB_NEW)
        assert_int_equal(cpm_job_transition(j, to), 0);
    return j;
}

static void test_edges(void **state) {
    (void)state;
    static const char *const allowed[CPM_JOB_STATES] = {
        [CPM_JOB_NEW] = "TRFC", [CPM_JOB_TOKENIZING] = "RFC", [CPM_JOB_RUNNING] = "DFC",
        [CPM_JOB_DONE] = "", [CPM_JOB_FAILED] = "", [CPM_JOB_CANCELLED] = "",
    };
    const char letter[CPM_JOB_STATES] = {'N', 'T', 'R', 'D', 'F', 'C'};
    for (int from = 0; from < CPM_JOB_STATES; from++)
        for (int to = 0; to < CPM_JOB_STATES; to++) {
            cpm_job j = {.state = (cpm_job_state)from};
            bool want = strchr(allowed[from], letter[to]) != NULL;
            int rc = cpm_job_transition(&j, (cpm_job_state)to);
            if (want != (rc == 0))
                fail_msg("%s -> %s: %s", cpm_job_state_name(from), cpm_job_state_name(to),
                         want ? "refused" : "allowed");
            assert_int_equal(j.state, want ? to : from);
        }
    assert_true(cpm_job_state_terminal(CPM_JOB_CANCELLED));
    assert_false(cpm_job_state_terminal(CPM_JOB_RUNNING));
    assert_string_equal(cpm_job_state_name(CPM_JOB_TOKENIZING), "tokenizing");
}

/* done answers only once every gen is terminal, and only once. */
static void test_done_waits_for_every_gen(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, 2, true, CPM_JOB_RUNNING);
    cpm_gen_finish(&j->gens[0], CPM_REQ_FINISHED, "stop");
    cpm_job_done(j);
    assert_int_equal(r.finals, 0);
    assert_int_equal(f->releases, 1);
    cpm_gen_finish(&j->gens[1], CPM_REQ_FINISHED, "length");
    cpm_gen_finish(&j->gens[1], CPM_REQ_FAILED, NULL); /* terminal: ignored */
    cpm_job_done(j);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.frees, 1);
    assert_int_equal(f->releases, 2);
    assert_int_equal(f->m.requests[CPM_EP_COMPLETIONS][CPM_OUT_OK], 1);
    assert_int_equal(f->m.e2e.n, 1);
    assert_int_equal(f->empties, 1);
}

/* fail ends every gen (each sequence released once), answers once, and nothing after
 * it answers again. */
static void test_fail_ends_every_gen_once(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, 3, true, CPM_JOB_RUNNING);
    cpm_job_hold(j); /* a tokenizer call: j must outlive the answer */
    cpm_gen_finish(&j->gens[1], CPM_REQ_FINISHED, "stop");
    cpm_job_fail(j, 503, "server_error", "pipeline_error", "stage0 died");
    for (int i = 0; i < 3; i++)
        assert_true(cpm_req_state_terminal(j->gens[i].state));
    assert_int_equal(j->gens[0].state, CPM_REQ_FAILED);
    assert_int_equal(j->gens[1].state, CPM_REQ_FINISHED);
    assert_int_equal(f->releases, 3);
    cpm_job_fail(j, 500, "server_error", NULL, "again");
    cpm_job_cancel(j);
    cpm_job_done(j);
    assert_int_equal(r.finals, 1);
    assert_int_equal(r.fails, 1);
    assert_int_equal(r.last_status, 503);
    assert_string_equal(r.last_code, "pipeline_error");
    assert_string_equal(r.last_msg, "stage0 died");
    assert_int_equal(r.frees, 0); /* still held */
    assert_int_equal(f->m.requests[CPM_EP_COMPLETIONS][CPM_OUT_OVERLOAD], 1);
    cpm_job_drop(j);
    assert_int_equal(r.frees, 1);
    assert_int_equal(f->releases, 3);
}

/* A cancel before admission: gens without sequences are not released. */
static void test_cancel_before_admission(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, 2, false, CPM_JOB_TOKENIZING);
    cpm_job_cancel(j);
    assert_int_equal(r.cancels, 1);
    assert_int_equal(r.finals, 1);
    assert_int_equal(f->releases, 0);
    assert_int_equal(f->m.requests[CPM_EP_COMPLETIONS][CPM_OUT_CANCELLED], 1);
    assert_int_equal(r.frees, 1);
}

/* Every status maps to one outcome counter. */
static void test_fail_outcomes(void **state) {
    fixture *f = *state;
    static const struct {
        int status, outcome;
    } cases[] = {{400, CPM_OUT_REJECTED}, {404, CPM_OUT_REJECTED}, {429, CPM_OUT_OVERLOAD},
                 {503, CPM_OUT_OVERLOAD}, {500, CPM_OUT_FAILED}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        rec r = {0};
        uint64_t before = f->m.requests[CPM_EP_COMPLETIONS][cases[i].outcome];
        cpm_job_fail(make_job(f, &r, 1, false, CPM_JOB_NEW), cases[i].status, "t", "c", "m");
        assert_int_equal(f->m.requests[CPM_EP_COMPLETIONS][cases[i].outcome], before + 1);
        assert_int_equal(r.finals, 1);
    }
}

/* Every order of the three ways to answer, from every live state: exactly one final
 * answer, and the job freed exactly once (a tokenizer call holds it meanwhile: an
 * unheld job is freed by its first answer, so nothing may touch it after). */
static void test_one_final_answer_every_path(void **state) {
    fixture *f = *state;
    static const cpm_job_state starts[] = {CPM_JOB_NEW, CPM_JOB_TOKENIZING, CPM_JOB_RUNNING};
    static const int orders[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                     {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    for (int s = 0; s < 3; s++)
        for (int o = 0; o < 6; o++)
            for (int held = 0; held < 2; held++) {
                rec r = {0};
                cpm_job *j = make_job(f, &r, 2, starts[s] == CPM_JOB_RUNNING, starts[s]);
                cpm_job_hold(j);
                if (starts[s] == CPM_JOB_RUNNING) /* done has something to answer */
                    for (int i = 0; i < 2; i++)
                        cpm_gen_finish(&j->gens[i], CPM_REQ_FINISHED, "stop");
                for (int k = 0; k < (held ? 3 : 1); k++) {
                    if (k == 0 && !held)
                        cpm_job_drop(j); /* the first answer frees it */
                    if (orders[o][k] == 0)
                        cpm_job_done(j);
                    else if (orders[o][k] == 1)
                        cpm_job_fail(j, 503, "server_error", "x", "y");
                    else
                        cpm_job_cancel(j);
                }
                if (held) {
                    assert_int_equal(r.frees, 0);
                    cpm_job_drop(j);
                }
                bool answers = held || starts[s] == CPM_JOB_RUNNING || orders[o][0] != 0;
                assert_int_equal(r.finals, answers ? 1 : 0);
                assert_int_equal(r.frees, r.finals ? 1 : 0);
                if (!r.finals) /* done alone cannot answer a job that is not running */
                    cpm_job_cancel(j);
            }
}

static void test_stop_ids(void **state) {
    fixture *f = *state;
    rec r = {0};
    cpm_job *j = make_job(f, &r, 1, false, CPM_JOB_NEW);
    const int32_t eos[] = {2, 73440};
    int32_t stop[] = {7};
    j->stop_ids = malloc(sizeof stop);
    memcpy(j->stop_ids, stop, sizeof stop);
    j->n_stop_ids = 1;
    assert_true(cpm_job_is_stop_id(j, eos, 2, 73440));
    assert_true(cpm_job_is_stop_id(j, eos, 2, 7));
    assert_false(cpm_job_is_stop_id(j, eos, 2, 3));
    j->ignore_eos = true;
    assert_false(cpm_job_is_stop_id(j, eos, 2, 2));
    assert_true(cpm_job_is_stop_id(j, eos, 2, 7)); /* a request's own stop ids still stop */
    cpm_job_cancel(j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edges),
        cmocka_unit_test_setup_teardown(test_done_waits_for_every_gen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fail_ends_every_gen_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_before_admission, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fail_outcomes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_one_final_answer_every_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_ids, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
