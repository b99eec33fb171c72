/* test_log.c - services/common/log.c: text and JSON lines, and cpm_log_kv's fields
 * (numbers as JSON numbers, strings escaped) as a log pipeline would read them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/log.h"

/* The one line l wrote into the memory stream. */
static char *line_of(void (*write)(const cpm_log *), int format) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cpm_log l = {.service = "router", .out = f, .format = format, .min_level = CPM_LOG_INFO};
    write(&l);
    fclose(f);
    return buf;
}

static void access_line(const cpm_log *l) {
    cpm_log_kv(l, CPM_LOG_INFO, NULL, "access",
               "method=POST path=/v1/completions status=200 duration_ms=12.5 odd=a\"b");
}

static void test_kv_text(void **state) {
    (void)state;
    char *s = line_of(access_line, CPM_LOG_TEXT);
    assert_non_null(strstr(s, " info  router access method=POST path=/v1/completions status=200 "
                              "duration_ms=12.5 odd=a\"b\n"));
    free(s);
}

static void test_kv_json(void **state) {
    (void)state;
    char *s = line_of(access_line, CPM_LOG_JSON);
    json_error_t je;
    json_t *o = json_loads(s, 0, &je);
    if (!o)
        fail_msg("not JSON (%s): %s", je.text, s);
    assert_string_equal(json_string_value(json_object_get(o, "msg")), "access");
    assert_string_equal(json_string_value(json_object_get(o, "path")), "/v1/completions");
    assert_true(json_is_integer(json_object_get(o, "status")));
    assert_int_equal(json_integer_value(json_object_get(o, "status")), 200);
    assert_true(json_is_real(json_object_get(o, "duration_ms")));
    assert_string_equal(json_string_value(json_object_get(o, "odd")), "a\"b");
    json_decref(o);
    free(s);
}

static void below_level(const cpm_log *l) {
    cpm_log_kv(l, CPM_LOG_DEBUG, NULL, "quiet", "a=1");
}

static void test_level_filter(void **state) {
    (void)state;
    char *s = line_of(below_level, CPM_LOG_JSON);
    assert_true(s == NULL || s[0] == '\0');
    free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_text),
        cmocka_unit_test(test_kv_json),
        cmocka_unit_test(test_level_filter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
