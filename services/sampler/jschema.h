/* jschema.h - admission check of a constraint's schema text: is it within the JSON Schema
 * subset that OpenAI strict structured outputs supports? The router calls it before any work
 * (a 400), the sampler before compiling. Needs only jansson: no tokenizer, no sampler. */
#ifndef CPM_JSCHEMA_H
#define CPM_JSCHEMA_H

#include <jansson.h>

#include "common/error.h"

/* Same numbers as proto/cpm.proto's ConstraintKind. */
enum {
    CPM_JSCHEMA_JSON_OBJECT = 1,
    CPM_JSCHEMA_JSON_SCHEMA = 2,
    CPM_JSCHEMA_TOOL_CALLS = 3,
};

/* Checks `schema_text` for `kind` (JSON_OBJECT ignores it). For TOOL_CALLS it is a JSON array
 * of OpenAI tools; single_call then requires exactly one tool. Returns 0, or CPM_EINVAL with a
 * message naming the keyword and its JSON pointer ("/properties/a/pattern: not supported"). */
int cpm_jschema_check(int kind, const char *schema_text, int single_call, cpm_error *err);

/* The schema a local $ref names in root: "#", or "#" and a JSON pointer ("~0", "~1" and %XX
 * escapes) whose steps go only through keywords that hold schemas: properties/NAME,
 * $defs/NAME, definitions/NAME, items, anyOf/I, allOf/I ("#/$defs/node",
 * "#/properties/home", as zod-to-json-schema writes a reused sub-schema). NULL when it names
 * anything else or nothing. */
json_t *cpm_jschema_resolve(json_t *root, const char *ref);

#endif
