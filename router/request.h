/* request.h - the life of one generation in the router, and its text-level stop rules.
 *
 * Every sequence the router runs moves through one state machine:
 *   queued -> prefilling -> decoding -> finished | cancelled | failed
 * (queued may also go straight to cancelled or failed). A terminal state is never
 * left, which is what makes "exactly one final response" checkable: the code that
 * sends the final answer does so only on the transition into a terminal state.
 *
 * The stop matcher turns detokenized text into what may be shown to the client:
 * text that could be the start of a stop string is held back until it is known
 * not to be one, and a stop string ends the text before it (as OpenAI does, the
 * stop string itself is not returned).
 */
#ifndef CPM_REQUEST_H
#define CPM_REQUEST_H

#include <stdbool.h>
#include <stddef.h>

#include "../common/error.h"

typedef enum cpm_req_state {
    CPM_REQ_QUEUED,     /* accepted; tokenizing or waiting for a pipeline slot */
    CPM_REQ_PREFILLING, /* prompt rows are going through the stages */
    CPM_REQ_DECODING,   /* tokens are coming out */
    CPM_REQ_FINISHED,   /* stop, EOS or length */
    CPM_REQ_CANCELLED,  /* the client went away or asked */
    CPM_REQ_FAILED,     /* a back-end error */
} cpm_req_state;

const char *cpm_req_state_name(cpm_req_state s);

bool cpm_req_state_terminal(cpm_req_state s);

/* Moves *s to `to` if that edge exists; CPM_EINVAL (and *s unchanged) otherwise. */
int cpm_req_transition(cpm_req_state *s, cpm_req_state to);

typedef struct cpm_stopper cpm_stopper;

/* Copies the n stop strings (n may be 0). include: the output keeps the stop string
 * that ended it (vLLM's include_stop_str_in_output); else it ends before it. NULL
 * without memory. */
cpm_stopper *cpm_stopper_new(char *const *stops, int n, bool include);

/* Accepts NULL. */
void cpm_stopper_free(cpm_stopper *s);

/* Feeds new text. *ret_out, *ret_len: text now safe to show (borrowed, valid until
 * the next call). *ret_stopped: a stop string was found; the output ends before it
 * (or with it, when the stopper includes it) and later feeds return nothing. */
int cpm_stopper_feed(cpm_stopper *s, const char *text, size_t len, const char **ret_out,
                     size_t *ret_len, bool *ret_stopped);

/* The stream ended without a stop string: releases the held-back text. */
void cpm_stopper_flush(cpm_stopper *s, const char **ret_out, size_t *ret_len);

#endif
