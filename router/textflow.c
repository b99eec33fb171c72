/* textflow.c - detokenize windows, stop strings, logprob texts, the end of a gen. */
#include "textflow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cpm_textflow {
    cpm_textflow_io io;
    cpm_metrics *m; /* may be NULL */
};

/* One tokenizer call in flight for gen g (i: the token of a Pieces call). */
typedef struct flow_call {
    cpm_textflow *tf;
    cpm_gen *g;
    int i;
} flow_call;

cpm_textflow *cpm_textflow_new(const cpm_textflow_io *io, cpm_metrics *m) {
    cpm_textflow *tf = calloc(1, sizeof *tf);
    if (tf) {
        tf->io = *io;
        tf->m = m;
    }
    return tf;
}

void cpm_textflow_free(cpm_textflow *tf) {
    free(tf);
}

static void text_pump(cpm_textflow *tf, cpm_gen *g);
static int lp_fetch(cpm_textflow *tf, cpm_gen *g, int i);

static flow_call *call_new(cpm_textflow *tf, cpm_gen *g, int i) {
    flow_call *c = malloc(sizeof *c);
    if (c)
        *c = (flow_call){tf, g, i};
    return c;
}

/* What to do with a tokenizer call's answer. */
typedef enum call_outcome {
    CALL_OK,    /* use it */
    CALL_RETRY, /* the tokenizer was lost or timed out: ask again (another replica) */
    CALL_GONE,  /* g can no longer use it (its job may be freed) */
} call_outcome;

/* A tokenizer call for g came back and lets go of its job. */
static call_outcome call_back(cpm_textflow *tf, cpm_gen *g, const cpm_tokc_result *res) {
    cpm_job *j = g->job;
    bool gone = cpm_job_answered(j) || cpm_req_state_terminal(g->state);
    cpm_job_drop(j); /* frees only an answered job */
    if (gone)
        return CALL_GONE;
    if (res->status == 0) {
        g->tok_attempts = 0;
        return CALL_OK;
    }
    bool lost = res->status == CPM_ETIMEDOUT || res->status == CPM_ECLOSED;
    if (lost && ++g->tok_attempts < CPM_TEXTFLOW_ATTEMPTS) {
        if (tf->m)
            tf->m->retries++;
        return CALL_RETRY;
    }
    cpm_job_fail(j, 503, "server_error", "tokenizer_error", res->msg);
    return CALL_GONE;
}

/* ---- the end of a gen --------------------------------------------------------------- */

/* Generation and text are both over: flush held text, tell the sink, maybe answer. */
static void gen_text_done(cpm_gen *g) {
    const char *out = "";
    size_t len = 0;
    if (!g->text_stopped)
        cpm_stopper_flush(g->stopper, &out, &len);
    const char *reason = g->text_stopped ? "stop" : g->gen_end;
    cpm_gen_finish(g, CPM_REQ_FINISHED, reason);
    g->job->sink->delta(g, out, len, g->finish, g->n_gen);
    cpm_job_done(g->job);
}

/* ---- detokenize windows ------------------------------------------------------------- */

/* Where the next Detokenize window ends, or 0 when there is nothing to send. With stop
 * strings, one new id at a time, so the id that completes a stop string is known and
 * nothing after it is returned; otherwise every id sampled so far. */
static int window_end(const cpm_gen *g) {
    if (g->text_stopped || g->n_text >= g->n_textable || g->n_tried >= g->n_textable)
        return 0; /* done, or waiting for ids that complete a character */
    int from = g->n_tried > g->n_text ? g->n_tried : g->n_text;
    return g->job->n_stops > 0 ? from + 1 : g->n_textable;
}

static void on_detok(void *user, const cpm_tokc_result *res) {
    flow_call *c = user;
    cpm_textflow *tf = c->tf;
    cpm_gen *g = c->g;
    free(c);
    g->detok_busy = false;
    call_outcome got = call_back(tf, g, res);
    if (got == CALL_RETRY) {
        g->n_tried = g->n_text; /* the same window again */
        text_pump(tf, g);
        return;
    }
    if (got == CALL_GONE)
        return;
    g->n_text += (int)res->consumed;
    const char *out;
    size_t len;
    bool stopped = false;
    cpm_stopper_feed(g->stopper, res->text, res->text_len, &out, &len, &stopped);
    if (stopped) {
        /* the ids sampled after the stop string are dropped, as if never generated */
        g->text_stopped = true;
        g->n_gen = g->n_textable = g->n_text;
        if (!g->gen_end)
            g->gen_end = "stop";
        cpm_gen_release(g);
    }
    g->job->sink->delta(g, out, len, NULL, g->n_text);
    text_pump(tf, g);
    tf->io.kick(tf->io.ud);
}

/* Sends ids up to end: a few ids of context (the prompt's tail at first, so the first
 * token's leading space comes out as it does after the prompt), then the new ids. */
static int send_window(cpm_textflow *tf, cpm_gen *g, int end, cpm_error *e) {
    cpm_job *j = g->job;
    int start = g->n_text > CPM_TEXTFLOW_CONTEXT ? g->n_text - CPM_TEXTFLOW_CONTEXT : 0;
    int plen = j->prompt_len[g->prompt];
    int n_ctx = start == 0 ? CPM_TEXTFLOW_CONTEXT - g->n_text : 0;
    n_ctx = n_ctx < plen ? n_ctx : plen;
    int n = n_ctx + end - start;
    int32_t *win = malloc((size_t)n * sizeof *win);
    flow_call *c = call_new(tf, g, 0);
    if (!win || !c) {
        free(win), free(c);
        return cpm_error_set(e, CPM_ENOMEM, "out of memory");
    }
    memcpy(win, j->prompt_ids[g->prompt] + plen - n_ctx, (size_t)n_ctx * sizeof *win);
    memcpy(win + n_ctx, g->ids + start, (size_t)(end - start) * sizeof *win);
    int rc = tf->io.detok(tf->io.ud, win, (size_t)n, (size_t)(n_ctx + g->n_text - start),
                          j->skip_special, on_detok, c, e);
    free(win);
    if (rc) {
        free(c);
        return rc;
    }
    g->n_tried = end;
    g->detok_busy = true;
    cpm_job_hold(j);
    return 0;
}

/* Moves g's text forward: asks for the next ids' text, shows what is known, and ends g
 * when generation and text are both over. */
static void text_pump(cpm_textflow *tf, cpm_gen *g) {
    cpm_job *j = g->job;
    if (cpm_job_answered(j) || cpm_req_state_terminal(g->state) || g->detok_busy)
        return;
    int end = window_end(g);
    if (end && !j->want_text) {
        g->n_text = g->n_tried = g->n_textable; /* ids only: they are the text */
    } else if (end) {
        cpm_error e = {0};
        if (send_window(tf, g, end, &e))
            cpm_job_fail(j, 503, "server_error", "tokenizer_error", e.msg);
        return;
    }
    j->sink->delta(g, "", 0, NULL, g->n_text); /* ids and logprobs without new text */
    if (g->gen_end && g->lp_pending == 0 && !window_end(g))
        gen_text_done(g);
}

/* ---- token texts for logprobs ---------------------------------------------------------- */

static void lp_advance(cpm_gen *g) {
    while (g->n_lp_ready < g->n_gen && g->lps[g->n_lp_ready].pending == 0)
        g->n_lp_ready++;
}

/* The texts of token i and of its alternatives, from one Pieces reply. */
static void on_piece(void *user, const cpm_tokc_result *res) {
    flow_call *c = user;
    cpm_textflow *tf = c->tf;
    cpm_gen *g = c->g;
    int i = c->i;
    cpm_tok_lp *t = &g->lps[i];
    free(c);
    g->lp_pending--;
    t->pending--;
    call_outcome got = call_back(tf, g, res);
    if (got == CALL_RETRY)
        lp_fetch(tf, g, i);
    if (got != CALL_OK)
        return;
    /* tokclient checked one text per id sent: the chosen token, then t->n_top alternatives */
    for (size_t k = 0; k < res->n_texts && k <= (size_t)t->n_top; k++) {
        char **dst = k == 0 ? &t->text : &t->top_text[k - 1];
        free(*dst);
        *dst = strndup(res->texts[k], res->texts_len[k]);
    }
    lp_advance(g);
    text_pump(tf, g);
}

/* Asks, in one call, for the text of token i and of its alternatives, each in the
 * context of the token before it (so a word-initial space shows, as in the decoded
 * text). Nonzero when the job failed (and may be freed). */
static int lp_fetch(cpm_textflow *tf, cpm_gen *g, int i) {
    cpm_job *j = g->job;
    cpm_tok_lp *t = &g->lps[i];
    if (!j->want_text) {
        lp_advance(g); /* no texts: ids stand in */
        return 0;
    }
    int32_t ctx = i > 0 ? g->ids[i - 1] : j->prompt_ids[g->prompt][j->prompt_len[g->prompt] - 1];
    int32_t cand[1 + CPM_JOB_MAX_TOP];
    cand[0] = t->id;
    memcpy(cand + 1, t->top_ids, (size_t)t->n_top * sizeof *cand);
    flow_call *c = call_new(tf, g, i);
    cpm_error e = {0};
    if (!c)
        cpm_error_set(&e, CPM_ENOMEM, "out of memory");
    if (!c || tf->io.pieces(tf->io.ud, ctx, cand, (size_t)t->n_top + 1, on_piece, c, &e)) {
        free(c);
        cpm_job_fail(j, 503, "server_error", "tokenizer_error", e.msg);
        return CPM_EIO;
    }
    t->pending++;
    g->lp_pending++;
    cpm_job_hold(j);
    return 0;
}

void cpm_textflow_token(cpm_textflow *tf, cpm_gen *g, bool stop_id, const char *end) {
    if (end) {
        g->gen_end = end;
        cpm_gen_release(g);
    }
    g->n_textable = g->n_gen - (stop_id ? 1 : 0); /* the stop token is not shown as text */
    if (g->job->logprobs && lp_fetch(tf, g, g->n_gen - 1))
        return;
    text_pump(tf, g);
}
