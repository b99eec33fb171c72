/* request.c - request state edges and the stop-string matcher. */
#include "request.h"

#include <stdlib.h>
#include <string.h>

const char *cpm_req_state_name(cpm_req_state s) {
    static const char *const names[] = {"queued",   "prefilling", "decoding",
                                        "finished", "cancelled",  "failed"};
    return (unsigned)s < sizeof names / sizeof *names ? names[s] : "unknown";
}

bool cpm_req_state_terminal(cpm_req_state s) {
    return s == CPM_REQ_FINISHED || s == CPM_REQ_CANCELLED || s == CPM_REQ_FAILED;
}

int cpm_req_transition(cpm_req_state *s, cpm_req_state to) {
    static const bool edge[6][6] = {
        /*                 Q  P  D  F  C  X */
        [CPM_REQ_QUEUED] = {0, 1, 0, 0, 1, 1},
        [CPM_REQ_PREFILLING] = {0, 0, 1, 1, 1, 1},
        [CPM_REQ_DECODING] = {0, 0, 0, 1, 1, 1},
    };
    if ((unsigned)*s >= 6 || (unsigned)to >= 6 || !edge[*s][to])
        return CPM_EINVAL;
    *s = to;
    return 0;
}

struct cpm_stopper {
    int n;
    char **stops;
    size_t *lens;
    char *held; /* text not yet shown (could start a stop string) */
    size_t held_len, held_cap;
    char *out;
    size_t out_cap;
    bool stopped;
    bool include; /* the output keeps the stop string that ended it */
};

cpm_stopper *cpm_stopper_new(char *const *stops, int n, bool include) {
    cpm_stopper *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->include = include;
    s->stops = calloc((size_t)n + 1, sizeof *s->stops);
    s->lens = calloc((size_t)n + 1, sizeof *s->lens);
    if (!s->stops || !s->lens) {
        cpm_stopper_free(s);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        if (!stops[i][0])
            continue; /* an empty stop string would match before any text */
        if (!(s->stops[s->n] = strdup(stops[i]))) {
            cpm_stopper_free(s);
            return NULL;
        }
        s->lens[s->n] = strlen(stops[i]);
        s->n++;
    }
    return s;
}

void cpm_stopper_free(cpm_stopper *s) {
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        free(s->stops[i]);
    free(s->stops);
    free(s->lens);
    free(s->held);
    free(s->out);
    free(s);
}

static int reserve(char **buf, size_t *cap, size_t need) {
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    char *nb = realloc(*buf, c);
    if (!nb)
        return CPM_ENOMEM;
    *buf = nb;
    *cap = c;
    return 0;
}

/* Longest suffix of t[0..n) that is a proper prefix of some stop string. */
static size_t partial_tail(const cpm_stopper *s, const char *t, size_t n) {
    size_t best = 0;
    for (int i = 0; i < s->n; i++) {
        size_t max = s->lens[i] - 1 < n ? s->lens[i] - 1 : n;
        for (size_t k = max; k > best; k--)
            if (memcmp(t + n - k, s->stops[i], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

int cpm_stopper_feed(cpm_stopper *s, const char *text, size_t len, const char **ret_out,
                     size_t *ret_len, bool *ret_stopped) {
    *ret_out = "";
    *ret_len = 0;
    *ret_stopped = s->stopped;
    if (s->stopped)
        return 0;
    if (reserve(&s->held, &s->held_cap, s->held_len + len + 1))
        return CPM_ENOMEM;
    memcpy(s->held + s->held_len, text, len);
    s->held_len += len;
    /* the earliest stop string wins (the longest, of those starting there) */
    size_t cut = s->held_len, hit_len = 0;
    for (int i = 0; i < s->n; i++) {
        const char *hit = memmem(s->held, s->held_len, s->stops[i], s->lens[i]);
        size_t at = hit ? (size_t)(hit - s->held) : 0;
        if (hit && (at < cut || (at == cut && s->lens[i] > hit_len))) {
            cut = at;
            hit_len = s->lens[i];
            s->stopped = true;
        }
    }
    if (s->stopped && s->include)
        cut += hit_len;
    size_t show = s->stopped ? cut : s->held_len - partial_tail(s, s->held, s->held_len);
    if (reserve(&s->out, &s->out_cap, show + 1))
        return CPM_ENOMEM;
    memcpy(s->out, s->held, show);
    s->out[show] = '\0';
    memmove(s->held, s->held + show, s->held_len - show);
    s->held_len = s->stopped ? 0 : s->held_len - show;
    *ret_out = s->out;
    *ret_len = show;
    *ret_stopped = s->stopped;
    return 0;
}

void cpm_stopper_flush(cpm_stopper *s, const char **ret_out, size_t *ret_len) {
    /* held is always big enough to hand out as it is */
    *ret_out = s->held ? s->held : "";
    *ret_len = s->stopped ? 0 : s->held_len;
    s->held_len = 0;
}
