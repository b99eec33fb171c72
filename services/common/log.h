/* log.h - one line per event, as text or JSON, for the services' main.c files.
 *
 * Libraries never print; a service's main owns a cpm_log and writes what its
 * libraries report (return codes, cpm_error messages, callbacks) through it.
 */
#ifndef CPM_LOG_H
#define CPM_LOG_H

#include <stdio.h>

enum cpm_log_level { CPM_LOG_DEBUG, CPM_LOG_INFO, CPM_LOG_WARN, CPM_LOG_ERROR };
enum cpm_log_format { CPM_LOG_TEXT, CPM_LOG_JSON };

typedef struct cpm_log {
    const char *service; /* borrowed: "stage0", "sampler", ... */
    FILE *out;           /* borrowed */
    int format;          /* cpm_log_format */
    int min_level;       /* lines below this are dropped */
} cpm_log;

/* Parses "text"/"json" and "debug"/"info"/"warn"/"error"; -1 when unknown. */
int cpm_log_parse_format(const char *s);
int cpm_log_parse_level(const char *s);

/* One line: time, level, service, request id (may be NULL), message. */
void cpm_log_write(const cpm_log *l, int level, const char *request_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* One line with fields: kv is `key=value` pairs separated by spaces (values without
 * spaces). Text: appended to msg as they are (logfmt); JSON: one field each, numbers as
 * numbers. For access logs and anything a log pipeline should index. */
void cpm_log_kv(const cpm_log *l, int level, const char *request_id, const char *msg, const char *kv);

#define cpm_log_info(l, ...) cpm_log_write((l), CPM_LOG_INFO, NULL, __VA_ARGS__)
#define cpm_log_warn(l, ...) cpm_log_write((l), CPM_LOG_WARN, NULL, __VA_ARGS__)
#define cpm_log_error(l, ...) cpm_log_write((l), CPM_LOG_ERROR, NULL, __VA_ARGS__)
#define cpm_log_debug(l, ...) cpm_log_write((l), CPM_LOG_DEBUG, NULL, __VA_ARGS__)

#endif
