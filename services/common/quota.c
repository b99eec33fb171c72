/* quota.c - per-peer and total bounds on a service's queue (see quota.h).
 *
 * A fixed table of senders with work held: a lookup is a scan of at most 64 entries
 * against a message that is about to wait for a model step, so it never shows. */
#include "quota.h"

#include <stdlib.h>
#include <string.h>

typedef struct holder {
    cpm_peer peer;
    int msgs;              /* 0: the slot is free */
    size_t bytes;
} holder;

struct cpm_quota {
    int max_msgs, peer_msgs;
    size_t max_bytes, peer_bytes;
    int msgs;
    size_t bytes;
    holder h[CPM_QUOTA_PEERS];
};

int cpm_quota_new(int max_msgs, size_t max_bytes, int peer_pct, cpm_quota **ret, cpm_error *err) {
    *ret = NULL;
    if (max_msgs < 1 || max_bytes < 1 || peer_pct < 1 || peer_pct > 100)
        return cpm_error_set(err, CPM_EINVAL, "quota: %d messages, %zu bytes, %d%% per peer", max_msgs,
                             max_bytes, peer_pct);
    cpm_quota *q = calloc(1, sizeof *q);
    if (!q)
        return cpm_error_set(err, CPM_ENOMEM, "quota");
    q->max_msgs = max_msgs;
    q->max_bytes = max_bytes;
    q->peer_msgs = (int)((long long)max_msgs * peer_pct / 100);
    if (q->peer_msgs < 1)
        q->peer_msgs = 1;
    q->peer_bytes = max_bytes / 100 * (size_t)peer_pct + max_bytes % 100 * (size_t)peer_pct / 100;
    *ret = q;
    return 0;
}

void cpm_quota_free(cpm_quota *q) {
    free(q);
}

static bool same(const cpm_peer *a, const cpm_peer *b) {
    return a->len == b->len && memcmp(a->id, b->id, a->len) == 0;
}

/* The peer's entry, or (add) a free one for it; NULL when none. */
static holder *find(cpm_quota *q, const cpm_peer *peer, bool add) {
    holder *free_slot = NULL;
    for (int i = 0; i < CPM_QUOTA_PEERS; i++) {
        holder *h = &q->h[i];
        if (h->msgs && same(&h->peer, peer))
            return h;
        if (!h->msgs && !free_slot)
            free_slot = h;
    }
    if (add && free_slot)
        free_slot->peer = *peer;
    return add ? free_slot : NULL;
}

int cpm_quota_take(cpm_quota *q, const cpm_peer *peer, size_t bytes, cpm_error *err) {
    if (q->msgs >= q->max_msgs || bytes > q->max_bytes - q->bytes)
        return cpm_error_set(err, CPM_ELIMIT, "busy: %d messages, %zu bytes queued (bounds %d, %zu)",
                             q->msgs, q->bytes, q->max_msgs, q->max_bytes);
    holder *h = find(q, peer, true);
    if (!h)
        return cpm_error_set(err, CPM_ELIMIT, "busy: %d senders have work queued", CPM_QUOTA_PEERS);
    if (h->msgs >= q->peer_msgs || bytes > q->peer_bytes - h->bytes)
        return cpm_error_set(err, CPM_ELIMIT, "busy: this sender holds %d messages, %zu bytes "
                             "(its share: %d, %zu)", h->msgs, h->bytes, q->peer_msgs, q->peer_bytes);
    h->msgs++;
    h->bytes += bytes;
    q->msgs++;
    q->bytes += bytes;
    return 0;
}

void cpm_quota_give(cpm_quota *q, const cpm_peer *peer, size_t bytes) {
    holder *h = find(q, peer, false);
    if (!h)
        return; /* not charged: nothing to return */
    h->msgs--;
    h->bytes = h->msgs ? h->bytes - (bytes < h->bytes ? bytes : h->bytes) : 0;
    q->msgs--;
    q->bytes -= bytes < q->bytes ? bytes : q->bytes;
}

void cpm_quota_held(const cpm_quota *q, int *ret_msgs, size_t *ret_bytes) {
    *ret_msgs = q->msgs;
    *ret_bytes = q->bytes;
}
