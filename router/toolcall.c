/* toolcall.c - the tool-call parser: a small state machine over held-back text, and a
 * Python-literal reader that writes JSON. See toolcall.h for the format. */
#include "toolcall.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/utf8.h"

#include "../common/error.h"

#define THOUGHT_START "<|thought_start|>"
#define THOUGHT_END "<|thought_end|>"
#define CALL_START "<|tool_call_start|>"
#define CALL_END "<|tool_call_end|>"
#define MAX_DEPTH 64 /* nesting of literals: deeper is not a call we take */

/* A growable byte string. */
typedef struct buf {
    char *p;
    size_t len, cap;
    bool oom;
} buf;

static void buf_add(buf *b, const void *s, size_t n) {
    if (b->oom || n == 0)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(buf *b, const char *s) {
    buf_add(b, s, strlen(s));
}

static void buf_drop_front(buf *b, size_t n) {
    if (n == 0)
        return;
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
    if (b->p)
        b->p[b->len] = '\0';
}

/* ---- Python literals to JSON ------------------------------------------------------- */

typedef struct reader {
    const char *s;
    size_t n, i;
    buf *out;
} reader;

static int peek(const reader *r) {
    return r->i < r->n ? (unsigned char)r->s[r->i] : -1;
}

static void skip_ws(reader *r) {
    while (r->i < r->n && strchr(" \t\r\n", r->s[r->i]))
        r->i++;
}

static bool is_ident(int c, bool first) {
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (!first && c >= '0' && c <= '9');
}

static bool starts(const reader *r, const char *w) {
    size_t k = strlen(w);
    return r->n - r->i >= k && memcmp(r->s + r->i, w, k) == 0;
}

static void put_utf8(buf *b, uint32_t cp) {
    char u[4];
    size_t k;
    if (cp < 0x80)
        u[0] = (char)cp, k = 1;
    else if (cp < 0x800)
        u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3F)), k = 2;
    else if (cp < 0x10000)
        u[0] = (char)(0xE0 | cp >> 12), u[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
        u[2] = (char)(0x80 | (cp & 0x3F)), k = 3;
    else
        u[0] = (char)(0xF0 | cp >> 18), u[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F)), k = 4;
    buf_add(b, u, k);
}

/* A code point as JSON string content: escapes for quotes, backslash, controls and
 * surrogates (which UTF-8 cannot carry). NUL is never written: many JSON readers refuse
 * it (jansson in object keys), and no model's call means it. */
static bool put_json_cp(buf *b, uint32_t cp) {
    char esc[16];
    if (cp == 0)
        return false;
    if (cp == '"' || cp == '\\') {
        esc[0] = '\\', esc[1] = (char)cp;
        buf_add(b, esc, 2);
    } else if (cp < 0x20 || (cp >= 0xD800 && cp <= 0xDFFF)) {
        snprintf(esc, sizeof esc, "\\u%04x", (unsigned)cp);
        buf_str(b, esc);
    } else {
        put_utf8(b, cp);
    }
    return true;
}

/* n hex digits at r (after \x, \u, \U). */
static bool read_hex(reader *r, int n, uint32_t *cp) {
    *cp = 0;
    for (int k = 0; k < n; k++) {
        int c = peek(r);
        int v = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
        if (v < 0)
            return false;
        *cp = *cp << 4 | (uint32_t)v;
        r->i++;
    }
    return *cp <= 0x10FFFF;
}

/* One backslash escape (r after the backslash), as Python reads it. */
static bool read_escape(reader *r, buf *b) {
    static const char from[] = "nrtbfav0\\'\"", to[] = "\n\r\t\b\f\a\v\0\\'\"";
    int c = peek(r);
    if (c < 0)
        return false;
    r->i++;
    uint32_t cp;
    const char *k = c ? strchr(from, c) : NULL;
    if (k && !(c == '0' && peek(r) >= '0' && peek(r) <= '7'))
        return put_json_cp(b, (unsigned char)to[k - from]);
    if (c == '\n')
        return true; /* a line continuation */
    if (c >= '0' && c <= '7') { /* up to three octal digits */
        cp = (uint32_t)(c - '0');
        for (int d = 0; d < 2 && peek(r) >= '0' && peek(r) <= '7'; d++)
            cp = cp * 8 + (uint32_t)(peek(r) - '0'), r->i++;
        return put_json_cp(b, cp);
    }
    if (c == 'x' || c == 'u' || c == 'U') {
        return read_hex(r, c == 'x' ? 2 : c == 'u' ? 4 : 8, &cp) && put_json_cp(b, cp);
    }
    r->i--; /* Python keeps an unknown escape as it is */
    return put_json_cp(b, '\\');
}

/* '...' or "..." (single line; triple quotes are not taken) as a JSON string. */
static bool read_string(reader *r, buf *b) {
    char q = r->s[r->i++];
    buf_add(b, "\"", 1);
    while (r->i < r->n) {
        unsigned char c = (unsigned char)r->s[r->i];
        if (c == (unsigned char)q) {
            r->i++;
            buf_add(b, "\"", 1);
            return true;
        }
        if (c == '\n')
            return false;
        if (c >= 0x80) { /* arguments must be valid JSON: a broken sequence becomes U+FFFD */
            size_t k = cpm_utf8_seq_len((const unsigned char *)r->s + r->i, r->n - r->i);
            if (k)
                buf_add(b, r->s + r->i, k);
            else
                put_utf8(b, 0xFFFD);
            r->i += k ? k : 1;
            continue;
        }
        r->i++;
        if (c == '\\') {
            if (!read_escape(r, b))
                return false;
        } else if (c == '"' || c < 0x20) {
            if (!put_json_cp(b, c))
                return false;
        } else {
            buf_add(b, &c, 1);
        }
    }
    return false;
}

/* Digits (with Python's underscores between them) into b; how many digits. */
static int read_digits(reader *r, buf *b) {
    int n = 0;
    while (r->i < r->n) {
        int c = peek(r);
        if (c >= '0' && c <= '9') {
            buf_add(b, &r->s[r->i], 1);
            n++;
        } else if (!(c == '_' && n > 0 && r->i + 1 < r->n && r->s[r->i + 1] >= '0' &&
                     r->s[r->i + 1] <= '9')) {
            break;
        }
        r->i++;
    }
    return n;
}

/* A Python int or float in JSON's spelling: "+1" -> 1, "1." -> 1.0, ".5" -> 0.5, 007 -> 7. */
static bool read_number(reader *r, buf *b) {
    if (peek(r) == '-')
        buf_add(b, "-", 1);
    if (peek(r) == '-' || peek(r) == '+')
        r->i++;
    buf ip = {0}, fp = {0}, ex = {0};
    int ni = read_digits(r, &ip), nf = -1;
    if (peek(r) == '.') {
        r->i++;
        nf = read_digits(r, &fp);
    }
    bool ok = ni > 0 || nf > 0;
    if (ok && (peek(r) == 'e' || peek(r) == 'E')) {
        r->i++;
        if (peek(r) == '-' || peek(r) == '+')
            buf_add(&ex, &r->s[r->i++], 1);
        ok = read_digits(r, &ex) > 0;
    }
    ok = ok && !is_ident(peek(r), false) && peek(r) != '.';
    size_t z = 0;
    while (ip.len > 1 && z + 1 < ip.len && ip.p[z] == '0')
        z++;
    if (ok) {
        buf_add(b, ni > 0 ? ip.p + z : "0", ni > 0 ? ip.len - z : 1);
        if (nf >= 0) {
            buf_add(b, ".", 1);
            buf_add(b, nf > 0 ? fp.p : "0", nf > 0 ? fp.len : 1);
        }
        if (ex.len) {
            buf_add(b, "e", 1);
            buf_add(b, ex.p, ex.len);
        }
    }
    free(ip.p), free(fp.p), free(ex.p);
    return ok && !b->oom;
}

static bool read_value(reader *r, buf *b, int depth);

/* [a, b,] or (a, b,) as a JSON array; the closing bracket is `close`. */
static bool read_seq(reader *r, buf *b, char close, int depth) {
    r->i++;
    buf_add(b, "[", 1);
    for (bool first = true;; first = false) {
        skip_ws(r);
        if (peek(r) == close)
            break;
        if (!first)
            buf_add(b, ",", 1);
        if (!read_value(r, b, depth + 1))
            return false;
        skip_ws(r);
        if (peek(r) == ',')
            r->i++;
        else if (peek(r) != close)
            return false;
    }
    r->i++;
    buf_add(b, "]", 1);
    return true;
}

/* A dict key as a JSON string: strings as they are, numbers and constants as their
 * JSON text (as json.dumps does with non-string keys). */
static bool read_key(reader *r, buf *b, int depth) {
    if (peek(r) == '"' || peek(r) == '\'')
        return read_string(r, b);
    buf k = {0};
    bool ok = read_value(r, &k, depth + 1) && k.len && k.p[0] != '[' && k.p[0] != '{';
    if (ok) {
        buf_add(b, "\"", 1);
        buf_add(b, k.p, k.len);
        buf_add(b, "\"", 1);
    }
    free(k.p);
    return ok;
}

static bool read_dict(reader *r, buf *b, int depth) {
    r->i++;
    buf_add(b, "{", 1);
    for (bool first = true;; first = false) {
        skip_ws(r);
        if (peek(r) == '}')
            break;
        if (!first)
            buf_add(b, ",", 1);
        if (!read_key(r, b, depth))
            return false;
        skip_ws(r);
        if (peek(r) != ':')
            return false;
        r->i++;
        buf_add(b, ":", 1);
        skip_ws(r);
        if (!read_value(r, b, depth + 1))
            return false;
        skip_ws(r);
        if (peek(r) == ',')
            r->i++;
        else if (peek(r) != '}')
            return false;
    }
    r->i++;
    buf_add(b, "}", 1);
    return true;
}

/* True/False/None and their JSON spellings. */
static bool read_constant(reader *r, buf *b) {
    static const char *const words[][2] = {{"True", "true"},   {"False", "false"},
                                           {"None", "null"},   {"true", "true"},
                                           {"false", "false"}, {"null", "null"}};
    size_t start = r->i;
    while (is_ident(peek(r), r->i == start))
        r->i++;
    for (size_t k = 0; k < sizeof words / sizeof *words; k++)
        if (r->i - start == strlen(words[k][0]) && !memcmp(r->s + start, words[k][0], r->i - start)) {
            buf_str(b, words[k][1]);
            return true;
        }
    return false;
}

static bool read_value(reader *r, buf *b, int depth) {
    if (depth > MAX_DEPTH)
        return false;
    skip_ws(r);
    int c = peek(r);
    if (c == '"' || c == '\'')
        return read_string(r, b);
    if (c == '[')
        return read_seq(r, b, ']', depth);
    if (c == '(')
        return read_seq(r, b, ')', depth);
    if (c == '{')
        return read_dict(r, b, depth);
    if (c == '-' || c == '+' || c == '.' || (c >= '0' && c <= '9'))
        return read_number(r, b);
    return is_ident(c, true) && read_constant(r, b);
}

/* "kw=value, ..." up to `close` (or the end when close is 0) as a JSON object; r ends
 * on the closing character. Positional or repeated arguments are not a call we take. */
static bool read_args(reader *r, buf *b, char close) {
    buf_add(b, "{", 1);
    buf names = {0}; /* "\0kw\0kw2\0": repeats are found with memmem */
    bool ok = true;
    buf_add(&names, "\0", 1);
    for (bool first = true; ok; first = false) {
        skip_ws(r);
        if (close ? peek(r) == close : r->i == r->n)
            break;
        size_t k0 = r->i;
        while (is_ident(peek(r), r->i == k0))
            r->i++;
        size_t klen = r->i - k0;
        skip_ws(r);
        ok = klen > 0 && peek(r) == '=';
        buf key = {0};
        buf_add(&key, "\0", 1);
        buf_add(&key, r->s + k0, klen);
        buf_add(&key, "\0", 1);
        ok = ok && !key.oom && !memmem(names.p, names.len, key.p, key.len);
        if (ok) {
            buf_add(&names, key.p + 1, key.len - 1);
            r->i++;
            if (!first)
                buf_add(b, ",", 1);
            buf_add(b, "\"", 1);
            buf_add(b, r->s + k0, klen);
            buf_add(b, "\":", 2);
            ok = read_value(r, b, 0);
            skip_ws(r);
            if (ok && peek(r) == ',')
                r->i++;
            else if (ok)
                ok = close ? peek(r) == close : r->i == r->n;
        }
        free(key.p);
    }
    free(names.p);
    buf_add(b, "}", 1);
    return ok && !b->oom && !names.oom;
}

char *cpm_toolcall_args_json(const char *s, size_t len) {
    reader r = {s, len, 0, NULL};
    buf b = {0};
    if (!read_args(&r, &b, 0) || b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p ? b.p : strdup("{}");
}

/* ---- the call block -------------------------------------------------------------- */

struct cpm_toolcall {
    char **names;
    int n_names;
    char *id_prefix;
    enum { S_START, S_THOUGHT, S_BODY, S_BLOCK, S_DROP_NL, S_DONE } state;
    int after_drop;     /* the state S_DROP_NL goes on to */
    buf held;           /* text not decided yet */
    size_t scanned;     /* S_BLOCK: held[0..scanned) has no end marker */
    buf content, reasoning; /* this feed's decisions */
    cpm_toolcall_call *calls;
    int n_calls;
    int n_rejected; /* blocks given back as content */
    bool oom;
};

static bool known_name(const cpm_toolcall *tc, const char *s, size_t n) {
    for (int i = 0; i < tc->n_names; i++)
        if (strlen(tc->names[i]) == n && !memcmp(tc->names[i], s, n))
            return true;
    return false;
}

/* One "name(kw=value, ...)" at r into name/args; the rest of its line must be blank. */
static bool read_call(const cpm_toolcall *tc, reader *r, buf *name, buf *args) {
    size_t n0 = r->i;
    while (r->i < r->n && (is_ident(peek(r), false) || peek(r) == '-'))
        r->i++;
    if (r->i == n0 || !known_name(tc, r->s + n0, r->i - n0))
        return false;
    buf_add(name, r->s + n0, r->i - n0);
    while (peek(r) == ' ' || peek(r) == '\t')
        r->i++;
    if (peek(r) != '(')
        return false;
    r->i++;
    if (!read_args(r, args, ')'))
        return false;
    r->i++;
    while (peek(r) == ' ' || peek(r) == '\t' || peek(r) == '\r' || peek(r) == ';')
        r->i++;
    return peek(r) == '\n' || peek(r) < 0 || starts(r, "```");
}

static void calls_free(cpm_toolcall_call *calls, int n) {
    for (int i = 0; i < n; i++) {
        free(calls[i].id);
        free(calls[i].name);
        free(calls[i].arguments);
    }
    free(calls);
}

/* The text between the markers: an optional ```python fence, one call per line. All or
 * nothing: the calls are added only when every one parses. */
static bool parse_block(cpm_toolcall *tc, const char *s, size_t n) {
    reader r = {s, n, 0, NULL};
    skip_ws(&r);
    bool fenced = starts(&r, "```");
    if (fenced) {
        r.i += 3;
        while (is_ident(peek(&r), false))
            r.i++; /* the language: python, py, ... */
    }
    cpm_toolcall_call *got = NULL;
    int n_got = 0;
    bool ok = true;
    for (;;) {
        skip_ws(&r);
        if (r.i == r.n || (fenced && starts(&r, "```")))
            break;
        buf name = {0}, args = {0};
        cpm_toolcall_call *g2 = realloc(got, (size_t)(n_got + 1) * sizeof *got);
        ok = g2 && read_call(tc, &r, &name, &args) && !name.oom && !args.oom;
        if (g2)
            got = g2;
        if (!ok) {
            free(name.p), free(args.p);
            break;
        }
        got[n_got++] = (cpm_toolcall_call){NULL, name.p, args.p};
    }
    if (ok && fenced) {
        ok = starts(&r, "```");
        r.i += ok ? 3 : 0;
        skip_ws(&r);
    }
    ok = ok && n_got > 0 && r.i == r.n;
    if (ok) {
        cpm_toolcall_call *all = realloc(tc->calls, (size_t)(tc->n_calls + n_got) * sizeof *all);
        ok = all != NULL;
        if (all)
            tc->calls = all;
    }
    for (int i = 0; ok && i < n_got; i++) {
        char id[160];
        snprintf(id, sizeof id, "%s_%d", tc->id_prefix, tc->n_calls + i);
        got[i].id = strdup(id);
        ok = got[i].id != NULL;
    }
    if (!ok) {
        calls_free(got, n_got);
        return false;
    }
    memcpy(tc->calls + tc->n_calls, got, (size_t)n_got * sizeof *got);
    tc->n_calls += n_got;
    free(got);
    return true;
}

/* ---- the state machine ------------------------------------------------------------- */

cpm_toolcall *cpm_toolcall_new(const char *const *names, int n_names, const char *id_prefix) {
    cpm_toolcall *tc = calloc(1, sizeof *tc);
    if (!tc)
        return NULL;
    tc->names = calloc((size_t)(n_names > 0 ? n_names : 1), sizeof *tc->names);
    tc->id_prefix = strdup(id_prefix ? id_prefix : "call");
    bool ok = tc->names && tc->id_prefix;
    for (int i = 0; ok && i < n_names; i++)
        ok = (tc->names[i] = strdup(names[i])) != NULL, tc->n_names = i + 1;
    if (!ok) {
        cpm_toolcall_free(tc);
        return NULL;
    }
    return tc;
}

void cpm_toolcall_free(cpm_toolcall *tc) {
    if (!tc)
        return;
    for (int i = 0; i < tc->n_names; i++)
        free(tc->names[i]);
    free(tc->names);
    free(tc->id_prefix);
    free(tc->held.p);
    free(tc->content.p);
    free(tc->reasoning.p);
    calls_free(tc->calls, tc->n_calls);
    free(tc);
}

int cpm_toolcall_count(const cpm_toolcall *tc) {
    return tc->n_calls;
}

int cpm_toolcall_rejected(const cpm_toolcall *tc) {
    return tc->n_rejected;
}

const cpm_toolcall_call *cpm_toolcall_get(const cpm_toolcall *tc, int i) {
    return i >= 0 && i < tc->n_calls ? &tc->calls[i] : NULL;
}

/* Where marker m starts in s, or -1. */
static long find(const char *s, size_t n, size_t from, const char *m) {
    size_t k = strlen(m);
    for (size_t i = from; i + k <= n; i++)
        if (!memcmp(s + i, m, k))
            return (long)i;
    return -1;
}

/* The longest end of s (n bytes) that is a proper start of marker m: held back. */
static size_t partial(const char *s, size_t n, const char *m) {
    size_t k = strlen(m);
    for (size_t h = n < k - 1 ? n : k - 1; h > 0; h--)
        if (!memcmp(s + n - h, m, h))
            return h;
    return 0;
}

/* Moves n bytes of held text to out. */
static void emit(cpm_toolcall *tc, buf *out, size_t n) {
    buf_add(out, tc->held.p, n);
    buf_drop_front(&tc->held, n);
}

static void drop_then(cpm_toolcall *tc, size_t n, int next) {
    buf_drop_front(&tc->held, n);
    tc->state = S_DROP_NL;
    tc->after_drop = next;
}

/* One step of the machine over held text; false when it must wait for more. */
static bool step(cpm_toolcall *tc, bool end) {
    char *s = tc->held.p;
    size_t n = tc->held.len;
    const size_t ts = strlen(THOUGHT_START), cs = strlen(CALL_START), ce = strlen(CALL_END);
    switch (tc->state) {
    case S_START:
        if (n >= ts && !memcmp(s, THOUGHT_START, ts)) {
            drop_then(tc, ts, S_THOUGHT);
            return true;
        }
        if (!end && n < ts && (n == 0 || !memcmp(s, THOUGHT_START, n)))
            return false;
        tc->state = S_BODY;
        return true;
    case S_DROP_NL:
        if (n == 0 && !end)
            return false;
        if (n > 0 && s[0] == '\n')
            buf_drop_front(&tc->held, 1);
        tc->state = tc->after_drop;
        return true;
    case S_THOUGHT: {
        long k = find(s, n, 0, THOUGHT_END);
        if (k >= 0) {
            size_t keep = (size_t)k - (k > 0 && s[k - 1] == '\n');
            emit(tc, &tc->reasoning, keep);
            drop_then(tc, (size_t)k - keep + strlen(THOUGHT_END), S_BODY);
            return true;
        }
        size_t h1 = partial(s, n, "\n" THOUGHT_END), h2 = partial(s, n, THOUGHT_END);
        size_t hold = end ? 0 : h1 > h2 ? h1 : h2;
        emit(tc, &tc->reasoning, n - hold);
        return false;
    }
    case S_BODY: {
        long k = find(s, n, 0, CALL_START);
        if (k >= 0) {
            emit(tc, &tc->content, (size_t)k);
            tc->state = S_BLOCK;
            tc->scanned = cs;
            return true;
        }
        emit(tc, &tc->content, n - (end ? 0 : partial(s, n, CALL_START)));
        return false;
    }
    case S_BLOCK: {
        size_t from = tc->scanned > cs + ce ? tc->scanned - ce : cs;
        long k = find(s, n, from, CALL_END);
        if (k < 0 && !end) {
            tc->scanned = n;
            return false;
        }
        size_t body_end = k >= 0 ? (size_t)k : n, stop = k >= 0 ? (size_t)k + ce : n;
        if (parse_block(tc, s + cs, body_end - cs)) {
            drop_then(tc, stop, S_BODY);
        } else {
            emit(tc, &tc->content, stop); /* not a call we take: the text as it was */
            tc->n_rejected++;
            tc->state = S_BODY;
        }
        return true;
    }
    case S_DONE:
        return false;
    }
    return false;
}

static void run(cpm_toolcall *tc, bool end, cpm_toolcall_delta *d) {
    int before = tc->n_calls;
    while (step(tc, end))
        ;
    bool oom = tc->held.oom || tc->content.oom || tc->reasoning.oom;
    *d = (cpm_toolcall_delta){oom ? "" : tc->reasoning.p ? tc->reasoning.p : "",
                              oom ? 0 : tc->reasoning.len,
                              oom ? "" : tc->content.p ? tc->content.p : "",
                              oom ? 0 : tc->content.len, before, tc->n_calls};
}

static void begin(cpm_toolcall *tc) {
    tc->content.len = tc->reasoning.len = 0;
    if (tc->content.p)
        tc->content.p[0] = '\0';
    if (tc->reasoning.p)
        tc->reasoning.p[0] = '\0';
}

int cpm_toolcall_feed(cpm_toolcall *tc, const char *text, size_t len, cpm_toolcall_delta *d) {
    begin(tc);
    if (tc->state != S_DONE)
        buf_add(&tc->held, text, len);
    run(tc, false, d);
    return tc->held.oom || tc->content.oom || tc->reasoning.oom ? CPM_ENOMEM : 0;
}

int cpm_toolcall_whole(cpm_toolcall *tc, const char *text, size_t len, cpm_toolcall_delta *d) {
    begin(tc);
    if (tc->state != S_DONE)
        buf_add(&tc->held, text, len);
    run(tc, true, d);
    int rc = tc->held.oom || tc->content.oom || tc->reasoning.oom ? CPM_ENOMEM : 0;
    tc->state = S_DONE;
    return rc;
}

int cpm_toolcall_finish(cpm_toolcall *tc, cpm_toolcall_delta *d) {
    begin(tc);
    run(tc, true, d);
    int rc = tc->held.oom || tc->content.oom || tc->reasoning.oom ? CPM_ENOMEM : 0;
    tc->state = S_DONE;
    return rc;
}
