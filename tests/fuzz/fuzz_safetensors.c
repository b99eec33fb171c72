/* fuzz_safetensors.c - libFuzzer target for the safetensors header parser.
 *
 * Built with -Dfuzzing=true and clang; replay.c runs the same entry point over
 * tests/fuzz/corpus/safetensors as an ordinary test. Whatever the input, the
 * parser must either fail cleanly or return entries that lie inside the buffer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "shard/engine/model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cpm_safetensors *st = NULL;
    cpm_error err = {0};
    if (cpm_safetensors_parse(data, size, "fuzz.safetensors", &st, &err) < 0) {
        if (err.code >= 0 || !memchr(err.msg, '\0', sizeof err.msg))
            __builtin_trap();
        return 0;
    }
    uint64_t start = cpm_safetensors_data_start(st), prev_end = 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < cpm_safetensors_count(st); i++) {
        const cpm_safetensors_entry *e = cpm_safetensors_at(st, i);
        if (e->begin > e->end || e->end > size - start || e->ndim > CPM_SAFETENSORS_MAX_DIMS)
            __builtin_trap();
        if (e->begin < e->end) {
            if (e->begin < prev_end) /* sorted, non-overlapping */
                __builtin_trap();
            prev_end = e->end;
            sink ^= data[start + e->begin] ^ data[start + e->end - 1];
        }
    }
    (void)sink;
    cpm_safetensors_free(st);
    return 0;
}
