/* pipeline.c - micro-batches out, results in, sampling calls, timeouts, failover. */
#include "pipeline.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

typedef struct replica {
    cpm_sched *sched;
    bool down; /* a service stopped answering health polls: no new work goes here */
    bool gc_due; /* its stages may hold sequences nobody owns: tell them the live set */
    uint64_t last_sent; /* ns of its last micro-batch */
} replica;

/* An idle replica gets a micro-batch with no rows, only the live set, this long after
 * its last one, so stages free what died with a request even when no traffic follows. */
#define GC_IDLE_NS 1000000000ull
/* A new prompt goes to the replica holding its longest cached prefix when that replica has
 * at most this many more sequences than the least loaded one. */
#define PREFIX_LOAD_SLACK 4

typedef struct step_time {
    uint64_t step, t;
    bool attach; /* it started sequences from cached prefix blocks */
} step_time;

struct cpm_pipeline {
    const cpm_config *cfg;
    cpm_jobs *jobs;
    const cpm_log *log;
    cpm_metrics *m;
    cpm_pipeline_io io;
    replica replicas[CPM_CFG_MAX_REPLICAS];
    int n_replicas;
    bool have_model, stopped;
    cpm_model_facts facts;
    step_time *steps; /* micro-batches in flight, with when they left */
    int n_steps;
    uint64_t epoch; /* this router's incarnation, in every micro-batch */
    uint64_t *live; /* scratch: one scheduler's sequence ids */
    int live_cap;
};

/* The logits of one step, shared by every send of them (a retry sends them again).
 * zmq drops its reference from its I/O thread, hence the atomic count. */
typedef struct shared_logits {
    atomic_int refs;
    cpm_payload src; /* the frame as received; src.free_fn releases it */
} shared_logits;

struct cpm_sample_call {
    cpm_pipeline *p;
    shared_logits *logits;
    Cpm__V1__TensorDesc desc;
    uint32_t shape[4];
    int attempts; /* sends so far */
    int n;
    uint64_t seqs[];
};

#define LOG(p, level, ...)                                            \
    do {                                                              \
        if ((p)->log)                                                 \
            cpm_log_write((p)->log, (level), NULL, __VA_ARGS__);      \
    } while (0)

static double secs(uint64_t ns) {
    return (double)ns / 1e9;
}

static replica *replica_of(cpm_pipeline *p, uint64_t id) {
    return &p->replicas[id % (uint64_t)p->n_replicas];
}

static cpm_sched *sched_of(cpm_pipeline *p, uint64_t id) {
    return replica_of(p, id)->sched;
}

static cpm_gen *owner_of(cpm_pipeline *p, uint64_t seq) {
    return cpm_sched_owner(sched_of(p, seq), seq);
}

/* ---- life ---------------------------------------------------------------------------- */

int cpm_pipeline_new(const cpm_config *cfg, int n_replicas, cpm_jobs *jobs, const cpm_log *log,
                     cpm_metrics *m, const cpm_pipeline_io *io, cpm_pipeline **ret,
                     cpm_error *err) {
    cpm_pipeline *p = calloc(1, sizeof *p);
    *ret = p;
    if (!p)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    if (n_replicas < 1 || n_replicas > CPM_CFG_MAX_REPLICAS) {
        free(p);
        *ret = NULL;
        return cpm_error_set(err, CPM_EINVAL, "router: %d pipeline replicas", n_replicas);
    }
    p->cfg = cfg;
    p->jobs = jobs;
    p->log = log;
    p->m = m;
    p->io = *io;
    p->n_replicas = n_replicas;
    p->epoch = (uv_hrtime() * 0x9E3779B97F4A7C15ull) ^ (uint64_t)(uintptr_t)p;
    p->epoch |= 1; /* never 0: that means "none given" */
    return 0;
}

void cpm_pipeline_free(cpm_pipeline *p) {
    if (!p)
        return;
    for (int i = 0; i < p->n_replicas; i++)
        cpm_sched_free(p->replicas[i].sched);
    free(p->steps);
    free(p->live);
    free(p);
}

void cpm_pipeline_stop(cpm_pipeline *p) {
    p->stopped = true;
}

/* The schedulers' limits: the router's, and the tightest stage of any replica. */
static cpm_sched_opts sched_opts(const cpm_config *c, int max_position) {
    cpm_sched_opts so = cpm_sched_opts_default();
    so.max_inflight = c->router.micro_batches > 0 ? c->router.micro_batches : 2;
    so.spread = 0;
    for (int i = 0; i < c->n_stages; i++) /* the depth of one replica */
        so.spread += c->stages[i].pipeline == 0;
    so.prefill_chunk = c->router.prefill_chunk > 0 ? c->router.prefill_chunk : 256;
    so.max_queue = c->router.max_queue >= 0 ? c->router.max_queue : 256;
    so.max_seqs = c->router.max_seqs > 0 ? c->router.max_seqs : 64;
    so.max_context = max_position;
    so.kv_tokens = 0;
    bool prefix = strcmp(c->router.prefix_cache, "on") == 0;
    so.max_batch_tokens = 1 << 30;
    for (int i = 0; i < c->n_stages; i++) {
        const cpm_cfg_stage *st = &c->stages[i];
        if (st->max_batch_tokens > 0 && st->max_batch_tokens < so.max_batch_tokens)
            so.max_batch_tokens = st->max_batch_tokens;
        if (st->max_seqs > 0 && st->max_seqs < so.max_seqs)
            so.max_seqs = st->max_seqs;
        if (st->kv_tokens > 0 && (so.kv_tokens == 0 || st->kv_tokens < so.kv_tokens))
            so.kv_tokens = st->kv_tokens;
    }
    if (so.max_batch_tokens == 1 << 30)
        so.max_batch_tokens = 512;
    if (so.kv_tokens && so.kv_tokens < so.max_context)
        so.max_context = so.kv_tokens; /* one sequence can never outgrow one stage's cache */
    /* the directory lists about what the stages' caches can keep besides the blocks running
     * sequences hold (half of them: the stages evict on their own, and a listed block that is
     * gone costs a prefill) */
    so.prefix_blocks = !prefix ? 0 : so.kv_tokens ? so.kv_tokens / 32 : 4096;
    return so;
}

int cpm_pipeline_set_model(cpm_pipeline *p, const Cpm__V1__ModelInfo *mi, const char *model_name) {
    if (p->have_model || p->stopped || !mi || mi->vocab_size == 0 || mi->max_position < 2)
        return 0;
    cpm_model_facts *f = &p->facts;
    f->vocab_size = (int)mi->vocab_size;
    const Cpm__V1__SamplingDefaults *d = mi->defaults;
    if (d) { /* a stage's own reading of the model: still checked, as any reply */
        f->temperature_set = d->temperature_set && d->temperature >= 0.0f && d->temperature <= 2.0f;
        f->top_p_set = d->top_p_set && d->top_p > 0.0f && d->top_p <= 1.0f;
        f->top_k_set = d->top_k_set && d->top_k <= (1u << 20);
        f->repetition_penalty_set = d->repetition_penalty_set && d->repetition_penalty > 0.0f &&
                                    d->repetition_penalty <= 10.0f;
        f->temperature = d->temperature, f->top_p = d->top_p, f->top_k = (int)d->top_k;
        f->repetition_penalty = d->repetition_penalty;
    }
    f->n_eos = 0;
    for (size_t i = 0; i < mi->n_eos_ids && f->n_eos < 8; i++)
        f->eos_ids[f->n_eos++] = mi->eos_ids[i];
    cpm_sched_opts so = sched_opts(p->cfg, (int)mi->max_position);
    f->max_position = so.max_context;
    free(p->steps);
    p->steps = calloc((size_t)(so.max_inflight * p->n_replicas), sizeof *p->steps);
    p->live_cap = so.max_seqs + so.max_queue + 1;
    p->live = calloc((size_t)p->live_cap, sizeof *p->live);
    if (!p->steps || !p->live)
        return CPM_ENOMEM;
    so.id_stride = p->n_replicas;
    for (int i = 0; i < p->n_replicas; i++) {
        cpm_error e = {0};
        so.id_offset = i;
        if (cpm_sched_new(&so, &p->replicas[i].sched, &e)) {
            LOG(p, CPM_LOG_ERROR, "scheduler: %s", e.msg);
            return CPM_ENOMEM;
        }
        /* The stages may hold a previous router's sequences: the first idle collection
         * tells them this router's epoch, and they free those. */
        p->replicas[i].gc_due = true;
    }
    p->have_model = true;
    LOG(p, CPM_LOG_INFO, "model %s: vocab %d, context %d; micro-batches %d x %d rows, %d sequences",
        model_name, f->vocab_size, f->max_position, so.max_inflight, so.max_batch_tokens,
        so.max_seqs);
    return 0;
}

const cpm_model_facts *cpm_pipeline_model(const cpm_pipeline *p) {
    return p->have_model ? &p->facts : NULL;
}

void cpm_pipeline_stats(const cpm_pipeline *p, cpm_sched_stats *ret) {
    *ret = (cpm_sched_stats){0};
    for (int i = 0; i < p->n_replicas && p->have_model; i++) {
        cpm_sched_stats st;
        cpm_sched_get_stats(p->replicas[i].sched, &st);
        ret->live += st.live;
        ret->queued += st.queued;
        ret->inflight += st.inflight;
        ret->kv_reserved += st.kv_reserved;
        ret->kv_tokens += st.kv_tokens;
        ret->steps += st.steps;
        ret->prefix_blocks_asked += st.prefix_blocks_asked;
        ret->prefix_blocks_reused += st.prefix_blocks_reused;
    }
}

/* ---- sequences in and out ----------------------------------------------------------------- */

/* The replica new work should go to: the least busy one that is up other than avoid;
 * with none up, the least busy of all when avoid is NULL (the work waits there, as
 * with a single pipeline), else NULL. */
static replica *pick_replica(cpm_pipeline *p, const replica *avoid) {
    replica *best = NULL, *any = NULL;
    int best_load = 0, any_load = 0;
    for (int i = 0; i < p->n_replicas; i++) {
        replica *r = &p->replicas[i];
        cpm_sched_stats st;
        cpm_sched_get_stats(r->sched, &st);
        int load = st.live + st.queued;
        if (r != avoid && !r->down && (!best || load < best_load))
            best = r, best_load = load;
        if (!any || load < any_load)
            any = r, any_load = load;
    }
    return best ? best : avoid ? NULL : any;
}

/* Where a new prompt goes: the replica whose directory lists the longest prefix of it, unless
 * its load exceeds the least loaded one's by more than the reuse is worth (a block saved is
 * CPM_PREFIX_BLOCK prompt rows; a queued sequence costs a whole request). */
static replica *pick_for_prompt(cpm_pipeline *p, const int32_t *prompt, int n) {
    replica *least = pick_replica(p, NULL), *best = least;
    if (p->n_replicas < 2)
        return least;
    cpm_sched_stats st;
    cpm_sched_get_stats(least->sched, &st);
    int least_load = st.live + st.queued, best_gain = 0;
    for (int i = 0; i < p->n_replicas; i++) {
        replica *r = &p->replicas[i];
        if (r->down)
            continue;
        int blocks = cpm_sched_prefix_match(r->sched, prompt, n);
        cpm_sched_get_stats(r->sched, &st);
        int extra = st.live + st.queued - least_load;
        if (blocks > 0 && extra <= PREFIX_LOAD_SLACK && blocks > best_gain)
            best = r, best_gain = blocks;
    }
    return best;
}

int cpm_pipeline_add(cpm_pipeline *p, cpm_gen *g, const int32_t *prompt, int n, cpm_error *err) {
    replica *r = pick_for_prompt(p, prompt, n);
    int rc = cpm_sched_add(r->sched, prompt, n, g->max_new, g, &g->seq, err);
    if (rc)
        g->seq = 0;
    return rc;
}

void cpm_pipeline_release(cpm_pipeline *p, cpm_gen *g) {
    if (g->seq && p->have_model)
        cpm_sched_finish(sched_of(p, g->seq), g->seq);
}

/* ---- micro-batches out ----------------------------------------------------------------- */

/* The router's epoch and replica k's live set, for the stages' garbage collection. */
static void attach_live(cpm_pipeline *p, int k, Cpm__V1__StageForward *fw) {
    int n;
    fw->router_epoch = p->epoch;
    fw->live_horizon = cpm_sched_live(p->replicas[k].sched, p->live, p->live_cap, &n);
    fw->n_live = (size_t)n;
    fw->live = p->live;
}

/* A sequence's first rows leave the queue: its queue time ends, its prefill begins. */
static void note_sent(cpm_pipeline *p, const cpm_sched_batch *b) {
    uint64_t now = uv_hrtime();
    for (int i = 0; i < b->n_rows; i++) {
        if (i && b->seq[i] == b->seq[i - 1]) /* a prefill chunk: one sequence, many rows */
            continue;
        cpm_gen *g = owner_of(p, b->seq[i]);
        if (g && !g->t_sent) {
            g->t_sent = now;
            cpm_hist_observe(&p->m->queue_time, secs(now - g->job->t_start));
        }
    }
}

static void send_batch(cpm_pipeline *p, int k, const cpm_sched_batch *b) {
    Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
    protobuf_c_boolean want[b->n_rows > 0 ? b->n_rows : 1];
    for (int i = 0; i < b->n_rows; i++)
        want[i] = b->want[i];
    fw.step = b->step;
    fw.n_seq = fw.n_pos = fw.n_ids = fw.n_want = (size_t)b->n_rows;
    fw.seq = (uint64_t *)b->seq;
    fw.pos = (uint32_t *)b->pos;
    fw.ids = (int32_t *)b->ids;
    fw.want = want;
    fw.n_release = (size_t)b->n_release;
    fw.release = (uint64_t *)b->release;
    /* prefix caching: blocks to start from, blocks to keep */
    Cpm__V1__SeqBlocks blocks[b->n_attach + b->n_publish + 1];
    Cpm__V1__SeqBlocks *attach[b->n_attach + 1], *publish[b->n_publish + 1];
    for (int i = 0; i < b->n_attach + b->n_publish; i++) {
        const cpm_sched_blocks *x = i < b->n_attach ? &b->attach[i] : &b->publish[i - b->n_attach];
        cpm__v1__seq_blocks__init(&blocks[i]);
        blocks[i].seq = x->seq;
        blocks[i].first_block = (uint32_t)x->first;
        blocks[i].n_hash = (size_t)x->n;
        blocks[i].hash = (uint64_t *)x->hash;
        if (i < b->n_attach)
            attach[i] = &blocks[i];
        else
            publish[i - b->n_attach] = &blocks[i];
    }
    fw.n_attach = (size_t)b->n_attach;
    fw.attach = attach;
    fw.n_publish = (size_t)b->n_publish;
    fw.publish = publish;
    attach_live(p, k, &fw);
    p->replicas[k].gc_due = true;
    p->replicas[k].last_sent = uv_hrtime();
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
    env.forward = &fw;
    p->steps[p->n_steps++] = (step_time){b->step, uv_hrtime(), b->n_attach > 0};
    p->m->steps++;
    p->m->step_rows += (uint64_t)b->n_rows;
    note_sent(p, b);
    cpm_error e = {0};
    if (p->io.forward(p->io.ud, k, &env, &e) < 0) /* the step will time out and fail */
        LOG(p, CPM_LOG_ERROR, "sending step %" PRIu64 " to replica %d: %s", b->step, k, e.msg);
}

void cpm_pipeline_pump(cpm_pipeline *p) {
    if (!p->have_model || p->stopped)
        return;
    bool any_up = false;
    for (int i = 0; i < p->n_replicas; i++)
        any_up |= !p->replicas[i].down;
    /* with every replica down, work still goes out: the step timeout answers it */
    for (int i = 0; i < p->n_replicas; i++) {
        if (p->replicas[i].down && any_up)
            continue;
        cpm_sched_batch b;
        while (cpm_sched_next(p->replicas[i].sched, &b) == 1)
            send_batch(p, i, &b);
    }
}

/* ---- failures and failover ----------------------------------------------------------------- */

static void forget_step(cpm_pipeline *p, uint64_t step) {
    for (int i = 0; i < p->n_steps; i++)
        if (p->steps[i].step == step) {
            cpm_hist_observe(&p->m->step_latency, secs(uv_hrtime() - p->steps[i].t));
            p->steps[i] = p->steps[--p->n_steps];
            return;
        }
}

/* g's replica failed it: carry on from its tokens on another replica that is up. The
 * router holds the whole history, so the new replica prefills prompt + generated tokens
 * again and the sampler's draws, keyed by (seed, step), continue unchanged. false when
 * no replica can take it. */
static bool gen_failover(cpm_pipeline *p, cpm_gen *g, const char *why, bool stay, bool counted) {
    if (g->released || cpm_req_state_terminal(g->state) ||
        (counted && g->failovers >= CPM_PIPELINE_MAX_FAILOVERS))
        return false;
    replica *from = replica_of(p, g->seq), *to = pick_replica(p, stay ? NULL : from);
    int n;
    const int32_t *tok = to ? cpm_sched_tokens(from->sched, g->seq, &n) : NULL;
    int32_t *copy = tok ? malloc((size_t)n * sizeof *copy) : NULL;
    if (!copy)
        return false;
    memcpy(copy, tok, (size_t)n * sizeof *copy);
    uint64_t seq;
    cpm_error e = {0};
    int rc = cpm_sched_add(to->sched, copy, n, g->max_new - g->n_gen, g, &seq, &e);
    free(copy);
    if (rc)
        return false;
    cpm_sched_finish(from->sched, g->seq);
    LOG(p, CPM_LOG_WARN, "request %s: sequence %" PRIu64 " continues as sequence %" PRIu64
        " on pipeline replica %d after %d tokens (%s)", g->job->id, g->seq, seq,
        (int)(to - p->replicas), g->n_gen, why);
    g->seq = seq;
    if (counted) { /* a stale prefix costs a prefill, not one of the request's failovers */
        g->failovers++;
        p->m->failovers++;
    }
    return true;
}

/* The step failed: each request with a sequence in it moves to another replica (stay:
 * or starts again on its own), or ends with an error when none can take it. counted:
 * the move counts toward the request's CPM_PIPELINE_MAX_FAILOVERS. */
static void lose_step(cpm_pipeline *p, uint64_t step, const char *why, bool stay, bool counted) {
    const uint64_t *seqs;
    int n;
    cpm_sched *sched = sched_of(p, step);
    if (cpm_sched_step_done(sched, step, false, &seqs, &n) != 0)
        return;
    forget_step(p, step);
    /* copy: failing a job finishes sequences, which reuses the scheduler's buffer */
    uint64_t *copy = malloc((size_t)(n > 0 ? n : 1) * sizeof *copy);
    if (copy)
        memcpy(copy, seqs, (size_t)n * sizeof *copy);
    for (int i = 0; copy && i < n; i++) {
        cpm_gen *g = cpm_sched_owner(sched, copy[i]);
        if (g && !gen_failover(p, g, why, stay, counted))
            cpm_job_fail(g->job, 503, "server_error", "pipeline_error", why);
    }
    free(copy);
    LOG(p, CPM_LOG_WARN, "step %" PRIu64 " failed: %s", step, why);
}

static void fail_step(cpm_pipeline *p, uint64_t step, const char *why) {
    lose_step(p, step, why, false, true);
}

static bool step_attached(const cpm_pipeline *p, uint64_t step) {
    for (int i = 0; i < p->n_steps; i++)
        if (p->steps[i].step == step)
            return p->steps[i].attach;
    return false;
}

/* A step that started sequences from cached blocks failed: a stage may have evicted one
 * (or restarted without them). The replica's directory is forgotten and the step's
 * requests start again where they are, from their first token. */
static void lose_prefix_step(cpm_pipeline *p, uint64_t step, const char *why) {
    cpm_sched_prefix_forget(sched_of(p, step));
    p->m->prefix_misses++;
    lose_step(p, step, why, true, false);
}

/* Whether a step of replica k is in flight. */
static bool busy(const cpm_pipeline *p, int k) {
    for (int i = 0; i < p->n_steps; i++)
        if (p->steps[i].step % (uint64_t)p->n_replicas == (uint64_t)k)
            return true;
    return false;
}

/* Idle replicas that were busy get one micro-batch of nothing but the live set (step
 * 0: its result matches no step and is dropped). */
static void collect_garbage(cpm_pipeline *p) {
    uint64_t now = uv_hrtime();
    for (int k = 0; k < p->n_replicas; k++) {
        replica *r = &p->replicas[k];
        if (!r->gc_due || r->down || busy(p, k) || now - r->last_sent < GC_IDLE_NS)
            continue;
        Cpm__V1__StageForward fw = CPM__V1__STAGE_FORWARD__INIT;
        attach_live(p, k, &fw);
        Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
        env.body_case = CPM__V1__ENVELOPE__BODY_FORWARD;
        env.forward = &fw;
        cpm_error e = {0};
        if (p->io.forward(p->io.ud, k, &env, &e) == 0) {
            r->gc_due = false;
            r->last_sent = now;
        }
    }
}

void cpm_pipeline_check_timeouts(cpm_pipeline *p, int timeout_ms) {
    uint64_t now = uv_hrtime(), limit = (uint64_t)timeout_ms * 1000000ull;
    for (int i = 0; i < p->n_steps;) {
        if (now - p->steps[i].t > limit) {
            fail_step(p, p->steps[i].step, "pipeline step timed out");
            i = 0; /* fail_step reorders the table */
        } else {
            i++;
        }
    }
    cpm_pipeline_pump(p);
    if (p->have_model && !p->stopped)
        collect_garbage(p);
}

/* Every sequence of replica k with an id up to horizon, running or waiting there, moves
 * (stay: may start again on k itself; the ids it then gets are above horizon). */
static void move_sequences(cpm_pipeline *p, int k, const char *why, bool stay, uint64_t horizon) {
    for (cpm_job *j = cpm_jobs_first(p->jobs); j; j = j->next)
        for (int i = 0; i < j->n_gens; i++) {
            cpm_gen *g = &j->gens[i];
            if (g->seq && replica_of(p, g->seq) == &p->replicas[k] && g->seq <= horizon)
                gen_failover(p, g, why, stay, true);
        }
}

/* Replica k lost what was in flight and, stay or not, what its caches held. */
static void lose_replica_work(cpm_pipeline *p, int k, const char *why, bool stay) {
    if (!p->have_model)
        return;
    /* the sequences there now; those that start again on k get ids above this */
    uint64_t horizon = UINT64_MAX;
    if (stay)
        horizon = cpm_sched_horizon(p->replicas[k].sched);
    for (int i = 0; i < p->n_steps;) {
        uint64_t step = p->steps[i].step;
        if (step % (uint64_t)p->n_replicas != (uint64_t)k) {
            i++;
            continue;
        }
        lose_step(p, step, why, stay, true);
        if (i < p->n_steps && p->steps[i].step == step)
            forget_step(p, step); /* unknown to the scheduler: a stale entry */
        i = 0; /* lose_step reorders the table */
    }
    move_sequences(p, k, why, stay, horizon);
    cpm_pipeline_pump(p);
}

void cpm_pipeline_replica_down(cpm_pipeline *p, int k, const char *why) {
    p->replicas[k].down = true;
    lose_replica_work(p, k, why, false);
}

void cpm_pipeline_replica_restarted(cpm_pipeline *p, int k, const char *why) {
    p->replicas[k].gc_due = true;
    lose_replica_work(p, k, why, true);
}

void cpm_pipeline_fail_all(cpm_pipeline *p, const char *why) {
    for (cpm_job *j = cpm_jobs_first(p->jobs), *next; j; j = next) {
        next = j->next; /* failing may free j */
        bool placed = false;
        for (int i = 0; i < j->n_gens; i++)
            placed |= j->gens[i].seq != 0 && !cpm_req_state_terminal(j->gens[i].state);
        if (placed)
            cpm_job_fail(j, 503, "server_error", "pipeline_error", why);
    }
    cpm_pipeline_pump(p); /* the releases */
}

void cpm_pipeline_replica_up(cpm_pipeline *p, int k) {
    p->replicas[k].down = false;
    p->replicas[k].gc_due = true; /* its restarted stage's peers hold what died with it */
}

/* ---- results and sampling ----------------------------------------------------------------- */

static bool needs_history(const Cpm__V1__SamplingParams *sp) {
    return (sp->repetition_penalty != 0.0f && sp->repetition_penalty != 1.0f) ||
           sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f;
}

/* g's job's constraint with the tokens it may still generate, this one included. */
static void constraint_of(const cpm_gen *g, Cpm__V1__Constraint *c) {
    const cpm_job *j = g->job;
    cpm__v1__constraint__init(c);
    c->kind = (Cpm__V1__ConstraintKind)j->constraint_kind;
    c->schema = (char *)(j->constraint_schema ? j->constraint_schema : "");
    c->single_call = j->constraint_single;
    c->tokens_left = (uint32_t)(g->max_new > g->n_gen ? g->max_new - g->n_gen : 1);
}

/* Row i of a sample request: g's parameters, step, constraint (into *cons, which must
 * live until the request is packed) and (for penalties or a constraint) history; a
 * cancelled row (no g) is sampled with neutral parameters and dropped. */
static void sample_row(cpm_pipeline *p, Cpm__V1__SampleRow *row, cpm_gen *g,
                       Cpm__V1__SamplingParams *neutral, Cpm__V1__Constraint *cons) {
    cpm__v1__sample_row__init(row);
    row->params = g ? &g->params : neutral;
    if (!g)
        return;
    row->step = (uint32_t)g->n_gen;
    if ((int)g->params.min_tokens > g->n_gen && !g->params.n_min_tokens_stop_ids) {
        int n = 0; /* what the request stops on may not be drawn yet */
        const int32_t *ids = cpm_job_min_stop_ids(g->job, p->facts.eos_ids, p->facts.n_eos, &n);
        g->params.min_tokens_stop_ids = (int32_t *)ids;
        g->params.n_min_tokens_stop_ids = ids ? (size_t)n : 0;
    }
    bool constrained = g->job->constraint_kind != 0;
    if (constrained) {
        constraint_of(g, cons);
        row->constraint = cons;
    }
    /* the sampler reads the generated text of a constrained row from its history */
    if (needs_history(&g->params) || constrained) {
        int nt;
        const int32_t *t = cpm_sched_tokens(sched_of(p, g->seq), g->seq, &nt);
        row->n_history = (size_t)nt;
        row->history = (int32_t *)t;
    }
}

static void logits_unref(void *data, void *hint) {
    (void)data;
    shared_logits *sl = hint;
    if (atomic_fetch_sub(&sl->refs, 1) != 1)
        return;
    if (sl->src.free_fn)
        sl->src.free_fn(sl->src.data, sl->src.hint);
    free(sl);
}

/* Sends call's rows to a sampler (the hub picks a ready one): parameters, steps and
 * histories are read now, so a retry asks exactly what the first send asked. */
static int send_sample(cpm_pipeline *p, cpm_sample_call *call, cpm_error *e) {
    int n = call->n;
    Cpm__V1__SampleRow *rows = calloc((size_t)n, sizeof *rows);
    Cpm__V1__SampleRow **rowp = calloc((size_t)n, sizeof *rowp);
    Cpm__V1__Constraint *cons = calloc((size_t)n, sizeof *cons);
    Cpm__V1__SamplingParams neutral = CPM__V1__SAMPLING_PARAMS__INIT;
    if (!rows || !rowp || !cons) {
        free(rows), free(rowp), free(cons);
        return cpm_error_set(e, CPM_ENOMEM, "sampling: out of memory");
    }
    for (int i = 0; i < n; i++) {
        sample_row(p, &rows[i], owner_of(p, call->seqs[i]), &neutral, &cons[i]);
        rowp[i] = &rows[i];
    }
    Cpm__V1__SampleRequest sq = CPM__V1__SAMPLE_REQUEST__INIT;
    sq.n_rows = (size_t)n;
    sq.rows = rowp;
    sq.logits = &call->desc;
    Cpm__V1__Envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_SAMPLE;
    env.sample = &sq;
    shared_logits *sl = call->logits;
    atomic_fetch_add(&sl->refs, 1); /* this send's, dropped by zmq (or at once on failure) */
    cpm_payload pl = {.data = sl->src.data, .size = sl->src.size, .free_fn = logits_unref,
                      .hint = sl};
    call->attempts++;
    int rc = p->io.sample(p->io.ud, &env, &pl, call, e);
    free(rows);
    free(rowp);
    free(cons);
    return rc;
}

/* The rows of a result that cannot be sampled end their jobs. */
static void fail_rows(cpm_pipeline *p, const Cpm__V1__StageResult *res, const char *why) {
    for (size_t i = 0; i < res->n_seq; i++) {
        cpm_gen *g = owner_of(p, res->seq[i]);
        if (g && !cpm_req_state_terminal(g->state))
            cpm_job_fail(g->job, 503, "server_error", "sampler_error", why);
    }
}

/* Logits of the wanted rows: off to a sampler (the logits frame travels on, uncopied). */
static void sample_rows(cpm_pipeline *p, const Cpm__V1__StageResult *res, cpm_payload *logits) {
    int n = (int)res->n_seq;
    cpm_sample_call *call = calloc(1, sizeof *call + (size_t)n * sizeof(uint64_t));
    shared_logits *sl = malloc(sizeof *sl);
    if (!call || !sl || !res->logits || res->logits->n_shape > 4) {
        free(call), free(sl);
        if (logits->free_fn)
            logits->free_fn(logits->data, logits->hint);
        fail_rows(p, res, !res->logits ? "stage result without logits" : "out of memory");
        return;
    }
    atomic_init(&sl->refs, 1); /* the call's */
    sl->src = *logits;
    *call = (cpm_sample_call){.p = p, .logits = sl, .desc = *res->logits, .n = n};
    memcpy(call->shape, res->logits->shape, res->logits->n_shape * sizeof *call->shape);
    call->desc.shape = call->shape;
    for (int i = 0; i < n; i++)
        call->seqs[i] = res->seq[i];
    cpm_error e = {0};
    int rc = send_sample(p, call, &e);
    if (rc < 0) {
        LOG(p, CPM_LOG_ERROR, "sampling: %s", e.msg);
        cpm_pipeline_sampled(call, NULL, rc);
    }
}

void cpm_pipeline_on_result(cpm_pipeline *p, const Cpm__V1__StageResult *res,
                            cpm_payload *logits) {
    bool sampled = false;
    if (p->stopped || !p->have_model) {
        LOG(p, CPM_LOG_WARN, "results: step %" PRIu64 " dropped (no model yet)", res->step);
    } else if (res->error) {
        char why[CPM_ERROR_MSG_MAX];
        snprintf(why, sizeof why, "%s: %s", res->error->service ? res->error->service : "stage",
                 res->error->message ? res->error->message : "error");
        if (step_attached(p, res->step)) /* whatever failed, the directory may be wrong */
            cpm_sched_prefix_forget(sched_of(p, res->step));
        if (res->error->code == CPM_ESTALE)
            lose_prefix_step(p, res->step, why);
        else
            fail_step(p, res->step, why);
    } else if (cpm_sched_step_done(sched_of(p, res->step), res->step, true, NULL, NULL) == 0) {
        forget_step(p, res->step);
        if (res->n_seq > 0) {
            sample_rows(p, res, logits);
            sampled = true;
        }
    } /* else: late (timed out) or unknown step */
    if (!sampled && logits->free_fn)
        logits->free_fn(logits->data, logits->hint);
    cpm_pipeline_pump(p);
}

/* One sampled token for g: recorded, then handed up. */
static void take_token(cpm_pipeline *p, cpm_gen *g, const Cpm__V1__SampledToken *t) {
    cpm_job *j = g->job;
    uint64_t now = uv_hrtime();
    if (g->n_gen == 0 && !g->failovers)
        g->cached_tokens = cpm_sched_cached_tokens(sched_of(p, g->seq), g->seq);
    if (!j->first_token_seen) {
        j->first_token_seen = true;
        j->t_first_token = now;
        cpm_hist_observe(&p->m->ttft, secs(now - j->t_start));
    } else if (g->t_last) {
        cpm_hist_observe(&p->m->inter_token, secs(now - g->t_last));
    }
    if (!g->t_first) {
        g->t_first = now;
        if (g->t_sent)
            cpm_hist_observe(&p->m->prefill_time, secs(now - g->t_sent));
    }
    g->t_last = now;
    p->m->generation_tokens++;
    if (g->state == CPM_REQ_PREFILLING)
        cpm_req_transition(&g->state, CPM_REQ_DECODING);
    g->ids[g->n_gen] = t->id;
    if (j->logprobs) {
        cpm_tok_lp *lp = &g->lps[g->n_gen];
        lp->id = t->id;
        lp->lp = t->logprob;
        lp->n_top = (int)(t->n_top < (size_t)j->top_logprobs ? t->n_top : (size_t)j->top_logprobs);
        for (int k = 0; k < lp->n_top; k++) {
            lp->top_ids[k] = t->top[k]->id;
            lp->top_lps[k] = t->top[k]->logprob;
        }
    }
    g->n_gen++;
    bool stop_id = cpm_job_is_stop_id(j, p->facts.eos_ids, p->facts.n_eos, t->id);
    const char *end = stop_id ? "stop" : g->n_gen >= g->max_new ? "length" : NULL;
    if (!end && cpm_sched_push_token(sched_of(p, g->seq), g->seq, t->id) != 0)
        end = "length";
    p->io.token(p->io.ud, g, stop_id, end);
}

/* Why a sampler reply cannot be used, or "" when it can. */
static void reply_problem(const cpm_sample_call *call, const Cpm__V1__Envelope *reply, int status,
                          char *why, size_t size) {
    why[0] = '\0';
    if (status != 0)
        snprintf(why, size, "sampler: %s", cpm_strerror(status));
    else if (reply->body_case == CPM__V1__ENVELOPE__BODY_ERROR)
        snprintf(why, size, "sampler: %s", reply->error->message);
    else if (reply->body_case != CPM__V1__ENVELOPE__BODY_SAMPLED ||
             reply->sampled->n_tokens != (size_t)call->n)
        snprintf(why, size, "sampler: unexpected reply");
}

/* The call could not reach a sampler, or its sampler went silent: ask another (the
 * draws depend only on seed and step, so any sampler gives the same tokens). */
static bool retry_sample(cpm_pipeline *p, cpm_sample_call *call, int status) {
    if ((status != CPM_ETIMEDOUT && status != CPM_ECLOSED) || p->stopped ||
        call->attempts >= CPM_PIPELINE_SAMPLE_ATTEMPTS)
        return false;
    cpm_error e = {0};
    LOG(p, CPM_LOG_WARN, "sampling: %s; asking another sampler", cpm_strerror(status));
    p->m->retries++;
    if (send_sample(p, call, &e) == 0)
        return true;
    LOG(p, CPM_LOG_ERROR, "sampling: %s", e.msg);
    return false;
}

void cpm_pipeline_sampled(cpm_sample_call *call, const Cpm__V1__Envelope *reply, int status) {
    cpm_pipeline *p = call->p;
    if (status != 0 && retry_sample(p, call, status))
        return;
    char why[160];
    reply_problem(call, reply, status, why, sizeof why);
    for (int i = 0; i < call->n && !p->stopped; i++) {
        cpm_gen *g = owner_of(p, call->seqs[i]);
        if (!g || cpm_req_state_terminal(g->state))
            continue; /* cancelled meanwhile */
        if (why[0]) {
            cpm_job_fail(g->job, 503, "server_error", "sampler_error", why);
            continue;
        }
        const Cpm__V1__SampledToken *t = reply->sampled->tokens[i];
        if (t->id < 0 || t->id >= p->facts.vocab_size) {
            cpm_job_fail(g->job, 503, "server_error", "sampler_error", "sampler: token out of range");
            continue;
        }
        take_token(p, g, t);
    }
    logits_unref(NULL, call->logits);
    free(call);
    cpm_pipeline_pump(p);
}
