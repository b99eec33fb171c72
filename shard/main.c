/* main.c - cpm-shard: one pipeline stage as a process. Its layers, endpoints and limits
 * come from the cluster file (--config FILE --index N) or from flags. See stage.h. With
 * --tp-rank R (R >= 1) it is tensor-parallel rank R of stage N (stages[N].tp[R-1]). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "services/common/svcmain.h"
#include "shard/engine/kernels/matmul.h"
#include "shard/stage_config.h"

typedef struct app {
    cpm_stage *st;
    const cpm_log *log;
} app;

static void drain(void *user) {
    cpm_stage_drain(((app *)user)->st);
}

static bool busy(void *user) {
    return cpm_stage_busy(((app *)user)->st);
}

static void stop(void *user) {
    app *a = user;
    cpm_stage_stats s;
    cpm_stage_get_stats(a->st, &s);
    cpm_log_info(a->log, "%llu micro-batches, %llu rows, %.2f s computing, %llu failed, %llu bad messages, "
                 "%llu allocations on the step path, %llu inputs realigned", s.batches, s.rows,
                 s.compute_s, s.failed, s.bad_messages, s.out_allocs, s.realigned);
    if (s.tp_allreduces) /* tensor parallelism: what the all-reduces cost (bench/bench_tp.py) */
        cpm_log_info(a->log, "%llu all-reduces of %.1f us mean", s.tp_allreduces, s.tp_allreduce_us);
    cpm_stage_free(a->st);
}

/* The loading thread's progress, in the log at most once a second (and at the end). */
typedef struct load_log {
    const cpm_log *log;
    uint64_t started_ns, last_ns;
} load_log;

static void on_progress(void *ud, size_t done, size_t total) {
    load_log *l = ud;
    uint64_t now = uv_hrtime();
    if (done < total && now - l->last_ns < 1000000000u)
        return;
    l->last_ns = now;
    cpm_log_info(l->log, "loading: weights paged in %.0f of %.0f MiB (%.0f %%, %.1f s)", (double)done / 1048576.0,
                 (double)total / 1048576.0, total ? 100.0 * (double)done / (double)total : 100.0,
                 (double)(now - l->started_ns) / 1e9);
}

static void on_ready(cpm_stage *st, int status, const cpm_error *err, void *user) {
    const cpm_log *log = user;
    if (status) {
        cpm_log_error(log, "load failed: %s", err->msg);
        /* Nothing useful left to serve: exit, so the launcher sees the failure at once. */
        (void)st;
        exit(1);
    }
    cpm_log_info(log, "ready");
}

enum { OPT_LAYERS = CPM_SVC_OPT_OWN, OPT_NEXT, OPT_KV_TOKENS, OPT_MAX_SEQS, OPT_MAX_BATCH_TOKENS,
       OPT_TP_RANK };

static const cpm_cli_opt own_opts[] = {
    {"layers", 0, "BEGIN:END", "the layers served here (END -1 = last)", OPT_LAYERS},
    {"next", 0, "ENDPOINT", "the next stage, or the router's results endpoint", OPT_NEXT},
    {"kv-tokens", 0, "N", "KV-cache capacity in tokens", OPT_KV_TOKENS},
    {"max-seqs", 0, "N", "live sequences", OPT_MAX_SEQS},
    {"max-batch-tokens", 0, "N", "rows per forward call", OPT_MAX_BATCH_TOKENS},
    {"tp-rank", 0, "R", "tensor parallel rank R >= 1 of stages[N] (with --config --index)",
     OPT_TP_RANK},
    {0},
};

/* Flags win over the cluster file, so they are kept apart until it is read. 0/NULL: not given. */
typedef struct flags {
    bool layers_set;
    int layer_begin, layer_end;
    const char *next;
    int kv_tokens, max_seqs, max_batch_tokens, tp_rank;
} flags;

static void on_opt(const cpm_cli *cli, int id, const char *v, void *user) {
    flags *f = user;
    switch (id) {
    case OPT_LAYERS:
        if (sscanf(v, "%d:%d", &f->layer_begin, &f->layer_end) != 2)
            cpm_cli_fail(cli, "--layers wants BEGIN:END (END -1 = last)");
        f->layers_set = true;
        break;
    case OPT_NEXT: f->next = v; break;
    case OPT_KV_TOKENS: f->kv_tokens = (int)cpm_cli_int(cli, v, 1, INT_MAX); break;
    case OPT_MAX_SEQS: f->max_seqs = (int)cpm_cli_int(cli, v, 1, INT_MAX); break;
    case OPT_MAX_BATCH_TOKENS: f->max_batch_tokens = (int)cpm_cli_int(cli, v, 1, INT_MAX); break;
    case OPT_TP_RANK: f->tp_rank = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    }
}

static void apply_flags(cpm_stage_opts *o, const flags *f, const cpm_svc_args *a) {
    if (f->layers_set) {
        o->layer_begin = f->layer_begin;
        o->layer_end = f->layer_end;
    }
    if (f->next)
        o->next = f->next;
    if (f->kv_tokens)
        o->kv_tokens = f->kv_tokens;
    if (f->max_seqs)
        o->max_seqs = f->max_seqs;
    if (f->max_batch_tokens)
        o->max_batch_tokens = f->max_batch_tokens;
    if (a->bind)
        o->bind = a->bind;
    if (a->model)
        o->model_dir = a->model;
    if (a->threads)
        o->threads = a->threads;
    o->name = a->name;
}

/* The file's `isa` pins the matmul kernels for the whole process ("auto": the best). */
static void force_isa(const char *name) {
    cpm_isa isa;
    if (name && cpm_isa_from_name(name, &isa) && cpm_isa_force(isa) != isa)
        fprintf(stderr, "cpm-shard: isa %s: this CPU lacks it; using %s\n", name,
                cpm_isa_name(cpm_isa_force(isa)));
}

int main(int argc, char **argv) {
    cpm_svc_args a;
    flags f = {0};
    cpm_svc_cli spec = {.prog = "cpm-shard", .role = "stage", .opts = own_opts, .on_opt = on_opt,
                        .user = &f,
                        .about = "Runs one pipeline stage: its layers, endpoints and limits come from\n"
                                 "the cluster file (--config FILE --index N) or from the flags.\n"};
    cpm_svc_parse_args(argc, argv, &spec, &a);
    if (f.tp_rank > 0 && a.name == a.name_buf) { /* "stage0.tp1" in logs and errors */
        snprintf(a.name_buf, sizeof a.name_buf, "stage%d.tp%d", a.index, f.tp_rank);
        a.log.service = a.name;
    }
    cpm_stage_config sc;
    cpm_error e = {0};
    cpm_stage_config_init(&sc);
    if (a.config && cpm_stage_config_from_cluster(&sc, a.config, a.index, f.tp_rank, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    if (!a.config && f.tp_rank) {
        cpm_log_error(&a.log, "--tp-rank needs --config FILE --index N");
        return 2;
    }
    force_isa(sc.isa);
    cpm_stage_opts o = sc.opts;
    apply_flags(&o, &f, &a);
    if (cpm_stage_config_check(&o, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 2;
    }
    void *z = zmq_ctx_new();
    cpm_curve *curve;
    if (cpm_svc_secure(a.config, a.keys, a.plaintext, z, &a.log, &curve, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    o.curve = curve;
    load_log ll = {.log = &a.log, .started_ns = uv_hrtime()};
    o.load_progress = on_progress;
    o.load_progress_ud = &ll;
    uv_loop_t *loop = uv_default_loop();
    cpm_stage *st;
    if (cpm_stage_new(loop, z, &o, on_ready, &a.log, &st, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    char tp[64] = "";
    if (o.tp_size > 1)
        snprintf(tp, sizeof tp, ", tensor parallel rank %d of %d", o.tp_rank, o.tp_size);
    cpm_log_info(&a.log, "layers %d..%d of %s on %s -> %s%s%s, loading", o.layer_begin, o.layer_end,
                 o.model_dir, o.bind, o.next ? o.next : "(its rank 0)",
                 o.n_experts ? ", experts in the expert services" : "", tp);
    app ap = {.st = st, .log = &a.log};
    cpm_svc_run(loop, &(cpm_svc_life){stop, drain, busy, &ap}, &a.log);
    uv_loop_close(loop);
    cpm_config_free(a.config);
    zmq_ctx_term(z);
    cpm_curve_free(curve);
    cpm_log_info(&a.log, "stopped");
    return 0;
}
