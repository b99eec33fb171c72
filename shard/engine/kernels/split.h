/* split.h - how a kernel's output rows are shared by the threads of a pool run.
 *
 * Static: thread t of nt takes the t-th of nt equal ranges (units of align
 * rows). Dynamic: the same ranges cut into chunks of align-multiple rows; a
 * thread takes its own chunks in order and then the last ones of the others,
 * so a thread slowed down (a busy neighbour on a shared machine, a core that
 * clocks lower) ends up with fewer rows instead of making the others wait at
 * the end of the run. Which thread computes a row never changes its bits
 * (matmul.h), so either split gives the same results. Header-only: one
 * compare-and-swap per chunk.
 */
#ifndef CPM_SPLIT_H
#define CPM_SPLIT_H

#include <stdatomic.h>
#include <stdbool.h>

/* [*lo, *hi) of total, cut into units of align shared evenly by nt threads. */
static inline void cpm_split_static(int total, int align, int tid, int nt, int *lo, int *hi) {
    long units = (total + align - 1) / align;
    long a = units * tid / nt, b = units * (tid + 1) / nt;
    *lo = (int)(a * align < total ? a * align : total);
    *hi = (int)(b * align < total ? b * align : total);
}

#define CPM_SPLIT_MAX_THREADS 64 /* more threads than this split statically */

/* Runs of up to this many x rows (decode, small batches: microseconds to a
 * millisecond each) claim chunks; prefill keeps one range per thread (its
 * L2-sized groups of W rows want long ranges). */
#define CPM_SPLIT_DYNAMIC_MAX_M 32
#define CPM_SPLIT_CHUNKS 8 /* chunks per thread */

/* Whether a run of M x rows on nt threads should claim chunks. */
static inline bool cpm_split_dynamic(int M, int nt) {
    return M <= CPM_SPLIT_DYNAMIC_MAX_M && nt > 1 && nt <= CPM_SPLIT_MAX_THREADS;
}

/* Thread t owns a contiguous range of chunks and takes them from its front, so
 * its weights stay one stream (the kernels prefetch past the end of a chunk
 * into the next); a thread whose range is empty takes chunks from the back of
 * another's. Each range is one atomic word (front and back packed, changed by
 * compare-and-swap), so every chunk is claimed exactly once. */
typedef struct cpm_split {
    int total;
    int chunk; /* rows per chunk */
    int nt;
    struct {
        _Alignas(64) atomic_ullong fb; /* front << 32 | back, in chunks */
    } range[CPM_SPLIT_MAX_THREADS];
} cpm_split;

/* Chunks of [0, total) for nt (<= CPM_SPLIT_MAX_THREADS) threads: about
 * per_thread chunks each, a multiple of align rows (at least align). */
static inline void cpm_split_init(cpm_split *s, int total, int align, int nt, int per_thread) {
    long want = ((long)total + (long)nt * per_thread - 1) / ((long)nt * per_thread);
    long chunk = (want + align - 1) / align * align;
    s->total = total;
    s->chunk = (int)(chunk > 0 ? chunk : align);
    s->nt = nt;
    unsigned long long chunks = ((unsigned long long)total + (unsigned)s->chunk - 1) / (unsigned)s->chunk;
    for (int t = 0; t < nt; t++) {
        unsigned long long f = chunks * (unsigned)t / (unsigned)nt;
        unsigned long long b = chunks * (unsigned)(t + 1) / (unsigned)nt;
        atomic_init(&s->range[t].fb, f << 32 | b);
    }
}

/* One chunk of range t: from its front when from_front, else from its back;
 * false when the range is empty. */
static inline bool cpm_split_take(cpm_split *s, int t, bool from_front, long *chunk) {
    atomic_ullong *fb = &s->range[t].fb;
    unsigned long long v = atomic_load_explicit(fb, memory_order_relaxed);
    for (;;) {
        unsigned long long f = v >> 32, b = v & 0xffffffffu;
        if (f >= b)
            return false;
        unsigned long long nv = from_front ? (f + 1) << 32 | b : f << 32 | (b - 1);
        if (atomic_compare_exchange_weak_explicit(fb, &v, nv, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *chunk = (long)(from_front ? f : b - 1);
            return true;
        }
    }
}

/* Claims thread tid's next chunk: true with its rows in [*lo, *hi), false
 * when no chunk is left anywhere. */
static inline bool cpm_split_next(cpm_split *s, int tid, int *lo, int *hi) {
    long c;
    bool got = cpm_split_take(s, tid, true, &c);
    for (int i = 1; !got && i < s->nt; i++)
        got = cpm_split_take(s, (tid + i) % s->nt, false, &c);
    if (!got)
        return false;
    long a = c * s->chunk;
    *lo = (int)a;
    *hi = (int)(a + s->chunk < s->total ? a + s->chunk : s->total);
    return true;
}

#endif
