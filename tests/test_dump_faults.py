"""Dumps that cannot succeed, and dumps of targets that change under ckpt's feet.

Every failure must be: one line on stderr (`ckpt: error: ...`), a non-zero exit, no image and
no temporary file left, and the target (when it still exists) running exactly as before and
still passing its own check. Changes of the target's layout during the dump (fork, mremap,
mmap/munmap, MADV_DONTNEED) are not failures: those dumps must succeed, verified.
"""
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from conftest import (dump_json, one_line_error, proc_status, run_ckpt, target_clean, uffd_wp_vmas,
                      wait_armed, NOBODY)

BIG_MB = 1024     # round 0 of a 1 GiB writer streams for a good while after the arm


def _outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def shared_dir():
    """A directory anyone can write into (pytest's own tmp dirs are root's, mode 0700)."""
    d = tempfile.mkdtemp(prefix="ckpt-test-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def small_tmpfs():
    """mount(DIR, tmpfs, size=2m); yields a function to remount it read-only; unmounted at teardown."""
    d = tempfile.mkdtemp(prefix="ckpt-tmpfs-", dir="/tmp")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", d], capture_output=True, text=True)
    if res.returncode:
        os.rmdir(d)
        pytest.skip("cannot mount a tmpfs here: %s" % res.stderr.strip())

    def remount_ro():
        subprocess.run(["mount", "-o", "remount,ro", d], check=True)
    remount_ro.path = d
    yield remount_ro
    if subprocess.run(["umount", d]).returncode:
        subprocess.run(["umount", "-l", d])
    os.rmdir(d)


# ------------------------------------------------------------------ refusals up front
def test_no_such_pid(tmp_path):
    out = _outdir(tmp_path)
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read())            # PIDs are below pid_max: this one is never in use
    for pid in (never, 0):
        rc, so, se = run_ckpt("dump", pid, "-o", out / "image")
        assert rc != 0
        line = one_line_error(se)
        assert "no process" in line or "invalid PID" in line, line
    assert os.listdir(out) == []


def test_pid_ckpt_may_not_trace(spawn, shared_dir):
    """ckpt as uid 65534 against a root-owned target."""
    t = spawn("writer", 16, 1, 1000)
    rc, so, se = run_ckpt("dump", t.pid, "-o", os.path.join(shared_dir, "image"), user="nobody")
    assert rc != 0
    line = one_line_error(se)
    assert "not allowed" in line and str(t.pid) in line, line
    target_clean(t, shared_dir, [])
    t.assert_ok()


def test_target_already_traced(spawn, tmp_path):
    t = spawn("writer", 16, 2, 1000)
    tracer = spawn("tracer", t.pid)           # PTRACE_SEIZE of the main thread, not stopped
    tids = sorted(int(x) for x in os.listdir("/proc/%d/task" % t.pid))
    tracers = {tid: proc_status(t.pid, tid)["TracerPid"] for tid in tids}
    assert tracers[t.pid] == str(tracer.pid)
    out = _outdir(tmp_path)
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", "--leave-running")
    assert rc != 0
    line = one_line_error(se)
    assert "already traced" in line and str(tracer.pid) in line, line
    assert os.listdir(out) == []
    # left as it was: still traced by the other tracer only, nothing of ckpt's in it
    for tid in tids:
        st = proc_status(t.pid, tid)
        assert st["TracerPid"] == tracers[tid] and not st["State"].startswith(("t", "T")), (tid, st["TracerPid"], st["State"])
    assert not uffd_wp_vmas(t.pid)
    tracer.kill()
    target_clean(t)
    t.assert_ok()


def test_output_directory_not_writable_by_ckpt_user(spawn):
    """ckpt as uid 65534, dumping its own uid's target into a root-owned 0755 directory."""
    t = spawn("writer", 16, 1, 1000, user="nobody")
    d = tempfile.mkdtemp(prefix="ckpt-ro-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        rc, so, se = run_ckpt("dump", t.pid, "-o", os.path.join(d, "image"), "--leave-running", user="nobody")
        assert rc != 0
        line = one_line_error(se)
        assert "cannot create the image" in line and "Permission denied" in line, line
        target_clean(t, d, [])
        t.assert_ok()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_output_directory_on_read_only_filesystem(spawn, small_tmpfs):
    t = spawn("writer", 16, 1, 1000)
    small_tmpfs()
    rc, so, se = run_ckpt("dump", t.pid, "-o", os.path.join(small_tmpfs.path, "image"), "--leave-running")
    assert rc != 0
    line = one_line_error(se)
    assert "Read-only file system" in line, line
    target_clean(t, small_tmpfs.path, [])
    t.assert_ok()


# ------------------------------------------------------------------ failures mid-dump
def test_output_filesystem_fills_up(spawn, small_tmpfs):
    """64 MiB of incompressible-enough pages, uncompressed, into a 2 MiB tmpfs."""
    t = spawn("writer", 64, 2, 0)
    before = t.assert_ok()
    rc, so, se = run_ckpt("dump", t.pid, "-o", os.path.join(small_tmpfs.path, "image"), "--leave-running",
                          "--compress", "none", "--verify")
    assert rc != 0
    line = one_line_error(se)
    assert "No space left on device" in line, line
    target_clean(t, small_tmpfs.path, [])
    t.assert_progress(before)


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("how", ["kill", "exit"])
def test_target_exits_during_round_0(spawn, tmp_path, mode, how):
    """The target ends itself the moment it finds itself armed (a page of its own turns
    write-protected), so its exit always falls into round 0, however loaded the machine: the
    dump fails saying the process exited, whichever call of ckpt's noticed it first."""
    t = spawn("exiter", BIG_MB, 0, how)
    out = _outdir(tmp_path)
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--mode", mode)
    assert rc != 0, "the dump of a process that exited during round 0 succeeded: %s" % so
    assert one_line_error(se) == "ckpt: error: process %d exited during the dump" % t.pid
    assert os.listdir(out) == []
    code, status = t.wait_exit()
    assert (code, status) == ((os.CLD_KILLED, signal.SIGKILL) if how == "kill" else (os.CLD_EXITED, 0))


@pytest.mark.parametrize("delay_ms", [20, 100, 400])
def test_target_exits_later_in_the_dump(spawn, tmp_path, delay_ms):
    """The target ends itself some time after the arm: in a later round, the freeze or after
    it. Either the dump is complete and verified, or it fails saying the process exited; never
    another error, and no file is left on failure."""
    t = spawn("exiter", 256, delay_ms, "kill", 4)
    out = _outdir(tmp_path)
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--verify", "--json")
    if rc == 0:
        assert dump_json(so)["verified"] is True
        assert os.listdir(out) == ["image"]
    else:
        assert one_line_error(se) == "ckpt: error: process %d exited during the dump" % t.pid
        assert os.listdir(out) == []
    t.wait_exit()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_ckpt_interrupted_mid_dump(spawn, start_ckpt, tmp_path, sig):
    t = spawn("writer", BIG_MB, 2, 0)
    before = t.assert_ok()
    out = _outdir(tmp_path)
    p = start_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--verify")
    assert wait_armed(t, ckpt_proc=p), "ckpt ended before arming: %s" % (p.communicate(),)
    p.send_signal(sig)
    so, se = p.communicate(timeout=300)
    assert p.returncode != 0, "ckpt finished although interrupted during round 0: %s" % so
    line = one_line_error(se)
    assert "interrupted by signal %d" % sig in line, line
    target_clean(t, out, [])
    t.assert_progress(before)


# ------------------------------------------------------------------ layout changes: must succeed
@pytest.mark.parametrize("name,args,mode", [
    ("forker", (256,), "async"),
    ("remapper", (256,), "async"),
    ("madviser", (256, 2), "async"),
    ("madviser", (256, 2), "stop-the-world"),
    ("remapper", (256,), "stop-the-world"),
], ids=["fork", "mremap-mmap", "madvise", "madvise-stop-the-world", "mremap-mmap-stop-the-world"])
def test_layout_changes_during_the_dump(spawn, start_ckpt, tmp_path, name, args, mode):
    """The target forks / moves and maps memory / drops it while ckpt streams and scans; it
    answers its self-check while armed (it runs on under the dump), and the dump succeeds,
    verified."""
    t = spawn(name, *args)
    before = t.assert_ok()
    out = _outdir(tmp_path)
    p = start_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--verify", "--json", "--mode", mode)
    if mode != "stop-the-world" and wait_armed(t, ckpt_proc=p) and p.poll() is None:
        t.assert_ok()          # answered while the dump was under way
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert dump_json(so)["verified"] is True
    target_clean(t, out, ["image"])
    t.assert_progress(before)


def test_layout_changes_during_a_sync_dump_never_give_a_silently_wrong_image(spawn, start_ckpt, tmp_path):
    """Sync mode (the fallback for kernels without WP_ASYNC) against a target that moves, grows
    and replaces its mappings. KNOWN OPEN BUG: now and then a write is not seen (about 1 dump
    in 10 here), so the dump may fail. What must hold every time: the image is verified or the
    consistency check refuses it naming the page; no image is left on failure; the target runs
    on exactly as before."""
    t = spawn("remapper", 256)
    before = t.assert_ok()
    out = _outdir(tmp_path)
    p = start_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--verify", "--json", "--mode", "sync")
    so, se = p.communicate(timeout=300)
    if p.returncode == 0:
        assert dump_json(so)["verified"] is True
        target_clean(t, out, ["image"])
    else:
        line = one_line_error(se)
        assert "verification failed: page 0x" in line, line
        target_clean(t, out, [])
    t.assert_progress(before)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "BUG (open): sync mode sees write faults only; a page dropped with MADV_DONTNEED loses "
    "its write-protection (anonymous memory keeps no marker), so the writes that refill it "
    "never fault and the image keeps its old content"))
def test_madvise_dontneed_during_a_sync_dump(spawn, tmp_path):
    """Up to five verified sync-mode dumps of the madviser; all must succeed (each one catches
    the bug on its own nearly always, so five passing would mean it is fixed)."""
    t = spawn("madviser", 256, 2)
    for i in range(5):
        rc, so, se = run_ckpt("dump", t.pid, "-o", tmp_path / ("image%d" % i), "--leave-running", "--verify",
                              "--mode", "sync")
        try:
            target_clean(t)      # whatever the outcome, the target is left as it was
        except AssertionError as e:
            raise RuntimeError("target not left clean: %s" % e) from None   # not the expected failure
        assert rc == 0, se
