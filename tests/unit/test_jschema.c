/* test_jschema.c - services/sampler/jschema.c: the supported subset passes, everything else
 * is refused with a message naming the keyword's JSON pointer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "services/sampler/jschema.h"

static const char *const accepted[] = {
    "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\"},\"b\":{\"type\":\"integer\"}},"
    "\"required\":[\"a\",\"b\"],\"additionalProperties\":false}",
    "{\"type\":[\"string\",\"null\"],\"description\":\"d\",\"title\":\"t\"}",
    "{\"enum\":[1,\"x\",null,{\"k\":[true]}]}",
    "{\"const\":{\"a\":1}}",
    "{\"type\":\"array\",\"items\":{\"type\":\"number\"},\"minItems\":1,\"maxItems\":3}",
    "{\"anyOf\":[{\"type\":\"boolean\"},{\"$ref\":\"#/$defs/n\"}],\"$defs\":{\"n\":{\"type\":\"null\"}}}",
    "{\"$schema\":\"x\",\"$id\":\"y\",\"definitions\":{\"t\":{\"type\":\"object\",\"properties\":"
    "{\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/t\"}}}}},"
    "\"$ref\":\"#/definitions/t\"}",
    "{\"allOf\":[{\"type\":\"string\"}]}",
    /* a reused sub-schema as zod-to-json-schema (LangChain.js) writes it: a pointer to where
     * it first stands; and pointers through items, anyOf, escapes */
    "{\"type\":\"object\",\"properties\":{\"home\":{\"type\":\"object\",\"properties\":"
    "{\"city\":{\"type\":\"string\"}}},\"work\":{\"$ref\":\"#/properties/home\"},"
    "\"city\":{\"$ref\":\"#/properties/home/properties/city\"}}}",
    "{\"type\":\"array\",\"items\":{\"anyOf\":[{\"type\":\"null\"},{\"type\":\"array\","
    "\"items\":{\"$ref\":\"#/items/anyOf/1\"}}]}}",
    "{\"$defs\":{\"a/b\":{\"type\":\"null\"},\"c~d\":{\"$ref\":\"#/%24defs/a~1b\"}},"
    "\"$ref\":\"#/$defs/c~0d\"}",
};

static const struct {
    const char *schema;
    const char *message;
} refused[] = {
    {"{\"type\":\"string\",\"pattern\":\"a+\"}", "/pattern: not supported"},
    {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"format\":\"date\"}}}",
     "/properties/a/format: not supported"},
    {"{\"type\":\"array\",\"items\":{\"minLength\":2}}", "/items/minLength: not supported"},
    {"{\"oneOf\":[{\"type\":\"string\"}]}", "/oneOf: not supported"},
    {"{\"allOf\":[{\"type\":\"string\"},{\"type\":\"null\"}]}", "/allOf: not supported"},
    {"{\"anyOf\":[{\"type\":\"string\"},{\"if\":{}}]}", "/anyOf/1/if: not supported"},
    {"{\"patternProperties\":{}}", "/patternProperties: not supported"},
    {"{\"type\":\"object\",\"additionalProperties\":true}", "/additionalProperties: not supported"},
    {"{\"type\":\"strng\"}", "/type: unknown type"},
    {"{\"type\":[\"string\",5]}", "/type/1: unknown type"},
    {"{\"$ref\":\"#/$defs/missing\"}", "/$ref: \"#/$defs/missing\" does not name"},
    {"{\"$ref\":\"http://x/y.json\"}", "does not name a schema in this document"},
    /* pointers to what is not a schema, or not through the keywords that hold schemas */
    {"{\"required\":[\"a\"],\"anyOf\":[{\"$ref\":\"#/required/0\"}]}", "/anyOf/0/$ref"},
    {"{\"properties\":{\"a\":{\"description\":\"x\"},\"b\":{\"$ref\":\"#/properties/a/description\"}}}",
     "/properties/b/$ref"},
    {"{\"properties\":{\"a\":{\"$ref\":\"#/properties\"}}}", "/properties/a/$ref"},
    {"{\"anyOf\":[{\"type\":\"null\"},{\"$ref\":\"#/anyOf/x\"}]}", "/anyOf/1/$ref"},
    {"{\"anyOf\":[{\"type\":\"null\"},{\"$ref\":\"#/anyOf/5\"}]}", "/anyOf/1/$ref"},
    {"{\"$defs\":{\"a\":{}},\"$ref\":\"#/$defs/a~2\"}", "/$ref"},
    {"{\"$defs\":{\"a\":{}},\"$ref\":\"#/$defs/a/\"}", "/$ref"},
    {"[1]", "a schema must be an object"},
    {"{\"type\":", "schema: not JSON"},
};

static void test_accepts_subset(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof accepted / sizeof *accepted; i++) {
        cpm_error err = {0};
        int rc = cpm_jschema_check(CPM_JSCHEMA_JSON_SCHEMA, accepted[i], 0, &err);
        if (rc)
            fail_msg("schema %zu refused: %s", i, err.msg);
    }
}

static void test_refuses_with_path(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        cpm_error err = {0};
        assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_JSON_SCHEMA, refused[i].schema, 0, &err),
                         CPM_EINVAL);
        if (!strstr(err.msg, refused[i].message))
            fail_msg("schema %zu: \"%s\" lacks \"%s\"", i, err.msg, refused[i].message);
    }
}

/* Deep nesting is refused, not recursed into without bound. */
static void test_depth_bounded(void **state) {
    (void)state;
    char deep[4096] = "";
    for (int i = 0; i < 200; i++)
        strcat(deep, "{\"items\":");
    strcat(deep, "{}");
    for (int i = 0; i < 200; i++)
        strcat(deep, "}");
    cpm_error err = {0};
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_JSON_SCHEMA, deep, 0, &err), CPM_EINVAL);
    assert_non_null(strstr(err.msg, "nested deeper than"));
}

static void test_tool_calls(void **state) {
    (void)state;
    const char *two = "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
                      "{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"integer\"}}}}},"
                      "{\"type\":\"function\",\"function\":{\"name\":\"g\"}}]";
    cpm_error err = {0};
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, two, 0, &err), 0);
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, two, 1, &err), CPM_EINVAL);
    const char *bad = "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
                      "{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"string\","
                      "\"maxLength\":3}}}}}]";
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, bad, 0, &err), CPM_EINVAL);
    assert_non_null(strstr(err.msg, "/0/function/parameters/properties/x/maxLength"));
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, "[{}]", 0, &err), CPM_EINVAL);
    /* a forced call names its arguments as Python keywords */
    const char *dash = "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
                       "{\"type\":\"object\",\"properties\":{\"max-items\":{\"type\":\"integer\"}}}}}]";
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, dash, 0, &err), CPM_EINVAL);
    assert_non_null(strstr(err.msg, "max-items: not a Python identifier"));
    assert_int_equal(cpm_jschema_check(CPM_JSCHEMA_JSON_OBJECT, NULL, 0, &err), 0);
    assert_int_equal(cpm_jschema_check(9, "{}", 0, &err), CPM_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_subset),
        cmocka_unit_test(test_refuses_with_path),
        cmocka_unit_test(test_depth_bounded),
        cmocka_unit_test(test_tool_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
