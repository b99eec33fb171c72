/* metrics.c - histograms and the Prometheus text exposition of the router's metrics. */
#include "metrics.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

const double cpm_hist_bounds[CPM_HIST_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                  0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};

void cpm_hist_observe(cpm_hist *h, double seconds) {
    int b = 0;
    while (b < CPM_HIST_BUCKETS && seconds > cpm_hist_bounds[b])
        b++;
    h->counts[b]++;
    h->sum += seconds;
    h->n++;
}

typedef struct out {
    char *buf;
    size_t len, cap;
    bool oom;
} out;

__attribute__((format(printf, 2, 3))) static void put(out *o, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = o->oom ? 0 : vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (o->oom || n < 0)
            return;
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2 + (size_t)n;
        char *nb = realloc(o->buf, cap);
        if (!nb) {
            o->oom = true;
            return;
        }
        o->buf = nb;
        o->cap = cap;
    }
}

static void hist(out *o, const char *name, const char *help, const cpm_hist *h) {
    put(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int b = 0; b < CPM_HIST_BUCKETS; b++) {
        cum += h->counts[b];
        put(o, "%s_bucket{le=\"%g\"} %llu\n", name, cpm_hist_bounds[b], (unsigned long long)cum);
    }
    cum += h->counts[CPM_HIST_BUCKETS];
    put(o, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
        (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->n);
}

static void gauge(out *o, const char *name, const char *help, double v) {
    put(o, "# HELP %s %s\n# TYPE %s gauge\n%s %g\n", name, help, name, name, v);
}

static void counter(out *o, const char *name, const char *help, uint64_t v) {
    put(o, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
        (unsigned long long)v);
}

char *cpm_metrics_render(const cpm_metrics *m, const cpm_metrics_gauges *g, size_t *ret_len) {
    static const char *const eps[CPM_EP_COUNT] = {"completions", "chat_completions", "rpc",
                                                  "other"};
    static const char *const outs[CPM_OUT_COUNT] = {"ok", "rejected", "overloaded", "cancelled",
                                                    "failed"};
    out o = {.cap = 8192};
    if (!(o.buf = malloc(o.cap)))
        return NULL;
    put(&o, "# HELP cpm_requests_total Requests by endpoint and outcome.\n"
            "# TYPE cpm_requests_total counter\n");
    for (int e = 0; e < CPM_EP_COUNT; e++)
        for (int k = 0; k < CPM_OUT_COUNT; k++)
            put(&o, "cpm_requests_total{endpoint=\"%s\",outcome=\"%s\"} %llu\n", eps[e], outs[k],
                (unsigned long long)m->requests[e][k]);
    counter(&o, "cpm_prompt_tokens_total", "Prompt tokens prefilled.", m->prompt_tokens);
    counter(&o, "cpm_generation_tokens_total", "Tokens generated.", m->generation_tokens);
    counter(&o, "cpm_pipeline_steps_total", "Micro-batches sent through the pipeline.", m->steps);
    counter(&o, "cpm_pipeline_rows_total", "Token rows sent through the pipeline.", m->step_rows);
    counter(&o, "cpm_failovers_total",
            "Sequences moved to another pipeline replica after theirs failed.", m->failovers);
    counter(&o, "cpm_service_retries_total",
            "Sampler and tokenizer calls sent again to another replica after a timeout or a lost "
            "service.", m->retries);
    hist(&o, "cpm_time_to_first_token_seconds", "Request accepted to first generated token.",
         &m->ttft);
    hist(&o, "cpm_inter_token_latency_seconds", "Time between tokens of one sequence.",
         &m->inter_token);
    hist(&o, "cpm_request_duration_seconds", "Request accepted to final response.", &m->e2e);
    hist(&o, "cpm_pipeline_step_seconds", "Micro-batch sent to logits back.", &m->step_latency);
    gauge(&o, "cpm_queue_depth", "Sequences waiting for admission.", g->queue_depth);
    gauge(&o, "cpm_running_sequences", "Sequences admitted to the pipeline.", g->running);
    gauge(&o, "cpm_inflight_micro_batches", "Micro-batches in the pipeline.", g->inflight);
    gauge(&o, "cpm_kv_reserved_tokens", "KV-cache tokens reserved by running sequences.",
          g->kv_reserved);
    gauge(&o, "cpm_kv_budget_tokens", "KV-cache tokens per stage (0 = unlimited).", g->kv_budget);
    gauge(&o, "cpm_kv_usage_ratio", "KV-cache blocks in use over all stages (from health).",
          g->kv_total_blocks ? (double)g->kv_used_blocks / g->kv_total_blocks : 0.0);
    gauge(&o, "cpm_http_connections", "Open HTTP connections.", g->http_connections);
    gauge(&o, "cpm_ready", "1 when every back-end service is ready.", g->ready);
    if (o.oom) {
        free(o.buf);
        return NULL;
    }
    if (ret_len)
        *ret_len = o.len;
    return o.buf;
}
