"""containers.py - the image of docker/Dockerfile, as the tests that run containers see it.

The multi-host tests (core_dns.py: docker/compose.yaml; k8s_manifests.py: docker/k8s/)
start every container in its own network namespace (netns.py) with what the image would
give it, read from the Dockerfile's final stage: ENTRYPOINT and CMD, ENV, USER, WORKDIR,
HEALTHCHECK, the folders its RUN lines make (`install -d`, with owner and mode) and the
files it COPYs from the repository. The one liberty: the image's binaries
(`COPY --from=build ... /usr/local`) are this build's, through a folder of links put
first in PATH; `cpm-cluster` finds the other binaries beside its own real path.

Also what both tests need around it: the default model (cpm-gen-model minicpm4-tiny, as
`tools/up` makes it), HTTP to an address, the cpm-run reference.
"""
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(SRC, "docker", "Dockerfile")
BUILD_MOUNT = "/opt/cpm-e2e-build"  # where every container sees this build tree
# The image's binaries -> this build's (the liberty above), by name as installed.
BINARIES = {"cpm-cluster": "tools/cpm-cluster", "cpm-router": "router/cpm-router",
            "cpm-tokenizer": "services/tokenizer/cpm-tokenizer", "cpm-sampler": "services/sampler/cpm-sampler",
            "cpm-shard": "shard/cpm-shard", "cpm-expert": "shard/cpm-expert", "cpm-run": "shard/cpm-run",
            "cpm-gen-model": "tools/cpm-gen-model"}


def instructions(path):
    """(INSTRUCTION, text) of a Dockerfile's final stage, continuation lines joined."""
    out, cur = [], ""
    for line in open(path):
        s = line.rstrip("\n")
        if not cur and (not s.strip() or s.lstrip().startswith("#")):
            continue
        if cur and s.lstrip().startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    last = max(i for i, (w, _) in enumerate(out) if w == "FROM")
    return out[last:]


def exec_form(text):
    """A JSON exec form, or a shell form as /bin/sh -c would run it."""
    return json.loads(text) if text.startswith("[") else ["/bin/sh", "-c", text]


class Image:
    """The final stage of docker/Dockerfile. rootfs(dir) makes a container's copy of the
    folders and files it adds, as mounts for netns.Net.start."""

    def __init__(self, build, scratch, dockerfile=DOCKERFILE):
        self.build = build
        self.entrypoint, self.cmd, self.env, self.user, self.workdir = [], [], {}, None, "/"
        self.healthcheck, self.dirs, self.files = None, [], []
        users, groups = {"root": 0}, {"root": 0}
        for word, rest in instructions(dockerfile):
            if word == "ENTRYPOINT":
                self.entrypoint = exec_form(rest)
            elif word == "CMD":
                self.cmd = exec_form(rest)
            elif word == "ENV":
                for kv in shlex.split(rest):
                    k, _, v = kv.partition("=")
                    self.env[k] = re.sub(r"\$(\w+)|\$\{(\w+)\}",
                                         lambda m: self.env.get(m.group(1) or m.group(2), ""), v)
            elif word == "WORKDIR":
                self.workdir = rest
            elif word == "USER":
                u, _, g = rest.partition(":")
                uid = int(users.get(u, u))
                self.user = (uid, int(groups.get(g, g)) if g else uid)
            elif word == "HEALTHCHECK":
                opts, _, cmd = rest.partition("CMD ")
                self.healthcheck = {k: v for k, v in re.findall(r"--([\w-]+)=(\S+)", opts)}
                self.healthcheck["test"] = exec_form(cmd.strip())
            elif word == "COPY" and not rest.startswith("--from"):
                src, dst = shlex.split(rest)
                self.files.append((os.path.join(SRC, src), dst))
            elif word == "RUN":
                for part in re.split(r"&&|;", rest):
                    a = shlex.split(part)
                    if a[:1] == ["groupadd"] and "--gid" in a:
                        groups[a[-1]] = int(a[a.index("--gid") + 1])
                    elif a[:1] == ["useradd"] and "--uid" in a:
                        users[a[-1]] = int(a[a.index("--uid") + 1])
                    elif a[:2] == ["install", "-d"]:
                        owner = group = "root"
                        mode, paths, i = 0o755, [], 2
                        while i < len(a):
                            if a[i] in ("-o", "-g", "-m"):
                                if a[i] == "-o":
                                    owner = a[i + 1]
                                elif a[i] == "-g":
                                    group = a[i + 1]
                                else:
                                    mode = int(a[i + 1], 8)
                                i += 2
                            else:
                                paths.append(a[i])
                                i += 1
                        for p in paths:
                            self.dirs.append((p, users.get(owner, 0), groups.get(group, 0), mode))
        # the liberty: this build's binaries, first in PATH. The build tree is bound into
        # every container at BUILD_MOUNT (wherever it lies here: under a /tmp the container
        # replaces, or below a folder the image's user may not enter), with links relative
        # to it, so cpm-cluster finds the other binaries beside its own real path.
        self.build = build
        self.bin_dir = tempfile.mkdtemp(prefix="e2e-image-bin-", dir=build)
        os.chmod(self.bin_dir, 0o755)
        for name, rel in BINARIES.items():
            os.symlink(os.path.join("..", rel), os.path.join(self.bin_dir, name))
        shutil.copy(os.path.join(SRC, "docker", "cpm-healthcheck"), os.path.join(self.bin_dir, "cpm-healthcheck"))
        os.chmod(os.path.join(self.bin_dir, "cpm-healthcheck"), 0o755)
        self.path_dir = os.path.join(BUILD_MOUNT, os.path.basename(self.bin_dir))
        self.scratch = scratch

    def close(self):
        shutil.rmtree(self.bin_dir, ignore_errors=True)

    def environment(self, extra=(), hostname=None):
        """The image's ENV with the binaries' folder first in PATH, then the container's."""
        env = dict(self.env)
        env["PATH"] = self.path_dir + ":" + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.setdefault("HOME", "/")
        if hostname:
            env["HOSTNAME"] = hostname
        env.update(dict(extra))
        # to try a library-level change without rebuilding (e.g. a libzmq option set by a
        # zmq_connect wrapper), every container can get a preload: not used by the tests
        if os.environ.get("CPM_E2E_LD_PRELOAD"):
            env["LD_PRELOAD"] = os.environ["CPM_E2E_LD_PRELOAD"]
        return env

    def argv(self, entrypoint=None, cmd=None):
        """What the container runs, by Docker's and Kubernetes' rule: a given entry point
        (k8s `command`) drops the image's CMD too; given args (k8s `args`, compose
        `command`) replace CMD."""
        if entrypoint is not None:
            return list(entrypoint) + list(cmd or [])
        return self.entrypoint + list(self.cmd if cmd is None else cmd)

    def rootfs(self, name, readonly=False):
        """A container's own copy of what the image adds to the root file system, as mounts
        [(source, path, read-only)]: folders with their owner and mode, then the files."""
        root = tempfile.mkdtemp(prefix="rootfs-%s-" % name, dir=self.scratch)
        mounts = [(self.build, BUILD_MOUNT, True)]
        for path, uid, gid, mode in self.dirs:
            d = os.path.join(root, path.strip("/").replace("/", "_"))
            os.makedirs(d, exist_ok=True)
            os.chown(d, uid, gid)
            os.chmod(d, mode)
            mounts.append((d, path, readonly))
        for src, dst in self.files:
            f = os.path.join(root, dst.strip("/").replace("/", "_"))
            shutil.copy(src, f)
            os.chmod(f, 0o644)
            mounts.append((f, dst, readonly))
        # a file COPYed into a folder the image made: it lives in that folder's copy
        out = []
        for src, dst, ro in mounts:
            parent = [d for d, p, _ in mounts if os.path.isdir(d) and dst.startswith(p.rstrip("/") + "/")]
            if parent and not os.path.isdir(src):
                shutil.move(src, os.path.join(parent[-1], os.path.basename(dst)))
                continue
            out.append((src, dst, ro))
        return out


# ---------------------------------------------------------------- around the containers

def make_model(build, out):
    """The default model (random weights, the real MiniCPM4 tokenizer), as tools/up makes it."""
    subprocess.run([os.path.join(build, BINARIES["cpm-gen-model"]), "--variant", "minicpm4-tiny",
                    "--assets", os.path.join(SRC, "assets"), "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def reference_chat(build, model, text, n):
    """cpm-run's greedy ids for a one-turn chat (the single-process reference)."""
    out = subprocess.run([os.path.join(build, BINARIES["cpm-run"]), "--model", model, "--prompt", text,
                          "--chat", "--n", str(n), "--ignore-eos", "--print-ids"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def request(addr, port, method, path, body=None, headers=None, timeout=30):
    """One exchange with addr:port: (status, parsed JSON or text), (None, why) when
    nothing answers."""
    try:
        c = http.client.HTTPConnection(addr, port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
        r = c.getresponse()
        data = r.read().decode()
        c.close()
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def refused_without_key(addr, port):
    """The HTTP API asks for a key: a chat request without one gets 401 (the status)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return request(addr, port, "POST", "/v1/chat/completions", body)[0]


def chat(addr, port, api_key, text, n):
    """A greedy one-turn chat with n tokens and their ids: (status, ids, body)."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    st, out = request(addr, port, "POST", "/v1/chat/completions", body,
                   {"Authorization": "Bearer " + api_key}, timeout=60)
    ok = st == 200 and isinstance(out, dict) and out.get("choices")
    return st, (out["choices"][0].get("token_ids") if ok else None), out
