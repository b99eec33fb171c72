/* job.h - one client request in the router, its choices, and the rule "exactly one
 * final answer".
 *
 * A job is what a front (api_http.c, api_rpc.c) accepted: one or more prompts and
 * one gen (sequence) per choice. It moves through one state machine:
 *
 *   new ──▶ tokenizing ──▶ running ──▶ done
 *    │          │             │
 *    └──────────┴─────────────┴──▶ failed | cancelled
 *
 * (new may go straight to running when the prompts are token ids). done, failed and
 * cancelled are terminal and never left; the final answer is given on the transition
 * into one of them, through the job's sink, so it is given exactly once. Each gen
 * has its own machine (request.h: queued → prefilling → decoding → finished |
 * cancelled | failed); the job is done when every gen finished.
 *
 * The sink is how answers leave: the front that made the job sets it, so nothing
 * below the fronts knows whether a job came over HTTP or RPC.
 *
 * Lifetime: a job is freed once it has answered and no tokenizer call holds it
 * (refs). Jobs live in a cpm_jobs registry whose hooks reach up to the owner: the
 * pipeline's release of a sequence, and "the last job is gone" for shutdown.
 */
#ifndef CPM_JOB_H
#define CPM_JOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../proto/cpm.pb-c.h"
#include "metrics.h"
#include "request.h"
#include "tokclient.h"

#define CPM_JOB_MAX_TOP 20 /* top_logprobs alternatives per token */
enum { /* sampling fields a job may take from the model (cpm_job.model_defaults) */
    CPM_JOB_DEFAULT_TEMPERATURE = 1,
    CPM_JOB_DEFAULT_TOP_P = 2,
    CPM_JOB_DEFAULT_TOP_K = 4,
    CPM_JOB_DEFAULT_REPETITION_PENALTY = 8,
};
#define CPM_JOB_MAX_BIAS 300 /* logit_bias entries (OpenAI's limit; the sampler's too) */

/* A growable byte string, NUL-terminated when non-empty. */
typedef struct cpm_strbuf {
    char *p;
    size_t len, cap;
} cpm_strbuf;

int cpm_strbuf_add(cpm_strbuf *b, const void *data, size_t len);

/* A generated token's logprob and its alternatives, with their texts once fetched. */
typedef struct cpm_tok_lp {
    int32_t id;
    float lp;
    int n_top;
    int32_t top_ids[CPM_JOB_MAX_TOP];
    float top_lps[CPM_JOB_MAX_TOP];
    char *text; /* the token as text (from the tokenizer), or NULL */
    char *top_text[CPM_JOB_MAX_TOP];
    int pending; /* texts still being fetched */
} cpm_tok_lp;

typedef struct cpm_job cpm_job;

/* One sequence: a choice of a request. */
typedef struct cpm_gen {
    cpm_job *job;
    int index;
    int prompt; /* which prompt of the job */
    uint64_t seq; /* the pipeline's sequence id; 0 while it has none */
    cpm_req_state state;
    Cpm__V1__SamplingParams params;
    int max_new;
    int n_gen;
    int cached_tokens; /* prompt tokens the prefix cache supplied */
    int32_t *ids; /* generated ids (all of them; stream chunks use the tail) */
    cpm_tok_lp *lps; /* logprobs of generated ids, when asked */
    int n_emitted_ids; /* ids the sink has shown (streams) */
    int n_emitted_lps;
    int n_lp_ready; /* lps[0..n_lp_ready) have their texts */
    int lp_pending; /* token-text calls in flight */
    cpm_stopper *stopper;
    cpm_strbuf text; /* a non-streamed answer's whole text */
    const char *finish; /* "stop" / "length" once finished */
    uint64_t t_last; /* ns of the last token */
    uint64_t t_sent, t_first; /* ns its first rows went out, of its first token (metrics) */
    /* text, behind generation: ids[0..n_text) are text (fed to the stopper) */
    int n_text;
    int n_textable; /* ids that have text (a final stop id has none) */
    int n_tried; /* end of the last Detokenize window */
    bool detok_busy; /* a Detokenize call is in flight */
    int tok_attempts; /* failed tokenizer calls in a row */
    bool text_stopped; /* a stop string ended the text */
    const char *gen_end; /* generation over: "stop" / "length"; NULL while running */
    bool released; /* the pipeline is done with its sequence */
    bool tool_calls;  /* the front found tool calls in its answer (cpm_gen_found_tool_calls) */
    int counted_fin;  /* 1 + the enum cpm_metric_finish it was counted under; 0 not yet */
    int failovers; /* times it moved to another pipeline replica */
} cpm_gen;

typedef enum cpm_job_state {
    CPM_JOB_NEW,        /* being filled in by its front */
    CPM_JOB_TOKENIZING, /* prompts at a tokenizer */
    CPM_JOB_RUNNING,    /* admitted: its gens are in the pipeline */
    CPM_JOB_DONE,       /* answered: every gen finished */
    CPM_JOB_FAILED,     /* answered with an error */
    CPM_JOB_CANCELLED,  /* the client went away or cancelled */
    CPM_JOB_STATES,
} cpm_job_state;

const char *cpm_job_state_name(cpm_job_state s);
bool cpm_job_state_terminal(cpm_job_state s);

/* Why a job failed, in OpenAI's terms (the RPC front maps status to a code). */
typedef struct cpm_job_error {
    int status; /* HTTP status: 400, 429, 500, 503 ... */
    const char *type, *code, *msg;
} cpm_job_error;

/* How answers leave, set by the front. Every callback is required. */
typedef struct cpm_job_sink {
    /* admitted: the answer may begin (an HTTP stream's status line and role chunks) */
    void (*begin)(cpm_job *j);
    /* gen g moves on: text[0..len) after the stop rules, the ids [g->n_emitted_ids,
     * upto); finish is the gen's finish reason on its last call, NULL before */
    void (*delta)(cpm_gen *g, const char *text, size_t len, const char *finish, int upto);
    /* the one final answer, one of three */
    void (*done)(cpm_job *j);
    void (*fail)(cpm_job *j, const cpm_job_error *e);
    void (*cancelled)(cpm_job *j);
    /* frees the sink's data with the job */
    void (*free)(void *sink_ud);
} cpm_job_sink;

typedef struct cpm_jobs cpm_jobs;

struct cpm_job {
    cpm_jobs *jobs;
    cpm_job *prev, *next;
    cpm_job_state state;
    const cpm_job_sink *sink;
    void *sink_ud;
    int ep; /* metrics endpoint */
    uint64_t serial;
    char id[48];
    int64_t created;
    uint64_t t_start;
    /* what was asked */
    bool stream, ignore_eos, logprobs;
    bool want_text; /* ids become text (detokenized, stop strings); else ids only */
    bool skip_special;     /* the text leaves special tokens out (default; vLLM's
                              skip_special_tokens) */
    bool include_stop_str; /* a stop string that ends the text stays in it (vLLM's
                              include_stop_str_in_output) */
    int top_logprobs;
    int max_tokens; /* 0: as many as fit */
    char *const *stops; /* stop strings (borrowed from the front's request) */
    int n_stops;
    int32_t *stop_ids;
    int n_stop_ids;
    int32_t *bias_ids; /* logit_bias (owned; every gen's params point here) */
    float *bias;
    int n_bias;
    unsigned model_defaults; /* CPM_JOB_DEFAULT_*: what the request left to the model's
                                generation_config.json (0: it set everything, as the RPC) */
    int32_t *min_stop; /* what min_tokens keeps from being drawn (cpm_job_min_stop_ids) */
    int n_min_stop;
    bool min_stop_made;
    /* prompts: ids, or (before tokenizing) text or chat messages */
    int n_prompts;
    int32_t **prompt_ids;
    int *prompt_len;
    const char **prompt_text; /* per prompt; NULL when its ids are known */
    cpm_tokc_msg *chat;        /* a chat's messages (one prompt) */
    int n_chat;
    const char *tools_json;    /* a chat's tools (JSON array, borrowed), or NULL */
    /* what the sampler must keep the output to (response_format, tool_choice): set on
     * every sample row of the job's gens (strings borrowed from the front's request) */
    int constraint_kind;       /* CPM__V1__CONSTRAINT_KIND__*; 0 = none */
    const char *constraint_schema;
    bool constraint_single;
    bool tokenize_only; /* POST /tokenize: no gens; the answer is prompt 0's ids */
    char *rendered;     /* tokenize_only chat: the prompt text the template made (owned) */
    int tok_pending; /* prompts at the tokenizer */
    int tok_attempts; /* failed tokenize calls */
    int n_gens, n_done;
    cpm_gen *gens;
    bool first_token_seen;
    uint64_t t_first_token; /* ns, once first_token_seen */
    int refs; /* tokenizer calls in flight */
};

typedef struct cpm_jobs_hooks {
    void *ud;
    /* the pipeline may drop g's sequence (g->seq != 0) */
    void (*release)(void *ud, cpm_gen *g);
    /* the last job was freed (shutdown waits for this) */
    void (*empty)(void *ud);
} cpm_jobs_hooks;

/* m (borrowed) gets the request counts and end-to-end latencies. */
cpm_jobs *cpm_jobs_new(cpm_metrics *m, const cpm_jobs_hooks *hooks);
/* Frees the registry; its jobs must be gone. Accepts NULL. */
void cpm_jobs_free(cpm_jobs *js);
int cpm_jobs_count(const cpm_jobs *js);
cpm_job *cpm_jobs_first(cpm_jobs *js);

/* A new job in state new. id_prefix names it ("chatcmpl", "cmpl"). NULL without memory. */
cpm_job *cpm_job_new(cpm_jobs *js, int ep, const char *id_prefix, const cpm_job_sink *sink,
                     void *sink_ud);

/* Room for n prompts and n * n_per_prompt gens (in state queued). CPM_ENOMEM. */
int cpm_job_init_gens(cpm_job *j, int n_prompts, int n_per_prompt);

/* Moves j to `to` if that edge exists; CPM_EINVAL (and j unchanged) otherwise. Going
 * to a terminal state this way gives no answer: use the three below. */
int cpm_job_transition(cpm_job *j, cpm_job_state to);

/* Answers running j (→ done) if every gen is terminal; nothing otherwise. */
void cpm_job_done(cpm_job *j);
/* Every gen fails, the client gets one error. Nothing if already answered. */
void cpm_job_fail(cpm_job *j, int status, const char *type, const char *code, const char *msg);
/* The client is gone or cancelled: every gen ends, the sink is told. */
void cpm_job_cancel(cpm_job *j);

bool cpm_job_answered(const cpm_job *j);

/* A tokenizer call holds j / let it go (frees j when answered and unheld). */
void cpm_job_hold(cpm_job *j);
void cpm_job_drop(cpm_job *j);

/* A seed for choice i when the request gave none: the clock and the job's serial. */
uint64_t cpm_job_default_seed(const cpm_job *j, int i);

/* The pipeline is done with g: its sequence leaves (once). */
void cpm_gen_release(cpm_gen *g);

/* Moves g to a terminal state (releasing its sequence); reason "stop"/"length" or NULL.
 * The job answers only through cpm_job_done / _fail / _cancel. */
void cpm_gen_finish(cpm_gen *g, cpm_req_state to, const char *reason);

/* The front's tool-call parser found calls in g's answer (finish_reason tool_calls): the
 * metrics count its finish as tool_calls, whether it was already counted (as stop) or
 * is counted later. */
void cpm_gen_found_tool_calls(cpm_gen *g);

/* Whether token id ends g's generation (EOS of the model unless ignore_eos, or a
 * request's stop id). */
bool cpm_job_is_stop_id(const cpm_job *j, const int32_t *eos, int n_eos, int32_t id);

/* Copies the stop ids into j. CPM_ENOMEM. */
int cpm_job_set_stop_ids(cpm_job *j, const int32_t *ids, int n);

/* Copies a logit bias into j and points every gen's sampling parameters at it (call
 * after cpm_job_init_gens). CPM_ENOMEM. */
int cpm_job_set_bias(cpm_job *j, const int32_t *ids, const float *bias, int n);

/* The ids min_tokens keeps from being drawn: the model's EOS (unless ignore_eos) and
 * the request's stop ids; made on the first call, owned by j. NULL without memory. */
const int32_t *cpm_job_min_stop_ids(cpm_job *j, const int32_t *eos, int n_eos, int *ret_n);

/* Prompt tokens of every prompt and tokens generated by every choice so far. */
void cpm_job_usage(const cpm_job *j, int *ret_prompt, int *ret_completion);

/* What an access log says of j's answer, as `key=value` pairs (services/common/log.h's
 * cpm_log_kv): request id, tokens, finish reason (outcome, or the first choice's),
 * time to first token. */
void cpm_job_access_note(const cpm_job *j, const char *outcome, char *out, size_t size);

#endif
