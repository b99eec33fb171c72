#!/usr/bin/python3
"""core_dns.py - the cluster on five hosts that find each other by name: docker/compose.yaml
run as written, one network namespace per container (netns.py), the image from
docker/Dockerfile (containers.py).

Each compose service is a host with its own address, its service name in every host's
hosts file (Docker's DNS), its volumes at their paths, its command, environment, user,
read-only root and health check exactly as compose.yaml and the image give them; the
cluster file (cluster-config/compose.yaml) names every endpoint by service name. Checks:

1. the one-shot `keys` service makes the CURVE keys into the shared volume; every other
   container becomes healthy by its own health check (the image's HEALTHCHECK, by role);
2. a chat request from outside (the published port, with the API key) gives cpm-run's
   greedy tokens;
3-4. stage-1, then stage-0, is re-created with a NEW address (`docker compose up
   --force-recreate`: the container leaves the network, so its name stops resolving,
   then comes back at another address): the router's health check stays good while
   /ready is 503, then the cluster serves the same tokens again (names are resolved
   again on every reconnect);
5. SIGTERM stops every container with status 0;
6. the image's default command alone (`docker run`: `cpm-cluster up` with the built-in
   cluster file, keys made at the first start) serves the same tokens, and its health
   check (no role: /ready) passes.

usage: core_dns.py BUILD_DIR   (needs root and ip netns; exits 77, skipped, without)
"""
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time

import yaml

from containers import DOCKERFILE, SRC, Image, chat, make_model, reference_chat, refused_without_key, request
from harness import E2E
from netns import Net, skip_unless_possible

COMPOSE = os.path.join(SRC, "docker", "compose.yaml")
PROMPT, N_GEN = "Say hello to the cluster", 16

skip_unless_possible()
h = E2E("cpm-dns-")
fail, check = h.fail, h.check


# ---------------------------------------------------------------- compose, as docker compose reads it

def interpolate(v, env):
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""
    if isinstance(v, dict):
        return {k: interpolate(x, env) for k, x in v.items()}
    if isinstance(v, list):
        return [interpolate(x, env) for x in v]
    if not isinstance(v, str):
        return v

    def one(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if not (val if op == ":?" else val is not None):
                fail("compose: %s: %s" % (name, arg))
        return val or ""
    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)", one, v)


def load_compose(env):
    doc = interpolate(yaml.safe_load(open(COMPOSE)), env)
    base = os.path.dirname(COMPOSE)
    services = {}
    for name, s in doc["services"].items():
        b = s.get("build", {})
        check(os.path.normpath(os.path.join(base, b.get("context", "."), b.get("dockerfile", "Dockerfile")))
              == DOCKERFILE, "%s: not built from docker/Dockerfile" % name)
        env_s = s.get("environment", {})
        if isinstance(env_s, list):
            env_s = dict(x.split("=", 1) for x in env_s)
        vols = []
        for v in s.get("volumes", []):
            src, dst, *mode = v.split(":")
            named = not src.startswith((".", "/"))
            vols.append((src if named else os.path.normpath(os.path.join(base, src)), dst,
                         "ro" in mode, named))
        hc = s.get("healthcheck", {})
        test = None if hc.get("disable") else hc.get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        deps = s.get("depends_on", {})
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        cmd = s.get("command")
        services[name] = {
            "name": name, "env": {k: str(v) for k, v in env_s.items()}, "volumes": vols,
            "command": shlex.split(cmd) if isinstance(cmd, str) else cmd, "entrypoint": s.get("entrypoint"),
            "read_only": s.get("read_only", False), "tmpfs": s.get("tmpfs", []), "user": s.get("user"),
            "hostname": s.get("hostname"), "healthcheck": test, "depends_on": deps,
            "ports": [str(p) for p in s.get("ports", [])],
            "grace": float(str(s.get("stop_grace_period", "10s")).rstrip("s"))}
    return doc, services


class Compose:
    """The project's containers: one host each, named on the network by service name."""

    def __init__(self, net, image, doc, services):
        self.net, self.image, self.services = net, image, services
        self.volumes = {}  # named volume -> folder
        for v in doc.get("volumes", {}):
            self.volumes[v] = os.path.join(h.tmp, "volume-" + v)
        self.hosts, self.procs, self.n = {}, {}, {}

    def _volume(self, name, path):
        """A named volume's folder, made on first use from the image's folder at its mount
        path (Docker copies the content, owner and mode into an empty new volume)."""
        d = self.volumes[name]
        if not os.path.isdir(d):
            os.makedirs(d)
            for p, uid, gid, mode in self.image.dirs:
                if p == path:
                    os.chown(d, uid, gid)
                    os.chmod(d, mode)
        return d

    def start(self, name):
        """`docker compose up` for one service: a new container (host, address, name)."""
        s = self.services[name]
        self.n[name] = self.n.get(name, 0) + 1
        label = "%s-%d" % (name, self.n[name])
        hst = self.hosts.get(name)
        if hst is None:
            hst = self.hosts[name] = self.net.add(name)
        else:
            self.net.plug(hst)                                     # a new address
        for alias in self.aliases(name):                           # Docker's DNS
            self.net.name(alias, hst)
        mounts = self.image.rootfs(label, readonly=s["read_only"])
        for src, dst, ro, named in s["volumes"]:
            mounts.append((self._volume(src, dst) if named else src, dst, ro))
        for t in s["tmpfs"]:
            d = os.path.join(h.tmp, "tmpfs-" + label + t.replace("/", "_"))
            os.makedirs(d)
            os.chmod(d, 0o1777)
            mounts.append((d, t, False))
        user = self.user(s)
        s["hostname_now"] = s["hostname"] or secrets.token_hex(6)  # a container id
        s["env_now"] = self.image.environment(s["env"], hostname=s["hostname_now"])
        argv = self.image.argv(s["entrypoint"], s["command"])
        p = self.net.start(hst, argv, env=s["env_now"], mounts=mounts, hostname=s["hostname_now"],
                           user=user, readonly_root=s["read_only"], workdir=self.image.workdir,
                           log=open(h.path(label + ".log"), "a"))
        h.procs[label] = p
        self.procs[name] = p
        return p

    def user(self, s):
        u = s["user"]
        if u is None:
            uid, gid = self.image.user or (0, 0)
        else:
            a, _, b = str(u).partition(":")
            uid, gid = int(a), int(b or a)
        return (uid, gid, []) if uid else None

    def healthcheck(self, name):
        """The service's health check (compose's, else the image's HEALTHCHECK) in its
        container, as `docker` runs it: (exit status, output)."""
        s = self.services[name]
        test = s["healthcheck"] or ["CMD"] + self.image.healthcheck["test"]
        if test[0] == "NONE":
            return 0, "none"
        args = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
        return self.net.exec_in(self.procs[name].pid, args, env=s["env_now"], user=self.user(s))

    def wait_healthy(self, name, limit=60):
        t0 = time.time()
        while True:
            rc, out = self.healthcheck(name)
            if rc == 0:
                return time.time() - t0
            if self.procs[name].poll() is not None:
                fail("%s exited with %s before it was healthy" % (name, self.procs[name].returncode))
            if time.time() - t0 > limit:
                fail("%s: not healthy after %d s: %s %s" % (name, limit, rc, out.strip()[-300:]))
            time.sleep(0.3)

    @staticmethod
    def aliases(name):
        return [name, "cpm-cluster-%s-1" % name]  # the service name, the container name

    def stop(self, name, remove=False):
        """`docker stop`: SIGTERM, then SIGKILL after stop_grace_period; the exit status.
        remove (`docker rm`, as --force-recreate does): the container leaves the network:
        its names stop resolving, then its address is gone."""
        p = self.procs[name]
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(self.services[name]["grace"])
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if remove:
            for alias in self.aliases(name):
                self.net.unname(alias)
            self.net.unplug(self.hosts[name])
        return rc

    def published(self, name):
        """The (address, port) a published port reaches: the container's own."""
        port = int(self.services[name]["ports"][0].split(":")[-1])
        return self.hosts[name].ip, port


def order(services):
    """depends_on first, else file order."""
    done = []
    while len(done) < len(services):
        for n, s in services.items():
            if n not in done and all(d in done for d in s["depends_on"]):
                done.append(n)
    return done


def wait_ready(addr, port, limit=60):
    t0 = time.time()
    while request(addr, port, "GET", "/ready", timeout=5)[0] != 200:
        if time.time() - t0 > limit:
            fail("%s:%d /ready not 200 after %d s" % (addr, port, limit))
        time.sleep(0.1)
    return time.time() - t0


def check_chat(addr, port, key, want, what):
    st, ids, out = chat(addr, port, key, PROMPT, N_GEN)
    if st != 200 or ids != want:
        fail("%s: chat through %s:%d: %s %s\n want (cpm-run) %s" % (what, addr, port, st, ids or out, want))


# ---------------------------------------------------------------- the test

def main():
    net = Net(scratch=h.tmp)
    image = Image(h.build, h.tmp)
    try:
        run(net, image)
    finally:
        net.close()
        image.close()


def run(net, image):
    model = make_model(h.build, os.path.join(h.tmp, "model"))
    key = "sk-" + secrets.token_hex(16)
    want = reference_chat(h.build, model, PROMPT, N_GEN)
    doc, services = load_compose({"CPM_MODEL_DIR": model, "CPM_API_KEYS": key})
    c = Compose(net, image, doc, services)

    # 1. keys, then every service; each healthy by its own check
    took = {}
    for name in order(services):
        for dep, cond in services[name]["depends_on"].items():
            if cond.get("condition") == "service_completed_successfully":
                rc = c.procs[dep].wait(30)
                check(rc == 0, "%s: exit %s" % (dep, rc))
        c.start(name)
    keys = c.volumes["keys"]
    check(sorted(os.listdir(keys)) == ["fabric.pub", "fabric.secret"] and
          os.stat(os.path.join(keys, "fabric.secret")).st_uid == image.user[0],
          "keys volume: %s" % os.listdir(keys))
    for name in services:
        if name != "keys":
            took[name] = c.wait_healthy(name)
    addr, port = c.published("router")
    wait_ready(addr, port)
    print("ok 1 - keys made by the one-shot service (owned by uid %d); %s healthy by their own checks "
          "(%s)" % (image.user[0], ", ".join(took), ", ".join("%.1f s" % t for t in took.values())))

    # 2. a chat request from outside
    check_chat(addr, port, key, want, "2")
    st = refused_without_key(addr, port)
    check(st == 401, "2: a chat request without the API key: %s" % st)
    print("ok 2 - chat through the published port (%s:%d, API key) == cpm-run greedy, %d tokens; 401 "
          "without the key" % (addr, port, N_GEN))

    # 3. each stage re-created with a new address
    for k, name in enumerate(("stage-1", "stage-0")):
        old_ip = c.hosts[name].ip
        rc = c.stop(name, remove=True)
        check(rc == 0, "%s: exit %s after SIGTERM" % (name, rc))
        t_down = time.time()
        while request(addr, port, "GET", "/ready", timeout=5)[0] == 200 and time.time() - t_down < 10:
            time.sleep(0.1)
        st = request(addr, port, "GET", "/ready", timeout=5)[0]
        rc, out = c.healthcheck("router")
        check(st == 503 and rc == 0, "%s down: /ready %s, router health check %s %s" % (name, st, rc, out))
        t0 = time.time()
        c.start(name)
        new_ip = c.hosts[name].ip
        check(new_ip != old_ip, "same address")
        c.wait_healthy(name)
        wait_ready(addr, port)
        check_chat(addr, port, key, want, "3 %s" % name)
        print("ok %d - %s re-created at %s (was %s): router health check good and /ready 503 while it was "
              "gone; /ready 200 %.1f s after the new container started; chat == cpm-run again"
              % (3 + k, name, new_ip, old_ip, time.time() - t0))

    # 4. docker compose down
    codes = {n: c.stop(n) for n in services if n != "keys"}
    check(all(rc == 0 for rc in codes.values()), "exit status after SIGTERM: %s" % codes)
    print("ok 5 - SIGTERM stops every container with status 0")

    # 5. the image's default command: docker run -p 8080:8080 -e CPM_API_KEYS -v MODEL:/srv/models/default:ro
    one = net.add("one")
    mounts = image.rootfs("one") + [(model, "/srv/models/default", True)]
    env = image.environment({"CPM_API_KEYS": key}, hostname="one")
    p = net.start(one, image.argv(), env=env, mounts=mounts, hostname="one",
                  user=image.user + ([],), workdir=image.workdir, log=open(h.path("one.log"), "a"))
    h.procs["one"] = p
    t0 = time.time()
    while True:
        rc, out = net.exec_in(p.pid, image.healthcheck["test"], env=env, user=image.user + ([],))
        if rc == 0:
            break
        if p.poll() is not None or time.time() - t0 > 60:
            fail("default command: health check %s %s; exit %s" % (rc, out, p.poll()))
        time.sleep(0.3)
    check_chat(one.ip, 8080, key, want, "5")
    p.send_signal(signal.SIGTERM)
    rc = p.wait(45)
    check(rc == 0, "default command: exit %s after SIGTERM" % rc)
    print("ok 6 - the image's default command (%s) serves alone: health check (/ready) good after %.1f s, "
          "chat == cpm-run, SIGTERM exits 0" % (" ".join(image.argv()), time.time() - t0))
    shutil.rmtree(model)  # 82 MB; the logs stay


h.run(main)
