/* convert_bin.c - cpm-convert-bin: pytorch_model.bin(+index) -> model.safetensors(+index).
 *
 * Reads the torch checkpoint through the engine's own loader (the restricted
 * unpickler), writes safetensors shards, copies the other files of the directory
 * (config, tokenizer) across, then reopens the result and compares every tensor.
 *
 *   cpm-convert-bin --in DIR --out DIR [--max-shard-bytes N]
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cli.h"
#include "shard/engine/model/checkpoint.h"
#include "shard/engine/model/safetensors.h"

#define DEFAULT_MAX_SHARD (4ull << 30) /* shard past 4 GiB, as the brief for HF repos */

typedef struct options {
    const char *in, *out;
    unsigned long long max_shard;
} options;

enum { OPT_IN = 1, OPT_OUT, OPT_MAX_SHARD_BYTES };

static const cpm_cli_opt opts[] = {
    {"in", 0, "DIR", "the directory with pytorch_model.bin or its index (required)", OPT_IN},
    {"out", 0, "DIR", "where model.safetensors goes (required)", OPT_OUT},
    {"max-shard-bytes", 0, "N", "shard with an index past N bytes (default 4 GiB)",
     OPT_MAX_SHARD_BYTES},
    {0},
};

static void parse_args(int argc, char **argv, options *o) {
    cpm_cli cli = {.prog = "cpm-convert-bin", .synopsis = "--in DIR --out DIR [--max-shard-bytes N]",
                   .tables = {opts},
                   .about = "Converts pytorch_model.bin (or its sharded index) in DIR to\n"
                            "model.safetensors and copies the directory's other files (config,\n"
                            "tokenizer) across.\n"};
    o->max_shard = DEFAULT_MAX_SHARD;
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;) {
        switch (c) {
        case OPT_IN: o->in = v; break;
        case OPT_OUT: o->out = v; break;
        case OPT_MAX_SHARD_BYTES:
            o->max_shard = (unsigned long long)cpm_cli_int(&cli, v, 1, LLONG_MAX);
            break;
        }
    }
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    if (!o->in || !o->out)
        cpm_cli_fail(&cli, "--in DIR and --out DIR are required");
}

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static bool file_exists(const char *dir, const char *name) {
    char *p = path_join(dir, name);
    bool ok = p && access(p, F_OK) == 0;
    free(p);
    return ok;
}

/* ---- tensors ---- */

static cpm_safetensors_tensor *collect(const cpm_checkpoint *ck, size_t *ret_n) {
    size_t n = cpm_checkpoint_count(ck);
    cpm_safetensors_tensor *ts = calloc(n ? n : 1, sizeof *ts);
    if (!ts)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        const cpm_tensor_view *v = cpm_checkpoint_at(ck, i);
        ts[i].name = v->name;
        ts[i].dtype = cpm_dtype_name(v->dtype);
        ts[i].ndim = v->ndim;
        memcpy(ts[i].shape, v->shape, (size_t)v->ndim * sizeof v->shape[0]);
        ts[i].data = v->data;
        ts[i].nbytes = v->nbytes;
    }
    for (size_t i = 0; i < cpm_checkpoint_unsupported_count(ck); i++) {
        const char *why;
        const char *name = cpm_checkpoint_unsupported_at(ck, i, &why);
        fprintf(stderr, "cpm-convert-bin: skipping tensor %s: %s\n", name, why);
    }
    *ret_n = n;
    return ts;
}

/* Assigns tensors, in checkpoint order, to shards of at most max bytes
 * (a larger tensor gets a shard of its own). Returns the shard count. */
static size_t plan_shards(const cpm_safetensors_tensor *ts, size_t n, unsigned long long max,
                          size_t *shard_of) {
    size_t shard = 0;
    unsigned long long used = 0;
    for (size_t i = 0; i < n; i++) {
        if (used > 0 && used + ts[i].nbytes > max) {
            shard++;
            used = 0;
        }
        shard_of[i] = shard;
        used += ts[i].nbytes;
    }
    return n ? shard + 1 : 1;
}

static int write_index(const char *out, const cpm_safetensors_tensor *ts, size_t n,
                       const size_t *shard_of, size_t nshards, cpm_error *err) {
    json_t *map = json_object();
    unsigned long long total = 0;
    char name[64];
    for (size_t i = 0; i < n; i++) {
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", shard_of[i] + 1,
                 nshards);
        json_object_set_new(map, ts[i].name, json_string(name));
        total += ts[i].nbytes;
    }
    json_t *root = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)total,
                             "weight_map", map);
    char *path = path_join(out, "model.safetensors.index.json");
    int rc = 0;
    if (!root || !path || json_dump_file(root, path, JSON_INDENT(2)) != 0)
        rc = cpm_error_set(err, CPM_EIO, "%s: cannot write the index", out);
    json_decref(root);
    free(path);
    return rc;
}

static int write_sharded(const char *out, const cpm_safetensors_tensor *ts, size_t n,
                         const size_t *shard_of, size_t nshards, cpm_error *err) {
    cpm_safetensors_tensor *part = calloc(n ? n : 1, sizeof *part);
    int rc = part ? 0 : cpm_error_set(err, CPM_ENOMEM, "out of memory");
    char name[64];
    for (size_t s = 0; rc == 0 && s < nshards; s++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (shard_of[i] == s)
                part[k++] = ts[i];
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, nshards);
        char *path = path_join(out, name);
        rc = path ? cpm_safetensors_write(path, part, k, err)
                  : cpm_error_set(err, CPM_ENOMEM, "out of memory");
        free(path);
    }
    free(part);
    return rc == 0 ? write_index(out, ts, n, shard_of, nshards, err) : rc;
}

static int write_weights(const options *o, const cpm_checkpoint *ck, cpm_error *err) {
    size_t n = 0;
    cpm_safetensors_tensor *ts = collect(ck, &n);
    size_t *shard_of = calloc(n ? n : 1, sizeof *shard_of);
    if (!ts || !shard_of) {
        free(ts);
        free(shard_of);
        return cpm_error_set(err, CPM_ENOMEM, "out of memory");
    }
    size_t nshards = plan_shards(ts, n, o->max_shard, shard_of);
    int rc;
    if (nshards == 1) {
        char *path = path_join(o->out, "model.safetensors");
        rc = path ? cpm_safetensors_write(path, ts, n, err)
                  : cpm_error_set(err, CPM_ENOMEM, "out of memory");
        free(path);
    } else {
        rc = write_sharded(o->out, ts, n, shard_of, nshards, err);
    }
    free(ts);
    free(shard_of);
    return rc;
}

/* ---- other files ---- */

/* Weight files and indexes, ours or the input's, are never copied. */
static bool is_weight_file(const char *name) {
    return (!strncmp(name, "pytorch_model", 13) && strstr(name, ".bin")) ||
           strstr(name, ".safetensors");
}

static bool same_dir(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

static int copy_file(const char *from, const char *to, cpm_error *err) {
    FILE *in = fopen(from, "rb"), *out = in ? fopen(to, "wb") : NULL;
    int rc = 0;
    char buf[1 << 16];
    size_t n;
    if (!in || !out)
        rc = cpm_error_set(err, CPM_EIO, "%s: %s", in ? to : from, strerror(errno));
    while (rc == 0 && (n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n)
            rc = cpm_error_set(err, CPM_EIO, "%s: %s", to, strerror(errno));
    if (in && ferror(in) && rc == 0)
        rc = cpm_error_set(err, CPM_EIO, "%s: read error", from);
    if (in)
        fclose(in);
    if (out && fclose(out) != 0 && rc == 0)
        rc = cpm_error_set(err, CPM_EIO, "%s: %s", to, strerror(errno));
    return rc;
}

/* Copies every regular file except weights (config.json,
 * generation_config.json, tokenizer files, modeling code...). */
static int copy_others(const options *o, cpm_error *err) {
    if (same_dir(o->in, o->out))
        return 0;
    DIR *d = opendir(o->in);
    if (!d)
        return cpm_error_set(err, CPM_EIO, "%s: %s", o->in, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d))) {
        char *from = path_join(o->in, de->d_name), *to = path_join(o->out, de->d_name);
        struct stat st;
        if (!from || !to)
            rc = cpm_error_set(err, CPM_ENOMEM, "out of memory");
        else if (stat(from, &st) == 0 && S_ISREG(st.st_mode) && !is_weight_file(de->d_name))
            rc = copy_file(from, to, err);
        free(from);
        free(to);
    }
    closedir(d);
    return rc;
}

/* ---- check ---- */

static int verify(const options *o, const cpm_checkpoint *src, cpm_error *err) {
    cpm_checkpoint *dst;
    int rc = cpm_checkpoint_open(o->out, &dst, err);
    if (rc < 0)
        return cpm_error_prefix(err, "re-reading the output");
    if (cpm_checkpoint_count(dst) != cpm_checkpoint_count(src))
        rc = cpm_error_set(err, CPM_EINTERNAL, "output has %zu tensors, input %zu",
                           cpm_checkpoint_count(dst), cpm_checkpoint_count(src));
    for (size_t i = 0; rc == 0 && i < cpm_checkpoint_count(src); i++) {
        const cpm_tensor_view *a = cpm_checkpoint_at(src, i);
        const cpm_tensor_view *b = cpm_checkpoint_find(dst, a->name);
        if (!b || b->dtype != a->dtype || b->ndim != a->ndim || b->nbytes != a->nbytes ||
            memcmp(b->shape, a->shape, (size_t)a->ndim * sizeof a->shape[0]) ||
            memcmp(b->data, a->data, a->nbytes))
            rc = cpm_error_set(err, CPM_EINTERNAL, "tensor %s differs after conversion",
                               a->name);
    }
    cpm_checkpoint_free(dst);
    return rc;
}

static int convert(const options *o, cpm_error *err) {
    const char *src_name = file_exists(o->in, "pytorch_model.bin.index.json")
                               ? "pytorch_model.bin.index.json"
                               : "pytorch_model.bin";
    cpm_checkpoint *ck;
    int rc = cpm_checkpoint_open_file(o->in, src_name, &ck, err);
    if (rc < 0)
        return rc;
    if (mkdir(o->out, 0755) != 0 && errno != EEXIST)
        rc = cpm_error_set(err, CPM_EIO, "%s: %s", o->out, strerror(errno));
    if (rc == 0)
        rc = write_weights(o, ck, err);
    if (rc == 0)
        rc = copy_others(o, err);
    if (rc == 0)
        rc = verify(o, ck, err);
    if (rc == 0)
        printf("cpm-convert-bin: %zu tensors from %s/%s written to %s\n",
               cpm_checkpoint_count(ck), o->in, src_name, o->out);
    cpm_checkpoint_free(ck);
    return rc;
}

int main(int argc, char **argv) {
    options o = {0};
    parse_args(argc, argv, &o);
    cpm_error err = {0};
    if (convert(&o, &err) < 0) {
        fprintf(stderr, "cpm-convert-bin: %s\n", err.msg);
        return 1;
    }
    return 0;
}
