/* test_tp_split.c - shard/engine/model/tp_split: the one tensor-parallel split rule the loader
 * and cpm-cluster share (whole KV groups, MLA heads, FFN width, no int4). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "shard/engine/model/tp_split.h"

static cpm_hparams gqa(int heads, int kv_heads, int inter) {
    cpm_hparams hp = {.n_heads = heads, .n_kv_heads = kv_heads, .intermediate_size = inter};
    snprintf(hp.arch, sizeof hp.arch, "MiniCPMForCausalLM");
    return hp;
}

/* 2 KV heads split 2 ways; 3 do not, nor does an odd FFN; int4 never splits. */
static void test_gqa(void **state) {
    (void)state;
    cpm_error e = {0};
    cpm_hparams hp = gqa(4, 2, 256);
    assert_int_equal(cpm_tp_split_heads(&hp, NULL), 2);
    assert_int_equal(cpm_tp_split_check(&hp, 1, &e), 0);
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), 0);
    assert_int_equal(cpm_tp_split_check(&hp, 4, &e), CPM_EINVAL); /* 4 query heads, 2 groups */
    hp = gqa(6, 3, 256);
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "3 key/value heads"));
    assert_non_null(strstr(e.msg, "do not split over 2"));
    hp = gqa(4, 2, 255);
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "intermediate_size 255"));
    hp = gqa(4, 2, 256);
    hp.quant = CPM_QUANT_GPTQ;
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), CPM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "quantized"));
    assert_int_equal(cpm_tp_split_check(&hp, 1, &e), 0); /* one rank: nothing to split */
}

/* MLA (MiniCPM3) deals out attention heads: its config's KV heads do not count. */
static void test_mla(void **state) {
    (void)state;
    cpm_error e = {0};
    cpm_hparams hp = gqa(4, 1, 256);
    snprintf(hp.arch, sizeof hp.arch, "MiniCPM3ForCausalLM");
    const char *what;
    assert_int_equal(cpm_tp_split_heads(&hp, &what), 4);
    assert_string_equal(what, "attention heads");
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), 0);
    assert_int_equal(cpm_tp_split_check(&hp, 4, &e), 0);
    assert_int_equal(cpm_tp_split_check(&hp, 8, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "4 attention heads"));
}

static void test_unknown_arch(void **state) {
    (void)state;
    cpm_error e = {0};
    cpm_hparams hp = gqa(4, 2, 256);
    snprintf(hp.arch, sizeof hp.arch, "LlamaForCausalLM");
    assert_int_equal(cpm_tp_split_check(&hp, 2, &e), CPM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "LlamaForCausalLM"));
}

/* The real checkpoints the e2e and TP tests run (argv: model directories). */
static char **g_dirs;
static int g_n_dirs;

static void test_real_configs(void **state) {
    (void)state;
    for (int i = 0; i < g_n_dirs; i++) {
        cpm_hparams hp;
        cpm_error e = {0};
        if (cpm_hparams_load(g_dirs[i], &hp, &e))
            fail_msg("%s: %s", g_dirs[i], e.msg);
        assert_int_equal(cpm_tp_split_check(&hp, 2, &e), 0); /* every test model splits 2 ways */
        assert_int_equal(cpm_tp_split_check(&hp, 64, &e), CPM_EINVAL);
        assert_non_null(strstr(e.msg, "do not split over 64"));
    }
}

int main(int argc, char **argv) {
    g_dirs = argv + 1;
    g_n_dirs = argc - 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gqa),
        cmocka_unit_test(test_mla),
        cmocka_unit_test(test_unknown_arch),
        cmocka_unit_test(test_real_configs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
