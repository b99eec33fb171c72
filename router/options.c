/* options.c - command line -> cluster config + cpm_router_opts for cpm-router.
 * Flags win over the file; the file was validated when loaded. */
#include "options.h"

cpm_router_args cpm_router_options_args_default(void) {
    return (cpm_router_args){.port = -1};
}

void cpm_router_options_apply(const cpm_router_args *a, cpm_config *cfg, const cpm_log *log,
                              cpm_router_opts *ret_opts) {
    if (a->model)
        cpm_config_set_model(cfg, a->model);
    *ret_opts = cpm_router_opts_default();
    ret_opts->http_port = a->port;
    ret_opts->http_addr = a->host;
    ret_opts->log = log;
}

int cpm_router_options_load(const cpm_router_args *a, const cpm_log *log, cpm_config **ret_cfg,
                            cpm_router_opts *ret_opts, cpm_error *err) {
    *ret_cfg = NULL;
    if (!a->config_path)
        return cpm_error_set(err, CPM_EINVAL, "no cluster file: --config FILE is required");
    int rc = cpm_config_load(a->config_path, ret_cfg, err);
    if (rc)
        return rc;
    cpm_router_options_apply(a, *ret_cfg, log, ret_opts);
    return 0;
}

const char *cpm_router_options_http_host(const cpm_router_opts *opts, const cpm_config *cfg) {
    if (opts->http_addr)
        return opts->http_addr;
    return cfg->router.http_addr[0] ? cfg->router.http_addr : "127.0.0.1";
}
