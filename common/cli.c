/* cli.c - getopt_long over option tables, generated usage text, checked numeric values.
 * Sits under every main.c (engine tools, services, router, launcher); depends on nothing
 * of the project, so any layer may link it. */
#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common/version.h"

#define VAL_BASE 256 /* getopt values of table options: VAL_BASE + their position */

static const cpm_cli_opt help_opt = {"help", 'h', NULL, "print this help and exit", 0};
static const cpm_cli_opt version_opt = {"version", 'V', NULL, "print the version and exit", 0};

const char *cpm_cli_version(void) {
    return CPM_VERSION;
}

static void add_short(cpm_cli *cli, size_t *n, char c, bool takes_arg) {
    cli->shorts[(*n)++] = c;
    if (takes_arg)
        cli->shorts[(*n)++] = ':';
    cli->shorts[*n] = '\0';
}

/* Builds getopt_long's tables from ours. A table too big is the programmer's error. */
static void start(cpm_cli *cli) {
    size_t ns = 0;
    int k = 0;
    add_short(cli, &ns, ':', false); /* ':' first: a missing value returns ':', not '?' */
    add_short(cli, &ns, 'h', false);
    add_short(cli, &ns, 'V', false);
    for (int t = 0; t < CPM_CLI_MAX_TABLES && cli->tables[t]; t++)
        for (const cpm_cli_opt *o = cli->tables[t]; o->name; o++, k++) {
            if (k == CPM_CLI_MAX_OPTS) {
                fprintf(stderr, "%s: more than %d options\n", cli->prog, CPM_CLI_MAX_OPTS);
                abort();
            }
            cli->by_val[k] = o;
            cli->longs[k] = (struct option){o->name, o->arg ? required_argument : no_argument,
                                            NULL, VAL_BASE + k};
            if (o->short_name)
                add_short(cli, &ns, o->short_name, o->arg != NULL);
        }
    cli->longs[k++] = (struct option){"help", no_argument, NULL, 'h'};
    cli->longs[k++] = (struct option){"version", no_argument, NULL, 'V'};
    cli->longs[k] = (struct option){0};
    cli->started = true;
    optind = 0; /* GNU: a full restart, should anything have parsed before */
    opterr = 0; /* our messages, not getopt's */
}

static const cpm_cli_opt *by_short(const cpm_cli *cli, int c) {
    for (int k = 0; k < CPM_CLI_MAX_OPTS && cli->longs[k].name; k++)
        if (cli->longs[k].val >= VAL_BASE && cli->by_val[k]->short_name == c)
            return cli->by_val[k];
    return NULL;
}

static void bad_option(const cpm_cli *cli, int c, char **argv) {
    const char *arg = argv[optind - 1];
    if (c == ':')
        fprintf(stderr, "%s: %s needs a value\n", cli->prog, arg);
    else if (optopt && strncmp(arg, "--", 2))
        fprintf(stderr, "%s: unknown option '-%c'\n", cli->prog, optopt);
    else
        fprintf(stderr, "%s: unknown option '%s'\n", cli->prog, arg);
    cpm_cli_usage(cli, stderr);
    exit(2);
}

int cpm_cli_next(cpm_cli *cli, int argc, char **argv, const char **ret_val) {
    if (!cli->started)
        start(cli);
    int c = getopt_long(argc, argv, cli->shorts, cli->longs, NULL);
    *ret_val = optarg;
    const cpm_cli_opt *o = NULL;
    switch (c) {
    case -1:
        cli->optind = optind;
        return -1;
    case 'h':
        cpm_cli_usage(cli, stdout);
        exit(0);
    case 'V':
        printf("%s %s\n", cli->prog, CPM_VERSION);
        exit(0);
    case '?':
    case ':':
        bad_option(cli, c, argv);
        break;
    default:
        o = c >= VAL_BASE ? cli->by_val[c - VAL_BASE] : by_short(cli, c);
    }
    cli->opt_name = o->name;
    return o->id;
}

/* "  -c, --config FILE" */
static int opt_left(const cpm_cli_opt *o, char *buf, size_t size) {
    char sh[8] = "    ";
    if (o->short_name)
        snprintf(sh, sizeof sh, "-%c, ", o->short_name);
    return snprintf(buf, size, "  %s--%s%s%s", sh, o->name, o->arg ? " " : "",
                    o->arg ? o->arg : "");
}

static void print_opt(const cpm_cli_opt *o, int width, FILE *f) {
    char left[128];
    int n = opt_left(o, left, sizeof left);
    if (n > width) /* too wide for the column: the help goes on its own line */
        fprintf(f, "%s\n%*s  %s\n", left, width, "", o->help);
    else
        fprintf(f, "%-*s  %s\n", width, left, o->help);
}

void cpm_cli_usage(const cpm_cli *cli, FILE *f) {
    const int max_width = 30;
    int width = 0;
    char left[128];
    fprintf(f, "usage: %s %s\n", cli->prog, cli->synopsis ? cli->synopsis : "[options]");
    for (int t = 0; t < CPM_CLI_MAX_TABLES && cli->tables[t]; t++)
        for (const cpm_cli_opt *o = cli->tables[t]; o->name; o++) {
            int n = o->help ? opt_left(o, left, sizeof left) : 0;
            width = n > width && n <= max_width ? n : width;
        }
    fprintf(f, "options:\n");
    for (int t = 0; t < CPM_CLI_MAX_TABLES && cli->tables[t]; t++)
        for (const cpm_cli_opt *o = cli->tables[t]; o->name; o++)
            if (o->help)
                print_opt(o, width, f);
    print_opt(&help_opt, width, f);
    print_opt(&version_opt, width, f);
    if (cli->about)
        fputs(cli->about, f);
}

_Noreturn void cpm_cli_fail(const cpm_cli *cli, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", cli->prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    cpm_cli_usage(cli, stderr);
    exit(2);
}

/* ------------------------------------------------------------------ values */

int cpm_cli_parse_int(const char *opt, const char *s, long long min, long long max,
                      long long *ret, char *msg, size_t msg_size) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!errno && end != s && !*end && v >= min && v <= max) {
        *ret = v;
        return 0;
    }
    if (max >= INT_MAX) /* "no upper bound" in practice: say only the lower one */
        snprintf(msg, msg_size, "--%s: '%s' is not an integer >= %lld", opt, s, min);
    else
        snprintf(msg, msg_size, "--%s: '%s' is not an integer in [%lld, %lld]", opt, s, min, max);
    return -1;
}

int cpm_cli_parse_port(const char *opt, const char *s, int *ret, char *msg, size_t msg_size) {
    long long v;
    if (cpm_cli_parse_int(opt, s, 0, 65535, &v, msg, msg_size)) {
        snprintf(msg, msg_size, "--%s: '%s' is not a port number", opt, s);
        return -1;
    }
    *ret = (int)v;
    return 0;
}

int cpm_cli_parse_float(const char *opt, const char *s, double *ret, char *msg, size_t msg_size) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || isnan(v)) {
        snprintf(msg, msg_size, "--%s: '%s' is not a number", opt, s);
        return -1;
    }
    *ret = v;
    return 0;
}

static _Noreturn void bad_value(const cpm_cli *cli, const char *msg) {
    fprintf(stderr, "%s: %s\n", cli->prog, msg);
    exit(2);
}

long long cpm_cli_int(const cpm_cli *cli, const char *val, long long min, long long max) {
    char msg[256];
    long long v;
    if (cpm_cli_parse_int(cli->opt_name, val, min, max, &v, msg, sizeof msg))
        bad_value(cli, msg);
    return v;
}

int cpm_cli_port(const cpm_cli *cli, const char *val) {
    char msg[256];
    int v;
    if (cpm_cli_parse_port(cli->opt_name, val, &v, msg, sizeof msg))
        bad_value(cli, msg);
    return v;
}

double cpm_cli_float(const cpm_cli *cli, const char *val) {
    char msg[256];
    double v;
    if (cpm_cli_parse_float(cli->opt_name, val, &v, msg, sizeof msg))
        bad_value(cli, msg);
    return v;
}
