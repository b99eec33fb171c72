/* expert_main.c - cpm-expert: MoE experts [first, last) of every layer as a process
 * (expert parallelism). Its range, endpoint and threads come from the cluster file
 * (--config FILE --index N: experts[N]) or from flags. See shard/expert.h. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "services/common/svcmain.h"
#include "shard/expert.h"

typedef struct app {
    cpm_expert *ex;
    const cpm_log *log;
} app;

static void drain(void *user) {
    cpm_expert_drain(((app *)user)->ex);
}

static bool busy(void *user) {
    return cpm_expert_busy(((app *)user)->ex);
}

static void stop(void *user) {
    app *a = user;
    cpm_expert_stats s;
    cpm_expert_get_stats(a->ex, &s);
    cpm_log_info(a->log, "%llu requests served, %llu failed, %llu rows, %.2f s computing, %llu bad messages",
                 s.served, s.failed, s.rows, s.compute_s, s.bad_messages);
    cpm_expert_free(a->ex);
}

static void on_ready(cpm_expert *ex, int status, const cpm_error *err, void *user) {
    const cpm_log *log = user;
    (void)ex;
    if (status) {
        cpm_log_error(log, "load failed: %s", err->msg);
        exit(1); /* nothing to serve: let the launcher see the failure at once */
    }
    cpm_log_info(log, "ready");
}

enum { OPT_EXPERTS = CPM_SVC_OPT_OWN, OPT_MAX_BATCH_TOKENS };

static const cpm_cli_opt own_opts[] = {
    {"experts", 0, "BEGIN:END", "the experts of every MoE layer served here (END -1 = last)",
     OPT_EXPERTS},
    {"max-batch-tokens", 0, "N", "most rows per expert call", OPT_MAX_BATCH_TOKENS},
    {0},
};

/* Flags win over the cluster file, so they are kept apart until it is read. */
typedef struct flags {
    bool experts_set;
    int expert_begin, expert_end;
    int max_batch_tokens;
} flags;

static void on_opt(const cpm_cli *cli, int id, const char *v, void *user) {
    flags *f = user;
    if (id == OPT_EXPERTS) {
        if (sscanf(v, "%d:%d", &f->expert_begin, &f->expert_end) != 2)
            cpm_cli_fail(cli, "--experts wants BEGIN:END (END -1 = last)");
        f->experts_set = true;
    } else if (id == OPT_MAX_BATCH_TOKENS)
        f->max_batch_tokens = (int)cpm_cli_int(cli, v, 1, INT_MAX);
}

int main(int argc, char **argv) {
    cpm_svc_args a;
    flags f = {0};
    cpm_svc_cli spec = {.prog = "cpm-expert", .role = "expert", .opts = own_opts,
                        .on_opt = on_opt, .user = &f,
                        .about = "Runs MoE experts [BEGIN, END) of every layer for the stages.\n"};
    cpm_svc_parse_args(argc, argv, &spec, &a);
    cpm_expert_opts o = cpm_expert_opts_default();
    if (a.config) {
        cpm_config *c = a.config;
        if (a.index < 0 || a.index >= c->n_experts) {
            cpm_log_error(&a.log, "%s: no experts[%d]", c->path, a.index);
            return 1;
        }
        const cpm_cfg_expert *x = &c->experts[a.index];
        o.bind = x->svc.endpoint;
        o.threads = x->svc.threads;
        o.expert_begin = x->expert_begin;
        o.expert_end = x->expert_end; /* CPM_CFG_LAYER_END (-1) = through the last, as here */
        o.model_dir = c->model;
    }
    if (f.experts_set) {
        o.expert_begin = f.expert_begin;
        o.expert_end = f.expert_end;
    }
    if (f.max_batch_tokens)
        o.max_batch_tokens = f.max_batch_tokens;
    if (a.bind)
        o.bind = a.bind;
    if (a.model)
        o.model_dir = a.model;
    if (a.threads)
        o.threads = a.threads;
    o.name = a.name;
    if (!o.bind || !o.model_dir || !*o.model_dir) {
        cpm_log_error(&a.log, "need --config FILE --index N, or --bind EP --model DIR --experts B:E");
        return 2;
    }
    void *z = zmq_ctx_new();
    cpm_curve *curve;
    cpm_error e = {0};
    if (cpm_svc_secure(a.config, a.keys, a.plaintext, z, &a.log, &curve, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    o.curve = curve;
    uv_loop_t *loop = uv_default_loop();
    cpm_expert *ex;
    if (cpm_expert_new(loop, z, &o, on_ready, &a.log, &ex, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    cpm_log_info(&a.log, "experts %d..%d of %s on %s, loading", o.expert_begin, o.expert_end, o.model_dir,
                 o.bind);
    app ap = {.ex = ex, .log = &a.log};
    cpm_svc_run(loop, &(cpm_svc_life){stop, drain, busy, &ap}, &a.log);
    uv_loop_close(loop);
    cpm_config_free(a.config);
    zmq_ctx_term(z);
    cpm_curve_free(curve);
    cpm_log_info(&a.log, "stopped");
    return 0;
}
