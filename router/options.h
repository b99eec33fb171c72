/* options.h - cpm-router's command line mapped onto the cluster file and cpm_router_opts:
 * --config loads the file, --model replaces its model, --port and --host its HTTP
 * listener. What main.c calls between parsing the flags and cpm_router_new. */
#ifndef CPM_ROUTER_OPTIONS_H
#define CPM_ROUTER_OPTIONS_H

#include "router/router.h"

typedef struct cpm_router_args {
    const char *config_path; /* --config (required) */
    const char *model;       /* --model: NULL keeps the file's */
    const char *host;        /* --host: NULL keeps the file's router.http_addr */
    int port;                /* --port: -1 keeps the file's; 0 any free port */
} cpm_router_args;

/* No flags: port -1, the rest NULL. */
cpm_router_args cpm_router_options_args_default(void);

/* Applies a's --model to cfg and fills *ret_opts (defaults, --port, --host, log; log is
 * borrowed and may be NULL). */
void cpm_router_options_apply(const cpm_router_args *a, cpm_config *cfg, const cpm_log *log,
                              cpm_router_opts *ret_opts);

/* Loads a->config_path into *ret_cfg (the caller frees it with cpm_config_free) and applies
 * a as above. CPM_EINVAL without a path; the loader's error, naming the file, otherwise. */
int cpm_router_options_load(const cpm_router_args *a, const cpm_log *log, cpm_config **ret_cfg,
                            cpm_router_opts *ret_opts, cpm_error *err);

/* The HTTP address the router listens on, for the log: --host, else the file's, else the
 * default (127.0.0.1). Borrowed from opts or cfg. */
const char *cpm_router_options_http_host(const cpm_router_opts *opts, const cpm_config *cfg);

#endif
