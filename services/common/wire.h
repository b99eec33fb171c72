/* wire.h - unpacking and validating protocol messages (proto/cpm.proto) from the network.
 *
 * Sits between the transport (raw ZeroMQ frames) and every service: nothing reads
 * a field of an Envelope that has not been through cpm_wire_unpack, which checks the
 * version, the body, the lengths of parallel arrays and the tensor frame's size.
 */
#ifndef CPM_WIRE_H
#define CPM_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/cpm.pb-c.h"
#include "common/error.h"

/* Must equal cpm.v1.ProtocolVersion.PROTOCOL_VERSION_CURRENT (checked at build time in wire.c). */
#define CPM_WIRE_VERSION 1

/* Health.status of a service that is stopping gracefully (ready = false): the router sends
 * it nothing new (a stage's replica goes down and its sequences move) while the work it
 * already accepted finishes. */
#define CPM_HEALTH_DRAINING "draining"

/* Most rows one forward/result/sample message may carry, and most ids in any id list. */
#define CPM_WIRE_MAX_ROWS 65536
#define CPM_WIRE_MAX_IDS (1 << 20)
#define CPM_WIRE_MAX_DIMS 4
/* Most sequence ids a forward's live list may carry (a scheduler's sequences). */
#define CPM_WIRE_MAX_LIVE 65536

typedef Cpm__V1__Envelope cpm_envelope;

/* Unpacks one Envelope frame and validates it (see cpm_wire_validate). tensor_size is
 * the size of the frame after the Envelope, or -1 when there is none. On success
 * *ret is owned by the caller: free with cpm_wire_free. */
int cpm_wire_unpack(const void *data, size_t size, long long tensor_size, cpm_envelope **ret,
                    cpm_error *err);

/* Accepts NULL. Only for envelopes from cpm_wire_unpack. */
void cpm_wire_free(cpm_envelope *env);

/* Checks an unpacked envelope: version, exactly one body, parallel arrays of equal
 * length, bounded counts, and that a tensor frame is present exactly when the body
 * describes one, with the described size. */
int cpm_wire_validate(const cpm_envelope *env, long long tensor_size, cpm_error *err);

/* Bytes of one element of dtype, 0 for an unknown dtype. */
size_t cpm_wire_dtype_size(int dtype);

/* Bytes described by desc; 0 with CPM_EFORMAT in err when the description is invalid
 * (unknown dtype, no or too many dims, overflow). */
size_t cpm_wire_tensor_bytes(const Cpm__V1__TensorDesc *desc, cpm_error *err);

/* Name of a body case ("forward", "health_request"); "none" when unset. */
const char *cpm_wire_body_name(int body_case);

/* Packs env (version is set here) into a fresh malloc'd buffer; caller frees. */
int cpm_wire_pack(cpm_envelope *env, uint8_t **ret_buf, size_t *ret_size, cpm_error *err);

#endif
