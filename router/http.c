/* http.c - HTTP/1.1 server: libuv TCP connections parsed by libhttp-parser.
 *
 * Each connection is a small state machine (reading -> handling -> reading ...,
 * or -> lingering -> closed). Bytes that arrive while a request is being handled
 * are kept (pipelining) and parsed only once that exchange is finished, so
 * responses always leave in request order.
 */
#include "http.h"

#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define READ_CHUNK 65536
#define BODY_KEEP (64u << 10) /* body buffer a keep-alive connection may keep */
#define LINGER_MS 2000

enum conn_state {
    CONN_READING,  /* parsing (or waiting for) the next request */
    CONN_HANDLING, /* a request is with the handler */
    CONN_LINGER,   /* last response queued; draining input until EOF or a short timer */
    CONN_CLOSED,   /* handles closing or closed */
};

enum last_cb { CB_NONE, CB_FIELD, CB_VALUE };

typedef struct item {
    size_t off, len;
} item;

struct cpm_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    bool listener_open;
    int port;
    cpm_http_limits lim;
    cpm_http_handler handler;
    void *ud;
    cpm_http_error_body_fn error_body;
    cpm_http_head_fn head_fn;
    void *head_ud;
    cpm_http_done_fn done_fn;
    void *done_fn_ud;
    cpm_http_conn *conns; /* newest first */
    int n_conns;
    int n_live;          /* connections not closing */
    size_t body_total;   /* bytes of every connection's body buffer */
    bool closing;
    void (*done)(void *ud);
    void *done_ud;
};

struct cpm_http_conn {
    cpm_http_server *srv;
    cpm_http_conn *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t timer;
    int open_handles;
    enum conn_state state;
    http_parser parser;

    bool alive;        /* the peer may still read what we write */
    bool exchange;     /* a request is with the handler, not yet finished */
    bool streaming, chunked, keep_alive;
    bool reading, in_process, shut;
    void (*abort_cb)(void *ud);
    void *abort_ud;

    char *in; /* received, not yet parsed */
    size_t in_len, in_cap;

    /* The request being parsed: URL and header strings in one arena, each NUL-terminated. */
    char *arena;
    size_t arena_len, arena_cap, header_bytes;
    item url;
    item *fields, *values;
    int n_fields;
    enum last_cb last;
    cpm_http_header *headers;
    char *body;
    size_t body_len, body_cap;
    bool begun, complete;
    int err_status; /* set by a parser callback to stop with this HTTP status */
    const char *err_code;
    char err_msg[160];
    cpm_http_request req;

    size_t write_queue;
    /* for the done hook (an access log) */
    char client[64];  /* the peer, "ip:port" */
    uint64_t t_req;   /* ns the request began */
    int status;       /* of the response written, 0 before */
    char note[256];
    char head_extra[192]; /* header lines for this exchange's response (cpm_http_conn_add_header) */
};

typedef struct write_req {
    uv_write_t req;
    cpm_http_conn *conn;
    size_t len;
    char data[];
} write_req;

static const http_parser_settings parser_settings;

cpm_http_limits cpm_http_limits_default(void) {
    return (cpm_http_limits){
        .max_header_bytes = 16384,
        .max_headers = 64,
        .max_body = 4u << 20,
        .request_timeout_ms = 30000,
        .idle_timeout_ms = 75000,
        .max_write_queue = 16u << 20,
        .max_connections = 1024,
        .max_body_total = 256u << 20,
    };
}

const char *cpm_http_request_header(const cpm_http_request *r, const char *name) {
    for (int i = 0; i < r->n_headers; i++)
        if (strcasecmp(r->headers[i].name, name) == 0)
            return r->headers[i].value;
    return NULL;
}

/* ---- connection teardown ------------------------------------------------ */

static void conn_free(cpm_http_conn *c) {
    cpm_http_server *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_conns--;
    s->body_total -= c->body_cap;
    free(c->in);
    free(c->arena);
    free(c->fields);
    free(c->values);
    free(c->headers);
    free(c->body);
    free(c);
    if (s->closing && s->n_conns == 0 && !s->listener_open) {
        void (*done)(void *) = s->done;
        void *ud = s->done_ud;
        free(s);
        if (done)
            done(ud);
    }
}

static void conn_maybe_free(cpm_http_conn *c) {
    if (c->open_handles == 0 && !c->exchange)
        conn_free(c);
}

static void on_handle_closed(uv_handle_t *h) {
    cpm_http_conn *c = h->data;
    /* Told here, on a loop turn of its own, never from inside a cpm_http_* call. */
    if (h == (uv_handle_t *)&c->tcp && c->exchange && c->abort_cb) {
        void (*cb)(void *) = c->abort_cb;
        c->abort_cb = NULL;
        cb(c->abort_ud);
    }
    c->open_handles--;
    conn_maybe_free(c);
}

/* The client is gone (or we drop it): tell a pending exchange, close the handles. */
static void conn_lost(cpm_http_conn *c) {
    if (c->state == CONN_CLOSED)
        return;
    c->state = CONN_CLOSED;
    c->alive = false;
    c->srv->n_live--;
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

/* ---- writing -------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
    write_req *w = (write_req *)req;
    cpm_http_conn *c = w->conn;
    c->write_queue -= w->len;
    free(w);
    if (status < 0)
        conn_lost(c);
}

/* Copies the pieces into one block and queues it. */
static int conn_writev(cpm_http_conn *c, const uv_buf_t *pieces, int n) {
    if (!c->alive)
        return CPM_ECLOSED;
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += pieces[i].len;
    write_req *w = malloc(sizeof *w + len);
    if (!w) {
        conn_lost(c);
        return CPM_ENOMEM;
    }
    w->conn = c;
    w->len = len;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        memcpy(w->data + off, pieces[i].base, pieces[i].len);
        off += pieces[i].len;
    }
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) < 0) {
        free(w);
        conn_lost(c);
        return CPM_ECLOSED;
    }
    c->write_queue += len;
    if (c->write_queue > c->srv->lim.max_write_queue) {
        conn_lost(c); /* a client that does not read must not hold our memory */
        return CPM_ECLOSED;
    }
    return 0;
}

static int conn_write(cpm_http_conn *c, const char *data, size_t len) {
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    return conn_writev(c, &b, 1);
}

/* ---- timers and lingering close ----------------------------------------- */

static void on_timer(uv_timer_t *t);

static void arm_timer(cpm_http_conn *c, uint64_t ms) {
    if (c->state != CONN_CLOSED)
        uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void update_reading(cpm_http_conn *c);

static void on_shutdown(uv_shutdown_t *req, int status) {
    (void)status;
    free(req);
}

/* After the last response: stop sending, discard input for a moment so that the
 * client reads our answer instead of a reset, then close. */
static void conn_linger(cpm_http_conn *c) {
    if (c->state == CONN_CLOSED || c->state == CONN_LINGER)
        return;
    c->state = CONN_LINGER;
    c->in_len = 0;
    uv_shutdown_t *req = malloc(sizeof *req);
    if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        free(req);
        conn_lost(c);
        return;
    }
    c->shut = true;
    arm_timer(c, LINGER_MS);
    update_reading(c); /* keep reading to see the client's EOF */
}

/* ---- responses ------------------------------------------------------------ */

static int write_head(cpm_http_conn *c, int status, const char *content_type, const char *extra,
                      const char *length_line) {
    c->status = status;
    char head[1024];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sConnection: %s\r\n",
                     status, http_status_str((enum http_status)status), content_type,
                     length_line, c->keep_alive ? "keep-alive" : "close");
    if (n < 0 || (size_t)n >= sizeof head)
        return CPM_EINTERNAL;
    char more[1024] = "";
    if (c->srv->head_fn) /* the request may not be parsed yet (a refusal): then NULL */
        c->srv->head_fn(c->srv->head_ud, c->req.path ? &c->req : NULL, more, sizeof more);
    uv_buf_t pieces[5] = {uv_buf_init(head, (unsigned)n),
                          uv_buf_init((char *)(extra ? extra : ""), extra ? strlen(extra) : 0),
                          uv_buf_init(more, (unsigned)strlen(more)),
                          uv_buf_init(c->head_extra, (unsigned)strlen(c->head_extra)),
                          uv_buf_init("\r\n", 2)};
    return conn_writev(c, pieces, 5);
}

static void conn_process(cpm_http_conn *c);
static void reset_request(cpm_http_conn *c);

/* Ends the current exchange: next request, lingering close, or free. */
/* Tells the done hook what the exchange was. */
static void report_exchange(cpm_http_conn *c) {
    cpm_http_server *s = c->srv;
    if (s->done_fn) {
        uint64_t now = uv_hrtime();
        cpm_http_exchange x = {.req = c->req.path ? &c->req : NULL, .status = c->status,
                               .client = c->client, .note = c->note,
                               .seconds = c->t_req ? (double)(now - c->t_req) / 1e9 : 0.0};
        s->done_fn(s->done_fn_ud, &x);
    }
    c->note[0] = '\0';
    c->head_extra[0] = '\0';
    c->status = 0;
    c->t_req = 0;
}

static int finish_exchange(cpm_http_conn *c) {
    report_exchange(c);
    c->exchange = false;
    c->abort_cb = NULL;
    c->streaming = false;
    if (c->state == CONN_CLOSED) {
        conn_maybe_free(c);
        return CPM_ECLOSED;
    }
    if (!c->keep_alive) {
        conn_linger(c);
        return 0;
    }
    c->state = CONN_READING;
    reset_request(c);
    http_parser_pause(&c->parser, 0);
    arm_timer(c, c->srv->lim.idle_timeout_ms);
    conn_process(c);
    return 0;
}

int cpm_http_respond(cpm_http_conn *c, int status, const char *content_type, const char *body,
                     size_t len, const char *extra_headers) {
    if (!c->exchange)
        return CPM_EINVAL;
    int rc = 0;
    if (c->alive) {
        char length_line[64];
        snprintf(length_line, sizeof length_line, "Content-Length: %zu\r\n", len);
        rc = write_head(c, status, content_type, extra_headers, length_line);
        if (rc == 0 && len > 0)
            rc = conn_write(c, body, len);
    }
    int frc = finish_exchange(c);
    return rc ? rc : frc;
}

int cpm_http_stream_start(cpm_http_conn *c, int status, const char *content_type,
                          const char *extra_headers) {
    if (!c->exchange || c->streaming)
        return CPM_EINVAL;
    c->streaming = true;
    if (!c->alive)
        return CPM_ECLOSED;
    /* HTTP/1.0 has no chunked coding: the end of the stream is the end of the connection. */
    c->chunked = c->req.http_major == 1 && c->req.http_minor >= 1;
    if (!c->chunked)
        c->keep_alive = false;
    return write_head(c, status, content_type, extra_headers,
                      c->chunked ? "Transfer-Encoding: chunked\r\n" : "");
}

int cpm_http_stream_write(cpm_http_conn *c, const char *data, size_t len) {
    if (!c->exchange || !c->streaming)
        return CPM_EINVAL;
    if (!c->alive)
        return CPM_ECLOSED;
    if (len == 0)
        return 0; /* an empty chunk would end the stream */
    if (!c->chunked)
        return conn_write(c, data, len);
    char size_line[32];
    int n = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    uv_buf_t pieces[3] = {uv_buf_init(size_line, (unsigned)n), uv_buf_init((char *)data, len),
                          uv_buf_init("\r\n", 2)};
    return conn_writev(c, pieces, 3);
}

int cpm_http_stream_end(cpm_http_conn *c) {
    if (!c->exchange || !c->streaming)
        return CPM_EINVAL;
    int rc = 0;
    if (c->alive && c->chunked)
        rc = conn_write(c, "0\r\n\r\n", 5);
    int frc = finish_exchange(c);
    return rc ? rc : frc;
}

void cpm_http_server_set_done_fn(cpm_http_server *s, cpm_http_done_fn fn, void *ud) {
    s->done_fn = fn;
    s->done_fn_ud = ud;
}

int cpm_http_conn_add_header(cpm_http_conn *c, const char *name, const char *value) {
    size_t used = strlen(c->head_extra);
    for (const char *p = value; *p; p++)
        if ((unsigned char)*p < 0x20)
            return CPM_EINVAL; /* no header splitting */
    int n = snprintf(c->head_extra + used, sizeof c->head_extra - used, "%s: %s\r\n", name, value);
    if (n < 0 || (size_t)n >= sizeof c->head_extra - used) {
        c->head_extra[used] = '\0';
        return CPM_ELIMIT;
    }
    return 0;
}

void cpm_http_conn_set_note(cpm_http_conn *c, const char *note) {
    snprintf(c->note, sizeof c->note, "%s", note ? note : "");
}

void cpm_http_server_set_head_fn(cpm_http_server *s, cpm_http_head_fn fn, void *ud) {
    s->head_fn = fn;
    s->head_ud = ud;
}

void cpm_http_server_set_error_body(cpm_http_server *s, cpm_http_error_body_fn fn) {
    s->error_body = fn;
}

int cpm_http_respond_error(cpm_http_conn *c, int status, const char *type, const char *code,
                           const char *msg) {
    if (c->streaming) /* headers are gone: the best we can do is end the stream */
        return cpm_http_stream_end(c);
    char *text = c->srv->error_body ? c->srv->error_body(status, type, code, msg) : NULL;
    int rc = cpm_http_respond(c, status, "application/json", text ? text : "{}",
                              text ? strlen(text) : 2, NULL);
    free(text);
    return rc;
}

void cpm_http_conn_set_abort_cb(cpm_http_conn *c, void (*cb)(void *ud), void *ud) {
    c->abort_cb = cb;
    c->abort_ud = ud;
}

bool cpm_http_conn_alive(const cpm_http_conn *c) {
    return c->alive;
}

size_t cpm_http_conn_write_queue(const cpm_http_conn *c) {
    return c->write_queue;
}

/* A request we refuse before the handler sees it: answer, then close. */
static void reject(cpm_http_conn *c, int status, const char *code, const char *msg) {
    c->exchange = true;
    c->keep_alive = false;
    c->state = CONN_HANDLING;
    cpm_http_respond_error(c, status, "invalid_request_error", code, msg);
}

/* ---- request storage ------------------------------------------------------ */

static void reset_request(cpm_http_conn *c) {
    c->req = (cpm_http_request){0}; /* its strings live in the arena, reused now */
    c->arena_len = 0;
    c->header_bytes = 0;
    c->url = (item){0, 0};
    c->n_fields = 0;
    c->last = CB_NONE;
    c->body_len = 0;
    c->begun = false;
    c->complete = false;
    c->err_status = 0;
    if (c->body_cap > BODY_KEEP) { /* a large body's buffer goes back between requests */
        c->srv->body_total -= c->body_cap;
        free(c->body);
        c->body = NULL;
        c->body_cap = 0;
    }
}

/* Stops the parser (non-zero return) and remembers the HTTP error to send. */
__attribute__((format(printf, 4, 5))) static int fail(cpm_http_conn *c, int status,
                                                      const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err_msg, sizeof c->err_msg, fmt, ap);
    va_end(ap);
    c->err_status = status;
    c->err_code = code;
    return 1;
}

/* Appends to the string being built; a new string starts after a NUL. */
static int arena_add(cpm_http_conn *c, item *it, bool start, const char *at, size_t len) {
    if (c->header_bytes + len > c->srv->lim.max_header_bytes)
        return fail(c, 431, "header_too_large", "request line and headers exceed %zu bytes",
                    c->srv->lim.max_header_bytes);
    if (start) {
        if (c->arena_len > 0)
            c->arena[c->arena_len++] = '\0';
        it->off = c->arena_len;
        it->len = 0;
    }
    memcpy(c->arena + c->arena_len, at, len);
    c->arena_len += len;
    it->len += len;
    c->header_bytes += len;
    return 0;
}

static cpm_http_conn *conn_of(http_parser *p) {
    return p->data;
}

static int on_message_begin(http_parser *p) {
    cpm_http_conn *c = conn_of(p);
    reset_request(c);
    c->begun = true;
    c->t_req = uv_hrtime();
    arm_timer(c, c->srv->lim.request_timeout_ms);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
    cpm_http_conn *c = conn_of(p);
    return arena_add(c, &c->url, c->url.len == 0 && c->arena_len == 0, at, len);
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
    cpm_http_conn *c = conn_of(p);
    bool start = c->last != CB_FIELD;
    if (start) {
        if (c->n_fields >= c->srv->lim.max_headers)
            return fail(c, 431, "too_many_headers", "more than %d header lines",
                        c->srv->lim.max_headers);
        c->n_fields++;
        c->values[c->n_fields - 1] = (item){0, 0};
    }
    c->last = CB_FIELD;
    return arena_add(c, &c->fields[c->n_fields - 1], start, at, len);
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
    cpm_http_conn *c = conn_of(p);
    bool start = c->last != CB_VALUE;
    c->last = CB_VALUE;
    return arena_add(c, &c->values[c->n_fields - 1], start, at, len);
}

/* Points the public request at the arena; called once the headers are complete. */
static void build_headers(cpm_http_conn *c) {
    c->arena[c->arena_len] = '\0';
    for (int i = 0; i < c->n_fields; i++) {
        c->headers[i].name = c->arena + c->fields[i].off;
        /* an empty value never got a string of its own */
        c->headers[i].value = c->values[i].len ? c->arena + c->values[i].off : "";
    }
    char *url = c->arena + c->url.off;
    char *hash = strchr(url, '#');
    if (hash)
        *hash = '\0';
    char *q = strchr(url, '?');
    if (q)
        *q++ = '\0';
    c->req = (cpm_http_request){
        .method = http_method_str((enum http_method)c->parser.method),
        .path = url,
        .query = q ? q : "",
        .n_headers = c->n_fields,
        .headers = c->headers,
        .http_major = c->parser.http_major,
        .http_minor = c->parser.http_minor,
    };
}

static int on_headers_complete(http_parser *p) {
    cpm_http_conn *c = conn_of(p);
    build_headers(c);
    if (c->req.path[0] != '/' && strcmp(c->req.path, "*") != 0)
        return fail(c, 400, "bad_url", "request target must be a path starting with /");
    /* http_parser leaves content_length at ULLONG_MAX when there is none */
    if (p->content_length != UINT64_MAX && p->content_length > c->srv->lim.max_body)
        return fail(c, 413, "body_too_large", "request body exceeds %zu bytes", c->srv->lim.max_body);
    const char *expect = cpm_http_request_header(&c->req, "Expect");
    if (expect && strcasecmp(expect, "100-continue") == 0 && p->http_minor >= 1)
        conn_write(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
    cpm_http_conn *c = conn_of(p);
    if (c->body_len + len > c->srv->lim.max_body)
        return fail(c, 413, "body_too_large", "request body exceeds %zu bytes", c->srv->lim.max_body);
    if (c->body_len + len + 1 > c->body_cap) {
        cpm_http_server *s = c->srv;
        size_t cap = c->body_cap ? c->body_cap : 4096;
        while (cap < c->body_len + len + 1)
            cap *= 2;
        if (s->body_total - c->body_cap + cap > s->lim.max_body_total)
            return fail(c, 503, "server_busy", "the server holds too many request bodies now; "
                                               "try again");
        char *nb = realloc(c->body, cap);
        if (!nb)
            return fail(c, 503, "out_of_memory", "cannot hold the request body");
        s->body_total += cap - c->body_cap;
        c->body = nb;
        c->body_cap = cap;
    }
    memcpy(c->body + c->body_len, at, len);
    c->body_len += len;
    return 0;
}

static int on_message_complete(http_parser *p) {
    cpm_http_conn *c = conn_of(p);
    c->complete = true;
    http_parser_pause(p, 1); /* one exchange at a time; the rest waits in c->in */
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- the driver ------------------------------------------------------------- */

static void dispatch(cpm_http_conn *c) {
    uv_timer_stop(&c->timer);
    c->req.body = c->body ? c->body : "";
    if (c->body)
        c->body[c->body_len] = '\0';
    c->req.body_len = c->body_len;
    c->keep_alive = http_should_keep_alive(&c->parser) && !c->srv->closing;
    c->req.keep_alive = c->keep_alive;
    c->state = CONN_HANDLING;
    c->exchange = true;
    c->srv->handler(c->srv->ud, c, &c->req);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void update_reading(cpm_http_conn *c) {
    if (c->state == CONN_CLOSED)
        return;
    size_t cap = c->srv->lim.max_header_bytes + c->srv->lim.max_body + READ_CHUNK;
    bool want = c->in_len < cap;
    if (want && !c->reading)
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp); /* TCP flow control holds the pipeliner back */
        c->reading = false;
    }
}

/* Parses buffered input while the connection is free to start a new exchange. */
static void conn_process(cpm_http_conn *c) {
    if (c->in_process)
        return;
    c->in_process = true;
    while (c->state == CONN_READING && c->in_len > 0) {
        size_t n = http_parser_execute(&c->parser, &parser_settings, c->in, c->in_len);
        memmove(c->in, c->in + n, c->in_len - n);
        c->in_len -= n;
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        if (c->err_status) {
            reject(c, c->err_status, c->err_code, c->err_msg);
        } else if (c->parser.upgrade) {
            reject(c, 501, "upgrade_unsupported", "protocol upgrades are not supported");
        } else if (c->complete) {
            dispatch(c);
        } else if (e != HPE_OK) {
            char msg[160];
            snprintf(msg, sizeof msg, "malformed HTTP request: %s", http_errno_description(e));
            reject(c, 400, "bad_http", msg);
        }
    }
    c->in_process = false;
    update_reading(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    (void)hint;
    cpm_http_conn *c = h->data;
    if (c->in_cap - c->in_len < READ_CHUNK) {
        size_t cap = c->in_len + READ_CHUNK;
        char *nb = realloc(c->in, cap);
        if (!nb) {
            *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS */
            return;
        }
        c->in = nb;
        c->in_cap = cap;
    }
    *buf = uv_buf_init(c->in + c->in_len, (unsigned)(c->in_cap - c->in_len));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    (void)buf;
    cpm_http_conn *c = st->data;
    if (nread < 0) {
        conn_lost(c); /* EOF or error: a pending exchange is cancelled */
        return;
    }
    if (c->state == CONN_LINGER)
        return; /* discarded: we answered and are closing */
    c->in_len += (size_t)nread;
    if (c->state == CONN_READING)
        conn_process(c);
    else
        update_reading(c);
}

static void on_timer(uv_timer_t *t) {
    cpm_http_conn *c = t->data;
    if (c->state == CONN_READING && c->begun && !c->complete)
        reject(c, 408, "request_timeout", "request not received in time");
    else if (c->state != CONN_HANDLING)
        conn_lost(c);
}

/* ---- server --------------------------------------------------------------- */

static cpm_http_conn *conn_new(cpm_http_server *s) {
    cpm_http_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->srv = s;
    c->arena_cap = s->lim.max_header_bytes + 2 * (size_t)s->lim.max_headers + 8;
    c->arena = malloc(c->arena_cap);
    c->fields = calloc((size_t)s->lim.max_headers, sizeof *c->fields);
    c->values = calloc((size_t)s->lim.max_headers, sizeof *c->values);
    c->headers = calloc((size_t)s->lim.max_headers + 1, sizeof *c->headers);
    if (!c->arena || !c->fields || !c->values || !c->headers) {
        free(c->arena);
        free(c->fields);
        free(c->values);
        free(c->headers);
        free(c);
        return NULL;
    }
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->alive = true;
    c->state = CONN_READING;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    s->n_live++;
    return c;
}

/* Closes the oldest connection that waits for nothing (no request begun, nothing
 * buffered), so that idle keep-alive clients cannot lock /health out. false if none. */
static bool evict_idle(cpm_http_server *s, const cpm_http_conn *newcomer) {
    cpm_http_conn *oldest = NULL;
    for (cpm_http_conn *c = s->conns; c; c = c->next)
        if (c != newcomer && c->state == CONN_READING && !c->exchange && !c->begun &&
            c->in_len == 0)
            oldest = c;
    if (oldest)
        conn_lost(oldest);
    return oldest != NULL;
}

/* "ip:port" of the client, for the access log. */
static void peer_name(cpm_http_conn *c) {
    struct sockaddr_storage sa;
    int len = sizeof sa;
    char ip[48] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &len) == 0) {
        if (sa.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&sa, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in6 *)&sa)->sin6_port);
        } else {
            uv_ip4_name((struct sockaddr_in *)&sa, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in *)&sa)->sin_port);
        }
    }
    snprintf(c->client, sizeof c->client, sa.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d", ip, port);
}

static void on_connection(uv_stream_t *listener, int status) {
    cpm_http_server *s = listener->data;
    if (status < 0 || s->closing)
        return;
    cpm_http_conn *c = conn_new(s);
    if (!c)
        return;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->open_handles = 2;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0) {
        conn_lost(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1); /* SSE tokens must not wait for Nagle */
    peer_name(c);
    if (s->n_live > s->lim.max_connections && !evict_idle(s, c)) {
        reject(c, 503, "too_many_connections", "the server has too many open connections");
        return;
    }
    arm_timer(c, s->lim.idle_timeout_ms);
    update_reading(c);
}

int cpm_http_server_new(uv_loop_t *loop, const cpm_http_limits *lim, cpm_http_handler handler,
                        void *ud, cpm_http_server **ret, cpm_error *err) {
    *ret = NULL;
    if (!loop || !handler)
        return cpm_error_set(err, CPM_EINVAL, "http server: loop and handler are required");
    cpm_http_server *s = calloc(1, sizeof *s);
    if (!s)
        return cpm_error_set(err, CPM_ENOMEM, "http server: out of memory");
    s->loop = loop;
    s->lim = lim ? *lim : cpm_http_limits_default();
    s->handler = handler;
    s->ud = ud;
    s->port = -1;
    if (s->lim.max_headers < 1 || s->lim.max_header_bytes < 64) {
        free(s);
        return cpm_error_set(err, CPM_EINVAL, "http server: header limits too small");
    }
    *ret = s;
    return 0;
}

int cpm_http_server_listen(cpm_http_server *s, const char *host, int port, cpm_error *err) {
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0)
        return cpm_error_set(err, CPM_EINVAL, "http server: bad listen address '%s'", host);
    int rc = uv_tcp_init(s->loop, &s->listener);
    if (rc < 0)
        return cpm_error_set(err, CPM_EIO, "http server: %s", uv_strerror(rc));
    s->listener.data = s;
    s->listener_open = true;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
    if (rc < 0)
        return cpm_error_set(err, CPM_EIO, "http server: listen on %s:%d: %s", host, port,
                             uv_strerror(rc));
    struct sockaddr_storage bound;
    int len = sizeof bound;
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
    s->port = bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                          : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    return 0;
}

int cpm_http_server_port(const cpm_http_server *s) {
    return s->port;
}

int cpm_http_server_connections(const cpm_http_server *s) {
    return s->n_conns;
}

static void on_listener_closed(uv_handle_t *h) {
    cpm_http_server *s = h->data;
    s->listener_open = false;
    if (s->n_conns == 0) {
        void (*done)(void *) = s->done;
        void *ud = s->done_ud;
        free(s);
        if (done)
            done(ud);
    }
}

void cpm_http_server_close(cpm_http_server *s, void (*done)(void *ud), void *ud) {
    if (!s)
        return;
    s->closing = true;
    s->done = done;
    s->done_ud = ud;
    for (cpm_http_conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        /* A last answer still in our queue (a slow reader's stream at the end of a drain)
         * goes out before the close, within LINGER_MS; bytes the kernel holds go anyway. */
        if (!c->exchange && uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > 0)
            conn_linger(c);
        else
            conn_lost(c);
    }
    if (s->listener_open) {
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    } else if (s->n_conns == 0) {
        free(s);
        if (done)
            done(ud);
    }
}
