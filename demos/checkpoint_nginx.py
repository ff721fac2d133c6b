#!/usr/bin/env python3
"""Checkpoint a live nginx (a master and its workers, one process tree) under load, then kill it,
restore it and check that the same processes serve the same files on the same port.

nginx is Debian's package (`apt-get install nginx`; its system service is not used). The demo
writes its own configuration in its work directory: `daemon off`, `master_process on`,
`worker_processes 2` (--workers), listening on 127.0.0.1 (a free port), pid file, logs and
temporary paths in the work directory, a few static files of known content (sha256 kept), the
worker's PID in an `X-Worker` header, and `stub_status` on /status: its counters live in a
MAP_SHARED anonymous mapping the master creates before forking its workers, written by every
worker.

Steps:
  1. start nginx; wait until the master has its workers and they serve every file
  2. latency under load: wrk (--latency) for a window without a dump, then over
     `ckpt dump MASTER --leave-running --verify` and over a plain live dump; a probe (one GET at a
     time on one keep-alive connection) beside it. Reported: wrk's worst latency and errors, the
     probe's worst request in the dump's window, the dump's freeze
  3. kill + restore, wrk still running: `ckpt dump MASTER` (kills the tree), the master and
     workers are gone and nothing listens on the port; `ckpt restore IMAGE`; then the master and
     every worker are back with their PIDs (parent, process group, session, user), every file is
     served with its content, the probe's keep-alive connection and a request half sent before
     the dump are served, the stub_status counters went on (one shared counter, not one per
     worker), wrk saw no error, and a new wrk run sees none
  4. nginx's own control over the restored tree: `nginx -s reload` (the restored master starts
     new workers and reaps the restored ones), then `nginx -s quit` (the master exits 0 after its
     workers); the access log holds the requests logged before the dump and after the restore,
     the error log no alert

usage: python3 demos/checkpoint_nginx.py [--workers 2] [--connections 8] [--phase-seconds 3] [--keep]
Exits 0 when every check passed, 1 otherwise.
"""
import argparse
import collections
import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (WAIT, Checks, DemoError, LatencyProbe, Run, alive, children_of,  # noqa: E402
                     fmt_ms, free_port, log, main_wrapper, table, wait_for)

CONF = """\
daemon off;
master_process on;
worker_processes %(workers)d;
pid %(work)s/nginx.pid;
error_log %(work)s/error.log notice;

events {
    worker_connections 1024;
}

http {
    types {
        text/plain txt;
        text/html html;
        application/octet-stream bin;
    }
    default_type application/octet-stream;
    # log lines wait in each worker's memory (buffer) and reach the file later
    access_log %(work)s/access.log combined buffer=32k flush=1s;
    client_body_temp_path %(work)s/tmp/body;
    proxy_temp_path %(work)s/tmp/proxy;
    fastcgi_temp_path %(work)s/tmp/fastcgi;
    uwsgi_temp_path %(work)s/tmp/uwsgi;
    scgi_temp_path %(work)s/tmp/scgi;
    sendfile on;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;

    server {
        listen 127.0.0.1:%(port)d;
        root %(work)s/html;
        add_header X-Worker $pid always;
        location = /status {
            stub_status;
        }
    }
}
"""

WRK_SCRIPT = """
local paths = {%(paths)s}
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""

SMALL = b"served by nginx, checkpointed by ckpt\n"


def make_files(html, big):
    """The static files: name -> (bytes, sha256). Random content from a fixed seed."""
    rnd = random.Random(8)
    files = {
        "index.html": b"<!doctype html><title>ckpt</title><p>nginx, restored.</p>\n",
        "small.txt": SMALL,
        "random-64k.bin": rnd.randbytes(64 * 1024),
        "random-big.bin": rnd.randbytes(big),
    }
    os.makedirs(html, mode=0o755)
    out = {}
    for name, data in files.items():
        p = os.path.join(html, name)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o644)
        out[name] = (data, hashlib.sha256(data).hexdigest())
    return out


# ---------------------------------------------------------------------- HTTP
class Conn:
    """One keep-alive HTTP connection that is never reopened behind our back (auto_open off)."""

    def __init__(self, port, timeout=WAIT):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.c.connect()
        self.c.auto_open = 0
        self.sock = self.c.sock

    def get(self, path):
        self.c.request("GET", path)
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise DemoError("GET %s: HTTP %d %r" % (path, r.status, data[:80]))
        return data, r

    def same_socket(self):
        return self.c.sock is self.sock and self.sock is not None

    def close(self):
        self.c.close()


FRESH = 20     # seconds for a new connection's request: nginx answers at once, a lock or a dead listener never


def get(port, path, timeout=FRESH):
    """GET path on a new connection: (body, the answering worker's PID); DemoError on failure."""
    try:
        c = Conn(port, timeout=timeout)
    except OSError as e:
        raise DemoError("GET %s on 127.0.0.1:%d: connect: %s" % (path, port, e or type(e).__name__)) from None
    try:
        data, r = c.get(path)
        return data, int(r.getheader("X-Worker") or 0)
    except OSError as e:
        raise DemoError("GET %s on 127.0.0.1:%d: %s: %s" % (path, port, type(e).__name__, e)) from None
    finally:
        c.close()


def stub_status(text):
    """stub_status's page -> dict active, accepts, handled, requests."""
    m = re.search(rb"Active connections:\s*(\d+)\s+server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", text)
    if not m:
        raise DemoError("unexpected /status page: %r" % text[:200])
    return dict(zip(("active", "accepts", "handled", "requests"), map(int, m.groups())))


def check_files(port, files):
    """GET every file on a fresh connection: list of (name, ok, detail)."""
    out = []
    for name, (data, digest) in sorted(files.items()):
        try:
            got, worker = get(port, "/" + name)
        except DemoError as e:
            out.append((name, False, str(e)))
            continue
        h = hashlib.sha256(got).hexdigest()
        out.append((name, h == digest, "%d bytes, sha256 %s... (worker %d)" % (len(got), h[:12], worker)))
    return out


def shared_counter(port, conns=12, rounds=3):
    """`conns` connections opened at once (the workers share them out), then /status asked on
    each in turn, `rounds` times: the stub_status request counter lives in memory every worker
    writes, so it must grow with every request whichever worker answers. Returns (grows, served
    by worker -> requests, first counter, last counter)."""
    cs, seq = [], []
    try:
        for _ in range(conns):
            cs.append(Conn(port, timeout=FRESH))
        for _ in range(rounds):
            for c in cs:
                data, r = c.get("/status")
                seq.append((int(r.getheader("X-Worker") or 0), stub_status(data)["requests"]))
    except OSError as e:
        raise DemoError("GET /status on 127.0.0.1:%d: %s: %s" % (port, type(e).__name__, e)) from None
    finally:
        for c in cs:
            c.close()
    grows = all(b[1] > a[1] for a, b in zip(seq, seq[1:]))
    return grows, collections.Counter(w for w, _ in seq), seq[0][1], seq[-1][1]


def port_has_listener(port):
    """Whether something listens on 127.0.0.1:port (a bind with SO_REUSEADDR fails only then).
    Nothing is sent: the network lock of a kill dump drops packets to the port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        s.close()


# ---------------------------------------------------------------------- processes
def proc_ids(pid):
    """(ppid, pgrp, session, real uid, cmdline) of a process, None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/%d/status" % pid) as f:
            uid = int(re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1))
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, AttributeError):
        return None
    return int(fields[1]), int(fields[2]), int(fields[3]), uid, cmd


def lock_tables(pids):
    """ckpt's network lock tables (nftables `inet ckpt_lock_PID`) present for these PIDs; None
    when nft is not there to ask."""
    if not shutil.which("nft"):
        return None
    p = subprocess.run(["nft", "list", "tables"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=WAIT)
    if p.returncode != 0:
        return None
    names = set(re.findall(r"^table inet (ckpt_lock_\d+)$", p.stdout, re.M))
    return sorted(n for n in names if int(n.rsplit("_", 1)[1]) in pids)


def holders(link, pids):
    """(pid, fd) of these processes whose fd is `link` (e.g. socket:[123])."""
    out = []
    for pid in pids:
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                try:
                    if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == link:
                        out.append((pid, int(fd)))
                except OSError:
                    pass
        except OSError:
            pass
    return sorted(out)


def explain(msg, master, workers):
    """What nginx holds in the fd a ckpt refusal names (`process P: fd N is ...`), when the
    processes still run: which processes of the tree hold it too."""
    m = re.search(r"process (\d+): fd (\d+) ", msg)
    if not m:
        return ""
    pid, fd = int(m.group(1)), int(m.group(2))
    try:
        link = os.readlink("/proc/%d/fd/%d" % (pid, fd))
    except OSError:
        return ""
    held = holders(link, [master] + workers)
    role = "the master" if pid == master else "worker %d" % pid
    text = "\n  (fd %d of %s is %s, held by %s" % (fd, role, link, ", ".join("%d fd %d" % h for h in held))
    if link.startswith("socket:") and any(h[0] == master for h in held) and any(h[0] != master for h in held):
        text += ": one of nginx's channels, the unix socketpairs the master makes before forking each worker " \
                "and passes to the other workers with SCM_RIGHTS; both ends are held inside the tree"
    return text + ")"


def workers_of(master):
    return sorted(p for p in children_of(master)
                  if (proc_ids(p) or (0, 0, 0, 0, ""))[4].startswith("nginx: worker process"))


def reap_gone(pid, timeout=WAIT):
    """Wait until pid has exited and is gone, reaping it once it is our child (a worker whose
    master died is reparented to us, the demo being a child subreaper). True when gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return True
        except ChildProcessError:
            if not os.path.exists("/proc/%d" % pid):
                return True
        time.sleep(0.01)
    return False


class Nginx:
    def __init__(self, run, port, workers, big):
        self.run = run
        self.port = port
        self.nworkers = workers
        self.work = run.workdir
        # the workers run as nginx's default user (nobody): they must reach the files
        os.chmod(self.work, 0o711)
        os.makedirs(run.path("tmp"), mode=0o755)
        self.files = make_files(run.path("html"), big)
        self.conf = run.path("nginx.conf")
        with open(self.conf, "w") as f:
            f.write(CONF % {"workers": workers, "work": self.work, "port": port})
        self.proc = None
        self.master = None
        self.workers = []

    def argv(self, *extra):
        return ["nginx", "-p", self.work + "/", "-c", self.conf, "-e", self.run.path("error.log")] + list(extra)

    def start(self):
        if not shutil.which("nginx"):
            raise DemoError("nginx is not installed (apt-get install nginx)")
        p = subprocess.run(self.argv("-t"), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
        if p.returncode != 0:
            raise DemoError("nginx -t refused the configuration: %s" % (p.stderr.strip() or p.stdout.strip()))
        self.proc = self.run.start("nginx", self.argv())
        self.master = self.proc.pid
        self.workers = wait_for(lambda: len(workers_of(self.master)) == self.nworkers and workers_of(self.master),
                                "nginx's %d workers to start" % self.nworkers, proc=self.proc)
        wait_for(lambda: get(self.port, "/small.txt")[0] == SMALL, "nginx to serve on port %d" % self.port,
                 proc=self.proc)
        return self

    def ctl(self, signame):
        """`nginx -s SIGNAME` (reads the pid file, signals the master)."""
        p = subprocess.run(self.argv("-s", signame), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=WAIT)
        if p.returncode != 0:
            raise DemoError("nginx -s %s failed: %s" % (signame, p.stderr.strip() or p.stdout.strip()))

    def tree(self):
        return {pid: proc_ids(pid) for pid in [self.master] + self.workers}


# ---------------------------------------------------------------------- wrk
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value, unit):
    return float(value) * _UNITS[unit]


def parse_wrk(text):
    """wrk's summary (with --latency) -> dict requests, p50_ms, p99_ms, max_ms, errors (socket
    errors + non-2xx/3xx), error_text; None when there is no summary."""
    m = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)", text, re.M)
    n = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not m or not n:
        return None
    out = {"requests": int(n.group(1)), "max_ms": _ms(m.group(5), m.group(6)), "p50_ms": None, "p99_ms": None}
    for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)", text, re.M):
        out["p%s_ms" % p] = _ms(v, u)
    errs, parts = 0, []
    s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if s:
        errs += sum(map(int, s.groups()))
        parts.append(s.group(0))
    b = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if b:
        errs += int(b.group(1))
        parts.append(b.group(0))
    out["errors"] = errs
    out["error_text"] = "; ".join(parts)
    return out


class Wrk:
    def __init__(self, run, port, connections, paths):
        self.run = run
        self.port = port
        self.connections = connections
        self.script = run.path("paths.lua")
        with open(self.script, "w") as f:
            f.write(WRK_SCRIPT % {"paths": ", ".join('"/%s"' % p for p in paths)})
        self.wrk = shutil.which("wrk")
        if not self.wrk:
            raise DemoError("wrk is not installed (apt-get install wrk)")

    def start(self, tag, seconds=3600):
        """wrk -t1 -c N --latency for `seconds` (stopped earlier with stop())."""
        argv = [self.wrk, "-t", "1", "-c", str(self.connections), "-d", "%ds" % max(1, round(seconds)),
                "--timeout", "60s", "--latency", "-s", self.script, "http://127.0.0.1:%d/" % self.port]
        return self.run.start(tag, argv)

    def result(self, tag, p):
        """Stop wrk (SIGINT: it prints its summary) unless it has finished; its parsed summary."""
        if p.poll() is None:
            self.run.stop(p, signal.SIGINT)
        with open(self.run.path(tag + ".log"), errors="replace") as f:
            text = f.read()
        res = parse_wrk(text)
        if res is None:
            raise DemoError("wrk (%s) printed no summary (exit %s): %s" % (tag, p.returncode, self.run.log_tail(tag)))
        return res


def dumped_pids(res):
    """The PIDs a dump took, from its --json result: every process of the tree ("processes"),
    or the one process of a dump without tree support."""
    procs = res.get("processes")
    if isinstance(procs, list):
        return sorted(int(p["pid"] if isinstance(p, dict) else p) for p in procs)
    return [int(res["pid"])]


# ---------------------------------------------------------------------- the demo
def run_demo(args):
    checks = Checks()
    with Run("nginx", keep=args.keep) as run:
        port = free_port()
        ngx = Nginx(run, port, args.workers, args.big_file_kib * 1024).start()
        m, ws = ngx.master, ngx.workers
        log("nginx master %d workers %s on 127.0.0.1:%d (work directory %s)"
            % (m, " ".join(map(str, ws)), port, run.workdir))
        before = ngx.tree()
        log("  %s" % "; ".join("%d: %s (user %d)" % (p, v[4], v[3]) for p, v in before.items()))
        for name, ok, detail in check_files(port, ngx.files):
            checks("serves %s" % name, ok, detail)
        grows, served, _, _ = shared_counter(port)
        checks("stub_status counter shared by the workers", grows and len(served) >= 1,
               "answered by %s" % ", ".join("worker %d (%d)" % kv for kv in sorted(served.items())))

        probe_conn = Conn(port)

        def request():
            data, _ = probe_conn.get("/small.txt")
            if data != SMALL:
                raise DemoError("probe: wrong body %r" % data[:60])
        probe = LatencyProbe(request, interval=args.probe_interval)
        probe.start()
        wrk = Wrk(run, port, args.connections, ["small.txt", "index.html", "random-64k.bin"])
        log("load: wrk (-t 1 -c %d --latency, GET of 3 files in turn), probe: one GET at a time every %.1f ms"
            % (args.connections, args.probe_interval * 1000))

        # ---- latency under load: no dump, then two live dumps of the whole tree
        rows = []
        t_start = time.monotonic()
        p = wrk.start("load-only", args.phase_seconds)
        log("load: wrk %d" % p.pid)
        p.wait(timeout=args.phase_seconds + WAIT)
        r = wrk.result("load-only", p)
        rows.append(["load only", r["requests"], fmt_ms(r["p50_ms"], 2), fmt_ms(r["p99_ms"], 2),
                     fmt_ms(r["max_ms"], 1), r["errors"], "-", "-"])
        checks("wrk without a dump: no error", r["errors"] == 0, r["error_text"])
        try:
            for label, extra, tag in (("ckpt dump --leave-running --verify", ("--verify",), "dump-verify"),
                                      ("ckpt dump --leave-running", (), "dump-live")):
                p = wrk.start("load-" + tag)
                log("load: wrk %d" % p.pid)
                time.sleep(args.phase_seconds / 2)
                img = run.path(tag + ".img")
                try:
                    res, secs, d0, d1 = run.dump(m, img, "--leave-running", *extra, tag=tag)
                except DemoError as e:
                    raise DemoError("live dump of the nginx tree (master %d, workers %s): %s%s"
                                    % (m, " ".join(map(str, ws)), e, explain(str(e), m, ws))) from None
                time.sleep(args.phase_seconds / 2)
                r = wrk.result("load-" + tag, p)
                pr = probe.window(d0, d1)
                rows.append([label, r["requests"], fmt_ms(r["p50_ms"], 2), fmt_ms(r["p99_ms"], 2),
                             fmt_ms(r["max_ms"], 1), r["errors"], fmt_ms(pr["max_ms"], 1),
                             fmt_ms(res["freeze_ms"], 2)])
                in_image = dumped_pids(res)
                checks("%s: the dump took the master and its %d workers" % (label, len(ws)),
                       in_image == sorted([m] + ws),
                       "processes %s%s" % (" ".join(map(str, in_image)),
                                             "" if set(ws) <= set(in_image)
                                             else " (ckpt dumped the master alone: workers %s left out)"
                                             % " ".join(str(w) for w in ws if w not in in_image)))
                ok = res.get("left_running") is True and (res.get("verified") is True or not extra)
                checks(label, ok, "freeze %.2f ms, %s threads, rounds %s, image %.0f KiB, %.2f s"
                       % (res["freeze_ms"], res.get("threads"), res.get("rounds"), res["image_bytes"] / 1024, secs))
                checks("%s: wrk saw no error" % label, r["errors"] == 0, r["error_text"])
                os.unlink(img)
        finally:
            table(["phase", "wrk requests", "p50 ms", "p99 ms", "worst ms", "errors", "probe worst ms",
                   "freeze ms"], rows,
                  title="nginx under wrk -c %d (master + %d workers): clients' latency over each window; "
                        "the probe's worst request in the dump's own window" % (args.connections, len(ws)))
        errs = probe.window(t_start, time.monotonic())["errors"]
        checks("probe served through the live dumps", not errs, "; ".join(errs[:3]))
        checks("master and workers still running after the live dumps, same PIDs",
               alive(m) and all(alive(w) for w in ws) and workers_of(m) == ws,
               "master %d, workers %s" % (m, " ".join(map(str, workers_of(m)))))

        # ---- kill + restore, wrk running
        st0 = stub_status(get(port, "/status")[0])
        get(port, "/small.txt?logged-before-the-kill-dump")
        half = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        half.sendall(b"GET /small.txt?half-sent HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # the blank line after the restore
        p = wrk.start("load-kill")
        log("load: wrk %d" % p.pid)
        time.sleep(args.phase_seconds / 2)
        log("")
        log("before the kill dump: stub_status requests %d; a request half sent; wrk and the probe running" % st0["requests"])
        img = run.path("final.img")
        k0 = time.monotonic()
        try:
            res_k, secs_k, _, _ = run.dump(m, img, tag="dump-kill")
        except DemoError as e:
            raise DemoError("kill dump of the nginx tree (master %d, workers %s): %s%s"
                            % (m, " ".join(map(str, ws)), e, explain(str(e), m, ws))) from None
        for w in ws:      # a lock per process of the tree: lifted at the end if a restore does not
            if w not in run.locked:
                run.locked.append(w)
        rc = ngx.proc.wait(timeout=WAIT)      # the master, our child: reap it (frees its PID)
        gone = [w for w in ws if reap_gone(w)]
        checks("kill dump done: master and workers killed by it", rc == -9 and gone == ws,
               "freeze %.2f ms, %s threads, image %.0f KiB, %.2f s; master exit status %s, workers gone: %s"
               % (res_k["freeze_ms"], res_k.get("threads"), res_k["image_bytes"] / 1024, secs_k, rc,
                  " ".join(map(str, gone)) or "none"))
        checks("nothing listens on port %d after the kill" % port, not port_has_listener(port))
        in_image = dumped_pids(res_k)
        checks("kill dump took the master and its %d workers" % len(ws), in_image == sorted([m] + ws),
               "processes %s" % " ".join(map(str, in_image)))
        res_r, secs_r = run.restore(img)
        k1 = time.monotonic()
        if m not in run.locked:
            run.locked.append(m)       # every process's lock, until seen lifted
        for w in workers_of(m):
            run.adopt(w)
        after = ngx.tree()
        log("restored: master %d workers %s" % (res_r["pid"], " ".join(map(str, workers_of(m)))))
        checks("restored with the same PIDs", res_r["pid"] == m and alive(m) and workers_of(m) == ws,
               "master %d (pid in --json %s), workers %s; %s pages written in %s ms (ckpt restore ran %.2f s)"
               % (m, res_r["pid"], " ".join(map(str, workers_of(m))), res_r.get("pages_written"),
                  fmt_ms(res_r.get("restore_ms"), 1), secs_r))
        for pid in [m] + ws:
            b, a = before[pid], after.get(pid)
            # the master's parent was the demo; restored, ckpt restore's (then ours: we reap orphans)
            same = a is not None and a[1:] == b[1:] and (pid == m or a[0] == b[0])
            checks("process %d: same parent, process group, session, user, command" % pid, same,
                   "before (ppid, pgrp, sid, uid) %s, after %s" % (b[:4], a[:4] if a else "gone"))

        left = lock_tables([m] + ws)
        if left is not None:
            checks("the restore lifted the network lock of every process", not left,
                   "left in nftables: %s (new connections to port %d and the connections these processes "
                   "hold stay dropped); lifted now by the demo (`ckpt unlock`) to check the rest"
                   % (", ".join(left), port) if left else "")
            for name in left:
                rc, out, err, _ = run.ckpt("unlock", name.rsplit("_", 1)[1], tag="unlock")
                if rc != 0:
                    raise DemoError("`ckpt unlock` of %s failed: %s" % (name, err.strip() or out.strip()))
            run.locked = [x for x in run.locked if x not in [m] + ws]

        try:
            half.settimeout(FRESH)
            half.sendall(b"\r\n")
            resp = http.client.HTTPResponse(half)
            resp.begin()
            body = resp.read()
            checks("request half sent before the dump completes after the restore",
                   resp.status == 200 and body == SMALL,
                   "HTTP %d from worker %s, %r" % (resp.status, resp.getheader("X-Worker"), body[:40]))
        except (OSError, http.client.HTTPException) as e:
            checks("request half sent before the dump completes after the restore", False,
                   "%s: %s" % (type(e).__name__, e))
        half.close()
        for name, ok, detail in check_files(port, ngx.files):
            checks("serves %s after the restore" % name, ok, detail)
        grows, served, first, _ = shared_counter(port)
        checks("stub_status counter went on and is shared by the restored workers",
               grows and first > st0["requests"],
               "%d before the dump, %d after; answered by %s" % (st0["requests"], first,
                                                                 ", ".join("worker %d (%d)" % kv
                                                                           for kv in sorted(served.items()))))
        get(port, "/small.txt?logged-after-the-restore")
        time.sleep(1.0)
        r_kill = wrk.result("load-kill", p)
        checks("wrk running through the kill and restore: no error", r_kill["errors"] == 0 and r_kill["requests"] > 0,
               "%d requests, worst %s ms%s" % (r_kill["requests"], fmt_ms(r_kill["max_ms"], 0),
                                               ("; " + r_kill["error_text"]) if r_kill["error_text"] else ""))
        probe.stop()
        outage = probe.window(k0, k1)
        errs = probe.window(t_start, time.monotonic())["errors"]
        checks("probe never failed and kept its connection", not errs and probe_conn.same_socket(),
               "; ".join(errs[:3]))
        probe_conn.close()
        p = wrk.start("load-final", max(1, args.phase_seconds))
        log("load: wrk %d" % p.pid)
        p.wait(timeout=args.phase_seconds + WAIT)
        r_final = wrk.result("load-final", p)
        checks("new wrk run on the restored nginx: no error", r_final["errors"] == 0 and r_final["requests"] > 0,
               "%d requests, worst %s ms%s" % (r_final["requests"], fmt_ms(r_final["max_ms"], 1),
                                               ("; " + r_final["error_text"]) if r_final["error_text"] else ""))
        table(["step", "freeze ms", "ckpt s", "restore ms", "wrk worst ms", "wrk errors", "probe worst ms"], [
            ["ckpt dump (kill)", fmt_ms(res_k["freeze_ms"], 2), "%.2f" % secs_k, "-", "-", "-", "-"],
            ["ckpt restore", "-", "%.2f" % secs_r, fmt_ms(res_r.get("restore_ms"), 1), "-", "-", "-"],
            ["clients' view: dump + restore", "-", "%.2f" % (k1 - k0), "-", fmt_ms(r_kill["max_ms"], 0),
             r_kill["errors"], fmt_ms(outage["max_ms"], 0)],
            ["new wrk run after the restore", "-", "-", "-", fmt_ms(r_final["max_ms"], 1), r_final["errors"], "-"],
        ], title="Kill + restore of master %d and workers %s on 127.0.0.1:%d (image %.0f KiB; the worst "
                 "requests span the gap, plus TCP retransmission backoff)"
                 % (m, " ".join(map(str, ws)), port, res_k["image_bytes"] / 1024))

        # ---- nginx's own control of the restored tree
        log("")
        err_size = os.path.getsize(run.path("error.log"))
        ngx.ctl("reload")
        new = wait_for(lambda: (lambda cur: len(cur) == len(ws) and not set(cur) & set(ws) and cur)(workers_of(m)),
                       "the restored master to start new workers after `nginx -s reload`")
        old_gone = wait_for(lambda: all(not os.path.exists("/proc/%d" % w) for w in ws) or None,
                            "the restored workers to exit and be reaped by the restored master")
        checks("nginx -s reload: new workers, the restored ones exited and were reaped by the restored master",
               old_gone and alive(m), "workers %s -> %s" % (" ".join(map(str, ws)), " ".join(map(str, new))))
        run.adopted = [x for x in run.adopted if alive(x)]
        for w in new:
            run.adopt(w)
        for name, ok, detail in check_files(port, ngx.files):
            checks("serves %s after the reload" % name, ok, detail)
        ngx.ctl("quit")
        status = None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                got, st = os.waitpid(m, os.WNOHANG)
            except ChildProcessError:      # not (yet) ours: ckpt restore's child until it exits
                got, st = 0, None
            if got == m:
                status = os.waitstatus_to_exitcode(st)
                break
            time.sleep(0.02)
        checks("nginx -s quit: the restored master exits 0 after its workers",
               status == 0 and not any(os.path.exists("/proc/%d" % w) for w in new),
               "exit status %s" % status)
        # forget what has exited (a PID used again later must not be killed at the end)
        run.adopted = [x for x in run.adopted if x != m and alive(x)]
        with open(run.path("access.log"), errors="replace") as f:
            access = f.read()
        checks("access log holds the lines logged before the dump and after the restore",
               "logged-before-the-kill-dump" in access and "logged-after-the-restore" in access,
               "%d lines" % access.count("\n"))
        with open(run.path("error.log"), errors="replace") as f:
            errlog = f.read()
        bad = [x for x in errlog.splitlines() if re.search(r"\[(alert|crit|emerg)\]", x)]
        checks("error log: no alert, crit or emerg", not bad, " | ".join(bad[:3]))
        log("  error log since the restore: %s"
            % " | ".join(x.split("] ", 1)[-1] for x in errlog[err_size:].splitlines()[-4:]))
    return checks.summary()


def main():
    ap = argparse.ArgumentParser(description="Checkpoint a live nginx (master + workers) under load, kill, "
                                             "restore, check.")
    ap.add_argument("--workers", type=int, default=2, help="nginx worker processes")
    ap.add_argument("--connections", type=int, default=8, help="wrk connections")
    ap.add_argument("--phase-seconds", type=float, default=3.0, help="wrk window around each dump")
    ap.add_argument("--probe-interval", type=float, default=0.001, help="pause between probe requests (s)")
    ap.add_argument("--big-file-kib", type=int, default=1024, help="size of the largest static file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, images)")
    args = ap.parse_args()
    main_wrapper(lambda: run_demo(args))


if __name__ == "__main__":
    main()
