/* job_sink.c - the recording job sink of the router's unit tests. */
#include "job_sink.h"

#include <stdio.h>
#include <string.h>

static rec *rec_of(const cpm_job *j) {
    return j->sink_ud;
}

static void begin(cpm_job *j) {
    rec_of(j)->begins++;
}

static void delta(cpm_gen *g, const char *text, size_t len, const char *finish, int upto) {
    rec_gen *r = &rec_of(g->job)->gens[g->index];
    if (len && r->len + len < sizeof r->text) {
        memcpy(r->text + r->len, text, len);
        r->len += len;
        r->text[r->len] = '\0';
    }
    r->deltas++;
    r->upto = upto;
    g->n_emitted_ids = upto > g->n_emitted_ids ? upto : g->n_emitted_ids;
    if (finish) {
        r->finish = finish;
        r->finishes++;
    }
}

static void done(cpm_job *j) {
    rec_of(j)->dones++;
    rec_of(j)->finals++;
}

static void fail(cpm_job *j, const cpm_job_error *e) {
    rec_of(j)->fails++;
    rec_of(j)->finals++;
    rec *r = rec_of(j);
    r->last_status = e->status;
    snprintf(r->last_code, sizeof r->last_code, "%s", e->code ? e->code : "");
    snprintf(r->last_msg, sizeof r->last_msg, "%s", e->msg ? e->msg : "");
}

static void cancelled(cpm_job *j) {
    rec_of(j)->cancels++;
    rec_of(j)->finals++;
}

static void free_rec(void *ud) {
    ((rec *)ud)->frees++;
}

const cpm_job_sink rec_sink = {begin, delta, done, fail, cancelled, free_rec};
