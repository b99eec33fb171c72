/* strbuf.c - growable byte string (see strbuf.h). */
#include "services/tokenizer/strbuf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

int cpm_strbuf_reserve(cpm_strbuf *b, size_t extra) {
    if (b->oom)
        return CPM_ENOMEM;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->oom = true;
        return CPM_ENOMEM;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = true;
        return CPM_ENOMEM;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

int cpm_strbuf_add(cpm_strbuf *b, const char *s, size_t len) {
    int rc = cpm_strbuf_reserve(b, len);
    if (rc < 0)
        return rc;
    if (len)
        memcpy(b->p + b->len, s, len);
    b->len += len;
    b->p[b->len] = '\0';
    return 0;
}

int cpm_strbuf_adds(cpm_strbuf *b, const char *s) {
    return cpm_strbuf_add(b, s, strlen(s));
}

int cpm_strbuf_addf(cpm_strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = true;
        return CPM_EINVAL;
    }
    int rc = cpm_strbuf_reserve(b, (size_t)n);
    if (rc < 0)
        return rc;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

char *cpm_strbuf_take(cpm_strbuf *b, size_t *ret_len) {
    if (cpm_strbuf_reserve(b, 0) < 0) {
        cpm_strbuf_release(b);
        return NULL;
    }
    b->p[b->len] = '\0';
    char *p = b->p;
    if (ret_len)
        *ret_len = b->len;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}

void cpm_strbuf_release(cpm_strbuf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->oom = false;
}
