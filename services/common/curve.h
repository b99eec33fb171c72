/* curve.h - the fabric's security: CurveZMQ keys and the ZAP handler that admits peers.
 *
 * Every ZeroMQ socket of the cluster is encrypted and authenticated with CURVE
 * (libzmq 4.3 + libsodium). One key directory (`cpm-cluster keys DIR`) holds:
 *
 *   fabric.pub, fabric.secret      the cluster's own keypair: every service listens
 *                                  with it and connects with it, so a service proves it
 *                                  belongs to the cluster by holding fabric.secret
 *   client-NAME.pub                an outside caller of the router's RPC (another service);
 *   client-NAME.secret             its secret goes to that caller, not to the cluster
 *
 * A listening socket says which callers it admits (a ZAP domain): the fabric
 * (services only) or the RPC (services and client keys). Anyone else finishes no
 * handshake: libzmq asks the ZAP handler (one thread per zmq context, started by
 * cpm_curve_attach before any socket listens), which refuses and logs the peer.
 *
 *   cpm_curve *c;
 *   if (cpm_curve_load("keys", &c, &e)) die(e.msg);
 *   if (cpm_curve_attach(c, zctx, log, &e)) die(e.msg);   // before any bind
 *   ... cpm_sock_opts o = cpm_sock_opts_default(); o.curve = c; ...
 *   zmq_ctx_term(zctx); cpm_curve_free(c);
 */
#ifndef CPM_CURVE_H
#define CPM_CURVE_H

#include <stdbool.h>

#include "common/error.h"
#include "services/common/log.h"

/* ZAP domains: who may connect to a listening socket. */
#define CPM_CURVE_FABRIC "cpm-fabric" /* the cluster's own services */
#define CPM_CURVE_RPC "cpm-rpc"       /* services and the client keys */

#define CPM_CURVE_KEY_Z85 40 /* a key in Z85 text, without the terminating NUL */
#define CPM_CURVE_MAX_CLIENTS 256

typedef struct cpm_curve cpm_curve;

/* Writes DIR/fabric.{pub,secret} when absent (DIR is created 0700, secrets 0600) and,
 * with client != NULL, DIR/client-CLIENT.{pub,secret}. Existing keys are kept: the
 * command is safe to repeat. *created tells whether anything was written. */
int cpm_curve_generate(const char *dir, const char *client, bool *created, cpm_error *err);

/* Reads DIR's fabric keypair and every client-*.pub. Errors name the file and say how
 * to make the keys. */
int cpm_curve_load(const char *dir, cpm_curve **ret, cpm_error *err);

/* Reads a client's keypair (DIR/client-NAME.{pub,secret}) and the fabric's public key:
 * what an outside caller needs to reach the router's RPC. */
int cpm_curve_load_client(const char *dir, const char *name, cpm_curve **ret, cpm_error *err);

/* Starts the ZAP handler on zctx (once per context, before any socket listens).
 * Refusals are logged through log (may be NULL). */
int cpm_curve_attach(cpm_curve *c, void *zctx, const cpm_log *log, cpm_error *err);

/* Socket options before zmq_bind: CURVE server with the fabric keypair, admitting the
 * callers of domain (CPM_CURVE_FABRIC or CPM_CURVE_RPC). */
int cpm_curve_listen(const cpm_curve *c, void *zsock, const char *domain, cpm_error *err);

/* Socket options before zmq_connect: CURVE client with this process's keypair, trusting
 * the fabric's public key. */
int cpm_curve_dial(const cpm_curve *c, void *zsock, cpm_error *err);

/* Handshakes refused so far (for metrics and tests). */
long cpm_curve_refused(const cpm_curve *c);

/* Stops the ZAP handler and frees. Call after the sockets are closed. Accepts NULL. */
void cpm_curve_free(cpm_curve *c);

#endif
