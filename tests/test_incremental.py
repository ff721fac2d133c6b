"""Tracking kept between dumps (`ckpt dump --leave-running --keep-tracking`, `ckpt untrack`)
and incremental images (`ckpt dump --parent IMG`), restored as a chain.

The target (tests/targets/restore/incr.c) changes its memory a little in each phase (writes,
MADV_DONTNEED, a new mapping, an unmapping, a mapping replaced at the same address), checks
its whole memory against the checksum it recorded at the end of the previous phase, and
prints the checksum of each phase: a restored chain must print exactly what an uninterrupted
run prints. Every dump runs with --verify (the incremental ones compare the frozen process with
the whole chain).
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

from restore_support import (WAIT, alive, dump, procs, read_lines, reap_killed, reference, restore,  # noqa: F401
                             restore_ok, rewrite_image, run_ckpt, same_after_ready, subreaper, wait_file_line,
                             wait_gone, rs_built)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ckpt.dump import keep  # noqa: E402
from ckpt.image.reader import ImageReader  # noqa: E402

MIB = 8


def _uw_mappings(pid):
    """How many mappings of pid are registered for write-protect tracking (VmFlags "uw")."""
    with open("/proc/%d/smaps" % pid) as f:
        return sum(1 for line in f if line.startswith("VmFlags:") and " uw" in line)


def _uffds(pid):
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if "userfaultfd" in os.readlink("/proc/%d/fd/%s" % (pid, fd)):
                out.append(fd)
        except OSError:
            pass
    return out


def _comm(pid):
    with open("/proc/%d/comm" % pid) as f:
        return f.read().strip()


def _step(p, out, k):
    """Let the target run phase k; wait for its line."""
    os.kill(p.pid, signal.SIGUSR2)
    line = wait_file_line(out, lambda s: s.startswith("phase %d " % k), proc=p)
    assert "check %d ok" % (k - 1) in read_lines(out), read_lines(out)[-4:]
    return line


def _pages(img):
    """Pages the image file itself holds (not counting its parents)."""
    with ImageReader(str(img)) as r:
        return r.page_bytes()[0]


def _start(procs, tmp_path):
    out = tmp_path / "out"
    p, _ = procs.start("incr", MIB, stdout=out)
    wait_file_line(out, lambda s: s.startswith("phase 0 "), proc=p)
    return p, out


def _untrack_at_end(pid):
    """End of a test: the tracking ended, and its holders reaped (a holder's parent exits at
    once: it is reparented to the test process, a child subreaper)."""
    try:
        keep.untrack(pid)
    except Exception:
        pass
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            holder = int(fields[1]) == os.getpid() and _comm(int(name)) == keep.HOLDER_NAME
        except (OSError, ValueError, IndexError):
            continue
        if holder:
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(int(name))


def test_keep_tracking_then_untrack(procs, tmp_path):
    p, out = _start(procs, tmp_path)
    try:
        res = dump(p.pid, tmp_path / "i1", "--leave-running", "--keep-tracking")
        holder = res["tracking"]["holder"]
        assert res["tracking"]["base"] == res["image_id"]
        # held by a process of ckpt's, not by an fd of the target
        assert alive(holder) and _comm(holder) == "ckpt-track"
        assert not _uffds(p.pid), "the target holds a userfaultfd"
        assert _uffds(holder), "the holder holds no userfaultfd"
        assert _uw_mappings(p.pid) > 0, "nothing of the target is tracked"
        st = os.stat(keep.state_path(p.pid))
        assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(keep.STATE_DIR).st_mode) == 0o700
        with open(keep.state_path(p.pid)) as f:
            state = json.load(f)
        assert state["holder"] == holder and state["base"] == res["image_id"] and state["ranges"]
        held = keep.find(p.pid)
        assert held is not None and held.base == res["image_id"] and held.holder == holder
        # the target runs on, tracked
        _step(p, out, 1)
        rc, o, e = run_ckpt("untrack", p.pid)
        assert rc == 0, e
        wait_gone(holder)
        assert _uw_mappings(p.pid) == 0, "protection left on the target after untrack"
        assert not _uffds(p.pid)
        assert not os.path.exists(keep.state_path(p.pid))
        assert keep.find(p.pid) is None
        _step(p, out, 2)        # its memory checked by itself, and it runs on
        rc, o, e = run_ckpt("untrack", p.pid)
        assert rc != 0 and "no tracking kept for process %d" % p.pid in e, (rc, e)
    finally:
        _untrack_at_end(p.pid)


def test_holder_exits_when_target_exits(procs, tmp_path):
    p, out = _start(procs, tmp_path)
    res = dump(p.pid, tmp_path / "i1", "--leave-running", "--keep-tracking")
    holder = res["tracking"]["holder"]
    assert alive(holder)
    p.kill()
    p.wait(timeout=WAIT)
    wait_gone(holder)
    assert not os.path.exists(keep.state_path(p.pid))
    _untrack_at_end(p.pid)


def test_chain_of_three_restored(procs, tmp_path):
    """Full image, then two incremental ones (the last kills): the chain restored computes
    exactly what an uninterrupted run computes."""
    want = reference("incr", MIB, "auto")
    p, out = _start(procs, tmp_path)
    i1, i2, i3 = tmp_path / "i1", tmp_path / "i2", tmp_path / "i3"
    try:
        r1 = dump(p.pid, i1, "--leave-running", "--keep-tracking")
        _step(p, out, 1)       # writes, MADV_DONTNEED, a new mapping
        r2 = dump(p.pid, i2, "--parent", i1, "--leave-running", "--keep-tracking")
        assert r2["parent"] == {"image_id": r1["image_id"], "path": str(i1)}
        assert r2["tracking"]["holder"] == r1["tracking"]["holder"]     # the same holder, rebased
        assert keep.find(p.pid).base == r2["image_id"]
        _step(p, out, 2)       # a mapping replaced at the same address, an unmapping, drops
        r3 = dump(p.pid, i3, "--parent", i2)
        reap_killed(p)
        wait_gone(r1["tracking"]["holder"])
    finally:
        _untrack_at_end(p.pid)
    full = _pages(i1)
    assert full >= MIB * 256
    for img in (i2, i3):
        # a few dozen pages written between dumps: the incremental image holds about that many
        assert _pages(img) * 10 < full, (img, _pages(img), full)
    rc, o, e = run_ckpt("verify", i3)
    assert rc == 0 and "chain of 3 images" in o, (o, e)
    rc, o, e = run_ckpt("info", i3, "--json")
    info = json.loads(o)
    assert info["parent"] == {"image_id": r2["image_id"], "path": str(i2)} and info["image_id"] == r3["image_id"]
    assert info["chain"] == [str(i3), str(i2), str(i1)]
    pid, _, err = restore_ok(procs, i3)
    assert pid == p.pid
    os.kill(pid, signal.SIGUSR2)
    wait_file_line(out, lambda s: s.startswith("phase 3 "))
    os.kill(pid, signal.SIGUSR2)
    st = wait_gone(pid)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    lines, _ = want.lines()
    same_after_ready(read_lines(out), lines)


def test_full_dump_of_tracked_process(procs, tmp_path):
    """A full dump of a tracked process uses the held tracking: with --keep-tracking it counts
    from the new image (an incremental dump from the old one is refused); without, the
    tracking ends, as a dump without --keep-tracking always leaves the process."""
    p, out = _start(procs, tmp_path)
    i1, i2, i3, i4 = (tmp_path / n for n in ("i1", "i2", "i3", "i4"))
    try:
        r1 = dump(p.pid, i1, "--leave-running", "--keep-tracking")
        _step(p, out, 1)
        r2 = dump(p.pid, i2, "--leave-running", "--keep-tracking")
        assert _pages(i2) >= MIB * 256 and r2["parent"] is None
        assert r2["tracking"]["holder"] == r1["tracking"]["holder"]
        rc, o, e = run_ckpt("dump", p.pid, "-o", i3, "--parent", i1, "--leave-running")
        assert rc != 0 and "no tracking kept for process %d since %s" % (p.pid, i1) in e, e
        assert not i3.exists()
        _step(p, out, 2)
        dump(p.pid, i3, "--parent", i2, "--leave-running", "--keep-tracking")
        dump(p.pid, i4, "--leave-running")          # no --keep-tracking: the tracking ends
        wait_gone(r1["tracking"]["holder"])
        assert keep.find(p.pid) is None and _uw_mappings(p.pid) == 0
        _step(p, out, 3)
    finally:
        _untrack_at_end(p.pid)


def test_refusals(procs, tmp_path):
    p, out = _start(procs, tmp_path)
    img = tmp_path / "img"
    try:
        rc, o, e = run_ckpt("dump", p.pid, "-o", img, "--keep-tracking")
        assert rc != 0 and "--keep-tracking needs --leave-running" in e, e
        rc, o, e = run_ckpt("dump", p.pid, "-o", img, "--keep-tracking", "--leave-running", "--mode", "stop-the-world")
        assert rc != 0 and "needs the async mode" in e, e
        dump(p.pid, tmp_path / "plain", "--leave-running")
        rc, o, e = run_ckpt("dump", p.pid, "-o", img, "--parent", tmp_path / "plain", "--leave-running")
        assert rc != 0 and "no tracking kept for process %d since" % p.pid in e, e
        rc, o, e = run_ckpt("dump", p.pid, "-o", img, "--parent", tmp_path / "nothing", "--leave-running")
        assert rc != 0 and "nothing" in e, e
        dump(p.pid, tmp_path / "i1", "--leave-running", "--keep-tracking")
        rc, o, e = run_ckpt("dump", p.pid, "-o", tmp_path / "i1", "--parent", tmp_path / "i1", "--leave-running")
        assert rc != 0 and "cannot replace its own parent" in e, e
        assert not img.exists()
        assert alive(p.pid)
        _step(p, out, 1)        # the refused dumps left it as it was
        # the tracking is still there, counting from i1
        dump(p.pid, img, "--parent", tmp_path / "i1", "--leave-running")
    finally:
        _untrack_at_end(p.pid)
    # a process with a child: one process only
    sh = subprocess.Popen(["sh", "-c", "sleep 1000 & echo started; wait"], stdout=subprocess.PIPE,
                          start_new_session=True)
    try:
        assert sh.stdout.readline() == b"started\n"       # its child exists
        rc, o, e = run_ckpt("dump", sh.pid, "-o", tmp_path / "tree", "--leave-running", "--keep-tracking")
        assert rc != 0 and "has descendants" in e and "--single" in e, e
    finally:
        os.killpg(sh.pid, signal.SIGKILL)
        sh.wait()


def test_missing_foreign_or_cyclic_parent_refused(procs, tmp_path):
    p, out = _start(procs, tmp_path)
    other, i1, i2 = tmp_path / "other", tmp_path / "i1", tmp_path / "i2"
    try:
        dump(p.pid, other, "--leave-running")
        r1 = dump(p.pid, i1, "--leave-running", "--keep-tracking")
        _step(p, out, 1)
        r2 = dump(p.pid, i2, "--parent", i1)
        reap_killed(p)
        wait_gone(r1["tracking"]["holder"])
    finally:
        _untrack_at_end(p.pid)
    moved = tmp_path / "moved"
    os.rename(i1, moved)
    rc, o, e = restore(procs, i2)
    assert rc != 0 and "its parent image %s is missing" % i1 in e, e
    rc, o, e = run_ckpt("verify", i2)
    assert rc != 0 and "missing" in e, e
    shutil.copy(other, i1)
    rc, o, e = restore(procs, i2)
    assert rc != 0 and "its parent image %s is another image" % i1 in e, e
    # i1 made to name i2 as its parent: a cycle
    rewrite_image(moved, i1, lambda m: m["dump"].update(parent={"image_id": r2["image_id"], "path": str(i2)}))
    rc, o, e = restore(procs, i2)
    assert rc != 0 and "cycle" in e, e
    assert not alive(p.pid)
    os.replace(moved, i1)
    pid, _, _ = restore_ok(procs, i2)
    os.kill(pid, signal.SIGUSR2)
    wait_file_line(out, lambda s: s.startswith("phase 2 "))
    assert "check 1 ok" in read_lines(out)


def test_failed_incremental_dump_keeps_tracking_without_base(procs, tmp_path):
    """An incremental dump interrupted once it has taken the kept tracking (its scan re-armed the
    written bits): no image, the target runs on, still tracked by the same holder, but counting
    from no image: a later --parent dump is refused; a full dump with --keep-tracking starts
    over."""
    from ckpt.dump.session import DumpOptions, dump as do_dump
    from ckpt.errors import DumpInterrupted
    p, out = _start(procs, tmp_path)
    i1, i2 = tmp_path / "i1", tmp_path / "i2"
    try:
        r1 = dump(p.pid, i1, "--leave-running", "--keep-tracking")
        _step(p, out, 1)
        armed = []
        opts = DumpOptions(output=str(i2), leave_running=True, keep_tracking=True, parent=str(i1),
                           progress=lambda info: armed.append(info["event"]),
                           interrupted=lambda: signal.SIGINT if "arm" in armed else None)
        try:
            do_dump(p.pid, opts)
            raise AssertionError("the dump was not interrupted")
        except DumpInterrupted:
            pass
        assert "arm" in armed and not i2.exists()
        held = keep.find(p.pid)
        assert held is not None and held.holder == r1["tracking"]["holder"] and held.base is None
        assert _uw_mappings(p.pid) > 0
        _step(p, out, 2)
        rc, o, e = run_ckpt("dump", p.pid, "-o", i2, "--parent", i1, "--leave-running")
        assert rc != 0 and "no tracking kept for process %d since" % p.pid in e, e
        r3 = dump(p.pid, tmp_path / "i3", "--leave-running", "--keep-tracking")
        assert keep.find(p.pid).base == r3["image_id"]
        _step(p, out, 3)
        dump(p.pid, tmp_path / "i4", "--parent", tmp_path / "i3", "--leave-running")
    finally:
        _untrack_at_end(p.pid)
