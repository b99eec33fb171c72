"""harness.py - what every end-to-end test shares.

A scratch folder with one log file per process (printed when a test fails), free
loopback ports, the cluster file, the services started as real processes and stopped
for good, readiness, the HTTP and internal-RPC clients, and the checks of "exactly one
final answer". Tests run as `python3 tests/e2e/NAME.py BUILD_DIR MODEL_DIR ...`; Python
puts this folder first on sys.path, so `from harness import E2E` works from each.

    h = E2E("cpm-experts-")            # BUILD and MODEL from argv[1], argv[2]
    ports = h.ports("http", "rpc", "results", "smp", "st0")
    cfg = h.write_config(h.cluster_lines(ports, stages=[...]))
    h.start_service(cfg, "sampler", 0, "smp")
    h.wait_ready(ports["http"])
"""
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINS = {"router": "router/cpm-router", "tokenizer": "services/tokenizer/cpm-tokenizer",
        "sampler": "services/sampler/cpm-sampler", "stage": "shard/cpm-shard",
        "expert": "shard/cpm-expert", "cluster": "tools/cpm-cluster", "run": "shard/cpm-run"}


def read_key(path):
    """A Z85 CURVE key file as cpm-cluster writes it: the first line not blank or '#'."""
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            return line.encode()
    raise ValueError(path + ": no key")


def make_keys(build, keys_dir, client=None):
    """The cluster's keys in keys_dir, made by the real tool (kept when present)."""
    args = [os.path.join(build, BINS["cluster"]), "keys", keys_dir]
    subprocess.run(args + (["--client", client] if client else []), check=True,
                   stdout=subprocess.DEVNULL)
    return keys_dir


def secure(sock, keys_dir, server=False, name="fabric"):
    """CURVE on a pyzmq socket, before connect/bind: as the fabric (a service of the cluster)
    or, with name "client-X", as an outside caller. A server admits every key (pyzmq has
    no ZAP handler here): only test doubles listen."""
    import zmq
    sock.curve_secretkey = read_key(os.path.join(keys_dir, name + ".secret"))
    if server:
        sock.curve_server = True
    else:
        sock.curve_publickey = read_key(os.path.join(keys_dir, name + ".pub"))
        sock.curve_serverkey = read_key(os.path.join(keys_dir, "fabric.pub"))
    return sock


_PORTS_GIVEN = set()  # by free_port, in this process


def free_port():
    """A TCP port nobody uses now, never the same twice in one test, below the kernel's
    ephemeral range (32768-60999 by default): a port from that range can be taken, before
    the service binds it, by any process's outgoing connection (every test here
    reconnects a lot), which made tests fail now and then with "Address already in use"."""
    import random
    for _ in range(200):
        p = random.randrange(10000, 32000)
        if p in _PORTS_GIVEN:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            s.close()
        _PORTS_GIVEN.add(p)
        return p
    s = socket.socket()  # the kernel's pick, then
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def ep(port):
    """A loopback endpoint for a port (an endpoint string passes through)."""
    return port if isinstance(port, str) else "tcp://127.0.0.1:%d" % port


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text, name, **labels):
    """The sum of the Prometheus series called name whose labels include labels (0 when
    none is there), from the text of /metrics."""
    total = 0.0
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(3))
    return total


def sse_blocks(text):
    """The events of an SSE body, in order."""
    return [b for b in text.split("\n\n") if b.strip()]


class E2E:
    """One test's scratch folder, processes and clients."""

    def __init__(self, prefix, build=None, model=None):
        self.build = os.path.abspath(build or sys.argv[1])
        arg_model = model or (sys.argv[2] if len(sys.argv) > 2 else None)
        self.model = os.path.abspath(arg_model) if arg_model else None
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.procs = {}
        self._pb = self._ctx = self._keys = None
        self._lazy = threading.RLock()  # client threads reach for pb/ctx/keys at once
        self.curve = True  # False: the test's cluster says security.curve: off

    # ------------------------------------------------------------ the wire, lazily

    @property
    def pb(self):
        """proto/cpm.proto compiled for Python at test time (nothing generated is kept).

        Client threads reach for it at once: without the lock a second thread's protoc
        rewrote cpm_pb2.py while the first imported it, and the module came up empty."""
        with self._lazy:
            if self._pb is None:
                subprocess.run(["protoc", "--proto_path=" + os.path.join(SRC, "proto"),
                                "--python_out=" + self.tmp, os.path.join(SRC, "proto", "cpm.proto")],
                               check=True)
                sys.path.insert(0, self.tmp)
                import cpm_pb2
                self._pb = cpm_pb2
        return self._pb

    @property
    def ctx(self):
        with self._lazy:
            if self._ctx is None:
                import zmq
                self._ctx = zmq.Context()
        return self._ctx

    @property
    def keys(self):
        """The cluster's CURVE keys (made on first use, as `tools/up` does), with a client
        keypair "e2e" for the tests that call the router's RPC as an outside service would."""
        with self._lazy:
            if not self._keys:
                self._keys = make_keys(self.build, self.path("keys"), client="e2e")
        return self._keys

    def socket(self, kind, server=False, name="fabric"):
        """A pyzmq socket with the cluster's keys (security is on in every test)."""
        import zmq
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        return secure(s, self.keys, server=server, name=name) if self.curve else s

    def envelope(self, corr=1):
        return self.pb.Envelope(version=self.pb.PROTOCOL_VERSION_CURRENT, corr=corr)

    # ------------------------------------------------------------ files and failure

    def path(self, name):
        return os.path.join(self.tmp, name)

    def log_tail(self, limit=2000):
        out = ""
        for name in sorted(os.listdir(self.tmp)):
            if name.endswith(".log"):
                out += "--- %s\n%s" % (name, open(self.path(name), errors="replace").read()[-limit:])
        return out

    def cleanup(self):
        """Kills whatever still runs (and the process groups of launchers)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def fail(self, msg):
        print("FAIL:", msg)
        print(self.log_tail())
        self.cleanup()
        raise SystemExit(1)

    def check(self, cond, what):
        if not cond:
            self.fail(what)

    # ------------------------------------------------------------ processes

    def bin(self, role):
        return os.path.join(self.build, BINS[role])

    def start(self, label, args, **popen):
        """A process whose output goes to LABEL.log in the scratch folder."""
        log = open(self.path(label + ".log"), "a")
        popen.setdefault("stdout", log)
        popen.setdefault("stderr", log)
        self.procs[label] = subprocess.Popen(args, **popen)
        return self.procs[label]

    def start_service(self, cfg, role, index, label, extra=()):
        """Service `index` of its kind in cluster file cfg (the router has none)."""
        args = [self.bin(role), "--config", cfg]
        if role != "router":
            args += ["--index", str(index)]
        return self.start(label, args + list(extra))

    def stop_all(self, timeout=20):
        """SIGTERM to every process (SIGKILL to those still there after timeout s); the exit
        codes that were not 0, by label (-9: it had to be killed)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        codes = {}
        for k, p in self.procs.items():
            try:
                codes[k] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[k] = p.wait()
        self.procs.clear()
        return {k: rc for k, rc in codes.items() if rc != 0}

    def stop_cleanly(self, what="exit status after SIGTERM"):
        """stop_all, failing the test unless every process exited 0."""
        unclean = self.stop_all()
        if unclean:
            self.fail("%s: %s" % (what, unclean))

    SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")

    def sanitizer_reports(self):
        """Lines of the processes' logs where a sanitizer (a -Db_sanitize build) spoke: a
        service that crashed and was restarted must still fail the test."""
        found = []
        for name in sorted(os.listdir(self.tmp)):
            if name.endswith(".log"):
                for line in open(self.path(name), errors="replace"):
                    if any(r in line for r in self.SANITIZER_REPORTS):
                        found.append("%s: %s" % (name, line.strip()))
        return found

    def run(self, main):
        """Runs the test's main, kills what is left whatever happens, fails on a sanitizer
        report in any process's log, says PASS."""
        try:
            main()
        finally:
            self.cleanup()
        reports = self.sanitizer_reports()
        if reports:
            self.fail("sanitizer reports:\n" + "\n".join(reports[:20]))
        print("PASS")

    # ------------------------------------------------------------ addresses and the cluster file

    def up(self, cfg, http_port, log_name="launcher.log"):
        """`cpm-cluster up cfg` as process "launcher", its stderr in log_name: (the
        launcher, the router's HTTP port from its ready line)."""
        log = open(self.path(log_name), "a")
        p = self.start("launcher", [self.bin("cluster"), "up", cfg, "--port", str(http_port),
                                    "--timeout", "60"], stdout=subprocess.PIPE, stderr=log, text=True)
        m = re.search(r"ready: http://127\.0\.0\.1:(\d+) ", p.stdout.readline())
        if not m:
            self.fail("no ready line from cpm-cluster up")
        return p, int(m.group(1))

    @staticmethod
    def child(launcher, binary, has=(), lacks=()):
        """The pid of the launcher's one child running binary whose arguments contain every
        string of has and none of lacks (None unless exactly one matches)."""
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(launcher.pid)],
                             capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in out.splitlines()
                if binary in line and all(a in line for a in has) and not any(a in line for a in lacks)]
        return pids[0] if len(pids) == 1 else None

    def restarted(self, n, log_name="launcher.log"):
        """Whether the launcher has restarted a child n times."""
        return open(self.path(log_name)).read().count("started again") >= n

    def wait_restarted(self, n, what, limit=30, log_name="launcher.log"):
        t0 = time.time()
        while not self.restarted(n, log_name):
            if time.time() - t0 > limit:
                self.fail("%s: the launcher did not restart it" % what)
            time.sleep(0.1)

    def stages_clean(self, endpoints, limit=10):
        """Every stage at endpoints holds no sequence and no KV block (within limit s:
        the idle collection)."""
        t0 = time.time()
        while True:
            hs = [self.health(e) for e in endpoints]
            if all(x is not None and x.live_seqs == 0 and x.kv_used == 0 for x in hs):
                return
            if time.time() - t0 > limit:
                self.fail("stages still hold sequences: %s" %
                          [(x.live_seqs, x.kv_used) if x else None for x in hs])
            time.sleep(0.2)

    def ports(self, *names):
        return {k: free_port() for k in names}

    def cluster_lines(self, ports, stages, router=(), tokenizer=True, samplers=("smp",),
                      experts=(), model=None):
        """A cluster file: router on ports http/rpc/results (+ `router` lines), tokenizer
        `tok`, samplers, then stages and experts as lists of (keys: value) lines whose
        endpoint names a port (stages=[{"layers": "[0, 2]", "endpoint": "st0", ...}])."""
        lines = ["version: 1", "model: " + (model or self.model), "router:",
                 "  http: 127.0.0.1:%d" % ports["http"], "  rpc: " + ep(ports["rpc"]),
                 "  results: " + ep(ports["results"])] + ["  " + r for r in router]
        if tokenizer:
            lines += ["tokenizers:", "  - endpoint: " + ep(ports["tok"])]
        lines += ["samplers:"] + ["  - endpoint: " + ep(ports[s]) for s in samplers]
        for key, items in (("stages", stages), ("experts", experts)):
            if items:
                lines.append(key + ":")
            for item in items:
                first = True
                for k, v in item.items():
                    v = ep(ports[v]) if k == "endpoint" else v
                    lines.append(("  - " if first else "    ") + "%s: %s" % (k, v))
                    first = False
        return lines

    def write_config(self, lines, name="cluster.yaml"):
        """The file, in the scratch folder beside its keys (security.keys: keys)."""
        self.keys
        with open(self.path(name), "w") as f:
            f.write("\n".join(lines) + "\n")
        return self.path(name)

    # ------------------------------------------------------------ HTTP

    def req(self, port, method, path, body=None, timeout=60, headers=None):
        """One exchange: (status, body text)."""
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers=headers or {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode()
        c.close()
        return r.status, data

    @staticmethod
    def http_json(port, path, body=None, timeout=60):
        """(status, parsed JSON body); (None, None) when nothing answers."""
        import urllib.error
        import urllib.request
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except (urllib.error.URLError, ConnectionError):
            return None, None

    def ready(self, port):
        """GET /ready's status, or None while nothing listens."""
        try:
            return self.req(port, "GET", "/ready", timeout=10)[0]
        except OSError:
            return None

    def wait_ready(self, port, want=200, limit=30):
        t0 = time.time()
        while self.ready(port) != want:
            if time.time() - t0 > limit:
                self.fail("/ready not %d after %d s" % (want, limit))
            time.sleep(0.05)

    def completion_ids(self, port, ids, n, **extra):
        """Greedy completion of ids: (200, generated ids) or (status, body)."""
        body = dict({"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                     "return_token_ids": True}, **extra)
        st, text = self.req(port, "POST", "/v1/completions", body)
        if st != 200:
            return st, text
        return st, json.loads(text)["choices"][0]["token_ids"]

    def metric(self, port, name, **labels):
        """A series from /metrics, summed over the labels not given (0 when absent)."""
        return metric_value(self.req(port, "GET", "/metrics")[1], name, **labels)

    def check_greedy(self, port, prompts, refs, n, what="1"):
        """Each prompt's greedy completion over HTTP equals its reference, one at a time."""
        for i, p in enumerate(prompts):
            st, got = self.completion_ids(port, p, n)
            if st != 200 or got != refs[i]:
                self.fail("%s: prompt %d: %s %s\n want (cpm-run) %s" % (what, i, st, got, refs[i]))

    def check_concurrent(self, port, prompts, refs, n, k=8, what="2"):
        """k requests at once (prompts in turn) give the same tokens as one at a time."""
        import threading
        results = [None] * k

        def one(i):
            results[i] = self.completion_ids(port, prompts[i % len(prompts)], n)
        th = [threading.Thread(target=one, args=(i,)) for i in range(k)]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        for i, r in enumerate(results):
            want = refs[i % len(prompts)]
            if r is None or r[0] != 200 or r[1] != want:
                self.fail("%s: concurrent request %d: %s\n want %s" % (what, i, r, want))

    @staticmethod
    def http_client(port, body, out):
        """One completion, for a thread: out gets (status, body text, seconds from its start
        to its end)."""
        t0 = time.time()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("POST", "/v1/completions", body=json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            out.append((r.status, r.read().decode(), time.time() - t0))
            c.close()
        except (OSError, http.client.HTTPException) as e:
            out.append((None, repr(e), time.time() - t0))

    # ------------------------------------------------------------ the internal RPC

    def rpc(self, endpoint, env, frames=(), timeout_ms=20000):
        """One request on a fresh DEALER: the reply Envelope (None on timeout) and its frames."""
        import zmq
        s = self.socket(zmq.DEALER)
        s.connect(endpoint)
        s.send_multipart([env.SerializeToString() if not isinstance(env, bytes) else env] +
                         list(frames))
        if not s.poll(timeout_ms):
            s.close()
            return None, []
        got = s.recv_multipart()
        s.close()
        r = self.pb.Envelope()
        r.ParseFromString(got[0])
        return r, got

    def health(self, endpoint, timeout_ms=1000):
        """A service's Health, or None."""
        env = self.envelope(corr=9)
        env.health_request.SetInParent()
        r, _ = self.rpc(endpoint, env, timeout_ms=timeout_ms)
        return r.health if r is not None and r.WhichOneof("body") == "health" else None

    def rpc_client(self, endpoint, ids, out, request_id="e2e-1", stream=False, max_tokens=200):
        """One generate, for a thread: out gets (events until the final one, events after it
        within 1 s, the wall-clock time the final one came)."""
        import zmq
        s = self.socket(zmq.DEALER)
        s.connect(endpoint)
        env = self.envelope(corr=3)
        env.generate.request_id = request_id
        env.generate.prompt_ids.extend(ids)
        env.generate.max_tokens = max_tokens
        env.generate.ignore_eos = True
        env.generate.stream = stream
        s.send(env.SerializeToString())
        events, extra, final_at = [], 0, None
        while s.poll(60000):
            r = self.pb.Envelope()
            r.ParseFromString(s.recv_multipart()[0])
            events.append(r)
            if r.WhichOneof("body") != "token_event" or r.token_event.final:
                final_at = time.time()
                break
        while s.poll(1000):
            s.recv_multipart()
            extra += 1
        s.close()
        out.append((events, extra, final_at))

    # ------------------------------------------------------------ references and checks

    def cpm_run_ids(self, ids, n, model=None):
        """cpm-run's greedy ids for prompt ids (one process: the reference)."""
        out = subprocess.run([self.bin("run"), "--model", model or self.model, "--ids",
                              ",".join(map(str, ids)), "--n", str(n), "--ignore-eos", "--print-ids"],
                             capture_output=True, text=True, check=True).stdout
        return [int(x) for x in out.split()]

    def in_flight(self, port, rpc_ep, ids, request_id="e2e-1", rpc_stream=False):
        """A non-streaming, a streaming and an RPC request on threads: (threads, results);
        results["started"] is the wall-clock time they were started."""
        import threading
        res = {"plain": [], "stream": [], "rpc": [], "started": time.time()}
        body = {"prompt": ids, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        th = [threading.Thread(target=self.http_client, args=(port, body, res["plain"])),
              threading.Thread(target=self.http_client, args=(port, dict(body, stream=True),
                                                              res["stream"])),
              threading.Thread(target=self.rpc_client, args=(rpc_ep, ids, res["rpc"], request_id,
                                                             rpc_stream))]
        for t in th:
            t.start()
        return th, res

    def kill_in_flight(self, label, port, rpc_ep, ids, what, request_id="e2e-1", rpc_stream=False):
        """Freezes process `label`, starts in_flight's three requests (they get stuck at
        it), kills it, and checks each request got exactly one final error. Returns (the
        error message, seconds from the kill to the last answer)."""
        import signal
        p = self.procs[label]
        p.send_signal(signal.SIGSTOP)
        th, res = self.in_flight(port, rpc_ep, ids, request_id, rpc_stream)
        time.sleep(0.5)  # admitted, and stuck at the frozen process
        t_kill = time.time()
        p.kill()
        p.wait()
        for t in th:
            t.join(30)
        if any(t.is_alive() for t in th):
            self.fail("%s: a client still waits 30 s after %s died" % (what, label))
        return self.check_one_final_answer(res, what), time.time() - t_kill

    def check_one_final_answer(self, res, what, may_succeed=False):
        """Each client of in_flight got exactly one final answer, and it is an error: a 5xx
        JSON error; a 200 stream with one error event then [DONE]; one final RPC event with
        an error and nothing after it. With may_succeed, a whole answer also counts (the
        piece that failed came back in time). Returns the first error message, or None."""
        (st, text, _), = res["plain"]
        ok = may_succeed and st == 200 and "choices" in json.loads(text)
        if not ok and (st is None or st < 500 or "error" not in json.loads(text)):
            self.fail("%s: non-streaming: %s %r" % (what, st, text[:300]))
        why = None if ok else json.loads(text)["error"]["message"]
        (st, text, _), = res["stream"]
        blocks = sse_blocks(text)
        if st != 200 or not blocks or blocks[-1] != "data: [DONE]" or blocks.count("data: [DONE]") != 1:
            self.fail("%s: stream did not end with one [DONE]: %s %r" % (what, st, text[-300:]))
        errors = [b for b in blocks if b.startswith("data: {") and "error" in json.loads(b[6:])]
        if not (may_succeed and not errors) and (len(errors) != 1 or blocks[-2] != errors[0]):
            self.fail("%s: stream: want one error event then [DONE], got %r" % (what, blocks[-3:]))
        (events, extra, _), = res["rpc"]
        finals = [e for e in events if e.WhichOneof("body") == "token_event" and e.token_event.final]
        erred = len(finals) == 1 and finals[0].token_event.HasField("error")
        if len(finals) != 1 or extra or not (erred or may_succeed):
            self.fail("%s: rpc: %d final events (last %s), %d after it" %
                      (what, len(finals), events[-1:], extra))
        return why


# ---------------------------------------------------------------- streaming clients

class RpcStream(threading.Thread):
    """A streaming generate over the internal RPC: ids as they come, and the final event."""

    def __init__(self, h, endpoint, ids, n, request_id="stream-rpc"):
        super().__init__()
        self.h, self.endpoint, self.prompt, self.n, self.rid = h, endpoint, ids, n, request_id
        self.ids, self.final, self.extra = [], None, 0

    def run(self):
        import zmq
        s = self.h.socket(zmq.DEALER)
        s.connect(self.endpoint)
        env = self.h.envelope(corr=7)
        env.generate.request_id = self.rid
        env.generate.prompt_ids.extend(self.prompt)
        env.generate.max_tokens = self.n
        env.generate.ignore_eos = True
        env.generate.stream = True
        s.send(env.SerializeToString())
        while s.poll(60000):
            r = self.h.pb.Envelope()
            r.ParseFromString(s.recv_multipart()[0])
            if r.WhichOneof("body") != "token_event":
                self.final = r
                break
            self.ids.extend(r.token_event.ids)
            if r.token_event.final:
                self.final = r
                break
        while s.poll(500):
            s.recv_multipart()
            self.extra += 1
        s.close()


class SseStream(threading.Thread):
    """A streaming HTTP completion: text pieces as they come, and the raw blocks."""

    def __init__(self, port, ids, n, headers=None):
        super().__init__()
        self.port, self.prompt, self.n, self.pieces, self.blocks, self.status = port, ids, n, [], [], None
        self.headers = dict({"Content-Type": "application/json"}, **(headers or {}))

    def run(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = {"prompt": self.prompt, "max_tokens": self.n, "temperature": 0, "ignore_eos": True,
                "stream": True}
        c.request("POST", "/v1/completions", body=json.dumps(body), headers=self.headers)
        r = c.getresponse()
        self.status = r.status
        buf = b""
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                block = block.decode()
                self.blocks.append(block)
                if block.startswith("data: {"):
                    ev = json.loads(block[6:])
                    if "choices" in ev:
                        self.pieces.append(ev["choices"][0].get("text", ""))
        c.close()
