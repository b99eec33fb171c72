/* chat.c - chat prompt rendering per model family (see chat.h). The MiniCPM3
 * tool section follows the official Jinja template step by step (macros
 * json_to_python_type, object_to_fields, tool_parser), including what Jinja2 does
 * with missing fields (an undefined value prints as "" and iterates as empty).
 */
#include <jansson.h>
#include <string.h>

#include "services/tokenizer/pyfmt.h"
#include "services/tokenizer/tok_internal.h"

#define SCHEMA_MAX_DEPTH 32

static const char TOOLS_HEADER[] =
    "\n# Functions\nHere is a list of functions that you can invoke:\n```python\n"
    "from enum import Enum\nfrom typing import List, Dict, Optional\n"
    "from pydantic import BaseModel, Field\n\n";

static const char TOOLS_RULES[] =
    "\n```\n\n# Function Call Rule and Output Format\n"
    "- If the user's question can be answered without calling any function, please answer the "
    "user's question directly. In this situation, you should return your thought and answer the "
    "user's question directly.\n"
    "- If the user cannot be answered without calling any function, and the user does not provide "
    "enough information to call functions, please ask the user for more information. In this "
    "situation, you should return your thought and ask the user for more information.\n"
    "- If the user's question cannot be answered without calling any function, and the user has "
    "provided enough information to call functions to solve it, you should call the functions. In "
    "this situation, the assistant should return your thought and call the functions.\n"
    "- Use default parameters unless the user has specified otherwise.\n"
    "- You should answer in the following format:\n\n<|thought_start|>\n"
    "{explain why the user's question can be answered without calling a function or why you should "
    "ask the user for more information or why you should call one or more functions and your plan to "
    "solve the user's question.}\n<|thought_end|>\n<|tool_call_start|>\n```python\n"
    "func1(params_name=params_value, params_name2=params_value2...)\nfunc2(params)\n```\n"
    "<|tool_call_end|>\n{answer the user's question directly or ask the user for more information}";

typedef struct render {
    cpm_strbuf out;
    int rc;
    cpm_error *err;
} render;

static void put(render *r, const char *s) {
    if (r->rc == 0 && s)
        r->rc = cpm_strbuf_adds(&r->out, s);
}

static void put_buf(render *r, const cpm_strbuf *b) {
    if (r->rc == 0 && b->oom)
        r->rc = cpm_error_set(r->err, CPM_ENOMEM, "chat: out of memory");
    if (r->rc == 0 && b->len)
        r->rc = cpm_strbuf_add(&r->out, b->p, b->len);
}

static int fail(render *r, int code, const char *what) {
    if (r->rc == 0)
        r->rc = cpm_error_set(r->err, code, "chat: %s", what);
    return r->rc;
}

/* --- Jinja2 value semantics over JSON (NULL = undefined) --- */

static json_t *attr(const json_t *v, const char *key) {
    return json_is_object(v) ? json_object_get(v, key) : NULL;
}

static bool truthy(const json_t *v) {
    switch (v ? json_typeof(v) : JSON_NULL) {
    case JSON_TRUE:
        return true;
    case JSON_INTEGER:
        return json_integer_value(v) != 0;
    case JSON_REAL:
        return json_real_value(v) != 0.0;
    case JSON_STRING:
        return json_string_length(v) > 0;
    case JSON_ARRAY:
        return json_array_size(v) > 0;
    case JSON_OBJECT:
        return json_object_size(v) > 0;
    default:
        return false;
    }
}

static bool str_eq(const json_t *v, const char *s) {
    return json_is_string(v) && strcmp(json_string_value(v), s) == 0;
}

/* `name in required`: list membership; a string tests for a substring. */
static bool required_has(const json_t *required, const char *name) {
    if (json_is_string(required))
        return strstr(json_string_value(required), name) != NULL;
    size_t i;
    json_t *v;
    json_array_foreach(required, i, v) if (str_eq(v, name)) return true;
    return false;
}

/* --- the MiniCPM3 tool macros --- */

static int py_type(render *r, cpm_strbuf *f, const char *name, const json_t *spec, int depth);

/* The `Union[...]` branch: the template iterates over the type value. */
static int py_type_union(render *r, cpm_strbuf *f, const char *name, const json_t *type, int depth) {
    cpm_strbuf_adds(f, "Union[");
    size_t n = json_is_array(type) ? json_array_size(type) : json_is_string(type) ? json_string_length(type)
                                                                                : 0;
    if (json_is_object(type) && json_object_size(type) > 0)
        return fail(r, CPM_EUNSUPPORTED, "tools: a schema \"type\" that is an object");
    for (size_t i = 0; i < n && r->rc == 0; i++) {
        json_t *t = json_is_array(type) ? json_incref(json_array_get(type, i))
                                        : json_stringn(json_string_value(type) + i, 1);
        json_t *sub = json_pack("{sO}", "type", t);
        json_decref(t);
        if (!sub)
            return fail(r, CPM_ENOMEM, "out of memory");
        if (i)
            cpm_strbuf_adds(f, ", ");
        py_type(r, f, name, sub, depth + 1);
        json_decref(sub);
    }
    return cpm_strbuf_adds(f, "]");
}

/* json_to_python_type(param_name, json_spec) */
static int py_type(render *r, cpm_strbuf *f, const char *name, const json_t *spec, int depth) {
    static const char *const map[][2] = {
        {"string", "str"}, {"number", "float"}, {"integer", "int"}, {"boolean", "bool"}, {"null", "None"}};
    if (depth > SCHEMA_MAX_DEPTH)
        return fail(r, CPM_EUNSUPPORTED, "tools: parameter schema too deep, or a type the template loops on");
    if (r->rc)
        return r->rc;
    json_t *type = attr(spec, "type");
    if (truthy(attr(spec, "enum")))
        return cpm_pyfmt_title(f, name);
    for (size_t i = 0; json_is_string(type) && i < sizeof map / sizeof map[0]; i++)
        if (str_eq(type, map[i][0]))
            return cpm_strbuf_adds(f, map[i][1]);
    if (str_eq(type, "array")) {
        cpm_strbuf_adds(f, "List[");
        py_type(r, f, name, attr(spec, "items"), depth + 1);
        return cpm_strbuf_adds(f, "]");
    }
    if (str_eq(type, "object")) {
        if (truthy(attr(spec, "properties")))
            return cpm_pyfmt_title(f, name);
        json_t *extra = attr(spec, "additionalProperties");
        cpm_strbuf_adds(f, "Dict[str, ");
        /* The fallback 'Any' is a string, whose .type is undefined: "Union[]". */
        py_type(r, f, name, truthy(extra) ? extra : NULL, depth + 1);
        return cpm_strbuf_adds(f, "]");
    }
    if (!type || json_is_array(type) || json_is_string(type) || json_is_object(type))
        return py_type_union(r, f, name, type, depth);
    return cpm_strbuf_adds(f, "Any");
}

/* param_default: tojson for strings, str() for other values, 'None' if absent. */
static void param_default(cpm_strbuf *f, const json_t *fields) {
    json_t *def = attr(fields, "default");
    if (json_is_string(def))
        cpm_pyfmt_tojson(f, def);
    else if (def)
        cpm_pyfmt_str(f, def);
    else
        cpm_strbuf_adds(f, "None");
}

static void properties_error(render *r, const json_t *props) {
    if (props && !json_is_object(props) && !json_is_null(props))
        fail(r, CPM_EINVAL, "tools: \"properties\" is not an object");
}

static int object_fields(render *r, const json_t *spec, const char *indent, const char *caller, int depth);

static void nested_class(render *r, const char *name, const json_t *spec, int depth) {
    cpm_strbuf head = {0};
    cpm_strbuf_adds(&head, "\n\nclass ");
    cpm_pyfmt_title(&head, name);
    cpm_strbuf_adds(&head, "(BaseModel):\n");
    object_fields(r, spec, "    ", head.p, depth + 1);
    cpm_strbuf_release(&head);
}

static void enum_class(render *r, const char *name, const json_t *options) {
    if (!json_is_array(options)) {
        fail(r, CPM_EUNSUPPORTED, "tools: \"enum\" is not a list");
        return;
    }
    cpm_strbuf b = {0};
    cpm_strbuf_adds(&b, "\n\nclass ");
    cpm_pyfmt_title(&b, name);
    cpm_strbuf_adds(&b, "(Enum):\n");
    size_t i;
    json_t *opt;
    json_array_foreach(options, i, opt) {
        cpm_strbuf_addf(&b, "    enum_%zu = ", i);
        cpm_pyfmt_tojson(&b, opt);
        cpm_strbuf_adds(&b, "\n");
    }
    put_buf(r, &b);
    cpm_strbuf_release(&b);
}

/* One "name: type = default" line of object_to_fields. */
static void field_line(cpm_strbuf *f, const char *indent, const char *name, const json_t *fields,
                       bool req, render *r, int depth) {
    cpm_strbuf_adds(f, indent);
    cpm_strbuf_adds(f, name);
    cpm_strbuf_adds(f, ": ");
    cpm_strbuf_adds(f, req ? "" : "Optional[");
    py_type(r, f, name, fields, depth + 1);
    cpm_strbuf_adds(f, req ? "" : "]");
    json_t *title = attr(fields, "title"), *desc = attr(fields, "description"), *pat = attr(fields, "pattern");
    if (!truthy(title) && !truthy(desc) && !truthy(pat)) {
        if (!req) {
            cpm_strbuf_adds(f, " = ");
            param_default(f, fields);
        }
    } else {
        cpm_strbuf_adds(f, req ? " = Field(..." : " = Field(");
        if (!req)
            param_default(f, fields);
        const char *labels[] = {", description=", ", regex=", ", title="};
        const json_t *vals[] = {desc, pat, title};
        for (int k = 0; k < 3; k++)
            if (truthy(vals[k])) {
                cpm_strbuf_adds(f, labels[k]);
                cpm_pyfmt_tojson(f, vals[k]);
            }
        cpm_strbuf_adds(f, ")");
    }
    cpm_strbuf_adds(f, "\n");
}

/* object_to_fields(json_spec, field_indent) with caller() = caller: nested
 * classes go out first, then the caller text and the field lines. */
static int object_fields(render *r, const json_t *spec, const char *indent, const char *caller, int depth) {
    if (depth > SCHEMA_MAX_DEPTH)
        return fail(r, CPM_EUNSUPPORTED, "tools: parameter schema too deep");
    if (!caller)
        return fail(r, CPM_ENOMEM, "out of memory");
    cpm_strbuf f = {0};
    cpm_strbuf_adds(&f, caller);
    json_t *props = attr(spec, "properties");
    properties_error(r, props);
    const char *name;
    json_t *fields;
    json_object_foreach(json_is_object(props) ? props : NULL, name, fields) {
        json_t *type = attr(fields, "type"), *items = attr(fields, "items");
        if (truthy(attr(fields, "enum")))
            enum_class(r, name, attr(fields, "enum"));
        else if (str_eq(type, "object") && truthy(attr(fields, "properties")))
            nested_class(r, name, fields, depth);
        else if (str_eq(type, "array") && truthy(items) && str_eq(attr(items, "type"), "object") &&
                 truthy(attr(items, "properties")))
            nested_class(r, name, items, depth);
        field_line(&f, indent, name, fields, required_has(attr(spec, "required"), name), r, depth);
    }
    put_buf(r, &f);
    cpm_strbuf_release(&f);
    return r->rc;
}

/* The caller block of tool_parser: "def name(a, b=None):" and the docstring head. */
static void def_line(cpm_strbuf *c, const json_t *tool, const char *fname, const json_t *params) {
    cpm_strbuf_adds(c, "\n\ndef ");
    cpm_strbuf_adds(c, fname);
    cpm_strbuf_adds(c, "(");
    const char *name;
    json_t *fields;
    size_t i = 0;
    json_t *props = attr(params, "properties");
    json_object_foreach(truthy(params) && json_is_object(props) ? props : NULL, name, fields) {
        cpm_strbuf_adds(c, i++ ? ", " : "");
        cpm_strbuf_adds(c, name);
        if (!required_has(attr(params, "required"), name)) {
            cpm_strbuf_adds(c, "=");
            param_default(c, fields);
        }
    }
    cpm_strbuf_adds(c, "):\n    \"\"\"");
    json_t *desc = attr(tool, "description");
    if (json_is_string(desc))
        cpm_strbuf_adds(c, json_string_value(desc));
    else if (desc && !json_is_null(desc))
        cpm_pyfmt_str(c, desc);
    else if (json_is_null(desc))
        cpm_strbuf_adds(c, "None");
    cpm_strbuf_adds(c, truthy(params) ? "\n\n    Args:\n" : "\n");
}

static int tool_parser(render *r, const json_t *tools) {
    size_t i;
    json_t *tool;
    json_array_foreach(tools, i, tool) {
        json_t *type = attr(tool, "type");
        if (type && !str_eq(type, "function"))
            continue;
        if (attr(tool, "function"))
            tool = attr(tool, "function");
        json_t *name = attr(tool, "name");
        if (!json_is_string(name))
            return fail(r, CPM_EINVAL, "tools: a function without a \"name\" string");
        json_t *params = attr(tool, "parameters");
        cpm_strbuf caller = {0};
        def_line(&caller, tool, json_string_value(name), params);
        object_fields(r, params, "        ", caller.p, 0);
        cpm_strbuf_release(&caller);
        put(r, "    \"\"\"\n");
    }
    return r->rc;
}

/* --- messages --- */

static const char *str_or_empty(const char *s) {
    return s ? s : "";
}

/* tool_calls of one assistant message, arguments as objects (OpenAI sends them
 * as JSON text; the template iterates them as a mapping). */
static void tool_calls(render *r, json_t *calls) {
    size_t i;
    json_t *call;
    json_array_foreach(calls, i, call) {
        if (attr(call, "function"))
            call = attr(call, "function");
        json_t *name = attr(call, "name"), *args = attr(call, "arguments"), *parsed = NULL;
        if (!json_is_string(name)) {
            fail(r, CPM_EINVAL, "tool_calls: a call without a \"name\" string");
            return;
        }
        if (json_is_string(args)) {
            args = parsed = json_loads(json_string_value(args), 0, NULL);
            if (!json_is_object(args)) {
                json_decref(parsed);
                fail(r, CPM_EINVAL, "tool_calls: \"arguments\" is not a JSON object");
                return;
            }
        }
        put(r, json_string_value(name));
        put(r, "(");
        const char *key;
        json_t *val;
        size_t k = 0, n = json_is_object(args) ? json_object_size(args) : 0;
        json_object_foreach(n ? args : NULL, key, val) {
            cpm_strbuf v = {0};
            cpm_pyfmt_tojson(&v, val);
            put(r, key);
            put(r, "=");
            put_buf(r, &v);
            put(r, ++k < n ? "," : "");
            cpm_strbuf_release(&v);
        }
        put(r, ")\n");
        json_decref(parsed);
    }
}

static void minicpm3_message(render *r, const cpm_chat_msg *m) {
    const char *content = str_or_empty(m->content);
    bool assistant = m->role && strcmp(m->role, "assistant") == 0;
    json_t *calls = NULL;
    if (assistant && m->tool_calls_json) {
        calls = json_loads(m->tool_calls_json, 0, NULL);
        if (!json_is_array(calls)) {
            json_decref(calls);
            fail(r, CPM_EINVAL, "tool_calls_json is not a JSON array");
            return;
        }
    }
    bool thought = m->thought && *m->thought;
    if (truthy(calls)) {
        put(r, "<|im_start|>assistant\n");
        if (thought) {
            put(r, "<|thought_start|>\n");
            put(r, m->thought);
            put(r, "\n<|thought_end|>\n");
        }
        put(r, "<|tool_call_start|>\n```python\n");
        tool_calls(r, calls);
        put(r, "```\n<|tool_call_end|>\n");
        if (*content && strncmp(content, "<|tool_call_start|>", 19) != 0)
            put(r, content);
        put(r, "<|im_end|>\n");
    } else if (assistant && thought) {
        put(r, "<|im_start|>assistant\n<|thought_start|>\n");
        put(r, m->thought);
        put(r, "\n<|thought_end|>\n");
        put(r, content);
        put(r, "<|im_end|>\n");
    } else {
        put(r, "<|im_start|>");
        put(r, m->role);
        put(r, "\n");
        put(r, content);
        put(r, "<|im_end|>\n");
    }
    json_decref(calls);
}

static void render_minicpm3(render *r, const cpm_chat_msg *msgs, size_t n, const json_t *tools) {
    if (n == 0) {
        fail(r, CPM_EINVAL, "no messages");
        return;
    }
    const char *system = "";
    size_t first = 0;
    if (strcmp(msgs[0].role, "system") == 0) {
        system = str_or_empty(msgs[0].content);
        first = 1;
    }
    bool head = *system || truthy(tools);
    if (head) {
        put(r, "<|im_start|>system\n");
        put(r, system);
    }
    if (truthy(tools)) {
        put(r, TOOLS_HEADER);
        tool_parser(r, tools);
        put(r, TOOLS_RULES);
    }
    if (head)
        put(r, "<|im_end|>\n");
    for (size_t i = first; i < n && r->rc == 0; i++)
        minicpm3_message(r, &msgs[i]);
}

static void render_chatml(render *r, const cpm_chat_msg *msgs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        put(r, "<|im_start|>");
        put(r, msgs[i].role);
        put(r, "\n");
        put(r, str_or_empty(msgs[i].content));
        put(r, "<|im_end|>\n");
    }
}

/* "<用户>" + content.strip() + "<AI>" for users; other turns stripped, bare. */
static void render_minicpm2(render *r, const cpm_chat_msg *msgs, size_t n) {
    for (size_t i = 0; i < n && r->rc == 0; i++) {
        const char *c = str_or_empty(msgs[i].content);
        size_t a, b;
        cpm_pyfmt_strip(c, strlen(c), &a, &b);
        bool user = strcmp(msgs[i].role, "user") == 0;
        if (user)
            put(r, "<\xe7\x94\xa8\xe6\x88\xb7>");
        if (r->rc == 0)
            r->rc = cpm_strbuf_add(&r->out, c + a, b - a);
        if (user)
            put(r, "<AI>");
    }
}

/* A conversation that called tools (or kept a thought) is in MiniCPM3's format even
 * when this request lists no tools: plain ChatML would drop the calls. */
static bool has_tool_turns(const cpm_chat_msg *msgs, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((msgs[i].tool_calls_json && *msgs[i].tool_calls_json) || (msgs[i].thought && *msgs[i].thought))
            return true;
    return false;
}

int cpm_chat_render(const cpm_tokenizer *tok, const cpm_chat_msg *msgs, size_t n, const char *tools_json,
                    bool add_generation_prompt, char **ret_text, cpm_error *err) {
    *ret_text = NULL;
    render r = {{0}, 0, err};
    for (size_t i = 0; i < n; i++)
        if (!msgs[i].role)
            return cpm_error_set(err, CPM_EINVAL, "chat: message %zu has no role", i);
    json_t *tools = NULL;
    if (tools_json) {
        json_error_t jerr;
        tools = json_loads(tools_json, 0, &jerr);
        if (!json_is_array(tools)) {
            json_decref(tools);
            return cpm_error_set(err, CPM_EINVAL, "chat: tools: not a JSON array (%s)", jerr.text);
        }
    }
    cpm_chat_family family = cpm_tokenizer_chat_family(tok);
    if (truthy(tools) && family == CPM_CHAT_MINICPM2)
        fail(&r, CPM_EUNSUPPORTED, "tools: MiniCPM-1B/2B have no tool-calling format");
    else if (family == CPM_CHAT_MINICPM2 && has_tool_turns(msgs, n))
        fail(&r, CPM_EUNSUPPORTED, "messages: tool_calls and reasoning_content: MiniCPM-1B/2B have "
                                   "no tool-calling format");
    else if (family == CPM_CHAT_MINICPM2)
        render_minicpm2(&r, msgs, n);
    else if (family == CPM_CHAT_MINICPM3 || truthy(tools) || has_tool_turns(msgs, n))
        render_minicpm3(&r, msgs, n, tools);
    else
        render_chatml(&r, msgs, n);
    /* The 1B/2B user turn already ends in "<AI>": that format has no header. */
    if (add_generation_prompt && family != CPM_CHAT_MINICPM2)
        put(&r, "<|im_start|>assistant\n");
    json_decref(tools);
    if (r.rc == 0 && !(*ret_text = cpm_strbuf_take(&r.out, NULL)))
        r.rc = cpm_error_set(err, CPM_ENOMEM, "chat: out of memory");
    if (r.rc == CPM_ENOMEM && err && err->code != CPM_ENOMEM)
        cpm_error_set(err, CPM_ENOMEM, "chat: out of memory");
    cpm_strbuf_release(&r.out);
    return r.rc;
}
