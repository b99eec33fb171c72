#!/usr/bin/python3
"""core_survival.py - the death of a redundant piece costs nothing under `cpm-cluster up`.

Layout: router, 2 tokenizers, 2 samplers, 2 pipeline replicas of one stage each, all
under the launcher. For each kind in turn - a sampler, a tokenizer, a stage - one process
is SIGKILLed while 8 streams generate (4 SSE, 4 internal RPC). Checked each time:

1. every stream finishes with exactly the text / token ids of an undisturbed run (no
   error event, nothing lost or repeated), and how long the worst one paused;
2. /ready stays 200 after the kill (the survivors serve), the launcher restarts the
   victim (its log says so), and the cluster is whole again;
3. afterwards no stage holds a sequence or KV block (its health reply), so nothing the
   dead process touched leaks; the router counted the retries (cpm_service_retries_total).
Then the router itself is killed mid-stream: its streams are cut (the process that held
them is gone), the launcher restarts it, the stages free the dead router's sequences, and
the same request gives the same text.

usage: core_survival.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
"""
import os
import signal
import time

from harness import E2E, RpcStream, SseStream, ep

N_GEN = 96
h = E2E("cpm-survival-")
fail = h.fail
VICTIMS = [("sampler", "cpm-sampler", 0), ("tokenizer", "cpm-tokenizer", 0), ("stage", "cpm-shard", 0)]


def write_config(ports):
    stages = [{"layers": "[0, end]", "endpoint": "st0", "pipeline": 0},
              {"layers": "[0, end]", "endpoint": "st1", "pipeline": 1}]
    lines = h.cluster_lines(ports, stages, samplers=["smp0", "smp1"], router=["micro_batches: 2"])
    i = lines.index("samplers:")  # a second tokenizer
    lines.insert(i, "  - endpoint: " + ep(ports["tok1"]))
    return h.write_config(lines)


def streams(port, rpc_ep, prompts):
    """8 streams: SSE for the even prompts, the internal RPC for the odd ones."""
    ss = [SseStream(port, p, N_GEN) if i % 2 == 0 else RpcStream(h, rpc_ep, p, N_GEN, "surv-%d" % i)
          for i, p in enumerate(prompts)]
    for s in ss:
        s.start()
    return ss


def progress(s):
    return len(s.pieces) if isinstance(s, SseStream) else len(s.ids)


def check_streams(ss, want, what):
    for i, s in enumerate(ss):
        s.join(90)
        if s.is_alive():
            fail("%s: stream %d still runs 90 s later" % (what, i))
        if isinstance(s, SseStream):
            got = "".join(s.pieces)
            if s.status != 200 or s.blocks[-1] != "data: [DONE]" or got != want[i] or \
                    any('"error"' in b for b in s.blocks):
                fail("%s: SSE stream %d: %s %r\n want %r\n last %r" % (what, i, s.status, got, want[i],
                                                                       s.blocks[-2:]))
        elif s.ids != want[i] or s.final is None or s.final.token_event.HasField("error") or s.extra:
            fail("%s: RPC stream %d: %d ids, final %s\n got %s\n want %s" % (what, i, len(s.ids), s.final,
                                                                            s.ids, want[i]))


def stages_clean(ports):
    h.stages_clean([ep(ports[k]) for k in ("st0", "st1")])


def child(launcher, binary, index):
    """The launcher's child running binary (--index index; the router has none: -1)."""
    return h.child(launcher, binary, () if index < 0 else ("--index %d" % index,))


def main():
    ids = [int(x) for x in open(os.path.join(h.model, "ids.txt")).read().split()]
    prompts = [ids, ids[:-3], ids[2:], ids[:-6] + ids[:4], ids[1:], ids[:-1], ids[3:] + ids[:2], ids[:-5]]
    ports = h.ports("http", "rpc", "results", "tok", "tok1", "smp0", "smp1", "st0", "st1")
    launcher, port = h.up(write_config(ports), ports["http"])
    rpc_ep = ep(ports["rpc"])

    ss = streams(port, rpc_ep, prompts)  # the undisturbed run
    for s in ss:
        s.join(90)
    want = ["".join(s.pieces) if isinstance(s, SseStream) else s.ids for s in ss]
    if any(not w for w in want) or want[1] != h.cpm_run_ids(prompts[1], N_GEN):
        fail("the undisturbed run: %r / rpc %s" % (want[:1], want[1][:8]))
    print("ok 1 - undisturbed: 4 SSE and 4 RPC streams of %d tokens (RPC == cpm-run)" % N_GEN)

    for k, (kind, binary, index) in enumerate(VICTIMS):
        pid = child(launcher, binary, index)
        if not pid:
            fail("%s %d not found under the launcher" % (kind, index))
        ss = streams(port, rpc_ep, prompts)
        t0 = time.time()
        while min(progress(s) for s in ss) < 8 and time.time() - t0 < 30:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        check_streams(ss, want, "%s killed" % kind)
        took = time.time() - t_kill
        if h.ready(port) != 200:
            fail("%s killed: /ready %s with a survivor" % (kind, h.ready(port)))
        h.wait_restarted(k + 1, "%s killed" % kind)
        h.wait_ready(port)
        stages_clean(ports)
        print("ok %d - %s %d killed mid-stream: all 8 streams == the undisturbed run (done %.1f s after "
              "the kill), /ready 200 throughout, restarted by the launcher, no sequence left on any "
              "stage" % (k + 2, kind, index, took))
    retries = h.metric(port, "cpm_service_retries_total")
    failovers = h.metric(port, "cpm_failovers_total")
    if retries < 1 or failovers < 1:
        fail("retries %s, failovers %s: the kills cost nothing?" % (retries, failovers))
    print("ok 5 - %d service retries and %d sequence moves counted" % (retries, failovers))
    kill_router(launcher, port, ports, prompts, want)
    launcher.send_signal(signal.SIGTERM)
    if launcher.wait(30) != 0:
        fail("launcher exit %s after SIGTERM" % launcher.returncode)
    h.procs.clear()
    print("ok 7 - SIGTERM stops the cluster cleanly")


def kill_router(launcher, port, ports, prompts, want):
    """The router holds the clients' connections: its streams end, cut (no process can
    answer for it), the launcher restarts it, the stages drop the dead router's sequences
    at the new one's first micro-batch (a new epoch), and it serves the same tokens."""
    pid = child(launcher, "cpm-router", -1)
    ss = [SseStream(port, prompts[0], N_GEN), SseStream(port, prompts[1], N_GEN)]
    for s in ss:
        s.start()
    t0 = time.time()
    while min(progress(s) for s in ss) < 8 and time.time() - t0 < 30:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.time()
    for s in ss:
        s.join(30)
        if s.is_alive() or "data: [DONE]" in s.blocks:
            fail("router killed: a stream %s" % ("still runs" if s.is_alive() else "finished?"))
    h.wait_restarted(len(VICTIMS) + 1, "router killed")
    h.wait_ready(port)
    back = time.time() - t_kill
    stages_clean(ports)
    s = SseStream(port, prompts[0], N_GEN)
    s.start()
    s.join(60)
    if "".join(s.pieces) != want[0] or s.blocks[-1] != "data: [DONE]":
        fail("router restarted: %r" % "".join(s.pieces))
    print("ok 6 - router killed mid-stream: its 2 streams were cut, the launcher restarted it (/ready "
          "200 %.1f s after the kill), no stage kept the old router's sequences, the same text again"
          % back)


h.run(main)
