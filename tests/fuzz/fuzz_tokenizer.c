/* fuzz_tokenizer.c - fuzz target for the tokenizer library: the first input byte
 * picks what the rest is fed to:
 *   0 text to encode with both real vocabularies (then decode + stream it back),
 *   1 ids (int32 LE) to decode and stream, in and out of range,
 *   2 a tokenizer.json image to load (then encode with it),
 *   3 a tokenizer.model image to load (then encode with it),
 *   4 a tools JSON array and a message to render as a MiniCPM3 chat prompt.
 * Any crash, sanitizer report or stream/decode disagreement (abort) is a bug.
 * The real vocabularies load once, from CPM_SOURCE_ROOT/assets/tokenizers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static cpm_tokenizer *vocab[2];

static void load_vocabs(void) {
    static const char *dirs[2] = {CPM_SOURCE_ROOT "/assets/tokenizers/minicpm3",
                                  CPM_SOURCE_ROOT "/assets/tokenizers/minicpm-2b"};
    for (int i = 0; i < 2; i++) {
        cpm_error err;
        if (!vocab[i] && cpm_tokenizer_load(dirs[i], &vocab[i], &err) < 0)
            abort(); /* the harness itself is broken, not the input */
    }
}

/* Streams ids and aborts unless the pieces add up to the one-shot decode. */
static void check_stream(const cpm_tokenizer *tok, const int32_t *ids, size_t n, bool skip) {
    cpm_error err;
    char *want;
    size_t want_len;
    int rc = cpm_tokenizer_decode(tok, ids, n, skip, &want, &want_len, &err);
    cpm_detok *d = cpm_detok_new(tok, skip);
    if (!d)
        abort();
    size_t got = 0;
    bool range_error = false;
    for (size_t i = 0; i <= n; i++) {
        const char *piece;
        size_t len;
        int prc = i < n ? cpm_detok_push(d, ids[i], &piece, &len, &err) : cpm_detok_flush(d, &piece, &len, &err);
        if (prc == CPM_ERANGE) {
            range_error = true;
            continue;
        }
        if (prc < 0 || (rc == 0 && (got + len > want_len || memcmp(want + got, piece, len) != 0)))
            abort();
        got += len;
    }
    if (rc == 0 && (range_error || got != want_len))
        abort();
    if (rc != 0 && (rc != CPM_ERANGE || !range_error))
        abort();
    if (rc == 0)
        free(want);
    cpm_detok_free(d);
}

static void encode_roundtrip(const cpm_tokenizer *tok, const char *text, size_t len) {
    int32_t *ids;
    size_t n;
    cpm_error err;
    if (cpm_tokenizer_encode(tok, text, len, true, &ids, &n, &err) == 0) {
        check_stream(tok, ids, n, false);
        check_stream(tok, ids, n, true);
        free(ids);
    }
}

static void fuzz_ids(const uint8_t *data, size_t size, bool skip) {
    size_t n = size / 4;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids)
        return;
    for (int v = 0; v < 2; v++) {
        int32_t vs = cpm_tokenizer_vocab_size(vocab[v]);
        for (size_t i = 0; i < n; i++) {
            uint32_t x = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 |
                         (uint32_t)data[4 * i + 3] << 24;
            /* Mostly valid ids, byte pieces often, and now and then out of range. */
            ids[i] = (x >> 30) == 3 ? (int32_t)x : (x >> 30) == 2 ? 1089 + (int32_t)(x % 256) : (int32_t)(x % (uint32_t)vs);
        }
        check_stream(vocab[v], ids, n, skip);
    }
    free(ids);
}

static void fuzz_load(const uint8_t *data, size_t size, bool is_json) {
    cpm_tokenizer *tok;
    cpm_error err;
    if (cpm_tokenizer_load_mem(data, size, is_json, "fuzz", &tok, &err) == 0) {
        static const char text[] = "Hello <s> w\xc3\xb6rld \xe4\xbd\xa0\xe5\xa5\xbd</s>  ...";
        encode_roundtrip(tok, text, sizeof text - 1);
        cpm_tokenizer_free(tok);
    }
}

static void fuzz_chat(const uint8_t *data, size_t size) {
    char *tools = malloc(size + 1);
    if (!tools)
        return;
    memcpy(tools, data, size);
    tools[size] = '\0';
    cpm_chat_msg m[] = {{"system", "sys", NULL, NULL}, {"assistant", "", tools, "t"}, {"user", "q", NULL, NULL}};
    char *text;
    cpm_error err;
    cpm_tokenizer_set_chat_family(vocab[0], CPM_CHAT_MINICPM3);
    if (cpm_chat_render(vocab[0], m, 3, tools, true, &text, &err) == 0)
        free(text);
    free(tools);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0)
        return 0;
    load_vocabs();
    const uint8_t *rest = data + 1;
    size_t n = size - 1;
    switch (data[0] % 5) {
    case 0:
        encode_roundtrip(vocab[0], (const char *)rest, n);
        encode_roundtrip(vocab[1], (const char *)rest, n);
        break;
    case 1:
        fuzz_ids(rest, n, (data[0] / 5) & 1); /* the mode byte's spare bits */
        break;
    case 2:
        fuzz_load(rest, n, true);
        break;
    case 3:
        fuzz_load(rest, n, false);
        break;
    default:
        fuzz_chat(rest, n);
        break;
    }
    return 0;
}
