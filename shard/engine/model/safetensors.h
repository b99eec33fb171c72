/* safetensors.h - the safetensors container: header parser and writer.
 *
 * Checkpoint loading maps a .safetensors file and calls the parser, which checks
 * every header entry against the file before any tensor byte is touched; the
 * writer is used by cpm-convert-bin and by tests that build files at run time.
 */
#ifndef CPM_SAFETENSORS_H
#define CPM_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../../common/error.h"
#include "../kernels/dtype.h"

#define CPM_SAFETENSORS_MAX_DIMS 8
/* A real header is a few hundred kB; anything this large is corrupt or hostile. */
#define CPM_SAFETENSORS_MAX_HEADER (100u * 1000u * 1000u)

typedef struct cpm_safetensors_entry {
    const char *name;  /* owned by the header object */
    const char *dtype; /* as written: "BF16", "I64", ... */
    size_t elsize;     /* bytes per element; 0 when the dtype is unknown here */
    int ndim;
    int64_t shape[CPM_SAFETENSORS_MAX_DIMS];
    uint64_t begin, end; /* byte range relative to the start of the data section */
} cpm_safetensors_entry;

typedef struct cpm_safetensors cpm_safetensors;

/* Parses and validates the header of the file held in buf[0..len) (borrowed).
 * fname names the file in messages. Checked: file and header lengths (header
 * over CPM_SAFETENSORS_MAX_HEADER is CPM_ELIMIT), JSON syntax, duplicate names,
 * field types, shapes (non-negative, product without overflow), offsets
 * (begin <= end <= data length, size == product * element size for known dtypes)
 * and overlaps. Unknown dtypes are kept (elsize 0) for the caller to refuse. */
int cpm_safetensors_parse(const uint8_t *buf, size_t len, const char *fname,
                          cpm_safetensors **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_safetensors_free(cpm_safetensors *st);

/* Entries ordered by data offset (then name). */
size_t cpm_safetensors_count(const cpm_safetensors *st);
const cpm_safetensors_entry *cpm_safetensors_at(const cpm_safetensors *st, size_t i);

/* Offset of the data section in the file (8 + header length). */
uint64_t cpm_safetensors_data_start(const cpm_safetensors *st);

/* Bytes per element of a safetensors dtype name, 0 when unknown. */
size_t cpm_safetensors_dtype_size(const char *dtype);

/* True when the engine computes with dtype; *ret gets the engine type. */
bool cpm_safetensors_dtype_engine(const char *dtype, cpm_dtype *ret);

typedef struct cpm_safetensors_tensor {
    const char *name;
    const char *dtype; /* safetensors spelling */
    int ndim;
    int64_t shape[CPM_SAFETENSORS_MAX_DIMS];
    const void *data;
    size_t nbytes; /* must equal product(shape) * element size */
} cpm_safetensors_tensor;

/* Writes ts[0..n) to path as a safetensors file with __metadata__
 * {"format": "pt"}. Data is laid out largest element size first, then by name,
 * so every tensor is aligned to its element size and the data has no holes. */
int cpm_safetensors_write(const char *path, const cpm_safetensors_tensor *ts, size_t n,
                          cpm_error *err);

#endif
