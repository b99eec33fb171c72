/* svcmain.c - argument parsing (the common options over common/cli), logging set-up and
 * signal handling shared by service mains. */
#include "svcmain.h"

#include <limits.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const cpm_cli_opt svc_opts[] = {
    {"config", 0, "FILE", "the cluster file (with --index: this service's place in it)",
     CPM_SVC_OPT_CONFIG},
    {"index", 0, "N", "which one of its role in the cluster file (default 0)", CPM_SVC_OPT_INDEX},
    {"bind", 0, "ENDPOINT", "the endpoint to serve on (overrides the cluster file's)",
     CPM_SVC_OPT_BIND},
    {"name", 0, "NAME", "the name in logs and errors (default ROLE + index)", CPM_SVC_OPT_NAME},
    {"model", 0, "DIR", "the model directory (overrides the cluster file's)", CPM_SVC_OPT_MODEL},
    {"threads", 0, "N", "worker threads (default: the cluster file's, else 1)",
     CPM_SVC_OPT_THREADS},
    {"log-format", 0, "text|json", "log lines as text (default) or JSON", CPM_SVC_OPT_LOG_FORMAT},
    {"log-level", 0, "LEVEL", "debug, info (default), warn or error", CPM_SVC_OPT_LOG_LEVEL},
    {"keys", 0, "DIR", "the cluster's CURVE keys (default: the cluster file's, $CPM_KEYS_DIR)",
     CPM_SVC_OPT_KEYS},
    {"plaintext", 0, NULL, "no encryption or authentication on the fabric (warned)",
     CPM_SVC_OPT_PLAINTEXT},
    {0},
};

static void take(const cpm_cli *cli, int id, const char *v, cpm_svc_args *a) {
    switch (id) {
    case CPM_SVC_OPT_CONFIG: a->config_path = v; break;
    case CPM_SVC_OPT_INDEX: a->index = (int)cpm_cli_int(cli, v, 0, INT_MAX); break;
    case CPM_SVC_OPT_BIND: a->bind = v; break;
    case CPM_SVC_OPT_NAME: a->name = v; break;
    case CPM_SVC_OPT_MODEL: a->model = v; break;
    case CPM_SVC_OPT_THREADS: a->threads = (int)cpm_cli_int(cli, v, 0, 4096); break;
    case CPM_SVC_OPT_KEYS: a->keys = v; break;
    case CPM_SVC_OPT_PLAINTEXT: a->plaintext = true; break;
    case CPM_SVC_OPT_LOG_FORMAT:
        if ((a->log.format = cpm_log_parse_format(v)) < 0)
            cpm_cli_fail(cli, "--log-format: text or json, not '%s'", v);
        break;
    case CPM_SVC_OPT_LOG_LEVEL:
        if ((a->log.min_level = cpm_log_parse_level(v)) < 0)
            cpm_cli_fail(cli, "--log-level: debug, info, warn or error, not '%s'", v);
        break;
    }
}

void cpm_svc_parse_args(int argc, char **argv, const cpm_svc_cli *spec, cpm_svc_args *a) {
    cpm_svc_tune_malloc();
    memset(a, 0, sizeof *a);
    a->log = (cpm_log){.service = spec->role, .out = stderr, .format = CPM_LOG_TEXT,
                       .min_level = CPM_LOG_INFO};
    cpm_cli cli = {.prog = spec->prog, .about = spec->about, .tables = {svc_opts, spec->opts},
                   .synopsis = "[--config FILE --index N | --bind ENDPOINT ...] [options]"};
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;)
        if (c < CPM_SVC_OPT_OWN)
            take(&cli, c, v, a);
        else
            spec->on_opt(&cli, c, v, spec->user);
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    if (!a->name) {
        snprintf(a->name_buf, sizeof a->name_buf, "%s%d", spec->role, a->index);
        a->name = a->name_buf;
    }
    a->log.service = a->name;
    if (a->config_path) {
        cpm_error e = {0};
        if (cpm_config_load(a->config_path, &a->config, &e)) {
            cpm_log_error(&a->log, "%s", e.msg);
            exit(1);
        }
        if (a->model)
            cpm_config_set_model(a->config, a->model);
    }
}

int cpm_svc_secure(const cpm_config *cfg, const char *keys_dir, bool plaintext, void *zctx,
                   const cpm_log *log, cpm_curve **ret, cpm_error *err) {
    *ret = NULL;
    if (plaintext || (cfg && cpm_config_plaintext(cfg))) {
        cpm_log_warn(log, "the fabric is PLAIN TEXT (%s): anyone who can reach its ports can "
                     "read and forge its messages", plaintext ? "--plaintext" : "security.curve: off");
        return 0;
    }
    char dir[1024];
    const char *env = getenv("CPM_KEYS_DIR");
    if (keys_dir)
        snprintf(dir, sizeof dir, "%s", keys_dir);
    else if (cfg) {
        int rc = cpm_config_keys_dir(cfg, dir, sizeof dir, err);
        if (rc)
            return rc;
    } else if (env && env[0])
        snprintf(dir, sizeof dir, "%s", env);
    else
        return cpm_error_set(err, CPM_EINVAL, "no CURVE keys: give --keys DIR (`cpm-cluster keys "
                             "DIR` makes them) or, for plain text, --plaintext");
    cpm_curve *c;
    int rc = cpm_curve_load(dir, &c, err);
    if (!rc && (rc = cpm_curve_attach(c, zctx, log, err)))
        cpm_curve_free(c);
    if (!rc)
        *ret = c;
    return rc;
}

void cpm_svc_tune_malloc(void) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 128 << 20); /* give memory back only past 128 MiB free */
}

typedef struct sigctx {
    cpm_svc_life life;
    const cpm_log *log;
    uv_signal_t sigint, sigterm;
    uv_timer_t drain;
    uint64_t drain_start;
    bool draining, stopped;
} sigctx;

static void stop_now(sigctx *c) {
    if (c->stopped)
        return;
    c->stopped = true;
    uv_close((uv_handle_t *)&c->sigint, NULL);
    uv_close((uv_handle_t *)&c->sigterm, NULL);
    uv_close((uv_handle_t *)&c->drain, NULL);
    c->life.stop(c->life.user);
}

static void on_drain_tick(uv_timer_t *t) {
    sigctx *c = t->data;
    uint64_t ms = (uv_hrtime() - c->drain_start) / 1000000u;
    bool busy = c->life.busy && c->life.busy(c->life.user);
    if (ms < CPM_SVC_DRAIN_MIN_MS || (busy && ms < CPM_SVC_DRAIN_MAX_MS))
        return;
    if (busy)
        cpm_log_warn(c->log, "drain: work still running after %d ms: stopping anyway",
                     CPM_SVC_DRAIN_MAX_MS);
    stop_now(c);
}

static void on_signal(uv_signal_t *h, int signum) {
    sigctx *c = h->data;
    if (signum == SIGTERM && c->life.drain && !c->draining) {
        cpm_log_info(c->log, "signal %d: draining (health: not ready; accepted work finishes)",
                     signum);
        c->draining = true;
        c->drain_start = uv_hrtime();
        c->life.drain(c->life.user);
        uv_timer_start(&c->drain, on_drain_tick, 100, 100);
        return;
    }
    cpm_log_info(c->log, "signal %d: stopping", signum);
    stop_now(c);
}

void cpm_svc_run(uv_loop_t *loop, const cpm_svc_life *life, const cpm_log *log) {
    sigctx c = {.life = *life, .log = log};
    uv_signal_init(loop, &c.sigint);
    uv_signal_init(loop, &c.sigterm);
    uv_timer_init(loop, &c.drain);
    c.sigint.data = c.sigterm.data = c.drain.data = &c;
    uv_signal_start(&c.sigint, on_signal, SIGINT);
    uv_signal_start(&c.sigterm, on_signal, SIGTERM);
    uv_run(loop, UV_RUN_DEFAULT);
}
