/* test_cli.c - common/cli: option tables through getopt_long, the generated usage text,
 * and the checked values' messages. (--help/--version/bad options exit: tests/cli_help.sh.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common/cli.h"

enum { OPT_MODEL = 1, OPT_N, OPT_FLAG, OPT_EXTRA };

static const cpm_cli_opt opts[] = {
    {"model", 'm', "DIR", "the model", OPT_MODEL},
    {"n", 0, "N", "how many", OPT_N},
    {"flag", 0, NULL, "a flag", OPT_FLAG},
    {0},
};
static const cpm_cli_opt extra[] = {{"extra", 0, "X", "from a second table", OPT_EXTRA}, {0}};

static void test_next(void **state) {
    (void)state;
    char *argv[] = {"prog", "pos1", "--model", "d", "--flag", "-m", "e", "--n=3", "--extra", "x",
                    "pos2", NULL};
    int argc = (int)(sizeof argv / sizeof *argv) - 1;
    cpm_cli cli = {.prog = "prog", .tables = {opts, extra}};
    int want[] = {OPT_MODEL, OPT_FLAG, OPT_MODEL, OPT_N, OPT_EXTRA};
    const char *want_val[] = {"d", NULL, "e", "3", "x"};
    const char *want_name[] = {"model", "flag", "model", "n", "extra"};
    const char *v;
    for (int i = 0; i < 5; i++) {
        assert_int_equal(cpm_cli_next(&cli, argc, argv, &v), want[i]);
        if (want_val[i])
            assert_string_equal(v, want_val[i]);
        else
            assert_null(v);
        assert_string_equal(cli.opt_name, want_name[i]);
    }
    assert_int_equal(cpm_cli_next(&cli, argc, argv, &v), -1);
    /* positional arguments anywhere, in order, after the options */
    assert_int_equal(argc - cli.optind, 2);
    assert_string_equal(argv[cli.optind], "pos1");
    assert_string_equal(argv[cli.optind + 1], "pos2");
}

static void test_usage(void **state) {
    (void)state;
    cpm_cli cli = {.prog = "cpm-x", .synopsis = "--model DIR [options]", .tables = {opts, extra},
                   .about = "More words.\n"};
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cpm_cli_usage(&cli, f);
    fclose(f);
    assert_true(strncmp(buf, "usage: cpm-x --model DIR [options]\n", 35) == 0);
    assert_non_null(strstr(buf, "  -m, --model DIR"));
    assert_non_null(strstr(buf, "      --flag "));
    assert_non_null(strstr(buf, "--extra X"));
    assert_non_null(strstr(buf, "from a second table"));
    assert_non_null(strstr(buf, "  -h, --help"));
    assert_non_null(strstr(buf, "  -V, --version"));
    assert_non_null(strstr(buf, "\nMore words.\n"));
    free(buf);
    assert_non_null(cpm_cli_version());
    assert_true(strlen(cpm_cli_version()) > 0);
}

static void test_values(void **state) {
    (void)state;
    char msg[128];
    long long v;
    int port;
    double d;
    assert_int_equal(cpm_cli_parse_int("n", "42", 0, INT_MAX, &v, msg, sizeof msg), 0);
    assert_int_equal(v, 42);
    assert_int_equal(cpm_cli_parse_int("n", "-1", -1, 5, &v, msg, sizeof msg), 0);
    assert_int_equal(cpm_cli_parse_int("n", "x", 0, INT_MAX, &v, msg, sizeof msg), -1);
    assert_string_equal(msg, "--n: 'x' is not an integer >= 0");
    assert_int_equal(cpm_cli_parse_int("n", "6", 1, 5, &v, msg, sizeof msg), -1);
    assert_string_equal(msg, "--n: '6' is not an integer in [1, 5]");
    assert_int_equal(cpm_cli_parse_int("n", "", 0, 5, &v, msg, sizeof msg), -1);
    assert_int_equal(cpm_cli_parse_int("n", "3x", 0, 5, &v, msg, sizeof msg), -1);
    assert_int_equal(cpm_cli_parse_int("n", "99999999999999999999", 0, LLONG_MAX, &v, msg,
                                       sizeof msg), -1);
    assert_int_equal(cpm_cli_parse_port("port", "8080", &port, msg, sizeof msg), 0);
    assert_int_equal(port, 8080);
    assert_int_equal(cpm_cli_parse_port("port", "0", &port, msg, sizeof msg), 0);
    assert_int_equal(cpm_cli_parse_port("port", "65536", &port, msg, sizeof msg), -1);
    assert_string_equal(msg, "--port: '65536' is not a port number");
    assert_int_equal(cpm_cli_parse_float("top-p", "0.5", &d, msg, sizeof msg), 0);
    assert_true(d == 0.5);
    assert_int_equal(cpm_cli_parse_float("top-p", "nan", &d, msg, sizeof msg), -1);
    assert_int_equal(cpm_cli_parse_float("top-p", "1.0q", &d, msg, sizeof msg), -1);
    assert_string_equal(msg, "--top-p: '1.0q' is not a number");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_next),
        cmocka_unit_test(test_usage),
        cmocka_unit_test(test_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
