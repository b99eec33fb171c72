/* zip_reader.c - central-directory reader for torch.save archives.
 *
 * Trusts nothing in the archive: every offset and length read from it is checked
 * against the buffer before use, with 64-bit arithmetic that cannot wrap.
 */
#include "zip_reader.h"

#include <stdlib.h>
#include <string.h>

enum {
    EOCD_SIG = 0x06054b50,
    EOCD_LEN = 22,
    Z64_LOC_SIG = 0x07064b50,
    Z64_LOC_LEN = 20,
    Z64_EOCD_SIG = 0x06064b50,
    Z64_EOCD_LEN = 56,
    CDIR_SIG = 0x02014b50,
    CDIR_LEN = 46,
    LOCAL_SIG = 0x04034b50,
    LOCAL_LEN = 30,
    Z64_EXTRA_ID = 0x0001,
};

/* More entries than any checkpoint has; bounds the index allocation. */
#define ZIP_MAX_ENTRIES (1u << 20)

struct cpm_zip_reader {
    const uint8_t *buf;
    size_t len;
    const char *fname;
    size_t count;
    cpm_zip_entry *entries; /* archive order */
    const cpm_zip_entry **sorted; /* sorted by name, for find */
};

static uint16_t rd16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t rd64(const uint8_t *p) {
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

/* True when [off, off+n) lies inside [0, len). */
static int in_bounds(uint64_t off, uint64_t n, size_t len) {
    return off <= len && n <= len - off;
}

/* Where the central directory is and how many entries it has. */
typedef struct cdir_loc {
    uint64_t offset, size, count;
} cdir_loc;

static int find_eocd(const cpm_zip_reader *zr, size_t *ret_pos, cpm_error *err) {
    if (zr->len < EOCD_LEN)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: %zu bytes is too short for a zip archive", zr->fname,
                             zr->len);
    /* The record sits at the end, followed only by a comment of up to 64 KiB. */
    size_t lowest = zr->len - EOCD_LEN > 0xffff ? zr->len - EOCD_LEN - 0xffff : 0;
    for (size_t pos = zr->len - EOCD_LEN + 1; pos-- > lowest;) {
        const uint8_t *p = zr->buf + pos;
        if (rd32(p) == EOCD_SIG && rd16(p + 20) <= zr->len - pos - EOCD_LEN) {
            *ret_pos = pos;
            return 0;
        }
    }
    return cpm_error_set(err, CPM_EFORMAT,
                         "%s: no end-of-central-directory record (not a zip archive, or "
                         "truncated)",
                         zr->fname);
}

static int read_zip64_end(const cpm_zip_reader *zr, size_t eocd, cdir_loc *loc,
                          cpm_error *err) {
    const uint8_t *l = zr->buf + eocd - Z64_LOC_LEN;
    if (rd32(l + 16) > 1)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: multi-disk zip archives are not supported", zr->fname);
    uint64_t off = rd64(l + 8);
    if (!in_bounds(off, Z64_EOCD_LEN, eocd - Z64_LOC_LEN) ||
        rd32(zr->buf + off) != Z64_EOCD_SIG)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: ZIP64 end record offset %llu is not valid", zr->fname,
                             (unsigned long long)off);
    const uint8_t *r = zr->buf + off;
    loc->count = rd64(r + 32);
    loc->size = rd64(r + 40);
    loc->offset = rd64(r + 48);
    if (rd32(r + 16) != 0 || rd32(r + 20) != 0 || rd64(r + 24) != loc->count)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: multi-disk zip archives are not supported", zr->fname);
    return 0;
}

static int locate_cdir(const cpm_zip_reader *zr, cdir_loc *loc, cpm_error *err) {
    size_t eocd = 0;
    int rc = find_eocd(zr, &eocd, err);
    if (rc < 0)
        return rc;
    const uint8_t *p = zr->buf + eocd;
    /* torch (miniz with the ZIP64 flag) always writes the ZIP64 records; when the
     * locator is there its values win over the 16/32-bit ones. */
    if (eocd >= Z64_LOC_LEN && rd32(zr->buf + eocd - Z64_LOC_LEN) == Z64_LOC_SIG)
        return read_zip64_end(zr, eocd, loc, err);
    if (rd16(p + 4) != 0 || rd16(p + 6) != 0 || rd16(p + 8) != rd16(p + 10))
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: multi-disk zip archives are not supported", zr->fname);
    loc->count = rd16(p + 10);
    loc->size = rd32(p + 12);
    loc->offset = rd32(p + 16);
    return 0;
}

/* Replaces the 0xFFFFFFFF placeholders of e with the ZIP64 extra field's values. */
static int apply_zip64_extra(const cpm_zip_reader *zr, const uint8_t *extra, size_t n,
                             uint32_t usize32, uint32_t csize32, uint32_t off32,
                             cpm_zip_entry *e, cpm_error *err) {
    while (n >= 4) {
        uint16_t id = rd16(extra), sz = rd16(extra + 2);
        if (sz > n - 4)
            break;
        if (id == Z64_EXTRA_ID) {
            const uint8_t *q = extra + 4, *end = extra + 4 + sz;
            uint64_t *fields[3] = {&e->usize, &e->size, &e->offset};
            uint32_t small[3] = {usize32, csize32, off32};
            for (int i = 0; i < 3; i++) {
                if (small[i] != 0xffffffffu)
                    continue;
                if (end - q < 8)
                    return cpm_error_set(err, CPM_EFORMAT,
                                         "%s: entry %s: ZIP64 extra field is too short",
                                         zr->fname, e->name);
                *fields[i] = rd64(q);
                q += 8;
            }
            return 0;
        }
        extra += 4 + sz;
        n -= 4 + (size_t)sz;
    }
    if (usize32 == 0xffffffffu || csize32 == 0xffffffffu || off32 == 0xffffffffu)
        return cpm_error_set(err, CPM_EFORMAT, "%s: entry %s: ZIP64 extra field missing",
                             zr->fname, e->name);
    return 0;
}

/* Follows e's local header to the first data byte and checks the data fits. */
static int resolve_data(const cpm_zip_reader *zr, cpm_zip_entry *e, size_t name_len,
                        cpm_error *err) {
    uint64_t lh = e->offset;
    if (!in_bounds(lh, LOCAL_LEN, zr->len) || rd32(zr->buf + lh) != LOCAL_SIG)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: entry %s: local header at offset %llu is missing",
                             zr->fname, e->name, (unsigned long long)lh);
    const uint8_t *p = zr->buf + lh;
    uint64_t n = rd16(p + 26), x = rd16(p + 28);
    if (n != name_len || !in_bounds(lh + LOCAL_LEN, n + x, zr->len) ||
        memcmp(p + LOCAL_LEN, e->name, name_len) != 0)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: entry %s: local header does not match the central "
                             "directory",
                             zr->fname, e->name);
    e->offset = lh + LOCAL_LEN + n + x;
    if (!in_bounds(e->offset, e->size, zr->len))
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: entry %s: %llu bytes at offset %llu run past the end of "
                             "the file (%zu bytes)",
                             zr->fname, e->name, (unsigned long long)e->size,
                             (unsigned long long)e->offset, zr->len);
    return 0;
}

/* Parses the central header at *pos into e and advances *pos past it. */
static int read_cdir_entry(cpm_zip_reader *zr, uint64_t *pos, uint64_t end,
                           cpm_zip_entry *e, cpm_error *err) {
    if (end - *pos < CDIR_LEN || rd32(zr->buf + *pos) != CDIR_SIG)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: central directory entry at offset %llu is malformed",
                             zr->fname, (unsigned long long)*pos);
    const uint8_t *p = zr->buf + *pos;
    size_t n = rd16(p + 28), x = rd16(p + 30), c = rd16(p + 32);
    if (end - *pos - CDIR_LEN < (uint64_t)n + x + c)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: central directory entry at offset %llu runs past the "
                             "directory",
                             zr->fname, (unsigned long long)*pos);
    const uint8_t *name = p + CDIR_LEN;
    if (n == 0 || memchr(name, 0, n))
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: central directory entry at offset %llu has a bad name",
                             zr->fname, (unsigned long long)*pos);
    char *copy = malloc(n + 1);
    if (!copy)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", zr->fname);
    memcpy(copy, name, n);
    copy[n] = '\0';
    e->name = copy;
    e->flags = rd16(p + 8);
    e->method = rd16(p + 10);
    e->crc32 = rd32(p + 16);
    e->size = rd32(p + 20);
    e->usize = rd32(p + 24);
    e->offset = rd32(p + 42);
    int rc = apply_zip64_extra(zr, name + n, x, rd32(p + 24), rd32(p + 20), rd32(p + 42),
                               e, err);
    if (rc == 0)
        rc = resolve_data(zr, e, n, err);
    *pos += CDIR_LEN + n + x + c;
    return rc;
}

static int cmp_by_name(const void *a, const void *b) {
    const cpm_zip_entry *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int build_index(cpm_zip_reader *zr, cpm_error *err) {
    zr->sorted = malloc((zr->count ? zr->count : 1) * sizeof *zr->sorted);
    if (!zr->sorted)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", zr->fname);
    for (size_t i = 0; i < zr->count; i++)
        zr->sorted[i] = &zr->entries[i];
    qsort(zr->sorted, zr->count, sizeof *zr->sorted, cmp_by_name);
    for (size_t i = 1; i < zr->count; i++) {
        if (strcmp(zr->sorted[i - 1]->name, zr->sorted[i]->name) == 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: entry %s appears twice", zr->fname,
                                 zr->sorted[i]->name);
    }
    return 0;
}

static int read_cdir(cpm_zip_reader *zr, cpm_error *err) {
    cdir_loc loc = {0, 0, 0};
    int rc = locate_cdir(zr, &loc, err);
    if (rc < 0)
        return rc;
    if (!in_bounds(loc.offset, loc.size, zr->len))
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: central directory (%llu bytes at %llu) runs past the "
                             "end of the file",
                             zr->fname, (unsigned long long)loc.size,
                             (unsigned long long)loc.offset);
    /* Each entry takes at least CDIR_LEN bytes, which bounds a lying count. */
    if (loc.count > ZIP_MAX_ENTRIES || loc.count > loc.size / CDIR_LEN)
        return cpm_error_set(err, CPM_EFORMAT, "%s: implausible entry count %llu",
                             zr->fname, (unsigned long long)loc.count);
    zr->entries = calloc(loc.count ? loc.count : 1, sizeof *zr->entries);
    if (!zr->entries)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", zr->fname);
    uint64_t pos = loc.offset, end = loc.offset + loc.size;
    for (uint64_t i = 0; i < loc.count; i++) {
        rc = read_cdir_entry(zr, &pos, end, &zr->entries[i], err);
        zr->count = i + 1; /* so that free releases the name even on failure */
        if (rc < 0)
            return rc;
    }
    return build_index(zr, err);
}

int cpm_zip_reader_open(const uint8_t *buf, size_t len, const char *fname,
                        cpm_zip_reader **ret, cpm_error *err) {
    *ret = NULL;
    cpm_zip_reader *zr = calloc(1, sizeof *zr);
    if (!zr)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", fname);
    zr->buf = buf;
    zr->len = len;
    zr->fname = fname;
    int rc = read_cdir(zr, err);
    if (rc < 0) {
        cpm_zip_reader_free(zr);
        return rc;
    }
    *ret = zr;
    return 0;
}

void cpm_zip_reader_free(cpm_zip_reader *zr) {
    if (!zr)
        return;
    for (size_t i = 0; i < zr->count; i++)
        free((char *)zr->entries[i].name);
    free(zr->entries);
    free(zr->sorted);
    free(zr);
}

size_t cpm_zip_reader_count(const cpm_zip_reader *zr) {
    return zr->count;
}

const cpm_zip_entry *cpm_zip_reader_at(const cpm_zip_reader *zr, size_t i) {
    return i < zr->count ? &zr->entries[i] : NULL;
}

const cpm_zip_entry *cpm_zip_reader_find(const cpm_zip_reader *zr, const char *name) {
    size_t lo = 0, hi = zr->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const cpm_zip_entry *e = zr->sorted[mid];
        int c = strcmp(name, e->name);
        if (c == 0)
            return e;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

int cpm_zip_reader_check_stored(const cpm_zip_reader *zr, const cpm_zip_entry *e,
                                const char *tensor, cpm_error *err) {
    const char *pre = tensor ? "tensor " : "", *t = tensor ? tensor : "",
               *sep = tensor ? ": " : "";
    if (e->flags & 1u)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: %s%s%sentry %s is encrypted",
                             zr->fname, pre, t, sep, e->name);
    if (e->method != 0)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: %s%s%sentry %s is compressed (method %u); only stored "
                             "entries are supported, as torch.save writes them",
                             zr->fname, pre, t, sep, e->name, e->method);
    if (e->size != e->usize)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: %s%s%sentry %s is stored but its sizes differ (%llu vs %llu)",
                             zr->fname, pre, t, sep, e->name, (unsigned long long)e->size,
                             (unsigned long long)e->usize);
    return 0;
}

uint32_t cpm_zip_crc32(uint32_t crc, const void *buf, size_t len) {
    const uint8_t *p = buf;
    crc = ~crc;
    for (size_t i = 0; i < len; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}
