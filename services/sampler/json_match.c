/* json_match.c - the JSON object matcher (see json_match.h).
 *
 * Frames hold where a container is (expecting a key, a colon, a value, a comma...);
 * a container's parent is moved to its "after a value" state when the child opens, so
 * closing the child only pops. Scalars (strings, numbers, literals) are read by a small
 * lexer on top of the frames; a number ends at the first byte that cannot continue it,
 * which the frame then reads. */
#include "json_match.h"

#include <string.h>

enum frame_state {
    TOP_START = 1, /* expects the object's '{' */
    TOP_DONE,      /* the object is closed */
    OBJ_FIRST,     /* after '{': a key or '}' */
    OBJ_KEY,       /* after ',': a key */
    OBJ_COLON,     /* after a key: ':' */
    OBJ_VALUE,     /* after ':': a value */
    OBJ_NEXT,      /* after a value: ',' or '}' */
    ARR_FIRST,     /* after '[': a value or ']' */
    ARR_VALUE,     /* after ',': a value */
    ARR_NEXT,      /* after a value: ',' or ']' */
};

enum lex_state {
    LEX_NONE = 0,
    STR,       /* inside a string */
    STR_ESC,   /* after a backslash */
    STR_HEX,   /* \u: aux hex digits left */
    STR_UTF8,  /* aux continuation bytes left, the next in [lo, hi] */
    NUM_MINUS, /* after '-': a digit */
    NUM_ZERO,  /* a leading 0: '.', 'e' or the end */
    NUM_INT,   /* digits */
    NUM_DOT,   /* after '.': a digit */
    NUM_FRAC,  /* fraction digits */
    NUM_EXP,   /* after 'e': a sign or a digit */
    NUM_EXP_SIGN,
    NUM_EXP_DIG,
    LIT,       /* lit[aux] is the next byte of a literal */
};

void cpm_jm_init(cpm_jm *m) {
    memset(m, 0, sizeof *m);
    m->depth = 1;
    m->frame[0] = TOP_START;
}

static uint8_t *top(cpm_jm *m) {
    return &m->frame[m->depth - 1];
}

static bool die(cpm_jm *m) {
    m->dead = true;
    return false;
}

/* The state a frame goes to once the value it expects has been read. */
static uint8_t after_value(uint8_t s) {
    switch (s) {
    case TOP_START: return TOP_DONE;
    case OBJ_FIRST: case OBJ_KEY: return OBJ_COLON; /* the value was the key */
    case OBJ_VALUE: return OBJ_NEXT;
    case ARR_FIRST: case ARR_VALUE: return ARR_NEXT;
    default: return 0;
    }
}

static void value_done(cpm_jm *m) {
    m->lex = LEX_NONE;
    *top(m) = after_value(*top(m));
}

static bool open_container(cpm_jm *m, uint8_t state) {
    if (m->depth == CPM_JM_MAX_DEPTH)
        return die(m);
    *top(m) = after_value(*top(m));
    m->frame[m->depth++] = state;
    return true;
}

static bool close_container(cpm_jm *m) {
    m->depth--;
    return true;
}

/* A value starts with b in a frame that expects one (keys: only strings). */
static bool start_value(cpm_jm *m, uint8_t b, bool key) {
    if (b == '"') {
        m->lex = STR;
        return true;
    }
    if (key)
        return die(m);
    if (b == '{')
        return open_container(m, OBJ_FIRST);
    if (b == '[')
        return open_container(m, ARR_FIRST);
    if (b == '-' || (b >= '0' && b <= '9')) {
        m->lex = b == '-' ? NUM_MINUS : b == '0' ? NUM_ZERO : NUM_INT;
        return true;
    }
    m->lit = b == 't' ? "true" : b == 'f' ? "false" : b == 'n' ? "null" : NULL;
    if (!m->lit)
        return die(m);
    m->lex = LIT;
    m->aux = 1;
    return true;
}

static bool frame_byte(cpm_jm *m, uint8_t b) {
    uint8_t s = *top(m);
    switch (s) {
    case TOP_START:
        return b == '{' ? open_container(m, OBJ_FIRST) : die(m);
    case OBJ_FIRST:
        if (b == '}')
            return close_container(m);
        return start_value(m, b, true);
    case OBJ_KEY:
        return start_value(m, b, true);
    case OBJ_COLON:
        return b == ':' ? (*top(m) = OBJ_VALUE, true) : die(m);
    case OBJ_VALUE:
    case ARR_VALUE:
        return start_value(m, b, false);
    case ARR_FIRST:
        if (b == ']')
            return close_container(m);
        return start_value(m, b, false);
    case OBJ_NEXT:
        if (b == ',')
            return *top(m) = OBJ_KEY, true;
        return b == '}' ? close_container(m) : die(m);
    case ARR_NEXT:
        if (b == ',')
            return *top(m) = ARR_VALUE, true;
        return b == ']' ? close_container(m) : die(m);
    default: /* TOP_DONE: nothing may follow */
        return die(m);
    }
}

/* The first byte of a multi-byte UTF-8 character: how many follow, and the range the
 * next one must be in (no overlong forms, no surrogates, nothing past U+10FFFF). */
static bool utf8_lead(cpm_jm *m, uint8_t b) {
    m->lo = 0x80, m->hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        m->aux = 1;
    else if (b >= 0xE0 && b <= 0xEF) {
        m->aux = 2;
        if (b == 0xE0)
            m->lo = 0xA0;
        if (b == 0xED)
            m->hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        m->aux = 3;
        if (b == 0xF0)
            m->lo = 0x90;
        if (b == 0xF4)
            m->hi = 0x8F;
    } else {
        return die(m);
    }
    m->lex = STR_UTF8;
    return true;
}

static bool string_byte(cpm_jm *m, uint8_t b) {
    static const char escapes[] = "\"\\/bfnrtu";
    switch (m->lex) {
    case STR:
        if (b == '"') {
            value_done(m);
            return true;
        }
        if (b == '\\')
            return m->lex = STR_ESC, true;
        if (b < 0x20)
            return die(m);
        return b < 0x80 ? true : utf8_lead(m, b);
    case STR_ESC:
        if (!b || !strchr(escapes, b))
            return die(m);
        m->lex = b == 'u' ? STR_HEX : STR;
        m->aux = 4;
        return true;
    case STR_HEX:
        if (!((b >= '0' && b <= '9') || (b >= 'a' && b <= 'f') || (b >= 'A' && b <= 'F')))
            return die(m);
        if (--m->aux == 0)
            m->lex = STR;
        return true;
    default: /* STR_UTF8 */
        if (b < m->lo || b > m->hi)
            return die(m);
        m->lo = 0x80, m->hi = 0xBF;
        if (--m->aux == 0)
            m->lex = STR;
        return true;
    }
}

static bool digit(uint8_t b) {
    return b >= '0' && b <= '9';
}

/* A number byte; false with the matcher alive when b ends the number (the frame reads it). */
static bool number_byte(cpm_jm *m, uint8_t b, bool *ended) {
    *ended = false;
    switch (m->lex) {
    case NUM_MINUS:
        if (!digit(b))
            return die(m);
        m->lex = b == '0' ? NUM_ZERO : NUM_INT;
        return true;
    case NUM_ZERO:
    case NUM_INT:
        if (digit(b) && m->lex == NUM_INT)
            return true;
        if (b == '.')
            return m->lex = NUM_DOT, true;
        if (b == 'e' || b == 'E')
            return m->lex = NUM_EXP, true;
        break;
    case NUM_DOT:
        return digit(b) ? (m->lex = NUM_FRAC, true) : die(m);
    case NUM_FRAC:
        if (digit(b))
            return true;
        if (b == 'e' || b == 'E')
            return m->lex = NUM_EXP, true;
        break;
    case NUM_EXP:
        if (b == '+' || b == '-')
            return m->lex = NUM_EXP_SIGN, true;
        return digit(b) ? (m->lex = NUM_EXP_DIG, true) : die(m);
    case NUM_EXP_SIGN:
        return digit(b) ? (m->lex = NUM_EXP_DIG, true) : die(m);
    default: /* NUM_EXP_DIG */
        if (digit(b))
            return true;
        break;
    }
    *ended = true; /* a complete number, and b is the next token's */
    value_done(m);
    return true;
}

bool cpm_jm_feed(cpm_jm *m, uint8_t b) {
    if (m->dead)
        return false;
    if (m->lex >= STR && m->lex <= STR_UTF8)
        return string_byte(m, b);
    if (m->lex == LIT) {
        if ((uint8_t)m->lit[m->aux] != b)
            return die(m);
        if (!m->lit[++m->aux])
            value_done(m);
        return true;
    }
    if (m->lex >= NUM_MINUS) {
        bool ended;
        if (!number_byte(m, b, &ended))
            return false;
        if (!ended)
            return true;
    }
    return frame_byte(m, b);
}

bool cpm_jm_done(const cpm_jm *m) {
    return !m->dead && m->depth == 1 && m->frame[0] == TOP_DONE && m->lex == LEX_NONE;
}

/* Bytes that close a frame in state s: the cheapest value is `0`, the cheapest key `""`. */
static int frame_cost(uint8_t s) {
    switch (s) {
    case TOP_START: return 2;         /* {} */
    case OBJ_KEY: return 5;           /* "":0} */
    case OBJ_COLON: return 3;         /* :0} */
    case OBJ_VALUE: case ARR_VALUE: return 2; /* 0} 0] */
    case OBJ_FIRST: case OBJ_NEXT: case ARR_FIRST: case ARR_NEXT: return 1;
    default: return 0;                /* TOP_DONE */
    }
}

static int lex_cost(const cpm_jm *m) {
    switch (m->lex) {
    case STR: return 1;
    case STR_ESC: return 2;
    case STR_HEX: case STR_UTF8: return m->aux + 1;
    case NUM_MINUS: case NUM_DOT: case NUM_EXP: case NUM_EXP_SIGN: return 1;
    case LIT: return (int)strlen(m->lit + m->aux);
    default: return 0;
    }
}

int cpm_jm_min_close(const cpm_jm *m) {
    if (m->dead)
        return 1 << 20;
    int total = lex_cost(m);
    for (int d = m->depth - 1; d >= 0; d--) {
        uint8_t s = m->frame[d];
        if (d == m->depth - 1 && m->lex != LEX_NONE)
            s = after_value(s); /* the scalar being read is this frame's value */
        total += frame_cost(s);
    }
    return total;
}
