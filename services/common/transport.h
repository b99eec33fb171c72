/* transport.h - ZeroMQ sockets driven by a libuv loop, speaking cpm.v1 Envelopes.
 *
 * Every service's network edge: a cpm_sock wraps one zmq socket, watches its fd with
 * uv_poll (edge-triggered: drained until ZMQ_EVENTS shows no POLLIN), validates each
 * inbound message (cpm_wire_unpack) and hands it to a callback; bad messages get an
 * error reply (ROUTER) and are dropped, never crash. Sends never block the loop: at
 * the high-water mark they queue (bounded) and flush when the socket is writable.
 *
 *   void *z = zmq_ctx_new();
 *   cpm_sock_opts o = cpm_sock_opts_default();
 *   cpm_sock *s;
 *   cpm_sock_new(loop, z, ZMQ_ROUTER, &o, on_msg, self, &s, &e);
 *   cpm_sock_bind(s, "tcp://127.0.0.1:5560", &e);
 *   ... in on_msg(s, m, self): reply with cpm_sock_send(s, &m->peer, &reply_env, NULL, &e);
 *       then cpm_inmsg_free(m);
 *
 * All calls on a cpm_sock must come from its loop's thread (zmq sockets are not
 * thread-safe); worker threads hand results back with uv_async_send.
 */
#ifndef CPM_TRANSPORT_H
#define CPM_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <zmq.h>

#include "common/error.h"
#include "services/common/curve.h"
#include "services/common/wire.h"

typedef struct cpm_sock cpm_sock;

/* A ZeroMQ routing identity (ROUTER sockets); len 0 on other socket types. */
#define CPM_PEER_MAX 255
typedef struct cpm_peer {
    size_t len;
    uint8_t id[CPM_PEER_MAX];
} cpm_peer;

/* One validated inbound message. Owned by whoever receives it; free with cpm_inmsg_free.
 * The tensor frame stays valid (no copy) until then, so it can go to a worker thread. */
typedef struct cpm_inmsg {
    cpm_peer peer;         /* sender (ROUTER sockets) */
    cpm_envelope *env;     /* unpacked and validated */
    const void *tensor;    /* the frame after the envelope, or NULL */
    size_t tensor_size;
    zmq_msg_t tensor_msg;  /* private: keeps tensor alive */
} cpm_inmsg;

void cpm_inmsg_free(cpm_inmsg *m);

/* An outbound tensor frame. With free_fn set, zmq takes the buffer without copying and
 * calls free_fn(data, hint) when done (possibly from zmq's I/O thread); without it the
 * bytes are copied. */
typedef struct cpm_payload {
    void *data;
    size_t size;
    void (*free_fn)(void *data, void *hint);
    void *hint;
} cpm_payload;

typedef struct cpm_sock_opts {
    int64_t max_msg_size;  /* ZMQ_MAXMSGSIZE per frame (default 256 MiB) */
    int sndhwm, rcvhwm;    /* high-water marks in messages (default 1000) */
    int linger_ms;         /* on close (default 200) */
    int max_queue;         /* messages queued behind a full socket before sends fail (default 4096) */
    const char *identity;  /* DEALER identity, or NULL for a random one */
    const cpm_curve *curve; /* the fabric's keys: CurveZMQ on bind and connect; NULL = plain text */
    const char *admit;     /* listening: who may connect, CPM_CURVE_FABRIC (default) or _RPC */
} cpm_sock_opts;

cpm_sock_opts cpm_sock_opts_default(void);

/* m is owned by the callback (free with cpm_inmsg_free). */
typedef void (*cpm_sock_msg_cb)(cpm_sock *s, cpm_inmsg *m, void *user);

/* Called for each inbound message that failed validation (after the error reply, if
 * any, was sent); for counting or logging. err says what was wrong. */
typedef void (*cpm_sock_bad_cb)(cpm_sock *s, const cpm_error *err, void *user);

/* Creates a socket of type (ZMQ_ROUTER, ZMQ_DEALER, ...) on zctx, watched by loop.
 * opts may be NULL. *ret is freed with cpm_sock_free. */
int cpm_sock_new(uv_loop_t *loop, void *zctx, int type, const cpm_sock_opts *opts,
                 cpm_sock_msg_cb on_msg, void *user, cpm_sock **ret, cpm_error *err);

void cpm_sock_set_bad_cb(cpm_sock *s, cpm_sock_bad_cb cb);

/* endpoint: "tcp://host:port", "ipc://path" or "inproc://name". cpm_sock_bind takes the
 * endpoint peers reach the service at and listens where cpm_endpoint_listen says. */
int cpm_sock_bind(cpm_sock *s, const char *endpoint, cpm_error *err);
int cpm_sock_connect(cpm_sock *s, const char *endpoint, cpm_error *err);

/* Sends env (+ tensor frame) to peer (ROUTER; NULL otherwise). env->version is set here.
 * Returns CPM_ECLOSED when a ROUTER's peer is gone, CPM_ELIMIT when the queue behind a
 * full socket is full. The payload is consumed (freed) whatever the outcome. */
int cpm_sock_send(cpm_sock *s, const cpm_peer *peer, cpm_envelope *env, cpm_payload *tensor,
                  cpm_error *err);

/* Like cpm_sock_send for an Envelope already packed (by a worker thread): buf is
 * malloc'd and consumed, as is the tensor. */
int cpm_sock_send_packed(cpm_sock *s, const cpm_peer *peer, uint8_t *buf, size_t size,
                         cpm_payload *tensor, cpm_error *err);

/* Sends an Envelope{error} with corr to peer. */
int cpm_sock_send_error(cpm_sock *s, const cpm_peer *peer, uint64_t corr, int code,
                        const char *msg, cpm_error *err);

/* Sends an Envelope{health} with corr to peer: the one place a health reply is wrapped. */
int cpm_sock_send_health(cpm_sock *s, const cpm_peer *peer, uint64_t corr, Cpm__V1__Health *h,
                         cpm_error *err);

/* Request with timeout: sets env->corr to a fresh id, sends, and calls cb exactly once:
 * with the reply (owned by cb) and status 0, or with NULL and CPM_ETIMEDOUT after
 * timeout_ms, or CPM_ECLOSED when the socket is freed first. Replies whose corr matches
 * no pending call go to the socket's on_msg. */
typedef void (*cpm_sock_reply_cb)(cpm_sock *s, cpm_inmsg *reply, int status, void *user);
int cpm_sock_call(cpm_sock *s, cpm_envelope *env, cpm_payload *tensor, int timeout_ms,
                  cpm_sock_reply_cb cb, void *user, cpm_error *err);

/* Messages waiting behind a full socket (for queue-depth metrics). */
int cpm_sock_queued(const cpm_sock *s);

/* The underlying zmq socket, for options not wrapped here. */
void *cpm_sock_zmq(cpm_sock *s);

/* Closes the zmq socket now and releases the rest once libuv has closed its handles
 * (the loop must run once more). Pending calls get CPM_ECLOSED. Accepts NULL. */
void cpm_sock_free(cpm_sock *s);

/* The address a service binds for the endpoint peers reach it at. A host name cannot be
 * bound (and in a container or pod it names the Service, not an interface), so
 * tcp://NAME:PORT listens on every interface (the * host); "localhost" listens on
 * 127.0.0.1; IP addresses and ipc:// paths are bound as written. */
void cpm_endpoint_listen(const char *endpoint, char *out, size_t size);

/* Every connecting socket: a connect attempt gives up after CPM_SOCK_CONNECT_MS (then the
 * name is resolved again: a pod back at a new address is found within seconds, not after
 * the kernel's ~2 min of SYN retries to the old one), ZMTP heartbeats every
 * CPM_SOCK_HEARTBEAT_MS drop a peer silent for three (a host that vanished), and the
 * CURVE client options (curve NULL: plain text). Before zmq_connect; cpm_sock_connect
 * and cpm_rpc_call apply it, the compute threads' raw sockets call it. */
#define CPM_SOCK_CONNECT_MS 1000
#define CPM_SOCK_HEARTBEAT_MS 1000
int cpm_sock_dial_opts(void *zsock, const cpm_curve *curve, cpm_error *err);

/* Sets the CURVE options of a raw zmq socket (for the few sockets not wrapped in a
 * cpm_sock): before zmq_bind with listen, before zmq_connect without. No-op when curve is
 * NULL (plain text). */
int cpm_sock_secure(void *zsock, const cpm_curve *curve, bool listen, const char *admit,
                    cpm_error *err);

/* Blocking one-shot request for tools and tests (no loop): connects a DEALER to
 * endpoint (with curve's keys unless NULL), sends env (+ tensor), waits up to timeout_ms
 * for the reply. On success
 * *ret is owned by the caller. CPM_ETIMEDOUT names the endpoint. */
int cpm_rpc_call(void *zctx, const cpm_curve *curve, const char *endpoint, cpm_envelope *env,
                 cpm_payload *tensor, int timeout_ms, cpm_inmsg **ret, cpm_error *err);

#endif
