/* run_main.c - cpm-run: load a checkpoint, run a prompt, generate, in one process.
 *
 * The tool every correctness check drives: --logits-out writes the prompt's
 * logits as raw little-endian f32 rows, --print-ids the generated ids. A thin
 * shell over cpm_model (engine), cpm_generate and the tokenizer library.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cli.h"
#include "../services/tokenizer/tokenizer.h"
#include "generate.h"
#include "engine/kernels/matmul.h"

typedef struct run_args {
    const char *model;
    const char *ids;
    const char *prompt;
    const char *logits_out;
    int n;
    int threads;
    int batch;
    bool print_ids;
    bool ignore_eos;
    bool chat;
    bool keep_bf16;
    bool act_bf16;
    bool act_int8;
    bool ffn_dense;
    bool lm_head_int8;
    bool map_weights;
    cpm_dtype kv_dtype;
    const char *isa;          /* NULL = the best this CPU has */
    cpm_sampling_params sampling;
} run_args;

typedef struct run_ctx {
    FILE *logits_file;
    bool print_ids;
    int n_printed;
    cpm_detok *detok; /* NULL when printing ids or without a tokenizer */
} run_ctx;

enum { OPT_MODEL = 1, OPT_IDS, OPT_PROMPT, OPT_N, OPT_TEMPERATURE, OPT_TOP_P, OPT_TOP_K, OPT_MIN_P,
       OPT_REPETITION_PENALTY, OPT_SEED, OPT_THREADS, OPT_BATCH, OPT_KV_DTYPE, OPT_ISA,
       OPT_LOGITS_OUT, OPT_PRINT_IDS, OPT_IGNORE_EOS, OPT_CHAT, OPT_KEEP_BF16,
       OPT_ACTIVATIONS, OPT_FFN, OPT_LM_HEAD, OPT_WEIGHTS };

static const cpm_cli_opt opts[] = {
    {"model", 0, "DIR", "the checkpoint directory (required)", OPT_MODEL},
    {"ids", 0, "1,2,3", "the prompt as token ids", OPT_IDS},
    {"prompt", 0, "TEXT", "the prompt as text", OPT_PROMPT},
    {"n", 0, "N", "tokens to generate (default 32)", OPT_N},
    {"temperature", 0, "T", "0 = greedy (default 0)", OPT_TEMPERATURE},
    {"top-p", 0, "P", "nucleus sampling", OPT_TOP_P},
    {"top-k", 0, "K", "keep the K most likely tokens", OPT_TOP_K},
    {"min-p", 0, "P", "drop tokens below P x the most likely one", OPT_MIN_P},
    {"repetition-penalty", 0, "R", "penalty for tokens already seen", OPT_REPETITION_PENALTY},
    {"seed", 0, "S", "sampling seed", OPT_SEED},
    {"threads", 0, "N", "compute threads (default 1)", OPT_THREADS},
    {"batch", 0, "N", "most prompt tokens per forward pass (default 512)", OPT_BATCH},
    {"kv-dtype", 0, "f32|f16", "KV cache elements (default f32, exact; f16 halves its memory)",
     OPT_KV_DTYPE},
    {"keep-bf16", 0, NULL, "run ternary bf16 matrices (BitCPM4) as bf16, not 2-bit", OPT_KEEP_BF16},
    {"activations", 0, "exact|bf16|int8",
     "BF16, F16 and int4 weights meet f32 activations (exact, default) or bf16-rounded ones "
     "(faster prefill, less exact); int8: int4 weights meet x quantized to int8 per 32, the "
     "others bf16 (faster int4 decode)", OPT_ACTIVATIONS},
    {"lm-head", 0, "stored|int8",
     "the output layer as the checkpoint stores it (default) or quantized to int8 with a scale "
     "per 32 at load (half the bytes a decode token reads for it, less exact)", OPT_LM_HEAD},
    {"weights", 0, "resident|mapped",
     "copy the weights into memory at load (resident, default: faster decode) or read them from "
     "the file mapping (mapped: faster load)", OPT_WEIGHTS},
    {"ffn", 0, "sparse|dense",
     "MiniCPM-S (FATReLU): skip the inactive neurons (sparse, default) or run every one (dense, "
     "the row-major down_proj as other models)", OPT_FFN},
    {"isa", 0, "NAME", "pin the matmul kernels: scalar, avx2, avx512, amx (default: best)",
     OPT_ISA},
    {"logits-out", 0, "FILE", "write every prompt position's logits (f32 LE rows)",
     OPT_LOGITS_OUT},
    {"print-ids", 0, NULL, "print the generated ids on one line of stdout", OPT_PRINT_IDS},
    {"ignore-eos", 0, NULL, "generate exactly N tokens", OPT_IGNORE_EOS},
    {"chat", 0, NULL, "wrap --prompt in the model's chat template as a user turn", OPT_CHAT},
    {0},
};

static void take(const cpm_cli *cli, int c, const char *v, run_args *a) {
    switch (c) {
    case OPT_MODEL: a->model = v; break;
    case OPT_IDS: a->ids = v; break;
    case OPT_PROMPT: a->prompt = v; break;
    case OPT_N: a->n = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_TEMPERATURE: a->sampling.temperature = (float)cpm_cli_float(cli, v); break;
    case OPT_TOP_P: a->sampling.top_p = (float)cpm_cli_float(cli, v); break;
    case OPT_TOP_K: a->sampling.top_k = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_MIN_P: a->sampling.min_p = (float)cpm_cli_float(cli, v); break;
    case OPT_REPETITION_PENALTY:
        a->sampling.repetition_penalty = (float)cpm_cli_float(cli, v);
        break;
    case OPT_SEED: a->sampling.seed = (uint64_t)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case OPT_THREADS: a->threads = (int)cpm_cli_int(cli, v, 1, INT_MAX); break;
    case OPT_BATCH: a->batch = (int)cpm_cli_int(cli, v, 1, INT_MAX); break;
    case OPT_LOGITS_OUT: a->logits_out = v; break;
    case OPT_PRINT_IDS: a->print_ids = true; break;
    case OPT_IGNORE_EOS: a->ignore_eos = true; break;
    case OPT_CHAT: a->chat = true; break;
    case OPT_KEEP_BF16: a->keep_bf16 = true; break;
    case OPT_ACTIVATIONS:
        if (strcmp(v, "bf16") && strcmp(v, "exact") && strcmp(v, "int8"))
            cpm_cli_fail(cli, "--activations: '%s' is not exact, bf16 or int8", v);
        a->act_bf16 = strcmp(v, "bf16") == 0;
        a->act_int8 = strcmp(v, "int8") == 0;
        break;
    case OPT_LM_HEAD:
        if (strcmp(v, "stored") && strcmp(v, "int8"))
            cpm_cli_fail(cli, "--lm-head: '%s' is not stored or int8", v);
        a->lm_head_int8 = strcmp(v, "int8") == 0;
        break;
    case OPT_WEIGHTS:
        if (strcmp(v, "resident") && strcmp(v, "mapped"))
            cpm_cli_fail(cli, "--weights: '%s' is not resident or mapped", v);
        a->map_weights = strcmp(v, "mapped") == 0;
        break;
    case OPT_FFN:
        if (strcmp(v, "sparse") && strcmp(v, "dense"))
            cpm_cli_fail(cli, "--ffn: '%s' is not sparse or dense", v);
        a->ffn_dense = strcmp(v, "dense") == 0;
        break;
    case OPT_ISA: a->isa = v; break;
    case OPT_KV_DTYPE:
        if (strcmp(v, "f32") && strcmp(v, "f16"))
            cpm_cli_fail(cli, "--kv-dtype: '%s' is not f32 or f16", v);
        a->kv_dtype = v[1] == '3' ? CPM_DTYPE_F32 : CPM_DTYPE_F16;
        break;
    }
}

static void parse_args(int argc, char **argv, run_args *a) {
    cpm_cli cli = {.prog = "cpm-run", .synopsis = "--model DIR (--ids 1,2,3 | --prompt TEXT) [options]",
                   .tables = {opts}, .about = "prefill and decode tokens/s are reported on stderr.\n"};
    *a = (run_args){.n = 32, .threads = 1, .batch = 512};
    a->sampling = cpm_sampling_params_default();
    a->sampling.temperature = 0.0f;
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;)
        take(&cli, c, v, a);
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    if (!a->model)
        cpm_cli_fail(&cli, "--model DIR is required");
    if (!a->ids == !a->prompt)
        cpm_cli_fail(&cli, "give one of --ids and --prompt");
}

/* "1,2,3" (spaces allowed) → ids. */
static int parse_ids(const char *s, int32_t **ret, int *ret_n) {
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    while (ids && *s) {
        while (*s == ' ' || *s == ',')
            s++;
        if (!*s)
            break;
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "cpm-run: --ids: bad token id at '%.20s'\n", s);
            free(ids);
            return -1;
        }
        if (n == cap && !(ids = realloc(ids, (cap *= 2) * sizeof *ids)))
            break;
        ids[n++] = (int32_t)v;
        s = end;
    }
    if (!ids) {
        fprintf(stderr, "cpm-run: out of memory\n");
        return -1;
    }
    *ret = ids;
    *ret_n = (int)n;
    return 0;
}

static int encode_prompt(const run_args *a, cpm_tokenizer *tok, int32_t **ret, int *ret_n,
                         cpm_error *err) {
    char *text = NULL;
    const char *src = a->prompt;
    if (a->chat) {
        cpm_chat_msg msg = {.role = "user", .content = a->prompt};
        int rc = cpm_chat_render(tok, &msg, 1, NULL, true, &text, err);
        if (rc)
            return rc;
        src = text;
    }
    size_t n = 0;
    int rc = cpm_tokenizer_encode(tok, src, strlen(src), true, ret, &n, err);
    *ret_n = (int)n;
    free(text);
    return rc;
}

static int on_prompt_logits(const float *logits, int vocab, void *vctx) {
    run_ctx *c = vctx;
    return fwrite(logits, sizeof(float), (size_t)vocab, c->logits_file) == (size_t)vocab ? 0 : -1;
}

static int on_token(int32_t t, void *vctx) {
    run_ctx *c = vctx;
    if (c->print_ids) {
        printf(c->n_printed++ ? " %d" : "%d", t);
        return 0;
    }
    if (c->detok) {
        const char *piece;
        size_t len;
        if (cpm_detok_push(c->detok, t, &piece, &len, NULL) == 0 && len) {
            fwrite(piece, 1, len, stdout);
            fflush(stdout);
        }
    }
    return 0;
}

static void report(const cpm_generate_stats *st) {
    double pf = st->prefill_seconds > 0 ? st->prompt_tokens / st->prefill_seconds : 0;
    int steps = st->generated_tokens > 1 ? st->generated_tokens - 1 : 0;
    double dc = st->decode_seconds > 0 && steps ? steps / st->decode_seconds : 0;
    fprintf(stderr,
            "cpm-run: prompt %d tokens, prefill %.2f tok/s; generated %d tokens, decode %.2f "
            "tok/s; finish %s\n",
            st->prompt_tokens, pf, st->generated_tokens, dc, st->finish ? st->finish : "-");
}

/* MiniCPM-S: how sparse its FFN ran, and what that saved of the dense FFN's reads. */
static void report_ffn(cpm_model *m) {
    cpm_ffn_stats fs;
    cpm_model_ffn_stats(m, &fs, false);
    if (!cpm_model_get_info(m)->ffn_sparse || !fs.neurons || !fs.dense_bytes)
        return;
    fprintf(stderr, "cpm-run: sparse FFN: %.1f %% of neurons active; read %.1f %% of the dense "
            "FFN's weight bytes\n", 100.0 * (double)fs.active / (double)fs.neurons,
            100.0 * (double)fs.weight_bytes / (double)fs.dense_bytes);
}

int main(int argc, char **argv) {
    run_args a;
    parse_args(argc, argv, &a);
    cpm_error err = {0};
    cpm_model *m = NULL;
    cpm_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    int n_ids = 0, rc = 1;
    run_ctx ctx = {.print_ids = a.print_ids};

    /* The tokenizer is needed to encode --prompt and to print text; with --ids
     * and --print-ids the engine runs without one. */
    if (a.prompt || !a.print_ids) {
        if (cpm_tokenizer_load(a.model, &tok, &err)) {
            if (a.prompt) {
                fprintf(stderr, "cpm-run: %s\n", err.msg);
                goto out;
            }
            fprintf(stderr, "cpm-run: no tokenizer (%s); printing ids\n", err.msg);
            ctx.print_ids = true;
        }
    }
    if (a.ids ? parse_ids(a.ids, &ids, &n_ids) : encode_prompt(&a, tok, &ids, &n_ids, &err)) {
        if (!a.ids)
            fprintf(stderr, "cpm-run: %s\n", err.msg);
        goto out;
    }
    if (a.isa) {
        cpm_isa isa;
        if (!cpm_isa_from_name(a.isa, &isa)) {
            fprintf(stderr, "cpm-run: --isa: '%s' is not scalar, avx2, avx512 or amx\n", a.isa);
            goto out;
        }
        if (cpm_isa_force(isa) != isa)
            fprintf(stderr, "cpm-run: --isa %s: this CPU lacks it; using %s\n", a.isa,
                    cpm_isa_name(cpm_isa_force(isa)));
    }
    cpm_model_opts mo = cpm_model_opts_default();
    mo.n_threads = a.threads;
    mo.max_batch_tokens = a.batch;
    mo.keep_bf16 = a.keep_bf16;
    mo.act_bf16 = a.act_bf16;
    mo.act_int8 = a.act_int8;
    mo.ffn_dense = a.ffn_dense;
    mo.lm_head_int8 = a.lm_head_int8;
    mo.map_weights = a.map_weights;
    if (cpm_model_load(a.model, &mo, &m, &err)) {
        fprintf(stderr, "cpm-run: %s: %s\n", a.model, err.msg);
        goto out;
    }
    if (cpm_model_get_info(m)->n_ternary)
        fprintf(stderr, "cpm-run: %d ternary matrices run with 2-bit weights\n",
                cpm_model_get_info(m)->n_ternary);
    if (a.logits_out && !(ctx.logits_file = fopen(a.logits_out, "wb"))) {
        fprintf(stderr, "cpm-run: %s: %s\n", a.logits_out, strerror(errno));
        goto out;
    }
    if (tok && !ctx.print_ids)
        ctx.detok = cpm_detok_new(tok, true);
    cpm_generate_opts go = {.max_new_tokens = a.n, .ignore_eos = a.ignore_eos,
                            .kv_dtype = a.kv_dtype,
                            .sampling = a.sampling, .on_token = on_token, .ctx = &ctx,
                            .on_prompt_logits = ctx.logits_file ? on_prompt_logits : NULL};
    cpm_generate_stats st;
    if (cpm_generate(m, ids, n_ids, &go, &st, &err)) {
        fprintf(stderr, "cpm-run: %s\n", err.msg);
        goto out;
    }
    if (ctx.detok) {
        const char *piece;
        size_t len;
        if (cpm_detok_flush(ctx.detok, &piece, &len, NULL) == 0 && len)
            fwrite(piece, 1, len, stdout);
    }
    printf("\n");
    report(&st);
    report_ffn(m);
    rc = 0;
out:
    if (ctx.logits_file && fclose(ctx.logits_file) && rc == 0) {
        fprintf(stderr, "cpm-run: %s: write failed\n", a.logits_out);
        rc = 1;
    }
    cpm_detok_free(ctx.detok);
    cpm_model_free(m);
    cpm_tokenizer_free(tok);
    free(ids);
    return rc;
}
