/* main_service.c - cpm-tokenizer: loads the model directory's tokenizer and serves
 * tokenize / chat / detokenize / pieces on one zmq endpoint (--config/--index or --bind --model). */
#include <stdio.h>
#include <stdlib.h>
#include <zmq.h>

#include "services/common/server.h"
#include "services/common/svcmain.h"
#include "services/tokenizer/service.h"

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
    cpm_svc_cli spec = {.prog = "cpm-tokenizer", .role = "tokenizer",
                        .about = "Serves tokenize, chat, detokenize and pieces requests with the\n"
                                 "model directory's tokenizer.\n"};
    cpm_svc_parse_args(argc, argv, &spec, &a);
    const char *bind = a.bind, *model = a.model;
    int threads = a.threads;
    if (a.config) {
        if (a.index < 0 || a.index >= a.config->n_tokenizers) {
            cpm_log_error(&a.log, "%s: no tokenizers[%d]", a.config->path, a.index);
            return 1;
        }
        if (!bind)
            bind = a.config->tokenizers[a.index].endpoint;
        if (!threads)
            threads = a.config->tokenizers[a.index].threads;
        if (!model)
            model = a.config->model;
    }
    if (!bind || !model || !*model) {
        cpm_log_error(&a.log, "need an endpoint and a model: --config FILE --index N, or --bind EP --model DIR");
        return 2;
    }
    char nthreads[16];
    snprintf(nthreads, sizeof nthreads, "%d", threads > 0 ? threads : 1);
    setenv("UV_THREADPOOL_SIZE", nthreads, 1);

    cpm_tokenizer *tok;
    cpm_error e = {0};
    if (cpm_tokenizer_load(model, &tok, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    void *z = zmq_ctx_new();
    cpm_curve *curve;
    if (cpm_svc_secure(a.config, a.keys, a.plaintext, z, &a.log, &curve, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    uv_loop_t *loop = uv_default_loop();
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = curve;
    cpm_server_opts o = {.service = "tokenizer", .name = a.name, .handler = cpm_tokenizer_svc_handle,
                         .user = tok, .sock = &so};
    cpm_server *srv;
    if (cpm_server_new(loop, z, bind, &o, &srv, &e)) {
        cpm_log_error(&a.log, "%s", e.msg);
        return 1;
    }
    cpm_log_info(&a.log, "serving %s on %s (vocab %d)", model, bind, (int)cpm_tokenizer_vocab_size(tok));
    cpm_svc_run(loop, &(cpm_svc_life){stop, drain, busy, srv}, &a.log);
    uv_loop_close(loop);
    cpm_tokenizer_free(tok);
    cpm_config_free(a.config);
    zmq_ctx_term(z);
    cpm_curve_free(curve);
    cpm_log_info(&a.log, "stopped");
    return 0;
}
