/* jschema.c - walks a JSON Schema and refuses what the constrained decoder cannot enforce.
 * Supported: type (one or an array), properties/required/additionalProperties:false, items,
 * minItems/maxItems, enum, const, anyOf, allOf of one, $defs/definitions with local $ref.
 * Refused: anything else that changes validity (pattern, format, minLength, oneOf, ...), so a
 * request never gets output that silently ignores part of its schema. */
#include "services/sampler/jschema.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PATH_MAX_LEN 256
/* Schemas nest at most this deep: the walk recurses, and a worker thread's stack is small. */
#define MAX_DEPTH 32

/* Keywords that only describe: they never change which documents are valid. */
static const char *const descriptive[] = {
    "description", "title", "default", "examples", "$schema", "$id", "$comment", NULL,
};
static const char *const types[] = {
    "object", "array", "string", "number", "integer", "boolean", "null", NULL,
};

static int in_list(const char *const *list, const char *s) {
    for (; *list; list++)
        if (strcmp(*list, s) == 0)
            return 1;
    return 0;
}

static int check_node(json_t *root, json_t *node, const char *path, int depth, cpm_error *err);

static void child_path(char *out, const char *path, const char *a, const char *b) {
    snprintf(out, PATH_MAX_LEN, "%s/%s%s%s", path, a, b ? "/" : "", b ? b : "");
}

static int check_type_name(json_t *v, const char *path, const char *where, cpm_error *err) {
    if (json_is_string(v) && in_list(types, json_string_value(v)))
        return 0;
    return cpm_error_set(err, CPM_EINVAL, "%s/type%s: unknown type", path, where);
}

static int check_type(json_t *t, const char *path, cpm_error *err) {
    char where[24];
    size_t i;
    json_t *v;
    if (!json_is_array(t))
        return check_type_name(t, path, "", err);
    if (json_array_size(t) == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s/type: empty array", path);
    json_array_foreach(t, i, v) {
        snprintf(where, sizeof where, "/%zu", i);
        int rc = check_type_name(v, path, where, err);
        if (rc)
            return rc;
    }
    return 0;
}

/* Each member of an object-valued keyword (properties, $defs) is a schema. */
static int check_map(json_t *root, json_t *map, const char *path, const char *kw, int depth,
                     cpm_error *err) {
    char sub[PATH_MAX_LEN];
    const char *k;
    json_t *v;
    if (!json_is_object(map))
        return cpm_error_set(err, CPM_EINVAL, "%s/%s: must be an object", path, kw);
    json_object_foreach(map, k, v) {
        child_path(sub, path, kw, k);
        int rc = check_node(root, v, sub, depth + 1, err);
        if (rc)
            return rc;
    }
    return 0;
}

static int check_list(json_t *root, json_t *list, const char *path, const char *kw, int depth,
                      cpm_error *err) {
    char sub[PATH_MAX_LEN], idx[24];
    size_t i;
    json_t *v;
    if (!json_is_array(list) || json_array_size(list) == 0)
        return cpm_error_set(err, CPM_EINVAL, "%s/%s: must be a non-empty array", path, kw);
    json_array_foreach(list, i, v) {
        snprintf(idx, sizeof idx, "%zu", i);
        child_path(sub, path, kw, idx);
        int rc = check_node(root, v, sub, depth + 1, err);
        if (rc)
            return rc;
    }
    return 0;
}

/* One segment of a JSON pointer from *p (up to '/' or the end) into out, "~1" as '/', "~0"
 * as '~' and %XX as its byte (a pointer in a URI fragment may be percent-encoded); false
 * when it does not fit or is malformed. */
static int pointer_segment(const char **p, char *out, size_t cap) {
    size_t n = 0;
    const char *s = *p;
    for (; *s && *s != '/'; s++) {
        char ch = *s;
        if (ch == '~') {
            if (s[1] != '0' && s[1] != '1')
                return 0;
            ch = s[1] == '0' ? '~' : '/';
            s++;
        } else if (ch == '%') {
            unsigned v;
            if (!s[1] || !s[2] || sscanf(s + 1, "%2x", &v) != 1 || v == 0)
                return 0;
            ch = (char)v;
            s += 2;
        }
        if (n + 1 >= cap)
            return 0;
        out[n++] = ch;
    }
    out[n] = 0;
    *p = s;
    return 1;
}

json_t *cpm_jschema_resolve(json_t *root, const char *ref) {
    char key[PATH_MAX_LEN], name[PATH_MAX_LEN];
    if (!ref || ref[0] != '#')
        return NULL;
    const char *p = ref + 1;
    json_t *node = root;
    while (node && *p == '/') {
        p++;
        if (!pointer_segment(&p, key, sizeof key))
            return NULL;
        if (strcmp(key, "items") == 0) {
            node = json_object_get(node, key);
            continue;
        }
        int map = !strcmp(key, "properties") || !strcmp(key, "$defs") || !strcmp(key, "definitions");
        int list = !strcmp(key, "anyOf") || !strcmp(key, "allOf");
        if ((!map && !list) || *p != '/')
            return NULL;
        p++;
        if (!pointer_segment(&p, name, sizeof name))
            return NULL;
        json_t *in = json_object_get(node, key);
        if (map) {
            node = json_is_object(in) ? json_object_get(in, name) : NULL;
        } else {
            char *end;
            unsigned long i = strtoul(name, &end, 10);
            node = json_is_array(in) && name[0] >= '0' && name[0] <= '9' && !*end
                       ? json_array_get(in, i) : NULL;
        }
    }
    return !*p && json_is_object(node) ? node : NULL;
}

/* Only local refs ("#", "#/$defs/x", "#/properties/a/items", ...) through the keywords that
 * hold schemas, so the target is a schema this walk checks where it stands: the decoder
 * never fetches anything. */
static int check_ref(json_t *root, json_t *ref, const char *path, cpm_error *err) {
    const char *r = json_string_value(ref);
    if (!cpm_jschema_resolve(root, r))
        return cpm_error_set(err, CPM_EINVAL, "%s/$ref: \"%s\" does not name a schema in this "
                             "document (#/$defs/NAME, #/properties/NAME, ...)", path,
                             r ? r : "(not a string)");
    return 0;
}

static int check_keyword(json_t *root, const char *path, const char *k, json_t *v, int depth,
                         cpm_error *err) {
    if (in_list(descriptive, k))
        return 0;
    if (strcmp(k, "type") == 0)
        return check_type(v, path, err);
    if (strcmp(k, "properties") == 0 || strcmp(k, "$defs") == 0 || strcmp(k, "definitions") == 0)
        return check_map(root, v, path, k, depth, err);
    if (strcmp(k, "items") == 0) {
        char sub[PATH_MAX_LEN];
        child_path(sub, path, k, NULL);
        return check_node(root, v, sub, depth + 1, err);
    }
    if (strcmp(k, "anyOf") == 0)
        return check_list(root, v, path, k, depth, err);
    if (strcmp(k, "allOf") == 0 && json_array_size(v) == 1)
        return check_list(root, v, path, k, depth, err);
    if (strcmp(k, "$ref") == 0)
        return check_ref(root, v, path, err);
    if (strcmp(k, "additionalProperties") == 0 && json_is_false(v))
        return 0;
    if (strcmp(k, "required") == 0 && json_is_array(v))
        return 0;
    if ((strcmp(k, "minItems") == 0 || strcmp(k, "maxItems") == 0) && json_is_integer(v)
        && json_integer_value(v) >= 0)
        return 0;
    if (strcmp(k, "enum") == 0 && json_is_array(v) && json_array_size(v) > 0)
        return 0;
    if (strcmp(k, "const") == 0)
        return 0;
    return cpm_error_set(err, CPM_EINVAL, "%s/%s: not supported by constrained decoding",
                         path, k);
}

static int check_node(json_t *root, json_t *node, const char *path, int depth, cpm_error *err) {
    const char *k;
    json_t *v;
    if (depth > MAX_DEPTH)
        return cpm_error_set(err, CPM_EINVAL, "%s: schemas nested deeper than %d", path, MAX_DEPTH);
    if (json_is_true(node))
        return cpm_error_set(err, CPM_EINVAL, "%s: schema true (anything) is not supported",
                             path[0] ? path : "/");
    if (!json_is_object(node))
        return cpm_error_set(err, CPM_EINVAL, "%s: a schema must be an object", path[0] ? path : "/");
    json_object_foreach(node, k, v) {
        int rc = check_keyword(root, path, k, v, depth, err);
        if (rc)
            return rc;
    }
    return 0;
}

/* A call's keyword: letters, digits and _, not starting with a digit (MiniCPM writes calls
 * as Python, name(kw=value)). */
static int is_keyword(const char *s) {
    if (!s[0] || (s[0] >= '0' && s[0] <= '9'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_'))
            return 0;
    return 1;
}

static int check_keywords(json_t *params, size_t i, cpm_error *err) {
    const char *k;
    json_t *v;
    json_object_foreach(json_object_get(params, "properties"), k, v) {
        if (!is_keyword(k))
            return cpm_error_set(err, CPM_EINVAL, "/%zu/function/parameters/properties/%.64s: not a "
                                 "Python identifier, so a forced call cannot name it", i, k);
    }
    return 0;
}

static int check_tools(json_t *tools, int single_call, cpm_error *err) {
    char path[PATH_MAX_LEN];
    size_t i;
    json_t *t;
    if (!json_is_array(tools) || json_array_size(tools) == 0)
        return cpm_error_set(err, CPM_EINVAL, "tools: must be a non-empty array");
    if (single_call && json_array_size(tools) != 1)
        return cpm_error_set(err, CPM_EINVAL, "tools: a named tool call needs exactly one tool");
    json_array_foreach(tools, i, t) {
        json_t *fn = json_object_get(t, "function");
        if (!json_is_string(json_object_get(fn, "name")))
            return cpm_error_set(err, CPM_EINVAL, "/%zu/function/name: missing", i);
        json_t *params = json_object_get(fn, "parameters");
        snprintf(path, sizeof path, "/%zu/function/parameters", i);
        int rc = params ? check_node(params, params, path, 0, err) : 0;
        if (!rc && params)
            rc = check_keywords(params, i, err);
        if (rc)
            return rc;
    }
    return 0;
}

int cpm_jschema_check(int kind, const char *schema_text, int single_call, cpm_error *err) {
    if (kind == CPM_JSCHEMA_JSON_OBJECT)
        return 0;
    if (kind != CPM_JSCHEMA_JSON_SCHEMA && kind != CPM_JSCHEMA_TOOL_CALLS)
        return cpm_error_set(err, CPM_EINVAL, "constraint kind %d: unknown", kind);
    json_error_t jerr;
    json_t *root = json_loads(schema_text ? schema_text : "", 0, &jerr);
    if (!root)
        return cpm_error_set(err, CPM_EINVAL, "schema: not JSON: %s (line %d)", jerr.text, jerr.line);
    int rc = kind == CPM_JSCHEMA_TOOL_CALLS ? check_tools(root, single_call, err)
                                            : check_node(root, root, "", 0, err);
    json_decref(root);
    return rc;
}
