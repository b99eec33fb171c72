/* fuzz_http.c - libFuzzer target for router/http.c: raw bytes from a TCP client.
 *
 * One real server on 127.0.0.1 (libuv loop driven from this thread) answers every
 * request with 200; each input is written by a plain client socket that then
 * half-closes. Whatever the bytes, the server must answer only with HTTP/1.1
 * status lines, close the connection, and leave no connection behind.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "router/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uv_loop_t loop;
static cpm_http_server *server;
static int port;

static void handle(void *ud, cpm_http_conn *c, const cpm_http_request *r) {
    (void)ud;
    if (r->body_len > 0 && (!r->body || r->body[r->body_len] != '\0'))
        __builtin_trap();
    if (strcmp(r->path, "/stream") == 0) {
        cpm_http_stream_start(c, 200, "text/event-stream", NULL);
        cpm_http_stream_write(c, "data: x\n\n", 9);
        cpm_http_stream_end(c);
        return;
    }
    cpm_http_respond(c, 200, "text/plain", r->path, strlen(r->path), NULL);
}

static void setup(void) {
    uv_loop_init(&loop);
    cpm_http_limits lim = cpm_http_limits_default();
    lim.max_body = 4096;
    lim.max_header_bytes = 2048;
    lim.max_headers = 16;
    lim.request_timeout_ms = 200;
    if (cpm_http_server_new(&loop, &lim, handle, NULL, &server, NULL) ||
        cpm_http_server_listen(server, "127.0.0.1", 0, NULL))
        __builtin_trap();
    port = cpm_http_server_port(server);
}

/* Checks that the answer bytes are HTTP/1.1 responses (first line only). */
static void check_answer(const char *buf, size_t n) {
    if (n > 0 && (n < 9 || memcmp(buf, "HTTP/1.1 ", 9) != 0))
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!server)
        setup();
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        __builtin_trap();
    fcntl(fd, F_SETFL, O_NONBLOCK);
    size_t sent = 0;
    static char answer[1 << 16];
    size_t got = 0;
    bool closed = false;
    for (int spin = 0; spin < 200000 && !closed; spin++) {
        if (sent < size) {
            ssize_t k = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
            if (k > 0)
                sent += (size_t)k;
            else if (k < 0 && errno != EAGAIN)
                sent = size; /* the server closed on us: fine */
            if (sent == size)
                shutdown(fd, SHUT_WR);
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        char tmp[4096];
        ssize_t k = recv(fd, tmp, sizeof tmp, 0);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
            closed = true;
        else if (k > 0) {
            size_t take = got + (size_t)k <= sizeof answer ? (size_t)k : sizeof answer - got;
            memcpy(answer + got, tmp, take);
            got += take;
        }
        if (size == 0 && spin == 0)
            shutdown(fd, SHUT_WR);
    }
    close(fd);
    if (!closed)
        __builtin_trap(); /* the server must close a half-closed client */
    check_answer(answer, got);
    for (int i = 0; i < 100 && cpm_http_server_connections(server) > 0; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (cpm_http_server_connections(server) != 0)
        __builtin_trap();
    return 0;
}
