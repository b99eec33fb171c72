#!/usr/bin/python3
"""k8s_manifests.py - docker/k8s/*.yaml run as Kubernetes would run them, one network
namespace per pod (netns.py), the image from docker/Dockerfile (containers.py).

What stands in for Kubernetes, and how closely:
- pods: every Deployment replica (NAME-HASH-XXXXX) and StatefulSet ordinal (NAME-N, host
  name NAME-N, subdomain = serviceName) gets a namespace with its own address; its
  container runs the manifest's command/args over the image's ENTRYPOINT/CMD, its env
  (secretKeyRef, configMapKeyRef, fieldRef resolved) over the image's ENV, its user
  (runAsUser/runAsGroup, fsGroup and supplementalGroups as groups; runAsNonRoot checked),
  its working folder, a read-only root when readOnlyRootFilesystem, and its volumes at
  their mountPath: ConfigMaps and Secrets as kubelet writes them (files behind ..data
  links, defaultMode, group fsGroup), emptyDir, and the model for the PersistentVolumeClaim;
- cluster DNS: every pod's hosts file holds its own line (as kubelet writes it) and the
  Services' names: headless Services per pod (NAME-N.SVC.NS.svc.cluster.local) and by
  name, for ready pods or, with publishNotReadyAddresses, every pod that has an address;
  a ClusterIP Service's name and traffic go to one ready pod (no kube-proxy here);
  a deleted pod's names stay for DNS_TTL s after its address is gone (CoreDNS's ttl);
- kubelet: startup, readiness and liveness probes (exec in the container's namespaces,
  as its user with its env; httpGet to the pod's address) with their thresholds and
  timeouts, at min(periodSeconds, 1 s); a liveness failure that would restart a container
  fails the test; deletion runs preStop, SIGTERM, SIGKILL after the grace period.
- the two Secrets the docs have you make: cpm-fabric-keys from `cpm-cluster keys DIR`, and
  cpm-api-keys with key `keys`; the claim cpm-models is the default model (cpm-gen-model).
The one liberty is containers.py's: this build's binaries first in PATH.

Checks: every pod starts and becomes ready by its own probes; a chat request through the
router Service with the API key gives cpm-run's greedy tokens; a stage pod deleted and
made again (same name, new address) and the router pod replaced (new name and address):
the cluster is ready again and serves the same tokens; no liveness probe fails throughout;
deleting every pod ends each container with status 0.

usage: k8s_manifests.py BUILD_DIR   (needs root and ip netns; exits 77, skipped, without)
"""
import glob
import hashlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import yaml

from containers import SRC, Image, chat, make_model, reference_chat, refused_without_key, request
from harness import E2E, make_keys
from netns import Net, skip_unless_possible

MANIFESTS = sorted(glob.glob(os.path.join(SRC, "docker", "k8s", "*.yaml")))
DOMAIN = "svc.cluster.local"
DNS_TTL = 5.0            # CoreDNS's kubernetes plugin answers with ttl 5
PROBE_PERIOD_MAX = 1.0   # probes run at min(periodSeconds, this)
READY_LIMIT = 60         # s for the whole cluster to be ready (again)
PROMPT, N_GEN = "Say hello to the cluster", 16
KINDS = {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment", "StatefulSet"}

skip_unless_possible()
h = E2E("cpm-k8s-")
fail, check = h.fail, h.check


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class Pod:
    def __init__(self, name, owner, spec, labels, hostname=None, subdomain=None):
        self.name, self.owner, self.spec, self.labels = name, owner, spec, labels
        self.hostname, self.subdomain = hostname or name, subdomain
        self.ns = owner["metadata"].get("namespace", "default")
        self.host = self.proc = self.env = self.user = None
        self.started = self.ready = self.terminating = False
        self.probe_due, self.fails, self.t_start = {}, {}, None
        self.container = spec["containers"][0]

    @property
    def ip(self):
        return self.host.ip if self.host else None

    def fqdn(self):
        return "%s.%s.%s.%s" % (self.hostname, self.subdomain, self.ns, DOMAIN) if self.subdomain else None


class Cluster:
    """The objects of the manifests, the pods they make, DNS, and a kubelet's probes."""

    def __init__(self, net, image, objects, secret_data, claims):
        self.net, self.image, self.secret_data, self.claims = net, image, secret_data, claims
        self.objects = objects
        self.config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.services = [o for o in objects if o["kind"] == "Service"]
        self.workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
        self.pods = []
        self.liveness_failures = []

    # ------------------------------------------------------------ controllers

    def pod_for(self, w, ordinal):
        t = w["spec"]["template"]
        name = w["metadata"]["name"]
        if w["kind"] == "StatefulSet":
            return Pod("%s-%d" % (name, ordinal), w, t["spec"], t["metadata"]["labels"],
                       subdomain=w["spec"]["serviceName"])
        template_hash = hashlib.sha256(yaml.safe_dump(t).encode()).hexdigest()[:10]
        alphabet = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' random suffixes
        suffix = "".join(random.choice(alphabet) for _ in range(5))
        return Pod("%s-%s-%s" % (name, template_hash, suffix), w, t["spec"], t["metadata"]["labels"])

    def create_all(self):
        for w in self.workloads:
            for i in range(w["spec"].get("replicas", 1)):
                self.create(self.pod_for(w, i))

    def create(self, pod):
        """Scheduled: an address, the names, the container started."""
        self.pods.append(pod)
        pod.host = self.net.add(pod.name) if pod.name not in self.net.hosts else self.net.hosts[pod.name]
        if pod.host.ip is None:
            self.net.plug(pod.host)
        pod.host.own = [n for n in (pod.fqdn(), pod.hostname) if n]
        self.dns()
        self.start_container(pod)
        return pod

    def replacement(self, pod):
        """What the owner makes for a deleted pod: a StatefulSet the same name, a
        Deployment (a new ReplicaSet pod) a new one."""
        if pod.owner["kind"] == "StatefulSet":
            return self.pod_for(pod.owner, int(pod.name.rsplit("-", 1)[1]))
        return self.pod_for(pod.owner, 0)

    def terminate(self, pod):
        """The kubelet's part of a deletion: not ready, preStop, SIGTERM, SIGKILL after the
        grace period. The exit status."""
        pod.terminating, pod.ready = True, False
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        t0 = time.time()
        pre = pod.container.get("lifecycle", {}).get("preStop", {})
        if "exec" in pre:
            self.net.exec_in(pod.proc.pid, pre["exec"]["command"], env=pod.env, user=pod.user, timeout=grace)
        pod.proc.send_signal(signal.SIGTERM)
        try:
            return pod.proc.wait(max(1, grace - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            pod.proc.kill()
            return pod.proc.wait()

    def delete(self, pod):
        """`kubectl delete pod`: terminate; the sandbox (address) goes; DNS forgets the pod
        DNS_TTL s after the pod object is gone (meanwhile its names answer with the dead
        address). The exit status."""
        pod.terminating, pod.ready = True, False
        self.dns()
        rc = self.terminate(pod)
        self.net.unplug(pod.host)
        self.pods.remove(pod)
        self.wait(lambda: False, DNS_TTL, quiet=True)   # cached answers outlive the pod
        pod.host.own = []
        self.dns()
        return rc

    def delete_all(self):
        """`kubectl delete -f`: every pod terminated at once; their exit statuses."""
        import threading
        codes = {}

        def one(p):
            codes[p.name] = self.terminate(p)
        th = [threading.Thread(target=one, args=(p,)) for p in self.pods]
        for t in th:
            t.start()
        for t in th:
            t.join()
        return codes

    # ------------------------------------------------------------ DNS and Services

    def endpoints(self, svc, serving_only=False):
        sel = svc["spec"].get("selector", {})
        every = svc["spec"].get("publishNotReadyAddresses", False) and not serving_only
        return [p for p in self.pods if p.ip and labels_match(sel, p.labels) and
                p.ns == svc["metadata"].get("namespace", "default") and (p.ready or every)]

    def dns(self):
        names = {}
        for svc in self.services:
            name = "%s.%s.%s" % (svc["metadata"]["name"], svc["metadata"].get("namespace", "default"), DOMAIN)
            eps = self.endpoints(svc)
            headless = svc["spec"].get("clusterIP") == "None"
            if headless:
                for p in eps:
                    if p.subdomain == svc["metadata"]["name"]:
                        names[p.fqdn()] = p.ip
            # a headless name lists every pod, a ClusterIP one stands for them (one here)
            if eps:
                names[name] = eps[0].ip
        for gone in [n for n in self.net.names if n not in names]:
            self.net.names.pop(gone)
        self.net.names.update(names)
        self.net.write_hosts()

    def service_address(self, name, port_name):
        """Where a request to Service `name` port `port_name` lands: a ready pod's address
        and the container port its targetPort names."""
        svc = next(s for s in self.services if s["metadata"]["name"] == name)
        port = next(p for p in svc["spec"]["ports"] if p.get("name") == port_name)
        eps = self.endpoints(svc, serving_only=True)
        if not eps:
            return None, None
        return eps[0].ip, self.container_port(eps[0], port.get("targetPort", port["port"]))

    @staticmethod
    def container_port(pod, port):
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in pod.container.get("ports", []) if p.get("name") == port)

    # ------------------------------------------------------------ the container

    @staticmethod
    def volume_dir(pod, vol, mode):
        d = tempfile.mkdtemp(prefix="vol-%s-%s-" % (pod.name, vol["name"]), dir=h.tmp)
        os.chmod(d, mode)
        return d

    def volume(self, pod, vol, ro):
        """A pod volume as files, the way kubelet lays them out: (folder, read-only)."""
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        if "configMap" in vol or "secret" in vol:
            if "configMap" in vol:
                data, mode = self.config_maps[vol["configMap"]["name"]], vol["configMap"].get("defaultMode", 0o644)
            else:
                sname = vol["secret"]["secretName"]
                check(sname in self.secret_data, "Secret %s: the docs make no such Secret" % sname)
                data, mode = self.secret_data[sname], vol["secret"].get("defaultMode", 0o644)
            d = self.volume_dir(pod, vol, 0o755)
            stamp = "..%s" % time.strftime("%Y_%m_%d_%H_%M_%S.0000")
            os.makedirs(os.path.join(d, stamp))
            for k, v in data.items():
                f = os.path.join(d, stamp, k)
                with open(f, "w") as out:
                    out.write(v)
                os.chmod(f, mode)
                if fs_group is not None:
                    os.chown(f, 0, fs_group)
                os.symlink(os.path.join("..data", k), os.path.join(d, k))
            os.symlink(stamp, os.path.join(d, "..data"))
            return d, True
        if "emptyDir" in vol:
            return self.volume_dir(pod, vol, 0o1777), ro
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]
            check(claim["claimName"] in self.claims, "no volume for claim %s" % claim["claimName"])
            return self.claims[claim["claimName"]], ro or claim.get("readOnly", False)
        fail("pod %s: volume %s: a kind this test does not know" % (pod.name, vol))

    def start_container(self, pod):
        c, spec = pod.container, pod.spec
        check(not spec.get("enableServiceLinks", True), "%s: service links would add env" % pod.name)
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        uid = csc.get("runAsUser", psc.get("runAsUser", self.image.user[0] if self.image.user else 0))
        gid = csc.get("runAsGroup", psc.get("runAsGroup", self.image.user[1] if self.image.user else 0))
        groups = ([psc["fsGroup"]] if "fsGroup" in psc else []) + psc.get("supplementalGroups", [])
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            check(uid != 0, "%s: runAsNonRoot with uid 0: kubelet refuses to start it" % pod.name)
        pod.user = (uid, gid, groups) if uid else None
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                check(ref["name"] in self.secret_data, "env %s: no Secret %s" % (e["name"], ref["name"]))
                env[e["name"]] = self.secret_data[ref["name"]][ref["key"]]
            elif "configMapKeyRef" in src:
                env[e["name"]] = self.config_maps[src["configMapKeyRef"]["name"]][src["configMapKeyRef"]["key"]]
            elif "fieldRef" in src:
                env[e["name"]] = {"metadata.name": pod.name, "metadata.namespace": pod.ns,
                                  "status.podIP": pod.ip}[src["fieldRef"]["fieldPath"]]
        pod.env = self.image.environment(env, hostname=pod.hostname)
        ro_root = csc.get("readOnlyRootFilesystem", False)
        mounts = self.image.rootfs(pod.name, readonly=ro_root)
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for vm in c.get("volumeMounts", []):
            src, ro = self.volume(pod, vols[vm["name"]], vm.get("readOnly", False))
            if vm.get("subPath"):
                src = os.path.join(src, vm["subPath"])
            mounts.append((src, vm["mountPath"], ro))
        argv = self.image.argv(c.get("command"), c.get("args"))
        pod.workdir = c.get("workingDir", self.image.workdir)
        pod.proc = self.net.start(pod.host, argv, env=pod.env, mounts=mounts, hostname=pod.hostname,
                                  user=pod.user, readonly_root=ro_root, workdir=pod.workdir,
                                  log=open(h.path(pod.name + ".log"), "a"))
        h.procs[pod.name] = pod.proc
        pod.t_start = time.time()
        pod.started = pod.ready = False
        pod.probe_due = {k: pod.t_start + c.get(k, {}).get("initialDelaySeconds", 0)
                         for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        pod.fails = {k: 0 for k in pod.probe_due}

    # ------------------------------------------------------------ kubelet

    def probe(self, pod, p):
        """One probe: True when it succeeds."""
        timeout = p.get("timeoutSeconds", 1)
        if "exec" in p:
            rc, out = self.net.exec_in(pod.proc.pid, p["exec"]["command"], env=pod.env, user=pod.user,
                                       timeout=timeout)
            pod.last_probe = out
            return rc == 0
        if "httpGet" in p:
            g = p["httpGet"]
            st, out = request(pod.ip, self.container_port(pod, g["port"]), "GET", g.get("path", "/"),
                              timeout=timeout)
            pod.last_probe = "%s %s" % (st, out)
            return st is not None and 200 <= st < 400
        fail("%s: a probe kind this test does not know: %s" % (pod.name, p))

    def tick(self):
        now = time.time()
        changed = False
        for pod in list(self.pods):
            if pod.terminating:
                continue
            if pod.proc.poll() is not None:
                fail("%s: the container exited with %s (kubelet would restart it)" % (pod.name, pod.proc.returncode))
            c = pod.container
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(kind)
                if kind != "startupProbe" and not pod.started:
                    continue
                if not p:
                    if kind == "startupProbe":
                        pod.started = True
                    elif kind == "readinessProbe" and not pod.ready:
                        pod.ready, changed = True, True
                    continue
                if now < pod.probe_due[kind] or (kind == "startupProbe" and pod.started):
                    continue
                pod.probe_due[kind] = now + min(p.get("periodSeconds", 10), PROBE_PERIOD_MAX)
                ok = self.probe(pod, p)
                pod.fails[kind] = 0 if ok else pod.fails[kind] + 1
                over = pod.fails[kind] >= p.get("failureThreshold", 3)
                if kind == "startupProbe":
                    if ok:
                        pod.started = True
                    elif over:
                        fail("%s: startup probe failed %d times: %s" % (pod.name, pod.fails[kind], pod.last_probe))
                elif kind == "readinessProbe":
                    ready = ok or (pod.ready and not over)
                    changed |= ready != pod.ready
                    pod.ready = ready
                elif over:
                    self.liveness_failures.append((pod.name, pod.last_probe))
                    fail("%s: liveness probe failed %d times (kubelet would restart it): %s"
                         % (pod.name, pod.fails[kind], pod.last_probe))
        if changed:
            self.dns()

    def wait(self, cond, limit, what="", quiet=False):
        """Probes run until cond() holds; the seconds it took."""
        t0 = time.time()
        while not cond():
            if time.time() - t0 > limit:
                if quiet:
                    return limit
                fail("%s: not within %d s; pods: %s%s" % (what, limit, self.describe(), self.stuck()))
            self.tick()
            time.sleep(0.05)
        return time.time() - t0

    def all_ready(self):
        want = sum(w["spec"].get("replicas", 1) for w in self.workloads)
        return len(self.pods) == want and all(p.ready for p in self.pods)

    def stuck(self):
        """Connection attempts that still wait for an answer (SYN sent), by pod: where a
        process dials an address that no pod has any more."""
        out = ""
        for p in self.pods:
            r = subprocess.run(["ip", "netns", "exec", p.host.ns, "ss", "-tnpH", "state", "syn-sent"],
                               capture_output=True, text=True)
            for line in r.stdout.splitlines():
                out += "\n  %s (%s): SYN-SENT %s" % (p.name, p.ip, " ".join(line.split()))
        return "\nconnection attempts still waiting:" + out if out else ""

    def describe(self):
        return "; ".join("%s %s%s%s %s" % (p.name, p.ip, " started" if p.started else "",
                                            " ready" if p.ready else "", getattr(p, "last_probe", "")[-160:].strip())
                         for p in self.pods)


# ---------------------------------------------------------------- the test

def load():
    objects = []
    for f in MANIFESTS:
        for o in yaml.safe_load_all(open(f)):
            if o:
                check(o["kind"] in KINDS, "%s: kind %s: this test does not know it" % (f, o["kind"]))
                objects.append(o)
    return objects


def main():
    net = Net(scratch=h.tmp)
    image = Image(h.build, h.tmp)
    try:
        run(net, image)
    finally:
        net.close()
        image.close()


def serve(cl, key, want, what):
    addr, port = cl.service_address("cpm-router", "http")
    check(addr is not None, "%s: the router Service has no ready endpoint" % what)
    st, ids, out = chat(addr, port, key, PROMPT, N_GEN)
    if st != 200 or ids != want:
        fail("%s: chat through Service cpm-router (%s:%d): %s %s\n want (cpm-run) %s%s"
             % (what, addr, port, st, ids or out, want, cl.stuck()))
    return addr


def run(net, image):
    model = make_model(h.build, os.path.join(h.tmp, "model"))
    want = reference_chat(h.build, model, PROMPT, N_GEN)
    # the Secrets, as docs/DEPLOY.md makes them
    keys = make_keys(h.build, os.path.join(h.tmp, "keys"))
    key = "sk-" + secrets.token_hex(16)
    secret_data = {"cpm-fabric-keys": {f: open(os.path.join(keys, f)).read() for f in os.listdir(keys)},
                   "cpm-api-keys": {"keys": key}}
    cl = Cluster(net, image, load(), secret_data, {"cpm-models": model})

    # 1. apply: every pod ready by its own probes
    cl.create_all()
    took = cl.wait(cl.all_ready, READY_LIMIT, "every pod ready")
    print("ok 1 - %d pods (%s) started and ready by their probes in %.1f s" %
          (len(cl.pods), ", ".join(p.name for p in cl.pods), took))

    # 2. a chat request through the router Service with the API key
    addr = serve(cl, key, want, "2")
    st = refused_without_key(*cl.service_address("cpm-router", "http"))
    check(st == 401, "2: a chat request without the API key: %s" % st)
    print("ok 2 - chat through Service cpm-router (%s) with the API key == cpm-run greedy, %d tokens; "
          "401 without the key" % (addr, N_GEN))

    # 3. a stage pod deleted: the StatefulSet makes it again, same name, new address
    # 4. the router pod deleted: the Deployment makes a new one, new name and address
    for n, prefix in ((3, "cpm-stage-1"), (4, "cpm-router-")):
        old = next(p for p in cl.pods if p.name.startswith(prefix))
        old_ip, t0 = old.ip, time.time()
        rc = cl.delete(old)
        check(rc == 0, "%s: exit %s after SIGTERM" % (old.name, rc))
        new = cl.create(cl.replacement(old))
        took = cl.wait(cl.all_ready, READY_LIMIT, "ready again after %s was replaced" % old.name)
        serve(cl, key, want, "%d" % n)
        print("ok %d - %s deleted (exit 0; %.1f s with its name on the dead address) -> %s at %s (was %s): "
              "every pod ready %.1f s after it started, chat == cpm-run again (%.1f s in all)"
              % (n, old.name, DNS_TTL, new.name, new.ip, old_ip, took, time.time() - t0))

    # 5. kubectl delete -f docker/k8s/: every container ends with status 0
    codes = cl.delete_all()
    unclean = {k: v for k, v in codes.items() if v != 0}
    check(not unclean, "exit status after SIGTERM: %s" % unclean)
    print("ok 5 - no liveness probe failed throughout; deleting the %d pods ends every container with "
          "status 0" % len(codes))
    shutil.rmtree(model)  # 82 MB; the logs stay

h.run(main)
