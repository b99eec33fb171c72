/* scheduler.c - sequences, admission and micro-batch building for the pipeline ring.
 *
 * A sequence's tokens are tok[0..n_tok) (prompt, then generated); n_sent of them
 * have been sent to the stages (their KV length once the step returns). Every
 * micro-batch sends, per chosen sequence, the rows tok[n_sent .. end) and wants
 * logits on its last row only when that row is the newest known token.
 */
#include "scheduler.h"

#include <stdlib.h>
#include <string.h>

#include "prefix.h"

#define KV_BLOCK 16 /* the stages' CPM_KV_BLOCK: reservations are whole blocks */

typedef struct seq {
    uint64_t id;
    void *owner;
    int32_t *tok;
    int n_prompt, n_tok, cap;
    int n_sent;
    int reserve;   /* KV tokens reserved while admitted */
    bool admitted;
    bool in_step;  /* rows of it are in the pipeline */
    bool wants;    /* waiting for the token of its last wanted row */
    bool dead;     /* finished while in the pipeline: removed when its step returns */
    bool failed;
    /* prefix caching */
    uint64_t *hash;    /* [cap / KV_BLOCK]: chained hashes of its full blocks */
    int n_hash;        /* computed so far */
    int n_published;   /* blocks published (or attached) */
    int attach;        /* blocks to attach with its first rows */
    int cached;        /* prompt tokens reused */
} seq;

typedef struct step_rec {
    uint64_t step;
    int n;
    uint64_t *seqs; /* [max_batch_tokens]: one per sequence in the step */
} step_rec;

struct cpm_sched {
    cpm_sched_opts o;
    seq **seqs; /* admitted first, in admission order; then queued, FIFO */
    int n_seqs, n_live, cap_seqs;
    uint64_t next_seq, next_step;
    int kv_reserved;
    int rr; /* where the next batch starts looking, for fairness */
    step_rec *steps;
    int n_steps;
    uint64_t steps_sent;
    /* the batch being built / handed out */
    uint64_t *b_seq;
    uint32_t *b_pos;
    int32_t *b_ids;
    uint8_t *b_want;
    uint64_t *release;
    int n_release;
    uint64_t *scratch;
    cpm_prefix *dir;                 /* NULL: prefix caching off */
    cpm_sched_blocks *b_attach, *b_publish;
    int n_attach, n_publish;
    uint64_t prefix_asked, prefix_reused;
};

cpm_sched_opts cpm_sched_opts_default(void) {
    return (cpm_sched_opts){
        .max_batch_tokens = 512,
        .prefill_chunk = 256,
        .max_inflight = 4,
        .max_seqs = 64,
        .max_queue = 256,
        .max_context = 4096,
        .kv_tokens = 0,
        .id_stride = 1,
        .id_offset = 0,
    };
}

int cpm_sched_new(const cpm_sched_opts *opts, cpm_sched **ret, cpm_error *err) {
    *ret = NULL;
    cpm_sched_opts o = opts ? *opts : cpm_sched_opts_default();
    if (o.id_stride == 0)
        o.id_stride = 1; /* zero-initialised options: one pipeline */
    if (o.max_batch_tokens < 1 || o.prefill_chunk < 1 || o.max_inflight < 1 || o.max_seqs < 1 ||
        o.max_queue < 0 || o.max_context < 2 || o.kv_tokens < 0 || o.id_stride < 1 ||
        o.id_offset < 0 || o.id_offset >= o.id_stride)
        return cpm_error_set(err, CPM_EINVAL, "scheduler: invalid options");
    cpm_sched *s = calloc(1, sizeof *s);
    if (!s)
        return cpm_error_set(err, CPM_ENOMEM, "scheduler: out of memory");
    s->o = o;
    s->cap_seqs = o.max_seqs + o.max_queue;
    s->next_seq = 1;
    s->next_step = 1;
    size_t bt = (size_t)o.max_batch_tokens;
    s->seqs = calloc((size_t)s->cap_seqs, sizeof *s->seqs);
    s->steps = calloc((size_t)o.max_inflight, sizeof *s->steps);
    s->b_seq = malloc(bt * sizeof *s->b_seq);
    s->b_pos = malloc(bt * sizeof *s->b_pos);
    s->b_ids = malloc(bt * sizeof *s->b_ids);
    s->b_want = malloc(bt * sizeof *s->b_want);
    s->release = malloc((size_t)s->cap_seqs * sizeof *s->release);
    s->scratch = malloc(bt * sizeof *s->scratch);
    s->b_attach = malloc(bt * sizeof *s->b_attach);
    s->b_publish = malloc(bt * sizeof *s->b_publish);
    if (o.prefix_blocks > 0)
        s->dir = cpm_prefix_new(o.prefix_blocks);
    bool ok = s->seqs && s->steps && s->b_seq && s->b_pos && s->b_ids && s->b_want &&
              s->release && s->scratch && s->b_attach && s->b_publish &&
              (o.prefix_blocks <= 0 || s->dir);
    for (int i = 0; ok && i < o.max_inflight; i++)
        ok = (s->steps[i].seqs = malloc(bt * sizeof *s->steps[i].seqs)) != NULL;
    if (!ok) {
        cpm_sched_free(s);
        return cpm_error_set(err, CPM_ENOMEM, "scheduler: out of memory");
    }
    *ret = s;
    return 0;
}

static void seq_free(seq *q) {
    if (q) {
        free(q->tok);
        free(q->hash);
        free(q);
    }
}

void cpm_sched_free(cpm_sched *s) {
    if (!s)
        return;
    for (int i = 0; i < s->n_seqs; i++)
        seq_free(s->seqs[i]);
    for (int i = 0; s->steps && i < s->o.max_inflight; i++)
        free(s->steps[i].seqs);
    free(s->steps);
    free(s->seqs);
    free(s->b_seq);
    free(s->b_pos);
    free(s->b_ids);
    free(s->b_want);
    free(s->release);
    free(s->scratch);
    free(s->b_attach);
    free(s->b_publish);
    cpm_prefix_free(s->dir);
    free(s);
}

static int find(const cpm_sched *s, uint64_t id) {
    for (int i = 0; i < s->n_seqs; i++)
        if (s->seqs[i]->id == id)
            return i;
    return -1;
}

static seq *get(const cpm_sched *s, uint64_t id) {
    int i = find(s, id);
    return i < 0 ? NULL : s->seqs[i];
}

static int kv_need(int n) {
    return (n + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK;
}

int cpm_sched_add(cpm_sched *s, const int32_t *prompt, int n_prompt, int max_new, void *owner,
                  uint64_t *ret_seq, cpm_error *err) {
    if (n_prompt < 1 || max_new < 1)
        return cpm_error_set(err, CPM_EINVAL, "scheduler: empty prompt or max_new < 1");
    if (n_prompt + (long long)max_new > s->o.max_context)
        return cpm_error_set(err, CPM_ERANGE,
                             "prompt (%d tokens) + max_tokens (%d) exceeds the context length %d",
                             n_prompt, max_new, s->o.max_context);
    if (s->o.kv_tokens && kv_need(n_prompt + max_new) > s->o.kv_tokens)
        return cpm_error_set(err, CPM_ERANGE,
                             "prompt (%d tokens) + max_tokens (%d) exceeds the KV cache (%d tokens)",
                             n_prompt, max_new, s->o.kv_tokens);
    if (s->n_seqs >= s->cap_seqs)
        return cpm_error_set(err, CPM_ELIMIT, "too many requests waiting (%d queued)",
                             s->n_seqs - s->n_live);
    seq *q = calloc(1, sizeof *q);
    if (q) {
        q->tok = malloc((size_t)(n_prompt + max_new) * sizeof *q->tok);
        q->hash = malloc(((size_t)(n_prompt + max_new) / KV_BLOCK + 1) * sizeof *q->hash);
    }
    if (!q || !q->tok || !q->hash) {
        seq_free(q);
        return cpm_error_set(err, CPM_ENOMEM, "scheduler: out of memory");
    }
    memcpy(q->tok, prompt, (size_t)n_prompt * sizeof *prompt);
    q->id = s->next_seq++ * (uint64_t)s->o.id_stride + (uint64_t)s->o.id_offset;
    q->owner = owner;
    q->n_prompt = q->n_tok = n_prompt;
    q->cap = n_prompt + max_new;
    q->reserve = s->o.kv_tokens ? kv_need(q->cap) : 0;
    s->seqs[s->n_seqs++] = q;
    *ret_seq = q->id;
    return 0;
}

/* Hashes q's full blocks up to block n (those its tokens fill). */
static void hash_upto(seq *q, int n) {
    for (; q->n_hash < n && (q->n_hash + 1) * KV_BLOCK <= q->n_tok; q->n_hash++)
        q->hash[q->n_hash] = cpm_prefix_hash(q->n_hash ? q->hash[q->n_hash - 1] : 0,
                                             q->tok + q->n_hash * KV_BLOCK);
}

/* A sequence about to start: after the longest cached prefix of its prompt, leaving at
 * least its last prompt token to compute (its logits give the first new token). */
static void use_cached_prefix(cpm_sched *s, seq *q) {
    if (!s->dir || q->n_sent > 0)
        return;
    int eligible = (q->n_prompt - 1) / KV_BLOCK;
    hash_upto(q, eligible);
    int k = cpm_prefix_match(s->dir, q->hash, eligible);
    cpm_prefix_touch(s->dir, q->hash, k);
    s->prefix_asked += (uint64_t)eligible;
    s->prefix_reused += (uint64_t)k;
    q->attach = q->n_published = k;
    q->n_sent = q->cached = k * KV_BLOCK;
}

/* Moves queued sequences into live slots, oldest first, while slots and KV allow. */
static void admit(cpm_sched *s) {
    while (s->n_live < s->n_seqs && s->n_live < s->o.max_seqs) {
        seq *q = s->seqs[s->n_live];
        if (s->o.kv_tokens && s->kv_reserved + q->reserve > s->o.kv_tokens)
            return; /* FIFO: a big request is not overtaken by small ones forever */
        use_cached_prefix(s, q);
        q->admitted = true;
        s->kv_reserved += q->reserve;
        s->n_live++;
    }
}

static void remove_at(cpm_sched *s, int i) {
    seq *q = s->seqs[i];
    if (q->admitted) {
        s->kv_reserved -= q->reserve;
        s->n_live--;
        if (q->n_sent > 0) /* the stages hold KV for it */
            s->release[s->n_release++] = q->id;
    }
    memmove(&s->seqs[i], &s->seqs[i + 1], (size_t)(s->n_seqs - i - 1) * sizeof *s->seqs);
    s->n_seqs--;
    if (s->rr > i)
        s->rr--;
    seq_free(q);
}

void cpm_sched_finish(cpm_sched *s, uint64_t id) {
    int i = find(s, id);
    if (i < 0)
        return;
    if (s->seqs[i]->in_step)
        s->seqs[i]->dead = true; /* its rows are in the pipeline; release after they return */
    else
        remove_at(s, i);
}

/* The prefix blocks q's rows in this batch start from (attach) and fill (publish). */
static void add_blocks(cpm_sched *s, seq *q) {
    if (!s->dir)
        return;
    if (q->attach) {
        s->b_attach[s->n_attach++] = (cpm_sched_blocks){q->id, 0, q->attach, q->hash};
        q->attach = 0;
    }
    int full = q->n_sent / KV_BLOCK;
    hash_upto(q, full);
    if (full <= q->n_published)
        return;
    s->b_publish[s->n_publish++] = (cpm_sched_blocks){q->id, q->n_published, full - q->n_published,
                                                      q->hash + q->n_published};
    for (int b = q->n_published; b < full; b++)
        cpm_prefix_add(s->dir, q->hash[b]);
    q->n_published = full;
}

/* Appends seq q's next rows (up to budget) to the batch being built. */
static int add_rows(cpm_sched *s, seq *q, int n_rows, int budget) {
    int end = q->n_sent + budget;
    if (end > q->n_tok)
        end = q->n_tok;
    if (end - q->n_sent > s->o.prefill_chunk)
        end = q->n_sent + s->o.prefill_chunk;
    for (int p = q->n_sent; p < end; p++, n_rows++) {
        s->b_seq[n_rows] = q->id;
        s->b_pos[n_rows] = (uint32_t)p;
        s->b_ids[n_rows] = q->tok[p];
        s->b_want[n_rows] = 0;
    }
    q->wants = end == q->n_tok; /* the newest token was sent: its logits give the next one */
    if (q->wants)
        s->b_want[n_rows - 1] = 1;
    q->n_sent = end;
    q->in_step = true;
    add_blocks(s, q);
    return n_rows;
}

static bool ready(const seq *q) {
    return q->admitted && !q->in_step && !q->wants && !q->dead && !q->failed &&
           q->n_sent < q->n_tok;
}

/* Sequences one micro-batch may take. With a pipeline of several stages each stage
 * computes its own micro-batch; a batch holding every live sequence would leave the
 * others idle while it travels, and its sequences would stay together from then on
 * (each comes back ready at the same moment). A batch therefore takes at most its
 * share of the live sequences, and the groups settle at about live / spread each. */
static int batch_share(const cpm_sched *s) {
    int spread = s->o.spread < s->o.max_inflight ? s->o.spread : s->o.max_inflight;
    if (spread <= 1)
        return s->n_live;
    int active = 0;
    for (int k = 0; k < s->n_live; k++)
        active += !s->seqs[k]->dead && !s->seqs[k]->failed;
    return (active + spread - 1) / spread;
}

int cpm_sched_next(cpm_sched *s, cpm_sched_batch *b) {
    if (s->n_steps >= s->o.max_inflight)
        return 0;
    admit(s);
    s->n_attach = s->n_publish = 0;
    int n_rows = 0, n_in = 0, budget = s->o.max_batch_tokens, share = batch_share(s);
    step_rec *rec = &s->steps[s->n_steps];
    /* decode rows first (one token each, latency-bound), then prefill chunks */
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < s->n_live && n_rows < budget && n_in < share; k++) {
            seq *q = s->seqs[(s->rr + k) % s->n_live];
            bool decode = q->n_sent >= q->n_prompt;
            if (!ready(q) || decode != (pass == 0))
                continue;
            n_rows = add_rows(s, q, n_rows, budget - n_rows);
            rec->seqs[n_in++] = q->id;
        }
    }
    if (n_rows == 0 && s->n_release == 0)
        return 0;
    if (s->n_live > 0)
        s->rr = (s->rr + 1) % s->n_live;
    rec->step = s->next_step++ * (uint64_t)s->o.id_stride + (uint64_t)s->o.id_offset;
    rec->n = n_in;
    s->n_steps++;
    s->steps_sent++;
    int n_want = 0;
    for (int i = 0; i < n_rows; i++)
        n_want += s->b_want[i];
    /* releases are copied out so that finishing during the send cannot disturb them */
    memcpy(s->scratch, s->release, (size_t)s->n_release * sizeof *s->release);
    *b = (cpm_sched_batch){.step = rec->step, .n_rows = n_rows, .seq = s->b_seq,
                           .pos = s->b_pos, .ids = s->b_ids, .want = s->b_want,
                           .n_want = n_want, .n_release = s->n_release, .release = s->scratch,
                           .n_attach = s->n_attach, .attach = s->b_attach,
                           .n_publish = s->n_publish, .publish = s->b_publish};
    s->n_release = 0;
    return 1;
}

int cpm_sched_step_done(cpm_sched *s, uint64_t step, bool ok, const uint64_t **ret_seqs,
                        int *ret_n) {
    int r = 0;
    while (r < s->n_steps && s->steps[r].step != step)
        r++;
    if (r == s->n_steps)
        return CPM_ENOTFOUND;
    step_rec rec = s->steps[r];
    /* keep the records compact; the seqs arrays rotate with them */
    memmove(&s->steps[r], &s->steps[r + 1], (size_t)(s->n_steps - r - 1) * sizeof *s->steps);
    s->steps[--s->n_steps] = rec;
    int n_out = 0;
    for (int k = 0; k < rec.n; k++) {
        int i = find(s, rec.seqs[k]);
        if (i < 0)
            continue;
        seq *q = s->seqs[i];
        q->in_step = false;
        if (q->dead) {
            remove_at(s, i);
            continue;
        }
        if (!ok) {
            q->failed = true;
            q->wants = false;
        }
        s->scratch[n_out++] = q->id;
    }
    if (ret_seqs)
        *ret_seqs = s->scratch;
    if (ret_n)
        *ret_n = n_out;
    return 0;
}

int cpm_sched_push_token(cpm_sched *s, uint64_t id, int32_t token) {
    seq *q = get(s, id);
    if (!q || q->dead || q->failed)
        return CPM_ENOTFOUND;
    if (!q->wants || q->in_step || q->n_tok >= q->cap)
        return CPM_EINVAL;
    q->tok[q->n_tok++] = token;
    q->wants = false;
    return 0;
}

void *cpm_sched_owner(const cpm_sched *s, uint64_t id) {
    seq *q = get(s, id);
    return q ? q->owner : NULL;
}

const int32_t *cpm_sched_tokens(const cpm_sched *s, uint64_t id, int *ret_n) {
    seq *q = get(s, id);
    if (ret_n)
        *ret_n = q ? q->n_tok : 0;
    return q ? q->tok : NULL;
}

uint64_t cpm_sched_horizon(const cpm_sched *s) {
    if (s->next_seq <= 1)
        return 0;
    return (s->next_seq - 1) * (uint64_t)s->o.id_stride + (uint64_t)s->o.id_offset;
}

uint64_t cpm_sched_live(const cpm_sched *s, uint64_t *ids, int cap, int *ret_n) {
    *ret_n = 0;
    if (s->n_seqs > cap || s->next_seq <= 1)
        return 0; /* a partial list would free live sequences: none at all */
    for (int i = 0; i < s->n_seqs; i++)
        ids[i] = s->seqs[i]->id;
    *ret_n = s->n_seqs;
    return cpm_sched_horizon(s);
}

int cpm_sched_generated(const cpm_sched *s, uint64_t id) {
    seq *q = get(s, id);
    return q ? q->n_tok - q->n_prompt : -1;
}

bool cpm_sched_failed(const cpm_sched *s, uint64_t id) {
    seq *q = get(s, id);
    return q && q->failed;
}

void cpm_sched_get_stats(const cpm_sched *s, cpm_sched_stats *ret) {
    *ret = (cpm_sched_stats){.live = s->n_live, .queued = s->n_seqs - s->n_live,
                             .inflight = s->n_steps, .kv_reserved = s->kv_reserved,
                             .kv_tokens = s->o.kv_tokens, .steps = s->steps_sent,
                             .prefix_blocks_asked = s->prefix_asked,
                             .prefix_blocks_reused = s->prefix_reused};
}

int cpm_sched_cached_tokens(const cpm_sched *s, uint64_t id) {
    seq *q = get(s, id);
    return q ? q->cached : 0;
}

int cpm_sched_prefix_match(const cpm_sched *s, const int32_t *prompt, int n) {
    if (!s->dir)
        return 0;
    uint64_t prev = 0;
    int k = 0;
    for (; (k + 1) * KV_BLOCK < n; k++) { /* the last prompt token is always computed */
        prev = cpm_prefix_hash(prev, prompt + k * KV_BLOCK);
        if (!cpm_prefix_match(s->dir, &prev, 1))
            break;
    }
    return k;
}

void cpm_sched_prefix_forget(cpm_sched *s) {
    if (s->dir)
        cpm_prefix_clear(s->dir);
}
