/* test_curve.c - CurveZMQ keys and admission (services/common/curve.c), with real zmq
 * sockets on tcp loopback: key files made, kept and checked; the fabric key is admitted
 * on both domains, a client key only on the RPC's, a stranger and plain text nowhere. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zmq.h>

#include "services/common/curve.h"
#include "support/scratch.h"

static void path_of(char *out, size_t size, const scratch *s, const char *name) {
    snprintf(out, size, "%s/%s", s->dir, name);
}

static void test_generate_keeps_and_protects(void **state) {
    scratch *s = *state;
    char dir[512], sec[600], pub[600];
    path_of(dir, sizeof dir, s, "keys");
    cpm_error e = {0};
    bool made;
    assert_int_equal(cpm_curve_generate(dir, "app", &made, &e), 0);
    assert_true(made);
    snprintf(sec, sizeof sec, "%s/fabric.secret", dir);
    snprintf(pub, sizeof pub, "%s/client-app.pub", dir);
    struct stat st;
    assert_int_equal(stat(sec, &st), 0);
    assert_int_equal(st.st_mode & 077, 0); /* nobody else reads a secret */
    assert_int_equal(stat(dir, &st), 0);
    assert_int_equal(st.st_mode & 077, 0);
    assert_int_equal(stat(pub, &st), 0);
    FILE *f = fopen(sec, "r");
    char before[256] = "", after[256] = "";
    assert_non_null(fgets(before, sizeof before, f));
    fclose(f);
    assert_int_equal(cpm_curve_generate(dir, "app", &made, &e), 0);
    assert_false(made); /* a second run keeps the cluster's keys */
    f = fopen(sec, "r");
    assert_non_null(fgets(after, sizeof after, f));
    fclose(f);
    assert_string_equal(before, after);
    assert_int_equal(cpm_curve_generate(dir, "../evil", &made, &e), CPM_EINVAL);
}

static void test_load_errors_name_the_file(void **state) {
    scratch *s = *state;
    char dir[512], file[600];
    path_of(dir, sizeof dir, s, "keys");
    cpm_curve *c;
    cpm_error e = {0};
    assert_int_not_equal(cpm_curve_load(dir, &c, &e), 0);
    assert_non_null(strstr(e.msg, "cpm-cluster keys"));
    bool made;
    assert_int_equal(cpm_curve_generate(dir, NULL, &made, &e), 0);
    /* a public key that is not the secret's */
    snprintf(file, sizeof file, "%s/fabric.pub", dir);
    char pub[41], sec[41];
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    FILE *f = fopen(file, "w");
    fprintf(f, "# another key\n%s\n", pub);
    fclose(f);
    assert_int_equal(cpm_curve_load(dir, &c, &e), CPM_EFORMAT);
    assert_non_null(strstr(e.msg, "does not belong"));
    f = fopen(file, "w");
    fprintf(f, "not a key\n");
    fclose(f);
    assert_int_equal(cpm_curve_load(dir, &c, &e), CPM_EFORMAT);
    assert_non_null(strstr(e.msg, "fabric.pub"));
}

/* ---- admission over real sockets ---- */

typedef struct fixture {
    scratch *s;
    char dir[512];
    void *z;
    cpm_curve *server;
    void *fabric_sock, *rpc_sock;
    char fabric_ep[64], rpc_ep[64];
} fixture;

static void *listen_on(fixture *f, const char *domain, char *ep, size_t ep_size) {
    void *s = zmq_socket(f->z, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    cpm_error e = {0};
    assert_int_equal(cpm_curve_listen(f->server, s, domain, &e), 0);
    assert_int_equal(zmq_bind(s, "tcp://127.0.0.1:*"), 0);
    size_t n = ep_size;
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, ep, &n);
    return s;
}

static int fixture_setup(void **state) {
    scratch_setup(state);
    fixture *f = calloc(1, sizeof *f);
    f->s = *state;
    path_of(f->dir, sizeof f->dir, f->s, "keys");
    cpm_error e = {0};
    bool made;
    if (cpm_curve_generate(f->dir, "app", &made, &e) || cpm_curve_load(f->dir, &f->server, &e))
        return -1;
    f->z = zmq_ctx_new();
    if (cpm_curve_attach(f->server, f->z, NULL, &e))
        return -1;
    f->fabric_sock = listen_on(f, CPM_CURVE_FABRIC, f->fabric_ep, sizeof f->fabric_ep);
    f->rpc_sock = listen_on(f, CPM_CURVE_RPC, f->rpc_ep, sizeof f->rpc_ep);
    *state = f;
    return 0;
}

static int fixture_teardown(void **state) {
    fixture *f = *state;
    zmq_close(f->fabric_sock);
    zmq_close(f->rpc_sock);
    zmq_ctx_term(f->z);
    cpm_curve_free(f->server);
    *state = f->s;
    free(f);
    return scratch_teardown(state);
}

/* Sends "ping" from a DEALER with the given keys (NULL: plain text) and says whether the
 * listener got it within 500 ms. */
static bool reaches(fixture *f, void *listener, const char *ep, const cpm_curve *keys) {
    void *d = zmq_socket(f->z, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    cpm_error e = {0};
    if (keys)
        assert_int_equal(cpm_curve_dial(keys, d, &e), 0);
    assert_int_equal(zmq_connect(d, ep), 0);
    zmq_send(d, "ping", 4, ZMQ_DONTWAIT);
    zmq_pollitem_t it = {.socket = listener, .events = ZMQ_POLLIN};
    bool got = zmq_poll(&it, 1, 500) > 0;
    while (zmq_poll(&it, 1, 0) > 0) { /* drain (identity + body) */
        zmq_msg_t m;
        zmq_msg_init(&m);
        zmq_msg_recv(&m, listener, 0);
        zmq_msg_close(&m);
    }
    zmq_close(d);
    return got;
}

static void test_fabric_key_is_admitted_everywhere(void **state) {
    fixture *f = *state;
    assert_true(reaches(f, f->fabric_sock, f->fabric_ep, f->server));
    assert_true(reaches(f, f->rpc_sock, f->rpc_ep, f->server));
    assert_int_equal(cpm_curve_refused(f->server), 0);
}

static void test_client_key_only_on_the_rpc(void **state) {
    fixture *f = *state;
    cpm_curve *client;
    cpm_error e = {0};
    assert_int_equal(cpm_curve_load_client(f->dir, "app", &client, &e), 0);
    assert_true(reaches(f, f->rpc_sock, f->rpc_ep, client));
    assert_false(reaches(f, f->fabric_sock, f->fabric_ep, client));
    assert_true(cpm_curve_refused(f->server) >= 1);
    cpm_curve_free(client);
}

static void test_strangers_and_plain_text_are_refused(void **state) {
    fixture *f = *state;
    char other[600];
    path_of(other, sizeof other, f->s, "other");
    cpm_curve *stranger;
    cpm_error e = {0};
    bool made;
    /* a valid CURVE peer that knows our public key but holds no key we allowed */
    char cmd[2048];
    assert_int_equal(cpm_curve_generate(other, "x", &made, &e), 0);
    snprintf(cmd, sizeof cmd, "cp %s/fabric.pub %s/fabric.pub", f->dir, other);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(cpm_curve_load_client(other, "x", &stranger, &e), 0);
    assert_false(reaches(f, f->rpc_sock, f->rpc_ep, stranger));
    assert_false(reaches(f, f->fabric_sock, f->fabric_ep, stranger));
    assert_false(reaches(f, f->fabric_sock, f->fabric_ep, NULL));
    assert_false(reaches(f, f->rpc_sock, f->rpc_ep, NULL));
    assert_true(cpm_curve_refused(f->server) >= 2);
    cpm_curve_free(stranger);
}

static void test_one_zap_handler_per_context(void **state) {
    fixture *f = *state;
    cpm_curve *again;
    cpm_error e = {0};
    assert_int_equal(cpm_curve_load(f->dir, &again, &e), 0);
    assert_int_not_equal(cpm_curve_attach(again, f->z, NULL, &e), 0);
    cpm_curve_free(again);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_generate_keeps_and_protects, scratch_setup,
                                        scratch_teardown),
        cmocka_unit_test_setup_teardown(test_load_errors_name_the_file, scratch_setup,
                                        scratch_teardown),
        cmocka_unit_test_setup_teardown(test_fabric_key_is_admitted_everywhere, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_client_key_only_on_the_rpc, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_strangers_and_plain_text_are_refused, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_one_zap_handler_per_context, fixture_setup,
                                        fixture_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
