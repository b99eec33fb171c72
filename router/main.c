/* main.c - cpm-router: reads the cluster config, runs the router until SIGINT/SIGTERM.
 *
 * A thin shell over router.h and options.h: argument parsing, logging, signals, exit codes.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/cli.h"
#include "router/options.h"
#include "services/common/svcmain.h"

enum { OPT_CONFIG = 1, OPT_MODEL, OPT_PORT, OPT_HOST, OPT_LOG_FORMAT, OPT_LOG_LEVEL };

static const cpm_cli_opt opts[] = {
    {"config", 'c', "FILE", "the cluster file (required)", OPT_CONFIG},
    {"model", 'm', "DIR", "the model directory (overrides the file's)", OPT_MODEL},
    {"port", 'p', "N", "HTTP port (overrides the file's; 0: any free port, printed)", OPT_PORT},
    {"host", 'H', "ADDR", "HTTP address (overrides the file's)", OPT_HOST},
    {"log-format", 'f', "text|json", "log lines as text (default) or JSON", OPT_LOG_FORMAT},
    {"log-level", 'l', "LEVEL", "debug, info (default), warn or error", OPT_LOG_LEVEL},
    {0},
};

static void parse_args(int argc, char **argv, cpm_router_args *ra, cpm_log *log) {
    cpm_cli cli = {.prog = "cpm-router", .synopsis = "--config FILE [options]", .tables = {opts},
                   .about = "Serves the OpenAI-compatible HTTP API and the internal generate RPC\n"
                            "of the cluster described by FILE.\n"};
    *ra = cpm_router_options_args_default();
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;) {
        switch (c) {
        case OPT_CONFIG: ra->config_path = v; break;
        case OPT_MODEL: ra->model = v; break;
        case OPT_PORT: ra->port = cpm_cli_port(&cli, v); break;
        case OPT_HOST: ra->host = v; break;
        case OPT_LOG_FORMAT:
            if ((log->format = cpm_log_parse_format(v)) < 0)
                cpm_cli_fail(&cli, "--log-format: text or json, not '%s'", v);
            break;
        case OPT_LOG_LEVEL:
            if ((log->min_level = cpm_log_parse_level(v)) < 0)
                cpm_cli_fail(&cli, "--log-level: debug, info, warn or error, not '%s'", v);
            break;
        }
    }
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    if (!ra->config_path)
        cpm_cli_fail(&cli, "--config FILE is required");
}

typedef struct app {
    uv_loop_t *loop;
    cpm_router *router;
    uv_signal_t sigint, sigterm;
    const cpm_log *log;
    int drain_ms;
    bool draining;
} app;

static void on_router_closed(void *ud) {
    app *a = ud;
    a->router = NULL;
    uv_close((uv_handle_t *)&a->sigint, NULL);
    uv_close((uv_handle_t *)&a->sigterm, NULL);
}

/* The first SIGTERM drains (router.drain_ms); SIGINT, or a second signal, stops now. */
static void on_signal(uv_signal_t *s, int signum) {
    app *a = s->data;
    if (!a->router)
        return;
    if (signum == SIGTERM && !a->draining && a->drain_ms > 0) {
        cpm_log_info(a->log, "signal %d: draining (a second signal stops at once)", signum);
        a->draining = true;
        cpm_router_drain(a->router, a->drain_ms, on_router_closed, a);
        return;
    }
    cpm_log_info(a->log, "signal %d: shutting down", signum);
    cpm_router *r = a->router;
    a->router = NULL;
    uv_signal_stop(&a->sigint);
    uv_signal_stop(&a->sigterm);
    cpm_router_close(r, on_router_closed, a); /* ends a drain too */
}

int main(int argc, char **argv) {
    cpm_log log = {.service = "router", .out = stderr, .format = CPM_LOG_TEXT,
                   .min_level = CPM_LOG_INFO};
    cpm_router_args ra;
    parse_args(argc, argv, &ra, &log);
    cpm_error e = {0};
    cpm_config *cfg;
    cpm_router_opts ro;
    if (cpm_router_options_load(&ra, &log, &cfg, &ro, &e)) {
        fprintf(stderr, "cpm-router: %s\n", e.msg);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    cpm_svc_tune_malloc();
    void *zctx = zmq_ctx_new();
    cpm_curve *curve = NULL;
    app a = {.loop = uv_default_loop(), .log = &log, .drain_ms = cfg->router.drain_ms};
    int rc = cpm_svc_secure(cfg, NULL, false, zctx, &log, &curve, &e);
    ro.curve = curve;
    if (rc == 0)
        rc = cpm_router_new(a.loop, zctx, cfg, &ro, &a.router, &e);
    if (rc == 0)
        rc = cpm_router_start(a.router, &e);
    if (rc) {
        fprintf(stderr, "cpm-router: %s\n", e.msg);
        if (a.router) {
            cpm_router_close(a.router, NULL, NULL);
            uv_run(a.loop, UV_RUN_DEFAULT);
        }
        zmq_ctx_term(zctx);
        cpm_curve_free(curve);
        cpm_config_free(cfg);
        return 1;
    }
    uv_signal_init(a.loop, &a.sigint);
    uv_signal_init(a.loop, &a.sigterm);
    a.sigint.data = a.sigterm.data = &a;
    uv_signal_start(&a.sigint, on_signal, SIGINT);
    uv_signal_start(&a.sigterm, on_signal, SIGTERM);
    cpm_log_info(&log, "listening on http://%s:%d (rpc %s)", cpm_router_options_http_host(&ro, cfg),
                 cpm_router_http_port(a.router), cfg->router.rpc);
    uv_run(a.loop, UV_RUN_DEFAULT);
    uv_loop_close(a.loop);
    zmq_ctx_term(zctx);
    cpm_curve_free(curve);
    cpm_config_free(cfg);
    return 0;
}
