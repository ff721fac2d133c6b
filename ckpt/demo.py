"""`ckpt demo`: dump a built-in target that writes memory hard, live and stop-the-world side by
side, then kill it, restore it and check it.

Steps (each a method of Demo, run in this order by run_demo):
  build       compile the writer target (tests/targets/writer.c, or the copy embedded below)
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
    """tests/targets/writer.c of the checkout this package lives in, if it is there."""
    here = os.path.dirname(os.path.abspath(__file__))
    p = os.path.join(os.path.dirname(here), "tests", "targets", "writer.c")
    return p if os.path.isfile(p) else None


# A copy of tests/targets/writer.c, used when the package runs without its source tree.
WRITER_C = r'''/*
 * Test target: THREADS threads stamp pages of a SIZE_MB buffer with counters, as fast as they
 * can or at RATE pages per second per thread. Each page holds its own address and a counter, so
 * the target can check itself: on SIGUSR1 it verifies every page it owns and prints "ok N" or
 * "BAD addr" on stdout.
 *
 * usage: writer SIZE_MB THREADS RATE(0 = flat out)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static uint8_t *buf;
static size_t npages;
static int nthreads;
static long rate;
static volatile sig_atomic_t check_req;
static pthread_rwlock_t park = PTHREAD_RWLOCK_INITIALIZER;

struct page_hdr { uint64_t addr; uint64_t counter; uint64_t owner; uint64_t sum; };

static void stamp(size_t i, uint64_t owner, uint64_t counter)
{
	struct page_hdr *h = (struct page_hdr *)(buf + i * PAGE);
	/* fill the page with a pattern derived from counter, header last-but-consistent */
	uint64_t *w = (uint64_t *)(buf + i * PAGE);
	for (size_t k = 4; k < PAGE / 8; k += 64)
		w[k] = counter * 2654435761u + k;
	h->addr = (uint64_t)(uintptr_t)h;
	h->owner = owner;
	h->counter = counter;
	h->sum = h->addr ^ h->counter ^ h->owner;
}

static int check_page(size_t i)
{
	struct page_hdr *h = (struct page_hdr *)(buf + i * PAGE);
	if (h->addr == 0 && h->counter == 0)
		return 1; /* never stamped */
	if (h->addr != (uint64_t)(uintptr_t)h || h->sum != (h->addr ^ h->counter ^ h->owner))
		return 0;
	uint64_t *w = (uint64_t *)(buf + i * PAGE);
	for (size_t k = 4; k < PAGE / 8; k += 64)
		if (w[k] != h->counter * 2654435761u + k)
			return 0;
	return 1;
}

static void *worker(void *arg)
{
	uint64_t id = (uint64_t)(uintptr_t)arg;
	uint64_t counter = 1;
	unsigned seed = (unsigned)id * 7919u + 1;
	size_t per = npages / nthreads, base = per * id;
	struct timespec ts = { 0, 0 };
	long batch = rate > 1000 ? rate / 1000 : 1;
	for (;;) {
		pthread_rwlock_rdlock(&park);
		for (long b = 0; b < batch; b++) {
			size_t i = base + (size_t)(rand_r(&seed) % per);
			stamp(i, id, counter++);
		}
		pthread_rwlock_unlock(&park);
		if (rate) {
			ts.tv_nsec = rate > 1000 ? 1000000 : 1000000000L / rate;
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

static void on_usr1(int s) { (void)s; check_req = 1; }

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	nthreads = argc > 2 ? atoi(argv[2]) : 1;
	rate = argc > 3 ? atol(argv[3]) : 0;
	npages = mb * 256;
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < npages; i++)
		stamp(i, i * nthreads / npages, 0);
	signal(SIGUSR1, on_usr1);
	pthread_t th[256];
	for (int t = 0; t < nthreads; t++)
		pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t);
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (;;) {
		pause();
		if (check_req) {
			check_req = 0;
			pthread_rwlock_wrlock(&park);
			size_t bad = 0, first = 0;
			for (size_t i = 0; i < npages; i++)
				if (!check_page(i) && !bad++)
					first = i;
			if (bad)
				printf("BAD %zu pages, first %p\n", bad, (void *)(buf + first * PAGE));
			else
				printf("ok %zu\n", npages);
			fflush(stdout);
			pthread_rwlock_unlock(&park);
		}
	}
}
'''


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
        if src is None:
            src = os.path.join(self.build_dir, "writer.c")
            with open(src, "w") as f:
                f.write(WRITER_C)
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
