"""eventfd, timerfd, signalfd and epoll fds: dumped (with --verify), killed, restored, and
checked by the target itself (tests/targets/restore/evfds.c): eventfd counters and semaphore
mode, unread timer expirations (also of a periodic timer the kernel left unarmed), relative and
absolute timers with their flags, a signalfd reading the SIGUSR1 queued before the dump, epoll
sets (nested, level and edge triggered, oneshot, exclusive, 64-bit data) reporting the same
ready items, and every item keyed by its fd number (EPOLL_CTL_MOD/DEL succeed on each).

The target prints only lines that do not depend on timing or fd numbers, except the time its
100 s timer has left, which is bounded instead: at most 100 s, at least 100 s minus the whole
time the test took (a restored relative timer keeps the time it had left at the freeze).
"""
import os
import signal
import time

import pytest

from conftest import one_line_error, proc_fds
from restore_support import (WAIT, alive, describe_status, dump, image_meta, procs, read_lines,  # noqa: F401
                             reap_killed, reference, restore_ok, rs_built, run_ckpt, status, subreaper,
                             wait_file_line, wait_gone)

TPER_FIRST_MS = 100000
KINDS = {"eventfd": 5, "timerfd": 5, "signalfd": 1, "epoll": 3}


def _split(lines):
    """(lines without the timer's time left, that time in ms)."""
    left = [int(x.split()[-1]) for x in lines if x.startswith("tper remaining_ms ")]
    assert len(left) == 1, lines[-5:]
    return [x for x in lines if not x.startswith("tper remaining_ms ")], left[0]


def _reference_lines():
    lines, rc = reference("evfds", 0).lines()
    assert rc == 0 and lines[-1] == "done", lines[-5:]
    assert not any(x.startswith(("ERROR", "CRASH")) for x in lines), lines
    return _split(lines)[0]


def _check(lines, want, t0):
    """The target's checks equal the uninterrupted run's; its timer's time left is plausible."""
    assert lines and lines[-1] == "done", "target did not finish its checks: %r" % lines[-5:]
    got, left = _split(lines)
    assert got[1:] == want[1:], _first_diff(got[1:], want[1:])
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert TPER_FIRST_MS - elapsed_ms - 1000 <= left <= TPER_FIRST_MS, \
        "the 100 s timer has %d ms left after a test of %d ms" % (left, elapsed_ms)


def _first_diff(got, want):
    for a, b in zip(got, want):
        if a != b:
            return "got %r, uninterrupted run printed %r" % (a, b)
    return "got %d lines, uninterrupted run %d" % (len(got), len(want))


def _kinds(img):
    counts = {}
    for e in image_meta(img)["fds"]:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    return {k: counts.get(k, 0) for k in KINDS}


def test_event_fds_come_back(procs, tmp_path):
    want = _reference_lines()
    out, img = tmp_path / "out", tmp_path / "image"
    t0 = time.monotonic()
    p, _ = procs.start("evfds", 1, stdout=out)
    wait_file_line(out, lambda s: s == "set up", proc=p)
    dump(p.pid, img)
    reap_killed(p)
    assert read_lines(out) == ["ready %d" % p.pid, "set up"], "the target went past its gate before the dump"
    assert _kinds(img) == KINDS, "fd kinds in the image: %s" % _kinds(img)
    timers = [e for e in image_meta(img)["fds"] if e["kind"] == "timerfd"]
    assert sorted(e["ticks"] for e in timers) == [0, 0, 0, 1, 1], timers
    pid, _, err = restore_ok(procs, img)
    assert pid == p.pid
    assert not err.strip(), "restore warned: %s" % err
    os.kill(pid, signal.SIGUSR2)
    st = wait_gone(pid)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, \
        "restored target: %s; output %r" % (describe_status(st), read_lines(out)[-5:])
    _check(read_lines(out), want, t0)


def test_leave_running_dumps_do_not_disturb(procs, tmp_path):
    """Two dumps that leave the target running: its fds are the same, nothing is left traced,
    and its own checks afterwards equal an undisturbed run's (the dump asks each timer its time,
    which rearms a periodic one that expired: invisible to the target's reads)."""
    want = _reference_lines()
    out = tmp_path / "out"
    t0 = time.monotonic()
    p, _ = procs.start("evfds", 1, stdout=out)
    wait_file_line(out, lambda s: s == "set up", proc=p)
    fds = proc_fds(p.pid)
    for n in range(2):
        img = tmp_path / ("image%d" % n)
        dump(p.pid, img, "--leave-running")
        assert _kinds(img) == KINDS
        assert alive(p.pid), "the target did not survive dump %d" % n
        assert status(p.pid)["TracerPid"] == "0"
        assert proc_fds(p.pid) == fds, "the target's fds changed"
    os.kill(p.pid, signal.SIGUSR2)
    assert p.wait(timeout=WAIT) == 0, read_lines(out)[-5:]
    _check(read_lines(out), want, t0)


@pytest.mark.parametrize("mode,why", [("closed", "was closed after being added"),
                                      ("reused", "is now another file")])
def test_epoll_item_of_a_closed_fd_is_refused(procs, tmp_path, mode, why):
    """An epoll item whose fd number no longer refers to the file it was added with (the file
    lives on as another fd) cannot be keyed the same at restore: the dump refuses, naming the
    epoll fd and the fd, leaves no image, and the target runs on exactly as before."""
    want = _reference_lines()
    out, img = tmp_path / "out", tmp_path / "image"
    t0 = time.monotonic()
    p, _ = procs.start("evfds", 1, mode, stdout=out)
    stale = wait_file_line(out, lambda s: s.startswith("stale "), proc=p)
    wait_file_line(out, lambda s: s == "set up", proc=p)
    epfd, tfd = (int(x) for x in stale.split()[1:])
    fds = proc_fds(p.pid)
    rc, _, err = run_ckpt("dump", p.pid, "-o", img, "--verify")
    assert rc != 0, "the dump succeeded"
    line = one_line_error(err)
    for part in ("process %d: fd %d " % (p.pid, epfd), "epoll", "fd %d is registered" % tfd, why):
        assert part in line, "%r not in %r" % (part, line)
    assert sorted(os.listdir(tmp_path)) == ["out", "out.err"], "files left: %s" % os.listdir(tmp_path)
    assert alive(p.pid) and status(p.pid)["TracerPid"] == "0"
    assert proc_fds(p.pid) == fds, "the target's fds changed"
    os.kill(p.pid, signal.SIGUSR2)
    assert p.wait(timeout=WAIT) == 0, read_lines(out)[-5:]
    lines = read_lines(out)
    assert lines[1] == stale
    _check(lines[:1] + lines[2:], want, t0)
