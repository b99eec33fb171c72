/* config.h - the cluster file: which model, which services where, which stage owns which layers.
 *
 * One YAML file (cluster-config/NAME.yaml) describes a whole cluster; cpm-cluster reads
 * it to start processes, and each service reads it to find itself (--config FILE
 * --index N) and its peers. Keys are a table (config.c) with types, bounds and
 * defaults; unknown keys, bad endpoints, overlapping or missing layers are errors
 * naming file:line:column and the key.
 *
 *   cpm_config *c;
 *   if (cpm_config_load("cluster-config/pp2.yaml", &c, &e)) die(e.msg);
 *   printf("%d stages, stage 0 = %s\n", c->n_stages, c->stages[0].endpoint);
 *   cpm_config_free(c);
 *
 * The struct is plain data (read-only after loading) because every service reads
 * many of its fields; accessors would only add noise.
 */
#ifndef CPM_CONFIG_H
#define CPM_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"

#define CPM_CFG_MAX_STAGES 64
#define CPM_CFG_MAX_REPLICAS 16
#define CPM_CFG_MAX_EXPERT_SVCS 64
#define CPM_CFG_STR 256
#define CPM_CFG_MAX_TP 8 /* ranks of one tensor-parallel stage */
#define CPM_CFG_LAYER_END (-1) /* `end` in a layer range: through the model's last layer */

typedef struct cpm_cfg_service {
    char endpoint[CPM_CFG_STR]; /* zmq endpoint the service binds: tcp://host:port or ipc://path */
    char host[CPM_CFG_STR];     /* where it runs (multi-host; informational for `up`) */
    int threads;                /* worker threads */
} cpm_cfg_service;

/* A tensor-parallel rank 1..T-1 of a stage (rank 0 is the stage itself). */
typedef struct cpm_cfg_tp {
    cpm_cfg_service svc;        /* endpoint: its stage endpoint (health; micro-batches from rank 0) */
    char mesh[CPM_CFG_STR];     /* its all-reduce endpoint (partials from the other ranks) */
} cpm_cfg_tp;

typedef struct cpm_cfg_stage {
    cpm_cfg_service svc;
    int pipeline;               /* which replica of the pipeline it belongs to (0 ..) */
    int layer_begin, layer_end; /* [begin, end); end may be CPM_CFG_LAYER_END */
    int kv_tokens;              /* KV-cache capacity in tokens */
    int max_seqs;               /* live sequences */
    int max_batch_tokens;       /* rows per forward */
    char kv_dtype[CPM_CFG_STR]; /* "f32" (exact) or "f16" (half the KV memory) */
    char isa[CPM_CFG_STR]; /* matmul kernels: "auto" or scalar/avx2/avx512/amx */
    char activations[CPM_CFG_STR]; /* "exact" f32, "bf16" or "int8" (int4 weights) activations */
    char lm_head[CPM_CFG_STR];  /* output layer: "stored" (the checkpoint's) or "int8" (at load) */
    char ffn[CPM_CFG_STR];      /* FATReLU (MiniCPM-S) FFN: "sparse" (active neurons only) or "dense" */
    char weights[CPM_CFG_STR];  /* "resident" (copied at load) or "mapped" (the file mapping) */
    char tp_mesh[CPM_CFG_STR];  /* tensor parallelism: rank 0's all-reduce endpoint */
    int n_tp;                   /* ranks besides rank 0 (0: no TP); tp size = n_tp + 1 */
    cpm_cfg_tp tp[CPM_CFG_MAX_TP - 1];
} cpm_cfg_stage;

/* An expert service (expert parallelism): MoE experts [begin, end) of every layer. */
typedef struct cpm_cfg_expert {
    cpm_cfg_service svc;
    int expert_begin, expert_end; /* [begin, end); end may be CPM_CFG_LAYER_END (`end`) */
} cpm_cfg_expert;

typedef struct cpm_cfg_router {
    char host[CPM_CFG_STR];
    char http_addr[CPM_CFG_STR]; /* HTTP listen address (IP) */
    int http_port;
    char rpc[CPM_CFG_STR];       /* internal generate API (zmq ROUTER, bound) */
    char results[CPM_CFG_STR];   /* where the last stage sends results (bound by the router) */
    int max_prompt_tokens;
    int max_tokens;              /* cap on (and default of) max_tokens; 0: the context left */
    int max_queue;               /* waiting requests before 429 */
    int max_seqs;                /* concurrently running sequences */
    int max_body_bytes;          /* HTTP body limit */
    int micro_batches;           /* micro-batches in flight in the pipeline */
    int prefill_chunk;           /* most prompt tokens of one sequence per micro-batch */
    int timeout_ms;              /* per pipeline step / service call */
    char tokenize[CPM_CFG_STR];  /* "service": text via cpm-tokenizer; "off": token ids only */
    char prefix_cache[CPM_CFG_STR]; /* "on": reuse cached KV blocks of earlier prompts; "off" */
    char api_keys[CPM_CFG_STR];  /* file of HTTP API keys (router/door.h) */
    char auth[CPM_CFG_STR]; /* "keys" or "none" */
    char cors_origins[CPM_CFG_STR]; /* comma-separated, or "*" */
    int drain_ms;                /* SIGTERM: grace for the requests in flight */
} cpm_cfg_router;

/* The fabric's security (services/common/curve.h). */
typedef struct cpm_cfg_security {
    char curve[CPM_CFG_STR]; /* "on" (default): CurveZMQ on every socket; "off": plain text */
    char keys[CPM_CFG_STR];      /* key directory as written (see cpm_config_keys_dir) */
} cpm_cfg_security;

typedef struct cpm_config {
    char path[CPM_CFG_STR];      /* the file it came from (for messages) */
    char model[CPM_CFG_STR];     /* model directory */
    char name[CPM_CFG_STR];      /* model name served by /v1/models (default: basename of model) */
    cpm_cfg_router router;
    cpm_cfg_security security;
    int n_tokenizers, n_samplers, n_stages;
    int n_pipelines;             /* replicas of the pipeline: stages carry pipeline 0 .. n-1 */
    cpm_cfg_service tokenizers[CPM_CFG_MAX_REPLICAS];
    cpm_cfg_service samplers[CPM_CFG_MAX_REPLICAS];
    cpm_cfg_stage stages[CPM_CFG_MAX_STAGES];
    int n_experts;               /* expert services; 0 = every stage runs its experts itself */
    cpm_cfg_expert experts[CPM_CFG_MAX_EXPERT_SVCS];
} cpm_config;

/* Reads and validates path. On success *ret is the caller's (cpm_config_free). */
int cpm_config_load(const char *path, cpm_config **ret, cpm_error *err);

/* The same from text in memory; name is used in messages. */
int cpm_config_parse(const char *text, size_t len, const char *name, cpm_config **ret,
                     cpm_error *err);

/* Accepts NULL. */
void cpm_config_free(cpm_config *c);

/* Checks the stages against a model of n_layers layers (in every pipeline, every
 * layer owned by exactly one stage, none beyond the model) and resolves `end`. */
int cpm_config_resolve_layers(cpm_config *c, int n_layers, cpm_error *err);

/* Checks the expert services against a model with n_experts experts per MoE layer
 * (0 = a dense model: then there must be none): together they cover every expert,
 * none beyond the model; resolves `end`. Their order and tiling are checked at load. */
int cpm_config_resolve_experts(cpm_config *c, int n_experts, cpm_error *err);

/* Replaces the model directory (and the default name derived from it). */
void cpm_config_set_model(cpm_config *c, const char *dir);

/* A path the file names (name), absolute or relative to the file's own directory.
 * CPM_ERANGE when it does not fit size. */
int cpm_config_file_path(const cpm_config *c, const char *name, char *out, size_t size,
                         cpm_error *err);

/* Where the cluster's keys are: $CPM_KEYS_DIR when set, else security.keys (relative to
 * the cluster file's directory). CPM_ERANGE when it does not fit size. */
int cpm_config_keys_dir(const cpm_config *c, char *out, size_t size, cpm_error *err);

/* Whether the fabric runs in plain text (security.curve: off). */
bool cpm_config_plaintext(const cpm_config *c);

/* Processes of the cluster in launch order: router, tokenizers, samplers, stages,
 * expert services, then the tensor-parallel ranks > 0 of every stage (stage by stage,
 * rank by rank; last, so clusters without them keep their rank numbers).
 * Under mpirun, rank r runs process r. */
typedef enum cpm_role {
    CPM_ROLE_ROUTER,
    CPM_ROLE_TOKENIZER,
    CPM_ROLE_SAMPLER,
    CPM_ROLE_STAGE,
    CPM_ROLE_EXPERT,
    CPM_ROLE_TP,      /* index k: the k-th TP rank process, see cpm_config_tp_proc */
} cpm_role;

int cpm_config_n_procs(const cpm_config *c);

/* Role and index within that role of process r; CPM_ERANGE when r is out of range. */
int cpm_config_proc(const cpm_config *c, int r, cpm_role *ret_role, int *ret_index, cpm_error *err);

const char *cpm_role_name(cpm_role role);

/* The stage and rank (1 ..) of TP process k (role CPM_ROLE_TP, index k); CPM_ERANGE
 * when there is no such process. */
int cpm_config_tp_proc(const cpm_config *c, int k, int *ret_stage, int *ret_rank, cpm_error *err);

/* Total TP rank processes (ranks > 0 of every stage). */
int cpm_config_n_tp(const cpm_config *c);

/* The zmq endpoint process r binds (the router's is its rpc endpoint). */
const char *cpm_config_proc_endpoint(const cpm_config *c, int r);

/* Where stage i sends its output: the next stage of its pipeline, or the router's
 * results endpoint. */
const char *cpm_config_stage_next(const cpm_config *c, int i);

/* Writes the documented key table (for `cpm-cluster schema` and cluster-config/README.md). */
void cpm_config_describe(char *buf, size_t size);

#endif
