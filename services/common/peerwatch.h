/* peerwatch.h - is the peer at the other end of a connecting zmq socket there?
 *
 * For the compute threads' plain sockets (expert client, TP mesh and fan-out), which
 * wait for a peer inside a forward pass: without this, a peer that died makes them
 * wait for the whole compute deadline (router.timeout_ms, 30 s by default). A watch
 * reads the socket's monitor events: the link is up once a handshake succeeds and
 * down at a disconnect, which the kernel reports at once when the peer's process dies
 * (and the ZMTP heartbeats cpm_sock_dial_opts turns on, within 3 s, when its host does).
 *
 *   void *s = zmq_socket(zctx, ZMQ_DEALER);
 *   cpm_peerwatch_new(zctx, s, &w, &e);        // before zmq_connect
 *   zmq_connect(s, endpoint);
 *   unsigned drops = cpm_peerwatch_drops(w);   // a call starts
 *   ... zmq_poll on s and cpm_peerwatch_socket(w); cpm_peerwatch_update(w);
 *   if (cpm_peerwatch_drops(w) != drops) fail("connection lost");
 *   cpm_peerwatch_free(w); zmq_close(s);
 *
 * Not thread-safe: one thread uses the socket and its watch.
 */
#ifndef CPM_PEERWATCH_H
#define CPM_PEERWATCH_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

#define CPM_PEERWATCH_GRACE_MS 1000 /* how long a call waits for a link that is down */

typedef struct cpm_peerwatch cpm_peerwatch;

/* Watches zsock (a connecting socket of context zctx). Call before zmq_connect. */
int cpm_peerwatch_new(void *zctx, void *zsock, cpm_peerwatch **ret, cpm_error *err);

/* Readable (ZMQ_POLLIN) when an event waits: poll it beside the data socket. */
void *cpm_peerwatch_socket(const cpm_peerwatch *w);

/* Reads the events that wait, without blocking. */
void cpm_peerwatch_update(cpm_peerwatch *w);

/* Whether a handshake has succeeded since the last disconnect. */
bool cpm_peerwatch_up(const cpm_peerwatch *w);

/* The deadline for a send on the watched socket (hrtime ns): the call's own, or
 * CPM_PEERWATCH_GRACE_MS from now when the link is down (a peer that died must not hold
 * the caller for the whole deadline). Reads the waiting events first. */
uint64_t cpm_peerwatch_deadline(cpm_peerwatch *w, uint64_t deadline);

/* Disconnects seen so far: a call that saw a change lost its peer. */
unsigned cpm_peerwatch_drops(const cpm_peerwatch *w);

/* Stops watching (before zsock is closed). Accepts NULL. */
void cpm_peerwatch_free(cpm_peerwatch *w);

#endif
