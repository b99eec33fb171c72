/* test_stage_config.c - shard/stage_config: the cluster file -> cpm_stage_opts mapping that
 * cpm-shard's main.c calls (a stage, its TP ranks, expert services, missing stages). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "shard/stage_config.h"

#define BASE                                 \
    "model: /m/minicpm-1b\n"                 \
    "router:\n"                              \
    "  rpc: tcp://127.0.0.1:5550\n"          \
    "  results: tcp://127.0.0.1:5551\n"      \
    "tokenizers:\n"                          \
    "  - endpoint: tcp://127.0.0.1:5560\n"   \
    "samplers:\n"                            \
    "  - endpoint: tcp://127.0.0.1:5570\n"

#define TWO_STAGES                                    \
    "stages:\n"                                       \
    "  - layers: [0, 1]\n"                            \
    "    endpoint: tcp://127.0.0.1:5580\n"            \
    "    threads: 3\n"                                \
    "    kv_tokens: 1024\n"                           \
    "    kv_dtype: f16\n"                             \
    "    activations: bf16\n"                         \
    "    ffn: dense\n"                                \
    "    tp_mesh: tcp://127.0.0.1:5590\n"             \
    "    tp:\n"                                       \
    "      - endpoint: tcp://127.0.0.1:5582\n"        \
    "        mesh: tcp://127.0.0.1:5591\n"            \
    "        threads: 2\n"                            \
    "  - layers: [1, end]\n"                          \
    "    endpoint: tcp://127.0.0.1:5581\n"            \
    "    activations: int8\n"                         \
    "    weights: mapped\n"                           \
    "    lm_head: int8\n"

static cpm_config *parse(const char *text) {
    cpm_config *c;
    cpm_error e = {0};
    if (cpm_config_parse(text, strlen(text), "t.yaml", &c, &e))
        fail_msg("%s", e.msg);
    return c;
}

static void test_stage_from_file(void **state) {
    (void)state;
    cpm_config *c = parse(BASE TWO_STAGES);
    cpm_stage_config sc;
    cpm_error e = {0};
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 0, 0, &e), 0);
    const cpm_stage_opts *o = &sc.opts;
    assert_string_equal(o->bind, "tcp://127.0.0.1:5580");
    assert_string_equal(o->next, "tcp://127.0.0.1:5581"); /* the next stage */
    assert_int_equal(o->layer_begin, 0);
    assert_int_equal(o->layer_end, 1);
    assert_int_equal(o->threads, 3);
    assert_int_equal(o->kv_tokens, 1024);
    assert_int_equal(o->kv_dtype, CPM_DTYPE_F16);
    assert_true(o->act_bf16);
    assert_false(o->act_int8);
    assert_false(o->map_weights); /* resident by default */
    assert_true(o->ffn_dense);
    assert_false(o->lm_head_int8); /* as stored by default */
    assert_string_equal(o->model_dir, c->model);
    assert_int_equal(o->n_experts, 0);
    /* rank 0 of a TP stage: every mesh, the peers' stage endpoints */
    assert_int_equal(o->tp_rank, 0);
    assert_int_equal(o->tp_size, 2);
    assert_string_equal(o->tp_mesh[0], "tcp://127.0.0.1:5590");
    assert_string_equal(o->tp_mesh[1], "tcp://127.0.0.1:5591");
    assert_string_equal(o->tp_peers[0], "tcp://127.0.0.1:5582");
    assert_int_equal(cpm_stage_config_check(o, &e), 0);

    /* the last stage sends to the router's results endpoint; no TP, kv f32 by default */
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 1, 0, &e), 0);
    assert_string_equal(sc.opts.next, "tcp://127.0.0.1:5551");
    assert_int_equal(sc.opts.layer_end, -1);
    assert_int_equal(sc.opts.kv_dtype, CPM_DTYPE_F32);
    assert_false(sc.opts.act_bf16); /* int8: int4 weights meet int8 x (the model implies bf16) */
    assert_true(sc.opts.act_int8);
    assert_true(sc.opts.map_weights);
    assert_true(sc.opts.lm_head_int8);
    assert_int_equal(sc.opts.tp_size, 1);
    cpm_config_free(c);
}

static void test_tp_rank(void **state) {
    (void)state;
    cpm_config *c = parse(BASE TWO_STAGES);
    cpm_stage_config sc;
    cpm_error e = {0};
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 0, 1, &e), 0);
    assert_int_equal(sc.opts.tp_rank, 1);
    assert_string_equal(sc.opts.bind, "tcp://127.0.0.1:5582"); /* its own endpoint and threads */
    assert_int_equal(sc.opts.threads, 2);
    assert_null(sc.opts.next);                                   /* sends nothing downstream */
    assert_int_equal(cpm_stage_config_check(&sc.opts, &e), 0);   /* and needs no next hop */
    /* no such rank */
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 0, 2, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "t.yaml: stages[0] has tensor parallel ranks 0..1, not 2"));
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 1, 1, &e), CPM_ERANGE);
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 0, -1, &e), CPM_ERANGE);
    cpm_config_free(c);
}

static void test_bad_index(void **state) {
    (void)state;
    cpm_config *c = parse(BASE TWO_STAGES);
    cpm_stage_config sc;
    cpm_error e = {0};
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 2, 0, &e), CPM_ERANGE);
    assert_string_equal(e.msg, "t.yaml: no stages[2]");
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, -1, 0, &e), CPM_ERANGE);
    assert_string_equal(e.msg, "t.yaml: no stages[-1]");
    cpm_config_free(c);
}

static void test_experts(void **state) {
    (void)state;
    cpm_config *c = parse(BASE
                          "stages:\n"
                          "  - layers: [0, end]\n"
                          "    endpoint: tcp://127.0.0.1:5580\n"
                          "experts:\n"
                          "  - experts: [0, 4]\n"
                          "    endpoint: tcp://127.0.0.1:5600\n"
                          "  - experts: [4, end]\n"
                          "    endpoint: tcp://127.0.0.1:5601\n");
    cpm_stage_config sc;
    cpm_error e = {0};
    assert_int_equal(cpm_stage_config_from_cluster(&sc, c, 0, 0, &e), 0);
    assert_int_equal(sc.opts.n_experts, 2);
    assert_ptr_equal(sc.opts.experts, sc.peers);
    assert_string_equal(sc.peers[1].endpoint, "tcp://127.0.0.1:5601");
    assert_int_equal(sc.peers[0].begin, 0);
    assert_int_equal(sc.peers[0].end, 4);
    assert_int_equal(sc.peers[1].end, -1);
    assert_int_equal(sc.opts.expert_timeout_ms, c->router.timeout_ms);
    cpm_config_free(c);
}

/* Without a file: the defaults, and the flags cpm-shard needs instead. */
static void test_check_without_file(void **state) {
    (void)state;
    cpm_stage_config sc;
    cpm_error e = {0};
    cpm_stage_config_init(&sc);
    assert_null(sc.isa);
    assert_int_equal(cpm_stage_config_check(&sc.opts, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "--bind EP --next EP --model DIR"));
    sc.opts.bind = "tcp://127.0.0.1:1";
    sc.opts.model_dir = "m";
    assert_int_equal(cpm_stage_config_check(&sc.opts, &e), CPM_EINVAL); /* no next */
    sc.opts.next = "tcp://127.0.0.1:2";
    assert_int_equal(cpm_stage_config_check(&sc.opts, &e), 0);
    sc.opts.model_dir = "";
    assert_int_equal(cpm_stage_config_check(&sc.opts, &e), CPM_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stage_from_file),
        cmocka_unit_test(test_tp_rank),
        cmocka_unit_test(test_bad_index),
        cmocka_unit_test(test_experts),
        cmocka_unit_test(test_check_without_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
