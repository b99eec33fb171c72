/* model.h - a loaded MiniCPM model (or one pipeline stage of it) and its forward pass.
 *
 * A cpm_model owns the weights of layers [layer_begin, layer_end) plus, on the
 * first stage, the embedding and, on the last stage, the final norm and lm_head.
 * cpm_model_forward runs one batch of tokens from any number of sequences
 * (continuous batching: prefill chunks and decode tokens mixed freely) through
 * those layers, reading and extending each sequence's KV cache.
 *
 *   cpm_model *m; cpm_error e;
 *   cpm_model_opts o = cpm_model_opts_default();
 *   if (cpm_model_load("models/minicpm-1b", &o, &m, &e)) die(e.msg);
 *   cpm_kv_geometry g = cpm_model_kv_geometry(m);
 *   cpm_kv_cache *kv = cpm_kv_cache_new(&g, 4096, 8, &e);
 *   int s = cpm_kv_cache_seq_new(kv, &e);
 *   int32_t ids[] = {1, 5, 9}, seq[] = {s, s, s}, pos[] = {0, 1, 2};
 *   cpm_batch b = {.n_tokens = 3, .ids = ids, .seq = seq, .pos = pos};
 *   cpm_model_forward(m, kv, &b, logits, &e);   // logits: [3, vocab]
 */
#ifndef CPM_MODEL_H
#define CPM_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../../common/error.h"
#include "../batch.h"
#include "../kv_cache.h"

typedef struct cpm_model cpm_model;

typedef struct cpm_model_opts {
    int layer_begin;      /* first layer this stage owns (default 0) */
    int layer_end;        /* one past the last; -1 = num_hidden_layers (default) */
    int n_threads;        /* compute threads (default 1) */
    int max_batch_tokens; /* most tokens one cpm_model_forward call may carry (default 512) */
    int expert_begin;     /* MoE: experts [begin, end) this model binds (default 0, -1 = all); */
    int expert_end;       /* begin == end binds none (their weights are never touched) */
    int tp_rank;          /* tensor parallelism: this rank of tp_size (default 0 of 1) holds */
    int tp_size;          /* heads [r*nh/T, (r+1)*nh/T), whole KV groups, and F/T of the FFN */
    bool keep_bf16;       /* leave ternary bf16 matrices (BitCPM4) as bf16 instead of
                             repacking them to 2 bits (default false: repack; for A/B runs) */
    bool act_bf16;        /* BF16, F16 and int4 weights meet activations rounded to bf16
                             (cpm_matmul_bf16x, cpm_matmul_q4_bf16x; F16 and int4 weights
                             rounded to bf16 too where VDPBF16PS runs):
                             faster prefill, less exact logits (default false: exact f32;
                             docs/KERNELS.md has the measured error) */
    bool act_int8;        /* int4 weights meet activations quantized to int8 per 32
                             (cpm_matmul_q4_q8x, as llama.cpp's Q4_0 meets Q8_0); every
                             other weight as act_bf16, which this implies (default false) */
    bool map_weights;     /* leave the matrices in the checkpoint's file mapping (the page
                             cache) instead of copying them into the model's own memory at
                             load (default false: copied; decode reads a file mapping 15-20 %
                             slower on the machines measured, docs/KERNELS.md) */
    bool lm_head_int8;    /* quantize the output layer to int8 with a scale per 32 at load
                             (matmul_q8.h): half the bytes a decode token reads for it, lossy
                             (default false: the checkpoint's own weights) */
    bool ffn_dense;       /* FATReLU models (MiniCPM-S): run the FFN densely from the row-major
                             down_proj, as other models do (default false: skip the inactive
                             neurons, ffn_sparse.h; the same logits up to summation order) */
} cpm_model_opts;

cpm_model_opts cpm_model_opts_default(void);

#define CPM_MAX_EOS 4

/* generation_config.json's sampling defaults (do_sample false: temperature 0). */
typedef struct cpm_gen_defaults {
    bool has_temperature, has_top_p, has_top_k, has_repetition_penalty;
    float temperature; /* 0 when do_sample is false */
    float top_p;
    int top_k;
    float repetition_penalty;
} cpm_gen_defaults;

typedef struct cpm_model_info {
    const char *arch;          /* "MiniCPMForCausalLM", "MiniCPM3ForCausalLM" */
    const char *variant;       /* "dense", "moe", "mla" */
    int vocab_size;
    int hidden_size;
    int n_layers;              /* in the whole model */
    int n_experts;             /* MoE: experts per layer; 0 = dense FFN */
    int layer_begin, layer_end;
    bool first_stage, last_stage;
    int max_position;          /* max_position_embeddings */
    int max_batch_tokens;      /* most rows one cpm_model_forward call takes */
    int tp_rank, tp_size;      /* tensor parallelism (1: the whole width here) */
    int bos_id;
    int n_eos;
    int eos_ids[CPM_MAX_EOS];  /* union of config.json and generation_config.json */
    int n_ternary;             /* matrices repacked to 2 bits (ternary bf16, BitCPM4) */
    bool ffn_sparse;           /* the FATReLU FFN skips inactive neurons (down_proj repacked) */
    cpm_gen_defaults gen;      /* generation_config.json's sampling defaults */
} cpm_model_info;

/* Loads config.json and the weights this stage needs from directory dir.
 * opts may be NULL (defaults). On success *ret owns everything; free with cpm_model_free. */
int cpm_model_load(const char *dir, const cpm_model_opts *opts, cpm_model **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_model_free(cpm_model *m);

const cpm_model_info *cpm_model_get_info(const cpm_model *m);

/* What this stage's KV cache must hold per token (for cpm_kv_cache_new). */
cpm_kv_geometry cpm_model_kv_geometry(const cpm_model *m);

/* Progress of cpm_model_page_in: bytes paged in so far, of total. */
typedef void (*cpm_model_progress_fn)(void *ud, size_t done, size_t total);

/* Reads every page of the weights this model uses that still live in the mapped
 * checkpoint (repacked weights were written at load and are resident), so the first
 * request does not pay for the disk: a server says ready only after this. fn (may be
 * NULL) hears the progress about every 5 % and at the end. Returns the bytes paged. */
size_t cpm_model_page_in(const cpm_model *m, cpm_model_progress_fn fn, void *ud);

/* Bytes of weights one decode step of one sequence reads in this stage: every
 * matrix of its layers (for MoE only the router and the k routed experts) plus
 * lm_head on the last stage and one embedding row on the first. The numerator
 * of the memory-bandwidth roofline. */
size_t cpm_model_decode_bytes(const cpm_model *m);

/* What the gated FFN did since load or the last reset, for sparsity and bandwidth
 * figures: rows counts each token once per layer. weight_bytes is what the FFN's kernels
 * read of gate, up and down (a batch's active union counted once), dense_bytes what the
 * dense FFN reads for the same calls; active and neurons are counted on the sparse path
 * only (fatrelu(gate x) != 0, of rows x intermediate_size). */
typedef struct cpm_ffn_stats {
    uint64_t rows;
    uint64_t neurons;
    uint64_t active;
    uint64_t weight_bytes;
    uint64_t dense_bytes;
} cpm_ffn_stats;

/* Copies the counters to *ret (may be NULL) and, if reset, zeroes them. */
void cpm_model_ffn_stats(cpm_model *m, cpm_ffn_stats *ret, bool reset);


/* ---- expert parallelism (MoE): the experts of a layer may run in other processes ----
 *
 * A backend runs n groups of rows of one layer: group g is n_rows[g] consecutive rows
 * of x [sum(n_rows), hidden] for expert[g] (ascending, no repeats); it writes each
 * expert's output, not multiplied by any routing weight, to y in the same layout,
 * and returns 0, or a CPM_E* code with err filled. layer is the model's absolute layer
 * index. The forward makes one call per MoE layer and combines the outputs in the
 * same order as the local path, so the logits are bit-identical to it. */
typedef struct cpm_expert_backend {
    void *ud;
    int (*run)(void *ud, int layer, int n, const int *expert, const int *n_rows, const float *x,
               float *y, cpm_error *err);
} cpm_expert_backend;

/* Installs b (copied) for every following forward; NULL runs the experts locally again.
 * A failing backend fails the forward (the KV cache is left as before the call). */
void cpm_model_set_expert_backend(cpm_model *m, const cpm_expert_backend *b);

/* One expert's FFN, y[n, hidden] = down(act(gate x) * up x), for absolute layer `layer`:
 * the very code the local MoE path runs, for expert services. Any n (run in chunks of
 * max_batch_tokens); uses the model's scratch, so calls on one model must not overlap. */
int cpm_expert_ffn(cpm_model *m, int layer, int expert, const float *x, int n, float *y,
                   cpm_error *err);

/* ---- tensor parallelism (Megatron style) inside a stage ----
 *
 * A model loaded with tp_size T > 1 holds rank tp_rank's heads (q/k/v rows, o_proj
 * columns; MLA: q_b/kv_b rows) and its slice of the FFN intermediate (gate/up rows,
 * down columns; MoE: of every expert, router replicated), and caches its heads only.
 * After o_proj and after down_proj its output is a partial sum; the backend must
 * replace x[n] by p0 + p1 + ... + p(T-1), added in rank order, so that every rank
 * holds the same bits. layer is absolute; phase 0 = attention, 1 = FFN. Returns 0 or
 * a CPM_E* code with err filled (the forward then fails, the KV cache left as before). */
typedef struct cpm_allreduce_backend {
    void *ud;
    int (*sum)(void *ud, int layer, int phase, float *x, size_t n, cpm_error *err);
} cpm_allreduce_backend;

/* Installs b (copied); NULL removes it. A model with tp_size > 1 refuses to run
 * without one. Ignored with tp_size 1. */
void cpm_model_set_allreduce_backend(cpm_model *m, const cpm_allreduce_backend *b);

/* Runs the batch through this stage's layers. out receives, on the last stage,
 * logits [n_wanted_rows, vocab_size] (rows in batch order); on other stages the
 * activations [n_tokens, hidden_size] for the next stage. Allocates nothing. */
int cpm_model_forward(cpm_model *m, cpm_kv_cache *kv, const cpm_batch *b, float *out,
                      cpm_error *err);

#endif
