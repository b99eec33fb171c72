/* strbuf.h - a growable byte string, used where the tokenizer library builds text
 * (decode, streaming pieces, chat prompts). Always NUL-terminated once non-empty.
 */
#ifndef CPM_STRBUF_H
#define CPM_STRBUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct cpm_strbuf {
    char *p;
    size_t len, cap;
    bool oom; /* sticky: an append failed; later appends do nothing, take() fails */
} cpm_strbuf;

/* Makes room for extra more bytes (plus the NUL); 0 or CPM_ENOMEM. */
int cpm_strbuf_reserve(cpm_strbuf *b, size_t extra);
int cpm_strbuf_add(cpm_strbuf *b, const char *s, size_t len);
int cpm_strbuf_adds(cpm_strbuf *b, const char *s); /* NUL-terminated s */
int cpm_strbuf_addf(cpm_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hands the buffer to the caller (malloc'd, NUL-terminated; NULL when any append
 * ran out of memory, so callers may ignore the append results) and resets b. */
char *cpm_strbuf_take(cpm_strbuf *b, size_t *ret_len);
void cpm_strbuf_release(cpm_strbuf *b);

#endif
