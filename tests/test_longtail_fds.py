"""The long tail of the fd table (issue 10): status flags of every end of a pipe (one process
and a tree), FIFOs reopened by their path, inotify watches, file locks, deleted files. Each
target is dumped (--verify), killed, restored, and checks itself: the lines it prints after
its gate say what it found (tests/targets/restore/fdflags.c, ...)."""
import os
import signal

import pytest  # noqa: F401

from conftest import one_line_error
from restore_support import (WAIT, describe_status, dump, image_meta, procs, read_lines, reap_killed,  # noqa: F401
                             reap_orphans, restore_ok, rs_built, run_ckpt, subreaper, wait_file_line, wait_gone)
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
