/* front.h - what a front (api_http.c, api_rpc.c) reaches below it.
 *
 * A front turns its protocol's requests into jobs (job.h), hands them to admission
 * (admit.h), and answers through the sink it sets on each job; the rest is read-only
 * state for its status endpoints. The hub (router.c) owns every part.
 */
#ifndef CPM_FRONT_H
#define CPM_FRONT_H

#include "../services/common/config.h"
#include "../services/common/log.h"
#include "admit.h"
#include "health.h"
#include "job.h"
#include "metrics.h"
#include "pipeline.h"

typedef struct cpm_front_ctx {
    const cpm_config *cfg;
    const char *model_name;
    const cpm_log *log;
    cpm_metrics *metrics;
    cpm_jobs *jobs;
    cpm_admit *admit;
    cpm_pipeline *pipeline;
    cpm_health *health;
} cpm_front_ctx;

#endif
