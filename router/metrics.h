/* metrics.h - the router's counters and histograms, rendered for GET /metrics.
 *
 * Updated on the loop thread only (no locks); rendered in the Prometheus text
 * exposition format, every series labelled with model_name (as vLLM's, so dashboards
 * made for it work: docker/grafana-dashboard.json). Gauges that belong to other modules
 * (queue depth, KV use, the services' health) are passed in at render time rather than
 * mirrored here.
 */
#ifndef CPM_METRICS_H
#define CPM_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CPM_HIST_MAX_BUCKETS 24

/* A histogram over fixed upper bounds (seconds or tokens). */
typedef struct cpm_hist {
    const double *bounds; /* ascending; NULL: the time bounds */
    int n_bounds;
    uint64_t counts[CPM_HIST_MAX_BUCKETS + 1]; /* last: +Inf */
    double sum;
    uint64_t n;
} cpm_hist;

/* Time buckets, seconds: 1 ms up to an hour (a request may run that long). */
extern const double cpm_hist_time_bounds[];
extern const int cpm_hist_time_n;
/* Length buckets, tokens: 1 up to 256k (the longest context any MiniCPM has, and more). */
extern const double cpm_hist_len_bounds[];
extern const int cpm_hist_len_n;

void cpm_hist_observe(cpm_hist *h, double v);

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

/* Why a sequence (a choice) ended. */
enum cpm_metric_finish {
    CPM_FIN_STOP,   /* EOS, a stop id or a stop string */
    CPM_FIN_LENGTH, /* max_tokens or the context */
    CPM_FIN_ABORT,  /* cancelled: the client went away */
    CPM_FIN_ERROR,  /* the request failed */
    CPM_FIN_TOOL_CALLS, /* it ended normally and the front's parser found tool calls in it */
    CPM_FIN_COUNT,
};

typedef struct cpm_metrics {
    uint64_t requests[CPM_EP_COUNT][CPM_OUT_COUNT];
    uint64_t finished[CPM_FIN_COUNT]; /* sequences by finish reason */
    uint64_t prompt_tokens, generation_tokens;
    uint64_t steps, step_rows;
    uint64_t failovers; /* sequences moved to another pipeline replica */
    uint64_t prefix_misses; /* steps that lost a cached prefix block at a stage */
    uint64_t retries;   /* service calls sent again to another replica (sampler, tokenizer) */
    cpm_hist ttft;          /* request accepted -> first token */
    cpm_hist inter_token;   /* between consecutive tokens of a sequence */
    cpm_hist e2e;           /* request accepted -> final response */
    cpm_hist step_latency;  /* micro-batch sent -> logits back */
    cpm_hist queue_time;    /* request accepted -> its sequence's first rows sent */
    cpm_hist prefill_time;  /* first rows sent -> first token */
    cpm_hist decode_time;   /* first token -> the sequence's last */
    cpm_hist prompt_len;    /* tokens per prompt */
    cpm_hist gen_len;       /* tokens generated per sequence that finished */
} cpm_metrics;

/* Zeroes m and gives each histogram its buckets. */
void cpm_metrics_init(cpm_metrics *m);

/* One back-end service as health sees it. */
typedef struct cpm_metrics_service {
    const char *name, *kind; /* "stage0", "stage" */
    bool up;                 /* answered its last health poll, ready */
    double poll_s;           /* that poll's round trip */
} cpm_metrics_service;

/* Gauges read at render time. */
typedef struct cpm_metrics_gauges {
    const char *model_name; /* label of every series; NULL: "" */
    int queue_depth;    /* sequences waiting for admission */
    int running;        /* admitted sequences */
    int inflight;       /* micro-batches in the pipeline */
    int kv_reserved, kv_budget; /* router's KV-token reservations */
    int kv_used_blocks, kv_total_blocks; /* from the stages' health (summed) */
    int http_connections;
    int ready;
    uint64_t prefix_asked, prefix_reused; /* prompt tokens a cached prefix could cover / did */
    const cpm_metrics_service *services;
    int n_services;
} cpm_metrics_gauges;

/* Prometheus text (version 0.0.4). Caller frees. NULL without memory. */
char *cpm_metrics_render(const cpm_metrics *m, const cpm_metrics_gauges *g, size_t *ret_len);

#endif
