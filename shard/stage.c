/* stage.c - a pipeline stage: a cpm_worker (services/common/worker.h: inbound ROUTER,
 * FIFO of micro-batches) running one cpm_model_forward job at a time, and an outbound
 * DEALER to the next hop that every reply goes to.
 *
 * Threading: the loop thread owns the sockets, the queue and the stats; the worker
 * owns the model, the KV cache, the sequence map and the scratch while a job runs. Only
 * one job runs at a time (micro-batches must be applied to the KV cache in order), and
 * its hand-over on the loop thread (stage_done) is where the loop may read them.
 *
 * Memory: everything a step needs is sized at load from the limits (max_batch_tokens,
 * max_seqs, max_queue), so a steady stream of micro-batches allocates nothing here.
 * The output tensor goes to zmq without a copy, so it comes from a small pool of
 * buffers that zmq hands back from its I/O thread; only a micro-batch bigger than the
 * limits, or one finding every buffer still in zmq's hands, gets a one-off buffer
 * (counted in stats.out_allocs).
 */
#include "stage.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "services/common/worker.h"
#include "shard/engine/kv_cache.h"
#include "shard/engine/model/model.h"

typedef struct seq_entry {
    uint64_t id;
    int handle;
} seq_entry;

/* ------------------------------------------------------------------ output buffer pool */

typedef struct out_pool out_pool;

typedef struct out_slot {
    out_pool *pool;
    atomic_bool busy;        /* taken by the worker, until zmq releases it */
    float *data;
} out_slot;

/* Reference-counted, because zmq may release a buffer after the stage is gone (a
 * message still lingering in a closed socket). */
struct out_pool {
    atomic_int refs;         /* the stage's, plus one per buffer zmq holds */
    size_t floats;           /* capacity of each buffer */
    int n;
    out_slot slots[];
};

static void pool_unref(out_pool *p) {
    if (!p || atomic_fetch_sub(&p->refs, 1) != 1)
        return;
    for (int i = 0; i < p->n; i++)
        free(p->slots[i].data);
    free(p);
}

static out_pool *pool_new(int n, size_t floats) {
    out_pool *p = calloc(1, sizeof *p + (size_t)n * sizeof p->slots[0]);
    if (!p)
        return NULL;
    atomic_init(&p->refs, 1);
    p->floats = floats;
    p->n = n;
    for (int i = 0; i < n; i++) {
        p->slots[i].pool = p;
        atomic_init(&p->slots[i].busy, false);
        p->slots[i].data = malloc(floats * sizeof(float));
        if (!p->slots[i].data) {
            pool_unref(p);
            return NULL;
        }
    }
    return p;
}

/* A free buffer of at least floats, or NULL. Worker thread only. */
static out_slot *pool_take(out_pool *p, size_t floats) {
    if (floats > p->floats)
        return NULL;
    for (int i = 0; i < p->n; i++)
        if (!atomic_exchange(&p->slots[i].busy, true)) {
            atomic_fetch_add(&p->refs, 1);
            return &p->slots[i];
        }
    return NULL;
}

/* zmq's free_fn for a pooled buffer: any thread. */
static void pool_release(void *data, void *hint) {
    (void)data;
    out_slot *s = hint;
    out_pool *p = s->pool;
    atomic_store(&s->busy, false);
    pool_unref(p);
}

static void free_buf(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* ------------------------------------------------------------------ the stage */

struct cpm_stage {
    cpm_worker *w;
    cpm_sock *out;           /* to the next hop; NULL on a TP rank > 0 */
    cpm_stage_opts opts;
    char name[64], model_dir[1024], model_name[256];
    cpm_stage_ready_cb ready_cb;
    void *user;

    /* worker-owned while a job runs; sized at load, grown only by oversize batches */
    cpm_model *model;
    cpm_kv_cache *kv;
    const cpm_model_info *info;
    seq_entry *seqs;
    int n_seqs;
    uint64_t router_epoch; /* of the router whose sequences these are (0: none yet) */
    int32_t *b_pos;           /* [max_batch_tokens] per-chunk scratch */
    uint8_t *b_want;
    int32_t *handles;         /* [rows_cap] KV handle of every row */
    uint64_t *res_seq;        /* [rows_cap] the last stage's result rows */
    uint32_t *res_pos;
    size_t rows_cap;
    float *in_copy;           /* [rows_cap, hidden] an activation frame zmq left misaligned */
    out_pool *pool;
    void *zctx;
    cpm_expert_peer *peers;   /* [opts.n_experts], endpoints in peer_eps */
    char (*peer_eps)[256];
    cpm_expert_client *experts;
    /* tensor parallelism (worker-owned after load): endpoints copied from opts */
    char tp_mesh_eps[CPM_TP_MAX][256], tp_peer_eps[CPM_TP_MAX][256];
    cpm_tp_mesh *mesh;
    cpm_tp_fanout *fanout;    /* rank 0: to ranks 1..T-1 */
    uint64_t tp_seq;          /* rank 0: the last micro-batch's tag (see connect_tp) */
    /* loading: weights paged in (written by the loading thread, read by health) */
    atomic_size_t paged_bytes, page_bytes;
    char load_status[96];

    /* the running job's counts, folded into stats at its hand-over */
    double job_compute_s;
    int job_rows;
    int job_allocs;
    bool job_realigned;

    /* loop-owned */
    bool closing;
    cpm_stage_stats stats;    /* the counts of jobs are the worker's (cpm_stage_get_stats) */
    Cpm__V1__ModelInfo health_model; /* what the last health reply pointed at */
    int32_t health_eos[CPM_MAX_EOS];
    Cpm__V1__SamplingDefaults health_defaults;
};

cpm_stage_opts cpm_stage_opts_default(void) {
    return (cpm_stage_opts){
        .layer_begin = 0,
        .layer_end = -1,
        .threads = 1,
        .kv_tokens = 16384,
        .max_seqs = 64,
        .max_batch_tokens = 512,
        .max_queue = 256,
        .out_buffers = 4,
        .name = "stage",
        .expert_timeout_ms = 30000,
        .tp_rank = 0,
        .tp_size = 1,
    };
}

/* ------------------------------------------------------------------ sequence map (worker) */

static int seq_find(const cpm_stage *st, uint64_t id) {
    for (int i = 0; i < st->n_seqs; i++)
        if (st->seqs[i].id == id)
            return i;
    return -1;
}

static void seq_drop(cpm_stage *st, int i) {
    cpm_kv_cache_seq_free(st->kv, st->seqs[i].handle);
    st->seqs[i] = st->seqs[--st->n_seqs];
}

static void seq_release(cpm_stage *st, uint64_t id) {
    int i = seq_find(st, id);
    if (i >= 0) /* else released twice, or never reached this stage: nothing to do */
        seq_drop(st, i);
}

static bool listed(const uint64_t *ids, size_t n, uint64_t id) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] == id)
            return true;
    return false;
}

/* Frees what no live request owns (proto: StageForward.router_epoch, live): every
 * sequence of an earlier router incarnation, and each of this router's that it no
 * longer lists (its releases died with a stage before this one). Micro-batches reach
 * a stage in the order the router sent them, so a sequence started after the list was
 * made has an id above its horizon and is kept. */
static void collect_garbage(cpm_stage *st, const Cpm__V1__StageForward *f) {
    if (f->router_epoch && f->router_epoch != st->router_epoch) {
        while (st->n_seqs > 0)
            seq_drop(st, st->n_seqs - 1);
        st->router_epoch = f->router_epoch;
    }
    for (int i = 0; f->live_horizon && i < st->n_seqs;) {
        uint64_t id = st->seqs[i].id;
        if (id <= f->live_horizon && !listed(f->live, f->n_live, id))
            seq_drop(st, i);
        else
            i++;
    }
}

/* The KV handle of router sequence id, created when the sequence starts at position 0. */
static int seq_handle(cpm_stage *st, uint64_t id, uint32_t pos, cpm_error *err) {
    int i = seq_find(st, id);
    if (i >= 0)
        return st->seqs[i].handle;
    if (pos != 0)
        return cpm_error_set(err, CPM_ENOTFOUND, "seq %llu: unknown here, and position %u is not 0",
                             (unsigned long long)id, pos);
    if (st->n_seqs >= st->opts.max_seqs)
        return cpm_error_set(err, CPM_ELIMIT, "seq %llu: %d sequences already live",
                             (unsigned long long)id, st->n_seqs);
    int h = cpm_kv_cache_seq_new(st->kv, err);
    if (h < 0)
        return h;
    st->seqs[st->n_seqs++] = (seq_entry){.id = id, .handle = h};
    return h;
}

/* ------------------------------------------------------------------ the forward job (worker) */

static int check_input(const cpm_stage *st, const Cpm__V1__StageForward *f, const cpm_inmsg *m,
                       cpm_error *err) {
    size_t n = f->n_seq;
    if (!n)
        return 0;
    if (st->info->first_stage) {
        if (f->n_ids != n)
            return cpm_error_set(err, CPM_EFORMAT, "first stage needs one id per row (%zu ids, %zu rows)",
                                 f->n_ids, n);
        for (size_t i = 0; i < n; i++)
            if (f->ids[i] < 0 || f->ids[i] >= st->info->vocab_size)
                return cpm_error_set(err, CPM_ERANGE, "row %zu: id %d outside vocab %d", i, f->ids[i],
                                     st->info->vocab_size);
        return 0;
    }
    if (!f->hidden || !m->tensor)
        return cpm_error_set(err, CPM_EFORMAT, "stage %d..%d needs an activation frame",
                             st->info->layer_begin, st->info->layer_end);
    if (f->hidden->dtype != CPM__V1__DTYPE__DTYPE_F32 || f->hidden->shape[1] != (uint32_t)st->info->hidden_size)
        return cpm_error_set(err, CPM_ESHAPE, "activations must be F32 [%zu, %d]", n,
                             st->info->hidden_size);
    return 0;
}

/* Maps every row to its KV handle and checks positions continue each cache (a sequence's
 * first row in the batch may rewind it: re-prefill after a failure). */
static int map_rows(cpm_stage *st, const Cpm__V1__StageForward *f, int32_t *ret_handles,
                    cpm_error *err) {
    for (size_t i = 0; i < f->n_seq; i++) {
        int h = seq_handle(st, f->seq[i], f->pos[i], err);
        if (h < 0)
            return h;
        ret_handles[i] = h;
        bool first_in_batch = true;
        for (size_t j = i; j-- > 0;)
            if (f->seq[j] == f->seq[i]) {
                first_in_batch = false;
                if (f->pos[i] != f->pos[j] + 1)
                    return cpm_error_set(err, CPM_EINVAL, "seq %llu: position %u after %u in one batch",
                                         (unsigned long long)f->seq[i], f->pos[i], f->pos[j]);
                break;
            }
        if (!first_in_batch)
            continue;
        int len = cpm_kv_cache_seq_len(st->kv, h);
        if ((int)f->pos[i] > len)
            return cpm_error_set(err, CPM_EINVAL, "seq %llu: position %u but %d tokens are cached",
                                 (unsigned long long)f->seq[i], f->pos[i], len);
        if ((int)f->pos[i] < len && cpm_kv_cache_seq_truncate(st->kv, h, (int)f->pos[i]))
            return cpm_error_set(err, CPM_ELIMIT, "seq %llu: no KV block left to rewind into",
                                 (unsigned long long)f->seq[i]);
    }
    return 0;
}

/* New sequences that start from cached prefix blocks (proto: StageForward.attach). */
static int attach_prefixes(cpm_stage *st, const Cpm__V1__StageForward *f, cpm_error *err) {
    for (size_t i = 0; i < f->n_attach; i++) {
        const Cpm__V1__SeqBlocks *a = f->attach[i];
        if (seq_find(st, a->seq) >= 0 || a->first_block != 0)
            return cpm_error_set(err, CPM_EINVAL, "seq %llu: a prefix attaches only to a new "
                                 "sequence, from block 0", (unsigned long long)a->seq);
        int h = seq_handle(st, a->seq, 0, err);
        if (h < 0)
            return h;
        int rc = cpm_kv_cache_seq_attach(st->kv, h, a->hash, (int)a->n_hash, err);
        if (rc) {
            seq_release(st, a->seq);
            return cpm_error_prefix(err, "seq %llu", (unsigned long long)a->seq);
        }
    }
    return 0;
}

/* Full blocks the rows completed, kept for later prompts (StageForward.publish). */
static void publish_blocks(cpm_stage *st, const Cpm__V1__StageForward *f) {
    for (size_t i = 0; i < f->n_publish; i++) {
        const Cpm__V1__SeqBlocks *p = f->publish[i];
        int k = seq_find(st, p->seq);
        if (k >= 0)
            cpm_kv_cache_seq_publish(st->kv, st->seqs[k].handle, (int)p->first_block, p->hash,
                                     (int)p->n_hash);
    }
}

/* Makes the row scratch hold n rows. Sized at load for max_batch_tokens; only a caller
 * sending a bigger micro-batch than the limit makes it grow (once per new size). */
static int rows_reserve(cpm_stage *st, size_t n, cpm_error *err) {
    if (n <= st->rows_cap)
        return 0;
    int32_t *h = realloc(st->handles, n * sizeof *h);
    if (h)
        st->handles = h;
    uint64_t *sq = h ? realloc(st->res_seq, n * sizeof *sq) : NULL;
    if (sq)
        st->res_seq = sq;
    uint32_t *ps = sq ? realloc(st->res_pos, n * sizeof *ps) : NULL;
    if (ps)
        st->res_pos = ps;
    float *in = ps && !st->info->first_stage
                    ? realloc(st->in_copy, n * (size_t)st->info->hidden_size * sizeof *in)
                    : NULL;
    if (in)
        st->in_copy = in;
    if (!ps || (!in && !st->info->first_stage))
        return cpm_error_set(err, CPM_ENOMEM, "batch of %zu rows", n);
    st->rows_cap = n;
    st->job_allocs++;
    return 0;
}

/* The output tensor of this job: a pooled buffer, else a one-off one (counted). */
static float *out_take(cpm_stage *st, size_t floats, cpm_payload *ret) {
    out_slot *slot = pool_take(st->pool, floats);
    if (slot) {
        *ret = (cpm_payload){.data = slot->data, .free_fn = pool_release, .hint = slot};
        return slot->data;
    }
    float *out = malloc((floats ? floats : 1) * sizeof *out);
    st->job_allocs++;
    *ret = (cpm_payload){.data = out, .free_fn = free_buf};
    return out;
}

/* A TP rank > 0 runs the forward for its share of the all-reduces only. */
static bool tp_follower(const cpm_stage *st) {
    return st->opts.tp_size > 1 && st->opts.tp_rank > 0;
}

/* Runs the rows in chunks of max_batch_tokens; out gets [n, hidden] or [n_want, vocab]. */
static int run_chunks(cpm_stage *st, const Cpm__V1__StageForward *f, const float *hidden,
                      float *out, cpm_error *err) {
    int n = (int)f->n_seq, mb = st->info->max_batch_tokens;
    if (mb <= 0 || mb > st->opts.max_batch_tokens)
        mb = st->opts.max_batch_tokens;
    size_t out_row = st->info->last_stage ? (size_t)st->info->vocab_size : (size_t)st->info->hidden_size;
    size_t done_out = 0;
    for (int start = 0; start < n; start += mb) {
        int c = n - start < mb ? n - start : mb;
        int wanted = 0;
        for (int i = 0; i < c; i++) {
            st->b_pos[i] = (int32_t)f->pos[start + i];
            st->b_want[i] = f->n_want ? (uint8_t)(f->want[start + i] != 0) : 1;
            if (tp_follower(st))
                st->b_want[i] = 0; /* lm_head runs on rank 0 only: the others' logits go nowhere */
            wanted += st->b_want[i];
        }
        cpm_batch b = {
            .n_tokens = c,
            .ids = f->n_ids ? f->ids + start : NULL,
            .hidden = hidden ? hidden + (size_t)start * (size_t)st->info->hidden_size : NULL,
            .seq = st->handles + start,
            .pos = st->b_pos,
            .want = st->b_want,
        };
        int rc = cpm_model_forward(st->model, st->kv, &b, out + done_out * out_row, err);
        if (rc)
            return rc;
        done_out += st->info->last_stage ? (size_t)wanted : (size_t)c;
    }
    return 0;
}

static void fill_desc(Cpm__V1__TensorDesc *d, uint32_t *shape, uint32_t rows, uint32_t cols) {
    cpm__v1__tensor_desc__init(d);
    d->dtype = CPM__V1__DTYPE__DTYPE_F32;
    shape[0] = rows;
    shape[1] = cols;
    d->n_shape = 2;
    d->shape = shape;
}

/* Packs the downstream envelope of a successful forward: the next stage's forward with
 * the activations, or the router's result with the logits of the wanted rows. */
static int pack_output(cpm_stage *st, const Cpm__V1__StageForward *f, size_t n_out, double compute_s,
                       cpm_reply *out, cpm_error *err) {
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    Cpm__V1__TensorDesc d;
    uint32_t shape[2];
    if (!st->info->last_stage) {
        Cpm__V1__StageForward nf = *f; /* same rows, positions, wants and releases */
        nf.n_ids = 0;
        nf.ids = NULL;
        nf.hidden = NULL;
        nf.compute_s = f->compute_s + compute_s;
        if (n_out) {
            fill_desc(&d, shape, (uint32_t)n_out, (uint32_t)st->info->hidden_size);
            nf.hidden = &d;
        }
        env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
        env.forward = &nf;
        return cpm_wire_pack(&env, &out->env_buf, &out->env_size, err);
    }
    size_t k = 0;
    for (size_t i = 0; i < f->n_seq; i++)
        if (!f->n_want || f->want[i]) {
            st->res_seq[k] = f->seq[i];
            st->res_pos[k++] = f->pos[i];
        }
    Cpm__V1__StageResult r = CPM__V1__STAGE_RESULT__INIT;
    r.step = f->step;
    r.n_seq = r.n_pos = n_out;
    r.seq = st->res_seq;
    r.pos = st->res_pos;
    r.compute_s = f->compute_s + compute_s;
    if (n_out) {
        fill_desc(&d, shape, (uint32_t)n_out, (uint32_t)st->info->vocab_size);
        r.logits = &d;
    }
    env.body_case = CPM__V1__ENVELOPE__BODY_RESULT;
    env.result = &r;
    return cpm_wire_pack(&env, &out->env_buf, &out->env_size, err);
}

static int do_forward(cpm_stage *st, const Cpm__V1__StageForward *f, const cpm_inmsg *m,
                      cpm_reply *reply, cpm_error *err) {
    collect_garbage(st, f);
    for (size_t i = 0; i < f->n_release; i++)
        seq_release(st, f->release[i]);
    int rc = check_input(st, f, m, err);
    if (rc)
        return rc;
    size_t n = f->n_seq, n_out = 0;
    for (size_t i = 0; i < n; i++)
        n_out += !f->n_want || f->want[i];
    if (!st->info->last_stage)
        n_out = n;
    if ((rc = attach_prefixes(st, f, err)) || (rc = rows_reserve(st, n, err)) ||
        (rc = map_rows(st, f, st->handles, err)))
        return rc;
    size_t row = st->info->last_stage ? (size_t)st->info->vocab_size : (size_t)st->info->hidden_size;
    cpm_payload t;
    float *out = n_out ? out_take(st, n_out * row, &t) : NULL;
    if (n_out && !out)
        return cpm_error_set(err, CPM_ENOMEM, "output of %zu rows", n_out);
    /* The transport aligns every tensor frame it receives (take_tensor in
     * services/common/transport.c); this guard covers frames handed to the stage
     * by any other path, since the engine reads floats. */
    const float *hidden = m->tensor;
    if (hidden && (uintptr_t)hidden % _Alignof(float)) {
        memcpy(st->in_copy, hidden, n * (size_t)st->info->hidden_size * sizeof(float));
        hidden = st->in_copy;
        st->job_realigned = true;
    }
    uint64_t t0 = uv_hrtime();
    if (n)
        rc = run_chunks(st, f, hidden, out, err);
    double dt = (double)(uv_hrtime() - t0) / 1e9;
    if (!rc)
        publish_blocks(st, f);
    if (!rc && tp_follower(st)) { /* rank 0 sends the output; ours is the same */
        if (out)
            t.free_fn(t.data, t.hint);
        st->job_compute_s = dt;
        st->job_rows = (int)n;
        return 0;
    }
    if (!rc)
        rc = pack_output(st, f, n_out, dt, reply, err);
    if (rc) {
        if (out)
            t.free_fn(t.data, t.hint);
        return rc;
    }
    st->job_compute_s = dt;
    st->job_rows = (int)n;
    if (out) {
        t.size = n_out * row * sizeof(float);
        reply->tensor = t;
        reply->has_tensor = true;
    }
    return 0;
}

/* A failed forward still yields exactly one message downstream: the result with the error. */
static void pack_error(cpm_stage *st, uint64_t step, cpm_reply *out, const cpm_error *e) {
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = e->code ? e->code : CPM_EINTERNAL;
    er.message = (char *)e->msg;
    er.service = st->name;
    Cpm__V1__StageResult r = CPM__V1__STAGE_RESULT__INIT;
    r.step = step;
    r.error = &er;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_RESULT;
    env.result = &r;
    cpm_wire_pack(&env, &out->env_buf, &out->env_size, NULL);
}

static int stage_run(void *user, const cpm_inmsg *m, cpm_reply *out, cpm_error *err) {
    cpm_stage *st = user;
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_RESULT) {
        /* An upstream stage's failure: pass it on in order with the forwards. */
        cpm_wire_pack(m->env, &out->env_buf, &out->env_size, NULL);
        return 0;
    }
    if (m->env->body_case == CPM__V1__ENVELOPE__BODY_TP_FORWARD) { /* a rank > 0: no output */
        cpm_tp_mesh_begin(st->mesh, m->env->tp_forward->seq);
        int rc = do_forward(st, m->env->tp_forward->forward, m, out, err);
        if (rc) /* e.g. a restarted rank handed sequences it never saw */
            cpm_tp_mesh_abort(st->mesh, err);
        return rc;
    }
    const Cpm__V1__StageForward *f = m->env->forward;
    int rc = 0;
    if (st->fanout) { /* rank 0 of a TP stage: every rank runs the same micro-batch */
        rc = cpm_tp_fanout_send(st->fanout, ++st->tp_seq, f, m->tensor, m->tensor_size, err);
        cpm_tp_mesh_begin(st->mesh, st->tp_seq);
    }
    if (rc || (rc = do_forward(st, f, m, out, err))) { /* the Error's service field names this stage */
        if (st->mesh)
            cpm_tp_mesh_abort(st->mesh, err);
        pack_error(st, f->step, out, err);
    }
    return rc;
}

/* ------------------------------------------------------------------ loop side */

static void stage_release(void *user) {
    cpm_stage *st = user;
    cpm_kv_cache_free(st->kv);
    cpm_model_free(st->model);
    free(st->seqs);
    free(st->b_pos);
    free(st->b_want);
    free(st->handles);
    free(st->res_seq);
    free(st->res_pos);
    free(st->in_copy);
    cpm_expert_client_free(st->experts); /* no job runs: the sockets are free to close */
    cpm_tp_mesh_free(st->mesh);
    cpm_tp_fanout_free(st->fanout);
    free(st->peers);
    free(st->peer_eps);
    pool_unref(st->pool); /* zmq may still hold buffers: the last release frees them */
    free(st);
}

static void stage_done(void *user, const cpm_inmsg *in, int rc) {
    (void)in;
    (void)rc;
    cpm_stage *st = user;
    st->stats.rows += (unsigned long long)st->job_rows;
    st->stats.compute_s += st->job_compute_s;
    st->stats.out_allocs += (unsigned long long)st->job_allocs;
    st->stats.realigned += st->job_realigned;
    st->job_allocs = 0;
    st->job_realigned = false;
    st->job_rows = 0;
    st->job_compute_s = 0;
    /* No job runs now, so the worker-owned state may be read. */
    st->stats.live_seqs = st->n_seqs;
    cpm_kv_cache_usage(st->kv, &st->stats.kv_used, &st->stats.kv_total);
    if (st->mesh)
        st->stats.tp_allreduce_us = cpm_tp_mesh_mean_us(st->mesh, &st->stats.tp_allreduces);
}

/* Refuses a forward without queueing it: the error still travels to the router. */
static bool stage_refuse(void *user, const cpm_inmsg *m, int code, const char *why) {
    cpm_stage *st = user;
    if (!st->out) /* a TP rank > 0: the Error goes back to rank 0, which fails the micro-batch */
        return false;
    uint64_t step = m->env->body_case == CPM__V1__ENVELOPE__BODY_FORWARD ? m->env->forward->step : 0;
    Cpm__V1__Error er = CPM__V1__ERROR__INIT;
    er.code = code;
    er.message = (char *)why;
    er.service = st->name;
    Cpm__V1__StageResult r = CPM__V1__STAGE_RESULT__INIT;
    r.step = step;
    r.error = &er;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_RESULT;
    env.result = &r;
    cpm_sock_send(st->out, NULL, &env, NULL, NULL);
    return true;
}

/* The layers, the cache and the model a ready stage serves. */
static void stage_health(void *user, Cpm__V1__Health *h) {
    cpm_stage *st = user;
    size_t total = atomic_load(&st->page_bytes);
    if (!h->ready && !st->stats.ready && total && !strcmp(h->status, "loading")) {
        size_t done = atomic_load(&st->paged_bytes);
        snprintf(st->load_status, sizeof st->load_status, "loading: weights paged in %.0f of %.0f MiB "
                 "(%.0f %%)", (double)done / 1048576.0, (double)total / 1048576.0, 100.0 * (double)done / (double)total);
        h->status = st->load_status;
    }
    if (!h->ready)
        return;
    const cpm_model_info *in = st->info;
    Cpm__V1__ModelInfo *mi = &st->health_model;
    cpm__v1__model_info__init(mi);
    h->layer_begin = (uint32_t)in->layer_begin;
    h->layer_end = (uint32_t)in->layer_end;
    h->kv_used = (uint32_t)st->stats.kv_used;
    h->kv_total = (uint32_t)st->stats.kv_total;
    h->live_seqs = (uint32_t)st->stats.live_seqs;
    mi->arch = (char *)in->arch;
    mi->variant = (char *)in->variant;
    mi->vocab_size = (uint32_t)in->vocab_size;
    mi->hidden_size = (uint32_t)in->hidden_size;
    mi->n_layers = (uint32_t)in->n_layers;
    mi->max_position = (uint32_t)in->max_position;
    mi->bos_id = in->bos_id;
    for (int i = 0; i < in->n_eos && i < CPM_MAX_EOS; i++)
        st->health_eos[i] = in->eos_ids[i];
    mi->n_eos_ids = (size_t)in->n_eos;
    mi->eos_ids = st->health_eos;
    mi->name = st->model_name;
    Cpm__V1__SamplingDefaults *d = &st->health_defaults;
    cpm__v1__sampling_defaults__init(d);
    d->temperature_set = in->gen.has_temperature, d->temperature = in->gen.temperature;
    d->top_p_set = in->gen.has_top_p, d->top_p = in->gen.top_p;
    d->top_k_set = in->gen.has_top_k, d->top_k = (uint32_t)in->gen.top_k;
    d->repetition_penalty_set = in->gen.has_repetition_penalty;
    d->repetition_penalty = in->gen.repetition_penalty;
    mi->defaults = d;
    h->model = mi;
}

/* Micro-batches for this stage's role are jobs; anything else gets an error. */
static bool stage_admit(void *user, cpm_sock *s, const cpm_inmsg *m) {
    cpm_stage *st = user;
    int body = m->env->body_case;
    bool batch = body == CPM__V1__ENVELOPE__BODY_FORWARD || body == CPM__V1__ENVELOPE__BODY_RESULT ||
                 body == CPM__V1__ENVELOPE__BODY_TP_FORWARD;
    if (batch && tp_follower(st) == (body == CPM__V1__ENVELOPE__BODY_TP_FORWARD))
        return true;
    cpm_sock_send_error(s, &m->peer, m->env->corr, CPM_EUNSUPPORTED,
                        batch && tp_follower(st) ? "a tensor-parallel rank > 0 takes tp_forward "
                        "(from its rank 0) and health_request"
                        : "a stage takes forward and health_request", NULL);
    return false;
}

static void on_out(cpm_sock *s, cpm_inmsg *m, void *user) {
    (void)s;
    (void)user;
    cpm_inmsg_free(m); /* the next hop never answers; drop anything it sends */
}

/* ------------------------------------------------------------------ loading */

/* Everything a step needs, sized from the limits (see the top of the file). */
static int alloc_scratch(cpm_stage *st, cpm_error *err) {
    size_t mb = (size_t)st->opts.max_batch_tokens;
    st->seqs = calloc((size_t)st->opts.max_seqs, sizeof *st->seqs);
    st->b_pos = calloc(mb, sizeof *st->b_pos);
    st->b_want = calloc(mb, sizeof *st->b_want);
    if (!st->seqs || !st->b_pos || !st->b_want || rows_reserve(st, mb, err))
        return cpm_error_set(err, CPM_ENOMEM, "stage buffers");
    /* The router wants at most one row per sequence of a micro-batch from the last stage. */
    size_t rows = mb, cols = (size_t)st->info->hidden_size;
    if (st->info->last_stage) {
        rows = mb < (size_t)st->opts.max_seqs ? mb : (size_t)st->opts.max_seqs;
        cols = (size_t)st->info->vocab_size;
    }
    st->pool = pool_new(st->opts.out_buffers, rows * cols);
    if (!st->pool)
        return cpm_error_set(err, CPM_ENOMEM, "%d output buffers of %zu x %zu floats", st->opts.out_buffers,
                             rows, cols);
    st->job_allocs = 0; /* the first reservation is not a step's */
    return 0;
}

/* Expert parallelism: one DEALER per expert service, installed as the model's backend.
 * Made on the worker, used only by jobs (see expert_client.h on threads). */
static int connect_experts(cpm_stage *st, cpm_error *err) {
    int n = st->opts.n_experts, E = st->info->n_experts;
    if (E == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s is a %s model: expert services have nothing to run",
                             st->model_dir, st->info->variant);
    if (st->peers[n - 1].end < 0)
        st->peers[n - 1].end = E;
    if (st->peers[n - 1].end != E)
        return cpm_error_set(err, CPM_ERANGE, "expert services cover experts 0..%d of %d",
                             st->peers[n - 1].end - 1, E);
    int rc = cpm_expert_client_new(st->zctx, st->opts.curve, st->peers, n, st->info->hidden_size,
                                   st->opts.expert_timeout_ms, &st->experts, err);
    if (rc)
        return rc;
    cpm_expert_backend b = cpm_expert_client_backend(st->experts);
    cpm_model_set_expert_backend(st->model, &b);
    return 0;
}

/* Tensor parallelism: the all-reduce mesh (every rank) and the fan-out (rank 0). Made
 * on the worker, used only by jobs, like the expert client. */
static int connect_tp(cpm_stage *st, cpm_error *err) {
    const char *mesh[CPM_TP_MAX], *peers[CPM_TP_MAX];
    for (int r = 0; r < st->opts.tp_size; r++) {
        mesh[r] = st->tp_mesh_eps[r];
        peers[r] = st->tp_peer_eps[r];
    }
    int rc = cpm_tp_mesh_new(st->zctx, st->opts.curve, st->opts.tp_rank, st->opts.tp_size, mesh,
                             st->info->hidden_size, st->info->max_batch_tokens,
                             st->opts.expert_timeout_ms, &st->mesh, err);
    /* Tags start at this life's start time in microseconds, so a restarted rank 0's tags
     * come after every tag of its previous life: a partial of that life still queued at
     * a peer is older, hence dropped, and can never be summed into a new micro-batch
     * (the epoch, without another field; a micro-batch takes far more than 1 us). */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    st->tp_seq = (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
    if (rc == 0 && st->opts.tp_rank == 0)
        rc = cpm_tp_fanout_new(st->zctx, st->opts.curve, peers, st->opts.tp_size - 1, st->opts.expert_timeout_ms,
                               &st->fanout, err);
    if (rc)
        return rc;
    if (st->fanout) /* a rank that refuses a forward fails the micro-batch at once */
        cpm_tp_mesh_watch_refusals(st->mesh, st->fanout);
    cpm_allreduce_backend b = cpm_tp_mesh_backend(st->mesh);
    cpm_model_set_allreduce_backend(st->model, &b);
    return 0;
}

static void on_paged(void *ud, size_t done, size_t total) {
    cpm_stage *st = ud;
    atomic_store(&st->page_bytes, total);
    atomic_store(&st->paged_bytes, done);
    if (st->opts.load_progress)
        st->opts.load_progress(st->opts.load_progress_ud, done, total);
}

static int stage_load(void *user, cpm_error *err) {
    cpm_stage *st = user;
    cpm_model_opts mo = cpm_model_opts_default();
    mo.layer_begin = st->opts.layer_begin;
    mo.layer_end = st->opts.layer_end;
    mo.n_threads = st->opts.threads;
    mo.max_batch_tokens = st->opts.max_batch_tokens;
    mo.act_bf16 = st->opts.act_bf16;
    mo.act_int8 = st->opts.act_int8;
    mo.ffn_dense = st->opts.ffn_dense;
    mo.lm_head_int8 = st->opts.lm_head_int8;
    mo.map_weights = st->opts.map_weights;
    if (st->opts.n_experts) /* the experts run in the expert services: bind none here */
        mo.expert_begin = mo.expert_end = 0;
    mo.tp_rank = st->opts.tp_rank;
    mo.tp_size = st->opts.tp_size;
    int rc = cpm_model_load(st->model_dir, &mo, &st->model, err);
    if (!rc) {
        st->info = cpm_model_get_info(st->model);
        if (st->opts.n_experts)
            rc = connect_experts(st, err);
    }
    if (!rc && st->opts.tp_size > 1)
        rc = connect_tp(st, err);
    if (!rc) {
        cpm_kv_geometry geo = cpm_model_kv_geometry(st->model);
        geo.dtype = st->opts.kv_dtype;
        st->kv = cpm_kv_cache_new(&geo, st->opts.kv_tokens, st->opts.max_seqs, err);
        if (!st->kv)
            rc = err->code ? err->code : CPM_ENOMEM;
    }
    if (!rc)
        rc = alloc_scratch(st, err);
    if (!rc) /* ready means the first request does not wait for the disk */
        cpm_model_page_in(st->model, on_paged, st);
    return rc;
}

static void stage_loaded(void *user, int rc, const cpm_error *err) {
    cpm_stage *st = user;
    st->stats.ready = rc == 0;
    if (st->stats.ready)
        cpm_kv_cache_usage(st->kv, &st->stats.kv_used, &st->stats.kv_total);
    if (st->ready_cb)
        st->ready_cb(st, rc, err, st->user);
}

static const cpm_worker_ops stage_ops = {.load = stage_load, .loaded = stage_loaded,
    .admit = stage_admit, .run = stage_run, .done = stage_done, .refuse = stage_refuse,
    .health = stage_health, .release = stage_release};

/* The expert services' list outlives the caller's: copied with its endpoints. */
static int copy_peers(cpm_stage *st, const cpm_stage_opts *opts) {
    int n = opts->n_experts;
    st->peers = calloc((size_t)n, sizeof *st->peers);
    st->peer_eps = calloc((size_t)n, sizeof *st->peer_eps);
    if (!st->peers || !st->peer_eps) {
        free(st->peers);
        free(st->peer_eps);
        return CPM_ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        snprintf(st->peer_eps[i], sizeof st->peer_eps[i], "%s", opts->experts[i].endpoint);
        st->peers[i] = opts->experts[i];
        st->peers[i].endpoint = st->peer_eps[i];
        st->peers[i].name = NULL; /* named expert<i> in messages, as in the cluster file */
    }
    st->opts.experts = st->peers;
    return 0;
}

int cpm_stage_new(uv_loop_t *loop, void *zctx, const cpm_stage_opts *opts, cpm_stage_ready_cb cb,
                  void *user, cpm_stage **ret, cpm_error *err) {
    *ret = NULL;
    bool follower = opts->tp_size > 1 && opts->tp_rank > 0;
    if (!opts->model_dir || !opts->bind || (!opts->next && !follower))
        return cpm_error_set(err, CPM_EINVAL, "stage: model_dir, bind and next are required");
    if (opts->tp_size < 1 || opts->tp_size > CPM_TP_MAX || opts->tp_rank < 0 ||
        opts->tp_rank >= opts->tp_size)
        return cpm_error_set(err, CPM_EINVAL, "stage: tensor parallel rank %d of %d (at most %d "
                             "ranks)", opts->tp_rank, opts->tp_size, CPM_TP_MAX);
    if (opts->tp_size > 1 && (!opts->tp_mesh || (!follower && !opts->tp_peers)))
        return cpm_error_set(err, CPM_EINVAL, "stage: tensor parallelism needs the mesh endpoints%s",
                             follower ? "" : " and the other ranks' endpoints");
    if (opts->max_seqs < 1 || opts->max_batch_tokens < 1 || opts->max_queue < 1 || opts->out_buffers < 1)
        return cpm_error_set(err, CPM_EINVAL,
                             "stage: max_seqs, max_batch_tokens, max_queue and out_buffers must be >= 1");
    cpm_stage *st = calloc(1, sizeof *st);
    if (!st)
        return cpm_error_set(err, CPM_ENOMEM, "stage");
    st->opts = *opts;
    st->ready_cb = cb;
    st->user = user;
    st->zctx = zctx;
    if (opts->n_experts > 0 && copy_peers(st, opts)) {
        free(st);
        return cpm_error_set(err, CPM_ENOMEM, "stage: expert services");
    }
    for (int r = 0; opts->tp_size > 1 && r < opts->tp_size; r++) {
        snprintf(st->tp_mesh_eps[r], sizeof st->tp_mesh_eps[r], "%s", opts->tp_mesh[r]);
        if (!follower && r + 1 < opts->tp_size)
            snprintf(st->tp_peer_eps[r], sizeof st->tp_peer_eps[r], "%s", opts->tp_peers[r]);
    }
    st->opts.tp_mesh = st->opts.tp_peers = NULL; /* copied above */
    snprintf(st->name, sizeof st->name, "%s", opts->name ? opts->name : "stage");
    st->opts.name = st->name;
    snprintf(st->model_dir, sizeof st->model_dir, "%s", opts->model_dir);
    st->opts.model_dir = st->model_dir;
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", opts->model_dir);
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/')
        tmp[--n] = '\0';
    const char *slash = strrchr(tmp, '/');
    snprintf(st->model_name, sizeof st->model_name, "%s", slash ? slash + 1 : tmp);

    /* The next hop first: the worker starts loading as soon as it is made. */
    int rc = 0;
    cpm_sock_opts so = cpm_sock_opts_default();
    so.curve = opts->curve;
    if (!follower)
        rc = cpm_sock_new(loop, zctx, ZMQ_DEALER, &so, on_out, st, &st->out, err);
    if (!rc && !follower)
        rc = cpm_sock_connect(st->out, opts->next, err);
    cpm_worker_opts wo = {.service = "stage", .name = st->name, .full_msg = "stage queue full",
                          .max_running = 1, .max_queue = opts->max_queue, .pipeline = true,
                          .downstream = st->out, .ops = &stage_ops, .user = st, .sock = &so};
    if (!rc)
        rc = cpm_worker_new(loop, zctx, opts->bind, &wo, &st->w, err);
    if (rc) {
        cpm_sock_free(st->out);
        free(st->peers);
        free(st->peer_eps);
        free(st);
        return rc;
    }
    *ret = st;
    return 0;
}

void cpm_stage_get_stats(const cpm_stage *st, cpm_stage_stats *ret) {
    cpm_worker_stats w;
    cpm_worker_get_stats(st->w, &w);
    *ret = st->stats;
    ret->batches = w.served + w.failed;
    ret->failed = w.failed + w.refused + w.undelivered;
    ret->bad_messages = w.bad_messages;
    ret->queued = w.queued;
    ret->paged_bytes = atomic_load(&st->paged_bytes);
    ret->page_bytes = atomic_load(&st->page_bytes);
}

void cpm_stage_drain(cpm_stage *st) {
    cpm_worker_drain(st->w);
}

bool cpm_stage_busy(const cpm_stage *st) {
    return cpm_worker_busy(st->w);
}

void cpm_stage_free(cpm_stage *st) {
    if (!st || st->closing)
        return;
    st->closing = true;
    cpm_sock_free(st->out); /* the worker sends nothing once freed */
    st->out = NULL;
    cpm_worker_free(st->w); /* releases st once no job or load runs */
}
