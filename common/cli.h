/* cli.h - the one command-line parser of every cpm binary: getopt_long over tables of
 * options, each with its help line, from which the usage text is generated.
 *
 * For main.c files only: --help, --version and a bad option or value print and exit
 * here, so every binary answers them the same way (--help: usage on stdout, exit 0;
 * --version: "NAME VERSION" on stdout, exit 0; a bad option: usage on stderr, exit 2).
 * The cpm_cli_parse_* helpers underneath print nothing (for tests).
 *
 *   static const cpm_cli_opt opts[] = {{"model", 'm', "DIR", "the checkpoint", OPT_MODEL}, {0}};
 *   cpm_cli cli = {.prog = "cpm-run", .synopsis = "--model DIR [options]", .tables = {opts}};
 *   for (const char *v; (c = cpm_cli_next(&cli, argc, argv, &v)) != -1;) switch (c) { ... }
 *   // positional arguments: argv[cli.optind .. argc)
 */
#ifndef CPM_CLI_H
#define CPM_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define CPM_CLI_MAX_OPTS 64  /* options over all tables, --help and --version aside */
#define CPM_CLI_MAX_TABLES 4

typedef struct cpm_cli_opt {
    const char *name;   /* long name without the dashes; NULL ends a table */
    char short_name;    /* 0: none (-h and -V are --help and --version) */
    const char *arg;    /* the value's name in the usage ("N", "FILE"); NULL: a flag */
    const char *help;   /* one line of the usage; NULL: not listed */
    int id;             /* what cpm_cli_next returns for it (> 0) */
} cpm_cli_opt;

typedef struct cpm_cli {
    const char *prog;       /* "cpm-shard": usage, version and messages start with it */
    const char *synopsis;   /* the usage line after "usage: PROG " */
    const char *about;      /* text after the options (each line ends in \n); may be NULL */
    const cpm_cli_opt *tables[CPM_CLI_MAX_TABLES]; /* searched in order; NULL ends the list */
    int optind;             /* once cpm_cli_next returned -1: the first positional argument */
    const char *opt_name;   /* the option cpm_cli_next returned last (for messages) */
    /* private */
    bool started;
    const cpm_cli_opt *by_val[CPM_CLI_MAX_OPTS];
    struct option longs[CPM_CLI_MAX_OPTS + 3];
    char shorts[3 * CPM_CLI_MAX_OPTS + 8];
} cpm_cli;

/* The next option of argv: its id, with *ret_val its value (NULL for a flag); -1 after
 * the last one (positional arguments may come anywhere; they end up in
 * argv[cli->optind .. argc)). Handles --help, --version and bad options itself (exits). */
int cpm_cli_next(cpm_cli *cli, int argc, char **argv, const char **ret_val);

/* Writes the usage text: "usage: PROG SYNOPSIS", the options with their help, the about text. */
void cpm_cli_usage(const cpm_cli *cli, FILE *f);

/* The project's version (meson's project version), e.g. "0.1.0". */
const char *cpm_cli_version(void);

/* "PROG: <message>" and the usage on stderr, then exit 2. For argument errors that no
 * single option owns (a missing --model, a positional argument too many). */
_Noreturn void cpm_cli_fail(const cpm_cli *cli, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The current option's value as an integer in [min, max], a port (0..65535) or a
 * number; else "PROG: --OPT: 'VAL' is not ..." on stderr and exit 2. */
long long cpm_cli_int(const cpm_cli *cli, const char *val, long long min, long long max);
int cpm_cli_port(const cpm_cli *cli, const char *val);
double cpm_cli_float(const cpm_cli *cli, const char *val);

/* The same checks without printing: 0, or -1 with msg ("--OPT: 'VAL' is not ...") filled. */
int cpm_cli_parse_int(const char *opt, const char *s, long long min, long long max,
                      long long *ret, char *msg, size_t msg_size);
int cpm_cli_parse_port(const char *opt, const char *s, int *ret, char *msg, size_t msg_size);
int cpm_cli_parse_float(const char *opt, const char *s, double *ret, char *msg, size_t msg_size);

#endif
