/* health.h - the router's table of back-end services, their health polls, readiness.
 *
 * One entry per service the cluster file names: stages (grouped into pipeline
 * replicas, with their tensor-parallel ranks > 0), tokenizers, samplers, expert
 * services; each with a DEALER socket the rest of the router sends on. Every
 * health_interval_ms each is asked for its Health; what it answers (ready, status, KV
 * use) is kept for /ready and /metrics. A replica goes down when one of its services
 * misses CPM_HEALTH_STAGE_MISSES polls in a row, and up again once all of them answer;
 * both are told to the owner through hooks, as is the model's description, taken
 * from the last stage's first ready answer. A tokenizer or sampler that misses as
 * many polls, or answers as a new process (Health.incarnation), gets a fresh
 * connection: its calls in flight end at once (CPM_ECLOSED) and their owners retry on
 * another replica.
 */
#ifndef CPM_HEALTH_H
#define CPM_HEALTH_H

#include <stdbool.h>
#include <uv.h>

#include "../proto/cpm.pb-c.h"
#include "../services/common/config.h"
#include "../services/common/log.h"
#include "../services/common/transport.h"

/* Two misses in a row, so that one slow reply on a loaded machine never fails requests. */
#define CPM_HEALTH_STAGE_MISSES 2

typedef struct cpm_svc {
    char name[32];
    char endpoint[CPM_CFG_STR];
    int replica;    /* stages and their TP ranks: the pipeline replica; -1 otherwise */
    cpm_sock *sock; /* DEALER to the service */
    bool ready, answered;
    int misses; /* health polls in a row without an answer */
    char status[96];
    int kv_used, kv_total;
    uint64_t incarnation; /* from its last answer: another one means it restarted */
    double poll_s;  /* round trip of its last answered health poll */
    bool reset_due; /* its calls in flight are lost: renew the connection at the next poll */
} cpm_svc;

typedef struct cpm_health_hooks {
    void *ud;
    /* replica stopped answering: why names the stage (the first time and while down) */
    void (*replica_down)(void *ud, int replica, const char *why);
    void (*replica_up)(void *ud, int replica);
    /* a service of replica restarted between two polls (a new incarnation): what it
     * held (KV, rows in flight) is gone, though the replica serves */
    void (*replica_restarted)(void *ud, int replica, const char *why);
    /* an expert service stopped answering (2 missed polls) or restarted: every stage
     * needs it, so the steps in flight cannot finish */
    void (*expert_lost)(void *ud, const char *why);
    /* the last stage described the model (called until the owner has taken it) */
    void (*model_info)(void *ud, const Cpm__V1__ModelInfo *mi);
} cpm_health_hooks;

typedef struct cpm_health cpm_health;

/* Connects to every service of cfg (tokenizers only when use_tok). cfg, log borrowed. */
int cpm_health_new(uv_loop_t *loop, void *zctx, const cpm_curve *curve, const cpm_config *cfg, bool use_tok,
                   int interval_ms, const cpm_log *log, const cpm_health_hooks *hooks,
                   cpm_health **ret, cpm_error *err);

/* Starts polling (the first poll at once). */
void cpm_health_start(cpm_health *h);

/* Closes the sockets and the timer; done(ud) once the timer is closed. Accepts NULL. */
void cpm_health_close(cpm_health *h, void (*done)(void *ud), void *ud);

/* At least one tokenizer and one sampler (they are stateless: any serves), every
 * expert service (each owns its experts), and every service of at least one replica
 * that is not down answered ready on its last poll. */
bool cpm_health_ready(const cpm_health *h);

int cpm_health_replicas(const cpm_health *h);

/* Round robin over the ready tokenizers / samplers (any, when none is); NULL with none. */
cpm_svc *cpm_health_tokenizer(cpm_health *h);
cpm_svc *cpm_health_sampler(cpm_health *h);
/* Stage 0 of a replica: where its micro-batches go. */
cpm_svc *cpm_health_first_stage(cpm_health *h, int replica);

/* The table, for /ready. */
const cpm_svc *cpm_health_services(const cpm_health *h, int *n);
/* KV blocks used and total, summed over the stages' last answers (for /metrics). */
void cpm_health_kv(const cpm_health *h, int *used, int *total);

#endif
