/* metrics.c - histograms and the Prometheus text exposition of the router's metrics. */
#include "metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

const double cpm_hist_time_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                       2.5,   5.0,    10.0,  20.0, 30.0,  60.0, 120.0, 300.0, 600.0,
                                       1200.0, 1800.0, 3600.0};
const int cpm_hist_time_n = (int)(sizeof cpm_hist_time_bounds / sizeof *cpm_hist_time_bounds);
const double cpm_hist_len_bounds[] = {1,    2,    5,    10,    20,    50,    100,   200,
                                      500,  1000, 2000, 4000,  8000,  16000, 32000, 65536,
                                      131072, 262144};
const int cpm_hist_len_n = (int)(sizeof cpm_hist_len_bounds / sizeof *cpm_hist_len_bounds);

_Static_assert(sizeof cpm_hist_time_bounds / sizeof(double) <= CPM_HIST_MAX_BUCKETS, "time buckets");
_Static_assert(sizeof cpm_hist_len_bounds / sizeof(double) <= CPM_HIST_MAX_BUCKETS, "length buckets");

static void hist_init(cpm_hist *h, const double *bounds, int n) {
    *h = (cpm_hist){.bounds = bounds, .n_bounds = n};
}

void cpm_metrics_init(cpm_metrics *m) {
    *m = (cpm_metrics){0};
    cpm_hist *times[] = {&m->ttft, &m->inter_token, &m->e2e, &m->step_latency, &m->queue_time,
                         &m->prefill_time, &m->decode_time};
    for (size_t i = 0; i < sizeof times / sizeof *times; i++)
        hist_init(times[i], cpm_hist_time_bounds, cpm_hist_time_n);
    hist_init(&m->prompt_len, cpm_hist_len_bounds, cpm_hist_len_n);
    hist_init(&m->gen_len, cpm_hist_len_bounds, cpm_hist_len_n);
}

void cpm_hist_observe(cpm_hist *h, double v) {
    if (!h->bounds) /* a zeroed struct: time buckets */
        hist_init(h, cpm_hist_time_bounds, cpm_hist_time_n);
    int b = 0;
    while (b < h->n_bounds && v > h->bounds[b])
        b++;
    h->counts[b]++;
    h->sum += v;
    h->n++;
}

typedef struct out {
    char *buf;
    size_t len, cap;
    bool oom;
    char model[160]; /* `model_name="..."`, escaped */
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

/* A label value as the exposition format wants it: \ " and newline escaped. */
static void escape(char *dst, size_t cap, const char *s) {
    size_t k = 0;
    for (; s && *s && k + 3 < cap; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n')
            dst[k++] = '\\';
        dst[k++] = *s == '\n' ? 'n' : *s;
    }
    dst[k] = '\0';
}

static void help(out *o, const char *name, const char *type, const char *text) {
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
}

static void hist(out *o, const char *name, const char *text, const cpm_hist *h) {
    help(o, name, "histogram", text);
    const double *bounds = h->bounds ? h->bounds : cpm_hist_time_bounds;
    int nb = h->bounds ? h->n_bounds : cpm_hist_time_n;
    uint64_t cum = 0;
    for (int b = 0; b < nb; b++) {
        cum += h->counts[b];
        put(o, "%s_bucket{%s,le=\"%g\"} %llu\n", name, o->model, bounds[b], (unsigned long long)cum);
    }
    cum += h->counts[nb];
    put(o, "%s_bucket{%s,le=\"+Inf\"} %llu\n%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, o->model,
        (unsigned long long)cum, name, o->model, h->sum, name, o->model, (unsigned long long)h->n);
}

static void gauge(out *o, const char *name, const char *text, double v) {
    help(o, name, "gauge", text);
    put(o, "%s{%s} %g\n", name, o->model, v);
}

static void counter(out *o, const char *name, const char *text, uint64_t v) {
    help(o, name, "counter", text);
    put(o, "%s{%s} %llu\n", name, o->model, (unsigned long long)v);
}

static void requests(out *o, const cpm_metrics *m) {
    static const char *const eps[CPM_EP_COUNT] = {"completions", "chat_completions", "rpc", "other"};
    static const char *const outs[CPM_OUT_COUNT] = {"ok", "rejected", "overloaded", "cancelled",
                                                    "failed"};
    static const char *const fins[CPM_FIN_COUNT] = {"stop", "length", "abort", "error",
                                                    "tool_calls"};
    help(o, "cpm_requests_total", "counter", "Requests by endpoint and outcome.");
    for (int e = 0; e < CPM_EP_COUNT; e++)
        for (int k = 0; k < CPM_OUT_COUNT; k++)
            put(o, "cpm_requests_total{%s,endpoint=\"%s\",outcome=\"%s\"} %llu\n", o->model, eps[e],
                outs[k], (unsigned long long)m->requests[e][k]);
    help(o, "cpm_request_finished_total", "counter",
         "Sequences (choices) that ended, by finish reason.");
    for (int f = 0; f < CPM_FIN_COUNT; f++)
        put(o, "cpm_request_finished_total{%s,finished_reason=\"%s\"} %llu\n", o->model, fins[f],
            (unsigned long long)m->finished[f]);
}

static void services(out *o, const cpm_metrics_gauges *g) {
    help(o, "cpm_service_up", "gauge", "1 when a back-end service answered its last health poll ready.");
    for (int i = 0; i < g->n_services; i++) {
        char name[80];
        escape(name, sizeof name, g->services[i].name);
        put(o, "cpm_service_up{%s,service=\"%s\",kind=\"%s\"} %d\n", o->model, name,
            g->services[i].kind, g->services[i].up);
    }
    help(o, "cpm_service_health_seconds", "gauge", "Round trip of the last health poll per service.");
    for (int i = 0; i < g->n_services; i++) {
        char name[80];
        escape(name, sizeof name, g->services[i].name);
        put(o, "cpm_service_health_seconds{%s,service=\"%s\",kind=\"%s\"} %.6f\n", o->model, name,
            g->services[i].kind, g->services[i].poll_s);
    }
}

static void histograms(out *o, const cpm_metrics *m) {
    hist(o, "cpm_time_to_first_token_seconds", "Request accepted to first generated token.", &m->ttft);
    hist(o, "cpm_inter_token_latency_seconds", "Time between tokens of one sequence.", &m->inter_token);
    hist(o, "cpm_request_duration_seconds", "Request accepted to final response.", &m->e2e);
    hist(o, "cpm_request_queue_time_seconds", "Request accepted to its sequence's first rows sent.",
         &m->queue_time);
    hist(o, "cpm_request_prefill_time_seconds", "First rows sent to first token.", &m->prefill_time);
    hist(o, "cpm_request_decode_time_seconds", "First token to the sequence's last.", &m->decode_time);
    hist(o, "cpm_request_prompt_tokens", "Tokens per prompt admitted.", &m->prompt_len);
    hist(o, "cpm_request_generation_tokens", "Tokens generated per finished sequence.", &m->gen_len);
    hist(o, "cpm_pipeline_step_seconds", "Micro-batch sent to logits back.", &m->step_latency);
}

char *cpm_metrics_render(const cpm_metrics *m, const cpm_metrics_gauges *g, size_t *ret_len) {
    out o = {.cap = 16384};
    if (!(o.buf = malloc(o.cap)))
        return NULL;
    char name[128];
    escape(name, sizeof name, g->model_name);
    snprintf(o.model, sizeof o.model, "model_name=\"%s\"", name);
    requests(&o, m);
    counter(&o, "cpm_prompt_tokens_total", "Prompt tokens prefilled.", m->prompt_tokens);
    counter(&o, "cpm_generation_tokens_total", "Tokens generated.", m->generation_tokens);
    counter(&o, "cpm_pipeline_steps_total", "Micro-batches sent through the pipeline.", m->steps);
    counter(&o, "cpm_pipeline_rows_total", "Token rows sent through the pipeline.", m->step_rows);
    counter(&o, "cpm_failovers_total", "Sequences moved to another pipeline replica after theirs failed.",
            m->failovers);
    counter(&o, "cpm_prefix_cache_queries_total",
            "Prompt tokens (whole KV blocks, all but each prompt's last) a cached prefix could "
            "have supplied.", g->prefix_asked);
    counter(&o, "cpm_prefix_cache_hits_total", "Prompt tokens supplied by the prefix cache.",
            g->prefix_reused);
    counter(&o, "cpm_prefix_cache_misses_total",
            "Micro-batches a stage failed because a cached prefix block was gone (their requests "
            "started again from the first token).", m->prefix_misses);
    counter(&o, "cpm_service_retries_total",
            "Sampler and tokenizer calls sent again to another replica after a timeout or a lost "
            "service.", m->retries);
    histograms(&o, m);
    gauge(&o, "cpm_queue_depth", "Sequences waiting for admission.", g->queue_depth);
    gauge(&o, "cpm_running_sequences", "Sequences admitted to the pipeline.", g->running);
    gauge(&o, "cpm_inflight_micro_batches", "Micro-batches in the pipeline.", g->inflight);
    gauge(&o, "cpm_kv_reserved_tokens", "KV-cache tokens reserved by running sequences.", g->kv_reserved);
    gauge(&o, "cpm_kv_budget_tokens", "KV-cache tokens per stage (0 = unlimited).", g->kv_budget);
    gauge(&o, "cpm_kv_usage_ratio", "KV-cache blocks in use over all stages (from health).",
          g->kv_total_blocks ? (double)g->kv_used_blocks / g->kv_total_blocks : 0.0);
    gauge(&o, "cpm_http_connections", "Open HTTP connections.", g->http_connections);
    gauge(&o, "cpm_ready", "1 when every back-end service is ready.", g->ready);
    services(&o, g);
    if (o.oom) {
        free(o.buf);
        return NULL;
    }
    if (ret_len)
        *ret_len = o.len;
    return o.buf;
}
