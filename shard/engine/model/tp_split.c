/* tp_split.c - which widths of a model tensor parallelism divides, and whether T ranks can
 * (see model.c tp_slice_layer for how the weights are then cut). */
#include "tp_split.h"

#include "arch.h"

int cpm_tp_split_heads(const cpm_hparams *hp, const char **what) {
    const cpm_arch *a = cpm_arch_find(hp->arch);
    bool mla = a && a->attn == CPM_ATTN_MLA; /* MLA has no KV heads: its latent is shared */
    if (what)
        *what = mla ? "attention heads" : "key/value heads (whole GQA groups per rank)";
    return mla ? hp->n_heads : hp->n_kv_heads;
}

int cpm_tp_split_check(const cpm_hparams *hp, int T, cpm_error *err) {
    if (T == 1)
        return 0;
    if (!cpm_arch_find(hp->arch))
        return cpm_error_set(err, CPM_EUNSUPPORTED, "config.json: architecture '%s' is not "
                             "supported", hp->arch);
    if (hp->quant != CPM_QUANT_NONE)
        return cpm_error_set(err, CPM_EUNSUPPORTED, "tensor parallelism over quantized (int4) "
                             "weights is not supported");
    const char *what;
    int heads = cpm_tp_split_heads(hp, &what);
    if (heads % T)
        return cpm_error_set(err, CPM_EINVAL, "config.json: %d %s do not split over %d tensor "
                             "parallel ranks", heads, what, T);
    if (hp->intermediate_size % T)
        return cpm_error_set(err, CPM_EINVAL, "config.json: intermediate_size %d does not split "
                             "over %d tensor parallel ranks", hp->intermediate_size, T);
    return 0;
}
