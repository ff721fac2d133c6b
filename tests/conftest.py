"""Fixtures and helpers for the `ckpt dump` scenarios.

Every scenario runs on real processes: a target program from tests/targets/ (built once per
session into tests/targets/bin/), ckpt run as a subprocess (`python3 -m ckpt ...`), and checks
of the target through /proc afterwards. Every process a test starts is killed (SIGKILL to its
whole process group) and reaped at teardown, whatever the outcome.

Waits are bounded by generous deadlines only; no assertion depends on how long anything took.
"""
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ROOT / "tests" / "targets"
BIN = TARGETS / "bin"

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
# ckpt run as nobody keeps CAP_DAC_READ_SEARCH and nothing else: enough for the interpreter
# to read its packages wherever they are installed (here under /root, mode 0700), not enough
# to trace another user's process (CAP_SYS_PTRACE) or to write where nobody may not.
CKPT_AS_NOBODY = AS_NOBODY + ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]

READY_TIMEOUT = 120      # generous bounds only: the machine is small and noisy
CHECK_TIMEOUT = 120
CKPT_TIMEOUT = 300

JSON_KEYS = ("pid", "mode", "freeze_ms", "rounds", "pages_written", "image_bytes", "elapsed_s", "verified")


# ----------------------------------------------------------------------------- build
def _build_all():
    BIN.mkdir(exist_ok=True)
    headers = list(TARGETS.glob("*.h"))
    newest_header = max((h.stat().st_mtime for h in headers), default=0)
    for src in sorted(TARGETS.glob("*.c")):
        exe = BIN / src.stem
        if exe.exists() and exe.stat().st_mtime >= max(src.stat().st_mtime, newest_header):
            continue
        tmp = BIN / (".%s.tmp-%d" % (src.stem, os.getpid()))
        res = subprocess.run(["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", str(tmp), str(src)],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError("cannot build %s:\n%s" % (src.name, res.stderr))
        os.replace(tmp, exe)


@pytest.fixture(scope="session")
def targets_built():
    """Compile tests/targets/*.c into tests/targets/bin/ (only what is out of date)."""
    _build_all()
    return BIN


# ----------------------------------------------------------------------------- /proc
def proc_fds(pid):
    out = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            out[int(fd)] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except FileNotFoundError:
            pass
    return out


def proc_status(pid, tid=None):
    path = "/proc/%d/task/%d/status" % (pid, tid) if tid else "/proc/%d/status" % pid
    out = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def proc_tids(pid):
    return sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))


def uffd_wp_vmas(pid):
    """Lines of /proc/PID/smaps of mappings still registered for uffd write-protect."""
    out, current = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                current = line.strip()
            elif line.startswith("VmFlags:") and "uw" in line.split()[1:]:
                out.append(current)
    return out


def snapshot(pid):
    """What target_clean compares against: the fd table, taken when the target is ready."""
    return {"fds": proc_fds(pid)}


def target_clean(target, outdir=None, expect=()):
    """Assert that the target is running exactly as before ckpt touched it: alive, no thread
    stopped or traced, the same fds as when it was ready (none of ckpt's, no userfaultfd), no
    mapping still registered for write-protect; and, given `outdir`, that the directory holds
    exactly the files `expect` (no temporary image left behind)."""
    pid = target.pid
    assert target.alive(), "target %d is gone (%s)" % (pid, target.exit_description())
    for tid in proc_tids(pid):
        try:
            st = proc_status(pid, tid)
        except FileNotFoundError:
            continue   # a thread that just exited
        assert not st["State"].startswith(("t", "T")), "thread %d of %d left stopped: %s" % (tid, pid, st["State"])
        assert st["TracerPid"] == "0", "thread %d of %d left traced by %s" % (tid, pid, st["TracerPid"])
    fds = proc_fds(pid)
    assert "anon_inode:[userfaultfd]" not in fds.values(), "a userfaultfd is left in %d: %s" % (pid, fds)
    assert fds == target.baseline["fds"], "fds of %d changed: before %s, after %s" % (pid, target.baseline["fds"], fds)
    left = uffd_wp_vmas(pid)
    assert not left, "mappings of %d still registered for write-protect: %s" % (pid, left[:5])
    if outdir is not None:
        assert sorted(os.listdir(outdir)) == sorted(expect), "files left in %s: %s" % (outdir, os.listdir(outdir))


# ----------------------------------------------------------------------------- targets
class Target:
    """A running target program with its stdout piped to us."""

    def __init__(self, name, argv, proc):
        self.name = name
        self.argv = argv
        self.proc = proc
        self.pid = proc.pid
        self._buf = b""
        self.lines = []
        self.baseline = None
        self._exit = None

    def readline(self, timeout=CHECK_TIMEOUT):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("%s (%d): no output line within %ds; so far %r"
                                     % (self.name, self.pid, timeout, self.lines[-5:]))
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError("%s (%d) closed its output (%s); last lines %r"
                                         % (self.name, self.pid, self.exit_description(), self.lines[-5:]))
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.decode(errors="replace")
        self.lines.append(line)
        return line

    def check(self):
        """Ask the target to check itself (SIGUSR1); return its answer line."""
        os.kill(self.pid, signal.SIGUSR1)
        return self.readline()

    def assert_ok(self):
        """The target's self-check passes; returns its progress: the steps it reports (the
        writer reports its page count instead, so for it the CPU time its threads used)."""
        line = self.check()
        assert line.startswith("ok "), "%s (%d) self-check: %s" % (self.name, self.pid, line)
        return self.cpu_ticks() if self.name == "writer" else int(line.split()[1])

    def assert_progress(self, before, timeout=CHECK_TIMEOUT):
        """The self-check passes and the target has done more steps than `before`: it runs on."""
        deadline = time.monotonic() + timeout
        while True:
            steps = self.assert_ok()
            if steps > before:
                return steps
            assert time.monotonic() < deadline, "%s (%d) made no progress past %d steps" % (self.name, self.pid, before)
            time.sleep(0.05)

    def cpu_ticks(self):
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])    # utime + stime

    def alive(self):
        """Running (not exited, not a zombie). Does not reap."""
        if self._exit is not None:
            return False
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return res is None

    def wait_exit(self, timeout=CHECK_TIMEOUT):
        """Wait until the target has exited, without reaping it (so that its PID and process
        group stay ours until teardown); returns (si_code, si_status)."""
        deadline = time.monotonic() + timeout
        while True:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if res is not None:
                self._exit = (res.si_code, res.si_status)
                return self._exit
            assert time.monotonic() < deadline, "%s (%d) did not exit" % (self.name, self.pid)
            time.sleep(0.02)

    def exit_description(self):
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "reaped"
        if res is None:
            return "running"
        return "killed by signal %d" % res.si_status if res.si_code != os.CLD_EXITED else "exit %d" % res.si_status

    def kill(self):
        """SIGKILL the target's whole process group (its children too) and reap it. The group
        leader is reaped last, so that the group ID cannot have been reused meanwhile."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()


def _target_argv(name, args, user):
    exe = [sys.executable, str(TARGETS / name)] if name.endswith(".py") else [str(BIN / name)]
    prefix = AS_NOBODY if user == "nobody" else []
    return prefix + exe + [str(a) for a in args]


@pytest.fixture
def spawn(targets_built):
    """spawn(name, *args, user=None) starts tests/targets/NAME (a built C target, or a .py run
    with this interpreter) in a process group of its own, waits for its "ready PID" line and
    records its baseline for target_clean. All are killed and reaped at teardown."""
    started = []

    def _spawn(name, *args, user=None):
        argv = _target_argv(name, args, user)
        # stderr joins stdout: a target's complaint shows where its answers are read (and a
        # pipe is an fd ckpt can dump, unlike pytest's deleted capture file)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd="/")
        t = Target(name, argv, proc)
        started.append(t)
        line = t.readline(READY_TIMEOUT)
        assert line == "ready %d" % t.pid, "%s: unexpected first line %r" % (name, line)
        t.baseline = snapshot(t.pid)
        return t

    yield _spawn
    for t in reversed(started):     # the last started first: a tracer before its tracee
        t.kill()


# ----------------------------------------------------------------------------- ckpt
def ckpt_argv(*args, user=None):
    prefix = CKPT_AS_NOBODY if user == "nobody" else []
    return prefix + [sys.executable, "-m", "ckpt"] + [str(a) for a in args]


def run_ckpt(*args, user=None, timeout=CKPT_TIMEOUT, preexec_fn=None):
    """Run `python3 -m ckpt ARGS` and return (rc, stdout, stderr)."""
    res = subprocess.run(ckpt_argv(*args, user=user), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=timeout, cwd="/", preexec_fn=preexec_fn)
    return res.returncode, res.stdout, res.stderr


@pytest.fixture
def start_ckpt():
    """start_ckpt(*args) runs ckpt in the background (for signals mid-dump); every one is
    killed and reaped at teardown if still running."""
    started = []

    def _start(*args, user=None):
        p = subprocess.Popen(ckpt_argv(*args, user=user), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd="/")
        started.append(p)
        return p

    yield _start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=60)


def one_line_error(stderr):
    """ckpt's failure report: exactly one line, `ckpt: error: ...`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, "expected a one-line error, got %r" % stderr
    assert lines[0].startswith("ckpt: error: "), lines[0]
    return lines[0]


def dump_json(stdout):
    res = json.loads(stdout)
    missing = [k for k in JSON_KEYS if k not in res]
    assert not missing, "dump --json lacks %s: %s" % (missing, res)
    return res


def wait_armed(target, timeout=READY_TIMEOUT, ckpt_proc=None):
    """Wait until ckpt has registered the target's memory for write-protect (round 0 is
    streaming then). Returns False if ckpt ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if uffd_wp_vmas(target.pid):
            return True
        if ckpt_proc is not None and ckpt_proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("ckpt never armed %d" % target.pid)


@pytest.fixture
def nobody_dir():
    """A directory of nobody's, reachable by nobody (pytest's tmp_path is root's, mode 0700):
    for the files of a target that runs as nobody, which restore opens with nobody's rights."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="ckpt-nobody-")
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)
