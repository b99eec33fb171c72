/* curve.c - CurveZMQ key files and the ZAP handler thread.
 *
 * Keys are Z85 text (40 characters), one per file, so that they can be written by hand,
 * diffed, and mounted as a Kubernetes Secret without conversion. The ZAP handler is a
 * REP socket on inproc://zeromq.zap.01 in its own thread: libzmq's I/O threads wait on
 * it during every handshake, so it must not share the service's loop (a busy loop would
 * stall new connections).
 */
#include "curve.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define PATH_LEN 1024
#define LOG_FIRST_REFUSALS 20 /* then one line per LOG_EVERY, so a flood cannot fill the disk */
#define LOG_EVERY 1000

typedef struct key {
    char z85[CPM_CURVE_KEY_Z85 + 1];
    uint8_t bin[32];
} key;

struct cpm_curve {
    key pub, secret;  /* this process's keypair (the fabric's, or a client's) */
    key server;       /* the fabric's public key: whom we dial */
    int n_clients;
    key clients[CPM_CURVE_MAX_CLIENTS];
    /* ZAP handler */
    void *rep;        /* bound to ZAP_ENDPOINT; the thread's once it runs */
    const cpm_log *log;
    pthread_t thread;
    bool running;
    atomic_bool stop;
    atomic_long refused;
};

/* ------------------------------------------------------------------ key files */

static int key_parse(const char *text, key *k) {
    size_t n = strlen(text);
    if (n != CPM_CURVE_KEY_Z85 || !zmq_z85_decode(k->bin, text))
        return -1;
    memcpy(k->z85, text, CPM_CURVE_KEY_Z85 + 1);
    return 0;
}

/* The first line that is not blank and not a '#' comment, trimmed. */
static int key_read(const char *path, key *k, cpm_error *err) {
    FILE *f = fopen(path, "r");
    if (!f)
        return cpm_error_set(err, CPM_EIO, "%s: %s (make the keys with `cpm-cluster keys DIR`)",
                             path, strerror(errno));
    char line[256];
    int rc = cpm_error_set(err, CPM_EFORMAT, "%s: no key in it", path);
    while (fgets(line, sizeof line, f)) {
        char *s = line + strspn(line, " \t");
        s[strcspn(s, " \t\r\n")] = '\0';
        if (!*s || *s == '#')
            continue;
        rc = key_parse(s, k) ? cpm_error_set(err, CPM_EFORMAT, "%s: not a Z85 CURVE key (40 "
                                             "characters)", path)
                             : 0;
        break;
    }
    fclose(f);
    return rc;
}

static int key_write(const char *path, const char *what, const char *z85, mode_t mode,
                     cpm_error *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode);
    if (fd < 0)
        return cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
    char text[256];
    int n = snprintf(text, sizeof text, "# cpm-cluster %s (CurveZMQ, Z85)\n%s\n", what, z85);
    bool ok = write(fd, text, (size_t)n) == n;
    ok &= close(fd) == 0;
    return ok ? 0 : cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
}

static void key_path(char *out, const char *dir, const char *name, const char *ext) {
    snprintf(out, PATH_LEN, "%s/%s.%s", dir, name, ext);
}

/* Writes NAME.pub and NAME.secret unless NAME.secret exists. */
static int pair_make(const char *dir, const char *name, const char *what, bool *created,
                     cpm_error *err) {
    char sec_path[PATH_LEN], pub_path[PATH_LEN];
    key_path(sec_path, dir, name, "secret");
    key_path(pub_path, dir, name, "pub");
    if (access(sec_path, F_OK) == 0)
        return 0;
    char pub[CPM_CURVE_KEY_Z85 + 1], sec[CPM_CURVE_KEY_Z85 + 1];
    if (zmq_curve_keypair(pub, sec))
        return cpm_error_set(err, CPM_EIO, "zmq_curve_keypair: %s (libzmq without libsodium?)",
                             zmq_strerror(zmq_errno()));
    unlink(pub_path); /* a public key without its secret is worthless: replace it */
    char what_sec[64];
    snprintf(what_sec, sizeof what_sec, "%s secret key: keep it private", what);
    int rc = key_write(sec_path, what_sec, sec, 0600, err);
    if (!rc)
        rc = key_write(pub_path, what, pub, 0644, err);
    *created = *created || !rc;
    return rc;
}

int cpm_curve_generate(const char *dir, const char *client, bool *created, cpm_error *err) {
    *created = false;
    if (mkdir(dir, 0700) && errno != EEXIST)
        return cpm_error_set(err, CPM_EIO, "%s: %s", dir, strerror(errno));
    int rc = pair_make(dir, "fabric", "fabric public key", created, err);
    if (!rc && client) {
        if (!*client || strspn(client, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                       "0123456789_-") != strlen(client))
            return cpm_error_set(err, CPM_EINVAL, "client name '%s': letters, digits, _ and - only",
                                 client);
        char name[256];
        snprintf(name, sizeof name, "client-%.200s", client);
        rc = pair_make(dir, name, "client public key", created, err);
    }
    return rc;
}

/* The secret must belong to the public key beside it: a mismatch would only show up as
 * handshakes that silently never complete. */
static int pair_read(const char *dir, const char *name, key *pub, key *sec, cpm_error *err) {
    char path[PATH_LEN];
    key_path(path, dir, name, "pub");
    int rc = key_read(path, pub, err);
    key_path(path, dir, name, "secret");
    if (!rc)
        rc = key_read(path, sec, err);
    char derived[CPM_CURVE_KEY_Z85 + 1];
    if (!rc && (zmq_curve_public(derived, sec->z85) || strcmp(derived, pub->z85)))
        rc = cpm_error_set(err, CPM_EFORMAT, "%s/%s.secret does not belong to %s.pub", dir, name,
                           name);
    return rc;
}

static bool is_client_pub(const char *name) {
    size_t n = strlen(name);
    return !strncmp(name, "client-", 7) && n > 11 && !strcmp(name + n - 4, ".pub");
}

static int clients_read(const char *dir, cpm_curve *c, cpm_error *err) {
    DIR *d = opendir(dir);
    if (!d)
        return cpm_error_set(err, CPM_EIO, "%s: %s", dir, strerror(errno));
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        if (!is_client_pub(e->d_name))
            continue;
        if (c->n_clients == CPM_CURVE_MAX_CLIENTS) {
            rc = cpm_error_set(err, CPM_ELIMIT, "%s: more than %d client keys", dir,
                               CPM_CURVE_MAX_CLIENTS);
            break;
        }
        char path[PATH_LEN];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        rc = key_read(path, &c->clients[c->n_clients++], err);
    }
    closedir(d);
    return rc;
}

int cpm_curve_load(const char *dir, cpm_curve **ret, cpm_error *err) {
    *ret = NULL;
    cpm_curve *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "keys");
    int rc = pair_read(dir, "fabric", &c->pub, &c->secret, err);
    if (!rc)
        rc = clients_read(dir, c, err);
    if (rc) {
        free(c);
        return rc;
    }
    c->server = c->pub;
    *ret = c;
    return 0;
}

int cpm_curve_load_client(const char *dir, const char *name, cpm_curve **ret, cpm_error *err) {
    *ret = NULL;
    cpm_curve *c = calloc(1, sizeof *c);
    if (!c)
        return cpm_error_set(err, CPM_ENOMEM, "keys");
    char full[256], path[PATH_LEN];
    snprintf(full, sizeof full, "client-%.200s", name);
    int rc = pair_read(dir, full, &c->pub, &c->secret, err);
    key_path(path, dir, "fabric", "pub");
    if (!rc)
        rc = key_read(path, &c->server, err);
    if (rc) {
        free(c);
        return rc;
    }
    *ret = c;
    return 0;
}

/* ------------------------------------------------------------------ socket options */

int cpm_curve_listen(const cpm_curve *c, void *zsock, const char *domain, cpm_error *err) {
    int one = 1;
    if (zmq_setsockopt(zsock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
        zmq_setsockopt(zsock, ZMQ_CURVE_SECRETKEY, c->secret.z85, CPM_CURVE_KEY_Z85) ||
        zmq_setsockopt(zsock, ZMQ_ZAP_DOMAIN, domain, strlen(domain)))
        return cpm_error_set(err, CPM_EIO, "CURVE server options: %s", zmq_strerror(zmq_errno()));
    return 0;
}

int cpm_curve_dial(const cpm_curve *c, void *zsock, cpm_error *err) {
    if (zmq_setsockopt(zsock, ZMQ_CURVE_SERVERKEY, c->server.z85, CPM_CURVE_KEY_Z85) ||
        zmq_setsockopt(zsock, ZMQ_CURVE_PUBLICKEY, c->pub.z85, CPM_CURVE_KEY_Z85) ||
        zmq_setsockopt(zsock, ZMQ_CURVE_SECRETKEY, c->secret.z85, CPM_CURVE_KEY_Z85))
        return cpm_error_set(err, CPM_EIO, "CURVE client options: %s", zmq_strerror(zmq_errno()));
    return 0;
}

/* ------------------------------------------------------------------ ZAP handler */

enum { ZAP_VERSION, ZAP_ID, ZAP_DOMAIN, ZAP_ADDRESS, ZAP_ROUTING_ID, ZAP_MECHANISM, ZAP_KEY,
       ZAP_FRAMES };

/* The fabric's key is admitted everywhere; client keys only where the RPC listens. */
static bool admitted(const cpm_curve *c, const char *domain, const uint8_t *k) {
    if (!memcmp(k, c->pub.bin, 32))
        return true;
    if (strcmp(domain, CPM_CURVE_RPC))
        return false;
    for (int i = 0; i < c->n_clients; i++)
        if (!memcmp(k, c->clients[i].bin, 32))
            return true;
    return false;
}

static void log_refusal(cpm_curve *c, const char *domain, const char *address, const uint8_t *k) {
    long n = atomic_fetch_add(&c->refused, 1) + 1;
    if (!c->log || (n > LOG_FIRST_REFUSALS && n % LOG_EVERY))
        return;
    char z85[CPM_CURVE_KEY_Z85 + 1] = "(none)";
    if (k)
        zmq_z85_encode(z85, k, 32);
    cpm_log_warn(c->log, "refused a connection from %s to %s: key %s is not allowed (%ld refused "
                 "so far)", address, domain, z85, n);
}

static void frame_text(zmq_msg_t *f, char *out, size_t size) {
    size_t n = zmq_msg_size(f) < size - 1 ? zmq_msg_size(f) : size - 1;
    memcpy(out, zmq_msg_data(f), n);
    out[n] = '\0';
}

/* Receives one request (all its frames) and answers it. */
static void zap_serve_one(cpm_curve *c, void *rep) {
    zmq_msg_t f[ZAP_FRAMES + 1];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t *m = &f[n < ZAP_FRAMES ? n : ZAP_FRAMES];
        zmq_msg_init(m);
        if (zmq_msg_recv(m, rep, 0) < 0) {
            zmq_msg_close(m);
            break;
        }
        more = zmq_msg_more(m);
        if (n < ZAP_FRAMES)
            n++;
        else
            zmq_msg_close(m);
    }
    char version[8] = "", domain[64] = "", address[64] = "", mech[16] = "";
    if (n > ZAP_MECHANISM) {
        frame_text(&f[ZAP_VERSION], version, sizeof version);
        frame_text(&f[ZAP_DOMAIN], domain, sizeof domain);
        frame_text(&f[ZAP_ADDRESS], address, sizeof address);
        frame_text(&f[ZAP_MECHANISM], mech, sizeof mech);
    }
    const uint8_t *k = n == ZAP_FRAMES && zmq_msg_size(&f[ZAP_KEY]) == 32
                           ? zmq_msg_data(&f[ZAP_KEY]) : NULL;
    bool ok = !strcmp(version, "1.0") && !strcmp(mech, "CURVE") && k && admitted(c, domain, k);
    if (!ok)
        log_refusal(c, domain, address, k);
    const char *status = ok ? "200" : "400", *text = ok ? "OK" : "key not allowed";
    zmq_send(rep, "1.0", 3, ZMQ_SNDMORE);
    if (n > ZAP_ID)
        zmq_send(rep, zmq_msg_data(&f[ZAP_ID]), zmq_msg_size(&f[ZAP_ID]), ZMQ_SNDMORE);
    else
        zmq_send(rep, "", 0, ZMQ_SNDMORE);
    zmq_send(rep, status, 3, ZMQ_SNDMORE);
    zmq_send(rep, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(rep, "", 0, ZMQ_SNDMORE); /* user id: none, admission is all we decide */
    zmq_send(rep, "", 0, 0);
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

static void *zap_main(void *arg) {
    cpm_curve *c = arg;
    void *rep = c->rep;
    while (!atomic_load(&c->stop)) {
        zmq_pollitem_t it = {.socket = rep, .events = ZMQ_POLLIN};
        int p = zmq_poll(&it, 1, 100);
        if (p < 0 && zmq_errno() == ETERM)
            break;
        if (p > 0)
            zap_serve_one(c, rep);
    }
    zmq_close(rep);
    return NULL;
}

int cpm_curve_attach(cpm_curve *c, void *zctx, const cpm_log *log, cpm_error *err) {
    if (c->running)
        return cpm_error_set(err, CPM_EINVAL, "the ZAP handler is already running");
    /* Bound here, so that a failure (a second handler on the context) is an error now;
     * the thread takes the socket over (pthread_create is the barrier zmq asks for). */
    int zero = 0;
    void *rep = zmq_socket(zctx, ZMQ_REP);
    if (!rep || zmq_setsockopt(rep, ZMQ_LINGER, &zero, sizeof zero) || zmq_bind(rep, ZAP_ENDPOINT)) {
        int e = zmq_errno();
        if (rep)
            zmq_close(rep);
        return cpm_error_set(err, CPM_EIO, "ZAP handler: %s", zmq_strerror(e));
    }
    c->rep = rep;
    c->log = log;
    atomic_store(&c->stop, false);
    if (pthread_create(&c->thread, NULL, zap_main, c)) {
        zmq_close(rep);
        return cpm_error_set(err, CPM_EIO, "ZAP handler thread");
    }
    c->running = true;
    return 0;
}

long cpm_curve_refused(const cpm_curve *c) {
    return atomic_load(&((cpm_curve *)c)->refused);
}

void cpm_curve_free(cpm_curve *c) {
    if (!c)
        return;
    if (c->running) {
        atomic_store(&c->stop, true);
        pthread_join(c->thread, NULL);
    }
    free(c);
}
