/* test_peerwatch.c - a connecting socket's link state (services/common/peerwatch.c), with
 * real sockets on tcp loopback: up after the handshake, a drop when the peer goes, up
 * again when it comes back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <zmq.h>

#include "services/common/peerwatch.h"

/* Waits up to ms for the watch to say up == want. */
static bool wait_up(cpm_peerwatch *w, bool want, int ms) {
    for (int waited = 0; waited <= ms; waited += 20) {
        cpm_peerwatch_update(w);
        if (cpm_peerwatch_up(w) == want)
            return true;
        zmq_pollitem_t it = {.socket = cpm_peerwatch_socket(w), .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, 20);
    }
    return false;
}

static void *listener(void *z, const char *ep) {
    void *s = zmq_socket(z, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(s, ep), 0);
    return s;
}

static void test_up_drop_and_back(void **state) {
    (void)state;
    void *z = zmq_ctx_new();
    void *server = listener(z, "tcp://127.0.0.1:*");
    char ep[64];
    size_t n = sizeof ep;
    zmq_getsockopt(server, ZMQ_LAST_ENDPOINT, ep, &n);
    void *d = zmq_socket(z, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    cpm_peerwatch *w;
    cpm_error e = {0};
    assert_int_equal(cpm_peerwatch_new(z, d, &w, &e), 0);
    assert_false(cpm_peerwatch_up(w)); /* nothing known before the handshake */
    assert_int_equal(zmq_connect(d, ep), 0);
    assert_true(wait_up(w, true, 2000));
    assert_int_equal(cpm_peerwatch_drops(w), 0);

    zmq_close(server); /* the peer goes: a drop at once, not at a deadline */
    assert_true(wait_up(w, false, 2000));
    assert_int_equal(cpm_peerwatch_drops(w), 1);

    server = listener(z, ep); /* it comes back on the same address: reconnected */
    assert_true(wait_up(w, true, 5000));
    assert_int_equal(cpm_peerwatch_drops(w), 1);

    cpm_peerwatch_free(w);
    zmq_close(d);
    zmq_close(server);
    zmq_ctx_term(z);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_up_drop_and_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
