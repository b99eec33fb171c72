/* config.c - the cluster YAML (libyaml document API) read through key tables.
 *
 * Each section is a table of rows (name, type, field offset, bounds, default, doc);
 * one generic walker applies defaults, parses, bounds-checks and reports
 * file:line:column for every mistake. Cross-field checks (layers, endpoints) follow.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <yaml.h>

typedef enum ktype { K_STR, K_INT, K_ENDPOINT, K_HTTP, K_LAYERS, K_MAP, K_LIST } ktype;

typedef struct key key;
struct key {
    const char *name;
    ktype type;
    size_t off;       /* field offset in the section's struct */
    long min, max;    /* K_INT bounds */
    const char *def;  /* default as text; NULL = required; "" = empty string allowed */
    const char *doc;
    const key *sub;   /* K_MAP / K_LIST: the rows of the section */
    size_t sub_size;  /* K_LIST: element size; K_MAP: unused */
    size_t count_off; /* K_LIST: offset of the int element count */
    int max_items;    /* K_LIST */
};

#define END_KEYS {NULL, 0, 0, 0, 0, NULL, NULL, NULL, 0, 0, 0}

#define SVC_KEYS(T, P)                                                                          \
    {"endpoint", K_ENDPOINT, offsetof(T, P endpoint), 0, 0, NULL,                               \
     "where peers reach it: tcp://HOST:PORT (an IP address or a DNS name, bound as *:PORT) "   \
     "or ipc://PATH", NULL, 0, 0, 0},                                                           \
    {"host", K_STR, offsetof(T, P host), 0, 0, "localhost",                                     \
     "host it runs on (mpirun places ranks; informational for `up`)", NULL, 0, 0, 0},           \
    {"threads", K_INT, offsetof(T, P threads), 1, 1024, "1", "worker threads", NULL, 0, 0, 0}

static const key service_keys[] = {SVC_KEYS(cpm_cfg_service, ), END_KEYS};

static const key tp_keys[] = {
    SVC_KEYS(cpm_cfg_tp, svc.),
    {"mesh", K_ENDPOINT, offsetof(cpm_cfg_tp, mesh), 0, 0, NULL,
     "its all-reduce endpoint (bound; the other ranks send it their partial sums)", NULL, 0, 0, 0},
    END_KEYS,
};

static const key stage_keys[] = {
    SVC_KEYS(cpm_cfg_stage, svc.),
    {"layers", K_LAYERS, offsetof(cpm_cfg_stage, layer_begin), 0, 0, NULL,
     "[first, last+1) layer range; the second may be `end`", NULL, 0, 0, 0},
    {"kv_tokens", K_INT, offsetof(cpm_cfg_stage, kv_tokens), 16, 1 << 24, "16384",
     "KV-cache capacity in tokens (all sequences)", NULL, 0, 0, 0},
    {"max_seqs", K_INT, offsetof(cpm_cfg_stage, max_seqs), 1, 65536, "64", "live sequences",
     NULL, 0, 0, 0},
    {"max_batch_tokens", K_INT, offsetof(cpm_cfg_stage, max_batch_tokens), 1, 65536, "512",
     "rows per forward pass", NULL, 0, 0, 0},
    {"isa", K_STR, offsetof(cpm_cfg_stage, isa), 0, 0, "auto",
     "matmul kernels: auto (the best this CPU has) or scalar/avx2/avx512/amx; pin one on "
     "mixed CPUs, since ISAs may differ in the last bits", NULL, 0, 0, 0},
    {"activations", K_STR, offsetof(cpm_cfg_stage, activations), 0, 0, "exact",
     "BF16 weights meet exact f32 activations, or bf16-rounded ones (about twice the prefill "
     "rate with VDPBF16PS, logits within ~5e-2: docs/KERNELS.md); int8: int4 weights meet x "
     "quantized to int8 per 32, the others bf16", NULL, 0, 0, 0},
    {"lm_head", K_STR, offsetof(cpm_cfg_stage, lm_head), 0, 0, "stored",
     "the output layer as the checkpoint stores it, or int8 (quantized at load with a scale per "
     "32: half the bytes a decode token reads for it, logits within ~1e-2: docs/KERNELS.md); "
     "read by the last stage", NULL, 0, 0, 0},
    {"weights", K_STR, offsetof(cpm_cfg_stage, weights), 0, 0, "resident",
     "resident (copied into the stage's own memory at load: faster decode) or mapped (left in "
     "the file mapping: faster load, one page-cache copy shared by the processes of a host)",
     NULL, 0, 0, 0},
    {"ffn", K_STR, offsetof(cpm_cfg_stage, ffn), 0, 0, "sparse",
     "MiniCPM-S's FATReLU FFN: sparse (only the neurons the gate lets through; down_proj kept "
     "transposed) or dense (every neuron, the checkpoint's layout); other models ignore it",
     NULL, 0, 0, 0},
    {"kv_dtype", K_STR, offsetof(cpm_cfg_stage, kv_dtype), 0, 0, "f32",
     "KV-cache elements: f32 (exact) or f16 (half the memory, logits within ~1e-3)", NULL, 0, 0,
     0},
    {"tp_mesh", K_ENDPOINT, offsetof(cpm_cfg_stage, tp_mesh), 0, 0, "",
     "tensor parallelism: rank 0's all-reduce endpoint (required with tp)", NULL, 0, 0, 0},
    {"tp", K_LIST, offsetof(cpm_cfg_stage, tp), 0, 0, NULL,
     "optional: tensor-parallel ranks 1..T-1 of this stage (each runs 1/T of the heads and "
     "FFN; rank 0 is the stage itself); T must divide the model's key/value heads",
     tp_keys, sizeof(cpm_cfg_tp), offsetof(cpm_cfg_stage, n_tp), CPM_CFG_MAX_TP - 1},
    {"pipeline", K_INT, offsetof(cpm_cfg_stage, pipeline), 0, CPM_CFG_MAX_REPLICAS - 1, "0",
     "pipeline replica this stage belongs to (several replicas serve more streams and take "
     "over each other's requests when a stage dies); stages of one replica in order",
     NULL, 0, 0, 0},
    END_KEYS,
};

_Static_assert(offsetof(cpm_cfg_stage, layer_end) == offsetof(cpm_cfg_stage, layer_begin) + sizeof(int),
               "a range key fills two consecutive ints");
_Static_assert(offsetof(cpm_cfg_expert, expert_end) == offsetof(cpm_cfg_expert, expert_begin) + sizeof(int),
               "a range key fills two consecutive ints");

static const key expert_keys[] = {
    SVC_KEYS(cpm_cfg_expert, svc.),
    {"experts", K_LAYERS, offsetof(cpm_cfg_expert, expert_begin), 0, 0, NULL,
     "[first, last+1) range of MoE expert indices it runs in every layer; the second may be "
     "`end`; the services' ranges tile 0 .. num_experts-1", NULL, 0, 0, 0},
    END_KEYS,
};

#define RK(name, type, field, lo, hi, def, doc) \
    {name, type, offsetof(cpm_cfg_router, field), lo, hi, def, doc, NULL, 0, 0, 0}

static const key router_keys[] = {
    RK("host", K_STR, host, 0, 0, "localhost", "host it runs on"),
    RK("http", K_HTTP, http_addr, 0, 0, "127.0.0.1:8080", "HTTP listen address, ADDR:PORT or PORT"),
    RK("rpc", K_ENDPOINT, rpc, 0, 0, NULL, "internal generate API (zmq, bound)"),
    RK("results", K_ENDPOINT, results, 0, 0, NULL, "endpoint the last stage sends logits to"),
    RK("max_prompt_tokens", K_INT, max_prompt_tokens, 1, 1 << 24, "4096", "longest prompt"),
    RK("max_tokens", K_INT, max_tokens, 0, 1 << 24, "0",
       "cap on max_tokens (and its default); 0: the context left after the prompt"),
    RK("max_queue", K_INT, max_queue, 0, 1 << 20, "256", "waiting requests before 429"),
    RK("max_seqs", K_INT, max_seqs, 1, 65536, "64", "sequences generating at once"),
    RK("max_body_bytes", K_INT, max_body_bytes, 1024, 1 << 30, "4194304", "HTTP body limit"),
    RK("micro_batches", K_INT, micro_batches, 1, 64, "2", "micro-batches in flight in the pipeline"),
    RK("prefill_chunk", K_INT, prefill_chunk, 1, 65536, "256", "prompt tokens per sequence per step"),
    RK("timeout_ms", K_INT, timeout_ms, 10, 3600000, "30000", "pipeline step / service call timeout"),
    RK("api_keys", K_STR, api_keys, 0, 0, "",
       "file of HTTP API keys, one per line (relative to this file); $CPM_API_KEYS adds "
       "comma-separated ones; clients send Authorization: Bearer KEY"),
    RK("auth", K_STR, auth, 0, 0, "keys",
       "keys: the HTTP API needs a key when any is configured, and a router listening beyond "
       "loopback without one refuses to start; none: open to anyone (warned at every start)"),
    RK("cors_origins", K_STR, cors_origins, 0, 0, "",
       "web origins allowed to read the API's answers (comma-separated, or *); empty: no CORS"),
    RK("drain_ms", K_INT, drain_ms, 0, 3600000, "30000",
       "on SIGTERM: stop admitting, let requests in flight finish this long, then end the rest"),
    RK("tokenize", K_STR, tokenize, 0, 0, "service",
       "service: text in and out through the tokenizers; off: token ids only (no tokenizer files)"),
    RK("prefix_cache", K_STR, prefix_cache, 0, 0, "on",
       "on: the stages keep full KV blocks of earlier prompts and a request whose prompt starts "
       "the same way reuses them (and goes to the replica holding the most); off: never"),
    END_KEYS,
};

static const key security_keys[] = {
    {"curve", K_STR, offsetof(cpm_cfg_security, curve), 0, 0, "on",
     "on: every ZeroMQ socket is encrypted and authenticated (CurveZMQ); off: plain text, "
     "anyone who reaches a port can use it (warned at every start)", NULL, 0, 0, 0},
    {"keys", K_STR, offsetof(cpm_cfg_security, keys), 0, 0, "keys",
     "key directory made by `cpm-cluster keys DIR`, relative to this file; $CPM_KEYS_DIR "
     "overrides it", NULL, 0, 0, 0},
    END_KEYS,
};

#define LIST(name, T, arr, count, rows, max, doc) \
    {name, K_LIST, offsetof(cpm_config, arr), 0, 0, NULL, doc, rows, sizeof(T), offsetof(cpm_config, count), max}

static const key top_keys[] = {
    {"version", K_INT, SIZE_MAX, 1, 1, "1", "file format version", NULL, 0, 0, 0},
    {"model", K_STR, offsetof(cpm_config, model), 0, 0, "", "model directory (or --model)", NULL, 0, 0, 0},
    {"name", K_STR, offsetof(cpm_config, name), 0, 0, "", "model name for /v1/models (default: basename of model)", NULL, 0, 0, 0},
    {"router", K_MAP, offsetof(cpm_config, router), 0, 0, NULL, "the front door", router_keys, 0, 0, 0},
    {"security", K_MAP, offsetof(cpm_config, security), 0, 0, NULL, "the fabric's encryption",
     security_keys, 0, 0, 0},
    LIST("tokenizers", cpm_cfg_service, tokenizers, n_tokenizers, service_keys, CPM_CFG_MAX_REPLICAS,
         "cpm-tokenizer replicas (at least one unless router.tokenize: off)"),
    LIST("samplers", cpm_cfg_service, samplers, n_samplers, service_keys, CPM_CFG_MAX_REPLICAS,
         "cpm-sampler replicas (they read the model's tokenizer files, for constrained decoding)"),
    LIST("stages", cpm_cfg_stage, stages, n_stages, stage_keys, CPM_CFG_MAX_STAGES,
         "pipeline stages in order"),
    LIST("experts", cpm_cfg_expert, experts, n_experts, expert_keys, CPM_CFG_MAX_EXPERT_SVCS,
         "optional: MoE expert services (expert parallelism); every stage sends them its "
         "layers' expert work instead of running the experts itself"),
    END_KEYS,
};

typedef struct walker {
    yaml_document_t *doc;
    const char *file;
    cpm_error *err;
} walker;

static int at(walker *w, const yaml_node_t *n, const char *path, int code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Reports "file:line:col: path: message". */
static int at(walker *w, const yaml_node_t *n, const char *path, int code, const char *fmt, ...) {
    char msg[CPM_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n)
        return cpm_error_set(w->err, code, "%s:%lu:%lu: %s: %s", w->file,
                             (unsigned long)n->start_mark.line + 1,
                             (unsigned long)n->start_mark.column + 1, path, msg);
    return cpm_error_set(w->err, code, "%s: %s: %s", w->file, path, msg);
}

static const char *scalar(const yaml_node_t *n) {
    return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static int parse_long(const char *s, long *ret) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno)
        return -1;
    *ret = v;
    return 0;
}

static int parse_port(const char *s, int *ret) {
    long v;
    if (parse_long(s, &v) || v < 1 || v > 65535)
        return -1;
    *ret = (int)v;
    return 0;
}

/* An IPv4/IPv6 literal ([::1] too) or a DNS name: labels of letters, digits and '-'. */
static bool host_ok(const char *h, size_t len) {
    char buf[CPM_CFG_STR];
    if (len == 0 || len >= sizeof buf)
        return false;
    memcpy(buf, h, len);
    buf[len] = '\0';
    unsigned char addr[16];
    if (buf[0] == '[' && buf[len - 1] == ']') {
        buf[len - 1] = '\0';
        return inet_pton(AF_INET6, buf + 1, addr) == 1;
    }
    if (inet_pton(AF_INET, buf, addr) == 1)
        return true;
    for (const char *p = buf, *label = buf;; p++) {
        if (*p == '.' || !*p) {
            if (p == label || p - label > 63 || *label == '-' || p[-1] == '-')
                return false;
            if (!*p)
                return true;
            label = p + 1;
        } else if (!isalnum((unsigned char)*p) && *p != '-')
            return false;
    }
}

/* tcp://HOST:PORT or ipc://PATH. inproc:// cannot cross processes, wildcards cannot be dialled. */
static int check_endpoint(const char *s, char *why, size_t why_size) {
    if (!strncmp(s, "ipc://", 6)) {
        if (!s[6])
            return snprintf(why, why_size, "ipc:// needs a path"), -1;
        return 0;
    }
    if (strncmp(s, "tcp://", 6)) {
        snprintf(why, why_size, "'%s' is not tcp://HOST:PORT or ipc://PATH", s);
        return -1;
    }
    const char *colon = strrchr(s + 6, ':');
    int port;
    if (!colon || colon == s + 6) {
        snprintf(why, why_size, "'%s' lacks HOST:PORT", s);
        return -1;
    }
    if (parse_port(colon + 1, &port)) {
        snprintf(why, why_size, "'%s': port must be 1..65535", s);
        return -1;
    }
    if (memchr(s + 6, '*', (size_t)(colon - s - 6))) {
        snprintf(why, why_size, "'%s': a wildcard host cannot be connected to", s);
        return -1;
    }
    if (!host_ok(s + 6, (size_t)(colon - s - 6))) {
        snprintf(why, why_size, "'%s': the host is neither an IP address nor a DNS name", s);
        return -1;
    }
    return 0;
}

static int set_str(walker *w, const yaml_node_t *n, const char *path, char *dst, const char *v) {
    if (strlen(v) >= CPM_CFG_STR)
        return at(w, n, path, CPM_ERANGE, "longer than %d bytes", CPM_CFG_STR - 1);
    strcpy(dst, v);
    return 0;
}

static int set_http(walker *w, const yaml_node_t *n, const char *path, cpm_cfg_router *r,
                    const char *v) {
    const char *colon = strrchr(v, ':');
    const char *port = colon ? colon + 1 : v;
    if (parse_port(port, &r->http_port))
        return at(w, n, path, CPM_EINVAL, "'%s' is not ADDR:PORT or PORT (port 1..65535)", v);
    if (!colon)
        return set_str(w, n, path, r->http_addr, "127.0.0.1");
    size_t len = (size_t)(colon - v);
    if (!len || len >= CPM_CFG_STR)
        return at(w, n, path, CPM_EINVAL, "'%s': bad address", v);
    memcpy(r->http_addr, v, len);
    r->http_addr[len] = '\0';
    return 0;
}

/* [first, end) into range[0], range[1] (stages' layers, expert services' experts). */
static int set_range(walker *w, const yaml_node_t *n, const char *path, const char *noun, int *range) {
    if (n->type != YAML_SEQUENCE_NODE ||
        n->data.sequence.items.top - n->data.sequence.items.start != 2)
        return at(w, n, path, CPM_EINVAL, "expected [first, end] (two entries)");
    const char *a = scalar(yaml_document_get_node(w->doc, n->data.sequence.items.start[0]));
    const char *b = scalar(yaml_document_get_node(w->doc, n->data.sequence.items.start[1]));
    long lo, hi;
    if (!a || parse_long(a, &lo) || lo < 0 || lo > 100000)
        return at(w, n, path, CPM_EINVAL, "first %s must be an integer >= 0", noun);
    if (b && !strcmp(b, "end"))
        hi = CPM_CFG_LAYER_END;
    else if (!b || parse_long(b, &hi) || hi <= lo || hi > 100000)
        return at(w, n, path, CPM_EINVAL, "end must be an integer > %ld, or `end`", lo);
    range[0] = (int)lo;
    range[1] = (int)hi;
    return 0;
}

static int apply_defaults(const key *rows, void *base) {
    for (const key *k = rows; k->name; k++) {
        if (!k->def || k->off == SIZE_MAX)
            continue;
        if (k->type == K_INT)
            *(int *)((char *)base + k->off) = atoi(k->def);
        else if (k->type == K_STR || k->type == K_ENDPOINT)
            snprintf((char *)base + k->off, CPM_CFG_STR, "%s", k->def);
        else if (k->type == K_HTTP)
            set_http(&(walker){0}, NULL, "", base, k->def);
    }
    return 0;
}

static int walk_map(walker *w, const yaml_node_t *n, const char *path, const key *rows, void *base);

static int walk_list(walker *w, const yaml_node_t *n, const char *path, const key *k, void *base) {
    if (n->type != YAML_SEQUENCE_NODE)
        return at(w, n, path, CPM_EINVAL, "expected a list");
    int *count = (int *)((char *)base + k->count_off);
    int i = 0;
    for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
         it++, i++) {
        yaml_node_t *item = yaml_document_get_node(w->doc, *it);
        char sub[352];
        snprintf(sub, sizeof sub, "%s[%d]", path, i);
        if (i >= k->max_items)
            return at(w, item, sub, CPM_ELIMIT, "at most %d entries", k->max_items);
        void *elem = (char *)base + k->off + (size_t)i * k->sub_size;
        apply_defaults(k->sub, elem);
        int rc = walk_map(w, item, sub, k->sub, elem);
        if (rc)
            return rc;
    }
    *count = i;
    return 0;
}

static int set_value(walker *w, const yaml_node_t *v, const char *path, const key *k, void *base) {
    void *field = (char *)base + (k->off == SIZE_MAX ? 0 : k->off);
    if (k->type == K_MAP) {
        apply_defaults(k->sub, field);
        return walk_map(w, v, path, k->sub, field);
    }
    if (k->type == K_LIST)
        return walk_list(w, v, path, k, base);
    if (k->type == K_LAYERS)
        return set_range(w, v, path, strcmp(k->name, "experts") ? "layer" : "expert", field);
    const char *s = scalar(v);
    if (!s)
        return at(w, v, path, CPM_EINVAL, "expected a single value");
    char why[CPM_ERROR_MSG_MAX / 2];
    long lv;
    switch (k->type) {
    case K_INT:
        if (parse_long(s, &lv))
            return at(w, v, path, CPM_EINVAL, "'%s' is not an integer", s);
        if (lv < k->min || lv > k->max)
            return at(w, v, path, CPM_ERANGE, "%ld is outside [%ld, %ld]", lv, k->min, k->max);
        if (k->off != SIZE_MAX)
            *(int *)field = (int)lv;
        return 0;
    case K_ENDPOINT:
        if (check_endpoint(s, why, sizeof why))
            return at(w, v, path, CPM_EINVAL, "%s", why);
        return set_str(w, v, path, field, s);
    case K_HTTP:
        return set_http(w, v, path, base, s);
    default:
        return set_str(w, v, path, field, s);
    }
}

static const key *find_key(const key *rows, const char *name) {
    for (const key *k = rows; k->name; k++)
        if (!strcmp(k->name, name))
            return k;
    return NULL;
}

static void key_names(const key *rows, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    for (const key *k = rows; k->name && used < size; k++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s", k == rows ? "" : ", ", k->name);
}

static int walk_map(walker *w, const yaml_node_t *n, const char *path, const key *rows, void *base) {
    if (n->type != YAML_MAPPING_NODE)
        return at(w, n, path, CPM_EINVAL, "expected a mapping of keys");
    uint64_t seen = 0; /* tables have fewer than 64 rows */
    for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = yaml_document_get_node(w->doc, p->key);
        yaml_node_t *vn = yaml_document_get_node(w->doc, p->value);
        const char *name = scalar(kn);
        char sub[320];
        if (!name)
            return at(w, kn, path, CPM_EINVAL, "keys must be plain words");
        snprintf(sub, sizeof sub, "%s%s%s", path, *path ? "." : "", name);
        const key *k = find_key(rows, name);
        if (!k) {
            char known[400];
            key_names(rows, known, sizeof known);
            return at(w, kn, sub, CPM_EINVAL, "unknown key (known: %s)", known);
        }
        uint64_t bit = 1ull << (k - rows);
        if (seen & bit)
            return at(w, kn, sub, CPM_EINVAL, "given twice");
        seen |= bit;
        int rc = set_value(w, vn, sub, k, base);
        if (rc)
            return rc;
    }
    for (const key *k = rows; k->name; k++)
        if (!k->def && !(seen & (1ull << (k - rows))) && k->type != K_LIST && k->type != K_MAP)
            return at(w, n, path[0] ? path : "(top)", CPM_EINVAL, "missing required key '%s'",
                      k->name);
    return 0;
}

/* ------------------------------------------------------------------ cross-field checks */

/* The stage before i in its pipeline, or -1 when i is its pipeline's first. */
static int prev_in_pipeline(const cpm_config *c, int i) {
    for (int j = i - 1; j >= 0; j--)
        if (c->stages[j].pipeline == c->stages[i].pipeline)
            return j;
    return -1;
}

/* Every pipeline's stages must tile the layers: its first starts at 0, each starts
 * where the previous one of the same pipeline ended. */
static int check_stage_order(const cpm_config *c, cpm_error *err) {
    for (int i = 0; i < c->n_stages; i++) {
        const cpm_cfg_stage *s = &c->stages[i];
        int p = prev_in_pipeline(c, i);
        int expect = p >= 0 ? c->stages[p].layer_end : 0;
        if (p >= 0 && c->stages[p].layer_end == CPM_CFG_LAYER_END)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: stages[%d]: stage %d already runs to `end`", c->path, i, p);
        if (s->layer_begin < expect)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: stages[%d].layers: starts at %d, overlapping stage %d "
                                 "(which ends at %d)", c->path, i, s->layer_begin, p, expect);
        if (s->layer_begin > expect)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: stages[%d].layers: starts at %d, so layers %d..%d belong to "
                                 "no stage", c->path, i, s->layer_begin, expect, s->layer_begin - 1);
    }
    return 0;
}

/* Pipelines are numbered 0 .. n-1 without gaps. */
static int count_pipelines(cpm_config *c, cpm_error *err) {
    int n = 0;
    for (int i = 0; i < c->n_stages; i++)
        if (c->stages[i].pipeline + 1 > n)
            n = c->stages[i].pipeline + 1;
    for (int p = 0; p < n; p++) {
        bool seen = false;
        for (int i = 0; i < c->n_stages && !seen; i++)
            seen = c->stages[i].pipeline == p;
        if (!seen)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: stages: pipeline %d has no stage (pipelines are numbered "
                                 "0 .. %d without gaps)", c->path, p, n - 1);
    }
    c->n_pipelines = n;
    return 0;
}

/* Expert services must tile the experts in list order: the first starts at 0, each
 * starts where the previous one ended; only the last may run to `end`. */
static int check_expert_order(const cpm_config *c, cpm_error *err) {
    for (int i = 0; i < c->n_experts; i++) {
        const cpm_cfg_expert *x = &c->experts[i];
        int expect = i ? c->experts[i - 1].expert_end : 0;
        if (i && expect == CPM_CFG_LAYER_END)
            return cpm_error_set(err, CPM_EINVAL, "%s: experts[%d]: experts[%d] already runs to `end`",
                                 c->path, i, i - 1);
        if (x->expert_begin < expect)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: experts[%d].experts: starts at %d, overlapping experts[%d] "
                                 "(which ends at %d)", c->path, i, x->expert_begin, i - 1, expect);
        if (x->expert_begin > expect)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: experts[%d].experts: starts at %d, so experts %d..%d belong to "
                                 "no service", c->path, i, x->expert_begin, expect, x->expert_begin - 1);
    }
    return 0;
}

/* No two services may bind the same endpoint. */
static int check_unique_endpoints(const cpm_config *c, cpm_error *err) {
    int n = cpm_config_n_procs(c);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(cpm_config_proc_endpoint(c, i), cpm_config_proc_endpoint(c, j))) {
                cpm_role ri, rj;
                int ii, ij;
                cpm_config_proc(c, i, &ri, &ii, NULL);
                cpm_config_proc(c, j, &rj, &ij, NULL);
                return cpm_error_set(err, CPM_EINVAL, "%s: %s %d and %s %d both bind %s", c->path,
                                     cpm_role_name(rj), ij, cpm_role_name(ri), ii,
                                     cpm_config_proc_endpoint(c, i));
            }
    if (!strcmp(c->router.rpc, c->router.results))
        return cpm_error_set(err, CPM_EINVAL, "%s: router.rpc and router.results are both %s",
                             c->path, c->router.rpc);
    for (int i = 0; i < n; i++)
        if (!strcmp(cpm_config_proc_endpoint(c, i), c->router.results))
            return cpm_error_set(err, CPM_EINVAL, "%s: router.results %s is bound by another service",
                                 c->path, c->router.results);
    return 0;
}

/* Every endpoint a TP stage's mesh binds differs from the others and from every service's. */
static int check_tp(const cpm_config *c, cpm_error *err) {
    int n = cpm_config_n_procs(c);
    const char *mesh[CPM_CFG_MAX_STAGES * CPM_CFG_MAX_TP];
    int owner[CPM_CFG_MAX_STAGES * CPM_CFG_MAX_TP], rank[CPM_CFG_MAX_STAGES * CPM_CFG_MAX_TP];
    int k = 0;
    for (int i = 0; i < c->n_stages; i++) {
        const cpm_cfg_stage *s = &c->stages[i];
        if (!s->n_tp)
            continue;
        if (!s->tp_mesh[0])
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].tp_mesh: required with tp (rank "
                                 "0's all-reduce endpoint)", c->path, i);
        if (c->n_experts)
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].tp: tensor parallelism and expert "
                                 "services do not mix", c->path, i);
        for (int r = 0; r <= s->n_tp; r++, k++) {
            mesh[k] = r ? s->tp[r - 1].mesh : s->tp_mesh;
            owner[k] = i;
            rank[k] = r;
        }
    }
    for (int a = 0; a < k; a++) {
        for (int b = 0; b < a; b++)
            if (!strcmp(mesh[a], mesh[b]))
                return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d] tp rank %d and stages[%d] tp "
                                     "rank %d both bind mesh %s", c->path, owner[b], rank[b],
                                     owner[a], rank[a], mesh[a]);
        for (int p = 0; p < n; p++)
            if (!strcmp(mesh[a], cpm_config_proc_endpoint(c, p))) {
                cpm_role role;
                int idx;
                cpm_config_proc(c, p, &role, &idx, NULL);
                return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d] tp rank %d: mesh %s is also "
                                     "bound by %s %d", c->path, owner[a], rank[a], mesh[a],
                                     cpm_role_name(role), idx);
            }
        if (!strcmp(mesh[a], c->router.results))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d] tp rank %d: mesh %s is "
                                 "router.results", c->path, owner[a], rank[a], mesh[a]);
    }
    return 0;
}

static int check_whole(cpm_config *c, cpm_error *err) {
    /* router is a section with required keys; an absent section must still be reported. */
    if (!c->router.rpc[0])
        return cpm_error_set(err, CPM_EINVAL, "%s: router: missing (needs rpc and results)", c->path);
    if (c->n_stages == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s: stages: at least one stage is required", c->path);
    /* a token-in cluster (router.tokenize: off) has no text to turn into ids */
    if (c->n_tokenizers == 0 && strcmp(c->router.tokenize, "off") != 0)
        return cpm_error_set(err, CPM_EINVAL, "%s: tokenizers: at least one is required (or "
                             "router.tokenize: off)", c->path);
    if (c->n_samplers == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s: samplers: at least one is required", c->path);
    static const char *isas[] = {"auto", "scalar", "avx2", "avx512", "amx"};
    for (int i = 0; i < c->n_stages; i++) {
        bool known = false;
        for (size_t k = 0; k < sizeof isas / sizeof *isas; k++)
            known |= strcmp(c->stages[i].isa, isas[k]) == 0;
        if (!known)
            return cpm_error_set(err, CPM_EINVAL,
                                 "%s: stages[%d].isa: '%s' is not one of auto, scalar, avx2, avx512, amx",
                                 c->path, i, c->stages[i].isa);
    }
    for (int i = 0; i < c->n_stages; i++) {
        if (strcmp(c->stages[i].activations, "exact") && strcmp(c->stages[i].activations, "bf16") &&
            strcmp(c->stages[i].activations, "int8"))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].activations: '%s' is not one of "
                                 "exact, bf16, int8", c->path, i, c->stages[i].activations);
        if (strcmp(c->stages[i].lm_head, "stored") && strcmp(c->stages[i].lm_head, "int8"))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].lm_head: '%s' is not one of "
                                 "stored, int8", c->path, i, c->stages[i].lm_head);
        if (strcmp(c->stages[i].weights, "resident") && strcmp(c->stages[i].weights, "mapped"))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].weights: '%s' is not one of "
                                 "resident, mapped", c->path, i, c->stages[i].weights);
        if (strcmp(c->stages[i].ffn, "sparse") && strcmp(c->stages[i].ffn, "dense"))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].ffn: '%s' is not one of "
                                 "sparse, dense", c->path, i, c->stages[i].ffn);
    }
    for (int i = 0; i < c->n_stages; i++)
        if (strcmp(c->stages[i].kv_dtype, "f32") && strcmp(c->stages[i].kv_dtype, "f16"))
            return cpm_error_set(err, CPM_EINVAL, "%s: stages[%d].kv_dtype: '%s' is not one of f32, f16",
                                 c->path, i, c->stages[i].kv_dtype);
    if (strcmp(c->security.curve, "on") && strcmp(c->security.curve, "off"))
        return cpm_error_set(err, CPM_EINVAL, "%s: security.curve: '%s' is not one of on, off",
                             c->path, c->security.curve);
    if (strcmp(c->router.auth, "keys") && strcmp(c->router.auth, "none"))
        return cpm_error_set(err, CPM_EINVAL, "%s: router.auth: '%s' is not one of keys, none",
                             c->path, c->router.auth);
    if (strcmp(c->router.tokenize, "service") && strcmp(c->router.tokenize, "off"))
        return cpm_error_set(err, CPM_EINVAL, "%s: router.tokenize: '%s' is not one of service, off",
                             c->path, c->router.tokenize);
    if (strcmp(c->router.prefix_cache, "on") && strcmp(c->router.prefix_cache, "off"))
        return cpm_error_set(err, CPM_EINVAL, "%s: router.prefix_cache: '%s' is not one of on, off",
                             c->path, c->router.prefix_cache);
    int rc = count_pipelines(c, err);
    if (!rc)
        rc = check_stage_order(c, err);
    if (!rc)
        rc = check_expert_order(c, err);
    if (!rc)
        rc = check_unique_endpoints(c, err);
    if (!rc)
        rc = check_tp(c, err);
    if (!rc && c->model[0])
        cpm_config_set_model(c, c->model);
    return rc;
}

/* ------------------------------------------------------------------ public */

int cpm_config_parse(const char *text, size_t len, const char *name, cpm_config **ret,
                     cpm_error *err) {
    *ret = NULL;
    cpm_config *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "config");
    snprintf(c->path, sizeof c->path, "%s", name);
    yaml_parser_t parser;
    yaml_document_t doc;
    walker w = {.doc = &doc, .file = c->path, .err = err};
    int rc = 0;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        rc = cpm_error_set(err, CPM_EFORMAT, "%s:%lu:%lu: %s", c->path,
                           (unsigned long)parser.problem_mark.line + 1,
                           (unsigned long)parser.problem_mark.column + 1,
                           parser.problem ? parser.problem : "YAML syntax error");
        yaml_parser_delete(&parser);
        free(c);
        return rc;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    apply_defaults(top_keys, c);
    apply_defaults(router_keys, &c->router);
    apply_defaults(security_keys, &c->security);
    if (!root)
        rc = cpm_error_set(err, CPM_EINVAL, "%s: empty file", c->path);
    else if (!(rc = walk_map(&w, root, "", top_keys, c)))
        rc = check_whole(c, err);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (rc) {
        free(c);
        return rc;
    }
    *ret = c;
    return 0;
}

int cpm_config_load(const char *path, cpm_config **ret, cpm_error *err) {
    *ret = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            if (cap >= (1u << 20)) {
                fclose(f);
                free(buf);
                return cpm_error_set(err, CPM_ELIMIT, "%s: larger than 1 MiB", path);
            }
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) {
                fclose(f);
                free(buf);
                return cpm_error_set(err, CPM_ENOMEM, "%s", path);
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (!got)
            break;
    }
    fclose(f);
    int rc = cpm_config_parse(buf, len, path, ret, err);
    free(buf);
    return rc;
}

void cpm_config_free(cpm_config *c) {
    free(c);
}

void cpm_config_set_model(cpm_config *c, const char *dir) {
    char old_base[CPM_CFG_STR], tmp[CPM_CFG_STR];
    snprintf(tmp, sizeof tmp, "%s", c->model);
    snprintf(old_base, sizeof old_base, "%s", basename(tmp));
    /* A name the user chose survives; one derived from the old directory follows the new. */
    bool derived = !c->name[0] || !strcmp(c->name, old_base);
    snprintf(tmp, sizeof tmp, "%s", dir); /* dir may be c->model itself */
    snprintf(c->model, sizeof c->model, "%s", tmp);
    if (derived)
        snprintf(c->name, sizeof c->name, "%s", basename(tmp));
}

/* The last stage of pipeline p in list order. */
static int last_in_pipeline(const cpm_config *c, int p) {
    int last = -1;
    for (int i = 0; i < c->n_stages; i++)
        if (c->stages[i].pipeline == p)
            last = i;
    return last;
}

int cpm_config_resolve_layers(cpm_config *c, int n_layers, cpm_error *err) {
    for (int i = 0; i < c->n_stages; i++) {
        cpm_cfg_stage *s = &c->stages[i];
        if (s->layer_end == CPM_CFG_LAYER_END)
            s->layer_end = n_layers;
        if (s->layer_begin >= n_layers || s->layer_end > n_layers)
            return cpm_error_set(err, CPM_ERANGE,
                                 "%s: stages[%d].layers: [%d, %d) but the model has %d layers",
                                 c->path, i, s->layer_begin, s->layer_end, n_layers);
    }
    for (int p = 0; p < c->n_pipelines; p++) {
        const cpm_cfg_stage *last = &c->stages[last_in_pipeline(c, p)];
        if (last->layer_end < n_layers)
            return cpm_error_set(err, CPM_ERANGE,
                                 "%s: stages: layers %d..%d belong to no stage of pipeline %d "
                                 "(the model has %d)", c->path, last->layer_end, n_layers - 1, p,
                                 n_layers);
    }
    return 0;
}

int cpm_config_resolve_experts(cpm_config *c, int n_experts, cpm_error *err) {
    if (c->n_experts && n_experts == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s: experts: the model has no MoE layers, so expert "
                             "services have nothing to run", c->path);
    for (int i = 0; i < c->n_experts; i++) {
        cpm_cfg_expert *x = &c->experts[i];
        if (x->expert_end == CPM_CFG_LAYER_END)
            x->expert_end = n_experts;
        if (x->expert_begin >= n_experts || x->expert_end > n_experts)
            return cpm_error_set(err, CPM_ERANGE,
                                 "%s: experts[%d].experts: [%d, %d) but the model has %d experts",
                                 c->path, i, x->expert_begin, x->expert_end, n_experts);
    }
    if (c->n_experts && c->experts[c->n_experts - 1].expert_end < n_experts)
        return cpm_error_set(err, CPM_ERANGE,
                             "%s: experts: experts %d..%d belong to no service (the model has %d)",
                             c->path, c->experts[c->n_experts - 1].expert_end, n_experts - 1, n_experts);
    return 0;
}

int cpm_config_n_tp(const cpm_config *c) {
    int n = 0;
    for (int i = 0; i < c->n_stages; i++)
        n += c->stages[i].n_tp;
    return n;
}

int cpm_config_tp_proc(const cpm_config *c, int k, int *ret_stage, int *ret_rank, cpm_error *err) {
    for (int i = 0; k >= 0 && i < c->n_stages; k -= c->stages[i].n_tp, i++)
        if (k < c->stages[i].n_tp) {
            *ret_stage = i;
            *ret_rank = k + 1;
            return 0;
        }
    return cpm_error_set(err, CPM_ERANGE, "%s: no tensor-parallel process %d", c->path, k);
}

int cpm_config_n_procs(const cpm_config *c) {
    return 1 + c->n_tokenizers + c->n_samplers + c->n_stages + c->n_experts + cpm_config_n_tp(c);
}

int cpm_config_proc(const cpm_config *c, int r, cpm_role *ret_role, int *ret_index, cpm_error *err) {
    if (r < 0 || r >= cpm_config_n_procs(c))
        return cpm_error_set(err, CPM_ERANGE, "%s: process %d: the cluster has %d processes",
                             c->path, r, cpm_config_n_procs(c));
    int counts[] = {1, c->n_tokenizers, c->n_samplers, c->n_stages, c->n_experts, cpm_config_n_tp(c)};
    for (int role = 0; role < 6; r -= counts[role], role++)
        if (r < counts[role]) {
            *ret_role = (cpm_role)role;
            *ret_index = r;
            return 0;
        }
    return CPM_EINTERNAL;
}

const char *cpm_role_name(cpm_role role) {
    static const char *names[] = {"router", "tokenizer", "sampler", "stage", "expert", "tp"};
    return (unsigned)role < 6 ? names[role] : "unknown";
}

const char *cpm_config_proc_endpoint(const cpm_config *c, int r) {
    cpm_role role;
    int i;
    if (cpm_config_proc(c, r, &role, &i, NULL))
        return "";
    switch (role) {
    case CPM_ROLE_ROUTER:
        return c->router.rpc;
    case CPM_ROLE_TOKENIZER:
        return c->tokenizers[i].endpoint;
    case CPM_ROLE_SAMPLER:
        return c->samplers[i].endpoint;
    case CPM_ROLE_STAGE:
        return c->stages[i].svc.endpoint;
    case CPM_ROLE_EXPERT:
        return c->experts[i].svc.endpoint;
    case CPM_ROLE_TP: {
        int s, rank;
        return cpm_config_tp_proc(c, i, &s, &rank, NULL) ? "" : c->stages[s].tp[rank - 1].svc.endpoint;
    }
    }
    return "";
}

const char *cpm_config_stage_next(const cpm_config *c, int i) {
    for (int j = i + 1; j < c->n_stages; j++)
        if (c->stages[j].pipeline == c->stages[i].pipeline)
            return c->stages[j].svc.endpoint;
    return c->router.results;
}

static size_t describe_rows(const key *rows, const char *prefix, char *buf, size_t size, size_t used) {
    for (const key *k = rows; k->name && used < size; k++) {
        if (k->type == K_MAP || k->type == K_LIST) {
            used += (size_t)snprintf(buf + used, size - used, "%s%s%s  %s\n", prefix, k->name,
                                     k->type == K_LIST ? "[]" : "", k->doc);
            char sub[64];
            snprintf(sub, sizeof sub, "%s%s%s.", prefix, k->name, k->type == K_LIST ? "[]" : "");
            used = describe_rows(k->sub, sub, buf, size, used);
            continue;
        }
        used += (size_t)snprintf(buf + used, size - used, "%s%s  %s (%s)\n", prefix, k->name,
                                 k->doc, !k->def ? "required" : *k->def ? k->def : "\"\"");
    }
    return used;
}

void cpm_config_describe(char *buf, size_t size) {
    if (size)
        buf[0] = '\0';
    describe_rows(top_keys, "", buf, size, 0);
}

int cpm_config_file_path(const cpm_config *c, const char *name, char *out, size_t size,
                         cpm_error *err) {
    int n;
    if (name[0] == '/')
        n = snprintf(out, size, "%s", name);
    else {
        char tmp[CPM_CFG_STR];
        snprintf(tmp, sizeof tmp, "%s", c->path);
        n = snprintf(out, size, "%s/%s", dirname(tmp), name);
    }
    if (n < 0 || (size_t)n >= size)
        return cpm_error_set(err, CPM_ERANGE, "%s: the path of %s is too long", c->path, name);
    return 0;
}

int cpm_config_keys_dir(const cpm_config *c, char *out, size_t size, cpm_error *err) {
    const char *env = getenv("CPM_KEYS_DIR");
    if (!env || !env[0])
        return cpm_config_file_path(c, c->security.keys, out, size, err);
    if (snprintf(out, size, "%s", env) >= (int)size)
        return cpm_error_set(err, CPM_ERANGE, "CPM_KEYS_DIR: the path is too long");
    return 0;
}

bool cpm_config_plaintext(const cpm_config *c) {
    return !strcmp(c->security.curve, "off");
}
