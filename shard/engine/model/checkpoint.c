/* checkpoint.c - the tensors of a checkpoint directory, behind one table.
 *
 * Finds the weight files (safetensors or torch zip, single or sharded), maps each
 * once, lets the format parsers validate them, and serves views by pointer into
 * the mappings. Tensors whose dtype or rank the engine cannot use stay listed
 * apart, so that only a request for one of them fails.
 */
#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "torch_pickle.h"
#include "zip_reader.h"

typedef struct ck_file {
    char *name; /* as listed, no directory */
    const uint8_t *map;
    size_t len;
} ck_file;

typedef struct ck_tensor {
    cpm_tensor_view view;
    char *unsupported; /* why the engine cannot use it, or NULL */
    void *owned;       /* a copy made at open time, or NULL */
    bool i32;          /* I32 (GPTQ packed ints): unsupported, but served by expect_i32 */
} ck_tensor;

struct cpm_checkpoint {
    char *dir;
    ck_file *files;
    size_t nfiles, cap_files;
    ck_tensor *all; /* file order */
    size_t nall, cap_all;
    size_t *usable; /* indices into all of the tensors the engine can use */
    size_t nusable;
    const ck_tensor **by_name;
};

/* ---- growing arrays ---- */

static int grow(void **arr, size_t *cap, size_t need, size_t elsize) {
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : 16;
    while (n < need)
        n *= 2;
    void *p = realloc(*arr, n * elsize);
    if (!p)
        return CPM_ENOMEM;
    memset((char *)p + *cap * elsize, 0, (n - *cap) * elsize);
    *arr = p;
    *cap = n;
    return 0;
}

static ck_tensor *new_tensor(cpm_checkpoint *ck, const ck_file *f, const char *name,
                             cpm_error *err) {
    if (grow((void **)&ck->all, &ck->cap_all, ck->nall + 1, sizeof *ck->all) < 0) {
        cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", f->name);
        return NULL;
    }
    ck_tensor *t = &ck->all[ck->nall];
    memset(t, 0, sizeof *t);
    if (!(t->view.name = strdup(name))) {
        cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", f->name);
        return NULL;
    }
    t->view.file = f->name;
    ck->nall++;
    return t;
}

static int mark_unsupported(ck_tensor *t, const char *why, cpm_error *err) {
    if (!(t->unsupported = strdup(why)))
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", t->view.file);
    return 0;
}

/* ---- files ---- */

static int errno_code(int e) {
    return e == ENOENT ? CPM_ENOTFOUND : CPM_EIO;
}

static int map_file(const char *path, const uint8_t **ret_map, size_t *ret_len,
                    cpm_error *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return cpm_error_set(err, errno_code(errno), "%s: %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = cpm_error_set(err, CPM_EIO, "%s: not a readable regular file", path);
    } else if (st.st_size == 0) {
        *ret_map = (const uint8_t *)"";
        *ret_len = 0;
    } else {
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED)
            rc = cpm_error_set(err, CPM_EIO, "%s: mmap: %s", path, strerror(errno));
        else
            *ret_map = m, *ret_len = (size_t)st.st_size;
    }
    close(fd);
    return rc;
}

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int add_file(cpm_checkpoint *ck, const char *name, ck_file **ret, cpm_error *err) {
    if (grow((void **)&ck->files, &ck->cap_files, ck->nfiles + 1, sizeof *ck->files) < 0)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    ck_file *f = &ck->files[ck->nfiles];
    char *path = join(ck->dir, name);
    if (!path || !(f->name = strdup(name))) {
        free(path);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", name);
    }
    int rc = map_file(path, &f->map, &f->len, err);
    free(path);
    if (rc < 0) {
        free(f->name);
        f->name = NULL;
        return rc;
    }
    ck->nfiles++;
    *ret = f;
    return 0;
}

/* ---- safetensors ---- */

/* Points the view at src, or at an aligned copy when src is not aligned to the
 * element size (kernels read elements through typed pointers). */
static int set_data(ck_tensor *t, const uint8_t *src, size_t nbytes, size_t elsize,
                    cpm_error *err) {
    t->view.nbytes = nbytes;
    if (elsize == 0 || (uintptr_t)src % elsize == 0) {
        t->view.data = src;
        return 0;
    }
    if (!(t->owned = malloc(nbytes ? nbytes : 1)))
        return cpm_error_set(err, CPM_ENOMEM, "%s: tensor %s: out of memory", t->view.file,
                             t->view.name);
    memcpy(t->owned, src, nbytes);
    t->view.data = t->owned;
    return 0;
}

/* Fills dtype and shape, or records why the engine cannot use the tensor. */
static int set_type(ck_tensor *t, const char *dtype, int ndim, const int64_t *shape,
                    cpm_error *err) {
    char why[96];
    if (!strcmp(dtype, "I32") && ndim <= CPM_TENSOR_MAX_DIMS) {
        t->i32 = true; /* shape kept for cpm_checkpoint_expect_i32 */
        t->view.ndim = ndim;
        memcpy(t->view.shape, shape, (size_t)ndim * sizeof *shape);
    }
    if (!cpm_safetensors_dtype_engine(dtype, &t->view.dtype)) {
        snprintf(why, sizeof why, "dtype %.40s is not supported (F32, F16, BF16 are)", dtype);
        return mark_unsupported(t, why, err);
    }
    if (ndim > CPM_TENSOR_MAX_DIMS) {
        snprintf(why, sizeof why, "%d dimensions, at most %d are supported", ndim,
                 CPM_TENSOR_MAX_DIMS);
        return mark_unsupported(t, why, err);
    }
    t->view.ndim = ndim;
    memcpy(t->view.shape, shape, (size_t)ndim * sizeof *shape);
    return 0;
}

static int load_safetensors(cpm_checkpoint *ck, const ck_file *f, cpm_error *err) {
    cpm_safetensors *st;
    int rc = cpm_safetensors_parse(f->map, f->len, f->name, &st, err);
    if (rc < 0)
        return rc;
    const uint8_t *data = f->map + cpm_safetensors_data_start(st);
    for (size_t i = 0; rc == 0 && i < cpm_safetensors_count(st); i++) {
        const cpm_safetensors_entry *e = cpm_safetensors_at(st, i);
        ck_tensor *t = new_tensor(ck, f, e->name, err);
        if (!t) {
            rc = err ? err->code : CPM_ENOMEM;
            break;
        }
        rc = set_type(t, e->dtype, e->ndim, e->shape, err);
        if (rc == 0)
            rc = set_data(t, data + e->begin, (size_t)(e->end - e->begin), e->elsize, err);
    }
    cpm_safetensors_free(st);
    return rc;
}

/* ---- torch zip ---- */

/* The one "<archive>/data.pkl" entry; *ret_prefix gets "<archive>/". */
static int find_pickle(const cpm_zip_reader *zr, const char *fname,
                       const cpm_zip_entry **ret, char *prefix, size_t cap, cpm_error *err) {
    const cpm_zip_entry *found = NULL;
    for (size_t i = 0; i < cpm_zip_reader_count(zr); i++) {
        const cpm_zip_entry *e = cpm_zip_reader_at(zr, i);
        const char *slash = strchr(e->name, '/');
        if (!slash || strcmp(slash, "/data.pkl") != 0)
            continue;
        if (found)
            return cpm_error_set(err, CPM_EFORMAT, "%s: both %s and %s: which is the model?",
                                 fname, found->name, e->name);
        found = e;
    }
    if (!found)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: no <archive>/data.pkl entry: not a torch.save archive",
                             fname);
    size_t n = (size_t)(strchr(found->name, '/') - found->name) + 1;
    if (n >= cap)
        return cpm_error_set(err, CPM_ELIMIT, "%s: archive name too long", fname);
    memcpy(prefix, found->name, n);
    prefix[n] = '\0';
    *ret = found;
    return 0;
}

/* torch writes "<archive>/byteorder" since 1.13; absent means little-endian. */
static int check_byteorder(const cpm_zip_reader *zr, const ck_file *f, const char *prefix,
                           cpm_error *err) {
    char name[300];
    snprintf(name, sizeof name, "%sbyteorder", prefix);
    const cpm_zip_entry *e = cpm_zip_reader_find(zr, name);
    if (!e)
        return 0;
    int rc = cpm_zip_reader_check_stored(zr, e, NULL, err);
    if (rc < 0)
        return rc;
    if (e->size != 6 || memcmp(f->map + e->offset, "little", 6) != 0)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: %s: only little-endian archives are supported", f->name,
                             name);
    return 0;
}

static bool mul_add(uint64_t *acc, uint64_t a, uint64_t b) {
    uint64_t p;
    return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(*acc, p, acc);
}

/* Checks that every element the view reaches lies inside its storage;
 * *ret_numel gets the view's element count. */
static int check_view(const cpm_torch_tensor *tt, const char *fname, uint64_t *ret_numel,
                      cpm_error *err) {
    uint64_t numel = 1, last = tt->offset;
    bool ok = true;
    for (int d = 0; d < tt->ndim; d++) {
        if (tt->size[d] == 0) {
            *ret_numel = 0;
            return 0;
        }
    }
    for (int d = 0; d < tt->ndim; d++) {
        ok = ok && !__builtin_mul_overflow(numel, (uint64_t)tt->size[d], &numel);
        ok = ok && mul_add(&last, (uint64_t)tt->size[d] - 1, (uint64_t)tt->stride[d]);
    }
    if (!ok || last >= tt->storage_numel)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: view (offset %llu) reaches past its storage %s "
                             "of %llu elements",
                             fname, tt->name, (unsigned long long)tt->offset, tt->storage_key,
                             (unsigned long long)tt->storage_numel);
    *ret_numel = numel;
    return 0;
}

static bool is_contiguous(const cpm_torch_tensor *tt) {
    int64_t expect = 1;
    for (int d = tt->ndim - 1; d >= 0; d--) {
        if (tt->size[d] != 1 && tt->stride[d] != expect)
            return false;
        expect *= tt->size[d];
    }
    return true;
}

/* Gathers a strided view into dst, row-major. Bounds were checked by check_view. */
static void gather(uint8_t *dst, const uint8_t *base, const cpm_torch_tensor *tt,
                   uint64_t numel) {
    int64_t idx[CPM_TORCH_MAX_DIMS] = {0};
    for (uint64_t n = 0; n < numel; n++) {
        uint64_t off = tt->offset;
        for (int d = 0; d < tt->ndim; d++)
            off += (uint64_t)idx[d] * (uint64_t)tt->stride[d];
        memcpy(dst + n * tt->elsize, base + off * tt->elsize, tt->elsize);
        for (int d = tt->ndim - 1; d >= 0 && ++idx[d] == tt->size[d]; d--)
            idx[d] = 0;
    }
}

static int storage_of(const cpm_zip_reader *zr, const ck_file *f, const char *prefix,
                      const cpm_torch_tensor *tt, const cpm_zip_entry **ret, cpm_error *err) {
    char name[512];
    snprintf(name, sizeof name, "%sdata/%s", prefix, tt->storage_key);
    const cpm_zip_entry *e = cpm_zip_reader_find(zr, name);
    if (!e)
        return cpm_error_set(err, CPM_EFORMAT, "%s: tensor %s: storage entry %s is missing",
                             f->name, tt->name, name);
    int rc = cpm_zip_reader_check_stored(zr, e, tt->name, err);
    if (rc < 0)
        return rc;
    uint64_t want;
    if (__builtin_mul_overflow(tt->storage_numel, (uint64_t)tt->elsize, &want) ||
        want != e->size)
        return cpm_error_set(err, CPM_EFORMAT,
                             "%s: tensor %s: storage %s holds %llu bytes, the pickle says "
                             "%llu elements of %zu bytes",
                             f->name, tt->name, name, (unsigned long long)e->size,
                             (unsigned long long)tt->storage_numel, tt->elsize);
    *ret = e;
    return 0;
}

static int add_torch_tensor(cpm_checkpoint *ck, const ck_file *f, const cpm_zip_reader *zr,
                            const char *prefix, const cpm_torch_tensor *tt, cpm_error *err) {
    const cpm_zip_entry *e = NULL;
    uint64_t numel;
    int rc = storage_of(zr, f, prefix, tt, &e, err);
    if (rc == 0)
        rc = check_view(tt, f->name, &numel, err);
    if (rc < 0)
        return rc;
    ck_tensor *t = new_tensor(ck, f, tt->name, err);
    if (!t)
        return err ? err->code : CPM_ENOMEM;
    if ((rc = set_type(t, tt->dtype, tt->ndim, tt->size, err)) < 0)
        return rc;
    const uint8_t *base = f->map + e->offset;
    size_t nbytes = (size_t)(numel * tt->elsize);
    if (is_contiguous(tt))
        return set_data(t, base + tt->offset * tt->elsize, nbytes, tt->elsize, err);
    if (!(t->owned = malloc(nbytes ? nbytes : 1)))
        return cpm_error_set(err, CPM_ENOMEM, "%s: tensor %s: out of memory", f->name,
                             tt->name);
    gather(t->owned, base, tt, numel);
    t->view.data = t->owned;
    t->view.nbytes = nbytes;
    return 0;
}

static int parse_pickle(const cpm_zip_reader *zr, const ck_file *f, const cpm_zip_entry *pk,
                        cpm_torch_pickle **ret, cpm_error *err) {
    int rc = cpm_zip_reader_check_stored(zr, pk, NULL, err);
    if (rc < 0)
        return rc;
    const uint8_t *p = f->map + pk->offset;
    if (cpm_zip_crc32(0, p, (size_t)pk->size) != pk->crc32)
        return cpm_error_set(err, CPM_EFORMAT, "%s: %s: CRC mismatch (corrupt archive)",
                             f->name, pk->name);
    char where[400];
    snprintf(where, sizeof where, "%s: %s", f->name, pk->name);
    return cpm_torch_pickle_parse(p, (size_t)pk->size, where, ret, err);
}

static int load_torch(cpm_checkpoint *ck, const ck_file *f, cpm_error *err) {
    if (f->len >= 2 && f->map[0] == 0x80)
        return cpm_error_set(err, CPM_EUNSUPPORTED,
                             "%s: legacy (pre-1.6) torch.save format; re-save it with a "
                             "recent torch",
                             f->name);
    cpm_zip_reader *zr;
    cpm_torch_pickle *tp = NULL;
    const cpm_zip_entry *pk = NULL;
    char prefix[256];
    int rc = cpm_zip_reader_open(f->map, f->len, f->name, &zr, err);
    if (rc < 0)
        return rc;
    rc = find_pickle(zr, f->name, &pk, prefix, sizeof prefix, err);
    if (rc == 0)
        rc = check_byteorder(zr, f, prefix, err);
    if (rc == 0)
        rc = parse_pickle(zr, f, pk, &tp, err);
    for (size_t i = 0; rc == 0 && i < cpm_torch_pickle_count(tp); i++)
        rc = add_torch_tensor(ck, f, zr, prefix, cpm_torch_pickle_at(tp, i), err);
    cpm_torch_pickle_free(tp);
    cpm_zip_reader_free(zr);
    return rc;
}

/* ---- directory layouts ---- */

static bool is_safetensors_name(const char *name) {
    size_t n = strlen(name), k = strlen(".safetensors");
    return n > k && !strcmp(name + n - k, ".safetensors");
}

static int load_weights(cpm_checkpoint *ck, const char *name, cpm_error *err) {
    ck_file *f = NULL;
    int rc = add_file(ck, name, &f, err);
    if (rc < 0)
        return rc;
    return is_safetensors_name(name) ? load_safetensors(ck, f, err) : load_torch(ck, f, err);
}

static const ck_tensor *find_any(const cpm_checkpoint *ck, const char *name);

/* A shard name from the index must stay inside the directory. */
static bool is_plain_name(const char *s) {
    return s[0] && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static int index_load_shards(cpm_checkpoint *ck, const char *index, const json_t *map,
                             cpm_error *err) {
    const char *tensor;
    const json_t *file;
    json_object_foreach((json_t *)map, tensor, file) {
        if (!json_is_string(file) || !is_plain_name(json_string_value(file)))
            return cpm_error_set(err, CPM_EFORMAT,
                                 "%s: tensor %s: weight_map value is not a file name", index,
                                 tensor);
        const char *fname = json_string_value(file);
        bool seen = false;
        for (size_t i = 0; i < ck->nfiles && !seen; i++)
            seen = !strcmp(ck->files[i].name, fname);
        if (seen)
            continue;
        int rc = load_weights(ck, fname, err);
        if (rc < 0)
            return rc == CPM_ENOTFOUND
                       ? cpm_error_set(err, rc, "%s: shard %s is missing from %s", index,
                                       fname, ck->dir)
                       : rc;
    }
    return 0;
}

static int index_check_map(const cpm_checkpoint *ck, const char *index, const json_t *map,
                           cpm_error *err) {
    const char *tensor;
    const json_t *file;
    json_object_foreach((json_t *)map, tensor, file) {
        const ck_tensor *t = find_any(ck, tensor);
        if (!t)
            return cpm_error_set(err, CPM_EFORMAT, "%s: tensor %s: not in %s, as listed",
                                 index, tensor, json_string_value(file));
        if (strcmp(t->view.file, json_string_value(file)) != 0)
            return cpm_error_set(err, CPM_EFORMAT,
                                 "%s: tensor %s: listed in %s but found in %s", index, tensor,
                                 json_string_value(file), t->view.file);
    }
    return 0;
}

static int cmp_tensor_name(const void *a, const void *b) {
    const ck_tensor *const *x = a, *const *y = b;
    return strcmp((*x)->view.name, (*y)->view.name);
}

/* Sorts the name index and refuses a name that appears twice. */
static int build_index(cpm_checkpoint *ck, cpm_error *err) {
    ck->by_name = malloc((ck->nall ? ck->nall : 1) * sizeof *ck->by_name);
    ck->usable = malloc((ck->nall ? ck->nall : 1) * sizeof *ck->usable);
    if (!ck->by_name || !ck->usable)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", ck->dir);
    ck->nusable = 0;
    for (size_t i = 0; i < ck->nall; i++) {
        ck->by_name[i] = &ck->all[i];
        if (!ck->all[i].unsupported)
            ck->usable[ck->nusable++] = i;
    }
    qsort(ck->by_name, ck->nall, sizeof *ck->by_name, cmp_tensor_name);
    for (size_t i = 1; i < ck->nall; i++) {
        const ck_tensor *a = ck->by_name[i - 1], *b = ck->by_name[i];
        if (a > b) { /* name them in load order */
            const ck_tensor *tmp = a;
            a = b;
            b = tmp;
        }
        if (!strcmp(a->view.name, b->view.name))
            return cpm_error_set(err, CPM_EFORMAT, "tensor %s: in both %s and %s",
                                 a->view.name, a->view.file, b->view.file);
    }
    return 0;
}

static int load_index(cpm_checkpoint *ck, const char *index, cpm_error *err) {
    char *path = join(ck->dir, index);
    if (!path)
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", index);
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    free(path);
    if (!root)
        return cpm_error_set(err, CPM_EFORMAT, "%s: not valid JSON: %s (line %d)", index,
                             jerr.text, jerr.line);
    const json_t *map = json_object_get(root, "weight_map");
    int rc = 0;
    if (!json_is_object(map))
        rc = cpm_error_set(err, CPM_EFORMAT, "%s: no weight_map object", index);
    if (rc == 0)
        rc = index_load_shards(ck, index, map, err);
    if (rc == 0)
        rc = build_index(ck, err);
    if (rc == 0)
        rc = index_check_map(ck, index, map, err);
    json_decref(root);
    return rc;
}

static bool exists(const char *dir, const char *name) {
    char *p = join(dir, name);
    bool ok = p && access(p, F_OK) == 0;
    free(p);
    return ok;
}

/* In the order Hugging Face transformers looks for them. */
static const char *const weight_names[] = {
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
};

int cpm_checkpoint_open_file(const char *dir, const char *name, cpm_checkpoint **ret,
                             cpm_error *err) {
    *ret = NULL;
    cpm_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->dir = strdup(dir))) {
        free(ck);
        return cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", dir);
    }
    size_t n = strlen(name), k = strlen(".index.json");
    bool is_index = n > k && !strcmp(name + n - k, ".index.json");
    int rc = is_index ? load_index(ck, name, err) : load_weights(ck, name, err);
    if (rc == 0 && !is_index)
        rc = build_index(ck, err);
    if (rc < 0) {
        cpm_checkpoint_free(ck);
        return rc;
    }
    *ret = ck;
    return 0;
}

int cpm_checkpoint_open(const char *dir, cpm_checkpoint **ret, cpm_error *err) {
    *ret = NULL;
    for (size_t i = 0; i < sizeof weight_names / sizeof weight_names[0]; i++)
        if (exists(dir, weight_names[i]))
            return cpm_checkpoint_open_file(dir, weight_names[i], ret, err);
    return cpm_error_set(err, CPM_ENOTFOUND,
                         "%s: no model.safetensors, model.safetensors.index.json, "
                         "pytorch_model.bin or pytorch_model.bin.index.json",
                         dir);
}

void cpm_checkpoint_free(cpm_checkpoint *ck) {
    if (!ck)
        return;
    for (size_t i = 0; i < ck->nall; i++) {
        free((char *)ck->all[i].view.name);
        free(ck->all[i].unsupported);
        free(ck->all[i].owned);
    }
    for (size_t i = 0; i < ck->nfiles; i++) {
        if (ck->files[i].len > 0)
            munmap((void *)ck->files[i].map, ck->files[i].len);
        free(ck->files[i].name);
    }
    free(ck->all);
    free(ck->files);
    free(ck->usable);
    free(ck->by_name);
    free(ck->dir);
    free(ck);
}

void cpm_checkpoint_release(const cpm_checkpoint *ck, const void *p, size_t n) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p, b = a + n;
    for (size_t i = 0; page > 0 && i < ck->nfiles; i++) {
        uintptr_t lo = (uintptr_t)ck->files[i].map, hi = lo + ck->files[i].len;
        if (ck->files[i].len == 0 || a < lo || b > hi)
            continue;
        /* whole pages inside [a, b) only: a neighbouring tensor may share the edge pages */
        uintptr_t first = (a + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
        uintptr_t last = b / (uintptr_t)page * (uintptr_t)page;
        if (first < last)
            madvise((void *)first, last - first, MADV_DONTNEED);
        return;
    }
}

int cpm_checkpoint_copy(const cpm_checkpoint *ck, const void *p, size_t n, void *dst) {
    uintptr_t a = (uintptr_t)p;
    for (size_t i = 0; i < ck->nfiles; i++) {
        uintptr_t lo = (uintptr_t)ck->files[i].map;
        if (ck->files[i].len == 0 || a < lo || a + n > lo + ck->files[i].len)
            continue;
        char *path = join(ck->dir, ck->files[i].name);
        int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        free(path);
        if (fd < 0)
            return -1;
        size_t got = 0;
        while (got < n) {
            ssize_t r = pread(fd, (char *)dst + got, n - got, (off_t)(a - lo + got));
            if (r <= 0 && !(r < 0 && errno == EINTR))
                break;
            got += r > 0 ? (size_t)r : 0;
        }
        close(fd);
        return got == n ? 0 : -1;
    }
    return -1;
}

/* ---- lookups ---- */

size_t cpm_checkpoint_count(const cpm_checkpoint *ck) {
    return ck->nusable;
}

const cpm_tensor_view *cpm_checkpoint_at(const cpm_checkpoint *ck, size_t i) {
    return i < ck->nusable ? &ck->all[ck->usable[i]].view : NULL;
}

static const ck_tensor *find_any(const cpm_checkpoint *ck, const char *name) {
    size_t lo = 0, hi = ck->nall;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, ck->by_name[mid]->view.name);
        if (c == 0)
            return ck->by_name[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const cpm_tensor_view *cpm_checkpoint_find(const cpm_checkpoint *ck, const char *name) {
    const ck_tensor *t = find_any(ck, name);
    return t && !t->unsupported ? &t->view : NULL;
}

size_t cpm_checkpoint_unsupported_count(const cpm_checkpoint *ck) {
    return ck->nall - ck->nusable;
}

const char *cpm_checkpoint_unsupported_at(const cpm_checkpoint *ck, size_t i,
                                          const char **ret_reason) {
    for (size_t k = 0; k < ck->nall; k++) {
        if (ck->all[k].unsupported && i-- == 0) {
            if (ret_reason)
                *ret_reason = ck->all[k].unsupported;
            return ck->all[k].view.name;
        }
    }
    return NULL;
}

static void format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && n < cap; d++) {
        if (shape[d] < 0)
            n += (size_t)snprintf(buf + n, cap - n, "%s*", d ? "," : "");
        else
            n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? "," : "",
                                  (long long)shape[d]);
    }
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
}

static int check_shape(const ck_tensor *t, const char *name, int ndim, const int64_t *shape,
                       cpm_error *err) {
    bool ok = t->view.ndim == ndim;
    for (int d = 0; ok && d < ndim; d++)
        ok = shape[d] < 0 || shape[d] == t->view.shape[d];
    if (!ok) {
        char have[160], want[160];
        format_shape(have, sizeof have, t->view.ndim, t->view.shape);
        format_shape(want, sizeof want, ndim, shape);
        return cpm_error_set(err, CPM_ESHAPE, "%s: tensor %s: shape %s, expected %s",
                             t->view.file, name, have, want);
    }
    return 0;
}

int cpm_checkpoint_expect(const cpm_checkpoint *ck, const char *name, int ndim,
                          const int64_t *shape, const cpm_tensor_view **ret,
                          cpm_error *err) {
    if (ret)
        *ret = NULL;
    const ck_tensor *t = find_any(ck, name);
    if (!t)
        return cpm_error_set(err, CPM_ENOTFOUND, "tensor %s: missing from %s", name, ck->dir);
    if (t->unsupported)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "%s: tensor %s: %s", t->view.file, name,
                             t->unsupported);
    int rc = check_shape(t, name, ndim, shape, err);
    if (rc == 0 && ret)
        *ret = &t->view;
    return rc;
}

int cpm_checkpoint_expect_i32(const cpm_checkpoint *ck, const char *name, int ndim,
                              const int64_t *shape, const int32_t **ret, cpm_error *err) {
    *ret = NULL;
    const ck_tensor *t = find_any(ck, name);
    if (!t)
        return cpm_error_set(err, CPM_ENOTFOUND, "tensor %s: missing from %s", name, ck->dir);
    if (!t->i32)
        return t->unsupported
                   ? cpm_error_set(err, CPM_EFORMAT, "%s: tensor %s: expected I32 (%s)",
                                   t->view.file, name, t->unsupported)
                   : cpm_error_set(err, CPM_EFORMAT, "%s: tensor %s: dtype %s, expected I32",
                                   t->view.file, name, cpm_dtype_name(t->view.dtype));
    int rc = check_shape(t, name, ndim, shape, err);
    if (rc == 0)
        *ret = t->view.data;
    return rc;
}
