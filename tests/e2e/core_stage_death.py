#!/usr/bin/python3
"""core_stage_death.py - a pipeline stage dies with requests in flight.

Every accepted request must still get exactly one final answer, and the cluster must
serve again once the stage is back. The stage is frozen (SIGSTOP) first, so the requests
are certainly inside the pipeline when it is killed (SIGKILL):

A. Services started one by one (as a supervisor or mpirun does; no launcher to stop the
   rest): the router's health polls notice that the stage stopped answering (two
   missed polls, ~2 s) and fail the steps in flight, long before the step timeout
   (router.timeout_ms, the default 30 s here). A non-streaming completion gets one 5xx JSON error; a streaming one
   its 200, one in-band error event, then `data: [DONE]` and nothing more; an internal-RPC
   generate one final error event. /ready turns 503 while the stage is down; once it is
   restarted, /ready is 200 again and greedy tokens equal ref_greedy.txt.
B. Under `cpm-cluster up`: each request in flight gets exactly one final answer (an error,
   or, when the restarted stage is back before the router gives up, the whole answer), the
   launcher restarts the stage (its log says so),
   and the cluster serves ref_greedy.txt again without a hand restart; SIGTERM then stops
   every process cleanly.

usage: core_stage_death.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
"""
import json
import os
import re
import signal
import subprocess
import time

from harness import E2E, ep

TIMEOUT_MS = 30000  # the default: the router must not need it to notice a dead stage

h = E2E("cpm-stage-death-")
MODEL, pb, CTX, procs, fail, tmp = h.model, h.pb, h.ctx, h.procs, h.fail, h.tmp
wait_ready, check_one_final_answer = h.wait_ready, h.check_one_final_answer


def write_config(ports, cut):
    stages = [{"layers": "[0, %d]" % cut, "endpoint": "st0"},
              {"layers": "[%d, end]" % cut, "endpoint": "st1"}]
    return h.write_config(h.cluster_lines(ports, stages, router=[
        "timeout_ms: %d" % TIMEOUT_MS, "micro_batches: 2"]))


# ---------------------------------------------------------------- clients in flight

def rpc_greedy(endpoint, ids, n):
    env = h.envelope(corr=4)
    env.generate.request_id = "after"
    env.generate.prompt_ids.extend(ids)
    env.generate.max_tokens = n
    env.generate.ignore_eos = True
    r, _ = h.rpc(endpoint, env, timeout_ms=30000)
    if r is None:
        fail("rpc generate after restart: no answer")
    return list(r.token_event.ids), r


# ---------------------------------------------------------------- the two scenarios

def scenario_services(ids, ref, cut):
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0", "st1")
    cfg = write_config(ports, cut)
    for role, idx, label in [("tokenizer", 0, "tok"), ("sampler", 0, "smp"), ("stage", 0, "st0"),
                             ("stage", 1, "st1"), ("router", 0, "router")]:
        h.start_service(cfg, role, idx, label)
    wait_ready(ports["http"])
    rpc_ep = ep(ports["rpc"])

    why, took = h.kill_in_flight("st1", ports["http"], rpc_ep, ids, "A", "death-1")
    print("ok 1 - A: stage killed mid-request: non-streaming, streaming and RPC requests each got one "
          "final error (within %.1f s; timeout_ms %d): %r" % (took, TIMEOUT_MS, why))
    if took > 8:
        fail("A: answers took %.1f s: the router should notice the dead stage from its health "
             "polls, not wait for timeout_ms (%d ms)" % (took, TIMEOUT_MS))

    wait_ready(ports["http"], want=503, limit=10)
    h.start_service(cfg, "stage", 1, "st1")
    wait_ready(ports["http"])
    got, r = rpc_greedy(rpc_ep, ids, len(ref))
    if got != ref:
        fail("A: after the restart: %s\n want %s (%s)" % (got, ref, r))
    print("ok 2 - A: /ready 503 while the stage is down; restarted, the cluster gives ref_greedy.txt again")
    unclean = h.stop_all()
    if unclean:
        fail("A: exit status after SIGTERM: %s" % unclean)


def stage1_pid(launcher):
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(launcher.pid)],
                         capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "cpm-shard" in line and "--index 1" in line]
    return pids[0] if len(pids) == 1 else None


def scenario_launcher(ids, ref, cut):
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0", "st1")
    cfg = write_config(ports, cut)
    log = open(h.path("launcher.log"), "a")
    p = subprocess.Popen([h.bin("cluster"), "up", cfg, "--port", "0", "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    procs["launcher"] = p
    m = re.search(r"ready: http://127\.0\.0\.1:(\d+) ", p.stdout.readline())
    if not m:
        fail("B: no ready line")
    port, rpc_ep = int(m.group(1)), ep(ports["rpc"])
    pid = stage1_pid(p)
    if not pid:
        fail("B: stage 1 not found among the launcher's children")
    os.kill(pid, signal.SIGSTOP)
    th, res = h.in_flight(port, rpc_ep, ids, "death-1")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    for t in th:
        t.join(30)
    if any(t.is_alive() for t in th):
        fail("B: a client still waits 30 s after the stage died")
    # the stage may be back before the router gives up on the rows it lost: a request then
    # finishes instead; either way exactly one final answer
    why = check_one_final_answer(res, "B", may_succeed=True)
    print("ok 3 - B: under cpm-cluster up, each request in flight got exactly one final answer "
          "(first error: %r)" % why)
    wait_ready(port, limit=30)
    got, r = rpc_greedy(rpc_ep, ids, len(ref))
    if got != ref:
        fail("B: after the launcher's restart: %s\n want %s (%s)" % (got, ref, r))
    text = open(h.path("launcher.log")).read()
    if "stage 1 killed by signal 9: restarting it" not in text or "stage 1 started again" not in text:
        fail("B: the launcher did not say it restarted stage 1")
    new = stage1_pid(p)
    if not new or new == pid:
        fail("B: no new stage 1 process")
    p.send_signal(signal.SIGTERM)
    if p.wait(30) != 0:
        fail("B: launcher exit %s after SIGTERM" % p.returncode)
    stops = re.findall(r"cpm-cluster: on stop: (.*)", open(h.path("launcher.log")).read())
    if stops:
        fail("B: not a clean stop: %s" % stops)
    print("ok 4 - B: the launcher restarted the stage (pid %d -> %d); ref_greedy.txt again without a "
          "hand restart; SIGTERM stopped every process cleanly" % (pid, new))


def main():
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    ref = [int(x) for x in open(os.path.join(MODEL, "ref_greedy.txt")).read().split()]
    cut = max(1, layers // 2)
    try:
        scenario_services(ids, ref, cut)
        scenario_launcher(ids, ref, cut)
    finally:
        h.cleanup()


main()
print("PASS")
