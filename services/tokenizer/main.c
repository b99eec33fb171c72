/* main.c - cpm-tokenize: the tokenizer library on the command line, for tests,
 * benchmarks and debugging. Encode mode reads one JSON string per line and prints
 * the ids HF's encode() returns (bos included); --decode reads lines of ids and
 * prints one JSON string per line.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "services/tokenizer/tokenizer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: cpm-tokenize --model DIR [--decode [--skip-special] [--stream]] [--no-special]\n"
            "  encode (default): stdin lines are JSON strings; prints space-separated ids per line\n"
            "  --no-special      do not add bos/eos (HF add_special_tokens=False)\n"
            "  --decode          stdin lines are space-separated ids; prints a JSON string per line\n"
            "  --skip-special    with --decode: drop special tokens\n"
            "  --stream          with --decode: print the JSON array of streamed pieces instead\n");
}

static int encode_line(const cpm_tokenizer *tok, const char *line, size_t len, bool special,
                       cpm_error *err) {
    json_error_t jerr;
    json_t *v = json_loadb(line, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!json_is_string(v)) {
        json_decref(v);
        return cpm_error_set(err, CPM_EFORMAT, "not a JSON string (%s)", v ? "other JSON value" : jerr.text);
    }
    int32_t *ids;
    size_t n;
    int rc = cpm_tokenizer_encode(tok, json_string_value(v), json_string_length(v), special, &ids, &n, err);
    json_decref(v);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        printf(i ? " %d" : "%d", ids[i]);
    free(ids);
    return 0;
}

static int parse_ids(const char *line, int32_t **ret, size_t *ret_n, cpm_error *err) {
    size_t cap = 64, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    const char *p = line;
    while (ids) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < INT32_MIN || v > INT32_MAX || (*end && *end != ' ' && *end != '\t')) {
            free(ids);
            return cpm_error_set(err, CPM_EFORMAT, "not a list of integer ids");
        }
        if (n == cap) {
            int32_t *grown = realloc(ids, (cap *= 2) * sizeof *ids);
            if (!grown)
                free(ids);
            ids = grown;
            if (!ids)
                break;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    if (!ids)
        return cpm_error_set(err, CPM_ENOMEM, "out of memory");
    *ret = ids;
    *ret_n = n;
    return 0;
}

static void print_json_string(const char *s, size_t len) {
    json_t *v = json_stringn_nocheck(s, len);
    char *out = v ? json_dumps(v, JSON_ENCODE_ANY) : NULL;
    fputs(out ? out : "null", stdout);
    free(out);
    json_decref(v);
}

static int stream_line(const cpm_tokenizer *tok, const int32_t *ids, size_t n, bool skip, cpm_error *err) {
    cpm_detok *d = cpm_detok_new(tok, skip);
    if (!d)
        return cpm_error_set(err, CPM_ENOMEM, "out of memory");
    int rc = 0;
    const char *piece;
    size_t len;
    fputs("[", stdout);
    for (size_t i = 0; i <= n && rc == 0; i++) {
        rc = i < n ? cpm_detok_push(d, ids[i], &piece, &len, err) : cpm_detok_flush(d, &piece, &len, err);
        if (rc == 0) {
            fputs(i ? ", " : "", stdout);
            print_json_string(piece, len);
        }
    }
    fputs("]", stdout);
    cpm_detok_free(d);
    return rc;
}

static int decode_line(const cpm_tokenizer *tok, const char *line, bool skip, bool stream, cpm_error *err) {
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = parse_ids(line, &ids, &n, err);
    if (rc < 0)
        return rc;
    if (stream) {
        rc = stream_line(tok, ids, n, skip, err);
    } else {
        char *text;
        size_t len;
        rc = cpm_tokenizer_decode(tok, ids, n, skip, &text, &len, err);
        if (rc == 0)
            print_json_string(text, len);
        if (rc == 0)
            free(text);
    }
    free(ids);
    return rc;
}

int main(int argc, char **argv) {
    const char *model = NULL;
    bool decode = false, special = true, skip = false, stream = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model = argv[++i];
        else if (strcmp(argv[i], "--decode") == 0)
            decode = true;
        else if (strcmp(argv[i], "--no-special") == 0)
            special = false;
        else if (strcmp(argv[i], "--skip-special") == 0)
            skip = true;
        else if (strcmp(argv[i], "--stream") == 0)
            stream = true;
        else {
            usage(strcmp(argv[i], "--help") == 0 ? stdout : stderr);
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    if (!model) {
        usage(stderr);
        return 2;
    }
    cpm_error err = {0};
    cpm_tokenizer *tok;
    if (cpm_tokenizer_load(model, &tok, &err) < 0) {
        fprintf(stderr, "cpm-tokenize: %s\n", err.msg);
        return 1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int status = 0;
    for (long lineno = 1; (got = getline(&line, &cap, stdin)) >= 0; lineno++) {
        size_t len = (size_t)got;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        int rc = decode ? decode_line(tok, line, skip, stream, &err) : encode_line(tok, line, len, special, &err);
        if (rc < 0) {
            fprintf(stderr, "cpm-tokenize: line %ld: %s\n", lineno, err.msg);
            status = 1;
        }
        putchar('\n');
    }
    free(line);
    cpm_tokenizer_free(tok);
    return status;
}
