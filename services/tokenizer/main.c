/* main.c - cpm-tokenize: the tokenizer library on the command line, for tests,
 * benchmarks and debugging. Encode mode reads one JSON string per line and prints
 * the ids HF's encode() returns (bos included); --decode reads lines of ids and
 * prints one JSON string per line.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cli.h"
#include "services/tokenizer/tokenizer.h"

enum { OPT_MODEL = 1, OPT_DECODE, OPT_NO_SPECIAL, OPT_SKIP_SPECIAL, OPT_STREAM };

static const cpm_cli_opt opts[] = {
    {"model", 0, "DIR", "the model directory with the tokenizer files (required)", OPT_MODEL},
    {"no-special", 0, NULL, "do not add bos/eos (HF add_special_tokens=False)", OPT_NO_SPECIAL},
    {"decode", 0, NULL, "stdin lines are space-separated ids; prints a JSON string per line",
     OPT_DECODE},
    {"skip-special", 0, NULL, "with --decode: drop special tokens", OPT_SKIP_SPECIAL},
    {"stream", 0, NULL, "with --decode: print the JSON array of streamed pieces instead",
     OPT_STREAM},
    {0},
};

typedef struct tok_args {
    const char *model;
    bool decode, special, skip, stream;
} tok_args;

static void parse_args(int argc, char **argv, tok_args *a) {
    cpm_cli cli = {.prog = "cpm-tokenize",
                   .synopsis = "--model DIR [--decode [--skip-special] [--stream]] [--no-special]",
                   .tables = {opts},
                   .about = "encode (default): stdin lines are JSON strings; prints space-separated "
                            "ids per line\n"};
    *a = (tok_args){.special = true};
    int c;
    for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;) {
        switch (c) {
        case OPT_MODEL: a->model = v; break;
        case OPT_DECODE: a->decode = true; break;
        case OPT_NO_SPECIAL: a->special = false; break;
        case OPT_SKIP_SPECIAL: a->skip = true; break;
        case OPT_STREAM: a->stream = true; break;
        }
    }
    if (cli.optind < argc)
        cpm_cli_fail(&cli, "unexpected argument '%s'", argv[cli.optind]);
    if (!a->model)
        cpm_cli_fail(&cli, "--model DIR is required");
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
    tok_args a;
    parse_args(argc, argv, &a);
    cpm_error err = {0};
    cpm_tokenizer *tok;
    if (cpm_tokenizer_load(a.model, &tok, &err) < 0) {
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
        int rc = a.decode ? decode_line(tok, line, a.skip, a.stream, &err)
                         : encode_line(tok, line, len, a.special, &err);
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
