/* log.c - line-oriented logging (text or JSON) for service mains. */
#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>

static const char *level_names[] = {"debug", "info", "warn", "error"};

int cpm_log_parse_format(const char *s) {
    if (!strcmp(s, "text"))
        return CPM_LOG_TEXT;
    if (!strcmp(s, "json"))
        return CPM_LOG_JSON;
    return -1;
}

int cpm_log_parse_level(const char *s) {
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, level_names[i]))
            return i;
    return -1;
}

/* JSON string body: escapes quotes, backslashes and control bytes. */
static void put_json(FILE *f, const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
}

void cpm_log_write(const cpm_log *l, int level, const char *request_id, const char *fmt, ...) {
    if (!l || !l->out || level < l->min_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[40];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    const char *lv = level_names[level < 0 ? 0 : level > 3 ? 3 : level];
    if (l->format == CPM_LOG_JSON) {
        fprintf(l->out, "{\"time\":\"%s.%03ldZ\",\"level\":\"%s\",\"service\":\"", when,
                ts.tv_nsec / 1000000, lv);
        put_json(l->out, l->service ? l->service : "");
        if (request_id) {
            fputs("\",\"request_id\":\"", l->out);
            put_json(l->out, request_id);
        }
        fputs("\",\"msg\":\"", l->out);
        put_json(l->out, msg);
        fputs("\"}\n", l->out);
    } else {
        fprintf(l->out, "%s.%03ldZ %-5s %s%s%s%s %s\n", when, ts.tv_nsec / 1000000, lv,
                l->service ? l->service : "", request_id ? " [" : "", request_id ? request_id : "",
                request_id ? "]" : "", msg);
    }
    fflush(l->out);
}
