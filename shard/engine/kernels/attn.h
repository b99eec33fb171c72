/* attn.h - one block of cached keys folded into the online-softmax state of
 * the query heads that share them (a KV head group of one query row): the
 * inner step of attention. Kernels know nothing of models or caches: the
 * caller hands over the block's key and value rows as f32.
 *
 * Arithmetic (fixed; the portable code and the AVX-512 and AVX2 kernels give the same
 * bits, so decode, prefill and every ISA agree): for each head h in order,
 *   s[j]  = cpm_dot(q_h, K_j) * scale                      (its 8-way order)
 *   m'    = max(mx[h], max_j s[j]);  c = expf(mx[h] - m')
 *   sum[h] = sum[h] * c;  acc_h[d] = acc_h[d] * c
 *   p[j]  = e^(s[j] - m')                                   (cpm_exp_shifted)
 *   sum[h] = sum[h] + p[j]          for j = 0, 1, ... in order
 *   acc_h[d] = acc_h[d] + p[j] * V_j[d]   for j in order    (cpm_axpy_rows)
 *   mx[h] = m'
 * with every product and sum rounded to f32 on its own (no fused multiply-add).
 */
#ifndef CPM_ATTN_H
#define CPM_ATTN_H

#include <stdbool.h>

typedef struct cpm_attn_block {
    const float *q;   /* [G][dk] the group's query heads */
    const float *K;   /* nb key rows, ks floats apart; NULL when kt holds the keys */
    const float *V;   /* nb value rows, vs floats apart */
    int ks, vs;
    int nb;           /* 1 .. 16 keys */
    int G, dk, dv;
    float scale;
    float *acc;       /* [G][dv] running sums of p·V */
    float *mx, *sum;  /* [G] running max and sum of p */
    float *work;      /* cpm_attn_work_floats(G, dk) floats of scratch, 64-byte aligned */
    const float *kt;  /* NULL, or the block's keys as cpm_attn_transpose lays them out
                       * (64-byte aligned; lanes past nb may hold anything): from
                       * a cache that stores them so, or transposed once for many
                       * queries */
} cpm_attn_block;

/* Scratch cpm_attn_fold needs. */
int cpm_attn_work_floats(int G, int dk);

/* kt[i * 16 + j] = K_j[i] for i < dk, j < nb (nb <= 16; the other lanes 0):
 * dk * 16 floats, 64-byte aligned. */
void cpm_attn_transpose(const float *K, int ks, int nb, int dk, float *kt);

/* Folds the block in (the arithmetic above), with the best kernel this CPU
 * has: AVX-512 or AVX2 as cpm_isa_in_effect() has them, else the portable code. */
void cpm_attn_fold(const cpm_attn_block *b);

/* The portable code alone (tests compare the kernels with it). */
void cpm_attn_fold_ref(const cpm_attn_block *b);

#endif
