/* stage_config.h - a stage's options from the cluster file: stages[N] (or its tensor-
 * parallel rank R, stages[N].tp[R-1]) and the cluster's expert services mapped onto
 * cpm_stage_opts. What cpm-shard's main.c calls between parsing its flags and
 * cpm_stage_new; kept here so tests can drive the mapping without a process. */
#ifndef CPM_STAGE_CONFIG_H
#define CPM_STAGE_CONFIG_H

#include "services/common/config.h"
#include "common/error.h"
#include "shard/stage.h"

typedef struct cpm_stage_config {
    cpm_stage_opts opts;   /* for cpm_stage_new; points into this struct and the cluster config */
    const char *isa;       /* the stage's `isa` key ("auto" or a kernel set); NULL without a
                              file. Forcing it is process-wide, so the caller does it. */
    cpm_expert_peer peers[CPM_CFG_MAX_EXPERT_SVCS];
    const char *tp_mesh[CPM_TP_MAX];
    const char *tp_peers[CPM_TP_MAX];
} cpm_stage_config;

/* Default options (cpm_stage_opts_default), no file. */
void cpm_stage_config_init(cpm_stage_config *sc);

/* Fills sc for stages[index] of c as tensor-parallel rank tp_rank (0: the stage the
 * cluster sees; R >= 1: stages[index].tp[R-1], with its own endpoint and threads and no
 * next hop). sc->opts borrows from sc and c: keep both until cpm_stage_new returns.
 * CPM_ERANGE, naming the file, when there is no such stage or rank. */
int cpm_stage_config_from_cluster(cpm_stage_config *sc, const cpm_config *c, int index,
                                  int tp_rank, cpm_error *err);

/* Checks that o names what a stage needs: an endpoint to bind, a model and, on rank 0, the
 * next hop. CPM_EINVAL with a message saying which flags give them. */
int cpm_stage_config_check(const cpm_stage_opts *o, cpm_error *err);

#endif
