/* safetensors.c - header validation and writing for the safetensors format.
 *
 * Layout: u64 little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
 * then the data section that the offsets index.
 */
#include "safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cpm_safetensors {
    uint64_t data_start;
    size_t count;
    cpm_safetensors_entry *entries;
};

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
    {"F32", 4},  {"F16", 2},  {"BF16", 2},    {"F64", 8},     {"I64", 8},
    {"U64", 8},  {"I32", 4},  {"U32", 4},     {"I16", 2},     {"U16", 2},
    {"I8", 1},   {"U8", 1},   {"BOOL", 1},    {"F8_E5M2", 1}, {"F8_E4M3", 1},
};

size_t cpm_safetensors_dtype_size(const char *dtype) {
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (!strcmp(dtype, dtypes[i].name))
            return dtypes[i].size;
    return 0;
}

bool cpm_safetensors_dtype_engine(const char *dtype, cpm_dtype *ret) {
    for (int t = 0; t < CPM_DTYPE_COUNT; t++) {
        if (!strcmp(dtype, cpm_dtype_name((cpm_dtype)t))) {
            *ret = (cpm_dtype)t;
            return true;
        }
    }
    return false;
}

static uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int parse_shape(const json_t *js, const char *fname, cpm_safetensors_entry *e,
                       uint64_t *ret_numel, cpm_error *err) {
    if (!json_is_array(js))
        return cpm_error_set(err, CPM_EFORMAT, "%s: tensor %s: shape is not an array", fname,
                             e->name);
    size_t nd = json_array_size(js);
    if (nd > CPM_SAFETENSORS_MAX_DIMS)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: tensor %s: %zu dimensions, at most %d are supported", fname,
                             e->name, nd, CPM_SAFETENSORS_MAX_DIMS);
    uint64_t numel = 1;
    bool overflow = false;
    for (size_t d = 0; d < nd; d++) {
        const json_t *v = json_array_get(js, d);
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return cpm_error_set(err, CPM_EFORMAT,
                                 "%s: tensor %s: shape[%zu] is not a non-negative integer",
                                 fname, e->name, d);
        e->shape[d] = json_integer_value(v);
        overflow |= __builtin_mul_overflow(numel, (uint64_t)e->shape[d], &numel);
    }
    /* A zero dimension makes the product 0 whatever the others say. */
    for (size_t d = 0; d < nd; d++)
        if (e->shape[d] == 0)
            numel = 0, overflow = false;
    if (overflow)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: shape's element count overflows 64 bits", fname,
                             e->name);
    e->ndim = (int)nd;
    *ret_numel = numel;
    return 0;
}

static int parse_offsets(const json_t *js, const char *fname, uint64_t data_len,
                         cpm_safetensors_entry *e, cpm_error *err) {
    const json_t *b = json_array_get(js, 0), *x = json_array_get(js, 1);
    if (!json_is_array(js) || json_array_size(js) != 2 || !json_is_integer(b) ||
        !json_is_integer(x) || json_integer_value(b) < 0 || json_integer_value(x) < 0)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: data_offsets is not [begin, end] of "
                             "non-negative integers",
                             fname, e->name);
    e->begin = (uint64_t)json_integer_value(b);
    e->end = (uint64_t)json_integer_value(x);
    if (e->begin > e->end)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: data_offsets [%llu,%llu] begin after they end",
                             fname, e->name, (unsigned long long)e->begin,
                             (unsigned long long)e->end);
    if (e->end > data_len)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: data_offsets [%llu,%llu] run past the end of "
                             "the data (%llu bytes)",
                             fname, e->name, (unsigned long long)e->begin,
                             (unsigned long long)e->end, (unsigned long long)data_len);
    return 0;
}

static int parse_entry(const char *name, const json_t *js, const char *fname,
                       uint64_t data_len, cpm_safetensors_entry *e, cpm_error *err) {
    e->name = name;
    const json_t *dt = json_object_get(js, "dtype");
    const json_t *shape = json_object_get(js, "shape");
    const json_t *offs = json_object_get(js, "data_offsets");
    if (!json_is_object(js) || !json_is_string(dt) || !shape || !offs)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: entry needs dtype (string), shape and "
                             "data_offsets",
                             fname, name);
    e->dtype = json_string_value(dt);
    e->elsize = cpm_safetensors_dtype_size(e->dtype);
    uint64_t numel = 0, want;
    int rc = parse_shape(shape, fname, e, &numel, err);
    if (rc == 0)
        rc = parse_offsets(offs, fname, data_len, e, err);
    if (rc < 0 || e->elsize == 0)
        return rc;
    if (__builtin_mul_overflow(numel, (uint64_t)e->elsize, &want) || want != e->end - e->begin)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: data_offsets [%llu,%llu] hold %llu bytes, but "
                             "%s of %llu elements needs %llu",
                             fname, name, (unsigned long long)e->begin,
                             (unsigned long long)e->end,
                             (unsigned long long)(e->end - e->begin), e->dtype,
                             (unsigned long long)numel,
                             (unsigned long long)(numel * e->elsize));
    return 0;
}

static int cmp_offset(const void *a, const void *b) {
    const cpm_safetensors_entry *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Sorted by offset, two non-empty ranges overlap iff one starts before the
 * previous non-empty one ends. */
static int check_overlaps(const cpm_safetensors *st, const char *fname, cpm_error *err) {
    const cpm_safetensors_entry *prev = NULL;
    for (size_t i = 0; i < st->count; i++) {
        const cpm_safetensors_entry *e = &st->entries[i];
        if (e->begin == e->end)
            continue;
        if (prev && e->begin < prev->end)
            return cpm_error_set(err, CPM_EFORMAT,
                                 "%s: tensor %s: data_offsets [%llu,%llu] overlap those of "
                                 "tensor %s [%llu,%llu]",
                                 fname, e->name, (unsigned long long)e->begin,
                                 (unsigned long long)e->end, prev->name,
                                 (unsigned long long)prev->begin,
                                 (unsigned long long)prev->end);
        prev = e;
    }
    return 0;
}

/* Copies the strings the entries borrow from the JSON tree into one block. */
static int own_strings(cpm_safetensors *st, const char *fname, cpm_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < st->count; i++)
        total += strlen(st->entries[i].name) + strlen(st->entries[i].dtype) + 2;
    char *block = malloc(total ? total : 1), *p = block;
    if (!block)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", fname);
    for (size_t i = 0; i < st->count; i++) {
        const char *src[2] = {st->entries[i].name, st->entries[i].dtype};
        const char **dst[2] = {&st->entries[i].name, &st->entries[i].dtype};
        for (int k = 0; k < 2; k++) {
            size_t n = strlen(src[k]) + 1;
            memcpy(p, src[k], n);
            *dst[k] = p;
            p += n;
        }
    }
    /* entries[0].name is the block's start when count > 0: free() finds it there. */
    if (st->count == 0)
        free(block);
    return 0;
}

static int parse_header(cpm_safetensors *st, const json_t *root, const char *fname,
                        uint64_t data_len, cpm_error *err) {
    size_t n = json_object_size(root);
    st->entries = calloc(n ? n : 1, sizeof *st->entries);
    if (!st->entries)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", fname);
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(val))
                return cpm_error_set(err, CPM_EFORMAT, "%s: __metadata__ is not an object",
                                     fname);
            continue;
        }
        if (strlen(key) == 0)
            return cpm_error_set(err, CPM_EFORMAT, "%s: a tensor has an empty name", fname);
        int rc = parse_entry(key, val, fname, data_len, &st->entries[st->count], err);
        if (rc < 0)
            return rc;
        st->count++;
    }
    qsort(st->entries, st->count, sizeof *st->entries, cmp_offset);
    int rc = check_overlaps(st, fname, err);
    return rc < 0 ? rc : own_strings(st, fname, err);
}

static int load_json(const uint8_t *buf, uint64_t n, const char *fname, json_t **ret,
                     cpm_error *err) {
    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            return cpm_error_set(err, CPM_EFORMAT, "%s: header names a tensor twice: %s",
                                 fname, jerr.text);
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: header is not valid JSON: %s (at byte %d of the header)",
                             fname, jerr.text, jerr.position);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return cpm_error_set(err, CPM_EFORMAT, "%s: header is not a JSON object", fname);
    }
    *ret = root;
    return 0;
}

int cpm_safetensors_parse(const uint8_t *buf, size_t len, const char *fname,
                          cpm_safetensors **ret, cpm_error *err) {
    *ret = NULL;
    if (len < 8)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: file is %zu bytes, too short for the 8-byte header length",
                             fname, len);
    uint64_t n = rd64(buf);
    if (n > CPM_SAFETENSORS_MAX_HEADER)
        return cpm_error_set(err, CPM_ELIMIT,
                             "%s: header length %llu is over the %u-byte limit", fname,
                             (unsigned long long)n, CPM_SAFETENSORS_MAX_HEADER);
    if (n > len - 8)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: header length %llu runs past the end of the file (%zu "
                             "bytes)",
                             fname, (unsigned long long)n, len);
    json_t *root;
    int rc = load_json(buf, n, fname, &root, err);
    if (rc < 0)
        return rc;
    cpm_safetensors *st = calloc(1, sizeof *st);
    if (!st) {
        json_decref(root);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", fname);
    }
    st->data_start = 8 + n;
    rc = parse_header(st, root, fname, len - st->data_start, err);
    if (rc < 0)
        st->count = 0; /* names still point into the JSON tree: nothing to free */
    json_decref(root);
    if (rc < 0) {
        cpm_safetensors_free(st);
        return rc;
    }
    *ret = st;
    return 0;
}

void cpm_safetensors_free(cpm_safetensors *st) {
    if (!st)
        return;
    if (st->count > 0)
        free((char *)st->entries[0].name);
    free(st->entries);
    free(st);
}

size_t cpm_safetensors_count(const cpm_safetensors *st) {
    return st->count;
}

const cpm_safetensors_entry *cpm_safetensors_at(const cpm_safetensors *st, size_t i) {
    return i < st->count ? &st->entries[i] : NULL;
}

uint64_t cpm_safetensors_data_start(const cpm_safetensors *st) {
    return st->data_start;
}

/* ---- writer ---- */

typedef struct write_order {
    const cpm_safetensors_tensor *t;
    size_t elsize;
} write_order;

static int cmp_write_order(const void *a, const void *b) {
    const write_order *x = a, *y = b;
    if (x->elsize != y->elsize)
        return x->elsize > y->elsize ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

static json_t *entry_json(const cpm_safetensors_tensor *t, uint64_t begin) {
    json_t *shape = json_array();
    for (int d = 0; d < t->ndim; d++)
        json_array_append_new(shape, json_integer(t->shape[d]));
    return json_pack("{s:s, s:o, s:[I,I]}", "dtype", t->dtype, "shape", shape,
                     "data_offsets", (json_int_t)begin, (json_int_t)(begin + t->nbytes));
}

/* Sorts ts into layout order and builds the header; *ret_order is the order. */
static int build_header(const cpm_safetensors_tensor *ts, size_t n, const char *path,
                        write_order **ret_order, char **ret_json, cpm_error *err) {
    write_order *order = calloc(n ? n : 1, sizeof *order);
    json_t *root = json_pack("{s:{s:s}}", "__metadata__", "format", "pt");
    if (!order || !root) {
        free(order);
        json_decref(root);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", path);
    }
    for (size_t i = 0; i < n; i++) {
        order[i].t = &ts[i];
        order[i].elsize = cpm_safetensors_dtype_size(ts[i].dtype);
        uint64_t numel = 1;
        for (int d = 0; d < ts[i].ndim; d++)
            numel *= (uint64_t)ts[i].shape[d];
        if (order[i].elsize == 0 || ts[i].ndim > CPM_SAFETENSORS_MAX_DIMS ||
            numel * order[i].elsize != ts[i].nbytes) {
            free(order);
            json_decref(root);
            return cpm_error_set(err, CPM_EINVAL, "%s: tensor %s: bad dtype, shape or size",
                                 path, ts[i].name);
        }
    }
    qsort(order, n, sizeof *order, cmp_write_order);
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        json_object_set_new(root, order[i].t->name, entry_json(order[i].t, off));
        off += order[i].t->nbytes;
    }
    *ret_json = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    *ret_order = order;
    if (!*ret_json) {
        free(order);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", path);
    }
    return 0;
}

static int write_all(FILE *f, const char *path, const write_order *order, size_t n,
                     const char *json, cpm_error *err) {
    size_t jlen = strlen(json);
    size_t pad = (8 - jlen % 8) % 8; /* keeps the data section 8-byte aligned */
    uint64_t hlen = jlen + pad;
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; i++)
        lenbuf[i] = (uint8_t)(hlen >> (8 * i));
    bool ok = fwrite(lenbuf, 1, 8, f) == 8 && fwrite(json, 1, jlen, f) == jlen &&
              fwrite("        ", 1, pad, f) == pad;
    for (size_t i = 0; ok && i < n; i++)
        ok = fwrite(order[i].t->data, 1, order[i].t->nbytes, f) == order[i].t->nbytes;
    if (!ok)
        return cpm_error_set(err, CPM_EIO, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

int cpm_safetensors_write(const char *path, const cpm_safetensors_tensor *ts, size_t n,
                          cpm_error *err) {
    write_order *order = NULL;
    char *json;
    int rc = build_header(ts, n, path, &order, &json, err);
    if (rc < 0)
        return rc;
    FILE *f = fopen(path, "wb");
    if (!f)
        rc = cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
    else
        rc = write_all(f, path, order, n, json, err);
    if (f && fclose(f) != 0 && rc == 0)
        rc = cpm_error_set(err, CPM_EIO, "%s: %s", path, strerror(errno));
    free(order);
    free(json);
    return rc;
}
