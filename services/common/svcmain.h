/* svcmain.h - what every service's main.c shares: arguments naming its place in the
 * cluster (--config FILE --index N, or explicit --bind), logging, and a loop that
 * stops cleanly on SIGINT/SIGTERM. Used by main.c files only (it prints and exits). */
#ifndef CPM_SVCMAIN_H
#define CPM_SVCMAIN_H

#include <stdbool.h>
#include <uv.h>

#include "common/cli.h"
#include "services/common/config.h"
#include "services/common/curve.h"
#include "services/common/log.h"

typedef struct cpm_svc_args {
    const char *config_path;  /* --config */
    int index;                /* --index (within the role) */
    const char *bind;         /* --bind: overrides the config's endpoint */
    const char *name;         /* --name */
    const char *model;        /* --model */
    int threads;              /* --threads, 0 = from config or 1 */
    const char *keys;         /* --keys: the key directory (overrides the config's) */
    bool plaintext;           /* --plaintext: no CURVE (standalone runs without keys) */
    cpm_log log;
    cpm_config *config;       /* loaded when --config was given */
    char name_buf[64];
} cpm_svc_args;

/* Ids of the options every service takes; a binary's own options use ids from
 * CPM_SVC_OPT_OWN up. */
enum {
    CPM_SVC_OPT_CONFIG = 1,
    CPM_SVC_OPT_INDEX,
    CPM_SVC_OPT_BIND,
    CPM_SVC_OPT_NAME,
    CPM_SVC_OPT_MODEL,
    CPM_SVC_OPT_THREADS,
    CPM_SVC_OPT_LOG_FORMAT,
    CPM_SVC_OPT_LOG_LEVEL,
    CPM_SVC_OPT_KEYS,
    CPM_SVC_OPT_PLAINTEXT,
    CPM_SVC_OPT_OWN = 100,
};

/* Called with each of a binary's own options, in argv order; val is NULL for a flag.
 * May exit through cpm_cli_int and friends on a bad value. */
typedef void cpm_svc_opt_fn(const cpm_cli *cli, int id, const char *val, void *user);

typedef struct cpm_svc_cli {
    const char *prog;        /* the binary: "cpm-shard" (usage, --version) */
    const char *role;        /* "stage": the default name is role + index */
    const char *about;       /* usage text after the options; may be NULL */
    const cpm_cli_opt *opts; /* the binary's own options, or NULL */
    cpm_svc_opt_fn *on_opt;  /* receives them */
    void *user;
} cpm_svc_cli;

/* Tunes malloc (cpm_svc_tune_malloc), parses the common options and the binary's own
 * (cpm_cli: --help, --version, a bad option or a positional argument exit there), names
 * the service and loads --config (exit 1 when it cannot be read). */
void cpm_svc_parse_args(int argc, char **argv, const cpm_svc_cli *spec, cpm_svc_args *a);

/* The fabric's keys for this process (curve.h), with the ZAP handler started on zctx.
 * From the cluster file's security section (its key directory, or $CPM_KEYS_DIR, or
 * keys_dir when given); without a file from keys_dir or $CPM_KEYS_DIR. *ret = NULL means
 * plain text, which happens only when asked for (security.curve: off, or plaintext) and
 * is logged as a warning every time; no keys and no such request is an error. */
int cpm_svc_secure(const cpm_config *cfg, const char *keys_dir, bool plaintext, void *zctx,
                   const cpm_log *log, cpm_curve **ret, cpm_error *err);

/* Process-wide malloc tuning every service main applies first. libzmq allocates a
 * temporary buffer per message (CURVE: a plaintext and a ciphertext copy); with glibc's
 * defaults each one above the dynamic mmap threshold is an mmap, page faults and a munmap,
 * which made CURVE 4.7 MB logits batches 6x slower (70 vs 450 MB/s, bench_fabric). Blocks
 * up to 64 MiB come from the heap instead; the weights and KV cache, larger, still map. */
void cpm_svc_tune_malloc(void);

/* How a service stops. */
typedef struct cpm_svc_life {
    void (*stop)(void *user);  /* close everything now (required) */
    void (*drain)(void *user); /* stop taking work: health says "draining" (NULL: stop at once) */
    bool (*busy)(void *user);  /* work accepted and not finished yet (NULL: never) */
    void *user;
} cpm_svc_life;

#define CPM_SVC_DRAIN_MIN_MS 1200 /* a drain lasts this long at least: the router polls health
                                     every second and must see it to stop sending here */
#define CPM_SVC_DRAIN_MAX_MS 5000 /* and at most this: then stop, whatever is left */

/* Runs loop until a signal. SIGTERM drains (life->drain, then life->stop once nothing is
 * busy, between the two bounds above); SIGINT or a second signal stops at once. Then
 * runs the loop until every handle is closed. */
void cpm_svc_run(uv_loop_t *loop, const cpm_svc_life *life, const cpm_log *log);

#endif
