/* pool.c - persistent worker threads behind cpm_pool_run.
 *
 * Every matmul and attention step of the engine is one run, so a run is two
 * atomic operations and, only when a worker had gone to sleep, one futex wake.
 * Workers spin briefly on a generation counter (the next run usually follows
 * within microseconds) and then sleep on it so an idle pool costs no CPU.
 */
#include "pool.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* 2000 pauses, 10-150 us depending on the core (a pause costs 5-140 cycles):
 * longer than the gap between two kernels of one token, far shorter than the
 * gap between two requests. */
#define SPIN_ITERS 2000

struct cpm_pool {
    int n;
    pthread_t *threads;
    cpm_pool_fn fn;              /* written by the caller before gen moves */
    void *arg;
    atomic_uint gen;             /* bumped once per run; workers wait on it */
    atomic_int pending;          /* workers still inside the current run */
    atomic_int sleepers;         /* workers blocked in futex on gen */
    atomic_int caller_waiting;   /* caller blocked in futex on pending */
    atomic_int stop;
    void *scratch;
    size_t scratch_size;
};

struct worker_arg {
    cpm_pool *pool;
    int tid;
};

#if defined(__linux__)
static void futex_wait(void *addr, unsigned expected) {
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(void *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
#else
static void futex_wait(void *addr, unsigned expected) {
    (void)addr;
    (void)expected;
    sched_yield();
}

static void futex_wake_all(void *addr) {
    (void)addr;
}
#endif

/* Returns the first generation different from seen. The sleepers count and
 * gen form a Dekker pair with cpm_pool_run: either the caller sees us counted
 * and wakes us, or the kernel sees the new gen and does not put us to sleep. */
static unsigned wait_generation(cpm_pool *p, unsigned seen) {
    for (int i = 0; i < SPIN_ITERS; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen)
            return g;
        cpu_relax();
    }
    atomic_fetch_add(&p->sleepers, 1);
    unsigned g;
    while ((g = atomic_load(&p->gen)) == seen)
        futex_wait(&p->gen, seen);
    atomic_fetch_sub(&p->sleepers, 1);
    return g;
}

static void *worker_main(void *varg) {
    struct worker_arg wa = *(struct worker_arg *)varg;
    free(varg);
    cpm_pool *p = wa.pool;
    unsigned seen = 0;
    for (;;) {
        seen = wait_generation(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            break;
        p->fn(p->arg, wa.tid, p->n);
        if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->caller_waiting))
            futex_wake_all(&p->pending);
    }
    return NULL;
}

static void wait_workers(cpm_pool *p) {
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0)
            return;
        cpu_relax();
    }
    atomic_store(&p->caller_waiting, 1);
    int left;
    while ((left = atomic_load(&p->pending)) != 0)
        futex_wait(&p->pending, (unsigned)left);
    atomic_store(&p->caller_waiting, 0);
}

static void stop_workers(cpm_pool *p, int started) {
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    futex_wake_all(&p->gen);
    for (int i = 0; i < started; i++)
        pthread_join(p->threads[i], NULL);
}

cpm_pool *cpm_pool_new(int n_threads) {
    if (n_threads < 1)
        return NULL;
    cpm_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->n = n_threads;
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads)
        goto out_free_pool;
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (wa) {
            wa->pool = p;
            wa->tid = i;
        }
        if (!wa || pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            stop_workers(p, i - 1);
            goto out_free_threads;
        }
    }
    return p;

out_free_threads:
    free(p->threads);
out_free_pool:
    free(p);
    return NULL;
}

void cpm_pool_free(cpm_pool *pool) {
    if (!pool)
        return;
    stop_workers(pool, pool->n - 1);
    free(pool->threads);
    free(pool->scratch);
    free(pool);
}

int cpm_pool_size(const cpm_pool *pool) {
    return pool ? pool->n : 1;
}

void cpm_pool_run(cpm_pool *pool, cpm_pool_fn fn, void *arg) {
    if (!pool || pool->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: pairs with sleepers below */
    if (atomic_load(&pool->sleepers) > 0)
        futex_wake_all(&pool->gen);
    fn(arg, 0, pool->n);
    wait_workers(pool);
}

void *cpm_pool_buffer(cpm_pool *pool, size_t bytes, void **owned) {
    void *buf = cpm_pool_scratch(pool, bytes);
    *owned = NULL;
    if (!buf)
        buf = *owned = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    return buf;
}

void *cpm_pool_scratch(cpm_pool *pool, size_t bytes) {
    if (!pool)
        return NULL;
    if (bytes <= pool->scratch_size)
        return pool->scratch;
    /* 64-byte aligned for SIMD loads; old contents need not survive. */
    size_t size = (bytes + 63) & ~(size_t)63;
    void *mem = aligned_alloc(64, size);
    if (!mem)
        return NULL;
    free(pool->scratch);
    pool->scratch = mem;
    pool->scratch_size = size;
    return mem;
}
