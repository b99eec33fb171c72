/* test_frames.c - the one multipart frame reader (services/common/frames.c) on real
 * inproc PUSH/PULL sockets: whole messages, the frame cap, nothing waiting, envelopes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/frames.h"

typedef struct fixture {
    void *z, *push, *pull;
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    f->z = zmq_ctx_new();
    f->pull = zmq_socket(f->z, ZMQ_PULL);
    f->push = zmq_socket(f->z, ZMQ_PUSH);
    assert_int_equal(zmq_bind(f->pull, "inproc://frames"), 0);
    assert_int_equal(zmq_connect(f->push, "inproc://frames"), 0);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    int zero = 0;
    zmq_setsockopt(f->push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(f->push);
    zmq_close(f->pull);
    zmq_ctx_term(f->z);
    free(f);
    return 0;
}

/* Sends n frames "f0", "f1", ... as one message. */
static void send_parts(fixture *f, int n) {
    for (int i = 0; i < n; i++) {
        char b[8];
        snprintf(b, sizeof b, "f%d", i);
        assert_true(zmq_send(f->push, b, strlen(b), i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
    }
}

static void test_nothing_waiting_is_eagain(void **state) {
    fixture *f = *state;
    cpm_frames fr;
    cpm_error e = {0};
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, ZMQ_DONTWAIT, &e), CPM_EAGAIN);
    assert_int_equal(fr.n, 0);
}

static void test_whole_message_in_order(void **state) {
    fixture *f = *state;
    send_parts(f, 2);
    cpm_frames fr;
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, 0, NULL), 0); /* blocking read */
    assert_int_equal(fr.n, 2);
    assert_int_equal(fr.extra, 0);
    assert_int_equal(cpm_frames_size(&fr, 1), 2);
    assert_memory_equal(cpm_frames_data(&fr, 1), "f1", 2);
    assert_null(cpm_frames_data(&fr, 2)); /* a frame the message did not have */
    assert_int_equal(cpm_frames_size(&fr, -1), 0);
    cpm_frames_close(&fr);
    assert_int_equal(fr.n, 0);
}

/* Frames beyond the cap are read and counted, never left for the next read. */
static void test_extra_frames_counted_and_drained(void **state) {
    fixture *f = *state;
    send_parts(f, 5);
    send_parts(f, 1);
    cpm_frames fr;
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, ZMQ_DONTWAIT, NULL), 0);
    assert_int_equal(fr.n, 2);
    assert_int_equal(fr.extra, 3);
    cpm_frames_close(&fr);
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 99, ZMQ_DONTWAIT, NULL), 0); /* capped at 3 */
    assert_int_equal(fr.n, 1);
    assert_int_equal(fr.extra, 0);
    assert_memory_equal(cpm_frames_data(&fr, 0), "f0", 2);
    cpm_frames_close(&fr);
    send_parts(f, 4);
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 99, ZMQ_DONTWAIT, NULL), 0);
    assert_int_equal(fr.n, CPM_FRAMES_MAX);
    assert_int_equal(fr.extra, 1);
    cpm_frames_close(&fr);
}

/* The Envelope frame with the next frame as its tensor, validated as cpm_wire_unpack does. */
static void test_envelope_and_tensor(void **state) {
    fixture *f = *state;
    uint32_t shape[] = {1, 2};
    Cpm__V1__TensorDesc td = CPM__V1__TENSOR_DESC__INIT;
    td.dtype = CPM__V1__DTYPE__DTYPE_F32;
    td.n_shape = 2;
    td.shape = shape;
    Cpm__V1__SampleRow row = CPM__V1__SAMPLE_ROW__INIT, *rows[] = {&row};
    Cpm__V1__SamplingParams p = CPM__V1__SAMPLING_PARAMS__INIT;
    row.params = &p;
    Cpm__V1__SampleRequest req = CPM__V1__SAMPLE_REQUEST__INIT;
    req.n_rows = 1;
    req.rows = rows;
    req.logits = &td;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = 5;
    env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLE;
    env.sample = &req;
    uint8_t *buf;
    size_t n;
    assert_int_equal(cpm_wire_pack(&env, &buf, &n, NULL), 0);
    float x[2] = {1, 2};
    zmq_send(f->push, buf, n, ZMQ_SNDMORE);
    zmq_send(f->push, x, sizeof x, 0);
    zmq_send(f->push, buf, n, 0); /* the same envelope without its tensor */
    zmq_send(f->push, "\xff\xff", 2, 0);
    free(buf);

    cpm_frames fr;
    cpm_envelope *out;
    cpm_error e = {0};
    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, 0, NULL), 0);
    assert_int_equal(cpm_frames_envelope(&fr, 0, &out, &e), 0);
    assert_int_equal(out->corr, 5);
    assert_memory_equal(cpm_frames_data(&fr, 1), x, sizeof x);
    cpm_wire_free(out);
    assert_int_equal(cpm_frames_envelope(&fr, 2, &out, &e), CPM_EFORMAT); /* no such frame */
    assert_null(out);
    cpm_frames_close(&fr);

    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, 0, NULL), 0);
    assert_int_equal(cpm_frames_envelope(&fr, 0, &out, &e), CPM_EFORMAT);
    assert_non_null(strstr(e.msg, "missing"));
    cpm_frames_close(&fr);

    assert_int_equal(cpm_frames_recv(&fr, f->pull, 2, 0, NULL), 0);
    assert_int_equal(cpm_frames_envelope(&fr, 0, &out, &e), CPM_EFORMAT);
    assert_null(out);
    cpm_frames_close(&fr);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_nothing_waiting_is_eagain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_whole_message_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_extra_frames_counted_and_drained, setup, teardown),
        cmocka_unit_test_setup_teardown(test_envelope_and_tensor, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
