/* peerwatch.c - a connecting socket's link state from its monitor events. */
#include "peerwatch.h"

#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zmq.h>

struct cpm_peerwatch {
    void *zsock; /* the watched socket (borrowed) */
    void *mon;   /* PAIR connected to its monitor endpoint */
    bool up;
    unsigned drops;
};

int cpm_peerwatch_new(void *zctx, void *zsock, cpm_peerwatch **ret, cpm_error *err) {
    *ret = NULL;
    cpm_peerwatch *w = calloc(1, sizeof *w);
    if (!w)
        return cpm_error_set(err, CPM_ENOMEM, "peer watch");
    /* inproc names are per context, and a closed monitor's name may linger for a moment:
     * a process-wide counter never reuses one (the only state shared between watches). */
    static atomic_ulong next_id;
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://cpm-peerwatch-%lu", atomic_fetch_add(&next_id, 1));
    int zero = 0, events = ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED;
    w->zsock = zsock;
    if (zmq_socket_monitor(zsock, ep, events) || !(w->mon = zmq_socket(zctx, ZMQ_PAIR)) ||
        zmq_setsockopt(w->mon, ZMQ_LINGER, &zero, sizeof zero) || zmq_connect(w->mon, ep)) {
        int rc = cpm_error_set(err, CPM_EIO, "peer watch: %s", zmq_strerror(zmq_errno()));
        cpm_peerwatch_free(w);
        return rc;
    }
    *ret = w;
    return 0;
}

void *cpm_peerwatch_socket(const cpm_peerwatch *w) {
    return w->mon;
}

/* One event: a 6-byte frame (uint16 event, uint32 value), then the endpoint. */
static bool read_event(cpm_peerwatch *w, uint16_t *ret) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, w->mon, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return false;
    }
    bool ok = zmq_msg_size(&m) >= 2;
    if (ok)
        memcpy(ret, zmq_msg_data(&m), sizeof *ret);
    while (zmq_msg_more(&m)) { /* the endpoint frame */
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->mon, 0) < 0)
            break;
    }
    zmq_msg_close(&m);
    return ok;
}

void cpm_peerwatch_update(cpm_peerwatch *w) {
    uint16_t ev;
    while (read_event(w, &ev)) {
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED)
            w->up = true;
        else if (ev == ZMQ_EVENT_DISCONNECTED) {
            w->up = false;
            w->drops++;
        }
    }
}

bool cpm_peerwatch_up(const cpm_peerwatch *w) {
    return w->up;
}

uint64_t cpm_peerwatch_deadline(cpm_peerwatch *w, uint64_t deadline) {
    cpm_peerwatch_update(w);
    uint64_t grace = uv_hrtime() + (uint64_t)CPM_PEERWATCH_GRACE_MS * 1000000u;
    return w->up || grace > deadline ? deadline : grace;
}

unsigned cpm_peerwatch_drops(const cpm_peerwatch *w) {
    return w->drops;
}

void cpm_peerwatch_free(cpm_peerwatch *w) {
    if (!w)
        return;
    zmq_socket_monitor(w->zsock, NULL, 0);
    if (w->mon)
        zmq_close(w->mon);
    free(w);
}
