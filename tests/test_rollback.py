"""`ckpt restore IMAGE --into PID`: a running process rolled back to an image of itself.

A deterministic target is dumped with --leave-running (the snapshot), let run on, and rolled
back (with --verify: every page compared with the image while frozen, after the rollback);
let run again, it must print exactly the lines it printed after the snapshot, and in the end
exactly what an uninterrupted run prints. The targets change their layout (mmap, munmap,
mremap), threads and fds between snapshot and rollback. Refusals leave the process running
as it was.

Targets: tests/targets/restore/compute.c, pyroll.py; helpers: tests/restore_support.py.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import one_line_error
from restore_support import (WAIT, alive, dump, procs, reference, rs_built, run_ckpt, subreaper, tids,  # noqa: F401
                             wait_gone)

# compute THREADS STEPS EVERY MIB GATE EXIT PAUSE_US CREDIT: each SIGUSR2 allows CREDIT more steps
COMPUTE = (4, 160, 10, 32, -1, 0, 0, 40)
# pyroll.py STEPS EVERY CREDIT
PYROLL = (90, 5, 20)


def _iter(line):
    return line is not None and line.startswith("iter ")


def _read_until(reader, step):
    """Lines from the target's pipe up to and including "iter STEP"."""
    got = []
    while True:
        line = reader.readline()
        assert line is not None, "the target's output ended early: %r" % got[-5:]
        got.append(line)
        if line == "" or line.split()[:2] == ["iter", str(step)]:
            return got


def rollback(pid, img, *extra):
    rc, out, err = run_ckpt("restore", img, "--into", pid, "--json", *extra)
    assert rc == 0, "rollback of %d failed: %s" % (pid, err.strip())
    assert not err.strip(), "rollback warned: %s" % err
    return json.loads(out)


def _scenario(procs, tmp_path, name, args, credit, rounds=3, dump_extra=(), check=None):
    """Start, let it reach the first credit stop, snapshot, then `rounds` times: let it run one
    credit further, roll it back, and check it prints the same lines again. Returns the
    rollbacks' results."""
    ref = reference(name, *(list(args[:-1]) + [10 ** 6]))       # runs meanwhile
    p, reader = procs.start(name, *args, stdout=subprocess.PIPE)
    every = args[2] if name == "compute" else args[1]
    first = _read_until(reader, credit)
    img = tmp_path / "snapshot"
    dump(p.pid, img, "--leave-running", *dump_extra)
    results = []
    after = None
    for k in range(rounds):
        os.kill(p.pid, signal.SIGUSR2)
        lines = _read_until(reader, 2 * credit)
        if after is None:
            after = lines
        assert lines == after, "round %d: after the rollback the target printed %r, after the snapshot %r" % (
            k, lines, after)
        res = rollback(p.pid, img, "--verify")
        assert res["verified"] and res["pages_verified"] > 0, res
        assert alive(p.pid) and res["pid"] == p.pid
        if check:
            check(res, k)
        results.append(res)
    # rolled back, then let run to its end: exactly what an uninterrupted run prints
    os.kill(p.pid, signal.SIGUSR1)
    rest = reader.read_all()
    assert first + rest == ref.lines()[0][1:], "output differs from an uninterrupted run"
    assert p.wait(timeout=WAIT) == 0
    assert len(after) == credit // every
    return results


def test_threads_rolled_back_three_times(procs, tmp_path):
    """Four threads over 32 MiB (every page written each step): three rollbacks, each written
    only where the process differs from the image, the same thread IDs."""
    results = _scenario(procs, tmp_path, "compute", COMPUTE, COMPUTE[-1])
    for res in results:
        assert res["tracking"] is False
        assert res["pages_written"] > 1000, res     # every page of the 32 MiB was rewritten
        assert res["pages_identical"] > 0, res      # the code, libraries, what it did not touch
        assert res["threads_ended"] == [] and res["threads_made"] == []
        assert res["fds_closed"] == [] and res["fds_made"] == []


def test_python_layout_threads_fds_changed_since(procs, tmp_path):
    """A Python program that maps, unmaps and resizes regions, opens and closes fds and starts
    threads between the snapshot and each rollback: those are put back (unmapped, mapped,
    closed, reopened, ended) and it goes on exactly as after the snapshot."""
    def check(res, k):
        assert res["mappings_unmapped"] > 0 and res["mappings_mapped"] > 0, res
        assert res["fds_closed"] and res["fds_made"], res
        assert res["threads_ended"], res        # the helper thread started since
        assert res["threads_made"], res         # the one alive at the snapshot, joined since
    _scenario(procs, tmp_path, "pyroll.py", PYROLL, PYROLL[-1], check=check)


def test_kept_tracking_compares_only_what_was_written(procs, tmp_path):
    """With the tracking kept since the snapshot, a rollback compares only the pages written
    since (the holder's flags), far fewer than a rollback without it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _scenario(procs, tmp_path / "a", "pyroll.py", PYROLL, PYROLL[-1], rounds=1)

    def check(res, k):
        assert res["tracking"] is True, res
        assert res["pages_compared"] < full[0]["pages_compared"] / 2, (res["pages_compared"], full[0]["pages_compared"])
    _scenario(procs, tmp_path / "b", "pyroll.py", PYROLL, PYROLL[-1], rounds=2, dump_extra=("--keep-tracking",),
              check=check)


# ------------------------------------------------------------------ refusals
def _running_on(p, reader, credit):
    """The process still runs as before: the next SIGUSR2 lets it advance."""
    os.kill(p.pid, signal.SIGUSR2)
    line = reader.readline()
    assert _iter(line), line


def test_refused_another_pid_not_running_bad_image(procs, tmp_path):
    a, _ = procs.start("compute", *COMPUTE, stdout=subprocess.PIPE)
    b, reader = procs.start("compute", *COMPUTE, stdout=subprocess.PIPE)
    img = tmp_path / "a"
    dump(a.pid, img, "--leave-running")
    rc, _, err = run_ckpt("restore", img, "--into", b.pid)
    assert rc != 0 and "is an image of process %d, not %d" % (a.pid, b.pid) in one_line_error(err)
    _running_on(b, reader, COMPUTE[-1])
    assert _tracer(b.pid) == 0
    a.kill()
    a.wait(timeout=WAIT)
    rc, _, err = run_ckpt("restore", img, "--into", a.pid)
    assert rc != 0 and "not running" in one_line_error(err)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image" * 100)
    rc, _, err = run_ckpt("restore", junk, "--into", b.pid)
    assert rc != 0
    one_line_error(err)
    _running_on(b, reader, COMPUTE[-1])


def _refused_after(tmp_path, script, changed, message):
    """A shell snapshotted while it waits for a line; given it, it runs the rest of `script`;
    once changed(pid) holds, a rollback is refused with `message`, the shell left untouched."""
    sh = subprocess.Popen(["sh", "-c", "read x; " + script], stdin=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(0.2)
        img = tmp_path / "sh"
        dump(sh.pid, img, "--leave-running")
        sh.stdin.write(b"go\n")
        sh.stdin.flush()
        deadline = time.monotonic() + WAIT
        while not changed(sh.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rc, _, err = run_ckpt("restore", img, "--into", sh.pid)
        assert rc != 0 and message in one_line_error(err)
        assert alive(sh.pid) and _tracer(sh.pid) == 0
    finally:
        os.killpg(sh.pid, signal.SIGKILL)
        sh.wait(timeout=WAIT)


def test_refused_other_program_after_exec(procs, tmp_path):
    """A process that exec()ed another program since the snapshot is refused, untouched."""
    _refused_after(tmp_path, "exec sleep 1000", lambda pid: not os.readlink("/proc/%d/exe" % pid).endswith("sh"),
                   "not the image's program")


def test_refused_children(procs, tmp_path):
    """A process with children (forked since) is refused: they would be left behind."""
    _refused_after(tmp_path, "sleep 1000 & read y", _children, "has children")


def test_interrupted_before_the_freeze_leaves_it_as_it_was(procs, tmp_path):
    """SIGINT while the rollback compares (a large target): the process runs on untouched (no
    tracer, no write protection left, no uffd), and a later rollback still works."""
    args = (2, 4000, 10, 512, -1, 0, 0, 10)
    p, reader = procs.start("compute", *args, stdout=subprocess.PIPE)
    _read_until(reader, 10)
    img = tmp_path / "big"
    dump(p.pid, img, "--leave-running")
    os.kill(p.pid, signal.SIGUSR2)
    after = _read_until(reader, 20)
    interrupted = False
    for attempt in range(3):
        ck = procs.popen_ckpt("restore", str(img), "--into", str(p.pid))
        # once its memory is write-protected (smaps: "uw"), the rollback is comparing
        deadline = time.monotonic() + WAIT
        while ck.poll() is None and not _protected(p.pid):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        ck.send_signal(signal.SIGINT)
        _, err = ck.communicate(timeout=WAIT)
        if ck.returncode != 0:
            assert "interrupted" in one_line_error(err) and "left running as it was" in err
            interrupted = True
            break
        # it finished first: rolled back; let it run past the snapshot again and retry
        os.kill(p.pid, signal.SIGUSR2)
        assert _read_until(reader, 20) == after
    assert interrupted, "the rollback always finished before the SIGINT"
    assert _tracer(p.pid) == 0
    assert not _uffd_in(p.pid)
    assert not _protected(p.pid)
    res = rollback(p.pid, img, "--verify")
    assert res["verified"]
    os.kill(p.pid, signal.SIGUSR2)
    assert _read_until(reader, 20) == after


def _protected(pid):
    """Whether any mapping of the process is registered for write-protect tracking."""
    with open("/proc/%d/smaps" % pid) as f:
        return any(line.startswith("VmFlags:") and " uw" in line for line in f)


def _tracer(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return None


def _children(pid):
    out = []
    for t in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, t)) as f:
            out += f.read().split()
    return out


def _uffd_in(pid):
    fds = "/proc/%d/fd" % pid
    return any("userfaultfd" in os.readlink(os.path.join(fds, f)) for f in os.listdir(fds))


def test_incremental_chain_and_back_and_forth(procs, tmp_path):
    """Snapshot IMG1 (tracking kept), run on, incremental IMG2 (--parent IMG1), run on; roll
    back to IMG2 (tracking counts from it: only written pages compared), then to IMG1 (the
    tracking does not count from it: all compared), each time printing again what followed it."""
    args = (4, 400, 10, 16, -1, 0, 0, 40)
    p, reader = procs.start("compute", *args, stdout=subprocess.PIPE)
    _read_until(reader, 40)
    img1, img2 = tmp_path / "img1", tmp_path / "img2"
    dump(p.pid, img1, "--leave-running", "--keep-tracking")
    os.kill(p.pid, signal.SIGUSR2)
    after1 = _read_until(reader, 80)
    dump(p.pid, img2, "--leave-running", "--keep-tracking", "--parent", str(img1))
    os.kill(p.pid, signal.SIGUSR2)
    after2 = _read_until(reader, 120)
    res = rollback(p.pid, img2, "--verify")
    assert res["tracking"] is True and res["verified"], res
    os.kill(p.pid, signal.SIGUSR2)
    assert _read_until(reader, 120) == after2
    res = rollback(p.pid, img1, "--verify")
    assert res["tracking"] is False and res["verified"], res
    os.kill(p.pid, signal.SIGUSR2)
    assert _read_until(reader, 80) == after1
    # the tracking now counts from IMG1: a rollback to it compares only what was written since
    res = rollback(p.pid, img1, "--verify")
    assert res["tracking"] is True, res
    os.kill(p.pid, signal.SIGUSR2)
    assert _read_until(reader, 80) == after1
    rc, _, err = run_ckpt("untrack", p.pid)
    assert rc == 0, err


@pytest.mark.parametrize("mode", ["timers", "sched", "membarrier"])
def test_process_state_rolled_back(procs, tmp_path, mode):
    """POSIX timers (IDs, time left, pending expiries: those of the process now deleted and the
    image's made again), scheduling per thread, membarrier registrations: rolled back, the
    target checks its own state and finds it as it was."""
    p, reader = procs.start("ltstate", mode, stdout=subprocess.PIPE)
    before = reader.readline()
    assert before.startswith("before")
    img = tmp_path / "img"
    dump(p.pid, img, "--leave-running")
    res = rollback(p.pid, img, "--verify")
    assert res["verified"], res
    os.kill(p.pid, signal.SIGUSR2)
    rest = reader.read_all()
    assert rest and rest[-1] == "done", rest
    assert not [line for line in rest if "BAD" in line], rest
    assert p.wait(timeout=WAIT) == 0


def test_ckpt_killed_in_the_freeze_kills_the_process(procs, tmp_path):
    """ckpt SIGKILLed while it rolls the process back (in the freeze): the process dies with it,
    or, killed before it changed anything, goes on as it was; never half rolled back."""
    args = (2, 4000, 10, 256, -1, 0, 0, 10)
    for attempt in range(3):
        p, reader = procs.start("compute", *args, stdout=subprocess.PIPE)
        _read_until(reader, 10)
        img = tmp_path / ("img%d" % attempt)
        dump(p.pid, img, "--leave-running")
        os.kill(p.pid, signal.SIGUSR2)          # every page written since: a long freeze
        _read_until(reader, 20)
        ck = procs.popen_ckpt("restore", str(img), "--into", str(p.pid), "--verify")
        # the freeze: every thread stopped for more than 20 ms (the stop that registers the
        # mappings, before the comparison, lasts about a millisecond)
        deadline = time.monotonic() + WAIT
        since = None
        while ck.poll() is None:
            assert time.monotonic() < deadline
            now = time.monotonic()
            if not _frozen(p.pid):
                since = None
            elif since is None:
                since = now
            elif now - since > 0.02:
                break
            time.sleep(0.001)
        ck.kill()
        ck.communicate(timeout=WAIT)
        if ck.returncode != -signal.SIGKILL:
            os.killpg(p.pid, signal.SIGKILL)    # finished first: try again
            p.wait(timeout=WAIT)
            continue
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        if rc == -signal.SIGKILL:
            return
        # killed before it changed anything: the process goes on from where it was
        assert rc is None and _tracer(p.pid) == 0
        os.kill(p.pid, signal.SIGUSR2)
        assert reader.readline().startswith("iter 30 ")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=WAIT)
    pytest.fail("ckpt was never killed in the part of the freeze that changes the process")


def _frozen(pid):
    """Every thread of the process in a ptrace stop (the freeze)."""
    states = []
    for t in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/stat" % (pid, t)) as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return states and all(s == "t" for s in states)


def test_kept_tracking_used_by_one_ckpt_at_a_time(procs, tmp_path):
    """While another ckpt holds a process's kept tracking (its lock), a rollback or a dump of
    it is refused, naming that, and the process goes on untouched; once let go, both work."""
    import fcntl
    p, reader = procs.start("compute", *COMPUTE, stdout=subprocess.PIPE)
    _read_until(reader, COMPUTE[-1])
    img = tmp_path / "img"
    dump(p.pid, img, "--leave-running", "--keep-tracking")
    fd = os.open("/run/ckpt/tracking/%d.lock" % p.pid, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for args in (("restore", img, "--into", p.pid), ("dump", p.pid, "-o", tmp_path / "img2", "--leave-running")):
            rc, _, err = run_ckpt(*args)
            assert rc != 0 and "another ckpt is using its kept tracking" in one_line_error(err), err
            assert _tracer(p.pid) == 0
        assert not (tmp_path / "img2").exists()
    finally:
        os.close(fd)
    os.kill(p.pid, signal.SIGUSR2)
    after = _read_until(reader, 2 * COMPUTE[-1])
    res = rollback(p.pid, img, "--verify")
    assert res["tracking"] is True
    os.kill(p.pid, signal.SIGUSR2)
    assert _read_until(reader, 2 * COMPUTE[-1]) == after
    rc, _, err = run_ckpt("untrack", p.pid)
    assert rc == 0, err
