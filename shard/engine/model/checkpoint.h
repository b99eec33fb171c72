/* checkpoint.h - read-only access to the tensors of a Hugging Face checkpoint directory.
 *
 * Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`,
 * or (when neither exists) `pytorch_model.bin` / its sharded index through a
 * restricted unpickler that executes nothing. Tensor data is memory-mapped and
 * served without copies where the file layout allows (safetensors always; torch
 * zip entries when stored uncompressed and contiguous); otherwise it is copied once
 * at open time into memory the checkpoint owns.
 *
 * Every malformed input becomes a CPM_E* code and a one-line message naming the
 * file and, where one is involved, the tensor. No input may cause an
 * out-of-bounds read.
 */
#ifndef CPM_CHECKPOINT_H
#define CPM_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "../../../common/error.h"
#include "../kernels/dtype.h"

#define CPM_TENSOR_MAX_DIMS 4

typedef struct cpm_tensor_view {
    const char *name;      /* owned by the checkpoint */
    const char *file;      /* file name (no directory) the tensor came from */
    cpm_dtype dtype;
    int ndim;
    int64_t shape[CPM_TENSOR_MAX_DIMS];
    const void *data;      /* contiguous, row-major; owned by the checkpoint */
    size_t nbytes;
} cpm_tensor_view;

typedef struct cpm_checkpoint cpm_checkpoint;

/* Opens the checkpoint in directory dir. On success *ret owns the mappings;
 * free with cpm_checkpoint_free. */
int cpm_checkpoint_open(const char *dir, cpm_checkpoint **ret, cpm_error *err);

/* Opens one named weight file or index in dir ("pytorch_model.bin",
 * "model.safetensors.index.json", ...) instead of choosing as cpm_checkpoint_open
 * does; a name ending in ".index.json" is read as a sharded index. */
int cpm_checkpoint_open_file(const char *dir, const char *name, cpm_checkpoint **ret,
                             cpm_error *err);

/* Accepts NULL. Invalidates every view handed out. */
void cpm_checkpoint_free(cpm_checkpoint *ck);

/* Tells the system this process will not read mapped bytes [p, p + n) again (a weight
 * repacked into memory of its own): their pages leave the process's resident set, to
 * be read from the file again should they be touched. Bytes that are not wholly inside
 * one file mapping (a tensor copied at open time) are left alone. */
void cpm_checkpoint_release(const cpm_checkpoint *ck, const void *p, size_t n);

/* Copies the n mapped bytes at p into dst by reading the file (no page faults on
 * the mapping). 0, or -1 when p is not in one file or the read fails. */
int cpm_checkpoint_copy(const cpm_checkpoint *ck, const void *p, size_t n, void *dst);

/* Number of tensors, and the i-th one (0 <= i < count), in file order. */
size_t cpm_checkpoint_count(const cpm_checkpoint *ck);
const cpm_tensor_view *cpm_checkpoint_at(const cpm_checkpoint *ck, size_t i);

/* The tensor called name, or NULL. */
const cpm_tensor_view *cpm_checkpoint_find(const cpm_checkpoint *ck, const char *name);

/* Tensors the engine cannot use (a dtype other than F32/F16/BF16, more than
 * CPM_TENSOR_MAX_DIMS dimensions): they are left out of count/at/find, and
 * cpm_checkpoint_expect reports them as CPM_EUNSUPPORTED. unsupported_at returns
 * the i-th one's name (NULL past the end) and, in *ret_reason, why. */
size_t cpm_checkpoint_unsupported_count(const cpm_checkpoint *ck);
const char *cpm_checkpoint_unsupported_at(const cpm_checkpoint *ck, size_t i,
                                          const char **ret_reason);

/* Looks up name and checks its shape against shape[0..ndim) (a -1 entry matches any
 * size). Errors: CPM_ENOTFOUND "tensor X: missing from <dir>", CPM_ESHAPE
 * "<file>: tensor X: shape [a,b], expected [c,d]" (a -1 prints as *),
 * CPM_EUNSUPPORTED "<file>: tensor X: dtype I64 is not supported (...)". */
int cpm_checkpoint_expect(const cpm_checkpoint *ck, const char *name, int ndim,
                          const int64_t *shape, const cpm_tensor_view **ret,
                          cpm_error *err);

/* GPTQ's packed integer tensors (qweight, qzeros, g_idx) are I32, which is no
 * engine dtype: they stay among the unsupported tensors above, and only this
 * call serves them, with the same lookup and shape checks as
 * cpm_checkpoint_expect plus CPM_EFORMAT "<file>: tensor X: dtype ..., expected
 * I32". *ret points into the checkpoint (4-byte aligned, little-endian). */
int cpm_checkpoint_expect_i32(const cpm_checkpoint *ck, const char *name, int ndim,
                              const int64_t *shape, const int32_t **ret, cpm_error *err);

#endif
