/* test_torch_pickle.c - shard/engine/model/torch_pickle.c on hand-assembled pickles.
 *
 * The opcodes below are what protocol-2 pickle emits for a state dict (see
 * tests/data/checkpoints/make_fixtures.py for the real thing); the hostile ones
 * probe the allow-list and every bound.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "shard/engine/model/torch_pickle.h"

#define WHERE "m.bin: archive/data.pkl"

static int parse(const void *buf, size_t len, cpm_torch_pickle **ret, cpm_error *err) {
    return cpm_torch_pickle_parse(buf, len, WHERE, ret, err);
}

#define PARSE_LIT(lit, ret, err) parse((lit), sizeof(lit) - 1, (ret), (err))

static void expect_error(const void *buf, size_t len, int code, const char *needle) {
    cpm_torch_pickle *tp = (cpm_torch_pickle *)1;
    cpm_error err = {0};
    int rc = parse(buf, len, &tp, &err);
    if (rc != code)
        fail_msg("expected %s, got %s: %s", cpm_errname(code), cpm_errname(rc), err.msg);
    assert_null(tp);
    assert_non_null(strstr(err.msg, WHERE ": "));
    if (!strstr(err.msg, needle))
        fail_msg("message '%s' does not contain '%s'", err.msg, needle);
}

#define EXPECT_LIT(lit, code, needle) expect_error((lit), sizeof(lit) - 1, (code), (needle))

/* OrderedDict() with one BF16 tensor "w" of size (2,3), stride (3,1), offset 1,
 * written with memo puts and gets and a BUILD of _metadata, as torch.save does. */
static const char good[] =
    "\x80\x02" "ccollections\nOrderedDict\nq\x00)Rq\x01("
    "X\x01\0\0\0wq\x02" "ctorch._utils\n_rebuild_tensor_v2\nq\x03(("
    "X\x07\0\0\0storageq\x04" "ctorch\nBFloat16Storage\nq\x05"
    "X\x01\0\0\0" "0q\x06X\x03\0\0\0cpuq\x07K\x07tq\x08Q"
    "K\x01K\x02K\x03\x86q\x09K\x03K\x01\x86q\x0a\x89h\x00)Rq\x0btq\x0cRq\x0d"
    "u}q\x0eX\x09\0\0\0_metadataq\x0fh\x00)Rsb.";

static void test_state_dict(void **state) {
    (void)state;
    cpm_torch_pickle *tp = NULL;
    cpm_error err = {0};
    if (PARSE_LIT(good, &tp, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(cpm_torch_pickle_count(tp), 1);
    const cpm_torch_tensor *t = cpm_torch_pickle_at(tp, 0);
    assert_string_equal(t->name, "w");
    assert_string_equal(t->storage_key, "0");
    assert_string_equal(t->dtype, "BF16");
    assert_int_equal(t->elsize, 2);
    assert_int_equal(t->storage_numel, 7);
    assert_int_equal(t->offset, 1);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->size[0], 2);
    assert_int_equal(t->size[1], 3);
    assert_int_equal(t->stride[0], 3);
    assert_int_equal(t->stride[1], 1);
    assert_null(cpm_torch_pickle_at(tp, 1));
    cpm_torch_pickle_free(tp);
    cpm_torch_pickle_free(NULL);
}

static void test_every_prefix_fails_cleanly(void **state) {
    (void)state;
    /* Any cut before STOP must be an error, never a read past the end. */
    for (size_t n = 0; n < sizeof good - 2; n++) {
        cpm_torch_pickle *tp = (cpm_torch_pickle *)1;
        cpm_error err = {0};
        int rc = parse(good, n, &tp, &err);
        assert_true(rc < 0);
        assert_null(tp);
    }
}

static void test_long_and_protocol4(void **state) {
    (void)state;
    /* FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE and LONG1 numel 2^32. */
    static const char p4[] =
        "\x80\x04\x95\x10\0\0\0\0\0\0\0}\x94\x8c\x01w\x94"
        "\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93\x94(("
        "\x8c\x07storage\x8c\x05torch\x8c\x0c" "FloatStorage\x93\x8c\x01" "0\x8c\x03" "cpu"
        "\x8a\x05\0\0\0\0\x01tQK\0\x8a\x05\0\0\0\0\x01\x85K\x01\x85\x88}\x94tRs.";
    cpm_torch_pickle *tp = NULL;
    cpm_error err = {0};
    if (PARSE_LIT(p4, &tp, &err) != 0)
        fail_msg("%s", err.msg);
    const cpm_torch_tensor *t = cpm_torch_pickle_at(tp, 0);
    assert_int_equal(t->storage_numel, 1ull << 32);
    assert_int_equal(t->size[0], 1ll << 32);
    assert_string_equal(t->dtype, "F32");
    cpm_torch_pickle_free(tp);
}

static void test_evil_globals(void **state) {
    (void)state;
    EXPECT_LIT("\x80\x02" "cos\nsystem\nX\x02\0\0\0ls\x85R.", CPM_EUNSUPPORTED,
               "global 'os.system' is not allowed");
    EXPECT_LIT("\x80\x02" "cbuiltins\neval\n.", CPM_EUNSUPPORTED,
               "global 'builtins.eval' is not allowed");
    EXPECT_LIT("\x80\x04\x8c\x02os\x8c\x06system\x93.", CPM_EUNSUPPORTED,
               "global 'os.system' is not allowed");
    EXPECT_LIT("\x80\x02" "ctorch\nload\n.", CPM_EUNSUPPORTED, "global 'torch.load'");
    /* allowed names that cannot be called */
    EXPECT_LIT("\x80\x02" "ctorch\nFloatStorage\n)R.", CPM_EFORMAT, "cannot be called");
    EXPECT_LIT("\x80\x02" "ccollections\nOrderedDict\nK\x01\x85R.", CPM_EFORMAT,
               "OrderedDict called with arguments");
}

static void test_unsupported_opcodes(void **state) {
    (void)state;
    EXPECT_LIT("\x80\x02" "S'x'\n.", CPM_EUNSUPPORTED, "opcode not supported");
    EXPECT_LIT("\x80\x02" "}\x81.", CPM_EUNSUPPORTED, "opcode 0x81");
    EXPECT_LIT("\x80\x01}.", CPM_EUNSUPPORTED, "protocol");
}

static void test_malformed(void **state) {
    (void)state;
    EXPECT_LIT("\x80\x02}", CPM_EFORMAT, "no STOP");
    EXPECT_LIT("\x80\x02X\xff\0\0\0abc", CPM_EFORMAT, "truncated");
    EXPECT_LIT("\x80\x02.", CPM_EFORMAT, "stack underflow");
    EXPECT_LIT("\x80\x02h\x05.", CPM_EFORMAT, "memo entry read before");
    EXPECT_LIT("\x80\x02t.", CPM_EFORMAT, "no MARK");
    EXPECT_LIT("\x80\x02]K\x01s.", CPM_EFORMAT, "stack underflow");
    EXPECT_LIT("\x80\x02]K\x01K\x02s.", CPM_EFORMAT, "SETITEM on something that is not a dict");
    EXPECT_LIT("\x80\x02K\x01]b.", CPM_EFORMAT, "BUILD on something that is not a dict");
    EXPECT_LIT("\x80\x02]K\x01Q.", CPM_EFORMAT, "persistent id is not");
    EXPECT_LIT("\x80\x02]K\x01\x85R.", CPM_EFORMAT, "REDUCE needs an allowed global");
    EXPECT_LIT("\x80\x02]K\x01" "a.", CPM_EFORMAT, "the pickled object is not a dict");
    EXPECT_LIT("\x80\x02}K\x01K\x02s.", CPM_EFORMAT, "dict key 0 is not a string");
    EXPECT_LIT("\x80\x02}X\x01\0\0\0wK\x02s.", CPM_EFORMAT, "entry w is not a tensor");
    EXPECT_LIT("\x80\x02\x8a\x09\0\0\0\0\0\0\0\0\x01.", CPM_ELIMIT, "wider than 64 bits");
    EXPECT_LIT("\x80\x02" "cos\nsys\0tem\n.", CPM_EFORMAT, "bad GLOBAL name");
    EXPECT_LIT("\x80\x02r\0\0\0\x40.", CPM_EFORMAT, "stack underflow");
    EXPECT_LIT("\x80\x02}r\0\0\0\x40.", CPM_ELIMIT, "memo index past the limit");
}

static void test_bounds(void **state) {
    (void)state;
    size_t n = 100000;
    char *buf = malloc(n + 4);
    memcpy(buf, "\x80\x02", 2);
    memset(buf + 2, ']', n); /* 100000 empty lists: deeper than the stack limit */
    buf[n + 2] = '.';
    expect_error(buf, n + 3, CPM_ELIMIT, "stack deeper than the limit");
    memset(buf + 2, '(', n); /* as many MARKs */
    expect_error(buf, n + 3, CPM_ELIMIT, "more MARKs than the limit");
    free(buf);
    static const char big[] = "\x80\x02X\x01\x00\x20\x00";
    EXPECT_LIT(big, CPM_ELIMIT, "string longer than the limit");
    char name[300];
    memset(name, 'a', sizeof name);
    memcpy(name, "\x80\x02" "c", 3);
    expect_error(name, sizeof name, CPM_EFORMAT, "bad GLOBAL name");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_dict),
        cmocka_unit_test(test_every_prefix_fails_cleanly),
        cmocka_unit_test(test_long_and_protocol4),
        cmocka_unit_test(test_evil_globals),
        cmocka_unit_test(test_unsupported_opcodes),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
