#!/usr/bin/python3
"""mpi_cluster.py - the cluster launched by OpenMPI's mpirun, every rank on this host.

`mpirun -np N cpm-cluster rank CONFIG` turns rank r into process r of the cluster file
(router, tokenizer, sampler, two stages) on 127.0.0.1. Checks: a wrong rank count is
refused with the count to use; the router becomes ready; greedy tokens over the internal
RPC equal ref_greedy.txt; an HTTP completion gives the same text as cpm-tokenizer's
decoding of them; SIGTERM to the ranks stops each cleanly (mpirun exits 0); SIGTERM to
mpirun (Ctrl-C's path) leaves no process behind. Every wait is bounded. MPI only launches: the services talk
over ZeroMQ as always.

usage: mpi_cluster.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
Exits 77 (skipped) when mpirun is not installed.
"""
import json
import os
import shutil
import signal
import subprocess
import time

MPIRUN = shutil.which("mpirun")
if not MPIRUN:
    print("SKIP: no mpirun (Debian: openmpi-bin)")
    raise SystemExit(77)

from harness import E2E, free_port  # noqa: E402

START_S, STOP_S = 60, 30

h = E2E("cpm-mpi-e2e-")
MODEL, pb, tmp = h.model, h.pb, h.tmp
CLUSTER = h.bin("cluster")
LOG = os.path.join(tmp, "mpirun.log")
job = None


def log_tail():
    with open(LOG) as f:
        return f.read()[-3000:]


def fail(msg):
    print("FAIL:", msg)
    if job and job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    print(log_tail())
    raise SystemExit(1)


def mpirun(n, cfg, http_port):
    """mpirun in its own session, so a failing test can kill the whole job at once."""
    # As root OpenMPI wants --allow-run-as-root; --oversubscribe lets N exceed the cores;
    # --bind-to none keeps each service's threads free to use every core.
    return subprocess.Popen([MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                             "-np", str(n), CLUSTER, "rank", cfg, "--model", MODEL, "--port", str(http_port)],
                            stdout=open(LOG, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def rpc(endpoint, env, timeout_ms=20000):
    env.version = pb.PROTOCOL_VERSION_CURRENT
    env.corr = 9
    r, _ = h.rpc(endpoint, env, timeout_ms=timeout_ms)
    if r is None:
        fail("%s: no reply" % endpoint)
    return r


def http(port, path, body=None):
    return h.http_json(port, path, body, timeout=30)


def ranks_alive(cfg):
    """Processes started for this config (their command lines name it)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if cfg in line and "mpirun" not in line and "ps -eo" not in line]


def launch(cfg, http_port):
    """Starts the job and waits until the router sees every service ready."""
    global job
    t0 = time.time()
    job = mpirun(5, cfg, http_port)
    while True:
        st, body = http(http_port, "/ready")
        if st == 200:
            break
        if job.poll() is not None:
            fail("mpirun exited %d before the cluster was ready" % job.returncode)
        if time.time() - t0 > START_S:
            fail("not ready after %d s: %s %s" % (START_S, st, body))
        time.sleep(0.2)
    procs = ranks_alive(cfg)
    if len(procs) != 5:
        fail("expected 5 rank processes, got %s" % procs)
    return job


def main():
    global job
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    ref = [int(x) for x in open(os.path.join(MODEL, "ref_greedy.txt")).read().split()]
    cut = max(1, layers // 2)
    ports = {k: free_port() for k in ["rpc", "results", "tok", "smp", "st0", "st1", "http"]}
    ep = lambda k: "tcp://127.0.0.1:%d" % ports[k]  # noqa: E731
    cfg = os.path.join(tmp, "mpi.yaml")
    h.keys  # security.keys defaults to the folder beside the file
    with open(cfg, "w") as f:
        f.write("\n".join(["version: 1", "router:", "  rpc: " + ep("rpc"), "  results: " + ep("results"),
                           "tokenizers:", "  - endpoint: " + ep("tok"), "samplers:", "  - endpoint: " + ep("smp"),
                           "stages:", "  - layers: [0, %d]" % cut, "    endpoint: " + ep("st0"),
                           "  - layers: [%d, end]" % cut, "    endpoint: " + ep("st1")]) + "\n")

    # 1. Too few ranks: the rank without a process says how many to start (and mpirun fails).
    r = subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "6", CLUSTER, "rank", cfg,
                        "--model", MODEL, "--port", "0"], capture_output=True, text=True, timeout=STOP_S,
                       start_new_session=True)
    if r.returncode == 0 or "start mpirun with -np 5" not in r.stdout + r.stderr:
        fail("-np 6: rc %d, %r" % (r.returncode, (r.stdout + r.stderr)[-2000:]))
    time.sleep(0.5)
    if ranks_alive(cfg):
        fail("-np 6 left processes: %s" % ranks_alive(cfg))
    print("ok 1 - mpirun -np 6 for a 5-process file fails, naming -np 5, and leaves nothing running")

    # 2. Launch, and wait for the router to see every service ready.
    job = launch(cfg, ports["http"])
    print("ok 2 - 5 ranks (router, tokenizer, sampler, 2 stages) ready")

    # 3. The reference tokens over the internal RPC, and the same text over HTTP.
    env = pb.Envelope()
    g = env.generate
    g.request_id = "mpi-1"
    g.prompt_ids.extend(ids)
    g.params.temperature = 0.0
    g.max_tokens = len(ref)
    g.ignore_eos = True
    ev = rpc(ep("rpc"), env).token_event
    if ev.HasField("error") or not ev.final or list(ev.ids) != ref:
        fail("rpc generate: %s\n want %s" % (ev, ref))
    st, body = http(ports["http"], "/v1/completions",
                    {"prompt": ids, "max_tokens": len(ref), "temperature": 0, "ignore_eos": True})
    if st != 200 or body["usage"]["completion_tokens"] != len(ref):
        fail("HTTP completion: %s %s" % (st, body))
    env = pb.Envelope()
    env.detokenize.ids.extend(ref)
    env.detokenize.skip_special = True
    want = rpc(ep("tok"), env).detokenized.text
    if body["choices"][0]["text"] != want:
        fail("HTTP text %r != decode(ref) %r" % (body["choices"][0]["text"], want))
    print("ok 3 - %d greedy tokens over the RPC equal ref_greedy.txt; HTTP gives their text" % len(ref))

    # 4. SIGTERM to every rank (what a process manager does): each stops cleanly, exit 0,
    # so mpirun exits 0 too (a rank killed or failing would make it exit non-zero).
    t0 = time.time()
    for line in ranks_alive(cfg):
        os.kill(int(line.split()[0]), signal.SIGTERM)
    try:
        rc = job.wait(STOP_S)
    except subprocess.TimeoutExpired:
        fail("mpirun still running %d s after its ranks got SIGTERM" % STOP_S)
    log = open(LOG).read()
    missing = [s for s in ["stage0 stopped", "stage1 stopped", "sampler0 stopped", "tokenizer0 stopped",
                           "router signal 15: draining"] if s not in log]
    if rc != 0 or missing:
        fail("mpirun exit %d; no clean stop for: %s" % (rc, missing))
    print("ok 4 - SIGTERM to the ranks: all 5 stopped cleanly and mpirun exited 0 in %.1f s" % (time.time() - t0))

    # 5. Ctrl-C's path: SIGTERM to mpirun, which passes it on; nothing is left behind.
    job = launch(cfg, ports["http"])
    t0 = time.time()
    os.kill(job.pid, signal.SIGTERM)
    try:
        job.wait(STOP_S)
    except subprocess.TimeoutExpired:
        fail("mpirun still running %d s after SIGTERM" % STOP_S)
    time.sleep(0.3)
    left = ranks_alive(cfg)
    if left:
        fail("still running after stop: %s" % left)
    print("ok 5 - SIGTERM to mpirun: all 5 ranks gone in %.1f s" % (time.time() - t0))


main()
print("PASS")
