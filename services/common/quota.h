/* quota.h - what each sender may hold of a service's queue: messages and bytes, per
 * peer and in all.
 *
 * A service's worker queues requests until a job slot frees. Counting messages alone
 * lets one peer hold max_queue messages of up to ZMQ_MAXMSGSIZE each (gigabytes), and
 * lets one busy or hostile peer fill every slot. The quota bounds the bytes held in all
 * and gives no single peer more than peer_pct percent of either bound, so the others
 * (another router, a health prober's next request) still get in.
 *
 *   cpm_quota *q;
 *   cpm_quota_new(64, 1 << 30, 75, &q, &e);
 *   if (cpm_quota_take(q, &m->peer, bytes, &e)) refuse(e.msg);   // on arrival
 *   ...
 *   cpm_quota_give(q, &m->peer, bytes);                          // when its job is done
 */
#ifndef CPM_QUOTA_H
#define CPM_QUOTA_H

#include <stddef.h>

#include "common/error.h"
#include "services/common/transport.h"

#define CPM_QUOTA_PEERS 64 /* distinct senders with work held at once */

typedef struct cpm_quota cpm_quota;

/* max_msgs >= 1 and max_bytes >= 1 bound everything held; each peer may hold at most
 * peer_pct (1..100) percent of each, and at least one message. */
int cpm_quota_new(int max_msgs, size_t max_bytes, int peer_pct, cpm_quota **ret, cpm_error *err);

/* Accepts NULL. */
void cpm_quota_free(cpm_quota *q);

/* Charges one message of `bytes` to peer. CPM_ELIMIT, charging nothing, when that
 * would pass a bound (the message says which). A message larger than the peer's byte
 * share is refused even into an empty queue. */
int cpm_quota_take(cpm_quota *q, const cpm_peer *peer, size_t bytes, cpm_error *err);

/* Returns what cpm_quota_take charged for one message of peer. */
void cpm_quota_give(cpm_quota *q, const cpm_peer *peer, size_t bytes);

/* What is held now, in all. */
void cpm_quota_held(const cpm_quota *q, int *ret_msgs, size_t *ret_bytes);

#endif
