/* chat.h - renders a conversation into the prompt text each MiniCPM generation was
 * trained on; the router then encodes it with add_special = true (bos comes from
 * the tokenizer, never from the template, as with HF apply_chat_template).
 *
 * The formats are the official chat templates, written as C: MiniCPM-1B/2B
 * "<用户>…<AI>", ChatML for MiniCPM4, and MiniCPM3's ChatML with its tool-calling
 * system prompt (tools as Python signatures) and tool-call replies. Where the
 * template's output depends on Python/Jinja2 behaviour (str.strip(), the title
 * filter, str() of a JSON default) the C code follows Python, since that is what
 * transformers and vLLM run.
 */
#ifndef CPM_CHAT_H
#define CPM_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"

typedef struct cpm_tokenizer cpm_tokenizer;

/* One message. role and content are UTF-8 strings (content NULL = empty).
 * tool_calls_json: NULL or a JSON array of OpenAI-style calls
 * ([{"type":"function","function":{"name":..,"arguments":{..} or "{..}"}}]);
 * thought: NULL or the MiniCPM3 reasoning text of an assistant turn. */
typedef struct cpm_chat_msg {
    const char *role;
    const char *content;
    const char *tool_calls_json;
    const char *thought;
} cpm_chat_msg;

/* Renders n messages for tok's chat family. tools_json: NULL or a JSON array of
 * OpenAI-style tools ({"type":"function","function":{"name","description",
 * "parameters"}}); only the MiniCPM3/ChatML families accept tools.
 * add_generation_prompt appends the assistant header where the format has one.
 * On success *ret_text is malloc'd and NUL-terminated; the caller free()s it. */
int cpm_chat_render(const cpm_tokenizer *tok, const cpm_chat_msg *msgs, size_t n,
                    const char *tools_json, bool add_generation_prompt, char **ret_text,
                    cpm_error *err);

#endif
