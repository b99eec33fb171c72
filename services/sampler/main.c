/* main.c - cpm-sampler: serves `sample` requests (logits in, tokens out) on one zmq endpoint.
 * Its place in the cluster comes from --config/--index or --bind; see services/sampler/service.h. */
#include <stdio.h>
#include <stdlib.h>
#include <zmq.h>

#include "services/common/server.h"
#include "services/common/svcmain.h"
#include "services/sampler/service.h"

static void stop(void *user) {
    cpm_server_free(user);
}

static void drain(void *user) {
    cpm_server_drain(user);
}

static bool busy(void *user) {
    return cpm_server_busy(user);
}

int main(int argc, char **argv) {
    cpm_svc_args a;
    cpm_svc_cli spec = {.prog = "cpm-sampler", .role = "sampler",
                        .about = "Serves sample requests (logits in, tokens out) on one endpoint.\n"};
    cpm_svc_parse_args(argc, argv, &spec, &a);
    const char *bind = a.bind;
    int threads = a.threads;
    if (a.config) {
        if (a.index < 0 || a.index >= a.config->n_samplers) {
            cpm_log_error(&a.log, "%s: no samplers[%d]", a.config->path, a.index);
            return 1;
        }
        if (!bind)
            bind = a.config->samplers[a.index].endpoint;
        if (!threads)
            threads = a.config->samplers[a.index].threads;
    }
    if (!bind) {
        cpm_log_error(&a.log, "no endpoint: give --config FILE --index N or --bind ENDPOINT");
        return 2;
    }
    /* The worker pool is libuv's; its size is read once, at the first queued job. */
    char nthreads[16];
    snprintf(nthreads, sizeof nthreads, "%d", threads > 0 ? threads : 1);
    setenv("UV_THREADPOOL_SIZE", nthreads, 1);

    void *z = zmq_ctx_new();
    cpm_curve *curve;
    cpm_error e = {0};
    if (cpm_svc_secure(a.config, a.keys, a.plaintext, z, &a.log, &curve, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    /* constrained decoding (response_format) needs the model's tokenizer; without it the
     * sampler serves everything else and refuses constrained rows with a message */
    cpm_constrainer *cons = NULL;
    const char *model = a.config ? a.config->model : NULL;
    if (model && model[0] && cpm_constrainer_new(model, &cons, &e))
        cpm_log_warn(&a.log, "no constrained decoding: %s", e.msg);
    uv_loop_t *loop = uv_default_loop();
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = curve;
    cpm_server_opts o = {.service = "sampler", .name = a.name, .handler = cpm_sampler_svc_handle,
                         .user = cons, .sock = &so};
    cpm_server *srv;
    if (cpm_server_new(loop, z, bind, &o, &srv, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    cpm_log_info(&a.log, "serving on %s with %s threads", bind, nthreads);
    cpm_svc_run(loop, &(cpm_svc_life){stop, drain, busy, srv}, &a.log);
    uv_loop_close(loop);
    cpm_constrainer_free(cons);
    cpm_config_free(a.config);
    zmq_ctx_term(z);
    cpm_curve_free(curve);
    cpm_log_info(&a.log, "stopped");
    return 0;
}
