/* error.h - the one error vocabulary of cpm-cluster.
 *
 * Functions that can fail return 0 or a negative CPM_E* code and, when given a
 * cpm_error, fill it with a one-line message naming the thing at fault
 * ("model.safetensors: tensor model.norm.weight: shape [64], expected [128]").
 * Libraries never print or exit; main.c decides what to do with the message.
 */
#ifndef CPM_ERROR_H
#define CPM_ERROR_H

#include <stdarg.h>
#include <stddef.h>

/* X(name, value, description) */
#define CPM_ERRNO_MAP(X)                                   \
    X(CPM_OK, 0, "success")                                \
    X(CPM_EINVAL, -1, "invalid argument")                  \
    X(CPM_ENOMEM, -2, "out of memory")                     \
    X(CPM_EIO, -3, "input/output error")                   \
    X(CPM_EFORMAT, -4, "malformed input")                  \
    X(CPM_ENOTFOUND, -5, "not found")                      \
    X(CPM_EUNSUPPORTED, -6, "unsupported")                 \
    X(CPM_ERANGE, -7, "value out of range")                \
    X(CPM_ESHAPE, -8, "tensor shape mismatch")             \
    X(CPM_EAGAIN, -9, "try again")                         \
    X(CPM_EDECLINED, -10, "declined")                      \
    X(CPM_ETIMEDOUT, -11, "timed out")                     \
    X(CPM_ECLOSED, -12, "peer closed")                     \
    X(CPM_ELIMIT, -13, "limit exceeded")                   \
    X(CPM_EINTERNAL, -14, "internal error")               \
    X(CPM_ESTALE, -15, "stale (a cached prefix is gone)")

enum cpm_errno {
#define CPM_ERR_ENUM(name, value, desc) name = value,
    CPM_ERRNO_MAP(CPM_ERR_ENUM)
#undef CPM_ERR_ENUM
};

#define CPM_ERROR_MSG_MAX 512

typedef struct cpm_error {
    int code;                     /* last CPM_E* code, 0 when none */
    char msg[CPM_ERROR_MSG_MAX];  /* human message, "" when none */
} cpm_error;

/* Short description of a code ("malformed input"). Never NULL. */
const char *cpm_strerror(int code);

/* Symbolic name of a code ("CPM_EFORMAT"). Never NULL. */
const char *cpm_errname(int code);

/* Records code and a printf-style message in err (which may be NULL) and
 * returns code, so callers can write `return cpm_error_set(err, CPM_EIO, ...)`. */
int cpm_error_set(cpm_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

int cpm_error_setv(cpm_error *err, int code, const char *fmt, va_list ap);

/* Prepends "prefix: " to the message already in err (for adding context such
 * as a file name on the way up). Returns err->code. */
int cpm_error_prefix(cpm_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

void cpm_error_clear(cpm_error *err);

#endif
