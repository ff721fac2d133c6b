"""`ckpt demo`: dump a built-in target that writes memory hard, live and stop-the-world side by
side, then kill it, restore it and check it.

Steps (each a method of Demo, run in this order by run_demo):
  build       compile the writer target (ckpt/data/writer.c, which tests/targets/writer.c links to)
  start       run it: THREADS threads stamping pages of a SIZE buffer at RATE pages/s each;
              every page is stamped once before it prints "ready PID"
  dump_live   a live dump with --verify --leave-running: the image is compared, page by page,
              with the process memory at the freeze instant (the verification runs while the
              target is still frozen, so this dump's freeze window includes it)
  time_live   a second live dump without verification: the freeze window as a user sees it
  dump_stw    a stop-the-world dump (--mode stop-the-world --leave-running): the baseline
  compare     both freeze windows side by side, and the ratio
  self_check  SIGUSR1: the target checks every page it owns and prints "ok N"
  restore     a final verified dump that kills the target, then `ckpt restore` of it: the
              restored process (same PID) checks every page and must print "ok N" too
  cleanup     always: kill the target, delete the images and the build
"""
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ckpt.errors import CkptError

PAGE = 4096
# 2 threads at 50,000 pages/s each: about 100,000 distinct 4 KiB page writes per second in total
DEMO_THREADS = 2
DEMO_RATE = 50000


def _writer_source_path():
    """The writer target's C source, shipped with the package (tests/targets/writer.c links to it)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "writer.c")



class _Target:
    """The running writer: a child of this process, killed with us (PR_SET_PDEATHSIG)."""

    def __init__(self, exe, size_mb, threads, rate):
        def child():
            try:
                import ctypes
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)
            except (OSError, AttributeError):
                pass
        self.proc = subprocess.Popen([exe, str(size_mb), str(threads), str(rate)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, preexec_fn=child)
        self.pid = self.proc.pid
        self._buf = b""

    @classmethod
    def attach(cls, proc, pid):
        """A process that is not our child (a restored one), reading the pipe `proc` writes to."""
        t = cls.__new__(cls)
        t.proc, t.pid, t._buf, t.foreign = proc, pid, b"", True
        return t

    def read_line(self, timeout):
        """The next line the target prints, or None after `timeout` seconds or at its exit."""
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def alive(self):
        # not waitpid: the dumps trace this child, and its ptrace-stops are theirs to collect
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if getattr(self, "foreign", False):
            end = time.monotonic() + 10
            while os.path.exists("/proc/%d" % self.pid) and time.monotonic() < end:
                time.sleep(0.01)
        self.proc.wait()
        self.proc.stdout.close()


class Demo:
    def __init__(self, size_mb=256, workdir=None, echo=print, threads=DEMO_THREADS, rate=DEMO_RATE):
        if size_mb < 1:
            raise CkptError("the demo target needs at least 1 MiB (--size-mb)")
        self.size_mb, self.threads, self.rate = size_mb, threads, rate
        self.echo = echo
        self.workdir = workdir
        self.build_dir = None
        self.image_dir = None
        self.images = []
        self.target = None
        self.exe = None
        self.results = {}     # step -> dump result
        self.failures = []    # what did not check out

    # ------------------------------------------------------------------ helpers
    def fail(self, what):
        self.failures.append(what)
        self.echo("  FAILED: %s" % what)

    def image(self, name):
        path = os.path.join(self.image_dir, "%s-%d.img" % (name, self.target.pid))
        self.images.append(path)
        return path

    def _dump(self, name, **kw):
        from ckpt.dump.session import DumpOptions, dump
        opts = DumpOptions(output=self.image(name), leave_running=True, **kw)
        res = dump(self.target.pid, opts)
        self.results[name] = res
        if not self.target.alive():
            self.fail("the target did not survive the %s dump" % name)
        return res

    # ------------------------------------------------------------------ steps
    def build(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise CkptError("the demo needs a C compiler (cc or gcc) to build its target")
        self.build_dir = tempfile.mkdtemp(prefix="ckpt-demo-build-")
        src = _writer_source_path()
        self.exe = os.path.join(self.build_dir, "writer")
        p = subprocess.run([cc, "-O2", "-pthread", "-o", self.exe, src], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise CkptError("cannot build the demo target from %s: %s" % (src, p.stdout.decode(errors="replace")))
        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
            self.image_dir = tempfile.mkdtemp(prefix="ckpt-demo-", dir=self.workdir)
        else:
            self.image_dir = tempfile.mkdtemp(prefix="ckpt-demo-")

    def start(self):
        self.echo("target: %d MiB, %d threads writing %s pages/s each (%s in total)"
                  % (self.size_mb, self.threads, format(self.rate, ","), format(self.rate * self.threads, ",")))
        self.target = _Target(self.exe, self.size_mb, self.threads, self.rate)
        line = self.target.read_line(timeout=60 + self.size_mb / 32)
        if not line or not line.startswith("ready"):
            raise CkptError("the demo target did not start (it printed %r)" % line)
        self.echo("  process %d ready, every page stamped" % self.target.pid)
        time.sleep(0.5)   # let the writers run before the first dump

    def dump_live(self):
        self.echo("live dump, verified (--verify --leave-running) ...")
        r = self._dump("live-verified", verify=True)
        self.echo("  %s mode, rounds (pages) %s, %d pages verified equal to the frozen process"
                  % (r["mode"], r["rounds"], r.get("pages_verified", 0)))
        self.echo("  freeze %.2f ms, verification while frozen included" % r["freeze_ms"])
        if not r.get("verified") or not r.get("pages_verified"):
            self.fail("the live image was not verified")
        if r["mode"] == "stop-the-world":
            self.echo("  note: this kernel offers no write tracking, so 'live' is stop-the-world here")

    def time_live(self):
        self.echo("live dump (--leave-running) ...")
        r = self._dump("live")
        self.echo("  %s mode, rounds (pages) %s, freeze %.2f ms, live copy %s GB/s, %.2f s in all"
                  % (r["mode"], r["rounds"], r["freeze_ms"], r.get("live_copy_gbps"), r["elapsed_s"]))

    def dump_stw(self):
        self.echo("stop-the-world dump (--mode stop-the-world --leave-running) ...")
        r = self._dump("stop-the-world", mode="stop-the-world")
        self.echo("  %d pages copied while frozen, freeze %.2f ms, %.2f s in all"
                  % (r["pages_written"], r["freeze_ms"], r["elapsed_s"]))

    def compare(self):
        live, stw = self.results.get("live"), self.results.get("stop-the-world")
        if not live or not stw:
            return
        self.echo("")
        rows = [("", "live", "stop-the-world"),
                ("freeze window", "%.2f ms" % live["freeze_ms"], "%.2f ms" % stw["freeze_ms"]),
                ("total", "%.2f s" % live["elapsed_s"], "%.2f s" % stw["elapsed_s"]),
                ("image", "%.1f MiB" % (live["image_bytes"] / 2**20), "%.1f MiB" % (stw["image_bytes"] / 2**20))]
        for name, a, b in rows:
            self.echo("  %-14s %12s %16s" % (name, a, b))
        if live["freeze_ms"] > 0:
            ratio = stw["freeze_ms"] / live["freeze_ms"]
            self.echo("  stop-the-world froze the process %.0f times longer than the live dump" % ratio
                      if ratio >= 1 else
                      "  the live dump froze the process longer than stop-the-world (ratio %.2f)" % ratio)
        self.echo("")

    def restore(self):
        """Dump the target for good (killed, as for hibernation), restore it, and have the
        restored process check every page: it must print what the original would."""
        self.echo("final dump (--verify, the target is killed) ...")
        from ckpt.dump.session import DumpOptions, dump
        img = self.image("final")
        r = dump(self.target.pid, DumpOptions(output=img, verify=True))
        self.echo("  freeze %.2f ms (verification included), rounds (pages) %s" % (r["freeze_ms"], r["rounds"]))
        pid = self.target.pid
        self.target.proc.wait()          # reap the original so that its PID is free again
        self.echo("restore ...")
        pidfile = os.path.join(self.image_dir, "restored.pid")
        # the restored process's stdout was a pipe to us: it gets `ckpt restore`'s, this pipe
        proc = subprocess.Popen([sys.executable, "-m", "ckpt", "restore", img, "--pidfile", pidfile],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.restored = _Target.attach(proc, pid)
        line = self.restored.read_line(timeout=120)
        rc = proc.wait(timeout=120)
        if rc != 0:
            self.fail("ckpt restore failed: %s" % proc.stderr.read().decode(errors="replace").strip())
            return False
        self.echo("  %s" % line)
        with open(pidfile) as f:
            got = int(f.read())
        if got != pid:
            self.fail("restored with PID %d, not %d" % (got, pid))
        os.kill(pid, signal.SIGUSR1)
        line = self.restored.read_line(timeout=60 + self.size_mb / 16)
        want = "ok %d" % (self.size_mb * 256)
        self.echo("restored process %d self-check: %s" % (pid, line))
        if line != want:
            self.fail("the restored process printed %r, not %r" % (line, want))
            return False
        return True

    def self_check(self):
        if not self.target.alive():
            self.fail("the target is gone")
            return
        os.kill(self.target.pid, signal.SIGUSR1)
        line = self.target.read_line(timeout=60 + self.size_mb / 16)
        want = "ok %d" % (self.size_mb * 256)
        self.echo("target self-check: %s" % line)
        if line != want:
            self.fail("the target's self-check printed %r, not %r" % (line, want))

    def cleanup(self):
        if self.target is not None:
            self.target.kill()
            self.target = None
        if getattr(self, "restored", None) is not None:
            self.restored.kill()
            self.restored = None
        for p in self.images:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        for d in (self.image_dir, self.build_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)

    STEPS = ("build", "start", "dump_live", "time_live", "dump_stw", "compare", "self_check", "restore")

    def run(self):
        try:
            for step in self.STEPS:
                r = getattr(self, step)()
                if r is False:
                    self.fail("step %s" % step)
        finally:
            self.cleanup()
        ok = not self.failures
        self.echo("demo %s" % ("passed" if ok else "FAILED: " + "; ".join(self.failures)))
        return ok


def run_demo(size_mb=256, workdir=None, echo=print):
    """Run the demo; True only if every dump succeeded, the live image verified, and the target
    survived both dumps and checked all its pages. Errors from ckpt propagate as CkptError,
    after the target and the images are cleaned up."""
    return Demo(size_mb=size_mb, workdir=workdir, echo=echo).run()
