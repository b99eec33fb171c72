/* Unit tests for shard/engine/kv_cache.c: sequence slots, block accounting, position
 * checks, full-cache errors. Uses a golden checkpoint for the geometry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shard/engine/kv_cache.h"
#include "shard/engine/kv_cache_internal.h"
#include "shard/engine/model/model.h"

static const char *model_dir;

static int setup(void **state) {
    cpm_error e = {0};
    cpm_model *m;
    if (cpm_model_load(model_dir, NULL, &m, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    *state = m;
    return 0;
}

static int teardown(void **state) {
    cpm_model_free(*state);
    return 0;
}

static void test_slots(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 2, &e);
    assert_non_null(kv);
    int a = cpm_kv_cache_seq_new(kv, &e), b = cpm_kv_cache_seq_new(kv, &e);
    assert_true(a >= 0 && b >= 0 && a != b);
    assert_int_equal(cpm_kv_cache_seq_new(kv, &e), CPM_ELIMIT);
    assert_non_null(strstr(e.msg, "sequence slots"));
    cpm_kv_cache_seq_free(kv, a);
    assert_int_equal(cpm_kv_cache_seq_new(kv, &e), a);
    assert_int_equal(cpm_kv_cache_seq_len(kv, 99), -1);
    cpm_kv_cache_seq_free(kv, 99); /* ignored */
    cpm_kv_cache_free(kv);
    cpm_kv_cache_free(NULL);
}

static void test_reserve_checks_positions(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 2, &e);
    int s = cpm_kv_cache_seq_new(kv, &e), slots[4];
    int32_t seq[] = {s, s}, gap[] = {0, 2}, ok[] = {0, 1}, bad_seq[] = {7, 7};
    cpm_batch b = {.n_tokens = 2, .seq = seq, .pos = gap};
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), CPM_EINVAL);
    assert_non_null(strstr(e.msg, "expected 1"));
    b.seq = bad_seq;
    b.pos = ok;
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), CPM_EINVAL);
    b.seq = seq;
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), 0);
    cpm_kv_cache_commit(kv, &b);
    assert_int_equal(cpm_kv_cache_seq_len(kv, s), 2);
    int used, total;
    cpm_kv_cache_usage(kv, &used, &total);
    assert_int_equal(used, 1);
    assert_int_equal(total, 4);
    cpm_kv_cache_seq_truncate(kv, s, 0);
    cpm_kv_cache_usage(kv, &used, &total);
    assert_int_equal(used, 0);
    cpm_kv_cache_free(kv);
}

/* Rows 0..n-1 of seq, reserved and committed, each key's elements = marker + pos. */
static void fill(cpm_kv_cache *kv, int seq, int from, int n, float marker) {
    cpm_error e = {0};
    int32_t sq[64], pos[64];
    int slots[64];
    for (int i = 0; i < n; i++)
        sq[i] = seq, pos[i] = from + i;
    cpm_batch b = {.n_tokens = n, .seq = sq, .pos = pos};
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), 0);
    float *k = malloc((size_t)kv->k_dim * sizeof(float));
    for (int i = 0; i < n; i++) {
        for (int d = 0; d < kv->k_dim; d++)
            k[d] = marker + (float)pos[i];
        cpm_kv_cache_store(kv, 0, slots[i], k, NULL);
    }
    free(k);
    cpm_kv_cache_commit(kv, &b);
}

static float key_at(const cpm_kv_cache *kv, int seq, int pos) {
    return cpm_kv_cache_key_at(kv, 0, cpm_kv_slot(kv, seq, pos), kv->k_dim - 1);
}

/* Prefix caching: publish full blocks, keep them after the sequence, attach them to a
 * new one (shared, counted), copy on a rewind into a shared block, evict oldest first. */
static void test_prefix_blocks(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    g.dtype = CPM_DTYPE_F32;
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 64, 3, &e); /* 4 blocks */
    const uint64_t h[] = {11, 22, 33}, other[] = {99};
    int a = cpm_kv_cache_seq_new(kv, &e);
    fill(kv, a, 0, 40, 1000.0f);
    assert_int_equal(cpm_kv_cache_seq_publish(kv, a, 0, h, 3), 2); /* block 2 is not full */
    int idle, published, used, total;
    cpm_kv_cache_cached(kv, &idle, &published);
    assert_int_equal(published, 2);
    assert_int_equal(idle, 0);
    cpm_kv_cache_seq_free(kv, a);
    cpm_kv_cache_cached(kv, &idle, &published);
    cpm_kv_cache_usage(kv, &used, &total);
    assert_int_equal(idle, 2);
    assert_int_equal(used, 0);
    /* a new sequence starts from the two blocks: same contents, no copy */
    int b = cpm_kv_cache_seq_new(kv, &e);
    assert_int_equal(cpm_kv_cache_seq_attach(kv, b, other, 1, &e), CPM_ESTALE);
    assert_int_equal(cpm_kv_cache_seq_len(kv, b), 0);
    assert_int_equal(cpm_kv_cache_seq_attach(kv, b, h, 2, &e), 0);
    assert_int_equal(cpm_kv_cache_seq_len(kv, b), 32);
    assert_true(key_at(kv, b, 17) == 1017.0f);
    assert_int_equal(cpm_kv_cache_seq_attach(kv, b, h, 1, &e), CPM_EINVAL); /* not empty */
    fill(kv, b, 32, 4, 2000.0f);                                           /* goes on privately */
    /* a second holder; rewinding it into block 0 copies that block first */
    int c = cpm_kv_cache_seq_new(kv, &e);
    assert_int_equal(cpm_kv_cache_seq_attach(kv, c, h, 2, &e), 0);
    assert_int_equal(cpm_kv_cache_seq_truncate(kv, c, 8), 0);
    assert_true(kv->seqs[c].blocks[0] != kv->seqs[b].blocks[0]);
    assert_true(key_at(kv, c, 5) == 1005.0f);
    fill(kv, c, 8, 8, 3000.0f);
    assert_true(key_at(kv, c, 9) == 3009.0f && key_at(kv, b, 9) == 1009.0f);
    cpm_kv_cache_cached(kv, &idle, &published);
    assert_int_equal(published, 2);
    /* the last holder of a published block rewinding into it unpublishes it */
    cpm_kv_cache_seq_free(kv, c);
    assert_int_equal(cpm_kv_cache_seq_truncate(kv, b, 20), 0);
    cpm_kv_cache_cached(kv, &idle, &published);
    assert_int_equal(published, 1);
    /* under pressure the idle published blocks go, oldest first */
    cpm_kv_cache_seq_free(kv, b);
    int d = cpm_kv_cache_seq_new(kv, &e);
    fill(kv, d, 0, 64, 4000.0f);
    cpm_kv_cache_cached(kv, &idle, &published);
    assert_int_equal(published, 0);
    assert_int_equal(cpm_kv_cache_seq_attach(kv, cpm_kv_cache_seq_new(kv, &e), h, 1, &e), CPM_ESTALE);
    cpm_kv_cache_free(kv);
}

/* The hash table survives many publish/evict rounds (deletions in probe runs). */
static void test_prefix_table_churn(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    g.dtype = CPM_DTYPE_F32;
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 8 * CPM_KV_BLOCK, 2, &e);
    uint64_t next = 1;
    for (int round = 0; round < 200; round++) {
        int s = cpm_kv_cache_seq_new(kv, &e);
        fill(kv, s, 0, 2 * CPM_KV_BLOCK, (float)round);
        uint64_t hs[2] = {next * 0x100000001ull, (next + 1) * 0x100000001ull};
        next += 2;
        assert_int_equal(cpm_kv_cache_seq_publish(kv, s, 0, hs, 2), 2);
        cpm_kv_cache_seq_free(kv, s);
        int t = cpm_kv_cache_seq_new(kv, &e); /* the newest prefix is still there */
        assert_int_equal(cpm_kv_cache_seq_attach(kv, t, hs, 2, &e), 0);
        assert_true(key_at(kv, t, 3) == (float)round + 3.0f);
        cpm_kv_cache_seq_free(kv, t);
    }
    int idle, published;
    cpm_kv_cache_cached(kv, &idle, &published);
    assert_int_equal(published, 8);
    assert_int_equal(idle, 8);
    cpm_kv_cache_free(kv);
}

static void test_full(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    cpm_kv_cache *kv = cpm_kv_cache_new(&g, 32, 3, &e); /* 2 blocks */
    int a = cpm_kv_cache_seq_new(kv, &e), c = cpm_kv_cache_seq_new(kv, &e);
    int d = cpm_kv_cache_seq_new(kv, &e);
    int slots[1];
    int32_t pos = 0;
    int32_t sa = a, sc = c, sd = d;
    cpm_batch b = {.n_tokens = 1, .seq = &sa, .pos = &pos};
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), 0);
    b.seq = &sc;
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), 0);
    b.seq = &sd;
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), CPM_ELIMIT);
    assert_non_null(strstr(e.msg, "kv cache full"));
    cpm_kv_cache_seq_free(kv, a); /* frees a block for d */
    assert_int_equal(cpm_kv_cache_reserve(kv, &b, slots, &e), 0);
    cpm_kv_cache_free(kv);
}

/* An f16 cache takes half the memory of an f32 one; other dtypes are refused. */
static void test_dtypes(void **state) {
    cpm_error e = {0};
    cpm_kv_geometry g = cpm_model_kv_geometry(*state);
    assert_int_equal(g.dtype, CPM_DTYPE_F32);
    cpm_kv_cache *f32 = cpm_kv_cache_new(&g, 64, 1, &e);
    g.dtype = CPM_DTYPE_F16;
    cpm_kv_cache *f16 = cpm_kv_cache_new(&g, 64, 1, &e);
    assert_non_null(f32);
    assert_non_null(f16);
    assert_int_equal(f16->block_elems, f32->block_elems);
    assert_int_equal(f16->elem * 2, f32->elem);
    /* rows land where the accessors say, one element size apart per column */
    assert_int_equal((char *)cpm_kv_value(f16, 1, 3) - f16->data,
                     ((char *)cpm_kv_value(f32, 1, 3) - f32->data) / 2);
    cpm_kv_cache_free(f32);
    cpm_kv_cache_free(f16);
    g.dtype = CPM_DTYPE_BF16;
    assert_null(cpm_kv_cache_new(&g, 64, 1, &e));
    assert_int_equal(e.code, CPM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "BF16"));
}

/* Keys stored as rows and by column, f32 and f16: each element lands where the
 * layout says (by column: element e of slot r at e * 16 + r, 64-byte aligned),
 * reads back through cpm_kv_cache_key_at, and the key sums of both layouts are
 * the same bits, each the sum in slot order. A width of 72 crosses the store's
 * 64-element chunks. */
static void test_key_layouts(void **state) {
    (void)state;
    enum { K = 72, V = 8, L = 2 };
    cpm_error e = {0};
    float k[K], v[V];
    for (int dt = 0; dt < 2; dt++) {
        cpm_kv_cache *kv[2];
        for (int col = 0; col < 2; col++) {
            cpm_kv_geometry g = {.n_layers = L, .k_dim = K, .v_dim = V, .key_sums = true,
                                 .dtype = dt ? CPM_DTYPE_F16 : CPM_DTYPE_F32,
                                 .keys_by_column = col};
            assert_non_null(kv[col] = cpm_kv_cache_new(&g, 64, 1, &e));
            assert_int_equal(cpm_kv_cache_seq_new(kv[col], &e), 0);
            int32_t sq[32] = {0}, pos[32];
            int slots[32];
            for (int i = 0; i < 32; i++)
                pos[i] = i;
            cpm_batch b = {.n_tokens = 32, .seq = sq, .pos = pos};
            assert_int_equal(cpm_kv_cache_reserve(kv[col], &b, slots, &e), 0);
            for (int li = 0; li < L; li++) {
                for (int i = 0; i < 32; i++) { /* exact in f16 */
                    for (int d = 0; d < K; d++)
                        k[d] = (float)li + 0.5f * (float)(i % 16) + 0.25f * (float)(d % 40);
                    for (int d = 0; d < V; d++)
                        v[d] = -(float)i - (float)d;
                    cpm_kv_cache_store(kv[col], li, slots[i], k, v);
                }
                cpm_kv_cache_sum_keys(kv[col], li, slots, 32);
            }
            for (int li = 0; li < L; li++)
                for (int i = 0; i < 32; i++) {
                    int blk = slots[i] / CPM_KV_BLOCK, r = slots[i] % CPM_KV_BLOCK, d = 41;
                    float want = (float)li + 0.5f * (float)r + 0.25f * (float)(d % 40);
                    assert_float_equal(cpm_kv_cache_key_at(kv[col], li, slots[i], d), want, 0);
                    const char *keys = cpm_kv_block_keys(kv[col], li, blk);
                    assert_int_equal((uintptr_t)keys % 64, 0);
                    size_t at = col ? (size_t)d * CPM_KV_BLOCK + r : (size_t)r * K + d;
                    float got = dt ? cpm_f16_to_f32(((const uint16_t *)keys)[at])
                                   : ((const float *)keys)[at];
                    assert_float_equal(got, want, 0);
                    const char *val = cpm_kv_value(kv[col], li, slots[i]);
                    got = dt ? cpm_f16_to_f32(((const uint16_t *)val)[V - 1])
                             : ((const float *)val)[V - 1];
                    assert_float_equal(got, -(float)i - (float)(V - 1), 0);
                }
        }
        for (int li = 0; li < L; li++)
            for (int blk = 0; blk < 2; blk++) {
                const float *s0 = cpm_kv_key_sum(kv[0], li, blk), *s1 = cpm_kv_key_sum(kv[1], li, blk);
                assert_memory_equal(s0, s1, K * sizeof(float));
                float want = 0.0f; /* element 3: li + 0.5 r + 0.75 over r = 0..15, in order */
                for (int r = 0; r < CPM_KV_BLOCK; r++)
                    want += (float)li + 0.5f * (float)r + 0.75f;
                assert_float_equal(s1[3], want, 0);
            }
        cpm_kv_cache_free(kv[0]);
        cpm_kv_cache_free(kv[1]);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_kv_cache GOLDEN_MODEL_DIR\n");
        return 2;
    }
    model_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slots),
        cmocka_unit_test(test_reserve_checks_positions),
        cmocka_unit_test(test_prefix_blocks),
        cmocka_unit_test(test_prefix_table_churn),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_key_layouts),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
