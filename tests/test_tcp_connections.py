"""Established TCP connections across `ckpt dump` (killed), `ckpt restore`: saved and rebuilt in
TCP repair mode, held by the network lock in between, and going on as if nothing happened.

The server is tests/targets/restore/tcpserver.py; its clients are held by the test itself (so
they live outside the dumped process), on 127.0.0.1 and ::1. Before the dump every connection
has data in every direction: bytes the server has not read, bytes the server wrote that are in
flight (the client's pure ACKs are dropped by a rule of the test's own for two connections, so
the server holds sent-but-unacknowledged data), and bytes not sent yet (the client has a small
receive buffer and does not read). While the process is dead the clients go on writing (into
the lock). After the restore each client must receive the server's whole stream, every byte
once and in order, and the server must have received exactly what each client sent.
"""
import base64
import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from restore_support import (WAIT, alive, dump, image_meta, procs, reap_killed, restore, restore_ok,  # noqa: F401
                             rs_built, run_ckpt, subreaper, wait_file_line, wait_gone, read_lines)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt.kernel import netlock  # noqa: E402

TOTAL = 1500000          # the server's stream to each client
C1, C2 = 60000, 40000    # what each client sends before the dump, and after it
TARGET = "tcpserver.py"
TEST_TABLE = "ckpt_test_ackdrop"
WATCH_TABLE = "ckpt_test_watch"
RESET = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)     # what a reset connection answers


def client_stream(k):
    out = b"".join(hashlib.sha256(b"client %d block %d" % (k, i)).digest() for i in range((C1 + C2) // 32 + 1))
    return out[:C1 + C2]


def server_stream(k):
    out = b"".join(hashlib.sha256(b"stream %d block %d" % (k, i)).digest() for i in range(TOTAL // 32 + 1))
    return out[:TOTAL]


def nft(script):
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)


def locks(pid=None):
    """Names of ckpt's lock tables, as `nft list tables` shows them."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if "ckpt_lock_" in line]
    return [n for n in names if pid is None or n == "ckpt_lock_%d" % pid]


class Client:
    """One connection of the test's to the server: small receive buffer, not reading until
    finish(); with ackdrop, its pure ACKs are dropped (the server's data stays unacknowledged)."""

    def __init__(self, k, family, port, ackdrop=False):
        self.k = k
        self.family = family
        host = "127.0.0.1" if family == 4 else "::1"
        self.sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        if ackdrop:
            # pure ACKs of this client (no payload: shorter than any of its data segments)
            length = "ip length < 100" if family == 4 else "ip6 length < 80"
            r = nft("add table inet %s\nadd chain inet %s out { type filter hook output priority 0; }\n"
                    "add rule inet %s out tcp sport %d tcp dport %d tcp flags == ack %s drop\n"
                    % (TEST_TABLE, TEST_TABLE, TEST_TABLE, self.port, port, length))
            assert r.returncode == 0, r.stderr
        self.sock.settimeout(WAIT)
        self.sock.connect((host, port))
        self.data = client_stream(k)
        self.sock.sendall(b"hello %d\n" % k + self.data[:C1])
        self.received = bytearray()
        self.error = None
        self.threads = []

    def finish(self, second=True):
        """Start writing the rest (then shutdown) and reading everything, in two threads."""
        def send():
            try:
                if second:
                    self.sock.sendall(self.data[C1:])
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self.error = self.error or e

        def recv():
            try:
                while True:
                    d = self.sock.recv(65536)
                    if not d:
                        return
                    self.received += d
            except OSError as e:
                self.error = self.error or e
        self.threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=recv, daemon=True)]
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive(), "client %d: still waiting after %ds (received %d bytes)" % (
                self.k, WAIT, len(self.received))

    def close(self):
        self.sock.close()


class Scenario:
    """The server started with n4 + n6 connections, a UDP exchange and the gate ahead."""

    def __init__(self, procs, tmp_path, n4=3, n6=2, ackdrop=(0, 3), ballast=0, late=0):
        self.out = tmp_path / "out"
        self.img = tmp_path / "image"
        self.p, _ = procs.start(TARGET, n4, n6, TOTAL, ballast, late, stdout=self.out)
        self.pid = self.p.pid
        line = wait_file_line(self.out, lambda s: s.startswith("ports "), proc=self.p)
        self.port4, self.port6, self.udp_port, self.bound_port = (int(x) for x in line.split()[1:])
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(WAIT)
        self.udp.sendto(b"first", ("127.0.0.1", self.udp_port))
        line = wait_file_line(self.out, lambda s: s.startswith("udp-first "), proc=self.p)
        self.conn_udp_port = int(line.split()[2])
        self.clients = []
        try:
            for k in range(n4 + n6):
                fam, port = (4, self.port4) if k < n4 else (6, self.port6)
                self.clients.append(Client(k, fam, port, ackdrop=k in ackdrop))
            wait_file_line(self.out, lambda s: s == "waiting", proc=self.p)
        except BaseException:
            self.close()
            raise
        # queued on the UDP socket at the dump
        for d in (b"d1", b"d2", b"d3"):
            self.udp.sendto(d, ("127.0.0.1", self.udp_port))

    def lines(self):
        return read_lines(self.out)

    def opts_lines(self):
        return [s for s in self.lines() if s.startswith("opts ")]

    def wait_done(self, pid):
        os.kill(pid, signal.SIGUSR2)
        wait_file_line(self.out, lambda s: s == "done", proc=None)
        return self.lines()

    def check_streams(self, lines):
        """Every client got the server's whole stream once, in order; the server got theirs."""
        for c in self.clients:
            c.join()
            assert c.error is None, "client %d: %r" % (c.k, c.error)
            want = server_stream(c.k)
            assert len(c.received) == len(want), "client %d received %d bytes of %d" % (c.k, len(c.received), len(want))
            if bytes(c.received) != want:
                i = next(i for i in range(len(want)) if c.received[i] != want[i])
                raise AssertionError("client %d: stream differs from byte %d on" % (c.k, i))
            expect = "conn %d got %d %s" % (c.k, C1 + C2, hashlib.sha256(c.data).hexdigest())
            assert expect in lines, "server line for client %d: want %r, got %r" % (
                c.k, expect, [s for s in lines if s.startswith("conn %d " % c.k)])

    def check_udp(self, lines):
        port = self.udp.getsockname()[1]
        for d in ("d1", "d2", "d3"):
            assert "udp %d %s" % (port, d) in lines, [s for s in lines if s.startswith("udp")]
        got = set()
        while len(got) < 4:
            data, sender = self.udp.recvfrom(100)
            got.add((data, sender[1]))
        assert got == {(b"ack d1", self.udp_port), (b"ack d2", self.udp_port), (b"ack d3", self.udp_port),
                       (b"connected", self.conn_udp_port)}, got

    def close(self):
        for c in self.clients:
            c.close()
        self.udp.close()
        nft("delete table inet %s\n" % TEST_TABLE)
        nft("delete table inet %s\n" % WATCH_TABLE)


@pytest.fixture
def scenario(procs, tmp_path):
    made = []

    def make(**kw):
        s = Scenario(procs, tmp_path, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()
        if s.pid:
            netlock.lift_locks(s.pid)


def _tcp_entries(img):
    return [e for e in image_meta(img)["fds"] if e["kind"] == "tcp"]


# ------------------------------------------------------------------------------ tests
def test_connections_survive_dump_kill_restore(procs, scenario):
    sc = scenario()
    before = sc.opts_lines()
    # every FIN or RST the server's side sends, counted ahead of the lock (which would drop it)
    r = nft("add table inet %s\nadd chain inet %s out { type filter hook output priority -500; }\n"
            "add rule inet %s out tcp sport { %d, %d } tcp flags & (fin | rst) != 0 counter\n"
            % (WATCH_TABLE, WATCH_TABLE, WATCH_TABLE, sc.port4, sc.port6))
    assert r.returncode == 0, r.stderr
    res = dump(sc.pid, sc.img)
    reap_killed(sc.p)
    listed = subprocess.run(["nft", "list", "table", "inet", WATCH_TABLE], capture_output=True, text=True).stdout
    nft("delete table inet %s\n" % WATCH_TABLE)
    assert "packets 0 " in listed, "the killed server's sockets (closed in repair mode) sent a FIN or RST:\n" + listed
    meta = image_meta(sc.img)
    lock = meta.get("netlock")
    assert lock and lock["table"] == "ckpt_lock_%d" % sc.pid and len(lock["conns"]) == 5, lock
    assert locks(sc.pid) == ["ckpt_lock_%d" % sc.pid], "the lock is not held between dump and restore"
    entries = {tuple(e["peer"])[1]: e for e in _tcp_entries(sc.img)}
    assert len(entries) == 5
    for c in sc.clients:
        r = entries[c.port]["repair"]
        sndq = len(base64.b64decode(r["sndq"]))
        assert len(base64.b64decode(r["rcvq"])) == C1, "client %d: unread data not saved" % c.k
        assert r["unsent"] > 0, "client %d: nothing unsent in the image (queue %d)" % (c.k, sndq)
        if c.k in (0, 3):
            assert sndq - r["unsent"] > 1000, "client %d: no sent-but-unacknowledged data (queue %d, unsent %d)" % (
                c.k, sndq, r["unsent"])
    # the clients go on writing while the process is dead (the lock drops it; TCP sends it again)
    for c in sc.clients:
        c.finish()
    pid, _, err = restore_ok(procs, sc.img)
    assert pid == sc.pid
    assert locks(sc.pid) == [], "the lock outlived the restore"
    nft("delete table inet %s\n" % TEST_TABLE)
    lines = sc.wait_done(pid)
    st = wait_gone(pid)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, lines[-5:]
    sc.check_streams(lines)
    sc.check_udp(lines)
    after = sc.opts_lines()[len(before):]
    assert after == before, "options read back differ:\n%s\n%s" % (before, after)
    print("freeze %.3f ms, breakdown %s, lock %s ms"
          % (res["freeze_ms"], res.get("freeze_breakdown_ms"), lock.get("ms")))


def test_leave_running_dump_takes_no_lock(procs, scenario):
    sc = scenario()
    dump(sc.pid, sc.img, "--leave-running")
    assert alive(sc.pid)
    assert "netlock" not in image_meta(sc.img)
    assert locks() == [] or locks(sc.pid) == [], locks()
    assert len(_tcp_entries(sc.img)) == 5
    nft("delete table inet %s\n" % TEST_TABLE)
    for c in sc.clients:
        c.finish()
    lines = sc.wait_done(sc.pid)
    assert sc.p.wait(WAIT) == 0, lines[-5:]
    sc.check_streams(lines)
    sc.check_udp(lines)


def test_tcp_close_restores_connections_closed(procs, scenario):
    sc = scenario(ackdrop=())
    dump(sc.pid, sc.img)
    reap_killed(sc.p)
    pid, _, _ = restore_ok(procs, sc.img, "--tcp-close")
    assert locks(sc.pid) == [], "--tcp-close left the lock"
    for c in sc.clients:
        c.finish()
    lines = sc.wait_done(pid)
    wait_gone(pid)
    for c in sc.clients:
        assert "conn %d error ECONNABORTED" % c.k in lines, [s for s in lines if s.startswith("conn")]
        c.join()
        assert isinstance(c.error, OSError) and c.error.errno in RESET, \
            "client %d was not reset: %r" % (c.k, c.error)
    sc.check_udp(lines)


def test_port_taken_at_restore_is_a_clear_error(procs, scenario):
    sc = scenario(ackdrop=())
    dump(sc.pid, sc.img)
    reap_killed(sc.p)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("127.0.0.1", sc.port4))
        squatter.listen()
        rc, out, err = restore(procs, sc.img)
        assert rc != 0, "restore succeeded with the port taken: %s" % out
        msg = err.strip().splitlines()[-1]
        assert "127.0.0.1" in msg and "port %d" % sc.port4 in msg and "in use" in msg, msg
        assert not os.path.exists("/proc/%d" % sc.pid) or not alive(sc.pid), "a half-restored process is left"
        assert locks(sc.pid) == [], "the failed restore left the lock"
    finally:
        squatter.close()


def test_failed_dump_leaves_no_lock_and_connections_working(procs, scenario):
    """ckpt interrupted (SIGINT) while the target is frozen with its lock in place: the dump
    fails, the lock goes, the sockets leave repair mode and every connection goes on."""
    sc = scenario(ballast=600)
    p = procs.popen_ckpt("dump", sc.pid, "-o", sc.img, "--verify")
    deadline = time.monotonic() + WAIT
    while not netlock.held(sc.pid):
        assert p.poll() is None, "the dump ended before the lock was seen: %s" % (p.communicate(),)
        assert time.monotonic() < deadline, "no lock seen"
        time.sleep(0.0005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=WAIT)
    assert p.returncode != 0 and "interrupted" in err, err
    assert alive(sc.pid), "the target did not survive the failed dump"
    assert locks(sc.pid) == [], "the failed dump left the lock"
    assert not sc.img.exists()
    nft("delete table inet %s\n" % TEST_TABLE)
    for c in sc.clients:
        c.finish()
    lines = sc.wait_done(sc.pid)
    assert sc.p.wait(WAIT) == 0, lines[-5:]
    sc.check_streams(lines)


def test_ckpt_unlock(procs, scenario):
    sc = scenario(n4=1, n6=1, ackdrop=())
    dump(sc.pid, sc.img)
    reap_killed(sc.p)
    assert locks(sc.pid) == ["ckpt_lock_%d" % sc.pid]
    rc, out, err = run_ckpt("unlock", sc.pid)
    assert rc == 0 and "lifted inet ckpt_lock_%d" % sc.pid in out, (out, err)
    assert locks(sc.pid) == []
    rc, out, err = run_ckpt("unlock", sc.pid)
    assert rc == 0 and "no network lock held for process %d" % sc.pid in out, (out, err)
    # without the lock and without the process, a client's next segment is answered by a reset
    c = sc.clients[0]
    c.finish()
    c.join()
    assert isinstance(c.error, OSError) and c.error.errno in RESET, repr(c.error)


def test_connection_closed_by_its_peer_is_refused_up_front(procs, scenario):
    """CLOSE_WAIT (the client has closed its side, the server has not yet): refused before the
    target is touched, naming the fd and the connection; the target goes on untouched."""
    sc = scenario(n4=2, n6=0, ackdrop=())
    c = sc.clients[1]
    c.sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + WAIT
    while True:     # the server's side has seen the FIN
        out = subprocess.run(["ss", "-Htn", "state", "close-wait", "sport", "= :%d" % sc.port4],
                             capture_output=True, text=True).stdout
        if ":%d" % c.port in out:
            break
        assert time.monotonic() < deadline, "the server's side never reached CLOSE_WAIT"
        time.sleep(0.01)
    rc, out, err = run_ckpt("dump", sc.pid, "-o", sc.img, "--verify")
    assert rc != 0, out
    msg = err.strip().splitlines()[-1]
    assert "process %d: fd" % sc.pid in msg and "CLOSE_WAIT" in msg and "tcp" in msg, msg
    assert alive(sc.pid) and locks(sc.pid) == [] and not sc.img.exists()
    # untouched: the other connection goes on, and this one still gets the whole stream
    sc.clients[0].finish()
    c.finish(second=False)
    lines = sc.wait_done(sc.pid)
    assert sc.p.wait(WAIT) == 0, lines[-5:]
    for cl in sc.clients:
        cl.join()
        assert cl.error is None and bytes(cl.received) == server_stream(cl.k), "client %d" % cl.k
    assert "conn 0 got %d %s" % (C1 + C2, hashlib.sha256(sc.clients[0].data).hexdigest()) in lines
    assert "conn 1 got %d %s" % (C1, hashlib.sha256(c.data[:C1]).hexdigest()) in lines
