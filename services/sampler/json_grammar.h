/* json_grammar.h - what a constrained request's output may be, as a byte grammar.
 *
 * Two sources (proto/cpm.proto's ConstraintKind):
 * - JSON_SCHEMA: JSON that validates against a schema of the strict subset jschema.h
 *   admits (types, properties with required, items with min/maxItems, enum, const,
 *   anyOf, allOf of one, $defs/definitions and local $ref, recursion included);
 * - TOOL_CALLS: MiniCPM's tool-call block (minicpm-spec.md §6.3) calling the given
 *   OpenAI tools, each call `name(kw=value, ...)` whose keywords and values follow the
 *   tool's parameters schema; router/toolcall.c reads it back into OpenAI tool_calls.
 *
 * The text is compact: no whitespace outside strings, properties in the schema's order
 * (required ones always there, optional ones may be left out), so one document has one
 * spelling and the grammar stays small. Schema keywords that only describe are ignored.
 */
#ifndef CPM_JSON_GRAMMAR_H
#define CPM_JSON_GRAMMAR_H

#include <stdbool.h>

#include "common/error.h"
#include "services/sampler/grammar.h"

/* The grammar of JSON documents valid against schema_text. CPM_EINVAL names what cannot be
 * compiled; the caller owns *ret. */
int cpm_json_grammar_schema(const char *schema_text, cpm_gram **ret, cpm_error *err);

/* The grammar of one tool-call block calling the tools of tools_json (an OpenAI tools
 * array): exactly one call when single_call, else one or more, one per line. */
int cpm_json_grammar_tools(const char *tools_json, bool single_call, cpm_gram **ret,
                           cpm_error *err);

#endif
