/* matmul_q4_tmpl.h - the int4 kernel in the q4 canonical order of
 * matmul_q4_internal.h, written once over a 16-lane vector vocabulary that each
 * ISA file defines before including it (scalar in matmul_q4.c, AVX2, AVX-512):
 *
 *   V, VZ              16 f32 lanes; a broadcast zero point
 *   v_zero() v_load(p) v_set1(f) v_store(p, v) v_fma(a, b, c) = a·b + c
 *   vz_set1(z)         broadcast an int zero point
 *   v_nibbles(p, z, &lo, &hi)   16 bytes → (low nibbles − z), (high nibbles − z)
 *   v_reduce(v)        the canonical 16-lane tree
 *   Q4_MR, Q4_NR, Q4_DEC, Q4_SMR, Q4_SDEC, Q4_SDEC2, Q4_SMALL_M, Q4_KERNEL
 *                      tile sizes, the decode/prefill cut and the exported name
 *
 * Decode (one x row) streams Q4_DEC rows of nibbles at a time; a few x rows
 * (M up to Q4_SMALL_M) go Q4_SMR at a time against Q4_SDEC weight rows
 * (Q4_SDEC2 for a pair of x rows), each block unpacked once for all of them.
 * Prefill widens a group of weight rows to (q − z) f32 into the thread's panel
 * buffer (Q4_NR rows per panel, interleaved by 16-lane chunk so that a panel is
 * one sequential stream), then runs every Q4_MR-row tile of x against each panel
 * of the group: the group stays in L2 while x passes once per group. All paths
 * feed the same lanes in the same order, so a row's result never depends on the
 * path it took.
 */
#define Q4_INLINE static inline __attribute__((always_inline))

#ifndef V_KEEP /* optional: V_KEEP(v) keeps v in a register (not refetched per use) */
#define V_KEEP(v) ((void)0)
#endif

#ifndef Q4_PREFETCH /* optional: Q4_PREFETCH(p) fetches the nibbles Q4_PF_DIST bytes ahead */
#define Q4_PREFETCH(p) ((void)(p))
#define Q4_PF_DIST 0
#endif

/* y[i, j] = x row i times W row n + j, i < mr, j < nr, straight from the
 * nibbles: each block is unpacked once and feeds all mr rows of x. */
Q4_INLINE void q4_decode(const int mr, const int nr, const cpm_q4 *w, const float *x,
                         size_t ldx, int n, float *y, size_t ldy) {
    const size_t row_bytes = (size_t)w->Kp / 2;
    const uint8_t *row[Q4_DEC], *zp[Q4_DEC];
    const float *sc[Q4_DEC];
    V tot[Q4_SMR][Q4_DEC], acc[Q4_SMR][Q4_DEC];
    for (int j = 0; j < nr; j++) {
        row[j] = w->nib + (size_t)(n + j) * row_bytes;
        zp[j] = w->zero + (size_t)(n + j) * (size_t)w->G;
        sc[j] = w->scale + (size_t)(n + j) * (size_t)w->G;
        for (int i = 0; i < mr; i++)
            tot[i][j] = v_zero();
    }
    for (int g = 0; g < w->G; g++) {
        const size_t p0 = (size_t)g * (size_t)w->gp;
        VZ z[Q4_DEC];
        for (int j = 0; j < nr; j++) {
            z[j] = vz_set1(zp[j][g]);
            for (int i = 0; i < mr; i++)
                acc[i][j] = v_zero();
        }
        for (size_t p = p0; p < p0 + (size_t)w->gp; p += CPM_Q4_BLOCK) {
            V x0[Q4_SMR], x1[Q4_SMR];
            for (int i = 0; i < mr; i++) {
                x0[i] = v_load(x + (size_t)i * ldx + p);
                x1[i] = v_load(x + (size_t)i * ldx + p + 16);
            }
            for (int j = 0; j < nr; j++) {
                V lo, hi;
                Q4_PREFETCH(row[j] + p / 2 + Q4_PF_DIST);
                v_nibbles(row[j] + p / 2, z[j], &lo, &hi);
                for (int i = 0; i < mr; i++) {
                    acc[i][j] = v_fma(x0[i], lo, acc[i][j]);
                    acc[i][j] = v_fma(x1[i], hi, acc[i][j]);
                }
            }
        }
        for (int j = 0; j < nr; j++) {
            V s = v_set1(sc[j][g]);
            for (int i = 0; i < mr; i++)
                tot[i][j] = v_fma(s, acc[i][j], tot[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + (size_t)j] = v_reduce(tot[i][j]);
}

/* Rows [n, n + nr) of W as (q − z) f32 into panel, chunk c of row j at
 * panel[(c * nr + j) * 16]. */
static void q4_fill_panel(const cpm_q4 *w, int n, int nr, float *panel) {
    const size_t row_bytes = (size_t)w->Kp / 2;
    for (int j = 0; j < nr; j++) {
        const uint8_t *row = w->nib + (size_t)(n + j) * row_bytes;
        const uint8_t *zp = w->zero + (size_t)(n + j) * (size_t)w->G;
        float *dst = panel + (size_t)j * 16;
        const size_t step = (size_t)nr * 16; /* floats from one chunk of a row to its next */
        for (int g = 0; g < w->G; g++) {
            VZ z = vz_set1(zp[g]);
            size_t p0 = (size_t)g * (size_t)w->gp;
            for (size_t p = p0; p < p0 + (size_t)w->gp; p += CPM_Q4_BLOCK) {
                V lo, hi;
                v_nibbles(row + p / 2, z, &lo, &hi);
                v_store(dst + p / 16 * step, lo);
                v_store(dst + (p / 16 + 1) * step, hi);
            }
        }
    }
}

/* y[i, j] for i < mr x rows and j < nr rows of an interleaved panel of nrp
 * rows (weight rows n + j): the mr x vectors of a chunk stay in registers and
 * each weight vector is loaded once for all of them. */
Q4_INLINE void q4_tile(const int mr, const int nr, const cpm_q4 *w, const float *x, size_t ldx,
                       const float *panel, int nrp, int n, float *y, size_t ldy) {
    V tot[Q4_MR][Q4_NR], acc[Q4_MR][Q4_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            tot[i][j] = v_zero();
    const float *wp = panel;
    for (int g = 0; g < w->G; g++) {
        const size_t p0 = (size_t)g * (size_t)w->gp;
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                acc[i][j] = v_zero();
        for (size_t p = p0; p < p0 + (size_t)w->gp; p += 16, wp += (size_t)nrp * 16) {
            V xv[Q4_MR];
            for (int i = 0; i < mr; i++)
                xv[i] = v_load(x + (size_t)i * ldx + p);
            for (int j = 0; j < nr; j++) {
                V wv = v_load(wp + (size_t)j * 16);
                V_KEEP(wv);
                for (int i = 0; i < mr; i++)
                    acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
            }
        }
        for (int j = 0; j < nr; j++) {
            V s = v_set1(w->scale[(size_t)(n + j) * (size_t)w->G + (size_t)g]);
            for (int i = 0; i < mr; i++)
                tot[i][j] = v_fma(s, acc[i][j], tot[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[(size_t)i * ldy + (size_t)j] = v_reduce(tot[i][j]);
}

/* Weight rows [n0, n1) against x rows [m, m + mr): Q4_DEC rows at a time for
 * one x row, Q4_SDEC for a few (more accumulators per weight row). */
Q4_INLINE void q4_decode_span(const int mr, const cpm_q4_job *job, int m, int n0, int n1) {
    const int dec = mr == 1 ? Q4_DEC : mr == 2 ? Q4_SDEC2 : Q4_SDEC;
    const float *x = job->x + (size_t)m * job->ldx;
    float *y = job->y + (size_t)m * job->ldy;
    int n = n0;
    for (; n + dec <= n1; n += dec)
        q4_decode(mr, dec, job->w, x, job->ldx, n, y + n, job->ldy);
    for (; n < n1; n++)
        q4_decode(mr, 1, job->w, x, job->ldx, n, y + n, job->ldy);
}

/* x rows [m0, m1) straight from the nibbles, Q4_SMR at a time. */
static void q4_decode_rows(const cpm_q4_job *job, int m0, int m1, int n0, int n1) {
    int m = m0;
    for (; m + Q4_SMR <= m1; m += Q4_SMR)
        q4_decode_span(Q4_SMR, job, m, n0, n1);
#if Q4_SMR > 3
    if (m1 - m == 3)
        q4_decode_span(3, job, m, n0, n1), m += 3;
#endif
#if Q4_SMR > 2
    if (m1 - m == 2)
        q4_decode_span(2, job, m, n0, n1), m += 2;
#endif
    if (m1 - m == 1)
        q4_decode_span(1, job, m, n0, n1);
}

/* Weight rows [n, n + rows) widened into the thread's panels, then every x tile
 * of [m0, m1) against each panel in turn (x tile in L1, the group in L2). */
static void q4_group(const cpm_q4_job *job, int m0, int m1, int n, int rows, float *panels) {
    const size_t ldx = job->ldx, ldy = job->ldy, Kp = (size_t)job->w->Kp;
    for (int j = 0; j < rows; j += Q4_NR)
        q4_fill_panel(job->w, n + j, rows - j < Q4_NR ? rows - j : Q4_NR, panels + j * Kp);
    for (int m = m0; m < m1; m += Q4_MR) {
        const int mr = m1 - m < Q4_MR ? m1 - m : Q4_MR;
        const float *x = job->x + (size_t)m * ldx;
        float *y = job->y + (size_t)m * ldy + n;
        for (int j = 0; j < rows; j += Q4_NR) {
            const float *p = panels + j * Kp;
            const int nr = rows - j < Q4_NR ? rows - j : Q4_NR;
            if (mr == Q4_MR && nr == Q4_NR) {
                q4_tile(Q4_MR, Q4_NR, job->w, x, ldx, p, Q4_NR, n + j, y + j, ldy);
                continue;
            }
            for (int i = 0; i < mr; i++)
                for (int jj = 0; jj < nr; jj++)
                    q4_tile(1, 1, job->w, x + i * ldx, ldx, p + jj * 16, nr, n + j + jj,
                            y + i * ldy + j + jj, ldy);
        }
    }
}

void Q4_KERNEL(const cpm_q4_job *job, int m0, int m1, int n0, int n1, float *panel) {
    _Static_assert(Q4_SMR >= 1 && Q4_SDEC <= Q4_DEC && Q4_SDEC2 <= Q4_DEC, "decode tile sizes");
    if (m1 - m0 <= Q4_SMALL_M || !panel) {
        q4_decode_rows(job, m0, m1, n0, n1);
        return;
    }
    _Static_assert(Q4_NR <= CPM_Q4_NR_MAX, "panel sized for CPM_Q4_NR_MAX rows");
    const int rows = (int)(cpm_q4_panel_floats(job->w->Kp) / (size_t)job->w->Kp) / Q4_NR * Q4_NR;
    for (int n = n0; n < n1; n += rows)
        q4_group(job, m0, m1, n, n1 - n < rows ? n1 - n : rows, panel);
}
