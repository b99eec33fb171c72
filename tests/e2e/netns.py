"""netns.py - hosts on one machine for the multi-host e2e tests.

A bridge in the root namespace and one network namespace per "host" (a container, a
pod), each with its own address on the bridge and its own hosts file, which stands in
for DNS: every namespace sees the same names, and a name can be moved to another address
while the cluster runs (a rescheduled pod). The root namespace reaches every host's
address over the bridge, as a node's kubelet or a published port would.

A process is started in a host's network namespace and in a private mount and UTS
namespace of its own, where the volumes appear at their mount paths (bind mounts; a
missing mount point is made in a tmpfs overlay of the nearest existing folder, so
nothing is created on this machine), the host's hosts file is /etc/hosts, the host name
is set, and optionally the root file system is read-only and the process runs as
another user: what a container runtime does, with this machine's files as the image.

    net = Net()                                  # exits 77 (skip) without root / ip netns
    st = net.add("stage-1")                      # namespace + address
    net.name("stage-1.cpm", st)                  # in every hosts file
    p = net.start(st, ["cpm-shard", ...], mounts=[(src, "/srv/models/m", True)])
    net.exec_in(p.pid, ["cpm-cluster", "health", ...])   # a probe, in p's namespaces
    net.replace(st)                              # new namespace, new address, names follow
    net.close()                                  # also at exit and on SIGTERM

Needs root, iproute2, util-linux (nsenter, unshare, setpriv).
"""
import atexit
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def skip_unless_possible():
    """Exit 77 (meson's skip) unless this process can make network namespaces."""
    ok = os.geteuid() == 0 and shutil.which("ip") and shutil.which("nsenter") and \
        shutil.which("unshare") and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0
    if not ok:
        print("SKIP: needs root, ip netns, nsenter and unshare")
        sys.exit(77)


def sh(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError("%s: %s" % (" ".join(args), r.stderr.strip()))
    return r


class Host:
    """One network namespace with one address on the bridge."""

    def __init__(self, net, label, n):
        self.net, self.label, self.n = net, label, n
        self.ns = "%s-%s" % (net.tag, label)
        self.veth = "%sv%d" % (net.tag, n)  # the bridge side; eth0 inside
        self.ip = self.gone_ip = None
        self.own = []  # names of this host only (its own hosts-file line, as kubelet writes)

    @property
    def hosts_file(self):
        return "/etc/netns/%s/hosts" % self.ns


class Net:
    """A bridge, the hosts on it and the names they resolve. Everything made here is
    removed by close(), which also runs at exit and on SIGTERM/SIGINT."""

    def __init__(self, tag=None, scratch=None):
        skip_unless_possible()
        self.tag = tag or "cpm%d" % (os.getpid() % 100000)
        self.scratch = scratch or tempfile.mkdtemp(prefix="cpm-netns-")
        self.hosts, self.names, self.procs = {}, {}, []  # label -> Host, name -> address
        self._n = 0
        self._used = set()
        self._closed = False
        self.bridge = self.tag + "br"
        self.prefix = self._subnet()
        atexit.register(self.close)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", self.prefix + ".1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self.gateway = self.prefix + ".1"

    def _on_signal(self, sig, frame):
        self.close()
        sys.exit(128 + sig)

    def _subnet(self):
        """10.X.Y.0/24 from the process id, not one this machine already routes."""
        routes = sh("ip", "-4", "route", "show", "table", "all").stdout
        pid = os.getpid()
        for k in range(64):
            p = "10.%d.%d" % (220 + (pid + k) % 30, (pid // 30 + k) % 250)
            if p + "." not in routes:
                return p
        raise RuntimeError("no free 10.x.y.0/24 subnet")

    def _next_ip(self):
        for i in range(10, 250):
            ip = "%s.%d" % (self.prefix, i)
            if ip not in self._used:
                self._used.add(ip)
                return ip
        raise RuntimeError("subnet full")

    # ------------------------------------------------------------ hosts

    def add(self, label, ip=None):
        """A new namespace named TAG-LABEL with address ip (else the next free one)."""
        h = Host(self, label, self._n)
        self._n += 1
        self.hosts[label] = h
        os.makedirs(os.path.dirname(h.hosts_file), exist_ok=True)
        open(h.hosts_file, "w").close()
        self._plug(h, ip or self._next_ip())
        return h

    def _plug(self, h, ip):
        self._used.add(ip)
        h.ip = ip
        sh("ip", "netns", "add", h.ns)
        sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.veth + "p", "netns", h.ns)
        sh("ip", "-n", h.ns, "link", "set", h.veth + "p", "name", "eth0")
        sh("ip", "-n", h.ns, "addr", "add", ip + "/24", "dev", "eth0")
        sh("ip", "-n", h.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", h.ns, "link", "set", "lo", "up")
        sh("ip", "link", "set", h.veth, "master", self.bridge, "up")
        self.write_hosts()

    def unplug(self, h):
        """The host's namespace goes, and its address with it (whatever still runs there
        is killed): a stopped container, a deleted pod. Names that point at the address
        stay until moved or dropped, as DNS answers may outlive a pod."""
        self.kill_all(h)
        sh("ip", "netns", "del", h.ns, check=False)
        sh("ip", "link", "del", h.veth, check=False)
        h.gone_ip, h.ip = h.ip, None

    def plug(self, h, ip=None):
        """A new namespace for an unplugged host, at a new address (else ip): a container
        or pod made again under the same name. Returns the address."""
        self._plug(h, ip or self._next_ip())
        return h.ip

    def replace(self, h, ip=None):
        """unplug + plug at once, every name of the old address moved to the new one."""
        self.unplug(h)
        new = self.plug(h, ip)
        for k, v in self.names.items():
            if v == h.gone_ip:
                self.names[k] = new
        self.write_hosts()
        return new

    # ------------------------------------------------------------ names

    def name(self, name, host_or_ip):
        """name -> the host's address (or an address) in every hosts file."""
        self.names[name] = host_or_ip.ip if isinstance(host_or_ip, Host) else host_or_ip
        self.write_hosts()

    def unname(self, name):
        if self.names.pop(name, None) is not None:
            self.write_hosts()

    def write_hosts(self):
        """Every host's hosts file, rewritten in place: the file is bind-mounted over
        /etc/hosts in its processes, so it must keep its inode (glibc reads it again at
        every lookup)."""
        by_ip = {}
        for k, v in self.names.items():
            by_ip.setdefault(v, []).append(k)
        common = "".join("%s %s\n" % (ip, " ".join(ns)) for ip, ns in sorted(by_ip.items()))
        for h in self.hosts.values():
            own = "%s %s\n" % (h.ip, " ".join(h.own)) if h.own and h.ip else ""
            text = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" + own + common
            with open(h.hosts_file, "r+") as f:
                f.seek(0)
                f.write(text)
                f.truncate()

    # ------------------------------------------------------------ processes

    def _setup(self, h, mounts, hostname, readonly_root, workdir):
        """The shell lines that make a container's file view in a fresh mount namespace:
        every bind first (later ones may sit inside earlier ones), then the read-only
        remounts, per mount (bind), never of a file system: only this namespace's view
        changes."""
        q = shlex.quote
        lines, ro_list, overlaid = ["set -e"], [], []
        for k, (src, dst, ro) in enumerate(mounts):
            anc = dst
            while not os.path.lexists(anc):
                anc = os.path.dirname(anc)
            if anc != dst and not any(anc == o or anc.startswith(o + "/") for o in overlaid):
                if anc == "/":
                    raise RuntimeError("mount point %s: no folder /%s on this machine to overlay"
                                       % (dst, dst.split("/")[1]))
                scratch = tempfile.mkdtemp(prefix="ovl-%s-" % h.label, dir=self.scratch)
                lines += ["/bin/mount -t tmpfs tmpfs %s" % q(scratch),
                          "/bin/mkdir %s/u %s/w" % (q(scratch), q(scratch)),
                          "/bin/mount -t overlay overlay -o lowerdir=%s,upperdir=%s/u,workdir=%s/w %s"
                          % (q(anc), q(scratch), q(scratch), q(anc))]
                overlaid.append(anc)
            if os.path.isdir(src):
                lines.append("/bin/mkdir -p %s" % q(dst))
            else:
                lines += ["/bin/mkdir -p %s" % q(os.path.dirname(dst)),
                          "[ -e %s ] || /usr/bin/touch %s" % (q(dst), q(dst))]
            lines.append("/bin/mount --bind %s %s" % (q(src), q(dst)))
            if ro:
                ro_list.append(dst)
        lines.append("/bin/mount --bind %s /etc/hosts" % q(h.hosts_file))
        if hostname:
            lines.append("/bin/hostname %s" % q(hostname))
        if readonly_root:
            ro_list = ["/"] + overlaid + ro_list
        lines += ["/bin/mount -o remount,bind,ro %s" % q(d) for d in ro_list]
        lines.append("cd %s" % q(workdir))
        return lines

    @staticmethod
    def _user(user):
        """setpriv's arguments for (uid, gid, [groups]) or None (stay root)."""
        if not user:
            return []
        uid, gid, groups = user
        g = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
        return ["/usr/bin/setpriv", "--reuid", str(uid), "--regid", str(gid)] + g + ["--"]

    def start(self, h, args, env=None, mounts=(), hostname=None, user=None, readonly_root=False,
              workdir="/", log=None):
        """args run in host h: its network namespace, a private mount and UTS namespace with
        mounts [(source, mount point, read-only)], the host's hosts file as /etc/hosts, host
        name `hostname`, user (uid, gid, groups) or root, args[0] looked up in env's PATH.
        The process is the returned Popen's pid (nothing forks on the way)."""
        script = "\n".join(self._setup(h, mounts, hostname, readonly_root, workdir) +
                           ['exec %s"$@"' % "".join(shlex.quote(a) + " " for a in self._user(user))])
        cmd = ["/usr/bin/nsenter", "--net=/run/netns/" + h.ns, "/usr/bin/unshare", "--mount", "--uts",
               "--propagation", "private", "/bin/sh", "-c", script, "sh"] + list(args)
        out = log if log is not None else subprocess.DEVNULL
        p = subprocess.Popen(cmd, env=env if env is not None else os.environ.copy(), stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p.host = h
        self.procs.append(p)
        return p

    def exec_in(self, pid, args, env=None, user=None, timeout=10):
        """args in the namespaces of process pid (network, mount, UTS) and its working
        folder, as `docker exec`, `kubectl exec` and an exec probe do: (exit status,
        output). A process that is gone: (None, why)."""
        if not os.path.exists("/proc/%d/ns/net" % pid):
            return None, "process %d is gone" % pid
        cmd = ["/usr/bin/nsenter", "--target", str(pid), "--net", "--mount", "--uts", "--wd"] + \
            self._user(user) + list(args)
        try:
            r = subprocess.run(cmd, env=env if env is not None else os.environ.copy(),
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "timed out after %s s" % timeout
        return r.returncode, r.stdout + r.stderr

    def run_in(self, h, args, timeout=10, **kw):
        """args in host h to completion (a fresh mount namespace): (exit status, output)."""
        log = tempfile.TemporaryFile(mode="w+")
        p = self.start(h, args, log=log, **kw)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        log.seek(0)
        return rc, log.read()

    def pids(self, h):
        r = sh("ip", "netns", "pids", h.ns, check=False)
        return [int(x) for x in r.stdout.split()]

    def kill_all(self, h, sig=signal.SIGKILL):
        """Every process in host h's network namespace (they are all this test's)."""
        for pid in self.pids(h):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.host is h and p.poll() is None and sig == signal.SIGKILL:
                p.wait()

    # ------------------------------------------------------------ the end

    def close(self):
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for h in self.hosts.values():
            self.unplug(h)
            shutil.rmtree(os.path.dirname(h.hosts_file), ignore_errors=True)
        sh("ip", "link", "del", self.bridge, check=False)
        deadline = time.time() + 5
        while any(p.poll() is None for p in self.procs) and time.time() < deadline:
            time.sleep(0.05)
