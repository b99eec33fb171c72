/* textflow.h - sampled tokens to what the client sees: text, stop strings, logprob texts.
 *
 * Generation runs ahead of text: the next token is scheduled as soon as one is
 * sampled, while its text comes back from a tokenizer. For each gen this module keeps
 * one Detokenize call in flight over a window of new ids (with a few ids of context
 * before them, so leading spaces and multi-byte characters come out as in one decode;
 * ids that end inside a UTF-8 character wait for the next). The text goes through the
 * gen's stop-string matcher, then to the job's sink; with stop strings the window is
 * one id, so the id that completes a stop string is known and nothing after it is
 * shown. With logprobs, one Pieces call per token gives the texts of the chosen token
 * and its alternatives. A gen ends (and its job may answer) once its generation and
 * its text are both over.
 *
 * Jobs without text (the RPC, or `tokenize: off`) go through the same steps with ids
 * standing for text, so every front sees the same order of events.
 *
 * A call that times out or loses its tokenizer is sent again, up to
 * CPM_TEXTFLOW_ATTEMPTS sends (the hub's io picks a ready replica each time).
 * The tokenizer is reached through io, which the hub implements with tokclient.h
 * over a tokenizer replica and tests implement in memory.
 */
#ifndef CPM_TEXTFLOW_H
#define CPM_TEXTFLOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "job.h"
#include "tokclient.h"

/* Ids of context sent before the new ones in a Detokenize call: the service looks back
 * no further (CPM_TOKENIZER_SVC_CONTEXT), so more would only cost bytes. */
#define CPM_TEXTFLOW_CONTEXT 8

/* Sends of one tokenizer call, the first included: a call that times out or whose
 * tokenizer is lost goes again (to another replica) until this many were tried. */
#define CPM_TEXTFLOW_ATTEMPTS 3

_Static_assert(1 + CPM_JOB_MAX_TOP <= CPM_TOKC_MAX_PIECES,
               "a token and its alternatives fit one pieces call");

typedef struct cpm_textflow_io {
    void *ud;
    /* cpm_tokc_detok / cpm_tokc_pieces on some tokenizer; cb runs exactly once when
     * this returns 0, never otherwise */
    int (*detok)(void *ud, const int32_t *ids, size_t n, size_t prefix_len, bool skip_special,
                 cpm_tokc_cb cb, void *cb_ud, cpm_error *err);
    int (*pieces)(void *ud, int32_t context, const int32_t *ids, size_t n, cpm_tokc_cb cb,
                  void *cb_ud, cpm_error *err);
    /* text moved on and may have ended a sequence: the pipeline may have room */
    void (*kick)(void *ud);
} cpm_textflow_io;

typedef struct cpm_textflow cpm_textflow;

/* m (may be NULL) counts retries. */
cpm_textflow *cpm_textflow_new(const cpm_textflow_io *io, cpm_metrics *m);
void cpm_textflow_free(cpm_textflow *tf);

/* g got a token (the pipeline's token hook): stop_id and end as there. */
void cpm_textflow_token(cpm_textflow *tf, cpm_gen *g, bool stop_id, const char *end);

#endif
