/* metrics.h - the router's counters and latency histograms, rendered for GET /metrics.
 *
 * Updated on the loop thread only (no locks); rendered in the Prometheus text
 * exposition format. Gauges that belong to other modules (queue depth, KV use)
 * are passed in at render time rather than mirrored here.
 */
#ifndef CPM_METRICS_H
#define CPM_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define CPM_HIST_BUCKETS 14

typedef struct cpm_hist {
    uint64_t counts[CPM_HIST_BUCKETS + 1]; /* last: +Inf */
    double sum;
    uint64_t n;
} cpm_hist;

/* Upper bounds of the buckets, seconds (shared by every histogram). */
extern const double cpm_hist_bounds[CPM_HIST_BUCKETS];

void cpm_hist_observe(cpm_hist *h, double seconds);

enum cpm_metric_endpoint {
    CPM_EP_COMPLETIONS,
    CPM_EP_CHAT,
    CPM_EP_RPC,
    CPM_EP_OTHER,
    CPM_EP_COUNT,
};

enum cpm_metric_outcome {
    CPM_OUT_OK,        /* finished normally */
    CPM_OUT_REJECTED,  /* 4xx before generating */
    CPM_OUT_OVERLOAD,  /* 429 / 503 */
    CPM_OUT_CANCELLED, /* client went away */
    CPM_OUT_FAILED,    /* a back-end error */
    CPM_OUT_COUNT,
};

typedef struct cpm_metrics {
    uint64_t requests[CPM_EP_COUNT][CPM_OUT_COUNT];
    uint64_t prompt_tokens, generation_tokens;
    uint64_t steps, step_rows;
    uint64_t failovers; /* sequences moved to another pipeline replica */
    uint64_t retries;   /* service calls sent again to another replica (sampler, tokenizer) */
    cpm_hist ttft;          /* request accepted -> first token */
    cpm_hist inter_token;   /* between consecutive tokens of a sequence */
    cpm_hist e2e;           /* request accepted -> final response */
    cpm_hist step_latency;  /* micro-batch sent -> logits back */
} cpm_metrics;

/* Gauges read at render time. */
typedef struct cpm_metrics_gauges {
    int queue_depth;    /* sequences waiting for admission */
    int running;        /* admitted sequences */
    int inflight;       /* micro-batches in the pipeline */
    int kv_reserved, kv_budget; /* router's KV-token reservations */
    int kv_used_blocks, kv_total_blocks; /* from the stages' health (summed) */
    int http_connections;
    int ready;
} cpm_metrics_gauges;

/* Prometheus text (version 0.0.4). Caller frees. NULL without memory. */
char *cpm_metrics_render(const cpm_metrics *m, const cpm_metrics_gauges *g, size_t *ret_len);

#endif
