/* test_tokenizer.c - unit tests of services/tokenizer: known encodings of the real
 * MiniCPM vocabularies, config handling, bad input (invalid UTF-8, ids out of
 * range, corrupt files), streaming edge cases and chat rendering details that
 * depend on Python semantics. The corpus-wide parity checks live in tests/tokenizer/.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "services/tokenizer/tokenizer.h"

#define M3_DIR CPM_SOURCE_ROOT "/assets/tokenizers/minicpm3"
#define M2_DIR CPM_SOURCE_ROOT "/assets/tokenizers/minicpm-2b"
#define GOLDEN_DIR CPM_SOURCE_ROOT "/tests/tokenizer/data/minicpm4-golden"

static cpm_tokenizer *load(const char *dir) {
    cpm_tokenizer *tok = NULL;
    cpm_error err = {0};
    int rc = cpm_tokenizer_load(dir, &tok, &err);
    if (rc != 0)
        print_error("load %s: %s\n", dir, err.msg);
    assert_int_equal(rc, 0);
    return tok;
}

static char *read_all(const char *path, size_t *ret_len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    *ret_len = (size_t)n;
    return buf;
}

static void expect_ids(const cpm_tokenizer *tok, const char *text, size_t len, bool special,
                       const int32_t *want, size_t n_want) {
    int32_t *ids;
    size_t n;
    cpm_error err = {0};
    assert_int_equal(cpm_tokenizer_encode(tok, text, len, special, &ids, &n, &err), 0);
    assert_non_null(ids);
    assert_int_equal(n, n_want);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(ids[i], want[i]);
    free(ids);
}

/* A model directory like the ones the cluster serves: the MiniCPM3/4 tokenizer
 * files next to the golden checkpoint's config.json and generation_config.json. */
static void make_model_dir(char *dir) {
    strcpy(dir, "/tmp/cpm-tok-test-XXXXXX");
    assert_non_null(mkdtemp(dir));
    const char *from_assets[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                 "added_tokens.json", "special_tokens_map.json"};
    const char *from_golden[] = {"config.json", "generation_config.json"};
    char src[1024], dst[1024];
    for (size_t i = 0; i < 5; i++) {
        snprintf(src, sizeof src, "%s/%s", M3_DIR, from_assets[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, from_assets[i]);
        assert_int_equal(symlink(src, dst), 0);
    }
    for (size_t i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/%s", GOLDEN_DIR, from_golden[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, from_golden[i]);
        assert_int_equal(symlink(src, dst), 0);
    }
}

static void remove_model_dir(const char *dir) {
    const char *files[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                           "special_tokens_map.json", "config.json", "generation_config.json"};
    char path[1024];
    for (size_t i = 0; i < 7; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static void test_golden_prompt(void **state) {
    (void)state;
    char dir[64];
    make_model_dir(dir);
    cpm_tokenizer *tok = load(dir);
    size_t plen, ilen;
    char *prompt = read_all(GOLDEN_DIR "/prompt.txt", &plen);
    char *idtext = read_all(GOLDEN_DIR "/ids.txt", &ilen);
    int32_t want[64];
    size_t n_want = 0;
    for (char *p = idtext, *end; n_want < 64; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        want[n_want++] = (int32_t)v;
    }
    assert_int_equal(n_want, 21);
    expect_ids(tok, prompt, plen, true, want, n_want);

    assert_int_equal(cpm_tokenizer_vocab_size(tok), 73448);
    assert_int_equal(cpm_tokenizer_bos_id(tok), 1);
    assert_int_equal(cpm_tokenizer_eos_id(tok), 73440);
    assert_true(cpm_tokenizer_add_bos(tok));
    const int32_t *stops;
    assert_int_equal(cpm_tokenizer_stop_ids(tok, &stops), 2);
    assert_true(cpm_tokenizer_is_stop(tok, 2));
    assert_true(cpm_tokenizer_is_stop(tok, 73440));
    assert_false(cpm_tokenizer_is_stop(tok, 1));
    assert_int_equal(cpm_tokenizer_chat_family(tok), CPM_CHAT_CHATML);
    assert_true(cpm_tokenizer_is_special(tok, 73441));
    assert_false(cpm_tokenizer_is_special(tok, 5));
    size_t len;
    assert_string_equal(cpm_tokenizer_id_to_piece(tok, 73441, &len), "<|im_start|>");
    assert_int_equal(len, 12);
    assert_null(cpm_tokenizer_id_to_piece(tok, 73448, NULL));
    assert_int_equal(cpm_tokenizer_piece_to_id(tok, "<0x0A>", 6), 1089 + 10);
    free(prompt);
    free(idtext);
    cpm_tokenizer_free(tok);
    remove_model_dir(dir);
}

static void test_known_encodings(void **state) {
    (void)state;
    cpm_tokenizer *m3 = load(M3_DIR);
    cpm_tokenizer *m2 = load(M2_DIR);
    /* The assets README's example: HF adds the "▁" (59320) that spm_encode does not. */
    const char *hello = "\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c\xef\xbc\x81";
    expect_ids(m3, hello, strlen(hello), false, (int32_t[]){59320, 23523, 65, 2925, 67}, 5);
    /* Special tokens inside text: whole ids, then the legacy "▁" before "x". */
    const char *t2 = "Hello, world! \xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c\xef\xbc\x81 <s>x</s>";
    expect_ids(m2, t2, strlen(t2), true,
               (int32_t[]){1, 21045, 95342, 2809, 73, 95320, 23523, 65, 2925, 67, 95320, 1, 1949, 2}, 14);
    assert_int_equal(cpm_tokenizer_vocab_size(m2), 122753);
    assert_int_equal(cpm_tokenizer_chat_family(m2), CPM_CHAT_MINICPM2);
    assert_int_equal(cpm_tokenizer_eos_id(m2), 2);
    /* Adjacent special tokens: no empty segment, so no stray "▁". */
    expect_ids(m3, "<|im_start|><|im_end|>", 22, false, (int32_t[]){73441, 73440}, 2);
    /* Empty text: bos only, or nothing (but still an array). */
    expect_ids(m3, "", 0, true, (int32_t[]){1}, 1);
    expect_ids(m3, "", 0, false, NULL, 0);
    /* A character outside the vocabulary falls back to its UTF-8 bytes. */
    expect_ids(m3, "\xf4\x8f\xbf\xbf", 4, false, (int32_t[]){59320, 1089 + 0xF4, 1089 + 0x8F, 1089 + 0xBF, 1089 + 0xBF}, 5);
    cpm_tokenizer_free(m3);
    cpm_tokenizer_free(m2);
}

static void test_partial_special_is_text(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M3_DIR);
    int32_t *ids;
    size_t n;
    cpm_error err = {0};
    assert_int_equal(cpm_tokenizer_encode(tok, "<|im_start", 10, false, &ids, &n, &err), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_not_equal(ids[i], 73441);
    assert_true(n > 1);
    free(ids);
    cpm_tokenizer_free(tok);
}

static void test_invalid_utf8_rejected(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M3_DIR);
    const struct { const char *s; size_t len; const char *where; } bad[] = {
        {"ab\xff", 3, "byte 2"},             /* never valid */
        {"a\xc0\xaf", 3, "byte 1"},          /* overlong '/' */
        {"\xed\xa0\x80x", 4, "byte 0"},      /* surrogate */
        {"ok\xe4\xbd", 4, "byte 2"},         /* cut short */
        {"\xf4\x90\x80\x80", 4, "byte 0"},   /* past U+10FFFF */
        {"x\x80", 2, "byte 1"},              /* lone continuation */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int32_t *ids = (int32_t *)1;
        size_t n = 7;
        cpm_error err = {0};
        assert_int_equal(cpm_tokenizer_encode(tok, bad[i].s, bad[i].len, true, &ids, &n, &err), CPM_EINVAL);
        assert_null(ids);
        assert_int_equal(n, 0);
        assert_non_null(strstr(err.msg, bad[i].where));
    }
    cpm_tokenizer_free(tok);
}

static void test_decode_out_of_range(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M3_DIR);
    cpm_error err = {0};
    char *text = (char *)1;
    assert_int_equal(cpm_tokenizer_decode(tok, (int32_t[]){1, 73448}, 2, false, &text, NULL, &err), CPM_ERANGE);
    assert_null(text);
    assert_non_null(strstr(err.msg, "index 1"));
    assert_int_equal(cpm_tokenizer_decode(tok, (int32_t[]){-5}, 1, true, &text, NULL, &err), CPM_ERANGE);
    cpm_detok *d = cpm_detok_new(tok, false);
    const char *piece;
    size_t len;
    assert_int_equal(cpm_detok_push(d, 99999999, &piece, &len, &err), CPM_ERANGE);
    assert_int_equal(len, 0);
    cpm_detok_free(d);
    cpm_detok_free(NULL);
    cpm_tokenizer_free(NULL);
    cpm_tokenizer_free(tok);
}

static void expect_load_fails(const void *data, size_t len, bool is_json, int code) {
    cpm_tokenizer *tok = (cpm_tokenizer *)1;
    cpm_error err = {0};
    assert_int_equal(cpm_tokenizer_load_mem(data, len, is_json, "test", &tok, &err), code);
    assert_null(tok);
    assert_true(strlen(err.msg) > 0);
}

static void test_corrupt_files(void **state) {
    (void)state;
    size_t jlen, mlen;
    char *json = read_all(M3_DIR "/tokenizer.json", &jlen);
    char *model = read_all(M2_DIR "/tokenizer.model", &mlen);
    expect_load_fails(json, 1000, true, CPM_EFORMAT);           /* truncated JSON */
    expect_load_fails(model, 100000, false, CPM_EFORMAT);       /* truncated protobuf */
    expect_load_fails("\x0a\x05garbage", 9, false, CPM_EFORMAT);
    expect_load_fails("", 0, false, CPM_EFORMAT);
    const char *unigram = "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}";
    expect_load_fails(unigram, strlen(unigram), true, CPM_EUNSUPPORTED);
    const char *bad_merge = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}";
    expect_load_fails(bad_merge, strlen(bad_merge), true, CPM_EFORMAT); /* token not in the vocabulary */
    expect_load_fails("[1, 2]", 6, true, CPM_EFORMAT);
    /* A flipped byte inside the merges of a real file: still a clean error or a load. */
    char *mangled = malloc(jlen);
    memcpy(mangled, json, jlen);
    char *merges = strstr(mangled, "\"merges\"");
    assert_non_null(merges);
    merges[40] = '"';
    cpm_tokenizer *tok = NULL;
    cpm_error err = {0};
    int rc = cpm_tokenizer_load_mem(mangled, jlen, true, "mangled", &tok, &err);
    assert_true(rc == 0 || rc == CPM_EFORMAT);
    cpm_tokenizer_free(tok);
    /* Missing directory. */
    assert_int_equal(cpm_tokenizer_load("/nonexistent/model", &tok, &err), CPM_ENOTFOUND);
    assert_null(tok);
    /* The real files load from memory too, and agree with the directory load. */
    assert_int_equal(cpm_tokenizer_load_mem(model, mlen, false, "2b", &tok, &err), 0);
    assert_int_equal(cpm_tokenizer_vocab_size(tok), 122753);
    assert_int_equal(cpm_tokenizer_bos_id(tok), 1);
    cpm_tokenizer_free(tok);
    free(mangled);
    free(json);
    free(model);
}

/* Streams ids and checks every piece and the total against the one-shot decode. */
static void stream_matches(const cpm_tokenizer *tok, const int32_t *ids, size_t n, bool skip, size_t *ret_nonempty) {
    cpm_error err = {0};
    char *want;
    size_t want_len;
    assert_int_equal(cpm_tokenizer_decode(tok, ids, n, skip, &want, &want_len, &err), 0);
    cpm_detok *d = cpm_detok_new(tok, skip);
    assert_non_null(d);
    char got[1024] = "";
    size_t got_len = 0, nonempty = 0;
    for (size_t i = 0; i <= n; i++) {
        const char *piece;
        size_t len;
        int rc = i < n ? cpm_detok_push(d, ids[i], &piece, &len, &err) : cpm_detok_flush(d, &piece, &len, &err);
        assert_int_equal(rc, 0);
        assert_true(got_len + len < sizeof got);
        memcpy(got + got_len, piece, len);
        got_len += len;
        nonempty += len > 0;
    }
    assert_int_equal(got_len, want_len);
    assert_memory_equal(got, want, want_len);
    cpm_detok_free(d);
    free(want);
    if (ret_nonempty)
        *ret_nonempty = nonempty;
}

static void test_detok_byte_runs(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M3_DIR);
    const int32_t B = 1089; /* <0x00> */
    /* "▁" + 4 byte pieces of U+10FFFF: nothing comes out until the run is closed. */
    int32_t ids[] = {59320, B + 0xF4, B + 0x8F, B + 0xBF, B + 0xBF};
    size_t nonempty;
    stream_matches(tok, ids, 5, false, &nonempty);
    assert_int_equal(nonempty, 1);
    /* An incomplete run before a normal piece: one U+FFFD per byte, as HF decodes it. */
    int32_t cut[] = {B + 0xE4, B + 0xBD, 15934};
    char *text;
    size_t len;
    cpm_error err = {0};
    assert_int_equal(cpm_tokenizer_decode(tok, cut, 3, false, &text, &len, &err), 0);
    assert_string_equal(text, "\xef\xbf\xbd\xef\xbf\xbdHello");
    free(text);
    stream_matches(tok, cut, 3, false, NULL);
    /* A valid prefix spoiled by a stray continuation byte: the whole run is replaced. */
    int32_t spoiled[] = {B + 0xE4, B + 0xBD, B + 0xA0, B + 0xA0};
    assert_int_equal(cpm_tokenizer_decode(tok, spoiled, 4, false, &text, &len, &err), 0);
    assert_int_equal(len, 12);
    free(text);
    stream_matches(tok, spoiled, 4, false, NULL);
    /* Leading space strip happens once, on the first text; specials skipped or kept. */
    int32_t chat[] = {1, 73441, 3060, 5, 15934, 73440};
    stream_matches(tok, chat, 6, true, NULL);
    stream_matches(tok, chat, 6, false, NULL);
    cpm_tokenizer_free(tok);
}

static char *render(const cpm_tokenizer *tok, const cpm_chat_msg *m, size_t n, const char *tools, bool gen) {
    char *text = NULL;
    cpm_error err = {0};
    int rc = cpm_chat_render(tok, m, n, tools, gen, &text, &err);
    if (rc != 0)
        print_error("render: %s\n", err.msg);
    assert_int_equal(rc, 0);
    return text;
}

static void test_chat_minicpm2(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M2_DIR);
    cpm_chat_msg m[] = {{"system", "You are a helpful assistant", NULL, NULL}, {"user", "Hello", NULL, NULL},
                        {"assistant", "Hi there", NULL, NULL},          {"user", "Who are you", NULL, NULL},
                        {"assistant", "   I am an assistant   ", NULL, NULL}, {"user", "Another question", NULL, NULL}};
    char *text = render(tok, m, 6, NULL, true);
    assert_string_equal(text, "You are a helpful assistant<\xe7\x94\xa8\xe6\x88\xb7>Hello<AI>Hi there<\xe7\x94\xa8\xe6\x88\xb7>"
                              "Who are you<AI>I am an assistant<\xe7\x94\xa8\xe6\x88\xb7>Another question<AI>");
    free(text);
    /* str.strip() removes Unicode spaces too (U+3000, U+00A0), not U+FEFF. */
    cpm_chat_msg u[] = {{"user", "\xe3\x80\x80 hi\xc2\xa0\n", NULL, NULL}, {"assistant", "\xef\xbb\xbfok", NULL, NULL}};
    text = render(tok, u, 2, NULL, false);
    assert_string_equal(text, "<\xe7\x94\xa8\xe6\x88\xb7>hi<AI>\xef\xbb\xbfok");
    free(text);
    cpm_error err = {0};
    assert_int_equal(cpm_chat_render(tok, u, 2, "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]", true, &text, &err),
                     CPM_EUNSUPPORTED);
    cpm_tokenizer_free(tok);
}

static void test_chat_minicpm3_python_values(void **state) {
    (void)state;
    cpm_tokenizer *tok = load(M3_DIR);
    cpm_tokenizer_set_chat_family(tok, CPM_CHAT_MINICPM3);
    const char *tools =
        "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"d\", \"parameters\": "
        "{\"type\": \"object\", \"properties\": {"
        "\"flag\": {\"type\": \"boolean\", \"default\": true},"
        "\"ratio\": {\"type\": \"number\", \"default\": 1.5},"
        "\"tiny\": {\"type\": \"number\", \"default\": 1e-05},"
        "\"big\": {\"type\": \"number\", \"default\": 1e16},"
        "\"hundred\": {\"type\": \"number\", \"default\": 100.0},"
        "\"tags\": {\"type\": \"array\", \"items\": {\"type\": \"string\"}, \"default\": [\"a\", \"it's\"]},"
        "\"myParam\": {\"type\": \"string\", \"enum\": [\"x\", \"y\"]},"
        "\"free\": {\"type\": \"object\"},"
        "\"budget\": {\"type\": [\"number\", \"null\"], \"description\": \"max price\"}"
        "}, \"required\": []}}}]";
    cpm_chat_msg m[] = {{"user", "hi", NULL, NULL}};
    char *text = render(tok, m, 1, tools, true);
    const char *want[] = {
        "def f(flag=True, ratio=1.5, tiny=1e-05, big=1e+16, hundred=100.0, tags=['a', \"it's\"], myParam=None, free=None, budget=None):",
        "class Myparam(Enum):\n    enum_0 = \"x\"\n    enum_1 = \"y\"\n",
        "        flag: Optional[bool] = True\n",
        "        tags: Optional[List[str]] = ['a', \"it's\"]\n",
        "        free: Optional[Dict[str, Union[]]] = None\n",
        "        budget: Optional[Union[float, None]] = Field(None, description=\"max price\")\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!strstr(text, want[i]))
            print_error("missing: %s\nin: %s\n", want[i], text);
        assert_non_null(strstr(text, want[i]));
    }
    assert_int_equal(strncmp(text, "<|im_start|>system\n\n# Functions\n", 31), 0);
    free(text);
    /* OpenAI-style tool calls: arguments as JSON text, rendered as Python kwargs. */
    cpm_chat_msg calls[] = {{"user", "w?", NULL, NULL},
                            {"assistant", NULL, "[{\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"city\\\": \\\"\xe5\x8c\x97\xe4\xba\xac\\\", \\\"n\\\": 2}\"}}]", "think"},
                            {"tool", "{\"t\": 1}", NULL, NULL}};
    text = render(tok, calls, 3, NULL, false);
    assert_non_null(strstr(text, "<|im_start|>assistant\n<|thought_start|>\nthink\n<|thought_end|>\n<|tool_call_start|>\n"
                                 "```python\nget(city=\"\xe5\x8c\x97\xe4\xba\xac\",n=2)\n```\n<|tool_call_end|>\n<|im_end|>\n"));
    free(text);
    cpm_error err = {0};
    assert_int_equal(cpm_chat_render(tok, m, 1, "{not json", true, &text, &err), CPM_EINVAL);
    assert_int_equal(cpm_chat_render(tok, m, 1, "[{\"function\": {\"description\": \"no name\"}}]", true, &text, &err),
                     CPM_EINVAL);
    assert_int_equal(cpm_chat_render(tok, m, 1, "[{\"name\": \"f\", \"parameters\": {\"properties\": {\"a\": {\"type\": \"any\"}}}}]",
                                     true, &text, &err),
                     CPM_EUNSUPPORTED);
    cpm_tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_prompt),
        cmocka_unit_test(test_known_encodings),
        cmocka_unit_test(test_partial_special_is_text),
        cmocka_unit_test(test_invalid_utf8_rejected),
        cmocka_unit_test(test_decode_out_of_range),
        cmocka_unit_test(test_corrupt_files),
        cmocka_unit_test(test_detok_byte_runs),
        cmocka_unit_test(test_chat_minicpm2),
        cmocka_unit_test(test_chat_minicpm3_python_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
