/* utf8.h - the UTF-8 rules the project enforces (tokenizer input, the router's JSON text) (the same as
 * Rust's str, which the HF tokenizers library works on: no overlong forms, no
 * surrogates, nothing past U+10FFFF) and small helpers for decoding/rendering.
 */
#ifndef CPM_UTF8_H
#define CPM_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Length of the valid UTF-8 sequence at s[0..n), or 0 when it is invalid or cut. */
size_t cpm_utf8_seq_len(const uint8_t *s, size_t n);

/* Whether s[0..n) is valid UTF-8; if not, *ret_bad_off (may be NULL) gets the
 * offset of the first byte that does not start a valid sequence. */
bool cpm_utf8_valid(const char *s, size_t n, size_t *ret_bad_off);

/* Decodes the valid sequence at s (of length len from cpm_utf8_seq_len). */
uint32_t cpm_utf8_decode(const uint8_t *s, size_t len);

/* Writes code point cp (<= 0x10FFFF) to out (4 bytes room); returns its length. */
size_t cpm_utf8_encode(uint32_t cp, char *out);

#endif
