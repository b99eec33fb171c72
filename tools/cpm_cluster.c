/* cpm_cluster.c - cpm-cluster: starts every process of a cluster file on this host, waits
 * until all report healthy, prints the router's address, and stops them all on
 * SIGINT/SIGTERM. Under mpirun (`cpm-cluster rank CONFIG`) each rank becomes the one
 * process the file assigns to it; MPI only launches, no data goes over it.
 *
 *   cpm-cluster up cluster-config/pp2.yaml --model models/minicpm-1b --port 8080
 *
 * The router's stderr passes through the launcher; the router's health reply names the
 * HTTP address it really bound (--port 0), which the ready line prints.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "common/cli.h"
#include "services/common/config.h"
#include "services/common/curve.h"
#include "services/common/transport.h"
#include "shard/engine/model/hf_config.h"
#include "shard/engine/model/tp_split.h"

#define MAX_ARGS 32

typedef struct launch {
    const char *cmd;          /* up | serve | health | rank | check | keys | schema */
    const char *config_path;
    const char *role;         /* serve, health: ROLE[:N] (default $CPM_ROLE) */
    const char *keys_dir;     /* keys: the directory */
    const char *client;       /* keys --client NAME */
    cpm_curve *curve;         /* the fabric's keys for our own health probes; NULL = plain */
    const char *model;
    int port;                 /* -1 = config's */
    const char *bin_dir;
    int timeout_s;
    const char *log_format;
} launch;

typedef struct proc {
    pid_t pid;
    cpm_role role;
    int index;
    char label[32];
    const char *endpoint;
    bool ready, exited;
    int status;
    char url[300]; /* router: "http://ADDR:PORT" from its health reply */
    /* supervision */
    double started;    /* when it was (re)started */
    double restart_at; /* > 0: it exited and starts again then */
    double backoff;    /* seconds before its next restart */
    double window;     /* start of the current crash-loop window */
    int crashes;       /* exits within that window */
    int restarts;      /* in all */
} proc;

/* The router's stderr passes through the launcher: every line is relayed to our stderr. */
typedef struct relay {
    int fd;                 /* read end of the router's stderr pipe; -1 once closed */
    char line[4096];
    size_t len;
} relay;

static volatile sig_atomic_t arg_stop; /* the signal that stops us: SIGINT or SIGTERM */

static void on_signal(int sig) {
    arg_stop = sig;
}

enum { OPT_MODEL = 1, OPT_PORT, OPT_BIN_DIR, OPT_TIMEOUT, OPT_LOG_FORMAT, OPT_CLIENT };

static const cpm_cli_opt opts[] = {
    {"model", 0, "DIR", "the model directory (overrides the file's)", OPT_MODEL},
    {"port", 0, "N", "the router's HTTP port (0: any free port, printed)", OPT_PORT},
    {"bin-dir", 0, "DIR", "where the cpm-* binaries are (default: beside this one, the build "
     "tree, PATH)", OPT_BIN_DIR},
    {"timeout", 0, "S", "seconds until every process must be healthy (default 120)", OPT_TIMEOUT},
    {"log-format", 0, "text|json", "the processes' log lines as text or JSON", OPT_LOG_FORMAT},
    {"client", 0, "NAME", "keys: also a keypair for an outside caller of the router's RPC",
     OPT_CLIENT},
    {0},
};

/* Commands and how many positional arguments each takes. */
static const struct command {
    const char *name;
    int min_args, max_args;
} commands[] = {
    {"up", 1, 1}, {"serve", 1, 2}, {"health", 1, 2}, {"rank", 1, 1}, {"check", 1, 1},
    {"keys", 1, 1}, {"schema", 0, 0},
};

static void parse_args(int argc, char **argv, launch *l) {
    cpm_cli cli = {.prog = "cpm-cluster", .synopsis = "COMMAND [CONFIG] [ROLE] [options]",
                   .tables = {opts},
                   .about = "  up CONFIG            start every process here, print the router's address\n"
                            "  serve CONFIG [ROLE]  become one process of the cluster (ROLE: router,\n"
                            "                       tokenizer:N, sampler:N, stage:N, expert:N, tp:K;\n"
                            "                       default $CPM_ROLE; N: $CPM_INDEX or the number\n"
                            "                       ending the host name, as in a StatefulSet's pods)\n"
                            "  health CONFIG [ROLE] exit 0 when that process answers ready (probes)\n"
                            "  rank CONFIG          under mpirun: become the process of this rank\n"
                            "  check CONFIG         check the file against the model, list the processes\n"
                            "  keys DIR             make the cluster's CURVE keys (kept if present)\n"
                            "  schema               the cluster file's keys and their defaults\n"};
    *l = (launch){.port = -1, .timeout_s = 120};
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;) {
        switch (c) {
        case OPT_MODEL: l->model = v; break;
        case OPT_PORT: l->port = cpm_cli_port(&cli, v); break;
        case OPT_BIN_DIR: l->bin_dir = v; break;
        case OPT_TIMEOUT: l->timeout_s = (int)cpm_cli_int(&cli, v, 0, INT_MAX); break;
        case OPT_LOG_FORMAT: l->log_format = v; break;
        case OPT_CLIENT: l->client = v; break;
        }
    }
    int n = argc - cli.optind - 1;
    l->cmd = n >= 0 ? argv[cli.optind] : "";
    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(l->cmd, commands[i].name))
            cmd = &commands[i];
    if (!cmd)
        cpm_cli_fail(&cli, "the first argument is up, serve, health, rank, check, keys or schema");
    if (n < cmd->min_args || n > cmd->max_args)
        cpm_cli_fail(&cli, "%s: wrong number of arguments", l->cmd);
    char **args = argv + cli.optind + 1;
    if (!strcmp(l->cmd, "keys"))
        l->keys_dir = args[0];
    else if (n > 0)
        l->config_path = args[0];
    l->role = n > 1 ? args[1] : getenv("CPM_ROLE");
}

/* ------------------------------------------------------------------ checks before start */

/* The model's own reading of its config.json (the engine's), so that the launcher and the
 * stages it starts judge the same model the same way. */
static int model_hparams(const char *dir, cpm_hparams *ret, cpm_error *err) {
    int rc = cpm_hparams_load(dir, ret, err);
    if (rc) {
        char why[CPM_ERROR_MSG_MAX];
        snprintf(why, sizeof why, "%s", err->msg);
        return cpm_error_set(err, rc, "model %s: %s", dir, why);
    }
    return 0;
}

/* For `up` everything runs here: each tcp endpoint must name a local address whose
 * port is free, else the service would fail later with a vaguer message. */
static int check_local_endpoint(const char *what, const char *ep, cpm_error *err) {
    if (strncmp(ep, "tcp://", 6))
        return 0;
    char host[256];
    const char *colon = strrchr(ep + 6, ':');
    size_t hl = (size_t)(colon - (ep + 6));
    if (hl >= sizeof host)
        return cpm_error_set(err, CPM_EINVAL, "%s: %s: host too long", what, ep);
    memcpy(host, ep + 6, hl);
    host[hl] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int g = getaddrinfo(host, colon + 1, &hints, &ai);
    if (g)
        return cpm_error_set(err, CPM_EINVAL, "%s: %s: cannot resolve '%s': %s", what, ep, host,
                             gai_strerror(g));
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    int rc = 0, one = 1;
    /* As zmq does for its listeners: a port in TIME_WAIT from a previous run is free. */
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen))
        rc = cpm_error_set(err, CPM_EINVAL, "%s: %s: cannot bind here: %s", what, ep, strerror(errno));
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return rc;
}

/* Each tensor-parallel stage against the engine's split rule (shard/engine/model/tp_split.h). */
static int model_tp_split(const cpm_hparams *hp, const cpm_config *c, cpm_error *err) {
    for (int i = 0; i < c->n_stages; i++) {
        int T = c->stages[i].n_tp + 1, rc = cpm_tp_split_check(hp, T, err);
        if (rc) {
            char why[CPM_ERROR_MSG_MAX];
            snprintf(why, sizeof why, "%s", err->msg);
            return cpm_error_set(err, rc, "%s: stages[%d].tp: %d ranks: model %s: %s", c->path, i,
                                 T, c->model, why);
        }
    }
    return 0;
}

static int check_cluster(cpm_config *c, bool local, cpm_error *err) {
    if (!c->model[0])
        return cpm_error_set(err, CPM_EINVAL, "%s: no model: set `model:` or pass --model DIR", c->path);
    cpm_hparams hp;
    int rc = model_hparams(c->model, &hp, err);
    if (!rc)
        rc = model_tp_split(&hp, c, err);
    if (!rc) {
        /* Resolve a copy: children get the file and resolve `end` themselves. */
        static cpm_config tmp; /* large: kept off the stack */
        tmp = *c;
        rc = cpm_config_resolve_layers(&tmp, hp.n_layers, err);
        if (!rc)
            rc = cpm_config_resolve_experts(&tmp, hp.n_experts, err);
    }
    for (int r = 0; local && !rc && r < cpm_config_n_procs(c); r++) {
        cpm_role role;
        int idx;
        cpm_config_proc(c, r, &role, &idx, NULL);
        char what[64];
        snprintf(what, sizeof what, "%s %d", cpm_role_name(role), idx);
        rc = check_local_endpoint(what, cpm_config_proc_endpoint(c, r), err);
    }
    if (local && !rc)
        rc = check_local_endpoint("router.results", c->router.results, err);
    for (int i = 0; local && i < c->n_stages; i++)
        for (int r = 0; !rc && r <= c->stages[i].n_tp && c->stages[i].n_tp; r++) {
            char what[64];
            snprintf(what, sizeof what, "stage %d tp rank %d mesh", i, r);
            rc = check_local_endpoint(what, r ? c->stages[i].tp[r - 1].mesh : c->stages[i].tp_mesh, err);
        }
    if (local && !rc && c->router.http_port) {
        char ep[CPM_CFG_STR + 16];
        snprintf(ep, sizeof ep, "tcp://%s:%d", c->router.http_addr, c->router.http_port);
        rc = check_local_endpoint("router.http", ep, err);
    }
    return rc;
}

/* ------------------------------------------------------------------ processes */

static const char *bin_name(cpm_role role) {
    static const char *names[] = {"cpm-router", "cpm-tokenizer", "cpm-sampler", "cpm-shard",
                                  "cpm-expert", "cpm-shard"};
    return names[role];
}

/* Where the build puts each binary, relative to the build root. */
static const char *build_rel(cpm_role role) {
    static const char *rel[] = {"router", "services/tokenizer", "services/sampler", "shard", "shard",
                                "shard"};
    return rel[role];
}

/* --bin-dir, then next to this executable, then the build tree around it, then PATH. */
static void find_bin(const launch *l, cpm_role role, char *out, size_t size) {
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = '\0';
    char cand[3][PATH_MAX * 2];
    snprintf(cand[0], sizeof cand[0], "%s/%s", l->bin_dir ? l->bin_dir : "/nonexistent", bin_name(role));
    snprintf(cand[1], sizeof cand[1], "%s/%s", self, bin_name(role));
    snprintf(cand[2], sizeof cand[2], "%s/../%s/%s", self, build_rel(role), bin_name(role));
    for (int i = 0; i < 3; i++)
        if (access(cand[i], X_OK) == 0 && strlen(cand[i]) < size) {
            memcpy(out, cand[i], strlen(cand[i]) + 1);
            return;
        }
    snprintf(out, size, "%s", bin_name(role)); /* execvp searches PATH */
}

static int build_argv(const launch *l, const cpm_config *c, cpm_role role, int idx, char *bin,
                      size_t bin_size, char **argv, char bufs[3][32]) {
    int n = 0;
    find_bin(l, role, bin, bin_size);
    argv[n++] = bin;
    argv[n++] = "--config";
    argv[n++] = (char *)l->config_path;
    argv[n++] = "--model";
    argv[n++] = (char *)c->model;
    if (role == CPM_ROLE_ROUTER) {
        if (l->port >= 0) {
            snprintf(bufs[0], 32, "%d", l->port);
            argv[n++] = "--port";
            argv[n++] = bufs[0];
        }
    } else if (role == CPM_ROLE_TP) { /* a stage's TP rank > 0: cpm-shard --index S --tp-rank R */
        int stage = 0, rank = 0;
        cpm_config_tp_proc(c, idx, &stage, &rank, NULL);
        snprintf(bufs[1], 32, "%d", stage);
        snprintf(bufs[2], 32, "%d", rank);
        argv[n++] = "--index";
        argv[n++] = bufs[1];
        argv[n++] = "--tp-rank";
        argv[n++] = bufs[2];
    } else {
        snprintf(bufs[1], 32, "%d", idx);
        argv[n++] = "--index";
        argv[n++] = bufs[1];
    }
    if (l->log_format) {
        argv[n++] = "--log-format";
        argv[n++] = (char *)l->log_format;
    }
    argv[n] = NULL;
    return n;
}

/* err_fd >= 0: the child's stderr goes there (the router's, into the relay pipe). */
static pid_t spawn(const launch *l, const cpm_config *c, proc *p, int err_fd) {
    char bin[PATH_MAX * 3], bufs[3][32];
    char *argv[MAX_ARGS];
    build_argv(l, c, p->role, p->index, bin, sizeof bin, argv, bufs);
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        /* Own process group: a terminal's Ctrl-C reaches only the launcher, which then
         * stops the children in order. */
        setpgid(0, 0);
        /* A launcher that dies (SIGKILL, OOM) takes its children with it: SIGTERM, so each
         * drains and exits, instead of orphans holding the ports. The race with a death
         * before this line is closed by checking the parent afterwards. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);
        signal(SIGPIPE, SIG_DFL); /* the launcher ignores it; children keep the default */
        if (err_fd >= 0) {
            dup2(err_fd, STDERR_FILENO);
            close(err_fd);
        }
        execvp(argv[0], argv);
        fprintf(stderr, "cpm-cluster: %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

/* ------------------------------------------------------------------ the router's stderr */

static int relay_open(relay *r, int *ret_child_fd) {
    int fds[2];
    *r = (relay){.fd = -1};
    if (pipe(fds))
        return -1;
    fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    /* Only the router's stderr (dup2 clears the flag there) may hold the write end, so
     * the relay sees end of file when the router exits. */
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    r->fd = fds[0];
    *ret_child_fd = fds[1];
    return 0;
}

static void relay_line(relay *r) {
    r->line[r->len] = '\0';
    fputs(r->line, stderr);
    r->len = 0;
}

/* Relays whatever the router has written; closes the pipe at end of file. */
static void relay_pump(relay *r) {
    while (r->fd >= 0) {
        ssize_t got = read(r->fd, r->line + r->len, sizeof r->line - 1 - r->len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (got <= 0) {
            if (r->len)
                relay_line(r);
            close(r->fd);
            r->fd = -1;
            return;
        }
        size_t end = r->len + (size_t)got, start = 0;
        for (size_t i = r->len; i < end; i++)
            if (r->line[i] == '\n') {
                char keep = r->line[i + 1];
                r->line[i + 1] = '\0';
                fputs(r->line + start, stderr);
                r->line[i + 1] = keep;
                start = i + 1;
            }
        memmove(r->line, r->line + start, end - start);
        r->len = end - start;
        if (r->len == sizeof r->line - 1)
            relay_line(r); /* a line longer than the buffer: pass it on in pieces */
    }
    fflush(stderr);
}

/* Sleeps up to ms, waking early for router output (relayed) or a signal. */
static void relay_wait(relay *r, int ms) {
    if (r->fd < 0) {
        usleep((useconds_t)ms * 1000);
        return;
    }
    struct pollfd pf = {.fd = r->fd, .events = POLLIN};
    if (poll(&pf, 1, ms) > 0)
        relay_pump(r);
}

static bool probe(void *z, const cpm_curve *curve, proc *p, cpm_error *err) {
    Cpm__V1__HealthRequest hr = CPM__V1__HEALTH_REQUEST__INIT;
    cpm_envelope env = CPM__V1__ENVELOPE__INIT;
    env.body_case = CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST;
    env.health_request = &hr;
    cpm_inmsg *m;
    if (cpm_rpc_call(z, curve, p->endpoint, &env, NULL, 300, &m, err))
        return false;
    bool ok = m->env->body_case == CPM__V1__ENVELOPE__BODY_HEALTH && m->env->health->ready;
    if (!ok && m->env->body_case == CPM__V1__ENVELOPE__BODY_HEALTH)
        cpm_error_set(err, CPM_EAGAIN, "%s", m->env->health->status);
    /* the router names the HTTP listener it bound: with --port 0 only it knows the port */
    const Cpm__V1__Health *h = ok ? m->env->health : NULL;
    if (h && p->role == CPM_ROLE_ROUTER && h->http_port && h->http_addr && h->http_addr[0])
        snprintf(p->url, sizeof p->url, "http://%s:%u", h->http_addr, (unsigned)h->http_port);
    cpm_inmsg_free(m);
    return ok;
}

static void reap(proc *ps, int n) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        for (int i = 0; i < n; i++)
            if (ps[i].pid == pid) {
                ps[i].exited = true;
                ps[i].status = st;
            }
}

static void describe_exit(const proc *p, char *buf, size_t size) {
    if (WIFEXITED(p->status))
        snprintf(buf, size, "%s exited with status %d", p->label, WEXITSTATUS(p->status));
    else
        snprintf(buf, size, "%s killed by signal %d", p->label, WTERMSIG(p->status));
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sends sig to the processes of one kind (router or not) and waits until they are gone
 * or the deadline passes, relaying the router's last lines meanwhile. */
static void stop_some(proc *ps, int n, bool router, int sig, relay *rl, double deadline) {
    for (int i = 0; i < n; i++)
        if (!ps[i].exited && ps[i].pid > 0 && (ps[i].role == CPM_ROLE_ROUTER) == router)
            kill(ps[i].pid, sig);
    while (now_s() < deadline) {
        reap(ps, n);
        int left = 0;
        for (int i = 0; i < n; i++)
            left += !ps[i].exited && ps[i].pid > 0 && (ps[i].role == CPM_ROLE_ROUTER) == router;
        if (!left)
            break;
        relay_wait(rl, 10);
    }
}

/* Router first, so it answers what it has in flight while the back ends still run and
 * takes no new work; then the rest. Our SIGTERM (a container stop) lets the router drain
 * for router.drain_ms; Ctrl-C (SIGINT) ends its requests at once. SIGKILL whatever is left
 * 5 s after that. */
static int stop_all(proc *ps, int n, const cpm_config *c, relay *rl) {
    bool drain = arg_stop == SIGTERM;
    double t0 = now_s(), router_s = 5 + (drain ? c->router.drain_ms / 1000.0 : 0);
    stop_some(ps, n, true, drain ? SIGTERM : SIGINT, rl, t0 + router_s);
    stop_some(ps, n, false, SIGTERM, rl, now_s() + 5);
    int unclean = 0;
    for (int i = 0; i < n; i++)
        if (!ps[i].exited && ps[i].pid > 0) {
            fprintf(stderr, "cpm-cluster: %s did not stop in time: killing it\n", ps[i].label);
            kill(ps[i].pid, SIGKILL);
            waitpid(ps[i].pid, &ps[i].status, 0);
            unclean++;
        } else if (ps[i].pid > 0 && !(WIFEXITED(ps[i].status) && WEXITSTATUS(ps[i].status) == 0) &&
                   !(WIFSIGNALED(ps[i].status) && WTERMSIG(ps[i].status) == SIGTERM)) {
            char why[96];
            describe_exit(&ps[i], why, sizeof why);
            fprintf(stderr, "cpm-cluster: on stop: %s\n", why);
            unclean++;
        }
    return unclean;
}

/* Back ends first, router last, so the router's first health checks find them. The
 * router's stderr goes into the relay. */
static int start_all(const launch *l, const cpm_config *c, proc *ps, int n, relay *rl) {
    int router_err = -1;
    if (relay_open(rl, &router_err)) {
        fprintf(stderr, "cpm-cluster: pipe: %s\n", strerror(errno));
        return 1;
    }
    for (int k = 0; k < n; k++) {
        int r = (k + 1) % n;
        proc *p = &ps[r];
        cpm_config_proc(c, r, &p->role, &p->index, NULL);
        snprintf(p->label, sizeof p->label, "%s %d", cpm_role_name(p->role), p->index);
        p->endpoint = cpm_config_proc_endpoint(c, r);
        p->pid = spawn(l, c, p, p->role == CPM_ROLE_ROUTER ? router_err : -1);
        if (p->pid < 0) {
            fprintf(stderr, "cpm-cluster: fork: %s\n", strerror(errno));
            close(router_err);
            return 1;
        }
    }
    close(router_err);
    return 0;
}

/* Polls every process's health until all are ready; 1 when one exits or the time is up. */
static int wait_ready(const launch *l, proc *ps, int n, relay *rl) {
    void *z = zmq_ctx_new();
    double deadline = now_s() + l->timeout_s;
    int n_ready = 0, rc = 0;
    cpm_error e = {0};
    while (n_ready < n && !arg_stop && !rc) {
        reap(ps, n);
        relay_pump(rl);
        for (int i = 0; i < n && !rc; i++) {
            if (ps[i].exited) {
                char why[96];
                describe_exit(&ps[i], why, sizeof why);
                fprintf(stderr, "cpm-cluster: %s while starting (see its log above)\n", why);
                rc = 1;
            } else if (!ps[i].ready && probe(z, l->curve, &ps[i], &e)) {
                ps[i].ready = true;
                n_ready++;
            }
        }
        if (!rc && n_ready < n && now_s() > deadline) {
            for (int i = 0; i < n; i++)
                if (!ps[i].ready)
                    fprintf(stderr, "cpm-cluster: %s at %s not healthy after %d s\n", ps[i].label,
                            ps[i].endpoint, l->timeout_s);
            rc = 1;
        }
        if (!rc && n_ready < n)
            relay_wait(rl, 100);
    }
    zmq_ctx_term(z);
    return rc;
}

/* The router's HTTP address, from its health reply. */
static int router_url(const proc *ps, int n, char *out, size_t size) {
    for (int i = 0; i < n; i++)
        if (ps[i].role == CPM_ROLE_ROUTER && ps[i].url[0]) {
            snprintf(out, size, "%s", ps[i].url);
            return 0;
        }
    fprintf(stderr, "cpm-cluster: the router's health reply names no HTTP listener\n");
    return 1;
}

/* Supervision: a child that exits is started again after a backoff that doubles from
 * SUPERVISE_BACKOFF_MIN to SUPERVISE_BACKOFF_MAX and resets once it has run for
 * SUPERVISE_STABLE_S; more than SUPERVISE_MAX_CRASHES exits within
 * SUPERVISE_WINDOW_S is a crash loop, and the cluster stops. Meanwhile the router
 * keeps serving wherever the layout allows (replicas, redundant tokenizers and
 * samplers), and takes the child back when it answers its health polls again. */
#define SUPERVISE_BACKOFF_MIN 0.5
#define SUPERVISE_BACKOFF_MAX 10.0
#define SUPERVISE_STABLE_S 30.0
#define SUPERVISE_WINDOW_S 60.0
#define SUPERVISE_MAX_CRASHES 5

/* p just exited: schedule its restart, or 1 for a crash loop. */
static int schedule_restart(proc *p, double now) {
    char why[96];
    describe_exit(p, why, sizeof why);
    if (now - p->window > SUPERVISE_WINDOW_S) {
        p->window = now;
        p->crashes = 0;
    }
    if (++p->crashes > SUPERVISE_MAX_CRASHES) {
        fprintf(stderr, "cpm-cluster: %s: %d exits in %.0f s, a crash loop: stopping the cluster\n",
                why, p->crashes, SUPERVISE_WINDOW_S);
        return 1;
    }
    if (p->backoff < SUPERVISE_BACKOFF_MIN)
        p->backoff = SUPERVISE_BACKOFF_MIN;
    p->restart_at = now + p->backoff;
    fprintf(stderr, "cpm-cluster: %s: restarting it in %.1f s\n", why, p->backoff);
    p->backoff = p->backoff * 2 > SUPERVISE_BACKOFF_MAX ? SUPERVISE_BACKOFF_MAX : p->backoff * 2;
    return 0;
}

/* Starts p again (the router with a fresh stderr pipe into the relay). */
static int restart(const launch *l, const cpm_config *c, proc *p, relay *rl, double now) {
    int err_fd = -1;
    if (p->role == CPM_ROLE_ROUTER) {
        if (rl->fd >= 0)
            close(rl->fd);
        if (relay_open(rl, &err_fd))
            return 1;
    }
    p->pid = spawn(l, c, p, err_fd);
    if (err_fd >= 0)
        close(err_fd);
    if (p->pid < 0) {
        fprintf(stderr, "cpm-cluster: fork: %s\n", strerror(errno));
        return 1;
    }
    p->exited = false;
    p->restart_at = 0;
    p->started = now;
    p->restarts++;
    fprintf(stderr, "cpm-cluster: %s started again (pid %d, restart %d)\n", p->label, (int)p->pid,
            p->restarts);
    return 0;
}

/* Runs until a signal (exit 0) or a crash loop (exit 1), restarting children that exit. */
static int serve(const launch *l, const cpm_config *c, proc *ps, int n, relay *rl) {
    for (int i = 0; i < n; i++)
        ps[i].started = now_s();
    while (!arg_stop) {
        reap(ps, n);
        double now = now_s();
        for (int i = 0; i < n; i++) {
            proc *p = &ps[i];
            if (p->exited && p->restart_at == 0 && schedule_restart(p, now))
                return 1;
            if (p->exited && now >= p->restart_at && restart(l, c, p, rl, now))
                return 1;
            if (!p->exited && now - p->started > SUPERVISE_STABLE_S)
                p->backoff = 0; /* it held: the next exit restarts it at once-ish */
        }
        relay_wait(rl, 100);
    }
    return 0;
}

static int cmd_up(const launch *l, cpm_config *c) {
    int n = cpm_config_n_procs(c);
    proc *ps = calloc((size_t)n, sizeof *ps);
    relay rl = {.fd = -1};
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* Relaying the router's log must not kill the launcher when our stderr is gone
     * (`cpm-cluster up ... 2>&1 | head`): the children would be left running. */
    signal(SIGPIPE, SIG_IGN);
    int rc = !ps || start_all(l, c, ps, n, &rl);
    if (!rc)
        rc = wait_ready(l, ps, n, &rl);
    char url[sizeof ps->url];
    if (!rc && !arg_stop)
        rc = router_url(ps, n, url, sizeof url);
    if (!rc && !arg_stop) {
        printf("cpm-cluster: ready: %s (%d processes; Ctrl-C stops them)\n", url, n);
        fflush(stdout);
        rc = serve(l, c, ps, n, &rl);
    }
    if (ps && stop_all(ps, n, c, &rl) && !rc)
        rc = 1;
    for (double end = now_s() + 2; rl.fd >= 0 && now_s() < end;)
        relay_wait(&rl, 100); /* the router's last lines, until it closes its end */
    if (rl.fd >= 0)
        close(rl.fd);
    if (!rc)
        printf("cpm-cluster: stopped\n");
    free(ps);
    return rc;
}

/* Becomes process p (exec): it gets the signals (SIGTERM drains) and its exit status is
 * the caller's (a container's, an mpirun rank's). Returns only when exec fails. */
static int become(const launch *l, const cpm_config *c, const proc *p) {
    char bin[PATH_MAX * 3], bufs[3][32];
    char *argv[MAX_ARGS];
    build_argv(l, c, p->role, p->index, bin, sizeof bin, argv, bufs);
    execvp(argv[0], argv);
    fprintf(stderr, "cpm-cluster %s: %s: %s\n", l->cmd, argv[0], strerror(errno));
    return 127;
}

/* Under mpirun: become the process this rank stands for. */
static int cmd_rank(const launch *l, cpm_config *c) {
    const char *r_env = getenv("OMPI_COMM_WORLD_RANK");
    if (!r_env)
        r_env = getenv("PMIX_RANK");
    if (!r_env) {
        fprintf(stderr, "cpm-cluster rank: no OMPI_COMM_WORLD_RANK: run it under mpirun\n");
        return 2;
    }
    int r = atoi(r_env);
    cpm_error e = {0};
    proc p = {0};
    if (cpm_config_proc(c, r, &p.role, &p.index, &e)) {
        fprintf(stderr, "cpm-cluster rank: %s (start mpirun with -np %d)\n", e.msg,
                cpm_config_n_procs(c));
        return 1;
    }
    return become(l, c, &p);
}

/* ROLE[:N] -> the process number (as under mpirun). Without :N the index is $CPM_INDEX,
 * else the number ending the host name (a StatefulSet's pod "cpm-stage-2" is stage 2),
 * else 0 when the role has a single process. */
static int role_proc(const cpm_config *c, const char *spec, int *ret, cpm_error *err) {
    if (!spec || !*spec)
        return cpm_error_set(err, CPM_EINVAL, "no role: give ROLE or set CPM_ROLE");
    char name[32], host[256] = "";
    const char *colon = strchr(spec, ':');
    int nl = colon ? (int)(colon - spec) : (int)strlen(spec);
    snprintf(name, sizeof name, "%.*s", nl, spec);
    const char *idx_text = colon ? colon + 1 : getenv("CPM_INDEX");
    bool from_host = false; /* a guess: a Deployment's pod name may end in digits too */
    if (!idx_text && gethostname(host, sizeof host - 1) == 0) {
        const char *dash = strrchr(host, '-');
        if (dash && dash[1] && strspn(dash + 1, "0123456789") == strlen(dash + 1))
            idx_text = dash + 1, from_host = true;
    }
    int want = idx_text ? atoi(idx_text) : -1, count = 0, only = -1;
    for (int r = 0; r < cpm_config_n_procs(c); r++) {
        cpm_role role;
        int idx;
        cpm_config_proc(c, r, &role, &idx, NULL);
        if (strcmp(cpm_role_name(role), name))
            continue;
        count++;
        only = r;
        if (idx == want) {
            *ret = r;
            return 0;
        }
    }
    if (count == 1 && (want < 0 || from_host || !strcmp(name, "router"))) {
        *ret = only;
        return 0;
    }
    if (!count)
        return cpm_error_set(err, CPM_EINVAL, "%s: no role '%s' (router, tokenizer, sampler, stage, "
                             "expert, tp)", c->path, name);
    if (want < 0)
        return cpm_error_set(err, CPM_EINVAL, "%s: %d processes are '%s': say which (%s:N, "
                             "CPM_INDEX or a host name ending in -N)", c->path, count, name, name);
    return cpm_error_set(err, CPM_ERANGE, "%s: no %s %d (there are %d)", c->path, name, want, count);
}

/* The process l->role names: *p (role, index, endpoint); prints why not. */
static int find_role(const launch *l, const cpm_config *c, proc *p) {
    cpm_error e = {0};
    int r = 0;
    *p = (proc){0};
    if (role_proc(c, l->role, &r, &e) || cpm_config_proc(c, r, &p->role, &p->index, &e)) {
        fprintf(stderr, "cpm-cluster %s: %s\n", l->cmd, e.msg);
        return 2;
    }
    p->endpoint = cpm_config_proc_endpoint(c, r);
    return 0;
}

/* One process of the cluster, here (a container, a pod). */
static int cmd_serve(const launch *l, const cpm_config *c) {
    proc p;
    return find_role(l, c, &p) ? 2 : become(l, c, &p);
}

/* A probe for container runtimes: 0 when the process answers ready, 1 otherwise. */
static int cmd_health(const launch *l, const cpm_config *c) {
    cpm_error e = {0};
    proc p;
    if (find_role(l, c, &p))
        return 2;
    void *z = zmq_ctx_new();
    bool ok = probe(z, l->curve, &p, &e);
    zmq_ctx_term(z);
    printf("%s %d at %s: %s\n", cpm_role_name(p.role), p.index, p.endpoint,
           ok ? "ready" : e.msg[0] ? e.msg : "not ready");
    return ok ? 0 : 1;
}

static int cmd_keys(const launch *l) {
    cpm_error e = {0};
    bool made;
    if (cpm_curve_generate(l->keys_dir, l->client, &made, &e)) {
        fprintf(stderr, "cpm-cluster keys: %s\n", e.msg);
        return 1;
    }
    printf("cpm-cluster keys: %s: %s fabric.pub, fabric.secret%s%s%s\n", l->keys_dir,
           made ? "wrote" : "kept", l->client ? ", client-" : "", l->client ? l->client : "",
           l->client ? ".pub, .secret" : "");
    return 0;
}

/* The keys our own probes use; `up` makes them on first use, so that the first command
 * just works, and says so. */
static int load_keys(launch *l, const cpm_config *c, bool make, cpm_error *err) {
    if (cpm_config_plaintext(c)) {
        fprintf(stderr, "cpm-cluster: WARNING: %s: security.curve: off: the fabric is plain text\n",
                c->path);
        return 0;
    }
    char dir[1024];
    int rc = cpm_config_keys_dir(c, dir, sizeof dir, err);
    bool made = false;
    if (!rc && make)
        rc = cpm_curve_generate(dir, NULL, &made, err);
    if (made)
        fprintf(stderr, "cpm-cluster: made the cluster's CURVE keys in %s\n", dir);
    return rc ? rc : cpm_curve_load(dir, &l->curve, err);
}

static int cmd_check(const cpm_config *c) {
    int n = cpm_config_n_procs(c);
    printf("%s: model %s, %d processes\n", c->path, c->model, n);
    for (int r = 0; r < n; r++) {
        cpm_role role;
        int idx;
        cpm_config_proc(c, r, &role, &idx, NULL);
        int tp_stage = 0, tp_rank = 0;
        if (role == CPM_ROLE_TP)
            cpm_config_tp_proc(c, idx, &tp_stage, &tp_rank, NULL);
        const char *host = role == CPM_ROLE_ROUTER      ? c->router.host
                           : role == CPM_ROLE_TOKENIZER ? c->tokenizers[idx].host
                           : role == CPM_ROLE_SAMPLER   ? c->samplers[idx].host
                           : role == CPM_ROLE_EXPERT    ? c->experts[idx].svc.host
                           : role == CPM_ROLE_TP        ? c->stages[tp_stage].tp[tp_rank - 1].svc.host
                                                        : c->stages[idx].svc.host;
        printf("  rank %d: %s %d on %s at %s", r, cpm_role_name(role), idx, host,
               cpm_config_proc_endpoint(c, r));
        if (role == CPM_ROLE_STAGE) {
            const cpm_cfg_stage *st = &c->stages[idx];
            if (st->layer_end == CPM_CFG_LAYER_END)
                printf(" layers %d..end", st->layer_begin);
            else
                printf(" layers %d..%d", st->layer_begin, st->layer_end - 1);
            if (c->n_pipelines > 1)
                printf(" (pipeline %d)", st->pipeline);
        }
        if (role == CPM_ROLE_STAGE && c->stages[idx].n_tp)
            printf(" tensor parallel rank 0 of %d", c->stages[idx].n_tp + 1);
        if (role == CPM_ROLE_TP)
            printf(" stage %d tensor parallel rank %d of %d", tp_stage, tp_rank,
                   c->stages[tp_stage].n_tp + 1);
        if (role == CPM_ROLE_EXPERT) {
            const cpm_cfg_expert *x = &c->experts[idx];
            if (x->expert_end == CPM_CFG_LAYER_END)
                printf(" experts %d..end", x->expert_begin);
            else
                printf(" experts %d..%d", x->expert_begin, x->expert_end - 1);
        }
        printf("\n");
    }
    return 0;
}

int main(int argc, char **argv) {
    launch l;
    parse_args(argc, argv, &l);
    if (!strcmp(l.cmd, "keys"))
        return cmd_keys(&l);
    if (!strcmp(l.cmd, "schema")) {
        static char buf[16384];
        cpm_config_describe(buf, sizeof buf);
        fputs(buf, stdout);
        return 0;
    }
    cpm_config *c;
    cpm_error e = {0};
    if (cpm_config_load(l.config_path, &c, &e)) {
        fprintf(stderr, "cpm-cluster: %s\n", e.msg);
        return 1;
    }
    if (l.model)
        cpm_config_set_model(c, l.model);
    if (l.port >= 0)
        c->router.http_port = l.port;
    int rc;
    bool up = !strcmp(l.cmd, "up");
    if (!strcmp(l.cmd, "rank"))
        rc = cmd_rank(&l, c);
    else if (!strcmp(l.cmd, "serve"))
        rc = cmd_serve(&l, c);
    else if (!strcmp(l.cmd, "health") && load_keys(&l, c, false, &e)) {
        fprintf(stderr, "cpm-cluster: %s\n", e.msg);
        rc = 2;
    } else if (!strcmp(l.cmd, "health"))
        rc = cmd_health(&l, c);
    else if (check_cluster(c, up, &e) || (up && load_keys(&l, c, true, &e))) {
        fprintf(stderr, "cpm-cluster: %s\n", e.msg);
        rc = 1;
    } else
        rc = up ? cmd_up(&l, c) : cmd_check(c);
    cpm_curve_free(l.curve);
    cpm_config_free(c);
    return rc;
}
