"""The long tail of the fd table (issue 10): status flags of every end of a pipe (one process
and a tree), FIFOs reopened by their path, inotify watches, file locks, deleted files. Each
target is dumped (--verify), killed, restored, and checks itself: the lines it prints after
its gate say what it found (tests/targets/restore/fdflags.c, ...)."""
import fcntl
import os
import signal
import struct
import subprocess

import pytest  # noqa: F401

from conftest import one_line_error
from restore_support import (WAIT, LineReader, ckpt_argv, describe_status, dump, image_meta, procs,  # noqa: F401
                             read_lines, reap_killed, reap_orphans, restore, restore_ok, rs_built, run_ckpt, status,
                             subreaper, wait_file_line, wait_gone)
from ckpt.kernel import procfs


def _gated(procs, tmp_path, name, *args):
    """Start a target (stdout to a file), wait for its "set up" line; returns (Popen, out)."""
    out = tmp_path / "out"
    p, _ = procs.start(name, *args, stdout=out)
    wait_file_line(out, lambda s: s == "set up" or s.startswith(("BAD", "ERROR", "CRASH")), proc=p)
    assert read_lines(out)[-1] == "set up", read_lines(out)
    return p, out


def _dump_kill_restore(procs, tmp_path, p, *dump_args):
    """Dump p and its descendants (--verify), reap them all, restore; returns the image."""
    img = tmp_path / "image"
    kids = [i["pid"] for i in procfs.descendants(p.pid)]
    for pid in kids:
        procs.adopt(pid)
    dump(p.pid, img, *dump_args)
    reap_killed(p)
    reap_orphans(kids)
    pid, _, err = restore_ok(procs, img)
    assert pid == p.pid
    return img, err


def _finish(pid, out):
    """Open the restored target's gate, wait for its end; returns its lines after "set up"."""
    os.kill(pid, signal.SIGUSR2)
    st = wait_gone(pid)
    lines = read_lines(out)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, \
        "restored target: %s; output %r" % (describe_status(st), lines[-5:])
    assert lines[-1] == "done", lines[-5:]
    return lines[lines.index("set up") + 1:-1]


# ------------------------------------------------------------------ 1. status flags
def test_flags_of_pipe_ends_and_files(procs, tmp_path):
    p, out = _gated(procs, tmp_path, "fdflags", "one", tmp_path)
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert not err.strip(), err
    got = _finish(p.pid, out)
    assert got == ["ok one 23"], got


def test_flags_of_pipe_ends_across_a_tree(procs, tmp_path):
    p, out = _gated(procs, tmp_path, "fdflags", "tree", tmp_path)
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert not err.strip(), err
    got = _finish(p.pid, out)
    assert sorted(got) == ["ok child 6", "ok parent 9"], got


# ------------------------------------------------------------------ 2. FIFOs
def _fifo_fds(pids, path):
    """{pid: [fd numbers whose /proc link is path]}"""
    out = {}
    for pid in pids:
        d = "/proc/%d/fd" % pid
        out[pid] = sorted(int(n) for n in os.listdir(d) if os.readlink(os.path.join(d, n)) == str(path))
    return out


def test_fifo_joins_a_writer_and_its_reader_again(procs, tmp_path):
    """A parent writing and its child reading through a FIFO, with 3000 bytes queued at the
    dump: both fds come back opened by the FIFO's path (the parent opens the path again after
    the restore and the child reads what it writes through it too), with the queued bytes, in
    order, once."""
    path = tmp_path / "fifo"
    p, out = _gated(procs, tmp_path, "fifo", "tree", path)
    kid = [i["pid"] for i in procfs.descendants(p.pid)]
    before = _fifo_fds([p.pid] + kid, path)
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert not err.strip(), err
    fifos = [e for e in image_meta(img)["fds"] + [e for q in image_meta(img)["tree"]["processes"] for e in q["fds"]]
             if e["kind"] == "pipe" and e.get("fifo")]
    assert len(fifos) == 2 and all(e["fifo_path"] == str(path) for e in fifos), fifos
    assert _fifo_fds([p.pid] + kid, path) == before, "the restored fds are not the FIFO opened by its path"
    got = _finish(p.pid, out)
    assert sorted(got) == ["ok child 5000", "ok parent"], got


def test_deleted_fifo_comes_back_as_an_anonymous_pipe(procs, tmp_path):
    """A FIFO unlinked after both ends opened it: nobody can open it by its path any more, so
    it comes back as an anonymous pipe with its queued bytes, and the restore says so."""
    path = tmp_path / "fifo"
    p, out = _gated(procs, tmp_path, "fifo", "gone", path)
    img, err = _dump_kill_restore(procs, tmp_path, p)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("the FIFO %s (deleted) was deleted before the dump: it comes back as an "
                                   "anonymous pipe" % path in x for x in lines), err
    got = _finish(p.pid, out)
    assert sorted(got) == ["ok child 4000", "ok parent"], got


def test_fifo_read_outside_the_tree_keeps_its_bytes(procs, tmp_path):
    """A FIFO whose reader is a process outside the dump (here the test): the bytes it held at
    the dump stay in the kernel (the reader may take them meanwhile) and are not written twice;
    the restored writer joins the same reader through the path."""
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        p, out = _gated(procs, tmp_path, "fifo", "out", path)
        img, err = _dump_kill_restore(procs, tmp_path, p)
        assert not err.strip(), err
        (e,) = [e for e in image_meta(img)["fds"] if e["kind"] == "pipe"]
        assert e["outside"] == [os.getpid()] and e["data"] == "", e
        assert os.read(rfd, 100) == b"before\n"
        got = _finish(p.pid, out)
        assert got == ["ok out"], got
        assert os.read(rfd, 100) == b"after\n"
    finally:
        os.close(rfd)


# ------------------------------------------------------------------ 3. inotify
def _watches(pid):
    """{fd: sorted fdinfo watch lines without the file handle} of every inotify fd of pid."""
    out = {}
    for n in os.listdir("/proc/%d/fd" % pid):
        if os.readlink("/proc/%d/fd/%s" % (pid, n)) == "anon_inode:inotify":
            with open("/proc/%d/fdinfo/%s" % (pid, n)) as f:
                out[int(n)] = sorted(x.split(" fhandle-bytes:")[0] for x in f.read().splitlines()
                                     if x.startswith("inotify "))
    return out


def test_inotify_watches_come_back_with_their_descriptors(procs, tmp_path):
    """Two inotify fds: watches on a directory, a file and a one-shot watch, descriptors 1, 4
    and 5 (two were added and removed before); after the restore the same watches (path,
    mask, descriptor) report the changes the process then makes. The event one fd had queued
    unread at the dump is lost, and the restore says so."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "inotify", d)
    before = _watches(p.pid)
    assert sorted(len(v) for v in before.values()) == [1, 3], before
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert [x for x in err.strip().splitlines()] == [
        "ckpt: warning: fd 4 (inotify): the 32 bytes of events it had queued unread at the dump are lost"], err
    assert _watches(p.pid) == before
    got = _finish(p.pid, out)
    assert got == ["A 1 100 new", "A 4 2 -", "A 4 8 -", "A 5 4 -", "A 5 8000 -", "B 1 100 after"], got


def test_inotify_watch_on_a_deleted_file_is_refused(procs, tmp_path):
    """A watch whose file was deleted (the watch lives on while an fd holds the file): no path
    leads to it, the dump refuses naming the watch, and the target runs on untouched."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "inotify", d, "unlinked")
    rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "image", "--verify")
    assert rc != 0
    line = one_line_error(err)
    assert "process %d: fd 3 (inotify): watch 4 is on inode" % p.pid in line and "which no path leads to" in line, line
    assert not (tmp_path / "image").exists()
    os.kill(p.pid, signal.SIGUSR2)
    assert p.wait(timeout=WAIT) == 0


# ------------------------------------------------------------------ 5. deleted files held open
def _links(pid):
    d = "/proc/%d/fd" % pid
    return {int(n): os.readlink(os.path.join(d, n)) for n in os.listdir(d)}


def test_deleted_files_come_back_deleted(procs, tmp_path):
    """Files unlinked after they were opened (one also mapped shared, one 100 MiB sparse, one
    O_TMPFILE, one whose directory is gone too): their content is in the image once (the
    sparse file's hole is not), and they come back deleted files again, in their directory,
    with content, position and flags; the fd and the mapping of the mapped one are one file.
    The one whose directory is gone comes back as a memfd, and the restore says so."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "openunlinked", d)
    before = _links(p.pid)
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert os.path.getsize(img) < 32 << 20, "the sparse file's hole went into the image"
    kinds = {e["fd"]: e["kind"] for e in image_meta(img)["fds"]}
    assert [kinds[n] for n in range(3, 9)] == ["deleted"] * 6, kinds
    assert err.strip().splitlines() == [
        "ckpt: warning: fd 5: the deleted file %s/sub/c (deleted) comes back as a memfd (/memfd:c (deleted)): "
        "its directory is gone or the process may not create files in it" % d], err
    after = _links(p.pid)
    for n in (3, 4, 6, 7):
        assert after[n] == before[n], "fd %d: %s, was %s" % (n, after[n], before[n])
    assert after[8].startswith("%s/#" % d) and after[8].endswith(" (deleted)"), after[8]
    assert sorted(os.listdir(d)) == [], "a deleted file has a name again"
    got = _finish(p.pid, out)
    assert got == ["ok deleted 14"], got


def test_deleted_file_over_the_limit_is_refused(procs, tmp_path):
    """A deleted file larger than CKPT_DELETED_FILE_MAX_MB: the dump refuses before touching
    the target, naming the fd and the size; the target runs on."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "openunlinked", d, "big", 3)
    env = dict(os.environ, CKPT_DELETED_FILE_MAX_MB="2")
    res = subprocess.run(ckpt_argv("dump", p.pid, "-o", tmp_path / "image", "--verify"), env=env,
                         capture_output=True, text=True, timeout=WAIT, cwd="/")
    assert res.returncode != 0
    line = one_line_error(res.stderr)
    assert ("process %d: fd 3 is a deleted (%s/big (deleted)): a deleted file of 3.0 MiB" % (p.pid, d)) in line \
        and "over the limit of 2.0 MiB" in line, line
    assert not (tmp_path / "image").exists()
    assert status(p.pid)["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGUSR2)
    assert p.wait(timeout=WAIT) == 0
    assert read_lines(out)[-1] == "done", read_lines(out)


# ------------------------------------------------------------------ 4. file locks
def _locks_of(pids):
    """The /proc/locks lines of the locks pids hold (an OFD lock shows no PID: those on files
    the first of them has open), without the lock numbers, PIDs and device numbers."""
    with open("/proc/locks") as f:
        lines = [x.split() for x in f.read().splitlines()]
    inodes = {fdinfo_ino(pids[0], n) for n in _links(pids[0])}
    return sorted(" ".join(x[1:4] + x[6:]) + (" of %d" % pids.index(int(x[4])) if x[4] != "-1" else "")
                  for x in lines if x[4] in map(str, pids) or (x[1] == "OFDLCK" and x[5].rsplit(":", 1)[1] in inodes))


def fdinfo_ino(pid, n):
    try:
        with open("/proc/%d/fdinfo/%d" % (pid, n)) as f:
            return next((x.split()[1] for x in f if x.startswith("ino:")), None)
    except OSError:
        return None


@pytest.mark.parametrize("mode", ["one", "tree"])
def test_locks_still_held_after_restore(procs, tmp_path, mode):
    """A POSIX write lock and read lock, an OFD lock and a flock lock (on an open file two fds
    share) are held again by the restored process (tree: and a POSIX lock by its child, which
    shares the open files of the OFD and flock locks): /proc/locks lists the same locks, and
    another process (the test; a child of the target) finds them with F_GETLK, F_OFD_GETLK
    and flock(LOCK_NB)."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "flocks", d, *(["tree"] if mode == "tree" else []))
    pids = [p.pid] + [i["pid"] for i in procfs.descendants(p.pid)]
    before = _locks_of(pids)
    assert len(before) == (5 if mode == "tree" else 4), before
    img, err = _dump_kill_restore(procs, tmp_path, p)
    assert not err.strip(), err
    assert _locks_of(pids) == before
    with open(d / "f", "r+b") as f:
        got = fcntl.fcntl(f, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 20, 0))
        assert struct.unpack("hhqqi4x", got)[0] == fcntl.F_WRLCK and struct.unpack("hhqqi4x", got)[4] == p.pid
    with open(d / "g", "rb") as g:
        with pytest.raises(BlockingIOError):
            fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got = _finish(p.pid, out)
    assert got == ["ok locks %d" % (12 if mode == "tree" else 10)], got


@pytest.mark.parametrize("which", ["flock", "posix"])
def test_lock_taken_since_the_dump_refuses_the_restore(procs, tmp_path, which):
    """Another process took a lock conflicting with one of the image's after the dump: the
    restore refuses before creating anything, naming the fd, the lock and the holder; once it
    is let go, the restore succeeds."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, "flocks", d)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    with open(d / ("g" if which == "flock" else "f"), "r+b") as f:
        if which == "flock":
            fcntl.flock(f, fcntl.LOCK_SH)
            want = "fd 5 (%s/g): its write flock lock is taken: process %d (" % (d, os.getpid())
        else:
            fcntl.lockf(f, fcntl.LOCK_SH, 1, 15)
            want = "fd 3 (%s/f): its write POSIX record lock is taken: process %d (" % (d, os.getpid())
        rc, _, err = restore(procs, img)
        assert rc != 0
        line = one_line_error(err)
        assert want in line and "holds a conflicting read" in line, line
        assert not os.path.exists("/proc/%d" % p.pid)
    pid, _, err = restore_ok(procs, img)
    got = _finish(pid, out)
    assert got == ["ok locks 10"], got


def test_fifo_as_standard_output_is_opened_again_by_its_path(procs, tmp_path):
    """A process whose stdout is a FIFO (`prog > fifo`) read by a process outside (the test):
    its stdout is not a stream leading out put on /dev/null but the FIFO opened again by its
    path, and what the restored process prints reaches the same reader."""
    path, other = tmp_path / "stdout.fifo", tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    os.mkfifo(other, 0o600)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    keep = os.open(other, os.O_RDONLY | os.O_NONBLOCK)
    reader = LineReader(rfd)
    procs.fds.append(reader)
    try:
        wfd = os.open(path, os.O_WRONLY)
        try:
            p, _ = procs.start("fifo", "out", other, stdout=wfd)
        finally:
            os.close(wfd)
        assert reader.readline() == "ready %d" % p.pid
        assert reader.readline() == "set up"
        img = tmp_path / "image"
        dump(p.pid, img)
        reap_killed(p)
        (e,) = [e for e in image_meta(img)["fds"] if e["fd"] == 1]
        assert e["kind"] == "pipe" and not e["inherit"] and e["fifo_path"] == str(path), e
        pid, _, err = restore_ok(procs, img)
        assert not err.strip(), err
        assert os.readlink("/proc/%d/fd/1" % pid) == str(path)
        os.kill(pid, signal.SIGUSR2)
        assert reader.readline() == "ok out"
        assert reader.readline() == "done"
        assert os.read(keep, 100) == b"before\nafter\n"
        wait_gone(pid)
    finally:
        os.close(keep)


# ------------------------------------------------------------------ dumps that leave the target running
@pytest.mark.parametrize("name,args,want", [
    ("fdflags", lambda d: ["one", d], ["ok one 23"]),
    ("fifo", lambda d: ["tree", d / "fifo"], ["ok child 5000", "ok parent"]),
    ("inotify", lambda d: [d], ["A 1 100 new", "A 4 2 -", "A 4 8 -", "A 5 4 -", "A 5 8000 -", "B 1 100 pending",
                                "B 1 100 after"]),
    ("flocks", lambda d: [d], ["ok locks 10"]),
    ("openunlinked", lambda d: [d], ["ok deleted 14"]),
], ids=["flags", "fifo", "inotify", "locks", "deleted"])
def test_leave_running_dump_disturbs_nothing(procs, tmp_path, name, args, want):
    """What the dump reads of these fds (queued bytes and events, locks, deleted files' content)
    it reads without taking it: after a dump that leaves the target running, the target's own
    checks find everything as an undisturbed run does (the queued inotify event included)."""
    d = tmp_path / "d"
    d.mkdir()
    p, out = _gated(procs, tmp_path, name, *args(d))
    for pid in [i["pid"] for i in procfs.descendants(p.pid)]:
        procs.adopt(pid)
    dump(p.pid, tmp_path / "image", "--leave-running")
    assert status(p.pid)["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGUSR2)
    assert p.wait(timeout=WAIT) == 0, read_lines(out)[-5:]
    lines = read_lines(out)
    assert lines[-1] == "done", lines[-5:]
    assert sorted(lines[lines.index("set up") + 1:-1]) == sorted(want)
