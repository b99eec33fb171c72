/* main.c - cpm-router: reads the cluster config, runs the router until SIGINT/SIGTERM.
 *
 * A thin shell over router.h: argument parsing, logging, signals, exit codes.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "router/router.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: cpm-router --config FILE [--model DIR] [--port N] [--host ADDR]\n"
            "                  [--log-format text|json] [--log-level debug|info|warn|error]\n"
            "Serves the OpenAI-compatible HTTP API and the internal generate RPC of the cluster\n"
            "described by FILE. --port 0 picks a free port (printed on start).\n");
}

typedef struct app {
    uv_loop_t *loop;
    cpm_router *router;
    uv_signal_t sigint, sigterm;
    const cpm_log *log;
} app;

static void on_router_closed(void *ud) {
    app *a = ud;
    a->router = NULL;
    uv_close((uv_handle_t *)&a->sigint, NULL);
    uv_close((uv_handle_t *)&a->sigterm, NULL);
}

static void on_signal(uv_signal_t *s, int signum) {
    app *a = s->data;
    if (!a->router)
        return;
    cpm_log_info(a->log, "signal %d: shutting down", signum);
    cpm_router *r = a->router;
    a->router = NULL;
    uv_signal_stop(&a->sigint);
    uv_signal_stop(&a->sigterm);
    cpm_router_close(r, on_router_closed, a);
}

int main(int argc, char **argv) {
    const char *config = NULL, *model = NULL, *host = NULL;
    int port = -1;
    cpm_log log = {.service = "router", .out = stderr, .format = CPM_LOG_TEXT,
                   .min_level = CPM_LOG_INFO};
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},   {"model", required_argument, NULL, 'm'},
        {"port", required_argument, NULL, 'p'},     {"host", required_argument, NULL, 'H'},
        {"log-format", required_argument, NULL, 'f'}, {"log-level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    for (int c; (c = getopt_long(argc, argv, "c:m:p:H:f:l:h", opts, NULL)) != -1;) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 'm':
            model = optarg;
            break;
        case 'p': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 0 || v > 65535) {
                fprintf(stderr, "cpm-router: --port: '%s' is not a port number\n", optarg);
                return 2;
            }
            port = (int)v;
            break;
        }
        case 'H':
            host = optarg;
            break;
        case 'f':
            if ((log.format = cpm_log_parse_format(optarg)) < 0) {
                fprintf(stderr, "cpm-router: --log-format: text or json\n");
                return 2;
            }
            break;
        case 'l':
            if ((log.min_level = cpm_log_parse_level(optarg)) < 0) {
                fprintf(stderr, "cpm-router: --log-level: debug, info, warn or error\n");
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!config || optind != argc) {
        usage(stderr);
        return 2;
    }
    cpm_error e = {0};
    cpm_config *cfg;
    if (cpm_config_load(config, &cfg, &e)) {
        fprintf(stderr, "cpm-router: %s\n", e.msg);
        return 1;
    }
    if (model)
        cpm_config_set_model(cfg, model);
    signal(SIGPIPE, SIG_IGN);
    void *zctx = zmq_ctx_new();
    app a = {.loop = uv_default_loop(), .log = &log};
    cpm_router_opts ro = cpm_router_opts_default();
    ro.http_port = port;
    ro.http_addr = host;
    ro.log = &log;
    int rc = cpm_router_new(a.loop, zctx, cfg, &ro, &a.router, &e);
    if (rc == 0)
        rc = cpm_router_start(a.router, &e);
    if (rc) {
        fprintf(stderr, "cpm-router: %s\n", e.msg);
        if (a.router) {
            cpm_router_close(a.router, NULL, NULL);
            uv_run(a.loop, UV_RUN_DEFAULT);
        }
        zmq_ctx_term(zctx);
        cpm_config_free(cfg);
        return 1;
    }
    uv_signal_init(a.loop, &a.sigint);
    uv_signal_init(a.loop, &a.sigterm);
    a.sigint.data = a.sigterm.data = &a;
    uv_signal_start(&a.sigint, on_signal, SIGINT);
    uv_signal_start(&a.sigterm, on_signal, SIGTERM);
    cpm_log_info(&log, "listening on http://%s:%d (rpc %s)",
                 host ? host : cfg->router.http_addr[0] ? cfg->router.http_addr : "127.0.0.1",
                 cpm_router_http_port(a.router), cfg->router.rpc);
    uv_run(a.loop, UV_RUN_DEFAULT);
    uv_loop_close(a.loop);
    zmq_ctx_term(zctx);
    cpm_config_free(cfg);
    return 0;
}
