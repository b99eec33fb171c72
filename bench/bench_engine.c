/* bench_engine.c - whole-model prefill and decode tokens/s, and decode as a
 * fraction of this machine's memory-bandwidth roofline, measured in one run.
 *
 *   bench_engine --model DIR [--threads 1,2] [--prompt 128] [--decode 32] [--batch 1,4,16,64]
 *                [--activations exact|bf16|int8] [--ffn dense,sparse] [--lm-head stored|int8]
 *                [--weights resident|mapped] [--rounds N]
 *
 * --weights mapped leaves the matrices in the checkpoint's file mapping instead of
 * the model's own memory (cpm_model_opts.map_weights), for A/B runs.
 *
 * --ffn runs a MiniCPM-S (FATReLU) model with each FFN in turn, interleaved --rounds
 * times (default 1) in this process, so both see the same machine; it also prints the
 * share of active neurons measured during decode. Weights per token are then measured:
 * the model's decode bytes with the FFN's replaced by what its kernels read per decode
 * step (cpm_model_ffn_stats).
 *
 * --batch also times batched decode: B sequences (each with a 16-token prompt)
 * step together, one row each per forward pass, so the weights are read once
 * per step for all of them; it prints the aggregate tokens/s and its ratio to
 * B = 1 (at the largest thread count given).
 *
 * roofline tokens/s = read bandwidth / bytes of weights read per decode token
 * (cpm_model_decode_bytes). A benchmark, never a test: nothing is asserted.
 */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/clock.h"
#include "bench/membw.h"
#include "shard/generate.h"
#include "shard/engine/kernels/matmul.h"

typedef struct bench_result {
    double prefill_tps, decode_tps;
} bench_result;

static const char *act = "exact"; /* --activations exact|bf16|int8: the run's precision */
static bool lm_head_int8; /* --lm-head int8: the output layer quantized at load */
static bool map_weights;  /* --weights mapped: left in the file mapping (cpm_model_opts) */

/* The FFN counters start at the first generated token: what follows is decode. */
static int on_first_token(int32_t token, void *ctx) {
    cpm_model **m = ctx;
    (void)token;
    if (*m)
        cpm_model_ffn_stats(*m, NULL, true);
    *m = NULL;
    return 0;
}

/* Weights read per decode token: the model's, with the FFN's as measured. */
static double measured_bytes(cpm_model *m, double *ret_active) {
    cpm_ffn_stats fs;
    cpm_model_ffn_stats(m, &fs, false);
    const cpm_model_info *in = cpm_model_get_info(m);
    double tokens = (double)fs.rows / (in->layer_end - in->layer_begin);
    *ret_active = fs.neurons ? (double)fs.active / (double)fs.neurons : -1;
    double bytes = (double)cpm_model_decode_bytes(m);
    if (tokens > 0)
        bytes += ((double)fs.weight_bytes - (double)fs.dense_bytes) / tokens;
    return bytes;
}

/* The model options every run of this process shares: the command line's. */
static cpm_model_opts run_opts(int threads) {
    cpm_model_opts o = cpm_model_opts_default();
    o.act_bf16 = strcmp(act, "bf16") == 0;
    o.act_int8 = strcmp(act, "int8") == 0;
    o.lm_head_int8 = lm_head_int8;
    o.map_weights = map_weights;
    o.n_threads = threads;
    return o;
}

static int run_once(const char *dir, int threads, int ffn_dense, int n_prompt, int n_decode,
                    double *ret_bytes, double *ret_active, bench_result *r) {
    cpm_error e = {0};
    cpm_model_opts o = run_opts(threads);
    o.max_batch_tokens = n_prompt;
    o.ffn_dense = ffn_dense == 1;
    cpm_model *m;
    if (cpm_model_load(dir, &o, &m, &e)) {
        fprintf(stderr, "bench_engine: %s\n", e.msg);
        return -1;
    }
    int V = cpm_model_get_info(m)->vocab_size;
    int32_t *ids = malloc((size_t)n_prompt * sizeof *ids);
    for (int i = 0; i < n_prompt; i++)
        ids[i] = 1 + (i * 7919) % (V - 1);
    cpm_model *first = m;
    cpm_generate_opts go = {.max_new_tokens = n_decode + 1, .ignore_eos = true,
                            .sampling = cpm_sampling_params_default(), .on_token = on_first_token,
                            .ctx = &first};
    go.sampling.temperature = 0;
    cpm_generate_stats st;
    /* As a serving stage does before it says ready: weights paged in, and one
     * short untimed pass (first-touch faults and cold caches are not prefill). */
    cpm_model_page_in(m, NULL, NULL);
    cpm_generate_opts warm = go;
    warm.max_new_tokens = 2;
    warm.on_token = NULL;
    int rc = cpm_generate(m, ids, n_prompt < 8 ? n_prompt : 8, &warm, &st, &e);
    if (!rc)
        rc = cpm_generate(m, ids, n_prompt, &go, &st, &e);
    if (rc)
        fprintf(stderr, "bench_engine: %s\n", e.msg);
    r->prefill_tps = n_prompt / st.prefill_seconds;
    r->decode_tps = n_decode / st.decode_seconds; /* n_decode forward passes */
    *ret_bytes = measured_bytes(m, ret_active);
    free(ids);
    cpm_model_free(m);
    return rc;
}

/* Aggregate decode tokens/s of B sequences stepping together (n_decode steps
 * after a 16-token prompt each, prefilled one sequence at a time, untimed). */
static int run_batch(cpm_model *m, int B, int n_decode, double *ret_tps) {
    enum { PROMPT = 16 };
    cpm_error e = {0};
    int V = cpm_model_get_info(m)->vocab_size, rc = -1, rows = B > PROMPT ? B : PROMPT;
    cpm_kv_geometry geo = cpm_model_kv_geometry(m);
    /* each sequence holds whole blocks */
    int per_seq = (PROMPT + n_decode + CPM_KV_BLOCK - 1) / CPM_KV_BLOCK * CPM_KV_BLOCK;
    cpm_kv_cache *kv = cpm_kv_cache_new(&geo, B * per_seq, B, &e);
    float *logits = malloc((size_t)rows * (size_t)V * sizeof(float));
    int32_t *ids = malloc((size_t)rows * sizeof(int32_t));
    int32_t *seq = malloc((size_t)rows * sizeof(int32_t));
    int32_t *pos = malloc((size_t)rows * sizeof(int32_t));
    int32_t *handle = malloc((size_t)B * sizeof(int32_t));
    if (!kv || !logits || !ids || !seq || !pos || !handle)
        goto out;
    for (int s = 0; s < B; s++) {
        if ((handle[s] = cpm_kv_cache_seq_new(kv, &e)) < 0)
            goto out;
        for (int i = 0; i < PROMPT; i++) {
            ids[i] = 1 + (s * 131 + i * 7919) % (V - 1);
            seq[i] = handle[s];
            pos[i] = i;
        }
        cpm_batch b = {.n_tokens = PROMPT, .ids = ids, .seq = seq, .pos = pos};
        if (cpm_model_forward(m, kv, &b, logits, &e))
            goto out;
    }
    double t0 = cpm_bench_seconds();
    for (int d = 0; d < n_decode; d++) {
        for (int s = 0; s < B; s++) {
            ids[s] = 1 + (s * 31 + d * 977) % (V - 1);
            seq[s] = handle[s];
            pos[s] = PROMPT + d;
        }
        cpm_batch b = {.n_tokens = B, .ids = ids, .seq = seq, .pos = pos};
        if (cpm_model_forward(m, kv, &b, logits, &e))
            goto out;
    }
    *ret_tps = (double)B * n_decode / (cpm_bench_seconds() - t0);
    rc = 0;
out:
    if (rc)
        fprintf(stderr, "bench_engine: batch %d: %s\n", B, e.msg[0] ? e.msg : "out of memory");
    cpm_kv_cache_free(kv);
    free(logits);
    free(ids);
    free(seq);
    free(pos);
    free(handle);
    return rc;
}

static int bench_batches(const char *dir, int threads, const char *batches, int n_decode) {
    cpm_error e = {0};
    cpm_model_opts o = run_opts(threads);
    cpm_model *m;
    if (cpm_model_load(dir, &o, &m, &e)) {
        fprintf(stderr, "bench_engine: %s\n", e.msg);
        return -1;
    }
    cpm_model_page_in(m, NULL, NULL);
    printf("\nbatched decode, %d threads, %d steps\n%-8s %14s %10s\n", threads, n_decode,
           "batch", "agg tok/s", "x batch 1");
    char *list = strdup(batches);
    double one = 0, warm = 0;
    /* untimed: the first steps of a process pay first touches (scratch, KV blocks, the
     * pool's buffer) that would count against whichever batch comes first */
    int rc = run_batch(m, 1, 8, &warm);
    for (char *tok = strtok(list, ","); tok && !rc; tok = strtok(NULL, ",")) {
        double tps = 0;
        int B = atoi(tok);
        if (B < 1 || (rc = run_batch(m, B, n_decode, &tps)))
            break;
        one = B == 1 ? tps : one;
        if (one > 0)
            printf("%-8d %14.2f %9.2fx\n", B, tps, tps / one);
        else
            printf("%-8d %14.2f %10s\n", B, tps, "-");
        fflush(stdout);
    }
    free(list);
    cpm_model_free(m);
    return rc;
}

int main(int argc, char **argv) {
    static const struct option opts[] = {{"model", 1, 0, 'm'}, {"threads", 1, 0, 't'},
                                         {"prompt", 1, 0, 'p'}, {"decode", 1, 0, 'd'},
                                         {"batch", 1, 0, 'b'}, {"activations", 1, 0, 'a'},
                                         {"weights", 1, 0, 'w'},
                                         {"ffn", 1, 0, 'f'}, {"rounds", 1, 0, 'r'},
                                         {"lm-head", 1, 0, 'l'}, {"isa", 1, 0, 'i'},
                                         {0, 0, 0, 0}};
    const char *dir = NULL, *threads = "1,2", *batches = NULL, *ffns = NULL, *isa_name = NULL;
    int n_prompt = 128, n_decode = 32, rounds = 1, c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm') dir = optarg;
        else if (c == 't') threads = optarg;
        else if (c == 'p') n_prompt = atoi(optarg);
        else if (c == 'd') n_decode = atoi(optarg);
        else if (c == 'b') batches = optarg;
        else if (c == 'a') act = optarg;
        else if (c == 'f') ffns = optarg;
        else if (c == 'r') rounds = atoi(optarg);
        else if (c == 'l') lm_head_int8 = strcmp(optarg, "int8") == 0;
        else if (c == 'w') map_weights = strcmp(optarg, "mapped") == 0;
        else if (c == 'i') isa_name = optarg;
        else return 2;
    }
    int modes[2], n_modes = 0; /* -1: the model's default FFN, 0: sparse, 1: dense */
    for (const char *p = ffns; p && n_modes < 2; p = strchr(p, ','), p = p ? p + 1 : NULL)
        modes[n_modes++] = strncmp(p, "dense", 5) == 0 ? 1 : strncmp(p, "sparse", 6) == 0 ? 0 : -2;
    if (!ffns)
        modes[n_modes++] = -1;
    bool bad_mode = false;
    for (int i = 0; i < n_modes; i++)
        bad_mode |= modes[i] == -2;
    bool bad_act = strcmp(act, "exact") && strcmp(act, "bf16") && strcmp(act, "int8");
    cpm_isa isa = cpm_isa_detect();
    bool bad_isa = isa_name && !cpm_isa_from_name(isa_name, &isa);
    if (!dir || n_prompt < 1 || n_decode < 1 || rounds < 1 || bad_mode || bad_act || bad_isa) {
        fprintf(stderr, "usage: bench_engine --model DIR [--threads 1,2] [--prompt N] [--decode N]"
                        " [--batch 1,4,16,64] [--activations exact|bf16|int8] [--ffn dense,sparse]"
                        " [--lm-head stored|int8] [--weights resident|mapped] [--rounds N]"
                        " [--isa scalar|avx2|avx512|amx]\n");
        return 2;
    }
    /* A lesser ISA on this CPU stands in for a CPU that has no better one (same
     * memory, same cores): the kernels it selects are the ones such a CPU runs. */
    if (isa_name && cpm_isa_force(isa) != isa) {
        fprintf(stderr, "bench_engine: --isa %s: this CPU lacks it\n", isa_name);
        return 2;
    }
    printf("model %s  isa %s  activations %s  lm_head %s  prompt %d  decode %d\n", dir,
           cpm_isa_name(cpm_isa_in_effect()), act,
           lm_head_int8 ? "int8" : "stored", n_prompt, n_decode);
    printf("%-8s %-7s %12s %12s %14s %8s %12s %10s\n", "threads", "ffn", "prefill t/s",
           "decode t/s", "weights/token", "active", "read GB/s", "roofline");
    char *list = strdup(threads);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        int t = atoi(tok);
        double gbps = 0;
        cpm_pool *pool = cpm_pool_new(t);
        cpm_membw_read(pool, (size_t)1 << 30, 3, &gbps);
        cpm_pool_free(pool);
        for (int round = 0; round < rounds; round++)
            for (int i = 0; i < n_modes; i++) {
                double bytes = 0, active = -1;
                bench_result r;
                if (run_once(dir, t, modes[i], n_prompt, n_decode, &bytes, &active, &r))
                    return 1;
                double roof = gbps * 1e9 / bytes;
                char act[16] = "-";
                if (active >= 0)
                    snprintf(act, sizeof act, "%.1f%%", 100.0 * active);
                printf("%-8d %-7s %12.1f %12.2f %11.1f MB %8s %12.1f %9.1f%%\n", t,
                       modes[i] == 1 ? "dense" : modes[i] == 0 ? "sparse" : "default",
                       r.prefill_tps, r.decode_tps, bytes / 1e6, act, gbps,
                       100.0 * r.decode_tps / roof);
                fflush(stdout);
            }
    }
    free(list);
    if (batches) {
        int most = 1;
        for (const char *p = threads; p; p = strchr(p, ','), p = p ? p + 1 : NULL)
            most = atoi(p) > most ? atoi(p) : most;
        if (bench_batches(dir, most, batches, n_decode))
            return 1;
    }
    return 0;
}
