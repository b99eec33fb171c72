/* zip_reader.h - index of a zip archive held in memory (the torch.save container).
 *
 * Checkpoint loading maps pytorch_model.bin and hands the bytes here; this module
 * reads the central directory (ZIP64 included) and says where each entry's data
 * lies, so storages can be served by pointer. It never inflates anything.
 */
#ifndef CPM_ZIP_READER_H
#define CPM_ZIP_READER_H

#include <stddef.h>
#include <stdint.h>

#include "../../../common/error.h"

typedef struct cpm_zip_entry {
    const char *name;     /* NUL-terminated copy, owned by the reader */
    uint16_t method;      /* 0 = stored; anything else is compressed */
    uint16_t flags;       /* general purpose bits (bit 0: encrypted) */
    uint32_t crc32;
    uint64_t offset;      /* first data byte, from the start of the archive */
    uint64_t size;        /* compressed size: the bytes at offset */
    uint64_t usize;       /* uncompressed size */
} cpm_zip_entry;

typedef struct cpm_zip_reader cpm_zip_reader;

/* Indexes the archive in buf[0..len) (borrowed: it must outlive the reader).
 * fname names the archive in messages. Every entry's local header and data range
 * are checked to lie inside buf. */
int cpm_zip_reader_open(const uint8_t *buf, size_t len, const char *fname,
                        cpm_zip_reader **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_zip_reader_free(cpm_zip_reader *zr);

size_t cpm_zip_reader_count(const cpm_zip_reader *zr);
const cpm_zip_entry *cpm_zip_reader_at(const cpm_zip_reader *zr, size_t i);

/* The entry called name, or NULL. */
const cpm_zip_entry *cpm_zip_reader_find(const cpm_zip_reader *zr, const char *name);

/* Checks that e is usable as raw bytes: stored, not encrypted, size == usize.
 * tensor, when not NULL, names the tensor that needs e in the message.
 * Errors: CPM_EUNSUPPORTED "<fname>: [tensor T: ]entry X is compressed (method 8); ...". */
int cpm_zip_reader_check_stored(const cpm_zip_reader *zr, const cpm_zip_entry *e,
                                const char *tensor, cpm_error *err);

/* CRC-32 (ISO-HDLC, as zip uses) of buf[0..len), continuing from crc (0 to start). */
uint32_t cpm_zip_crc32(uint32_t crc, const void *buf, size_t len);

#endif
