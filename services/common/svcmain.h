/* svcmain.h - what every service's main.c shares: arguments naming its place in the
 * cluster (--config FILE --index N, or explicit --bind), logging, and a loop that
 * stops cleanly on SIGINT/SIGTERM. Used by main.c files only (it prints and exits). */
#ifndef CPM_SVCMAIN_H
#define CPM_SVCMAIN_H

#include <stdbool.h>
#include <uv.h>

#include "services/common/config.h"
#include "services/common/log.h"

typedef struct cpm_svc_args {
    const char *config_path;  /* --config */
    int index;                /* --index (within the role) */
    const char *bind;         /* --bind: overrides the config's endpoint */
    const char *name;         /* --name */
    const char *model;        /* --model */
    int threads;              /* --threads, 0 = from config or 1 */
    cpm_log log;
    cpm_config *config;       /* loaded when --config was given */
    char name_buf[64];
} cpm_svc_args;

/* Parses the common options; unknown ones are left for the caller in argv order
 * (returned count). Exits with usage on error. */
int cpm_svc_parse_args(int argc, char **argv, const char *role, const char *extra_usage,
                       cpm_svc_args *a, char **rest);

/* Runs loop until SIGINT/SIGTERM, then calls stop(user) and runs the loop until
 * every handle is closed. */
void cpm_svc_run(uv_loop_t *loop, void (*stop)(void *user), void *user, const cpm_log *log);

#endif
