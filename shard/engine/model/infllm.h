/* infllm.h - InfLLM v2 block selection (MiniCPM4 sparse_config, minicpm-spec.md §5).
 *
 * Stage 1 of the sparse attention: for one query position and one KV-head group,
 * scores the cached blocks through compressed keys built from the KV cache's
 * per-block key sums and returns the blocks the query attends. attention.c then
 * runs stage 2, its ordinary online softmax, over those blocks only.
 *
 * Switching rule: per query position, not per forward call as in HF. The query
 * at absolute position t is sparse iff t + 1 >= dense_len (its visible KV length
 * reaches dense_len), so the answer does not depend on whether the prompt came
 * whole, in chunks, batched with others or split across pipeline stages (HF's
 * per-call rule does, spec §5.2). For one query HF's prefill rule (kernel j
 * visible iff s·j + p − 1 <= t) and its decode rule (every complete kernel of
 * the t + 1 cached keys) coincide, so one rule serves prefill and decode.
 */
#ifndef CPM_INFLLM_H
#define CPM_INFLLM_H

#include <stdbool.h>
#include <stddef.h>

#include "../kv_cache_internal.h"
#include "hf_config.h"

/* One query row of one KV-head group. */
typedef struct cpm_infllm_query {
    const cpm_kv_cache *kv; /* with key sums, this row's keys already stored */
    int layer;              /* stage layer */
    int seq, pos;           /* the row's sequence and absolute position t */
    int kv_head;            /* g */
    int group;              /* G: query heads sharing KV head g */
    int head_dim;
    float scale;            /* 1/sqrt(head_dim), as dense attention */
    const float *q;         /* the G post-RoPE query vectors, head_dim apart */
} cpm_infllm_query;

/* Whether the query at position pos attends sparsely under hp. */
static inline bool cpm_infllm_is_sparse(const cpm_hparams *hp, int pos) {
    return hp->sparse && pos + 1 >= hp->sparse_dense_len;
}

/* Floats of per-thread scratch cpm_infllm_select needs for groups of `group`
 * heads. Block scores are cached for positions below max_position_embeddings
 * and recomputed beyond it, so the scratch is bounded at load time. */
size_t cpm_infllm_scratch_floats(const cpm_hparams *hp, int group);

/* The key blocks of one query, as three disjoint ascending parts: the init
 * blocks [0, init_end), the selected blocks sel[0..n_sel) (all between the
 * two), the local window [win_begin, win_end) ending with the query's block. */
typedef struct cpm_infllm_blocks {
    int init_end;
    int n_sel;
    const int *sel;
    int win_begin, win_end;
} cpm_infllm_blocks;

/* Stage 1 (spec §5.4) for query q: the selection blocks (block_size tokens
 * each) it attends, into *ret (sel points into scratch). The set is the init
 * blocks, the local window q_blk − window/block .. q_blk and the top-k scored
 * blocks before the window, where
 *   S(j)  = sum over the G heads of softmax_j(q_h · C_j · scale) over the
 *           complete kernels C_j (mean of keys s·j .. s·j + p − 1 <= t),
 *   R(b)  = max of S(j) over j in [r·b − 1, r·b + r − 1], r = block / stride
 *           (−inf when none exists);
 * init and window blocks count toward topk, ties go to the lower block index,
 * and when every block fits in topk the set is all of them (dense attention).
 * Stage 2 clips the query's own block to positions <= t. */
void cpm_infllm_select(const cpm_hparams *hp, const cpm_infllm_query *q, float *scratch,
                       cpm_infllm_blocks *ret);

#endif
