/* expert.c - the expert service: inbound ROUTER, FIFO of ExpertForward requests, one
 * worker job at a time running cpm_expert_ffn per expert group.
 *
 * Threading as in stage.c: the loop thread owns the socket, the queue and the stats;
 * the worker owns the model and its scratch while a job runs, and the job's
 * after-callback on the loop thread is the hand-over point. One job at a time because
 * the model has one scratch; stages of several pipelines share the service.
 */
#include "expert.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/transport.h"
#include "shard/model/model.h"

struct cpm_expert {
    uv_loop_t *loop;
    cpm_sock *in;
    cpm_expert_opts opts;
    char name[64], model_dir[1024];
    cpm_expert_ready_cb ready_cb;
    void *user;

    /* worker-owned while a job runs */
    cpm_model *model;
    const cpm_model_info *info;
    cpm_error load_err;
    int load_rc;

    /* the running job */
    uv_work_t work;
    cpm_inmsg *job_in;
    uint8_t *job_buf;
    size_t job_size;
    cpm_payload job_tensor;
    bool job_has_tensor, job_failed;
    int job_rows;
    double job_compute_s;

    /* loop-owned */
    cpm_inmsg **q;
    int q_head, q_len;
    bool busy, loading, ready, closing;
    cpm_expert_stats stats;
    uint64_t started_ns;
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

static int do_request(cpm_expert *ex, const cpm_inmsg *m, cpm_error *err) {
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
    env.corr = m->env->corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_EXPERT_RESULT;
    env.expert_result = &r;
    if (!rc)
        rc = cpm_wire_pack(&env, &ex->job_buf, &ex->job_size, err);
    if (rc) {
        free(y);
        return rc;
    }
    if (y) {
        ex->job_tensor = (cpm_payload){.data = y, .size = total * H * sizeof *y, .free_fn = free_buf};
        ex->job_has_tensor = true;
    }
    ex->job_rows = (int)total;
    return 0;
}

static void pack_error(cpm_expert *ex, uint64_t corr, const cpm_error *e) {
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = e->code ? e->code : CPM_EINTERNAL;
    er.message = (char *)e->msg;
    er.service = ex->name;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.corr = corr;
    env.body_case = CPM__V1__ENVELOPE__BODY_ERROR;
    env.error = &er;
    cpm_wire_pack(&env, &ex->job_buf, &ex->job_size, NULL);
}

static void job_run(uv_work_t *w) {
    cpm_expert *ex = w->data;
    cpm_error e = {0};
    if (do_request(ex, ex->job_in, &e)) {
        cpm_error_prefix(&e, "%s", ex->name);
        ex->job_failed = true;
        pack_error(ex, ex->job_in->env->corr, &e);
    }
}

/* ------------------------------------------------------------------ loop side */

static void free_all(cpm_expert *ex) {
    for (int i = 0; i < ex->q_len; i++)
        cpm_inmsg_free(ex->q[(ex->q_head + i) % ex->opts.max_queue]);
    free(ex->q);
    cpm_model_free(ex->model);
    free(ex);
}

static void start_next(cpm_expert *ex);

static void job_done(uv_work_t *w, int status) {
    cpm_expert *ex = w->data;
    (void)status;
    ex->busy = false;
    if (!ex->closing && ex->job_buf) {
        cpm_payload *t = ex->job_has_tensor ? &ex->job_tensor : NULL;
        cpm_sock_send_packed(ex->in, &ex->job_in->peer, ex->job_buf, ex->job_size, t, NULL);
    } else {
        free(ex->job_buf);
        if (ex->job_has_tensor)
            free(ex->job_tensor.data);
    }
    ex->stats.served += !ex->job_failed;
    ex->stats.failed += ex->job_failed;
    ex->stats.rows += (unsigned long long)ex->job_rows;
    ex->stats.compute_s += ex->job_compute_s;
    ex->job_buf = NULL;
    ex->job_has_tensor = ex->job_failed = false;
    ex->job_rows = 0;
    ex->job_compute_s = 0;
    cpm_inmsg_free(ex->job_in);
    ex->job_in = NULL;
    if (ex->closing) {
        free_all(ex);
        return;
    }
    start_next(ex);
}

static void start_next(cpm_expert *ex) {
    if (ex->busy || !ex->ready || !ex->q_len || ex->closing)
        return;
    ex->job_in = ex->q[ex->q_head];
    ex->q_head = (ex->q_head + 1) % ex->opts.max_queue;
    ex->q_len--;
    ex->busy = true;
    ex->work.data = ex;
    uv_queue_work(ex->loop, &ex->work, job_run, job_done);
}

static void answer_health(cpm_expert *ex, const cpm_inmsg *m) {
    Cpm__V1__Health h = CPM__V1__HEALTH__INIT;
    char status[CPM_ERROR_MSG_MAX + 32];
    h.service = "expert";
    h.name = ex->name;
    h.ready = ex->ready;
    if (ex->loading)
        snprintf(status, sizeof status, "loading");
    else if (!ex->ready)
        snprintf(status, sizeof status, "failed: %s", ex->load_err.msg);
    else
        snprintf(status, sizeof status, "serving experts %d..%d", ex->opts.expert_begin,
                 ex->opts.expert_end - 1);
    h.status = status;
    h.queue_depth = (uint32_t)ex->q_len + ex->busy;
    h.uptime_s = (double)(uv_hrtime() - ex->started_ns) / 1e9;
    cpm_envelope r = CPM__V1__ENVELOPE__INIT;
    r.corr = m->env->corr;
    r.body_case = CPM__V1__ENVELOPE__BODY_HEALTH;
    r.health = &h;
    cpm_sock_send(ex->in, &m->peer, &r, NULL, NULL);
}

static void on_in(cpm_sock *s, cpm_inmsg *m, void *user) {
    cpm_expert *ex = user;
    switch (m->env->body_case) {
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST:
        answer_health(ex, m);
        break;
    case CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD:
        if (!ex->ready) {
            cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_EAGAIN,
                                ex->loading ? "expert service is still loading"
                                            : "expert service failed to load", NULL);
            ex->stats.failed++;
            break;
        }
        if (ex->q_len >= ex->opts.max_queue) {
            cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_ELIMIT, "expert queue full", NULL);
            ex->stats.failed++;
            break;
        }
        ex->q[(ex->q_head + ex->q_len++) % ex->opts.max_queue] = m;
        start_next(ex);
        return; /* the queue owns m now */
    case CPM__V1__ENVELOPE__BODY_ERROR:
        break; /* never answer an error with an error */
    default:
        cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_EUNSUPPORTED,
                            "an expert service takes expert_forward and health_request", NULL);
        break;
    }
    cpm_inmsg_free(m);
}

static void on_bad(cpm_sock *s, const cpm_error *e, void *user) {
    (void)s;
    (void)e;
    cpm_expert *ex = user;
    ex->stats.bad_messages++;
}

/* ------------------------------------------------------------------ loading */

static void load_run(uv_work_t *w) {
    cpm_expert *ex = w->data;
    cpm_model_opts mo = cpm_model_opts_default();
    mo.n_threads = ex->opts.threads;
    mo.max_batch_tokens = ex->opts.max_batch_tokens;
    mo.expert_begin = ex->opts.expert_begin;
    mo.expert_end = ex->opts.expert_end;
    int rc = cpm_model_load(ex->model_dir, &mo, &ex->model, &ex->load_err);
    if (!rc) {
        ex->info = cpm_model_get_info(ex->model);
        if (strcmp(ex->info->variant, "moe"))
            rc = cpm_error_set(&ex->load_err, CPM_EUNSUPPORTED, "%s is a %s model: no experts to serve",
                               ex->model_dir, ex->info->variant);
    }
    if (!rc && ex->opts.expert_end < 0) /* `end`: through the model's last expert */
        ex->opts.expert_end = ex->info->n_experts;
    ex->load_rc = rc;
}

static void load_done(uv_work_t *w, int status) {
    cpm_expert *ex = w->data;
    (void)status;
    ex->loading = false;
    if (ex->closing) {
        free_all(ex);
        return;
    }
    ex->ready = ex->load_rc == 0;
    if (ex->ready_cb)
        ex->ready_cb(ex, ex->load_rc, &ex->load_err, ex->user);
    start_next(ex);
}

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
    if (!ex || !(ex->q = calloc((size_t)opts->max_queue, sizeof *ex->q))) {
        free(ex);
        return cpm_error_set(err, CPM_ENOMEM, "expert");
    }
    ex->loop = loop;
    ex->opts = *opts;
    ex->ready_cb = cb;
    ex->user = user;
    ex->started_ns = uv_hrtime();
    snprintf(ex->name, sizeof ex->name, "%s", opts->name ? opts->name : "expert");
    ex->opts.name = ex->name;
    snprintf(ex->model_dir, sizeof ex->model_dir, "%s", opts->model_dir);
    ex->opts.model_dir = ex->model_dir;
    cpm_sock_opts so = cpm_sock_opts_default();
    int rc = cpm_sock_new(loop, zctx, ZMQ_ROUTER, &so, on_in, ex, &ex->in, err);
    if (!rc) {
        cpm_sock_set_bad_cb(ex->in, on_bad);
        rc = cpm_sock_bind(ex->in, opts->bind, err);
    }
    if (rc) {
        cpm_sock_free(ex->in);
        free(ex->q);
        free(ex);
        return rc;
    }
    ex->loading = true;
    ex->work.data = ex;
    uv_queue_work(loop, &ex->work, load_run, load_done);
    *ret = ex;
    return 0;
}

void cpm_expert_get_stats(const cpm_expert *ex, cpm_expert_stats *ret) {
    *ret = ex->stats;
}

void cpm_expert_free(cpm_expert *ex) {
    if (!ex || ex->closing)
        return;
    ex->closing = true;
    cpm_sock_free(ex->in);
    ex->in = NULL;
    if (!ex->busy && !ex->loading)
        free_all(ex);
}
