/* pyfmt.h - the few Python/Jinja2 value formatting rules the official MiniCPM chat
 * templates depend on, so chat.c renders byte-for-byte what transformers renders:
 * json.dumps(ensure_ascii=False) (the `tojson` filter), str() of a JSON value (the
 * `string` filter), the `title` filter, and str.strip().
 */
#ifndef CPM_PYFMT_H
#define CPM_PYFMT_H

#include <jansson.h>
#include <stddef.h>

#include "services/tokenizer/strbuf.h"

/* json.dumps(v, ensure_ascii=False): ", " and ": " separators, keys in order. */
int cpm_pyfmt_tojson(cpm_strbuf *out, const json_t *v);

/* str(v) of the Python value json.loads would build (True, None, 1.0, ['a']). */
int cpm_pyfmt_str(cpm_strbuf *out, const json_t *v);

/* Jinja2's title filter: upper-cases the first letter of each word (words start
 * after '-', whitespace, '(', '{', '[' or '<') and lower-cases the rest. ASCII
 * letters only; other characters are copied. */
int cpm_pyfmt_title(cpm_strbuf *out, const char *s);

/* str.strip(): the [*ret_start, *ret_end) range of s without leading/trailing
 * characters for which Python's str.isspace() is true. s is valid UTF-8. */
void cpm_pyfmt_strip(const char *s, size_t len, size_t *ret_start, size_t *ret_end);

#endif
