/* attn.c - the portable online-softmax step of attn.h, over the element-wise
 * operations of ops.c, and the dispatch to the AVX-512 and AVX2 kernels. */
#include "attn.h"

#include <math.h>

#include "matmul.h"
#include "ops.h"

#if defined(__x86_64__) && defined(CPM_HAVE_X86_KERNELS)
#define X86_KERNELS 1
void cpm_attn_fold_avx512(const cpm_attn_block *b);
void cpm_attn_transpose_avx512(const float *K, int ks, int nb, int dk, float *kt);
void cpm_attn_fold_avx2(const cpm_attn_block *b);
void cpm_attn_transpose_avx2(const float *K, int ks, int nb, int dk, float *kt);
#else
#define X86_KERNELS 0
#endif

#define BLOCK 16

int cpm_attn_work_floats(int G, int dk) { return BLOCK * (dk + G) + G + 16; }

/* cpm_dot(q, K_j) * scale for the keys of a transposed block, in cpm_dot's
 * order (partial sum k takes the dimensions i = k mod 8, the tail goes to sum
 * 0, then the tree), the 16 keys side by side; lanes past nb are computed and
 * dropped. */
static void scores_transposed(float *sc, const float *q, const float *kt, int dk, int nb,
                              float scale) {
    float s[8][BLOCK] = {{0}};
    int i = 0;
    for (; i + 8 <= dk; i += 8)
        for (int k = 0; k < 8; k++)
            for (int j = 0; j < BLOCK; j++)
                s[k][j] += q[i + k] * kt[(size_t)(i + k) * BLOCK + j];
    for (; i < dk; i++)
        for (int j = 0; j < BLOCK; j++)
            s[0][j] += q[i] * kt[(size_t)i * BLOCK + j];
    for (int j = 0; j < nb; j++)
        sc[j] = (((s[0][j] + s[1][j]) + (s[2][j] + s[3][j])) +
                 ((s[4][j] + s[5][j]) + (s[6][j] + s[7][j]))) * scale;
}

void cpm_attn_fold_ref(const cpm_attn_block *b) {
    for (int h = 0; h < b->G; h++) {
        float *sc = b->work + (size_t)h * BLOCK, bmax = -INFINITY;
        const float *q = b->q + (size_t)h * b->dk;
        if (b->K)
            cpm_dot_rows(sc, q, b->K, b->ks, b->nb, b->dk, b->scale);
        else
            scores_transposed(sc, q, b->kt, b->dk, b->nb, b->scale);
        for (int j = 0; j < b->nb; j++)
            bmax = sc[j] > bmax ? sc[j] : bmax;
        float newmax = bmax > b->mx[h] ? bmax : b->mx[h];
        float corr = expf(b->mx[h] - newmax); /* 0 on the first block */
        float *ac = b->acc + (size_t)h * b->dv;
        b->sum[h] *= corr;
        cpm_scale(ac, corr, b->dv);
        cpm_exp_shifted(sc, b->nb, newmax); /* scores become weights in place */
        for (int j = 0; j < b->nb; j++)
            b->sum[h] += sc[j];
        cpm_axpy_rows(ac, sc, b->V, b->vs, b->nb, b->dv);
        b->mx[h] = newmax;
    }
}

void cpm_attn_transpose(const float *K, int ks, int nb, int dk, float *kt) {
#if X86_KERNELS
    if (cpm_isa_in_effect() >= CPM_ISA_AVX512)
        cpm_attn_transpose_avx512(K, ks, nb, dk, kt);
    else
        cpm_attn_transpose_avx2(K, ks, nb, dk, kt);
#else
    for (int i = 0; i < dk; i++)
        for (int j = 0; j < BLOCK; j++)
            kt[(size_t)i * BLOCK + j] = j < nb ? K[(size_t)j * ks + i] : 0.0f;
#endif
}

void cpm_attn_fold(const cpm_attn_block *b) {
#if X86_KERNELS
    if (cpm_isa_in_effect() >= CPM_ISA_AVX512) {
        cpm_attn_fold_avx512(b);
        return;
    }
    if (cpm_isa_in_effect() == CPM_ISA_AVX2) {
        cpm_attn_fold_avx2(b);
        return;
    }
#endif
    cpm_attn_fold_ref(b);
}
