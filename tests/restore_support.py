"""Helpers for the `ckpt restore` scenarios (tests/test_restore*.py).

Targets live in tests/targets/restore/ (C built by `build_targets` into tests/targets/bin/rs_*,
a Python one run with this interpreter). They print "ready PID" first and then only lines that
do not depend on timing, so an uninterrupted run and a dumped-then-restored run must print the
same lines after the first. A target given a gate step waits there for SIGUSR2, so that it
cannot finish before the test has dumped it, however slow the machine is.

Process hygiene: a restored process is a child of `ckpt restore`, orphaned when ckpt exits.
An orphan goes to PID 1, which may reap it late (a zombie keeps its PID, so the next restore of
the image would find the PID in use) or not at all, so the test process makes itself a child
subreaper (PR_SET_CHILD_SUBREAPER) while the restore modules run: restored processes become its
children and `Procs` reaps them, which also gives their exit status. Every process a test
starts (targets, ckpt, restored processes) is SIGKILLed and reaped at teardown, whatever the
outcome. No assertion depends on timing: waits are bounded by generous deadlines only.
"""
import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import AS_NOBODY, BIN, CKPT_TIMEOUT, NOBODY, TARGETS, proc_status, proc_tids  # noqa: F401

SRC = TARGETS / "restore"
WAIT = 120          # generous bound for anything to happen
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37

_libc = ctypes.CDLL(None, use_errno=True)


# ----------------------------------------------------------------------------- build
def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


HAVE_AVX2 = "avx2" in cpu_flags()
FP_FLAGS = ["-mavx2"] if HAVE_AVX2 else ["-msse4.2"]
C_TARGETS = {
    "compute": [],
    "family": [],
    "forker": [],
    "sharedfds": [],
    "blocker": [],
    "fdcheck": [],
    "evfds": [],
    "unixfds": [],
    "holder": [],
    "sparseshm": [],
    "names": [],
    "confine": [],
    "treeunix": [],
    "fdflags": [],
    "fifo": [],
    "inotify": [],
    "memkinds": [],
    "madv": [],
    "growsdown": [],
    "deleted": [],
    "flocks": [],
    "openunlinked": [],
    "ltstate": [],
    "incr": [],
    "fpavx": ["-frounding-math"] + FP_FLAGS,
}


def exe(name):
    return BIN / ("rs_" + name)


def build_targets():
    """Compile tests/targets/restore/*.c into tests/targets/bin/rs_* (only what is out of date;
    the flags are part of what is compared, through a stamp file)."""
    BIN.mkdir(exist_ok=True)
    header = (SRC / "rs.h").stat().st_mtime
    for name, flags in C_TARGETS.items():
        src = SRC / (name + ".c")
        out = exe(name)
        argv = ["gcc", "-O2", "-g", "-Wall", "-pthread"] + flags + ["-o"]
        stamp = BIN / (".rs_%s.flags" % name)
        if (out.exists() and out.stat().st_mtime >= max(src.stat().st_mtime, header)
                and stamp.exists() and stamp.read_text() == " ".join(argv)):
            continue
        tmp = BIN / (".rs_%s.tmp-%d" % (name, os.getpid()))
        res = subprocess.run(argv + [str(tmp), str(src), "-lm"], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError("cannot build %s:\n%s" % (src.name, res.stderr))
        os.replace(tmp, out)
        stamp.write_text(" ".join(argv))


def target_argv(name, *args):
    if name.endswith(".py"):
        return [sys.executable, str(SRC / name)] + [str(a) for a in args]
    return [str(exe(name))] + [str(a) for a in args]


# ----------------------------------------------------------------------------- subreaper
def subreaper_on():
    """Become a child subreaper; returns the previous setting (to put back)."""
    old = ctypes.c_int(0)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0)
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    return old.value


def subreaper_set(value):
    _libc.prctl(PR_SET_CHILD_SUBREAPER, value, 0, 0, 0)


# ----------------------------------------------------------------------------- /proc
def alive(pid):
    """The PID exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def exists(pid):
    return os.path.exists("/proc/%d" % pid)


def start_time(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


status = proc_status   # the same /proc readers as the dump tests
tids = proc_tids


def fdinfo(pid, fd):
    out = {}
    with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def wait_gone(pid, timeout=WAIT):
    """Wait until PID has exited; reap it if it is our child (we are the subreaper of restored
    processes). Returns its wait status if we reaped it, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return st
        except ChildProcessError:
            if not exists(pid):
                return None
        assert time.monotonic() < deadline, "process %d did not go away (state %s)" % (pid, _state(pid))
        time.sleep(0.01)


def _state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def kill_and_reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return wait_gone(pid)


def describe_status(st):
    if st is None:
        return "unknown (not our child)"
    if os.WIFEXITED(st):
        return "exit %d" % os.WEXITSTATUS(st)
    if os.WIFSIGNALED(st):
        return "killed by signal %d" % os.WTERMSIG(st)
    return "status %#x" % st


# ----------------------------------------------------------------------------- output
def read_lines(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace").splitlines()


def wait_file_line(path, pred, timeout=WAIT, proc=None):
    """Poll a target's output file until a line satisfies pred; return that line."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_lines(path) if os.path.exists(path) else []
        for line in lines:
            if pred(line):
                return line
        if proc is not None and proc.poll() is not None:
            raise AssertionError("target ended (%s) before the expected line; output %r"
                                 % (proc.returncode, lines[-5:]))
        assert time.monotonic() < deadline, "no such line in %s within %ds: %r" % (path, timeout, lines[-5:])
        time.sleep(0.01)


class LineReader:
    """Lines from a pipe's read end (or a terminal's master), with a deadline per line."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.lines = []
        self.eof = False

    def readline(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            assert left > 0, "no output line within %ds; so far %r" % (timeout, self.lines[-5:])
            r, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError as e:        # a terminal's master once no slave is open
                    if e.errno != errno.EIO:
                        raise
                    chunk = b""
                chunk = chunk.replace(b"\r\n", b"\n")
                if not chunk:
                    self.eof = True
                    if self.buf:
                        self.buf += b"\n"
                    continue
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.decode(errors="replace")
        self.lines.append(line)
        return line

    def read_all(self, timeout=WAIT):
        out = []
        while True:
            line = self.readline(timeout)
            if line is None:
                return out
            out.append(line)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_REFERENCES = {}


class Reference:
    """An uninterrupted run of a target (no gate), started in the background; `lines()` waits
    for it and returns its output lines and exit status. Cached per argv for the session."""

    def __init__(self, argv):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
        self._result = None

    def lines(self):
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("reference run %s did not finish" % self.argv)
            self._result = (out.decode(errors="replace").splitlines(), self.proc.returncode)
            assert self._result[0] and self._result[0][0] == "ready %d" % self.proc.pid, self._result[0][:3]
        return self._result

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.communicate()


def reference(name, *args):
    argv = target_argv(name, *args)
    key = tuple(argv)
    if key not in _REFERENCES:
        _REFERENCES[key] = Reference(argv)
    return _REFERENCES[key]


def kill_references():
    for r in _REFERENCES.values():
        r.kill()
    _REFERENCES.clear()


# ----------------------------------------------------------------------------- ckpt
def ckpt_argv(*args):
    return [sys.executable, "-m", "ckpt"] + [str(a) for a in args]


def run_ckpt(*args, timeout=CKPT_TIMEOUT):
    """`python3 -m ckpt ARGS` -> (rc, stdout, stderr). Only for runs whose stdout no restored
    process inherits (else the pipe would stay open after ckpt exits)."""
    res = subprocess.run(ckpt_argv(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=timeout, cwd="/")
    return res.returncode, res.stdout, res.stderr


def image_meta(img):
    from ckpt.image.reader import ImageReader
    with ImageReader(str(img)) as r:
        return r.metas()


def image_tids(img):
    return sorted(t["tid"] for t in image_meta(img)["threads"])


class Procs:
    """What a test started: targets (our children), ckpt runs, restored processes (by PID).
    teardown() kills and reaps them all."""

    def __init__(self):
        self.targets = []
        self.pids = []
        self.popens = []
        self.fds = []

    def start(self, name, *args, stdout, user=None, program=None, cwd="/"):
        """Start a target with stdout to `stdout` (a path: a regular file; or subprocess.PIPE),
        stdin /dev/null, in a session of its own; wait for its "ready PID" line. stderr goes to
        PATH.err for a file (not the same open file: restore does not keep fds sharing one), to
        /dev/null for a pipe (a restored process inherits ckpt's stderr for a pipe, which would
        keep ckpt's stderr open). Targets report crashes on stdout. `program` replaces the
        target's executable (a copy of it elsewhere). An int `stdout` is an fd to hand over
        as is (a terminal, say): the caller reads it. Returns (Popen, LineReader or None)."""
        argv = target_argv(name, *args)
        if program is not None:
            argv[0] = str(program)
        if user == "nobody":
            argv = AS_NOBODY + argv
        reader = None
        if stdout is subprocess.PIPE:
            r, out = os.pipe()
            err = subprocess.DEVNULL
        elif isinstance(stdout, int):
            out, err = os.dup(stdout), subprocess.DEVNULL
        else:
            out = os.open(str(stdout), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            err = os.open(str(stdout) + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            if user == "nobody":    # its own files, as if it had opened them itself
                os.fchown(out, NOBODY, NOBODY)
                os.fchown(err, NOBODY, NOBODY)
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(cwd),
                                 start_new_session=True)
        finally:
            os.close(out)
            if err is not subprocess.DEVNULL:
                os.close(err)
        self.targets.append(p)
        if stdout is subprocess.PIPE:
            reader = LineReader(r)
            self.fds.append(reader)
            line = reader.readline()
        elif isinstance(stdout, int):
            return p, None
        else:
            line = wait_file_line(stdout, lambda s: True, proc=p)
        assert line == "ready %d" % p.pid, "%s: unexpected first line %r" % (name, line)
        return p, reader

    def adopt(self, pid):
        """A restored process (or any PID) to kill at teardown."""
        if pid not in self.pids:
            self.pids.append(pid)

    def popen_ckpt(self, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
        p = subprocess.Popen(ckpt_argv(*args), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             cwd="/", text=True)
        self.popens.append(p)
        return p

    def teardown(self):
        # every process killed before any is waited for: a tree's child killed alone stays a
        # zombie until its parent (killed later) is gone and it comes to us
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.targets:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in reversed(self.pids):
            kill_and_reap(pid)
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=60)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for p in self.targets:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for r in self.fds:
            r.close()


def dump(pid, img, *extra):
    """`ckpt dump PID -o IMG --verify --json EXTRA`; asserts success and returns its JSON."""
    rc, out, err = run_ckpt("dump", pid, "-o", img, "--verify", "--json", *extra)
    assert rc == 0, "dump of %d failed: %s" % (pid, err.strip())
    res = json.loads(out)
    assert res["verified"] is True, res
    return res


def reap_killed(p):
    """The original, killed by the dump: reap it (it is our child) so its PID is free again."""
    rc = p.wait(timeout=WAIT)
    assert rc == -signal.SIGKILL, "target %d ended with %s, expected SIGKILL from the dump" % (p.pid, rc)


def reap_orphans(pids, timeout=WAIT):
    """The processes of a dumped tree below its top, killed by the dump, end up ours (the tests
    run as a child subreaper): reap them so that their PIDs are free for the restore."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists("/proc/%d" % pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            assert time.monotonic() < deadline, "process %d was not reaped" % pid
            time.sleep(0.005)


def restore(procs, img, *extra):
    """`ckpt restore IMG EXTRA` (detached); the image's PID is adopted for teardown whatever
    happens. Returns (rc, stdout, stderr)."""
    pid = image_meta(img)["process"]["pid"]
    procs.adopt(pid)
    return run_ckpt("restore", img, *extra)


def restore_ok(procs, img, *extra):
    rc, out, err = restore(procs, img, *extra)
    assert rc == 0, "restore of %s failed: %s" % (img, err.strip())
    pid = image_meta(img)["process"]["pid"]
    assert alive(pid), "restored process %d is not running (%s)" % (pid, _state(pid))
    return pid, out, err


def restore_attached(procs, img):
    """`ckpt restore IMG --shell-job` with its stdout a pipe of ours, which the restored process
    inherits as its stdout; returns (pid, LineReader positioned after ckpt's own line)."""
    r, w = os.pipe()
    pid = image_meta(img)["process"]["pid"]
    procs.adopt(pid)
    try:
        p = procs.popen_ckpt("restore", img, "--json", "--shell-job", stdout=w)
    finally:
        os.close(w)
    reader = LineReader(r)
    procs.fds.append(reader)
    _, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0, "restore failed: %s" % err.strip()
    res = json.loads(reader.readline())
    assert res["pid"] == pid
    return pid, reader


def rewrite_image(src, dst, edit):
    """A copy of image src at dst (uncompressed records kept as they are) with its metadata
    records changed by edit(metas) and every checksum recomputed: an image as someone who
    can write the file would edit it."""
    from ckpt.image import format as fmt
    from ckpt.image.reader import ImageReader
    from ckpt.image.writer import ImageWriter
    with ImageReader(str(src)) as r:
        metas = r.metas()
        edit(metas)
        w = ImageWriter(str(dst), compress="none")
        try:
            for rec in r.iter_records():
                if rec.rtype != fmt.META:
                    w._record(rec.rtype, r._payload_raw(rec), rec.addr, rec.npages, rec.comp, align=rec.pad > 0)
            for name, data in metas.items():
                w.add_meta(name, data)
            w.finish()
            w.commit()
        except BaseException:
            w.abort()
            raise


def same_after_ready(got, want):
    """Output lines after "ready PID" (the only line that names the PID) are identical."""
    assert got and got[0].startswith("ready "), got[:3]
    assert got[1:] == want[1:], _diff(got[1:], want[1:])


def _diff(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return "first difference at line %d: got %r, uninterrupted run printed %r" % (i + 2, a, b)
    return "got %d lines, uninterrupted run printed %d; last got %r, last expected %r" % (
        len(got), len(want), got[-3:], want[-3:])


@pytest.fixture(scope="module")
def rs_built():
    build_targets()
    return BIN


@pytest.fixture(scope="module")
def subreaper():
    old = subreaper_on()
    yield
    subreaper_set(old)
    kill_references()


@pytest.fixture
def procs(rs_built, subreaper):
    p = Procs()
    yield p
    p.teardown()


@pytest.fixture(scope="module")
def module_procs(rs_built, subreaper):
    """procs shared by the tests of one module (for images made once per module)."""
    p = Procs()
    yield p
    p.teardown()
