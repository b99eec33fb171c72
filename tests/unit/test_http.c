/* test_http.c - router/http.c against real loopback sockets.
 *
 * A real server runs its libuv loop on a thread of its own; the tests are plain
 * blocking TCP clients that write raw bytes and parse the answers with
 * libhttp-parser in response mode (so chunked coding is checked too).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "router/http.h"
#include "router/openai.h"

/* ---- the server under test ------------------------------------------------ */

#define BIG_STREAM (4 << 20) /* bytes of /big's stream before its [DONE] */

typedef struct slow_reply {
    uv_timer_t timer;
    cpm_http_conn *conn;
    char body[64];
} slow_reply;

typedef struct server {
    uv_loop_t loop;
    uv_async_t stop;
    cpm_http_server *http;
    pthread_t thread;
    int port;
    atomic_int aborts;
    atomic_int handled;
    atomic_int late_rc; /* what finishing an aborted exchange returned */
    cpm_http_conn *hanging; /* the /hang exchange waiting for its client to go */
} server;

static void on_slow_timer_closed(uv_handle_t *h) {
    free(h->data);
}

static void on_slow_timer(uv_timer_t *t) {
    slow_reply *r = t->data;
    cpm_http_respond(r->conn, 200, "text/plain", r->body, strlen(r->body), NULL);
    t->data = r;
    uv_close((uv_handle_t *)t, on_slow_timer_closed);
}

static void on_hang_abort(void *ud) {
    server *s = ud;
    atomic_fetch_add(&s->aborts, 1);
    /* the contract: the exchange is still finished, even though nobody reads it
     * (checked by the test thread: cmocka asserts belong there) */
    atomic_store(&s->late_rc, cpm_http_respond(s->hanging, 200, "text/plain", "x", 1, NULL));
    s->hanging = NULL;
}

static void handle(void *ud, cpm_http_conn *c, const cpm_http_request *r) {
    server *s = ud;
    atomic_fetch_add(&s->handled, 1);
    char buf[8192];
    if (strcmp(r->path, "/echo") == 0) {
        const char *h = cpm_http_request_header(r, "X-Tag");
        int n = snprintf(buf, sizeof buf, "%s %s q=%s tag=%s len=%zu body=%.*s", r->method, r->path,
                         r->query, h ? h : "-", r->body_len, (int)r->body_len, r->body);
        cpm_http_respond(c, 200, "text/plain", buf, (size_t)n, "X-Served: yes\r\n");
    } else if (strcmp(r->path, "/slow") == 0) {
        /* answered on a later loop turn, so pipelined requests must wait for it */
        slow_reply *sr = calloc(1, sizeof *sr);
        sr->conn = c;
        snprintf(sr->body, sizeof sr->body, "slow");
        uv_timer_init(&s->loop, &sr->timer);
        sr->timer.data = sr;
        uv_timer_start(&sr->timer, on_slow_timer, 100, 0);
    } else if (strcmp(r->path, "/stream") == 0) {
        cpm_http_stream_start(c, 200, "text/event-stream", "Cache-Control: no-cache\r\n");
        for (int i = 0; i < 3; i++) {
            int n = snprintf(buf, sizeof buf, "data: {\"i\":%d}\n\n", i);
            cpm_http_stream_write(c, buf, (size_t)n);
        }
        cpm_http_stream_write(c, "data: [DONE]\n\n", 14);
        cpm_http_stream_end(c);
    } else if (strcmp(r->path, "/big") == 0) {
        /* more than a slow reader's socket takes: most of it waits in our write queue */
        cpm_http_stream_start(c, 200, "text/event-stream", NULL);
        memset(buf, 'x', sizeof buf);
        for (int i = 0; i < BIG_STREAM / (int)sizeof buf; i++)
            cpm_http_stream_write(c, buf, sizeof buf);
        cpm_http_stream_write(c, "data: [DONE]\n\n", 14);
        cpm_http_stream_end(c);
    } else if (strcmp(r->path, "/hang") == 0) {
        s->hanging = c;
        cpm_http_conn_set_abort_cb(c, on_hang_abort, s);
    } else {
        cpm_http_respond_error(c, 404, "invalid_request_error", "not_found", "no such route");
    }
}

static void on_stop(uv_async_t *a) {
    server *s = a->data;
    cpm_http_server_close(s->http, NULL, NULL);
    uv_close((uv_handle_t *)&s->stop, NULL);
}

static void *server_main(void *arg) {
    server *s = arg;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return NULL;
}

static server *server_start(const cpm_http_limits *lim) {
    server *s = calloc(1, sizeof *s);
    assert_non_null(s);
    assert_int_equal(uv_loop_init(&s->loop), 0);
    cpm_error e = {0};
    assert_int_equal(cpm_http_server_new(&s->loop, lim, handle, s, &s->http, &e), 0);
    cpm_http_server_set_error_body(s->http, cpm_oai_error_body);
    assert_int_equal(cpm_http_server_listen(s->http, "127.0.0.1", 0, &e), 0);
    s->port = cpm_http_server_port(s->http);
    assert_true(s->port > 0);
    uv_async_init(&s->loop, &s->stop, on_stop);
    s->stop.data = s;
    assert_int_equal(pthread_create(&s->thread, NULL, server_main, s), 0);
    return s;
}

static void server_stop(server *s) {
    uv_async_send(&s->stop);
    pthread_join(s->thread, NULL);
    /* every handle is closed: the loop closes cleanly only then */
    assert_int_equal(uv_loop_close(&s->loop), 0);
    free(s);
}

/* ---- the client ------------------------------------------------------------- */

static int client_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

static void client_send(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        assert_true(n > 0);
        data += n;
        len -= (size_t)n;
    }
}

typedef struct response {
    int status;
    char body[65536];
    size_t body_len;
    char headers[8192];   /* "name: value\n" lines, lower-case names */
    size_t headers_len;
    bool in_value, complete, chunked;
} response;

static int r_on_field(http_parser *p, const char *at, size_t len) {
    response *r = p->data;
    if (r->in_value || r->headers_len == 0) {
        if (r->headers_len)
            r->headers[r->headers_len++] = '\n';
    }
    r->in_value = false;
    for (size_t i = 0; i < len && r->headers_len < sizeof r->headers - 4; i++)
        r->headers[r->headers_len++] = (char)(at[i] | 0x20);
    return 0;
}

static int r_on_value(http_parser *p, const char *at, size_t len) {
    response *r = p->data;
    if (!r->in_value) {
        r->headers[r->headers_len++] = ':';
        r->headers[r->headers_len++] = ' ';
    }
    r->in_value = true;
    for (size_t i = 0; i < len && r->headers_len < sizeof r->headers - 4; i++)
        r->headers[r->headers_len++] = at[i];
    r->headers[r->headers_len] = '\0';
    return 0;
}

static int r_on_headers_complete(http_parser *p) {
    response *r = p->data;
    r->status = p->status_code;
    r->headers[r->headers_len++] = '\n';
    r->headers[r->headers_len] = '\0';
    r->chunked = (p->flags & F_CHUNKED) != 0;
    return 0;
}

static int r_on_body(http_parser *p, const char *at, size_t len) {
    response *r = p->data;
    assert_true(r->body_len + len < sizeof r->body);
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    r->body[r->body_len] = '\0';
    return 0;
}

static int r_on_complete(http_parser *p) {
    response *r = p->data;
    r->complete = true;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings r_settings = {
    .on_header_field = r_on_field,
    .on_header_value = r_on_value,
    .on_headers_complete = r_on_headers_complete,
    .on_body = r_on_body,
    .on_message_complete = r_on_complete,
};

/* A client connection with a read-ahead buffer, so pipelined responses split right. */
typedef struct client {
    int fd;
    char buf[65536];
    size_t len;
    bool eof;
} client;

static client *client_open(int port) {
    client *c = calloc(1, sizeof *c);
    c->fd = client_connect(port);
    return c;
}

static void client_close(client *c) {
    close(c->fd);
    free(c);
}

/* Reads one response (the 100 Continue interim one is skipped). */
static void client_read(client *c, response *r) {
    memset(r, 0, sizeof *r);
    for (;;) {
        http_parser p;
        http_parser_init(&p, HTTP_RESPONSE);
        p.data = r;
        memset(r, 0, sizeof *r);
        size_t off = 0;
        for (;;) {
            size_t n = http_parser_execute(&p, &r_settings, c->buf + off, c->len - off);
            off += n;
            if (r->complete)
                break;
            assert_int_equal(HTTP_PARSER_ERRNO(&p), HPE_OK);
            if (c->eof) {
                http_parser_execute(&p, &r_settings, NULL, 0); /* EOF ends a body read to close */
                assert_true(r->complete);
                break;
            }
            struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
            assert_int_equal(poll(&pfd, 1, 5000), 1);
            assert_true(c->len < sizeof c->buf);
            ssize_t got = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
            assert_true(got >= 0);
            if (got == 0)
                c->eof = true;
            c->len += (size_t)got;
        }
        memmove(c->buf, c->buf + off, c->len - off);
        c->len -= off;
        if (r->status != 100)
            return;
    }
}

/* true when the server closes the connection within a few seconds (reading past data). */
static bool client_sees_close(client *c) {
    if (c->eof)
        return true;
    for (;;) {
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        if (poll(&pfd, 1, 5000) != 1)
            return false;
        char tmp[4096];
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n <= 0)
            return true;
    }
}

static bool has_header(const response *r, const char *line) {
    return strstr(r->headers, line) != NULL;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_keep_alive_two_requests(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    const char *req = "GET /echo?a=1 HTTP/1.1\r\nHost: x\r\nX-Tag: t1\r\n\r\n";
    response r;
    client_send(c->fd, req, strlen(req));
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "GET /echo q=a=1 tag=t1 len=0 body=");
    assert_true(has_header(&r, "x-served: yes"));
    assert_true(has_header(&r, "connection: keep-alive"));
    /* the same connection serves a second request */
    const char *post = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    client_send(c->fd, post, strlen(post));
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "POST /echo q= tag=- len=5 body=hello");
    client_close(c);
    server_stop(s);
}

static void test_pipelined_requests_answer_in_order(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    /* /slow answers 100 ms later; /echo must not overtake it */
    const char *reqs = "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                       "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                       "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    client_send(c->fd, reqs, strlen(reqs));
    response r;
    client_read(c, &r);
    assert_string_equal(r.body, "slow");
    client_read(c, &r);
    assert_string_equal(r.body, "POST /echo q= tag=- len=3 body=abc");
    client_read(c, &r);
    assert_string_equal(r.body, "GET /echo q= tag=- len=0 body=");
    assert_true(has_header(&r, "connection: close"));
    assert_true(client_sees_close(c));
    client_close(c);
    server_stop(s);
}

static void test_chunked_request_body(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    const char *req = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    client_send(c->fd, req, strlen(req));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "POST /echo q= tag=- len=7 body=abcdefg");
    client_close(c);
    server_stop(s);
}

static void test_sse_stream_is_chunked(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    const char *req = "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n";
    client_send(c->fd, req, strlen(req));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_true(r.chunked);
    assert_true(has_header(&r, "content-type: text/event-stream"));
    assert_string_equal(r.body, "data: {\"i\":0}\n\ndata: {\"i\":1}\n\ndata: {\"i\":2}\n\n"
                                "data: [DONE]\n\n");
    /* keep-alive survives a stream */
    client_send(c->fd, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 31);
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    client_close(c);
    server_stop(s);
}

static void test_http10_stream_ends_with_close(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    const char *req = "GET /stream HTTP/1.0\r\n\r\n";
    client_send(c->fd, req, strlen(req));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_false(r.chunked);
    assert_non_null(strstr(r.body, "data: [DONE]"));
    assert_true(client_sees_close(c));
    client_close(c);
    server_stop(s);
}

static void test_oversize_body_is_413_and_server_keeps_serving(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_body = 1000;
    server *s = server_start(&lim);
    client *c = client_open(s->port);
    const char *req = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n";
    client_send(c->fd, req, strlen(req));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 413);
    assert_non_null(strstr(r.body, "\"code\":\"body_too_large\""));
    assert_non_null(strstr(r.body, "\"type\":\"invalid_request_error\""));
    assert_true(client_sees_close(c));
    client_close(c);

    /* a chunked body that grows past the limit is cut off too */
    c = client_open(s->port);
    char big[1400];
    int n = snprintf(big, sizeof big, "POST /echo HTTP/1.1\r\nHost: x\r\n"
                                      "Transfer-Encoding: chunked\r\n\r\n400\r\n");
    memset(big + n, 'a', 0x400);
    n += 0x400;
    memcpy(big + n, "\r\n400\r\n", 7);
    n += 7;
    client_send(c->fd, big, (size_t)n);
    client_read(c, &r);
    assert_int_equal(r.status, 413);
    client_close(c);

    /* exactly at the limit is fine */
    c = client_open(s->port);
    char ok[1200];
    n = snprintf(ok, sizeof ok, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n");
    memset(ok + n, 'b', 1000);
    client_send(c->fd, ok, (size_t)n + 1000);
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    client_close(c);
    server_stop(s);
}

static void test_header_limits_are_431(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_headers = 4;
    lim.max_header_bytes = 256;
    server *s = server_start(&lim);
    client *c = client_open(s->port);
    const char *many = "GET /echo HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n";
    client_send(c->fd, many, strlen(many));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 431);
    assert_non_null(strstr(r.body, "too_many_headers"));
    client_close(c);

    c = client_open(s->port);
    char big[600];
    int n = snprintf(big, sizeof big, "GET /echo HTTP/1.1\r\nX-Big: ");
    memset(big + n, 'z', 300);
    n += 300;
    n += snprintf(big + n, sizeof big - (size_t)n, "\r\n\r\n");
    client_send(c->fd, big, (size_t)n);
    client_read(c, &r);
    assert_int_equal(r.status, 431);
    assert_non_null(strstr(r.body, "header_too_large"));
    client_close(c);
    server_stop(s);
}

static void test_malformed_request_is_400_json(void **state) {
    (void)state;
    server *s = server_start(NULL);
    const char *bad[] = {
        "GARBAGE\r\n\r\n",
        "GET /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "GET /echo HTTP/9.9.9\r\n\r\n",
        "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET http://example.com/x HTTP/1.1\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        client *c = client_open(s->port);
        client_send(c->fd, bad[i], strlen(bad[i]));
        response r;
        client_read(c, &r);
        assert_int_equal(r.status, 400);
        assert_non_null(strstr(r.body, "{\"error\":{\"message\":"));
        assert_true(has_header(&r, "connection: close"));
        assert_true(client_sees_close(c));
        client_close(c);
    }
    /* and the server still serves */
    client *c = client_open(s->port);
    client_send(c->fd, "GET /nope HTTP/1.1\r\n\r\n", 22);
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 404);
    client_close(c);
    server_stop(s);
}

static void test_expect_100_continue(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    const char *head = "POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       "Content-Length: 2\r\n\r\n";
    client_send(c->fd, head, strlen(head));
    /* the interim answer comes before we send the body */
    char tmp[64] = {0};
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, 5000), 1);
    ssize_t n = recv(c->fd, tmp, 25, MSG_PEEK);
    assert_int_equal(n, 25);
    assert_memory_equal(tmp, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    client_send(c->fd, "hi", 2);
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "POST /echo q= tag=- len=2 body=hi");
    client_close(c);
    server_stop(s);
}

static void test_client_disconnect_aborts_exchange(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    client_send(c->fd, "GET /hang HTTP/1.1\r\n\r\n", 22);
    for (int i = 0; i < 200 && atomic_load(&s->handled) == 0; i++)
        usleep(5000);
    assert_int_equal(atomic_load(&s->handled), 1);
    assert_int_equal(atomic_load(&s->aborts), 0);
    client_close(c);
    for (int i = 0; i < 200 && atomic_load(&s->aborts) == 0; i++)
        usleep(5000);
    assert_int_equal(atomic_load(&s->aborts), 1);
    assert_int_equal(atomic_load(&s->late_rc), CPM_ECLOSED);
    server_stop(s); /* would not return if the connection leaked a handle */
}

static void test_server_close_aborts_pending_exchange(void **state) {
    (void)state;
    server *s = server_start(NULL);
    client *c = client_open(s->port);
    client_send(c->fd, "GET /hang HTTP/1.1\r\n\r\n", 22);
    for (int i = 0; i < 200 && atomic_load(&s->handled) == 0; i++)
        usleep(5000);
    atomic_int *aborts = &s->aborts;
    int before = atomic_load(aborts);
    assert_int_equal(before, 0);
    /* server_stop returns only once the exchange was aborted, finished and freed */
    uv_async_send(&s->stop);
    pthread_join(s->thread, NULL);
    assert_int_equal(atomic_load(aborts), 1);
    assert_int_equal(uv_loop_close(&s->loop), 0);
    free(s);
    assert_true(client_sees_close(c));
    client_close(c);
}

/* A server closing (the router's drain ending) while a slow reader's last answer is
 * still queued: the answer arrives whole, then the close; not a reset mid-stream. */
static void test_server_close_sends_queued_answer(void **state) {
    (void)state;
    server *s = server_start(NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0), small = 4096;
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    client_send(fd, "GET /big HTTP/1.1\r\n\r\n", 21);
    for (int i = 0; i < 200 && atomic_load(&s->handled) == 0; i++)
        usleep(5000);
    usleep(50000);
    uv_async_send(&s->stop); /* closes while the stream is queued, unread */
    static char got[BIG_STREAM + 65536];
    size_t len = 0;
    for (ssize_t n = 1; n > 0 && len < sizeof got; len += (size_t)n) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        assert_int_equal(poll(&pfd, 1, 5000), 1);
        n = recv(fd, got + len, sizeof got - len, 0);
        assert_true(n >= 0); /* no reset */
    }
    const char *end = "data: [DONE]\n\n\r\n0\r\n\r\n";
    assert_true(len > BIG_STREAM && len - BIG_STREAM < 65536);
    assert_memory_equal(got + len - strlen(end), end, strlen(end));
    close(fd);
    pthread_join(s->thread, NULL);
    assert_int_equal(uv_loop_close(&s->loop), 0);
    free(s);
}

static void test_partial_request_times_out_408(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.request_timeout_ms = 100;
    server *s = server_start(&lim);
    client *c = client_open(s->port);
    const char *part = "POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
    client_send(c->fd, part, strlen(part));
    response r;
    client_read(c, &r);
    assert_int_equal(r.status, 408);
    assert_true(client_sees_close(c));
    client_close(c);
    server_stop(s);
}

static void test_idle_connection_is_closed(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.idle_timeout_ms = 100;
    server *s = server_start(&lim);
    client *c = client_open(s->port);
    assert_true(client_sees_close(c));
    client_close(c);
    server_stop(s);
}

/* At the cap with every connection busy, a newcomer gets a 503 and is closed. */
static void test_connection_limit_is_503(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_connections = 1;
    server *s = server_start(&lim);
    client *a = client_open(s->port);
    client_send(a->fd, "GET /hang HTTP/1.1\r\n\r\n", 22); /* a is busy: not idle */
    while (atomic_load(&s->handled) < 1)
        usleep(1000);
    response r;
    client *b = client_open(s->port);
    client_read(b, &r);
    assert_int_equal(r.status, 503);
    assert_true(client_sees_close(b));
    client_close(b);
    client_close(a);
    server_stop(s);
}

/* Idle keep-alive clients cannot lock the door: at the cap, the oldest idle one is
 * closed for a newcomer, which is served (a /health probe keeps answering). */
static void test_idle_connections_make_room(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_connections = 4;
    server *s = server_start(&lim);
    client *idle[8];
    response r;
    for (int i = 0; i < 8; i++) {
        idle[i] = client_open(s->port);
        client_send(idle[i]->fd, "GET /echo HTTP/1.1\r\n\r\n", 22);
        client_read(idle[i], &r);
        assert_int_equal(r.status, 200); /* served: each evicted an older idle one */
    }
    assert_true(client_sees_close(idle[0])); /* the oldest went first */
    client *probe = client_open(s->port);
    client_send(probe->fd, "GET /echo HTTP/1.1\r\n\r\n", 22);
    client_read(probe, &r);
    assert_int_equal(r.status, 200);
    assert_true(cpm_http_server_connections(s->http) <= lim.max_connections + 1);
    client_close(probe);
    for (int i = 0; i < 8; i++)
        client_close(idle[i]);
    server_stop(s);
}

/* Bodies held by all connections together are bounded: past the budget a client
 * gets a 503 (not the memory), and once bodies are gone the server takes them again. */
static void test_body_budget_is_503(void **state) {
    (void)state;
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_body = 96 << 10;
    lim.max_body_total = 160 << 10;
    server *s = server_start(&lim);
    static char chunk[40 << 10];
    memset(chunk, 'x', sizeof chunk);
    const char *head = "POST /echo HTTP/1.1\r\nContent-Length: 90000\r\n\r\n";
    client *a = client_open(s->port), *b = client_open(s->port);
    client_send(a->fd, head, strlen(head));
    client_send(a->fd, chunk, sizeof chunk); /* a holds a 64 KiB buffer ... */
    client_send(a->fd, chunk, sizeof chunk); /* ... then 128 KiB */
    usleep(100000);
    client_send(b->fd, head, strlen(head));
    client_send(b->fd, chunk, sizeof chunk); /* 64 KiB more: past 160 KiB */
    response r;
    client_read(b, &r);
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body, "server_busy"));
    client_close(b);
    client_close(a); /* a's buffer is released with it */
    usleep(100000);
    client *c = client_open(s->port);
    const char *head2 = "POST /sink HTTP/1.1\r\nContent-Length: 90000\r\n\r\n";
    client_send(c->fd, head2, strlen(head2));
    client_send(c->fd, chunk, sizeof chunk);
    client_send(c->fd, chunk, sizeof chunk);
    client_send(c->fd, chunk, 90000 - 2 * sizeof chunk);
    client_read(c, &r);
    assert_int_equal(r.status, 404); /* the whole body was taken and the handler answered */
    client_close(c);
    server_stop(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keep_alive_two_requests),
        cmocka_unit_test(test_pipelined_requests_answer_in_order),
        cmocka_unit_test(test_chunked_request_body),
        cmocka_unit_test(test_sse_stream_is_chunked),
        cmocka_unit_test(test_http10_stream_ends_with_close),
        cmocka_unit_test(test_oversize_body_is_413_and_server_keeps_serving),
        cmocka_unit_test(test_header_limits_are_431),
        cmocka_unit_test(test_malformed_request_is_400_json),
        cmocka_unit_test(test_expect_100_continue),
        cmocka_unit_test(test_client_disconnect_aborts_exchange),
        cmocka_unit_test(test_server_close_aborts_pending_exchange),
        cmocka_unit_test(test_server_close_sends_queued_answer),
        cmocka_unit_test(test_partial_request_times_out_408),
        cmocka_unit_test(test_idle_connection_is_closed),
        cmocka_unit_test(test_connection_limit_is_503),
        cmocka_unit_test(test_idle_connections_make_room),
        cmocka_unit_test(test_body_budget_is_503),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
