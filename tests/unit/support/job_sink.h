/* job_sink.h - a job sink (router/job.h) that records what a front would send, for the
 * router's unit tests: every answer, the text and ids each gen showed, and the order
 * of final answers, so a test can check "exactly one final answer". */
#ifndef CPM_TEST_JOB_SINK_H
#define CPM_TEST_JOB_SINK_H

#include "router/job.h"

#define REC_MAX_GENS 8

typedef struct rec_gen {
    char text[4096]; /* every delta's text, in order */
    size_t len;
    int deltas;
    int upto; /* the last delta's upto */
    const char *finish;
    int finishes; /* deltas that carried a finish reason */
} rec_gen;

typedef struct rec {
    int begins, dones, fails, cancels, frees;
    int finals; /* dones + fails + cancels */
    int last_status;
    char last_code[64], last_msg[256];
    rec_gen gens[REC_MAX_GENS];
} rec;

/* The recording sink; a job's sink_ud is its rec (never freed by the sink). */
extern const cpm_job_sink rec_sink;

#endif
