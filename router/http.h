/* http.h - the router's HTTP/1.1 server on a libuv loop (parsing by libhttp-parser).
 *
 * First hop of every client request: bytes from a TCP client become a
 * cpm_http_request handed to one handler callback; the handler answers with one
 * complete response or a chunked stream (SSE). Keep-alive and pipelining are
 * safe: requests on one connection are handled strictly one after another.
 *
 *   cpm_http_server *s;
 *   cpm_http_server_new(loop, NULL, on_request, app, &s, &err);
 *   cpm_http_server_listen(s, "127.0.0.1", 8080, &err);
 *   ...
 *   static void on_request(void *app, cpm_http_conn *c, const cpm_http_request *r) {
 *       cpm_http_respond(c, 200, "application/json", "{}", 2, NULL);
 *   }
 *
 * Contract ("one exchange"): every request given to the handler must be finished
 * exactly once, by cpm_http_respond or by cpm_http_stream_end, even when the
 * client went away (the abort callback says so; the calls then return
 * CPM_ECLOSED but still end the exchange). The connection's memory lives until
 * then, so a handler may keep its cpm_http_conn pointer across loop turns.
 */
#ifndef CPM_HTTP_H
#define CPM_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "../common/error.h"

typedef struct cpm_http_server cpm_http_server;
typedef struct cpm_http_conn cpm_http_conn;

typedef struct cpm_http_limits {
    size_t max_header_bytes;    /* request line + all header fields and values (431 beyond) */
    int max_headers;            /* header lines (431 beyond) */
    size_t max_body;            /* decoded body bytes, Content-Length or chunked (413 beyond) */
    uint64_t request_timeout_ms; /* from a request's first byte to its last (408 beyond) */
    uint64_t idle_timeout_ms;   /* keep-alive connection with nothing to do is closed */
    size_t max_write_queue;     /* bytes queued to a client that does not read: it is dropped */
    int max_connections;        /* beyond: the oldest idle keep-alive connection is closed to
                                   make room; with none idle, the new client gets a 503 */
    size_t max_body_total;      /* request bodies held by all connections together (503 beyond) */
} cpm_http_limits;

cpm_http_limits cpm_http_limits_default(void);

typedef struct cpm_http_header {
    const char *name;
    const char *value;
} cpm_http_header;

/* One parsed request. Every pointer stays valid until the exchange is finished. */
typedef struct cpm_http_request {
    const char *method;          /* "GET", "POST", ... */
    const char *path;            /* URL path, without the query */
    const char *query;           /* text after '?', "" when none */
    int n_headers;
    const cpm_http_header *headers;
    const char *body;            /* NUL-terminated for convenience; may hold NULs itself */
    size_t body_len;
    int http_major, http_minor;
    bool keep_alive;             /* the connection stays open after this exchange */
} cpm_http_request;

/* Case-insensitive header look-up; NULL when absent. */
const char *cpm_http_request_header(const cpm_http_request *r, const char *name);

typedef void (*cpm_http_handler)(void *ud, cpm_http_conn *c, const cpm_http_request *r);

/* Creates a server on loop. lim may be NULL (defaults). handler is called on the
 * loop thread for each complete request. */
int cpm_http_server_new(uv_loop_t *loop, const cpm_http_limits *lim, cpm_http_handler handler,
                        void *ud, cpm_http_server **ret, cpm_error *err);

/* Binds and listens on host:port (port 0 picks a free one; see cpm_http_server_port). */
int cpm_http_server_listen(cpm_http_server *s, const char *host, int port, cpm_error *err);

/* The bound port, or -1 before listen. */
int cpm_http_server_port(const cpm_http_server *s);

/* Connections open now (for metrics and tests). */
int cpm_http_server_connections(const cpm_http_server *s);

/* Stops listening and closes every connection (pending exchanges see their abort
 * callback; a finished answer still queued for a slow reader is sent first, for at most
 * a couple of seconds). done(ud) runs once everything is closed; the server is freed
 * right after, so s must not be used once this is called. s may be NULL. */
void cpm_http_server_close(cpm_http_server *s, void (*done)(void *ud), void *ud);

/* Called once if the client disconnects (or the server closes) while the
 * exchange is pending; the handler must still finish the exchange. */
void cpm_http_conn_set_abort_cb(cpm_http_conn *c, void (*cb)(void *ud), void *ud);

/* false once the client is gone. */
bool cpm_http_conn_alive(const cpm_http_conn *c);

/* Bytes written but not yet sent to the client (for backpressure). */
size_t cpm_http_conn_write_queue(const cpm_http_conn *c);

/* A complete response and the end of the exchange. extra_headers, if not NULL, is
 * one or more "Name: value\r\n" lines. Returns 0 or CPM_ECLOSED. */
int cpm_http_respond(cpm_http_conn *c, int status, const char *content_type, const char *body,
                     size_t len, const char *extra_headers);

/* A streamed response: headers now, then any number of writes (each one chunk
 * with chunked transfer coding; raw for HTTP/1.0 clients, closed at the end). */
int cpm_http_stream_start(cpm_http_conn *c, int status, const char *content_type,
                          const char *extra_headers);
int cpm_http_stream_write(cpm_http_conn *c, const char *data, size_t len);
/* Ends the stream and the exchange. Returns 0 or CPM_ECLOSED. */
int cpm_http_stream_end(cpm_http_conn *c);

/* The body of an error response, as the API above HTTP shapes it (openai.h's
 * cpm_oai_error_body); malloc'd, the server frees it. NULL gives "{}". */
typedef char *(*cpm_http_error_body_fn)(int status, const char *type, const char *code,
                                        const char *msg);

/* Sets how error bodies are written: the server's own refusals (bad HTTP, limits,
 * timeouts) and cpm_http_respond_error. Without one they are "{}". */
void cpm_http_server_set_error_body(cpm_http_server *s, cpm_http_error_body_fn fn);

/* Header lines every response gets, computed per request (CORS): written into out
 * ("Name: value\r\n" each, "" for none). r is NULL when the server refuses bytes it
 * could not parse as a request. */
typedef void (*cpm_http_head_fn)(void *ud, const cpm_http_request *r, char *out, size_t size);

void cpm_http_server_set_head_fn(cpm_http_server *s, cpm_http_head_fn fn, void *ud);

/* What an exchange was, when it ends: for an access log. */
typedef struct cpm_http_exchange {
    const cpm_http_request *req; /* NULL: bytes that never parsed as a request */
    int status;                  /* the response's; 0 when none was written (client gone) */
    const char *client;          /* the peer, "ip:port" */
    double seconds;              /* from the request's first byte to the exchange's end */
    const char *note;            /* the handler's (cpm_http_conn_set_note), "" when none */
} cpm_http_exchange;

typedef void (*cpm_http_done_fn)(void *ud, const cpm_http_exchange *x);

/* Called as every exchange ends (answered, refused, or its client gone). */
void cpm_http_server_set_done_fn(cpm_http_server *s, cpm_http_done_fn fn, void *ud);

/* Adds a header line to this exchange's response (before it starts). CPM_EINVAL for a
 * value with control characters, CPM_ELIMIT past 191 bytes in all. */
int cpm_http_conn_add_header(cpm_http_conn *c, const char *name, const char *value);

/* Attaches a short text (copied, at most 255 bytes) to the exchange for the done hook,
 * e.g. the request id and token counts of the answer. */
void cpm_http_conn_set_note(cpm_http_conn *c, const char *note);

/* Writes an error (body from the server's error_body function) and ends the exchange. */
int cpm_http_respond_error(cpm_http_conn *c, int status, const char *type, const char *code,
                           const char *msg);

#endif
