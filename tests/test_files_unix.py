"""Unix domain sockets (ckpt/files/unix.py): dumped, killed and restored, the restored target
checks every socket itself (tests/targets/restore/unixfds.c): queued data in order with its
boundaries and senders, every pair both ways, names, shutdown states, options, the connection
that waited in a listener's accept queue, a new connection from the test, a datagram socket
connected to a socket of the test (like syslog's /dev/log). Refusals leave the target running
and working."""
import json
import os
import signal
import socket
import stat
import subprocess

from restore_support import (restore_attached, WAIT, LineReader, alive, exe, image_meta, procs, reap_killed, restore, rs_built,  # noqa: F401
                             run_ckpt, subreaper, wait_gone, dump)

CHECKS = 42     # "ok ..." lines the full target prints after its gate


def _dirs(tmp_path):
    """A short directory for the sockets (sun_path holds 107 bytes) and the test's own datagram
    socket there, standing for syslog's /dev/log."""
    d = tmp_path / "u"
    d.mkdir()
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(d / "log.sock"))
    log.settimeout(WAIT)
    return d, log


def _start(procs, d, log):
    p, reader = procs.start("unixfds", d, d / "log.sock", stdout=subprocess.PIPE)
    assert reader.readline() == "set up"
    assert log.recv(100) == b"log-before"
    return p, reader


def _run_checks(pid, reader, d, log, client=None):
    """Connect to the target's listener as a new client (or use the one given, already
    connected), open its gate, collect its checks."""
    if client is None:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(d / "listen.sock"))
    client.settimeout(WAIT)
    try:
        client.sendall(b"test-hello")
        os.kill(pid, signal.SIGUSR2)
        lines = []
        while True:
            line = reader.readline()
            assert line is not None, "the target's output ended: %r" % lines[-5:]
            lines.append(line)
            if line.startswith("done"):
                break
        failed = [x for x in lines if not x.startswith(("ok ", "done"))]
        assert not failed, "the target's own checks: %s" % failed
        assert lines[-1] == "done fails=0" and len(lines) == CHECKS + 1, lines
        got = b""
        while len(got) < 12:
            chunk = client.recv(12 - len(got))
            assert chunk, "the target closed the test's connection"
            got += chunk
        assert got == b"target-hello"
        assert log.recv(100) == b"log-after"
    finally:
        client.close()
    return lines


def _unix_links(pid):
    out = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        if link.startswith("socket:"):
            out[int(fd)] = link
    return out


def test_unix_sockets_dumped_killed_restored(procs, tmp_path):
    d, log = _dirs(tmp_path)
    with log:
        p, _ = _start(procs, d, log)
        before = sorted(_unix_links(p.pid))
        img = tmp_path / "image"
        dump(p.pid, img)
        reap_killed(p)
        entries = [e for e in image_meta(img)["fds"] if e["kind"] == "unix"]
        assert sorted(e["fd"] for e in entries) == before
        pid, out = restore_attached(procs, img)
        assert sorted(_unix_links(pid)) == before
        st = os.stat(d / "listen.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert not os.path.lexists(d / "gone.sock")
        _run_checks(pid, out, d, log)
        assert os.WEXITSTATUS(wait_gone(pid)) == 0


def test_leave_running_then_restore_over_stale_socket_files(procs, tmp_path):
    """The dump only peeks: the target left running still reads everything queued, and its peek
    offsets are as they were. Then the image restores over the socket files the exited original
    left behind (nobody is bound to them any more)."""
    d, log = _dirs(tmp_path)
    with log:
        p, reader = _start(procs, d, log)
        img = tmp_path / "image"
        dump(p.pid, img, "--leave-running")
        first = _run_checks(p.pid, reader, d, log)
        assert p.wait(timeout=WAIT) == 0
        assert stat.S_ISSOCK(os.lstat(d / "listen.sock").st_mode)     # stale, left by the original
        pid, out = restore_attached(procs, img)
        assert _run_checks(pid, out, d, log) == first
        assert os.WEXITSTATUS(wait_gone(pid)) == 0


def test_bound_path_taken_at_restore_is_refused_up_front(procs, tmp_path):
    d, log = _dirs(tmp_path)
    with log:
        p, _ = _start(procs, d, log)
        img = tmp_path / "image"
        dump(p.pid, img)
        reap_killed(p)
        os.unlink(d / "listen.sock")
        (d / "listen.sock").write_bytes(b"someone else's file\n")
        rc, _, err = restore(procs, img)
        assert rc != 0
        assert str(d / "listen.sock") in err and "not a socket" in err, err
        assert "Traceback" not in err
        assert not alive(p.pid)
        assert (d / "listen.sock").read_bytes() == b"someone else's file\n"
        os.unlink(d / "listen.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
            other.bind(str(d / "listen.sock"))      # a socket in use, of another type
            rc, _, err = restore(procs, img)
            assert rc != 0
            assert str(d / "listen.sock") in err and "a socket in use is bound to it" in err, err
            assert not alive(p.pid)


def _refused(procs, argv_args, tmp_path, *want):
    """Start the target in a refusal mode, dump it: refused naming what is wanted; the target is
    left running. Returns (Popen, LineReader, fd it printed)."""
    p, reader = procs.start("unixfds", *argv_args, stdout=subprocess.PIPE)
    line = reader.readline()
    assert line.startswith("set up "), line
    fd = int(line.split()[2])
    img = tmp_path / "image"
    rc, _, err = run_ckpt("dump", p.pid, "-o", img, "--verify")
    assert rc != 0, "the dump should have been refused"
    for w in want + ("fd %d" % fd,):
        assert w in err, "%r not in %r" % (w, err)
    assert "Traceback" not in err
    assert not img.exists()
    assert alive(p.pid) and p.poll() is None
    return p, reader, fd


def _finishes_ok(p, reader):
    os.kill(p.pid, signal.SIGUSR2)
    lines = reader.read_all()
    assert lines and lines[-1] == "done fails=0", lines
    assert p.wait(timeout=WAIT) == 0


def test_stream_connection_leading_out_is_refused(procs, tmp_path):
    """Connected to a listener of the test: refused while the connection waits in the test's
    accept queue and once it is accepted, naming the fd, the path and the process at the other
    end; the target goes on using the connection."""
    d = tmp_path / "u"
    d.mkdir()
    path = str(d / "outside.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(path)
        lst.listen(1)
        lst.settimeout(WAIT)
        me = "process %d" % os.getpid()
        p, reader, fd = _refused(procs, ("outside", path), tmp_path, path, "not accepted it yet", me)
        conn, _ = lst.accept()
        with conn:
            rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "image", "--verify")
            assert rc != 0
            assert "fd %d" % fd in err and "stream socket connected to %s (held by %s" % (path, me) in err, err
            assert alive(p.pid) and not (tmp_path / "image").exists()
            conn.settimeout(WAIT)
            os.kill(p.pid, signal.SIGUSR2)
            got = b""
            while len(got) < 11:
                got += conn.recv(11 - len(got))
            assert got == b"still-works"
            conn.sendall(b"reply")
            lines = reader.read_all()
    assert lines == ["ok outside connection still works", "done fails=0"]
    assert p.wait(timeout=WAIT) == 0


def test_other_network_namespace_is_refused(procs, tmp_path):
    """A target in a network namespace of its own: sock_diag in ckpt's cannot see its sockets."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen(["unshare", "--net", str(exe("unixfds")), "scm", str(tmp_path)], stdin=subprocess.DEVNULL,
                             stdout=w, stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(w)
    procs.targets.append(p)
    reader = LineReader(r)
    procs.fds.append(reader)
    assert reader.readline() == "ready %d" % p.pid
    fd = int(reader.readline().split()[2])      # the pair's second end: the first one, fd - 1, is met first
    rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "image", "--verify")
    assert rc != 0
    assert "is in its own network namespace" in err, err
    assert alive(p.pid)
    _finishes_ok(p, reader)


def test_fd_in_flight_is_refused(procs, tmp_path):
    p, reader, _ = _refused(procs, ("scm", tmp_path), tmp_path, "SCM_RIGHTS")
    _finishes_ok(p, reader)


def test_waiting_connection_with_data_is_refused(procs, tmp_path):
    p, reader, _ = _refused(procs, ("early", tmp_path), tmp_path, "accept queue", "sent data")
    _finishes_ok(p, reader)


def test_connection_from_outside_waiting_in_accept_queue_is_refused(procs, tmp_path):
    """A client of the test waits in the target listener's queue: refused; once the target has
    gone on, it accepts that very client."""
    d, log = _dirs(tmp_path)
    with log:
        p, reader = _start(procs, d, log)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(d / "listen.sock"))
        rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "image", "--verify")
        assert rc != 0, "the dump should have been refused"
        assert "accept queue" in err and "outside the process" in err and str(d / "listen.sock") in err, err
        assert "process %d" % os.getpid() in err, err
        assert alive(p.pid) and not (tmp_path / "image").exists()
        _run_checks(p.pid, reader, d, log, client)
        assert p.wait(timeout=WAIT) == 0


def test_stdout_socket_leading_out_is_attached_to_ckpts_stdout(procs, tmp_path):
    """fd 1 a unix socket whose peer is the test's: dumped as a standard stream (not refused),
    restored as ckpt's own stdout, as pipes and terminals are."""
    d, log = _dirs(tmp_path)
    mine, theirs = socket.socketpair()
    with log, mine:
        try:
            p, _ = procs.start("unixfds", d, d / "log.sock", stdout=theirs.fileno())
        finally:
            theirs.close()
        reader = LineReader(os.dup(mine.fileno()))
        procs.fds.append(reader)
        assert reader.readline() == "ready %d" % p.pid
        assert reader.readline() == "set up"
        assert log.recv(100) == b"log-before"
        img = tmp_path / "image"
        dump(p.pid, img)
        reap_killed(p)
        out = [e for e in image_meta(img)["fds"] if e["fd"] == 1]
        assert out and out[0]["kind"] == "unix" and out[0]["inherit"] is True, out
        pid, restored_out = restore_attached(procs, img)
        assert os.readlink("/proc/%d/fd/1" % pid).startswith("pipe:")
        _run_checks(pid, restored_out, d, log)
        assert os.WEXITSTATUS(wait_gone(pid)) == 0
