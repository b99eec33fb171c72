/* fuzz_torch_pickle.c - libFuzzer target for the restricted unpickler.
 *
 * Built with -Dfuzzing=true and clang; replay.c runs the same entry point over
 * tests/fuzz/corpus/torch_pickle as an ordinary test. Any input must end in a
 * clean error or a well-formed tensor table; nothing may be read out of bounds.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "shard/engine/model/torch_pickle.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cpm_torch_pickle *tp = NULL;
    cpm_error err = {0};
    if (cpm_torch_pickle_parse(data, size, "fuzz: data.pkl", &tp, &err) < 0) {
        if (err.code >= 0 || !memchr(err.msg, '\0', sizeof err.msg))
            __builtin_trap();
        return 0;
    }
    for (size_t i = 0; i < cpm_torch_pickle_count(tp); i++) {
        const cpm_torch_tensor *t = cpm_torch_pickle_at(tp, i);
        if (!t->name || !t->storage_key || !t->dtype || t->elsize == 0 || t->ndim < 0 ||
            t->ndim > CPM_TORCH_MAX_DIMS)
            __builtin_trap();
        for (int d = 0; d < t->ndim; d++)
            if (t->size[d] < 0 || t->stride[d] < 0)
                __builtin_trap();
        if (strlen(t->name) + strlen(t->storage_key) + strlen(t->dtype) > 3 * size + 16)
            __builtin_trap();
    }
    cpm_torch_pickle_free(tp);
    return 0;
}
