/* fuzz_toolcall.c - libFuzzer target for router/toolcall.c (the tool-call parser).
 *
 * The first byte picks where the text is cut (a stride), the rest is the model's text.
 * Whatever the text: fed whole and fed in pieces give the same reasoning, content and
 * calls; every call's arguments are a JSON object; content, reasoning and calls account
 * for no more text than was fed (nothing is invented).
 */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "router/toolcall.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const NAMES[] = {"f", "get_weather", "search"};

typedef struct acc {
    char *text[2]; /* reasoning, content */
    size_t len[2];
} acc;

static void add(acc *a, int k, const char *s, size_t n) {
    char *p = realloc(a->text[k], a->len[k] + n + 1);
    if (!p)
        abort();
    memcpy(p + a->len[k], s, n);
    a->len[k] += n;
    p[a->len[k]] = '\0';
    a->text[k] = p;
}

static void take(acc *a, const cpm_toolcall_delta *d) {
    add(a, 0, d->reasoning, d->reasoning_len);
    add(a, 1, d->content, d->content_len);
}

static void check_calls(const cpm_toolcall *x, const cpm_toolcall *y) {
    if (cpm_toolcall_count(x) != cpm_toolcall_count(y))
        __builtin_trap();
    for (int i = 0; i < cpm_toolcall_count(x); i++) {
        const cpm_toolcall_call *a = cpm_toolcall_get(x, i), *b = cpm_toolcall_get(y, i);
        if (strcmp(a->name, b->name) || strcmp(a->arguments, b->arguments))
            __builtin_trap();
        json_t *j = json_loads(a->arguments, 0, NULL);
        if (!json_is_object(j))
            __builtin_trap();
        json_decref(j);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1)
        return 0;
    size_t stride = data[0] % 16 + 1;
    const char *text = (const char *)data + 1;
    size_t n = size - 1;
    cpm_toolcall *whole = cpm_toolcall_new(NAMES, 3, "call_f");
    cpm_toolcall *cut = cpm_toolcall_new(NAMES, 3, "call_f");
    if (!whole || !cut)
        abort();
    acc a = {0}, b = {0};
    cpm_toolcall_delta d;
    cpm_toolcall_whole(whole, text, n, &d);
    take(&a, &d);
    for (size_t at = 0; at < n; at += stride) {
        cpm_toolcall_feed(cut, text + at, n - at < stride ? n - at : stride, &d);
        take(&b, &d);
    }
    cpm_toolcall_finish(cut, &d);
    take(&b, &d);
    for (int k = 0; k < 2; k++)
        if (a.len[k] != b.len[k] || (a.len[k] && memcmp(a.text[k], b.text[k], a.len[k])))
            __builtin_trap();
    check_calls(whole, cut);
    if (a.len[0] + a.len[1] > n)
        __builtin_trap();
    for (int k = 0; k < 2; k++)
        free(a.text[k]), free(b.text[k]);
    cpm_toolcall_free(whole);
    cpm_toolcall_free(cut);
    return 0;
}
