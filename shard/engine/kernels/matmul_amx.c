/* matmul_amx.c - AMX-BF16 kernel for cpm_matmul with BF16 weights.
 *
 * AMX multiplies bf16 by bf16 into f32, and the engine's activations are f32.
 * So x is split into three bf16 terms by truncation, x = x1 + x2 + x3 exactly
 * (8 + 8 + 8 significand bits), and each product x_s * w (8 x 8 bits) is exact
 * in f32: no precision is given up on the inputs, unlike feeding bf16(x).
 * The three terms of one x row sit in three adjacent tile columns, so all of
 * them ride in the same tile multiply; y = (c1 + c2) + c3 at the end.
 *
 * Tiles: C (tiles 0-3) is 16 W rows by 16 columns (5 x rows x 3 terms + one
 * zero column); A (4-5) is 16 W rows by 32 k, loaded straight from W; B (6-7)
 * is 32 k by 16 columns of packed x. Each C element is summed over k in the
 * same order whatever M, N or the thread, so results do not depend on them.
 * Time goes mostly to feeding tiles: x is split 16 lanes at a time (the same
 * truncations and subtractions, so the same bits), and each k step's tiles
 * are prefetched into L1 PF_DIST steps ahead of their loads.
 */
#include <immintrin.h>
#include <string.h>

#include "matmul_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define KSTEP 32            /* k per tile multiply */
#define TILE_BYTES 1024     /* 16 rows x 64 bytes */
#define PF_DIST 2           /* k steps ahead that tiles are prefetched into L1 */
#define GROUP_ROWS 128      /* W rows kept hot in L2 while every x block passes */

struct tilecfg {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

size_t cpm_mm_amx_packed_size(int M, int K) {
    size_t blocks = (size_t)(M + CPM_MM_AMX_ROWS - 1) / CPM_MM_AMX_ROWS;
    size_t steps = (size_t)(K + KSTEP - 1) / KSTEP;
    return blocks * steps * TILE_BYTES;
}

/* 16x16 transpose of f32, in place: r[j][n] = old r[n][j]. */
INLINE void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        for (int j = 0; j < 2; j++) {
            r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + j]),
                                                               _mm512_castps_pd(t[i + j + 2])));
            r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + j]),
                                                                   _mm512_castps_pd(t[i + j + 2])));
        }
    }
    for (int i = 0; i < 16; i += 8) {
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* The three truncated bf16 terms of 16 floats, each in the top half of its
 * lane; each difference is exact in f32, as in one term at a time. */
INLINE void split3(__m512 v, __m512i t[3]) {
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), hi_mask));
    __m512 rest = _mm512_sub_ps(v, hi);
    __m512 mid = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(rest), hi_mask));
    __m512 low = _mm512_sub_ps(rest, mid);
    t[0] = _mm512_castps_si512(v);
    t[1] = _mm512_castps_si512(rest);
    t[2] = _mm512_castps_si512(low);
}

/* One B tile: row p holds k pair (2p, 2p+1); column 3i + s holds term s of
 * x row m + i. Out-of-range rows and k are zero. Built as columns (the top
 * halves of k 2p and 2p+1 joined), then transposed into rows. */
static void pack_tile(uint32_t *dst, const cpm_mm_job *job, int m, int k0) {
    /* word j of the result = word 2j + 1 of (lo, hi): the top halves in order */
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                         31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    int kn = job->K - k0 < KSTEP ? job->K - k0 : KSTEP;
    __mmask16 m_lo = (__mmask16)(kn >= 16 ? 0xffff : (1u << kn) - 1);
    __mmask16 m_hi = (__mmask16)(kn >= 32 ? 0xffff : kn <= 16 ? 0 : (1u << (kn - 16)) - 1);
    __m512 col[16];
    for (int c = 0; c < 16; c++)
        col[c] = _mm512_setzero_ps();
    for (int i = 0; i < CPM_MM_AMX_ROWS && m + i < job->M; i++) {
        const float *x = job->x + (size_t)(m + i) * job->ldx + k0;
        __m512i lo[3], hi[3];
        split3(_mm512_maskz_loadu_ps(m_lo, x), lo);
        split3(kn > 16 ? _mm512_maskz_loadu_ps(m_hi, x + 16) : _mm512_setzero_ps(), hi);
        for (int s = 0; s < 3; s++)
            col[3 * i + s] = _mm512_castsi512_ps(_mm512_permutex2var_epi16(lo[s], odd, hi[s]));
    }
    transpose16(col);
    for (int p = 0; p < KSTEP / 2; p++)
        _mm512_store_ps(dst + p * 16, col[p]);
}

void cpm_mm_amx_pack(const cpm_mm_job *job, int b0, int b1) {
    int steps = (job->K + KSTEP - 1) / KSTEP;
    for (int b = b0; b < b1; b++)
        for (int s = 0; s < steps; s++)
            pack_tile((uint32_t *)((char *)job->packed + ((size_t)b * steps + s) * TILE_BYTES),
                      job, b * CPM_MM_AMX_ROWS, s * KSTEP);
}

/* 16 W rows from row `base`, k from k0, zero-padded past N and K: for the
 * last partial k step and for matrices narrower than a tile. */
static void copy_a(uint16_t *dst, const cpm_mm_job *job, int base, int k0) {
    const uint16_t *w = job->w;
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < KSTEP; k++)
            dst[r * KSTEP + k] = base + r < job->N && k0 + k < job->K
                               ? w[(size_t)(base + r) * job->w_ld + k0 + k] : 0;
}

typedef struct ntile {
    int base;     /* first W row the tile loads */
    int lo, hi;   /* rows of y it writes */
    int direct;   /* all 16 rows exist: load from W itself */
} ntile;

static ntile make_ntile(const cpm_mm_job *job, int t, int n1) {
    ntile nt = {.base = t, .lo = t, .hi = t + 16 < n1 ? t + 16 : n1, .direct = 1};
    if (t + 16 > job->N) {
        /* Shift the tile back inside W; rows already covered are not stored. */
        nt.base = job->N >= 16 ? job->N - 16 : 0;
        nt.direct = job->N >= 16;
    }
    return nt;
}

/* y[m, n] = (c1 + c2) + c3 for the tile's 5 x rows and its stored W rows;
 * the transpose turns C's columns (terms of one x row) into vectors along n. */
static void store_c(const cpm_mm_job *job, const float c[16][16], const ntile *nt, int mb) {
    __m512 r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_load_ps(c[i]);
    transpose16(r);
    __mmask16 keep = (__mmask16)(((1u << (nt->hi - nt->lo)) - 1) << (nt->lo - nt->base));
    for (int i = 0; i < CPM_MM_AMX_ROWS; i++) {
        int m = mb * CPM_MM_AMX_ROWS + i;
        if (m >= job->M)
            break;
        __m512 v = _mm512_add_ps(_mm512_add_ps(r[3 * i], r[3 * i + 1]), r[3 * i + 2]);
        _mm512_mask_storeu_ps(job->y + (size_t)m * job->ldy + nt->base, keep, v);
    }
}

#define LOAD_A(tile, nt, s)                                                              \
    do {                                                                                 \
        if ((nt).direct && (s) < full)                                                   \
            _tile_loadd(tile, w + (size_t)(nt).base * w_ld + (size_t)(s) * KSTEP,        \
                        (long)(w_ld * 2));                                               \
        else {                                                                           \
            copy_a(abuf, job, (nt).base, (s) * KSTEP);                                   \
            _tile_loadd(tile, abuf, 64);                                                 \
        }                                                                                \
    } while (0)

/* Pulls the tiles of k step s into L1 ahead of their loads: the W rows
 * strided apart and the packed x tiles (nb, b1 NULL when unused). */
INLINE void prefetch_step(const cpm_mm_job *job, const ntile *na, const ntile *nb,
                          const char *b0, const char *b1, int s) {
    const uint16_t *w = job->w;
    const size_t w_ld = (size_t)job->w_ld;
    for (int r = 0; r < 16; r++) {
        if (na->direct)
            _mm_prefetch((const char *)(w + (size_t)(na->base + r) * w_ld + (size_t)s * KSTEP), _MM_HINT_T0);
        if (nb && nb->direct)
            _mm_prefetch((const char *)(w + (size_t)(nb->base + r) * w_ld + (size_t)s * KSTEP), _MM_HINT_T0);
        _mm_prefetch(b0 + (size_t)s * TILE_BYTES + r * 64, _MM_HINT_T0);
        if (b1)
            _mm_prefetch(b1 + (size_t)s * TILE_BYTES + r * 64, _MM_HINT_T0);
    }
}

/* C tiles for n tiles (a[, b]) x m blocks (mb[, mb + 1]) over all of K. */
INLINE void block(const int two_n, const int two_m, const cpm_mm_job *job,
                  const ntile *na, const ntile *nb, int mb) {
    const uint16_t *w = job->w;
    const size_t w_ld = (size_t)job->w_ld;
    const int steps = (job->K + KSTEP - 1) / KSTEP, full = job->K / KSTEP;
    const char *b0 = (const char *)job->packed + (size_t)mb * steps * TILE_BYTES;
    const char *b1 = b0 + (size_t)steps * TILE_BYTES;
    uint16_t abuf[16 * KSTEP] __attribute__((aligned(64)));
    float c[16][16] __attribute__((aligned(64)));

    _tile_zero(0);
    if (two_m)
        _tile_zero(1);
    if (two_n) {
        _tile_zero(2);
        if (two_m)
            _tile_zero(3);
    }
    for (int s = 0; s < steps; s++) {
        if (s + PF_DIST < full)
            prefetch_step(job, na, two_n ? nb : NULL, b0, two_m ? b1 : NULL, s + PF_DIST);
        LOAD_A(4, *na, s);
        _tile_loadd(6, b0 + (size_t)s * TILE_BYTES, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_m) {
            _tile_loadd(7, b1 + (size_t)s * TILE_BYTES, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_n) {
            LOAD_A(5, *nb, s);
            _tile_dpbf16ps(2, 5, 6);
            if (two_m)
                _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 64);
    store_c(job, c, na, mb);
    if (two_m) {
        _tile_stored(1, c, 64);
        store_c(job, c, na, mb + 1);
    }
    if (two_n) {
        _tile_stored(2, c, 64);
        store_c(job, c, nb, mb);
        if (two_m) {
            _tile_stored(3, c, 64);
            store_c(job, c, nb, mb + 1);
        }
    }
}

static void n_pair(const cpm_mm_job *job, int t, int n1, int mb, int two_m) {
    ntile na = make_ntile(job, t, n1);
    if (t + 16 < n1) {
        ntile nb = make_ntile(job, t + 16, n1);
        if (two_m)
            block(1, 1, job, &na, &nb, mb);
        else
            block(1, 0, job, &na, &nb, mb);
    } else if (two_m) {
        block(0, 1, job, &na, &na, mb);
    } else {
        block(0, 0, job, &na, &na, mb);
    }
}

void cpm_mm_amx(const cpm_mm_job *job, int m0, int m1, int n0, int n1) {
    (void)m0; /* the pack covers all of M; cpm_matmul splits AMX work over N */
    (void)m1;
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    int mblocks = (job->M + CPM_MM_AMX_ROWS - 1) / CPM_MM_AMX_ROWS;
    for (int g = n0; g < n1; g += GROUP_ROWS) {
        int g1 = g + GROUP_ROWS < n1 ? g + GROUP_ROWS : n1;
        for (int mb = 0; mb < mblocks; mb += 2)
            for (int t = g; t < g1; t += 32)
                n_pair(job, t, g1, mb, mb + 1 < mblocks);
    }
    _tile_release(); /* so the kernel need not save 8 KiB of tile state */
}
