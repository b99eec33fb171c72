/* tp_split.h - the tensor-parallel split rule, in one place: over T ranks each rank holds
 * whole key/value-head groups (MLA: whole heads) and 1/T of the FFN width; quantized
 * weights do not split. The loader (model.c) and the launcher (tools/cpm_cluster.c,
 * checking a cluster file before it starts anything) both ask here. */
#ifndef CPM_TP_SPLIT_H
#define CPM_TP_SPLIT_H

#include "../../../common/error.h"
#include "hf_config.h"

/* The heads that are dealt out whole: key/value heads (GQA), attention heads (MLA). *what
 * (may be NULL) gets their name for messages. */
int cpm_tp_split_heads(const cpm_hparams *hp, const char **what);

/* 0 when a model of hp splits over T ranks (T 1 always does); CPM_EUNSUPPORTED for int4
 * weights or an unknown architecture, CPM_EINVAL naming the width that does not divide. */
int cpm_tp_split_check(const cpm_hparams *hp, int T, cpm_error *err);

#endif
