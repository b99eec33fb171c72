/* test_checkpoint.c - shard/engine/model/checkpoint.c over good and broken weight files.
 *
 * Safetensors files are written at run time with cpm_safetensors_write or by hand
 * (for headers no writer would produce); torch archives come from
 * tests/data/checkpoints (see its README) or are assembled here with a minimal
 * stored-zip writer. Each bad input checks the exact code and that the message
 * names the file and, where one is involved, the tensor.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "support/scratch.h"

#include "shard/engine/model/checkpoint.h"
#include "shard/engine/model/safetensors.h"
#include "shard/engine/model/zip_reader.h"

#ifndef CKPT_FIXTURES
#error "CKPT_FIXTURES must name tests/data/checkpoints"
#endif

/* ---- files in the scratch directory (support/scratch.h) ---- */

static void write_file(const char *dir, const char *name, const void *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static uint8_t *read_file(const char *path, size_t *ret_len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    uint8_t *buf = malloc((size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *ret_len = (size_t)n;
    return buf;
}

/* Writes an 8-byte length, the header text as given, then n_data zero bytes. */
static void write_raw_safetensors(const char *dir, const char *header, size_t n_data) {
    size_t hl = strlen(header);
    uint8_t *buf = calloc(1, 8 + hl + n_data);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    write_file(dir, "model.safetensors", buf, 8 + hl + n_data);
    free(buf);
}

/* Opens dir, expects failure with code, and checks the message has each needle. */
static void expect_open_error(const char *dir, int code, const char *needle1,
                              const char *needle2) {
    cpm_checkpoint *ck = (cpm_checkpoint *)1;
    cpm_error err = {0};
    int rc = cpm_checkpoint_open(dir, &ck, &err);
    if (rc != code)
        fail_msg("expected %s, got %s: %s", cpm_errname(code), cpm_errname(rc), err.msg);
    assert_null(ck);
    assert_int_equal(err.code, code);
    if (needle1 && !strstr(err.msg, needle1))
        fail_msg("message '%s' does not contain '%s'", err.msg, needle1);
    if (needle2 && !strstr(err.msg, needle2))
        fail_msg("message '%s' does not contain '%s'", err.msg, needle2);
}

static cpm_checkpoint *open_ok(const char *dir) {
    cpm_checkpoint *ck = NULL;
    cpm_error err = {0};
    int rc = cpm_checkpoint_open(dir, &ck, &err);
    if (rc != 0)
        fail_msg("open %s: %s", dir, err.msg);
    assert_non_null(ck);
    return ck;
}

/* ---- a good safetensors file ---- */

static const float norm_w[3] = {1.0f, 1.5f, -2.25f};
static const uint16_t emb_w[6] = {0x3f80, 0x4000, 0x4040, 0xbf80, 0x0000, 0x3f00}; /* bf16 */
static const uint16_t q_w[4] = {0x3c00, 0x4000, 0x4200, 0xbc00};                   /* f16 */
static const int64_t pos_w[5] = {0, 1, 2, 3, 4};

static void write_good(const char *dir, const char *name) {
    cpm_safetensors_tensor ts[4] = {
        {"model.norm.weight", "F32", 1, {3}, norm_w, sizeof norm_w},
        {"model.embed_tokens.weight", "BF16", 2, {2, 3}, emb_w, sizeof emb_w},
        {"model.layers.0.self_attn.q_proj.weight", "F16", 2, {2, 2}, q_w, sizeof q_w},
        {"model.position_ids", "I64", 2, {1, 5}, pos_w, sizeof pos_w},
    };
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    cpm_error err = {0};
    int rc = cpm_safetensors_write(path, ts, 4, &err);
    if (rc != 0)
        fail_msg("write: %s", err.msg);
}

static void test_safetensors_good(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    assert_int_equal(cpm_checkpoint_count(ck), 3);
    const cpm_tensor_view *v = cpm_checkpoint_find(ck, "model.norm.weight");
    assert_non_null(v);
    assert_int_equal(v->dtype, CPM_DTYPE_F32);
    assert_int_equal(v->ndim, 1);
    assert_int_equal(v->shape[0], 3);
    assert_int_equal(v->nbytes, sizeof norm_w);
    assert_memory_equal(v->data, norm_w, sizeof norm_w);
    assert_string_equal(v->file, "model.safetensors");
    v = cpm_checkpoint_find(ck, "model.embed_tokens.weight");
    assert_non_null(v);
    assert_int_equal(v->dtype, CPM_DTYPE_BF16);
    assert_memory_equal(v->data, emb_w, sizeof emb_w);
    assert_int_equal((uintptr_t)v->data % 2, 0);
    v = cpm_checkpoint_find(ck, "model.layers.0.self_attn.q_proj.weight");
    assert_non_null(v);
    assert_int_equal(v->dtype, CPM_DTYPE_F16);
    assert_memory_equal(v->data, q_w, sizeof q_w);
    /* file order is data order: the F32 tensor comes first in the file */
    assert_string_equal(cpm_checkpoint_at(ck, 0)->name, "model.norm.weight");
    assert_null(cpm_checkpoint_at(ck, 3));
    assert_null(cpm_checkpoint_find(ck, "nope"));

    const int64_t want[2] = {2, -1};
    const cpm_tensor_view *got = NULL;
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_expect(ck, "model.embed_tokens.weight", 2, want, &got,
                                           &err),
                     0);
    assert_non_null(got);
    cpm_checkpoint_free(ck);
}

/* cpm_checkpoint_copy reads a tensor's bytes from its file; bytes outside every
 * file mapping are refused. */
static void test_checkpoint_copy(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    const cpm_tensor_view *v = cpm_checkpoint_find(ck, "model.embed_tokens.weight");
    assert_non_null(v);
    uint16_t got[6] = {0};
    assert_int_equal(cpm_checkpoint_copy(ck, v->data, sizeof got, got), 0);
    assert_memory_equal(got, emb_w, sizeof emb_w);
    assert_int_equal(cpm_checkpoint_copy(ck, (const char *)v->data + 2, 4, got), 0);
    assert_memory_equal(got, emb_w + 1, 4);
    assert_int_equal(cpm_checkpoint_copy(ck, got, sizeof got, got), -1); /* not mapped */
    cpm_checkpoint_free(ck);
}

static void test_safetensors_wrong_shape(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    const int64_t want[2] = {3, 2};
    const cpm_tensor_view *got = (const cpm_tensor_view *)1;
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_expect(ck, "model.embed_tokens.weight", 2, want, &got,
                                           &err),
                     CPM_ESHAPE);
    assert_null(got);
    assert_string_equal(err.msg,
                        "model.safetensors: tensor model.embed_tokens.weight: shape [2,3], "
                        "expected [3,2]");
    const int64_t want1[1] = {6};
    assert_int_equal(cpm_checkpoint_expect(ck, "model.embed_tokens.weight", 1, want1, NULL,
                                           &err),
                     CPM_ESHAPE);
    cpm_checkpoint_free(ck);
}

static void test_safetensors_missing_tensor(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    const int64_t want[1] = {3};
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_expect(ck, "lm_head.weight", 1, want, NULL, &err),
                     CPM_ENOTFOUND);
    assert_non_null(strstr(err.msg, "tensor lm_head.weight: missing from"));
    assert_non_null(strstr(err.msg, s->dir));
    cpm_checkpoint_free(ck);
}

static void test_safetensors_unsupported_dtype(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    assert_null(cpm_checkpoint_find(ck, "model.position_ids"));
    assert_int_equal(cpm_checkpoint_unsupported_count(ck), 1);
    const char *why = NULL;
    assert_string_equal(cpm_checkpoint_unsupported_at(ck, 0, &why), "model.position_ids");
    assert_non_null(strstr(why, "I64"));
    assert_null(cpm_checkpoint_unsupported_at(ck, 1, NULL));
    const int64_t want[2] = {1, 5};
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_expect(ck, "model.position_ids", 2, want, NULL, &err),
                     CPM_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "model.safetensors: tensor model.position_ids: dtype I64"));
    cpm_checkpoint_free(ck);
}

static void test_safetensors_truncated(void **state) {
    scratch *s = *state;
    write_file(s->dir, "model.safetensors", "\x10\0\0", 3);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors", "too short");
    write_file(s->dir, "model.safetensors", "", 0);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors", "0 bytes");
}

static void test_safetensors_truncated_data(void **state) {
    scratch *s = *state;
    write_good(s->dir, "model.safetensors");
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", s->dir);
    size_t n;
    uint8_t *buf = read_file(path, &n);
    write_file(s->dir, "model.safetensors", buf, n - 3); /* cuts into the last tensor */
    free(buf);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors: tensor model.",
                      "run past the end of the data");
}

static void test_safetensors_header_length(void **state) {
    scratch *s = *state;
    uint8_t buf[16] = {0xf0, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_file(s->dir, "model.safetensors", buf, sizeof buf);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors: header length 240",
                      "past the end of the file");
    uint8_t huge[16] = {0, 0, 0, 0, 0, 0, 0, 0x40, '{', '}'};
    write_file(s->dir, "model.safetensors", huge, sizeof huge);
    expect_open_error(s->dir, CPM_ELIMIT, "model.safetensors", "limit");
}

static void test_safetensors_bad_json(void **state) {
    scratch *s = *state;
    write_raw_safetensors(s->dir, "{\"a\": {\"dtype\": \"F32\",", 0);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors", "not valid JSON");
    write_raw_safetensors(s->dir, "[1, 2]", 0);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors", "not a JSON object");
}

static void test_safetensors_bad_entries(void **state) {
    scratch *s = *state;
    static const struct {
        const char *header;
        const char *needle;
    } cases[] = {
        {"{\"t.w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", "tensor t.w: entry needs"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": 4, \"data_offsets\": [0, 4]}}",
         "tensor t.w: shape is not an array"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
         "tensor t.w: shape[0]"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], "
         "\"data_offsets\": [0, 4]}}",
         "tensor t.w: shape's element count overflows"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4]}}",
         "tensor t.w: data_offsets is not"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}",
         "tensor t.w: data_offsets [8,4] begin after they end"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}",
         "tensor t.w: data_offsets [0,4] hold 4 bytes, but F32 of 2 elements needs 8"},
        {"{\"t.w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
         "\"t.w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
         "names a tensor twice"},
        {"{\"__metadata__\": 3}", "__metadata__ is not an object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_raw_safetensors(s->dir, cases[i].header, 16);
        expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors: ", cases[i].needle);
    }
}

static void test_safetensors_offsets_past_data(void **state) {
    scratch *s = *state;
    write_raw_safetensors(s->dir,
                          "{\"model.norm.weight\": {\"dtype\": \"F32\", \"shape\": [128], "
                          "\"data_offsets\": [0, 512]}}",
                          256);
    expect_open_error(s->dir, CPM_EFORMAT,
                      "model.safetensors: tensor model.norm.weight: data_offsets [0,512] run "
                      "past the end of the data (256 bytes)",
                      NULL);
}

static void test_safetensors_overlap(void **state) {
    scratch *s = *state;
    write_raw_safetensors(s->dir,
                          "{\"a.w\": {\"dtype\": \"F32\", \"shape\": [4], "
                          "\"data_offsets\": [0, 16]}, "
                          "\"b.w\": {\"dtype\": \"F32\", \"shape\": [4], "
                          "\"data_offsets\": [12, 28]}}",
                          32);
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors: tensor b.w: data_offsets [12,28]",
                      "overlap those of tensor a.w [0,16]");
    /* Empty tensors overlap nothing. */
    write_raw_safetensors(s->dir,
                          "{\"a.w\": {\"dtype\": \"F32\", \"shape\": [4], "
                          "\"data_offsets\": [0, 16]}, "
                          "\"e.w\": {\"dtype\": \"F32\", \"shape\": [0, 5], "
                          "\"data_offsets\": [4, 4]}}",
                          16);
    cpm_checkpoint *ck = open_ok(s->dir);
    assert_int_equal(cpm_checkpoint_count(ck), 2);
    assert_int_equal(cpm_checkpoint_find(ck, "e.w")->nbytes, 0);
    cpm_checkpoint_free(ck);
}

static void test_safetensors_misaligned_is_copied(void **state) {
    scratch *s = *state;
    /* 8-byte-padded header, then an F32 tensor at data offset 2. */
    const char *h = "{\"b.w\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}, "
                    "\"a.w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [2, 10]}}";
    size_t hl = strlen(h), padded = (hl + 7) / 8 * 8;
    uint8_t buf[512] = {0};
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, h, hl);
    memset(buf + 8 + hl, ' ', padded - hl);
    const float vals[2] = {3.5f, -1.0f};
    memcpy(buf + 8 + padded + 2, vals, sizeof vals);
    write_file(s->dir, "model.safetensors", buf, 8 + padded + 10);
    cpm_checkpoint *ck = open_ok(s->dir);
    const cpm_tensor_view *v = cpm_checkpoint_find(ck, "a.w");
    assert_non_null(v);
    assert_int_equal((uintptr_t)v->data % 4, 0);
    assert_memory_equal(v->data, vals, sizeof vals);
    cpm_checkpoint_free(ck);
}

static void test_no_weights(void **state) {
    scratch *s = *state;
    expect_open_error(s->dir, CPM_ENOTFOUND, s->dir, "no model.safetensors");
}

/* ---- sharded safetensors ---- */

static void write_shards(const char *dir) {
    const float a[2] = {1.0f, 2.0f}, b[3] = {3.0f, 4.0f, 5.0f};
    cpm_safetensors_tensor t1 = {"a.w", "F32", 1, {2}, a, sizeof a};
    cpm_safetensors_tensor t2 = {"b.w", "F32", 1, {3}, b, sizeof b};
    char path[512];
    cpm_error err = {0};
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", dir);
    assert_int_equal(cpm_safetensors_write(path, &t1, 1, &err), 0);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    assert_int_equal(cpm_safetensors_write(path, &t2, 1, &err), 0);
}

static void write_index(const char *dir, const char *file_a, const char *file_b) {
    char json[512];
    int n = snprintf(json, sizeof json,
                     "{\"metadata\": {\"total_size\": 20}, \"weight_map\": "
                     "{\"a.w\": \"%s\", \"b.w\": \"%s\"}}",
                     file_a, file_b);
    write_file(dir, "model.safetensors.index.json", json, (size_t)n);
}

static void test_sharded_good(void **state) {
    scratch *s = *state;
    write_shards(s->dir);
    write_index(s->dir, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    assert_int_equal(cpm_checkpoint_count(ck), 2);
    const cpm_tensor_view *v = cpm_checkpoint_find(ck, "b.w");
    assert_non_null(v);
    assert_string_equal(v->file, "model-00002-of-00002.safetensors");
    assert_true(((const float *)v->data)[2] == 5.0f);
    cpm_checkpoint_free(ck);
}

static void test_sharded_missing_shard(void **state) {
    scratch *s = *state;
    write_shards(s->dir);
    write_index(s->dir, "model-00001-of-00002.safetensors", "model-00003-of-00002.safetensors");
    expect_open_error(s->dir, CPM_ENOTFOUND, "model.safetensors.index.json",
                      "shard model-00003-of-00002.safetensors is missing");
}

static void test_sharded_wrong_file(void **state) {
    scratch *s = *state;
    write_shards(s->dir);
    write_index(s->dir, "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors");
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors.index.json: tensor a.w",
                      "listed in model-00002-of-00002.safetensors but found in "
                      "model-00001-of-00002.safetensors");
    /* Only the files the map names are opened. */
    write_index(s->dir, "model-00002-of-00002.safetensors", "model-00002-of-00002.safetensors");
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors.index.json: tensor a.w",
                      "not in model-00002-of-00002.safetensors");
}

static void test_sharded_duplicate(void **state) {
    scratch *s = *state;
    const float a[2] = {1.0f, 2.0f};
    cpm_safetensors_tensor t = {"a.w", "F32", 1, {2}, a, sizeof a};
    char path[512];
    cpm_error err = {0};
    write_shards(s->dir);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", s->dir);
    assert_int_equal(cpm_safetensors_write(path, &t, 1, &err), 0);
    /* b.w now lives nowhere, a.w in both: the duplicate is reported first. */
    write_index(s->dir, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
    expect_open_error(s->dir, CPM_EFORMAT, "tensor a.w: in both model-00001-of-00002",
                      "model-00002-of-00002.safetensors");
}

static void test_sharded_escaping_name(void **state) {
    scratch *s = *state;
    write_shards(s->dir);
    write_index(s->dir, "../model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors");
    expect_open_error(s->dir, CPM_EFORMAT, "model.safetensors.index.json: tensor a.w",
                      "not a file name");
}

/* ---- torch archives from tests/data/checkpoints ---- */

static float f32_at(const cpm_tensor_view *v, size_t i) {
    float f;
    memcpy(&f, (const uint8_t *)v->data + 4 * i, 4);
    return f;
}

/* The fixture's content, whatever the container (see make_fixtures.py). */
static void check_fixture(const cpm_checkpoint *ck) {
    assert_int_equal(cpm_checkpoint_count(ck), 6);
    assert_int_equal(cpm_checkpoint_unsupported_count(ck), 1);
    const cpm_tensor_view *emb = cpm_checkpoint_find(ck, "model.embed_tokens.weight");
    assert_non_null(emb);
    assert_int_equal(emb->dtype, CPM_DTYPE_BF16);
    assert_int_equal(emb->ndim, 2);
    assert_int_equal(emb->shape[0], 4);
    assert_int_equal(emb->shape[1], 3);
    assert_int_equal(emb->nbytes, 24);
    for (size_t i = 0; i < 12; i++)
        assert_true(cpm_bf16_to_f32(((const uint16_t *)emb->data)[i]) == 0.5f * i - 2.0f);
    const cpm_tensor_view *norm = cpm_checkpoint_find(ck, "model.norm.weight");
    assert_true(f32_at(norm, 2) == -2.25f);
    const cpm_tensor_view *q = cpm_checkpoint_find(ck, "model.layers.0.self_attn.q_proj.weight");
    assert_int_equal(q->dtype, CPM_DTYPE_F16);
    for (size_t i = 0; i < 6; i++)
        assert_true(cpm_f16_to_f32(((const uint16_t *)q->data)[i]) == 0.25f * i);
    /* lm_head is the transpose of [[1,2,3],[4,5,6]]: copied to row-major. */
    const cpm_tensor_view *head = cpm_checkpoint_find(ck, "lm_head.weight");
    assert_int_equal(head->shape[0], 3);
    assert_int_equal(head->shape[1], 2);
    const float want_head[6] = {1, 4, 2, 5, 3, 6};
    for (size_t i = 0; i < 6; i++)
        assert_true(f32_at(head, i) == want_head[i]);
    /* up and down share one storage; down starts 4 elements in. */
    const cpm_tensor_view *up = cpm_checkpoint_find(ck, "model.layers.0.mlp.up_proj.weight");
    const cpm_tensor_view *down = cpm_checkpoint_find(ck, "model.layers.0.mlp.down_proj.weight");
    assert_true(f32_at(up, 0) == 10.0f && f32_at(up, 3) == 13.0f);
    assert_true(f32_at(down, 0) == 20.0f && f32_at(down, 3) == 23.0f);
    const int64_t want[2] = {1, 5};
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_expect(ck, "model.position_ids", 2, want, NULL, &err),
                     CPM_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "tensor model.position_ids: dtype I64"));
}

static void test_torch_fixture(void **state) {
    (void)state;
    cpm_checkpoint *ck = open_ok(CKPT_FIXTURES "/tiny-torch");
    check_fixture(ck);
    /* Contiguous tensors are served from the mapping, shared storage included. */
    const cpm_tensor_view *up = cpm_checkpoint_find(ck, "model.layers.0.mlp.up_proj.weight");
    const cpm_tensor_view *down = cpm_checkpoint_find(ck, "model.layers.0.mlp.down_proj.weight");
    assert_ptr_equal((const uint8_t *)up->data + 16, down->data);
    assert_string_equal(cpm_checkpoint_at(ck, 0)->name, "model.embed_tokens.weight");
    assert_string_equal(up->file, "pytorch_model.bin");
    cpm_checkpoint_free(ck);
}

static void test_torch_zip64(void **state) {
    (void)state;
    cpm_checkpoint *ck = open_ok(CKPT_FIXTURES "/tiny-torch-zip64");
    check_fixture(ck);
    cpm_checkpoint_free(ck);
}

static void test_torch_sharded(void **state) {
    (void)state;
    cpm_checkpoint *ck = open_ok(CKPT_FIXTURES "/tiny-torch-sharded");
    check_fixture(ck);
    assert_string_equal(cpm_checkpoint_find(ck, "lm_head.weight")->file,
                        "pytorch_model-00002-of-00002.bin");
    cpm_checkpoint_free(ck);
}

static void test_torch_compressed_entry(void **state) {
    (void)state;
    expect_open_error(CKPT_FIXTURES "/tiny-torch-deflated", CPM_EUNSUPPORTED,
                      "pytorch_model.bin: tensor model.norm.weight: entry "
                      "pytorch_model/data/1 is compressed (method 8)",
                      NULL);
}

static void copy_fixture(const char *dir, size_t keep, size_t flip) {
    size_t n;
    uint8_t *buf = read_file(CKPT_FIXTURES "/tiny-torch/pytorch_model.bin", &n);
    if (flip < n)
        buf[flip] ^= 0x55;
    write_file(dir, "pytorch_model.bin", buf, keep < n ? keep : n);
    free(buf);
}

static void test_torch_truncated_file(void **state) {
    scratch *s = *state;
    copy_fixture(s->dir, 1500, SIZE_MAX);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin", "end-of-central-directory");
}

static void test_torch_corrupt_pickle(void **state) {
    scratch *s = *state;
    copy_fixture(s->dir, SIZE_MAX, 64 + 40); /* a byte inside data.pkl */
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: pytorch_model/data.pkl",
                      "CRC mismatch");
}

/* ---- crafted torch archives ---- */

typedef struct zbuf {
    uint8_t *p;
    size_t n, cap;
} zbuf;

static void zput(zbuf *b, const void *data, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

#define ZLIT(b, lit) zput((b), (lit), sizeof(lit) - 1)

static void zput_le(zbuf *b, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) {
        uint8_t c = (uint8_t)(v >> (8 * i));
        zput(b, &c, 1);
    }
}

/* A stored zip of entries names[i] = datas[i] (lens[i] bytes). */
static void write_zip(const char *dir, size_t n, const char *const *names,
                      const void *const *datas, const size_t *lens) {
    zbuf out = {0}, cd = {0};
    for (size_t i = 0; i < n; i++) {
        uint32_t crc = cpm_zip_crc32(0, datas[i], lens[i]);
        size_t off = out.n, nl = strlen(names[i]);
        zput_le(&out, 0x04034b50, 4);
        zput_le(&out, 20, 2), zput_le(&out, 0, 2), zput_le(&out, 0, 2);
        zput_le(&out, 0, 4), zput_le(&out, crc, 4);
        zput_le(&out, lens[i], 4), zput_le(&out, lens[i], 4);
        zput_le(&out, nl, 2), zput_le(&out, 0, 2);
        zput(&out, names[i], nl);
        zput(&out, datas[i], lens[i]);
        zput_le(&cd, 0x02014b50, 4);
        zput_le(&cd, 20, 2), zput_le(&cd, 20, 2), zput_le(&cd, 0, 2), zput_le(&cd, 0, 2);
        zput_le(&cd, 0, 4), zput_le(&cd, crc, 4);
        zput_le(&cd, lens[i], 4), zput_le(&cd, lens[i], 4);
        zput_le(&cd, nl, 2), zput_le(&cd, 0, 2), zput_le(&cd, 0, 2);
        zput_le(&cd, 0, 2), zput_le(&cd, 0, 2), zput_le(&cd, 0, 4);
        zput_le(&cd, off, 4);
        zput(&cd, names[i], nl);
    }
    size_t cd_off = out.n;
    zput(&out, cd.p, cd.n);
    zput_le(&out, 0x06054b50, 4);
    zput_le(&out, 0, 2), zput_le(&out, 0, 2), zput_le(&out, n, 2), zput_le(&out, n, 2);
    zput_le(&out, cd.n, 4), zput_le(&out, cd_off, 4), zput_le(&out, 0, 2);
    write_file(dir, "pytorch_model.bin", out.p, out.n);
    free(out.p);
    free(cd.p);
}

/* A pickle of {name: tensor} with one F32 storage "0", as protocol 2 writes it. */
static size_t one_tensor_pickle(uint8_t *p, const char *name, uint8_t numel, uint8_t offset,
                                uint8_t rows, uint8_t cols) {
    zbuf b = {0};
    ZLIT(&b, "\x80\x02}");
    uint8_t nl = (uint8_t)strlen(name);
    zput(&b, "\x8c", 1), zput(&b, &nl, 1), zput(&b, name, nl);
    ZLIT(&b, "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\0\0\0storage");
    ZLIT(&b, "ctorch\nFloatStorage\nX\x01\0\0\0" "0X\x03\0\0\0cpuK");
    zput(&b, &numel, 1);
    zput(&b, "tQK", 3), zput(&b, &offset, 1);
    zput(&b, "K", 1), zput(&b, &rows, 1), zput(&b, "K", 1), zput(&b, &cols, 1);
    zput(&b, "\x86K", 2), zput(&b, &cols, 1), zput(&b, "K\x01\x86\x89", 4);
    ZLIT(&b, "ccollections\nOrderedDict\n)RtRs.");
    memcpy(p, b.p, b.n);
    size_t n = b.n;
    free(b.p);
    return n;
}

static void write_one_tensor_archive(const char *dir, const void *pkl, size_t pkl_len,
                                     size_t storage_bytes) {
    static const float data[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const char *names[2] = {"archive/data.pkl", "archive/data/0"};
    const void *datas[2] = {pkl, data};
    size_t lens[2] = {pkl_len, storage_bytes};
    write_zip(dir, 2, names, datas, lens);
}

static void test_torch_crafted_good(void **state) {
    scratch *s = *state;
    uint8_t pkl[512];
    size_t n = one_tensor_pickle(pkl, "w", 16, 4, 3, 4);
    write_one_tensor_archive(s->dir, pkl, n, 64);
    cpm_checkpoint *ck = open_ok(s->dir);
    const cpm_tensor_view *v = cpm_checkpoint_find(ck, "w");
    assert_non_null(v);
    assert_int_equal(v->shape[0], 3);
    assert_true(f32_at(v, 0) == 4.0f && f32_at(v, 11) == 15.0f);
    cpm_checkpoint_free(ck);
}

static void test_torch_view_past_storage(void **state) {
    scratch *s = *state;
    uint8_t pkl[512];
    size_t n = one_tensor_pickle(pkl, "w", 16, 5, 3, 4); /* last element at 16 */
    write_one_tensor_archive(s->dir, pkl, n, 64);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: tensor w",
                      "reaches past its storage");
}

static void test_torch_storage_size_mismatch(void **state) {
    scratch *s = *state;
    uint8_t pkl[512];
    size_t n = one_tensor_pickle(pkl, "w", 16, 0, 2, 2);
    write_one_tensor_archive(s->dir, pkl, n, 60);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: tensor w: storage archive/data/0",
                      "holds 60 bytes");
}

static void test_torch_missing_storage(void **state) {
    scratch *s = *state;
    uint8_t pkl[512];
    size_t n = one_tensor_pickle(pkl, "w", 16, 0, 2, 2);
    const char *names[1] = {"archive/data.pkl"};
    const void *datas[1] = {pkl};
    write_zip(s->dir, 1, names, datas, &n);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: tensor w",
                      "storage entry archive/data/0 is missing");
}

static void test_torch_evil_global(void **state) {
    scratch *s = *state;
    static const char pkl[] = "\x80\x02}X\x01\0\0\0wcos\nsystem\nX\x02\0\0\0ls\x85Rs.";
    write_one_tensor_archive(s->dir, pkl, sizeof pkl - 1, 64);
    expect_open_error(s->dir, CPM_EUNSUPPORTED, "pytorch_model.bin: archive/data.pkl",
                      "global 'os.system' is not allowed");
}

static void test_torch_truncated_pickle(void **state) {
    scratch *s = *state;
    uint8_t pkl[512];
    size_t n = one_tensor_pickle(pkl, "w", 16, 0, 2, 2);
    write_one_tensor_archive(s->dir, pkl, n - 7, 64);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: archive/data.pkl", "truncated");
    write_one_tensor_archive(s->dir, pkl, 40, 64); /* stops inside a string */
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin: archive/data.pkl", "truncated");
}

static void test_torch_not_an_archive(void **state) {
    scratch *s = *state;
    write_file(s->dir, "pytorch_model.bin", "\x80\x02\x8a\x0a", 4);
    expect_open_error(s->dir, CPM_EUNSUPPORTED, "pytorch_model.bin", "legacy");
    write_file(s->dir, "pytorch_model.bin", "hello, this is not a zip file at all", 36);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin", "not a zip archive");
    const char *names[1] = {"archive/version"};
    const void *datas[1] = {"3\n"};
    size_t len = 2;
    write_zip(s->dir, 1, names, datas, &len);
    expect_open_error(s->dir, CPM_EFORMAT, "pytorch_model.bin", "not a torch.save archive");
}

static void test_preference_order(void **state) {
    scratch *s = *state;
    /* A broken pytorch_model.bin next to a good model.safetensors is never read. */
    write_file(s->dir, "pytorch_model.bin", "junk", 4);
    write_good(s->dir, "model.safetensors");
    cpm_checkpoint *ck = open_ok(s->dir);
    assert_int_equal(cpm_checkpoint_count(ck), 3);
    cpm_checkpoint_free(ck);
    cpm_error err = {0};
    assert_int_equal(cpm_checkpoint_open_file(s->dir, "pytorch_model.bin", &ck, &err),
                     CPM_EFORMAT);
    cpm_checkpoint_free(NULL);
}

#define SCRATCH(f) cmocka_unit_test_setup_teardown(f, scratch_setup, scratch_teardown)

int main(void) {
    const struct CMUnitTest tests[] = {
        SCRATCH(test_safetensors_good),
        SCRATCH(test_checkpoint_copy),
        SCRATCH(test_safetensors_wrong_shape),
        SCRATCH(test_safetensors_missing_tensor),
        SCRATCH(test_safetensors_unsupported_dtype),
        SCRATCH(test_safetensors_truncated),
        SCRATCH(test_safetensors_truncated_data),
        SCRATCH(test_safetensors_header_length),
        SCRATCH(test_safetensors_bad_json),
        SCRATCH(test_safetensors_bad_entries),
        SCRATCH(test_safetensors_offsets_past_data),
        SCRATCH(test_safetensors_overlap),
        SCRATCH(test_safetensors_misaligned_is_copied),
        SCRATCH(test_no_weights),
        SCRATCH(test_sharded_good),
        SCRATCH(test_sharded_missing_shard),
        SCRATCH(test_sharded_wrong_file),
        SCRATCH(test_sharded_duplicate),
        SCRATCH(test_sharded_escaping_name),
        cmocka_unit_test(test_torch_fixture),
        cmocka_unit_test(test_torch_zip64),
        cmocka_unit_test(test_torch_sharded),
        cmocka_unit_test(test_torch_compressed_entry),
        SCRATCH(test_torch_truncated_file),
        SCRATCH(test_torch_corrupt_pickle),
        SCRATCH(test_torch_crafted_good),
        SCRATCH(test_torch_view_past_storage),
        SCRATCH(test_torch_storage_size_mismatch),
        SCRATCH(test_torch_missing_storage),
        SCRATCH(test_torch_evil_global),
        SCRATCH(test_torch_truncated_pickle),
        SCRATCH(test_torch_not_an_archive),
        SCRATCH(test_preference_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
