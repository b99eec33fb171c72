/* test_config.c - the cluster YAML: the shipped examples load, and each kind of mistake
 * gets an error naming file:line:column and the key at fault. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/config.h"

#define BASE                                 \
    "router:\n"                              \
    "  rpc: tcp://127.0.0.1:5550\n"          \
    "  results: tcp://127.0.0.1:5551\n"      \
    "tokenizers:\n"                          \
    "  - endpoint: tcp://127.0.0.1:5560\n"   \
    "samplers:\n"                            \
    "  - endpoint: tcp://127.0.0.1:5570\n"

static int parse(const char *text, cpm_config **c, cpm_error *e) {
    return cpm_config_parse(text, strlen(text), "t.yaml", c, e);
}

static void test_good_two_stages(void **state) {
    (void)state;
    const char *y = "model: /m/minicpm-1b/\n" BASE
                    "stages:\n"
                    "  - layers: [0, 2]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    threads: 3\n"
                    "  - layers: [2, end]\n"
                    "    endpoint: ipc:///tmp/s1\n";
    cpm_config *c;
    cpm_error e = {0};
    if (parse(y, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->n_stages, 2);
    assert_int_equal(c->n_tokenizers, 1);
    assert_int_equal(c->stages[0].svc.threads, 3);
    assert_int_equal(c->stages[1].svc.threads, 1); /* default */
    assert_int_equal(c->stages[1].kv_tokens, 16384);
    assert_int_equal(c->stages[1].layer_end, CPM_CFG_LAYER_END);
    assert_string_equal(c->router.http_addr, "127.0.0.1");
    assert_int_equal(c->router.http_port, 8080);
    assert_string_equal(c->name, "minicpm-1b");
    assert_string_equal(cpm_config_stage_next(c, 0), "ipc:///tmp/s1");
    assert_string_equal(cpm_config_stage_next(c, 1), "tcp://127.0.0.1:5551");
    /* Processes in launch order: router, tokenizer, sampler, stage 0, stage 1. */
    assert_int_equal(cpm_config_n_procs(c), 5);
    cpm_role role;
    int idx;
    assert_int_equal(cpm_config_proc(c, 4, &role, &idx, NULL), 0);
    assert_int_equal(role, CPM_ROLE_STAGE);
    assert_int_equal(idx, 1);
    assert_int_equal(cpm_config_proc(c, 5, &role, &idx, &e), CPM_ERANGE);
    /* Against the model: 3 layers resolve `end`; 1 layer cannot hold stage 1. */
    assert_int_equal(cpm_config_resolve_layers(c, 3, &e), 0);
    assert_int_equal(c->stages[1].layer_end, 3);
    c->stages[1].layer_end = CPM_CFG_LAYER_END;
    assert_int_equal(cpm_config_resolve_layers(c, 2, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "stages[1].layers"));
    cpm_config_set_model(c, "/other/minicpm4");
    assert_string_equal(c->name, "minicpm4");
    cpm_config_free(c);
}

/* A token-in cluster (router.tokenize: off) needs no tokenizer service. */
static void test_token_in_without_tokenizers(void **state) {
    (void)state;
    const char *y = "router:\n  rpc: tcp://127.0.0.1:5550\n  results: tcp://127.0.0.1:5551\n"
                    "  tokenize: off\nsamplers:\n  - endpoint: tcp://127.0.0.1:5570\n"
                    "stages:\n  - {layers: [0, end], endpoint: tcp://127.0.0.1:5580}\n";
    cpm_config *c;
    cpm_error e = {0};
    if (parse(y, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->n_tokenizers, 0);
    cpm_config_free(c);
}

static void test_missing_layers_at_model_end(void **state) {
    (void)state;
    const char *y = BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n";
    cpm_config *c;
    cpm_error e = {0};
    assert_int_equal(parse(y, &c, &e), 0);
    assert_int_equal(cpm_config_resolve_layers(c, 4, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "layers 2..3 belong to no stage"));
    cpm_config_free(c);
}

/* Two replicas of a two-stage pipeline, listed interleaved: each stage forwards to the
 * next stage of its own replica, and each replica must cover every layer. */
static void test_pipeline_replicas(void **state) {
    (void)state;
    const char *y = BASE "stages:\n"
                         "  - {layers: [0, 2], endpoint: tcp://127.0.0.1:5580}\n"
                         "  - {layers: [0, 1], endpoint: tcp://127.0.0.1:5590, pipeline: 1}\n"
                         "  - {layers: [2, end], endpoint: tcp://127.0.0.1:5581}\n"
                         "  - {layers: [1, end], endpoint: tcp://127.0.0.1:5591, pipeline: 1}\n";
    cpm_config *c;
    cpm_error e = {0};
    if (parse(y, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->n_pipelines, 2);
    assert_string_equal(cpm_config_stage_next(c, 0), "tcp://127.0.0.1:5581");
    assert_string_equal(cpm_config_stage_next(c, 1), "tcp://127.0.0.1:5591");
    assert_string_equal(cpm_config_stage_next(c, 2), c->router.results);
    assert_string_equal(cpm_config_stage_next(c, 3), c->router.results);
    assert_int_equal(cpm_config_resolve_layers(c, 4, &e), 0);
    assert_int_equal(c->stages[2].layer_end, 4);
    assert_int_equal(c->stages[3].layer_end, 4);
    cpm_config_free(c);
}

/* Expert services (expert parallelism): listed after the stages, so they come last in
 * the process order and clusters without them keep their rank numbers; their ranges
 * tile the model's experts, `end` resolved against it. */
#define ONE_STAGE "stages:\n  - {layers: [0, end], endpoint: tcp://127.0.0.1:5580}\n"

static void test_expert_services(void **state) {
    (void)state;
    const char *y = BASE ONE_STAGE
                    "experts:\n"
                    "  - {experts: [0, 4], endpoint: tcp://127.0.0.1:5600, threads: 2}\n"
                    "  - {experts: [4, end], endpoint: tcp://127.0.0.1:5601, host: node2}\n";
    cpm_config *c;
    cpm_error e = {0};
    if (parse(y, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->n_experts, 2);
    assert_int_equal(c->experts[0].expert_begin, 0);
    assert_int_equal(c->experts[0].expert_end, 4);
    assert_int_equal(c->experts[0].svc.threads, 2);
    assert_int_equal(c->experts[1].expert_end, CPM_CFG_LAYER_END);
    assert_string_equal(c->experts[1].svc.host, "node2");
    /* router, tokenizer, sampler, stage 0, expert 0, expert 1 */
    assert_int_equal(cpm_config_n_procs(c), 6);
    cpm_role role;
    int idx;
    assert_int_equal(cpm_config_proc(c, 3, &role, &idx, NULL), 0);
    assert_int_equal(role, CPM_ROLE_STAGE);
    assert_int_equal(cpm_config_proc(c, 5, &role, &idx, NULL), 0);
    assert_int_equal(role, CPM_ROLE_EXPERT);
    assert_int_equal(idx, 1);
    assert_string_equal(cpm_role_name(role), "expert");
    assert_string_equal(cpm_config_proc_endpoint(c, 5), "tcp://127.0.0.1:5601");
    /* against the model: 8 experts resolve `end`; 3 are too few; a dense model takes none */
    assert_int_equal(cpm_config_resolve_experts(c, 8, &e), 0);
    assert_int_equal(c->experts[1].expert_end, 8);
    c->experts[1].expert_end = CPM_CFG_LAYER_END;
    assert_int_equal(cpm_config_resolve_experts(c, 3, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "experts[0].experts: [0, 4) but the model has 3 experts"));
    assert_int_equal(cpm_config_resolve_experts(c, 0, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "no MoE layers"));
    cpm_config_free(c);
    /* beyond the model, and short of it */
    const char *beyond = BASE ONE_STAGE "experts:\n  - {experts: [0, 12], endpoint: tcp://127.0.0.1:5600}\n";
    assert_int_equal(parse(beyond, &c, &e), 0);
    assert_int_equal(cpm_config_resolve_experts(c, 8, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "experts[0].experts: [0, 12) but the model has 8 experts"));
    cpm_config_free(c);
    const char *shy = BASE ONE_STAGE "experts:\n  - {experts: [0, 6], endpoint: tcp://127.0.0.1:5600}\n";
    assert_int_equal(parse(shy, &c, &e), 0);
    assert_int_equal(cpm_config_resolve_experts(c, 8, &e), CPM_ERANGE);
    assert_non_null(strstr(e.msg, "experts 6..7 belong to no service"));
    cpm_config_free(c);
    /* without an `experts:` list nothing changes; any model resolves */
    assert_int_equal(parse(BASE ONE_STAGE, &c, &e), 0);
    assert_int_equal(c->n_experts, 0);
    assert_int_equal(cpm_config_n_procs(c), 4);
    assert_int_equal(cpm_config_resolve_experts(c, 0, &e), 0);
    assert_int_equal(cpm_config_resolve_experts(c, 8, &e), 0);
    cpm_config_free(c);
}

typedef struct bad_case {
    const char *yaml;
    const char *expect; /* fragment of the message */
} bad_case;

static const bad_case bad_cases[] = {
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    thraeds: 2\n",
     "t.yaml:11:5: stages[0].thraeds: unknown key (known: endpoint, host, threads, layers"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n"
          "  - layers: [1, 4]\n    endpoint: tcp://127.0.0.1:5581\n",
     "stages[1].layers: starts at 1, overlapping stage 0 (which ends at 2)"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n"
          "  - layers: [3, 4]\n    endpoint: tcp://127.0.0.1:5581\n",
     "layers 2..2 belong to no stage"},
    {BASE "stages:\n  - layers: [1, 2]\n    endpoint: tcp://127.0.0.1:5580\n",
     "layers 0..0 belong to no stage"},
    {BASE "stages:\n  - layers: [0, end]\n    endpoint: tcp://127.0.0.1:5580\n"
          "  - layers: [5, 6]\n    endpoint: tcp://127.0.0.1:5581\n",
     "stage 0 already runs to `end`"},
    {BASE "stages:\n  - layers: [2, 1]\n    endpoint: tcp://127.0.0.1:5580\n",
     "t.yaml:9:13: stages[0].layers: end must be an integer > 2"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:99999\n",
     "t.yaml:10:15: stages[0].endpoint: 'tcp://127.0.0.1:99999': port must be 1..65535"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: inproc://x\n", "is not tcp://HOST:PORT"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://*:5580\n", "wildcard host"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://stage_0.cpm:5580\n",
     "t.yaml:10:15: stages[0].endpoint: 'tcp://stage_0.cpm:5580': the host is neither an IP "
     "address nor a DNS name"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://-stage.cpm:5580\n", "nor a DNS name"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://stage..cpm:5580\n", "nor a DNS name"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://[::zz]:5580\n", "nor a DNS name"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\nsecurity:\n  curve: maybe\n",
     "security.curve: 'maybe' is not one of on, off"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5560\n",
     "tokenizer 0 and stage 0 both bind tcp://127.0.0.1:5560"},
    {BASE "stages:\n  - layers: [0, 2]\n", "stages[0]: missing required key 'endpoint'"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    threads: 0\n",
     "stages[0].threads: 0 is outside [1, 1024]"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    threads: two\n",
     "'two' is not an integer"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    isa: sse9\n",
     "stages[0].isa: 'sse9' is not one of auto, scalar, avx2, avx512, amx"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    kv_dtype: bf16\n",
     "stages[0].kv_dtype: 'bf16' is not one of f32, f16"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    activations: f16\n",
     "stages[0].activations: 'f16' is not one of exact, bf16, int8"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    ffn: lazy\n",
     "stages[0].ffn: 'lazy' is not one of sparse, dense"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n    lm_head: int4\n",
     "stages[0].lm_head: 'int4' is not one of stored, int8"},
    /* a long value in a short-valued key: an error, never a write past the field */
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n"
          "    kv_dtype: f32f32f32f32f32f32f32f32f32f32f32f32\n", "is not one of f32, f16"},
    {BASE "stages: []\n", "at least one stage"},
    {BASE "stages:\n  - {layers: [0, end], endpoint: tcp://127.0.0.1:5580}\n"
          "  - {layers: [0, end], endpoint: tcp://127.0.0.1:5581, pipeline: 2}\n",
     "stages: pipeline 1 has no stage (pipelines are numbered 0 .. 2 without gaps)"},
    {BASE "stages:\n  - {layers: [0, end], endpoint: tcp://127.0.0.1:5580}\n"
          "  - {layers: [0, 2], endpoint: tcp://127.0.0.1:5581, pipeline: 1}\n"
          "  - {layers: [1, end], endpoint: tcp://127.0.0.1:5582, pipeline: 1}\n",
     "stages[2].layers: starts at 1, overlapping stage 1 (which ends at 2)"},
    {"tokenizers:\n  - endpoint: tcp://127.0.0.1:5560\n", "router: missing"},
    {"router:\n  rpc: tcp://127.0.0.1:5550\n  results: tcp://127.0.0.1:5551\nsamplers:\n"
     "  - endpoint: tcp://127.0.0.1:5570\n" ONE_STAGE,
     "tokenizers: at least one is required (or router.tokenize: off)"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\nrouter: {}\n",
     "router: given twice"},
    {BASE "stages:\n  - layers: [0, 2\n", "t.yaml:"}, /* YAML syntax error with a position */
    {"version: 2\n" BASE, "version: 2 is outside [1, 1]"},
    {"- a\n- b\n", "expected a mapping"},
    {"router:\n  rpc: tcp://127.0.0.1:5550\n  results: tcp://127.0.0.1:5550\n"
     "tokenizers:\n  - endpoint: tcp://127.0.0.1:5560\nsamplers:\n  - endpoint: tcp://127.0.0.1:5570\n"
     "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n",
     "router.rpc and router.results are both"},
    {BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://127.0.0.1:5580\n"
          "router:\n  http: 127.0.0.1:0\n",
     "given twice"},
    /* expert services: gap, overlap, `end` not last, bad range, unknown key, shared endpoint */
    {BASE ONE_STAGE "experts:\n  - {experts: [0, 3], endpoint: tcp://127.0.0.1:5600}\n"
                    "  - {experts: [4, end], endpoint: tcp://127.0.0.1:5601}\n",
     "experts[1].experts: starts at 4, so experts 3..3 belong to no service"},
    {BASE ONE_STAGE "experts:\n  - {experts: [1, end], endpoint: tcp://127.0.0.1:5600}\n",
     "experts[0].experts: starts at 1, so experts 0..0 belong to no service"},
    {BASE ONE_STAGE "experts:\n  - {experts: [0, 5], endpoint: tcp://127.0.0.1:5600}\n"
                    "  - {experts: [4, end], endpoint: tcp://127.0.0.1:5601}\n",
     "experts[1].experts: starts at 4, overlapping experts[0] (which ends at 5)"},
    {BASE ONE_STAGE "experts:\n  - {experts: [0, end], endpoint: tcp://127.0.0.1:5600}\n"
                    "  - {experts: [4, 8], endpoint: tcp://127.0.0.1:5601}\n",
     "experts[1]: experts[0] already runs to `end`"},
    {BASE ONE_STAGE "experts:\n  - {experts: [4, 2], endpoint: tcp://127.0.0.1:5600}\n",
     "experts[0].experts: end must be an integer > 4"},
    {BASE ONE_STAGE "experts:\n  - {experts: [x, 2], endpoint: tcp://127.0.0.1:5600}\n",
     "experts[0].experts: first expert must be an integer >= 0"},
    {BASE ONE_STAGE "experts:\n  - {experts: [0, end], endpoint: tcp://127.0.0.1:5600, layers: [0, 1]}\n",
     "experts[0].layers: unknown key (known: endpoint, host, threads, experts)"},
    {BASE ONE_STAGE "experts:\n  - {endpoint: tcp://127.0.0.1:5600}\n",
     "experts[0]: missing required key 'experts'"},
    {BASE ONE_STAGE "experts:\n  - {experts: [0, end], endpoint: tcp://127.0.0.1:5580}\n",
     "stage 0 and expert 0 both bind tcp://127.0.0.1:5580"},
};

static void test_bad_configs(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        cpm_config *c = NULL;
        cpm_error e = {0};
        int rc = parse(bad_cases[i].yaml, &c, &e);
        if (rc == 0)
            fail_msg("case %zu: accepted", i);
        assert_null(c);
        if (!strstr(e.msg, bad_cases[i].expect))
            fail_msg("case %zu: '%s' lacks '%s'", i, e.msg, bad_cases[i].expect);
    }
}

/* Endpoints by host name (a Kubernetes Service, /etc/hosts) and the key directory. */
static void test_names_and_keys(void **state) {
    (void)state;
    cpm_config *c;
    cpm_error e = {0};
    const char *named = BASE "stages:\n  - layers: [0, 2]\n    endpoint: tcp://cpm-stage-0.cpm-stage.default.svc.cluster.local:5580\n"
                        "  - layers: [2, end]\n    endpoint: tcp://[::1]:5581\n";
    assert_int_equal(parse(named, &c, &e), 0);
    assert_false(cpm_config_plaintext(c));
    char dir[512];
    unsetenv("CPM_KEYS_DIR");
    assert_int_equal(cpm_config_keys_dir(c, dir, sizeof dir, &e), 0);
    assert_string_equal(dir, "./keys"); /* beside the file ("t.yaml": this directory) */
    setenv("CPM_KEYS_DIR", "/run/secrets/cpm", 1);
    assert_int_equal(cpm_config_keys_dir(c, dir, sizeof dir, &e), 0);
    assert_string_equal(dir, "/run/secrets/cpm");
    unsetenv("CPM_KEYS_DIR");
    cpm_config_free(c);
    assert_int_equal(parse(BASE ONE_STAGE "security:\n  curve: off\n  keys: /etc/k\n", &c, &e), 0);
    assert_true(cpm_config_plaintext(c));
    assert_int_equal(cpm_config_keys_dir(c, dir, sizeof dir, &e), 0);
    assert_string_equal(dir, "/etc/k");
    cpm_config_free(c);
}

static void test_http_forms(void **state) {
    (void)state;
    const char *y = "router:\n  http: 9000\n  rpc: tcp://127.0.0.1:5550\n  results: tcp://127.0.0.1:5551\n"
                    "tokenizers:\n  - endpoint: tcp://127.0.0.1:5560\n"
                    "samplers:\n  - endpoint: tcp://127.0.0.1:5570\n"
                    "stages:\n  - layers: [0, end]\n    endpoint: tcp://127.0.0.1:5580\n";
    cpm_config *c;
    cpm_error e = {0};
    if (parse(y, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->router.http_port, 9000);
    assert_string_equal(c->router.http_addr, "127.0.0.1");
    cpm_config_free(c);
}

/* The shipped examples must stay loadable. CPM_SOURCE_ROOT is set by meson. */
static void test_shipped_examples(void **state) {
    (void)state;
    const char *names[] = {"default.yaml", "local.yaml", "pp2.yaml", "multihost.yaml",
                           "replicas.yaml", "moe-experts.yaml", "tp2.yaml"};
    for (int i = 0; i < 7; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/cluster-config/%s", CPM_SOURCE_ROOT, names[i]);
        cpm_config *c;
        cpm_error e = {0};
        if (cpm_config_load(path, &c, &e))
            fail_msg("%s", e.msg);
        assert_true(c->n_stages >= 1);
        cpm_config_free(c);
    }
    cpm_config *c;
    cpm_error e = {0};
    assert_int_equal(cpm_config_load("/nonexistent/x.yaml", &c, &e), CPM_EIO);
    assert_non_null(strstr(e.msg, "/nonexistent/x.yaml"));
}

static void test_describe_lists_every_section(void **state) {
    (void)state;
    char buf[8192];
    cpm_config_describe(buf, sizeof buf);
    assert_non_null(strstr(buf, "router.max_queue"));
    assert_non_null(strstr(buf, "stages[].layers"));
    assert_non_null(strstr(buf, "samplers[].endpoint"));
    assert_non_null(strstr(buf, "experts[].experts"));
    assert_non_null(strstr(buf, "stages[].tp[].mesh"));
}

#define TP_STAGES                                     \
    "stages:\n"                                       \
    "  - layers: [0, 1]\n"                            \
    "    endpoint: tcp://127.0.0.1:5580\n"            \
    "    tp_mesh: tcp://127.0.0.1:5590\n"             \
    "    tp:\n"                                       \
    "      - endpoint: tcp://127.0.0.1:5582\n"        \
    "        mesh: tcp://127.0.0.1:5591\n"            \
    "        threads: 2\n"                            \
    "  - layers: [1, end]\n"                          \
    "    endpoint: tcp://127.0.0.1:5581\n"

/* Tensor parallelism: ranks > 0 come after every other process, named by stage and rank. */
static void test_tp_stage(void **state) {
    (void)state;
    cpm_config *c;
    cpm_error e = {0};
    if (parse(BASE TP_STAGES, &c, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(c->stages[0].n_tp, 1);
    assert_int_equal(c->stages[1].n_tp, 0);
    assert_string_equal(c->stages[0].tp_mesh, "tcp://127.0.0.1:5590");
    assert_int_equal(c->stages[0].tp[0].svc.threads, 2);
    assert_int_equal(cpm_config_n_procs(c), 6); /* router, tok, sampler, 2 stages, 1 TP rank */
    cpm_role role;
    int idx, st, rank;
    assert_int_equal(cpm_config_proc(c, 4, &role, &idx, NULL), 0);
    assert_int_equal(role, CPM_ROLE_STAGE); /* numbering of the others unchanged */
    assert_int_equal(cpm_config_proc(c, 5, &role, &idx, NULL), 0);
    assert_int_equal(role, CPM_ROLE_TP);
    assert_int_equal(cpm_config_tp_proc(c, idx, &st, &rank, NULL), 0);
    assert_int_equal(st, 0);
    assert_int_equal(rank, 1);
    assert_string_equal(cpm_config_proc_endpoint(c, 5), "tcp://127.0.0.1:5582");
    assert_int_equal(cpm_config_tp_proc(c, 1, &st, &rank, &e), CPM_ERANGE);
    /* against the model: shard/engine/model/tp_split (tests/unit/test_tp_split.c) */
    cpm_config_free(c);
}

static void expect_tp_error(const char *y, int code, const char *needle) {
    cpm_config *c;
    cpm_error e = {0};
    assert_int_equal(parse(y, &c, &e), code);
    if (!strstr(e.msg, needle))
        fail_msg("'%s' lacks '%s'", e.msg, needle);
}

static void test_tp_clashes(void **state) {
    (void)state;
    /* a rank's endpoint clashes with another service's */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp_mesh: tcp://127.0.0.1:5590\n"
                    "    tp:\n"
                    "      - endpoint: tcp://127.0.0.1:5570\n"
                    "        mesh: tcp://127.0.0.1:5591\n",
                    CPM_EINVAL, "sampler 0 and tp 0 both bind tcp://127.0.0.1:5570");
    /* two meshes on one endpoint */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp_mesh: tcp://127.0.0.1:5590\n"
                    "    tp:\n"
                    "      - endpoint: tcp://127.0.0.1:5582\n"
                    "        mesh: tcp://127.0.0.1:5590\n",
                    CPM_EINVAL, "tp rank 0 and stages[0] tp rank 1 both bind mesh");
    /* a mesh on a service's endpoint */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp_mesh: tcp://127.0.0.1:5580\n"
                    "    tp:\n"
                    "      - endpoint: tcp://127.0.0.1:5582\n"
                    "        mesh: tcp://127.0.0.1:5591\n",
                    CPM_EINVAL, "mesh tcp://127.0.0.1:5580 is also bound by stage 0");
    /* tp without rank 0's mesh */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp:\n"
                    "      - endpoint: tcp://127.0.0.1:5582\n"
                    "        mesh: tcp://127.0.0.1:5591\n",
                    CPM_EINVAL, "stages[0].tp_mesh: required with tp");
    /* a rank without its mesh */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp_mesh: tcp://127.0.0.1:5590\n"
                    "    tp:\n"
                    "      - endpoint: tcp://127.0.0.1:5582\n",
                    CPM_EINVAL, "missing required key 'mesh'");
    /* too many ranks */
    expect_tp_error(BASE "stages:\n"
                    "  - layers: [0, end]\n"
                    "    endpoint: tcp://127.0.0.1:5580\n"
                    "    tp_mesh: tcp://127.0.0.1:5590\n"
                    "    tp: [{endpoint: 'tcp://h:1', mesh: 'tcp://h:11'}, {endpoint: 'tcp://h:2', "
                    "mesh: 'tcp://h:12'}, {endpoint: 'tcp://h:3', mesh: 'tcp://h:13'}, {endpoint: "
                    "'tcp://h:4', mesh: 'tcp://h:14'}, {endpoint: 'tcp://h:5', mesh: 'tcp://h:15'}, "
                    "{endpoint: 'tcp://h:6', mesh: 'tcp://h:16'}, {endpoint: 'tcp://h:7', mesh: "
                    "'tcp://h:17'}, {endpoint: 'tcp://h:8', mesh: 'tcp://h:18'}]\n",
                    CPM_ELIMIT, "at most 7 entries");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_two_stages),
        cmocka_unit_test(test_missing_layers_at_model_end),
        cmocka_unit_test(test_token_in_without_tokenizers),
        cmocka_unit_test(test_pipeline_replicas),
        cmocka_unit_test(test_bad_configs),
        cmocka_unit_test(test_expert_services),
        cmocka_unit_test(test_http_forms),
        cmocka_unit_test(test_names_and_keys),
        cmocka_unit_test(test_shipped_examples),
        cmocka_unit_test(test_describe_lists_every_section),
        cmocka_unit_test(test_tp_stage),
        cmocka_unit_test(test_tp_clashes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
