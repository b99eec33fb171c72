/* test_worker.c - the service skeleton (services/common/worker.c) with trivial handlers
 * over real inproc sockets: replies delivered, handler errors, refusals while loading
 * and when full, health, the pipeline mode, and shutdown with work queued.
 *
 * Requests are heartbeats: the handler answers seq with seq * 10, fails on seq 13, and
 * waits at a gate the test opens when it needs jobs to stay running. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "services/common/worker.h"

#define MAX_GOT 16

typedef struct fixture {
    uv_loop_t loop;
    void *z;
    cpm_worker *w;
    cpm_sock *client, *sink, *next; /* next: the worker's downstream DEALER, to sink */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool gate_open;                 /* the handler waits until this is true */
    bool load_open;                 /* the load hook likewise */
    int load_rc;
    atomic_int runs, running_now, max_running_seen;
    int released, loaded, done_hooks;
    /* what came back to the client (and to the sink) */
    int replies, errors, sunk;
    uint64_t got_seq[MAX_GOT];
    int got_code[MAX_GOT];
    char last_error[CPM_ERROR_MSG_MAX];
    Cpm__V1__Health health;
    char health_status[CPM_ERROR_MSG_MAX];
    bool have_health;
} fixture;

/* ------------------------------------------------------------------ the service's hooks */

static void wait_for(fixture *f, const bool *open) {
    pthread_mutex_lock(&f->mu);
    while (!*open)
        pthread_cond_wait(&f->cv, &f->mu);
    pthread_mutex_unlock(&f->mu);
}

static void open_gate(fixture *f, bool *open) {
    pthread_mutex_lock(&f->mu);
    *open = true;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

static int svc_load(void *user, cpm_error *err) {
    fixture *f = user;
    wait_for(f, &f->load_open);
    return f->load_rc ? cpm_error_set(err, f->load_rc, "no model here") : 0;
}

static void svc_loaded(void *user, int rc, const cpm_error *err) {
    (void)rc;
    (void)err;
    fixture *f = user;
    f->loaded++;
}

static int svc_run(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err) {
    fixture *f = user;
    int now = atomic_fetch_add(&f->running_now, 1) + 1;
    int seen = atomic_load(&f->max_running_seen);
    while (now > seen && !atomic_compare_exchange_weak(&f->max_running_seen, &seen, now))
        ;
    atomic_fetch_add(&f->runs, 1);
    wait_for(f, &f->gate_open);
    atomic_fetch_sub(&f->running_now, 1);
    uint64_t seq = in->env->heartbeat->seq;
    if (seq == 13)
        return cpm_error_set(err, CPM_EINVAL, "seq 13 is unlucky");
    Cpm__V1__Heartbeat hb = CPM__V1__HEARTBEAT__INIT;
    hb.seq = seq * 10;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    return cpm_reply_set(out, &env, NULL, err);
}

static void svc_done(void *user, const cpm_inmsg *in, int rc) {
    (void)in;
    (void)rc;
    fixture *f = user;
    f->done_hooks++;
}

static void svc_health(void *user, Cpm__V1__Health *h) {
    (void)user;
    h->live_seqs = 7;
}

static void svc_release(void *user) {
    fixture *f = user;
    f->released++;
}

static const cpm_worker_ops ops = {
    .run = svc_run,
    .done = svc_done,
    .health = svc_health,
    .release = svc_release,
};

static const cpm_worker_ops loading_ops = {
    .load = svc_load,
    .loaded = svc_loaded,
    .run = svc_run,
    .release = svc_release,
};

/* ------------------------------------------------------------------ the client side */

static void on_reply(cpm_sock *s, cpm_inmsg *m, int status, void *user) {
    (void)s;
    fixture *f = user;
    if (status) { /* the client closed at teardown with this call unanswered */
        assert_int_equal(status, CPM_ECLOSED);
        return;
    }
    int i = f->replies++;
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_HEARTBEAT && i < MAX_GOT)
        f->got_seq[i] = m->env->heartbeat->seq;
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_ERROR) {
        f->errors++;
        if (i < MAX_GOT)
            f->got_code[i] = m->env->error->code;
        snprintf(f->last_error, sizeof f->last_error, "%s", m->env->error->message);
    }
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_HEALTH) {
        const Cpm__V1__Health *h = m->env->health;
        f->have_health = true;
        f->health = *h;
        snprintf(f->health_status, sizeof f->health_status, "%s", h->status);
        f->health.status = f->health_status;
        f->health.service = f->health.name = NULL; /* checked below through the copy of ready/counts */
        assert_string_equal(h->service, "test");
        assert_string_equal(h->name, "test0");
    }
    cpm_inmsg_free(m);
}

static void on_unexpected(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    (void)user;
    cpm_inmsg_free(m);
}

static void on_sink(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    fixture *f = user;
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_HEARTBEAT && f->sunk < MAX_GOT)
        f->got_seq[f->sunk] = m->env->heartbeat->seq;
    f->sunk++;
    cpm_inmsg_free(m);
}

static void call(fixture *f, uint64_t seq) {
    Cpm__V1__Heartbeat hb = CPM__V1__HEARTBEAT__INIT;
    hb.seq = seq;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    assert_int_equal(cpm_sock_call(f->client, &env, NULL, 5000, on_reply, f, NULL), 0);
}

static void ask_health(fixture *f) {
    Cpm__V1__HealthRequest hr = CPM__V1__HEALTH_REQUEST__INIT;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST;
    env.health_request = &hr;
    f->have_health = false;
    assert_int_equal(cpm_sock_call(f->client, &env, NULL, 5000, on_reply, f, NULL), 0);
}

/* Runs the loop until *count reaches want or 3 s pass. */
static void run_until(fixture *f, const int *count, int want) {
    uint64_t end = uv_hrtime() + 3000000000ull;
    while (*count < want && uv_hrtime() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(200);
    }
}

static void run_until_atomic(fixture *f, atomic_int *count, int want) {
    uint64_t end = uv_hrtime() + 3000000000ull;
    while (atomic_load(count) < want && uv_hrtime() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(200);
    }
}

/* ------------------------------------------------------------------ fixture */

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    uv_loop_init(&f->loop);
    f->z = zmq_ctx_new();
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    f->gate_open = f->load_open = true;
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_DEALER, NULL, on_unexpected, f, &f->client, NULL), 0);
    *state = f;
    return 0;
}

static void start(fixture *f, cpm_worker_opts o) {
    o.service = "test";
    o.name = "test0";
    o.user = f;
    cpm_error e = {0};
    assert_int_equal(cpm_worker_new(&f->loop, f->z, "inproc://worker", &o, &f->w, &e), 0);
    assert_int_equal(cpm_sock_connect(f->client, "inproc://worker", NULL), 0);
}

static int teardown(void **state) {
    fixture *f = *state;
    open_gate(f, &f->gate_open);
    open_gate(f, &f->load_open);
    cpm_worker_free(f->w);
    cpm_sock_free(f->client);
    cpm_sock_free(f->next);
    cpm_sock_free(f->sink);
    run_until(f, &f->released, 1);
    for (int i = 0; i < 20; i++)
        uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    zmq_ctx_term(f->z);
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
    free(f);
    return 0;
}

/* ------------------------------------------------------------------ tests */

static void test_replies_and_handler_error(void **state) {
    fixture *f = *state;
    start(f, (cpm_worker_opts){.max_running = 2, .max_queue = 8, .ops = &ops});
    call(f, 1);
    call(f, 13);
    call(f, 2);
    run_until(f, &f->replies, 3);
    assert_int_equal(f->replies, 3);
    assert_int_equal(f->errors, 1);
    assert_non_null(strstr(f->last_error, "seq 13 is unlucky"));
    uint64_t sum = 0;
    for (int i = 0; i < 3; i++) {
        sum += f->got_seq[i];
        if (f->got_seq[i] == 0) /* the error's slot */
            assert_int_equal(f->got_code[i], CPM_EINVAL);
    }
    assert_int_equal(sum, 30);
    assert_int_equal(f->done_hooks, 3);
    cpm_worker_stats st;
    cpm_worker_get_stats(f->w, &st);
    assert_int_equal(st.served, 2);
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.refused, 0);
    assert_int_equal(st.running + st.queued, 0);
    assert_true(atomic_load(&f->max_running_seen) <= 2);
}

/* max_running 1 runs in arrival order; beyond max_queue the worker refuses (one sender
 * may hold all of it here: peer_pct 100). */
static void test_in_order_and_refused_when_full(void **state) {
    fixture *f = *state;
    f->gate_open = false;
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 2, .full_msg = "test queue full",
                               .peer_pct = 100, .ops = &ops});
    for (uint64_t s = 1; s <= 4; s++)
        call(f, s);
    run_until(f, &f->replies, 1); /* the fourth: one running, two waiting */
    assert_int_equal(f->replies, 1);
    assert_int_equal(f->got_code[0], CPM_ELIMIT);
    assert_string_equal(f->last_error, "test queue full");
    ask_health(f);
    run_until(f, &f->replies, 2);
    assert_true(f->have_health);
    assert_true(f->health.ready);
    assert_string_equal(f->health.status, "serving");
    assert_int_equal(f->health.queue_depth, 3);
    assert_int_equal(f->health.live_seqs, 7); /* the service's own field */
    open_gate(f, &f->gate_open);
    run_until(f, &f->replies, 5);
    assert_int_equal(f->replies, 5);
    assert_int_equal(f->got_seq[2], 10);
    assert_int_equal(f->got_seq[3], 20);
    assert_int_equal(f->got_seq[4], 30);
    assert_int_equal(atomic_load(&f->max_running_seen), 1);
    cpm_worker_stats st;
    cpm_worker_get_stats(f->w, &st);
    assert_int_equal(st.served, 3);
    assert_int_equal(st.refused, 1);
}

/* One sender may hold only its share of the queue: the next of its requests is refused
 * while another sender still gets in; its bytes are bounded too. */
static void test_per_sender_share(void **state) {
    fixture *f = *state;
    f->gate_open = false;
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 3, .peer_pct = 50, .ops = &ops});
    for (uint64_t s = 1; s <= 3; s++)
        call(f, s);
    run_until(f, &f->replies, 1); /* 2 of 4 slots held: the third is refused */
    assert_int_equal(f->replies, 1);
    assert_int_equal(f->got_code[0], CPM_ELIMIT);
    if (!strstr(f->last_error, "this sender holds 2 messages"))
        fail_msg("%s", f->last_error);
    cpm_sock *other;
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_DEALER, NULL, on_unexpected, f, &other, NULL), 0);
    assert_int_equal(cpm_sock_connect(other, "inproc://worker", NULL), 0);
    Cpm__V1__Heartbeat hb = CPM__V1__HEARTBEAT__INIT;
    hb.seq = 4;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    assert_int_equal(cpm_sock_call(other, &env, NULL, 5000, on_reply, f, NULL), 0);
    open_gate(f, &f->gate_open);
    run_until(f, &f->replies, 4);
    assert_int_equal(f->replies, 4);
    assert_int_equal(f->errors, 1); /* the other sender's request was served */
    uint64_t sum = 0;
    for (int i = 1; i < 4; i++)
        sum += f->got_seq[i];
    assert_int_equal(sum, 70); /* 10 + 20 + 40 */
    cpm_sock_free(other);
}

/* The bytes held in all are bounded as well as the messages. */
static void test_bytes_bound(void **state) {
    fixture *f = *state;
    f->gate_open = false;
    /* a heartbeat envelope is 8-14 bytes: 30 hold two or three of them */
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 8, .max_bytes = 30, .peer_pct = 100,
                               .ops = &ops});
    for (uint64_t s = 1; s <= 8; s++)
        call(f, s);
    run_until(f, &f->errors, 1);
    assert_true(f->errors >= 1);
    if (!strstr(f->last_error, "bytes queued (bounds 9, 30)"))
        fail_msg("%s", f->last_error);
    open_gate(f, &f->gate_open);
    run_until(f, &f->replies, 8);
    assert_int_equal(f->replies, 8);
    assert_true(f->errors >= 5 && f->errors <= 6);
}

/* Freed with one job running and two queued: the running one finishes, the queued
 * ones never run, nothing is answered, and release comes once, after the job. */
static void test_shutdown_with_work_queued(void **state) {
    fixture *f = *state;
    f->gate_open = false;
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 4, .ops = &ops});
    for (uint64_t s = 1; s <= 3; s++)
        call(f, s);
    run_until_atomic(f, &f->runs, 1);
    for (int i = 0; i < 50; i++) { /* let the other two arrive and queue */
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(200);
    }
    cpm_worker_stats st;
    cpm_worker_get_stats(f->w, &st);
    assert_int_equal(st.running, 1);
    assert_int_equal(st.queued, 2);
    cpm_worker_free(f->w);
    cpm_worker_free(f->w); /* twice while a job runs: harmless */
    assert_int_equal(f->released, 0);
    open_gate(f, &f->gate_open);
    run_until(f, &f->released, 1);
    assert_int_equal(f->released, 1);
    assert_int_equal(atomic_load(&f->runs), 1);
    assert_int_equal(f->done_hooks, 1);
    f->w = NULL;
    for (int i = 0; i < 50; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(200);
    }
    assert_int_equal(f->replies, 0);
}

/* Freed when idle: released at once. */
static void test_free_idle_releases_at_once(void **state) {
    fixture *f = *state;
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 1, .ops = &ops});
    cpm_worker_free(f->w);
    f->w = NULL;
    assert_int_equal(f->released, 1);
}

/* While loading, requests get CPM_EAGAIN and health says so; a failed load stays failed. */
static void test_loading_then_failed(void **state) {
    fixture *f = *state;
    f->load_open = false;
    f->load_rc = CPM_ENOTFOUND;
    start(f, (cpm_worker_opts){.what = "test service", .max_running = 1, .max_queue = 1,
                               .ops = &loading_ops});
    call(f, 1);
    run_until(f, &f->replies, 1);
    assert_int_equal(f->got_code[0], CPM_EAGAIN);
    assert_string_equal(f->last_error, "test service is still loading");
    ask_health(f);
    run_until(f, &f->replies, 2);
    assert_false(f->health.ready);
    assert_string_equal(f->health.status, "loading");
    open_gate(f, &f->load_open);
    run_until(f, &f->loaded, 1);
    call(f, 2);
    run_until(f, &f->replies, 3);
    assert_string_equal(f->last_error, "test service failed to load");
    ask_health(f);
    run_until(f, &f->replies, 4);
    assert_string_equal(f->health.status, "failed: no model here");
    assert_int_equal(atomic_load(&f->runs), 0);
}

/* A pipeline sends replies downstream, never back; a failed job sends nothing. */
static void test_pipeline_downstream(void **state) {
    fixture *f = *state;
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_PULL, NULL, on_sink, f, &f->sink, NULL), 0);
    assert_int_equal(cpm_sock_bind(f->sink, "inproc://sink", NULL), 0);
    assert_int_equal(cpm_sock_new(&f->loop, f->z, ZMQ_PUSH, NULL, on_unexpected, f, &f->next, NULL), 0);
    assert_int_equal(cpm_sock_connect(f->next, "inproc://sink", NULL), 0);
    start(f, (cpm_worker_opts){.max_running = 1, .max_queue = 4, .pipeline = true,
                               .downstream = f->next, .ops = &ops});
    call(f, 4);
    call(f, 13);
    call(f, 5);
    run_until(f, &f->done_hooks, 3);
    run_until(f, &f->sunk, 2);
    assert_int_equal(f->sunk, 2);
    assert_int_equal(f->got_seq[0], 40);
    assert_int_equal(f->got_seq[1], 50);
    assert_int_equal(f->replies, 0);
    cpm_worker_stats st;
    cpm_worker_get_stats(f->w, &st);
    assert_int_equal(st.served, 2);
    assert_int_equal(st.failed, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_replies_and_handler_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_in_order_and_refused_when_full, setup, teardown),
        cmocka_unit_test_setup_teardown(test_per_sender_share, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bytes_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_with_work_queued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_idle_releases_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_loading_then_failed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipeline_downstream, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
