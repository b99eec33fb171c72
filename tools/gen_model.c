/* gen_model.c - cpm-gen-model: writes a random-weight MiniCPM checkpoint in the
 * exact Hugging Face layout (config.json, generation_config.json,
 * model.safetensors or shards + index, tokenizer files).
 *
 * No real MiniCPM weights can be downloaded where this project is built and
 * tested, so the default model of the README and the benchmarks come from here.
 * The tensors written are exactly the ones the engine's architecture table
 * asks for (cpm_arch_for_each_tensor), so generator and loader cannot drift.
 * Outputs of such a model are meaningless text.
 */
#include <errno.h>
#include <limits.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cli.h"
#include "shard/engine/kernels/dtype.h"
#include "shard/engine/model/arch.h"
#include "shard/engine/model/hf_config.h"

#ifndef CPM_ASSETS_DIR
#define CPM_ASSETS_DIR "assets"
#endif

/* ---- presets: the released shapes (minicpm-spec.md §2) ---- */

typedef struct preset {
    const char *name;
    const char *config_file; /* a real config.json under assets/configs, or NULL */
    const char *arch;
    int hidden, inter, layers, heads, kv_heads, vocab, max_pos;
    double eps, theta;
    int tied;
    const char *act;
    double act_param;
    int experts, top_k;
    const char *rope;        /* NULL, "dynamic" */
    const char *tokenizer;   /* folder under assets/tokenizers */
    int eos2;                /* second eos id (73440 for ChatML vocabularies), 0 = none */
} preset;

static const preset presets[] = {
    {"minicpm-1b", NULL, "MiniCPMForCausalLM", 1536, 3840, 52, 24, 8, 73440, 4096, 1e-5, 1e4, 1,
     "silu", 0, 0, 0, NULL, "minicpm3", 0},
    {"minicpm-2b", NULL, "MiniCPMForCausalLM", 2304, 5760, 40, 36, 36, 122753, 4096, 1e-5, 1e4, 1,
     "silu", 0, 0, 0, NULL, "minicpm-2b", 0},
    {"minicpm-2b-128k", NULL, "MiniCPMForCausalLM", 2304, 5760, 40, 36, 36, 122753, 65536, 1e-5,
     1e6, 0, "silu", 0, 0, 0, "dynamic", "minicpm-2b", 0},
    {"minicpm-s-1b", NULL, "MiniCPMForCausalLM", 1536, 3840, 52, 24, 8, 73440, 4096, 1e-5, 1e4, 1,
     "fatrelu", 0.03, 0, 0, NULL, "minicpm3", 0},
    {"minicpm-moe-8x2b", NULL, "MiniCPMForCausalLM", 2304, 5760, 40, 36, 36, 122753, 4096, 1e-5,
     1e4, 1, "silu", 0, 8, 2, NULL, "minicpm-2b", 0},
    {"minicpm3-4b", "minicpm3-4b.config.json", NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, 0, 0, 0,
     NULL, "minicpm3", 73440},
    {"minicpm4-8b", "minicpm4-8b.config.json", NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, 0, 0, 0,
     NULL, "minicpm3", 73440},
    /* A small MiniCPM4-shaped model with the real 73448 vocabulary: the README's
     * default, quick to start and to run on two cores. */
    {"minicpm4-tiny", "minicpm4-8b.config.json", NULL, 256, 640, 4, 8, 2, 73448, 0, 0, 0, 0, NULL,
     0, 0, 0, NULL, "minicpm3", 73440},
};

typedef struct gen_args {
    const preset *p;
    const char *out;
    const char *tokenizer_dir;
    const char *assets;
    cpm_dtype dtype;
    uint64_t seed;
    long shard_mb;
    int hidden, inter, layers, heads, kv_heads, vocab, experts; /* 0 = preset's */
    const char *sparse; /* InfLLM v2 sparse_config: "default" or key=value,... */
    int gptq;           /* --quant gptq|awq: decoder linears as int4 tensors */
    int awq;            /* --quant awq: in AutoAWQ's GEMM layout rather than AutoGPTQ's */
    int dequant;        /* --dequant: the same int4 weights written as plain floats */
    int ternary;        /* --ternary: decoder linears hold only 0 and ±a per row (BitCPM4) */
    int group_size;     /* GPTQ columns per group; -1 = one group per row */
    int desc_act;       /* GPTQ act-order: g_idx from a random column order */
    double gate_sparsity; /* FATReLU: the share of fatrelu(gate x) that is 0 (0: preset's) */
} gen_args;

/* ---- config.json ---- */

static json_t *preset_config(const gen_args *a, cpm_error *err) {
    const preset *p = a->p;
    if (p->config_file) {
        char path[4096];
        json_error_t je;
        snprintf(path, sizeof path, "%s/configs/%s", a->assets, p->config_file);
        json_t *c = json_load_file(path, 0, &je);
        if (!c)
            cpm_error_set(err, CPM_EIO, "%s: %s", path, je.text);
        return c;
    }
    json_t *c = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", p->arch));
    json_object_set_new(c, "model_type", json_string("minicpm"));
    json_object_set_new(c, "bos_token_id", json_integer(1));
    json_object_set_new(c, "eos_token_id", json_integer(2));
    json_object_set_new(c, "hidden_act", json_string(p->act));
    if (p->act_param > 0)
        json_object_set_new(c, "hidden_act_param", json_real(p->act_param));
    json_object_set_new(c, "hidden_size", json_integer(p->hidden));
    json_object_set_new(c, "intermediate_size", json_integer(p->inter));
    json_object_set_new(c, "num_hidden_layers", json_integer(p->layers));
    json_object_set_new(c, "num_attention_heads", json_integer(p->heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(p->kv_heads));
    json_object_set_new(c, "vocab_size", json_integer(p->vocab));
    json_object_set_new(c, "max_position_embeddings", json_integer(p->max_pos));
    json_object_set_new(c, "rms_norm_eps", json_real(p->eps));
    json_object_set_new(c, "rope_theta", json_real(p->theta));
    if (p->rope)
        json_object_set_new(c, "rope_scaling", json_pack("{s:s,s:f}", "type", p->rope, "factor", 4.0));
    else
        json_object_set_new(c, "rope_scaling", json_null());
    if (!p->tied)
        json_object_set_new(c, "tie_word_embeddings", json_false());
    if (p->experts) {
        json_object_set_new(c, "num_experts", json_integer(p->experts));
        json_object_set_new(c, "num_experts_per_tok", json_integer(p->top_k));
    }
    json_object_set_new(c, "scale_emb", json_integer(12));
    json_object_set_new(c, "dim_model_base", json_integer(256));
    json_object_set_new(c, "scale_depth", json_real(1.4));
    json_object_set_new(c, "torch_dtype", json_string("bfloat16"));
    return c;
}

/* Resamples a LongRoPE factor list to n values (linear interpolation), so a
 * shrunken model keeps the released curve's shape. */
static json_t *resample(json_t *list, int n) {
    int m = (int)json_array_size(list);
    json_t *out = json_array();
    for (int i = 0; i < n; i++) {
        double x = n > 1 ? (double)i * (m - 1) / (n - 1) : 0;
        int lo = (int)x, hi = lo + 1 < m ? lo + 1 : lo;
        double f = x - lo;
        double v = json_number_value(json_array_get(list, (size_t)lo)) * (1 - f) +
                   json_number_value(json_array_get(list, (size_t)hi)) * f;
        json_array_append_new(out, json_real(v));
    }
    return out;
}

/* Phi^-1(p) by bisection on the normal CDF (p in (0, 1)). */
static double normal_quantile(double p) {
    double lo = -10.0, hi = 10.0;
    for (int i = 0; i < 100; i++) {
        double mid = (lo + hi) / 2.0;
        if (0.5 * erfc(-mid / sqrt(2.0)) < p)
            lo = mid;
        else
            hi = mid;
    }
    return (lo + hi) / 2.0;
}

/* --gate-sparsity P: the FATReLU threshold (hidden_act_param) under which a fraction P of
 * the gate pre-activations fall for typical hidden states. The FFN's input is rmsnorm(x)
 * times a norm weight 1 + U(-0.1, 0.1) (mean square 1 + 0.01/3) and a gate row is
 * uniform with variance 1/hidden (write_tensor), so g = w . x is close to N(0, s^2),
 * s^2 = 1 + 0.01/3, whatever the hidden state: threshold = s * Phi^-1(P). MiniCPM-S-1B's
 * own gates are ~88 % zero at its 0.03; the engine's cpm_model_ffn_stats measures it. */
static void set_gate_sparsity(json_t *c, double p) {
    double s = sqrt(1.0 + 0.01 / 3.0);
    json_object_set_new(c, "hidden_act_param", json_real(s * normal_quantile(p)));
}

static void override_int(json_t *c, const char *key, int v) {
    if (v > 0)
        json_object_set_new(c, key, json_integer(v));
}

static void apply_overrides(json_t *c, const gen_args *a) {
    const preset *p = a->p;
    override_int(c, "hidden_size", a->hidden ? a->hidden : p->config_file ? p->hidden : 0);
    override_int(c, "intermediate_size", a->inter ? a->inter : p->config_file ? p->inter : 0);
    override_int(c, "num_hidden_layers", a->layers ? a->layers : p->config_file ? p->layers : 0);
    override_int(c, "num_attention_heads", a->heads ? a->heads : p->config_file ? p->heads : 0);
    override_int(c, "num_key_value_heads", a->kv_heads ? a->kv_heads : p->config_file ? p->kv_heads : 0);
    override_int(c, "vocab_size", a->vocab ? a->vocab : p->config_file ? p->vocab : 0);
    override_int(c, "num_experts", a->experts);
    json_object_set_new(c, "torch_dtype",
                        json_string(a->dtype == CPM_DTYPE_F32 ? "float32"
                                    : a->dtype == CPM_DTYPE_F16 ? "float16" : "bfloat16"));
    json_object_del(c, "_name_or_path");
    if (a->gate_sparsity > 0)
        set_gate_sparsity(c, a->gate_sparsity);
}

/* --sparse: a sparse_config object (MiniCPM4 InfLLM v2) with the HF defaults
 * (spec §5.1), overridden by "kernel=32,stride=16,block=64,window=2048,topk=64,
 * init=1,dense_len=8192" entries; "default" keeps them all. */
static int add_sparse_config(json_t *c, const char *spec) {
    static const char *const keys[][2] = {
        {"kernel", "kernel_size"}, {"stride", "kernel_stride"}, {"block", "block_size"},
        {"window", "window_size"}, {"topk", "topk"},            {"init", "init_blocks"},
        {"dense_len", "dense_len"}};
    json_t *sc = json_pack("{s:i,s:i,s:i,s:i,s:i,s:i,s:b,s:i}", "kernel_size", 32, "kernel_stride",
                           16, "block_size", 64, "window_size", 2048, "topk", 64, "init_blocks", 1,
                           "use_nope", 0, "dense_len", 8192);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", strcmp(spec, "default") ? spec : "");
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        size_t i = 0;
        if (eq)
            *eq = '\0';
        while (i < sizeof keys / sizeof *keys && strcmp(keys[i][0], tok))
            i++;
        if (!eq || i == sizeof keys / sizeof *keys) {
            fprintf(stderr, "cpm-gen-model: --sparse: expected KEY=N with KEY one of kernel, "
                            "stride, block, window, topk, init, dense_len; got '%s'\n", tok);
            json_decref(sc);
            return -1;
        }
        json_object_set_new(sc, keys[i][1], json_integer(atoi(eq + 1)));
    }
    json_object_set_new(c, "sparse_config", sc);
    return 0;
}

/* LongRoPE lists must have rotary_dim/2 entries; fix them after overrides. */
static void fit_rope_lists(json_t *c) {
    json_t *rs = json_object_get(c, "rope_scaling");
    if (!json_is_object(rs) || !json_object_get(rs, "long_factor"))
        return;
    int hidden = (int)json_integer_value(json_object_get(c, "hidden_size"));
    int heads = (int)json_integer_value(json_object_get(c, "num_attention_heads"));
    json_t *rope = json_object_get(c, "qk_rope_head_dim");
    int rot = rope ? (int)json_integer_value(rope) : hidden / heads;
    const char *keys[] = {"long_factor", "short_factor"};
    for (int i = 0; i < 2; i++) {
        json_t *l = json_object_get(rs, keys[i]);
        if ((int)json_array_size(l) != rot / 2)
            json_object_set_new(rs, keys[i], resample(l, rot / 2));
    }
}

/* ---- weights ---- */

typedef struct writer {
    const gen_args *a;
    const cpm_hparams *hp;
    uint64_t rng;
    /* pass 1 collects the header, pass 2 writes data */
    json_t *header;
    json_t *weight_map;
    size_t offset;
    int shard;
    FILE *f;
    void *buf;
    float *fbuf;
    struct gptq_linear *q; /* the int4 linear being written, part by part */
} writer;

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static float uniform(uint64_t *s) { /* [-1, 1) */
    return (float)((double)(xorshift(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static size_t need_bytes(const cpm_tensor_need *n, cpm_dtype t) {
    size_t e = (size_t)n->shape[0] * (size_t)(n->ndim > 1 ? n->shape[1] : 1);
    return e * cpm_dtype_size(t);
}

static bool is_norm_role(cpm_role r) {
    return r == CPM_W_IN_NORM || r == CPM_W_POST_NORM || r == CPM_W_Q_A_NORM ||
           r == CPM_W_KV_A_NORM || r == CPM_W_FINAL_NORM;
}

static bool is_quantized(const cpm_tensor_need *n);

/* --ternary (BitCPM4's pseudo-quantized weights): the uniform draws in v[0..c) (elements
 * at..at+c of a [rows, cols] matrix) become 0, +a_r or −a_r by thirds, a_r a bf16 value
 * per row around the same std (a·sqrt(2/3) = amp/sqrt(3)). */
static void ternary_values(float *v, size_t c, size_t at, size_t cols, float amp) {
    for (size_t i = 0; i < c; i++) {
        size_t row = (at + i) / cols;
        float a = cpm_bf16_to_f32(cpm_f32_to_bf16(amp / sqrtf(2.0f) * (0.75f + 0.5f * (float)(row * 37 % 101) / 100.0f)));
        float u = v[i] / amp; /* uniform in [-1, 1) */
        v[i] = u < -1.0f / 3.0f ? -a : u < 1.0f / 3.0f ? 0.0f : a;
    }
}

/* Values: norms near 1, embeddings with std ~0.1 (initializer_range), linear
 * layers uniform with std 1/sqrt(fan_in) so activations stay in range. */
static int write_tensor(writer *w, const cpm_tensor_need *n) {
    size_t cols = (size_t)(n->ndim > 1 ? n->shape[1] : 1), total = (size_t)n->shape[0] * cols;
    float amp = is_norm_role(n->role) ? 0.1f
                : n->role == CPM_W_EMBED ? 0.17f
                : (float)(sqrt(3.0) / sqrt((double)cols));
    const size_t chunk = 1 << 20;
    for (size_t at = 0; at < total; at += chunk) {
        size_t c = total - at < chunk ? total - at : chunk;
        for (size_t i = 0; i < c; i++) {
            float v = amp * uniform(&w->rng);
            w->fbuf[i] = is_norm_role(n->role) ? 1.0f + v : v;
        }
        if (w->a->ternary && is_quantized(n))
            ternary_values(w->fbuf, c, at, cols, amp);
        if (w->a->dtype == CPM_DTYPE_F32) {
            if (fwrite(w->fbuf, 4, c, w->f) != c)
                return -1;
            continue;
        }
        uint16_t *h = w->buf;
        for (size_t i = 0; i < c; i++)
            h[i] = w->a->dtype == CPM_DTYPE_BF16 ? cpm_f32_to_bf16(w->fbuf[i])
                                                 : cpm_f32_to_f16(w->fbuf[i]);
        if (fwrite(h, 2, c, w->f) != c)
            return -1;
    }
    return 0;
}

static char *shard_name(const writer *w, int shard, int n_shards) {
    static char name[64];
    if (n_shards <= 1)
        snprintf(name, sizeof name, "model.safetensors");
    else
        snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
    (void)w;
    return name;
}

/* One tensor of the file: a need of the architecture, or (GPTQ) one part of
 * a quantized linear's need. */
typedef struct plan_entry {
    cpm_tensor_need need;
    int shard;
    int part;           /* -1: the need itself; else a gptq_part */
    char name[160];
    const char *dtype;  /* safetensors spelling */
    int ndim;
    int64_t shape[2];
    size_t bytes;
} plan_entry;

typedef struct plan {
    plan_entry *e;
    size_t n, cap;
    const gen_args *a;
    size_t shard_bytes, in_shard;
    int n_shards;
} plan;

static int grow_plan(plan *p);

static void plan_push(plan *p, plan_entry *e) {
    if (p->shard_bytes && p->in_shard > 0 && p->in_shard + e->bytes > p->shard_bytes) {
        p->n_shards++;
        p->in_shard = 0;
    }
    p->in_shard += e->bytes;
    e->shard = p->n_shards - 1;
    p->e[p->n++] = *e;
}

/* ---- GPTQ / AWQ int4 linears (AutoGPTQ or AutoAWQ layout, minicpm-spec.md §8) ----
 * Per linear [N out, K in], group size gs, G = K / gs: random q in 0..15,
 * real zeros in 6..10 (GPTQ stores them minus one, checkpoint_format "gptq";
 * AWQ as they are), f16 scales around (1/sqrt(K)) / 8, and g_idx from a
 * random column order when --desc-act (GPTQ only). AWQ packs qweight [K][N/8]
 * and qzeros along n, column 8c + {0,2,4,6,1,3,5,7}[i] in nibble i (AutoAWQ's
 * AWQ_ORDER), and has no g_idx. The draws do not depend on --dequant, which writes
 * W = (q − z)·s instead: exact in f32, so the two checkpoints are one model. */

enum gptq_part { GPTQ_QWEIGHT, GPTQ_QZEROS, GPTQ_SCALES, GPTQ_G_IDX, GPTQ_PARTS };
static const char *const gptq_part_names[GPTQ_PARTS] = {"qweight", "qzeros", "scales", "g_idx"};

typedef struct gptq_linear {
    int N, K, G;
    uint8_t *q;      /* [N][K] */
    uint8_t *zero;   /* [G][N] real zero points */
    uint16_t *scale; /* [G][N] f16 */
    int32_t *g_idx;  /* [K] */
} gptq_linear;

/* MoE routers stay float, as AutoGPTQ leaves them. */
static bool is_quantized(const cpm_tensor_need *n) {
    return n->layer >= 0 && n->ndim == 2 && n->role != CPM_W_ROUTER;
}

static int gptq_group_size(const gen_args *a, int K) {
    return a->group_size < 0 ? K : a->group_size;
}

static int plan_gptq(plan *p, const cpm_tensor_need *need) {
    int N = (int)need->shape[0], K = (int)need->shape[1], gs = gptq_group_size(p->a, K);
    if (K % 8 || N % 8 || K % gs) {
        fprintf(stderr, "cpm-gen-model: %s: [%d, %d] with group size %d: GPTQ needs in and out "
                        "multiples of 8 and a group size dividing in\n", need->name, N, K, gs);
        return -1;
    }
    const int awq = p->a->awq;
    const int64_t shapes[GPTQ_PARTS][2] = {{awq ? K : K / 8, awq ? N / 8 : N},
                                           {K / gs, N / 8}, {K / gs, N}, {K, 0}};
    for (int part = 0; part < (awq ? GPTQ_G_IDX : GPTQ_PARTS); part++) {
        if (p->n == p->cap && grow_plan(p))
            return -1;
        plan_entry e = {.need = *need, .part = part, .ndim = part == GPTQ_G_IDX ? 1 : 2,
                        .shape = {shapes[part][0], shapes[part][1]},
                        .dtype = part == GPTQ_SCALES ? "F16" : "I32"};
        e.bytes = (size_t)e.shape[0] * (size_t)(e.ndim > 1 ? e.shape[1] : 1) *
                  (part == GPTQ_SCALES ? 2 : 4);
        size_t n = strlen(need->name), k = strlen(".weight");
        snprintf(e.name, sizeof e.name, "%.*s.%s", (int)(n > k ? n - k : n), need->name,
                 gptq_part_names[part]);
        plan_push(p, &e);
    }
    return 0;
}

static void gptq_free(gptq_linear *g) {
    if (!g)
        return;
    free(g->q);
    free(g->zero);
    free(g->scale);
    free(g->g_idx);
    free(g);
}

static gptq_linear *gptq_draw(writer *w, const cpm_tensor_need *n) {
    gptq_linear *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->N = (int)n->shape[0];
    g->K = (int)n->shape[1];
    int gs = gptq_group_size(w->a, g->K);
    g->G = g->K / gs;
    g->q = malloc((size_t)g->N * g->K);
    g->zero = malloc((size_t)g->G * g->N);
    g->scale = malloc((size_t)g->G * g->N * 2);
    g->g_idx = malloc((size_t)g->K * 4);
    int *order = malloc((size_t)g->K * sizeof *order);
    if (!g->q || !g->zero || !g->scale || !g->g_idx || !order) {
        free(order);
        gptq_free(g);
        return NULL;
    }
    for (int k = 0; k < g->K; k++)
        order[k] = k;
    for (int k = g->K - 1; w->a->desc_act && k > 0; k--) { /* Fisher-Yates */
        int j = (int)(xorshift(&w->rng) % (uint64_t)(k + 1)), t = order[k];
        order[k] = order[j];
        order[j] = t;
    }
    for (int i = 0; i < g->K; i++) /* column order[i] is quantized i-th */
        g->g_idx[order[i]] = i / gs;
    free(order);
    float amp = (float)(sqrt(3.0) / sqrt((double)g->K)) / 8.0f;
    for (size_t i = 0; i < (size_t)g->G * g->N; i++) {
        g->scale[i] = cpm_f32_to_f16(amp * (1.0f + 0.25f * uniform(&w->rng)));
        g->zero[i] = (uint8_t)(6 + xorshift(&w->rng) % 5);
    }
    for (size_t i = 0; i < (size_t)g->N * g->K; i++)
        g->q[i] = (uint8_t)(xorshift(&w->rng) >> 60);
    return g;
}

/* AWQ qweight [K][N/8] (row k) or qzeros [G][N/8] (row g): nibble i of word c
 * holds column 8c + order[i]; zeros are stored as they are. */
static int write_awq_part(writer *w, int part) {
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    const gptq_linear *g = w->q;
    int N = g->N, K = g->K, rows = part == GPTQ_QWEIGHT ? K : g->G;
    int32_t *o = (int32_t *)w->fbuf;
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < N / 8; c++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++) {
                int n = 8 * c + order[i];
                uint32_t q = part == GPTQ_QWEIGHT ? g->q[(size_t)n * K + r]
                                                  : g->zero[(size_t)r * N + n];
                v |= q << (4 * i);
            }
            o[c] = (int32_t)v;
        }
        if (fwrite(o, 4, (size_t)N / 8, w->f) != (size_t)N / 8)
            return -1;
    }
    return 0;
}

static int write_gptq_part(writer *w, const plan_entry *e) {
    if (e->part == GPTQ_QWEIGHT) {
        gptq_free(w->q);
        if (!(w->q = gptq_draw(w, &e->need)))
            return -1;
    }
    const gptq_linear *g = w->q;
    int N = g->N, K = g->K;
    int32_t *o = (int32_t *)w->fbuf; /* one row of packed words at a time */
    if (w->a->awq && e->part != GPTQ_SCALES)
        return write_awq_part(w, e->part);
    switch (e->part) {
    case GPTQ_QWEIGHT: /* [K/8][N]: q of k = 8r + i in bits 4i..4i+3 */
        for (int r = 0; r < K / 8; r++) {
            for (int n = 0; n < N; n++) {
                uint32_t v = 0;
                for (int i = 0; i < 8; i++)
                    v |= (uint32_t)g->q[(size_t)n * K + 8 * r + i] << (4 * i);
                o[n] = (int32_t)v;
            }
            if (fwrite(o, 4, (size_t)N, w->f) != (size_t)N)
                return -1;
        }
        return 0;
    case GPTQ_QZEROS: /* [G][N/8], zero − 1 along n */
        for (int gi = 0; gi < g->G; gi++) {
            for (int c = 0; c < N / 8; c++) {
                uint32_t v = 0;
                for (int i = 0; i < 8; i++)
                    v |= (uint32_t)(g->zero[(size_t)gi * N + 8 * c + i] - 1) << (4 * i);
                o[c] = (int32_t)v;
            }
            if (fwrite(o, 4, (size_t)N / 8, w->f) != (size_t)N / 8)
                return -1;
        }
        return 0;
    case GPTQ_SCALES:
        return fwrite(g->scale, 2, (size_t)g->G * N, w->f) == (size_t)g->G * N ? 0 : -1;
    default:
        return fwrite(g->g_idx, 4, (size_t)K, w->f) == (size_t)K ? 0 : -1;
    }
}

/* --dequant: the linear as floats, W[n][k] = (q − z)·s of k's group. */
static int write_dequant(writer *w, const cpm_tensor_need *n) {
    gptq_linear *g = gptq_draw(w, n);
    if (!g)
        return -1;
    int rc = 0;
    float *row = w->fbuf;
    for (int r = 0; r < g->N && rc == 0; r++) {
        for (int k = 0; k < g->K; k++) {
            size_t at = (size_t)g->g_idx[k] * g->N + (size_t)r;
            row[k] = (float)(g->q[(size_t)r * g->K + k] - g->zero[at]) *
                     cpm_f16_to_f32(g->scale[at]);
        }
        if (w->a->dtype == CPM_DTYPE_F32) {
            rc = fwrite(row, 4, (size_t)g->K, w->f) == (size_t)g->K ? 0 : -1;
            continue;
        }
        uint16_t *h = w->buf;
        for (int k = 0; k < g->K; k++)
            h[k] = w->a->dtype == CPM_DTYPE_BF16 ? cpm_f32_to_bf16(row[k]) : cpm_f32_to_f16(row[k]);
        rc = fwrite(h, 2, (size_t)g->K, w->f) == (size_t)g->K ? 0 : -1;
    }
    gptq_free(g);
    return rc;
}

static int grow_plan(plan *p) {
    p->cap = p->cap ? p->cap * 2 : 256;
    plan_entry *e = realloc(p->e, p->cap * sizeof *e);
    if (!e)
        return -1;
    p->e = e;
    return 0;
}

static int plan_add(const cpm_tensor_need *need, void *ctx) {
    plan *p = ctx;
    if (p->n == p->cap && grow_plan(p))
        return -1;
    if (p->a->gptq && !p->a->dequant && is_quantized(need))
        return plan_gptq(p, need);
    plan_entry e = {.need = *need, .part = -1, .ndim = need->ndim,
                    .shape = {need->shape[0], need->shape[1]},
                    .dtype = cpm_dtype_name(p->a->dtype), .bytes = need_bytes(need, p->a->dtype)};
    snprintf(e.name, sizeof e.name, "%s", need->name);
    plan_push(p, &e);
    return 0;
}

static int write_shard(writer *w, const plan *p, int shard, cpm_error *err) {
    json_t *hdr = json_object();
    json_object_set_new(hdr, "__metadata__", json_pack("{s:s}", "format", "pt"));
    size_t off = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (p->e[i].shard != shard)
            continue;
        const plan_entry *n = &p->e[i];
        size_t b = n->bytes;
        json_t *shape = json_array();
        for (int d = 0; d < n->ndim; d++)
            json_array_append_new(shape, json_integer(n->shape[d]));
        json_object_set_new(hdr, n->name, json_pack("{s:s,s:o,s:[I,I]}", "dtype", n->dtype,
                                                    "shape", shape, "data_offsets",
                                                    (json_int_t)off, (json_int_t)(off + b)));
        if (w->weight_map)
            json_object_set_new(w->weight_map, n->name,
                                json_string(shard_name(w, shard, p->n_shards)));
        off += b;
    }
    char *text = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(hdr);
    size_t len = strlen(text), padded = (len + 7) & ~(size_t)7;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", w->a->out, shard_name(w, shard, p->n_shards));
    w->f = fopen(path, "wb");
    int rc = 0;
    if (!w->f) {
        free(text);
        return cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
    }
    uint64_t hl = padded;
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(hl >> (8 * i));
    fwrite(le, 1, 8, w->f);
    fwrite(text, 1, len, w->f);
    for (size_t i = len; i < padded; i++)
        fputc(' ', w->f);
    free(text);
    for (size_t i = 0; i < p->n && rc == 0; i++)
        if (p->e[i].shard == shard)
            rc = p->e[i].part >= 0 ? write_gptq_part(w, &p->e[i])
                 : w->a->gptq && is_quantized(&p->e[i].need) ? write_dequant(w, &p->e[i].need)
                                                              : write_tensor(w, &p->e[i].need);
    if (fclose(w->f) || rc)
        return cpm_error_set(err, CPM_EIO, "%s: write failed", path);
    return 0;
}

static int write_weights(const gen_args *a, const cpm_hparams *hp, cpm_error *err) {
    const cpm_arch *arch = cpm_arch_find(hp->arch);
    plan p = {.a = a, .shard_bytes = (size_t)a->shard_mb << 20, .n_shards = 1};
    if (cpm_arch_for_each_tensor(arch, hp, 0, hp->n_layers, true, true, plan_add, &p)) {
        free(p.e);
        return cpm_error_set(err, CPM_ENOMEM, "out of memory");
    }
    writer w = {.a = a, .hp = hp, .rng = a->seed * 2654435761u + 88172645463325252ull};
    w.fbuf = malloc((1 << 20) * sizeof(float));
    w.buf = malloc((1 << 20) * sizeof(uint16_t));
    if (p.n_shards > 1)
        w.weight_map = json_object();
    int rc = w.fbuf && w.buf ? 0 : cpm_error_set(err, CPM_ENOMEM, "out of memory");
    for (int s = 0; s < p.n_shards && rc == 0; s++)
        rc = write_shard(&w, &p, s, err);
    if (rc == 0 && w.weight_map) {
        char path[4096];
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", a->out);
        json_t *idx = json_pack("{s:{},s:O}", "metadata", "weight_map", w.weight_map);
        if (json_dump_file(idx, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER))
            rc = cpm_error_set(err, CPM_EIO, "%s: write failed", path);
        json_decref(idx);
    }
    json_decref(w.weight_map);
    gptq_free(w.q);
    free(w.fbuf);
    free(w.buf);
    free(p.e);
    return rc;
}

/* ---- tokenizer files ---- */

static int copy_file(const char *from, const char *to) {
    FILE *in = fopen(from, "rb");
    if (!in)
        return errno == ENOENT ? 1 : -1;
    FILE *out = fopen(to, "wb");
    int rc = out ? 0 : -1;
    char buf[1 << 16];
    size_t n;
    while (rc == 0 && (n = fread(buf, 1, sizeof buf, in)) > 0)
        rc = fwrite(buf, 1, n, out) == n ? 0 : -1;
    fclose(in);
    if (out && fclose(out))
        rc = -1;
    return rc;
}

static int copy_tokenizer(const gen_args *a, cpm_error *err) {
    static const char *files[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                  "special_tokens_map.json", "added_tokens.json"};
    char dir[4096], from[4200], to[4200];
    if (a->tokenizer_dir)
        snprintf(dir, sizeof dir, "%s", a->tokenizer_dir);
    else
        snprintf(dir, sizeof dir, "%s/tokenizers/%s", a->assets, a->p->tokenizer);
    int copied = 0;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(from, sizeof from, "%s/%s", dir, files[i]);
        snprintf(to, sizeof to, "%s/%s", a->out, files[i]);
        int rc = copy_file(from, to);
        if (rc < 0)
            return cpm_error_set(err, CPM_EIO, "copying %s: %s", from, strerror(errno));
        copied += rc == 0;
    }
    if (!copied)
        return cpm_error_set(err, CPM_ENOTFOUND, "%s: no tokenizer files", dir);
    return 0;
}

/* ---- main ---- */

enum { OPT_VARIANT = 1, OPT_OUT, OPT_DTYPE, OPT_SEED, OPT_SHARD_MB, OPT_LAYERS, OPT_HIDDEN,
       OPT_INTER, OPT_HEADS, OPT_KV_HEADS, OPT_VOCAB, OPT_EXPERTS, OPT_TOKENIZER, OPT_ASSETS,
       OPT_SPARSE, OPT_QUANT, OPT_GROUP_SIZE, OPT_DESC_ACT, OPT_DEQUANT, OPT_TERNARY,
       OPT_GATE_SPARSITY };

static const cpm_cli_opt opts[] = {
    {"variant", 0, "NAME", "the preset (list below; required)", OPT_VARIANT},
    {"out", 0, "DIR", "where the checkpoint goes (required)", OPT_OUT},
    {"dtype", 0, "bf16|f16|f32", "weight dtype (default bf16)", OPT_DTYPE},
    {"seed", 0, "N", "random seed (default 1)", OPT_SEED},
    {"shard-mb", 0, "N", "split the safetensors past N MiB", OPT_SHARD_MB},
    {"layers", 0, "N", "override the preset's layers", OPT_LAYERS},
    {"hidden", 0, "N", "... hidden size", OPT_HIDDEN},
    {"inter", 0, "N", "... FFN width", OPT_INTER},
    {"heads", 0, "N", "... attention heads", OPT_HEADS},
    {"kv-heads", 0, "N", "... key/value heads", OPT_KV_HEADS},
    {"vocab", 0, "N", "... vocabulary size", OPT_VOCAB},
    {"experts", 0, "N", "... MoE experts", OPT_EXPERTS},
    {"sparse", 0, "SPEC", "MiniCPM4 InfLLM v2 sparse_config: default or kernel=N,stride=N,"
     "block=N,window=N,topk=N,init=N,dense_len=N (unnamed keys keep HF defaults)", OPT_SPARSE},
    {"quant", 0, "gptq|awq", "decoder linears as AutoGPTQ int4 or AutoAWQ GEMM int4", OPT_QUANT},
    {"group-size", 0, "N", "int4 group size (default 128, -1 = per row)", OPT_GROUP_SIZE},
    {"desc-act", 0, NULL, "GPTQ act-order", OPT_DESC_ACT},
    {"dequant", 0, NULL, "write the same int4 weights as plain floats (exact with --dtype f32)",
     OPT_DEQUANT},
    {"ternary", 0, NULL, "decoder linears ternary per row (0, ±a), as BitCPM4 ships them", OPT_TERNARY},
    {"gate-sparsity", 0, "P", "FATReLU presets: set the threshold so that a fraction P (e.g. 0.88, "
     "MiniCPM-S-1B's) of fatrelu(gate x) is 0", OPT_GATE_SPARSITY},
    {"tokenizer", 0, "DIR", "tokenizer files (default: the variant's under assets/tokenizers)",
     OPT_TOKENIZER},
    {"assets", 0, "DIR", "the assets directory (default " CPM_ASSETS_DIR ")", OPT_ASSETS},
    {0},
};

/* "variants: a b c\n...": the presets are data, so is their list. */
static void about_text(char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "variants:");
    for (size_t i = 0; i < sizeof presets / sizeof *presets && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, " %s", presets[i].name);
    if (n < size)
        snprintf(buf + n, size - n, "\nWeights are random: the model's text is meaningless.\n");
}

static void take(const cpm_cli *cli, int c, const char *v, gen_args *a, const char **variant) {
    switch (c) {
    case OPT_VARIANT: *variant = v; break;
    case OPT_OUT: a->out = v; break;
    case OPT_DTYPE:
        if (!strcmp(v, "bf16")) a->dtype = CPM_DTYPE_BF16;
        else if (!strcmp(v, "f16")) a->dtype = CPM_DTYPE_F16;
        else if (!strcmp(v, "f32")) a->dtype = CPM_DTYPE_F32;
        else cpm_cli_fail(cli, "unknown dtype '%s'", v);
        break;
    case OPT_SEED: a->seed = (uint64_t)cpm_cli_int(cli, v, 0, LLONG_MAX); break;
    case OPT_SHARD_MB: a->shard_mb = (long)cpm_cli_int(cli, v, 0, LONG_MAX); break;
    case OPT_LAYERS: a->layers = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_HIDDEN: a->hidden = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_INTER: a->inter = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_HEADS: a->heads = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_KV_HEADS: a->kv_heads = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_VOCAB: a->vocab = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_EXPERTS: a->experts = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_TOKENIZER: a->tokenizer_dir = v; break;
    case OPT_ASSETS: a->assets = v; break;
    case OPT_SPARSE: a->sparse = v; break;
    case OPT_QUANT:
        if (strcmp(v, "gptq") && strcmp(v, "awq"))
            cpm_cli_fail(cli, "--quant: gptq or awq");
        a->gptq = 1;
        a->awq = !strcmp(v, "awq");
        break;
    case OPT_GROUP_SIZE: a->group_size = (int)cpm_cli_int(cli, v, -1, INT_MAX); break;
    case OPT_DESC_ACT: a->desc_act = 1; break;
    case OPT_DEQUANT: a->dequant = 1; break;
    case OPT_TERNARY: a->ternary = 1; break;
    case OPT_GATE_SPARSITY:
        a->gate_sparsity = cpm_cli_float(cli, v);
        if (!(a->gate_sparsity > 0 && a->gate_sparsity < 1))
            cpm_cli_fail(cli, "--gate-sparsity: %s is not in (0, 1)", v);
        break;
    }
}

static void parse(int argc, char **argv, gen_args *a) {
    static char about[1024];
    about_text(about, sizeof about);
    cpm_cli cli = {.prog = "cpm-gen-model", .synopsis = "--variant NAME --out DIR [options]",
                   .tables = {opts}, .about = about};
    *a = (gen_args){.dtype = CPM_DTYPE_BF16, .seed = 1, .assets = CPM_ASSETS_DIR,
                    .group_size = 128};
    const char *variant = NULL;
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;)
        take(&cli, c, v, a, &variant);
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    for (size_t i = 0; variant && i < sizeof presets / sizeof *presets; i++)
        if (!strcmp(presets[i].name, variant))
            a->p = &presets[i];
    if (a->awq && a->desc_act)
        cpm_cli_fail(&cli, "--desc-act: AWQ has no act-order");
    if (variant && !a->p)
        cpm_cli_fail(&cli, "unknown variant '%s'", variant);
    if (!a->p || !a->out)
        cpm_cli_fail(&cli, "--variant NAME and --out DIR are required");
    if (a->gate_sparsity > 0 && (!a->p->act || strcmp(a->p->act, "fatrelu")))
        cpm_cli_fail(&cli, "--gate-sparsity: %s has no FATReLU FFN", a->p->name);
}

static int write_configs(const gen_args *a, cpm_hparams *hp, cpm_error *err) {
    json_t *c = preset_config(a, err);
    if (!c)
        return err->code;
    apply_overrides(c, a);
    fit_rope_lists(c);
    if (a->awq && !a->dequant) /* transformers' AwqConfig fields, as AutoAWQ writes them */
        json_object_set_new(c, "quantization_config",
                            json_pack("{s:i,s:i,s:s,s:s,s:b}", "bits", 4, "group_size",
                                      a->group_size, "quant_method", "awq", "version", "gemm",
                                      "zero_point", 1));
    else if (a->gptq && !a->dequant) /* AutoGPTQ's fields, as in MiniCPM-2B-sft-int4 */
        json_object_set_new(c, "quantization_config",
                            json_pack("{s:i,s:i,s:b,s:b,s:f,s:b,s:b,s:s,s:s}", "bits", 4,
                                      "group_size", a->group_size, "desc_act", a->desc_act, "sym",
                                      0, "damp_percent", 0.01, "static_groups", 0,
                                      "true_sequential", 1, "quant_method", "gptq",
                                      "checkpoint_format", "gptq"));
    if (a->sparse && add_sparse_config(c, a->sparse)) {
        json_decref(c);
        return cpm_error_set(err, CPM_EINVAL, "--sparse: bad value '%s'", a->sparse);
    }
    char *text = json_dumps(c, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(c);
    int rc = cpm_hparams_parse(text, "config.json", hp, err);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", a->out);
    FILE *f = rc ? NULL : fopen(path, "w");
    if (!rc && (!f || fputs(text, f) < 0 || fclose(f)))
        rc = cpm_error_set(err, CPM_EIO, "%s: write failed", path);
    free(text);
    if (rc)
        return rc;
    json_t *g = json_pack("{s:i,s:b,s:f,s:f}", "bos_token_id", 1, "do_sample", 1, "temperature",
                          0.8, "top_p", 0.8);
    json_object_set_new(g, "eos_token_id",
                        a->p->eos2 ? json_pack("[i,i]", 2, a->p->eos2) : json_integer(2));
    snprintf(path, sizeof path, "%s/generation_config.json", a->out);
    if (json_dump_file(g, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER))
        rc = cpm_error_set(err, CPM_EIO, "%s: write failed", path);
    json_decref(g);
    return rc;
}

/* mkdir -p */
static int make_dirs(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}

int main(int argc, char **argv) {
    gen_args a;
    cpm_hparams hp;
    cpm_error err = {0};
    parse(argc, argv, &a);
    if (make_dirs(a.out)) {
        fprintf(stderr, "cpm-gen-model: %s: %s\n", a.out, strerror(errno));
        return 1;
    }
    if (write_configs(&a, &hp, &err) || write_weights(&a, &hp, &err) || copy_tokenizer(&a, &err)) {
        fprintf(stderr, "cpm-gen-model: %s\n", err.msg);
        return 1;
    }
    fprintf(stderr, "cpm-gen-model: wrote %s (%s, %d layers, hidden %d, vocab %d, %s)\n", a.out,
            a.p->name, hp.n_layers, hp.hidden_size, hp.vocab_size, cpm_dtype_name(a.dtype));
    return 0;
}
