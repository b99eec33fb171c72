/* test_metrics.c - router/metrics.c: histogram buckets per kind, the Prometheus text
 * (model_name on every series, escaped; cumulative buckets; finish reasons; services). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "router/metrics.h"

static void test_buckets(void **state) {
    (void)state;
    cpm_metrics m;
    cpm_metrics_init(&m);
    cpm_hist_observe(&m.e2e, 0.0005);  /* first bucket */
    cpm_hist_observe(&m.e2e, 3000.0);  /* under the hour */
    cpm_hist_observe(&m.e2e, 5000.0);  /* +Inf */
    assert_int_equal(m.e2e.counts[0], 1);
    assert_int_equal(m.e2e.counts[cpm_hist_time_n - 1], 1);
    assert_int_equal(m.e2e.counts[cpm_hist_time_n], 1);
    cpm_hist_observe(&m.prompt_len, 3); /* tokens: the 5 bucket */
    assert_int_equal(m.prompt_len.counts[2], 1);
    cpm_hist zeroed = {0};              /* a histogram never initialised: time buckets */
    cpm_hist_observe(&zeroed, 0.2);
    assert_int_equal(zeroed.n_bounds, cpm_hist_time_n);
}

static void test_render(void **state) {
    (void)state;
    cpm_metrics m;
    cpm_metrics_init(&m);
    m.finished[CPM_FIN_LENGTH] = 3;
    cpm_hist_observe(&m.gen_len, 40);
    cpm_hist_observe(&m.gen_len, 700);
    cpm_metrics_service svc[2] = {{"stage0", "stage", true, 0.0012}, {"sampler\"0", "sampler", false, 0}};
    cpm_metrics_gauges g = {.model_name = "mini\"cpm\\4", .ready = 1, .services = svc, .n_services = 2};
    size_t len;
    char *t = cpm_metrics_render(&m, &g, &len);
    assert_non_null(t);
    assert_int_equal(strlen(t), len);
    const char *want[] = {
        "cpm_request_finished_total{model_name=\"mini\\\"cpm\\\\4\",finished_reason=\"length\"} 3\n",
        "cpm_request_generation_tokens_bucket{model_name=\"mini\\\"cpm\\\\4\",le=\"50\"} 1\n",
        "cpm_request_generation_tokens_bucket{model_name=\"mini\\\"cpm\\\\4\",le=\"1000\"} 2\n",
        "cpm_request_generation_tokens_count{model_name=\"mini\\\"cpm\\\\4\"} 2\n",
        "cpm_request_duration_seconds_bucket{model_name=\"mini\\\"cpm\\\\4\",le=\"3600\"} 0\n",
        "cpm_service_up{model_name=\"mini\\\"cpm\\\\4\",service=\"stage0\",kind=\"stage\"} 1\n",
        "cpm_service_up{model_name=\"mini\\\"cpm\\\\4\",service=\"sampler\\\"0\",kind=\"sampler\"} 0\n",
        "cpm_service_health_seconds{model_name=\"mini\\\"cpm\\\\4\",service=\"stage0\",kind=\"stage\"} 0.001200\n",
        "cpm_ready{model_name=\"mini\\\"cpm\\\\4\"} 1\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(t, want[i]))
            fail_msg("missing: %s", want[i]);
    /* every sample line carries the label */
    for (char *line = strtok(t, "\n"); line; line = strtok(NULL, "\n"))
        if (line[0] != '#' && !strstr(line, "{model_name="))
            fail_msg("no model_name: %s", line);
    free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_buckets),
        cmocka_unit_test(test_render),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
