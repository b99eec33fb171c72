/* wire.c - protocol message validation: the gate every byte from the network passes.
 *
 * The transport hands raw frames here; services only ever see envelopes that have
 * been unpacked and checked, so they can index parallel arrays without re-checking.
 */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

_Static_assert(CPM_WIRE_VERSION == CPM__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT,
               "CPM_WIRE_VERSION and proto/cpm.proto's PROTOCOL_VERSION_CURRENT disagree");

size_t cpm_wire_dtype_size(int dtype) {
    switch (dtype) {
    case CPM__V1__DTYPE__DTYPE_F32:
        return 4;
    case CPM__V1__DTYPE__DTYPE_F16:
    case CPM__V1__DTYPE__DTYPE_BF16:
        return 2;
    }
    return 0;
}

size_t cpm_wire_tensor_bytes(const Cpm__V1__TensorDesc *desc, cpm_error *err) {
    size_t el = cpm_wire_dtype_size(desc->dtype);
    if (!el) {
        cpm_error_set(err, CPM_EFORMAT, "tensor: unknown dtype %d", (int)desc->dtype);
        return 0;
    }
    if (desc->n_shape == 0 || desc->n_shape > CPM_WIRE_MAX_DIMS) {
        cpm_error_set(err, CPM_EFORMAT, "tensor: %zu dims, expected 1..%d", desc->n_shape,
                      CPM_WIRE_MAX_DIMS);
        return 0;
    }
    size_t n = el;
    for (size_t i = 0; i < desc->n_shape; i++) {
        /* Dims are uint32, so n * dim overflows only past SIZE_MAX / 2^32. */
        if (desc->shape[i] && n > SIZE_MAX / desc->shape[i]) {
            cpm_error_set(err, CPM_EFORMAT, "tensor: shape overflows");
            return 0;
        }
        n *= desc->shape[i];
    }
    return n;
}

const char *cpm_wire_body_name(int body_case) {
    switch (body_case) {
    case CPM__V1__ENVELOPE__BODY_ERROR: return "error";
    case CPM__V1__ENVELOPE__BODY_HELLO: return "hello";
    case CPM__V1__ENVELOPE__BODY_HEALTH_REQUEST: return "health_request";
    case CPM__V1__ENVELOPE__BODY_HEALTH: return "health";
    case CPM__V1__ENVELOPE__BODY_HEARTBEAT: return "heartbeat";
    case CPM__V1__ENVELOPE__BODY_GENERATE: return "generate";
    case CPM__V1__ENVELOPE__BODY_TOKEN_EVENT: return "token_event";
    case CPM__V1__ENVELOPE__BODY_CANCEL: return "cancel";
    case CPM__V1__ENVELOPE__BODY_TOKENIZE: return "tokenize";
    case CPM__V1__ENVELOPE__BODY_CHAT: return "chat";
    case CPM__V1__ENVELOPE__BODY_TOKENIZED: return "tokenized";
    case CPM__V1__ENVELOPE__BODY_DETOKENIZE: return "detokenize";
    case CPM__V1__ENVELOPE__BODY_DETOKENIZED: return "detokenized";
    case CPM__V1__ENVELOPE__BODY_PIECES: return "pieces";
    case CPM__V1__ENVELOPE__BODY_PIECES_REPLY: return "pieces_reply";
    case CPM__V1__ENVELOPE__BODY_FORWARD: return "forward";
    case CPM__V1__ENVELOPE__BODY_RESULT: return "result";
    case CPM__V1__ENVELOPE__BODY_SAMPLE: return "sample";
    case CPM__V1__ENVELOPE__BODY_SAMPLED: return "sampled";
    case CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD: return "expert_forward";
    case CPM__V1__ENVELOPE__BODY_EXPERT_RESULT: return "expert_result";
    case CPM__V1__ENVELOPE__BODY_TP_FORWARD: return "tp_forward";
    case CPM__V1__ENVELOPE__BODY_TP_PARTIAL: return "tp_partial";
    }
    return "none";
}

/* The tensor frame must be present exactly when desc is, and match it byte for byte. */
static int check_tensor(const char *what, const Cpm__V1__TensorDesc *desc, size_t rows,
                        long long tensor_size, cpm_error *err) {
    if (!desc) {
        if (tensor_size >= 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: unexpected tensor frame (%lld bytes)",
                                 what, tensor_size);
        return 0;
    }
    if (tensor_size < 0)
        return cpm_error_set(err, CPM_EFORMAT, "%s: tensor frame missing", what);
    size_t want = cpm_wire_tensor_bytes(desc, err);
    if (!want && err && err->code)
        return cpm_error_prefix(err, "%s", what);
    if (desc->n_shape != 2 || desc->shape[0] != rows)
        return cpm_error_set(err, CPM_ESHAPE, "%s: tensor shape must be [%zu, n]", what, rows);
    if ((size_t)tensor_size != want)
        return cpm_error_set(err, CPM_ESHAPE, "%s: tensor frame has %lld bytes, shape says %zu",
                             what, tensor_size, want);
    return 0;
}

static int check_count(const char *what, size_t n, size_t max, cpm_error *err) {
    if (n > max)
        return cpm_error_set(err, CPM_ELIMIT, "%s: %zu entries, at most %zu", what, n, max);
    return 0;
}

static int check_forward(const Cpm__V1__StageForward *f, long long tsize, cpm_error *err) {
    size_t n = f->n_seq;
    if (check_count("forward.seq", n, CPM_WIRE_MAX_ROWS, err) ||
        check_count("forward.release", f->n_release, CPM_WIRE_MAX_ROWS, err) ||
        check_count("forward.live", f->n_live, CPM_WIRE_MAX_LIVE, err))
        return err ? err->code : CPM_ELIMIT;
    if (f->n_pos != n)
        return cpm_error_set(err, CPM_EFORMAT, "forward: %zu positions for %zu rows", f->n_pos, n);
    if (f->n_ids && f->n_ids != n)
        return cpm_error_set(err, CPM_EFORMAT, "forward: %zu ids for %zu rows", f->n_ids, n);
    if (f->n_want && f->n_want != n)
        return cpm_error_set(err, CPM_EFORMAT, "forward: %zu want flags for %zu rows", f->n_want, n);
    if (n && !f->n_ids && !f->hidden)
        return cpm_error_set(err, CPM_EFORMAT, "forward: rows without ids or hidden tensor");
    return check_tensor("forward.hidden", f->hidden, n, tsize, err);
}

static int check_result(const Cpm__V1__StageResult *r, long long tsize, cpm_error *err) {
    size_t n = r->n_seq;
    if (check_count("result.seq", n, CPM_WIRE_MAX_ROWS, err))
        return err ? err->code : CPM_ELIMIT;
    if (r->n_pos != n)
        return cpm_error_set(err, CPM_EFORMAT, "result: %zu positions for %zu rows", r->n_pos, n);
    if (r->error && r->logits)
        return cpm_error_set(err, CPM_EFORMAT, "result: both error and logits");
    return check_tensor("result.logits", r->logits, n, tsize, err);
}

static int check_sample(const Cpm__V1__SampleRequest *s, long long tsize, cpm_error *err) {
    if (check_count("sample.rows", s->n_rows, CPM_WIRE_MAX_ROWS, err))
        return err ? err->code : CPM_ELIMIT;
    for (size_t i = 0; i < s->n_rows; i++) {
        if (!s->rows[i]->params)
            return cpm_error_set(err, CPM_EFORMAT, "sample.rows[%zu]: no params", i);
        if (check_count("sample.rows.history", s->rows[i]->n_history, CPM_WIRE_MAX_IDS, err))
            return err ? err->code : CPM_ELIMIT;
    }
    if (!s->logits)
        return cpm_error_set(err, CPM_EFORMAT, "sample: no logits description");
    if (s->logits->dtype != CPM__V1__DTYPE__DTYPE_F32)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "sample: logits must be F32");
    return check_tensor("sample.logits", s->logits, s->n_rows, tsize, err);
}

/* ExpertForward and ExpertResult share their layout: groups of rows per expert, and
 * one frame holding all of them (the rows' width is the service's to check). */
static int check_expert_rows(const char *what, size_t n_expert, const uint32_t *n_rows,
                             size_t n_n_rows, const Cpm__V1__TensorDesc *desc, long long tsize,
                             cpm_error *err) {
    if (check_count(what, n_expert, CPM_WIRE_MAX_ROWS, err))
        return err ? err->code : CPM_ELIMIT;
    if (n_n_rows != n_expert)
        return cpm_error_set(err, CPM_EFORMAT, "%s: %zu row counts for %zu experts", what, n_n_rows,
                             n_expert);
    size_t total = 0;
    for (size_t i = 0; i < n_expert; i++) {
        total += n_rows[i];
        if (total > CPM_WIRE_MAX_ROWS)
            return cpm_error_set(err, CPM_ELIMIT, "%s: more than %d rows", what, CPM_WIRE_MAX_ROWS);
    }
    if (!desc && !total && tsize < 0)
        return 0;
    if (!desc)
        return cpm_error_set(err, CPM_EFORMAT, "%s: %zu rows but no rows description", what, total);
    return check_tensor(what, desc, total, tsize, err);
}

/* A TP partial: one F32 [rows, n] frame, rows bounded; the width is the receiver's to check. */
static int check_tp_partial(const Cpm__V1__TpPartial *p, long long tsize, cpm_error *err) {
    if (p->failed)
        return p->partial ? cpm_error_set(err, CPM_EFORMAT, "tp_partial: failed with a partial")
                          : check_tensor("tp_partial", NULL, 0, tsize, err);
    if (!p->partial || p->partial->n_shape != 2)
        return cpm_error_set(err, CPM_EFORMAT, "tp_partial: needs an F32 [rows, hidden] description");
    if (p->partial->dtype != CPM__V1__DTYPE__DTYPE_F32)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "tp_partial: partials must be F32");
    if (check_count("tp_partial.rows", p->partial->shape[0], CPM_WIRE_MAX_ROWS, err))
        return err ? err->code : CPM_ELIMIT;
    return check_tensor("tp_partial", p->partial, p->partial->shape[0], tsize, err);
}

static int check_event(const Cpm__V1__TokenEvent *t, cpm_error *err) {
    if (t->n_logprobs && t->n_logprobs != t->n_ids)
        return cpm_error_set(err, CPM_EFORMAT, "token_event: %zu logprobs for %zu ids",
                             t->n_logprobs, t->n_ids);
    if (t->n_top && t->n_top != t->n_ids)
        return cpm_error_set(err, CPM_EFORMAT, "token_event: %zu top lists for %zu ids", t->n_top,
                             t->n_ids);
    return 0;
}

int cpm_wire_validate(const cpm_envelope *env, long long tensor_size, cpm_error *err) {
    if (env->version != CPM_WIRE_VERSION)
        return cpm_error_set(err, CPM_EFORMAT, "protocol version %u, expected %d", env->version,
                             CPM_WIRE_VERSION);
    switch (env->body_case) {
    case CPM__V1__ENVELOPE__BODY_FORWARD:
        return check_forward(env->forward, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_RESULT:
        return check_result(env->result, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_SAMPLE:
        return check_sample(env->sample, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_EXPERT_FORWARD:
        return check_expert_rows("expert_forward", env->expert_forward->n_expert,
                                 env->expert_forward->n_rows, env->expert_forward->n_n_rows,
                                 env->expert_forward->rows, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_EXPERT_RESULT:
        return check_expert_rows("expert_result", env->expert_result->n_expert,
                                 env->expert_result->n_rows, env->expert_result->n_n_rows,
                                 env->expert_result->rows, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_TP_FORWARD:
        if (!env->tp_forward->forward)
            return cpm_error_set(err, CPM_EFORMAT, "tp_forward: no forward");
        return check_forward(env->tp_forward->forward, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY_TP_PARTIAL:
        return check_tp_partial(env->tp_partial, tensor_size, err);
    case CPM__V1__ENVELOPE__BODY__NOT_SET:
        return cpm_error_set(err, CPM_EFORMAT, "envelope has no body");
    default:
        break;
    }
    if (tensor_size >= 0)
        return cpm_error_set(err, CPM_EFORMAT, "%s: unexpected tensor frame",
                             cpm_wire_body_name(env->body_case));
    switch (env->body_case) {
    case CPM__V1__ENVELOPE__BODY_GENERATE:
        return check_count("generate.prompt_ids", env->generate->n_prompt_ids, CPM_WIRE_MAX_IDS, err);
    case CPM__V1__ENVELOPE__BODY_TOKEN_EVENT:
        return check_event(env->token_event, err);
    case CPM__V1__ENVELOPE__BODY_DETOKENIZE:
        if (env->detokenize->prefix_len > env->detokenize->n_ids)
            return cpm_error_set(err, CPM_EFORMAT, "detokenize: prefix_len %u > %zu ids",
                                 env->detokenize->prefix_len, env->detokenize->n_ids);
        return check_count("detokenize.ids", env->detokenize->n_ids, CPM_WIRE_MAX_IDS, err);
    case CPM__V1__ENVELOPE__BODY_SAMPLED:
        return check_count("sampled.tokens", env->sampled->n_tokens, CPM_WIRE_MAX_ROWS, err);
    default:
        return 0;
    }
}

/* protobuf-c keeps fields it does not know, even with the invalid field number 0,
 * and writes them back when the message is packed again - into bytes that no
 * parser accepts. Services pass some messages on (a failed step's result), so such
 * input is refused here, at the door, instead of breaking the next hop. */
static bool has_field_zero(const ProtobufCMessage *m, int depth) {
    if (depth > 32)
        return true;
    for (unsigned i = 0; i < m->n_unknown_fields; i++)
        if (m->unknown_fields[i].tag == 0)
            return true;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned f = 0; f < d->n_fields; f++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[f];
        if (fd->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *at = (const char *)m + fd->offset;
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)((const char *)m + fd->quantifier_offset);
            ProtobufCMessage *const *items = *(ProtobufCMessage *const *const *)at;
            for (size_t k = 0; k < n; k++)
                if (items[k] && has_field_zero(items[k], depth + 1))
                    return true;
            continue;
        }
        if (fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF &&
            *(const uint32_t *)((const char *)m + fd->quantifier_offset) != fd->id)
            continue; /* another member of the oneof is set */
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)at;
        if (sub && has_field_zero(sub, depth + 1))
            return true;
    }
    return false;
}

int cpm_wire_unpack(const void *data, size_t size, long long tensor_size, cpm_envelope **ret,
                    cpm_error *err) {
    *ret = NULL;
    cpm_envelope *env = cpm__v1__envelope__unpack(NULL, size, data);
    if (!env)
        return cpm_error_set(err, CPM_EFORMAT, "envelope: %zu bytes do not unpack", size);
    if (has_field_zero(&env->base, 0)) {
        cpm__v1__envelope__free_unpacked(env, NULL);
        return cpm_error_set(err, CPM_EFORMAT, "envelope: a field numbered 0 (invalid protobuf)");
    }
    int rc = cpm_wire_validate(env, tensor_size, err);
    if (rc) {
        cpm__v1__envelope__free_unpacked(env, NULL);
        return rc;
    }
    *ret = env;
    return 0;
}

void cpm_wire_free(cpm_envelope *env) {
    if (env)
        cpm__v1__envelope__free_unpacked(env, NULL);
}

int cpm_wire_pack(cpm_envelope *env, uint8_t **ret_buf, size_t *ret_size, cpm_error *err) {
    env->version = CPM_WIRE_VERSION;
    size_t n = cpm__v1__envelope__get_packed_size(env);
    /* malloc(0) may return NULL; an empty envelope still needs a buffer. */
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return cpm_error_set(err, CPM_ENOMEM, "envelope: %zu bytes", n);
    cpm__v1__envelope__pack(env, buf);
    *ret_buf = buf;
    *ret_size = n;
    return 0;
}
