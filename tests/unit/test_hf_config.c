/* Unit tests for shard/engine/model/hf_config.c: official defaults, both LongRoPE key
 * spellings, and a precise error for every bad field. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

#include "shard/engine/model/hf_config.h"

#define BASE "\"architectures\":[\"MiniCPMForCausalLM\"],\"vocab_size\":1024,\"hidden_size\":128," \
             "\"intermediate_size\":256,\"num_hidden_layers\":2,\"num_attention_heads\":4"

static void test_defaults(void **state) {
    (void)state;
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_parse("{" BASE "}", "config.json", &hp, &e), 0);
    assert_int_equal(hp.n_kv_heads, 4);          /* absent → MHA */
    assert_int_equal(hp.head_dim, 32);
    assert_true(hp.tie_word_embeddings);         /* absent → tied */
    assert_true(hp.rope_theta == 10000.0);
    assert_true(hp.scale_emb == 1.0 && hp.dim_model_base == 1.0 && hp.scale_depth == 1.0);
    assert_true(hp.rms_norm_eps == 1e-6f);
    assert_int_equal(hp.rope_kind, CPM_ROPE_PLAIN);
    assert_int_equal(hp.act, CPM_ACT_SILU);
}

static void test_longrope_both_keys(void **state) {
    (void)state;
    const char *keys[] = {"rope_type", "type"};
    for (int k = 0; k < 2; k++) {
        char buf[2048];
        snprintf(buf, sizeof buf,
                 "{" BASE ",\"scale_emb\":12,\"dim_model_base\":256,\"max_position_embeddings\":64,"
                 "\"rope_scaling\":{\"%s\":\"longrope\",\"long_factor\":[%s],\"short_factor\":[%s],"
                 "\"original_max_position_embeddings\":32}}",
                 keys[k], "2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,3");
        cpm_hparams hp;
        cpm_error e = {0};
        assert_int_equal(cpm_hparams_parse(buf, "config.json", &hp, &e), 0);
        assert_int_equal(hp.rope_kind, CPM_ROPE_LONGROPE);
        assert_int_equal(hp.n_rope_factors, 16);
        assert_true(hp.rope_short[15] == 3.0 && hp.rope_long[0] == 2.0);
        assert_int_equal(hp.rope_orig_max_position, 32);
    }
}

static void expect_error(const char *json, int code, const char *needle) {
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_parse(json, "config.json", &hp, &e), code);
    if (!strstr(e.msg, needle))
        fail_msg("message '%s' lacks '%s'", e.msg, needle);
    assert_non_null(strstr(e.msg, "config.json"));
}

static void test_errors(void **state) {
    (void)state;
    expect_error("{", CPM_EFORMAT, "line");
    expect_error("[]", CPM_EFORMAT, "object");
    expect_error("{\"architectures\":[\"MiniCPMForCausalLM\"]}", CPM_EFORMAT, "vocab_size");
    expect_error("{" BASE ",\"num_key_value_heads\":3}", CPM_ESHAPE, "num_key_value_heads");
    expect_error("{" BASE ",\"rms_norm_eps\":\"x\"}", CPM_EFORMAT, "rms_norm_eps");
    expect_error("{" BASE ",\"hidden_act\":\"gelu\"}", CPM_EUNSUPPORTED, "gelu");
    expect_error("{" BASE ",\"rope_scaling\":{\"type\":\"yarn\"}}", CPM_EUNSUPPORTED, "yarn");
    expect_error("{" BASE ",\"rope_scaling\":{\"type\":\"longrope\",\"long_factor\":[1],"
                 "\"short_factor\":[1]}}", CPM_ESHAPE, "_factor");
    expect_error("{" BASE ",\"num_experts\":8,\"num_experts_per_tok\":9}", CPM_ERANGE,
                 "num_experts_per_tok");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"gptq\"}}",
                 CPM_EFORMAT, "quantization_config.bits is missing");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"awq\",\"bits\":4,"
                 "\"version\":\"gemv\"}}", CPM_EUNSUPPORTED, "quantization_config.version: gemv");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"awq\",\"bits\":4,"
                 "\"zero_point\":false}}", CPM_EUNSUPPORTED, "zero_point: false");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"awq\"}}",
                 CPM_EFORMAT, "quantization_config.bits is missing");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"marlin\",\"bits\":4}}",
                 CPM_EUNSUPPORTED, "quantization_config.quant_method: marlin");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":8}}",
                 CPM_EUNSUPPORTED, "quantization_config.bits: 8");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,"
                 "\"checkpoint_format\":\"gptq_v2\"}}", CPM_EUNSUPPORTED, "gptq_v2");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,"
                 "\"group_size\":0}}", CPM_ERANGE, "group_size");
    expect_error("{" BASE ",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,"
                 "\"lm_head\":true}}", CPM_EUNSUPPORTED, "lm_head");
    expect_error("{" BASE ",\"max_position_embeddings\":-5}", CPM_ERANGE, "max_position_embeddings");
    expect_error("{" BASE ",\"vocab_size\":1,\"vocab_size\":2}", CPM_EFORMAT, "duplicate");
}

/* MiniCPM-2B-sft-int4's fields (minicpm-spec.md §8). */
static void test_gptq(void **state) {
    (void)state;
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_parse("{" BASE ",\"quantization_config\":{\"bits\":4,"
                                       "\"group_size\":128,\"damp_percent\":0.01,"
                                       "\"desc_act\":true,\"sym\":true,\"true_sequential\":true,"
                                       "\"quant_method\":\"gptq\",\"checkpoint_format\":\"gptq\"}}",
                                       "config.json", &hp, &e), 0);
    assert_int_equal(hp.quant, CPM_QUANT_GPTQ);
    assert_int_equal(hp.quant_group_size, 128);
    assert_true(hp.quant_desc_act && hp.quant_sym);
    assert_int_equal(hp.quant_zero_offset, 1);
    assert_int_equal(cpm_hparams_parse("{" BASE ",\"quantization_config\":{\"bits\":4,"
                                       "\"group_size\":-1,\"quant_method\":\"gptq\"}}",
                                       "config.json", &hp, &e), 0);
    assert_int_equal(hp.quant_group_size, -1);
    assert_false(hp.quant_desc_act);
    assert_int_equal(cpm_hparams_parse("{" BASE "}", "config.json", &hp, &e), 0);
    assert_int_equal(hp.quant, CPM_QUANT_NONE);
}

/* transformers' AwqConfig names, then AutoAWQ's own (w_bit, q_group_size, "GEMM"). */
static void test_awq(void **state) {
    (void)state;
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_parse("{" BASE ",\"quantization_config\":{\"bits\":4,"
                                       "\"group_size\":64,\"quant_method\":\"awq\","
                                       "\"version\":\"gemm\",\"zero_point\":true,"
                                       "\"modules_to_not_convert\":[\"mlp.gate\"]}}",
                                       "config.json", &hp, &e), 0);
    assert_int_equal(hp.quant, CPM_QUANT_AWQ);
    assert_int_equal(hp.quant_group_size, 64);
    assert_false(hp.quant_desc_act);
    assert_int_equal(hp.quant_zero_offset, 0);
    assert_int_equal(cpm_hparams_parse("{" BASE ",\"quantization_config\":{\"w_bit\":4,"
                                       "\"q_group_size\":-1,\"quant_method\":\"awq\","
                                       "\"version\":\"GEMM\"}}", "config.json", &hp, &e), 0);
    assert_int_equal(hp.quant, CPM_QUANT_AWQ);
    assert_int_equal(hp.quant_group_size, -1);
}

static void test_eos_merge_and_sparse(void **state) {
    (void)state;
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_parse("{" BASE ",\"eos_token_id\":[2,73440,2],"
                                       "\"hidden_act\":\"fatrelu\",\"hidden_act_param\":0.03,"
                                       "\"sparse_config\":{\"dense_len\":100}}",
                                       "config.json", &hp, &e), 0);
    assert_int_equal(hp.n_eos, 2);
    assert_int_equal(hp.eos_ids[1], 73440);
    assert_int_equal(hp.act, CPM_ACT_FATRELU);
    assert_true(hp.act_param == 0.03f);
    assert_true(hp.sparse);
    assert_int_equal(hp.sparse_dense_len, 100);
}

/* Writes dir/name with text. */
static void put_file(const char *dir, const char *name, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* generation_config.json's sampling defaults; do_sample false means greedy. */
static void test_generation_defaults(void **state) {
    (void)state;
    char dir[] = "/tmp/cpm-test-hf-XXXXXX";
    assert_non_null(mkdtemp(dir));
    put_file(dir, "config.json", "{" BASE "}");
    put_file(dir, "generation_config.json",
             "{\"do_sample\":true,\"temperature\":0.8,\"top_p\":0.8,\"top_k\":40,"
             "\"repetition_penalty\":1.02,\"eos_token_id\":[2,73440]}");
    cpm_hparams hp;
    cpm_error e = {0};
    assert_int_equal(cpm_hparams_load(dir, &hp, &e), 0);
    assert_true(hp.gen.has_temperature && hp.gen.temperature == 0.8f);
    assert_true(hp.gen.has_top_p && hp.gen.top_p == 0.8f);
    assert_true(hp.gen.has_top_k && hp.gen.top_k == 40);
    assert_true(hp.gen.has_repetition_penalty && hp.gen.repetition_penalty == 1.02f);
    put_file(dir, "generation_config.json", "{\"do_sample\":false,\"temperature\":0.7,\"top_p\":\"x\"}");
    assert_int_equal(cpm_hparams_load(dir, &hp, &e), 0);
    assert_true(hp.gen.has_temperature && hp.gen.temperature == 0.0f);
    assert_false(hp.gen.has_top_p); /* a value of the wrong type is no default */
    char path[512];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    unlink(path);
    assert_int_equal(cpm_hparams_load(dir, &hp, &e), 0);
    assert_false(hp.gen.has_temperature || hp.gen.has_top_p || hp.gen.has_top_k);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_longrope_both_keys),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_gptq),
        cmocka_unit_test(test_awq),
        cmocka_unit_test(test_eos_merge_and_sparse),
        cmocka_unit_test(test_generation_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
