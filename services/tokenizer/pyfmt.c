/* pyfmt.c - Python value formatting for the chat templates (see pyfmt.h). */
#include "services/tokenizer/pyfmt.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/utf8.h"

/* float.__repr__: the shortest digits that read back to the same double, in fixed
 * notation when the decimal exponent is in [-4, 16), else d.ddde+XX. */
static int py_float(cpm_strbuf *out, double x) {
    char buf[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (strtod(buf, NULL) == x)
            break;
    }
    bool neg = buf[0] == '-';
    char digits[32];
    size_t nd = 0;
    const char *p = buf + neg;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9')
            digits[nd++] = *p;
    int exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    cpm_strbuf_add(out, "-", neg);
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            cpm_strbuf_add(out, "0.", 2);
            for (int i = -1; i > exp; i--)
                cpm_strbuf_add(out, "0", 1);
            return cpm_strbuf_add(out, digits, nd);
        }
        for (int i = 0; i <= exp; i++)
            cpm_strbuf_add(out, i < (int)nd ? &digits[i] : "0", 1);
        cpm_strbuf_add(out, ".", 1);
        if ((int)nd > exp + 1)
            return cpm_strbuf_add(out, digits + exp + 1, nd - (size_t)exp - 1);
        return cpm_strbuf_add(out, "0", 1);
    }
    cpm_strbuf_add(out, digits, 1);
    if (nd > 1) {
        cpm_strbuf_add(out, ".", 1);
        cpm_strbuf_add(out, digits + 1, nd - 1);
    }
    return cpm_strbuf_addf(out, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
}

static int json_string_lit(cpm_strbuf *out, const char *s, size_t len) {
    int rc = cpm_strbuf_add(out, "\"", 1);
    for (size_t i = 0; i < len && rc == 0; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n" : c == '\r' ? "\\r"
                        : c == '\t' ? "\\t" : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
        if (esc)
            rc = cpm_strbuf_adds(out, esc);
        else if (c < 0x20)
            rc = cpm_strbuf_addf(out, "\\u%04x", c);
        else
            rc = cpm_strbuf_add(out, (const char *)&c, 1);
    }
    return rc ? rc : cpm_strbuf_add(out, "\"", 1);
}

/* tojson and str() walk containers the same way and differ only in how keys and
 * nested values print: one walk, two printers. */
typedef struct printer {
    int (*key)(cpm_strbuf *out, const char *s, size_t len);
    int (*item)(cpm_strbuf *out, const json_t *v);
} printer;

static int print_container(cpm_strbuf *out, const json_t *v, const printer *p) {
    size_t i = 0;
    const char *key;
    json_t *item;
    int rc;
    if (json_is_object(v)) {
        rc = cpm_strbuf_add(out, "{", 1);
        json_object_foreach((json_t *)v, key, item) {
            if (i++)
                rc = rc ? rc : cpm_strbuf_add(out, ", ", 2);
            rc = rc ? rc : p->key(out, key, strlen(key));
            rc = rc ? rc : cpm_strbuf_add(out, ": ", 2);
            rc = rc ? rc : p->item(out, item);
        }
        return rc ? rc : cpm_strbuf_add(out, "}", 1);
    }
    rc = cpm_strbuf_add(out, "[", 1);
    json_array_foreach((json_t *)v, i, item) {
        if (i)
            rc = rc ? rc : cpm_strbuf_add(out, ", ", 2);
        rc = rc ? rc : p->item(out, item);
    }
    return rc ? rc : cpm_strbuf_add(out, "]", 1);
}

int cpm_pyfmt_tojson(cpm_strbuf *out, const json_t *v) {
    static const printer json = {json_string_lit, cpm_pyfmt_tojson};
    switch (json_typeof(v)) {
    case JSON_OBJECT:
    case JSON_ARRAY:
        return print_container(out, v, &json);
    case JSON_STRING:
        return json_string_lit(out, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        return cpm_strbuf_addf(out, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    case JSON_REAL:
        return py_float(out, json_real_value(v));
    case JSON_TRUE:
        return cpm_strbuf_adds(out, "true");
    case JSON_FALSE:
        return cpm_strbuf_adds(out, "false");
    default:
        return cpm_strbuf_adds(out, "null");
    }
}

/* repr(str): single quotes unless the text has ' and no ", Python's escapes. */
static int py_repr_str(cpm_strbuf *out, const char *s, size_t len) {
    char q = memchr(s, '\'', len) && !memchr(s, '"', len) ? '"' : '\'';
    int rc = cpm_strbuf_add(out, &q, 1);
    for (size_t i = 0; i < len && rc == 0; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == (unsigned char)q || c == '\\')
            rc = cpm_strbuf_addf(out, "\\%c", c);
        else if (c == '\n')
            rc = cpm_strbuf_adds(out, "\\n");
        else if (c == '\r')
            rc = cpm_strbuf_adds(out, "\\r");
        else if (c == '\t')
            rc = cpm_strbuf_adds(out, "\\t");
        else if (c < 0x20 || c == 0x7f)
            rc = cpm_strbuf_addf(out, "\\x%02x", c);
        else
            rc = cpm_strbuf_add(out, (const char *)&c, 1);
    }
    return rc ? rc : cpm_strbuf_add(out, &q, 1);
}

/* repr() of a value inside a container: strings quoted, the rest as str(). */
static int py_repr(cpm_strbuf *out, const json_t *v) {
    if (json_is_string(v))
        return py_repr_str(out, json_string_value(v), json_string_length(v));
    return cpm_pyfmt_str(out, v);
}

int cpm_pyfmt_str(cpm_strbuf *out, const json_t *v) {
    static const printer python = {py_repr_str, py_repr};
    switch (json_typeof(v)) {
    case JSON_OBJECT:
    case JSON_ARRAY:
        return print_container(out, v, &python);
    case JSON_STRING:
        return cpm_strbuf_add(out, json_string_value(v), json_string_length(v));
    case JSON_TRUE:
        return cpm_strbuf_adds(out, "True");
    case JSON_FALSE:
        return cpm_strbuf_adds(out, "False");
    case JSON_NULL:
        return cpm_strbuf_adds(out, "None");
    default:
        return cpm_pyfmt_tojson(out, v);
    }
}

static bool title_sep(char c) {
    return c == '-' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' ||
           c == '(' || c == '{' || c == '[' || c == '<';
}

int cpm_pyfmt_title(cpm_strbuf *out, const char *s) {
    bool word_start = true;
    int rc = 0;
    for (; *s && rc == 0; s++) {
        char c = *s;
        if (title_sep(c)) {
            word_start = true;
        } else {
            if (c >= 'a' && c <= 'z' && word_start)
                c = (char)(c - 'a' + 'A');
            else if (c >= 'A' && c <= 'Z' && !word_start)
                c = (char)(c - 'A' + 'a');
            word_start = false;
        }
        rc = cpm_strbuf_add(out, &c, 1);
    }
    return rc;
}

/* Python's str.isspace() code points. */
static bool py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

void cpm_pyfmt_strip(const char *s, size_t len, size_t *ret_start, size_t *ret_end) {
    const uint8_t *p = (const uint8_t *)s;
    size_t start = 0, end = 0, i = 0;
    bool seen = false;
    while (i < len) {
        size_t l = cpm_utf8_seq_len(p + i, len - i);
        if (l == 0)
            l = 1; /* invalid bytes are never space */
        bool space = !(l == 1 && p[i] >= 0x80) && py_space(cpm_utf8_decode(p + i, l));
        if (!space) {
            if (!seen)
                start = i;
            seen = true;
            end = i + l;
        }
        i += l;
    }
    *ret_start = seen ? start : 0;
    *ret_end = seen ? end : 0;
}
