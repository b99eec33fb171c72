/* frames.h - reading one ZeroMQ multipart message: the one frame reader behind the
 * libuv transport (transport.c), its blocking cpm_rpc_call, and the plain zmq sockets
 * of the compute thread (shard/tp.c, shard/expert_client.c).
 *
 * A message is read whole, so a socket never holds half of one: frames beyond the
 * caller's limit are read and dropped, and counted so the caller can refuse the
 * message. What the frames mean (identity, Envelope, tensor) stays with the caller.
 *
 *   cpm_frames fr;
 *   if (cpm_frames_recv(&fr, sock, 2, ZMQ_DONTWAIT, &e) == 0) {
 *       if (!fr.extra) cpm_frames_envelope(&fr, 0, &env, &e);  ... use env, fr.f[1] ...
 *       cpm_frames_close(&fr);
 *   }
 */
#ifndef CPM_FRAMES_H
#define CPM_FRAMES_H

#include <zmq.h>

#include "common/error.h"
#include "services/common/wire.h"

/* Most frames any reader keeps: a ROUTER's identity, the Envelope, one tensor. */
#define CPM_FRAMES_MAX 3

typedef struct cpm_frames {
    zmq_msg_t f[CPM_FRAMES_MAX]; /* the first n frames, open until cpm_frames_close */
    int n;
    int extra;                   /* frames after the first max: read and dropped */
} cpm_frames;

/* Reads one whole message from the zmq socket sock, keeping its first max (at most
 * CPM_FRAMES_MAX) frames. flags is ZMQ_DONTWAIT or 0 for every frame; with
 * ZMQ_DONTWAIT and nothing waiting it returns CPM_EAGAIN. On success the caller
 * closes ret with cpm_frames_close; on failure nothing is left open. */
int cpm_frames_recv(cpm_frames *ret, void *sock, int max, int flags, cpm_error *err);

/* Frame i's bytes and size; NULL and 0 for a frame the message did not have. */
const void *cpm_frames_data(const cpm_frames *fr, int i);
size_t cpm_frames_size(const cpm_frames *fr, int i);

/* Unpacks and validates frame at as the Envelope, with frame at + 1 (if any) as its
 * tensor (cpm_wire_unpack). *ret is freed with cpm_wire_free. */
int cpm_frames_envelope(const cpm_frames *fr, int at, cpm_envelope **ret, cpm_error *err);

/* Closes the frames still open. */
void cpm_frames_close(cpm_frames *fr);

#endif
