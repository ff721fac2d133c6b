"""Process and thread state beyond the core, across dump (--verify), kill and restore: POSIX
timers, membarrier registrations, seccomp (filters and strict mode), scheduling (policy,
priority, nice, affinity, I/O priority), and sleeping calls interrupted by the dump (poll,
nanosleep, clock_nanosleep, futex waits, ppoll). The parts are in ckpt/state/ (timers.py,
membarrier.py, seccomp.py, sched.py, restart.py).

The target (tests/targets/restore/ltstate.c) sets its state up, reports it ("before: ..."),
waits for SIGUSR2 and checks it again ("ok ..." / "BAD ..."): the restored process must print
what an uninterrupted run prints. What ckpt cannot bring back is refused at dump, the target
left untouched (never traced) or, for what only the freeze can read, running as before.
"""
import os
import re
import signal
import time

import pytest

from conftest import run_ckpt as run_ckpt_as
from restore_support import (dump, image_meta, procs, read_lines, reap_killed, restore_ok, rs_built,  # noqa: F401
                             status, subreaper, tids, wait_file_line)

TIMERS_FIELDS = ("ID", "signal", "notify", "ClockID")


def _wait_done(out, proc=None):
    wait_file_line(out, lambda s: s == "done" or s.startswith(("ERROR", "CRASH")), proc=proc)
    return read_lines(out)


def _gated(procs, tmp_path, mode, *args, dumped=True, user=None):
    """Run `ltstate MODE ARGS` to its gate; dumped: dump it (killed), restore it; then open the
    gate and return (output lines, image path or None, PID, state seen before the dump)."""
    out = tmp_path / ("out-%s-%s" % (mode, "dumped" if dumped else "reference"))
    p, _ = procs.start("ltstate", mode, *args, stdout=out, user=user)
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    seen = {"timers": _timers(p.pid), "seccomp": _seccomp_status(p.pid)}
    img = None
    pid = p.pid
    if dumped:
        img = tmp_path / ("image-%s" % mode)
        dump(p.pid, img)
        reap_killed(p)
        pid, _, err = restore_ok(procs, img)
        assert pid == p.pid
        assert not err.strip(), "restore warned: %s" % err
        seen["restored"] = {"timers": _timers(pid), "seccomp": _seccomp_status(pid)}
    os.kill(pid, signal.SIGUSR2)
    lines = _wait_done(out, None if dumped else p)
    return lines, img, pid, seen


def _same_as_reference(got, ref):
    assert got[0].startswith("ready ") and ref[0].startswith("ready ")
    bad = [x for x in got if x.startswith(("BAD", "ERROR", "CRASH"))]
    assert not bad, got
    assert got[1:] == ref[1:], "restored run printed\n%s\nan uninterrupted run printed\n%s" % (
        "\n".join(got[1:]), "\n".join(ref[1:]))
    assert got[-1] == "done"


def _timers(pid):
    """/proc/PID/timers as a set of (ID, signal, notify, ClockID) records."""
    try:
        text = open("/proc/%d/timers" % pid).read()
    except FileNotFoundError:
        return set()
    out, cur = set(), {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k == "ID" and cur:
            out.add(tuple(cur.get(f) for f in TIMERS_FIELDS))
            cur = {}
        cur[k] = v.strip()
    if cur:
        out.add(tuple(cur.get(f) for f in TIMERS_FIELDS))
    return out


def _seccomp_status(pid):
    return sorted((tid, status(pid, tid).get("Seccomp"), status(pid, tid).get("Seccomp_filters"),
                   status(pid, tid).get("NoNewPrivs")) for tid in tids(pid))


def _refused(pid, img, want, user=None):
    """A dump refused with a message containing `want`, leaving no image."""
    rc, _, err = run_ckpt_as("dump", pid, "-o", img, "--verify", user=user)
    assert rc != 0, "dump of %d succeeded" % pid
    assert want in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(img)
    return err


# ------------------------------------------------------------------ 1. POSIX timers
def test_posix_timers_come_back_with_their_ids_signals_time_left_and_overrun(procs, tmp_path):
    """Timers with gaps in their IDs; a periodic one with 3 overruns (timer_getoverrun says 3 after
    the restore, then it fires with its value); one-shot REALTIME and process CPU-time timers
    without a signal (time left kept); one that signals a given thread (SIGEV_THREAD_ID); one on
    the CPU clock of the thread that made it (it still counts that thread's CPU time only); two
    whose signals were pending at the dump (queued again by the timers themselves)."""
    ref, _, _, _ = _gated(procs, tmp_path, "timers", dumped=False)
    got, img, pid, seen = _gated(procs, tmp_path, "timers")
    _same_as_reference(got, ref)
    assert seen["timers"] and seen["restored"]["timers"] == seen["timers"]
    ids = dict(re.findall(r"([A-G])=(\d+)", got[1]))
    rec = {t["id"]: t for t in image_meta(img)["process"]["posix_timers"]}
    assert sorted(rec) == sorted(int(v) for v in ids.values())
    assert rec[int(ids["A"])]["overrun"] == 3
    assert rec[int(ids["E"])]["thread"] not in (0, pid)       # the second thread's CPU clock
    assert rec[int(ids["F"])]["pending"] and rec[int(ids["G"])]["pending"]
    assert rec[int(ids["C"])]["tid"] not in (0, pid)


def test_timer_on_another_process_cpu_clock_is_refused_untouched(procs, tmp_path):
    out = tmp_path / "out"
    p, _ = procs.start("ltstate", "cputimer-of", os.getpid(), stdout=out)
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    _refused(p.pid, tmp_path / "image", "process %d: POSIX timer 0 measures the CPU time of another process (%d): "
             "not supported" % (p.pid, os.getpid()))
    assert status(p.pid)["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGUSR2)
    assert _wait_done(out, p)[-2:] == ["ok timer still armed", "done"]


def test_unarmed_thread_cpu_timer_of_an_unknown_thread_is_refused_and_the_target_runs_on(procs, tmp_path):
    """A CLOCK_THREAD_CPUTIME_ID timer of a process of two threads measures the thread that made
    it: /proc does not tell which, and an unarmed timer does not show it in the freeze either."""
    out = tmp_path / "out"
    p, _ = procs.start("ltstate", "idle-thread-timer", stdout=out)
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    _refused(p.pid, tmp_path / "image", "process %d: POSIX timer 0 measures the CPU time of the thread that made it, "
             "and it is not armed: which thread that is cannot be told; not supported" % p.pid)
    assert status(p.pid)["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGUSR2)
    assert _wait_done(out, p)[-2:] == ["ok timer still there", "done"]


# ------------------------------------------------------------------ 2. membarrier
def test_membarrier_registrations_come_back(procs, tmp_path):
    """Every registration the kernel offers (private expedited, sync-core, rseq, global
    expedited): the same mask after the restore, and every barrier command works (no EPERM)."""
    ref, _, _, _ = _gated(procs, tmp_path, "membarrier", dumped=False)
    got, img, _, _ = _gated(procs, tmp_path, "membarrier")
    _same_as_reference(got, ref)
    mask = int(re.search(r"registrations (0x[0-9a-f]+)", got[1]).group(1), 16)
    assert mask & 0x10 and image_meta(img)["process"]["membarrier"] == mask      # private expedited at least


# ------------------------------------------------------------------ 3. seccomp
def _filters(img):
    return {t["tid"]: t.get("seccomp") for t in image_meta(img)["threads"]}


def test_seccomp_filters_come_back_shared_and_in_force(procs, tmp_path):
    """Two threads share two filters (one with SECCOMP_FILTER_FLAG_LOG), the second has one of its
    own: the restored threads fail the same calls the same way -- including munmap of 1 MiB,
    prctl and setpgid, which ckpt's restorer itself calls after installing them, and the calls
    ckpt injects to dump a process, which kill it (the dump never has them filtered). The
    shared filters are shared again: a TSYNC from the second thread succeeds. A second dump
    of the restored process reads the very same filters."""
    ref, _, _, _ = _gated(procs, tmp_path, "seccomp", dumped=False)
    out = tmp_path / "out"
    p, _ = procs.start("ltstate", "seccomp", stdout=out)
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    before = _seccomp_status(p.pid)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, _, err = restore_ok(procs, img)
    assert not err.strip(), err
    assert _seccomp_status(pid) == before
    first = _filters(img)
    assert [len(r["filters"]) for r in first.values()] == [2, 3]
    assert [f["flags"] for f in first[pid]["filters"]] == [0, 2]             # the LOG flag kept
    again = tmp_path / "image2"
    dump(pid, again, "--leave-running")
    assert _filters(again) == first
    os.kill(pid, signal.SIGUSR2)
    _same_as_reference(_wait_done(out), ref)


def test_seccomp_strict_mode_thread_comes_back(procs, tmp_path):
    """A thread in strict mode (it may only read, write and exit): the dump's injected calls do
    not kill it, the restored thread still echoes, and dies on getpid."""
    ref, _, _, _ = _gated(procs, tmp_path, "strict", dumped=False)
    got, img, pid, seen = _gated(procs, tmp_path, "strict")
    _same_as_reference(got, ref)
    assert [r["mode"] for r in _filters(img).values() if r] == [1]
    assert seen["restored"]["seccomp"] == seen["seccomp"]


def test_seccomp_user_notification_is_refused_and_the_target_runs_on(procs, tmp_path):
    """A filter that hands calls to a supervisor (SECCOMP_RET_USER_NOTIF) can be read only in the
    freeze: the dump fails there and the target goes on as before."""
    out = tmp_path / "out"
    p, _ = procs.start("ltstate", "notify", stdout=out)
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    _refused(p.pid, tmp_path / "image", "has a seccomp filter that hands syscalls to a supervisor "
             "(SECCOMP_RET_USER_NOTIF): its listener cannot be reconnected; not supported")
    assert status(p.pid)["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGUSR2)
    assert _wait_done(out, p)[-2:] == ["ok getsid ENOSYS", "done"]


def test_seccomp_target_is_refused_when_ckpt_cannot_suspend_it(procs, tmp_path, nobody_dir):
    """ckpt without CAP_SYS_ADMIN cannot keep a target's filters away from its injected calls
    (PTRACE_O_SUSPEND_SECCOMP): a target under seccomp is refused up front, untouched."""
    out = nobody_dir / "out"
    p, _ = procs.start("ltstate", "seccomp", stdout=out, user="nobody")
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    _refused(p.pid, nobody_dir / "image", "runs under seccomp (filter): ckpt needs CAP_SYS_ADMIN, and no seccomp "
             "filter of its own, to suspend it for the syscalls it injects", user="nobody")
    assert status(p.pid)["TracerPid"] == "0"


# ------------------------------------------------------------------ 4. scheduling
def test_scheduling_of_each_thread_comes_back(procs, tmp_path):
    """SCHED_BATCH nice 7 on CPU 0 with best-effort I/O level 2; SCHED_FIFO 10 with
    reset-on-fork, nice -3 kept aside, on CPU 1, real-time I/O; SCHED_IDLE with idle I/O: each
    thread reports the same after the restore."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")
    ref, _, _, _ = _gated(procs, tmp_path, "sched", dumped=False)
    got, img, _, _ = _gated(procs, tmp_path, "sched")
    _same_as_reference(got, ref)
    policies = sorted(t["sched"]["policy"] for t in image_meta(img)["threads"])
    assert policies == [0, 1, 3, 5]


def test_scheduling_set_by_another_process_is_refused_untouched(procs, tmp_path):
    """A process of nobody's made SCHED_FIFO by root: its own rights could not set that again,
    nor could restore for it."""
    out = tmp_path / "out"
    p, _ = procs.start("ltstate", "membarrier", stdout=out, user="nobody")
    wait_file_line(out, lambda s: s.startswith("before"), proc=p)
    os.sched_setscheduler(p.pid, os.SCHED_FIFO, os.sched_param(5))
    _refused(p.pid, tmp_path / "image", "thread %d runs SCHED_FIFO priority 5, above its RLIMIT_RTPRIO (0) and "
             "without CAP_SYS_NICE: another process set it, and restore would not have the right to" % p.pid)
    assert status(p.pid)["TracerPid"] == "0" and os.sched_getscheduler(p.pid) == os.SCHED_FIFO


# ------------------------------------------------------------------ 5. sleeping calls
SLEEP_MS = 9000
BEFORE_DUMP_S = 3.0        # how long the calls have slept when the dump begins
LATE = 1.0                 # generous: how late a wakeup may be on a loaded machine
EARLY = 0.02               # the printed times' rounding


def _woke(lines):
    out = {}
    for line in lines:
        m = re.match(r"woke (\S+) at ([0-9.]+) r=(-?\d+) eintr=(\d+)$", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), int(m.group(3)), int(m.group(4)))
    return out


@pytest.mark.parametrize("handler", [False, True], ids=["no-handler", "handler"])
def test_sleeping_calls_wait_what_they_had_left(procs, tmp_path, handler):
    """Threads sleeping 9 s, dumped 3 s in, restored. The clock of a relative timeout runs while
    the process exists: each wakes its time left after the release (between the dump's and the
    restore's start and end: the bounds), an absolute one at its time.
      - nanosleep with `rem`, ppoll: exactly, no EINTR (nanosleep used to get EINTR);
      - clock_nanosleep TIMER_ABSTIME, pthread_cond_timedwait: at their absolute time;
      - poll, nanosleep without `rem` (their time left is nowhere to read): without a signal
        handler, restarted with a bound -- no EINTR (they used to get it), never early, at most
        a full timeout after the release; with a handler the thread does not block, EINTR as a
        signal would give: the program polls again for what its own deadline leaves."""
    out = tmp_path / "out"
    args = ["sleep", SLEEP_MS] + (["handler"] if handler else [])
    p, _ = procs.start("ltstate", *args, stdout=out)
    line = wait_file_line(out, lambda s: s.startswith("sleeping at"), proc=p)
    t0 = float(line.split()[2])
    end = t0 + SLEEP_MS / 1000
    time.sleep(max(0.0, t0 + BEFORE_DUMP_S - time.monotonic()))
    d0 = time.monotonic()
    img = tmp_path / "image"
    dump(p.pid, img)
    d1 = time.monotonic()
    reap_killed(p)
    assert not any(x.startswith("woke") for x in read_lines(out)), "a call ended before the dump"
    r0 = time.monotonic()
    pid, _, err = restore_ok(procs, img)
    r1 = time.monotonic()
    assert not err.strip(), err
    woke = _woke(_wait_done(out))
    assert sorted(woke) == sorted(["poll", "nanosleep-rem", "nanosleep", "clock_nanosleep-abs", "condvar", "ppoll"]), woke
    assert all(r == 0 for _, r, _ in woke.values()), woke
    # exactly what they had left, counted from the release
    lo, hi = r0 + (end - d1), r1 + (end - d0)
    for kind in ("nanosleep-rem", "ppoll"):
        at, _, eintr = woke[kind]
        assert eintr == 0, (kind, woke)
        assert lo - EARLY <= at <= hi + LATE, (kind, at, lo, hi)
    for kind in ("clock_nanosleep-abs", "condvar"):
        at, _, eintr = woke[kind]
        assert eintr == 0 and end - EARLY <= at <= max(end, r1) + LATE, (kind, at, end, woke)
    recs = {t.get("restart", {}).get("how") for t in image_meta(img)["threads"]}
    for kind in ("poll", "nanosleep"):
        at, _, eintr = woke[kind]
        if handler:
            assert eintr == 1, (kind, woke)
            assert end - EARLY <= at <= max(end, r1) + LATE, (kind, at, end)
        else:
            assert eintr == 0, (kind, woke)
            assert lo - EARLY <= at <= r1 + SLEEP_MS / 1000 + LATE, (kind, at, lo)
    assert recs == ({None, "exact", "absolute"} | (set() if handler else {"bound"})), recs
