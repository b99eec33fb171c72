/* run_main.c - cpm-run: load a checkpoint, run a prompt, generate, in one process.
 *
 * The tool every correctness check drives: --logits-out writes the prompt's
 * logits as raw little-endian f32 rows, --print-ids the generated ids. A thin
 * shell over cpm_model (engine), cpm_generate and the tokenizer library.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../services/tokenizer/tokenizer.h"
#include "generate.h"
#include "kernels/matmul.h"

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

static void usage(FILE *f) {
    fprintf(f,
            "usage: cpm-run --model DIR (--ids 1,2,3 | --prompt TEXT) [options]\n"
            "  --n N                 tokens to generate (default 32)\n"
            "  --temperature T       0 = greedy (default 0)\n"
            "  --top-p P --top-k K --min-p P --repetition-penalty R --seed S\n"
            "  --threads N           compute threads (default 1)\n"
            "  --batch N             most prompt tokens per forward pass (default 512)\n"
            "  --kv-dtype f32|f16    KV cache elements (default f32, exact; f16 halves its memory)\n"
            "  --isa NAME            pin the matmul kernels: scalar, avx2, avx512, amx (default: best)\n"
            "  --logits-out FILE     write every prompt position's logits (f32 LE rows)\n"
            "  --print-ids           print the generated ids on one line of stdout\n"
            "  --ignore-eos          generate exactly N tokens\n"
            "  --chat                wrap --prompt in the model's chat template as a user turn\n"
            "prefill and decode tokens/s are reported on stderr.\n");
}

static int parse_int(const char *s, const char *what, int min, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < min || v > 1 << 30) {
        fprintf(stderr, "cpm-run: %s: '%s' is not an integer >= %d\n", what, s, min);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_float(const char *s, const char *what, float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s) {
        fprintf(stderr, "cpm-run: %s: '%s' is not a number\n", what, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

static int parse_args(int argc, char **argv, run_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},     {"ids", required_argument, 0, 'i'},
        {"prompt", required_argument, 0, 'p'},    {"n", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 't'}, {"top-p", required_argument, 0, 'P'},
        {"top-k", required_argument, 0, 'K'},     {"min-p", required_argument, 0, 'M'},
        {"repetition-penalty", required_argument, 0, 'R'}, {"seed", required_argument, 0, 's'},
        {"threads", required_argument, 0, 'T'},   {"batch", required_argument, 0, 'B'},
        {"logits-out", required_argument, 0, 'L'}, {"print-ids", no_argument, 0, 'I'},
        {"ignore-eos", no_argument, 0, 'E'},      {"chat", no_argument, 0, 'C'},
        {"kv-dtype", required_argument, 0, 'D'},   {"isa", required_argument, 0, 'A'},
        {"help", no_argument, 0, 'h'},            {0, 0, 0, 0}};
    *a = (run_args){.n = 32, .threads = 1, .batch = 512};
    a->sampling = cpm_sampling_params_default();
    a->sampling.temperature = 0.0f;
    int c, seed = 0, rc = 0;
    while (rc == 0 && (c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'i': a->ids = optarg; break;
        case 'p': a->prompt = optarg; break;
        case 'n': rc = parse_int(optarg, "--n", 0, &a->n); break;
        case 't': rc = parse_float(optarg, "--temperature", &a->sampling.temperature); break;
        case 'P': rc = parse_float(optarg, "--top-p", &a->sampling.top_p); break;
        case 'K': rc = parse_int(optarg, "--top-k", 0, &a->sampling.top_k); break;
        case 'M': rc = parse_float(optarg, "--min-p", &a->sampling.min_p); break;
        case 'R': rc = parse_float(optarg, "--repetition-penalty", &a->sampling.repetition_penalty); break;
        case 's': rc = parse_int(optarg, "--seed", 0, &seed); a->sampling.seed = (uint64_t)seed; break;
        case 'T': rc = parse_int(optarg, "--threads", 1, &a->threads); break;
        case 'B': rc = parse_int(optarg, "--batch", 1, &a->batch); break;
        case 'L': a->logits_out = optarg; break;
        case 'I': a->print_ids = true; break;
        case 'E': a->ignore_eos = true; break;
        case 'C': a->chat = true; break;
        case 'A': a->isa = optarg; break;
        case 'D':
            if (!strcmp(optarg, "f32") || !strcmp(optarg, "f16")) {
                a->kv_dtype = optarg[1] == '3' ? CPM_DTYPE_F32 : CPM_DTYPE_F16;
            } else {
                fprintf(stderr, "cpm-run: --kv-dtype: '%s' is not f32 or f16\n", optarg);
                rc = -1;
            }
            break;
        case 'h': usage(stdout); exit(0);
        default: rc = -1;
        }
    }
    if (rc == 0 && (optind < argc || !a->model || !a->ids == !a->prompt)) {
        usage(stderr);
        rc = -1;
    }
    return rc;
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

int main(int argc, char **argv) {
    run_args a;
    if (parse_args(argc, argv, &a))
        return 2;
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
    if (cpm_model_load(a.model, &mo, &m, &err)) {
        fprintf(stderr, "cpm-run: %s: %s\n", a.model, err.msg);
        goto out;
    }
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
