/* svcmain.c - argument parsing, logging set-up and signal handling shared by service mains. */
#include "svcmain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(const char *role, const char *extra) {
    fprintf(stderr,
            "usage: cpm-%s [--config FILE --index N] [--bind ENDPOINT] [--name NAME]\n"
            "       [--model DIR] [--threads N] [--log-format text|json] [--log-level LEVEL]%s\n",
            role, extra ? extra : "");
    exit(2);
}

int cpm_svc_parse_args(int argc, char **argv, const char *role, const char *extra_usage,
                       cpm_svc_args *a, char **rest) {
    memset(a, 0, sizeof *a);
    a->log = (cpm_log){.service = role, .out = stderr, .format = CPM_LOG_TEXT,
                       .min_level = CPM_LOG_INFO};
    int n_rest = 0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool takes = true;
        if (!strcmp(o, "--config") && v)
            a->config_path = v;
        else if (!strcmp(o, "--index") && v)
            a->index = atoi(v);
        else if (!strcmp(o, "--bind") && v)
            a->bind = v;
        else if (!strcmp(o, "--name") && v)
            a->name = v;
        else if (!strcmp(o, "--model") && v)
            a->model = v;
        else if (!strcmp(o, "--threads") && v)
            a->threads = atoi(v);
        else if (!strcmp(o, "--log-format") && v) {
            if ((a->log.format = cpm_log_parse_format(v)) < 0)
                usage(role, extra_usage);
        } else if (!strcmp(o, "--log-level") && v) {
            if ((a->log.min_level = cpm_log_parse_level(v)) < 0)
                usage(role, extra_usage);
        } else if (!strcmp(o, "-h") || !strcmp(o, "--help"))
            usage(role, extra_usage);
        else {
            takes = false;
            rest[n_rest++] = argv[i];
        }
        if (takes)
            i++;
    }
    if (!a->name) {
        snprintf(a->name_buf, sizeof a->name_buf, "%s%d", role, a->index);
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
    return n_rest;
}

typedef struct sigctx {
    void (*stop)(void *);
    void *user;
    const cpm_log *log;
    uv_signal_t sigint, sigterm;
} sigctx;

static void on_signal(uv_signal_t *h, int signum) {
    sigctx *c = h->data;
    cpm_log_info(c->log, "signal %d: stopping", signum);
    uv_close((uv_handle_t *)&c->sigint, NULL);
    uv_close((uv_handle_t *)&c->sigterm, NULL);
    c->stop(c->user);
}

void cpm_svc_run(uv_loop_t *loop, void (*stop)(void *user), void *user, const cpm_log *log) {
    sigctx c = {.stop = stop, .user = user, .log = log};
    uv_signal_init(loop, &c.sigint);
    uv_signal_init(loop, &c.sigterm);
    c.sigint.data = c.sigterm.data = &c;
    uv_signal_start(&c.sigint, on_signal, SIGINT);
    uv_signal_start(&c.sigterm, on_signal, SIGTERM);
    uv_run(loop, UV_RUN_DEFAULT);
}
