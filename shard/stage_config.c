/* stage_config.c - cluster file -> cpm_stage_opts for one stage or one of its TP ranks.
 * The file was validated when it was loaded (layers, endpoints, TP meshes); what is left
 * here is the mapping and the question whether the asked-for stage exists. */
#include "stage_config.h"

#include <string.h>

void cpm_stage_config_init(cpm_stage_config *sc) {
    memset(sc, 0, sizeof *sc);
    sc->opts = cpm_stage_opts_default();
}

/* Tensor parallelism: every rank knows every mesh endpoint; rank 0 also the peers' stage
 * endpoints, where it fans each micro-batch out. */
static int tp_from_cluster(cpm_stage_config *sc, const cpm_config *c, int s, int tp_rank,
                           cpm_error *err) {
    const cpm_cfg_stage *st = &c->stages[s];
    cpm_stage_opts *o = &sc->opts;
    if (tp_rank < 0 || tp_rank > st->n_tp)
        return cpm_error_set(err, CPM_ERANGE, "%s: stages[%d] has tensor parallel ranks 0..%d, "
                             "not %d", c->path, s, st->n_tp, tp_rank);
    if (!st->n_tp)
        return 0;
    for (int r = 0; r <= st->n_tp; r++) {
        sc->tp_mesh[r] = r ? st->tp[r - 1].mesh : st->tp_mesh;
        if (r)
            sc->tp_peers[r - 1] = st->tp[r - 1].svc.endpoint;
    }
    o->tp_rank = tp_rank;
    o->tp_size = st->n_tp + 1;
    o->tp_mesh = sc->tp_mesh;
    o->tp_peers = sc->tp_peers;
    if (tp_rank > 0) { /* its own endpoint and threads; sends nothing downstream */
        o->bind = st->tp[tp_rank - 1].svc.endpoint;
        o->threads = st->tp[tp_rank - 1].svc.threads;
        o->next = NULL;
    }
    return 0;
}

/* Expert parallelism: the MoE experts run in the cluster's expert services. */
static void experts_from_cluster(cpm_stage_config *sc, const cpm_config *c) {
    for (int i = 0; i < c->n_experts; i++)
        sc->peers[i] = (cpm_expert_peer){.endpoint = c->experts[i].svc.endpoint,
                                         .begin = c->experts[i].expert_begin,
                                         .end = c->experts[i].expert_end};
    sc->opts.experts = sc->peers;
    sc->opts.n_experts = c->n_experts;
    sc->opts.expert_timeout_ms = c->router.timeout_ms;
}

int cpm_stage_config_from_cluster(cpm_stage_config *sc, const cpm_config *c, int index,
                                  int tp_rank, cpm_error *err) {
    cpm_stage_config_init(sc);
    if (index < 0 || index >= c->n_stages)
        return cpm_error_set(err, CPM_ERANGE, "%s: no stages[%d]", c->path, index);
    const cpm_cfg_stage *s = &c->stages[index];
    cpm_stage_opts *o = &sc->opts;
    o->bind = s->svc.endpoint;
    o->next = cpm_config_stage_next(c, index);
    o->layer_begin = s->layer_begin;
    o->layer_end = s->layer_end;
    o->threads = s->svc.threads;
    o->kv_tokens = s->kv_tokens;
    o->kv_dtype = strcmp(s->kv_dtype, "f16") ? CPM_DTYPE_F32 : CPM_DTYPE_F16;
    o->act_bf16 = strcmp(s->activations, "bf16") == 0;
    o->act_int8 = strcmp(s->activations, "int8") == 0;
    o->ffn_dense = strcmp(s->ffn, "dense") == 0;
    o->lm_head_int8 = strcmp(s->lm_head, "int8") == 0;
    o->map_weights = strcmp(s->weights, "mapped") == 0;
    o->max_seqs = s->max_seqs;
    o->max_batch_tokens = s->max_batch_tokens;
    o->model_dir = c->model;
    sc->isa = s->isa;
    experts_from_cluster(sc, c);
    return tp_from_cluster(sc, c, index, tp_rank, err);
}

int cpm_stage_config_check(const cpm_stage_opts *o, cpm_error *err) {
    if (!o->bind || (!o->next && o->tp_rank == 0) || !o->model_dir || !*o->model_dir)
        return cpm_error_set(err, CPM_EINVAL, "need --config FILE --index N, or --bind EP --next "
                             "EP --model DIR");
    return 0;
}
