/* api_rpc.h - the internal ZeroMQ RPC front (proto/cpm.proto: Generate, Cancel, Health).
 *
 * A ROUTER socket; each GenerateRequest (prompt ids, sampling parameters, stop ids)
 * becomes a job whose sink answers with TokenEvent envelopes: one per new token when
 * streaming, and always one final event (finish reason, counts, or an Error). Token
 * ids in and out: no text. request_id names a request per client for Cancel.
 */
#ifndef CPM_API_RPC_H
#define CPM_API_RPC_H

#include <uv.h>

#include "front.h"
#include "../services/common/curve.h"

typedef struct cpm_api_rpc cpm_api_rpc;

/* Binds endpoint. ctx is borrowed; http_addr/http_port are told in Health replies. */
int cpm_api_rpc_new(uv_loop_t *loop, void *zctx, const cpm_curve *curve, const cpm_front_ctx *ctx, const char *endpoint,
                    cpm_api_rpc **ret, cpm_error *err);

/* Where the HTTP front listens, for Health replies (http_addr borrowed). */
void cpm_api_rpc_set_http(cpm_api_rpc *a, const char *http_addr, int http_port);

/* Closes the socket. Accepts NULL. */
void cpm_api_rpc_free(cpm_api_rpc *a);

#endif
