/* log.c - line-oriented logging (text or JSON) for service mains. */
#include "log.h"

#include <stdarg.h>
#include <stdbool.h>
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

/* A logfmt value that JSON can hold as a number (so dashboards can sum it). */
static bool is_number(const char *s, size_t n) {
    size_t i = s[0] == '-';
    bool digits = false, dot = false;
    for (; i < n; i++) {
        if (s[i] >= '0' && s[i] <= '9')
            digits = true;
        else if (s[i] == '.' && !dot)
            dot = true;
        else
            return false;
    }
    return digits;
}

/* kv's `key=value` pairs (split at spaces) as JSON fields. */
static void put_json_fields(FILE *f, const char *kv) {
    while (kv && *kv) {
        size_t n = strcspn(kv, " ");
        const char *eq = memchr(kv, '=', n);
        if (eq && eq > kv) {
            fputs(",\"", f);
            fwrite(kv, 1, (size_t)(eq - kv), f);
            fputs("\":", f);
            size_t vn = n - (size_t)(eq - kv) - 1;
            char v[512];
            snprintf(v, sizeof v, "%.*s", (int)(vn < sizeof v ? vn : sizeof v - 1), eq + 1);
            if (is_number(v, strlen(v))) {
                fputs(v, f);
            } else {
                fputc('"', f);
                put_json(f, v);
                fputc('"', f);
            }
        }
        kv += n;
        kv += strspn(kv, " ");
    }
}

static void write_line(const cpm_log *l, int level, const char *request_id, const char *msg,
                       const char *kv) {
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
        fputc('"', l->out);
        put_json_fields(l->out, kv);
        fputs("}\n", l->out);
    } else {
        fprintf(l->out, "%s.%03ldZ %-5s %s%s%s%s %s%s%s\n", when, ts.tv_nsec / 1000000, lv,
                l->service ? l->service : "", request_id ? " [" : "", request_id ? request_id : "",
                request_id ? "]" : "", msg, kv && *kv ? " " : "", kv ? kv : "");
    }
    fflush(l->out);
}

void cpm_log_write(const cpm_log *l, int level, const char *request_id, const char *fmt, ...) {
    if (!l || !l->out || level < l->min_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    write_line(l, level, request_id, msg, NULL);
}

void cpm_log_kv(const cpm_log *l, int level, const char *request_id, const char *msg, const char *kv) {
    if (!l || !l->out || level < l->min_level)
        return;
    write_line(l, level, request_id, msg, kv);
}
