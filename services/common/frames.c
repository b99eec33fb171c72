/* frames.c - one ZeroMQ multipart message in, whole (see frames.h).
 *
 * zmq delivers the parts of a message atomically: once the first is in, the rest are
 * there too, so the same flags serve every part and a failure after the first one is
 * an error, not a wait.
 */
#include "frames.h"

#include <errno.h>

static int recv_err(cpm_error *err) {
    int e = zmq_errno();
    return cpm_error_set(err, e == EAGAIN ? CPM_EAGAIN : CPM_EIO, "recv: %s", zmq_strerror(e));
}

int cpm_frames_recv(cpm_frames *ret, void *sock, int max, int flags, cpm_error *err) {
    if (max > CPM_FRAMES_MAX)
        max = CPM_FRAMES_MAX;
    ret->n = ret->extra = 0;
    for (int more = 1; more;) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, flags) < 0) {
            int rc = recv_err(err);
            zmq_msg_close(&part);
            cpm_frames_close(ret);
            return rc;
        }
        more = zmq_msg_more(&part);
        if (ret->n < max)
            ret->f[ret->n++] = part;
        else {
            ret->extra++;
            zmq_msg_close(&part);
        }
    }
    return 0;
}

const void *cpm_frames_data(const cpm_frames *fr, int i) {
    return i >= 0 && i < fr->n ? zmq_msg_data((zmq_msg_t *)&fr->f[i]) : NULL;
}

size_t cpm_frames_size(const cpm_frames *fr, int i) {
    return i >= 0 && i < fr->n ? zmq_msg_size((zmq_msg_t *)&fr->f[i]) : 0;
}

int cpm_frames_envelope(const cpm_frames *fr, int at, cpm_envelope **ret, cpm_error *err) {
    *ret = NULL;
    if (at >= fr->n)
        return cpm_error_set(err, CPM_EFORMAT, "empty message");
    long long tensor = at + 1 < fr->n ? (long long)cpm_frames_size(fr, at + 1) : -1;
    return cpm_wire_unpack(cpm_frames_data(fr, at), cpm_frames_size(fr, at), tensor, ret, err);
}

void cpm_frames_close(cpm_frames *fr) {
    for (int i = 0; i < fr->n; i++)
        zmq_msg_close(&fr->f[i]);
    fr->n = 0;
}
