"""`ckpt restore`: real processes dumped mid-run and brought back must compute exactly what an
uninterrupted run computes, with the same PID and thread IDs, their blocked system calls, fds
and credentials intact. Each target is run once uninterrupted (the reference) and once dumped
(with --verify) and restored; the output lines after "ready PID" must be identical.

Targets and helpers: tests/targets/restore/, tests/restore_support.py.
"""
import base64
import json
import os
import signal
import struct
import subprocess

import pytest

from restore_support import (restore_attached, HAVE_AVX2, NOBODY, WAIT, LineReader, alive, describe_status, dump, fdinfo,  # noqa: F401
                             image_meta, image_tids, kill_and_reap, procs, read_lines, reap_killed, reference,
                             restore_ok, rs_built, same_after_ready, status, subreaper, tids, wait_file_line,
                             wait_gone)

SYS_read, SYS_futex, SYS_nanosleep, SYS_clock_nanosleep, SYS_restart_syscall = 0, 202, 35, 230, 219
NOT_IN_SYSCALL = (1 << 64) - 1      # orig_rax of a thread stopped in user mode
XSTATE_BV_OFFSET = 512              # in the standard (non-compacted) XSAVE layout
XFEATURE_YMM = 1 << 2


def _has_iter(line):
    return line.startswith("iter ")


def _finish(pid):
    """Open the gate of a restored target and wait for it to exit; returns its wait status
    (we are its subreaper, so we reap it)."""
    os.kill(pid, signal.SIGUSR2)
    return wait_gone(pid)


def _run_dump_restore(procs, tmp_path, name, args, *dump_args):
    """Start the gated target with stdout to a file, dump it (killed) mid-run, reap it, restore
    it, open the gate, wait for the end. Returns (output lines, image path, wait status)."""
    out = tmp_path / "out"
    img = tmp_path / "image"
    p, _ = procs.start(name, *args, stdout=out)
    wait_file_line(out, _has_iter, proc=p)
    dump(p.pid, img, *dump_args)
    reap_killed(p)
    at_dump = read_lines(out)
    assert not any(line.startswith("done") for line in at_dump), "the target finished before the dump"
    pid, _, err = restore_ok(procs, img)
    assert pid == p.pid
    assert tids(pid) == image_tids(img), "thread IDs differ from the image's"
    assert not err.strip(), "restore warned: %s" % err
    st = _finish(pid)
    return read_lines(out), img, st


def _assert_exit(st, code=0):
    assert st is not None, "the restored process was not ours to reap (not reparented to the subreaper?)"
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == code, "restored process: %s" % describe_status(st)


def _ungated(args, gate_pos):
    a = list(args)
    a[gate_pos] = -1
    return a


# ------------------------------------------------------------------ 1. deterministic C targets
# compute THREADS STEPS EVERY MIB GATE EXIT
COMPUTE_1 = (1, 1500, 50, 16, 1400, 0)
COMPUTE_8 = (8, 1200, 50, 16, 1100, 0)


@pytest.mark.parametrize("args,mode", [(COMPUTE_1, "auto"), (COMPUTE_8, "auto"), (COMPUTE_8, "sync"),
                                       (COMPUTE_8, "stop-the-world")],
                         ids=["1-thread", "8-threads", "8-threads-sync", "8-threads-stop-the-world"])
def test_compute_target_continues_exactly(procs, tmp_path, args, mode):
    """The image of every dump mode restores (auto is async WP here)."""
    ref = reference("compute", *_ungated(args, 4))
    lines, img, st = _run_dump_restore(procs, tmp_path, "compute", args, "--mode", mode)
    want, rc = ref.lines()
    assert rc == 0 and want[-1].startswith("done ")
    same_after_ready(lines, want)
    _assert_exit(st)
    assert len(image_tids(img)) == args[0]


# fpavx OUTER INNER EVERY GATE
FPAVX = (1600, 50000, 40, 1500)


def test_fp_avx_registers_survive(procs, tmp_path):
    """Logistic maps in ymm (xmm without avx2) and an x87 recurrence, under rounding mode
    "upward": the dump stops the thread in user mode in the middle of the recurrences."""
    ref = reference("fpavx", *_ungated(FPAVX, 3))
    lines, img, st = _run_dump_restore(procs, tmp_path, "fpavx", FPAVX)
    same_after_ready(lines, ref.lines()[0])
    _assert_exit(st)
    (th,) = image_meta(img)["threads"]
    assert th["regs"]["orig_rax"] == NOT_IN_SYSCALL, \
        "the dump caught the target in syscall %d, not in its FP loop" % th["regs"]["orig_rax"]
    if HAVE_AVX2:
        xstate = base64.b64decode(th["xstate"])
        (xstate_bv,) = struct.unpack_from("<Q", xstate, XSTATE_BV_OFFSET)
        assert xstate_bv & XFEATURE_YMM, "the image holds no live ymm state (XSTATE_BV %#x)" % xstate_bv


# ------------------------------------------------------------------ 2. a Python program
# pycompute.py STEPS EVERY GATE
PYCOMPUTE = (700, 25, 650)


def test_python_program_continues_exactly(procs, tmp_path):
    ref = reference("pycompute.py", *_ungated(PYCOMPUTE, 2))
    lines, img, st = _run_dump_restore(procs, tmp_path, "pycompute.py", PYCOMPUTE)
    want, rc = ref.lines()
    assert rc == 0
    same_after_ready(lines, want)
    _assert_exit(st)
    assert len(image_tids(img)) == 4     # the main thread and three workers


# ------------------------------------------------------------------ 3. ten dump/restore cycles
# compute THREADS STEPS EVERY MIB GATE EXIT PAUSE_US CREDIT: paced, and each SIGUSR2 allows it
# CREDIT more steps (SIGUSR1: no limit, no pace), so it can neither finish nor reach any fixed
# point during the cycles, however long they take
CYCLES_ARGS = (4, 6000, 20, 8, -1, 0, 1000, 400)


def _last_iter(out):
    return max([int(line.split()[1]) for line in read_lines(out) if _has_iter(line)] + [0])


def test_ten_cycles_of_leave_running_kill_restore(procs, tmp_path):
    """Dump with --leave-running, kill, restore; ten times, each time dumping the process the
    previous cycle restored. Each restored process must run on (print new lines) before the
    next cycle, and the final output must be the uninterrupted run's."""
    ref = reference("compute", *CYCLES_ARGS[:6])
    out = tmp_path / "out"
    p, _ = procs.start("compute", *CYCLES_ARGS, stdout=out)
    pid = p.pid
    wait_file_line(out, _has_iter, proc=p)
    want_tids = tids(pid)
    for cycle in range(10):
        img = tmp_path / ("image-%d" % cycle)
        dump(pid, img, "--leave-running")
        assert alive(pid), "cycle %d: --leave-running left %d dead" % (cycle, pid)
        seen = _last_iter(out)
        if cycle == 0:
            os.kill(pid, signal.SIGKILL)
            assert p.wait(timeout=WAIT) == -signal.SIGKILL
        else:
            kill_and_reap(pid)
        got, _, _ = restore_ok(procs, img)
        assert got == pid and tids(pid) == want_tids, "cycle %d: PID or thread IDs changed" % cycle
        os.kill(pid, signal.SIGUSR2)        # CREDIT steps more
        wait_file_line(out, lambda s: _has_iter(s) and int(s.split()[1]) > seen)
    assert _last_iter(out) < CYCLES_ARGS[1]
    os.kill(pid, signal.SIGUSR1)
    st = wait_gone(pid)
    same_after_ready(read_lines(out), ref.lines()[0])
    _assert_exit(st)


# ------------------------------------------------------------------ 4. threads blocked in syscalls
# blocker TICKS TICK_MS SLEEP_MS GATE
BLOCKER = (70, 40, 150, 60)


def _blocked_where(img):
    return {t["comm"]: t["regs"]["orig_rax"] for t in image_meta(img)["threads"]}


def test_threads_blocked_in_syscalls_keep_working(procs, tmp_path):
    """sleeper in nanosleep, reader in read() on a pipe, waiter in a futex wait (condvar) when
    the dump stops them; restored, every tick still goes through the pipe and the condvar, and
    the sleeper still wakes. Dumps are taken with --leave-running until one catches all three
    blocked (they are, nearly all the time), then the target is killed and that image restored."""
    ref = reference("blocker", *_ungated(BLOCKER, 3))
    out = tmp_path / "out"
    p, _ = procs.start("blocker", *BLOCKER, stdout=out)
    wait_file_line(out, lambda s: s.startswith("tick 3 "), proc=p)
    # a nanosleep interrupted by an earlier --leave-running dump goes on as restart_syscall
    want = {"sleeper": (SYS_nanosleep, SYS_clock_nanosleep, SYS_restart_syscall), "reader": (SYS_read,),
            "waiter": (SYS_futex,)}
    for attempt in range(5):
        img = tmp_path / ("image-%d" % attempt)
        dump(p.pid, img, "--leave-running")
        where = _blocked_where(img)
        if all(where.get(name) in nrs for name, nrs in want.items()):
            break
    else:
        pytest.fail("five dumps never caught all threads blocked: %s" % where)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=WAIT) == -signal.SIGKILL
    pid, _, _ = restore_ok(procs, img)
    st = _finish(pid)
    want_lines, rc = ref.lines()
    same_after_ready(read_lines(out), want_lines)
    _assert_exit(st)


# ------------------------------------------------------------------ 5. fds
def _fdcheck_dir(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "data.bin").write_bytes(bytes(((i * 7 + 3) & 0xFF) for i in range(8192)))
    (d / "append.log").write_bytes(b"first\n")
    return d


def _fd_table(pid, fds):
    return {fd: (os.readlink("/proc/%d/fd/%d" % (pid, fd)), fdinfo(pid, fd)["flags"], fdinfo(pid, fd)["pos"])
            for fd in fds}


def test_fds_positions_flags_and_pipe_contents(procs, tmp_path):
    d = _fdcheck_dir(tmp_path)
    p, reader = procs.start("fdcheck", d, stdout=subprocess.PIPE)
    fds = [int(x) for x in reader.readline().split()[1:]]
    os.kill(p.pid, signal.SIGUSR1)
    assert reader.readline() == "ok 1"
    before = _fd_table(p.pid, fds)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, out = restore_attached(procs, img)
    after = _fd_table(pid, fds)
    for fd in fds:
        b, a = before[fd], after[fd]
        if b[0].startswith("pipe:"):
            b, a = b[1:], a[1:]     # a new pipe, of course: same flags and position
        assert a == b, "fd %d: before the dump %s, restored %s" % (fd, b, a)
    for n in (2, 3):
        os.kill(pid, signal.SIGUSR1)
        line = out.readline()
        assert line == "ok %d" % n, "the restored target's check of its fds: %s" % line
    assert (d / "append.log").read_bytes() == b"first\nbefore\ncheck\ncheck\ncheck\n"
    os.kill(pid, signal.SIGTERM)
    _assert_exit(wait_gone(pid))


def test_dup_fds_share_their_offset(procs, tmp_path):
    """A dup()ed fd is the same open file description as the original: seeking one moves the
    other, after restore too (the case of every `cmd >log 2>&1`)."""
    d = _fdcheck_dir(tmp_path)
    p, reader = procs.start("fdcheck", d, stdout=subprocess.PIPE)
    reader.readline()
    os.kill(p.pid, signal.SIGUSR2)
    assert reader.readline() == "ok shared"
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, out = restore_attached(procs, img)
    os.kill(pid, signal.SIGUSR2)
    assert out.readline() == "ok shared"


# ------------------------------------------------------------------ 6. credentials
CREDS_ARGS = (2, 1000, 50, 8, 900, 0)
CRED_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def test_unprivileged_target_gets_no_more_privilege(procs, tmp_path, nobody_dir):
    ref = reference("compute", *_ungated(CREDS_ARGS, 4))
    out = nobody_dir / "out"
    p, _ = procs.start("compute", *CREDS_ARGS, stdout=out, user="nobody")
    wait_file_line(out, _has_iter, proc=p)
    before = {tid: {k: status(p.pid, tid)[k] for k in CRED_FIELDS} for tid in tids(p.pid)}
    for creds in before.values():
        assert creds["Uid"].split() == [str(NOBODY)] * 4 and creds["Gid"].split() == [str(NOBODY)] * 4
        assert int(creds["CapEff"], 16) == 0 and int(creds["CapPrm"], 16) == 0
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, _, _ = restore_ok(procs, img)
    after = {tid: {k: status(pid, tid)[k] for k in CRED_FIELDS} for tid in tids(pid)}
    assert after == before
    st = _finish(pid)
    same_after_ready(read_lines(out), ref.lines()[0])
    _assert_exit(st)


# ------------------------------------------------------------------ 7. --pidfile, --json, --foreground
OPTS_ARGS = (2, 1000, 50, 8, 900, 0)


def test_pidfile_and_json(procs, tmp_path):
    ref = reference("compute", *_ungated(OPTS_ARGS, 4))
    out = tmp_path / "out"
    p, _ = procs.start("compute", *OPTS_ARGS, stdout=out)
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pidfile = tmp_path / "restored.pid"
    pid, so, _ = restore_ok(procs, img, "--pidfile", pidfile, "--json")
    res = json.loads(so)
    for key in ("pid", "threads", "pages_written", "restore_ms"):
        assert key in res, "restore --json lacks %s: %s" % (key, res)
    assert res["pid"] == pid == p.pid
    assert pidfile.read_text() == "%d\n" % pid
    assert sorted(res["threads"]) == image_tids(img) == tids(pid)
    assert isinstance(res["pages_written"], int) and res["pages_written"] > 0
    assert isinstance(res["restore_ms"], (int, float)) and res["restore_ms"] > 0
    # the same image again, without options: the human-readable line, exit 0
    kill_and_reap(pid)
    pid, so, _ = restore_ok(procs, img)
    assert so.startswith("restored process %d (2 threads)" % pid), so
    st = _finish(pid)
    same_after_ready(read_lines(out), ref.lines()[0])
    _assert_exit(st)


FG_ARGS = (1, 1200, 50, 8, 1100, 7)


def test_foreground_exit_status_is_the_processes(procs, tmp_path):
    """stdout a pipe: the restored process writes to ckpt restore's stdout; with --foreground
    ckpt stays its parent and exits with its status (7), or 128 + the signal that killed it."""
    ref = reference("compute", *_ungated(FG_ARGS, 4))
    p, reader = procs.start("compute", *FG_ARGS, stdout=subprocess.PIPE)
    reader.readline()
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    before = list(reader.lines) + reader.read_all()      # everything the original printed
    ck = procs.popen_ckpt("restore", img, "--foreground", "--json", "--shell-job")
    procs.adopt(p.pid)
    lines, res = [], None
    ckout = LineReader(ck.stdout.fileno())
    while res is None:
        line = ckout.readline()
        assert line is not None, "ckpt restore --foreground ended: %s" % ck.stderr.read()
        if line.startswith("{"):
            res = json.loads(line)
        else:
            lines.append(line)
    assert res["pid"] == p.pid
    os.kill(p.pid, signal.SIGUSR2)
    lines += ckout.read_all()
    assert ck.wait(timeout=WAIT) == 7, "ckpt restore --foreground: %s; %s" % (ck.returncode, ck.stderr.read())
    want, rc = ref.lines()
    assert rc == 7
    same_after_ready(before + lines, want)
    # killed by a signal: 128 + 9
    ck = procs.popen_ckpt("restore", img, "--foreground", "--pidfile", tmp_path / "pid", stdout=subprocess.DEVNULL)
    wait_file_line(tmp_path / "pid", lambda s: s.strip() == str(p.pid), proc=ck)
    os.kill(p.pid, signal.SIGKILL)
    assert ck.wait(timeout=WAIT) == 128 + signal.SIGKILL, ck.stderr.read()


def test_terminal_stdout_is_reattached(procs, tmp_path):
    """stdout a terminal: with --shell-job the restored process writes to ckpt restore's
    terminal."""
    ref = reference("compute", *_ungated(OPTS_ARGS, 4))
    m1, s1 = os.openpty()
    try:
        p, _ = procs.start("compute", *OPTS_ARGS, stdout=s1)
    finally:
        os.close(s1)
    old = LineReader(m1)
    procs.fds.append(old)
    assert old.readline() == "ready %d" % p.pid
    while not _has_iter(old.readline()):
        pass
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    before = list(old.lines) + old.read_all()
    m2, s2 = os.openpty()
    new = LineReader(m2)
    procs.fds.append(new)
    procs.adopt(p.pid)
    try:
        ck = procs.popen_ckpt("restore", img, "--shell-job", stdout=s2)
    finally:
        tty = os.ttyname(s2)
        os.close(s2)
    assert ck.wait(timeout=WAIT) == 0, ck.stderr.read()
    assert os.readlink("/proc/%d/fd/1" % p.pid) == tty
    st = _finish(p.pid)
    after = [line for line in new.read_all() if not line.startswith("restored process %d" % p.pid)]
    same_after_ready(before + after, ref.lines()[0])
    _assert_exit(st)


def test_low_fd_limit_with_fds_near_it(procs, tmp_path):
    p, reader = procs.start("lownofile.py", stdout=subprocess.PIPE)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, out = restore_attached(procs, img)
    os.kill(pid, signal.SIGUSR1)
    assert out.readline() == "limit (40, 40) data b'kept'"
    _assert_exit(wait_gone(pid))
