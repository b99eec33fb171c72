/* json_grammar.c - JSON Schema and MiniCPM tool calls to a byte grammar (see json_grammar.h).
 *
 * Every schema node becomes one rule. Objects list their properties in order through two
 * chains of rules, "nothing written yet" and "something written" (which decides whether a
 * comma comes first), an optional property being an alternative that skips it. Arrays
 * unroll their minItems and close with a tail loop (or a chain up to maxItems). $ref
 * targets are rules made once, so recursive schemas are recursive rules. */
#include "services/sampler/json_grammar.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/sampler/jschema.h"

/* minItems, and maxItems beyond it, unrolled at most this far. */
#define MAX_UNROLL 256
/* Digits of a number's integer part and of its fraction, at most. */
#define MAX_DIGITS 15

typedef struct memo {
    json_t *node;
    int rule;
} memo;

typedef struct cx {
    cpm_gram *g;
    json_t *root;
    uint32_t str_flags;  /* CPM_GRAM_STR_PY inside tool calls */
    int shared[8];       /* lazily made rules for the plain types */
    memo *refs;
    int n_refs, cap_refs;
    cpm_gram_seq seq;    /* scratch for one alternative */
    cpm_error *err;
    int rc;
} cx;

enum { SH_STRING, SH_INTEGER, SH_NUMBER, SH_BOOLEAN, SH_NULL, SH_ANY, SH_ANY_OBJECT, SH_DIGITS, SH_COUNT };

static int fail(cx *c, int code, const char *fmt, const char *arg) {
    if (!c->rc)
        c->rc = cpm_error_set(c->err, code, fmt, arg);
    return -1;
}

static int oom(cx *c) {
    return fail(c, CPM_ENOMEM, "schema grammar: %s", "out of memory");
}

static int new_rule(cx *c) {
    int r = c->rc ? -1 : cpm_gram_rule(c->g);
    return r < 0 ? oom(c) : r;
}

/* Adds c->seq as an alternative of rule r. */
static void alt(cx *c, int r) {
    if (c->rc || r < 0) {
        c->seq.n = 0;
        return;
    }
    if (cpm_gram_alt(c->g, r, &c->seq))
        oom(c);
}

static void lit(cx *c, const char *s) {
    cpm_gram_seq_lit(c->g, &c->seq, s, strlen(s));
}

static void ref(cx *c, int r) {
    if (r < 0)
        fail(c, CPM_EINVAL, "schema grammar: %s", "a part failed");
    else
        cpm_gram_seq_push(&c->seq, (cpm_gram_el){CPM_GRAM_RULE, (uint32_t)r});
}

static void string_el(cx *c) {
    cpm_gram_seq_push(&c->seq, (cpm_gram_el){CPM_GRAM_STRING, c->str_flags});
}

/* A rule of one literal alternative per string. */
static int lit_rule(cx *c, const char *const *lits) {
    int r = new_rule(c);
    for (; *lits; lits++) {
        lit(c, *lits);
        alt(c, r);
    }
    return r;
}

/* [0-9]{0,max}: a chain of rules, the k-th allowing k more digits. */
static int digits_upto(cx *c, int max) {
    int r = new_rule(c);
    alt(c, r); /* none */
    for (int k = 1; k <= max; k++) {
        int more = new_rule(c);
        alt(c, more);
        cpm_gram_seq_range(c->g, &c->seq, '0', '9');
        ref(c, r);
        alt(c, more);
        r = more;
    }
    return r;
}

/* -?(0|[1-9][0-9]{0,14}): at most 15 digits, so every JSON reader (JavaScript's doubles,
 * 64-bit integers) reads the number exactly; a model with any weights cannot write one
 * that overflows them. */
static int integer(cx *c) {
    if (c->shared[SH_INTEGER] >= 0)
        return c->shared[SH_INTEGER];
    int r = c->shared[SH_INTEGER] = new_rule(c);
    if (c->shared[SH_DIGITS] < 0)
        c->shared[SH_DIGITS] = digits_upto(c, MAX_DIGITS - 1);
    for (int minus = 0; minus < 2; minus++) {
        if (minus)
            lit(c, "-");
        lit(c, "0");
        alt(c, r);
        if (minus)
            lit(c, "-");
        cpm_gram_seq_range(c->g, &c->seq, '1', '9');
        ref(c, c->shared[SH_DIGITS]);
        alt(c, r);
    }
    return r;
}

/* integer (.[0-9]{1,15})? ([eE][+-]?[0-9]{1,2})?: finite in every reader. */
static int number(cx *c) {
    if (c->shared[SH_NUMBER] >= 0)
        return c->shared[SH_NUMBER];
    int r = c->shared[SH_NUMBER] = new_rule(c);
    int frac = new_rule(c), exp = new_rule(c), sign = new_rule(c);
    int fd = digits_upto(c, MAX_DIGITS - 1), ed = digits_upto(c, 1);
    alt(c, frac);
    lit(c, ".");
    cpm_gram_seq_range(c->g, &c->seq, '0', '9');
    ref(c, fd);
    alt(c, frac);
    alt(c, sign);
    lit(c, "+");
    alt(c, sign);
    lit(c, "-");
    alt(c, sign);
    alt(c, exp);
    for (const char *e = "eE"; *e; e++) {
        cpm_gram_seq_lit(c->g, &c->seq, e, 1);
        ref(c, sign);
        cpm_gram_seq_range(c->g, &c->seq, '0', '9');
        ref(c, ed);
        alt(c, exp);
    }
    ref(c, integer(c));
    ref(c, frac);
    ref(c, exp);
    alt(c, r);
    return r;
}

static int shared_string(cx *c) {
    if (c->shared[SH_STRING] < 0) {
        c->shared[SH_STRING] = new_rule(c);
        string_el(c);
        alt(c, c->shared[SH_STRING]);
    }
    return c->shared[SH_STRING];
}

/* Any JSON value (a schema with no type): object, array, string, number or literal. */
static int any_value(cx *c) {
    if (c->shared[SH_ANY] >= 0)
        return c->shared[SH_ANY];
    int r = c->shared[SH_ANY] = new_rule(c);
    int obj = c->shared[SH_ANY_OBJECT] = new_rule(c);
    int members = new_rule(c), items = new_rule(c);
    /* members: ("," "key":value)*   items: ("," value)* */
    alt(c, members);
    lit(c, ",");
    string_el(c);
    lit(c, ":");
    ref(c, r);
    ref(c, members);
    alt(c, members);
    alt(c, items);
    lit(c, ",");
    ref(c, r);
    ref(c, items);
    alt(c, items);
    lit(c, "{}");
    alt(c, obj);
    lit(c, "{");
    string_el(c);
    lit(c, ":");
    ref(c, r);
    ref(c, members);
    lit(c, "}");
    alt(c, obj);
    ref(c, obj);
    alt(c, r);
    lit(c, "[]");
    alt(c, r);
    lit(c, "[");
    ref(c, r);
    ref(c, items);
    lit(c, "]");
    alt(c, r);
    string_el(c);
    alt(c, r);
    ref(c, number(c));
    alt(c, r);
    static const char *const words[] = {"true", "false", "null", NULL};
    for (const char *const *w = words; *w; w++) {
        lit(c, *w);
        alt(c, r);
    }
    return r;
}

static int node_rule(cx *c, json_t *node, int depth);

/* A JSON value spelled exactly (const, enum members). */
static void value_lit(cx *c, json_t *v) {
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!s) {
        oom(c);
        return;
    }
    lit(c, s);
    free(s);
}

static bool is_ident(const char *s) {
    if (!s[0] || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_'))
            return false;
    return true;
}

static bool in_required(json_t *req, const char *name) {
    size_t i;
    json_t *v;
    json_array_foreach(req, i, v) {
        if (json_is_string(v) && strcmp(json_string_value(v), name) == 0)
            return true;
    }
    return false;
}

/* One member: "key":value (JSON) or key=value (Python keywords). */
static void member(cx *c, const char *key, int value_rule, bool kwargs) {
    if (kwargs) {
        if (!is_ident(key)) {
            fail(c, CPM_EINVAL, "tool parameter '%.64s' is not a Python identifier, so a call cannot "
                                "name it", key);
            return;
        }
        lit(c, key);
    } else {
        json_t *k = json_string(key);
        value_lit(c, k);
        json_decref(k);
    }
    lit(c, kwargs ? "=" : ":");
    ref(c, value_rule);
}

/* The members of an object with properties, in order, without the braces (or a call's
 * keyword arguments): the rule for "from the first property, nothing written yet". */
static int members(cx *c, json_t *props, json_t *req, int depth, bool kwargs) {
    size_t n = json_object_size(props), i = 0;
    const char **keys = calloc(n ? n : 1, sizeof *keys);
    int *values = calloc(n ? n : 1, sizeof *values);
    if (!keys || !values) {
        free(keys), free(values);
        return oom(c);
    }
    const char *k;
    json_t *v;
    json_object_foreach(props, k, v) {
        keys[i] = k;
        values[i++] = node_rule(c, v, depth + 1);
    }
    int first = new_rule(c), more = new_rule(c); /* after the last: nothing */
    alt(c, first);
    alt(c, more);
    for (size_t j = n; j-- > 0 && !c->rc;) {
        bool optional = !in_required(req, keys[j]);
        int f = new_rule(c), m = new_rule(c);
        member(c, keys[j], values[j], kwargs);
        ref(c, more);
        alt(c, f);
        lit(c, kwargs ? ", " : ",");
        member(c, keys[j], values[j], kwargs);
        ref(c, more);
        alt(c, m);
        if (optional) {
            ref(c, first);
            alt(c, f);
            ref(c, more);
            alt(c, m);
        }
        first = f, more = m;
    }
    free(keys), free(values);
    return first;
}

static int object_rule(cx *c, json_t *node, int depth) {
    json_t *props = json_object_get(node, "properties");
    if (!json_is_object(props) || json_object_size(props) == 0) {
        if (json_is_false(json_object_get(node, "additionalProperties")) || props)
            return lit_rule(c, (const char *const[]){"{}", NULL});
        return any_value(c) < 0 ? -1 : c->shared[SH_ANY_OBJECT];
    }
    int body = members(c, props, json_object_get(node, "required"), depth, false);
    int r = new_rule(c);
    lit(c, "{");
    ref(c, body);
    lit(c, "}");
    alt(c, r);
    return r;
}

static int array_rule(cx *c, json_t *node, int depth) {
    json_t *items = json_object_get(node, "items");
    int item = items ? node_rule(c, items, depth + 1) : any_value(c);
    json_int_t lo = json_integer_value(json_object_get(node, "minItems"));
    json_t *hv = json_object_get(node, "maxItems");
    json_int_t hi = hv ? json_integer_value(hv) : -1;
    if (lo > MAX_UNROLL || (hi >= 0 && hi - lo > MAX_UNROLL) || (hi >= 0 && hi < lo))
        return fail(c, CPM_EINVAL, "array bounds: %s", "minItems at most 256, maxItems at most "
                                   "256 above it and not below it");
    /* tail: the items after the mandatory ones */
    int tail = new_rule(c);
    if (hi < 0) {
        alt(c, tail);
        lit(c, ",");
        ref(c, item);
        ref(c, tail);
        alt(c, tail);
    } else {
        alt(c, tail); /* at maxItems: nothing more */
        for (json_int_t j = hi; j > (lo > 0 ? lo : 1) && !c->rc; j--) {
            int t = new_rule(c);
            alt(c, t);
            lit(c, ",");
            ref(c, item);
            ref(c, tail);
            alt(c, t);
            tail = t;
        }
    }
    int r = new_rule(c);
    if (lo == 0) {
        lit(c, "[]");
        alt(c, r);
    }
    if (hi != 0) {
        lit(c, "[");
        ref(c, item);
        for (json_int_t j = 1; j < lo; j++) {
            lit(c, ",");
            ref(c, item);
        }
        ref(c, tail);
        lit(c, "]");
        alt(c, r);
    }
    return r;
}

static int type_rule(cx *c, json_t *node, const char *type, int depth) {
    if (strcmp(type, "object") == 0)
        return object_rule(c, node, depth);
    if (strcmp(type, "array") == 0)
        return array_rule(c, node, depth);
    if (strcmp(type, "string") == 0)
        return shared_string(c);
    if (strcmp(type, "integer") == 0)
        return integer(c);
    if (strcmp(type, "number") == 0)
        return number(c);
    if (strcmp(type, "boolean") == 0) {
        if (c->shared[SH_BOOLEAN] < 0)
            c->shared[SH_BOOLEAN] = lit_rule(c, (const char *const[]){"true", "false", NULL});
        return c->shared[SH_BOOLEAN];
    }
    if (strcmp(type, "null") == 0) {
        if (c->shared[SH_NULL] < 0)
            c->shared[SH_NULL] = lit_rule(c, (const char *const[]){"null", NULL});
        return c->shared[SH_NULL];
    }
    return fail(c, CPM_EINVAL, "type \"%.32s\": unknown", type);
}

/* A node reached through $ref (or the root): one rule, made once, so recursion ends. */
static int target_rule(cx *c, json_t *target, int depth) {
    for (int i = 0; i < c->n_refs; i++)
        if (c->refs[i].node == target)
            return c->refs[i].rule;
    if (c->n_refs == c->cap_refs) {
        int nc = c->cap_refs ? c->cap_refs * 2 : 8;
        memo *m = realloc(c->refs, (size_t)nc * sizeof *m);
        if (!m)
            return oom(c);
        c->refs = m, c->cap_refs = nc;
    }
    int r = new_rule(c);
    c->refs[c->n_refs++] = (memo){target, r};
    int body = node_rule(c, target, depth);
    ref(c, body);
    alt(c, r);
    return r;
}

static int node_rule(cx *c, json_t *node, int depth) {
    if (c->rc)
        return -1;
    if (depth > 64 || !json_is_object(node))
        return fail(c, CPM_EINVAL, "schema%s: not a schema object, or nested too deep", "");
    json_t *v;
    if ((v = json_object_get(node, "$ref"))) {
        json_t *t = cpm_jschema_resolve(c->root, json_string_value(v));
        return t ? target_rule(c, t, depth + 1)
                 : fail(c, CPM_EINVAL, "$ref \"%.64s\": not a schema in this document",
                        json_is_string(v) ? json_string_value(v) : "?");
    }
    if ((v = json_object_get(node, "const"))) {
        int r = new_rule(c);
        value_lit(c, v);
        alt(c, r);
        return r;
    }
    size_t i;
    json_t *e;
    if ((v = json_object_get(node, "enum"))) {
        int r = new_rule(c);
        json_array_foreach(v, i, e) {
            value_lit(c, e);
            alt(c, r);
        }
        return r;
    }
    if ((v = json_object_get(node, "anyOf")) || (v = json_object_get(node, "allOf"))) {
        int r = new_rule(c); /* allOf: jschema.c admits only one member */
        json_array_foreach(v, i, e) {
            ref(c, node_rule(c, e, depth + 1));
            alt(c, r);
        }
        return r;
    }
    json_t *type = json_object_get(node, "type");
    if (json_is_string(type))
        return type_rule(c, node, json_string_value(type), depth);
    if (json_is_array(type)) {
        int r = new_rule(c);
        json_array_foreach(type, i, e) {
            ref(c, type_rule(c, node, json_string_value(e) ? json_string_value(e) : "?", depth));
            alt(c, r);
        }
        return r;
    }
    if (json_object_get(node, "properties"))
        return object_rule(c, node, depth);
    if (json_object_get(node, "items"))
        return array_rule(c, node, depth);
    return any_value(c);
}

static void cx_init(cx *c, cpm_error *err, bool tools) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < SH_COUNT; i++)
        c->shared[i] = -1;
    c->err = err;
    c->str_flags = tools ? CPM_GRAM_STR_PY : 0;
    c->g = cpm_gram_new();
    if (!c->g)
        c->rc = cpm_error_set(err, CPM_ENOMEM, "schema grammar: out of memory");
}

/* Freezes c->g with root (or frees it on any error before or during). */
static int cx_finish(cx *c, json_t *doc, int root, cpm_gram **ret) {
    if (c->seq.oom && !c->rc)
        c->rc = cpm_error_set(c->err, CPM_ENOMEM, "schema grammar: out of memory");
    if (!c->rc)
        c->rc = cpm_gram_finish(c->g, root, c->err);
    cpm_gram_seq_free(&c->seq);
    free(c->refs);
    json_decref(doc);
    if (c->rc) {
        cpm_gram_free(c->g);
        return c->rc;
    }
    *ret = c->g;
    return 0;
}

int cpm_json_grammar_schema(const char *schema_text, cpm_gram **ret, cpm_error *err) {
    *ret = NULL;
    int rc = cpm_jschema_check(CPM_JSCHEMA_JSON_SCHEMA, schema_text, 0, err);
    if (rc)
        return rc;
    json_t *doc = json_loads(schema_text, 0, NULL);
    cx c;
    cx_init(&c, err, false);
    c.root = doc;
    int root = c.rc ? -1 : target_rule(&c, doc, 0);
    return cx_finish(&c, doc, root, ret);
}

/* name(kw=value, ...) for one tool. */
static void call_alt(cx *c, int r, json_t *fn) {
    json_t *params = json_object_get(fn, "parameters");
    json_t *props = json_object_get(params, "properties");
    int body = -1;
    if (json_is_object(props) && json_object_size(props) > 0) {
        c->root = params; /* the tool's $refs are local to its parameters */
        body = members(c, props, json_object_get(params, "required"), 0, true);
    }
    lit(c, json_string_value(json_object_get(fn, "name")));
    lit(c, "(");
    if (body >= 0)
        ref(c, body);
    lit(c, ")");
    alt(c, r);
}

int cpm_json_grammar_tools(const char *tools_json, bool single_call, cpm_gram **ret,
                           cpm_error *err) {
    *ret = NULL;
    int rc = cpm_jschema_check(CPM_JSCHEMA_TOOL_CALLS, tools_json, single_call, err);
    if (rc)
        return rc;
    json_t *doc = json_loads(tools_json, 0, NULL);
    cx c;
    cx_init(&c, err, true);
    int call = new_rule(&c);
    size_t i;
    json_t *t;
    json_array_foreach(doc, i, t)
        call_alt(&c, call, json_object_get(t, "function"));
    int calls = new_rule(&c), root = new_rule(&c);
    ref(&c, call);
    alt(&c, calls);
    if (!single_call) {
        ref(&c, call);
        lit(&c, "\n");
        ref(&c, calls);
        alt(&c, calls);
    }
    lit(&c, "<|tool_call_start|>\n```python\n");
    ref(&c, calls);
    lit(&c, "\n```\n<|tool_call_end|>");
    alt(&c, root);
    return cx_finish(&c, doc, root, ret);
}
