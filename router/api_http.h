/* api_http.h - the OpenAI-compatible HTTP front.
 *
 * Routes: POST /v1/completions and /v1/chat/completions (openai.h parses and renders;
 * each accepted request becomes a job whose sink answers as one JSON response or as
 * an SSE stream ending in `data: [DONE]`), GET /v1/models, /health, /ready (the
 * service table), /metrics (Prometheus). A client that disconnects cancels its job.
 */
#ifndef CPM_API_HTTP_H
#define CPM_API_HTTP_H

#include <uv.h>

#include "front.h"

typedef struct cpm_api_http cpm_api_http;

/* Listens on addr:port (0: any free port). ctx is borrowed. */
int cpm_api_http_new(uv_loop_t *loop, const cpm_front_ctx *ctx, const char *addr, int port,
                     cpm_api_http **ret, cpm_error *err);

/* The bound port, or -1. */
int cpm_api_http_port(const cpm_api_http *a);

/* Closes the listener and every connection; done(ud) when closed. Accepts NULL. */
void cpm_api_http_close(cpm_api_http *a, void (*done)(void *ud), void *ud);

#endif
