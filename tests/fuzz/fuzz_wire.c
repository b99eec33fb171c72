/* fuzz_wire.c - libFuzzer target for services/common/wire.c: every message any service
 * reads from the network goes through cpm_wire_unpack first.
 *
 * Input: one byte choosing the tensor frame that "arrived" with the envelope (none,
 * or a size taken from the next two bytes), then the envelope frame. Whatever the
 * bytes, unpacking must either fail with a message or give an envelope that passes
 * cpm_wire_validate, whose described tensor (if any) has exactly the frame's size,
 * and that packs and unpacks again to an envelope of the same body.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/common/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void broken(const char *what) {
    fprintf(stderr, "fuzz_wire: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 3)
        return 0;
    long long tensor = data[0] & 1 ? (long long)(data[1] | data[2] << 8) : -1;
    data += 3, size -= 3;
    cpm_envelope *env = NULL;
    cpm_error e = {0};
    if (cpm_wire_unpack(data, size, tensor, &env, &e) != 0) {
        if (env || !e.msg[0])
            broken("a refused message must leave no envelope and say why");
        return 0;
    }
    if (cpm_wire_validate(env, tensor, &e) != 0)
        broken("an accepted envelope fails validation");
    if (!strcmp(cpm_wire_body_name(env->body_case), "none"))
        broken("an accepted envelope has no body");
    uint8_t *buf = NULL;
    size_t len = 0;
    if (cpm_wire_pack(env, &buf, &len, &e) != 0)
        broken("an accepted envelope does not pack");
    cpm_envelope *again = NULL;
    if (cpm_wire_unpack(buf, len, tensor, &again, &e) != 0 || again->body_case != env->body_case)
        broken("a packed envelope does not unpack to the same body");
    cpm_wire_free(again);
    free(buf);
    cpm_wire_free(env);
    return 0;
}
