/* error.c - codes, names and messages of the cpm error vocabulary. */
#include "error.h"

#include <stdio.h>
#include <string.h>

const char *cpm_strerror(int code) {
    switch (code) {
#define CPM_ERR_DESC(name, value, desc) \
    case value:                         \
        return desc;
        CPM_ERRNO_MAP(CPM_ERR_DESC)
#undef CPM_ERR_DESC
    }
    return "unknown error";
}

const char *cpm_errname(int code) {
    switch (code) {
#define CPM_ERR_NAME(name, value, desc) \
    case value:                         \
        return #name;
        CPM_ERRNO_MAP(CPM_ERR_NAME)
#undef CPM_ERR_NAME
    }
    return "CPM_EUNKNOWN";
}

int cpm_error_setv(cpm_error *err, int code, const char *fmt, va_list ap) {
    if (err) {
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    }
    return code;
}

int cpm_error_set(cpm_error *err, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    cpm_error_setv(err, code, fmt, ap);
    va_end(ap);
    return code;
}

int cpm_error_prefix(cpm_error *err, const char *fmt, ...) {
    if (!err)
        return 0;
    char prefix[CPM_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(prefix, sizeof prefix - 2, fmt, ap);
    va_end(ap);
    if (n < 0)
        return err->code;
    size_t plen = strlen(prefix);
    memcpy(prefix + plen, ": ", 3);
    plen += 2;
    size_t old = strnlen(err->msg, sizeof err->msg - 1);
    if (plen + old >= sizeof err->msg) /* keep the newest context, cut the tail */
        old = sizeof err->msg - 1 - plen;
    memmove(err->msg + plen, err->msg, old);
    memcpy(err->msg, prefix, plen);
    err->msg[plen + old] = '\0';
    return err->code;
}

void cpm_error_clear(cpm_error *err) {
    if (err) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}
