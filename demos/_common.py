"""Shared helpers of the server demos (demos/checkpoint_*.py) and benchmarks/servers.py.

- `Run`: one demo run. A temporary work directory, the processes it started (servers, load
  generators, ckpt) and the restored ones it adopted; `close()` kills and reaps every one of them
  and removes the directory, on every exit path (normal end, failed check, exception, SIGINT,
  SIGTERM, SIGHUP). The demo process makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so
  that a server restored by `ckpt restore` (its child, orphaned when ckpt exits) becomes our
  child: we can reap it, and kill it at the end.
- `Run.ckpt(...)`, `Run.dump(...)`, `Run.restore(...)`: ckpt through its command line
  (`python3 -m ckpt ...`), stdout and stderr captured to files (a restored process may inherit
  ckpt's stdout: never through a pipe, see README).
- `LatencyProbe`: a thread sending one request at a time, recording start time and latency of
  each; `window(a, b)` summarises the requests that overlapped [a, b].
- `Checks`: named pass/fail results, printed as they come; the demo's exit status is theirs.
- `table(...)`: a small aligned text table.
"""
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 120          # generous bound for anything to happen (the machine is small and shared)
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


class DemoError(Exception):
    """A step of the demo could not be done (a server did not start, ckpt failed, ...)."""


def log(*a):
    print(*a, flush=True)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what, timeout=WAIT, proc=None, interval=0.02):
    """Poll pred() until it returns something true (returned); DemoError after `timeout` seconds,
    or as soon as `proc` (a Popen) has exited."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:     # noqa: BLE001 - e.g. connection refused while starting
            last = e
        if proc is not None and proc.poll() is not None:
            raise DemoError("%s: the process exited (status %s) first" % (what, proc.returncode))
        if time.monotonic() > deadline:
            raise DemoError("%s: not within %ds%s" % (what, timeout, " (last error: %r)" % last if last else ""))
        time.sleep(interval)


def wait_connectable(port, what, proc=None, timeout=WAIT):
    def ok():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    wait_for(ok, what, timeout=timeout, proc=proc)


def _child_setup():
    # die with the demo even if it is SIGKILLed (set in the child; the demo starts children from
    # its main thread only, since the signal follows the thread that forked)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def children_of(pid):
    """PIDs whose parent is pid (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(name))
    return out


def alive(pid):
    """The PID exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def kill_and_reap(pid, timeout=WAIT):
    """SIGKILL pid and wait until it is gone (reaping it when it is our child)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return
        except ChildProcessError:
            if not os.path.exists("/proc/%d" % pid):
                return
        if time.monotonic() > deadline:
            log("warning: process %d did not go away" % pid)
            return
        time.sleep(0.01)


class Run:
    """One demo run: work directory and every process started or adopted (see module doc)."""

    def __init__(self, name, keep=False):
        self.name = name
        self.keep = keep
        self.workdir = tempfile.mkdtemp(prefix="ckpt-%s-" % name)
        self.popens = []          # (name, Popen)
        self.adopted = []         # PIDs of restored processes
        self.locked = []          # PIDs dumped with kill whose restore has not succeeded (network lock)
        self._old_handlers = {}
        self._closing = False
        if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self._closing:       # a second signal must not cut the cleanup short
            raise KeyboardInterrupt("signal %d" % signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, name):
        return os.path.join(self.workdir, name)

    # ------------------------------------------------------------------ processes
    def start(self, name, argv, cwd=None, new_session=True):
        """Start argv with stdin /dev/null and stdout+stderr to WORKDIR/NAME.log (one open file).
        Returns the Popen."""
        logf = open(self.path(name + ".log"), "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                 cwd=cwd or self.workdir, start_new_session=new_session,
                                 preexec_fn=_child_setup, close_fds=True)
        finally:
            logf.close()
        self.popens.append((name, p))
        return p

    def log_tail(self, name, n=5):
        try:
            with open(self.path(name + ".log"), "rb") as f:
                lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
        except OSError:
            return ""
        return " | ".join(x.strip() for x in lines[-n:] if x.strip())

    def stop(self, p, sig=signal.SIGKILL, timeout=WAIT):
        """Signal a started process (its whole process group when it has one of its own) and reap it."""
        if p.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        return p.returncode

    def adopt(self, pid):
        if pid not in self.adopted:
            self.adopted.append(pid)

    # ------------------------------------------------------------------ ckpt
    def ckpt(self, *args, tag="ckpt", timeout=600):
        """`python3 -m ckpt ARGS`, stdout/stderr to files. Returns (rc, stdout, stderr, seconds)."""
        out_path, err_path = self.path(tag + ".out"), self.path(tag + ".err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.monotonic()
            p = subprocess.Popen([sys.executable, "-m", "ckpt"] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err, cwd=self.workdir, close_fds=True)
        self.popens.append((tag, p))
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()           # ckpt releases the target on SIGTERM
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            raise DemoError("ckpt %s did not finish within %ds" % (" ".join(map(str, args)), timeout))
        secs = time.monotonic() - t0
        with open(out_path, errors="replace") as f:
            out_s = f.read()
        with open(err_path, errors="replace") as f:
            err_s = f.read()
        return rc, out_s, err_s, secs

    def dump(self, pid, image, *extra, tag="dump"):
        """`ckpt dump PID -o IMAGE --json EXTRA`; DemoError with ckpt's message on failure.
        Returns (result dict, seconds, t_start, t_end) in time.monotonic()."""
        kill = "--leave-running" not in extra
        t0 = time.monotonic()
        rc, out, err, secs = self.ckpt("dump", pid, "-o", image, "--json", *extra, tag=tag)
        t1 = time.monotonic()
        if rc != 0:
            raise DemoError("`ckpt dump %d -o %s %s` failed (exit %d): %s"
                            % (pid, os.path.basename(image), " ".join(extra), rc, err.strip() or out.strip()))
        if kill:
            self.locked.append(pid)
        return json.loads(out), secs, t0, t1

    def restore(self, image, tag="restore", extra=()):
        """`ckpt restore IMAGE --json --pidfile F [EXTRA]`. The restored process is adopted (killed
        at the end). Returns (result dict, seconds)."""
        pidfile = self.path(tag + ".pid")
        rc, out, err, secs = self.ckpt("restore", image, "--json", "--pidfile", pidfile, *extra, tag=tag)
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                self.adopt(int(f.read().strip()))
        if rc != 0:
            raise DemoError("`ckpt restore %s` failed (exit %d): %s" % (os.path.basename(image), rc,
                                                                       err.strip() or out.strip()))
        res = json.loads(out)
        self.adopt(res["pid"])
        if res["pid"] in self.locked:
            self.locked.remove(res["pid"])
        if err.strip():
            log("  ckpt restore said: %s" % err.strip())
        return res, secs

    # ------------------------------------------------------------------ the end
    def close(self):
        """Kill and reap everything this run started or adopted; lift a network lock left by a
        kill dump that was not restored; remove the work directory (unless keep)."""
        self._closing = True
        for pid in self.adopted:
            kill_and_reap(pid)
        for name, p in reversed(self.popens):
            if p.poll() is None:
                self.stop(p, signal.SIGTERM if name.startswith(("dump", "restore", "ckpt")) else signal.SIGKILL,
                          timeout=30)
        # anything else that became our child (a restored process whose pidfile we never read)
        for pid in children_of(os.getpid()):
            kill_and_reap(pid)
        for pid in self.locked:
            try:
                subprocess.run([sys.executable, "-m", "ckpt", "unlock", str(pid)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", timeout=WAIT)
            except (OSError, subprocess.TimeoutExpired) as e:
                log("warning: `ckpt unlock %d` failed: %s" % (pid, e))
        self.locked = []
        self.adopted = []
        self.popens = []
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            log("work directory kept: %s" % self.workdir)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}


# ---------------------------------------------------------------------- latency probe
class LatencyProbe(threading.Thread):
    """Sends one request at a time (`request()`, a blocking call) with a pause of `interval`
    seconds between requests; records (start, latency) of each, and (time, error) of each failure."""

    def __init__(self, request, interval=0.001, name="probe"):
        super().__init__(name=name, daemon=True)
        self.request = request
        self.interval = interval
        self.samples = []
        self.errors = []
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            t0 = time.monotonic()
            try:
                self.request()
            except Exception as e:     # noqa: BLE001 - every failure is recorded and reported
                self.errors.append((t0, "%s: %s" % (type(e).__name__, e)))
                self._stop_ev.wait(0.05)
                continue
            self.samples.append((t0, time.monotonic() - t0))
            if self.interval:
                self._stop_ev.wait(self.interval)

    def stop(self, timeout=WAIT):
        self._stop_ev.set()
        self.join(timeout)
        if self.is_alive():
            raise DemoError("the latency probe is stuck in a request for more than %ds" % timeout)

    def window(self, a, b):
        """Statistics of the requests whose [start, end] overlaps [a, b]: a dict with n, p50_ms,
        p99_ms, max_ms (None when no request), errors (failures that started in [a, b])."""
        lats = sorted(lat for t, lat in list(self.samples) if t <= b and t + lat >= a)
        errs = [e for t, e in list(self.errors) if a <= t <= b]
        return {"n": len(lats), "p50_ms": pct(lats, 50), "p99_ms": pct(lats, 99),
                "max_ms": lats[-1] * 1000 if lats else None, "errors": errs}


def pct(sorted_vals, p):
    """Nearest-rank percentile of sorted seconds, in ms."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k] * 1000


# ---------------------------------------------------------------------- checks and output
class Checks:
    def __init__(self):
        self.results = []

    def __call__(self, name, ok, detail=""):
        self.results.append((name, bool(ok), detail))
        log("  [%s] %s%s" % ("ok" if ok else "FAIL", name, (": " + detail) if detail else ""))
        return bool(ok)

    def failed(self):
        return [r for r in self.results if not r[1]]

    def summary(self):
        bad = self.failed()
        log("")
        if bad:
            log("%d of %d checks FAILED:" % (len(bad), len(self.results)))
            for name, _, detail in bad:
                log("  - %s%s" % (name, (": " + detail) if detail else ""))
        else:
            log("all %d checks passed" % len(self.results))
        return not bad


def fmt_ms(v, digits=1):
    return "-" if v is None else "%.*f" % (digits, v)


def table(headers, rows, title=None):
    """Print an aligned table; numbers (and '-') right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def right(s):
        return s == "-" or s.replace(".", "", 1).replace(",", "").replace("x", "").lstrip("-").isdigit()

    if title:
        log("")
        log(title)
    log("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    log("  " + "  ".join("-" * w for w in widths))
    for r in cells:
        log("  " + "  ".join(c.rjust(w) if (i and right(c)) else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))


def probe_row(label, st, extra=()):
    """A table row: label, requests, p50, p99, worst (ms), then extra cells."""
    return [label, st["n"], fmt_ms(st["p50_ms"], 2), fmt_ms(st["p99_ms"], 2), fmt_ms(st["max_ms"], 2)] + list(extra)


PROBE_HEADERS = ["phase", "requests", "p50 ms", "p99 ms", "worst ms"]


def live_dumps(run, pid, probe, checks, load, t0, rows, pause, server, title, extra_headers=()):
    """The two live dumps under load, each followed by `pause` seconds: first with --verify (its
    freeze includes re-reading all memory), then a plain one. Adds a probe row for each and one
    for after them to `rows` (the caller's rows since t0 come first), prints the table, and checks
    that the probe, the load generator and the server went on through them."""
    pad = ["-"] * len(extra_headers)
    last = t0
    try:
        for label, extra, tag in (("ckpt dump --leave-running --verify", ("--verify",), "dump-verify"),
                                  ("ckpt dump --leave-running", (), "dump-live")):
            img = run.path(tag + ".img")
            res, secs, d0, last = run.dump(pid, img, "--leave-running", *extra, tag=tag)
            rows.append(probe_row(label, probe.window(d0, last), [fmt_ms(res["freeze_ms"], 2)] + pad))
            ok = res.get("left_running") is True and (res.get("verified") is True or not extra)
            checks("live dump" + (" with --verify" if extra else ""), ok,
                   "freeze %.2f ms, %s threads, rounds %s, image %.0f MiB, %.2f s"
                   % (res["freeze_ms"], res.get("threads"), res["rounds"], res["image_bytes"] / 2**20, secs))
            os.unlink(img)
            time.sleep(pause)
        rows.append(probe_row("after the dumps", probe.window(last, time.monotonic()), ["-"] + pad))
    finally:
        table(PROBE_HEADERS + ["freeze ms"] + list(extra_headers), rows,
              title=title + "; the --verify dump's freeze includes re-reading all memory")
    errs = probe.window(t0, time.monotonic())["errors"]
    checks("probe served through the live dumps", not errs, "; ".join(errs[:3]))
    checks("load generator still running after the live dumps", load.poll() is None,
           run.log_tail("load") if load.poll() is not None else "")
    checks("%s still running after the live dumps" % server, alive(pid))


def main_wrapper(body):
    """Run body() -> bool (all checks passed); exit 0/1. A DemoError or an interruption exits 1
    with a one-line message (cleanup is the body's `with Run(...)`)."""
    try:
        ok = body()
    except DemoError as e:
        log("")
        log("FAILED: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt as e:
        log("")
        log("interrupted (%s)" % (e or "SIGINT"))
        sys.exit(130)
    sys.exit(0 if ok else 1)
