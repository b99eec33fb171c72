/* service.h - the cpm-sampler service: rows of logits in, one token (+ logprobs) per row out.
 *
 * Stateless, so any replica gives the same answer: each SampleRow carries its
 * parameters, seed and step, and the draw for step t uses a generator seeded from
 * (seed, t). The handler runs on the server's worker threads (services/common/server.h).
 */
#ifndef CPM_SAMPLER_SERVICE_H
#define CPM_SAMPLER_SERVICE_H

#include <stdint.h>

#include "services/common/server.h"
#include "services/sampler/sampler.h"

/* The seed of the draw at step `step` of a request seeded with `seed`. */
uint64_t cpm_sampler_svc_step_seed(uint64_t seed, uint32_t step);

/* Converts wire parameters (0 = "off" for top_p and repetition_penalty) and validates
 * them; the message names the field. */
int cpm_sampler_svc_params(const Cpm__V1__SamplingParams *in, uint32_t step,
                           cpm_sampling_params *ret, cpm_error *err);

/* cpm_server_handler for `sample` requests (user is unused, may be NULL). */
int cpm_sampler_svc_handle(void *user, const cpm_inmsg *in, cpm_reply *out, cpm_error *err);

#endif
