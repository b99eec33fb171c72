/* test_scheduler.c - router/scheduler.c: micro-batch contents, admission, limits, and a long
 * randomized run that checks the pipeline sees every position of every sequence
 * exactly once, in order, with logits wanted exactly where a token is due.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "router/scheduler.h"

static cpm_sched *mk(int batch, int chunk, int inflight, int seqs, int queue, int ctx, int kv) {
    cpm_sched_opts o = {.max_batch_tokens = batch, .prefill_chunk = chunk,
                        .max_inflight = inflight, .max_seqs = seqs, .max_queue = queue,
                        .max_context = ctx, .kv_tokens = kv};
    cpm_sched *s;
    cpm_error e;
    assert_int_equal(cpm_sched_new(&o, &s, &e), 0);
    return s;
}

static uint64_t add(cpm_sched *s, int n_prompt, int max_new, void *owner) {
    int32_t p[512];
    for (int i = 0; i < n_prompt; i++)
        p[i] = 100 + i;
    uint64_t id;
    cpm_error e;
    assert_int_equal(cpm_sched_add(s, p, n_prompt, max_new, owner, &id, &e), 0);
    return id;
}

static void test_prefill_in_chunks_then_decode(void **state) {
    (void)state;
    cpm_sched *s = mk(64, 4, 4, 8, 8, 100, 0);
    int owner;
    uint64_t a = add(s, 10, 5, &owner);
    assert_ptr_equal(cpm_sched_owner(s, a), &owner);
    cpm_sched_batch b;
    int expect_rows[] = {4, 4, 2};
    for (int chunk = 0, pos = 0; chunk < 3; chunk++) {
        assert_int_equal(cpm_sched_next(s, &b), 1);
        assert_int_equal(b.n_rows, expect_rows[chunk]);
        for (int r = 0; r < b.n_rows; r++, pos++) {
            assert_int_equal(b.seq[r], a);
            assert_int_equal(b.pos[r], pos);
            assert_int_equal(b.ids[r], 100 + pos);
            /* logits only for the prompt's last row */
            assert_int_equal(b.want[r], chunk == 2 && r == b.n_rows - 1);
        }
        /* one sequence can only be in one micro-batch at a time */
        cpm_sched_batch b2;
        assert_int_equal(cpm_sched_next(s, &b2), 0);
        assert_int_equal(cpm_sched_step_done(s, b.step, true, NULL, NULL), 0);
    }
    /* waiting for its token: nothing to send */
    assert_int_equal(cpm_sched_next(s, &b), 0);
    assert_int_equal(cpm_sched_push_token(s, a, 7), 0);
    assert_int_equal(cpm_sched_generated(s, a), 1);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 1);
    assert_int_equal(b.pos[0], 10);
    assert_int_equal(b.ids[0], 7);
    assert_int_equal(b.want[0], 1);
    assert_int_equal(b.n_want, 1);
    int n;
    const int32_t *t = cpm_sched_tokens(s, a, &n);
    assert_int_equal(n, 11);
    assert_int_equal(t[10], 7);
    /* a token before its step returned is a caller bug */
    assert_int_equal(cpm_sched_push_token(s, a, 8), CPM_EINVAL);
    assert_int_equal(cpm_sched_step_done(s, b.step, true, NULL, NULL), 0);
    assert_int_equal(cpm_sched_step_done(s, b.step, true, NULL, NULL), CPM_ENOTFOUND);
    cpm_sched_free(s);
}

static void test_decode_rows_come_first_and_budget_holds(void **state) {
    (void)state;
    cpm_sched *s = mk(8, 8, 4, 8, 8, 100, 0);
    uint64_t a = add(s, 3, 5, NULL);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    cpm_sched_step_done(s, b.step, true, NULL, NULL);
    cpm_sched_push_token(s, a, 1);
    uint64_t c = add(s, 20, 5, NULL);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 8); /* budget */
    assert_int_equal(b.seq[0], a); /* decode row first */
    assert_int_equal(b.want[0], 1);
    for (int r = 1; r < 8; r++) {
        assert_int_equal(b.seq[r], c);
        assert_int_equal(b.pos[r], r - 1);
        assert_int_equal(b.want[r], 0);
    }
    cpm_sched_free(s);
}

static void test_inflight_limit(void **state) {
    (void)state;
    cpm_sched *s = mk(64, 64, 2, 8, 8, 100, 0);
    for (int i = 0; i < 5; i++)
        add(s, 4, 4, NULL);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    uint64_t first = b.step;
    assert_int_equal(b.n_rows, 20); /* every sequence's prompt fits one batch */
    add(s, 4, 4, NULL);
    assert_int_equal(cpm_sched_next(s, &b), 1); /* the newcomer goes in a second batch */
    assert_int_equal(b.n_rows, 4);
    add(s, 4, 4, NULL);
    assert_int_equal(cpm_sched_next(s, &b), 0); /* two in flight */
    cpm_sched_stats st;
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.inflight, 2);
    assert_int_equal(cpm_sched_step_done(s, first, true, NULL, NULL), 0);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 4);
    cpm_sched_free(s);
}

/* A pipeline of two stages: the live sequences go out in two micro-batches of half each
 * (both stages compute), and each half comes back round as one batch. One stage: one batch. */
static void test_spread_over_stages(void **state) {
    (void)state;
    for (int spread = 1; spread <= 3; spread++) {
        cpm_sched_opts o = {.max_batch_tokens = 512, .prefill_chunk = 64, .max_inflight = 2,
                            .max_seqs = 32, .max_queue = 32, .max_context = 100, .spread = spread};
        cpm_sched *s;
        cpm_error e;
        assert_int_equal(cpm_sched_new(&o, &s, &e), 0);
        for (int i = 0; i < 16; i++)
            add(s, 4, 8, NULL);
        const int per = spread == 1 ? 16 : 8; /* spread 3 is capped by the 2 in flight */
        cpm_sched_batch b;
        uint64_t steps[2], group[2][16];
        int n_steps = 0;
        while (cpm_sched_next(s, &b) == 1) {
            assert_int_equal(b.n_rows, per * 4);
            for (int r = 0; r < per; r++)
                group[n_steps][r] = b.seq[r * 4];
            steps[n_steps++] = b.step;
        }
        assert_int_equal(n_steps, 16 / per);
        /* the first half returns with its tokens: it goes out again whole, alone */
        assert_int_equal(cpm_sched_step_done(s, steps[0], true, NULL, NULL), 0);
        for (int r = 0; r < per; r++)
            assert_int_equal(cpm_sched_push_token(s, group[0][r], 9), 0);
        assert_int_equal(cpm_sched_next(s, &b), 1);
        assert_int_equal(b.n_rows, per);
        for (int r = 0; r < per; r++) {
            bool in_group = false;
            for (int q = 0; q < per; q++)
                in_group |= b.seq[r] == group[0][q];
            assert_true(in_group);
            assert_int_equal(b.want[r], 1);
        }
        cpm_sched_free(s);
    }
}

static void test_admission_queue_and_release(void **state) {
    (void)state;
    cpm_sched *s = mk(64, 64, 4, 2, 1, 100, 0);
    uint64_t a = add(s, 2, 2, NULL), c = add(s, 2, 2, NULL), d = add(s, 2, 2, NULL);
    int32_t p[2] = {1, 2};
    uint64_t x;
    cpm_error e;
    assert_int_equal(cpm_sched_add(s, p, 2, 2, NULL, &x, &e), CPM_ELIMIT);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 4); /* a and c; d waits for a slot */
    for (int r = 0; r < b.n_rows; r++)
        assert_true(b.seq[r] == a || b.seq[r] == c);
    cpm_sched_stats st;
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.live, 2);
    assert_int_equal(st.queued, 1);
    cpm_sched_step_done(s, b.step, true, NULL, NULL);
    cpm_sched_finish(s, a);
    assert_int_equal(cpm_sched_push_token(s, a, 5), CPM_ENOTFOUND);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_release, 1);
    assert_int_equal(b.release[0], a);
    assert_int_equal(b.n_rows, 2);
    assert_int_equal(b.seq[0], d);
    /* a queued sequence that never ran needs no release */
    cpm_sched_step_done(s, b.step, true, NULL, NULL);
    uint64_t q = add(s, 2, 2, NULL);
    cpm_sched_finish(s, q);
    cpm_sched_finish(s, d);
    cpm_sched_finish(s, c);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 0);
    assert_int_equal(b.n_release, 2);
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.live + st.queued, 0);
    cpm_sched_free(s);
}

static void test_context_and_kv_budget(void **state) {
    (void)state;
    cpm_sched *s = mk(64, 64, 4, 8, 8, 64, 64);
    int32_t p[60] = {0};
    uint64_t x;
    cpm_error e = {0};
    assert_int_equal(cpm_sched_add(s, p, 60, 5, NULL, &x, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "context length"));
    assert_int_equal(cpm_sched_add(s, p, 0, 5, NULL, &x, &e), CPM_EINVAL);
    /* 40 + 8 -> 48 tokens reserved; 20 + 8 -> 32 does not fit beside it */
    uint64_t a = add(s, 40, 8, NULL), c = add(s, 20, 8, NULL);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 40);
    cpm_sched_stats st;
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.kv_reserved, 48);
    assert_int_equal(st.queued, 1);
    cpm_sched_step_done(s, b.step, true, NULL, NULL);
    cpm_sched_finish(s, a);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 20);
    assert_int_equal(b.seq[0], c);
    cpm_sched_free(s);
}

static void test_finish_in_flight_and_failure(void **state) {
    (void)state;
    cpm_sched *s = mk(64, 64, 4, 8, 8, 100, 0);
    uint64_t a = add(s, 3, 3, NULL), c = add(s, 3, 3, NULL);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    uint64_t step = b.step;
    cpm_sched_finish(s, a); /* client went away while a is in the pipeline */
    assert_non_null(cpm_sched_tokens(s, a, NULL));
    const uint64_t *failed;
    int n_failed;
    assert_int_equal(cpm_sched_step_done(s, step, false, &failed, &n_failed), 0);
    assert_int_equal(n_failed, 1); /* a was already finished; only c is reported */
    assert_int_equal(failed[0], c);
    assert_true(cpm_sched_failed(s, c));
    assert_null(cpm_sched_tokens(s, a, NULL));
    assert_int_equal(cpm_sched_push_token(s, c, 1), CPM_ENOTFOUND);
    cpm_sched_finish(s, c);
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.n_rows, 0);
    assert_int_equal(b.n_release, 2);
    cpm_sched_free(s);
}

/* Many sequences, random prompt lengths and lifetimes, results in order (the ring),
 * tokens sampled in random order: the stages' view must stay consistent. */
static void test_randomized_pipeline_invariants(void **state) {
    (void)state;
    enum { N = 60, INFLIGHT = 3 };
    cpm_sched *s = mk(48, 16, INFLIGHT, 10, 100, 400, 2048);
    int max_new[N], next_pos[N], done = 0;
    bool finished[N] = {0};
    srand(1234);
    for (int i = 0; i < N; i++) {
        max_new[i] = 1 + rand() % 12;
        add(s, 1 + rand() % 70, max_new[i], (void *)(intptr_t)(i + 1));
        next_pos[i] = 0;
    }
    uint64_t pending_steps[INFLIGHT];
    int n_pending = 0;
    uint64_t waiting[64]; /* sequences whose token is due */
    int n_waiting = 0;
    for (int iter = 0; iter < 100000 && done < N; iter++) {
        cpm_sched_batch b;
        while (cpm_sched_next(s, &b) == 1) {
            for (int r = 0; r < b.n_rows; r++) {
                int i = (int)(intptr_t)cpm_sched_owner(s, b.seq[r]) - 1;
                assert_true(i >= 0 && !finished[i]);
                assert_int_equal(b.pos[r], next_pos[i]); /* no gap, no repeat */
                next_pos[i]++;
                int n;
                const int32_t *t = cpm_sched_tokens(s, b.seq[r], &n);
                assert_int_equal(b.ids[r], t[b.pos[r]]);
                assert_int_equal(b.want[r], (int)b.pos[r] == n - 1);
                if (b.want[r])
                    waiting[n_waiting++] = b.seq[r];
            }
            pending_steps[n_pending++] = b.step;
        }
        /* the ring answers the oldest step; then some due tokens are sampled */
        if (n_pending > 0) {
            assert_int_equal(cpm_sched_step_done(s, pending_steps[0], true, NULL, NULL), 0);
            memmove(pending_steps, pending_steps + 1, (size_t)--n_pending * sizeof *pending_steps);
        }
        while (n_waiting > 0 && rand() % 3) {
            int k = rand() % n_waiting;
            uint64_t q = waiting[k];
            waiting[k] = waiting[--n_waiting];
            int i = (int)(intptr_t)cpm_sched_owner(s, q) - 1;
            int rc = cpm_sched_push_token(s, q, 7);
            if (rc == CPM_EINVAL) { /* its step has not come back yet: retry later */
                waiting[n_waiting++] = q;
                break;
            }
            assert_int_equal(rc, 0);
            if (cpm_sched_generated(s, q) == max_new[i] || rand() % 20 == 0) {
                cpm_sched_finish(s, q);
                finished[i] = true;
                done++;
            }
        }
    }
    assert_int_equal(done, N);
    cpm_sched_stats st;
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.live + st.queued, 0);
    assert_int_equal(st.kv_reserved, 0);
    cpm_sched_free(s);
}

/* Replicas' schedulers hand out disjoint sequence and step ids: id % stride = offset. */
/* Runs seq id to its first wanted row (prefill), then pushes n tokens and finishes it;
 * returns the attach/publish counts seen. */
static void run_to_end(cpm_sched *s, uint64_t id, int n, int *attached, int *published) {
    cpm_sched_batch b;
    for (int t = 0; t <= n;) {
        assert_int_equal(cpm_sched_next(s, &b), 1);
        for (int i = 0; i < b.n_attach; i++)
            if (b.attach[i].seq == id)
                *attached += b.attach[i].n;
        for (int i = 0; i < b.n_publish; i++)
            if (b.publish[i].seq == id)
                *published += b.publish[i].n;
        assert_int_equal(cpm_sched_step_done(s, b.step, true, NULL, NULL), 0);
        if (b.n_want) {
            if (++t > n)
                break;
            assert_int_equal(cpm_sched_push_token(s, id, 7), 0);
        }
    }
    cpm_sched_finish(s, id);
}

/* Prefix caching: the second of two prompts sharing 40 tokens starts after their 2 shared
 * full blocks (attached, not sent); every block the rows fill is published once. */
static void test_prefix_reuse(void **state) {
    (void)state;
    cpm_sched_opts o = {.max_batch_tokens = 64, .prefill_chunk = 64, .max_inflight = 1,
                        .max_seqs = 4, .max_queue = 4, .max_context = 200, .prefix_blocks = 64};
    cpm_sched *s;
    cpm_error e;
    assert_int_equal(cpm_sched_new(&o, &s, &e), 0);
    int32_t p[60], q[60];
    for (int i = 0; i < 60; i++)
        p[i] = q[i] = 100 + i;
    q[40] = 1; /* q shares p's first 40 tokens: blocks 0 and 1 */
    uint64_t a;
    assert_int_equal(cpm_sched_add(s, p, 60, 4, NULL, &a, &e), 0);
    int att = 0, pub = 0;
    run_to_end(s, a, 4, &att, &pub);
    assert_int_equal(att, 0);
    assert_int_equal(pub, 4);                       /* 60 + 4 tokens sent: blocks 0..3 */
    assert_int_equal(cpm_sched_prefix_match(s, q, 60), 2);
    assert_int_equal(cpm_sched_prefix_match(s, p, 33), 2); /* the last token is never reused */
    assert_int_equal(cpm_sched_prefix_match(s, p, 32), 1);
    uint64_t c;
    assert_int_equal(cpm_sched_add(s, q, 60, 2, NULL, &c, &e), 0);
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.pos[0], 32);                 /* starts after the two blocks */
    assert_int_equal(b.n_rows, 28);
    assert_int_equal(b.n_attach, 1);
    assert_int_equal(b.attach[0].n, 2);
    assert_int_equal(cpm_sched_cached_tokens(s, c), 32);
    cpm_sched_stats st;
    cpm_sched_get_stats(s, &st);
    assert_int_equal(st.prefix_blocks_reused, 2);
    assert_int_equal(st.prefix_blocks_asked, 3 + 3);
    /* a stage lost a block: the directory forgets, the next prompt starts from 0 */
    cpm_sched_prefix_forget(s);
    assert_int_equal(cpm_sched_prefix_match(s, q, 60), 0);
    cpm_sched_free(s);
}

static void test_ids_of_a_replica(void **state) {
    (void)state;
    cpm_sched_opts o = cpm_sched_opts_default();
    o.id_stride = 3;
    o.id_offset = 2;
    cpm_sched *s;
    cpm_error e;
    assert_int_equal(cpm_sched_new(&o, &s, &e), 0);
    for (int i = 0; i < 4; i++) {
        uint64_t q = add(s, 5, 2, NULL);
        assert_true(q > 0);
        assert_int_equal(q % 3, 2);
    }
    cpm_sched_batch b;
    assert_int_equal(cpm_sched_next(s, &b), 1);
    assert_int_equal(b.step % 3, 2);
    for (int i = 0; i < b.n_rows; i++)
        assert_int_equal(b.seq[i] % 3, 2);
    cpm_sched_free(s);
    o.id_offset = 3; /* offset must be below the stride */
    assert_int_equal(cpm_sched_new(&o, &s, &e), CPM_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefill_in_chunks_then_decode),
        cmocka_unit_test(test_decode_rows_come_first_and_budget_holds),
        cmocka_unit_test(test_inflight_limit),
        cmocka_unit_test(test_spread_over_stages),
        cmocka_unit_test(test_admission_queue_and_release),
        cmocka_unit_test(test_context_and_kv_budget),
        cmocka_unit_test(test_finish_in_flight_and_failure),
        cmocka_unit_test(test_randomized_pipeline_invariants),
        cmocka_unit_test(test_ids_of_a_replica),
        cmocka_unit_test(test_prefix_reuse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
