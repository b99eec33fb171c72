/* door.h - who may use the HTTP API (API keys) and which web pages may read its answers
 * (CORS): the policy of the router's HTTP door, apart from the routes.
 *
 * Keys come from router.api_keys (a file: one key per line, blank lines and '#'
 * comments skipped; relative to the cluster file) and $CPM_API_KEYS (comma-separated).
 * A request needs `Authorization: Bearer KEY` except on the probes (/health, /live,
 * /ready) and CORS preflights. With no key at all the API is open, which the door only
 * allows on a loopback address or with router.auth: none (both logged at start; `none`
 * opens it even when keys are configured): a router listening on the network without
 * keys refuses to start.
 *
 *   cpm_door *d;
 *   if (cpm_door_new(cfg, "0.0.0.0", log, &d, &e)) die(e.msg);
 *   if (!cpm_door_open(d, req->path) && !cpm_door_admits(d, req)) -> 401
 *   cpm_door_cors(d, req, headers, sizeof headers);   // extra response header lines
 */
#ifndef CPM_DOOR_H
#define CPM_DOOR_H

#include <stdbool.h>
#include <stddef.h>

#include "../common/error.h"
#include "../services/common/config.h"
#include "../services/common/log.h"
#include "http.h"

typedef struct cpm_door cpm_door;

/* Reads the keys and the CORS origins of cfg for an HTTP listener on http_addr; refuses
 * an open door on a non-loopback address (see above). log may be NULL. */
int cpm_door_new(const cpm_config *cfg, const char *http_addr, const cpm_log *log, cpm_door **ret,
                 cpm_error *err);

/* Paths anyone may reach: the probes, and the chat page (which asks the user for a key). */
bool cpm_door_open(const char *path);

/* Whether r carries an accepted key (always true when no key is configured). The
 * comparison takes the same time whatever the key's content. */
bool cpm_door_admits(const cpm_door *d, const cpm_http_request *r);

/* Keys configured (0: the API is open). */
int cpm_door_n_keys(const cpm_door *d);

/* The CORS response header lines for r (Access-Control-Allow-Origin and Vary, and with
 * preflight the Allow-Methods/-Headers/Max-Age ones) into out, "" when r's Origin is not
 * allowed or there is none. Returns out. */
const char *cpm_door_cors(const cpm_door *d, const cpm_http_request *r, bool preflight, char *out,
                          size_t size);

/* Accepts NULL. */
void cpm_door_free(cpm_door *d);

#endif
