/* door.c - API keys and CORS for the router's HTTP door. */
#include "door.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_KEYS 256
#define KEY_MAX 256 /* bytes, with the terminating NUL */
#define MAX_ORIGINS 32

struct cpm_door {
    int n_keys;
    char keys[MAX_KEYS][KEY_MAX];
    bool any_origin; /* cors_origins: "*" */
    int n_origins;
    char origins[MAX_ORIGINS][CPM_CFG_STR];
};

static char *trim(char *s) {
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

static int add_key(cpm_door *d, const char *key, const char *from, cpm_error *err) {
    if (!*key)
        return 0;
    if (strlen(key) >= KEY_MAX)
        return cpm_error_set(err, CPM_EINVAL, "%s: an API key longer than %d bytes", from, KEY_MAX - 1);
    if (d->n_keys == MAX_KEYS)
        return cpm_error_set(err, CPM_ELIMIT, "%s: more than %d API keys", from, MAX_KEYS);
    snprintf(d->keys[d->n_keys++], KEY_MAX, "%s", key);
    return 0;
}

/* router.api_keys, relative to the cluster file's directory. */
static int read_key_file(cpm_door *d, const cpm_config *cfg, cpm_error *err) {
    const char *name = cfg->router.api_keys;
    if (!*name)
        return 0;
    char path[2 * CPM_CFG_STR + 2];
    int rc = cpm_config_file_path(cfg, name, path, sizeof path, err);
    if (rc)
        return rc;
    FILE *f = fopen(path, "r");
    if (!f)
        return cpm_error_set(err, CPM_EIO, "router.api_keys: %s: %s", path, strerror(errno));
    char line[KEY_MAX + 2];
    while (rc == 0 && fgets(line, sizeof line, f)) {
        char *k = trim(line);
        if (*k != '#')
            rc = add_key(d, k, path, err);
    }
    fclose(f);
    return rc;
}

static int read_key_env(cpm_door *d, cpm_error *err) {
    const char *env = getenv("CPM_API_KEYS");
    if (!env)
        return 0;
    char *copy = strdup(env), *save = NULL;
    int rc = copy ? 0 : CPM_ENOMEM;
    for (char *k = copy ? strtok_r(copy, ",", &save) : NULL; k && rc == 0; k = strtok_r(NULL, ",", &save))
        rc = add_key(d, trim(k), "CPM_API_KEYS", err);
    free(copy);
    return rc;
}

static int read_origins(cpm_door *d, const cpm_config *cfg) {
    char copy[CPM_CFG_STR], *save = NULL;
    snprintf(copy, sizeof copy, "%s", cfg->router.cors_origins);
    for (char *o = strtok_r(copy, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
        o = trim(o);
        if (!strcmp(o, "*"))
            d->any_origin = true;
        else if (*o && d->n_origins < MAX_ORIGINS)
            snprintf(d->origins[d->n_origins++], CPM_CFG_STR, "%s", o);
    }
    return 0;
}

/* 127.0.0.0/8, ::1 (any spelling) and ::ffff:127.x.y.z, read as addresses, so that
 * "127.example.com" or "::10" is not taken for this host. */
static bool loopback(const char *addr) {
    struct in_addr v4;
    struct in6_addr v6;
    if (!strcmp(addr, "localhost"))
        return true;
    if (inet_pton(AF_INET, addr, &v4) == 1)
        return (ntohl(v4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, addr, &v6) != 1)
        return false;
    return IN6_IS_ADDR_LOOPBACK(&v6) || (IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127);
}

/* An open door is a choice: fine on loopback (said once), refused on the network unless
 * the file says auth: none (said at every start; keys configured anyway are not asked for,
 * so that the warning is the truth). */
static int check_policy(cpm_door *d, const cpm_config *cfg, const char *addr, const cpm_log *log,
                        cpm_error *err) {
    bool none = !strcmp(cfg->router.auth, "none");
    if (d->n_keys && !none)
        return 0;
    if (none) {
        if (log)
            cpm_log_warn(log, "router.auth: none: the HTTP API on %s takes requests from anyone "
                         "who reaches it%s", addr, d->n_keys ? " (its API keys are ignored)" : "");
        d->n_keys = 0;
        return 0;
    }
    if (loopback(addr)) {
        if (log)
            cpm_log_warn(log, "HTTP API without keys, reachable from this host only (%s); set "
                         "router.api_keys or CPM_API_KEYS to require them", addr);
        return 0;
    }
    return cpm_error_set(err, CPM_EINVAL, "%s: the HTTP API listens on %s without API keys: set "
                         "router.api_keys (a file) or CPM_API_KEYS, or say router.auth: none",
                         cfg->path, addr);
}

int cpm_door_new(const cpm_config *cfg, const char *http_addr, const cpm_log *log, cpm_door **ret,
                 cpm_error *err) {
    *ret = NULL;
    cpm_door *d = calloc(1, sizeof *d);
    if (!d)
        return cpm_error_set(err, CPM_ENOMEM, "router: out of memory");
    int rc = read_key_file(d, cfg, err);
    if (!rc)
        rc = read_key_env(d, err);
    if (!rc)
        rc = read_origins(d, cfg);
    if (!rc)
        rc = check_policy(d, cfg, http_addr, log, err);
    if (rc) {
        free(d);
        return rc;
    }
    *ret = d;
    return 0;
}

bool cpm_door_open(const char *path) {
    return !strcmp(path, "/health") || !strcmp(path, "/live") || !strcmp(path, "/ready") ||
           !strcmp(path, "/") || !strcmp(path, "/index.html"); /* the chat page asks for the key */
}

/* Equal or not, in a time that depends on neither string's content. */
static bool same_key(const char *a, const char *b) {
    unsigned char diff = 0;
    size_t la = strnlen(a, KEY_MAX), lb = strnlen(b, KEY_MAX);
    for (size_t i = 0; i < KEY_MAX; i++) {
        unsigned char x = i < la ? (unsigned char)a[i] : 0, y = i < lb ? (unsigned char)b[i] : 0;
        diff |= x ^ y;
    }
    return diff == 0 && la == lb;
}

bool cpm_door_admits(const cpm_door *d, const cpm_http_request *r) {
    if (d->n_keys == 0)
        return true;
    const char *auth = cpm_http_request_header(r, "Authorization");
    if (!auth || strncasecmp(auth, "Bearer ", 7))
        return false;
    const char *key = auth + 7;
    while (*key == ' ')
        key++;
    bool ok = false;
    for (int i = 0; i < d->n_keys; i++) /* every key, whatever matched */
        ok |= same_key(key, d->keys[i]);
    return ok;
}

int cpm_door_n_keys(const cpm_door *d) {
    return d->n_keys;
}

static bool origin_allowed(const cpm_door *d, const char *origin) {
    if (d->any_origin)
        return true;
    for (int i = 0; i < d->n_origins; i++)
        if (!strcmp(origin, d->origins[i]))
            return true;
    return false;
}

const char *cpm_door_cors(const cpm_door *d, const cpm_http_request *r, bool preflight, char *out,
                          size_t size) {
    const char *origin = r ? cpm_http_request_header(r, "Origin") : NULL;
    out[0] = '\0';
    /* an origin echoed into a header must be one line of visible characters */
    if (!origin || !*origin || strlen(origin) >= 512 || strpbrk(origin, "\r\n") ||
        !origin_allowed(d, origin))
        return out;
    int n = snprintf(out, size, "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n",
                     d->any_origin ? "*" : origin);
    if (preflight && n > 0 && (size_t)n < size)
        snprintf(out + n, size - (size_t)n,
                 "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                 "Access-Control-Allow-Headers: Authorization, Content-Type, X-Request-Id\r\n"
                 "Access-Control-Max-Age: 600\r\n");
    return out;
}

void cpm_door_free(cpm_door *d) {
    free(d);
}
