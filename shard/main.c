/* main.c - cpm-shard: one pipeline stage as a process. Its layers, endpoints and limits
 * come from the cluster file (--config FILE --index N) or from flags. See stage.h. With
 * --tp-rank R (R >= 1) it is tensor-parallel rank R of stage N (stages[N].tp[R-1]). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "services/common/svcmain.h"
#include "shard/kernels/matmul.h"
#include "shard/stage.h"

typedef struct app {
    cpm_stage *st;
    const cpm_log *log;
} app;

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

static const char *extra =
    "\n       [--layers BEGIN:END] [--next ENDPOINT] [--kv-tokens N] [--max-seqs N]"
    " [--max-batch-tokens N] [--tp-rank R]";

/* Tensor parallelism from the cluster file: rank tp_rank of stage s. */
static int tp_from_config(const cpm_config *c, int s, int tp_rank, cpm_stage_opts *o,
                          const char **mesh, const char **peers, const cpm_log *log) {
    const cpm_cfg_stage *st = &c->stages[s];
    if (tp_rank < 0 || tp_rank > st->n_tp) {
        cpm_log_error(log, "%s: stages[%d] has tensor parallel ranks 0..%d, not %d", c->path, s,
                      st->n_tp, tp_rank);
        return -1;
    }
    if (!st->n_tp)
        return 0;
    for (int r = 0; r <= st->n_tp; r++) {
        mesh[r] = r ? st->tp[r - 1].mesh : st->tp_mesh;
        if (r)
            peers[r - 1] = st->tp[r - 1].svc.endpoint;
    }
    o->tp_rank = tp_rank;
    o->tp_size = st->n_tp + 1;
    o->tp_mesh = mesh;
    o->tp_peers = peers;
    if (tp_rank > 0) { /* its own endpoint and threads; sends nothing downstream */
        o->bind = st->tp[tp_rank - 1].svc.endpoint;
        o->threads = st->tp[tp_rank - 1].svc.threads;
        o->next = NULL;
    }
    return 0;
}

int main(int argc, char **argv) {
    cpm_svc_args a;
    char *rest[64];
    int n_rest = cpm_svc_parse_args(argc, argv, "stage", extra, &a, rest);
    cpm_stage_opts o = cpm_stage_opts_default();
    cpm_expert_peer peers[CPM_CFG_MAX_EXPERT_SVCS];
    const char *tp_mesh[CPM_TP_MAX], *tp_peers[CPM_TP_MAX];
    int tp_rank = 0;
    for (int i = 0; i + 1 < n_rest; i++) /* needed before the cluster file is read */
        if (!strcmp(rest[i], "--tp-rank"))
            tp_rank = atoi(rest[i + 1]);
    if (tp_rank > 0 && a.name == a.name_buf) { /* "stage0.tp1" in logs and errors */
        snprintf(a.name_buf, sizeof a.name_buf, "stage%d.tp%d", a.index, tp_rank);
        a.log.service = a.name;
    }
    if (a.config) {
        cpm_config *c = a.config;
        if (a.index < 0 || a.index >= c->n_stages) {
            cpm_log_error(&a.log, "%s: no stages[%d]", c->path, a.index);
            return 1;
        }
        const cpm_cfg_stage *s = &c->stages[a.index];
        o.bind = s->svc.endpoint;
        o.next = cpm_config_stage_next(c, a.index);
        o.layer_begin = s->layer_begin;
        o.layer_end = s->layer_end;
        o.threads = s->svc.threads;
        o.kv_tokens = s->kv_tokens;
        o.kv_dtype = strcmp(s->kv_dtype, "f16") ? CPM_DTYPE_F32 : CPM_DTYPE_F16;
        cpm_isa isa;
        if (cpm_isa_from_name(s->isa, &isa) && cpm_isa_force(isa) != isa) /* "auto": not a name */
            fprintf(stderr, "cpm-shard: isa %s: this CPU lacks it; using %s\n", s->isa,
                    cpm_isa_name(cpm_isa_force(isa)));
        o.max_seqs = s->max_seqs;
        o.max_batch_tokens = s->max_batch_tokens;
        o.model_dir = c->model;
        /* expert parallelism: the MoE experts run in the cluster's expert services */
        for (int i = 0; i < c->n_experts; i++)
            peers[i] = (cpm_expert_peer){.endpoint = c->experts[i].svc.endpoint,
                                         .begin = c->experts[i].expert_begin,
                                         .end = c->experts[i].expert_end};
        o.experts = peers;
        o.n_experts = c->n_experts;
        o.expert_timeout_ms = c->router.timeout_ms;
        if (tp_from_config(c, a.index, tp_rank, &o, tp_mesh, tp_peers, &a.log))
            return 1;
    } else if (tp_rank) {
        cpm_log_error(&a.log, "--tp-rank needs --config FILE --index N");
        return 2;
    }
    for (int i = 0; i < n_rest; i++) {
        const char *v = i + 1 < n_rest ? rest[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "cpm-shard: %s needs a value\n", rest[i]);
            return 2;
        }
        if (!strcmp(rest[i], "--layers")) {
            if (sscanf(v, "%d:%d", &o.layer_begin, &o.layer_end) != 2) {
                fprintf(stderr, "cpm-shard: --layers wants BEGIN:END (END -1 = last)\n");
                return 2;
            }
        } else if (!strcmp(rest[i], "--next"))
            o.next = v;
        else if (!strcmp(rest[i], "--kv-tokens"))
            o.kv_tokens = atoi(v);
        else if (!strcmp(rest[i], "--max-seqs"))
            o.max_seqs = atoi(v);
        else if (!strcmp(rest[i], "--max-batch-tokens"))
            o.max_batch_tokens = atoi(v);
        else if (!strcmp(rest[i], "--tp-rank"))
            ; /* read above */
        else {
            fprintf(stderr, "cpm-shard: unknown argument '%s'\n", rest[i]);
            return 2;
        }
        i++;
    }
    if (a.bind)
        o.bind = a.bind;
    if (a.model)
        o.model_dir = a.model;
    if (a.threads)
        o.threads = a.threads;
    o.name = a.name;
    if (!o.bind || (!o.next && o.tp_rank == 0) || !o.model_dir || !*o.model_dir) {
        cpm_log_error(&a.log, "need --config FILE --index N, or --bind EP --next EP --model DIR");
        return 2;
    }
    void *z = zmq_ctx_new();
    uv_loop_t *loop = uv_default_loop();
    cpm_stage *st;
    cpm_error e = {0};
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
    cpm_svc_run(loop, stop, &ap, &a.log);
    uv_loop_close(loop);
    cpm_config_free(a.config);
    zmq_ctx_term(z);
    cpm_log_info(&a.log, "stopped");
    return 0;
}
