/* test_attn.c - unit tests for shard/engine/kernels/attn.c, attn_avx512.c and attn_avx2.c:
 * runs of key blocks folded into the online-softmax state by every kernel this
 * CPU can run (its keys transposed by the kernel, handed over transposed
 * with cpm_attn_transpose, or transposed alone, as a cache stores them by
 * column, with NaN in the lanes past the block's keys) and by the portable
 * code give the same
 * bits in every accumulator, maximum and sum, for every shape the models use
 * and ragged ones (partial blocks, head widths that are not multiples of 8 or
 * 16, strided rows, 1 to 8 heads per group), including scores large enough to
 * saturate the exponential; and the result is the softmax-weighted mean of the
 * values (against a double loop). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kernels/attn.h"
#include "shard/engine/kernels/matmul.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float frand(void) { /* [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) * (1.0f / (1 << 23)) - 1.0f;
}

typedef struct state {
    float *acc, *mx, *sum, *work;
} state;

static state state_new(int G, int dk, int dv) {
    state s = {malloc(sizeof(float) * (size_t)G * dv), malloc(sizeof(float) * G),
               malloc(sizeof(float) * G),
               aligned_alloc(64, ((size_t)cpm_attn_work_floats(G, dk) * 4 + 63) & ~(size_t)63)};
    assert_true(s.acc && s.mx && s.sum && s.work);
    memset(s.acc, 0, sizeof(float) * (size_t)G * dv);
    for (int h = 0; h < G; h++) {
        s.mx[h] = -INFINITY;
        s.sum[h] = 0.0f;
    }
    return s;
}

static void state_free(state *s) {
    free(s->acc);
    free(s->mx);
    free(s->sum);
    free(s->work);
}

typedef struct shape {
    int G, dk, dv, keys, pad; /* pad: extra floats per key/value row (a cache's other heads) */
    float qmag;               /* query magnitude: large ones saturate the exponential */
} shape;

/* How a block's keys reach the kernel. */
typedef enum keys_as {
    KEYS_ROWS,       /* rows: the kernel transposes them if it wants */
    KEYS_BOTH,       /* rows, and transposed beforehand */
    KEYS_TRANSPOSED, /* transposed only (K NULL), NaN past the block's keys */
    KEYS_MODES
} keys_as;

static const char *const keys_as_names[KEYS_MODES] = {"rows", "rows + transposed",
                                                      "transposed alone"};

/* Folds sh->keys keys into s, 16 at a time, through fold; kt: scratch for the
 * keys transposed beforehand (KEYS_BOTH, KEYS_TRANSPOSED). */
static void run(const shape *sh, const float *q, const float *K, const float *V, state *s,
                void (*fold)(const cpm_attn_block *), keys_as how, float *kt) {
    int ks = sh->dk + sh->pad, vs = sh->dv + sh->pad;
    for (int j0 = 0; j0 < sh->keys; j0 += 16) {
        int nb = sh->keys - j0 < 16 ? sh->keys - j0 : 16;
        if (how != KEYS_ROWS)
            cpm_attn_transpose(K + (size_t)j0 * ks, ks, nb, sh->dk, kt);
        if (how == KEYS_TRANSPOSED) /* stale slots of a cache block */
            for (int i = 0; i < sh->dk; i++)
                for (int j = nb; j < 16; j++)
                    kt[(size_t)i * 16 + j] = NAN;
        fold(&(cpm_attn_block){.q = q,
                               .K = how == KEYS_TRANSPOSED ? NULL : K + (size_t)j0 * ks,
                               .V = V + (size_t)j0 * vs,
                               .ks = ks, .vs = vs, .nb = nb, .G = sh->G, .dk = sh->dk,
                               .dv = sh->dv, .scale = 1.0f / sqrtf((float)sh->dk), .acc = s->acc,
                               .mx = s->mx, .sum = s->sum, .work = s->work,
                               .kt = how == KEYS_ROWS ? NULL : kt});
    }
}

/* The kernel in effect against the portable code over key rows on one shape,
 * and the state against a double loop. */
static void check_shape(const shape *sh, keys_as how) {
    size_t nq = (size_t)sh->G * sh->dk, nk = (size_t)sh->keys * (sh->dk + sh->pad),
           nv = (size_t)sh->keys * (sh->dv + sh->pad);
    float *q = malloc(nq * 4), *K = malloc(nk * 4), *V = malloc(nv * 4);
    for (size_t i = 0; i < nq; i++)
        q[i] = sh->qmag * frand();
    for (size_t i = 0; i < nk; i++)
        K[i] = frand();
    for (size_t i = 0; i < nv; i++)
        V[i] = frand();
    state a = state_new(sh->G, sh->dk, sh->dv), b = state_new(sh->G, sh->dk, sh->dv);
    float *kt = aligned_alloc(64, ((size_t)sh->dk * 16 * 4 + 63) & ~(size_t)63);
    run(sh, q, K, V, &a, cpm_attn_fold, how, kt);
    run(sh, q, K, V, &b, cpm_attn_fold_ref, KEYS_ROWS, NULL);
    free(kt);
    assert_memory_equal(a.acc, b.acc, sizeof(float) * (size_t)sh->G * sh->dv);
    assert_memory_equal(a.mx, b.mx, sizeof(float) * sh->G);
    assert_memory_equal(a.sum, b.sum, sizeof(float) * sh->G);
    /* the state is softmax(q·K * scale)·V, unnormalised */
    int ks = sh->dk + sh->pad, vs = sh->dv + sh->pad;
    for (int h = 0; h < sh->G; h++) {
        double *w = malloc(sizeof(double) * sh->keys), mx = -INFINITY, sum = 0;
        for (int j = 0; j < sh->keys; j++) {
            double d = 0;
            for (int i = 0; i < sh->dk; i++)
                d += (double)q[h * sh->dk + i] * K[(size_t)j * ks + i];
            w[j] = d / sqrt((double)sh->dk);
            mx = fmax(mx, w[j]);
        }
        for (int j = 0; j < sh->keys; j++)
            sum += (w[j] = exp(w[j] - mx));
        for (int d = 0; d < sh->dv; d++) {
            double want = 0;
            for (int j = 0; j < sh->keys; j++)
                want += w[j] / sum * V[(size_t)j * vs + d];
            double got = a.acc[h * sh->dv + d] / a.sum[h];
            assert_true(fabs(got - want) <= 1e-4);
        }
        free(w);
    }
    state_free(&a);
    state_free(&b);
    free(q);
    free(K);
    free(V);
}

static void test_kernels_equal_portable(void **state_) {
    (void)state_;
    const shape shapes[] = {
        {3, 64, 64, 100, 0, 1},   {1, 64, 64, 16, 128, 1},  {8, 128, 128, 77, 0, 1},
        {4, 96, 64, 33, 5, 1},    {2, 20, 36, 9, 3, 1},     {1, 8, 200, 50, 0, 1},
        {3, 64, 64, 64, 0, 60},   {2, 130, 17, 31, 1, 30},  {5, 64, 64, 1, 0, 1},
        {3, 64, 64, 7, 0, 1},
    };
    const cpm_isa best = cpm_isa_detect();
    for (int isa = CPM_ISA_SCALAR; isa <= (int)best; isa++) {
        cpm_isa_force((cpm_isa)isa);
        for (int how = 0; how < KEYS_MODES; how++) {
            print_message("kernel: %s, keys as %s\n", cpm_isa_name(cpm_isa_in_effect()),
                          keys_as_names[how]);
            for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++)
                check_shape(&shapes[c], (keys_as)how);
        }
    }
    cpm_isa_force(best);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_equal_portable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
