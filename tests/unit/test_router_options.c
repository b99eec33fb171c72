/* test_router_options.c - router/options: cpm-router's flags over the cluster file
 * (--model, --port, --host), loading errors, the address the log names. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "router/options.h"

#define CFG                                  \
    "model: /m/a\n"                          \
    "router:\n"                              \
    "  rpc: tcp://127.0.0.1:5550\n"          \
    "  results: tcp://127.0.0.1:5551\n"      \
    "  http: 10.0.0.1:8080\n"                \
    "tokenizers:\n"                          \
    "  - endpoint: tcp://127.0.0.1:5560\n"   \
    "samplers:\n"                            \
    "  - endpoint: tcp://127.0.0.1:5570\n"   \
    "stages:\n"                              \
    "  - layers: [0, end]\n"                 \
    "    endpoint: tcp://127.0.0.1:5580\n"

static cpm_config *parse(void) {
    cpm_config *c;
    cpm_error e = {0};
    if (cpm_config_parse(CFG, strlen(CFG), "t.yaml", &c, &e))
        fail_msg("%s", e.msg);
    return c;
}

static void test_no_flags(void **state) {
    (void)state;
    cpm_config *c = parse();
    cpm_router_args a = cpm_router_options_args_default();
    cpm_router_opts o;
    cpm_router_options_apply(&a, c, NULL, &o);
    cpm_router_opts d = cpm_router_opts_default();
    assert_int_equal(o.http_port, -1); /* the file's */
    assert_null(o.http_addr);
    assert_null(o.log);
    assert_int_equal(o.health_interval_ms, d.health_interval_ms);
    assert_string_equal(c->model, "/m/a");
    assert_string_equal(cpm_router_options_http_host(&o, c), "10.0.0.1");
    cpm_config_free(c);
}

static void test_flags_win(void **state) {
    (void)state;
    cpm_config *c = parse();
    cpm_router_args a = cpm_router_options_args_default();
    cpm_log log = {.service = "router"};
    a.model = "/m/b";
    a.port = 0;
    a.host = "127.0.0.2";
    cpm_router_opts o;
    cpm_router_options_apply(&a, c, &log, &o);
    assert_int_equal(o.http_port, 0);
    assert_string_equal(o.http_addr, "127.0.0.2");
    assert_ptr_equal(o.log, &log);
    assert_string_equal(c->model, "/m/b");
    assert_string_equal(cpm_router_options_http_host(&o, c), "127.0.0.2");
    cpm_config_free(c);
}

static void test_load_errors(void **state) {
    (void)state;
    cpm_router_args a = cpm_router_options_args_default();
    cpm_config *c = (cpm_config *)&a; /* must come back NULL */
    cpm_router_opts o;
    cpm_error e = {0};
    assert_int_equal(cpm_router_options_load(&a, NULL, &c, &o, &e), CPM_EINVAL);
    assert_null(c);
    assert_non_null(strstr(e.msg, "--config FILE"));
    a.config_path = "/nonexistent/cluster.yaml";
    assert_int_not_equal(cpm_router_options_load(&a, NULL, &c, &o, &e), 0);
    assert_null(c);
    assert_non_null(strstr(e.msg, "/nonexistent/cluster.yaml"));
}

/* A real file from the repository, with --model over it. */
static void test_load_file(void **state) {
    (void)state;
    cpm_router_args a = cpm_router_options_args_default();
    a.config_path = CPM_SOURCE_ROOT "/cluster-config/default.yaml";
    a.model = "/m/c";
    a.port = 0;
    cpm_config *c;
    cpm_router_opts o;
    cpm_error e = {0};
    if (cpm_router_options_load(&a, NULL, &c, &o, &e))
        fail_msg("%s", e.msg);
    assert_string_equal(c->model, "/m/c");
    assert_int_equal(o.http_port, 0);
    cpm_config_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_flags),
        cmocka_unit_test(test_flags_win),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_load_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
