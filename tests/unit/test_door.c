/* test_door.c - the HTTP door's policy (router/door.c): keys from a file and the
 * environment, Bearer checks, the open probes, CORS lines, and when an open door is
 * refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/door.h"
#include "support/scratch.h"

static cpm_config *config_in(const scratch *s, const char *router_extra) {
    char path[512], text[2048];
    snprintf(path, sizeof path, "%s/cluster.yaml", s->dir);
    snprintf(text, sizeof text,
             "router:\n  rpc: tcp://127.0.0.1:5550\n  results: tcp://127.0.0.1:5551\n%s"
             "tokenizers:\n  - endpoint: tcp://127.0.0.1:5560\n"
             "samplers:\n  - endpoint: tcp://127.0.0.1:5570\n"
             "stages:\n  - {layers: [0, end], endpoint: tcp://127.0.0.1:5580}\n", router_extra);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    cpm_config *c = NULL;
    cpm_error e = {0};
    if (cpm_config_load(path, &c, &e))
        fail_msg("%s", e.msg);
    return c;
}

static cpm_http_request request(const char *method, const char *path, int n,
                                const cpm_http_header *headers) {
    return (cpm_http_request){.method = method, .path = path, .query = "", .n_headers = n,
                              .headers = headers, .body = ""};
}

static void test_keys_from_file_and_env(void **state) {
    scratch *s = *state;
    char keys[512];
    snprintf(keys, sizeof keys, "%s/keys.txt", s->dir);
    FILE *f = fopen(keys, "w");
    fputs("# keys\n  sk-one  \n\nsk-two\n", f);
    fclose(f);
    setenv("CPM_API_KEYS", "sk-env, sk-env2", 1);
    cpm_config *c = config_in(s, "  api_keys: keys.txt\n");
    cpm_door *d;
    cpm_error e = {0};
    assert_int_equal(cpm_door_new(c, "0.0.0.0", NULL, &d, &e), 0);
    assert_int_equal(cpm_door_n_keys(d), 4);
    const char *good[] = {"Bearer sk-one", "Bearer sk-two", "bearer sk-env2", "Bearer  sk-env"};
    for (size_t i = 0; i < 4; i++) {
        cpm_http_header hd = {"Authorization", good[i]};
        cpm_http_request r = request("POST", "/v1/completions", 1, &hd);
        assert_true(cpm_door_admits(d, &r));
    }
    const char *bad[] = {"Bearer sk-on", "Bearer sk-one2", "Basic sk-one", "sk-one", "Bearer "};
    for (size_t i = 0; i < 5; i++) {
        cpm_http_header hd = {"Authorization", bad[i]};
        cpm_http_request r = request("POST", "/v1/completions", 1, &hd);
        assert_false(cpm_door_admits(d, &r));
    }
    cpm_http_request none = request("GET", "/metrics", 0, NULL);
    assert_false(cpm_door_admits(d, &none));
    assert_true(cpm_door_open("/health") && cpm_door_open("/ready") && cpm_door_open("/live"));
    assert_false(cpm_door_open("/metrics") || cpm_door_open("/v1/models"));
    unsetenv("CPM_API_KEYS");
    cpm_door_free(d);
    cpm_config_free(c);
}

static void test_open_door_policy(void **state) {
    scratch *s = *state;
    unsetenv("CPM_API_KEYS");
    cpm_config *c = config_in(s, "");
    cpm_door *d;
    cpm_error e = {0};
    assert_int_equal(cpm_door_new(c, "127.0.0.1", NULL, &d, &e), 0); /* loopback: open */
    cpm_http_request r = request("POST", "/v1/completions", 0, NULL);
    assert_true(cpm_door_admits(d, &r));
    cpm_door_free(d);
    assert_int_equal(cpm_door_new(c, "0.0.0.0", NULL, &d, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "CPM_API_KEYS"));
    /* loopback is read as an address: every spelling of this host, nothing else */
    const char *here[] = {"127.0.0.1", "127.1.2.3", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1",
                          "localhost"};
    for (size_t i = 0; i < sizeof here / sizeof *here; i++) {
        assert_int_equal(cpm_door_new(c, here[i], NULL, &d, &e), 0);
        cpm_door_free(d);
    }
    const char *beyond[] = {"::", "10.0.0.1", "128.0.0.1", "::10", "::ffff:10.0.0.1", "127.example"};
    for (size_t i = 0; i < sizeof beyond / sizeof *beyond; i++)
        assert_int_equal(cpm_door_new(c, beyond[i], NULL, &d, &e), CPM_EINVAL);
    cpm_config_free(c);
    c = config_in(s, "  auth: none\n");
    assert_int_equal(cpm_door_new(c, "0.0.0.0", NULL, &d, &e), 0);
    cpm_door_free(d);
    cpm_config_free(c);
    setenv("CPM_API_KEYS", "sk-env", 1); /* auth: none means open, keys or not */
    c = config_in(s, "  auth: none\n");
    assert_int_equal(cpm_door_new(c, "0.0.0.0", NULL, &d, &e), 0);
    assert_int_equal(cpm_door_n_keys(d), 0);
    assert_true(cpm_door_admits(d, &r));
    unsetenv("CPM_API_KEYS");
    cpm_door_free(d);
    cpm_config_free(c);
    c = config_in(s, "  api_keys: missing.txt\n");
    assert_int_equal(cpm_door_new(c, "127.0.0.1", NULL, &d, &e), CPM_EIO);
    assert_non_null(strstr(e.msg, "missing.txt"));
    cpm_config_free(c);
}

static void test_cors_lines(void **state) {
    scratch *s = *state;
    cpm_config *c = config_in(s, "  cors_origins: https://a.example, https://b.example\n");
    cpm_door *d;
    cpm_error e = {0};
    assert_int_equal(cpm_door_new(c, "127.0.0.1", NULL, &d, &e), 0);
    char out[1024];
    cpm_http_header ok = {"Origin", "https://b.example"}, other = {"Origin", "https://c.example"},
                    split = {"Origin", "https://a.example\r\nSet-Cookie: x"};
    cpm_http_request r = request("GET", "/health", 1, &ok);
    assert_string_equal(cpm_door_cors(d, &r, false, out, sizeof out),
                        "Access-Control-Allow-Origin: https://b.example\r\nVary: Origin\r\n");
    assert_non_null(strstr(cpm_door_cors(d, &r, true, out, sizeof out), "Access-Control-Max-Age"));
    r = request("GET", "/health", 1, &other);
    assert_string_equal(cpm_door_cors(d, &r, true, out, sizeof out), "");
    r = request("GET", "/health", 1, &split); /* a header split never reaches the response */
    assert_string_equal(cpm_door_cors(d, &r, false, out, sizeof out), "");
    assert_string_equal(cpm_door_cors(d, NULL, false, out, sizeof out), "");
    cpm_door_free(d);
    cpm_config_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_keys_from_file_and_env, scratch_setup, scratch_teardown),
        cmocka_unit_test_setup_teardown(test_open_door_policy, scratch_setup, scratch_teardown),
        cmocka_unit_test_setup_teardown(test_cors_lines, scratch_setup, scratch_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
