/* tokenizer.h - text <-> token ids for the MiniCPM family, byte-exact with the
 * Hugging Face tokenizers. The router calls it at the door (prompt -> ids) and on
 * the way out (ids -> streamed text, see detok.h); chat.h renders chat prompts.
 *
 * Example:
 *     cpm_tokenizer *tok;
 *     cpm_error err;
 *     if (cpm_tokenizer_load("models/minicpm4-8b", &tok, &err) < 0) { ... err.msg ... }
 *     int32_t *ids; size_t n;
 *     cpm_tokenizer_encode(tok, "Hello", 5, true, &ids, &n, &err);   // bos, "▁Hello"
 *     free(ids);
 *     cpm_tokenizer_free(tok);
 *
 * Two file formats load into the same object: tokenizer.json (HF "BPE" model with
 * merge ranks) and tokenizer.model (SentencePiece BPE: merges by piece score,
 * user-defined pieces kept whole). Either way the text is split on added/special
 * tokens first, every remaining segment gets the "▁" prefix and " " -> "▁" (the HF
 * Llama "legacy" normalizer), and characters outside the vocabulary fall back to
 * <0xNN> byte pieces.
 *
 * Invalid UTF-8 in text is rejected (CPM_EINVAL, with the byte offset) rather than
 * replaced: the HF reference cannot represent it, and silently changing a prompt
 * would hide a client bug. A loaded tokenizer is immutable: any number of threads
 * may encode/decode with it at once.
 */
#ifndef CPM_TOKENIZER_H
#define CPM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct cpm_tokenizer cpm_tokenizer;

/* Which chat prompt format a model was trained with (chat.h renders them). */
typedef enum cpm_chat_family {
    CPM_CHAT_MINICPM2 = 0, /* MiniCPM-1B/2B/S/MoE: "<用户>question<AI>answer" */
    CPM_CHAT_CHATML,       /* MiniCPM4: "<|im_start|>role\n...<|im_end|>\n" */
    CPM_CHAT_MINICPM3,     /* MiniCPM3: ChatML plus its tool-calling system prompt */
} cpm_chat_family;

/* Upper bound on one encode/decode input, so a client cannot make the library
 * allocate without limit (the router enforces its own, smaller, prompt limits). */
#define CPM_TOKENIZER_MAX_TEXT (256u << 20)

/* Loads the tokenizer of a model directory: tokenizer.json if present, else
 * tokenizer.model; then tokenizer_config.json (bos/eos, add_bos_token, added
 * tokens, chat template family), added_tokens.json, generation_config.json and
 * config.json (stop ids) when present. On success *ret is owned by the caller
 * (cpm_tokenizer_free). */
int cpm_tokenizer_load(const char *dir, cpm_tokenizer **ret, cpm_error *err);

/* Loads from one file image already in memory (fuzzing, tests): is_json selects
 * tokenizer.json vs tokenizer.model; no config files are read, so bos/eos come
 * from the file alone. `name` is only used in error messages. */
int cpm_tokenizer_load_mem(const void *data, size_t len, bool is_json,
                           const char *name, cpm_tokenizer **ret, cpm_error *err);

/* Frees a tokenizer; NULL is a no-op. */
void cpm_tokenizer_free(cpm_tokenizer *tok);

/* Encodes len bytes of UTF-8 text (NULs allowed). add_special adds what the HF
 * tokenizer's encode() adds by default: bos (and eos if the config says so).
 * Special tokens written in the text ("<|im_start|>", "<s>") always become their
 * ids. On success *ret_ids is a malloc'd array of *ret_n ids the caller free()s
 * (non-NULL even when *ret_n is 0). */
int cpm_tokenizer_encode(const cpm_tokenizer *tok, const char *text, size_t len,
                         bool add_special, int32_t **ret_ids, size_t *ret_n,
                         cpm_error *err);

/* Decodes ids to text as the HF tokenizer's decode() does ("▁" -> " ", byte
 * pieces joined into UTF-8, invalid byte runs -> one U+FFFD per byte, one leading
 * space dropped). skip_special drops special tokens (bos, eos, <|im_end|>...).
 * An id outside [0, vocab size) is an error (CPM_ERANGE, naming its index).
 * *ret_text is malloc'd, NUL-terminated, *ret_len bytes long (ret_len may be
 * NULL); the caller free()s it. */
int cpm_tokenizer_decode(const cpm_tokenizer *tok, const int32_t *ids, size_t n,
                         bool skip_special, char **ret_text, size_t *ret_len,
                         cpm_error *err);

/* --- information --- */

/* Number of ids, added tokens included (73448 for MiniCPM3/4). */
int32_t cpm_tokenizer_vocab_size(const cpm_tokenizer *tok);
/* bos/eos ids, -1 when the tokenizer has none. */
int32_t cpm_tokenizer_bos_id(const cpm_tokenizer *tok);
int32_t cpm_tokenizer_eos_id(const cpm_tokenizer *tok);
/* Whether encode(add_special = true) prepends bos. */
bool cpm_tokenizer_add_bos(const cpm_tokenizer *tok);
/* Ids that end generation (generation_config eos ids, else config.json's, plus
 * the tokenizer's eos). *ret_ids is borrowed from tok. */
size_t cpm_tokenizer_stop_ids(const cpm_tokenizer *tok, const int32_t **ret_ids);
bool cpm_tokenizer_is_stop(const cpm_tokenizer *tok, int32_t id);
/* Whether id is a special token (skipped by decode with skip_special). */
bool cpm_tokenizer_is_special(const cpm_tokenizer *tok, int32_t id);
/* The vocabulary string of an id ("▁Hello", "<0x0A>", "<|im_end|>"), borrowed
 * from tok; NULL when id is out of range. *ret_len (may be NULL) gets its length. */
const char *cpm_tokenizer_id_to_piece(const cpm_tokenizer *tok, int32_t id, size_t *ret_len);
/* The bytes id adds to a decoded text in the middle of it (SentencePiece "▁" as a space,
 * a byte-fallback piece as its byte), written to out (up to cap); returns their count,
 * 0 for a special token or an id out of range, or -1 when cap is too small. For a
 * grammar that must know what each token writes. */
int cpm_tokenizer_token_bytes(const cpm_tokenizer *tok, int32_t id, char *out, size_t cap);
/* The id of an exact vocabulary string (model pieces and added tokens), -1 if none. */
int32_t cpm_tokenizer_piece_to_id(const cpm_tokenizer *tok, const char *piece, size_t len);
/* The chat format of the model (from config.json's model_type, the chat
 * template in tokenizer_config.json, or the vocabulary). */
cpm_chat_family cpm_tokenizer_chat_family(const cpm_tokenizer *tok);
/* Overrides the detected chat family (a model directory without its configs). */
void cpm_tokenizer_set_chat_family(cpm_tokenizer *tok, cpm_chat_family family);

#include "services/tokenizer/detok.h"
#include "services/tokenizer/chat.h"

#endif
