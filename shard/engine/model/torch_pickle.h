/* torch_pickle.h - restricted reader for the data.pkl of a torch.save archive.
 *
 * Checkpoint loading hands the pickle bytes here and gets back the tensor table
 * (name, storage key, dtype, offset, size, stride); the storages themselves stay in
 * the zip. Only the opcodes and globals a state dict needs are understood, and
 * nothing is ever executed: a global outside the allow-list is an error.
 */
#ifndef CPM_TORCH_PICKLE_H
#define CPM_TORCH_PICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "../../../common/error.h"

#define CPM_TORCH_MAX_DIMS 8

typedef struct cpm_torch_tensor {
    const char *name;        /* state-dict key; owned by the pickle object */
    const char *storage_key; /* zip entry <archive>/data/<storage_key> */
    const char *dtype;       /* safetensors spelling of the storage type: "BF16", "I64"... */
    size_t elsize;           /* bytes per element of the storage */
    uint64_t storage_numel;  /* elements in the storage, as the pickle declares */
    uint64_t offset;         /* storage_offset, in elements */
    int ndim;
    int64_t size[CPM_TORCH_MAX_DIMS];
    int64_t stride[CPM_TORCH_MAX_DIMS]; /* in elements */
} cpm_torch_tensor;

typedef struct cpm_torch_pickle cpm_torch_pickle;

/* Interprets the pickle in buf[0..len) (borrowed) as a dict name -> tensor.
 * where prefixes every message ("pytorch_model.bin: archive/data.pkl").
 * Errors: CPM_EUNSUPPORTED for a global or opcode outside the allowed set,
 * CPM_ELIMIT past a bound (stack, memo, string length), CPM_EFORMAT otherwise. */
int cpm_torch_pickle_parse(const uint8_t *buf, size_t len, const char *where,
                           cpm_torch_pickle **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_torch_pickle_free(cpm_torch_pickle *tp);

/* Tensors in dict order. */
size_t cpm_torch_pickle_count(const cpm_torch_pickle *tp);
const cpm_torch_tensor *cpm_torch_pickle_at(const cpm_torch_pickle *tp, size_t i);

#endif
