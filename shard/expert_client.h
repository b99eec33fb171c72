/* expert_client.h - a stage's side of expert parallelism: the cpm_expert_backend that
 * sends a MoE layer's expert groups to the expert services owning them and waits.
 *
 * One DEALER per expert service. A call splits the groups by owning service (their
 * ranges tile the experts, and groups ascend, so each service gets one contiguous
 * slice of the rows), sends every request first - so the services compute in
 * parallel - then waits for all replies with zmq_poll until timeout_ms. A timeout,
 * an Error reply or a malformed reply fails the call, which fails the forward.
 *
 * Blocking and single-threaded by design: it runs on the compute thread inside
 * cpm_model_forward. The sockets are used by one job at a time; libuv's work queue
 * orders the jobs (a full barrier between them), which is what zmq asks for when a
 * socket moves between threads.
 *
 *   cpm_expert_peer peers[] = {{"tcp://h1:5600", 0, 4, "expert0"}, {"tcp://h2:5601", 4, 8, "expert1"}};
 *   cpm_expert_client_new(zctx, curve, peers, 2, hidden, 30000, &cl, &e);
 *   cpm_expert_backend b = cpm_expert_client_backend(cl);
 *   cpm_model_set_expert_backend(model, &b);
 */
#ifndef CPM_EXPERT_CLIENT_H
#define CPM_EXPERT_CLIENT_H

#include "common/error.h"
#include "services/common/curve.h"
#include "shard/engine/model/model.h"

typedef struct cpm_expert_client cpm_expert_client;

typedef struct cpm_expert_peer {
    const char *endpoint;    /* borrowed until cpm_expert_client_new returns */
    int begin, end;          /* experts [begin, end) it serves */
    const char *name;        /* for messages ("expert0"); may be NULL */
} cpm_expert_peer;

/* Connects one DEALER per peer. The ranges must tile [0, n_experts) in order (the
 * config checks that); hidden is the model's hidden size. */
int cpm_expert_client_new(void *zctx, const cpm_curve *curve, const cpm_expert_peer *peers, int n_peers, int hidden,
                          int timeout_ms, cpm_expert_client **ret, cpm_error *err);

/* The backend to install with cpm_model_set_expert_backend; valid while c lives. */
cpm_expert_backend cpm_expert_client_backend(cpm_expert_client *c);

/* Closes the sockets (pending requests are dropped). Accepts NULL. */
void cpm_expert_client_free(cpm_expert_client *c);

#endif
