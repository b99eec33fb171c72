/* test_convert_bin.c - tools/convert_bin.c end to end: the tiny torch fixtures are
 * converted by the real cpm-convert-bin (its path is argv[1]) and the result is
 * compared, tensor by tensor, with the torch checkpoint read directly.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "support/scratch.h"

#include "shard/engine/model/checkpoint.h"

static const char *tool;

/* Runs the tool quietly and returns its exit status. */
static int run_tool(const char *in, const char *out, const char *max_shard) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' --in '%s' --out '%s'%s%s >/dev/null 2>&1", tool, in, out,
             max_shard ? " --max-shard-bytes " : "", max_shard ? max_shard : "");
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void assert_same_tensors(const char *torch_dir, const char *st_dir) {
    cpm_checkpoint *a, *b;
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_open(torch_dir, &a, &err), 0);
    if (cpm_checkpoint_open(st_dir, &b, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(cpm_checkpoint_count(a), cpm_checkpoint_count(b));
    for (size_t i = 0; i < cpm_checkpoint_count(a); i++) {
        const cpm_tensor_view *x = cpm_checkpoint_at(a, i);
        const cpm_tensor_view *y = cpm_checkpoint_find(b, x->name);
        assert_non_null(y);
        assert_int_equal(x->dtype, y->dtype);
        assert_int_equal(x->ndim, y->ndim);
        assert_memory_equal(x->shape, y->shape, (size_t)x->ndim * sizeof x->shape[0]);
        assert_int_equal(x->nbytes, y->nbytes);
        assert_memory_equal(x->data, y->data, x->nbytes);
    }
    cpm_checkpoint_free(a);
    cpm_checkpoint_free(b);
}

static int file_exists(const char *dir, const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

static void test_single_file(void **state) {
    scratch *s = *state;
    char out[300];
    snprintf(out, sizeof out, "%s/out", s->dir);
    assert_int_equal(run_tool(CKPT_FIXTURES "/tiny-torch", out, NULL), 0);
    assert_true(file_exists(out, "model.safetensors"));
    assert_false(file_exists(out, "model.safetensors.index.json"));
    assert_false(file_exists(out, "pytorch_model.bin"));
    assert_true(file_exists(out, "config.json"));
    assert_true(file_exists(out, "tokenizer_config.json"));
    assert_same_tensors(CKPT_FIXTURES "/tiny-torch", out);
}

static void test_sharded_output(void **state) {
    scratch *s = *state;
    char out[300];
    snprintf(out, sizeof out, "%s/out", s->dir);
    assert_int_equal(run_tool(CKPT_FIXTURES "/tiny-torch", out, "40"), 0);
    assert_false(file_exists(out, "model.safetensors"));
    assert_true(file_exists(out, "model.safetensors.index.json"));
    assert_true(file_exists(out, "model-00001-of-00003.safetensors"));
    assert_true(file_exists(out, "model-00003-of-00003.safetensors"));
    assert_same_tensors(CKPT_FIXTURES "/tiny-torch", out);
}

static void test_sharded_input(void **state) {
    scratch *s = *state;
    char out[300];
    snprintf(out, sizeof out, "%s/out", s->dir);
    assert_int_equal(run_tool(CKPT_FIXTURES "/tiny-torch-sharded", out, NULL), 0);
    assert_false(file_exists(out, "pytorch_model.bin.index.json"));
    assert_same_tensors(CKPT_FIXTURES "/tiny-torch-sharded", out);
}

static void test_bad_input(void **state) {
    scratch *s = *state;
    char out[300];
    snprintf(out, sizeof out, "%s/out", s->dir);
    assert_int_equal(run_tool(CKPT_FIXTURES "/tiny-torch-deflated", out, NULL), 1);
    assert_int_equal(run_tool(s->dir, out, NULL), 1); /* no pytorch_model.bin */
    assert_int_equal(run_tool(CKPT_FIXTURES "/tiny-torch", out, "zero"), 2);
}

#define SCRATCH(f) cmocka_unit_test_setup_teardown(f, scratch_setup, scratch_teardown)

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH-TO-cpm-convert-bin\n", argv[0]);
        return 2;
    }
    tool = argv[1];
    const struct CMUnitTest tests[] = {
        SCRATCH(test_single_file),
        SCRATCH(test_sharded_output),
        SCRATCH(test_sharded_input),
        SCRATCH(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
