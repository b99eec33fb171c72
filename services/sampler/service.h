/* service.h - the cpm-sampler service: rows of logits in, one token (+ logprobs) per row out.
 *
 * Stateless, so any replica gives the same answer: each SampleRow carries its
 * parameters, seed and step, and the sampling library makes the draw at step t
 * depend only on (seed, t) - the same token cpm-run draws at that step. The handler runs on the server's worker threads (services/common/server.h).
 */
#ifndef CPM_SAMPLER_SERVICE_H
#define CPM_SAMPLER_SERVICE_H

#include <stdint.h>

#include "services/common/server.h"
#include "services/sampler/constrain.h"
#include "services/sampler/sampler.h"

/* Converts wire parameters (0 = "off" for top_p and repetition_penalty) and validates
 * them; the message names the field. */
int cpm_sampler_svc_params(const Cpm__V1__SamplingParams *in, cpm_sampling_params *ret,
                           cpm_error *err);

/* cpm_server_handler for `sample` requests. user: a cpm_constrainer (constrain.h) for
 * constrained rows, or NULL (such rows are then refused with a message). */
int cpm_sampler_svc_handle(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err);

#endif
