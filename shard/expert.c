/* expert.c - the expert service: a cpm_worker (services/common/worker.h) whose one job
 * at a time runs cpm_expert_ffn per expert group of an ExpertForward request.
 *
 * Threading as in stage.c: the loop thread owns the socket, the queue and the stats;
 * the worker owns the model and its scratch while a job runs, and the job's
 * hand-over (expert_done) is where the loop reads what it wrote. One job at a time
 * because the model has one scratch; stages of several pipelines share the service.
 */
#include "expert.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/worker.h"
#include "shard/engine/model/model.h"

struct cpm_expert {
    cpm_worker *w;
    cpm_expert_opts opts;
    char name[64], model_dir[1024];
    cpm_expert_ready_cb ready_cb;
    void *user;
    char status[64];         /* health: the experts served */
    bool closing;

    /* worker-owned while a job runs */
    cpm_model *model;
    const cpm_model_info *info;
    int job_rows;
    double job_compute_s;

    cpm_expert_stats stats;  /* rows and compute_s; the counts are the worker's */
};

cpm_expert_opts cpm_expert_opts_default(void) {
    return (cpm_expert_opts){.expert_begin = 0, .expert_end = -1, .threads = 1,
                             .max_batch_tokens = 512, .max_queue = 256, .name = "expert"};
}

/* ------------------------------------------------------------------ the job (worker) */

/* Everything the network said, checked against the model and this service's range
 * before any compute (wire.c has checked the counts and the frame size already). */
static int check_request(const cpm_expert *ex, const Cpm__V1__ExpertForward *f, const cpm_inmsg *m,
                         cpm_error *err) {
    const cpm_model_info *in = ex->info;
    if (strcmp(in->variant, "moe"))
        return cpm_error_set(err, CPM_EUNSUPPORTED, "model %s has no MoE layers", ex->model_dir);
    if (f->layer >= (uint32_t)in->n_layers)
        return cpm_error_set(err, CPM_ERANGE, "layer %u: the model has %d layers", f->layer,
                             in->n_layers);
    for (size_t g = 0; g < f->n_expert; g++) {
        if (f->expert[g] < (uint32_t)ex->opts.expert_begin || f->expert[g] >= (uint32_t)ex->opts.expert_end)
            return cpm_error_set(err, CPM_ERANGE, "expert[%zu] = %u is outside this service's [%d, %d)",
                                 g, f->expert[g], ex->opts.expert_begin, ex->opts.expert_end);
        if (g && f->expert[g] <= f->expert[g - 1])
            return cpm_error_set(err, CPM_EINVAL, "expert[%zu] = %u: experts must ascend without repeats",
                                 g, f->expert[g]);
    }
    if (f->rows && (f->rows->dtype != CPM__V1__DTYPE__DTYPE_F32 ||
                    f->rows->shape[1] != (uint32_t)in->hidden_size))
        return cpm_error_set(err, CPM_ESHAPE, "rows must be F32 [n, %d]", in->hidden_size);
    if (f->rows && (uintptr_t)m->tensor % _Alignof(float))
        return cpm_error_set(err, CPM_EFORMAT, "rows frame is not float-aligned");
    return 0;
}

static void free_buf(void *data, void *hint) {
    (void)hint;
    free(data);
}

static int do_request(cpm_expert *ex, const cpm_inmsg *m, cpm_reply *out, cpm_error *err) {
    const Cpm__V1__ExpertForward *f = m->env->expert_forward;
    int rc = check_request(ex, f, m, err);
    if (rc)
        return rc;
    size_t H = (size_t)ex->info->hidden_size, total = 0;
    for (size_t g = 0; g < f->n_expert; g++)
        total += f->n_rows[g];
    float *y = total ? malloc(total * H * sizeof *y) : NULL;
    if (total && !y)
        return cpm_error_set(err, CPM_ENOMEM, "output of %zu rows", total);
    const float *x = m->tensor;
    uint64_t t0 = uv_hrtime();
    for (size_t g = 0, at = 0; g < f->n_expert && !rc; at += f->n_rows[g], g++)
        rc = cpm_expert_ffn(ex->model, (int)f->layer, (int)f->expert[g], x + at * H,
                            (int)f->n_rows[g], y + at * H, err);
    ex->job_compute_s = (double)(uv_hrtime() - t0) / 1e9;
    Cpm__V1__ExpertResult r = CPM__V1__EXPERT_RESULT__INIT;
    uint32_t shape[2] = {(uint32_t)total, (uint32_t)H};
    Cpm__V1__TensorDesc d = CPM__V1__TENSOR_DESC__INIT;
    r.layer = f->layer;
    r.n_expert = f->n_expert;
    r.expert = f->expert;
    r.n_n_rows = f->n_n_rows;
    r.n_rows = f->n_rows;
    if (total) {
        d.dtype = CPM__V1__DTYPE__DTYPE_F32;
        d.n_shape = 2;
        d.shape = shape;
        r.rows = &d;
    }
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_EXPERT_RESULT;
    env.expert_result = &r;
    if (rc) {
        free(y);
        return rc;
    }
    cpm_payload t = {.data = y, .size = total * H * sizeof *y, .free_fn = free_buf};
    if ((rc = cpm_reply_set(out, &env, y ? &t : NULL, err))) /* frees y */
        return rc;
    ex->job_rows = (int)total;
    return 0;
}

/* A failed request's reply names this service (the Error's service field). */
static void pack_error(cpm_expert *ex, cpm_reply *out, const cpm_error *e) {
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = e->code ? e->code : CPM_EINTERNAL;
    er.message = (char *)e->msg;
    er.service = ex->name;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_ERROR;
    env.error = &er;
    cpm_reply_set(out, &env, NULL, NULL);
}

static int expert_run(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err) {
    cpm_expert *ex = user;
    int rc = do_request(ex, in, out, err);
    if (rc) {
        cpm_error_prefix(err, "%s", ex->name);
        pack_error(ex, out, err);
    }
    return rc;
}

/* ------------------------------------------------------------------ loop side */

static void expert_done(void *user, const cpm_inmsg *in, int rc) {
    (void)in;
    (void)rc;
    cpm_expert *ex = user;
    ex->stats.rows += (unsigned long long)ex->job_rows;
    ex->stats.compute_s += ex->job_compute_s;
    ex->job_rows = 0;
    ex->job_compute_s = 0;
}

static bool expert_admit(void *user, cpm_sock *s, const cpm_inmsg *m) {
    (void)user;
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD)
        return true;
    cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_EUNSUPPORTED,
                        "an expert service takes expert_forward and health_request", NULL);
    return false;
}

static void expert_health(void *user, Cpm__V1__Health *h) {
    cpm_expert *ex = user;
    if (!h->ready)
        return;
    snprintf(ex->status, sizeof ex->status, "serving experts %d..%d", ex->opts.expert_begin,
             ex->opts.expert_end - 1);
    h->status = ex->status;
}

static void expert_release(void *user) {
    cpm_expert *ex = user;
    cpm_model_free(ex->model);
    free(ex);
}

/* ------------------------------------------------------------------ loading */

static int expert_load(void *user, cpm_error *err) {
    cpm_expert *ex = user;
    cpm_model_opts mo = cpm_model_opts_default();
    mo.n_threads = ex->opts.threads;
    mo.max_batch_tokens = ex->opts.max_batch_tokens;
    mo.expert_begin = ex->opts.expert_begin;
    mo.expert_end = ex->opts.expert_end;
    int rc = cpm_model_load(ex->model_dir, &mo, &ex->model, err);
    if (!rc) {
        ex->info = cpm_model_get_info(ex->model);
        if (strcmp(ex->info->variant, "moe"))
            rc = cpm_error_set(err, CPM_EUNSUPPORTED, "%s is a %s model: no experts to serve",
                               ex->model_dir, ex->info->variant);
    }
    if (!rc && ex->opts.expert_end < 0) /* `end`: through the model's last expert */
        ex->opts.expert_end = ex->info->n_experts;
    return rc;
}

static void expert_loaded(void *user, int rc, const cpm_error *err) {
    cpm_expert *ex = user;
    if (ex->ready_cb)
        ex->ready_cb(ex, rc, err, ex->user);
}

static const cpm_worker_ops expert_ops = {.load = expert_load, .loaded = expert_loaded,
    .admit = expert_admit, .run = expert_run, .done = expert_done, .health = expert_health,
    .release = expert_release};

int cpm_expert_new(uv_loop_t *loop, void *zctx, const cpm_expert_opts *opts, cpm_expert_ready_cb cb,
                   void *user, cpm_expert **ret, cpm_error *err) {
    *ret = NULL;
    if (!opts->model_dir || !opts->bind)
        return cpm_error_set(err, CPM_EINVAL, "expert: model_dir and bind are required");
    if (opts->expert_begin < 0 || (opts->expert_end >= 0 && opts->expert_end <= opts->expert_begin))
        return cpm_error_set(err, CPM_ERANGE, "expert: range [%d, %d) is empty or negative",
                             opts->expert_begin, opts->expert_end);
    if (opts->max_queue < 1 || opts->max_batch_tokens < 1 || opts->threads < 1)
        return cpm_error_set(err, CPM_EINVAL, "expert: threads, max_batch_tokens and max_queue must be >= 1");
    cpm_expert *ex = calloc(1, sizeof *ex);
    if (!ex)
        return cpm_error_set(err, CPM_ENOMEM, "expert");
    ex->opts = *opts;
    ex->ready_cb = cb;
    ex->user = user;
    snprintf(ex->name, sizeof ex->name, "%s", opts->name ? opts->name : "expert");
    ex->opts.name = ex->name;
    snprintf(ex->model_dir, sizeof ex->model_dir, "%s", opts->model_dir);
    ex->opts.model_dir = ex->model_dir;
    cpm_worker_opts wo = {.service = "expert", .name = ex->name, .what = "expert service",
                          .full_msg = "expert queue full", .max_running = 1,
                          .max_queue = opts->max_queue, .ops = &expert_ops, .user = ex};
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = opts->curve;
    wo.sock = &so;
    int rc = cpm_worker_new(loop, zctx, opts->bind, &wo, &ex->w, err);
    if (rc) {
        free(ex);
        return rc;
    }
    *ret = ex;
    return 0;
}

void cpm_expert_get_stats(const cpm_expert *ex, cpm_expert_stats *ret) {
    cpm_worker_stats w;
    cpm_worker_get_stats(ex->w, &w);
    *ret = ex->stats;
    ret->served = w.served;
    ret->failed = w.failed + w.refused;
    ret->bad_messages = w.bad_messages;
}

void cpm_expert_drain(cpm_expert *ex) {
    cpm_worker_drain(ex->w);
}

bool cpm_expert_busy(const cpm_expert *ex) {
    return cpm_worker_busy(ex->w);
}

void cpm_expert_free(cpm_expert *ex) {
    if (!ex || ex->closing)
        return;
    ex->closing = true;
    cpm_worker_free(ex->w); /* releases ex once no job or load runs */
}
