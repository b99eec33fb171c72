/* fuzz_http.c - libFuzzer target for router/http.c: raw bytes from a TCP client.
 *
 * One real server on 127.0.0.1 (libuv loop driven from this thread) answers every
 * request with 200; each input is written by a plain client socket that then
 * half-closes. Whatever the bytes, the server must answer only with HTTP/1.1
 * status lines, close the connection, and leave no connection behind.
 *
 * Each client binds a different 127.x.y.z source address: the client closes first,
 * so its sockets sit in TIME_WAIT for a minute, and at ~10k inputs a second one
 * source address would run out of ephemeral ports and make connect() fail, which
 * is the harness failing, not the server.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "router/http.h"
#include "router/openai.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uv_loop_t loop;
static cpm_http_server *server;
static int port;

/* A broken property: say which, so that a crash report explains itself. */
static void broken(const char *what) {
    fprintf(stderr, "fuzz_http: %s\n", what);
    abort();
}

static void handle(void *ud, cpm_http_conn *c, const cpm_http_request *r) {
    (void)ud;
    if (r->body_len > 0 && (!r->body || r->body[r->body_len] != '\0'))
        broken("request body is not NUL-terminated");
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
        broken("cannot start the server");
    cpm_http_server_set_error_body(server, cpm_oai_error_body);
    port = cpm_http_server_port(server);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Checks that the answer bytes are HTTP/1.1 responses (first line only). */
static void check_answer(const char *buf, size_t n) {
    if (n > 0 && (n < 9 || memcmp(buf, "HTTP/1.1 ", 9) != 0))
        broken("the answer does not start with an HTTP/1.1 status line");
}

/* A client socket connected to the server, from the next of many loopback source
 * addresses (no port runs out). A loaded machine can refuse a connect now and then (a CI
 * run saw one in ~80k): the server's robustness is what is fuzzed, not the host's, so a
 * fresh socket tries again before the run gives up. */
static int connect_client(void) {
    static uint32_t next_source;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int tries = 0; tries < 50; tries++) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000000u | (1u + next_source++ % 0xfffffeu));
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&src, sizeof src) != 0)
            broken("cannot bind the client socket");
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
            return fd;
        fprintf(stderr, "fuzz_http: connect: %s (trying again)\n", strerror(errno));
        close(fd);
        usleep(20000);
    }
    broken("cannot connect to the server");
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!server)
        setup();
    int fd = connect_client();
    fcntl(fd, F_SETFL, O_NONBLOCK);
    size_t sent = 0;
    static char answer[1 << 16];
    size_t got = 0;
    bool closed = false;
    /* A wall-clock bound, not a spin count: a loaded machine must not fail it. */
    double deadline = now_s() + 10.0;
    for (int spin = 0; !closed && now_s() < deadline; spin++) {
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
        broken("the server did not close a half-closed client");
    check_answer(answer, got);
    deadline = now_s() + 10.0;
    while (cpm_http_server_connections(server) > 0 && now_s() < deadline)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (cpm_http_server_connections(server) != 0)
        broken("a connection outlived its client");
    return 0;
}
